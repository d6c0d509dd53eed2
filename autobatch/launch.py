"""Child processes: the one place autobatch starts them, waits for them, ends them and reads what they found.

A worker is a module run as `python -m autobatch.<worker> SPEC_JSON RESULT_JSON`: it reads its spec, does
its work and writes one JSON object to the result path (`worker_main` does that plumbing). The parent
starts it in its own session (a process group of its own), waits with a timeout, and ends the whole group
on every way out (done, timeout, failure, Ctrl-C), so nothing it started (data-loader workers, compile
workers) outlives it. Whatever went wrong becomes one `WorkerError` line: a crash (non-zero exit or a
signal), a hang (the timeout), or an error the worker reported (a CUDA error other than out-of-memory
among them: it leaves the CUDA context unusable, which is one reason trials run out of process on cuda).

Why a fresh process at all: on an H200, trials run one after another in one process carried allocator
history and read up to ~9% high, while a trial in a fresh process matched plain TRL within 0.7%
(../shared/gpu/, issue 19).

Why a warm start: a worker given `imports` is forked from an autobatch.warm process that imported them
once (one per parent, kept while its environment stays the same), not started cold: each trial then skips
the ~7 s of CPU that importing torch and TRL costs. It falls back to a cold start off Linux, when
AUTOBATCH_WARM_START=0, or when the warm process cannot start.

API (all of it): `run_worker(module, spec, timeout_s)` → the worker's result dict;
`run_group(nproc, module, spec, timeout_s)` → one result dict per rank, rank order, with the launcher's
variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set as torchrun would; both take `env`
and `imports`; `worker_main(work)` in the worker's `__main__`. Nothing else in autobatch spawns processes its
own way.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from autobatch.errors import WorkerError
from autobatch.warm import NVML_CHECK

#: Variables by which torchrun, accelerate launch and MPI tell a process it is one of several.
LAUNCHER_VARIABLES = (
    "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
    "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
    "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK",
)
#: The parent group's rendezvous, which a worker group replaces with its own.
PARENT_GROUP_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "GROUP_WORLD_SIZE", "ROLE_NAME")
#: After one rank fails, the others get this long to exit on SIGTERM before SIGKILL ends them.
GRACE_S = 5.0
#: How often the parent looks at its children while waiting.
POLL_S = 0.05
#: Test hook: a worker whose environment names a fault (`crash`, `hang`, `cuda`) meets it before its work;
#: `FAULT_RANK` limits it to one rank of a group. Never set outside tests.
FAULT_ENV = "AUTOBATCH_TEST_WORKER_FAULT"
FAULT_RANK_ENV = "AUTOBATCH_TEST_WORKER_FAULT_RANK"
#: Exit status of a worker that reported its own error in the result file.
REPORTED_EXIT = 3
#: Set to 0 for a cold `python -m` per worker (the warm start's escape hatch).
WARM_ENV = "AUTOBATCH_WARM_START"
#: Read by a worker only as it runs, so they may differ between workers of one warm process.
RUN_TIME_VARIABLES = frozenset((*LAUNCHER_VARIABLES, *PARENT_GROUP_VARIABLES, FAULT_ENV, FAULT_RANK_ENV,
                                "PYTEST_CURRENT_TEST"))


@dataclass
class _Child:
    rank: int
    process: subprocess.Popen | _Forked
    result: Path
    log: Path
    ended: float | None = None  # when it was seen exiting (monotonic)


def run_worker(module: str, spec: dict, timeout_s: float | None, env: dict[str, str] | None = None,
               imports: tuple[str, ...] | None = None) -> dict:
    """Run `python -m module` on `spec` in a fresh process group; its result dict, or WorkerError (one line)."""
    return run_group(1, module, spec, timeout_s, env, imports)[0]


def run_group(
    nproc: int, module: str, spec: dict, timeout_s: float | None, env: dict[str, str] | None = None,
    imports: tuple[str, ...] | None = None,
) -> list[dict]:
    """Run `nproc` ranks of `python -m module` on `spec`; their result dicts in rank order.

    With `imports`, each rank is forked from a warm process that imported them (see the module's docstring).
    With nproc > 1 each rank gets RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE and MASTER_ADDR/MASTER_PORT
    (a free port on this host), as torchrun sets them. When a rank fails or the timeout passes, every rank's
    process group is ended (SIGTERM, then SIGKILL after GRACE_S) and WorkerError names the first rank to fail.
    """
    with tempfile.TemporaryDirectory(prefix="autobatch-worker-") as tmp:
        work = Path(tmp)
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        base = _child_env(env)
        if nproc > 1:
            base.update(WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(free_port()))
        children: list[_Child] = []
        with _ended_on_exit(children):
            for rank in range(nproc):
                rank_env = dict(base)
                if nproc > 1:
                    rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank))
                children.append(_start(rank, module, spec_path, work, rank_env, imports))
            _wait(children, module, timeout_s)
            return [_read_result(child, module, nproc) for child in children]


def free_port() -> int:
    """A TCP port free on this host right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    """This process's environment, this autobatch first on PYTHONPATH, the launcher's variables of a parent
    run under torchrun removed (a worker group gets its own), and `extra` on top. torchrun's TORCHELASTIC_* go
    too: with TORCHELASTIC_USE_AGENT_STORE a worker's rank 0 would not serve its group's store but dial the
    parent's agent, and every worker timed out connecting (seen under `torchrun autobatch plan` with fsdp)."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARIABLES and k not in PARENT_GROUP_VARIABLES and not k.startswith("TORCHELASTIC_")}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env.update(extra or {})
    return env


def _start(rank: int, module: str, spec_path: Path, work: Path, env: dict[str, str],
           imports: tuple[str, ...] | None) -> _Child:
    result, log = work / f"result-{rank}.json", work / f"log-{rank}.txt"
    warm = _warm(env, imports)
    if warm is not None:
        with contextlib.suppress(_WarmLost):
            return _Child(rank, warm.fork([module, str(spec_path), str(result)], env, log), result, log)
    with log.open("wb") as out:  # the child holds its own descriptor; ours closes at once
        process = subprocess.Popen(
            [sys.executable, "-m", module, str(spec_path), str(result)],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return _Child(rank, process, result, log)


class _WarmLost(Exception):
    """The warm process exited (or never started): start the worker cold."""


class _Warm:
    """The parent's end of one autobatch.warm process: requests on its stdin, replies on a pipe of their own."""

    def __init__(self, env: dict[str, str], imports: tuple[str, ...]) -> None:
        self.key = _warm_key(env, imports)
        replies, reply_end = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "autobatch.warm", str(reply_end), *imports], env={**env, **NVML_CHECK},
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(reply_end,),
                start_new_session=True,  # Ctrl-C in the terminal is the parent's to handle, not this process's
            )
        finally:
            os.close(reply_end)
        self.replies, self.buffer, self.lost = replies, b"", False
        self.pids: list[int] = []
        self.exits: dict[int, int] = {}
        self.lock = threading.Lock()

    def fork(self, argv: list[str], env: dict[str, str], log: Path) -> _Forked:
        """Ask for one worker; its pid once forked (after the imports, the first time), or _WarmLost."""
        request = {"argv": argv, "env": env, "cwd": os.getcwd(), "log": str(log)}
        with self.lock:
            try:
                self.process.stdin.write((json.dumps(request) + "\n").encode())
                self.process.stdin.flush()
            except OSError:
                self.lost = True
            try:
                while not self.pids and not self.lost:
                    self._read(None)
            except BaseException:  # its pid may still come, to be taken for the next: this process is done
                self.lost = True
                raise
            if not self.pids:
                raise _WarmLost
            return _Forked(self, self.pids.pop(0))

    def exit_code(self, pid: int) -> int | None:
        """The worker's exit status once it has exited (as Popen.returncode gives it), else None."""
        with self.lock:
            self._read(0)
            if pid in self.exits or not self.lost:
                return self.exits.get(pid)
        try:
            os.kill(pid, 0)  # the warm process is gone and cannot say: only whether the worker still runs
        except ProcessLookupError:
            return 1
        return None

    def _read(self, timeout: float | None) -> None:
        if self.lost:
            return
        ready, _, _ = select.select([self.replies], [], [], timeout)
        if not ready:
            return
        chunk = os.read(self.replies, 1 << 16)
        if not chunk:
            self.lost = True
            return
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if "pid" in message:
                self.pids.append(message["pid"])
            else:
                self.exits[message["exit"]] = message["code"]

    def close(self) -> None:
        """Close its stdin: it exits, ending any worker still running (none, when launch ended them)."""
        self.lost = True
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.replies)


