"""Search and accumulation arithmetic, pure: no torch, the trial is an injected `probe(batch) -> Trial`.

The search finds the largest micro-batch that passed a real trial, with the next size shown not to fit
by a trial. Peak memory at a fixed length is usually affine in the batch size (fixed part + per-sample
slope), so the line through the two nearest measured points predicts the limit and the answer takes
about four trials. It is not always affine: TRL's fused LM-head loss allocates a `min(tokens, 4096) ×
32768` buffer (trl/kernels/chunked_logprob.py), so the slope drops once a batch passes 4096 tokens,
and on a big model the optimizer step can out-peak small batches. The line is only a guess; each
guess is checked by a trial and the bracket [largest fit, smallest failure] only ever narrows.

Two guards keep a bent curve from costing a trial per size: a flat segment (the per-sample share of the
peak under `FLAT_SHARE`, as when the optimizer step out-peaks small batches) is not extrapolated, and a
prediction that already failed, or lands outside the bracket, gives way to halving the bracket. With a
target effective batch, the search stops at the per-device share (`needed`): a larger micro-batch is never
used by the plan, so searching past it only spends trials.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

from autobatch.errors import BudgetTooSmallError, ConfigError


@dataclass
class Trial:
    """One measured trial: peak memory of a few real training steps at `micro_batch_size`."""

    micro_batch_size: int
    peak_memory_bytes: int
    fits: bool
    seconds_per_micro_batch: float  # steady state; `--json` key "seconds"
    oom: bool = False  # the trial raised out-of-memory (its peak is where it stopped)
    peak_allocated_bytes: int | None = None  # tensors alone; peak_memory_bytes (reserved on cuda) decides
    fresh_process: bool = False  # measured in a worker process of its own (no allocator history before it)
    rank_peak_bytes: list[int] | None = None  # FSDP group trials: each rank's peak, rank order (None: one rank)
    cached: bool = False  # answered by the probe cache, not run (a plan keeps these apart, in `cached_trials`)

    def to_dict(self) -> dict:
        """The `--json` form (its key for the step time is "seconds"); `cached` is left out: the plan's
        `trials` and `cached_trials` lists say it."""
        data = _renamed(asdict(self), _TRIAL_KEYS)
        del data["cached"]
        return data

    @classmethod
    def from_dict(cls, data: dict, **changes) -> Trial:
        """The inverse of `to_dict` (either name for the step time), with `changes` applied."""
        return cls(**{**_fields_of(data, _TRIAL_KEYS, cls), **changes})

    @property
    def seconds(self) -> float:
        """`seconds_per_micro_batch` by its `--json` name, for callers that read it so."""
        return self.seconds_per_micro_batch


Probe = Callable[[int], Trial]


@dataclass
class SearchResult:
    max_micro_batch_size: int
    trials: list[Trial]
    capped: bool  # stopped at --max-micro-batch-size, not at the memory limit
    stopped_at_need: bool = False  # `needed` fits: the true maximum is at least this, not searched further


#: A segment whose per-sample slope is under this share of the peak is flat: a fixed cost (the optimizer
#: step out-peaking small batches, measured on opt-350m's shape: 5.127 GiB at micro-batch 1 and 2) hides
#: the per-sample cost, and the line through it would shoot to the cap.
FLAT_SHARE = 0.02
#: With a needed size, a line predicting at least needed / NEED_REACH tries the needed size itself. The line
#: through the first points under-predicts a curve that bends down: TRL's fused LM head stops growing at
#: 4096 tokens (measured on opt-350m's shape at 512 tokens, target 32: the line through 1 and 2 said 19,
#: and 32 fits). One trial at the need then settles the plan.
NEED_REACH = 2


def _predict_limit(points: list[tuple[int, int]], limit_bytes: int) -> float | None:
    """Largest batch the line through two (batch, peak) points keeps within the limit; None if flat."""
    (b0, p0), (b1, p1) = points
    slope = (p1 - p0) / (b1 - b0)
    if slope <= 0:
        return None
    return b1 + (limit_bytes - p1) / slope


def _is_flat(points: list[tuple[int, int]]) -> bool:
    """True when the segment's per-sample slope explains under FLAT_SHARE of the peak at its upper end."""
    (b0, p0), (b1, p1) = points
    return (p1 - p0) / (b1 - b0) * b1 < FLAT_SHARE * p1


