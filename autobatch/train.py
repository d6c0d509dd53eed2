"""`autobatch run`: the plan handed untouched to a full SFTTrainer run that cannot die of one OOM.

The run builds its trainer through the same `workload` calls the probe measured. If an OOM happens
anyway (a fragmented or shared GPU), the current optimizer step is redone with each micro-batch split
in two: gradients are zeroed, the step's earlier micro-batches replayed in halves, and training goes on
from the same step and data position. The loss is normalised by the step's token count
(`num_items_in_batch`), so the split step computes the same gradient: the effective batch stays exact.
The Trainer's `auto_find_batch_size` instead restarts from step 0 with a smaller batch.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autobatch.config import (
    Config,
    build_config,
    fingerprint_differences,
    format_bytes,
    read_plan_meta,
)
from autobatch.errors import AutobatchError, ConfigError
from autobatch.memory import is_oom, make_backend
from autobatch.planner import Plan
from autobatch.workload import build_trainer, fingerprint, load_train_dataset, sft_config

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"


@dataclass
class Fallback:
    """One OOM survived: where, and the micro-batch × accumulation the run continued with."""

    global_step: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int


@dataclass
class RunResult:
    output_dir: str
    global_step: int
    train_loss: float | None
    samples_per_s: float | None
    peak_memory_bytes: int
    predicted_peak_memory_bytes: int
    memory_budget_bytes: int
    device: str
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    fallbacks: list[Fallback] = field(default_factory=list)
    log_history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def split_batch(inputs: dict, parts: int) -> list[dict]:
    """A collated batch cut into `parts` micro-batches along the batch dimension."""
    import torch

    size = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor))
    if "cu_seq_lens_q" in inputs or ("position_ids" in inputs and "attention_mask" not in inputs):
        raise AutobatchError(
            f"out of memory at micro-batch {size} and a padding-free/packed batch cannot be split: "
            "lower --max-length or use a larger budget"
        )
    parts = min(parts, size)  # a short last batch: single examples are already below the new micro-batch
    bounds = [round(i * size / parts) for i in range(parts + 1)]
    return [
        {k: (v[a:b] if isinstance(v, torch.Tensor) and v.shape[:1] == (size,) else v) for k, v in inputs.items()}
        for a, b in itertools.pairwise(bounds)
    ]


def next_split(micro: int, splits: int) -> int:
    """Parts to cut each planned micro-batch into after one more OOM: the next divisor of `micro`.

    The first cut halves an even micro-batch; an odd one goes to its smallest divisor (5 -> 1, 9 -> 3),
    so micro-batch × accumulation stays exactly the planned effective batch.
    """
    if splits >= micro:
        raise AutobatchError("out of memory even at micro-batch 1: use a larger budget or a shorter max_length")
    return next(d for d in range(splits + 1, micro + 1) if micro % d == 0)


def trainer_class():
    """SFTTrainer with the OOM fallback: split micro-batches, same optimizer step, same data position."""
    from trl import SFTTrainer

    class OomSafeSFTTrainer(SFTTrainer):
        splits = 1
        fallbacks: list[Fallback]
        on_fallback: Callable[[Fallback], None] | None = None

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            self._step_batches, self._step_position = batches, 0
            return batches, num_items

        def training_step(self, model, inputs, num_items_in_batch=None):
            position = getattr(self, "_step_position", 0)
            self._step_position = position + 1
            replay: list[dict] = []
            while True:
                failed = False
                try:
                    for earlier in replay:  # their losses were already counted: only the gradients are redone
                        self._split_step(model, earlier, num_items_in_batch)
                    return self._split_step(model, inputs, num_items_in_batch)
                except Exception as exc:  # only OOM is handled; anything else propagates unchanged
                    if not is_oom(exc):
                        raise
                    failed = True
                if failed:  # outside the except block, so the OOM's traceback no longer pins tensors
                    self._fall_back(model)
                    replay = getattr(self, "_step_batches", [])[:position]

        def _split_step(self, model, inputs, num_items_in_batch):
            if self.splits == 1:
                return super().training_step(model, inputs, num_items_in_batch)
            scale = self.current_gradient_accumulation_steps
            self.current_gradient_accumulation_steps = scale * self.splits  # used only without num_items
            try:
                losses = [super(OomSafeSFTTrainer, self).training_step(model, part, num_items_in_batch)
                          for part in split_batch(inputs, self.splits)]
            finally:
                self.current_gradient_accumulation_steps = scale
            return sum(losses[1:], losses[0])

        def _fall_back(self, model) -> None:
            import gc

            import torch

            model.zero_grad(set_to_none=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            planned = self.args.per_device_train_batch_size
            before = (planned // self.splits, self.args.gradient_accumulation_steps * self.splits)
            self.splits = next_split(planned, self.splits)
            event = Fallback(
                self.state.global_step, planned // self.splits, self.args.gradient_accumulation_steps * self.splits
            )
            self.fallbacks.append(event)
            logger.warning(
                "OOM at step %d: micro-batch %d -> %d, accumulation %d -> %d (effective batch unchanged); "
                "continuing from the same step",
                event.global_step, before[0], event.per_device_train_batch_size, before[1],
                event.gradient_accumulation_steps,
            )
            if self.on_fallback:
                self.on_fallback(event)

    return OomSafeSFTTrainer


def check_output_dir(config: Config) -> Path:
    """The output dir, checked before any probing: its nearest existing ancestor must be a writable dir."""
    out = config.training_args.get("output_dir") or "autobatch-out"
    path = Path(out).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {out}: {existing} is not a writable directory; pass --output-dir with one")
    return path


def _output_dir(config: Config) -> str:
    path = check_output_dir(config)
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _datasets(config: Config):
    """Train and optional eval dataset: the config's, or the built-in text sample for the built-in model."""
    if config.dataset_name is None and config.model_name_or_path is not None:
        raise ConfigError("run needs training data: pass --dataset (a hub name or a local json/jsonl/csv file)")
    train = load_train_dataset(config)
    evaluation = None
    if config.dataset_test_split:
        evaluation = load_train_dataset(config, split=config.dataset_test_split)
    elif config.eval_fraction:
        parts = train.train_test_split(test_size=config.eval_fraction, seed=0)
        train, evaluation = parts["train"], parts["test"]
    return train, evaluation


