"""Planner tests: a fake probe with known memory curves; exact sequences of sizes tried. No torch."""

import itertools

import pytest
from helpers import GiB

from autobatch.errors import BudgetTooSmallError, ConfigError
from autobatch.planner import (
    CheckpointingChoice,
    Plan,
    Trial,
    check_effective_batch,
    choose_checkpointing,
    confirm_edge,
    plan_options,
    search_max_micro_batch,
)

MB = 10**6


def affine(b: int) -> int:
    return 40 * MB + 38 * MB * b


def kink(b: int) -> int:
    """TRL's fused LM head: steep slope until the batch reaches 4096 tokens (16 × 256), then shallow."""
    return 2 * MB + 38 * MB * min(b, 16) + 5 * MB * max(0, b - 16)


def optimizer_floor(b: int) -> int:
    """A big model: the optimizer step out-peaks small batches, so the curve is flat, then affine."""
    return max(17_600 * MB, 16_700 * MB + 440 * MB * b)


def make_probe(curve, limit: int, oom_at: int | None = None):
    """Fake probe: fits when the curve is under the limit; past `oom_at` bytes it reports an OOM."""
    tried: list[int] = []

    def probe(b: int) -> Trial:
        tried.append(b)
        peak = curve(b)
        oom = oom_at is not None and peak > oom_at
        return Trial(b, min(peak, oom_at) if oom else peak, fits=peak <= limit, seconds_per_micro_batch=0.01 * b + 0.05, oom=oom)

    return probe, tried


def truth(curve, limit: int, cap: int = 10_000) -> int:
    return max(b for b in range(1, cap + 1) if curve(b) <= limit)


@pytest.mark.parametrize(
    "curve, limit, expected_sequence",
    [
        (affine, 200 * MB, [1, 2, 4, 5]),
        (affine, 520 * MB, [1, 2, 12, 13]),
        (affine, 1450 * MB, [1, 2, 37, 38]),
        (affine, 3850 * MB, [1, 2, 100, 101]),
        (kink, 300 * MB, [1, 2, 7, 8]),
        (kink, 700 * MB, [1, 2, 18, 20, 34, 35]),
        (optimizer_floor, 20_000 * MB, [1, 2, 8, 7]),
    ],
)
def test_search_sequence_is_short_and_exact(curve, limit, expected_sequence):
    probe, tried = make_probe(curve, limit)
    result = search_max_micro_batch(probe, limit, max_micro_batch_size=4096)
    assert tried == expected_sequence
    assert result.max_micro_batch_size == truth(curve, limit)
    assert not result.capped


@pytest.mark.parametrize("limit", [int(x * MB) for x in (90, 333, 611, 612, 655, 1234, 2500, 9999)])
@pytest.mark.parametrize("curve", [affine, kink])
def test_search_always_lands_on_the_limit_with_the_next_size_failing(curve, limit):
    probe, tried = make_probe(curve, limit, oom_at=limit + 7 * MB)
    result = search_max_micro_batch(probe, limit, max_micro_batch_size=4096)
    best = truth(curve, limit)
    assert result.max_micro_batch_size == best
    by_size = {t.micro_batch_size: t for t in result.trials}
    assert by_size[best].fits and not by_size[best + 1].fits
    assert len(tried) == len(set(tried)), "no size is tried twice"
    assert len(tried) <= 12


def test_affine_curve_takes_four_trials_over_many_limits():
    for limit_mb in range(100, 4000, 37):
        probe, tried = make_probe(affine, limit_mb * MB)
        search_max_micro_batch(probe, limit_mb * MB, max_micro_batch_size=4096)
        assert len(tried) <= 4, (limit_mb, tried)


def test_search_stops_at_the_cap_without_trying_beyond():
    probe, tried = make_probe(affine, 10**12)
    result = search_max_micro_batch(probe, 10**12, max_micro_batch_size=64)
    assert result.max_micro_batch_size == 64 and result.capped
    assert max(tried) == 64 and tried == [1, 2, 64]


def test_micro_batch_one_not_fitting_is_an_error_carrying_the_trial():
    probe, tried = make_probe(affine, 50 * MB)
    with pytest.raises(BudgetTooSmallError) as info:
        search_max_micro_batch(probe, 50 * MB, max_micro_batch_size=64)
    assert tried == [1]
    assert info.value.trial.peak_memory_bytes == affine(1)


