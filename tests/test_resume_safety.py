"""--resume past the end, after a cut or broken checkpoint, and the advice each failure gives (issue 23)."""

import json
import subprocess
from pathlib import Path

import pytest
from helpers import call, error_lines

MAX_STEPS = 2


def autobatch(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`autobatch run` of the built-in tiny model into `out`, in this process."""
    return call(["run", "--device", "cpu", "--memory-budget", "2GiB", "--max-length", "32", "--micro-batch-size", "1",
                 "--effective-batch-size", "2", "--max-steps", str(MAX_STEPS), "--logging-steps", "1",
                 "--save-steps", "1", "--output-dir", str(out), *extra])


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


def empty_state(checkpoint: Path) -> None:
    (checkpoint / "trainer_state.json").write_text("")


def truncated_optimizer(checkpoint: Path) -> None:
    data = (checkpoint / "optimizer.pt").read_bytes()
    (checkpoint / "optimizer.pt").write_bytes(data[: len(data) // 2])


def cut_mid_save(checkpoint: Path) -> None:
    (checkpoint / "trainer_state.json").unlink()


@pytest.mark.parametrize("damage, named", [(empty_state, "trainer_state.json is unreadable"),
                                           (truncated_optimizer, "optimizer.pt is truncated"),
                                           (cut_mid_save, "no trainer_state.json")],
                         ids=["empty-trainer-state", "truncated-optimizer", "cut-mid-save"])
def test_a_broken_newest_checkpoint_is_named_once_and_resume_falls_back_to_the_previous(finished, tmp_path, damage,
                                                                                        named):
    """issue 23.10 (a raw JSONDecodeError / PytorchStreamReader error naming no file) and 23.11 (warned 3 times)."""
    out = copy_of(finished, tmp_path)
    newest = out / f"checkpoint-{MAX_STEPS}"
    damage(newest)
    for name in ("model.safetensors", "trainer_state.json"):  # stopped before the final save
        (out / name).unlink()
    done = autobatch(out, "--resume")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "skipping" in line]
    assert len(warnings) == 1 and str(newest) in warnings[0] and named in warnings[0], done.stderr
    assert global_step(out) == MAX_STEPS and "Traceback" not in done.stderr


def test_resume_with_a_corrupt_plan_json_takes_the_batch_from_the_checkpoint(finished, tmp_path):
    """issue 23.9: it advised a plain run, which is refused (an earlier run is there)."""
    out = copy_of(finished, tmp_path)
    (out / "plan.json").write_text('{"per_device_train_batch_')
    cut_mid_save(out / f"checkpoint-{MAX_STEPS}")
    done = autobatch(out, "--resume")
    assert done.returncode == 0, done.stderr
    assert "plan.json is unreadable" in done.stderr and global_step(out) == MAX_STEPS
    assert json.loads((out / "plan.json").read_text())["effective_batch_size"] == 2


def test_the_advice_when_no_checkpoint_is_whole_works(finished, tmp_path):
    """issue 23.9: every checkpoint cut mid-save: the advice given is followed and the run trains."""
    import shlex

    out = copy_of(finished, tmp_path)
    for checkpoint in out.glob("checkpoint-*"):
        cut_mid_save(checkpoint)
    done = autobatch(out, "--resume")
    (line,) = error_lines(done.stderr)
    assert done.returncode == 2 and "--overwrite-output-dir instead of --resume" in line
    assert "run without --resume" not in line
    followed = autobatch(out, *shlex.split("--overwrite-output-dir"))
    assert followed.returncode == 0, followed.stderr
    assert global_step(out) == MAX_STEPS and all(global_step(c) for c in out.glob("checkpoint-*"))
