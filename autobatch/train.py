"""`autobatch run`: the plan handed untouched to a full SFTTrainer run that survives an OOM in a step.

The run builds its trainer through the same `workload` calls the probe measured. If an OOM happens
anyway (a fragmented or shared GPU), the current optimizer step is redone with each micro-batch split
in two: gradients are zeroed, the step's earlier micro-batches replayed in halves, and training goes on
from the same step and data position. The loss is normalised by the step's token count
(`num_items_in_batch`), so the split step computes the same gradient: the effective batch stays exact.
The Trainer's `auto_find_batch_size` instead restarts from step 0 with a smaller batch.

Beyond forward/backward: an OOM in evaluation halves the eval batch and evaluates again; an OOM in
gradient clipping saves a complete checkpoint from before the step and stops (no activations are alive
then, so a smaller micro-batch would not help); an OOM in the optimizer step stops naming the newest
complete checkpoint (the update may be partly applied, so that step's state is not saved); an OOM while
saving stops naming the incomplete checkpoint, which `--resume` skips. A SIGTERM/SIGINT saves a
checkpoint at the next step boundary (`autobatch.interrupt`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autobatch import ranks, sharding
from autobatch.config import Config
from autobatch.errors import AutobatchError, Interrupted
from autobatch.interrupt import SignalStop
from autobatch.memory import check_cpu_budget, is_oom, make_backend
from autobatch.planfile import write_run_plan
from autobatch.planner import Plan
from autobatch.rundir import (  # noqa: F401 - check_can_run and check_output_dir are train's API too
    CHECKPOINT_NAME,
    STATE_FILE,
    check_can_run,
    check_output_dir,
    check_training_data,
    claim_output_dir,
    complete_checkpoints,
    resume_checkpoint,
)
from autobatch.workload import build_trainer, load_train_dataset, sft_config

logger = logging.getLogger(__name__)


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
    eval_fallbacks: list[int] = field(default_factory=list)  # eval batch sizes an OOM in evaluation led to
    log_history: list[dict] = field(default_factory=list)
    resumed_from_step: int = 0  # the checkpoint's step with --resume: this invocation trained the rest

    def to_dict(self) -> dict:
        return asdict(self)


def split_batch(inputs: dict, parts: int) -> list[dict]:
    """A collated batch cut into `parts` micro-batches along the batch dimension."""
    import torch

    size = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor))
    if "cu_seq_lens_q" in inputs or ("position_ids" in inputs and "attention_mask" not in inputs):
        raise AutobatchError(
            f"out of memory at micro-batch {size} and a padding-free/packed batch cannot be split: "
            "lower max_length or use a larger budget", keys=("max_length",)
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


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OomSafeTrainer:
    """Mixin for a Trainer class (SFTTrainer, or a caller's own) with the OOM fallback: split micro-batches,
    same optimizer step, same data position; halved eval batch on an OOM in evaluation; a clear stop on an
    OOM in clipping, the optimizer step or a save. `trainer_class` puts it in front of the base."""

    splits = 1
    fallbacks: list[Fallback]
    eval_fallbacks: list[int]  # the eval batch sizes evaluation went down to
    on_fallback: Callable[[Fallback], None] | None = None

    def _out_of_memory(self, call: Callable[..., Any], *args, check: Callable[[Exception], None] | None = None,
                       **kwargs) -> tuple[bool, Any]:
        """`(False, call(...))`, or `(True, None)` after an OOM, returned outside the except block: its
        exception and traceback no longer pin the step's tensors when the caller acts on it. Anything but
        OOM propagates unchanged; `check(exc)` may first raise an error of its own."""
        try:
            return False, call(*args, **kwargs)
        except Exception as exc:
            if check is not None:
                check(exc)
            if not is_oom(exc, self.args.device.type):
                raise
        return True, None

    def evaluate(self, *args, **kwargs):
        while True:
            failed, metrics = self._out_of_memory(super().evaluate, *args, **kwargs)
            if not failed:
                return metrics
            self._halve_eval_batch()

    def _halve_eval_batch(self) -> None:
        size = self.args.per_device_eval_batch_size
        if size <= 1:
            raise AutobatchError(
                f"out of memory in evaluation at step {self.state.global_step} even at eval batch 1: "
                "use a larger budget, a shorter max_length, or eval_strategy no", keys=("max_length", "eval_strategy")
            )
        self.args.per_device_eval_batch_size = size // 2
        if hasattr(self, "_eval_dataloaders"):
            self._eval_dataloaders.clear()  # cached at the old batch size
        _free_memory()
        getattr(self, "eval_fallbacks", []).append(size // 2)
        logger.warning("OOM in evaluation at step %d: eval batch %d -> %d; evaluating again",
                       self.state.global_step, size, size // 2)

    def _clip_grad_norm(self, model):
        failed, norm = self._out_of_memory(super()._clip_grad_norm, model)
        if not failed:
            return norm
        # clipping failed before changing anything: the state is the last step's, intact
        _free_memory()
        path = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        self._save_checkpoint(model, None)
        raise AutobatchError(
            f"out of memory in gradient clipping at step {self.state.global_step + 1} (a smaller "
            f"micro-batch does not help there): saved the complete checkpoint {path} from before "
            "the step; use a larger budget, LoRA or max_grad_norm 0, and continue with `resume`",
            keys=("max_grad_norm", "resume"),
        )

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if not getattr(optimizer, "_autobatch_guarded", False):
            optimizer.step = self._guarded_step(optimizer.step)
            optimizer._autobatch_guarded = True
        return optimizer

    def _guarded_step(self, step):
        def guarded(*args, **kwargs):
            failed, result = self._out_of_memory(step, *args, **kwargs)
            if not failed:
                return result
            newest = complete_checkpoints(self.args.output_dir)
            last = (f"the newest complete checkpoint is {newest[0]} (`resume` continues from it)"
                    if newest else "no checkpoint was saved before it (set save_steps)")
            raise AutobatchError(
                f"out of memory in the optimizer step at step {self.state.global_step + 1}: weights, "
                "gradients and optimizer state do not fit; the update may be partly applied, so this "
                f"step is not saved and {last}; use a larger budget, LoRA, or a lighter optim "
                "(adafactor, adamw_8bit)", keys=("resume", "save_steps", "optim")
            )
        return guarded

    def _save_checkpoint(self, model, trial):
        path = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        return self._saving(path, super()._save_checkpoint, model, trial)

    def save_model(self, output_dir=None, _internal_call=False):
        path = output_dir or self.args.output_dir
        return self._saving(path, super().save_model, output_dir, _internal_call)

    def _saving(self, path, save, *args):
        def write_failed(exc: Exception) -> None:
            if _write_failed(exc):
                raise AutobatchError(
                    f"cannot write {path}: {_write_failure(exc)}; free space on that disk or pass another "
                    "output_dir, then continue with `resume` (it skips this incomplete checkpoint)",
                    keys=("output_dir", "resume"),
                ) from exc

        failed, result = self._out_of_memory(save, *args, check=write_failed)
        if not failed:
            return result
        raise AutobatchError(
            f"out of memory while saving {path}: what it holds is incomplete (`resume` skips a "
            "checkpoint without trainer_state.json); use a larger budget or save_only_model true",
            keys=("resume", "save_only_model"),
        )

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_batches, self._step_position = batches, 0
        return batches, num_items

    def training_step(self, model, inputs, num_items_in_batch=None):
        position = getattr(self, "_step_position", 0)
        self._step_position = position + 1
        replay: list[dict] = []

        def step():
            for earlier in replay:  # their losses were already counted: only the gradients are redone
                self._split_step(model, earlier, num_items_in_batch)
            return self._split_step(model, inputs, num_items_in_batch)

        while True:
            failed, loss = self._out_of_memory(step)
            if not failed:
                return loss
            _stop_if_ranks(self.args.world_size, self.state.global_step, inputs)
            self._fall_back(model)
            replay = getattr(self, "_step_batches", [])[:position]

    def _split_step(self, model, inputs, num_items_in_batch):
        if self.splits == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        scale = self.current_gradient_accumulation_steps
        self.current_gradient_accumulation_steps = scale * self.splits  # used only without num_items
        step = super().training_step  # bound here: a bare super() inside the comprehension has no `self`
        try:
            losses = [step(model, part, num_items_in_batch) for part in split_batch(inputs, self.splits)]
        finally:
            self.current_gradient_accumulation_steps = scale
        return sum(losses[1:], losses[0])

    def _fall_back(self, model) -> None:
        model.zero_grad(set_to_none=True)
        _free_memory()
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


def trainer_class(base=None) -> type:
    """`base` (SFTTrainer by default) behind the `OomSafeTrainer` mixin: `OomSafeSFTTrainer` for SFTTrainer.

    The base is a parameter because TRL is imported only when a run starts, and `autobatch.apply_plan` puts
    the fallback in front of a caller's own trainer class. A base that has it already is returned as it is.
    """
    if base is None:
        from trl import SFTTrainer as base
    if issubclass(base, OomSafeTrainer):
        return base
    name = "OomSafeSFTTrainer" if base.__name__ == "SFTTrainer" else f"OomSafe{base.__name__}"
    return type(name, (OomSafeTrainer, base), {})


def _write_failed(exc: BaseException) -> bool:
    """A save that failed writing: ENOSPC/EDQUOT, or torch's PytorchStreamWriter error, which names neither
    the file nor the cause (`[enforce fail at inline_container.cc:…] … file write failed`)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("inline_container" in text or "file write failed" in text
                                              or "No space left" in text)


def _write_failure(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} (the disk is full)"
    return "the write failed, most likely the disk is full (torch: file write failed)"


def _remove_earlier_checkpoints(output_dir: str) -> None:
    """--overwrite-output-dir: the earlier run's checkpoints go, so --resume never mixes two runs."""
    old = [p for p in Path(output_dir).iterdir() if CHECKPOINT_NAME.match(p.name) and p.is_dir()]
    if old:
        logger.warning("--overwrite-output-dir: removing %d checkpoint(s) of an earlier run in %s",
                       len(old), output_dir)
    for path in old:
        shutil.rmtree(path)


def _stop_if_ranks(world_size: int, step: int, inputs: dict) -> None:
    """Under several ranks an OOM stops the run: never a hang, never ranks on different batches.

    Splitting the step on one rank alone would change how many backward passes, each with DDP's bucket
    all-reduce, that rank runs while the others wait in theirs: a hang, or mismatched gradients. This
    rank exits non-zero instead, and the launcher (torchrun, accelerate launch) stops the others.
    """
    if world_size <= 1:
        return
    import torch

    size = next((v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor)), "?")
    raise AutobatchError(
        f"out of memory at step {step} on rank {ranks.current().rank} of {world_size} (micro-batch {size}): "
        "the ranks cannot split one step together inside DDP or FSDP, so the run stops; resume from the last "
        "checkpoint with `resume` after planning with a smaller memory_budget or per_device_train_batch_size",
        keys=("resume", "memory_budget", "per_device_train_batch_size"),
    )