@pytest.mark.parametrize(
    "effective, world, per_device",
    [(48, 1, 48), (32, 8, 4), (64, 2, 32)],
)
def test_effective_batch_splits_exactly_over_devices(effective, world, per_device):
    assert check_effective_batch(effective, world) == per_device


@pytest.mark.parametrize(
    "effective, world, message",
    [
        (0, 1, "must be positive"),
        (-4, 1, "must be positive"),
        (30, 4, "^effective_batch_size 30 is not a multiple of world size 4: use 28 or 32$"),
        (3, 4, "^effective_batch_size 3 is not a multiple of world size 4: use 4$"),
    ],
)
def test_unreachable_effective_batch_names_the_nearest_values(effective, world, message):
    with pytest.raises(ConfigError, match=message):
        check_effective_batch(effective, world)


def trials_with_times(times: dict[int, float]) -> list[Trial]:
    return [Trial(b, 100 * b, True, s) for b, s in times.items()]


def test_options_divide_exactly_and_prefer_the_fastest():
    # micro 6 measured much faster per sample than 12 (e.g. a cache effect): it wins.
    trials = trials_with_times({1: 0.10, 2: 0.12, 6: 0.15, 12: 0.60, 13: 0.62})
    options = plan_options(48, 13, trials)
    assert {(o.micro_batch_size, o.gradient_accumulation_steps) for o in options} == {
        (1, 48), (2, 24), (3, 16), (4, 12), (6, 8), (8, 6), (12, 4)
    }
    assert all(o.micro_batch_size * o.gradient_accumulation_steps == 48 for o in options)
    assert options[0].micro_batch_size == 6


def test_options_within_timing_noise_prefer_the_larger_micro_batch():
    trials = trials_with_times({1: 0.100, 2: 0.200, 4: 0.398, 8: 0.801})
    options = plan_options(32, 8, trials)
    assert options[0].micro_batch_size == 8


def test_unknown_step_times_tie_and_the_largest_micro_batch_wins():
    trials = trials_with_times({1: 0.0, 2: 0.0, 13: 0.0})
    assert plan_options(48, 13, trials)[0].micro_batch_size == 12


# Trial peaks measured on opt-350m's shape (facebook/opt-350m's config, no weights) at 512 tokens, TRL's
# defaults, `--device estimate`, effective batch 32 (benchmarks/search_cost.py prints them again). Below 32
# a trial accumulates (two micro-batches per step), at 32 and above it does not: the curve drops at 32.
OPT350M_PEAKS = {
    1: 6010926632, 2: 6619354644, 3: 7227796992, 4: 7836214764, 6: 9053124036, 8: 10269935004,
    12: 10502088012, 16: 10725491964, 22: 11060819076, 24: 11172594780, 31: 11563809744, 32: 10294518716,
    33: 10350394280, 48: 11188527740, 64: 12082536764, 96: 13870554812, 128: 16218265148,
    136: 16975894076, 137: 17070597692, 138: 17165301308, 139: 17260004924,
}


def opt350m(b: int) -> int:
    """The measured peaks, linear between measured sizes and past the last one."""
    sizes = sorted(OPT350M_PEAKS)
    if b in OPT350M_PEAKS:
        return OPT350M_PEAKS[b]
    if b > sizes[-1]:
        return OPT350M_PEAKS[139] + (b - 139) * (OPT350M_PEAKS[139] - OPT350M_PEAKS[138])
    x0 = max(s for s in sizes if s < b)
    x1 = min(s for s in sizes if s > b)
    return OPT350M_PEAKS[x0] + (OPT350M_PEAKS[x1] - OPT350M_PEAKS[x0]) * (b - x0) // (x1 - x0)


def test_opt350m_target_32_takes_three_trials():
    """The issue's case: 16 GiB, 32 per device. The line through 1 and 2 says 19; the need itself is tried."""
    probe, tried = make_probe(opt350m, 16 * GiB, oom_at=16 * GiB)
    result = search_max_micro_batch(probe, 16 * GiB, max_micro_batch_size=512, needed=32)
    assert tried == [1, 2, 32]
    assert result.max_micro_batch_size == 32 and result.stopped_at_need and not result.capped