def _next_size(
    trials: dict[int, Trial], lo: int, hi: int | None, limit_bytes: int, bound: int, jump_to_bound: bool
) -> int:
    """The next micro-batch to try, strictly inside the bracket (lo fits, hi does not), at most `bound`.

    `jump_to_bound`: the bound is what the plan needs, so when the line cannot tell (flat) or says it
    fits, the bound itself is tried: if it fits, the search is over.
    """
    upper = bound if hi is None else hi - 1
    fitting = sorted(b for b, t in trials.items() if t.fits)
    if len(fitting) < 2:
        return min(lo + 1, upper)
    # Two nearest measured points: lo and the fit below it, or lo and a failure above it whose peak
    # was measured in full (no OOM), which brackets the limit from both sides.
    below = (fitting[-2], trials[fitting[-2]].peak_memory_bytes)
    at_lo = (lo, trials[lo].peak_memory_bytes)
    points = [below, at_lo]
    if hi is not None and not trials[hi].oom:
        points = [at_lo, (hi, trials[hi].peak_memory_bytes)]
    predicted = _predict_limit(points, limit_bytes)
    mid = lo + 1 if hi is None else (lo + hi) // 2
    if predicted is None or _is_flat(points):
        # A flat segment says nothing about where the limit is: grow geometrically, or halve the bracket.
        guess = (bound if jump_to_bound else 4 * lo) if hi is None else mid
    else:
        guess = math.floor(predicted)
        if jump_to_bound and hi is None and guess * NEED_REACH >= bound:
            guess = bound
        if hi is not None and guess >= hi:  # the line already failed here: halve instead of one step down
            guess = mid
    recent = list(trials.values())[-2:]
    if hi is not None and len(recent) == 2 and recent[0].fits == recent[1].fits and guess > lo + 1:
        # The line missed twice on the same side: fall back to bisection so the bracket halves (unless
        # it puts the limit right above lo, which one trial settles).
        guess = max(guess, mid) if recent[-1].fits else min(guess, mid)
    return max(lo + 1, min(guess, upper))


def search_max_micro_batch(
    probe: Probe, limit_bytes: int, max_micro_batch_size: int, needed: int | None = None, find_max: bool = False
) -> SearchResult:
    """Largest micro-batch b ≤ max_micro_batch_size that fits `limit_bytes`, with b + 1 tried and failed.

    With `needed` (the per-device share of a target effective batch), the search stops as soon as that
    size fits (`stopped_at_need`): the plan never uses a larger micro-batch. With `find_max` too, it then
    searches on from there (the plan measures the needed size anyway). Raises BudgetTooSmallError when
    micro-batch 1 does not fit (the error carries its peak).
    """
    if max_micro_batch_size < 1:
        raise ConfigError("max_micro_batch_size must be at least 1", keys=("max_micro_batch_size",))
    trials: dict[int, Trial] = {}
    first = probe(1)
    trials[1] = first
    if not first.fits:
        raise BudgetTooSmallError("micro-batch 1 does not fit the memory budget", first)
    bounded = needed is not None and needed < max_micro_batch_size
    bound = max(1, needed) if bounded else max_micro_batch_size
    lo, hi = 1, None
    while True:
        while lo < bound and (hi is None or hi > lo + 1):
            size = _next_size(trials, lo, hi, limit_bytes, bound, jump_to_bound=bounded)
            trial = probe(size)
            trials[size] = trial
            if trial.fits:
                lo = size
            else:
                hi = size
        if not (find_max and bounded and lo == bound):
            break
        bounded, bound = False, max_micro_batch_size  # the need fits: on to the true maximum
    capped = lo == max_micro_batch_size and hi is None
    return SearchResult(lo, list(trials.values()), capped=capped, stopped_at_need=bounded and lo == bound)


def steady_seconds(step_seconds: list[float], warmup_steps: int = 1) -> float:
    """A trial's steady step time: the median of its steps after `warmup_steps` (all of them if no more).

    The first step of a trial creates the optimizer state, grows the allocator and loads kernels lazily:
    measured on an H200, a trial at micro-batch 8 took 0.195 s a step where plain TRL's steady step was
    0.114 s, enough to rank options on warm-up. The median also drops a single late spike (a shared machine).
    """
    steady = sorted(step_seconds[warmup_steps:] or step_seconds)
    middle = len(steady) // 2
    return steady[middle] if len(steady) % 2 else (steady[middle - 1] + steady[middle]) / 2


