"""OOM outside forward/backward during `autobatch run`: in the optimizer step, gradient clipping, evaluation and
a save. Each either survives (evaluation: halved eval batch) or stops with one line and a complete checkpoint
that `--resume` finishes from.

The optimizer-step OOM is a real one: the cpu backend's budget drops to what is live just before
`optimizer.step()`, so its first temporary does not fit. The others are raised where torch would raise them.
"""

import json

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode
from transformers import Trainer, TrainerCallback
from trl import SFTTrainer

from autobatch import report, train
from autobatch.config import build_config
from autobatch.errors import AutobatchError
from autobatch.memory import LiveBytesMode
from autobatch.planner import Plan
from autobatch.rundir import complete_checkpoints

MAX_STEPS = 4
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def config_for(model_dir, data, out, **overrides):
    values = {
        "model_name_or_path": str(model_dir), "dataset_name": str(data), "device": "cpu", "max_length": 64,
        "gradient_checkpointing": False, "effective_batch_size": 4, "max_steps": MAX_STEPS, "output_dir": str(out),
        "logging_steps": 1, "save_steps": 2,
    }
    return build_config(overrides={**values, **overrides})


def plan_for(eval_batch: int | None = None) -> Plan:
    return Plan(per_device_train_batch_size=2, gradient_accumulation_steps=2, effective_batch_size=4, world_size=1,
                max_fitting_micro_batch_size=2, memory_budget_bytes=10**12, usable_memory_bytes=10**12, headroom=0.0,
                peak_memory_bytes=0, device="cpu", max_length=64, trials=[], per_device_eval_batch_size=eval_batch)


def state(path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


class NoRoomForTheOptimizer(TrainerCallback):
    """Before the optimizer step of step `at_step`, the budget drops to what is live: any new tensor is an OOM."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.at_step:
            mode = _get_current_dispatch_mode()
            assert isinstance(mode, LiveBytesMode)
            mode.budget_bytes = mode.live_bytes


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


def resume_to_the_end(config) -> None:
    result = train.run(config, plan_for(), resume=True)
    assert result.global_step == MAX_STEPS
    logged = [e["step"] for e in state(config_dir(config))["log_history"] if "loss" in e]
    assert logged == list(range(1, MAX_STEPS + 1))


def config_dir(config):
    from pathlib import Path

    return Path(config.training_args["output_dir"])


def test_oom_in_the_optimizer_step_stops_naming_the_last_checkpoint_and_resume_finishes(
    llama, tiny_dataset_file, tmp_path
):
    out = tmp_path / "out"
    # adamw_torch: the fused default updates in place, with no temporary to run out of memory on
    config = config_for(llama, tiny_dataset_file, out, optim="adamw_torch")
    with pytest.raises(AutobatchError) as info:
        train.run(config, plan_for(), callbacks=[NoRoomForTheOptimizer(at_step=3)])
    message = str(info.value)
    assert "\n" not in message and "out of memory in the optimizer step at step 3" in message
    assert f"newest complete checkpoint is {out / 'checkpoint-2'}" in message and "lighter optim (" in message
    assert complete_checkpoints(out) == [out / "checkpoint-2"] and not (out / "checkpoint-3").exists()
    assert state(out / "checkpoint-2")["global_step"] == 2
    resume_to_the_end(config)


def test_oom_in_gradient_clipping_saves_the_step_before_and_stops(llama, tiny_dataset_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    config = config_for(llama, tiny_dataset_file, out, save_steps=100)  # no checkpoint but the one clipping saves
    calls = []
    clip = Trainer._clip_grad_norm

    def clip_or_oom(self, model):
        calls.append(self.state.global_step)
        if self.state.global_step == 2:
            raise torch.OutOfMemoryError(OOM)
        return clip(self, model)

    monkeypatch.setattr(Trainer, "_clip_grad_norm", clip_or_oom)
    with pytest.raises(AutobatchError, match="out of memory in gradient clipping at step 3") as info:
        train.run(config, plan_for())
    assert f"checkpoint {out / 'checkpoint-2'}" in str(info.value) and "`resume`" in str(info.value)
    assert calls == [0, 1, 2] and complete_checkpoints(out) == [out / "checkpoint-2"]
    assert state(out / "checkpoint-2")["global_step"] == 2
    monkeypatch.undo()
    resume_to_the_end(config)


def test_oom_in_evaluation_halves_the_eval_batch_and_the_run_finishes(llama, tiny_dataset_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    config = config_for(llama, tiny_dataset_file, out, eval_fraction=0.25, eval_strategy="steps", eval_steps=2,
                        save_steps=100)
    sizes = []
    predict = SFTTrainer.prediction_step

    def predict_or_oom(self, model, inputs, *args, **kwargs):
        sizes.append(len(inputs["input_ids"]))
        if sizes[-1] > 2:  # an eval batch of more than 2 does not fit
            raise torch.OutOfMemoryError(OOM)
        return predict(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "prediction_step", predict_or_oom)
    result = train.run(config, plan_for(eval_batch=8))
    assert result.eval_fallbacks == [4, 2]
    assert sizes[:2] == [8, 4] and set(sizes[2:]) == {2}, "8 and 4 failed once each; 2 from then on"
    assert result.global_step == MAX_STEPS
    assert [e["step"] for e in state(out)["log_history"] if "eval_loss" in e] == [2, 4]
    assert "OOM in evaluation survived: eval batch lowered to 2" in report.summary_lines(result)


def test_oom_while_saving_names_the_incomplete_checkpoint(llama, tiny_dataset_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    config = config_for(llama, tiny_dataset_file, out)

    def no_room(self, output_dir):
        raise torch.OutOfMemoryError(OOM)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", no_room)
    with pytest.raises(AutobatchError, match=f"out of memory while saving {out / 'checkpoint-2'}"):
        train.run(config, plan_for())
    assert (out / "checkpoint-2").is_dir() and complete_checkpoints(out) == [], "--resume would skip it"


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
    OSError(28, "No space left on device"),
], ids=["torch-stream-writer", "enospc"])
def test_a_full_disk_while_saving_names_the_checkpoint_and_the_fix(llama, tiny_dataset_file, tmp_path, monkeypatch,
                                                                   error):
    """issue 23 (messages): a full disk gave `enforce fail at inline_container.cc`, naming no file."""
    out = tmp_path / "out"
    config = config_for(llama, tiny_dataset_file, out)

    def full(self, output_dir):
        raise error

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full)
    with pytest.raises(AutobatchError, match=f"cannot write {out / 'checkpoint-2'}: .*disk is full.*`resume`"):
        train.run(config, plan_for())
    assert complete_checkpoints(out) == [], "--resume skips it"
