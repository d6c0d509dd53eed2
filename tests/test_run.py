"""`autobatch run` end to end on the cpu budget backend: the plan reaches SFTTrainer untouched, the budget
stays enforced during the real run, and an OOM mid-run is survived without going back a step."""

import gc
import json

import pytest
from torch.utils._python_dispatch import _get_current_dispatch_mode
from transformers import TrainerCallback

from autobatch import train
from autobatch.cli import main
from autobatch.config import build_config
from autobatch.memory import CpuBackend
from autobatch.probe import Prober, make_plan

MAX_LENGTH = 128
EFFECTIVE = 24


def run_config(model_dir, data, out, **overrides):
    values = {
        "model_name_or_path": str(model_dir), "dataset_name": str(data), "device": "cpu", "headroom": 0,
        "max_length": MAX_LENGTH, "gradient_checkpointing": False, "effective_batch_size": EFFECTIVE,
        "max_steps": 6, "output_dir": str(out), "logging_steps": 1, "save_strategy": "no",
    }
    values.update(overrides)
    return build_config(overrides=values)


def peaks(config, sizes) -> dict[int, int]:
    prober = Prober(config, CpuBackend(10**12), 10**12, per_device=EFFECTIVE)
    try:
        return {b: prober.run_trial(b).peak_memory_bytes for b in sizes}
    finally:
        prober.close()
        gc.collect()


@pytest.fixture(scope="module")
def budget_for_4(tiny_model_dir, tiny_dataset_file, tmp_path_factory):
    """A budget whose true limit is micro-batch 4 on the tiny Llama at 128 tokens."""
    config = run_config(tiny_model_dir("llama"), tiny_dataset_file, tmp_path_factory.mktemp("unused"))
    measured = peaks(config, [2, 4, 5])
    return (measured[4] + measured[5]) // 2, measured


def cli_args(model_dir, data, out, budget, *extra):
    return ["run", "--model", str(model_dir), "--dataset", str(data), "--device", "cpu",
            "--memory-budget", str(budget), "--headroom", "0", "--max-length", str(MAX_LENGTH),
            "--gradient-checkpointing", "false", "--effective-batch-size", str(EFFECTIVE), "--max-steps", "6",
            "--output-dir", str(out), *extra]


