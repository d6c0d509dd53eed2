"""autobatch's search beside accelerate's `find_executable_batch_size` under the same cpu budget.

Both sides run the same real trial (two SFTTrainer optimizer steps at max_length, autobatch's cpu
backend raising a CUDA-style OOM past the budget) on a tiny Llama. accelerate starts at 128 and shrinks
×0.9 per OOM, as `auto_find_batch_size` does; autobatch reads each trial's peak. The truth comes from an
exhaustive sweep of peaks at every micro-batch 1 … 110 (memory on this backend is deterministic, so each
budget's true limit is read off that one sweep). Budgets sit halfway between two measured peaks so their
true limits are about 5, 13, 37 and 100.

    python benchmarks/search_vs_accelerate.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore")

TARGETS = (5, 13, 37, 100)
SWEEP_TO = 110
MAX_LENGTH = 256


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def make_prober(model_dir: str, budget: int):
    from autobatch.config import build_config
    from autobatch.memory import CpuBackend
    from autobatch.probe import Prober

    config = build_config(overrides={
        "model_name_or_path": model_dir, "device": "cpu", "headroom": 0, "max_length": MAX_LENGTH,
        "gradient_checkpointing": False,
    })
    return Prober(config, CpuBackend(budget), budget)


def sweep_peaks(model_dir: str, up_to: int) -> tuple[dict[int, int], dict[int, float]]:
    """Peak bytes and step seconds at every micro-batch 1 … up_to, with no budget pressure."""
    prober = make_prober(model_dir, 10**13)
    peaks, seconds = {}, {}
    try:
        for size in range(1, up_to + 1):
            trial = prober.run_trial(size)
            peaks[size], seconds[size] = trial.peak_memory_bytes, trial.seconds
            if size % 10 == 0:
                log(f"  sweep: micro={size} peak={trial.peak_memory_bytes / 2**20:.1f}MiB")
    finally:
        prober.close()
    return peaks, seconds


def run_autobatch(model_dir: str, budget: int) -> tuple[int, int, int, float]:
    """(found, trials, OOMs, seconds) of autobatch's search."""
    from autobatch.planner import search_max_micro_batch

    prober = make_prober(model_dir, budget)
    try:
        start = time.perf_counter()
        result = search_max_micro_batch(prober.run_trial, budget, max_micro_batch_size=4096)
        elapsed = time.perf_counter() - start
    finally:
        prober.close()
    return result.max_micro_batch_size, len(result.trials), sum(t.oom for t in result.trials), elapsed


def run_accelerate(model_dir: str, budget: int) -> tuple[int, int, int, float]:
    """(found, trials, OOMs, seconds) of accelerate's find_executable_batch_size starting at 128."""
    import torch
    from accelerate.utils import find_executable_batch_size

    prober = make_prober(model_dir, budget)
    tried: list[int] = []

    @find_executable_batch_size(starting_batch_size=128)
    def train(batch_size: int) -> int:
        tried.append(batch_size)
        trial = prober.run_trial(batch_size)
        if not trial.fits:  # the trial caught the OOM; accelerate must see one to shrink
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate (autobatch cpu backend)")
        return batch_size

    try:
        start = time.perf_counter()
        found = train()
        elapsed = time.perf_counter() - start
    finally:
        prober.close()
    return found, len(tried), len(tried) - 1, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two budgets (true limits about 5 and 37)")
    args = parser.parse_args()
    targets = (5, 37) if args.quick else TARGETS
    from autobatch.builtin import save_tiny_model

    model_dir = str(save_tiny_model(tempfile.mkdtemp(prefix="autobatch-bench-"), "llama"))
    log(f"exhaustive sweep, micro-batch 1 … {max(targets) + 1} at {MAX_LENGTH} tokens (tiny Llama)")
    peaks, seconds = sweep_peaks(model_dir, max(targets) + 1)
    rows = []
    for target in targets:
        budget = (peaks[target] + peaks[target + 1]) // 2
        truth = max(b for b, p in peaks.items() if p <= budget)
        step = seconds[truth]
        log(f"budget {budget / 2**20:.1f}MiB (true limit {truth}): autobatch …")
        ours = run_autobatch(model_dir, budget)
        log("  accelerate …")
        theirs = run_accelerate(model_dir, budget)
        rows.append((budget, truth, ours, theirs, step))

    header = (f"{'budget':>10} {'true':>5} | {'autobatch':>9} {'trials':>6} {'OOMs':>4} {'time/step':>9} | "
              f"{'accelerate':>10} {'trials':>6} {'OOMs':>4} {'time/step':>9}")
    print(header)
    print("-" * len(header))
    for budget, truth, (f1, t1, o1, s1), (f2, t2, o2, s2), step in rows:
        print(f"{budget / 2**20:>7.1f}MiB {truth:>5} | {f1:>4}/{truth:<4} {t1:>6} {o1:>4} {s1 / step:>8.1f}x | "
              f"{f2:>5}/{truth:<4} {t2:>6} {o2:>4} {s2 / step:>8.1f}x")
    ours_ratio = statistics.mean(r[2][0] / r[1] for r in rows)
    theirs_ratio = statistics.mean(r[3][0] / r[1] for r in rows)
    print(f"\nmean found/true: autobatch {ours_ratio:.3f}, accelerate {theirs_ratio:.3f}; "
          f"mean trials: autobatch {statistics.mean(r[2][1] for r in rows):.1f}, "
          f"accelerate {statistics.mean(r[3][1] for r in rows):.1f}")
    print("time/step: search wall time ÷ one optimizer step at the true limit (each trial is two steps plus "
          "trainer set-up).")


if __name__ == "__main__":
    main()
