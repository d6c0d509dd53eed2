"""What a plan costs on real-size model shapes, in estimate mode: trials, failures, seconds, and the cache.

Why: on the tiny models the search is exact in a handful of trials; on a real shape each trial is seconds
here and seconds to minutes of a busy GPU, so the number of trials is the cost. Shapes are published
configs written out with `autobatch.builtin.save_model_shape` (no download, no weights):

- facebook/opt-350m at 512 tokens, 16 GiB (TRL's classic example; the issue's 17-trial case),
- TinyLlama-1.1B's shape at 2048 tokens, 40 GiB,
- Qwen2-0.5B's shape at 1024 tokens, 24 GiB,

each planned without a target (largest micro-batch), with a target effective batch (the search stops at
what the plan needs), with the target and --find-max (exact maximum), then the target plan again from the
probe cache, and under a 10% smaller budget from the cache. A found maximum is checked exact from the
trials themselves (it fits, the next size does not); with --exhaustive every size up to it is measured too.

    python benchmarks/search_cost.py [--quick] [--shape NAME] [--exhaustive]   # --quick: opt-350m, target rows

`--design cpu|cuda` measures instead what judging the edge in fresh processes costs (issue 19): the same plans
(gpu_check's workload: a tiny Llama at 64 tokens on cpu, the ~100M Llama at 1024 tokens, 6 GiB on cuda) with every
trial in the planning process (`trial_process: same`) and with the edge confirmed in fresh worker processes
(`fresh`, the cuda default; `fresh, cold` is the same with AUTOBATCH_WARM_START=0, each worker importing torch and
TRL itself): trials in each kind of process, model loads, seconds per plan, and what a design with every trial
fresh would cost at the measured price of one fresh trial.

    python benchmarks/search_cost.py --design cpu > benchmarks/results/search_cost-design-cpu.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore")

GiB = 2**30
#: (shape, max_length, budget, target effective batch)
CASES = [
    ("opt-350m", 512, 16 * GiB, 32),
    ("tinyllama-1.1b", 2048, 40 * GiB, 64),
    ("qwen2-0.5b", 1024, 24 * GiB, 64),
]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def plan_row(label: str, model_dir: str, max_length: int, budget: int, cache_file: str, **overrides):
    """One plan through `make_plan` (the same path as `autobatch plan`), summarised as a table row."""
    from autobatch.config import build_config
    from autobatch.probe import make_plan

    config = build_config(overrides={
        "model_name_or_path": model_dir, "device": "estimate", "memory_budget": budget, "max_length": max_length,
        "cache": cache_file, **overrides,
    })
    started = time.perf_counter()
    plan = make_plan(config)
    seconds = time.perf_counter() - started
    answers = {t.micro_batch_size: t for t in plan.cached_trials + plan.trials}
    best = plan.max_fitting_micro_batch_size
    if plan.stopped_at_need:
        check = f"≥ {best} (need fits)"
    elif best + 1 in answers and not answers[best + 1].fits:
        check = f"{best} exact ({best + 1} does not fit)"
    else:
        check = f"{best}"
    row = {
        "case": label, "trials": len(plan.trials), "failed": sum(not t.fits for t in plan.trials),
        "cached": len(plan.cached_trials), "sizes": [t.micro_batch_size for t in plan.trials],
        "seconds": seconds, "found": check,
        "plan": f"{plan.per_device_train_batch_size} × {plan.gradient_accumulation_steps}",
    }
    log(f"  {row}")
    return row, plan


def exhaustive_max(model_dir: str, max_length: int, budget: int, up_to: int, per_device: int | None) -> int:
    """Every size 1..up_to measured (estimate peaks are deterministic): the last size before the first failure."""
    from autobatch.config import build_config
    from autobatch.memory import EstimateBackend
    from autobatch.trial import Prober

    config = build_config(overrides={"model_name_or_path": model_dir, "device": "estimate", "max_length": max_length})
    prober = Prober(config, EstimateBackend(budget), budget, per_device)
    try:
        for size in range(1, up_to + 1):
            if not prober.run_trial(size).fits:
                return size - 1
        return up_to
    finally:
        prober.close()


def design_rows(device: str) -> list[dict]:
    """Plans of gpu_check's workload with trials in this process, then with the edge judged in fresh ones."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_check import SIZES, write_long_texts

    from autobatch import launch
    from autobatch.builtin import save_tiny_model
    from autobatch.config import build_config
    from autobatch.probe import make_plan

    overrides, max_length, budget = SIZES[device]
    rows = []
    with tempfile.TemporaryDirectory(prefix="autobatch-design-") as tmp:
        model = str(save_tiny_model(os.path.join(tmp, "model"), "llama", **overrides))
        data = str(write_long_texts(Path(tmp, "long.jsonl"), max_length, 64))
        for target in (None, 8):
            for process in ("same", "fresh", "fresh, cold"):
                config = build_config(overrides={
                    "model_name_or_path": model, "dataset_name": data, "device": device, "memory_budget": budget,
                    "max_length": max_length, "no_cache": True, "trial_process": process.split(",")[0],
                    "effective_batch_size": target,
                })
                launch._close_warm()  # each plan starts its own warm process, as one `autobatch plan` does
                os.environ[launch.WARM_ENV] = "0" if process.endswith("cold") else "1"
                started = time.perf_counter()
                plan = make_plan(config)
                seconds = time.perf_counter() - started
                fresh = sum(t.fresh_process for t in plan.trials)
                row = {"case": f"{device}, {'no target' if target is None else f'target {target}'}",
                       "process": process, "same": len(plan.trials) - fresh, "fresh": fresh, "loads": 1 + fresh,
                       "seconds": seconds, "max": plan.max_fitting_micro_batch_size,
                       "plan": f"{plan.per_device_train_batch_size} × {plan.gradient_accumulation_steps}",
                       "peak": plan.peak_memory_bytes,
                       "sizes": [f"{t.micro_batch_size}{'f' if t.fresh_process else ''}" for t in plan.trials]}
                log(f"  {row}")
                rows.append(row)
    return rows


