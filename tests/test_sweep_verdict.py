"""The sweep from the user's side (issue 24): a rung's plan.yaml runs as written, and the verdict knows its noise."""

import json
import math
import os
import random
from pathlib import Path

import pytest
import yaml

from autobatch import ladder
from autobatch import probe as probe_module
from autobatch.cli import main
from autobatch.config import build_config


def test_a_sweep_rungs_plan_yaml_runs_as_written_with_evaluation(tiny_model_dir, tiny_dataset_file, tmp_path,
                                                                  monkeypatch, capsys):
    """Eval batch planned, its own output_dir, model and data both absolute: `run --plan` from another folder
    trains and evaluates without an OOM fallback under the sweep's cpu budget."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    model = os.path.relpath(tiny_model_dir(), work)  # relative, as a user types it
    data = os.path.relpath(tiny_dataset_file, work)
    code = main(["sweep", "--model", model, "--dataset", data, "--device", "cpu", "--memory-budget", "60MiB",
                 "--max-length", "64", "--effective-batch-sizes", "4,8", "--gradient-checkpointing", "false",
                 "--eval-fraction", "0.25", "--eval-strategy", "steps", "--eval-steps", "1",
                 "--output-dir", "sweep", "--output", "rung.yaml", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    chosen = next(p for p in report["plans"] if p["effective_batch_size"] == report["recommended_effective_batch_size"])
    saved = yaml.safe_load((work / "rung.yaml").read_text())
    assert saved["per_device_eval_batch_size"] == chosen["per_device_eval_batch_size"] >= 1
    assert chosen["eval_trials"], "the eval batch was measured beside training"
    assert Path(saved["output_dir"]) == work / "sweep" / f"run-B{chosen['effective_batch_size']}"
    assert saved["model_name_or_path"] == str(tiny_model_dir())
    assert saved["datasets"][0]["data_files"] == str(tiny_dataset_file)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = main(["run", "--plan", str(work / "rung.yaml"), "--max-steps", "2", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    run = json.loads(captured.out)["run"]
    assert run["eval_fallbacks"] == [] and run["fallbacks"] == [], "no OOM in training or evaluation"
    assert any("eval_loss" in entry for entry in run["log_history"]), "it evaluated"
    assert Path(run["output_dir"]) == Path(saved["output_dir"])
    assert not (work / "sweep" / "config.json").exists(), "the model is not saved beside sweep.db"


# ------------------------------------------------------------- the verdict's statistics (synthetic numbers)

def synthetic_losses(offset: float, seed: int, n: int = 40, noise: float = 0.01) -> list[float]:
    """Per-example losses: a difficulty every run shares (the same examples), the rung's offset, its own noise."""
    rng = random.Random(seed)
    own = [rng.gauss(0, noise) for _ in range(n)]
    drift = sum(own) / n  # centred, so two series' means differ by exactly their offsets
    return [5.5 + 0.3 * math.sin(i) + offset + e - drift for i, e in enumerate(own)]


def test_standard_error_and_the_paired_difference():
    assert ladder.standard_error([1.0, 3.0]) == pytest.approx(1.0)  # sd √2 / √2
    assert ladder.standard_error([2.0]) == math.inf
    a, b = synthetic_losses(0, 1), synthetic_losses(0.05, 2)
    gap, se, paired = ladder.difference(a, b)
    assert paired and gap == pytest.approx(0.05, abs=0.01)
    unpaired_se = math.hypot(ladder.standard_error(a), ladder.standard_error(b))
    assert se < unpaired_se / 5, "pairing cancels the difficulty the examples share"
    gap, se, paired = ladder.difference(a, b[:-1])
    assert not paired and se == pytest.approx(math.hypot(ladder.standard_error(a), ladder.standard_error(b[:-1])))


