"""Throughput a user believes: the seed's hand-set 4 × 8 against autobatch's plan, same job, same data.

Why: the number users come for is samples/s at the effective batch they asked for. On the H200 the tutorial's job
(opt-350m's shape, imdb-like lengths, effective batch 32) trained by plain TRL ran 25.7 samples/s at 4 × 8 and
174.4 at autobatch's 32 × 1 (issue 22). This script repeats that comparison, with and without the checkpointing
choice (TRL turns activation checkpointing on by default; autobatch measures the planned micro-batch without it
and takes it off where it fits and is faster).

Each case trains in a fresh process with plain `SFTTrainer` (no autobatch code in the step), only the batch and
checkpointing set from the case. Step times are synchronised on cuda; the first WARMUP_STEPS optimizer steps are
dropped (optimizer state, allocator growth, lazy kernels) and the median of the rest is the step time.
samples/s = effective batch / step time; tokens/s = samples/s × mean tokens an example (after truncation) of the
data; on cuda, model FLOP utilisation = 6 × parameters × tokens/s / the card's peak bf16 FLOP/s (no recompute
counted: checkpointing's extra forward is cost, not useful work).

    python benchmarks/throughput.py --quick              # cpu, tiny Llama, a minute or two (CI runs it)
    python benchmarks/throughput.py --device cuda        # opt-350m's shape at 512 tokens, effective batch 32
    python benchmarks/throughput.py --quick --json       # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

SEED_BATCH = (4, 8)  # the seed config's per_device_train_batch_size × gradient_accumulation_steps
WARMUP_STEPS = 2
#: device -> job: model (a published shape or tiny-Llama overrides), max_length, optimizer steps a case trains
JOBS = {
    "cpu": {"model": {"hidden_size": 64, "num_hidden_layers": 2}, "max_length": 128, "steps": 6},
    "cuda": {"model": "opt-350m", "max_length": 512, "steps": 20},
}
#: Peak dense bf16 FLOP/s by card name (vendor data sheets), for model FLOP utilisation.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def write_imdb_like(path: Path, rows: int, seed: int = 0) -> Path:
    """Texts whose token counts (the byte tokenizer: a token a character) follow imdb's review lengths: a
    log-normal around 230 tokens with a long tail, so some truncate at max_length and most batches are padded."""
    rng = random.Random(seed)
    words = ["the", "film", "was", "not", "as", "good", "as", "its", "trailer", "and", "the", "cast", "knew", "it"]
    with path.open("w") as f:
        for i in range(rows):
            length = min(4000, max(20, int(rng.lognormvariate(math.log(230), 0.75))))
            text = " ".join(words[(i + j) % len(words)] for j in range(length))[:length]
            f.write(json.dumps({"text": text}) + "\n")
    return path


def make_model(root: Path, spec) -> Path:
    """A model directory with random weights: a published shape (`autobatch.builtin.PUBLISHED_SHAPES`) or a
    tiny Llama with `spec` as config overrides; the byte tokenizer either way."""
    from autobatch.builtin import PUBLISHED_SHAPES, save_tiny_model, save_tokenizer

    if isinstance(spec, dict):
        return save_tiny_model(root / "model", "llama", **spec)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, sizes = PUBLISHED_SHAPES[spec]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **sizes)).save_pretrained(root / "model")
    save_tokenizer(root / "model")
    return root / "model"


def train_case(case: dict) -> dict:
    """One case in this process: plain SFTTrainer for `steps` optimizer steps; each step's seconds."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = case["device"] == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(case["model"])
    tokenizer = AutoTokenizer.from_pretrained(case["model"])
    data = load_dataset("json", data_files=case["data"], split="train")
    root = tempfile.mkdtemp(prefix="throughput-")
    args = SFTConfig(
        output_dir=root, per_device_train_batch_size=case["micro"], gradient_accumulation_steps=case["accumulation"],
        max_steps=case["steps"], max_length=case["max_length"], bf16=cuda, use_cpu=not cuda,
        activation_checkpointing=case["checkpointing"], save_strategy="no", report_to="none",
        logging_strategy="no", disable_tqdm=True, seed=0,
    )
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync()
            self.started = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync()
            times.append(time.perf_counter() - self.started)

    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[Clock()])
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    trainer.train()
    return {"step_s": times, "parameters": sum(p.numel() for p in model.parameters()),
            "tokens_per_example": sum(lengths) / len(lengths)}


