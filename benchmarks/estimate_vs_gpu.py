"""`--device estimate` held against the card: the estimate's peak for each GPU measurement committed here, and the ratio.

GPU figures are what the caching allocator reported on an H200 (`torch.cuda.max_memory_reserved()`, allocated in
brackets), each a `plan --micro-batch-size N` trial (autobatch's probe: two optimizer steps, the batch padded by
one token) on a published shape with random weights, texts that all truncate at `max_length`, TRL's defaults
(bf16, activation checkpointing, adamw_torch_fused) and headroom 0:

- issue 20's table: opt-350m at 512 tokens, micro 8, 64 and 151, each in a fresh process; the card's largest
  micro-batch at 16 GiB is about 152;
- /work/shared/gpu/gpu_check-NVIDIA-H200-2026-12-04.json: the plan trials of benchmarks/gpu_check.py (a ~100M
  Llama, hidden 768, 12 layers, the built-in tokenizer, 1024 tokens), run one after another in one process.

A later GPU run adds rows here (`benchmarks/plain_trl.py` and `gpu_check.py` write them under benchmarks/results/).
The estimate runs on this machine's CPU (fake tensors: no memory, seconds a trial).

    python benchmarks/estimate_vs_gpu.py            # every row, and the largest micro-batch at 16 GiB
    python benchmarks/estimate_vs_gpu.py --quick    # the first row only (CI)
    python benchmarks/estimate_vs_gpu.py --big      # bigger than this machine: 7B Llama + LoRA, 1.1B full, timed
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore")

GiB = 2**30
#: (workload, max_length, micro, reserved, allocated, source); workload: a PUBLISHED_SHAPES name or "gpu_check"
GPU_ROWS = [
    ("opt-350m", 512, 8, 5_827_985_408, 5_642_656_768, "issue 20, H200, fresh process"),
    ("opt-350m", 512, 64, 10_089_398_272, 9_136_392_704, "issue 20, H200, fresh process"),
    ("opt-350m", 512, 151, 17_035_165_696, 15_875_754_496, "issue 20, H200, fresh process"),
    ("gpu_check", 1024, 1, 2_086_666_240, 1_954_823_168, "gpu_check H200 2026-12-04, trial 1"),
    ("gpu_check", 1024, 2, 2_183_135_232, 2_039_839_744, "gpu_check H200 2026-12-04, trial 2"),
    ("gpu_check", 1024, 22, 4_328_521_728, 3_779_130_368, "gpu_check H200 2026-12-04, trial 4"),
    ("gpu_check", 1024, 38, 5_939_134_464, 5_466_846_208, "gpu_check H200 2026-12-04, trial 5"),
    ("gpu_check", 1024, 39, 5_972_688_896, 5_571_965_952, "gpu_check H200 2026-12-04, trial 6"),
]
#: the card's largest micro-batch for opt-350m at 512 tokens under 16 GiB, headroom 0 (issue 20)
GPU_MAX_16GIB = ("opt-350m", 512, 16 * GiB, 152)
#: plain TRL on the card (benchmarks/plain_trl.py: no padded example, no autobatch code), for reference
PLAIN_TRL = {("opt-350m", 512, 8): 5_794_430_976, ("opt-350m", 512, 64): 10_022_289_408}
GPU_CHECK_MODEL = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_key_value_heads": 12, "max_position_embeddings": 2048}  # gpu_check.py SIZES["cuda"]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def workload(root: Path, name: str, max_length: int) -> tuple[str, str]:
    """The model directory (config and tokenizer, no weights) and a jsonl of texts that all truncate."""
    from gpu_check import write_long_texts

    from autobatch.builtin import save_model_shape, save_tiny_model

    model = root / name
    if not (model / "config.json").exists():
        if name == "gpu_check":
            save_tiny_model(model, "llama", **GPU_CHECK_MODEL)
        else:
            save_model_shape(model, name)
    data = write_long_texts(root / f"{name}-{max_length}.jsonl", max_length, 16)
    return str(model), str(data)


def config_for(model: str, data: str | None, max_length: int, budget: int, **extra):
    from autobatch.config import build_config

    return build_config(overrides={
        "model_name_or_path": model, "dataset_name": data, "device": "estimate", "memory_budget": budget,
        "max_length": max_length, "headroom": 0, "no_cache": True, **extra})


def estimate_rows(rows: list[tuple], root: Path) -> list[dict]:
    """One Prober per workload, one trial per row (estimate trials do not depend on the ones before)."""
    from autobatch.memory import EstimateBackend
    from autobatch.trial import Prober

    out = []
    for key in dict.fromkeys((r[0], r[1]) for r in rows):
        model, data = workload(root, *key)
        budget = 150 * GiB  # the H200's; a trial's peak does not depend on it
        prober = Prober(config_for(model, data, key[1], budget), EstimateBackend(budget), budget)
        try:
            for name, length, micro, reserved, allocated, source in (r for r in rows if (r[0], r[1]) == key):
                started = time.perf_counter()
                trial = prober.run_trial(micro)
                seconds = time.perf_counter() - started
                row = {"workload": name, "max_length": length, "micro": micro, "gpu_reserved": reserved,
                       "gpu_allocated": allocated, "estimate": trial.peak_memory_bytes,
                       "estimate_allocated": trial.peak_allocated_bytes, "ratio": trial.peak_memory_bytes / reserved,
                       "seconds": seconds, "source": source, "precision": prober.precision}
                log(f"  {name} @{length} micro {micro}: estimate {trial.peak_memory_bytes:,} / GPU {reserved:,} "
                    f"= {row['ratio']:.4f} ({seconds:.1f} s)")
                out.append(row)
        finally:
            prober.close()
    return out


def estimate_max(root: Path) -> dict:
    """The largest micro-batch the estimate finds under 16 GiB (the search `autobatch plan --find-max` runs)."""
    from autobatch.probe import make_plan

    name, length, budget, gpu_max = GPU_MAX_16GIB
    model, data = workload(root, name, length)
    started = time.perf_counter()
    plan = make_plan(config_for(model, data, length, budget, find_max=True))
    found = plan.max_fitting_micro_batch_size
    return {"workload": name, "max_length": length, "budget": budget, "gpu_max": gpu_max, "estimate_max": found,
            "ratio": found / gpu_max, "trials": [t.micro_batch_size for t in plan.trials],
            "seconds": time.perf_counter() - started, "assumed": plan.assumed}


#: (label, model config or a PUBLISHED_SHAPES name, extra keys) planned for an 80 GB card at micro 4, 2048 tokens
BIG = [
    ("Llama-2-7B shape, bf16 weights + LoRA r 16", {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096},
     {"use_peft": True, "lora_r": 16, "dtype": "bfloat16"}),
    ("TinyLlama-1.1B shape, full fine-tune", "tinyllama-1.1b", {}),
]


def big_rows(root: Path) -> list[str]:
    """Models far larger than this machine's RAM, estimated for an 80 GB card: the seconds each takes here."""
    from transformers import AutoConfig

    from autobatch.builtin import save_model_shape, save_tokenizer
    from autobatch.probe import make_plan

    lines = []
    for i, (label, shape, extra) in enumerate(BIG):
        model = root / f"big{i}"
        if isinstance(shape, str):
            save_model_shape(model, shape)
        else:
            save_tokenizer(model)
            AutoConfig.for_model("llama", **shape).save_pretrained(model)
        started = time.perf_counter()
        plan = make_plan(config_for(str(model), None, 2048, 80 * 10**9, per_device_train_batch_size=4, **extra))
        lines.append(f"{label}: micro 4 @2048 on 80 GB: peak {plan.peak_memory_bytes:,} ({plan.precision}), "
                     f"{time.perf_counter() - started:.1f} s here")
        log(lines[-1])
    return lines


