"""`autobatch run` end to end on the cpu budget backend: the plan reaches SFTTrainer untouched, the budget
stays enforced during the real run, and an OOM mid-run is survived without going back a step.

Budgets come from measured trial peaks (as in test_probe.py), so "fits" and "OOM" are exact facts. The
planned CLI run is done once per module and is also the reference the OOM-fallback runs must reproduce
weight for weight: splitting micro-batches keeps the effective batch, so it keeps the gradients (and so
does any micro × accumulation split of it: the sampler orders samples, not batches).

Which divisor of the effective batch the planner picks among those that fit depends on measured step
times, which are noisy on a loaded CPU; the planned run treats every timing as a tie (TIMING_NOISE 1), so the
largest divisor that fits, 4, is planned on any machine under any load (issue 24: the run-peak check failed by
1,416 bytes when timing picked micro-batch 1); the fallback tests pin micro-batch 4 themselves.
"""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import call, error_lines, peaks
from safetensors.torch import load_file
from torch.utils._python_dispatch import _get_current_dispatch_mode
from transformers import TrainerCallback

from autobatch import planner, report, train
from autobatch.cli import main
from autobatch.config import build_config
from autobatch.errors import AutobatchError
from autobatch.memory import LiveBytesMode
from autobatch.planner import Plan

MAX_LENGTH = 128
EFFECTIVE = 24
MICRO = 4  # the budget below makes 4 the largest micro-batch that fits
MAX_STEPS = 6


def run_config(model_dir, data, out, **overrides):
    values = {
        "model_name_or_path": str(model_dir), "dataset_name": str(data), "device": "cpu", "headroom": 0,
        "max_length": MAX_LENGTH, "gradient_checkpointing": False, "effective_batch_size": EFFECTIVE,
        "max_steps": MAX_STEPS, "output_dir": str(out), "logging_steps": 1,
    }
    values.update(overrides)
    return build_config(overrides=values)


def cli_args(model_dir, data, out, budget, *extra):
    """The issue's command; later flags in `extra` override earlier ones."""
    return ["run", "--model", str(model_dir), "--dataset", str(data), "--device", "cpu",
            "--memory-budget", str(budget), "--headroom", "0", "--max-length", str(MAX_LENGTH),
            "--gradient-checkpointing", "false", "--effective-batch-size", str(EFFECTIVE),
            "--max-steps", str(MAX_STEPS), "--output-dir", str(out), *extra]


def state(out) -> dict:
    return json.loads((Path(out) / "trainer_state.json").read_text())


def loss_steps(log_history) -> list[int]:
    return [entry["step"] for entry in log_history if "loss" in entry]


def saved_plan(out) -> Plan:
    """The Plan the CLI wrote to OUT/plan.json."""
    return Plan.from_dict(json.loads((Path(out) / "plan.json").read_text()))


def assert_same_weights(out, reference) -> None:
    weights, expected = load_file(next(Path(out).glob("*.safetensors"))), load_file(
        next(Path(reference).glob("*.safetensors")))
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


class LowerBudget(TrainerCallback):
    """Another process takes memory mid-run: the active LiveBytesMode's budget drops to `budget_bytes`.

    With `after_micro_batches=0` it drops when optimizer step `at_step` ends; otherwise inside the next
    optimizer step, after that many of its micro-batches, so the OOM hits a micro-batch that is not the
    step's first and the earlier ones must be replayed.
    """

    def __init__(self, budget_bytes: int, at_step: int = 2, after_micro_batches: int = 0):
        self.budget_bytes, self.at_step, self.after = budget_bytes, at_step, after_micro_batches
        self.micro_batches = 0

    def _lower(self):
        mode = _get_current_dispatch_mode()
        assert isinstance(mode, LiveBytesMode), "the cpu budget is enforced during the run"
        mode.budget_bytes = self.budget_bytes

    def on_step_begin(self, args, state, control, **kwargs):
        self.micro_batches = 0

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_batches += 1
        if self.after and state.global_step == self.at_step and self.micro_batches == self.after:
            self._lower()

    def on_step_end(self, args, state, control, **kwargs):
        if not self.after and state.global_step == self.at_step:
            self._lower()


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def budget_for_4(llama, tiny_dataset_file, tmp_path_factory):
    """(budget, peaks): halfway between the peaks of micro-batch 4 and 5, so the true limit is 4."""
    config = run_config(llama, tiny_dataset_file, tmp_path_factory.mktemp("unused"))
    measured = peaks(config, [2, MICRO, MICRO + 1], EFFECTIVE)
    assert measured[2] < measured[MICRO] < measured[MICRO + 1]
    return (measured[MICRO] + measured[MICRO + 1]) // 2, measured