def test_run_trains_the_plan_under_the_budget(tiny_model_dir, tiny_dataset_file, budget_for_4, tmp_path, capsys):
    budget, _ = budget_for_4
    out = tmp_path / "out"
    assert main(cli_args(tiny_model_dir("llama"), tiny_dataset_file, out, budget)) == 0
    captured = capsys.readouterr()
    assert "OOM survived" not in captured.out
    state = json.loads((out / "trainer_state.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert plan["max_micro_batch_size"] == 4
    assert state["train_batch_size"] == plan["per_device_train_batch_size"] == 4
    assert plan["gradient_accumulation_steps"] == 6 and state["global_step"] == 6
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    assert "peak memory" in captured.out and "probe predicted" in captured.out


def test_one_micro_batch_more_runs_out_of_memory(tiny_model_dir, tiny_dataset_file, budget_for_4, tmp_path):
    budget, _ = budget_for_4
    config = run_config(tiny_model_dir("llama"), tiny_dataset_file, tmp_path / "out", memory_budget=budget,
                        per_device_train_batch_size=5, effective_batch_size=25, max_steps=2)
    plan = make_plan(config)
    assert not plan.fits and plan.trials[0].oom
    plan.fits = True  # force it through: the real run hits the OOM and survives it at half the micro-batch
    result = train.run(config, plan)
    assert result.fallbacks and result.fallbacks[0].global_step == 0
    assert result.fallbacks[0].per_device_train_batch_size == 2
    assert result.global_step == 2


def test_oom_mid_run_halves_the_micro_batch_and_keeps_the_step(
    tiny_model_dir, tiny_dataset_file, budget_for_4, tmp_path
):
    budget, measured = budget_for_4
    config = run_config(tiny_model_dir("llama"), tiny_dataset_file, tmp_path / "out", memory_budget=budget)
    plan = make_plan(config)
    assert plan.per_device_train_batch_size == 4

    class LowerBudget(TrainerCallback):
        """From step 2 on, the device has room for micro-batch 2 but not 4 (another process took the rest)."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                _get_current_dispatch_mode().budget_bytes = (measured[2] + measured[4]) // 2

    result = train.run(config, plan, callbacks=[LowerBudget()])
    assert len(result.fallbacks) == 1
    event = result.fallbacks[0]
    assert event.global_step == 2
    assert (event.per_device_train_batch_size, event.gradient_accumulation_steps) == (2, 12)
    assert event.per_device_train_batch_size * event.gradient_accumulation_steps == EFFECTIVE
    steps = [entry["step"] for entry in result.log_history if "loss" in entry]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert any("OOM survived at step 2" in line for line in train.summary_lines(result))


def test_saved_plan_is_reused_and_refused_when_memory_settings_differ(
    tiny_model_dir, tiny_dataset_file, budget_for_4, tmp_path, capsys
):
    budget, _ = budget_for_4
    model = tiny_model_dir("llama")
    plan_file = tmp_path / "plan.yaml"
    args = cli_args(model, tiny_dataset_file, tmp_path / "first", budget)
    assert main(["plan", *args[1:], "--output", str(plan_file)]) == 0
    capsys.readouterr()
    assert main(["run", "--plan", str(plan_file), "--max-steps", "2", "--output-dir", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "micro=" not in err, "no trial ran"
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["train_batch_size"] == 4
    assert main(["run", "--plan", str(plan_file), "--max-length", "64", "--output-dir", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "max_length: 128 -> 64" in err and not (tmp_path / "o2" / "plan.json").exists()


def test_resume_continues_from_the_last_checkpoint(tiny_model_dir, tiny_dataset_file, tmp_path):
    out = tmp_path / "out"
    base = {"memory_budget": "2GiB", "per_device_train_batch_size": 4, "save_strategy": "steps", "save_steps": 2}
    config = run_config(tiny_model_dir("llama"), tiny_dataset_file, out, max_steps=4, **base)
    plan = make_plan(config)
    train.run(config, plan)
    assert (out / "checkpoint-4").is_dir()
    longer = run_config(tiny_model_dir("llama"), tiny_dataset_file, out, max_steps=6, **base)
    result = train.run(longer, plan, resume=True)
    assert result.global_step == 6
    logged = [entry["step"] for entry in result.log_history if "loss" in entry]
    assert logged == sorted(logged) and logged[-1] == 6 and logged.count(1) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "missing.jsonl"], "no such file 'missing.jsonl'"),
        (["--dataset-text-field", "body"], "its fields are text"),
        (["--learning-rat", "1e-5"], "did you mean learning_rate"),
        (["--model", "./no/such/dir"], "does not exist"),
        (["--model", "nobody/no-such-model"], "could not be downloaded"),
    ],
)
def test_bad_run_input_is_one_line(tiny_model_dir, tiny_dataset_file, tmp_path, capsys, extra, message):
    args = cli_args(tiny_model_dir("llama"), tiny_dataset_file, tmp_path / "out", "2GiB", *extra)
    code = main(args)
    err = capsys.readouterr().err
    assert code in (1, 2)
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("autobatch: error")]) == 1
    assert not (tmp_path / "out" / "plan.json").exists()


def test_output_dir_not_writable_is_one_line(tiny_model_dir, tiny_dataset_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main(cli_args(tiny_model_dir("llama"), tiny_dataset_file, blocker / "out", "2GiB"))
    err = capsys.readouterr().err
    assert code == 2 and "output_dir" in err and "Traceback" not in err


def test_seed_config_offline_fails_with_one_line_then_trains_on_local_copies(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    code = main(["run", "--config", "configs/seed-opt350m-imdb.yaml", "--max-steps", "1", "--device", "cpu",
                 "--output-dir", str(tmp_path / "offline")])
    err = capsys.readouterr().err
    assert code == 1 and "could not be downloaded" in err and "local" in err and "Traceback" not in err
    imdb = tmp_path / "imdb.jsonl"
    reviews = ["A quiet film that grows on you.", "Too long, and the plot goes nowhere at all. " * 5]
    imdb.write_text("".join(json.dumps({"text": r, "label": i % 2}) + "\n" for i, r in enumerate(reviews * 16)))
    code = main(["run", "--config", "configs/seed-opt350m-imdb.yaml", "--model", str(tiny_model_dir("opt")),
                 "--dataset", str(imdb), "--max-steps", "2", "--device", "cpu", "--max-length", "64",
                 "--output-dir", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


@pytest.mark.slow
def test_run_with_no_arguments_trains_the_builtin_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run"]) == 0
    out = tmp_path / "autobatch-tiny-out"
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert (out / "config.json").exists() and (out / "plan.json").exists()


def test_eval_batch_is_planned_beside_training_and_formatting_func_is_imported(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    (tmp_path / "review_format.py").write_text("def to_text(example):\n    return 'Review: ' + example['review']\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"review": "good film " * (i % 40 + 1)}) + "\n" for i in range(80)))
    code = main(["run", "--model", str(tiny_model_dir("llama")), "--dataset", str(data),
                 "--formatting-func", "review_format:to_text", "--eval-fraction", "0.25",
                 "--evaluation-strategy", "steps", "--eval-steps", "2", "--device", "cpu", "--memory-budget", "300MiB",
                 "--max-length", "128", "--gradient-checkpointing", "false", "--effective-batch-size", "8",
                 "--max-steps", "4", "--output-dir", "out"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "evaluation_strategy is the old name of eval_strategy" in captured.out
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    evals = {t["micro_batch_size"]: t for t in plan["eval_trials"]}
    best = plan["per_device_eval_batch_size"]
    assert evals[best]["fits"] and not evals[best + 1]["fits"]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert any("eval_loss" in entry for entry in state["log_history"])
    assert "probe predicted" in captured.out
