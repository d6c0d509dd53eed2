"""SIGTERM/SIGINT: `autobatch run` as a real subprocess is stopped mid-training and mid-probing.

Mid-training, the first signal saves a complete checkpoint at the next step boundary and exits 143 with a
line naming the checkpoint and the --resume command; the same command without --resume is then refused and
changes nothing; with --resume (past a checkpoint cut mid-save) it finishes at max_steps. Mid-probing, the
command exits 143 and leaves no temp dir.
"""

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import call, listing

from autobatch.errors import Interrupted
from autobatch.interrupt import SignalStop

MAX_STEPS = 30  # far more than can run between the first logged step and the signal's arrival


def start(argv: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path / "tmp"), "HF_HUB_OFFLINE": "1"}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "autobatch", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)


def wait_for(process: subprocess.Popen, stream: str, marker: str, timeout_s: float = 300) -> list[str]:
    """Lines of `stream` read until one contains `marker` (the process is killed if it never comes)."""
    lines: queue.Queue = queue.Queue()
    pipe = getattr(process, stream)

    def read() -> None:  # stops at the marker: what follows is left in the pipe for communicate()
        for line in pipe:
            lines.put(line)
            if marker in line:
                return

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        if marker in line:
            return seen
    process.kill()
    raise AssertionError(f"{marker!r} never appeared on {stream}: {''.join(seen)[-2000:]}")


def run_argv(out: Path) -> list[str]:
    return ["run", "--device", "cpu", "--memory-budget", "2GiB", "--max-length", "32", "--micro-batch-size", "1",
            "--effective-batch-size", "2", "--max-steps", str(MAX_STEPS), "--logging-steps", "1",
            "--save-steps", "100000", "--output-dir", str(out)]


@pytest.mark.slow
def test_sigterm_mid_training_saves_a_checkpoint_and_resume_finishes(tmp_path):
    out = tmp_path / "out"
    process = start(run_argv(out), tmp_path)
    wait_for(process, "stdout", "'loss'")  # the first optimizer step has been logged: training is under way
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 143, err
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, "save_steps 100000: the only checkpoint is the one the signal asked for"
    checkpoint = checkpoints[0]
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 1 <= stopped_at < MAX_STEPS
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert saved["global_step"] == stopped_at
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {p.name for p in checkpoint.iterdir()}
    errors = [line for line in err.splitlines() if line.startswith("autobatch: error")]
    assert len(errors) == 1 and "stopped by SIGTERM" in errors[0] and str(checkpoint) in errors[0]
    assert errors[0].endswith("--resume") and "Traceback" not in err
    assert not list((tmp_path / "tmp").glob("autobatch-probe-*")), "the probe's temp dir is gone"

    # The same command again without --resume: refused, one line naming both ways on, nothing changed.
    before = listing(out)
    refused = subprocess.run([sys.executable, "-m", "autobatch", *run_argv(out)], check=False, capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)
    assert refused.returncode == 2, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("autobatch: error")]
    assert len(errors) == 1 and "--resume" in errors[0] and "--overwrite-output-dir" in errors[0]
    assert listing(out) == before

    # A checkpoint cut mid-save (no trainer_state.json) is newer but skipped, with a warning.
    cut = out / f"checkpoint-{stopped_at + 1}"
    shutil.copytree(checkpoint, cut)
    (cut / "trainer_state.json").unlink()
    resumed = call([*run_argv(out), "--resume"])  # in this process: no second start of torch and TRL
    assert resumed.returncode == 0, resumed.stderr
    assert f"--resume: skipping {cut}" in resumed.stderr and "micro=" not in resumed.stderr, "no probing on --resume"
    final = json.loads((out / "trainer_state.json").read_text())
    assert final["global_step"] == final["max_steps"] == MAX_STEPS
    logged = [entry["step"] for entry in final["log_history"] if "loss" in entry]
    assert logged == list(range(1, MAX_STEPS + 1)), "steps before the signal kept, none trained twice"


@pytest.mark.slow
def test_sigterm_while_probing_exits_143_and_leaves_no_temp_dir(tmp_path):
    out = tmp_path / "out"
    argv = run_argv(out)
    argv[argv.index("--micro-batch-size") + 1] = "auto"  # several trials: time to be signalled mid-search
    process = start(argv, tmp_path)
    wait_for(process, "stderr", "micro=1 ")  # the first trial has been reported
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "stopped by SIGTERM before training started" in err and "Traceback" not in err
    assert not list((tmp_path / "tmp").glob("autobatch-probe-*")), "the probe's temp dir is removed"
    assert not out.exists() or not list(out.glob("checkpoint-*"))


def test_first_signal_in_training_is_deferred_and_a_second_exits_at_once():
    stop = SignalStop()
    with pytest.raises(Interrupted, match="before training started") as before:
        stop.handle(signal.SIGINT, None)
    assert before.value.exit_code == 130

    stop = SignalStop()
    callback = stop.callback()
    control = type("Control", (), {"should_save": False, "should_training_stop": False})()
    callback.on_train_begin(None, None, control)
    stop.handle(signal.SIGTERM, None)  # deferred: no exception
    assert stop.signum == signal.SIGTERM and not control.should_save
    callback.on_step_end(None, None, control)
    assert control.should_save and control.should_training_stop
    with pytest.raises(Interrupted, match="second SIGTERM") as second:
        stop.handle(signal.SIGTERM, None)
    assert second.value.exit_code == 143
