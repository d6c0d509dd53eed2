"""`autobatch sweep`: one probe for a ladder of effective batch sizes, exact plans, the verdict arithmetic.

The ladder tests replace the Prober with a fake whose peak is affine in the micro-batch, so the exact
sequence of trials is known; one test drives the real probe through the CLI on a tiny model.
"""

import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import FakeProber, MiB, plan_at

from autobatch import ladder
from autobatch import probe as probe_module
from autobatch.cli import main
from autobatch.config import build_config
from autobatch.errors import ConfigError


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
    planned = probe_module.plan_ladder(ladder_config(tiny_model_dir(), world_size=world), sizes)
    plans, trials = planned.plans, planned.trials
    (prober,) = fake_prober  # one probe
    assert planned.examples == 300 and planned.tokens_per_example == 50
    assert prober.per_device == 96  # trials carry the ladder's largest accumulation
    assert [t.micro_batch_size for t in trials] == prober.sizes  # one trials list, every trial in it
    assert len(set(prober.sizes)) == len(prober.sizes)  # no size measured twice
    assert all(plan.trials is trials for plan in plans)
    assert [p.effective_batch_size for p in plans] == sizes
    # The fake's samples/s grows with the micro-batch, so each rung takes the largest divisor of its
    # per-device share up to 10 (10·3+10 = 40 MiB fits): 8 | 8, 24 = 8 × 3, 40 = 10 × 4, 96 = 8 × 12.
    assert [(p.per_device_train_batch_size, p.gradient_accumulation_steps) for p in plans] == [
        (8, 1), (8, 3), (10, 4), (8, 12)]
    for plan in plans:
        assert plan.max_fitting_micro_batch_size == 10 and plan.world_size == world
        assert plan.fits and plan.memory_budget_bytes == 40 * MiB
    assert 11 in prober.sizes and not next(t for t in trials if t.micro_batch_size == 11).fits


def test_the_default_ladder_is_m_times_powers_of_two_plus_the_target(fake_prober, tiny_model_dir):
    config = ladder_config(tiny_model_dir(), effective_batch_size=12)
    plans = probe_module.plan_ladder(config).plans
    assert [p.effective_batch_size for p in plans] == [10, 12, 20, 40, 80, 160]
    (prober,) = fake_prober
    assert prober.per_device == 160 and prober.sizes.count(10) == 2  # m confirmed at accumulation 16
    # the largest micro-batch dividing each rung (12: 6 × 2, since 6 samples/s beats 4's by more than 3%)
    assert [(p.per_device_train_batch_size, p.gradient_accumulation_steps) for p in plans] == [
        (10, 1), (6, 2), (10, 2), (10, 4), (10, 8), (10, 16)]


def test_unreachable_rungs_are_refused_before_probing(fake_prober, tiny_model_dir):
    with pytest.raises(ConfigError, match="^effective_batch_sizes 9 is not a multiple of world size 2: use 8 or 10$"):
        probe_module.plan_ladder(ladder_config(tiny_model_dir(), world_size=2), [9])
    assert not fake_prober


def test_rung_cost_and_predictions_follow_mccandlish():
    plans = [plan_at(8, 8, 0.1), plan_at(32, 8, 0.1), plan_at(128, 8, 0.1)]
    rungs = ladder.make_rungs(plans, 1000, base_lr=1e-4, base_batch=8, lr_rule="sqrt", b_noise=32)
    assert [r.tokens_per_s for r in rungs] == pytest.approx([8000] * 3)
    assert [r.seconds_per_optimizer_step for r in rungs] == pytest.approx([0.1, 0.4, 1.6])
    assert [r.steps_per_epoch for r in rungs] == [125, 32, 8]
    assert [r.sample_efficiency for r in rungs] == pytest.approx([0.8, 0.5, 0.2])
    assert [r.relative_steps for r in rungs] == pytest.approx([5, 2, 1.25])
    assert [r.time_to_target_s for r in rungs] == pytest.approx([0.5, 0.8, 2.0])
    # sqrt rule from 1e-4 at 8, capped at B_noise 32: 1e-4, 2e-4, 2e-4
    assert [r.learning_rate for r in rungs] == pytest.approx([1e-4, 2e-4, 2e-4])
    best, reason = ladder.recommend(rungs, 32)
    assert best == 8 and "B <= B_noise 32" in reason


def test_validation_runs_accumulate_so_the_noise_scale_has_a_pair():
    assert ladder.gns_split(16, 1) == (8, 2)
    assert ladder.gns_split(4, 3) == (4, 3)
    assert ladder.gns_split(3, 1) == (3, 1)  # odd: left alone (the report then says why there is no estimate)