def table(rows: list[dict], best: dict | None) -> str:
    lines = ["| workload | micro | GPU reserved (allocated) | estimate (allocated) | estimate / GPU | s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} @{r['max_length']} | {r['micro']} | {r['gpu_reserved']:,} "
                     f"({r['gpu_allocated']:,}) | {r['estimate']:,} ({r['estimate_allocated']:,}) | "
                     f"{100 * (r['ratio'] - 1):+.2f}% | {r['seconds']:.0f} |")
    if best:
        lines += ["", (f"largest micro-batch at {best['budget'] / GiB:g} GiB, {best['workload']} @{best['max_length']}: "
                       f"GPU ~{best['gpu_max']}, estimate {best['estimate_max']} ({100 * (best['ratio'] - 1):+.2f}%; "
                       f"trials {best['trials']}, {best['seconds']:.0f} s)")]
    for (name, length, micro), reserved in PLAIN_TRL.items():
        lines.append(f"plain TRL on the card, {name} @{length} micro {micro} (no padded example): {reserved:,}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first row only, no max search (CI)")
    parser.add_argument("--big", action="store_true", help="only the bigger-than-the-machine estimates, timed")
    parser.add_argument("--json", action="store_true", help="rows as JSON on stdout instead of the table")
    options = parser.parse_args()
    if options.big:
        with tempfile.TemporaryDirectory(prefix="autobatch-est-") as tmp:
            print("\n".join(big_rows(Path(tmp))))
        return 0
    with tempfile.TemporaryDirectory(prefix="autobatch-est-") as tmp:
        rows = estimate_rows(GPU_ROWS[:1] if options.quick else GPU_ROWS, Path(tmp))
        best = None if options.quick else estimate_max(Path(tmp))
    print(json.dumps({"rows": rows, "max": best}, indent=1) if options.json else table(rows, best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