#: What a collective raises on a rank whose peer has exited (gloo: tcp/pair.cc; NCCL: a watchdog abort).
_PEER_GONE = re.compile(r"Connection (closed|reset) by peer|NCCL communicator was aborted|Broken pipe")


@contextlib.contextmanager
def _peer_stopped():
    """Under several ranks, a rank whose peer stopped (its own line says why) says so in one line, not with
    the collective's transport error."""
    try:
        yield
    except RuntimeError as exc:
        here = ranks.current()
        if not (here.launched and _PEER_GONE.search(str(exc))):
            raise
        raise AutobatchError(f"rank {here.rank} of {here.world_size} stopped: another rank left the run "
                             "(its own line says why)") from None


def _output_dir(config: Config) -> str:
    path = check_output_dir(config)
    if ranks.is_main():
        claim_output_dir(path)
    else:
        path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _datasets(config: Config):
    """Train and optional eval dataset: the config's, or the built-in text sample for the built-in model."""
    check_training_data(config)
    train = load_train_dataset(config)
    evaluation = None
    if config.dataset_test_split:
        evaluation = load_train_dataset(config, split=config.dataset_test_split)
    elif config.eval_fraction:
        parts = train.train_test_split(test_size=config.eval_fraction, seed=0)
        train, evaluation = parts["train"], parts["test"]
    return train, evaluation


