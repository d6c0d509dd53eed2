"""The checkpointing choice end to end on the cpu backend: real trials with and without activation
checkpointing, speeds planted through the trial timer's clock; the plan's table, --json, plan.yaml and the
run that trains with it."""

import json

import pytest
import yaml
from helpers import tiny_config

from autobatch import api
from autobatch.config import build_config
from autobatch.memory import CpuBackend
from autobatch.planfile import plan_yaml_text
from autobatch.probe import make_plan
from autobatch.report import format_plan
from autobatch.trial import Prober

SPEED = {True: 1.0, False: 0.6}  # planted seconds per micro-batch with / without checkpointing


def by_checkpointing(micro, checkpointing, index):
    return SPEED[checkpointing]


def default_config(model_dir, **overrides):
    """TRL's default in force: no checkpointing key."""
    return tiny_config(model_dir, gradient_checkpointing=None, effective_batch_size=2, **overrides)


def peak_at(model_dir, max_length: int, micro: int, checkpointing: bool) -> int:
    config = build_config(overrides={"model_name_or_path": str(model_dir), "max_length": max_length, "device": "cpu",
                                     "gradient_checkpointing": checkpointing})
    prober = Prober(config, CpuBackend(10**12), 10**12, per_device=micro)
    try:
        return prober.run_trial(micro).peak_memory_bytes
    finally:
        prober.close()


class SeenArgs:
    """A TrainerCallback noting whether the run trained with checkpointing."""

    def __init__(self):
        self.seen = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.seen.append((args.activation_checkpointing, bool(model.is_activation_checkpointing)))

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def test_checkpointing_comes_off_where_the_micro_batch_fits_without_it(tiny_model_dir, tiny_dataset_file, planted,
                                                                        tmp_path):
    clock = planted(by_checkpointing)
    config = default_config(tiny_model_dir("llama"), dataset_name=str(tiny_dataset_file),
                            output_dir=str(tmp_path / "out"), max_steps=1)
    plan = make_plan(config)
    choice = plan.checkpointing
    assert (choice.activation_checkpointing, choice.chosen_by) == (False, "measured")
    assert (choice.seconds_per_micro_batch_on, choice.seconds_per_micro_batch_off) == (pytest.approx(1.0), pytest.approx(0.6))
    assert "1.67× faster" in choice.reason and "1.67× faster" in format_plan(plan)
    assert (2, True, 1) in clock.trials and (2, False, 1) in clock.trials
    assert plan.seconds_per_micro_batch == pytest.approx(0.6)
    # --json, plan.yaml (what `trl sft --config` reads) and the run all say off
    assert json.loads(json.dumps(plan.to_dict()))["checkpointing"]["speedup"] == pytest.approx(1 / 0.6)
    written = plan_yaml_text(config, plan)
    assert yaml.safe_load(written)["activation_checkpointing"] is False
    assert "# activation_checkpointing false (measured)" in written
    seen = SeenArgs()
    api.run(config, plan=plan, callbacks=[seen])
    assert seen.seen == [(False, False)]


def test_checkpointing_stays_on_where_only_it_makes_the_micro_batch_fit(tiny_model_dir, tiny_dataset_file, planted,
                                                                        tmp_path):
    model = tiny_model_dir("llama")
    with_it, without = peak_at(model, 256, 2, True), peak_at(model, 256, 2, False)
    assert with_it < without
    planted(by_checkpointing)  # faster without, but it does not fit
    config = default_config(model, max_length=256, memory_budget=(with_it + without) // 2, max_steps=1,
                            dataset_name=str(tiny_dataset_file), output_dir=str(tmp_path / "out"))
    plan = make_plan(config)
    assert plan.per_device_train_batch_size == 2 and plan.fits
    assert plan.checkpointing.activation_checkpointing is True and plan.checkpointing.seconds_per_micro_batch_off is None
    assert "fits only with it" in plan.checkpointing.reason
    assert plan.peak_memory_bytes == with_it
    assert yaml.safe_load(plan_yaml_text(config, plan))["activation_checkpointing"] is True
    seen = SeenArgs()
    api.run(config, plan=plan, callbacks=[seen])
    assert seen.seen == [(True, True)]


@pytest.mark.parametrize("value", [True, False])
def test_checkpointing_the_user_set_is_kept(tiny_model_dir, planted, value):
    clock = planted(by_checkpointing)
    plan = make_plan(tiny_config(tiny_model_dir("llama"), gradient_checkpointing=value, effective_batch_size=2))
    assert (plan.checkpointing.activation_checkpointing, plan.checkpointing.chosen_by) == (value, "user")
    assert {checkpointing for _, checkpointing, _ in clock.trials} == {value}, "never measured the other way"


def test_an_identical_second_plan_takes_both_settings_from_the_probe_cache(tiny_model_dir, planted, tmp_path):
    clock = planted(by_checkpointing)
    config = default_config(tiny_model_dir("llama"), no_cache=False, cache=str(tmp_path / "probes.sqlite3"))
    first = make_plan(config)
    ran = len(clock.trials)
    second = make_plan(config)
    assert len(clock.trials) == ran and second.trials == [], "no trial, with or without checkpointing"
    assert second.checkpointing.activation_checkpointing is first.checkpointing.activation_checkpointing is False
