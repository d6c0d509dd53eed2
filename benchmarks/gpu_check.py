"""A GPU check that does not trust autobatch's own meter. Under 5 minutes on one GPU.

What it checks (each in fresh processes, so nothing leaks from one check into the next):
1. plan: `autobatch plan` of a ~100M-parameter Llama built from a config (random weights, nothing
   downloaded) on long local texts, under a budget far below the card's capacity, while `nvidia-smi` is
   sampled: the probe's footprint as the driver sees it must stay within budget + the CUDA context.
2. trl-alone: plain TRL `SFTTrainer.train()` (no autobatch code in the step), each size in a fresh process, with
   the allocator capped at the plan's usable budget (`set_per_process_memory_fraction`), on a dataset of more
   than twice max + 1 rows (every step a full batch): the planned max trains, max + 1 runs out of memory.
   Then: the plan's reported peak at the planned size against plain TRL's fresh peak there (within 1%, safe side).
3. shared: a plan with the default budget while another process holds a big block of the card.
4. expandable: a plan with `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`.
5. fallback: `autobatch run` where a ballast tensor is allocated at step 2, sized from the allocator's room
   under the cap at that moment, so a real OOM happens mid-run: passes only if the fallback split step 2 and
   the run finished.
6. sweep: `autobatch sweep --validate-tokens` over B = max and 2·max: every rung exact and fitting, real
   validation runs on the card, a gradient noise scale measured in them (the hooks and accelerate's norm).
7. gns overhead: `benchmarks/gns_overhead.py` (A/B step times, every other step with `--gns`) on ~150M and
   ~0.8B-parameter Llamas: the aim, at most 1% of step time, on the larger.
8. fsdp: FSDP2 with one rank (`fsdp: full_shard auto_wrap`, `fsdp_version: 2`): planned, then trained at the
   planned size by `torchrun --nproc_per_node 1 -m autobatch run --plan plan.yaml`, peak within the usable budget.
It writes `gpu_check-<card>-<date>.json` and `.md` (a table) into --out (default benchmarks/results/).

With `--device cpu` it runs the same plumbing at tiny sizes on autobatch's cpu virtual device (the
"TRL alone" check then caps with that device's counter, the only cap a CPU has; 3, 4 and 7 are skipped):
CI covers that, so the script never rots. No GPU was at hand when it was written: run it on one and
commit the output under benchmarks/results/.

    python benchmarks/gpu_check.py                   # cuda, one GPU, ~100M Llama
    python benchmarks/gpu_check.py --device cpu      # tiny, ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MiB = 2**20
HERE = Path(__file__).resolve().parent
SIZES = {  # device -> model config overrides, max_length, budget
    "cuda": ({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_key_value_heads": 12, "max_position_embeddings": 2048}, 1024, 6 * 2**30),
    "cpu": ({}, 64, 64 * MiB),
}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def autobatch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "autobatch", *args]


def write_long_texts(path: Path, max_length: int, rows: int) -> Path:
    """A jsonl of texts longer than max_length tokens: every one truncates, so every batch is the worst case."""
    words = ["the", "river", "ran", "low", "that", "summer", "and", "the", "stones", "of", "the", "old", "ford"]
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(max_length * 2))}) + "\n")
    return path


def make_workload(root: Path, device: str) -> tuple[Path, Path]:
    """The model (random weights from a config) and a jsonl of texts longer than max_length tokens."""
    from autobatch.builtin import save_tiny_model

    overrides, max_length, _ = SIZES[device]
    model = save_tiny_model(root / "model", "llama", **overrides)
    return model, write_long_texts(root / "long.jsonl", max_length, 64)


class SmiSampler:
    """Samples `nvidia-smi` every 0.2 s: the most memory the driver ever showed for one pid."""

    def __init__(self) -> None:
        self.peak_mib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                check=False, capture_output=True, text=True,
            ).stdout
            for line in out.strip().splitlines():
                pid, used = (int(x) for x in line.split(","))
                self.peak_mib[pid] = max(self.peak_mib.get(pid, 0), used)
            self._stop.wait(0.2)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()


def run_json(cmd: list[str], env: dict | None = None, sampler: SmiSampler | None = None) -> tuple[int, dict, int]:
    """Run a command that prints one JSON object last; (exit code, the object or {}, driver peak MiB of the
    process that showed the most: the command, or a trial worker it started)."""
    with sampler or SmiSampler() as smi:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})})
        out, err = proc.communicate(timeout=600)
    if proc.returncode:
        log(err[-2000:])
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else {}), max(smi.peak_mib.values(), default=0)


def plan_args(model: Path, data: Path, device: str, max_length: int, budget: int | None) -> list[str]:
    args = ["plan", "--model", str(model), "--dataset", str(data), "--device", device, "--max-length",
            str(max_length), "--json", "--max-micro-batch-size", "256"]
    return args + (["--memory-budget", str(budget)] if budget else [])


def context_mib(device: str) -> int:
    """What the driver shows for a process that only created its CUDA context (outside any budget)."""
    if device != "cuda":
        return 0
    code = "import torch, time; torch.zeros(1, device='cuda'); torch.cuda.synchronize(); time.sleep(2)"
    with SmiSampler() as smi:
        proc = subprocess.Popen([sys.executable, "-c", code])
        proc.wait(timeout=120)
    return smi.peak_mib.get(proc.pid, 0)


# ---------------------------------------------------------------------------------------------- workers


def worker_train(model: str, data: str, device: str, micro: int, max_length: int, usable: int) -> dict:
    """Plain TRL at `micro` for 3 steps with the allocator capped at `usable`, in this fresh process:
    {"micro", "fits", "peak_bytes"} (peak reserved on cuda, the virtual device's live bytes on cpu)."""
    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=micro, max_steps=3,
                     max_length=max_length, save_strategy="no", report_to="none", logging_strategy="no",
                     use_cpu=device != "cuda", bf16=device == "cuda", disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=data, split="train"))
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(usable / torch.cuda.mem_get_info()[1])
        cap = contextlib.nullcontext()
    else:  # a CPU has no allocator cap: autobatch's virtual device is the only one there is
        from autobatch.memory import CpuBackend

        cap = CpuBackend(usable).measure()
    try:
        with cap as measured:
            trainer.train()
    except torch.OutOfMemoryError:
        return {"micro": micro, "fits": False}
    peak = torch.cuda.max_memory_reserved() if device == "cuda" else measured.peak_bytes
    return {"micro": micro, "fits": True, "peak_bytes": peak}


