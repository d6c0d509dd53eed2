"""What `--gns` costs a training step, measured two ways: with and without it (A/B), and by its own meter.

Why: `--gns` aims at an overhead of at most 1% of step time. The meter `autobatch run --gns` prints (time
in the hooks over step time) is host time: it misses a GPU's queued norm kernels and what registered hooks
cost the autograd engine. The A/B figure sees all of it: one run turns the gns callback on for one
optimizer step in three (its hooks registered between steps, outside the timed window) and leaves them
registered but idle on the next, as `--gns-every N` does on the steps it skips; each is compared with the
step without hooks in the same cycle, so drift on a shared machine hits both sides of every ratio.
The cost is one read of every gradient per micro-batch (plus a kernel launch a tensor) while the step's work
is parameters × tokens, so the share falls as the tokens per micro-batch grow: roughly 4·FLOP/s ÷ (6·tokens ·
bytes/s) for fp32 gradients, about 1% at 8k tokens on an H100 reaching 450 TFLOP/s, half that at 16k. Where
that is too much, `--gns-every N` measures one step in N; the "idle" column is what the other steps cost.

    python benchmarks/gns_overhead.py                 # cpu, three sizes, a few minutes on 2 cores
    python benchmarks/gns_overhead.py --quick         # cpu, the built-in size only (CI runs this)
    python benchmarks/gns_overhead.py --device cuda   # one GPU, ~150M and ~0.8B-parameter Llamas
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore")

from gpu_check import write_long_texts  # a sibling script: benchmarks/ is sys.path[0]

#: device -> [(label, model config overrides, max_length, micro-batch)]
SIZES = {
    "cpu": [
        ("built-in (hidden 64, 2 layers)", {}, 256, 4),
        ("hidden 256, 4 layers", {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4}, 256, 4),
        ("hidden 512, 4 layers", {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
                                  "num_attention_heads": 8, "num_key_value_heads": 8}, 256, 4),
    ],
    "cuda": [
        ("hidden 1024, 12 layers", {"hidden_size": 1024, "intermediate_size": 2752, "num_hidden_layers": 12,
                                    "num_attention_heads": 16, "num_key_value_heads": 16}, 1024, 8),
        ("hidden 2048, 16 layers", {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 16,
                                    "num_attention_heads": 16, "num_key_value_heads": 16}, 2048, 4),
    ],
}
ACCUMULATION = 2  # the smallest that gives a small/big pair on one device
WARMUP = 2  # steps dropped from each run's timings (allocator and kernel warm-up)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


OFF, ON, IDLE = "off", "on", "idle"
CYCLE = (OFF, ON, IDLE)


def cycling_gns():
    """A TrainerCallback that times every optimizer step (synchronised on cuda, so queued kernels count) and
    cycles the gns callback through three states, a step each: off (no hooks), on (measuring), idle (hooks
    registered, step not measured: what `--gns-every N` costs on the N - 1 other steps)."""
    import torch
    from transformers import TrainerCallback

    from autobatch.gns import gns_callback

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class Cycling(TrainerCallback):
        def __init__(self) -> None:
            self.gns = gns_callback()
            self.seconds: list[tuple[str, float]] = []  # (state, wall seconds) of every step
            self.parameters = 0

        def attach(self, trainer):
            self.trainer = trainer
            self.parameters = sum(p.numel() for p in trainer.model.parameters())
            return self

        def phase(self) -> str:
            return CYCLE[len(self.seconds) % len(CYCLE)]

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self._started = time.perf_counter()
            if self.phase() == ON:
                self.gns.on_step_begin(args, state, control, **kwargs)
            elif self.phase() == IDLE:
                self.gns.active = False

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if self.phase() != OFF:
                self.gns.on_pre_optimizer_step(args, state, control, **kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            now = self.phase()
            self.seconds.append((now, time.perf_counter() - self._started))
            if now == OFF:  # hooks come and go between steps, outside the timed window
                self.gns.attach(self.trainer)
            elif now == ON:
                self.gns.on_step_end(args, state, control, **kwargs)
            else:
                self.gns.detach()

    return Cycling()


def _median_and_quartiles(ratios: list[float]) -> tuple[float, list[float]]:
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return q[1] - 1, [q[0] - 1, q[2] - 1]


def measure(label: str, overrides: dict, max_length: int, micro: int, device: str, cycles: int, root: Path) -> dict:
    """One run of 3 × (WARMUP + cycles) steps, off / on / idle in turn: the medians of on/off and idle/off
    step-time ratios within each cycle (with quartiles: the noise), beside the in-run meter of the on steps."""
    from autobatch import api
    from autobatch.builtin import save_tiny_model

    model = save_tiny_model(root / "model", "llama", max_position_embeddings=max(2048, max_length), **overrides)
    config = api.load(
        model_name_or_path=str(model), dataset_name=str(write_long_texts(root / "long.jsonl", max_length, 256)),
        max_length=max_length, device=device, per_device_train_batch_size=micro,
        gradient_accumulation_steps=ACCUMULATION, effective_batch_size=micro * ACCUMULATION,
        max_steps=len(CYCLE) * (WARMUP + cycles), learning_rate=1e-4, logging_steps=1000, no_cache=True, seed=0,
        gradient_checkpointing=False, bf16=device == "cuda", output_dir=str(root / "out"), save_strategy="no",
    )
    timer = cycling_gns()
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its metrics: stdout stays the report
        api.run(config, plan=api.plan(config), callbacks=[timer])
    steps = timer.seconds[len(CYCLE) * WARMUP:]
    triples = [dict(steps[i:i + 3]) for i in range(0, len(steps) - 2, 3)]
    report = timer.gns.report(resamples=10)
    on, on_q = _median_and_quartiles([t[ON] / t[OFF] for t in triples])
    idle, idle_q = _median_and_quartiles([t[IDLE] / t[OFF] for t in triples])
    return {"size": label, "parameters": timer.parameters, "tokens_per_micro_batch": micro * max_length,
            "step_s_without": statistics.median(t[OFF] for t in triples),
            "step_s_with": statistics.median(t[ON] for t in triples),
            "ab_overhead": on, "ab_quartiles": on_q, "idle_overhead": idle, "idle_quartiles": idle_q,
            "meter_overhead": report["overhead"], "measured_steps": report["steps"], "cycles": len(triples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the first size only, fewer steps")
    parser.add_argument("--cycles", type=int, default=None,
                        help="timed off/on/idle step cycles a size (default 30, --quick 6)")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    args = parser.parse_args()
    sizes = SIZES[args.device][:1] if args.quick else SIZES[args.device]
    cycles = args.cycles or (6 if args.quick else 30)
    rows = []
    for label, overrides, max_length, micro in sizes:
        log(f"{label}: micro {micro} x accumulation {ACCUMULATION} at {max_length} tokens, {cycles} step cycles")
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="gns-overhead-") as root:
            rows.append(measure(label, overrides, max_length, micro, args.device, cycles, Path(root)))
        log(f"  {time.perf_counter() - started:.0f} s")
    if args.json:
        print(json.dumps({"device": args.device, "rows": rows}, indent=2))
        return 0
    print(f"gns overhead on {args.device}: step time over the step without hooks in the same cycle (median, "
          "quartiles = noise); on = measured step, idle = hooks registered, step not measured; meter = in-run figure")
    print(f"{'size':32} {'params':>8} {'tok/micro':>9} {'step s':>8} {'on':>6} {'quartiles':>16} {'idle':>6} "
          f"{'meter':>6} {'every 4':>7}")
    for r in rows:
        low, high = r["ab_quartiles"]
        every4 = (r["ab_overhead"] + 3 * r["idle_overhead"]) / 4
        print(f"{r['size']:32} {r['parameters'] / 1e6:7.2f}M {r['tokens_per_micro_batch']:9d} "
              f"{r['step_s_without']:8.4f} {r['ab_overhead']:6.1%} {f'{low:.1%} to {high:.1%}':>16} "
              f"{r['idle_overhead']:6.1%} {r['meter_overhead']:6.1%} {every4:7.1%}")
    print("every 4 = (on + 3 × idle) / 4: what `autobatch run --gns-every 4` costs a step on average")
    return 0


if __name__ == "__main__":
    sys.exit(main())