def test_validation_runs_share_one_example_count_every_rung_divides():
    # the default ladder (powers of two times m): the nearest multiple of the largest B, above or below
    assert ladder.common_examples(20000, [16, 64], 250) == 64  # 80 asked: 64, not 80 at 16 and 64 at 64
    assert ladder.common_examples(8000, [8, 16, 32], 163.8) == 64  # 49 asked: 64 is nearer than 32
    assert ladder.common_examples(600, [2, 4, 8], 10) == 64
    assert ladder.common_examples(300, [4], 50) == 8  # 6 asked: round half to even gives 2 steps
    assert ladder.common_examples(2000, [8, 24, 40, 96], 50) is None  # 40 asked, every B divides only 480
    assert ladder.common_examples(24000, [8, 24, 40, 96], 50) == 480
    rung = ladder.make_rungs([plan_at(8, 8), plan_at(24, 8)], 100, base_lr=1e-4, base_batch=8, lr_rule="none")
    assert [ladder.validation_steps(48, r) for r in rung] == [6, 2]
    assert [ladder.validation_steps(40.0, r) for r in rung] == [5, 2]  # the fallback: each rounds on its own


def test_the_sweep_says_whether_validation_runs_see_equal_tokens():
    from autobatch.report import examples_text

    examples = ladder.validation_examples(20000, [16, 64], 250)
    assert examples == 64 and isinstance(examples, int)
    assert examples_text(examples, [16, 64], 250) == (
        "validation: every run trains on the same 64 examples in the same order (about 16000 tokens, a multiple of "
        "every B), so eval losses compare at equal tokens")
    examples = ladder.validation_examples(2000, [8, 24, 40, 96], 50)
    assert examples == 40.0 and isinstance(examples, float)
    assert "whole steps on 40 to 96 examples: the rung that sees more is favoured" in examples_text(
        examples, [8, 24, 40, 96], 50)


def test_the_noise_scale_kept_from_validation_runs():
    none = {"resolved": False, "low": None, "steps": 0}  # accumulation 1 at an odd micro-batch: no pair
    few = {"resolved": False, "low": None, "steps": 4}
    bounded = {"resolved": False, "low": 2.0, "steps": 4}
    wide = {"resolved": True, "low": 1.0, "high": 9.0, "b_simple": 4.0, "steps": 9}
    narrow = {"resolved": True, "low": 3.0, "high": 5.0, "b_simple": 4.0, "steps": 9}
    assert ladder.best_noise_scale([none, few]) is few
    assert ladder.best_noise_scale([few, bounded, none]) is bounded
    assert ladder.best_noise_scale([bounded, wide, narrow]) is narrow
    assert ladder.best_noise_scale([]) is None


def test_learning_rate_rules():
    assert ladder.scaled_learning_rate(1e-3, 16, 64, "linear") == pytest.approx(4e-3)
    assert ladder.scaled_learning_rate(1e-3, 16, 64, "sqrt") == pytest.approx(2e-3)
    assert ladder.scaled_learning_rate(1e-3, 16, 4, "sqrt") == pytest.approx(5e-4)
    assert ladder.scaled_learning_rate(1e-3, 16, 64, "none") == 1e-3
    assert ladder.scaled_learning_rate(1e-3, 16, 64, "linear", b_noise=32) == pytest.approx(2e-3)
    assert ladder.default_lr_rule("adamw_torch") == "sqrt" and ladder.default_lr_rule("sgd") == "linear"


def test_lora_recommendation_stays_at_or_below_32():
    plans = [plan_at(16, 16, 0.1), plan_at(64, 16, 0.1)]
    rungs = ladder.make_rungs(plans, 100, base_lr=1e-4, base_batch=16, lr_rule="sqrt")
    rungs[1].tokens_per_s = 10**9
    assert ladder.recommend(rungs, None, lora=True)[0] == 16
    assert ladder.recommend(rungs, None, lora=False)[0] == 64
    assert "LoRA" in ladder.notes(rungs, lora=True)[0]


@pytest.mark.parametrize("text", ["8,x", "0,8", ""])
def test_bad_sizes_name_the_key(text):
    with pytest.raises(ConfigError, match="^effective_batch_sizes .*: write positive integers") as caught:
        ladder.parse_sizes(text)
    assert caught.value.keys == ("effective_batch_sizes",)  # the CLI says --effective-batch-sizes (test_cli)


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
    for plan in report["plans"]:  # each rung trains at a micro-batch a trial showed to fit
        fitted = {t["micro_batch_size"] for t in plan["trials"] + plan["cached_trials"] if t["fits"]}
        assert plan["per_device_train_batch_size"] <= min(plan["max_micro_batch_size"], max(fitted))
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
def verdict_of(done: list, report: dict) -> ladder.Verdict:
    """The verdict the stored per-example eval losses give: the lowest loss when beyond the noise, else the
    fastest of the rungs tied with it (issue 24)."""
    results = [ladder.EvalResult(t.params["effective_batch_size"], t.params["learning_rate"], t.user_attrs["eval_losses"])
               for t in done]
    speed = {p["effective_batch_size"]: p["prediction"]["tokens_per_s"] for p in report["plans"]}
    return ladder.judge(results, speed)


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
    assert {t.params["effective_batch_size"] for t in done} <= {p["effective_batch_size"] for p in report["plans"]}
    for plan in report["plans"]:  # each rung trains at a micro-batch a trial showed to fit
        fitted = {t["micro_batch_size"] for t in plan["trials"] + plan["cached_trials"] if t["fits"]}
        assert plan["per_device_train_batch_size"] <= min(plan["max_micro_batch_size"], max(fitted))


