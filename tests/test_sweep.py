"""`autobatch sweep`: one probe for a ladder of effective batch sizes, exact plans, the verdict arithmetic.

The ladder tests replace the Prober with a fake whose peak is affine in the micro-batch, so the exact
sequence of trials is known; one test drives the real probe through the CLI on a tiny model.
"""

import json
import math
import typing
from pathlib import Path

import pytest
import yaml

from autobatch import probe as probe_module
from autobatch import sweep
from autobatch.cli import main
from autobatch.config import build_config
from autobatch.errors import ConfigError
from autobatch.planner import Plan

MiB = 2**20


class FakeProber:
    """Peak = 10 MiB + 3 MiB per sample; time per micro-batch 0.02 s + 0.01 s per sample."""

    instances: typing.ClassVar[list] = []

    def __init__(self, config, backend, usable_bytes, per_device=None, ddp=False):
        self.usable_bytes, self.per_device, self.notes, self.max_length = usable_bytes, per_device, [], 128
        self.precision = "fp32"
        self.sizes: list[int] = []
        self.trainer = type("T", (), {"train_dataset": {"input_ids": [[1] * 50] * 300}})()
        FakeProber.instances.append(self)

    def run_trial(self, micro_batch_size, eval_batch_size=None):
        self.sizes.append(micro_batch_size)
        peak = 10 * MiB + 3 * MiB * micro_batch_size
        return probe_module.Trial(micro_batch_size, peak, peak <= self.usable_bytes, 0.02 + 0.01 * micro_batch_size)

    def close(self):
        pass


@pytest.fixture
def fake_prober(monkeypatch):
    FakeProber.instances = []
    monkeypatch.setattr(probe_module, "Prober", FakeProber)
    return FakeProber.instances


def ladder_config(model_dir, **overrides):
    values = {"model_name_or_path": str(model_dir), "device": "cpu", "memory_budget": "40MiB", "headroom": 0,
              "no_cache": True}  # the fake prober has no model to fingerprint
    values.update(overrides)
    return build_config(overrides=values)


@pytest.mark.parametrize("world", [1, 2])
def test_a_ladder_probes_once_and_every_plan_is_exact(fake_prober, tiny_model_dir, world):
    sizes = [8 * world, 24 * world, 40 * world, 96 * world]
    ladder = probe_module.plan_ladder(ladder_config(tiny_model_dir(), world_size=world), sizes)
    plans, trials = ladder.plans, ladder.trials
    (prober,) = fake_prober  # one probe
    assert ladder.examples == 300 and ladder.tokens_per_example == 50
    assert prober.per_device == 96  # trials carry the ladder's largest accumulation
    assert [t.micro_batch_size for t in trials] == prober.sizes  # one trials list, every trial in it
    assert len(set(prober.sizes)) == len(prober.sizes)  # no size measured twice
    assert all(plan.trials is trials for plan in plans)
    assert [p.effective_batch_size for p in plans] == sizes
    for plan, size in zip(plans, sizes):
        assert plan.per_device_train_batch_size * plan.gradient_accumulation_steps * world == size
        assert plan.per_device_train_batch_size <= 10 == plan.max_micro_batch_size  # 10·3+10 = 40 MiB fits
        assert plan.fits and plan.memory_budget_bytes == 40 * MiB
    assert 11 in prober.sizes and not next(t for t in trials if t.micro_batch_size == 11).fits


def test_the_default_ladder_is_m_times_powers_of_two_plus_the_target(fake_prober, tiny_model_dir):
    config = ladder_config(tiny_model_dir(), effective_batch_size=12)
    plans = probe_module.plan_ladder(config).plans
    assert [p.effective_batch_size for p in plans] == [10, 12, 20, 40, 80, 160]
    (prober,) = fake_prober
    assert prober.per_device == 160 and prober.sizes.count(10) == 2  # m confirmed at accumulation 16
    assert all(p.per_device_train_batch_size * p.gradient_accumulation_steps == p.effective_batch_size
               for p in plans)


def test_unreachable_rungs_are_refused_before_probing(fake_prober, tiny_model_dir):
    with pytest.raises(ConfigError, match="use --effective-batch-size 8 or 10"):
        probe_module.plan_ladder(ladder_config(tiny_model_dir(), world_size=2), [9])
    assert not fake_prober