def load_plan(path: str, config: Config) -> Plan:
    """A plan saved by `autobatch plan --output`, refused if memory-relevant settings differ from `config`."""
    saved = build_config(path)
    meta = read_plan_meta(path)
    current = fingerprint(config)
    differences = fingerprint_differences(meta["memory_fingerprint"], current)
    if config.memory_budget_bytes is not None and config.memory_budget_bytes != meta["memory_budget_bytes"]:
        differences.append(f"memory_budget: {meta['memory_budget_bytes']} -> {config.memory_budget_bytes}")
    if config.device not in (None, meta["device"]) and meta["device"] != "estimate":  # estimate plans for a GPU
        differences.append(f"device: {meta['device']} -> {config.device}")
    if differences:
        raise ConfigError(
            f"--plan {path} was made for other memory settings ({'; '.join(differences)}): "
            "plan again without --plan, or run with the settings it was made for"
        )
    micro, accumulation = saved.per_device_train_batch_size, saved.gradient_accumulation_steps
    if not (isinstance(micro, int) and isinstance(accumulation, int)):
        raise ConfigError(f"--plan {path}: per_device_train_batch_size and gradient_accumulation_steps must be set")
    return Plan(
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        effective_batch_size=micro * accumulation * saved.world_size,
        world_size=saved.world_size,
        max_micro_batch_size=meta["max_micro_batch_size"],
        memory_budget_bytes=meta["memory_budget_bytes"],
        usable_memory_bytes=meta["usable_memory_bytes"],
        headroom=meta["headroom"],
        peak_memory_bytes=meta["peak_memory_bytes"],
        device=meta["device"],
        max_length=meta["max_length"],
        trials=[],
        seconds_per_step=meta.get("seconds_per_step", 0.0),
        notes=[f"reused {path}: no probing"],
        memory_fingerprint=current,
        per_device_eval_batch_size=saved.training_args.get("per_device_eval_batch_size"),
    )


def saved_plan(config: Config) -> Plan | None:
    """The plan of an earlier run in this output dir (for `--resume`), None if there is none.

    Refused when the config's memory settings or batch no longer match it: resuming with another
    micro-batch or accumulation would change the effective batch mid-run.
    """
    path = check_output_dir(config) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        plan = Plan.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"--resume: cannot read {path} ({exc}); run without --resume to plan again") from None
    differences = fingerprint_differences(plan.memory_fingerprint, fingerprint(config))
    for key, wanted in (
        ("per_device_train_batch_size", config.per_device_train_batch_size),
        ("gradient_accumulation_steps", config.gradient_accumulation_steps),
        ("effective_batch_size", config.effective_batch_size),
        ("memory_budget_bytes", config.memory_budget_bytes),
        ("device", config.device),
    ):
        if wanted not in (None, "auto", getattr(plan, key)):
            differences.append(f"{key}: {getattr(plan, key)!r} -> {wanted!r}")
    if differences:
        raise ConfigError(
            f"--resume: {path} was planned for other settings ({'; '.join(differences)}): "
            "resume with the settings it was made for, or train into a new --output-dir"
        )
    plan.notes = [*plan.notes, f"reused {path} to resume: no probing"]
    return plan