def confirm_edge(probe: Probe, found: int, limit_bytes: int, bound: int) -> int:
    """The largest size ≤ `bound` that fits as `probe` sees it, starting from the search's answer `found`.

    `probe` is a trial in a fresh process: on a GPU the search's in-process trials read high or low by
    allocator history (issue 19: 39 there, 40 fresh), so the edge is judged again where the run will meet it.
    From `found` it walks up one size at a time (then along the line through the last two fits, as the search
    does) until a size fails, or down (1, 2, 4, … sizes, then bisecting) until one fits; the answer is a size
    that fit with the next shown not to, unless the answer is `bound` (the cap, or what the plan needs).
    Raises BudgetTooSmallError when even size 1 fails.
    """
    trials: dict[int, Trial] = {}
    lo, hi = 0, None

    def run(size: int) -> bool:
        trials[size] = trial = probe(size)
        if size == 1 and not trial.fits:
            raise BudgetTooSmallError("micro-batch 1 does not fit the memory budget", trial)
        return trial.fits

    found = max(1, min(found, bound))
    if run(found):
        lo = found
    else:
        hi, step = found, 1
        while lo == 0:  # walk down until a size fits
            size = max(1, hi - step)
            if run(size):
                lo = size
            else:
                hi, step = size, 2 * step
    while lo < bound and (hi is None or hi > lo + 1):
        fitting = [b for b, t in trials.items() if t.fits]
        if len(fitting) < 2:  # no line yet: one step up, or the middle of the bracket
            size = lo + 1 if hi is None else (lo + hi) // 2
        else:
            size = _next_size(trials, lo, hi, limit_bytes, bound, jump_to_bound=False)
        if run(size):
            lo = size
        else:
            hi = size
    return lo


def _renamed(values: dict, json_keys: dict[str, str]) -> dict:
    """A dataclass's fields under their `--json` keys (`json_keys`: field -> key, where the key is older)."""
    return {json_keys.get(k, k): v for k, v in values.items()}


def _fields_of(data: dict, json_keys: dict[str, str], cls) -> dict:
    """The inverse of `_renamed`: either name read, keys that are not `cls`'s fields (derived ones) ignored."""
    names = {f.name for f in fields(cls)}
    field_of = {json: name for name, json in json_keys.items()}
    return {field_of.get(k, k): v for k, v in data.items() if field_of.get(k, k) in names}


#: Fields whose `--json` (and plan file) key is an older name: `to_dict` writes the key, `from_dict` reads both.
_TRIAL_KEYS = {"seconds_per_micro_batch": "seconds"}
_OPTION_KEYS = {"seconds_per_micro_batch": "seconds_per_step"}
_CHECKPOINTING_KEYS = {"seconds_per_micro_batch_on": "seconds_per_step_on",
                       "seconds_per_micro_batch_off": "seconds_per_step_off"}


