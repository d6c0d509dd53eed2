"""autobatch's search beside accelerate's `find_executable_batch_size` under the same cpu budget.

Why: accelerate (and Trainer's `auto_find_batch_size`) starts at 128 and shrinks ×0.9 per out-of-memory
error, blind to how much memory a step used; autobatch reads each trial's peak and predicts the limit.
This script measures what that difference costs in trials, OOMs and time, and how close each lands.

Both sides run the same real trial (`Prober.run_trial`: two SFTTrainer optimizer steps at max_length 256,
gradient checkpointing off) on a tiny Llama, on autobatch's cpu backend, which raises a CUDA-style
`torch.OutOfMemoryError` when live tensor bytes pass the budget. The truth comes from an exhaustive sweep:
the peak at every micro-batch 1, 2, 3, … measured once without a budget (peaks on this backend are
deterministic), each budget's true limit being the last size before the first peak above it. Every trial
the two searches run under a budget is checked against that sweep. Budgets sit halfway between two
consecutive peaks, so their true limits are about 5, 13, 37 and 100.

    python benchmarks/search_vs_accelerate.py [--quick]     # ~5 min on 2 cores; --quick: 2 budgets, 2 min
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore")

TARGETS = (5, 13, 37, 100)
QUICK_TARGETS = (5, 37)  # one limit before the 4096-token kink (16 × 256 tokens), one past it
MAX_LENGTH = 256
MAX_MICRO_BATCH_SIZE = 512  # autobatch's default --max-micro-batch-size
ACCELERATE_START = 128
MiB = 2**20


@dataclass
class Outcome:
    """One search under one budget: what it found and the trials it took to get there."""

    found: int
    sizes: list[int]  # micro-batch of every trial, in order
    fits: list[bool]
    seconds: float  # wall time of the trials (the trainer is built before the clock starts)

    @property
    def ooms(self) -> int:
        return self.fits.count(False)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def make_prober(model_dir: str, budget: int):
    """A Prober on a fresh cpu backend of `budget` bytes, usable to the byte (headroom 0)."""
    from autobatch.config import build_config
    from autobatch.memory import CpuBackend
    from autobatch.trial import Prober

    config = build_config(overrides={
        "model_name_or_path": model_dir, "device": "cpu", "headroom": 0, "max_length": MAX_LENGTH,
        "gradient_checkpointing": False,
    })
    return Prober(config, CpuBackend(budget), budget)


def sweep(model_dir: str, up_to: int) -> tuple[dict[int, int], dict[int, float]]:
    """Peak bytes and seconds per step at every micro-batch 1 … up_to, with no budget to hit."""
    prober = make_prober(model_dir, 10**13)
    peaks, seconds = {}, {}
    start = time.perf_counter()
    try:
        for size in range(1, up_to + 1):
            trial = prober.run_trial(size)
            peaks[size], seconds[size] = trial.peak_memory_bytes, trial.seconds_per_micro_batch
            if size % 10 == 0 or size == up_to:
                log(f"  sweep micro={size} peak={trial.peak_memory_bytes / MiB:.1f}MiB "
                    f"({time.perf_counter() - start:.0f} s)")
    finally:
        prober.close()
    return peaks, seconds


def true_limit(peaks: dict[int, int], budget: int) -> int:
    """What an exhaustive sweep under `budget` finds: the size before the first one that does not fit."""
    for size in sorted(peaks):
        if peaks[size] > budget:
            return size - 1
    raise ValueError(f"the sweep to {max(peaks)} never exceeds {budget} bytes: sweep further")


def budget_for(peaks: dict[int, int], target: int) -> int:
    """A budget halfway between peak(target) and peak(target + 1), so the true limit is `target`."""
    return (peaks[target] + peaks[target + 1]) // 2


def step_seconds(seconds: dict[int, float], size: int) -> float:
    """One training step at `size`: the median of the sweep's step times at size - 1, size and size + 1.

    A single step time on a shared 2-core machine is noisy; three neighbours barely differ in work.
    """
    return statistics.median(seconds[b] for b in (size - 1, size, size + 1) if b in seconds)


def run_autobatch(model_dir: str, budget: int) -> Outcome:
    """autobatch's `search_max_micro_batch`, each probe a real trial under the budget."""
    from autobatch.planner import search_max_micro_batch

    prober = make_prober(model_dir, budget)

    def probe(size: int):
        trial = prober.run_trial(size)
        log(f"    autobatch micro={size} {'fits' if trial.fits else 'OOM'}")
        return trial

    try:
        start = time.perf_counter()
        result = search_max_micro_batch(probe, budget, MAX_MICRO_BATCH_SIZE)
        elapsed = time.perf_counter() - start
    finally:
        prober.close()
    trials = result.trials
    return Outcome(result.max_micro_batch_size, [t.micro_batch_size for t in trials],
                   [t.fits for t in trials], elapsed)


def run_accelerate(model_dir: str, budget: int) -> Outcome:
    """accelerate's `find_executable_batch_size` from 128, wrapping the same real trial under the budget.

    The trial catches the backend's OOM to report it; it is raised again as `torch.OutOfMemoryError`
    with a CUDA message, which is what accelerate's `should_reduce_batch_size` recognises, so accelerate
    clears memory and shrinks ×0.9 exactly as it does on a GPU.
    """
    import torch
    from accelerate.utils import find_executable_batch_size

    prober = make_prober(model_dir, budget)
    sizes: list[int] = []
    fits: list[bool] = []

    @find_executable_batch_size(starting_batch_size=ACCELERATE_START)
    def train(batch_size: int) -> int:
        trial = prober.run_trial(batch_size)
        sizes.append(batch_size)
        fits.append(trial.fits)
        log(f"    accelerate micro={batch_size} {'fits' if trial.fits else 'OOM'}")
        if not trial.fits:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Micro-batch {batch_size} needs more than the "
                f"{budget / MiB:.1f} MiB budget (autobatch cpu backend)."
            )
        return batch_size

    try:
        start = time.perf_counter()
        found = train()
        elapsed = time.perf_counter() - start
    finally:
        prober.close()
    return Outcome(found, sizes, fits, elapsed)


