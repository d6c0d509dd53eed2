"""The probe cache: every trial stored in SQLite, keyed by a fingerprint of everything that changes memory.

People re-plan the same model on the same card again and again; a trial is seconds to minutes of a busy
GPU. `make_plan` wraps its probe with `ProbeCache.wrap`, so the search asks the cache first and never
learns there is one. A stored peak is a measurement, valid under any budget; a stored out-of-memory says
only that the peak passed the budget it ran under, so it answers for that budget or a smaller one and a
larger budget runs the trial again. Concurrency is SQLite's: WAL journal and a busy timeout, one
transaction per write. A cache that cannot be read is reported in one warning and ignored: a plan is
never taken from a cache that may be wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autobatch import __version__
from autobatch.config import NOT_MEMORY_KEYS
from autobatch.planner import Trial

logger = logging.getLogger(__name__)

CACHE_FILE = "probes.sqlite3"
BUSY_TIMEOUT_S = 30.0
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS workloads (
    fingerprint TEXT PRIMARY KEY, description TEXT NOT NULL, created REAL NOT NULL, last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS trials (
    fingerprint TEXT NOT NULL, micro_batch_size INTEGER NOT NULL, accumulation INTEGER NOT NULL,
    eval_batch_size INTEGER NOT NULL, peak_memory_bytes INTEGER NOT NULL, oom INTEGER NOT NULL,
    seconds REAL NOT NULL, budget_bytes INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (fingerprint, micro_batch_size, accumulation, eval_batch_size)
);
"""

RunTrial = Callable[..., Trial]  # Prober.run_trial(micro_batch_size, eval_batch_size=None)


def default_cache_path() -> Path:
    """`$XDG_CACHE_HOME/autobatch/probes.sqlite3` (XDG_CACHE_HOME defaults to ~/.cache)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root).expanduser() / "autobatch" / CACHE_FILE


def cache_path(path: str | os.PathLike | None) -> Path:
    return Path(path).expanduser() if path else default_cache_path()


def workload_key(description: dict[str, Any]) -> str:
    """A stable hash of the fingerprint (key order and non-JSON values do not change it)."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def memory_args(args) -> dict[str, Any]:
    """Every SFTConfig field of `args` except those `NOT_MEMORY_KEYS` names with a reason: keyed by
    construction, so a field nobody thought of (pad_to_multiple_of) still keys the cache."""
    values = args.to_dict() if hasattr(args, "to_dict") else dict(vars(args))
    return {key: value for key, value in sorted(values.items()) if key not in NOT_MEMORY_KEYS}


