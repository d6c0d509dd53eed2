"""The classic TRL script (imdb, OPT, 4 × 8), with the two lines autobatch adds.

The classic (TRL's README):

    dataset = load_dataset("stanfordnlp/imdb", split="train")
    args = SFTConfig(max_length=512, output_dir="/tmp", per_device_train_batch_size=4, gradient_accumulation_steps=8)
    trainer = SFTTrainer("facebook/opt-350m", train_dataset=dataset, args=args)
    trainer.train()

Here it runs offline on a tiny OPT built from a config and a local imdb-shaped jsonl, with what real
scripts add and no YAML can express: a custom data collator and a TrainerCallback. autobatch plans the
trainer itself under a memory budget, keeps its effective batch (4 × 8 = 32), and the plan is applied:

    plan = autobatch.plan_trainer(trainer, memory_budget=BUDGET)   # added line 1
    plan.apply(trainer)                                            # added line 2

On a GPU the budget is the card (leave memory_budget out). On CPU, autobatch's cpu backend is a virtual
device with that budget, and this script also enforces it during the run to show that the plan fits.

    python examples/classic_sft.py [--memory-budget 60MiB] [--max-steps 2]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

EVENTS: list[tuple[str, int]] = []  # (event, micro-batch) as the callback saw it, in trials and in the run


class PadAndMask:
    """A custom collator: right-pads input_ids, masks the padding out of the loss; counts its batch sizes."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id
        self.batch_sizes: list[int] = []

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        self.batch_sizes.append(len(examples))
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), longest), self.pad_token_id)
        mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
            mask[row, : len(example["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def step_logger():
    """A TrainerCallback that counts optimizer steps on itself and reports train starts to EVENTS."""
    from transformers import TrainerCallback

    class StepLogger(TrainerCallback):
        def __init__(self) -> None:
            self.steps = 0

        def on_train_begin(self, args, state, control, **kwargs):
            EVENTS.append(("train_begin", args.per_device_train_batch_size))

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    return StepLogger()


def write_imdb_like(path: Path, rows: int = 96) -> Path:
    """An imdb-shaped jsonl ({"text", "label"}) of reviews from one sentence to a few paragraphs."""
    rng = random.Random(0)
    words = ["film", "plot", "actor", "scene", "director", "music", "story", "ending", "camera", "dialogue",
             "brilliant", "dull", "moving", "slow", "funny", "dark", "long", "short"]
    with path.open("w") as f:
        for i in range(rows):
            text = " ".join(rng.choice(words) for _ in range(5 + (i * 37) % 120)).capitalize() + "."
            f.write(json.dumps({"text": text, "label": i % 2}) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-budget", default="60MiB")
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--workdir", help="where the tiny model, data and output go (default: a temp dir)")
    options = parser.parse_args(argv)
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="autobatch-classic-"))
    workdir.mkdir(parents=True, exist_ok=True)

    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    import autobatch
    from autobatch.builtin import save_tiny_model
    from autobatch.memory import make_backend

    model_dir = save_tiny_model(workdir / "tiny-opt", "opt")  # stands in for facebook/opt-350m
    data = write_imdb_like(workdir / "imdb.jsonl")  # stands in for stanfordnlp/imdb

    # ---- the classic script, as written ----
    dataset = load_dataset("json", data_files=str(data), split="train")
    args = SFTConfig(
        max_length=128, output_dir=str(workdir / "out"), per_device_train_batch_size=4,
        gradient_accumulation_steps=8, max_steps=options.max_steps, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False,  # CPU: no bf16 there
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    collator = PadAndMask(tokenizer.pad_token_id)
    callback = step_logger()
    trainer = SFTTrainer(str(model_dir), train_dataset=dataset, args=args, processing_class=tokenizer,
                         data_collator=collator, callbacks=[callback])

    plan = autobatch.plan_trainer(trainer, memory_budget=options.memory_budget)  # added line 1
    plan.apply(trainer)  # added line 2

    trial_batches = list(collator.batch_sizes)
    with make_backend("cpu", plan.memory_budget_bytes).measure() as run:  # CPU only: enforce the budget
        trainer.train()
    micro, accumulation = trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps
    summary = {
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accumulation,
        "effective_batch_size": micro * accumulation * trainer.args.world_size,
        "max_micro_batch_size": plan.max_micro_batch_size,
        "trials": len(plan.trials),
        "memory_budget_bytes": plan.memory_budget_bytes,
        "predicted_peak_bytes": plan.peak_memory_bytes,
        "run_peak_bytes": run.held_peak_bytes,
        "global_step": trainer.state.global_step,
        "callback_steps": callback.steps,
        "callback_train_begins": [size for event, size in EVENTS if event == "train_begin"],
        "collator_batches_in_trials": trial_batches,
        "collator_batches_in_run": collator.batch_sizes[len(trial_batches):],
    }
    print(json.dumps(summary, indent=2))
    if not options.workdir:  # a temp dir is the script's, not the user's: say where it is and that it stays
        print(f"model, data and output left in {workdir} (remove it with: rm -r {workdir}; --workdir DIR to choose)",
              file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