def plan_at(batch, micro, seconds=0.1):
    return Plan(per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
                effective_batch_size=batch, world_size=1, max_micro_batch_size=micro, memory_budget_bytes=1,
                usable_memory_bytes=1, headroom=0.0, peak_memory_bytes=1, device="cpu", max_length=100,
                trials=[], seconds_per_step=seconds)


def test_rung_cost_and_predictions_follow_mccandlish():
    plans = [plan_at(8, 8, 0.1), plan_at(32, 8, 0.1), plan_at(128, 8, 0.1)]
    rungs = sweep.make_rungs(plans, 1000, base_lr=1e-4, base_batch=8, lr_rule="sqrt", b_noise=32)
    assert [r.tokens_per_s for r in rungs] == pytest.approx([8000] * 3)
    assert [r.seconds_per_optimizer_step for r in rungs] == pytest.approx([0.1, 0.4, 1.6])
    assert [r.steps_per_epoch for r in rungs] == [125, 32, 8]
    assert [r.sample_efficiency for r in rungs] == pytest.approx([0.8, 0.5, 0.2])
    assert [r.relative_steps for r in rungs] == pytest.approx([5, 2, 1.25])
    assert [r.time_to_target_s for r in rungs] == pytest.approx([0.5, 0.8, 2.0])
    # sqrt rule from 1e-4 at 8, capped at B_noise 32: 1e-4, 2e-4, 2e-4
    assert [r.learning_rate for r in rungs] == pytest.approx([1e-4, 2e-4, 2e-4])
    best, reason = sweep.recommend(rungs, 32)
    assert best == 8 and "B <= B_noise 32" in reason


def test_validation_runs_accumulate_so_the_noise_scale_has_a_pair():
    assert sweep.gns_split(16, 1) == (8, 2)
    assert sweep.gns_split(4, 3) == (4, 3)
    assert sweep.gns_split(3, 1) == (3, 1)  # odd: left alone (the report then says why there is no estimate)


def test_validation_runs_share_one_example_count_every_rung_divides():
    # the default ladder (powers of two times m): the nearest multiple of the largest B, above or below
    assert sweep.common_examples(20000, [16, 64], 250) == 64  # 80 asked: 64, not 80 at 16 and 64 at 64
    assert sweep.common_examples(8000, [8, 16, 32], 163.8) == 64  # 49 asked: 64 is nearer than 32
    assert sweep.common_examples(600, [2, 4, 8], 10) == 64
    assert sweep.common_examples(300, [4], 50) == 8  # 6 asked: round half to even gives 2 steps
    assert sweep.common_examples(2000, [8, 24, 40, 96], 50) is None  # 40 asked, every B divides only 480
    assert sweep.common_examples(24000, [8, 24, 40, 96], 50) == 480
    rung = sweep.make_rungs([plan_at(8, 8), plan_at(24, 8)], 100, base_lr=1e-4, base_batch=8, lr_rule="none")
    assert [sweep.validation_steps(48, r) for r in rung] == [6, 2]
    assert [sweep.validation_steps(40.0, r) for r in rung] == [5, 2]  # the fallback: each rounds on its own


def test_the_sweep_says_whether_validation_runs_see_equal_tokens(capsys):
    from autobatch.cli import _validation_examples

    assert _validation_examples(20000, [16, 64], 250) == 64
    assert capsys.readouterr().err == ("validation: every run trains on the same 64 examples in the same order "
                                       "(about 16000 tokens, a multiple of every B), so eval losses compare at "
                                       "equal tokens\n")
    assert _validation_examples(2000, [8, 24, 40, 96], 50) == 40.0
    assert "whole steps on 40 to 96 examples: the rung that sees more is favoured" in capsys.readouterr().err


def test_the_noise_scale_kept_from_validation_runs():
    none = {"resolved": False, "low": None, "steps": 0}  # accumulation 1 at an odd micro-batch: no pair
    few = {"resolved": False, "low": None, "steps": 4}
    bounded = {"resolved": False, "low": 2.0, "steps": 4}
    wide = {"resolved": True, "low": 1.0, "high": 9.0, "b_simple": 4.0, "steps": 9}
    narrow = {"resolved": True, "low": 3.0, "high": 5.0, "b_simple": 4.0, "steps": 9}
    assert sweep.best_noise_scale([none, few]) is few
    assert sweep.best_noise_scale([few, bounded, none]) is bounded
    assert sweep.best_noise_scale([bounded, wide, narrow]) is narrow
    assert sweep.best_noise_scale([]) is None