@pytest.fixture(scope="module")
def planned_run(llama, tiny_dataset_file, budget_for_4, tmp_path_factory):
    """The issue's command (plus --logging-steps 1 and --json), run once: the reference for the module."""
    budget, _ = budget_for_4
    out = tmp_path_factory.mktemp("planned") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(planner, "TIMING_NOISE", 1.0)  # step times never decide: the largest divisor that fits
        done = call(cli_args(llama, tiny_dataset_file, out, budget, "--logging-steps", "1", "--json"))
    assert done.returncode == 0, done.stderr
    return SimpleNamespace(out=out, report=json.loads(done.stdout), err=done.stderr, budget=budget)


def test_run_trains_the_plan_under_the_budget(planned_run):
    out, report, budget = planned_run.out, planned_run.report, planned_run.budget
    plan, result = report["plan"], report["run"]
    trials = {t["micro_batch_size"]: t for t in plan["trials"]}
    micro = plan["per_device_train_batch_size"]
    assert trials[MICRO]["fits"] and not trials[MICRO + 1]["fits"] and plan["max_micro_batch_size"] == MICRO
    assert micro == MICRO and trials[micro]["fits"]  # timings out of the decision (see the module docstring)
    assert micro * plan["gradient_accumulation_steps"] == plan["effective_batch_size"] == EFFECTIVE
    # no OOM in the run, and its peak is the probe's prediction at the planned micro-batch, to the byte
    # (peak <= budget alone would hold by construction: the cpu backend never lets a held peak pass it)
    assert result["fallbacks"] == [] and "OOM at step" not in planned_run.err
    assert result["memory_budget_bytes"] == budget
    assert result["peak_memory_bytes"] == trials[micro]["peak_memory_bytes"] == plan["peak_memory_bytes"]
    assert result["global_step"] == MAX_STEPS
    # plan.json against what the run really used and the flags given, not against the same Plan serialised again
    written = json.loads((out / "plan.json").read_text())
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert (written["per_device_train_batch_size"], written["gradient_accumulation_steps"]) == (
        args.per_device_train_batch_size, args.gradient_accumulation_steps)
    assert (written["effective_batch_size"], written["memory_budget_bytes"], written["device"],
            written["max_length"], written["max_micro_batch_size"]) == (EFFECTIVE, budget, "cpu", MAX_LENGTH, MICRO)
    written_trials = {t["micro_batch_size"]: t["fits"] for t in written["trials"]}
    assert written_trials[MICRO] and not written_trials[MICRO + 1]
    trainer_state = state(out)
    assert trainer_state["train_batch_size"] == micro
    assert trainer_state["global_step"] == trainer_state["max_steps"] == MAX_STEPS
    assert loss_steps(trainer_state["log_history"]) == list(range(1, MAX_STEPS + 1))
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))


def test_one_micro_batch_more_is_refused_by_the_plan_check(llama, tiny_dataset_file, budget_for_4, tmp_path, capsys):
    budget, _ = budget_for_4
    out = tmp_path / "out"
    code = main(cli_args(llama, tiny_dataset_file, out, budget,
                         "--micro-batch-size", str(MICRO + 1), "--effective-batch-size", str(4 * (MICRO + 1))))
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code == 1 and f"micro={MICRO + 1} OOM" in err
    assert len(lines) == 1 and f"micro-batch {MICRO + 1} does not fit" in lines[0]
    assert "Traceback" not in err and not out.exists(), "refused before training: nothing written"


