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

from autobatch import ranks, sharding
from autobatch.config import (
    Config,
    build_config,
    fingerprint_differences,
    read_plan_meta,
    write_atomic,
)
from autobatch.errors import AutobatchError, ConfigError, Interrupted
from autobatch.interrupt import SignalStop
from autobatch.memory import alloc_conf, check_cpu_budget, is_oom, make_backend
from autobatch.planner import CheckpointingChoice, Plan
from autobatch.rundir import (  # noqa: F401 - check_can_run and check_output_dir are train's API too
    CHECKPOINT_NAME,
    PLAN_FILE,
    STATE_FILE,
    check_can_run,
    check_output_dir,
    check_training_data,
    claim_output_dir,
    complete_checkpoints,
    resume_checkpoint,
)
from autobatch.workload import build_trainer, fingerprint, load_train_dataset, model_path, sft_config

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


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trainer_class(base=None):
    """`base` (SFTTrainer by default) with the OOM fallback: split micro-batches, same optimizer step, same
    data position; halved eval batch on an OOM in evaluation; a clear stop on an OOM in clipping, the
    optimizer step or a save."""
    if base is None:
        from trl import SFTTrainer as base

    class OomSafeSFTTrainer(base):
        splits = 1
        fallbacks: list[Fallback]
        eval_fallbacks: list[int]  # the eval batch sizes evaluation went down to
        on_fallback: Callable[[Fallback], None] | None = None

        def evaluate(self, *args, **kwargs):
            while True:
                failed = False
                try:
                    return super().evaluate(*args, **kwargs)
                except Exception as exc:  # only OOM is handled
                    if not is_oom(exc, self.args.device.type):
                        raise
                    failed = True
                if failed:  # outside the except block: the traceback no longer pins the batch's tensors
                    self._halve_eval_batch()

        def _halve_eval_batch(self) -> None:
            size = self.args.per_device_eval_batch_size
            if size <= 1:
                raise AutobatchError(
                    f"out of memory in evaluation at step {self.state.global_step} even at eval batch 1: "
                    "use a larger budget, a shorter max_length, or --eval-strategy no"
                )
            self.args.per_device_eval_batch_size = size // 2
            if hasattr(self, "_eval_dataloaders"):
                self._eval_dataloaders.clear()  # cached at the old batch size
            _free_memory()
            getattr(self, "eval_fallbacks", []).append(size // 2)
            logger.warning("OOM in evaluation at step %d: eval batch %d -> %d; evaluating again",
                           self.state.global_step, size, size // 2)

        def _clip_grad_norm(self, model):
            failed = False
            try:
                return super()._clip_grad_norm(model)
            except Exception as exc:
                if not is_oom(exc, self.args.device.type):
                    raise
                failed = True
            if failed:  # clipping failed before changing anything: the state is the last step's, intact
                _free_memory()
                path = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
                self._save_checkpoint(model, None)
                raise AutobatchError(
                    f"out of memory in gradient clipping at step {self.state.global_step + 1} (a smaller "
                    f"micro-batch does not help there): saved the complete checkpoint {path} from before "
                    "the step; use a larger budget, LoRA or --max-grad-norm 0, and continue with --resume"
                )

        def create_optimizer(self, *args, **kwargs):
            optimizer = super().create_optimizer(*args, **kwargs)
            if not getattr(optimizer, "_autobatch_guarded", False):
                optimizer.step = self._guarded_step(optimizer.step)
                optimizer._autobatch_guarded = True
            return optimizer

        def _guarded_step(self, step):
            def guarded(*args, **kwargs):
                failed = False
                try:
                    return step(*args, **kwargs)
                except Exception as exc:
                    if not is_oom(exc, self.args.device.type):
                        raise
                    failed = True
                if failed:
                    newest = complete_checkpoints(self.args.output_dir)
                    last = (f"the newest complete checkpoint is {newest[0]} (--resume continues from it)"
                            if newest else "no checkpoint was saved before it (set --save-steps)")
                    raise AutobatchError(
                        f"out of memory in the optimizer step at step {self.state.global_step + 1}: weights, "
                        "gradients and optimizer state do not fit; the update may be partly applied, so this "
                        f"step is not saved and {last}; use a larger budget, LoRA, or a lighter --optim "
                        "(adafactor, adamw_8bit)"
                    )
            return guarded

        def _save_checkpoint(self, model, trial):
            path = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
            return self._saving(path, super()._save_checkpoint, model, trial)

        def save_model(self, output_dir=None, _internal_call=False):
            path = output_dir or self.args.output_dir
            return self._saving(path, super().save_model, output_dir, _internal_call)

        def _saving(self, path, save, *args):
            failed = False
            try:
                return save(*args)
            except Exception as exc:
                if _write_failed(exc):
                    raise AutobatchError(
                        f"cannot write {path}: {_write_failure(exc)}; free space on that disk or pass another "
                        "--output-dir, then continue with --resume (it skips this incomplete checkpoint)"
                    ) from exc
                if not is_oom(exc, self.args.device.type):
                    raise
                failed = True
            if failed:
                raise AutobatchError(
                    f"out of memory while saving {path}: what it holds is incomplete (--resume skips a "
                    "checkpoint without trainer_state.json); use a larger budget or --save-only-model true"
                )

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
                    if not is_oom(exc, self.args.device.type):
                        raise
                    failed = True
                if failed:  # outside the except block, so the OOM's traceback no longer pins tensors
                    _stop_if_ranks(self.args.world_size, self.state.global_step, inputs)
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

    return OomSafeSFTTrainer


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


def plan_from_checkpoint(config: Config, checkpoint: Path) -> Plan:
    """For --resume without plan.json: the micro-batch from the checkpoint's trainer_state.json, the
    accumulation from the config's effective batch (or accumulation); refused where either is unknown."""
    try:
        micro = json.loads((checkpoint / STATE_FILE).read_text()).get("train_batch_size")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: cannot read {checkpoint / STATE_FILE} ({exc})") from None
    world = config.world_size
    accumulation = config.gradient_accumulation_steps
    effective = config.effective_batch_size
    known = isinstance(accumulation, int) or not isinstance(micro, int)
    if not known and effective and effective % (micro * world) == 0:
        accumulation = effective // (micro * world)
    wanted = config.per_device_train_batch_size
    if not isinstance(micro, int) or not isinstance(accumulation, int) or wanted not in ("auto", None, micro):
        raise ConfigError(
            f"--resume: {checkpoint.parent} has no readable {PLAN_FILE} and {checkpoint / STATE_FILE} gives "
            f"micro-batch {micro}; pass the --effective-batch-size (or --gradient-accumulation-steps) the run used, "
            "so the data position stays exact"
        )
    return Plan(
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        effective_batch_size=micro * accumulation * world,
        world_size=world,
        max_micro_batch_size=micro,
        memory_budget_bytes=config.memory_budget_bytes or 0,
        usable_memory_bytes=0,
        headroom=config.headroom or 0.0,
        peak_memory_bytes=0,
        device=config.device or "",
        max_length=config.training_args.get("max_length") or 0,
        trials=[],
        notes=[f"--resume without {PLAN_FILE}: micro-batch from {checkpoint / STATE_FILE}, no probing"],
        memory_fingerprint=fingerprint(config),
    )


def resume_plan(config: Config) -> Plan:
    """The plan `--resume` trains with: OUT/plan.json, else the newest complete checkpoint's batch."""
    checkpoint = resume_checkpoint(config)
    return saved_plan(config) or plan_from_checkpoint(config, checkpoint)


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
        "checkpoint with --resume after planning with a smaller --memory-budget or --micro-batch-size"
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


def load_plan(path: str, config: Config) -> Plan:
    """A plan saved by `autobatch plan --output`, refused unless it holds for `config`: the same memory
    settings, the same model content (wherever it is saved), and the batch its probe measured."""
    saved = build_config(path)
    meta = read_plan_meta(path)
    differences = plan_differences(meta, config, path)
    if differences:
        raise ConfigError(
            f"--plan {path} was made for other memory settings ({'; '.join(differences)}): "
            "plan again without --plan, or run with the settings it was made for"
        )
    micro, accumulation = check_planned_batch(path, meta, config, saved)
    _warn_alloc_conf(path, meta)
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
        memory_fingerprint=fingerprint(config),
        per_device_eval_batch_size=saved.training_args.get("per_device_eval_batch_size"),
        checkpointing=CheckpointingChoice(**meta["checkpointing"]) if meta.get("checkpointing") else None,
        pytorch_cuda_alloc_conf=meta.get("pytorch_cuda_alloc_conf"),
    )


def plan_differences(meta: dict, config: Config, path: str) -> list[str]:
    """What differs between the settings and model a plan.yaml was made for and `config`'s.

    The config is compared as plan.yaml writes it (current key names, cpu precision off), with keys it
    leaves to defaults (bf16, fp16, use_cpu) taken as planned; the model by content, not by path.
    """
    from autobatch.binding import model_content
    from autobatch.config import _as_written

    saved = dict(meta["memory_fingerprint"])
    current = fingerprint(_as_written(config, meta["device"]))
    for key in ("bf16", "fp16", "use_cpu"):
        if key not in config.training_args and key in saved:
            current[key] = saved[key]
    model = model_path(config)
    if "model_content" in meta:
        now = model_content(model)
        if meta["model_content"] is not None and now is not None:
            saved.pop("model_name_or_path", None)
            current.pop("model_name_or_path", None)
            for part in ("config", "weights"):
                if meta["model_content"][part] != now[part]:
                    saved[f"model {part}"], current[f"model {part}"] = meta["model_content"][part], now[part]
    else:
        logger.warning("--plan %s was written before plans were bound to the model's content: the model at %s is "
                       "taken to be the one it was made for (plan again to bind it)", path, model)
    differences = fingerprint_differences(saved, current)
    if config.memory_budget_bytes is not None and config.memory_budget_bytes != meta["memory_budget_bytes"]:
        differences.append(f"memory_budget: {meta['memory_budget_bytes']} -> {config.memory_budget_bytes}")
    if config.device not in (None, meta["device"]) and meta["device"] != "estimate":  # estimate plans for a GPU
        differences.append(f"device: {meta['device']} -> {config.device}")
    return differences


def check_planned_batch(path: str, meta: dict, config: Config, saved: Config) -> tuple[int, int]:
    """The micro-batch × accumulation the plan's probe measured; a hand-edited one is refused in one line.

    `config` may be another file (`--config tiny.yaml --plan plan.yaml`): where it leaves the batch to
    autobatch (auto), the plan file's values are taken.
    """
    micro, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    micro = micro if isinstance(micro, int) else saved.per_device_train_batch_size
    accumulation = accumulation if isinstance(accumulation, int) else saved.gradient_accumulation_steps
    if not (isinstance(micro, int) and isinstance(accumulation, int)):
        raise ConfigError(f"--plan {path}: per_device_train_batch_size and gradient_accumulation_steps must be set")
    planned = (meta.get("per_device_train_batch_size", micro), meta.get("gradient_accumulation_steps", accumulation))
    effective = micro * accumulation * config.world_size
    wanted = config.effective_batch_size
    if (micro, accumulation) != planned or effective != meta["effective_batch_size"] or wanted not in (None, effective):
        raise ConfigError(
            f"--plan {path}: per_device_train_batch_size {micro} × gradient_accumulation_steps {accumulation} is not "
            f"what it planned ({planned[0]} × {planned[1]}, effective {meta['effective_batch_size']}; the peak it "
            f"states is for micro-batch {planned[0]}): restore those values, or plan "
            f"--micro-batch-size {micro} --output {path} to check the new size"
        )
    return micro, accumulation


def check_resume_batch(config: Config, plan: Plan, plan_file: str) -> None:
    """--resume --plan: the plan must state the batch the run trained with, or the effective batch changes
    mid-run (and plan.json would be overwritten with the other one)."""
    checkpoint = resume_checkpoint(config)
    path = check_output_dir(config) / PLAN_FILE
    try:
        before = json.loads(path.read_text())
        trained = (before["per_device_train_batch_size"], before["gradient_accumulation_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        state = json.loads((checkpoint / STATE_FILE).read_text())
        trained = (state.get("train_batch_size"), plan.gradient_accumulation_steps)
    if trained != (plan.per_device_train_batch_size, plan.gradient_accumulation_steps):
        raise ConfigError(
            f"--resume --plan {plan_file}: it states micro-batch {plan.per_device_train_batch_size} × accumulation "
            f"{plan.gradient_accumulation_steps}, but the run in {path.parent} trained with {trained[0]} × "
            f"{trained[1]}: resume without --plan (the run's own {PLAN_FILE} is used), or train the new plan into "
            "another --output-dir"
        )


def _warn_alloc_conf(path: str, meta: dict) -> None:
    """One line when this run's allocator setting is not the one the plan was measured under: the edge
    moves with it (an H200 fitted 43 with expandable_segments:True, 39 without; issue 19)."""
    if "pytorch_cuda_alloc_conf" not in meta:  # not a cuda plan, or written before the setting was recorded
        return
    planned, now = meta["pytorch_cuda_alloc_conf"], alloc_conf()
    if planned != now:
        logger.warning("--plan %s was measured with PYTORCH_CUDA_ALLOC_CONF=%s but this run has %s: the largest "
                       "micro-batch may differ; run with the plan's setting or plan again", path,
                       planned or "(unset)", now or "(unset)")


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
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        # The checkpoint holds the micro-batch too: resuming stays possible (advising a plain run was a dead end)
        logger.warning("--resume: %s is unreadable (%s): the batch comes from the checkpoint instead", path,
                       type(exc).__name__)
        return None
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
    note = f"reused {path} to resume: no probing"
    plan.notes = [*plan.notes, *([] if note in plan.notes else [note])]  # a second resume: said once
    return plan


def _run_backend(config: Config, plan: Plan):
    """The backend the run trains on: the flags, else the plan's device and budget (a reused plan's too).

    A plan made by the estimate backend trains on the default device (cuda if any, else cpu).
    """
    device = config.device or (None if plan.device == "estimate" else plan.device or None)
    backend = make_backend(device, config.memory_budget_bytes or plan.memory_budget_bytes or None)
    check_cpu_budget(backend.device, config.memory_budget_bytes)  # the flag; a plan's budget was checked there
    if backend.device == "cuda":  # the allocator capped at the usable budget: past it, the OOM fallback
        backend.cap_bytes = int(backend.budget_bytes * (1 - plan.headroom))
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
        write_atomic(Path(output_dir, PLAN_FILE), json.dumps(plan.to_dict(), indent=2))
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