def disagreements(outcome: Outcome, peaks: dict[int, int], budget: int) -> list[int]:
    """Sizes where a trial under the budget disagreed with the sweep's verdict (peak ≤ budget).

    Sizes past the sweep are past the true limit too (peaks only grow with the batch): they must fail.
    """
    expected = {b: peaks[b] <= budget if b in peaks else False for b in outcome.sizes}
    return [b for b, fit in zip(outcome.sizes, outcome.fits) if fit != expected[b]]


def describe_sweep(peaks: dict[int, int]) -> str:
    """Peak at 1 and the per-sample slope on each affine piece (the kink is TRL's fused LM head)."""
    pieces: list[tuple[int, int, int]] = []  # (first size, last size, slope)
    for size in range(2, max(peaks) + 1):
        slope = peaks[size] - peaks[size - 1]
        if pieces and pieces[-1][2] == slope:
            pieces[-1] = (pieces[-1][0], size, slope)
        else:
            pieces.append((size, size, slope))
    parts = [f"+{s / MiB:.2f} MiB/sample for {a}…{b}" if a < b else f"+{s / MiB:.2f} MiB at {a}"
             for a, b, s in pieces]
    return f"peak(1) = {peaks[1] / MiB:.1f} MiB, " + ", ".join(parts)


def print_table(rows: list[tuple], peaks: dict[int, int]) -> None:
    """The comparison table, the search sequences behind it, and a one-line summary."""
    header = (f"{'budget':>10} {'true':>4} | {'autobatch':>9} {'trials':>6} {'OOMs':>4} {'time':>7} | "
              f"{'accelerate':>10} {'trials':>6} {'OOMs':>4} {'time':>7}")
    print(header)
    print("-" * len(header))
    for budget, truth, ours, theirs, step in rows:
        print(f"{budget / MiB:>7.1f}MiB {truth:>4} | {ours.found:>4}/{truth:<4} {len(ours.sizes):>6} "
              f"{ours.ooms:>4} {ours.seconds / step:>6.0f}x | {theirs.found:>5}/{truth:<4} "
              f"{len(theirs.sizes):>6} {theirs.ooms:>4} {theirs.seconds / step:>6.0f}x")
    print()
    for name, index in (("autobatch", 2), ("accelerate", 3)):
        trials = statistics.mean(len(r[index].sizes) for r in rows)
        ratio = statistics.mean(r[index].found / r[1] for r in rows)
        ooms = statistics.mean(r[index].ooms for r in rows)
        print(f"{name:>10}: mean trials {trials:.1f}, mean OOMs {ooms:.1f}, mean found/true {ratio:.3f}")
    print("\ntime: the search's wall time (trials only; each trial builds the step and runs two optimizer steps)")
    print("      as a multiple of one training step at the true limit (median of the sweep's step times")
    print("      at true-1, true, true+1), single-threaded torch.")
    print("true: from one exhaustive sweep of peaks at micro-batch 1 … "
          f"{max(peaks)} without a budget (deterministic on this backend), not a sweep per budget;")
    print(f"      {describe_sweep(peaks)}.")
    print("\nsizes tried (x = OOM):")
    for budget, truth, ours, theirs, _ in rows:
        for name, outcome in (("autobatch", ours), ("accelerate", theirs)):
            tried = " ".join(f"{b}" if fit else f"{b}x" for b, fit in zip(outcome.sizes, outcome.fits))
            print(f"  {budget / MiB:>7.1f}MiB {name:>10} ({outcome.seconds:5.1f} s): {tried}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"two budgets (true limits about {QUICK_TARGETS})")
    args = parser.parse_args()
    targets = QUICK_TARGETS if args.quick else TARGETS

    import torch

    # One thread: with two on a 2-core machine anything else running stalls torch's thread barriers
    # (measured here: step time at micro-batch 1 jumped between 0.05 s and 2.6 s), which makes the
    # time column noise. Peaks do not depend on the thread count (identical sweeps with 1 and 2).
    torch.set_num_threads(1)
    from autobatch.builtin import save_tiny_model

    model_dir = str(save_tiny_model(tempfile.mkdtemp(prefix="autobatch-bench-"), "llama"))
    up_to = max(targets) + 1
    log(f"exhaustive sweep: micro-batch 1 … {up_to} at {MAX_LENGTH} tokens, tiny Llama, no budget")
    peaks, seconds = sweep(model_dir, up_to)
    rows = []
    for target in targets:
        budget = budget_for(peaks, target)
        truth = true_limit(peaks, budget)
        log(f"budget {budget / MiB:.1f}MiB (true limit {truth}): autobatch")
        ours = run_autobatch(model_dir, budget)
        log("  accelerate")
        theirs = run_accelerate(model_dir, budget)
        for name, outcome in (("autobatch", ours), ("accelerate", theirs)):
            if bad := disagreements(outcome, peaks, budget):
                log(f"WARNING: {name} trials at {bad} disagree with the sweep under {budget} bytes")
        rows.append((budget, truth, ours, theirs, step_seconds(seconds, truth)))
    print_table(rows, peaks)


if __name__ == "__main__":
    main()