def run_case(case: dict, timeout_s: float) -> dict:
    """`train_case` in a fresh process: each case starts from empty memory, as a user's run does."""
    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    if proc.returncode:
        raise RuntimeError(f"case {case['name']} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def figures(case: dict, measured: dict, peak_flops: float | None) -> dict:
    """samples/s, tokens/s (and MFU) from the steady steps of one case."""
    steady = measured["step_s"][WARMUP_STEPS:] or measured["step_s"]
    step_s = statistics.median(steady)
    effective = case["micro"] * case["accumulation"]
    samples = effective / step_s
    tokens = samples * measured["tokens_per_example"]
    row = {**{k: case[k] for k in ("name", "micro", "accumulation", "checkpointing")},
           "effective_batch_size": effective, "step_s": step_s, "steps_timed": len(steady),
           "samples_per_s": samples, "tokens_per_s": tokens, "parameters": measured["parameters"]}
    row["mfu"] = 6 * measured["parameters"] * tokens / peak_flops if peak_flops else None
    return row


def plan_batch(model: Path, data: Path, job: dict, device: str, checkpointing: bool | None, budget: str | None):
    """autobatch's plan for effective batch 32 (`checkpointing` None: autobatch chooses; else kept as given).

    With TRL's default in force the micro-batch is searched with checkpointing on and the choice is made at the
    planned micro-batch, so one plan gives both the batch with the default kept and the choice."""
    from autobatch import api

    values = {"model_name_or_path": str(model), "dataset_name": str(data), "max_length": job["max_length"],
              "device": device, "effective_batch_size": SEED_BATCH[0] * SEED_BATCH[1], "no_cache": True,
              "bf16": device == "cuda"}
    if checkpointing is not None:
        values["gradient_checkpointing"] = checkpointing
    if budget:
        values["memory_budget"] = budget
    return api.plan(api.load(**values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(JOBS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="cpu: the tiny job, fewer steps (CI)")
    parser.add_argument("--steps", type=int, help="optimizer steps a case trains (default: the job's)")
    parser.add_argument("--memory-budget", help="the plan's budget (default: free GPU memory / available RAM)")
    parser.add_argument("--peak-tflops", type=float, help="the card's peak bf16 TFLOP/s for MFU (default: by name)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a case may take")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: train one case, print its JSON
    options = parser.parse_args()
    if options.case:
        print(json.dumps(train_case(json.loads(options.case))))
        return 0
    job = dict(JOBS[options.device])
    if options.quick:
        job["steps"] = 4 if options.device == "cpu" else 10
        if options.device == "cpu":
            job["max_length"] = 64
    job["steps"] = options.steps or job["steps"]
    peak_flops = None
    card = "cpu"
    if options.device == "cuda":
        import torch

        card = torch.cuda.get_device_name()
        peak_flops = options.peak_tflops * 1e12 if options.peak_tflops else next(
            (v for k, v in PEAK_FLOPS.items() if k in card), None)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        root = Path(tmp)
        model = make_model(root, job["model"])
        effective = SEED_BATCH[0] * SEED_BATCH[1]
        data = write_imdb_like(root / "imdb-like.jsonl", effective * (job["steps"] + 1))
        log("planning (autobatch chooses checkpointing) …")
        plan = plan_batch(model, data, job, options.device, None, options.memory_budget)
        choice = plan.checkpointing  # the batch was searched with TRL's default (on); the choice came after
        base = {"device": options.device, "model": str(model), "data": str(data), "max_length": job["max_length"],
                "steps": job["steps"]}
        planned = (plan.per_device_train_batch_size, plan.gradient_accumulation_steps)
        cases = []
        for label, (micro, accumulation) in (("seed", SEED_BATCH), ("plan", planned)):
            for checkpointing, why in ((True, "TRL default"), (choice.activation_checkpointing, "autobatch's choice")):
                if checkpointing and why != "TRL default":
                    continue  # the choice kept it on: the same run as TRL's default
                cases.append({**base, "name": f"{label} {micro} × {accumulation}, checkpointing "
                                              f"{'on' if checkpointing else 'off'} ({why})",
                              "micro": micro, "accumulation": accumulation, "checkpointing": checkpointing})
        rows = []
        for case in cases:
            log(f"{case['name']}: {case['steps']} optimizer steps …")
            rows.append(figures(case, run_case(case, options.timeout), peak_flops))
    seed = rows[0]["samples_per_s"]
    for row in rows:
        row["vs_seed"] = row["samples_per_s"] / seed
    result = {"device": options.device, "card": card, "quick": options.quick, "job": {
        "model": job["model"], "max_length": job["max_length"], "effective_batch_size": effective,
        "steps": job["steps"], "warmup_steps": WARMUP_STEPS}, "peak_flops": peak_flops,
        "checkpointing_choice": {"activation_checkpointing": choice.activation_checkpointing,
                                 "reason": choice.reason, "seconds_per_step_on": choice.seconds_per_micro_batch_on,
                                 "seconds_per_step_off": choice.seconds_per_micro_batch_off},
        "rows": rows, "wall_s": time.perf_counter() - started}
    if options.json:
        print(json.dumps(result, indent=2))
    else:
        print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    """The results as a markdown table, for benchmarks/results/."""
    job = result["job"]
    lines = [
        f"# throughput on {result['card']} ({result['device']}{', --quick' if result['quick'] else ''})", "",
        (f"model {job['model']}, max_length {job['max_length']}, imdb-like lengths, effective batch "
        f"{job['effective_batch_size']}; {job['steps']} optimizer steps a case, the first {job['warmup_steps']} "
        "dropped, median of the rest. Plain SFTTrainer in a fresh process per case."), "",
        (f"autobatch's checkpointing choice: {'on' if result['checkpointing_choice']['activation_checkpointing'] else 'off'}"
        f" ({result['checkpointing_choice']['reason']})"), "",
        "| case | step s | samples/s | tokens/s | vs seed | MFU |", "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "—"
        lines.append(f"| {r['name']} | {r['step_s']:.4f} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['vs_seed']:.2f}× | {mfu} |")
    lines += ["", (f"({result['wall_s']:.0f} s wall; on a shared cpu the seconds are noisy: the ratios are the "
              "figures that carry)")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
