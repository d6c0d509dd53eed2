"""autobatch.launch: a worker's result read back; a crash, hang or reported CUDA error is one line and
nothing the worker started is left running; a group of ranks gets the launcher's variables and ends together."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autobatch import launch
from autobatch.errors import WorkerError

ROOT = str(Path(launch.__file__).resolve().parent.parent)

ECHO = """
import json, os, sys, time
from autobatch.launch import worker_main

def work(spec):
    if spec.get("pidfile"):
        pids = [os.getpid()]
        if spec.get("grandchild"):
            import subprocess
            pids.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid)
        with open(spec["pidfile"] + os.environ.get("RANK", "0"), "w") as f:
            f.write(" ".join(map(str, pids)))
    if spec.get("fail_rank") is not None and os.environ.get("RANK") == str(spec["fail_rank"]):
        time.sleep(spec.get("fail_after_s", 0))
        raise ValueError("rank failed on purpose")
    if spec.get("sleep_s"):
        time.sleep(spec["sleep_s"])
    return {"echo": spec["value"], "ppid": os.getppid(), **{k: os.environ.get(k) for k in
            ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PYTORCH_NVML_BASED_CUDA_CHECK")}}

worker_main(work)
"""


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tiny worker module (no torch) on the children's PYTHONPATH."""
    (tmp_path / "echo_worker.py").write_text(textwrap.dedent(ECHO))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), ROOT]))
    monkeypatch.setattr(launch, "GRACE_S", 1.0)
    return "echo_worker"