def test_rungs_within_their_noise_are_indistinguishable_and_the_fastest_is_recommended():
    results = [ladder.EvalResult(b, 1e-4, synthetic_losses(offset, seed))
               for b, offset, seed in ((8, 0.0001, 1), (16, 0.0, 2), (32, 0.0002, 3))]  # 5.5647 / 5.5648 / 5.5649
    verdict = ladder.judge(results, speed={8: 100.0, 16: 300.0, 32: 200.0})
    assert not verdict.resolved and verdict.tied == [8, 32] and verdict.best.effective_batch_size == 16
    assert verdict.recommended == 16  # the fastest of the tied rungs
    assert verdict.examples_needed is not None and verdict.examples_needed > 40
    reason, notes = ladder.verdict_text(verdict, tokens_per_example=50, seen="the same 40 examples")
    assert "rungs 16, 8, 32 are indistinguishable at this budget" in reason and "paired" in reason
    assert any(n.startswith(f"to tell them apart: about {verdict.examples_needed} eval examples") for n in notes)


def test_a_clear_difference_names_the_winner():
    results = [ladder.EvalResult(b, 1e-4, synthetic_losses(offset, seed))
               for b, offset, seed in ((8, 0.05, 1), (16, 0.0, 2), (32, 0.1, 3))]
    verdict = ladder.judge(results, speed={8: 100.0, 16: 10.0, 32: 200.0})
    assert verdict.resolved and verdict.recommended == 16, "loss decides, not speed"
    reason, notes = ladder.verdict_text(verdict, 50, "the same 40 examples")
    assert reason.startswith("lowest eval loss after the same 40 examples (measured: 5.5") and "± 0.0" in reason
    assert "more than 2 standard errors worse" in reason and notes == []


def test_a_best_learning_rate_at_the_grid_edge_is_said_and_the_rung_unresolved():
    results = [ladder.EvalResult(16, lr, synthetic_losses(offset, 1)) for lr, offset in
               ((1e-4, 0.2), (2e-4, 0.1), (4e-4, 0.0))]  # still falling at the highest rate tried
    results += [ladder.EvalResult(64, lr, synthetic_losses(offset, 2)) for lr, offset in
                ((2e-4, 0.1), (4e-4, 0.05), (8e-4, 0.08))]  # a minimum inside the grid
    verdict = ladder.judge(results)
    assert verdict.unresolved == {16: "highest"}
    assert verdict.per_rung[16].learning_rate == 4e-4 and verdict.per_rung[64].learning_rate == 4e-4
    _, notes = ladder.verdict_text(verdict, 50, "the same 40 examples")
    assert any("B=16: its best learning rate 0.0004 is the highest tried, so B=16 is unresolved" in n
               and "raise lr_multipliers" in n for n in notes)


def test_a_single_validated_rung_claims_no_comparison():
    verdict = ladder.judge([ladder.EvalResult(8, 1e-4, synthetic_losses(0, 1))])
    reason, _ = ladder.verdict_text(verdict, 50, "the same 40 examples")
    assert verdict.recommended == 8 and reason.startswith("the only rung validated") and "worse" not in reason


def test_a_noise_scale_below_the_smallest_rung_predicts_nothing():
    assert ladder.noise_scale_below_rungs(0.29, [4, 8, 16])
    assert not ladder.noise_scale_below_rungs(6.0, [4, 8, 16])
    assert not ladder.noise_scale_below_rungs(None, [4, 8])


# --------------------------------------------- the three verdicts through the CLI (fake probe, fake runs)

@pytest.fixture
def fake_sweep(monkeypatch):
    """The ladder probed by helpers.FakeProber; each validation run returns synthetic per-example losses
    from `losses[(B, multiplier)]` (no training)."""
    from helpers import FakeProber

    monkeypatch.setattr(probe_module, "Prober", FakeProber)
    table: dict = {}

    def validate(config, point, examples, device, output_dir, on_gns=None):
        losses = table[(point.rung.effective_batch_size, point.multiplier)]
        mean = sum(losses) / len(losses)
        return mean, {"eval_loss": mean, "tokens_seen": 2000, "steps": 1, "wall_seconds": 0.01, "loss_curve": [],
                      "gradient_noise_scale": {"b_simple": 0.29, "low": 0.2, "high": 0.4, "resolved": True,
                                               "steps": 10}, "eval_losses": losses}

    monkeypatch.setattr(ladder, "validate_point", validate)
    return table