def check_can_run(config: Config) -> None:
    """What makes a run fail, checked before minutes of probing rather than after."""
    if config.device == "estimate":
        raise ConfigError(
            "--device estimate only plans (fake tensors cannot train): plan with it and --output plan.yaml, "
            "then autobatch run --plan plan.yaml --device cuda"
        )
    check_output_dir(config)


def _run_backend(config: Config, plan: Plan):
    """The backend the run trains on: the flags, else the plan's device and budget (a reused plan's too).

    A plan made by the estimate backend trains on the default device (cuda if any, else cpu).
    """
    device = config.device or (None if plan.device == "estimate" else plan.device)
    return make_backend(device, config.memory_budget_bytes or plan.memory_budget_bytes)


def run(
    config: Config,
    plan: Plan,
    *,
    resume: bool = False,
    callbacks: list | None = None,
    on_fallback: Callable[[Fallback], None] | None = None,
) -> RunResult:
    """Train with the plan's micro-batch and accumulation; on the cpu backend the budget stays enforced."""
    import gc


    backend = _run_backend(config, plan)
    output_dir = _output_dir(config)
    args, notes = sft_config(
        config,
        backend.device,
        output_dir,
        per_device_train_batch_size=plan.per_device_train_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        **({"per_device_eval_batch_size": plan.per_device_eval_batch_size} if plan.per_device_eval_batch_size else {}),
    )
    for note in notes:
        if note not in plan.notes:  # the plan's report already showed it
            logger.warning(note)
    train, evaluation = _datasets(config)
    gc.collect()
    trainer = build_trainer(
        config, args, train_dataset=train, eval_dataset=evaluation, trainer_cls=trainer_class(), callbacks=callbacks
    )
    trainer.fallbacks, trainer.on_fallback = [], on_fallback
    for callback in callbacks or []:
        if hasattr(callback, "attach"):  # callbacks that hook the model (gns) need the trainer itself
            callback.attach(trainer)
    Path(output_dir, PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2))
    logger.info("plan: %s", json.dumps({k: v for k, v in plan.to_dict().items() if k not in ("trials", "options")}))
    checkpoint = resume and _last_checkpoint(output_dir)
    started = time.perf_counter()
    with backend.measure() as measured:
        output = trainer.train(resume_from_checkpoint=checkpoint or None)
    trainer.save_model(output_dir)
    trainer.save_state()  # trainer_state.json beside the model: steps, train_batch_size, log history
    peak = measured.held_peak_bytes  # an allocation refused by a survived OOM was never held
    elapsed = time.perf_counter() - started
    return RunResult(
        output_dir=output_dir,
        global_step=trainer.state.global_step,
        train_loss=output.training_loss,
        samples_per_s=output.metrics.get("train_samples_per_second") or (
            trainer.state.global_step * plan.effective_batch_size / elapsed if elapsed else None),
        peak_memory_bytes=peak,
        predicted_peak_memory_bytes=max(plan.peak_memory_bytes, plan.eval_peak_memory_bytes or 0),
        memory_budget_bytes=backend.budget_bytes,
        device=backend.device,
        per_device_train_batch_size=plan.per_device_train_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        effective_batch_size=plan.effective_batch_size,
        fallbacks=trainer.fallbacks,
        log_history=trainer.state.log_history,
    )


def _last_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last is None:
        raise ConfigError(f"--resume: no checkpoint in {output_dir}; run without --resume first")
    return last


def summary_lines(result: RunResult) -> list[str]:
    """The closing summary the CLI prints."""
    lines = [
        (f"trained {result.global_step} steps, micro-batch {result.per_device_train_batch_size} × accumulation "
         f"{result.gradient_accumulation_steps} = effective {result.effective_batch_size}"),
        (f"peak memory {format_bytes(result.peak_memory_bytes)} (probe predicted "
         f"{format_bytes(result.predicted_peak_memory_bytes)}; budget {format_bytes(result.memory_budget_bytes)}, "
         f"{result.device})"),
    ]
    if result.samples_per_s:
        lines.append(f"{result.samples_per_s:.1f} samples/s, final train loss {result.train_loss:.4f}")
    for event in result.fallbacks:
        lines.append(
            f"OOM survived at step {event.global_step}: continued with micro-batch {event.per_device_train_batch_size}"
            f" × accumulation {event.gradient_accumulation_steps}"
        )
    lines.append(f"model saved to {result.output_dir}")
    return lines