def test_one_micro_batch_more_runs_out_of_memory_in_the_run(
    llama, tiny_dataset_file, planned_run, tmp_path
):
    """Forced past the plan check, the real run hits the OOM at its first micro-batch and survives it."""
    config = run_config(llama, tiny_dataset_file, tmp_path / "out", memory_budget=planned_run.budget,
                        effective_batch_size=4 * (MICRO + 1), max_steps=2, save_strategy="no")
    plan = dataclasses.replace(saved_plan(planned_run.out), per_device_train_batch_size=MICRO + 1,
                               gradient_accumulation_steps=4, effective_batch_size=4 * (MICRO + 1), fits=False)
    events = []
    result = train.run(config, plan, on_fallback=events.append)
    assert events == result.fallbacks and len(result.fallbacks) == 1
    assert result.fallbacks[0].global_step == 0, "the first micro-batch already runs out of memory"
    event = result.fallbacks[0]
    assert event.per_device_train_batch_size < MICRO + 1 and event.gradient_accumulation_steps % 4 == 0
    assert event.gradient_accumulation_steps > 4, "the step's micro-batches were split"
    assert result.global_step == 2 and result.effective_batch_size == 4 * (MICRO + 1)
    assert event.per_device_train_batch_size * event.gradient_accumulation_steps == 4 * (MICRO + 1)