def _run_backend(config: Config, plan: Plan):
    """The backend the run trains on: the flags, else the plan's device and budget (a reused plan's too).

    A plan made by the estimate backend trains on the default device (cuda if any, else cpu).
    """
    device = config.device or (None if plan.device == "estimate" else plan.device or None)
    backend = make_backend(device, config.memory_budget_bytes or plan.memory_budget_bytes or None)
    check_cpu_budget(backend.device, config.memory_budget_bytes)  # the flag; a plan's budget was checked there
    backend.keep_headroom(plan.headroom)  # on cuda the allocator is capped there: past it, the OOM fallback
    return backend


def run(
    config: Config,
    plan: Plan,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list | None = None,
    on_fallback: Callable[[Fallback], None] | None = None,
    stop: SignalStop | None = None,
) -> RunResult:
    """Train with the plan's micro-batch and accumulation; on the cpu backend the budget stays enforced.

    With `stop` (from `interrupt.stop_on_signals`), a SIGTERM/SIGINT saves a checkpoint at the next step
    boundary and raises `Interrupted` naming it.
    """
    import gc

    backend = _run_backend(config, plan)
    ranks.init_group(backend.device, ranks.group_timeout_s(config, backend.device))  # before the Trainer makes one
    output_dir = _output_dir(config)
    args, notes = sft_config(
        config,
        backend.device,
        output_dir,
        per_device_train_batch_size=plan.per_device_train_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        **({"per_device_eval_batch_size": plan.per_device_eval_batch_size} if plan.per_device_eval_batch_size else {}),
        **({"activation_checkpointing": plan.checkpointing.activation_checkpointing} if plan.checkpointing else {}),
    )
    for note in notes:
        if note not in plan.notes:  # the plan's report already showed it
            logger.warning(note)
    train, evaluation = _datasets(config)
    gc.collect()
    callbacks = [*(callbacks or []), *([stop.callback()] if stop else [])]
    with sharding.sharded_run(config.training_args, backend.device):
        trainer = build_trainer(
            config, args, train_dataset=train, eval_dataset=evaluation, trainer_cls=trainer_class(), callbacks=callbacks
        )
    if sharding.fsdp_requested(config.training_args):
        sharding.shard_before_training(trainer)
    trainer.fallbacks, trainer.eval_fallbacks, trainer.on_fallback = [], [], on_fallback
    for callback in callbacks or []:
        if hasattr(callback, "attach"):  # callbacks that hook the model (gns) need the trainer itself
            callback.attach(trainer)
    checkpoint = resume_checkpoint(config, warn=True) if resume else None
    if overwrite and not resume and ranks.is_main():
        _remove_earlier_checkpoints(output_dir)
    if ranks.is_main():
        write_run_plan(output_dir, plan)
    logger.info("plan: %s", json.dumps({k: v for k, v in plan.to_dict().items() if k not in ("trials", "options")}))
    started = time.perf_counter()
    with backend.measure() as measured:
        if checkpoint is not None and _finished(checkpoint, args.max_steps):
            output = _load_finished(trainer, checkpoint)
        else:
            with _peer_stopped():
                output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stop is not None and stop.signum is not None:
        raise _stopped(stop, trainer, output_dir)
    trainer.save_model(output_dir)
    trainer.save_state()  # trainer_state.json beside the model: steps, train_batch_size, log history
    peak = measured.held_peak_bytes  # an allocation refused by a survived OOM was never held
    elapsed = time.perf_counter() - started
    return RunResult(
        output_dir=output_dir,
        global_step=trainer.state.global_step,
        train_loss=output.training_loss if output else None,
        samples_per_s=(output.metrics.get("train_samples_per_second") or (
            trainer.state.global_step * plan.effective_batch_size / elapsed if elapsed else None)) if output else None,
        peak_memory_bytes=peak,
        predicted_peak_memory_bytes=max(plan.peak_memory_bytes, plan.eval_peak_memory_bytes or 0),
        memory_budget_bytes=backend.budget_bytes,
        device=backend.device,
        per_device_train_batch_size=plan.per_device_train_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        effective_batch_size=plan.effective_batch_size,
        fallbacks=trainer.fallbacks,
        eval_fallbacks=trainer.eval_fallbacks,
        log_history=trainer.state.log_history,
        resumed_from_step=int(Path(checkpoint).name.rpartition("-")[2]) if checkpoint else 0,
    )