class _Forked:
    """What launch needs of a Popen (pid, poll, wait, returncode) for a worker a warm process forked."""

    def __init__(self, warm: _Warm, pid: int) -> None:
        self.warm, self.pid, self.returncode = warm, pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.warm.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(POLL_S / 5)
        return self.returncode


_WARM: list[_Warm] = []  # this process's warm process, if it has one


def _warm(env: dict[str, str], imports: tuple[str, ...] | None) -> _Warm | None:
    """A warm process for workers of this environment that import `imports`: the one running, or a new one."""
    if imports is None or sys.platform != "linux" or os.environ.get(WARM_ENV, "1") == "0":
        return None
    if _WARM and _WARM[0].key == _warm_key(env, imports) and not _WARM[0].lost:
        return _WARM[0]
    _close_warm()
    try:
        _WARM.append(_Warm(env, imports))
    except OSError:
        return None
    return _WARM[0]


def _warm_key(env: dict[str, str], imports: tuple[str, ...]) -> tuple:
    """What the warm process was started with that its workers could see: its environment and its imports."""
    return imports, tuple(sorted((k, v) for k, v in env.items() if k not in RUN_TIME_VARIABLES))


@atexit.register
def _close_warm() -> None:
    while _WARM:
        _WARM.pop().close()


def _wait(children: list[_Child], module: str, timeout_s: float | None) -> None:
    """Until every child exits: raise on the timeout, or end the rest as soon as one fails."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        now = time.monotonic()
        for child in children:
            if child.ended is None and child.process.poll() is not None:
                child.ended = now
        failed = sorted((c for c in children if c.ended is not None and c.process.returncode != 0),
                        key=lambda c: c.ended)
        if failed:
            _end(children)
            raise _failure(failed[0], module, len(children))
        if all(c.ended is not None for c in children):
            return
        if deadline is not None and now > deadline:
            _end(children)
            running = [c.rank for c in children if c.ended is None]
            who = f"worker {module}" + (f" rank {', '.join(map(str, running))} of {len(children)}"
                                        if len(children) > 1 else "")
            raise WorkerError(f"{who} did not finish within {timeout_s:g} s (hung?): ended it and everything it "
                              "started", kind="timeout", rank=running[0] if len(children) > 1 else None)
        time.sleep(POLL_S)


@contextlib.contextmanager
def _ended_on_exit(children: list[_Child]) -> Iterator[None]:
    """Whatever way the parent leaves (done, error, Ctrl-C), no child's process group is left running."""
    try:
        yield
    finally:
        _end(children)


