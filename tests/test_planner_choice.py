"""Which split of the per-device samples the planner takes (issue 24): timing noise does not decide between
divisors, and an awkward target says which nearby effective batch would train faster. Fake trials, no torch."""

import pytest
from helpers import MiB

from autobatch.planner import TIMING_NOISE, Option, Trial, nearby_note, nearby_targets, plan_options


def timed(seconds: dict[int, float], fits_up_to: int) -> list[Trial]:
    return [Trial(b, b * MiB, b <= fits_up_to, s if b <= fits_up_to else 0.0) for b, s in seconds.items()]


@pytest.mark.parametrize(("micro1_faster_by", "expected"), [(0.05, 8), (0.09, 8), (0.25, 1)])
def test_timings_within_the_noise_go_to_the_larger_micro_batch(micro1_faster_by, expected):
    """Micro 2, 4 and 8 run at the same samples/s; micro 1 is faster by the given share."""
    trials = timed({1: 0.1 / (1 + micro1_faster_by), 2: 0.2, 4: 0.4, 8: 0.8}, fits_up_to=8)
    options = plan_options(32, 8, trials)
    assert TIMING_NOISE == 0.10
    assert (options[0].micro_batch_size, options[0].gradient_accumulation_steps) == (expected, 32 // expected)


def test_an_awkward_target_names_the_nearby_ones_that_allow_a_larger_micro_batch():
    """37 is prime: 1 × 37 although 5 fits; 35 and 40 allow 5 (0.1 s overhead + 0.01 s a sample)."""
    trials = timed({b: 0.1 + 0.01 * b for b in range(1, 7)}, fits_up_to=5)
    options = plan_options(37, 5, trials)
    chosen = options[0]
    assert (chosen.micro_batch_size, chosen.gradient_accumulation_steps) == (1, 37)
    nearby = nearby_targets(37, 1, 5, trials, chosen)
    assert [(n.effective_batch_size, n.micro_batch_size) for n in nearby] == [(35, 5), (40, 5)]
    assert nearby[0].speedup == pytest.approx((5 / 0.15) / (1 / 0.11)) and nearby[0].measured
    note = nearby_note(37, chosen, nearby)
    assert note.startswith("effective batch 37 divides into micro-batches of at most 1 here; 35 would allow 5 (3.7×")
    assert note.endswith("effective_batch_size 35 trains faster")  # a key: the CLI says it as typed


def test_nothing_is_said_when_the_target_divides_well_or_times_are_unknown():
    trials = timed({b: 0.1 + 0.01 * b for b in range(1, 9)}, fits_up_to=8)
    chosen = plan_options(32, 8, trials)[0]
    assert chosen.micro_batch_size == 8 and nearby_targets(32, 1, 8, trials, chosen) == []
    untimed = [Trial(b, b * MiB, True, 0.0) for b in range(1, 6)]  # the estimate backend
    assert nearby_targets(37, 1, 5, untimed, Option(1, 37, 0.0, True)) == []
    assert nearby_note(37, Option(1, 37, 0.1, True), []) is None


def test_world_size_scales_the_named_effective_batch():
    trials = timed({b: 0.1 + 0.01 * b for b in range(1, 7)}, fits_up_to=5)
    chosen = plan_options(37, 5, trials)[0]
    assert [n.effective_batch_size for n in nearby_targets(37, 2, 5, trials, chosen)] == [70, 80]


def test_plan_options_read_as_the_json_dicts_and_as_attributes():
    option = Option(4, 8, 0.5, True)
    assert option.micro_batch_size == option["micro_batch_size"] == 4
    assert option["samples_per_s"] == 8.0 and option.to_dict() == {
        "micro_batch_size": 4, "gradient_accumulation_steps": 8, "seconds_per_step": 0.5, "measured": True,
        "samples_per_s": 8.0}
    with pytest.raises(KeyError, match="an option has micro_batch_size"):
        option["micro"]
    assert Option.from_dict(option.to_dict()) == option and option.seconds_per_step == 0.5  # the older name reads too


def test_a_checkpointing_choice_keeps_its_json_keys_and_reads_them_back():
    from autobatch.planner import CheckpointingChoice

    choice = CheckpointingChoice(False, "measured", "fits", 0.4, 0.3)
    data = choice.to_dict()
    assert (data["seconds_per_step_on"], data["seconds_per_step_off"], data["speedup"]) == (0.4, 0.3, 0.4 / 0.3)
    assert CheckpointingChoice.from_dict(data) == choice