@pytest.mark.parametrize("after_micro_batches", [0, 3], ids=["at-step-end", "mid-step-replay"])
def test_oom_mid_run_halves_the_micro_batch_and_keeps_the_step(
    llama, tiny_dataset_file, budget_for_4, planned_run, tmp_path, after_micro_batches
):
    budget, measured = budget_for_4
    out = tmp_path / "out"
    config = run_config(llama, tiny_dataset_file, out, memory_budget=budget)
    plan = dataclasses.replace(saved_plan(planned_run.out), per_device_train_batch_size=MICRO,
                               gradient_accumulation_steps=EFFECTIVE // MICRO)
    # From step 2 on, the device has room for micro-batch 2 but not 4 (another process took the rest).
    lowered = LowerBudget((measured[2] + measured[MICRO]) // 2, at_step=2, after_micro_batches=after_micro_batches)
    result = train.run(config, plan, callbacks=[lowered])
    assert len(result.fallbacks) == 1
    event = result.fallbacks[0]
    assert event.global_step == 2
    assert (event.per_device_train_batch_size, event.gradient_accumulation_steps) == (MICRO // 2, 2 * EFFECTIVE // MICRO)
    assert event.per_device_train_batch_size * event.gradient_accumulation_steps == EFFECTIVE
    # the peak was reached at micro-batch 4 before the budget dropped: exactly the probe's figure for it
    assert result.peak_memory_bytes == measured[MICRO]
    assert any("OOM survived at step 2" in line for line in report.summary_lines(result))
    trainer_state = state(out)
    steps = [entry["step"] for entry in trainer_state["log_history"]]
    assert steps == sorted(steps), "global step never goes back"
    assert loss_steps(trainer_state["log_history"]) == list(range(1, MAX_STEPS + 1))
    assert trainer_state["global_step"] == result.global_step == MAX_STEPS
    # Same effective batch, same data, same gradients: the run ends where the run without an OOM ended.
    expected = [e["loss"] for e in state(planned_run.out)["log_history"] if "loss" in e]
    assert [e["loss"] for e in trainer_state["log_history"] if "loss" in e] == pytest.approx(expected, rel=1e-5)
    assert_same_weights(out, planned_run.out)


@pytest.fixture(scope="module")
def reused_plan(llama, tiny_dataset_file, budget_for_4, tmp_path_factory):
    """`autobatch plan ... --output plan.yaml`, then `autobatch run --plan plan.yaml --max-steps 2 --json`."""
    budget, _ = budget_for_4
    tmp = tmp_path_factory.mktemp("reuse")
    plan_file = tmp / "plan.yaml"
    args = cli_args(llama, tiny_dataset_file, tmp / "unused", budget)
    done = call(["plan", *args[1:], "--output", str(plan_file)])
    assert done.returncode == 0, done.stderr
    out = tmp / "out"
    done = call(["run", "--plan", str(plan_file), "--max-steps", "2", "--output-dir", str(out), "--json"])
    assert done.returncode == 0, done.stderr
    return SimpleNamespace(plan_file=plan_file, out=out, err=done.stderr, report=json.loads(done.stdout),
                           budget=budget)


def test_saved_plan_is_reused_without_probing(reused_plan):
    assert "micro=" not in reused_plan.err, "no trial ran"
    assert reused_plan.report["plan"]["trials"] == []
    trainer_state = state(reused_plan.out)
    planned = reused_plan.report["plan"]
    assert planned["max_micro_batch_size"] == MICRO and planned["effective_batch_size"] == EFFECTIVE
    assert trainer_state["train_batch_size"] == planned["per_device_train_batch_size"]
    assert trainer_state["global_step"] == 2
    # plan.json holds the batch of the plan.yaml it came from (read back through the config parser)
    from_yaml = build_config(str(reused_plan.plan_file))
    written = json.loads((reused_plan.out / "plan.json").read_text())
    assert (written["per_device_train_batch_size"], written["gradient_accumulation_steps"]) == (
        from_yaml.per_device_train_batch_size, from_yaml.gradient_accumulation_steps)
    assert written["notes"] == [f"reused {reused_plan.plan_file}: no probing"]


def test_saved_plan_keeps_its_memory_budget_in_the_run(reused_plan):
    assert reused_plan.report["run"]["memory_budget_bytes"] == reused_plan.budget


def test_estimate_plan_trains_on_the_real_device_under_its_budget(llama, tiny_dataset_file, budget_for_4, tmp_path):
    """`plan --device estimate --output` for the GPU, then `run --plan`: trains for real (cpu here), same budget."""
    budget, _ = budget_for_4
    plan_file = tmp_path / "plan.yaml"
    args = cli_args(llama, tiny_dataset_file, tmp_path / "unused", budget, "--device", "estimate")
    done = call(["plan", *args[1:], "--output", str(plan_file)])
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    done = call(["run", "--plan", str(plan_file), "--max-steps", "2", "--output-dir", str(out), "--json"])
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["plan"]["device"] == "estimate"
    body = plan_file.read_text().splitlines()
    assert "bf16: true" in body and "optim: adamw_torch_fused" in body  # what the estimate emulated, for the GPU
    assert report["run"]["device"] == "cpu" and report["run"]["memory_budget_bytes"] == budget
    # no peak comparison: the estimate is the cuda step (bf16, Triton loss tiles), not this cpu run's fp32 one
    assert state(out)["global_step"] == 2


def test_saved_plan_is_refused_when_memory_settings_differ(reused_plan, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--plan", str(reused_plan.plan_file), "--max-length", "64", "--output-dir", str(out)])
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and f"max_length: {MAX_LENGTH} -> 64" in lines[0]
    assert "micro=" not in err and "Traceback" not in err and not out.exists()


@pytest.fixture(scope="module")
def resumed(llama, tiny_dataset_file, budget_for_4, tmp_path_factory):
    """A run saving every 2 steps up to step 4, then `--resume` in the same output dir with --max-steps 6."""
    budget, _ = budget_for_4
    out = tmp_path_factory.mktemp("resume") / "out"
    common = ["--micro-batch-size", str(MICRO), "--save-strategy", "steps", "--save-steps", "2", "--logging-steps", "1"]
    done = call(cli_args(llama, tiny_dataset_file, out, budget, *common, "--max-steps", "4"))
    assert done.returncode == 0, done.stderr
    first = state(out)
    checkpoint = state(out / "checkpoint-4")
    done = call(cli_args(llama, tiny_dataset_file, out, budget, *common, "--max-steps", "6", "--resume"))
    assert done.returncode == 0, done.stderr
    return SimpleNamespace(out=out, first=first, checkpoint=checkpoint, final=state(out), err=done.stderr)


def test_resume_continues_from_the_last_checkpoint(resumed):
    assert resumed.first["global_step"] == 4 and resumed.checkpoint["global_step"] == 4
    assert resumed.final["global_step"] == 6 and (resumed.out / "checkpoint-6").is_dir()
    assert loss_steps(resumed.final["log_history"]) == [1, 2, 3, 4, 5, 6]
    # Steps 1-4 are the checkpoint's, not retrained: a restart would log a 6-step learning-rate schedule.
    logged = [e for e in resumed.final["log_history"] if "loss" in e]
    assert logged[:4] == [e for e in resumed.checkpoint["log_history"] if "loss" in e]
    assert resumed.final["train_batch_size"] == resumed.first["train_batch_size"] == MICRO


def test_resume_reuses_the_saved_plan_without_probing(resumed):
    assert "micro=" not in resumed.err
    assert any("to resume: no probing" in note for note in json.loads((resumed.out / "plan.json").read_text())["notes"])


def test_resume_is_refused_when_memory_settings_changed(resumed, llama, tiny_dataset_file, capsys):
    budget = json.loads((resumed.out / "plan.json").read_text())["memory_budget_bytes"]
    before = state(resumed.out)
    code = main(cli_args(llama, tiny_dataset_file, resumed.out, budget, "--max-length", "64", "--resume"))
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "max_length" in lines[0] and "--output-dir" in lines[0], err
    assert "micro=" not in err and state(resumed.out) == before


def test_run_help_works(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--plan" in out and "--resume" in out


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--dataset", "{tmp}/missing.jsonl"], 2, "no such file '{tmp}/missing.jsonl'"),
        (["--dataset-text-field", "body"], 2, "its fields are text, label"),
        (["--output-dir", "{tmp}/a-file/out"], 2, "--output-dir {tmp}/a-file/out: {tmp}/a-file is not a writable directory; pass --output-dir with one"),
        (["--model", "{tmp}/no/such/model"], 2, "{tmp}/no/such/model: no such directory"),
        (["--model", "nobody/no-such-model"], 1, "could not be downloaded"),
        (["--learning-rat", "1e-5"], 2, "did you mean --learning-rate"),
        (["--device", "estimate"], 2, "--device estimate only plans"),
    ],
    ids=["dataset-missing", "text-field-missing", "output-dir-not-writable", "model-missing", "model-not-on-hub",
         "unknown-key", "estimate-cannot-train"],
)
def test_bad_run_input_is_one_line(llama, tmp_path, capsys, extra, code, message):
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": "a fine film " * (i + 1), "label": i % 2}) + "\n" for i in range(8)))
    (tmp_path / "a-file").write_text("not a directory")
    out = tmp_path / "out"
    argv = cli_args(llama, data, out, "300MiB", *[arg.format(tmp=tmp_path) for arg in extra])
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and message.format(tmp=tmp_path) in lines[0]
    assert "Traceback" not in err and "micro=" not in err, "refused before any probing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "reviews.jsonl"], "nothing written"
    assert (tmp_path / "a-file").read_text() == "not a directory"


def test_seed_config_offline_fails_with_one_line_then_trains_on_local_copies(tiny_model_dir, tmp_path, capsys):
    seed = str(Path(__file__).parents[1] / "configs" / "seed-opt350m-imdb.yaml")
    # Offline, neither imdb nor facebook/opt-350m can be downloaded: one line, naming what to point at instead
    # (the model first: that is known before torch loads).
    code = main(["run", "--config", seed, "--max-steps", "1", "--output-dir", str(tmp_path / "offline")])
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert "'facebook/opt-350m'" in lines[0] and "could not be downloaded" in lines[0]
    assert "pass model_name_or_path /path/to/local/copy" in lines[0]  # the key as the --config file names it
    assert not (tmp_path / "offline").exists()

    code = main(["run", "--config", seed, "--model", str(tiny_model_dir("opt")), "--max-steps", "1",
                 "--output-dir", str(tmp_path / "offline")])
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert "'imdb'" in lines[0] and "could not be downloaded" in lines[0] and "local" in lines[0]
    assert not (tmp_path / "offline").exists()

    imdb = tmp_path / "imdb.jsonl"
    reviews = ["A quiet film that grows on you.", "Too long, and the plot goes nowhere at all. " * 5]
    imdb.write_text("".join(json.dumps({"text": r, "label": i % 2}) + "\n" for i, r in enumerate(reviews * 16)))

    out = tmp_path / "out"
    code = main(["run", "--config", seed, "--model", str(tiny_model_dir("opt")), "--dataset", str(imdb),
                 "--max-steps", "2", "--output-dir", str(out), "--device", "cpu", "--max-length", "64",
                 "--logging-steps", "1"])
    assert code == 0, capsys.readouterr().err
    trainer_state = state(out)
    assert trainer_state["global_step"] == 2
    plan = json.loads((out / "plan.json").read_text())
    assert plan["effective_batch_size"] == 32, "the seed config's effective batch"
    assert trainer_state["train_batch_size"] == plan["per_device_train_batch_size"]
    assert trainer_state["log_history"][0]["learning_rate"] == pytest.approx(1.0e-5), "the seed config's learning_rate"
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))


@pytest.mark.slow
def test_run_with_no_arguments_trains_the_builtin_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run"]) == 0
    captured = capsys.readouterr()
    out = tmp_path / "autobatch-tiny-out"
    losses = [e["loss"] for e in state(out)["log_history"] if "loss" in e]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert (out / "config.json").exists() and list(out.glob("*.safetensors")) and (out / "plan.json").exists()
    assert f"model saved to {out.name}" in captured.out or f"model saved to {out}" in captured.out


@pytest.mark.slow  # over 2 minutes on a loaded 2-core machine
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
    # the note names keys; the CLI says them as typed (--evaluation-strategy) or as their flags
    assert "note: --evaluation-strategy is the old name of --eval-strategy: read as --eval-strategy" in captured.out
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    evals = {t["micro_batch_size"]: t for t in plan["eval_trials"]}
    best = plan["per_device_eval_batch_size"]
    assert evals[best]["fits"] and not evals[best + 1]["fits"]
    trainer_state = state(tmp_path / "out")
    assert any("eval_loss" in entry for entry in trainer_state["log_history"])
    assert "probe predicted" in captured.out


@pytest.mark.slow  # over 2 minutes on a loaded 2-core machine
def test_trl_knobs_from_a_yaml_config_reach_the_trainer(tiny_model_dir, tmp_path, capsys):
    """LoRA, packing, NEFTune, epochs, warmup and the logging/eval/save strategies pass through by TRL name."""
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"body": "a fine film " * (i % 30 + 1), "stars": i % 5}) + "\n"
                            for i in range(48)))
    out = tmp_path / "out"
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir('llama')}\ndataset_name: {data}\ndataset_text_field: body\n"
        "eval_fraction: 0.25\neffective_batch_size: 8\nmax_length: 64\npacking: true\n"
        "neftune_noise_alpha: 5\nuse_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: [q_proj, v_proj]\n"
        "num_train_epochs: 2\nwarmup_steps: 2\nlearning_rate: 1.0e-3\nweight_decay: 0.01\n"
        "logging_strategy: steps\nlogging_steps: 1\neval_strategy: steps\neval_steps: 3\n"
        "save_strategy: steps\nsave_steps: 3\ngradient_checkpointing: false\n"
        f"output_dir: {out}\n"
    )
    code = main(["run", "--config", str(config), "--device", "cpu", "--memory-budget", "300MiB", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    plan = json.loads(captured.out)["plan"]
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (
        plan["per_device_train_batch_size"], plan["gradient_accumulation_steps"])
    assert args.per_device_eval_batch_size == plan["per_device_eval_batch_size"]
    assert (args.packing, args.neftune_noise_alpha, args.dataset_text_field, args.max_length) == (True, 5, "body", 64)
    assert (args.num_train_epochs, args.warmup_steps, args.learning_rate, args.weight_decay) == (2, 2, 1e-3, 0.01)
    assert (args.logging_strategy, args.eval_strategy, args.save_strategy) == ("steps", "steps", "steps")
    assert (args.logging_steps, args.eval_steps, args.save_steps) == (1, 3, 3)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    trainer_state = state(out)
    assert trainer_state["epoch"] == 2 and (out / "checkpoint-3").is_dir()
    assert [e["step"] for e in trainer_state["log_history"] if "eval_loss" in e][:1] == [3]
    rates = [e["learning_rate"] for e in trainer_state["log_history"] if "loss" in e]
    assert rates[:3] == pytest.approx([0, 5e-4, 1e-3]), "two warmup steps to the peak learning rate"


# --- the fallback's pieces, without a run ---


def test_split_batch_keeps_every_row_in_order():
    inputs = {"input_ids": torch.arange(10).reshape(5, 2), "attention_mask": torch.ones(5, 2, dtype=torch.long),
              "num_items": torch.tensor(7), "flag": True}
    parts = train.split_batch(inputs, 2)
    assert sorted(len(p["input_ids"]) for p in parts) == [2, 3]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), inputs["input_ids"])
    assert all(p["num_items"] is inputs["num_items"] and p["flag"] is True for p in parts)