def _end(children: list[_Child]) -> None:
    """SIGTERM every child's process group, SIGKILL what is left after GRACE_S, and reap the children.

    The group is signalled even when its leader has exited: what the leader started (loader workers) may not have.
    """
    for child in children:
        _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(max(0.0, deadline - time.monotonic()))
    for child in children:
        _signal_group(child, signal.SIGKILL)
        child.process.wait()


def _signal_group(child: _Child, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.process.pid, signum)  # start_new_session: the group id is the child's pid


def _name(module: str, rank: int, nproc: int) -> str:
    return f"worker {module}" + (f" rank {rank} of {nproc}" if nproc > 1 else "")


def _failure(child: _Child, module: str, nproc: int) -> WorkerError:
    """One line for a child that exited non-zero: the error it reported, or how it died and its last words."""
    code = child.process.returncode
    name = _name(module, child.rank, nproc)
    reported = _load(child.result)
    if code == REPORTED_EXIT and reported and "error" in reported:
        error = reported["error"]
        return WorkerError(f"{name} failed: {error['message']}", kind=error["kind"], rank=child.rank)
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    last = _last_line(child.log)
    return WorkerError(f"{name} {how}" + (f": {last}" if last else " (no output)"), kind="crash", rank=child.rank)


def _read_result(child: _Child, module: str, nproc: int) -> dict:
    result = _load(child.result)
    if result is None:
        raise WorkerError(f"{_name(module, child.rank, nproc)} exited without writing its result",
                          kind="crash", rank=child.rank)
    return result


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_line(log: Path, width: int = 300) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:width] if lines else ""


# ---- the worker's side ---------------------------------------------------------------------------------------


def worker_main(work: Callable[[dict], dict]) -> None:
    """A worker's `__main__`: read the spec (argv[1]), run `work(spec)`, write its dict to argv[2].

    An exception is written as `{"error": {"kind", "message"}}` (kind `cuda` for a CUDA error other than
    out-of-memory, `oom`, or `error`) and the process exits REPORTED_EXIT, so the parent reports it in one line.
    """
    spec_path, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    try:
        _test_fault()
        result = work(spec)
    except Exception as exc:  # noqa: BLE001 - every error becomes the one line the parent reports
        _write(result_path, {"error": {"kind": error_kind(exc), "message": one_line(exc)}})
        sys.exit(REPORTED_EXIT)
    _write(result_path, result)


def error_kind(exc: BaseException) -> str:
    """`oom`, `cuda` (any other CUDA error: the context is unusable after it), or `error`."""
    text = f"{type(exc).__name__} {exc}"
    if isinstance(exc, MemoryError) or "OutOfMemoryError" in text or "out of memory" in text.lower():
        return "oom"
    return "cuda" if "CUDA error" in text or "AcceleratorError" in text or "cuDNN error" in text else "error"


def one_line(exc: BaseException, width: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:width]


def _write(path: Path, result: dict) -> None:
    """Written whole or not at all: the parent never reads half a result."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(result))
    partial.replace(path)


def _test_fault() -> None:
    fault = os.environ.get(FAULT_ENV)
    if not fault or os.environ.get(FAULT_RANK_ENV, os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    if fault == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if fault == "hang":
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a grandchild that must die too
        time.sleep(600)
    if fault == "cuda":
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
