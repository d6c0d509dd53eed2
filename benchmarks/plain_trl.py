"""Plain TRL on a GPU, no autobatch code in the step: the figures autobatch's estimate and plan are held against.

Each job is one fresh process running `SFTTrainer.train()` for a few steps on a published model shape (random
weights from its config, `autobatch.builtin.PUBLISHED_SHAPES`) over texts that all truncate at `max_length`, with
TRL's defaults (bf16, gradient checkpointing on, the default optimizer) unless a job says otherwise. It records the
caching allocator's peak reserved and allocated bytes, its full `memory_stats()`, each step's time (synchronised),
and optionally a memory-history snapshot of the first two steps (`torch.cuda.memory._dump_snapshot`, readable at
pytorch.org/memory_viz), for calibrating the estimate's allocator emulation.

    python benchmarks/plain_trl.py --jobs default --out DIR        # the set measured on the H200 (memory only)
    python benchmarks/plain_trl.py --job opt-350m:512:8 --snapshot snap.pickle   # one job, in this process
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

#: shape:max_length:micro[:key=value,...] — memory jobs, run a few at a time (their peaks are per process).
DEFAULT_JOBS = [
    "opt-350m:512:8:snapshot=1", "opt-350m:512:64:snapshot=1", "opt-350m:512:151",
    "opt-350m:512:64:alloc=expandable_segments:True", "opt-350m:512:8:optim=adamw_torch",
    "tinyllama-1.1b:1024:4", "tinyllama-1.1b:1024:16", "qwen2-0.5b:1024:4", "qwen2-0.5b:1024:16",
]


def parse_job(text: str) -> dict:
    shape, length, micro, *rest = text.split(":", 3)
    job = {"shape": shape, "max_length": int(length), "micro": int(micro), "steps": 3, "gc": True, "bf16": True,
           "accum": 1, "optim": None, "alloc": None, "snapshot": False, "name": text}
    if rest:
        for item in rest[0].split(","):
            key, _, value = item.partition("=")
            job[key] = {"true": True, "false": False}.get(value, int(value) if value.isdigit() else value)
    return job


def write_texts(path: Path, max_length: int, rows: int) -> Path:
    words = ["the", "river", "ran", "low", "that", "summer", "and", "the", "stones", "of", "the", "old", "ford"]
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(max_length * 2))}) + "\n")
    return path


def run_job(job: dict, snapshot: str | None = None) -> dict:
    """One job in this process: build, train `steps` steps, return the allocator's figures."""
    import torch
    from datasets import load_dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from autobatch.builtin import PUBLISHED_SHAPES, save_tokenizer

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    root = Path(tempfile.mkdtemp(prefix="plain-trl-"))
    arch, sizes = PUBLISHED_SHAPES[job["shape"]]
    save_tokenizer(root / "tok")
    tokenizer = AutoTokenizer.from_pretrained(root / "tok")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **sizes))
    rows = job["micro"] * job["accum"] * (job["steps"] + 1)
    data = load_dataset("json", data_files=str(write_texts(root / "t.jsonl", job["max_length"], rows)), split="train")
    kwargs = {}
    if job["optim"]:
        kwargs["optim"] = job["optim"]
    args = SFTConfig(output_dir=str(root / "out"), per_device_train_batch_size=job["micro"],
                     gradient_accumulation_steps=job["accum"], max_steps=job["steps"], max_length=job["max_length"],
                     bf16=job["bf16"] and cuda, use_cpu=not cuda, activation_checkpointing=job["gc"], save_strategy="no", report_to="none",
                     logging_strategy="no", disable_tqdm=True, **kwargs)
    times: list[float] = []
    marks: dict = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync()
            times.append(time.perf_counter() - self.t)
            if cuda:
                marks[state.global_step] = {"reserved": torch.cuda.max_memory_reserved(),
                                            "allocated": torch.cuda.max_memory_allocated()}
            if snapshot and cuda and state.global_step == 2:
                torch.cuda.memory._dump_snapshot(snapshot)
                torch.cuda.memory._record_memory_history(enabled=None)

    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[Clock()])
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if snapshot and cuda:
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, context=None)
    result = {"job": job, "optim": args.optim, "attn": getattr(model.config, "_attn_implementation", None),
              "params": sum(p.numel() for p in model.parameters())}
    try:
        trainer.train()
        result["oom"] = False
    except torch.OutOfMemoryError as exc:
        result["oom"] = True
        result["error"] = str(exc).splitlines()[0]
    sync()
    result["step_s"], result["after_step"] = times, marks
    if cuda:
        result.update(peak_reserved=torch.cuda.max_memory_reserved(),
                      peak_allocated=torch.cuda.max_memory_allocated(), stats=torch.cuda.memory_stats())
    return result


def run_all(jobs: list[str], out: Path, parallel: int, timeout_s: float) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)

    def one(text: str) -> dict:
        job = parse_job(text)
        safe = text.replace(":", "_").replace("=", "-").replace(",", "_")
        env = {**os.environ, **({"PYTORCH_CUDA_ALLOC_CONF": job["alloc"]} if job["alloc"] else {})}
        cmd = [sys.executable, __file__, "--job", text, "--result", str(out / f"{safe}.json")]
        if job["snapshot"]:
            cmd += ["--snapshot", str(out / f"snap-{safe}.pickle")]
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout_s)
            code, err = proc.returncode, proc.stderr[-1500:]
        except subprocess.TimeoutExpired:
            code, err = "timeout", ""
        path = out / f"{safe}.json"
        row = json.loads(path.read_text()) if path.exists() else {"job": job, "failed": code, "stderr": err}
        row["wall_s"] = time.perf_counter() - started
        print(f"{text}: reserved {row.get('peak_reserved')} allocated {row.get('peak_allocated')} "
              f"oom {row.get('oom')} steps {[round(s, 4) for s in row.get('step_s', [])]} "
              f"({row['wall_s']:.0f} s){' FAILED ' + str(code) + err if 'failed' in row else ''}", flush=True)
        return row

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, jobs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", help="'default' or a comma-free list separated by ';'")
    parser.add_argument("--job")
    parser.add_argument("--result")
    parser.add_argument("--snapshot")
    parser.add_argument("--out", default=str(HERE / "results" / "plain_trl"))
    parser.add_argument("--parallel", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=240)
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if options.job:
        row = run_job(parse_job(options.job), options.snapshot)
        text = json.dumps(row, default=str)
        if options.result:
            Path(options.result).write_text(text)
        else:
            print(text)
        return 0
    jobs = DEFAULT_JOBS if options.jobs in (None, "default") else options.jobs.split(";")
    rows = run_all(jobs, Path(options.out), options.parallel, options.timeout)
    import torch

    summary = {"card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
               "versions": {p: __import__(p).__version__ for p in ("transformers", "trl", "accelerate")},
               "rows": rows}
    Path(options.out, "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