def worker_fallback(model: str, data: str, device: str, max_length: int, plan_file: str) -> dict:
    """`autobatch run` (library calls) of check 1's plan with a ballast tensor allocated at step 2: a real
    OOM mid-run."""
    import torch
    from transformers import TrainerCallback

    from autobatch import train
    from autobatch.config import build_config
    from autobatch.planner import Plan

    plan = Plan.from_dict(json.loads(Path(plan_file).read_text()))
    config = build_config(overrides={
        "model_name_or_path": model, "dataset_name": data, "device": device,
        "memory_budget": plan.memory_budget_bytes, "max_length": max_length, "max_steps": 4,
        "output_dir": tempfile.mkdtemp(), "save_strategy": "no",
    })
    held: list = []
    sizing: dict = {}

    class Ballast(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2 and not held:
                sizing.update(ballast_sizing(device))
                held.append(torch.empty(max(sizing["ballast"], MiB), dtype=torch.uint8,
                                        device="cuda" if device == "cuda" else "cpu"))

    result = train.run(config, plan, callbacks=[Ballast()])
    return {"planned_micro": plan.per_device_train_batch_size, "global_step": result.global_step,
            "fallbacks": [vars(f) for f in result.fallbacks], "ballast_bytes": held[0].nbytes if held else 0,
            **sizing}


def ballast_sizing(device: str) -> dict:
    """How much to hold at step 2 so the planned micro-batch cannot fit but a split of it can.

    Sized from the allocator at that moment: `room` is what it may still reserve under the cap (its cached
    blocks given back first, so the ballast takes fresh memory), `need` what step 1 at the planned size
    took on top of what is live between steps. Holding room - 2/3 need leaves two thirds of a step: the
    full step runs out, a step split in two or three fits (the split step's gradients are the same size).
    """
    import torch

    if device == "cuda":
        step_peak = torch.cuda.max_memory_reserved()  # step 1 at the planned micro-batch (and the load before)
        torch.cuda.empty_cache()
        now = torch.cuda.memory_reserved()
        cap = int(torch.cuda.get_per_process_memory_fraction() * torch.cuda.mem_get_info()[1])
    else:  # the cpu virtual device: its counter is the allocator and its budget the cap
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        mode = _get_current_dispatch_mode()
        step_peak, now, cap = mode.peak_bytes, mode.live_bytes, mode.budget_bytes
    room, need = cap - now, step_peak - now
    return {"room": room, "need": need, "ballast": room - need * 2 // 3}


# ---------------------------------------------------------------------------------------------- checks


def check(device: str, root: Path) -> list[dict]:
    _, max_length, budget = SIZES[device]
    model, data = make_workload(root, device)
    rows: list[dict] = []
    context = context_mib(device)

    code, plan, smi_peak = run_json(autobatch_cmd(*plan_args(model, data, device, max_length, budget)))
    ok = code == 0 and plan.get("fits", False)
    footprint_ok = device != "cuda" or smi_peak * MiB <= budget + (context + 64) * MiB
    rows.append({"check": "plan under a budget far below capacity", "passed": ok and footprint_ok,
                 "detail": f"max micro {plan.get('max_micro_batch_size')}, peak {plan.get('peak_memory_bytes')} B "
                           f"of budget {budget} B; nvidia-smi peak {smi_peak} MiB, context {context} MiB",
                 "plan": plan})
    if not ok:
        return rows
    best, usable = plan["max_micro_batch_size"], plan["usable_memory_bytes"]
    # Every step a full batch: with fewer rows than the batch, max and max + 1 would both train on all of them.
    big = write_long_texts(root / "long-big.jsonl", max_length, 5 * (best + 2))
    data_rows = sum(1 for _ in big.open())
    outcomes = {}
    for micro in (best, best + 1):
        _, outcomes[micro], _ = run_json([sys.executable, __file__, "--worker", "train", "--device", device, "--model",
                                          str(model), "--data", str(big), "--micro", str(micro), "--max-length",
                                          str(max_length), "--budget", str(usable)])
    fits = {micro: out.get("fits") for micro, out in outcomes.items()}
    rows.append({"check": "TRL alone, allocator capped: max trains, max + 1 OOMs",
                 "passed": fits[best] is True and fits[best + 1] is False and data_rows > 2 * (best + 1),
                 "detail": f"micro {best}: {'trains' if fits[best] else 'OOM'}; micro {best + 1}: "
                           f"{'trains' if fits[best + 1] else 'OOM'}; {data_rows} rows"})
    rows.append(check_reported_peak(plan, outcomes[best]))

    if device == "cuda":
        import torch

        total = torch.cuda.mem_get_info()[1]
        hold = "import torch, time; x = torch.empty(int(%d), dtype=torch.uint8, device='cuda'); time.sleep(600)"
        holder = subprocess.Popen([sys.executable, "-c", hold % (total // 3)])
        try:
            time.sleep(15)
            code, shared, _ = run_json(autobatch_cmd(*plan_args(model, data, device, max_length, None)))
        finally:
            holder.kill()
        rows.append({"check": "default budget while another process holds a third of the card",
                     "passed": code == 0 and shared.get("memory_budget_bytes", total) < total * 0.7,
                     "detail": f"budget {shared.get('memory_budget_bytes')} B of {total} B, "
                               f"max micro {shared.get('max_micro_batch_size')}"})
        code, expandable, _ = run_json(autobatch_cmd(*plan_args(model, data, device, max_length, budget)),
                                       env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
        rows.append({"check": "plan with expandable_segments:True", "passed": code == 0,
                     "detail": f"max micro {expandable.get('max_micro_batch_size')} (plain: {best})"})
    else:
        rows.append({"check": "default budget while another process holds memory", "passed": None,
                     "detail": "skipped: cuda only"})
        rows.append({"check": "plan with expandable_segments:True", "passed": None, "detail": "skipped: cuda only"})

    plan_file = root / "plan.json"
    plan_file.write_text(json.dumps(plan))
    _, run, _ = run_json([sys.executable, __file__, "--worker", "fallback", "--device", device, "--model",
                          str(model), "--data", str(big), "--max-length", str(max_length), "--plan", str(plan_file)])
    fallbacks = run.get("fallbacks") or []
    split = bool(fallbacks) and fallbacks[0]["global_step"] == 2 \
        and fallbacks[0]["per_device_train_batch_size"] < run.get("planned_micro", 0)
    rows.append({"check": "real OOM mid-run (ballast at step 2): fallback, run finishes",
                 "passed": run.get("global_step") == 4 and split,
                 "detail": f"micro {run.get('planned_micro')}, ballast {run.get('ballast_bytes')} B (room "
                           f"{run.get('room')} B, step needs {run.get('need')} B), fallbacks {fallbacks}, "
                           f"steps {run.get('global_step')}"})
    rows.append(check_sweep(model, data, device, max_length, budget, best, root))
    rows.append(check_gns_overhead(device))
    rows.append(check_fsdp_world_size_1(model, data, device, max_length, budget, root))
    return rows


def check_reported_peak(plan: dict, trl: dict) -> dict:
    """The plan's reported peak at the planned size against plain TRL's in a fresh process at that size:
    within 1%, on the safe side (the plan not lower)."""
    reported, measured = plan.get("peak_memory_bytes"), trl.get("peak_bytes")
    name = "plan's peak vs plain TRL's fresh peak at the planned size: within 1%, safe side"
    if not (reported and measured):
        return {"check": name, "passed": False, "detail": f"plan {reported} B, TRL {measured} B (TRL did not train?)"}
    gap = (reported - measured) / measured
    return {"check": name, "passed": 0 <= gap <= 0.01,
            "detail": f"micro {plan['per_device_train_batch_size']}: plan {reported} B "
                      f"({plan.get('trial_process')} process), TRL {measured} B, {gap:+.2%}"}


def check_sweep(model: Path, data: Path, device: str, max_length: int, budget: int, best: int, root: Path) -> dict:
    """Check 6: a validated sweep of two rungs on the device."""
    code, swept, _ = run_json(autobatch_cmd(
        "sweep", "--model", str(model), "--dataset", str(data), "--device", device, "--max-length", str(max_length),
        "--memory-budget", str(budget), "--max-micro-batch-size", "256", "--effective-batch-sizes",
        f"{best},{2 * best}", "--validate-tokens", str(16 * best * max_length), "--output-dir", str(root / "sweep"),
        "--json"))
    plans = swept.get("plans", [])
    exact = [p["per_device_train_batch_size"] * p["gradient_accumulation_steps"] * p["world_size"]
             == p["effective_batch_size"] and p["fits"] for p in plans]
    noise = swept.get("gradient_noise_scale") or {}

    def number(key: str) -> str:
        return "?" if noise.get(key) is None else f"{noise[key]:.4g}"

    return {"check": "sweep --validate-tokens: rungs exact, runs on the device, noise scale measured",
            "passed": code == 0 and len(plans) == 2 and all(exact) and noise.get("steps", 0) > 0,
            "detail": f"rungs {[(p['per_device_train_batch_size'], p['gradient_accumulation_steps']) for p in plans]}, "
                      f"{len(swept.get('trials', []))} trials, recommended B={swept.get('recommended_effective_batch_size')}, "
                      f"B_noise {number('b_simple')} ({number('low')}–{number('high')}) over "
                      f"{noise.get('steps')} steps, overhead {number('overhead')}"}


def check_fsdp_world_size_1(model: Path, data: Path, device: str, max_length: int, budget: int, root: Path) -> dict:
    """Check 8: FSDP2 with one rank: `autobatch plan` (its trials a group of one, sharded as the run is), then
    `torchrun --nproc_per_node 1 -m autobatch run --plan plan.yaml` trains at the planned size on the device."""
    name = "FSDP, world size 1: planned, then trained at the planned size under torchrun"
    plan_file = root / "fsdp-plan.yaml"
    fsdp = ["--fsdp", "full_shard auto_wrap", "--fsdp-config", "{fsdp_version: 2}", "--no-cache"]
    code, plan, _ = run_json(autobatch_cmd(*plan_args(model, data, device, max_length, budget), *fsdp,
                                           "--output", str(plan_file)))
    if code or not plan.get("fits"):
        return {"check": name, "passed": False, "detail": f"plan exited {code}: {plan.get('notes')}"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone", "-m",
                "autobatch", "run", "--plan", str(plan_file), "--config", str(plan_file), "--device", device,
                "--max-steps", "2", "--output-dir", str(root / "fsdp-run"), "--json"]
    code, run, _ = run_json(torchrun)
    result = run.get("run", run)
    micro = plan["per_device_train_batch_size"]
    peak = result.get("peak_memory_bytes") or 0
    return {"check": name,
            "passed": code == 0 and result.get("global_step") == 2 and 0 < peak <= plan["usable_memory_bytes"],
            "detail": f"micro {micro}: plan peak {plan.get('peak_memory_bytes')} B (ranks "
                      f"{plan.get('rank_peak_bytes')}), run peak {peak} B of usable {plan['usable_memory_bytes']} B, "
                      f"steps {result.get('global_step')}"}


def check_gns_overhead(device: str) -> dict:
    """Check 7: what --gns costs a step on the GPU, measured A/B (cuda only: a cpu step is too small to say)."""
    name = "gns overhead with default settings (sampled steps, A/B) at most 1% of step time on every model"
    if device != "cuda":
        return {"check": name, "passed": None, "detail": "skipped: cuda only (benchmarks/gns_overhead.py on cpu)"}
    proc = subprocess.run([sys.executable, str(HERE / "gns_overhead.py"), "--device", "cuda", "--json"],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode:
        log(proc.stderr[-2000:])
        return {"check": name, "passed": False, "detail": f"gns_overhead.py exited {proc.returncode}"}
    rows = json.loads(proc.stdout)["rows"]
    return {"check": name, "passed": all(r["default_overhead"] <= 0.01 for r in rows),
            "detail": "; ".join(f"{r['size']}: default {r['default_overhead']:.2%} (chance "
                                f"{r['default_chance']:.1%}), measured step A/B {r['ab_overhead']:.2%} (quartiles "
                                f"{r['ab_quartiles'][0]:.2%} to "
                                f"{r['ab_quartiles'][1]:.2%}), meter {r['meter_overhead']:.2%}, step "
                                f"{r['step_s_without']:.4f} s" for r in rows)}


def card_name(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name().replace(" ", "-")


def write_results(rows: list[dict], device: str, out_dir: Path, seconds: float) -> Path:
    name = f"gpu_check-{card_name(device)}-{time.strftime('%Y-%m-%d')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"device": device, "card": card_name(device),
                                                      "seconds": seconds, "checks": rows}, indent=2))
    mark = {True: "pass", False: "FAIL", None: "skipped"}
    table = ["| check | result | detail |", "|---|---|---|"]
    table += [f"| {r['check']} | {mark[r['passed']]} | {r['detail']} |" for r in rows]
    (out_dir / f"{name}.md").write_text(f"# {name} ({seconds:.0f} s)\n\n" + "\n".join(table) + "\n")
    return out_dir / f"{name}.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--worker", choices=("train", "fallback"))
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--micro", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--budget", type=int)
    parser.add_argument("--plan")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker == "train":
        print(json.dumps(worker_train(args.model, args.data, args.device, args.micro, args.max_length, args.budget)))
        return 0
    if args.worker == "fallback":
        print(json.dumps(worker_fallback(args.model, args.data, args.device, args.max_length, args.plan)))
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as root:
        rows = check(args.device, Path(root))
    path = write_results(rows, args.device, Path(args.out), time.perf_counter() - started)
    print(path.read_text())
    return 0 if all(r["passed"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