@dataclass
class Option:
    """One way to reach the effective batch: micro × accumulation × world size."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    seconds_per_micro_batch: float  # measured if `measured`, else interpolated (`--json` key "seconds_per_step")
    measured: bool

    @property
    def samples_per_s(self) -> float:
        """0 when step times are unknown (estimate backend): then every option ties."""
        return self.micro_batch_size / self.seconds_per_micro_batch if self.seconds_per_micro_batch > 0 else 0.0

    @property
    def seconds_per_step(self) -> float:
        """`seconds_per_micro_batch` by its `--json` name, for callers that read it so."""
        return self.seconds_per_micro_batch

    def to_dict(self) -> dict:
        """The `--json` form: the fields (the step time under its older key) and samples_per_s."""
        return {**_renamed(asdict(self), _OPTION_KEYS), "samples_per_s": self.samples_per_s}

    @classmethod
    def from_dict(cls, data: dict) -> Option:
        """The inverse of `to_dict` (either name for the step time)."""
        return cls(**_fields_of(data, _OPTION_KEYS, cls))

    def __getitem__(self, key: str):
        """`option["micro_batch_size"]`: `Plan.options` read as the `--json` dicts, as the README shows them."""
        try:
            return self.to_dict()[key]
        except KeyError:
            raise KeyError(f"{key!r}: an option has {', '.join(self.to_dict())}") from None


def check_effective_batch(effective_batch_size: int, world_size: int, name: str = "effective_batch_size") -> int:
    """Samples each device must contribute per optimizer step: the one home of "a multiple of the world size",
    whose error names `name` (a config key) and the nearest reachable values."""
    if effective_batch_size <= 0:
        raise ConfigError(f"{name} must be positive, got {effective_batch_size}")
    if world_size <= 0:
        raise ConfigError(f"world_size must be positive, got {world_size}")
    if effective_batch_size % world_size:
        low = effective_batch_size - effective_batch_size % world_size
        high = low + world_size
        nearest = f"{low} or {high}" if low > 0 else f"{high}"
        raise ConfigError(f"{name} {effective_batch_size} is not a multiple of world size {world_size}: use {nearest}",
                          keys=(name,))
    return effective_batch_size // world_size


def _seconds_at(size: int, trials: list[Trial]) -> tuple[float, bool]:
    """Step time at `size`: measured if a trial ran it, else linear interpolation of measured fits."""
    timed = sorted((t.micro_batch_size, t.seconds_per_micro_batch) for t in trials if t.fits)
    for b, s in timed:
        if b == size:
            return s, True
    lower = [p for p in timed if p[0] < size]
    upper = [p for p in timed if p[0] > size]
    if lower and upper:
        (b0, s0), (b1, s1) = lower[-1], upper[0]
    elif len(lower) >= 2:
        (b0, s0), (b1, s1) = lower[-2], lower[-1]
    elif len(upper) >= 2:
        (b0, s0), (b1, s1) = upper[0], upper[1]
    else:
        b0, s0 = timed[0]
        return s0 * size / b0, False
    value = s0 + (s1 - s0) * (size - b0) / (b1 - b0)
    return (value if value > 0 else min(s for _, s in timed)), False


#: Step times of two sizes closer than this share are within timing noise: the same workload and budget came out
#: 4×8 from the CLI, 2×16 from the API and 1×32 in the classic example on one loaded 2-core machine (issue 24).
#: Within it the larger micro-batch wins: fewer optimizer-step overheads, and the same memory the probe measured.
TIMING_NOISE = 0.10


def plan_options(per_device: int, max_micro_batch_size: int, trials: list[Trial],
                 noise: float | None = None) -> list[Option]:
    """Every micro-batch ≤ the max that divides the per-device samples exactly, fastest first.

    Options within `noise` (default TIMING_NOISE) of the best samples/s are ties, and ties go to the larger
    micro-batch, so which size timed fastest on a loaded machine does not decide the plan.
    """
    noise = TIMING_NOISE if noise is None else noise
    options = []
    for size in range(1, min(per_device, max_micro_batch_size) + 1):
        if per_device % size == 0:
            seconds, measured = _seconds_at(size, trials)
            options.append(Option(size, per_device // size, seconds, measured))
    best = max(o.samples_per_s for o in options)
    return sorted(options, key=lambda o: (o.samples_per_s < (1 - noise) * best, -o.micro_batch_size))


@dataclass
class Nearby:
    """An effective batch near the target whose divisors allow a much larger micro-batch."""

    effective_batch_size: int
    micro_batch_size: int
    speedup: float  # samples/s at that micro-batch over the chosen option's
    measured: bool  # the micro-batch's step time was measured, not interpolated


def nearby_targets(per_device: int, world: int, max_micro_batch_size: int, trials: list[Trial], chosen: Option,
                   reach: float = 0.15, min_speedup: float = 1.25) -> list[Nearby]:
    """The fastest effective batch below and above the target (within `reach` of it, the nearer on a tie) that
    allows a micro-batch at least twice the chosen one and `min_speedup` times its samples/s: what an awkward
    target (37 = 1 × 37 where 5 fits) costs. [] when step times are unknown (the estimate backend) or nothing near
    is faster."""
    if chosen.samples_per_s <= 0:
        return []
    timed = [t for t in trials if t.fits]
    below: Nearby | None = None
    above: Nearby | None = None
    low, high = max(1, math.floor(per_device * (1 - reach))), math.ceil(per_device * (1 + reach))
    for share in range(low, high + 1):
        if share == per_device:
            continue
        micro = max(d for d in range(1, min(share, max_micro_batch_size) + 1) if share % d == 0)
        if micro < 2 * chosen.micro_batch_size:
            continue
        seconds, measured = _seconds_at(micro, timed)
        speedup = (micro / seconds) / chosen.samples_per_s if seconds > 0 else 0.0
        if speedup < min_speedup:
            continue
        found = Nearby(share * world, micro, speedup, measured)
        if share < per_device:  # ascending: a later one below is nearer, so it wins a tie
            below = found if below is None or round(speedup, 3) >= round(below.speedup, 3) else below
        elif above is None or round(speedup, 3) > round(above.speedup, 3):  # an earlier one above is nearer
            above = found
    return sorted((n for n in (below, above) if n is not None), key=lambda n: -n.speedup)


def nearby_note(target: int, chosen: Option, nearby: list[Nearby]) -> str | None:
    """`effective batch 37 allows micro-batch 1 at most; 35 would allow 5 (2.9× the samples/s, measured), ...`."""
    if not nearby:
        return None
    offers = ", ".join(f"{n.effective_batch_size} would allow {n.micro_batch_size} ({n.speedup:.1f}× the samples/s, "
                       f"{'measured' if n.measured else 'interpolated'})" for n in nearby)
    return (f"effective batch {target} divides into micro-batches of at most {chosen.micro_batch_size} here; "
            f"{offers}: effective_batch_size {nearby[0].effective_batch_size} trains faster")


@dataclass
class CheckpointingChoice:
    """Whether the run recomputes activations (`activation_checkpointing`), and the evidence for it.

    `chosen_by` is "user" (set in YAML or a flag: kept, never measured against) or "measured" (TRL's
    default was in force, so both settings were tried at the planned micro-batch). The seconds are per
    micro-batch at that size; None where a setting was not measured or did not fit.
    """

    activation_checkpointing: bool
    chosen_by: str
    reason: str
    seconds_per_micro_batch_on: float | None = None  # `--json` and plan.yaml key "seconds_per_step_on"
    seconds_per_micro_batch_off: float | None = None  # and "seconds_per_step_off"

    @property
    def speedup(self) -> float | None:
        """Step time with checkpointing over step time without (> 1: off is faster); None if unknown."""
        on, off = self.seconds_per_micro_batch_on, self.seconds_per_micro_batch_off
        return on / off if on and off else None

    def to_dict(self) -> dict:
        """The `--json` and plan.yaml form: the step times under their older keys, and the speedup."""
        return {**_renamed(asdict(self), _CHECKPOINTING_KEYS), "speedup": self.speedup}

    @classmethod
    def from_dict(cls, data: dict) -> CheckpointingChoice:
        """The inverse of `to_dict` (either name for the step times; speedup is derived)."""
        return cls(**_fields_of(data, _CHECKPOINTING_KEYS, cls))


#: Without checkpointing a step does strictly less work (no recompute), so a step time up to this share slower
#: without it is timing noise, not a reason to recompute (the same 3% as the options' ties).
CHECKPOINTING_TIE = 0.03


def choose_checkpointing(
    user_value: bool | None, micro_batch_size: int, trial: Callable[[bool], Trial]
) -> CheckpointingChoice:
    """Keep a checkpointing value the user set; else measure the planned micro-batch both ways and take the faster.

    TRL's SFTConfig turns checkpointing on by default, which recomputes the forward pass in every backward
    (a quarter to a third of step time) even where the activations fit. `trial(on)` measures
    `micro_batch_size` with checkpointing `on`: off is taken when it fits and is not slower (within
    CHECKPOINTING_TIE; step times of 0, the estimate backend's, count as equal: no recompute is the cheaper
    step); on stays only when it is what makes the micro-batch fit, or was measured faster.
    """
    if user_value is not None:
        return CheckpointingChoice(bool(user_value), "user", "set in the config: kept")
    without = trial(False)  # first: a probe may time the setting with it again right after, back to back
    with_it = trial(True)
    on_s = with_it.seconds_per_micro_batch if with_it.fits else None
    off_s = without.seconds_per_micro_batch if without.fits else None
    if not without.fits:
        reason = (f"micro-batch {micro_batch_size} fits only with it (without: peak "
                  f"{without.peak_memory_bytes / 2**20:.1f}MiB, over the budget)")
        return CheckpointingChoice(True, "measured", reason, on_s, None)
    if not with_it.fits or without.seconds_per_micro_batch <= with_it.seconds_per_micro_batch * (1 + CHECKPOINTING_TIE):
        if not (with_it.fits and without.seconds_per_micro_batch > 0):
            faster = "no recompute in the backward"
        else:
            speed = (f"{with_it.seconds_per_micro_batch / without.seconds_per_micro_batch:.2f}× faster a step" if without.seconds_per_micro_batch <= with_it.seconds_per_micro_batch
                     else "as fast within timing noise")
            faster = f"{speed} ({without.seconds_per_micro_batch:.3f} vs {with_it.seconds_per_micro_batch:.3f} s/micro-batch)"
        return CheckpointingChoice(False, "measured", f"micro-batch {micro_batch_size} fits without it: {faster}",
                                   on_s, off_s)
    reason = (f"micro-batch {micro_batch_size} fits without it but was measured slower ({without.seconds_per_micro_batch:.3f} vs "
              f"{with_it.seconds_per_micro_batch:.3f} s/micro-batch)")
    return CheckpointingChoice(True, "measured", reason, on_s, off_s)


#: Plan fields whose `--json` (and plan.json) key is the older name: `to_dict` writes it, `from_dict` reads both.
_PLAN_KEYS = {"max_fitting_micro_batch_size": "max_micro_batch_size", "seconds_per_micro_batch": "seconds_per_step"}


@dataclass
class Plan:
    """The recommended configuration and the evidence behind it (the `--json` contract)."""

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    world_size: int
    max_fitting_micro_batch_size: int  # the search's answer (`--json` key "max_micro_batch_size"; not the cap)
    memory_budget_bytes: int
    usable_memory_bytes: int
    headroom: float
    peak_memory_bytes: int
    device: str
    max_length: int
    trials: list[Trial]
    fits: bool = True
    capped: bool = False
    seconds_per_micro_batch: float = 0.0  # at the planned micro-batch (`--json` key "seconds_per_step")
    options: list[Option] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    memory_fingerprint: dict = field(default_factory=dict)
    search_seconds: float = 0.0
    per_device_eval_batch_size: int | None = None  # planned when the run evaluates
    eval_peak_memory_bytes: int | None = None  # training, then evaluation at that batch, optimizer state alive
    eval_trials: list[Trial] = field(default_factory=list)
    precision: str | None = None  # what the trials measured: "bf16", "fp16" or "fp32"; plan.yaml says the same
    cached_trials: list[Trial] = field(default_factory=list)  # answers the probe cache gave; not in `trials`
    cache_path: str | None = None  # the probe cache file used, None with --no-cache
    stopped_at_need: bool = False  # max_fitting_micro_batch_size is what the target needs; the true max may be larger
    checkpointing: CheckpointingChoice | None = None  # what the run trains with; None: the config's, unmeasured
    assumed: dict | None = None  # estimate backend: the device, precision, optimizer, attention, allocator emulated
    trial_process: str = "same"  # "fresh": the edge and the planned size were measured in fresh worker processes
    pytorch_cuda_alloc_conf: str | None = None  # the allocator setting the cuda trials ran under (None: default)
    rank_peak_bytes: list[int] | None = None  # FSDP group trials: each rank's peak at the planned micro-batch

    def to_dict(self) -> dict:
        data = _renamed(asdict(self), _PLAN_KEYS)
        for name in ("trials", "eval_trials", "cached_trials"):
            data[name] = [t.to_dict() for t in getattr(self, name)]
        data["options"] = [o.to_dict() for o in self.options]
        if self.checkpointing is not None:
            data["checkpointing"] = self.checkpointing.to_dict()
        return data

    @property
    def max_micro_batch_size(self) -> int:
        """`max_fitting_micro_batch_size` by its `--json` name, for callers that read it so."""
        return self.max_fitting_micro_batch_size

    @property
    def seconds_per_step(self) -> float:
        """`seconds_per_micro_batch` by its `--json` name, for callers that read it so."""
        return self.seconds_per_micro_batch

    # apply/save are the public `autobatch.apply_plan`/`autobatch.save_plan`, looked up on the package at call
    # time: they build on config, train and workload, which all import this module, so importing them here
    # would close a circle through the whole package. The planner stays pure data and arithmetic.
    def apply(self, trainer, *, oom_fallback: bool = False):
        """Set this plan on a built trainer: `autobatch.apply_plan(trainer, self)`."""
        import autobatch

        return autobatch.apply_plan(trainer, self, oom_fallback=oom_fallback)

    def save(self, path, config=None) -> str:
        """Write plan.json (`.json`) or plan.yaml (anything else): `autobatch.save_plan(self, path, config)`."""
        import autobatch

        return autobatch.save_plan(self, path, config)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """The inverse of `to_dict` (plan.json back to a Plan); unknown keys are ignored."""
        values = _fields_of(data, _PLAN_KEYS, cls)
        values["trials"] = [Trial.from_dict(t) for t in data.get("trials", [])]
        values["eval_trials"] = [Trial.from_dict(t) for t in data.get("eval_trials", [])]
        values["cached_trials"] = [Trial.from_dict(t, cached=True) for t in data.get("cached_trials", [])]
        values["options"] = [Option.from_dict(o) for o in data.get("options", [])]
        if data.get("checkpointing"):
            values["checkpointing"] = CheckpointingChoice.from_dict(data["checkpointing"])
        return cls(**values)