def sweep_cli(tiny_model_dir, tmp_path, *extra):
    return main(["sweep", "--model", str(tiny_model_dir()), "--device", "cpu", "--memory-budget", "40MiB",
                 "--headroom", "0", "--no-cache", "--effective-batch-sizes", "4,8", "--validate-tokens", "2000",
                 "--output-dir", str(tmp_path / "out"), *extra])


def test_sweep_says_indistinguishable_when_rungs_differ_less_than_their_noise(fake_sweep, tiny_model_dir, tmp_path,
                                                                               capsys):
    fake_sweep.update({(4, 1.0): synthetic_losses(0.0001, 1), (8, 1.0): synthetic_losses(0.0, 2)})
    pytest.importorskip("matplotlib")
    assert sweep_cli(tiny_model_dir, tmp_path, "--plot", str(tmp_path / "plots")) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "recommended effective batch" in out and "rungs 8, 4 are indistinguishable at this budget" in out
    assert "note: to tell them apart: about" in out
    assert "B_noise 0.29 is below the smallest rung (4)" in out and "efficiency" not in out.split("\n\n")[1]
    # the loss plot is the verdict's eval loss with its error bars; no time-to-target drawn from a useless B_noise
    assert (tmp_path / "plots" / "eval_loss.png").stat().st_size > 0
    assert not (tmp_path / "plots" / "time_to_target.png").exists()
    assert "time_to_target.png not drawn: no usable noise scale" in captured.err


def test_sweep_names_the_winner_when_rungs_differ_clearly(fake_sweep, tiny_model_dir, tmp_path, capsys):
    fake_sweep.update({(4, 1.0): synthetic_losses(0.08, 1), (8, 1.0): synthetic_losses(0.0, 2)})
    rung = tmp_path / "rung.yaml"
    # an eval fraction without --eval-strategy: the validation runs' eval data, not the rung's
    assert sweep_cli(tiny_model_dir, tmp_path, "--json", "--eval-fraction", "0.25", "--output", str(rung)) == 0
    report = json.loads(capsys.readouterr().out)
    config = build_config(rung)  # runs as written: no eval data left without an eval_strategy
    assert config.effective_batch_size is None and config.eval_fraction is None
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == 8
    assert report["recommended_effective_batch_size"] == 8
    assert report["recommendation_reason"].startswith("lowest eval loss after the same 40 examples")
    bars = {b["effective_batch_size"]: b for b in report["eval_losses"]}
    assert bars[4]["eval_loss"] - bars[8]["eval_loss"] == pytest.approx(0.08, abs=0.01)
    assert bars[8]["examples"] == 40 and 0 < bars[8]["standard_error"] < 0.1


def test_sweep_says_when_the_best_learning_rate_is_at_the_grids_edge(fake_sweep, tiny_model_dir, tmp_path, capsys):
    for batch, seed in ((4, 1), (8, 2)):
        for multiplier, offset in ((0.5, 0.2), (1.0, 0.1), (2.0, 0.0) if batch == 4 else (2.0, 0.15)):
            fake_sweep[(batch, multiplier)] = synthetic_losses(offset, seed)
    assert sweep_cli(tiny_model_dir, tmp_path, "--lr-multipliers", "0.5,1,2") == 0
    out = capsys.readouterr().out
    assert "B=4: its best learning rate" in out and "is the highest tried, so B=4 is unresolved" in out
    assert "B=8: its best" not in out


# ---------------------------------------------------------------- autobatch.sweep: the CLI's one code path