@pytest.mark.parametrize("budget_gib, expected_max", [(16, 138), (14.4, 117), (17.6, 156)])
def test_opt350m_find_max_is_exact_in_eight_trials(budget_gib, expected_max):
    """--find-max on the estimate backend (a failing size's peak is measured in full): exact, ≤ 8 trials."""
    limit = int(budget_gib * GiB)
    probe, tried = make_probe(opt350m, limit)
    result = search_max_micro_batch(probe, limit, max_micro_batch_size=512, needed=32, find_max=True)
    assert result.max_micro_batch_size == expected_max == truth(opt350m, limit, 512)
    assert tried[:3] == [1, 2, 32] and expected_max + 1 in tried
    assert len(tried) <= 8, tried
    assert not result.stopped_at_need


@pytest.mark.parametrize(
    "limit, needed, expected_sequence, expected_max, stopped",
    [
        (3850 * MB, 8, [1, 2, 8], 8, True),  # the line says far more fits: the need is tried at once
        (200 * MB, 16, [1, 2, 4, 5], 4, False),  # the need does not fit: exact below it, as without one
        (520 * MB, 20, [1, 2, 20, 12, 13], 12, False),  # line says 12 ≥ 20 / 2: the need is tried, fails
        (3850 * MB, 1, [1], 1, True),
    ],
)
def test_search_stops_at_what_the_plan_needs(limit, needed, expected_sequence, expected_max, stopped):
    probe, tried = make_probe(affine, limit)
    result = search_max_micro_batch(probe, limit, max_micro_batch_size=4096, needed=needed)
    assert tried == expected_sequence
    assert result.max_micro_batch_size == expected_max and result.stopped_at_need is stopped


def tilted_floor(b: int) -> int:
    """The optimizer step out-peaks small batches but rises a little with them: flat, not level."""
    return max(17_600 * MB + 20_000 * b, 16_700 * MB + 440 * MB * b)


def test_flat_segment_is_not_extrapolated_to_the_cap():
    probe, tried = make_probe(tilted_floor, 30_000 * MB, oom_at=30_000 * MB)
    result = search_max_micro_batch(probe, 30_000 * MB, max_micro_batch_size=4096)
    assert result.max_micro_batch_size == truth(tilted_floor, 30_000 * MB) == 30
    assert max(tried) < 64, "the line through 1 and 2 (20 kB per sample) pointed at the cap"
    assert tried == [1, 2, 8, 30, 31]


def convex(b: int) -> int:
    return 40 * MB + 10 * MB * b + MB * b * b // 4


@pytest.mark.parametrize("limit", [int(x * MB) for x in (900, 2000, 5000, 20_000)])
def test_failed_prediction_halves_the_bracket_instead_of_stepping_down(limit):
    """On a convex curve the line overshoots and each OOM hides the peak: no run of one-size steps down."""
    probe, tried = make_probe(convex, limit, oom_at=limit)
    result = search_max_micro_batch(probe, limit, max_micro_batch_size=4096)
    assert result.max_micro_batch_size == truth(convex, limit)
    failures = [b for b in tried if convex(b) > limit]
    steps_down = [(a, b) for a, b in itertools.pairwise(failures) if a - b == 1]
    assert not steps_down, tried
    assert len(tried) <= 10, tried  # the old step-down search took 7, 11, 12 and 13


# ------------------------------------------------------------------------------ checkpointing choice

def checkpointing_trials(on: Trial, off: Trial):
    """A fake trial(checkpointing) that records which settings were measured."""
    asked: list[bool] = []

    def trial(checkpointing: bool) -> Trial:
        asked.append(checkpointing)
        return on if checkpointing else off

    return trial, asked


def test_checkpointing_comes_off_when_the_micro_batch_fits_without_it_and_says_how_much_faster():
    trial, asked = checkpointing_trials(Trial(8, 300 * MB, True, 0.4), Trial(8, 450 * MB, True, 0.3))
    choice = choose_checkpointing(None, 8, trial)
    assert asked == [False, True]  # without first: the probe may re-time with it right after
    assert choice.activation_checkpointing is False and choice.chosen_by == "measured"
    assert (choice.seconds_per_micro_batch_on, choice.seconds_per_micro_batch_off) == (0.4, 0.3)
    assert choice.speedup == pytest.approx(4 / 3)
    assert "1.33× faster" in choice.reason


