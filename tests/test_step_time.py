"""Trial step times are steady: warm-up and a lone spike do not rank options. Real trials on the cpu backend,
step times planted through the trial timer's clock (no wall-clock asserts)."""

import pytest
from helpers import tiny_config

from autobatch import trial
from autobatch.planner import steady_seconds
from autobatch.probe import make_plan


@pytest.mark.parametrize("steps, expected", [
    ([100.0, 1.0, 1.2, 0.9], 1.0),  # warm-up dropped, median of the rest
    ([0.1, 5.0, 5.0, 100.0], 5.0),  # a late spike dropped too
    ([3.0, 1.0, 2.0], 1.5),
    ([7.0], 7.0),  # nothing after warm-up: the one step there is
])
def test_steady_seconds_is_the_median_after_warm_up(steps, expected):
    assert steady_seconds(steps) == pytest.approx(expected)


def test_the_ranking_follows_steady_step_times_not_warm_up(tiny_model_dir, planted):
    """Micro-batch 2 has a 100 s first step but is the fastest after it; 8 starts fast and is planted slow."""
    steady = {1: 1.0, 2: 0.5, 4: 2.0, 8: 5.0}  # per micro-batch

    def step_seconds(micro, checkpointing, index):
        if index == 0:
            return 100.0 if micro == 2 else 0.01
        return 100.0 if (micro, index) == (8, 3) else steady[micro]

    planted(step_seconds)
    plan = make_plan(tiny_config(tiny_model_dir("llama"), effective_batch_size=8))
    timed = {o.micro_batch_size: o.seconds_per_micro_batch for o in plan.options if o.measured}
    assert timed == {b: pytest.approx(steady[b]) for b in timed} and 8 in timed
    assert (plan.per_device_train_batch_size, plan.gradient_accumulation_steps) == (2, 4)
    assert plan.seconds_per_micro_batch == pytest.approx(0.5)


def test_a_trial_times_several_steps_after_warm_up(tiny_model_dir, planted):
    seen: list[int] = []

    def step_seconds(micro, checkpointing, index):
        seen.append(index)
        return 1.0

    planted(step_seconds)
    make_plan(tiny_config(tiny_model_dir("llama"), per_device_train_batch_size=2))
    assert seen == list(range(trial.TIMED_TRIAL_STEPS))