def print_design(rows: list[dict]) -> None:
    print("| case | trial_process | trials in-process | trials fresh | model loads | s per plan | max | plan | "
          "peak B | sizes (f: fresh) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['process']} | {r['same']} | {r['fresh']} | {r['loads']} | {r['seconds']:.1f} | "
              f"{r['max']} | {r['plan']} | {r['peak']} | {' '.join(r['sizes'])} |")
    for same, fresh, cold in zip(rows[::3], rows[1::3], rows[2::3], strict=True):
        if not fresh["fresh"]:
            continue
        per_fresh, per_cold = ((r["seconds"] - same["seconds"]) / r["fresh"] for r in (fresh, cold))
        every = per_fresh * same["same"]  # each of the search's trials in a worker of its own
        print(f"\n{fresh['case']}: one fresh trial costs {per_fresh:.1f} s more than an in-process one "
              f"({per_cold:.1f} s started cold); every trial fresh would be about {every:.0f} s per plan "
              f"({same['same']} trials) against {fresh['seconds']:.0f} s for the search in-process + "
              f"{fresh['fresh']} fresh")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="opt-350m only, target rows only")
    parser.add_argument("--exhaustive", action="store_true", help="also measure every size up to the maximum")
    parser.add_argument("--shape", choices=[case[0] for case in CASES], help="only this shape")
    parser.add_argument("--design", choices=("cpu", "cuda"),
                        help="cost of trials in fresh processes on this device (issue 19) instead")
    options = parser.parse_args()
    if options.design:
        print_design(design_rows(options.design))
        return 0
    from autobatch.builtin import save_model_shape

    rows = []
    cases = [c for c in CASES if c[0] == options.shape] if options.shape else CASES[:1] if options.quick else CASES
    with tempfile.TemporaryDirectory(prefix="autobatch-bench-") as tmp:
        for name, max_length, budget, target in cases:
            log(f"{name} at {max_length} tokens, budget {budget / GiB:g} GiB, target {target}")
            model_dir = str(save_model_shape(os.path.join(tmp, name), name))
            cache_file = os.path.join(tmp, f"{name}.sqlite3")
            label = f"{name} @{max_length}, {budget / GiB:g} GiB"
            if not options.quick:
                row, plan = plan_row(f"{label}, no target", model_dir, max_length, budget, cache_file, no_cache=True)
                rows.append(row)
                if options.exhaustive:
                    truth = exhaustive_max(model_dir, max_length, budget, plan.max_fitting_micro_batch_size + 1, None)
                    row["found"] += f"; exhaustive {truth}"
            rows.append(plan_row(f"{label}, target {target}", model_dir, max_length, budget, cache_file,
                                 effective_batch_size=target)[0])
            if not options.quick:
                rows.append(plan_row(f"{label}, target {target} --find-max", model_dir, max_length, budget,
                                     cache_file, effective_batch_size=target, find_max=True, no_cache=True)[0])
            rows.append(plan_row(f"{label}, target {target}, re-planned from the cache", model_dir, max_length,
                                 budget, cache_file, effective_batch_size=target)[0])
            smaller = int(budget * 0.9)
            rows.append(plan_row(f"{name} @{max_length}, {smaller / GiB:.1f} GiB (-10%), target {target}, cache",
                                 model_dir, max_length, smaller, cache_file, effective_batch_size=target)[0])
    print("| case | trials run (failed) | from cache | sizes run | search s | max micro-batch | plan |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['trials']} ({r['failed']}) | {r['cached']} | {', '.join(map(str, r['sizes']))} "
              f"| {r['seconds']:.0f} | {r['found']} | {r['plan']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