def test_checkpointing_stays_on_when_only_it_makes_the_micro_batch_fit():
    trial, _ = checkpointing_trials(Trial(8, 300 * MB, True, 0.4), Trial(8, 650 * MB, False, 0.3))
    choice = choose_checkpointing(None, 8, trial)
    assert choice.activation_checkpointing is True and choice.seconds_per_micro_batch_off is None
    assert "fits only with it" in choice.reason


def test_checkpointing_stays_on_where_it_was_measured_faster():
    trial, _ = checkpointing_trials(Trial(8, 300 * MB, True, 0.3), Trial(8, 450 * MB, True, 0.4))
    assert choose_checkpointing(None, 8, trial).activation_checkpointing is True


@pytest.mark.parametrize("user_value", [True, False])
def test_checkpointing_the_user_set_is_kept_and_not_measured(user_value):
    trial, asked = checkpointing_trials(Trial(8, 300 * MB, True, 0.4), Trial(8, 450 * MB, True, 0.1))
    choice = choose_checkpointing(user_value, 8, trial)
    assert asked == [] and choice.activation_checkpointing is user_value and choice.chosen_by == "user"


def test_checkpointing_without_step_times_comes_off_when_it_fits():
    """The estimate backend times nothing: without recompute is the cheaper step."""
    trial, _ = checkpointing_trials(Trial(8, 300 * MB, True, 0.0), Trial(8, 450 * MB, True, 0.0))
    choice = choose_checkpointing(None, 8, trial)
    assert choice.activation_checkpointing is False and choice.speedup is None


def test_plan_round_trips_its_checkpointing_choice():
    choice = CheckpointingChoice(False, "measured", "fits", 0.4, 0.3)
    plan = Plan(4, 2, 8, 1, 8, 10, 10, 0.0, 5, "cpu", 64, [Trial(4, 5, True, 0.3)], checkpointing=choice,
                cached_trials=[Trial(2, 3, True, 0.2, cached=True)])
    data = plan.to_dict()
    assert data["checkpointing"]["activation_checkpointing"] is False
    assert data["checkpointing"]["speedup"] == pytest.approx(4 / 3)
    assert Plan.from_dict(data) == plan


def test_checkpointing_off_within_timing_noise_still_comes_off():
    """No recompute is strictly less work: a step 2% slower without it is noise."""
    trial, _ = checkpointing_trials(Trial(8, 300 * MB, True, 0.400), Trial(8, 450 * MB, True, 0.408))
    assert choose_checkpointing(None, 8, trial).activation_checkpointing is False


# ---- the edge confirmed in fresh processes (issue 19) ---------------------------------------------------------

@pytest.mark.parametrize(("found", "bound", "expected_sequence", "expected"), [
    (40, 512, [40, 41], 40),  # the search was right: two fresh trials
    (39, 512, [39, 40, 41], 40),  # the search read high (H200: 39 in the search, 40 fresh)
    (30, 512, [30, 31, 40, 41], 40),  # ~9% high: the line through two fresh fits lands on the edge
    (42, 512, [42, 41, 39, 40], 40),  # the search read low: down 1, 2, then bisect
    (40, 40, [40], 40),  # the bound (cap or need) fits: nothing above it is asked
    (45, 40, [40], 40),  # never past the bound
])
def test_confirm_edge_sequence(found, bound, expected_sequence, expected):
    probe, tried = make_probe(lambda b: 1000 + 100 * b, 5000)
    assert confirm_edge(probe, found, 5000, bound) == expected
    assert tried == expected_sequence


@pytest.mark.parametrize("found", [1, 2, 7, 20, 39, 40, 41, 55, 90])
def test_confirm_edge_lands_on_the_edge_with_the_next_size_failing(found):
    curve = lambda b: 1000 + 100 * b + (b * b) // 7  # a bent curve
    probe, tried = make_probe(curve, 5000)
    edge = confirm_edge(probe, found, 5000, 512)
    assert edge == truth(curve, 5000)
    assert edge in tried and edge + 1 in tried


def test_confirm_edge_size_one_failing_is_an_error():
    probe, _ = make_probe(lambda b: 6000 * b, 5000)
    with pytest.raises(BudgetTooSmallError):
        confirm_edge(probe, 3, 5000, 512)
