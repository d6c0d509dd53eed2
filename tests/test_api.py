"""The Python API: plan_trainer probes a caller's trainer and gives it back unchanged; apply_plan; the CLI's
plan and run go through autobatch.api; the classic-script example plans, applies and trains."""

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, make_plan

import autobatch
from autobatch import api
from autobatch.cli import main
from autobatch.config import Config
from autobatch.planner import Plan, Trial

SEEN: list[int] = []  # micro-batches at which any copy of Recorder saw a train begin


def recorder():
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        """Counts steps on itself; reports train starts to SEEN (shared by the copies trials use)."""

        def __init__(self):
            self.steps = 0

        def on_train_begin(self, args, state, control, **kwargs):
            SEEN.append(args.per_device_train_batch_size)

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    return Recorder()


@pytest.fixture
def user_trainer(tiny_model_dir, tiny_dataset_file, tmp_path):
    """A script's own SFTTrainer: 2 × 2, its own AdamW that has already stepped once, a callback."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model_dir = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    model(input_ids=torch.arange(16)[None], labels=torch.arange(16)[None]).loss.backward()
    optimizer.step()  # optimizer state exists: exp_avg, exp_avg_sq, step
    optimizer.zero_grad(set_to_none=True)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=64, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, max_steps=1, report_to="none", save_strategy="no",
                     use_cpu=True, bf16=False, learning_rate=0.1)
    return SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=str(tiny_dataset_file),
                      split="train"), processing_class=AutoTokenizer.from_pretrained(model_dir),
                      optimizers=(optimizer, None), callbacks=[recorder()])


def _recorder(trainer):
    return next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "Recorder")


def _state(trainer) -> dict:
    optimizer = trainer.optimizer.state_dict()
    return {
        "weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "optimizer": {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer["state"].items()},
        "param_groups": json.dumps(optimizer["param_groups"]),
        "python": random.getstate(), "numpy": np.random.get_state()[1].copy(), "torch": torch.get_rng_state(),
        "args": trainer.args.to_dict(), "global_step": trainer.state.global_step,
        "steps": _recorder(trainer).steps, "callbacks": list(trainer.callback_handler.callbacks),
        "training": trainer.model.training, "train_batch_size": trainer._train_batch_size,
        "metrics": json.dumps(trainer._metrics), "tokens": trainer._total_train_tokens,
    }


def test_plan_trainer_leaves_weights_optimizer_rng_and_callbacks_as_they_were(user_trainer):
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    before = _state(user_trainer)
    SEEN.clear()
    # Measured here: trial peaks 14853728 bytes at micro-batch 1, 23695064 at 2; the budget between makes
    # the second trial end in an OOM mid-step, the worst place to leave state behind.
    plan = autobatch.plan_trainer(user_trainer, memory_budget=19_274_396, max_micro_batch_size=2)
    after = _state(user_trainer)

    assert plan.effective_batch_size == 4 and plan.per_device_train_batch_size == 1  # the trainer's own 2 × 2 × 1
    assert [(t.micro_batch_size, t.oom) for t in plan.trials] == [(1, False), (2, True)]
    assert SEEN == [t.micro_batch_size for t in plan.trials]  # the callback (a copy) ran in every trial
    for name, tensor in before["weights"].items():
        assert torch.equal(tensor, after["weights"][name]), name
    assert before["optimizer"].keys() == after["optimizer"].keys()
    for index, state in before["optimizer"].items():
        for key, tensor in state.items():
            assert torch.equal(tensor, after["optimizer"][index][key]), (index, key)
    assert before["param_groups"] == after["param_groups"]
    assert before["python"] == after["python"]
    assert np.array_equal(before["numpy"], after["numpy"])
    assert torch.equal(before["torch"], after["torch"])
    for key in ("args", "global_step", "steps", "callbacks", "training", "train_batch_size", "metrics", "tokens"):
        assert before[key] == after[key], key
    assert all(p.grad is None for p in user_trainer.model.parameters())


def test_apply_plan_sets_the_batch_and_eval_batch_and_trains_it(user_trainer):
    eval_dataset = user_trainer.train_dataset.select(range(3))
    user_trainer.eval_dataset, user_trainer.args.eval_strategy = eval_dataset, "steps"
    plan = autobatch.plan_trainer(user_trainer, effective_batch_size=6, memory_budget="2GiB",
                                  max_micro_batch_size=2)
    micro = plan.per_device_train_batch_size
    assert micro * plan.gradient_accumulation_steps == 6 and micro <= 2
    assert plan.per_device_eval_batch_size == 2 and user_trainer.eval_dataset is eval_dataset
    plan.apply(user_trainer, oom_fallback=True)
    assert user_trainer.args.per_device_eval_batch_size == 2
    callback = _recorder(user_trainer)
    SEEN.clear()
    user_trainer.train()
    assert SEEN == [micro]
    assert user_trainer.state.train_batch_size == micro
    assert user_trainer.state.global_step == 1 and callback.steps == 1  # no trial step leaked into the run
    from trl import SFTTrainer

    from autobatch.train import OomSafeTrainer

    assert user_trainer.fallbacks == [] and type(user_trainer).__bases__ == (OomSafeTrainer, SFTTrainer)


def test_plan_trainer_refuses_the_estimate_device(user_trainer):
    with pytest.raises(autobatch.ConfigError, match="device='estimate' cannot probe a built trainer"):
        autobatch.plan_trainer(user_trainer, device="estimate")


def _plan() -> Plan:
    return Plan(
        per_device_train_batch_size=4, gradient_accumulation_steps=2, effective_batch_size=8, world_size=1,
        max_fitting_micro_batch_size=5, memory_budget_bytes=100, usable_memory_bytes=100, headroom=0.0,
        peak_memory_bytes=80, device="cpu", max_length=64, trials=[Trial(4, 80, True, 0.1)],
        memory_fingerprint={"model_name_or_path": "/models/tiny"},
    )


def test_save_plan_writes_json_that_round_trips_and_yaml_with_the_batch(tmp_path):
    plan = _plan()
    json_path = plan.save(tmp_path / "plan.json")
    assert Plan.from_dict(json.loads(Path(json_path).read_text())) == plan
    import yaml

    data = yaml.safe_load(Path(plan.save(tmp_path / "plan.yaml")).read_text())
    # plan.yaml states the precision and device measured and TRL's checkpointing default instead of leaving
    # them to TRL
    assert data == {"model_name_or_path": "/models/tiny", "per_device_train_batch_size": 4,
                    "gradient_accumulation_steps": 2, "activation_checkpointing": True, "bf16": False,
                    "use_cpu": True}


def test_load_applies_overrides_to_a_config_and_a_path():
    config = api.load(Config(model_name_or_path="m"), memory_budget="1KiB", learning_rate=0.5)
    assert (config.memory_budget_bytes, config.training_args) == (1024, {"learning_rate": 0.5})
    assert api.load(None, model_name_or_path="m", effective_batch_size=8).effective_batch_size == 8


def test_import_autobatch_stays_free_of_torch():
    code = "import sys, autobatch; autobatch.Plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_plan_and_run_go_through_the_api(monkeypatch, tmp_path, capsys):
    from autobatch import train

    calls, planned, trained = [], [], []
    result = train.RunResult(str(tmp_path), 1, 1.0, 2.0, 80, 80, 100, "cpu", 4, 2, 8)

    def plan(config, on_trial=None, **overrides):
        calls.append(("plan", config.effective_batch_size))
        return _plan()

    def run_plan(config, plan_file=None, *, resume=False, **kwargs):
        calls.append(("run_plan", plan_file, resume))
        planned.append(_plan())
        return planned[-1]

    def train_plan(config, plan, *, resume=False, **kwargs):
        calls.append(("train_plan", plan.per_device_train_batch_size))
        trained.append(plan)
        return result

    monkeypatch.setattr(api, "plan", plan)
    monkeypatch.setattr(api, "run_plan", run_plan)
    monkeypatch.setattr(api, "train_plan", train_plan)
    assert main(["plan", "--effective-batch-size", "8", "--json"]) == 0
    assert main(["run", "--json", "--output-dir", str(tmp_path)]) == 0
    assert calls == [("plan", 8), ("run_plan", None, False), ("train_plan", 4)]
    assert trained[0] is planned[0]  # the run trains the very plan run_plan gave, not a copy or a new probe
    # `run --json` is one object: that plan and that result, nothing dropped or recomputed on the way
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"plan": planned[0].to_dict(),
                                                                    "run": result.to_dict()}


@pytest.mark.slow
def test_classic_script_plans_its_own_trainer_applies_and_trains(tmp_path):
    spec = importlib.util.spec_from_file_location("classic_sft", ROOT / "examples" / "classic_sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(["--memory-budget", "100MiB", "--max-steps", "1", "--workdir", str(tmp_path)])
    micro = summary["per_device_train_batch_size"]
    assert summary["effective_batch_size"] == 32  # the script's 4 × 8, kept exactly
    assert micro <= summary["max_micro_batch_size"] and 32 % micro == 0
    assert summary["run_peak_bytes"] <= summary["memory_budget_bytes"]  # trained under the budget: no OOM
    assert summary["global_step"] == 1 and summary["callback_steps"] == 1  # trial steps did not leak
    begins = summary["callback_train_begins"]
    assert len(begins) == summary["trials"] + 1 and begins[-1] == micro  # the callback: every trial, then the run
    assert set(summary["collator_batches_in_run"]) == {micro}  # the custom collator in the run ...
    assert set(summary["collator_batches_in_trials"]) == set(begins[:-1])  # ... and in each trial


@pytest.mark.parametrize("path", ["cli", "api-probe", "api-plan"])
def test_run_checks_its_preconditions_once(path, tmp_path, monkeypatch, capsys):
    """issue 18.4: a run's preconditions have one home (`api.run_plan`), called once per `autobatch run` or
    `autobatch.run(...)`, so a warning they give (a checkpoint cut mid-save) is given once."""
    from autobatch import probe, rundir, train

    calls = []
    check = rundir.check_can_run
    monkeypatch.setattr(rundir, "check_can_run", lambda *a, **k: calls.append(k) or check(*a, **k))
    planned = make_plan()
    monkeypatch.setattr(probe, "make_plan", lambda *a, **k: planned)
    trained = []
    monkeypatch.setattr(train, "run", lambda config, plan, **k: trained.append(plan) or train.RunResult(
        str(tmp_path / "out"), 2, None, None, 0, 0, 0, "cpu", plan.per_device_train_batch_size,
        plan.gradient_accumulation_steps, plan.effective_batch_size))
    out = str(tmp_path / "out")
    if path == "cli":
        assert main(["run", "--output-dir", out, "--device", "cpu", "--memory-budget", "300MiB"]) == 0, \
            capsys.readouterr().err
    else:
        autobatch.run(output_dir=out, device="cpu", memory_budget="300MiB",
                      **({"plan": planned} if path == "api-plan" else {}))
    assert trained == [planned]
    assert calls == [{"resume": False, "overwrite": False}], "checked once, before probing"
