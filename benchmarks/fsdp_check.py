"""FSDP planned sharded: the figures issue 21 asks for, printed (tests check the same relations, untimed).

1. `--device estimate --nproc-per-node 8` on Llama-2-7B's shape (config only, no weights): one rank of
   an 8-rank FSDP2 job traced on a fake process group; its per-rank peak beside a hand calculation
   (16 bytes a parameter of sharded weights, gradients and AdamW moments over 8 ranks, plus FSDP2's
   unsharded layer, its gradient and the embedding and head units) and the wall time of the plan.
2. On a tiny Llama, micro-batch 1, 2, 4: the traced rank counted like a real one (cpu live bytes, cpu kernels)
   beside the real 2-rank cpu trial groups (gloo); and the estimate as planned (the card emulated: allocator
   blocks, cuBLAS workspaces, cuda kernels), which is not like for like with cpu.
3. A trial group where rank 1 alone runs out of memory: how long until both ranks are ended.

    python benchmarks/fsdp_check.py [--skip-7b]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autobatch import estimate, memory
from autobatch.builtin import save_model_shape, save_tiny_model
from autobatch.config import build_config
from autobatch.probe import make_plan
from autobatch.trial import GroupProber

FSDP = {"fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_version": 2}}


def config(model, **overrides):
    return build_config(overrides={"model_name_or_path": str(model), "headroom": 0, "max_length": 64,
                                   "gradient_checkpointing": False, "no_cache": True, **FSDP, **overrides})


@contextlib.contextmanager
def counted_as_cpu():
    """The estimate's trace counted as the cpu backend counts a real rank, on cpu kernels (as the test does)."""
    saved = memory.EstimateBackend.measure, estimate.cuda_step
    memory.EstimateBackend.measure, estimate.cuda_step = memory.CpuBackend.measure, contextlib.nullcontext
    try:
        yield
    finally:
        memory.EstimateBackend.measure, estimate.cuda_step = saved


def hand_7b(world: int) -> tuple[int, int, int]:
    vocab, hidden, intermediate, layers = 32000, 4096, 11008, 32
    layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    embeddings = 2 * vocab * hidden
    parameters = layers * layer + embeddings + hidden
    sharded = 16 * parameters // world
    return parameters, sharded, sharded + 2 * 4 * layer + 4 * embeddings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-7b", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fsdp-check-"))
    if not args.skip_7b:
        model = save_model_shape(tmp / "llama-2-7b", "llama-2-7b")
        started = time.perf_counter()
        plan = make_plan(config(model, device="estimate", memory_budget="80GB", nproc_per_node=8,
                                per_device_train_batch_size=1))
        seconds = time.perf_counter() - started
        parameters, sharded, hand = hand_7b(8)
        print(f"7B on 8 ranks (estimate, micro 1, 64 tokens): peak {plan.peak_memory_bytes:,} B; hand {hand:,} B "
              f"(ratio {plan.peak_memory_bytes / hand:.4f}); sharded state alone 16P/N {sharded:,} B; "
              f"P {parameters:,}; plan {seconds:.1f} s")
    tiny = save_tiny_model(tmp / "tiny", "llama")
    for micro in (1, 2, 4):
        card = make_plan(config(tiny, device="estimate", memory_budget="1GiB", nproc_per_node=2,
                                per_device_train_batch_size=micro, bf16=False))
        with counted_as_cpu():
            traced = make_plan(config(tiny, device="estimate", memory_budget="1GiB", nproc_per_node=2,
                                      per_device_train_batch_size=micro, bf16=False))
        real = make_plan(config(tiny, device="cpu", memory_budget="1GiB", nproc_per_node=2,
                                per_device_train_batch_size=micro))
        print(f"tiny llama, 2 ranks, micro {micro}: traced (cpu count) {traced.peak_memory_bytes:,} B, real per rank "
              f"{real.rank_peak_bytes} (ratio {traced.peak_memory_bytes / max(real.rank_peak_bytes):.4f}); "
              f"estimate for the card {card.peak_memory_bytes:,} B reserved")
    prober = GroupProber(config(tiny, device="cpu", nproc_per_node=2), "cpu", [10**9, 12 * 10**6],
                         [10**9, 12 * 10**6], None, timeout_s=300)
    started = time.perf_counter()
    trial = prober.run_trial(2)
    print(f"rank 1 at 12 MB, micro 2: oom={trial.oom} per-rank {trial.rank_peak_bytes}; trial ended on both ranks "
          f"after {time.perf_counter() - started:.1f} s (launch, load, OOM, the other rank ended); "
          f"{prober.failures[-1]}")


if __name__ == "__main__":
    main()