@pytest.fixture(params=[None, ("json",)], ids=["cold", "warm"])
def imports(request: pytest.FixtureRequest) -> tuple[str, ...] | None:
    """Each test twice: workers started cold (`python -m`), and forked from a warm process."""
    return request.param


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not yet reaped by its (init) parent
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _gone(pids: list[int]) -> bool:
    for _ in range(100):  # orphans are reaped by init asynchronously
        if not any(_alive(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


def test_result_read_back(worker: str, imports: tuple[str, ...] | None) -> None:
    assert launch.run_worker(worker, {"value": [1, "a"]}, timeout_s=60, imports=imports)["echo"] == [1, "a"]


def test_crash_is_one_line(worker: str, imports: tuple[str, ...] | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(launch.FAULT_ENV, "crash")
    with pytest.raises(WorkerError, match=r"^worker echo_worker was killed by SIGSEGV") as info:
        launch.run_worker(worker, {"value": 1}, timeout_s=60, imports=imports)
    assert info.value.kind == "crash" and "\n" not in str(info.value)


def test_hang_ends_the_whole_group(worker: str, imports: tuple[str, ...] | None, tmp_path: Path) -> None:
    pidfile = str(tmp_path / "pid")
    with pytest.raises(WorkerError, match=r"did not finish within 3 s \(hung\?\)") as info:
        launch.run_worker(worker, {"value": 1, "sleep_s": 600, "grandchild": True, "pidfile": pidfile}, timeout_s=3,
                          imports=imports)
    assert info.value.kind == "timeout" and "\n" not in str(info.value)
    pids = [int(p) for p in Path(pidfile + "0").read_text().split()]
    assert len(pids) == 2 and _gone(pids)  # the worker and the process it started


def test_hang_hook(worker: str, imports: tuple[str, ...] | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(launch.FAULT_ENV, "hang")
    with pytest.raises(WorkerError, match=r"^worker echo_worker did not finish within 1 s"):
        launch.run_worker(worker, {"value": 1}, timeout_s=1, imports=imports)


def test_reported_cuda_error_is_one_line(worker: str, imports: tuple[str, ...] | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(launch.FAULT_ENV, "cuda")
    with pytest.raises(WorkerError, match=r"^worker echo_worker failed: RuntimeError: CUDA error: an illegal") as info:
        launch.run_worker(worker, {"value": 1}, timeout_s=60, imports=imports)
    assert info.value.kind == "cuda"


def test_group_gets_launcher_variables(worker: str, imports: tuple[str, ...] | None) -> None:
    results = launch.run_group(3, worker, {"value": 7}, timeout_s=60, imports=imports)
    assert [r["RANK"] for r in results] == ["0", "1", "2"] == [r["LOCAL_RANK"] for r in results]
    assert {r["WORLD_SIZE"] for r in results} == {"3"}
    assert len({r["MASTER_PORT"] for r in results}) == 1 and results[0]["MASTER_ADDR"] == "127.0.0.1"


def test_one_failed_rank_ends_the_group(worker: str, imports: tuple[str, ...] | None, tmp_path: Path) -> None:
    pidfile = str(tmp_path / "pid")
    spec = {"value": 1, "fail_rank": 1, "fail_after_s": 0.5, "sleep_s": 600, "pidfile": pidfile}
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 of 2 failed: ValueError: rank failed on purpose") as info:
        launch.run_group(2, worker, spec, timeout_s=120, imports=imports)
    assert info.value.rank == 1
    assert time.monotonic() - started < 60  # ended by the failure, long before the other rank's sleep or the timeout
    assert _gone([int(Path(pidfile + r).read_text()) for r in ("0", "1")])  # both ranks, the healthy one too


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("process groups and /proc: linux")


def test_crashed_rank_is_named_and_the_others_ended(worker: str, imports: tuple[str, ...] | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(launch.FAULT_ENV, "crash")
    monkeypatch.setenv(launch.FAULT_RANK_ENV, "1")
    pidfile = str(tmp_path / "pid")
    with pytest.raises(WorkerError, match=r"^worker echo_worker rank 1 of 3 was killed by SIGSEGV") as info:
        launch.run_group(3, worker, {"value": 1, "sleep_s": 600, "pidfile": pidfile}, timeout_s=120, imports=imports)
    assert info.value.rank == 1 and info.value.kind == "crash"
    survivors = [int(p) for r in ("0", "2") if Path(pidfile + r).exists() for p in Path(pidfile + r).read_text().split()]
    assert _gone(survivors)


def test_hung_group_is_ended_whole(worker: str, imports: tuple[str, ...] | None, tmp_path: Path) -> None:
    pidfile = str(tmp_path / "pid")
    with pytest.raises(WorkerError, match=r"^worker echo_worker rank 0, 1 of 2 did not finish within 3 s") as info:
        launch.run_group(2, worker, {"value": 1, "sleep_s": 600, "pidfile": pidfile}, timeout_s=3, imports=imports)
    assert info.value.kind == "timeout"
    assert _gone([int(Path(pidfile + r).read_text()) for r in ("0", "1")])


def test_warm_workers_are_forked_from_one_warm_process_that_never_checks_cuda_by_the_driver(worker: str) -> None:
    first, second = (launch.run_worker(worker, {"value": i}, timeout_s=60, imports=("json",)) for i in (1, 2))
    warm = launch._WARM[0].process.pid
    assert first["ppid"] == second["ppid"] == warm != os.getpid()
    ranks = launch.run_group(2, worker, {"value": 3}, timeout_s=60, imports=("json",))
    assert [r["ppid"] for r in ranks] == [warm, warm]  # rank variables are the worker's own, not a new warm process
    assert b"PYTORCH_NVML_BASED_CUDA_CHECK=1" in Path(f"/proc/{warm}/environ").read_bytes().split(b"\0")
    assert first["PYTORCH_NVML_BASED_CUDA_CHECK"] is None  # the worker's environment is the one it asked for
    assert launch.run_worker(worker, {"value": 4}, timeout_s=60)["ppid"] == os.getpid()  # no imports: cold


def test_another_environment_gets_another_warm_process_and_the_escape_hatch_starts_cold(
    worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = launch.run_worker(worker, {"value": 1}, timeout_s=60, imports=("json",))["ppid"]
    monkeypatch.setenv("AUTOBATCH_TEST_SOMETHING", "1")  # read at import time, for all launch knows
    after = launch.run_worker(worker, {"value": 2}, timeout_s=60, imports=("json",))["ppid"]
    assert after != before and _gone([before])  # one warm process at a time: the old one is closed
    monkeypatch.setenv(launch.WARM_ENV, "0")
    assert launch.run_worker(worker, {"value": 3}, timeout_s=60, imports=("json",))["ppid"] == os.getpid()


def test_workers_left_when_the_warm_process_is_closed_are_ended(worker: str, tmp_path: Path) -> None:
    """Closing its stdin (the parent exiting, or killed) ends whatever it forked that still runs."""
    env = launch._child_env(None)
    warm = launch._warm(env, ("json",))
    spec = tmp_path / "spec.json"
    spec.write_text('{"value": 1, "sleep_s": 600}')
    child = warm.fork([worker, str(spec), str(tmp_path / "result.json")], env, tmp_path / "log.txt")
    assert child.poll() is None and _alive(child.pid)
    launch._close_warm()
    assert _gone([child.pid, warm.process.pid])