def workload_description(memory_fingerprint: dict[str, Any], model, args, example_length: int, padded: bool,
                         device: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Everything that changes a trial's peak: the config's memory keys, the model's own config as loaded,
    the SFTConfig values in force, the worst-case example length, the device, and the library versions.
    """
    from importlib.metadata import PackageNotFoundError, version

    model_config = getattr(model, "config", None)
    shape = model_config.to_dict() if hasattr(model_config, "to_dict") else {}
    for volatile in ("_name_or_path", "transformers_version"):  # where it was loaded from; versions below
        shape.pop(volatile, None)
    parameter = next(iter(model.parameters()), None)
    versions = {"autobatch": __version__}
    for package in ("torch", "transformers", "trl", "peft", "accelerate"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "config": memory_fingerprint,
        "model_config": shape,
        "model_class": type(model).__name__,
        "dtype": str(parameter.dtype) if parameter is not None else None,
        "attn_implementation": getattr(model_config, "_attn_implementation", None),
        "training_args": memory_args(args),
        "example_length": example_length,
        "padded": padded,
        "device": device,
        "world_size": world_size,
        "versions": versions,
    }


@dataclass
class Entry:
    """One workload in the cache, for `autobatch cache list`."""

    fingerprint: str
    description: dict[str, Any]
    trials: int
    last_used: float


class NotACache(sqlite3.DatabaseError):
    """The file is some other program's (an optuna study): it is neither written nor changed."""


APPLICATION_ID = 0x61627063  # "abpc": PRAGMA application_id of a probe cache (0 in caches written before it)


def check_own(path: Path) -> None:
    """Raise NotACache unless `path` is absent, empty, or a probe cache: read-only, so nothing changes.

    Opening with WAL or creating the tables would alter any other SQLite file (an optuna study's journal
    mode, its tables); this looks first through a read-only connection. A database with none of another
    program's tables is a cache another plan is creating this moment (WAL set, tables not yet all there):
    its schema is created with IF NOT EXISTS, so joining it is safe.
    """
    if not path.exists() or (path.is_file() and path.stat().st_size == 0):
        return
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    try:  # a corrupt file raises sqlite3.DatabaseError here: reported as an unreadable cache
        tables = {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
        application = connection.execute("PRAGMA application_id").fetchone()[0]
    finally:
        connection.close()
    if not tables <= {"workloads", "trials"} or application not in (0, APPLICATION_ID):
        shown = ", ".join(sorted(tables)[:4]) or "none"
        raise NotACache(f"{path} is not an autobatch probe cache (its tables: {shown})")


def _connect(path: Path) -> sqlite3.Connection:
    """Open (creating) the database: WAL so readers never block the writer, a busy timeout for writers.

    A file that is not a probe cache is refused (NotACache) before anything is written to it.
    """
    check_own(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        connection.execute("PRAGMA journal_mode = WAL")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"schema version {version}, expected {SCHEMA_VERSION}")
        connection.executescript(_SCHEMA)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    except BaseException:
        connection.close()
        raise
    return connection


class ProbeCache:
    """The trials of one workload (`fingerprint`) in the cache file at `path`.

    Any SQLite or file error disables the cache for the rest of the plan after one warning; the trial
    then simply runs.
    """

    def __init__(self, path: Path, description: dict[str, Any], budget_bytes: int) -> None:
        self.path = path
        self.description = description
        self.fingerprint = workload_key(description)
        self.budget_bytes = budget_bytes
        self.fresh_process = description.get("trial_process") == "fresh"  # its trials ran in worker processes
        self.broken: str | None = None
        self.hits = 0  # answers given (each marked `Trial.cached`)
        self._connection: sqlite3.Connection | None = None
        self._guard(self._open)

    def _open(self) -> None:
        self._connection = _connect(self.path)
        now = time.time()
        self._connection.execute(
            "INSERT INTO workloads VALUES (?, ?, ?, ?) ON CONFLICT(fingerprint) DO UPDATE SET last_used = ?",
            (self.fingerprint, json.dumps(self.description, sort_keys=True, default=str), now, now, now),
        )

    def _guard(self, action: Callable[[], Any]) -> Any:
        """Run a cache action; on any database or file error, warn once and stop using the cache."""
        if self.broken:
            return None
        try:
            return action()
        except (sqlite3.Error, OSError) as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
            foreign = isinstance(exc, NotACache)
            fix = "pass another `cache`" if foreign else "`autobatch cache clear`"
            keys = ("cache", "no_cache") if foreign else ("no_cache",)
            logger.warning("probe cache %s ignored (%s): trials run as without a cache; %s or `no_cache`",
                           self.path, self.broken, fix, extra={"keys": keys})
            self.close()
            return None

    def lookup(self, micro_batch_size: int, accumulation: int, eval_batch_size: int | None,
               usable_bytes: int) -> Trial | None:
        """The stored answer for this trial under the current budget, or None when it must run."""

        def read():
            return self._connection.execute(
                "SELECT peak_memory_bytes, oom, seconds, budget_bytes FROM trials WHERE fingerprint = ? AND "
                "micro_batch_size = ? AND accumulation = ? AND eval_batch_size = ?",
                (self.fingerprint, micro_batch_size, accumulation, eval_batch_size or 0),
            ).fetchone()

        row = self._guard(read)
        if row is None:
            return None
        peak, oom, seconds, budget = row
        size = eval_batch_size or micro_batch_size
        if oom:  # it ran out of `budget`: that says nothing about a larger one
            if self.budget_bytes > budget:
                return None
            return Trial(size, peak, fits=False, seconds_per_micro_batch=0.0, oom=True, fresh_process=self.fresh_process,
                         cached=True)
        return Trial(size, peak, fits=peak <= usable_bytes, seconds_per_micro_batch=seconds, oom=False,
                     fresh_process=self.fresh_process, cached=True)

    def store(self, micro_batch_size: int, accumulation: int, eval_batch_size: int | None, trial: Trial) -> None:
        def write():
            self._connection.execute(
                "INSERT OR REPLACE INTO trials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self.fingerprint, micro_batch_size, accumulation, eval_batch_size or 0,
                 trial.peak_memory_bytes, int(trial.oom), trial.seconds_per_micro_batch, self.budget_bytes, time.time()),
            )

        self._guard(write)

    def wrap(self, run_trial: RunTrial, accumulation: Callable[[int], int], usable_bytes: int) -> RunTrial:
        """`run_trial` that answers from the cache when it can (those answers marked `Trial.cached`)."""

        def cached_run_trial(micro_batch_size: int, eval_batch_size: int | None = None) -> Trial:
            steps = accumulation(micro_batch_size)
            hit = self.lookup(micro_batch_size, steps, eval_batch_size, usable_bytes)
            if hit is not None:
                logger.info("micro=%d answered from the probe cache", hit.micro_batch_size)
                self.hits += 1
                return hit
            trial = run_trial(micro_batch_size, eval_batch_size=eval_batch_size)
            self.store(micro_batch_size, steps, eval_batch_size, trial)
            return trial

        return cached_run_trial

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def list_entries(path: Path) -> list[Entry]:
    """Every workload in the cache file, most recently used first; [] when there is no file."""
    if not path.exists():
        return []
    connection = _connect(path)
    try:
        rows = connection.execute(
            "SELECT w.fingerprint, w.description, w.last_used, COUNT(t.fingerprint) FROM workloads w "
            "LEFT JOIN trials t ON t.fingerprint = w.fingerprint GROUP BY w.fingerprint ORDER BY w.last_used DESC"
        ).fetchall()
    finally:
        connection.close()
    return [Entry(key, json.loads(text), count, used) for key, text, used, count in rows]


def clear(path: Path) -> int:
    """Delete every stored trial (in one transaction, so a plan running meanwhile sees all or nothing)."""
    if not path.exists():
        return 0
    connection = _connect(path)
    try:
        with connection:
            connection.execute("BEGIN IMMEDIATE")
            count = connection.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
            connection.execute("DELETE FROM trials")
            connection.execute("DELETE FROM workloads")
    finally:
        connection.close()
    return count