def test_autobatch_sweep_from_python_gives_the_verdict_the_cli_prints(fake_sweep, tiny_model_dir, tmp_path, capsys):
    """`autobatch.sweep(...)` decides what `autobatch sweep` prints: for the same inputs the same rungs, winner,
    reason, notes and eval losses; from Python the result also holds the chosen rung's plan and config."""
    import autobatch

    fake_sweep.update({(4, 1.0): synthetic_losses(0.08, 1), (8, 1.0): synthetic_losses(0.0, 2)})
    assert sweep_cli(tiny_model_dir, tmp_path / "cli", "--json", "--learning-rate", "1e-4") == 0
    printed = json.loads(capsys.readouterr().out)
    validated = []
    result = autobatch.sweep(
        model_name_or_path=str(tiny_model_dir()), device="cpu", memory_budget="40MiB", headroom=0, no_cache=True,
        learning_rate=1e-4, output_dir=str(tmp_path / "py"), effective_batch_sizes=[4, 8], validate_tokens=2000,
        on_validated=lambda point, loss, attrs: validated.append((point.rung.effective_batch_size, loss)))
    assert capsys.readouterr().out == ""  # the library prints nothing
    assert [r.effective_batch_size for r in result.rungs] == [p["effective_batch_size"] for p in printed["plans"]]
    assert [r.effective_batch_size for r in result.rungs] == [4, 8]
    assert result.recommended == printed["recommended_effective_batch_size"] == 8  # 0.08 lower, beyond the noise
    assert result.reason == printed["recommendation_reason"]
    assert result.reason.startswith("lowest eval loss after the same 40 examples")
    assert result.notes == printed["notes"] and printed["notes"]
    assert ladder.eval_bars(result.results) == printed["eval_losses"]
    assert sorted(b for b, _ in validated) == [4, 8]
    assert [loss for b, loss in sorted(validated)] == pytest.approx([5.58, 5.5], abs=0.01)
    assert result.to_dict()["study"] == {"storage": f"sqlite:///{tmp_path / 'py' / 'sweep.db'}",
                                         "name": "autobatch-sweep"}
    assert result.plan is result.chosen.plan and result.plan.effective_batch_size == 8
    rung = result.rung_config  # the recommended rung's rate, sqrt-scaled from the smallest rung, and its own dir
    assert rung.training_args["learning_rate"] == pytest.approx(1e-4 * math.sqrt(8 / 4))
    assert rung.training_args["output_dir"] == str((tmp_path / "py" / "run-B8").resolve())


def test_sweep_arguments_are_checked_before_any_work_and_named_as_the_caller_spelled_them(tmp_path, capsys):
    """Below the CLI a message names the keyword (`lr_multipliers`); the CLI says the flag (`--lr-multipliers`)."""
    import autobatch
    from autobatch.cli import _as_typed
    from autobatch.errors import ConfigError

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="^lr_multipliers needs validate_tokens N ") as caught:
        autobatch.sweep(lr_multipliers=[0.5, 1], output_dir=str(out))
    assert caught.value.keys == ("lr_multipliers", "validate_tokens")
    with pytest.raises(ConfigError, match="^gns_file .*none.json: cannot read it"):
        autobatch.sweep(gns_file=tmp_path / "none.json", output_dir=str(out))
    assert main(["sweep", "--lr-multipliers", "0.5,1", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "autobatch: error: --lr-multipliers needs --validate-tokens N (the rates are compared by training)")
    assert main(["sweep", "--validate-tokens", "0", "--plot", str(tmp_path / "plots"), "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "autobatch: error: --validate-tokens must be a positive number of tokens, e.g. --validate-tokens 20000")
    assert not out.exists() and not (tmp_path / "plots").exists()  # refused before anything was written
    # a key inside a path is not the key: only the words are said as flags
    exc = ConfigError("storage sqlite:////mnt/storage/resume.db already holds study 's' with 2 trials: pass resume "
                      "to continue it, or another output_dir / storage", keys=("storage", "resume", "output_dir"))
    names = {"storage": "--storage", "resume": "--resume", "output_dir": "--output-dir"}
    assert _as_typed(exc, names) == ("--storage sqlite:////mnt/storage/resume.db already holds study 's' with 2 "
                                     "trials: pass --resume to continue it, or another --output-dir / --storage")