def _finished(checkpoint: Path, max_steps: int) -> bool:
    """Whether `checkpoint` already reached the run's last step (`max_steps`, else the steps it planned).

    Resumed there, the Trainer trains one step before it checks the limit: 30 -> 31 -> 32 on each --resume.
    """
    state = json.loads((checkpoint / STATE_FILE).read_text())
    target = max_steps if max_steps and max_steps > 0 else state.get("max_steps") or 0
    return 0 < target <= state.get("global_step", 0)


def _load_finished(trainer, checkpoint: Path) -> None:
    """The finished checkpoint's weights and state, loaded without training, for the final save."""
    from transformers import TrainerState

    logger.warning("--resume: %s is the run's last step: nothing left to train; saving the final model", checkpoint)
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / STATE_FILE))


def _stopped(stop: SignalStop, trainer, output_dir: str) -> Interrupted:
    """The error a signal-stopped run ends with: the step reached and the checkpoint saved there."""
    newest = complete_checkpoints(output_dir)
    step, total = trainer.state.global_step, trainer.state.max_steps
    where = f"complete checkpoint {newest[0]}" if newest else "no checkpoint (none could be saved)"
    return Interrupted(f"stopped by {stop.signal_name} at step {step} of {total}: {where}", stop.signum,
                       checkpoint=str(newest[0]) if newest else None)