def test_split_batch_cuts_a_short_last_batch_into_single_examples():
    inputs = {"input_ids": torch.arange(6).reshape(3, 2), "attention_mask": torch.ones(3, 2, dtype=torch.long)}
    parts = train.split_batch(inputs, 4)
    assert [len(p["input_ids"]) for p in parts] == [1, 1, 1]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), inputs["input_ids"])


def test_split_batch_refuses_a_packed_batch():
    inputs = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "position_ids": torch.zeros(2, 4, dtype=torch.long)}
    with pytest.raises(AutobatchError, match="packed batch cannot be split"):
        train.split_batch(inputs, 2)


def fall_back(micro: int, accumulation: int, times: int = 1):
    """Fallback events of the trainer's `_fall_back`, called `times` times on a stand-in trainer."""
    events = []
    trainer = SimpleNamespace(
        splits=1, fallbacks=[], on_fallback=events.append, state=SimpleNamespace(global_step=3),
        args=SimpleNamespace(per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation),
    )
    for _ in range(times):
        train.OomSafeTrainer._fall_back(trainer, torch.nn.Linear(1, 1))
    assert events == trainer.fallbacks
    return events


@pytest.mark.parametrize(
    "micro, accumulation",
    [(4, 6), (8, 3), (5, 4), (9, 2)],
)
def test_fallback_reports_a_split_that_keeps_the_effective_batch(micro, accumulation):
    (event,) = fall_back(micro, accumulation)
    assert event.global_step == 3
    assert event.per_device_train_batch_size * event.gradient_accumulation_steps == micro * accumulation


def test_second_fallback_quarters_and_micro_batch_one_gives_up():
    assert [(e.per_device_train_batch_size, e.gradient_accumulation_steps) for e in fall_back(4, 6, times=2)] == [
        (2, 12), (1, 24)]
    with pytest.raises(AutobatchError, match="even at micro-batch 1"):
        fall_back(1, 24)