def test_learning_rate_rules():
    assert sweep.scaled_learning_rate(1e-3, 16, 64, "linear") == pytest.approx(4e-3)
    assert sweep.scaled_learning_rate(1e-3, 16, 64, "sqrt") == pytest.approx(2e-3)
    assert sweep.scaled_learning_rate(1e-3, 16, 4, "sqrt") == pytest.approx(5e-4)
    assert sweep.scaled_learning_rate(1e-3, 16, 64, "none") == 1e-3
    assert sweep.scaled_learning_rate(1e-3, 16, 64, "linear", b_noise=32) == pytest.approx(2e-3)
    assert sweep.default_lr_rule("adamw_torch") == "sqrt" and sweep.default_lr_rule("sgd") == "linear"


def test_lora_recommendation_stays_at_or_below_32():
    plans = [plan_at(16, 16, 0.1), plan_at(64, 16, 0.1)]
    rungs = sweep.make_rungs(plans, 100, base_lr=1e-4, base_batch=16, lr_rule="sqrt")
    rungs[1].tokens_per_s = 10**9
    assert sweep.recommend(rungs, None, lora=True)[0] == 16
    assert sweep.recommend(rungs, None, lora=False)[0] == 64
    assert "LoRA" in sweep.notes(rungs, lora=True)[0]


@pytest.mark.parametrize("text", ["8,x", "0,8", ""])
def test_bad_sizes_name_the_flag(text):
    with pytest.raises(ConfigError, match="--effective-batch-sizes"):
        sweep.parse_sizes(text)


