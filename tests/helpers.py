"""Helpers shared by test modules (fixtures live in conftest.py): one copy each, so no test module imports
another. Light at import: torch-heavy parts load inside the functions that need them."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

from autobatch.planner import Option, Plan, Trial

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
GiB = 2**30


def _script(name: str) -> str | None:
    """A console script of this interpreter's environment (CI runs `venv/bin/python -m pytest`, bin not on PATH)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


TORCHRUN = _script("torchrun")
AUTOBATCH = _script("autobatch")


def error_lines(err: str) -> list[str]:
    """The `autobatch: error` lines of a command's stderr."""
    return [line for line in err.splitlines() if line.startswith("autobatch: error")]


def listing(path: Path) -> dict[str, int]:
    """Every file under `path` with its mtime (ns): what a refused command must leave exactly as it was."""
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def call(argv: list[str]) -> subprocess.CompletedProcess:
    """`autobatch ARGV` run in this process, reported as a finished subprocess would be (exit code, stdout,
    stderr). A new interpreter spends ~10 s of CPU importing torch and TRL before it does anything: tests
    whose point is not the process itself (no signal, no launcher, no import check) call this instead."""
    from autobatch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return subprocess.CompletedProcess(["autobatch", *argv], code, out.getvalue(), err.getvalue())


def run_script(path: Path, *argv: str) -> subprocess.CompletedProcess:
    """A benchmark script run as `python PATH ARGV` would run it (`__main__`, its argv, its folder first on
    sys.path for sibling scripts), in this process: no new interpreter to import torch again. What it sets in
    os.environ, sys.path and sys.modules (its siblings) is undone after it."""
    import runpy

    out, err, code = io.StringIO(), io.StringIO(), 0
    argv_before, path_before, environment, modules = sys.argv, list(sys.path), dict(os.environ), set(sys.modules)
    sys.argv, sys.path[:0] = [str(path), *argv], [str(path.parent)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv, sys.path[:] = argv_before, path_before
        os.environ.clear()
        os.environ.update(environment)
        for name in set(sys.modules) - modules:
            if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(path.parent)):
                del sys.modules[name]
    return subprocess.CompletedProcess([str(path), *argv], code, out.getvalue(), err.getvalue())


def plan_json(args: list[str], capsys) -> dict:
    """`autobatch plan ARGS --json`, run in this process: the JSON object it printed (exit 0 asserted)."""
    from autobatch.cli import main

    code = main(["plan", *args, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def peaks(config, sizes, per_device: int | None = None) -> dict[int, int]:
    """Trial peaks at `sizes`, measured with no budget pressure (accumulation for `per_device` samples,
    default the config's effective batch)."""
    from autobatch.memory import CpuBackend
    from autobatch.trial import Prober

    share = config.effective_batch_size if per_device is None else per_device
    prober = Prober(config, CpuBackend(10**12), 10**12, per_device=share)
    try:
        return {b: prober.run_trial(b).peak_memory_bytes for b in sizes}
    finally:
        prober.close()
        gc.collect()


def make_plan(**changes) -> Plan:
    """A plan as `autobatch plan` returns it: 16 × 2 on the cpu, micro-batch 17 the largest that fit."""
    trials = [Trial(1, 60 * MiB, True, 0.05), Trial(17, 250 * MiB, True, 0.40),
              Trial(18, 271 * MiB, False, 0.0, oom=True)]
    plan = Plan(
        per_device_train_batch_size=16, gradient_accumulation_steps=2, effective_batch_size=32, world_size=1,
        max_fitting_micro_batch_size=17, memory_budget_bytes=300 * MiB, usable_memory_bytes=270 * MiB, headroom=0.1,
        peak_memory_bytes=240 * MiB, device="cpu", max_length=256, trials=trials,
        options=[Option(16, 2, 0.38, True), Option(8, 4, 0.2, False)],
    )
    return dataclasses.replace(plan, **changes)


def plan_at(batch: int, micro: int, seconds: float = 0.1) -> Plan:
    """A sweep rung's plan: `batch` as `micro` × accumulation on one device, `seconds` per micro-batch."""
    return Plan(per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
                effective_batch_size=batch, world_size=1, max_fitting_micro_batch_size=micro, memory_budget_bytes=1,
                usable_memory_bytes=1, headroom=0.0, peak_memory_bytes=1, device="cpu", max_length=100,
                trials=[], seconds_per_micro_batch=seconds)


class PlantedClock:
    """A clock whose optimizer steps take `step_seconds(micro, checkpointing, index) × micro-batches` seconds."""

    def __init__(self, step_seconds):
        self.step_seconds = step_seconds
        self.now, self.begun, self.key, self.index = 0.0, False, None, 0
        self.trials: list[tuple] = []

    def __call__(self) -> float:
        if self.begun:  # on_step_end: the planted step has passed
            micro, checkpointing, micro_steps = self.key
            self.now += self.step_seconds(micro, checkpointing, self.index) * micro_steps
            self.index += 1
        self.begun = not self.begun
        return self.now


def install_planted(monkeypatch):
    """`install(step_seconds)` puts a PlantedClock in the trial timer and returns it; trials use it from then on."""
    from autobatch import trial
    from autobatch.trial import Prober

    def install(step_seconds):
        clock = PlantedClock(step_seconds)
        prepare = Prober._prepare

        def timed_prepare(self, micro_batch_size, micro_steps, eval_batch_size):
            prepare(self, micro_batch_size, micro_steps, eval_batch_size)
            clock.key, clock.index = (micro_batch_size, bool(self.trainer.args.activation_checkpointing), micro_steps), 0
            clock.trials.append(clock.key)

        monkeypatch.setattr(Prober, "_prepare", timed_prepare)
        monkeypatch.setattr(trial._StepTimer, "clock", staticmethod(clock))
        return clock

    return install


def tiny_config(model_dir, **overrides):
    """A cpu config of the tiny model: no headroom, 32 tokens, 8 GiB, no cache, checkpointing off (None: unset)."""
    from autobatch.config import build_config

    values = {"model_name_or_path": str(model_dir), "device": "cpu", "headroom": 0, "max_length": 32,
              "memory_budget": "8GiB", "no_cache": True, "gradient_checkpointing": False}
    values.update(overrides)
    return build_config(overrides={k: v for k, v in values.items() if v is not None})


class FakeProber:
    """Peak = 10 MiB + 3 MiB per sample; time per micro-batch 0.02 s + 0.01 s per sample."""

    instances: typing.ClassVar[list] = []

    def __init__(self, config, backend, usable_bytes, per_device=None, ddp=False, sharded=False):
        self.usable_bytes, self.per_device, self.notes, self.max_length = usable_bytes, per_device, [], 128
        self.precision = "fp32"
        self.sizes: list[int] = []
        self.trainer = type("T", (), {"train_dataset": {"input_ids": [[1] * 50] * 300}})()
        FakeProber.instances.append(self)

    def run_trial(self, micro_batch_size, eval_batch_size=None):
        self.sizes.append(micro_batch_size)
        peak = 10 * MiB + 3 * MiB * micro_batch_size
        return Trial(micro_batch_size, peak, peak <= self.usable_bytes, 0.02 + 0.01 * micro_batch_size)

    def close(self):
        pass
