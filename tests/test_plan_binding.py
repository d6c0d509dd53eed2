"""`run --plan`: bound to the model's content and to the batch it states; equivalent spellings and the
built-in model accepted (issue 23.7, 23.8)."""

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import call, error_lines

from autobatch.builtin import save_tiny_model

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--device", "cpu", "--memory-budget", "200MiB", "--max-length", "32"]


def autobatch(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """`autobatch ARGV` in this process, its relative paths under `cwd`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        return call(list(argv))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plan(cwd: Path, output: str, *argv: str) -> Path:
    done = autobatch(cwd, "plan", *COMMON, "--micro-batch-size", "2", *argv, "--output", output)
    assert done.returncode == 0, done.stderr
    return cwd / output


@pytest.fixture
def model_plan(tmp_path, tiny_dataset_file):
    """A plan.yaml for a tiny Llama saved at tmp_path/model, effective batch 4 (2 × 2)."""
    model = save_tiny_model(tmp_path / "model", "llama")
    data = ["--model", str(model), "--dataset", str(tiny_dataset_file)]
    return model, data, plan(tmp_path, "plan.yaml", *data, "--effective-batch-size", "4")


def test_a_different_model_saved_at_the_same_path_is_refused(model_plan, tmp_path):
    """Reproduction: accepted, then OOM at step 0 (peak 58.0 MiB vs 39.6 MiB predicted)."""
    model, _, plan_file = model_plan
    shutil.rmtree(model)
    save_tiny_model(model, "llama", hidden_size=256, intermediate_size=1024)
    done = autobatch(tmp_path, "run", "--plan", str(plan_file), "--output-dir", "out")
    (line,) = error_lines(done.stderr)
    assert done.returncode == 2 and "model config" in line and "plan again" in line
    assert not (tmp_path / "out").exists()


def test_the_same_model_moved_elsewhere_is_accepted(model_plan, tmp_path):
    model, _, plan_file = model_plan
    moved = tmp_path / "moved"
    shutil.copytree(model, moved)
    done = autobatch(tmp_path, "run", "--plan", str(plan_file), "--model", str(moved), "--max-steps", "1",
                     "--output-dir", "out")
    assert done.returncode == 0, done.stderr


def test_a_hand_edited_micro_batch_is_refused_in_one_line(model_plan, tmp_path):
    """Reproduction: micro 2 -> 64 ran with micro 2's predicted peak and an effective batch silently 128."""
    _, _, plan_file = model_plan
    plan_file.write_text(plan_file.read_text().replace("per_device_train_batch_size: 2", "per_device_train_batch_size: 64"))
    done = autobatch(tmp_path, "run", "--plan", str(plan_file), "--output-dir", "out")
    (line,) = error_lines(done.stderr)
    assert done.returncode == 2 and "not what it planned (2 × 2" in line and "plan micro-batch 64 again into" in line
    assert not (tmp_path / "out").exists()


def test_resume_with_another_plan_is_refused_and_plan_json_kept(model_plan, tmp_path):
    """Reproduction: `--resume --plan other.yaml` changed the effective batch from 4 to 12 and overwrote plan.json."""
    _, data, plan_file = model_plan
    first = autobatch(tmp_path, "run", "--plan", str(plan_file), "--max-steps", "1", "--save-steps", "1",
                      "--output-dir", "out")
    assert first.returncode == 0, first.stderr
    other = plan(tmp_path, "other.yaml", *data, "--effective-batch-size", "12")
    before = digest(tmp_path / "out" / "plan.json")
    done = autobatch(tmp_path, "run", "--plan", str(other), "--resume", "--max-steps", "2", "--output-dir", "out")
    (line,) = error_lines(done.stderr)
    assert done.returncode == 2 and "trained with 2 × 2" in line and "resume without --plan" in line
    assert digest(tmp_path / "out" / "plan.json") == before


def test_a_plan_for_the_built_in_model_runs(tmp_path):
    plan_file = plan(tmp_path, "plan.yaml", "--effective-batch-size", "4")
    done = autobatch(tmp_path, "run", "--plan", str(plan_file), "--max-steps", "1", "--output-dir", "out")
    assert done.returncode == 0, done.stderr


def test_a_config_spelling_gradient_checkpointing_runs_a_plan_from_the_same_settings(tmp_path):
    """configs/tiny.yaml says `gradient_checkpointing: false`; plan.yaml writes activation_checkpointing."""
    tiny = str(REPO / "configs" / "tiny.yaml")
    plan_file = plan(tmp_path, "plan.yaml", "--config", tiny, "--effective-batch-size", "4")
    done = autobatch(tmp_path, "run", "--config", tiny, "--plan", str(plan_file), *COMMON, "--effective-batch-size",
                     "4", "--max-steps", "1", "--output-dir", "out")
    assert done.returncode == 0, done.stderr