def test_sweep_cli_plans_every_rung_and_writes_the_recommended_one(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "rung.yaml"
    noise = tmp_path / "gns.json"
    noise.write_text(json.dumps({"b_simple": 5.0, "low": 4.0, "high": 7.0, "resolved": True, "steps": 30}))
    code = main(["sweep", "--model", str(tiny_model_dir()), "--device", "cpu", "--memory-budget", "40MiB",
                 "--max-length", "64", "--effective-batch-sizes", "4,6,16", "--json", "--output", str(out),
                 "--gradient-checkpointing", "false", "--learning-rate", "1e-4", "--gns-file", str(noise),
                 "--output-dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert [p["effective_batch_size"] for p in report["plans"]] == [4, 6, 16]
    for plan in report["plans"]:
        assert plan["per_device_train_batch_size"] * plan["gradient_accumulation_steps"] == plan["effective_batch_size"]
        assert plan["trials"] == report["trials"]
    rung = report["recommended_effective_batch_size"]
    chosen = next(p for p in report["plans"] if p["effective_batch_size"] == rung)
    saved = yaml.safe_load(out.read_text())
    assert saved["per_device_train_batch_size"] == chosen["per_device_train_batch_size"]
    assert saved["gradient_accumulation_steps"] == chosen["gradient_accumulation_steps"]
    assert rung == 4  # the only rung with B <= B_noise 5
    assert saved["learning_rate"] == pytest.approx(1e-4 * math.sqrt(min(rung, 5) / 4))  # not raised past B_noise
    assert report["gradient_noise_scale"]["b_simple"] == 5.0
    efficiencies = [p["prediction"]["sample_efficiency"] for p in report["plans"]]
    assert efficiencies == pytest.approx([1 / (1 + 4 / 5), 1 / (1 + 6 / 5), 1 / (1 + 16 / 5)])
    import optuna

    study = optuna.load_study(study_name="autobatch-sweep", storage=report["study"]["storage"])
    assert sorted((t.params["effective_batch_size"], t.value) for t in study.trials) == sorted(
        (p["effective_batch_size"], p["prediction"]["time_to_target_s"]) for p in report["plans"])


def test_a_second_sweep_is_answered_by_the_probe_cache(tiny_model_dir, tmp_path, capsys):
    def sweep_json(out):
        code = main(["sweep", "--model", str(tiny_model_dir()), "--device", "cpu", "--memory-budget", "40MiB",
                     "--max-length", "64", "--effective-batch-sizes", "4,8", "--json", "--gradient-checkpointing",
                     "false", "--output-dir", str(tmp_path / out)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return json.loads(captured.out)

    first, second = sweep_json("a"), sweep_json("b")
    assert first["trials"] and not first["cached_trials"]
    assert second["trials"] == []  # nothing measured again
    assert [t["micro_batch_size"] for t in second["cached_trials"]] == [t["micro_batch_size"] for t in first["trials"]]
    strip = ("trials", "cached_trials", "search_seconds", "notes", "cache_path", "prediction")
    assert [{k: v for k, v in p.items() if k not in strip} for p in second["plans"]] == [
        {k: v for k, v in p.items() if k not in strip} for p in first["plans"]]
    assert any("from the probe cache" in note for note in second["plans"][0]["notes"])


def test_validation_cost_is_said_before_the_probe_and_a_failed_probe_leaves_nothing(tiny_model_dir, tmp_path,
                                                                                     capsys):
    out = tmp_path / "out"
    code = main(["sweep", "--model", str(tiny_model_dir()), "--device", "cpu", "--memory-budget", "1MiB",
                 "--effective-batch-sizes", "4,8", "--validate-tokens", "2000", "--lr-multipliers", "0.5,1",
                 "--output-dir", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert code != 0 and err[-1].startswith("autobatch: error: micro-batch 1 needs")
    budget = err.index("validation: 2 rungs × 2 rate(s), each about 2000 tokens of training plus an evaluation; "
                       "the probe comes first, then the predicted seconds")
    assert budget < next(i for i, line in enumerate(err) if line.startswith("micro=1 "))
    assert not out.exists()  # no empty study left by a sweep that never planned


def sweep_args(model_dir, data, out):
    return ["sweep", "--model", str(model_dir), "--dataset", str(data), "--device", "cpu", "--memory-budget", "30MiB",
            "--max-length", "32", "--effective-batch-sizes", "2,4,8", "--validate-tokens", "600",
            "--output-dir", str(out), "--gradient-checkpointing", "false", "--max-micro-batch-size", "2", "--json"]


def _trial_states(db: Path) -> list[tuple[str, int]]:
    """(state, has a heartbeat) per trial, read-only: optuna.load_study would create the schema, racing the sweep."""
    import contextlib
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)) as con:
            return con.execute("SELECT state, EXISTS (SELECT 1 FROM trial_heartbeats h WHERE h.trial_id = t.trial_id)"
                               " FROM trials t").fetchall()
    except sqlite3.OperationalError:  # no file or schema yet, or locked by a commit the sweep was stopped in
        return []


@pytest.mark.slow
def verdict_of(done: list, report: dict) -> sweep.Verdict:
    """The verdict the stored per-example eval losses give: the lowest loss when beyond the noise, else the
    fastest of the rungs tied with it (issue 24)."""
    results = [sweep.EvalResult(t.params["effective_batch_size"], t.params["learning_rate"], t.user_attrs["eval_losses"])
               for t in done]
    speed = {p["effective_batch_size"]: p["prediction"]["tokens_per_s"] for p in report["plans"]}
    return sweep.judge(results, speed)


def test_a_sweep_killed_mid_trial_resumes_and_ends_with_every_rung_done_once(tiny_model_dir, tiny_dataset_file,
                                                                            tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    import optuna

    out = tmp_path / "out"
    storage = f"sqlite:///{out / 'sweep.db'}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-m", "autobatch", *sweep_args(tiny_model_dir(), tiny_dataset_file, out)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    states = optuna.trial.TrialState
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # kill once one trial is done and the next is running
            time.sleep(0.05)
            child.send_signal(signal.SIGSTOP)  # a validation run lasts < 1 s: read the study while the sweep waits
            rows = _trial_states(out / "sweep.db")
            if ("COMPLETE", 1) in rows and ("RUNNING", 1) in rows:  # 1: its heartbeat has started
                child.send_signal(signal.SIGKILL)
                break
            child.send_signal(signal.SIGCONT)
            assert child.poll() is None, f"the sweep ended (exit {child.returncode}) before it was killed mid-trial"
        else:
            pytest.fail("the sweep never had a running trial after a complete one")
    finally:
        child.kill()
        child.wait(timeout=60)
    time.sleep(5)  # past the heartbeat grace period: the killed trial is stale
    assert main(sweep_args(tiny_model_dir(), tiny_dataset_file, out)) == 2  # a study exists: --resume needed
    assert "pass --resume" in capsys.readouterr().err
    assert main([*sweep_args(tiny_model_dir(), tiny_dataset_file, out), "--resume"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["study"] == {"storage": storage, "name": "autobatch-sweep"}
    trials = optuna.load_study(study_name="autobatch-sweep", storage=storage).trials
    done = [t for t in trials if t.state == states.COMPLETE]
    assert sorted(t.params["effective_batch_size"] for t in done) == [2, 4, 8]  # every rung once
    assert [t.state for t in trials].count(states.FAIL) == 1  # the killed one
    assert all(math.isfinite(t.value) and t.user_attrs["tokens_seen"] > 0 for t in done)
    assert report["recommended_effective_batch_size"] == verdict_of(done, report).recommended


@pytest.mark.slow
def test_validating_the_builtin_default_fills_a_study_optuna_opens(tmp_path, capsys):
    """The README's `autobatch sweep --validate-tokens 20000` on the built-in model and data (24 s here)."""
    import optuna

    assert main(["sweep", "--validate-tokens", "20000", "--output-dir", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    study = optuna.load_study(study_name="autobatch-sweep", storage=report["study"]["storage"])
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == len(study.trials) >= 2
    assert all(math.isfinite(t.value) and t.value == t.user_attrs["eval_loss"] for t in done)
    assert len({t.user_attrs["tokens_seen"] for t in done}) == 1  # the same examples at every B: equal tokens
    assert report["recommended_effective_batch_size"] == verdict_of(done, report).recommended
    for plan in report["plans"]:
        assert plan["per_device_train_batch_size"] * plan["gradient_accumulation_steps"] == plan["effective_batch_size"]


def test_plots_are_written_and_a_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    import sys

    from autobatch import plots
    from autobatch.errors import AutobatchError
    from autobatch.planner import Trial

    trials = [Trial(1, 20 * MiB, True, 0.1), Trial(4, 60 * MiB, True, 0.3), Trial(5, 90 * MiB, False, 0.0, oom=True)]
    rungs = sweep.make_rungs([plan_at(8, 4), plan_at(16, 4)], 100, base_lr=1e-4, base_batch=8, lr_rule="sqrt",
                             b_noise=12)
    directory = plots.plot_dir(str(tmp_path / "png"))
    written = [
        plots.plot_memory(trials, 80 * MiB, 80 * MiB, 4, directory),
        plots.plot_loss_curves({"B=8": [{"tokens": 100, "loss": 3.0}, {"tokens": 200, "loss": 2.5}]}, directory),
        plots.plot_noise_scale({"history": [{"step": 1, "b_simple_ema": 10.0}, {"step": 2, "b_simple_ema": 12.0}],
                                "low": 8.0, "high": 15.0, "b_simple": 11.0}, directory),
        plots.plot_time_to_target(rungs, 8, directory),
    ]
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in written)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(AutobatchError, match=r"pip install 'autobatch\[plot\]'"):
        plots.require()


def test_an_oom_in_a_validation_run_is_a_failed_trial_flagged_as_a_probe_miss(tmp_path):
    import optuna
    import torch

    study = sweep.open_study(f"sqlite:///{tmp_path / 'sweep.db'}", "s", resume=False)
    rungs = sweep.make_rungs([plan_at(8, 4), plan_at(16, 4)], 1000, base_lr=1e-4, base_batch=8, lr_rule="none",
                             b_noise=None)
    points = [sweep.Point(r, r.learning_rate) for r in rungs]

    def validate(point, trial):
        if point.rung.effective_batch_size == 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 1.5, {"tokens_seen": 100}

    sweep.run_validation_study(study, points, validate, None, None)
    by_batch = {t.params["effective_batch_size"]: t for t in study.trials}
    assert by_batch[8].state == optuna.trial.TrialState.COMPLETE and by_batch[8].value == 1.5
    assert by_batch[16].state == optuna.trial.TrialState.FAIL
    assert by_batch[16].user_attrs["probe_miss"] is True
    assert "probe_miss" not in by_batch[8].user_attrs
