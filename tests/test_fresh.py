"""Trials in fresh worker processes (issue 19), on the cpu backend: `trial_process: fresh` runs the same trial
as the planning process, byte for byte; the edge is confirmed in fresh processes where the design says
(max and max + 1, and the planned size); a worker that crashes, hangs or reports a CUDA error is one line
and leaves nothing running; the allocator setting is part of a cuda plan and `run --plan` warns on a change."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from autobatch import launch, planfile, trial
from autobatch.cli import main
from autobatch.config import build_config
from autobatch.errors import WorkerError
from autobatch.memory import CpuBackend
from autobatch.planfile import plan_yaml_text, read_plan_meta
from autobatch.planner import Plan, Trial
from autobatch.probe import make_plan, trial_process
from autobatch.trial import Prober

MAX_LENGTH = 64


def config_for(model_dir, **overrides):
    values = {"model_name_or_path": str(model_dir), "device": "cpu", "headroom": 0, "max_length": MAX_LENGTH,
              "gradient_checkpointing": False, "no_cache": True}
    values.update(overrides)
    return build_config(overrides=values)


def budget_between(config, size: int) -> int:
    """A budget whose true limit is `size`: halfway between the peaks of size and size + 1."""
    prober = Prober(config, CpuBackend(10**12), 10**12)
    try:
        low, high = (prober.run_trial(b).peak_memory_bytes for b in (size, size + 1))
    finally:
        prober.close()
    return (low + high) // 2


@pytest.mark.slow
def test_fresh_edge_matches_the_in_process_trials_to_the_byte(tiny_model_dir, _import_time_objects_frozen):
    model = tiny_model_dir("llama")
    config = config_for(model, trial_process="fresh", memory_budget=budget_between(config_for(model), 3),
                        no_cache=False)
    plan = make_plan(config)
    same = {t.micro_batch_size: t for t in plan.trials if not t.fresh_process}
    fresh = {t.micro_batch_size: t for t in plan.trials if t.fresh_process}
    assert plan.trial_process == "fresh" and plan.max_fitting_micro_batch_size == 3
    assert sorted(fresh) == [3, 4] and fresh[3].fits and not fresh[4].fits  # the edge, judged fresh
    # the cpu backend: no allocator history; the import-time tensors this worker froze out of its sight count there
    assert fresh[3].peak_memory_bytes == same[3].peak_memory_bytes + _import_time_objects_frozen
    assert plan.peak_memory_bytes == fresh[3].peak_memory_bytes
    assert plan.trials[-1].fresh_process and plan.trials[-2].fresh_process  # after the in-process search
    again = make_plan(config)  # every answer from the probe cache, the fresh ones from the fresh workload's
    assert again.trials == [] and again.max_fitting_micro_batch_size == 3
    assert [(t.micro_batch_size, t.fresh_process) for t in again.cached_trials if t.fresh_process] == [(3, True),
                                                                                                         (4, True)]
    assert again.peak_memory_bytes == plan.peak_memory_bytes


def test_trial_process_auto_is_fresh_on_cuda_only():
    auto, fresh = build_config(overrides={}), build_config(overrides={"trial_process": "fresh"})
    assert [trial_process(auto, d) for d in ("cuda", "cpu", "estimate")] == ["fresh", "same", "same"]
    assert trial_process(fresh, "cpu") == "fresh"
    assert trial_process(fresh, "cuda", trainer=object()) == "same"  # a caller's trainer cannot be rebuilt


def test_trial_process_typo_is_a_config_error(capsys):
    assert main(["plan", "--trial-process", "fersh"]) == 2
    assert "--trial-process must be one of auto, fresh, same, got 'fersh'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def token() -> Iterator[str]:
    """An environment variable every worker inherits: any process still carrying it is left running. One for the
    module, so its tests share one warm process (a new environment would start another)."""
    value = uuid.uuid4().hex
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOBATCH_TEST_TOKEN", value)
        patch.setattr(launch, "GRACE_S", 1.0)
        yield value


def left_running(token: str) -> list[int]:
    """Processes with the token in their environment, but for the warm process workers are forked from (it lives
    as long as this process, to fork the next)."""
    warm = {w.process.pid for w in launch._WARM}
    found = []
    for _ in range(100):  # orphans are reaped by init asynchronously
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid() and int(entry) not in warm:
                try:
                    if token.encode() in Path(f"/proc/{entry}/environ").read_bytes():
                        status = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                        if status != "Z":
                            found.append(int(entry))
                except OSError:
                    pass
        if not found:
            return []
        time.sleep(0.05)
    return found


def fixed_micro_config(model_dir, **overrides):
    return config_for(model_dir, per_device_train_batch_size=2, memory_budget="1GiB", trial_process="fresh",
                      **overrides)


def test_worker_crash_is_one_line_exit_1(tiny_model_dir, token, monkeypatch, capsys):
    monkeypatch.setenv(launch.FAULT_ENV, "crash")
    code = main(["plan", "--model", str(tiny_model_dir("llama")), "--device", "cpu", "--memory-budget", "1GiB",
                 "--max-length", str(MAX_LENGTH), "--micro-batch-size", "2", "--trial-process", "fresh",
                 "--no-cache"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 1
    assert len(err) == 1 and err[0].startswith(
        "autobatch: error: trial of micro-batch 2: worker autobatch.trial_worker was killed by SIGSEGV")
    assert left_running(token) == []


def test_worker_hang_is_ended_with_everything_it_started(tiny_model_dir, token, monkeypatch):
    monkeypatch.setenv(launch.FAULT_ENV, "hang")
    # long enough for the worker to reach its hang (it starts a grandchild there), even on a busy machine: it is
    # forked once the warm process has imported torch, so the clock runs from there; this test waits all of it
    monkeypatch.setattr(trial, "TRIAL_TIMEOUT_S", 8.0)
    with pytest.raises(WorkerError, match=r"^trial of micro-batch 2: worker autobatch.trial_worker did not finish within 8 s") as info:
        make_plan(fixed_micro_config(tiny_model_dir("llama")))
    assert info.value.kind == "timeout"
    assert left_running(token) == []


def test_worker_cuda_error_is_one_line(tiny_model_dir, token, monkeypatch):
    monkeypatch.setenv(launch.FAULT_ENV, "cuda")
    with pytest.raises(WorkerError, match=r"^trial of micro-batch 2: worker autobatch.trial_worker failed: RuntimeError: "
                                          r"CUDA error: an illegal memory access was encountered$") as info:
        make_plan(fixed_micro_config(tiny_model_dir("llama")))
    assert info.value.kind == "cuda"
    assert left_running(token) == []


# ---- the allocator setting in the plan ----------------------------------------------------------------------

def cuda_plan(conf: str | None) -> Plan:
    return Plan(per_device_train_batch_size=4, gradient_accumulation_steps=1, effective_batch_size=4, world_size=1,
                max_fitting_micro_batch_size=4, memory_budget_bytes=2**30, usable_memory_bytes=2**30, headroom=0.0,
                peak_memory_bytes=2**29, device="cuda", max_length=64, trials=[Trial(4, 2**29, True, 0.1)],
                pytorch_cuda_alloc_conf=conf)


@pytest.mark.parametrize(("planned", "now", "warned"), [
    ("expandable_segments:True", None, True),
    (None, "expandable_segments:True", True),
    ("expandable_segments:True", "expandable_segments:True", False),
    (None, None, False),
])
def test_run_plan_warns_when_the_allocator_setting_differs(planned, now, warned, tmp_path, monkeypatch, caplog):
    config = build_config(overrides={"model_name_or_path": "some/model", "dataset_name": "imdb"})
    path = tmp_path / "plan.yaml"
    path.write_text(plan_yaml_text(config, cuda_plan(planned)))
    assert read_plan_meta(path)["pytorch_cuda_alloc_conf"] == planned
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    if now is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", now)
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        plan = planfile.load_plan(str(path), build_config(str(path)))  # as `run --plan` reads it
    lines = [r.getMessage() for r in caplog.records if "PYTORCH_CUDA_ALLOC_CONF" in r.getMessage()]
    assert len(lines) == int(warned) and plan.pytorch_cuda_alloc_conf == planned
    if warned:
        assert f"measured with PYTORCH_CUDA_ALLOC_CONF={planned or '(unset)'} but this run has {now or '(unset)'}" \
            in lines[0]


def test_cpu_plan_records_no_allocator_setting(tmp_path):
    config = build_config(overrides={"model_name_or_path": "some/model", "dataset_name": "imdb"})
    plan = cuda_plan(None)
    plan.device = "cpu"
    path = tmp_path / "plan.yaml"
    path.write_text(plan_yaml_text(config, plan))
    assert "pytorch_cuda_alloc_conf" not in read_plan_meta(path)
