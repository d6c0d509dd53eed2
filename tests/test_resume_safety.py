"""--resume past the end, after a cut or broken checkpoint, and the advice each failure gives (issue 23)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

MAX_STEPS = 2


def run_argv(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "autobatch", "run", "--device", "cpu", "--memory-budget", "2GiB", "--max-length",
            "32", "--micro-batch-size", "1", "--effective-batch-size", "2", "--max-steps", str(MAX_STEPS),
            "--logging-steps", "1", "--save-steps", "1", "--output-dir", str(out), *extra]


def autobatch(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(run_argv(out, *extra), check=False, capture_output=True, text=True, timeout=600,
                          cwd=out.parent)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("autobatch: error")]


def global_step(path: Path) -> int:
    return json.loads((path / "trainer_state.json").read_text())["global_step"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run of MAX_STEPS steps with a checkpoint at every step (built-in tiny model)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    done = autobatch(out)
    assert done.returncode == 0, done.stderr
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def test_resume_of_a_finished_run_trains_no_step_past_max_steps(finished, tmp_path):
    """Reproduction: each --resume of a finished run trained one more step (30 -> 31 -> 32) and saved it."""
    out = copy_of(finished, tmp_path)
    for _ in range(2):
        done = autobatch(out, "--resume")
        assert done.returncode == 0, done.stderr
        assert global_step(out) == MAX_STEPS and "nothing left to train" in done.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, MAX_STEPS + 1)]


def test_resume_after_a_stop_right_after_the_last_step_writes_the_final_model(finished, tmp_path):
    """A SIGTERM after the last step left checkpoint-N and no final model; its advice (--resume) now finishes."""
    out = copy_of(finished, tmp_path)
    for name in ("model.safetensors", "config.json", "trainer_state.json"):
        (out / name).unlink()
    done = autobatch(out, "--resume")
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").is_file() and global_step(out) == MAX_STEPS
    assert not (out / f"checkpoint-{MAX_STEPS + 1}").exists()