def test_an_oom_in_a_validation_run_is_a_failed_trial_flagged_as_a_probe_miss(tmp_path):
    import optuna
    import torch

    study = ladder.open_study(f"sqlite:///{tmp_path / 'sweep.db'}", "s", resume=False)
    rungs = ladder.make_rungs([plan_at(8, 4), plan_at(16, 4)], 1000, base_lr=1e-4, base_batch=8, lr_rule="none",
                             b_noise=None)
    points = [ladder.Point(r, r.learning_rate) for r in rungs]

    def validate(point, trial):
        if point.rung.effective_batch_size == 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 1.5, {"tokens_seen": 100}

    ladder.run_validation_study(study, points, validate, None, None)
    by_batch = {t.params["effective_batch_size"]: t for t in study.trials}
    assert by_batch[8].state == optuna.trial.TrialState.COMPLETE and by_batch[8].value == 1.5
    assert by_batch[16].state == optuna.trial.TrialState.FAIL
    assert by_batch[16].user_attrs["probe_miss"] is True
    assert "probe_miss" not in by_batch[8].user_attrs


@pytest.mark.parametrize("suggested", [len(ladder.PARAMS), 1])
def test_a_sweep_resumed_at_once_after_a_kill_completes_every_point_exactly_once(tmp_path, suggested):
    """issue 23.5: the killed trial's heartbeat was not stale yet, so its point was queued again; optuna then
    failed it and queued its retry too: a point ran twice (7 complete trials for 6 points). Killed between its
    suggest calls (1 of 4 params set; seen once in CI), its retry carried only those and the point ran twice."""
    import time

    import optuna

    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    rungs = ladder.make_rungs([plan_at(8, 4), plan_at(16, 4), plan_at(32, 4)], 1000, base_lr=1e-4, base_batch=8,
                             lr_rule="none", b_noise=None)
    points = [ladder.Point(r, r.learning_rate) for r in rungs]
    calls: list[int] = []

    def validate(point, trial):
        calls.append(point.rung.effective_batch_size)
        if len(calls) == 2:  # the first run of the resumed sweep outlives the dead trial's grace period
            time.sleep(ladder.HEARTBEAT_S * 3 + 0.5)
        return 1.0, {"tokens_seen": 100}

    killed = ladder.open_study(url, "s", resume=False)
    ladder.run_validation_study(killed, points[:1], validate, None, None)
    killed.enqueue_trial(points[1].params())
    dead = killed.ask()  # the killed process's trial: RUNNING, heartbeat fresh, never told
    for name in ladder.PARAMS[:suggested]:
        value = points[1].params()[name]
        dead.suggest_float(name, 0.0, 10.0) if name == "learning_rate" else dead.suggest_int(name, 1, 2**24)
        assert dead.params[name] == value
    killed._storage.record_heartbeat(dead._trial_id)

    for _ in range(2):  # resumed at once, then once more: nothing is left to run
        ladder.run_validation_study(ladder.open_study(url, "s", resume=True), points, validate, None, None)
    study = optuna.load_study(study_name="s", storage=url)
    done = sorted(t.params["effective_batch_size"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert done == [8, 16, 32] and sorted(calls) == [8, 16, 32]
    assert not study.get_trials(states=(optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING))


def test_resuming_a_validation_study_with_another_budget_is_refused():
    """issue 23.6: --resume with another --validate-tokens reused the old results and said "after the same 248
    examples" for trials that saw 64."""
    import optuna

    study = optuna.create_study()
    ladder.check_validation_budget(study, 600, None)  # a new study: nothing recorded yet
    ladder.check_validation_budget(study, 600, 248)
    assert study.user_attrs == {"validate_tokens": 600, "validate_examples": 248}
    ladder.check_validation_budget(study, 600, None)
    ladder.check_validation_budget(study, 600, 248)
    with pytest.raises(ConfigError, match="trained with validate_tokens 600 .248 examples each.; resume with "
                                          "validate_tokens 600"):
        ladder.check_validation_budget(study, 200, None)
    with pytest.raises(ConfigError, match="validate_tokens 600"):
        ladder.check_validation_budget(study, 600, 64)  # the same tokens over another ladder: other examples
    assert study.user_attrs == {"validate_tokens": 600, "validate_examples": 248}


@pytest.mark.slow
def test_a_sweep_resumed_with_another_validate_tokens_is_refused_before_probing(tiny_model_dir, tiny_dataset_file,
                                                                                 tmp_path, capsys):
    out = tmp_path / "out"
    args = sweep_args(tiny_model_dir(), tiny_dataset_file, out)
    assert main(args) == 0
    capsys.readouterr()
    before = (out / "sweep.db").read_bytes()
    other = [*args, "--resume"]
    other[other.index("--validate-tokens") + 1] = "200"
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "trained with --validate-tokens 600" in err and "micro=" not in err
    assert (out / "sweep.db").read_bytes() == before
