"""Faithful trial steps on a memory backend, and `make_plan`, which ties probe, search and planner together.

A trial is SFTTrainer's own `train()` for two optimizer steps — forward with labels through TRL's
`compute_loss` (fused LM head), backward, gradient clipping, optimizer step, zero_grad — on copies of
the longest example the run can produce. Two steps, because AdamW's moments appear at the first
`step()` and a one-step trial under-counts by them (measured on a tiny Llama); two micro-batches per
step when the run accumulates, because the second backward adds into existing gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from autobatch import launch, ranks, sharding
from autobatch.config import Config, modern_names
from autobatch.errors import AutobatchError, BudgetTooSmallError, ConfigError, WorkerError
from autobatch.memory import MemoryBackend, alloc_conf, check_cpu_budget, is_oom, make_backend
from autobatch.planner import (
    CheckpointingChoice,
    Option,
    Plan,
    Trial,
    check_effective_batch,
    choose_checkpointing,
    confirm_edge,
    nearby_note,
    nearby_targets,
    plan_options,
    search_max_micro_batch,
    steady_seconds,
)
from autobatch.units import format_bytes
from autobatch.workload import build_trainer, fingerprint, load_train_dataset, sft_config

logger = logging.getLogger(__name__)

CUDA_DEFAULT_HEADROOM = 0.05  # fragmentation and kernel workspaces the peak counters do not show
#: Optimizer steps a timed trial runs: the first is warm-up (AdamW's state created, the allocator growing,
#: kernels loaded lazily), the median of the rest is the step time options are ranked by (`steady_seconds`).
#: Two steps already give the peak; a trial that times nothing (estimate backend, evaluation) runs two.
TIMED_TRIAL_STEPS = 4
MEMORY_TRIAL_STEPS = 2
#: A trial worker still running after this long is hung: the whole process group is ended (autobatch.launch).
#: A trial is a model load and two steps; an hour covers a large model read from a slow disk.
TRIAL_TIMEOUT_S = 3600.0
#: Reserved bytes the planning process may keep (its CUDA context is outside them) before a plan says so.
FRESH_HELD_NOTE_BYTES = 64 * 2**20


class _StepTimer:
    """Trainer callback: wall time of every optimizer step of a trial (synchronised on cuda).

    `clock` is a class attribute so a test can plant step times (no wall-clock asserts).
    """

    clock = staticmethod(time.perf_counter)

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.steps: list[float] = []
        self._start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.sync()
        self._start = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        self.sync()
        self.steps.append(self.clock() - self._start)

    def __getattr__(self, name: str):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class Prober:
    """Owns one SFTTrainer on one backend and runs trials at any micro-batch size with its own `train()`.

    A trial is `trainer.train()` for two optimizer steps on copies of the longest example: whatever
    `train()` sets up (activation checkpointing, NEFTune hooks, accelerate's wrapping, the optimizer named
    by `optim` and its state, the data loader's prefetch) is in the measurement because it ran.
    """

    def __init__(
        self, config: Config, backend: MemoryBackend, usable_bytes: int, per_device: int | None = None,
        ddp: bool = False, sharded: bool = False,
    ) -> None:
        self._setup(backend, usable_bytes, per_device, ddp, sharded)
        try:
            self._build(config, backend)
        except BaseException:
            self._world.close()
            raise

    def _build(self, config: Config, backend: MemoryBackend) -> None:
        # The run's own settings, less what a two-step trial must not do (save, evaluate, log, report).
        self.args, self.notes = sft_config(
            config, backend.device, self.workdir.name, max_steps=2, save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True, report_to="none", num_train_epochs=1,
            train_sampling_strategy="sequential",  # every trial batch is the padded worst case, in order
            auto_find_batch_size=False,  # it would retry smaller inside train() and report the retry as fitting
        )
        with backend.tensor_mode():
            dataset = load_train_dataset(config)
            trainer = build_trainer(
                config, self.args, train_dataset=dataset, fake=backend.device == "estimate", callbacks=[self.timer]
            )
        from transformers import PrinterCallback, ProgressCallback

        for quiet in (PrinterCallback, ProgressCallback):  # a trial's end-of-train metrics are not news
            trainer.remove_callback(quiet)
        self._attach(trainer)
        if backend.device == "estimate" and modern_names(config.training_args).get("fp16"):
            self.precision = "fp16"  # measured with bf16 autocast, the same bytes (sft_config's note)
        if self.sharded:
            self._shard()

    def _shard(self) -> None:
        """FSDP: shard the model once, before any trial measures (accelerate's own `prepare`).

        The run loads each rank's full copy on the host and moves only its shards to the device
        (accelerate fsdp_utils.py `fsdp2_prepare_model`): the unsharded copy is never device memory, so no
        trial may count it. Later trials reuse the sharded model (prepare skips what is already sharded).
        """
        trainer = self.trainer
        with self.backend.tensor_mode():
            trainer.model = trainer.model_wrapped = trainer.accelerator.prepare(trainer.model)
        self._forget_prepared()  # and collect the unsharded copy, held in reference cycles

    @classmethod
    def for_trainer(
        cls, trainer, backend: MemoryBackend, usable_bytes: int, per_device: int | None = None, ddp: bool = False
    ) -> Prober:
        """A Prober around a trainer the caller built (`autobatch.plan_trainer`); `close()` gives it back as it was.

        Trials use the trainer's own model, collator, `compute_loss`, optimizer settings and callbacks
        (copies), with the args of a two-step trial; see `autobatch.snapshot` for what is saved and restored.
        """
        from autobatch.snapshot import TrainerSnapshot, ZeroLearningRate, trial_callbacks

        prober = cls.__new__(cls)
        prober._setup(backend, usable_bytes, per_device, ddp)
        prober.notes = []
        given = trainer.optimizer
        callbacks = trial_callbacks(trainer)
        prober.snapshot = TrainerSnapshot(trainer)
        prober.args = trainer.args = trial_args(trainer.args, prober.workdir.name)
        if given is not None:  # never stepped by a trial: each builds a fresh one of its class and settings
            import inspect

            accepted = inspect.signature(type(given)).parameters  # defaults may hold more (AdamW's decoupled flag)
            kwargs = {k: v for k, v in given.defaults.items() if k in accepted}
            trainer.optimizer_cls_and_kwargs = (type(given), kwargs)
            if given.state:
                prober.notes.append("the trainer's optimizer already holds state, counted in every trial beside "
                                    "the trial's own: peaks are high by up to that state's size")
        trainer.callback_handler.callbacks[:] = [*callbacks, ZeroLearningRate(), prober.timer]
        try:
            prober._attach(trainer)
        except BaseException:
            prober.snapshot.restore()
            prober.workdir.cleanup()
            prober._world.close()
            raise
        return prober

    def _setup(
        self, backend: MemoryBackend, usable_bytes: int, per_device: int | None, ddp: bool = False, sharded: bool = False
    ) -> None:
        self.backend = backend
        self.usable_bytes = usable_bytes
        self.per_device = per_device
        self.ddp = ddp  # the run wraps DDP: its gradient buckets are held during each (local) trial
        self.on_start: Callable[[int, int | None], None] | None = None  # (micro, eval batch) before a trial
        self.on_eval_trial: Callable[[Trial], None] | None = None  # after an evaluation trial
        self.on_trial_shown = False  # a training trial's line is printed by the caller
        # Under a launcher the trainer lives in a single-process world until close(): no DDP, no collective
        # inside a trial (ranks.local_only). The ranks agree between trials over the default process group.
        # FSDP (`sharded`) trials run on every rank of the group with the run's sharding instead.
        self.sharded = sharded
        self._world = contextlib.ExitStack()
        if not sharded:
            self._world.enter_context(ranks.local_only())
        self.snapshot = None
        self.workdir = tempfile.TemporaryDirectory(prefix="autobatch-probe-")
        self.timer = _StepTimer(self._sync)

    def _attach(self, trainer) -> None:
        """Take `trainer` for the trials: find the worst-case example of its train dataset."""
        self.trainer = trainer
        args = self.args
        self.precision = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32"
        self.example = self._longest_example()
        self.max_length = len(self.example["input_ids"])
        self.padded = not (getattr(self.args, "padding_free", False) or getattr(self.args, "packing", False))

    def _longest_example(self) -> dict:
        """The longest example after tokenization, truncation (and packing): the worst-case shape."""
        dataset = self.trainer.train_dataset
        if "input_ids" not in (getattr(dataset, "column_names", None) or []):
            raise ConfigError(
                "the trainer's train_dataset has no input_ids column (or is iterable): autobatch needs a "
                "tokenized datasets.Dataset to find the longest example; SFTTrainer makes one from text"
            )
        lengths = [len(ids) for ids in dataset["input_ids"]]
        return dataset[max(range(len(lengths)), key=lengths.__getitem__)]

    def _examples(self, micro_batch_size: int) -> list[dict]:
        """A worst-case micro-batch: the longest example, and one a token shorter so the batch is padded.

        A padded batch makes attention build a mask of batch × length × length that a batch of equal
        lengths never needs: measured on the built-in tiny Llama at 2 × 256, 1 MB more at the peak.
        """
        examples = [self.example] * micro_batch_size
        if self.padded and micro_batch_size > 1 and self.max_length > 1:
            examples[-1] = {k: v[:-1] if isinstance(v, list) and len(v) == self.max_length else v
                            for k, v in self.example.items()}
        return examples

    def _accumulation(self, micro_batch_size: int) -> int:
        return -(-self.per_device // micro_batch_size) if self.per_device else 1

    def _prepare(self, micro_batch_size: int, micro_steps: int, eval_batch_size: int | None) -> None:
        """Point the trainer at a trial of `micro_steps` micro-batches per step, with a fresh optimizer.

        With `eval_batch_size`, the trial also evaluates after each step, as the run does mid-training:
        with the optimizer state alive.
        """
        from datasets import Dataset

        trainer = self.trainer
        trainer.args.eval_strategy = "steps" if eval_batch_size else "no"
        trainer.args.eval_steps = 1
        if eval_batch_size:
            trainer.args.per_device_eval_batch_size = eval_batch_size
            trainer.eval_dataset = Dataset.from_list(self._examples(eval_batch_size) * 2)
        trainer.args.per_device_train_batch_size = micro_batch_size
        trainer.args.gradient_accumulation_steps = micro_steps
        trainer._train_batch_size = micro_batch_size  # train() reads the size __init__ cached here
        # One batch more than two steps use: the run's loader always has a next batch fetched ahead.
        steps = MEMORY_TRIAL_STEPS if eval_batch_size or self.backend.device == "estimate" else TIMED_TRIAL_STEPS
        trainer.args.max_steps = steps
        trainer.train_dataset = Dataset.from_list(self._examples(micro_batch_size) * (micro_steps * steps + 1))
        trainer.optimizer = trainer.lr_scheduler = None
        trainer.model_wrapped = trainer.model
        self._forget_prepared()

    def _forget_prepared(self) -> None:
        """accelerate keeps every prepared optimizer and loader; drop the last trial's (and its state)."""
        accelerator = self.trainer.accelerator
        for name in ("_optimizers", "_schedulers", "_dataloaders", "_models"):
            getattr(accelerator, name, []).clear()
        handler = self.trainer.callback_handler  # it keeps the last optimizer (and its state) alive too
        handler.optimizer = handler.lr_scheduler = handler.train_dataloader = None
        self.backend.cleanup()

    def _held_batches(self, micro_batch_size: int, count: int) -> list[dict]:
        """Batches the run's loop holds that a two-micro-batch trial does not, on the device.

        Trainer's loop fetches all of an optimizer step's micro-batches up front, so a run accumulating
        g micro-batches holds g - 2 more than the trial.
        """
        device = self.backend.torch_device
        return [
            {k: v.to(device) if hasattr(v, "to") else v
             for k, v in self.trainer.data_collator(self._examples(micro_batch_size)).items()}
            for _ in range(count)
        ]

    def _ddp_buckets(self):
        """A block the size of DDP's gradient buckets: one more copy of the trainable gradients.

        DDP's Reducer (torch/csrc/distributed/c10d/reducer.cpp) allocates a flat bucket per group of
        parameters, as large as their gradients (the Trainer leaves `gradient_as_bucket_view` off).
        """
        import torch

        size = sum(p.numel() * p.element_size() for p in self.trainer.model.parameters() if p.requires_grad)
        return torch.empty(size, dtype=torch.uint8, device=self.backend.torch_device)

    def _sync(self) -> None:
        if self.backend.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def run_trial(self, micro_batch_size: int, eval_batch_size: int | None = None) -> Trial:
        """Peak memory and time per micro-batch of two real optimizer steps; an OOM is a result, not an error.

        With `eval_batch_size` the steps are followed by evaluation at that batch size, and the trial is
        reported under the eval batch size.
        """
        if self.on_start:
            self.on_start(micro_batch_size, eval_batch_size)
        accumulation = self._accumulation(micro_batch_size)
        micro_steps = min(2, accumulation)  # accumulating adds into existing gradients: a peak of its own
        oom = False
        with self.backend.tensor_mode():
            self._prepare(micro_batch_size, micro_steps, eval_batch_size)
            held: list = self._held_batches(micro_batch_size, accumulation - micro_steps)
            if self.ddp:
                held.append(self._ddp_buckets())
            try:
                with self.backend.measure() as measured:
                    self.trainer.train()
            except Exception as exc:  # anything but OOM propagates unchanged
                if not is_oom(exc, self.backend.device):
                    raise
                oom = True
        # Outside the except block: its exception and traceback no longer pin the trial's tensors.
        del held
        neftune = getattr(self.trainer, "neftune_hook_handle", None)
        if neftune is not None:  # train() removes it only when it returns: after an OOM it would pile up
            neftune.remove()
        self.trainer.model.zero_grad(set_to_none=True)
        self._forget_prepared()
        timed = not oom and self.backend.device != "estimate" and self.timer.steps
        seconds = steady_seconds(self.timer.steps) / micro_steps if timed else 0.0
        peak = measured.peak_bytes
        size = eval_batch_size or micro_batch_size
        trial = Trial(size, peak, fits=not oom and peak <= self.usable_bytes, seconds=seconds, oom=oom,
                      peak_allocated_bytes=measured.allocated_peak_bytes)
        if eval_batch_size and self.on_eval_trial:
            self.on_eval_trial(trial)
        elif not self.on_trial_shown:  # a caller printing its own line (the CLI) does not want it twice
            logger.debug(describe_trial(trial, self.usable_bytes))
        return trial

    def close(self) -> None:
        """Drop the trainer, model and optimizer so the run that follows starts from empty memory."""
        if self.trainer is not None:
            self.trainer.optimizer = self.trainer.lr_scheduler = None
            self._forget_prepared()
        if self.snapshot is not None:  # a caller's trainer: back as it was, for its own train()
            self.snapshot.restore()
            self.snapshot = None
        self.trainer = None
        self.backend.cleanup()
        self.workdir.cleanup()
        self._world.close()


def trial_args(args, output_dir: str):
    """A copy of a trainer's args for a two-step trial: no saving, evaluating, logging or reporting.

    The same overrides the config path gives `sft_config`, set on a copy so the caller's args object is
    untouched (its `__post_init__` already ran; these fields are read as given at `train()`).
    """
    import copy

    trial = copy.copy(args)
    overrides = {
        "output_dir": output_dir, "max_steps": 2, "num_train_epochs": 1, "save_strategy": "no",
        "eval_strategy": "no", "logging_strategy": "no", "disable_tqdm": True, "report_to": [],
        "load_best_model_at_end": False, "push_to_hub": False, "train_sampling_strategy": "sequential",
        "auto_find_batch_size": False,  # it would retry smaller inside train() and report the retry as fitting
    }
    for key, value in overrides.items():
        if hasattr(trial, key):
            setattr(trial, key, value)
    return trial


def describe_trial(trial: Trial, usable_bytes: int) -> str:
    """One line a trial: `micro=16 fits peak=31.2GiB (78% of budget) 0.42 s/step`."""
    verdict = "fits" if trial.fits else ("OOM" if trial.oom else "does not fit")
    share = 100 * trial.peak_memory_bytes / usable_bytes
    return (
        f"micro={trial.micro_batch_size} {verdict} peak={format_bytes(trial.peak_memory_bytes)} "
        f"({share:.0f}% of budget) {trial.seconds:.2f} s/step"
    )


class FreshTrials:
    """`run_trial` in a worker process of its own (autobatch.trial_worker, through autobatch.launch).

    The worker loads the workload from `config` and measures one trial under the same budget, usable
    budget (the cuda allocator capped there) and accumulation as the planning process's Prober, which it
    reads for what changes during a plan (`per_device`) and for the progress callbacks.
    """

    def __init__(self, config: Config, backend: MemoryBackend, prober: Prober) -> None:
        self.config, self.backend, self.prober = config, backend, prober

    def spec(self, micro_batch_size: int, eval_batch_size: int | None) -> dict:
        return {
            "config": dataclasses.asdict(self.config), "device": self.backend.device,
            "budget_bytes": self.backend.budget_bytes, "usable_bytes": self.prober.usable_bytes,
            "per_device": self.prober.per_device, "ddp": self.prober.ddp,
            "micro_batch_size": micro_batch_size, "eval_batch_size": eval_batch_size,
        }

    def __call__(self, micro_batch_size: int, eval_batch_size: int | None = None) -> Trial:
        prober = self.prober
        if prober.on_start:
            prober.on_start(micro_batch_size, eval_batch_size)
        try:
            result = launch.run_worker("autobatch.trial_worker", self.spec(micro_batch_size, eval_batch_size),
                                       TRIAL_TIMEOUT_S, env=self._device_env())
        except WorkerError as exc:  # which trial, then what happened to it
            what = f"eval batch {eval_batch_size} after micro-batch" if eval_batch_size else "micro-batch"
            raise WorkerError(f"trial of {what} {micro_batch_size}: {exc}", exc.kind, exc.rank) from None
        trial = Trial(**{**result["trial"], "fresh_process": True})
        if eval_batch_size and prober.on_eval_trial:
            prober.on_eval_trial(trial)
        elif not prober.on_trial_shown:
            logger.debug("%s (fresh process)", describe_trial(trial, prober.usable_bytes))
        return trial

    def _device_env(self) -> dict[str, str]:
        """The worker sees only this process's GPU (a rank's, under a launcher), as its device 0."""
        if self.backend.device != "cuda":
            return {}
        index = self.backend.device_index
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        return {"CUDA_VISIBLE_DEVICES": visible[index] if index < len(visible) else str(index)}


class GroupProber:
    """FSDP trials from one coordinator: each trial is a fresh group of `nproc` ranks (autobatch.launch).

    Every rank runs the trial with the run's sharding on its own budget; the trial fits when every rank
    fits, its peak is the highest rank's and `rank_peak_bytes` keeps each. A rank that runs out of memory
    exits, and the launcher ends the others at once (a rank left waiting in an all-gather would otherwise
    wait for the group timeout): the trial is an OOM and one line names the rank. A fresh group per trial
    is also a fresh allocator per trial, as DeepSpeed's autotuner launches its experiments.
    """

    sharded, ddp, trainer = True, False, None

    def __init__(self, config, device: str, budgets: list[int], usable: list[int], per_device: int | None,
                 timeout_s: float = sharding.TRIAL_GROUP_TIMEOUT_S) -> None:
        self.config, self.device, self.budgets, self.usables = config, device, budgets, usable
        self.usable_bytes = min(usable)
        self.per_device, self.timeout_s = per_device, timeout_s
        self.nproc = len(budgets)
        self.on_start = self.on_eval_trial = None
        self.on_trial_shown = False
        self.max_length, self.padded, self.precision = 0, True, "fp32"
        self.notes = [(f"FSDP: each trial ran on {self.nproc} rank(s) launched together (a fresh process group per "
                      "trial); a size fits when every rank fits, its peak is the highest rank's")]
        self.failures: list[str] = []  # one line per trial a rank ended (OOM or crash)

    def _accumulation(self, micro_batch_size: int) -> int:
        return -(-self.per_device // micro_batch_size) if self.per_device else 1

    def spec(self, micro_batch_size: int, report_dir: str) -> dict:
        import dataclasses

        return {"config": dataclasses.asdict(self.config), "device": self.device, "budgets": self.budgets,
                "usables": self.usables, "per_device": self.per_device, "micro_batch_size": micro_batch_size,
                "report_dir": report_dir, "group_timeout_s": sharding.GROUP_TIMEOUT_S}

    def run_trial(self, micro_batch_size: int, eval_batch_size: int | None = None):
        import json
        from pathlib import Path

        if eval_batch_size:
            raise ConfigError("evaluation batches are not planned under FSDP yet: set per_device_eval_batch_size "
                              "or --eval-strategy no")
        if self.on_start:
            self.on_start(micro_batch_size, None)
        with tempfile.TemporaryDirectory(prefix="autobatch-fsdp-") as report_dir:
            failed = None
            try:
                launch.run_group(self.nproc, "autobatch.fsdp_worker", self.spec(micro_batch_size, report_dir),
                                 self.timeout_s)
            except WorkerError as exc:
                if exc.kind != "oom":
                    raise WorkerError(f"FSDP trial of micro-batch {micro_batch_size}: {exc}", exc.kind, exc.rank) from None
                failed = exc
            reports = [json.loads(p.read_text()) for p in sorted(Path(report_dir).glob("rank-*.json"))]
        by_rank = {r["rank"]: r for r in reports}
        for report in reports[:1]:
            self.max_length, self.padded, self.precision = report["max_length"], report["padded"], report["precision"]
        peaks = [by_rank[r]["trial"]["peak_memory_bytes"] if r in by_rank else None for r in range(self.nproc)]
        if failed is not None:
            line = (f"micro-batch {micro_batch_size}: rank {failed.rank} of {self.nproc} ran out of memory; "
                    f"the trial was ended on every rank")
            self.failures.append(line)
            logger.info(line)
            known = [p for p in peaks if p is not None]
            return Trial(micro_batch_size, max(known) if known else max(self.budgets) + 1, fits=False, seconds=0.0, oom=True,
                         rank_peak_bytes=[p if p is not None else -1 for p in peaks], fresh_process=True)
        trials = [by_rank[r]["trial"] for r in range(self.nproc)]
        return Trial(micro_batch_size, max(peaks), fits=all(t["fits"] for t in trials),
                     seconds=max(t["seconds"] for t in trials), oom=any(t["oom"] for t in trials),
                     peak_allocated_bytes=max(t["peak_allocated_bytes"] or 0 for t in trials),
                     rank_peak_bytes=peaks, fresh_process=True)

    def close(self) -> None:
        pass


def trial_process(config: Config, device: str, trainer=None) -> str:
    """`fresh` or `same`: where the trials that decide the plan's edge run (config `trial_process`).

    `auto` is fresh on cuda, where a trial after other trials carries their allocator history (issue 19),
    and same on cpu and estimate, which count live tensors and have no history. A caller's own trainer
    cannot be rebuilt in a worker: its trials stay in this process.
    """
    if trainer is not None:
        return "same"
    if config.trial_process == "auto":
        return "fresh" if device == "cuda" else "same"
    return config.trial_process


def resolve_headroom(config: Config, device: str) -> float:
    if config.headroom is not None:
        return config.headroom
    return CUDA_DEFAULT_HEADROOM if device in ("cuda", "estimate") else 0.0  # estimate plans for a GPU


def _budget_error(trial: Trial, usable_bytes: int, config: Config) -> BudgetTooSmallError:
    needs = "more than " + format_bytes(trial.peak_memory_bytes) if trial.oom else format_bytes(trial.peak_memory_bytes)
    hints = ["a larger --memory-budget"]
    if modern_names(config.training_args).get("activation_checkpointing") is False:  # either name
        hints.append("--gradient-checkpointing true")
    if not config.lora:
        hints.append("LoRA (a lora: section)")
    hints += ["a shorter --max-length", "bf16 on a GPU"]
    return BudgetTooSmallError(
        f"micro-batch 1 needs {needs} but the usable budget is {format_bytes(usable_bytes)}: "
        f"try {', '.join(hints)}",
        trial,
    )


class _Session:
    """One probe, as `make_plan` and `plan_ladder` share it: the backend and its usable budget (the cuda
    allocator capped there), the process group, the Prober, the probe cache in front of its trials, and
    the one list every answer the search used goes into, run or given by the cache."""

    def __init__(self, config: Config, per_device: int | None, on_trial: Callable[[Trial], None] | None,
                 trainer=None) -> None:
        sharding.check_shardable(config.training_args)
        sharded = sharding.fsdp_requested(config.training_args)
        if sharded and trainer is not None:
            raise ConfigError("plan_trainer does not plan an FSDP trainer: plan from its config with "
                              "autobatch.plan(...) or `autobatch plan` (the fsdp keys in the YAML)")
        self.config, self.on_trial = config, on_trial
        self.backend = make_backend(config.device, config.memory_budget_bytes)
        check_cpu_budget(self.backend.device, config.memory_budget_bytes)
        self.headroom = resolve_headroom(config, self.backend.device)
        self.usable = int(self.backend.budget_bytes * (1 - self.headroom))
        if self.backend.device == "cuda":
            self.backend.cap_bytes = self.usable  # the allocator itself refuses past it: a trial over is a real OOM
        # FSDP: the trials run sharded on every rank (estimate: one rank traced on a fake group of world size)
        self._scope = contextlib.ExitStack()
        group = sharded and sharding.launches_groups(self.backend.device)  # --nproc-per-node from a shell
        if sharded and ranks.current().launched and self.backend.device != "estimate":
            raise ConfigError(
                "FSDP is planned from a shell, not under a launcher (a rank's OOM inside one shared group would "
                "stall the others): autobatch plan --nproc-per-node N --output plan.yaml, then run under the "
                "launcher with --plan plan.yaml"
            )
        if sharded and not group:
            self._scope.enter_context(sharding.sharded_trials(self.backend.device, config.world_size))
        try:
            ddp = config.world_size > 1 and not sharded
            if group:
                self.search_usable = self.usable
                self.prober = GroupProber(config, self.backend.device,
                                           [self.backend.budget_bytes] * config.world_size,
                                           [self.usable] * config.world_size, per_device)
            else:
                ranks.init_group(self.backend.device, ranks.group_timeout_s(config, self.backend.device))
                self.search_usable = ranks.smallest(self.usable)  # every rank's search aims at the same line
                if trainer is None:
                    self.prober = Prober(config, self.backend, self.usable, per_device, ddp=ddp, sharded=sharded)
                else:
                    self.prober = Prober.for_trainer(trainer, self.backend, self.usable, per_device, ddp=ddp)
        except BaseException:
            self._scope.close()
            raise
        if sharded and self.backend.device == "estimate":
            self.prober.notes.append(f"FSDP: rank 0 of {config.world_size} traced on a fake process group; FSDP2 "
                                     "shards every parameter evenly (padded), so each rank's peak is this one")
        self.prober.on_trial_shown = on_trial is not None
        self.trial_process = "same" if group else trial_process(config, self.backend.device, trainer)
        self.fresh = False  # set by go_fresh: every probe from then on runs in a worker process
        self.trials: list[Trial] = []
        self.cached: list[Trial] = []  # the answers the cache gave
        self.caches = []  # the probe caches opened, in-process trials' and fresh trials' (separate workloads)
        try:  # a caller's own trainer (collator, loss, callbacks) has no fingerprint the cache could trust
            self.cache = _open_cache(config, self.prober, self.backend) if trainer is None and not group else None
        except BaseException:
            self.prober.close()
            raise
        self.run_trial = self._cached(self.prober.run_trial)

    def _cached(self, run_trial):
        """`run_trial` behind the probe cache (if any): `self.cache`'s answers first."""
        if self.cache is None:
            return run_trial
        self.caches.append(self.cache)
        return self.cache.wrap(run_trial, self.prober._accumulation, self.usable, self.cached)

    def go_fresh(self) -> None:
        """From here on every probe is a trial in a fresh worker process (`trial_process` fresh).

        The in-process prober is closed first, so its model and the allocator's cached segments are given
        back before a worker needs the device. Fresh trials have a probe-cache workload of their own: an
        in-process answer is never taken for a fresh one.
        """
        if self.fresh:
            return
        self.prober.close()
        self.fresh = True
        if self.backend.device == "cuda":  # what this process still holds is not the worker's to use
            import torch

            held = torch.cuda.memory_reserved(self.backend.device_index)
            if held > FRESH_HELD_NOTE_BYTES:
                self.prober.notes.append(f"the planning process still held {format_bytes(held)} of the GPU while "
                                         "fresh trials ran: with a budget near the card's free memory they may "
                                         "have run out early")
        if self.cache is not None:
            self.cache = _open_cache(self.config, self.prober, self.backend, self.prober.description_fresh)
        self.run_trial = self._cached(FreshTrials(self.config, self.backend, self.prober))

    def confirm(self, found: int, bound: int) -> int:
        """The search's answer judged in fresh processes: a size that fits there, the next shown not to."""
        self.go_fresh()
        try:
            return confirm_edge(self.probe, found, self.search_usable, bound)
        except BudgetTooSmallError as exc:
            raise _budget_error(exc.trial, self.usable, self.config) from None

    def probe(self, size: int) -> Trial:
        """One answer at `size`, from the cache or a trial, agreed by every rank (one rank's OOM is everyone's)."""
        raw = self.run_trial(size)
        hit = bool(self.cached) and self.cached[-1] is raw
        trial = ranks.agree(raw)  # one search path on every rank
        if hit:
            self.cached[-1] = trial  # the agreed answer is the one the search used
        self.trials.append(trial)
        if self.on_trial and not hit:
            self.on_trial(trial)
        return trial

    def search(self, needed: int | None = None, find_max: bool = False):
        """The largest micro-batch search, its budget error in the user's words."""
        try:
            return search_max_micro_batch(self.probe, self.search_usable, self.config.max_micro_batch_size,
                                          needed=needed, find_max=find_max)
        except BudgetTooSmallError as exc:
            raise _budget_error(exc.trial, self.usable, self.config) from None

    def close(self) -> None:
        """Give the trainer back; split the search's list into trials run and answers the cache gave."""
        self.prober.close()
        self._scope.close()
        self.run, self.from_cache = self.trials, []
        for cache in self.caches:
            cache.close()
        if self.cache:
            given = {id(t) for t in self.cached}
            self.run = [t for t in self.trials if id(t) not in given]
            self.from_cache = [t for t in self.trials if id(t) in given]

    def finish(self, plan: Plan, capped: bool, started: float) -> None:
        """What every plan of this probe says about its budget, device, cache and search."""
        backend, config = self.backend, self.config
        if self.cache is not None:
            plan.trials, plan.cached_trials = self.run, self.from_cache
            plan.cache_path = str(self.cache.path)
            if self.cache.broken:
                plan.notes.append(f"probe cache {self.cache.path} ignored ({self.cache.broken}); every trial ran")
            elif self.cached:
                run = "no trial run" if not plan.trials else f"{len(plan.trials)} trial(s) run"
                plan.notes.append(f"{len(self.cached)} answer(s) from the probe cache {self.cache.path}, {run} "
                                  "(--no-cache measures again)")
        plan.memory_budget_bytes, plan.usable_memory_bytes, plan.headroom = (
            backend.budget_bytes, self.usable, self.headroom)
        plan.device, plan.capped, plan.precision = backend.device, capped, self.prober.precision
        plan.notes = self.prober.notes + plan.notes
        if backend.budget_source:
            plan.notes.append(f"budget: {format_bytes(backend.budget_bytes)} from {backend.budget_source}")
        if capped:
            plan.notes.append(
                f"stopped at --max-micro-batch-size {config.max_micro_batch_size}: a larger micro-batch may fit"
            )
        if backend.device == "estimate":
            from autobatch.estimate import assumptions

            plan.assumed = assumptions(self.prober.args, backend.budget_bytes, self.prober.precision)
            plan.notes.append("estimate backend: the cuda step emulated under fake tensors, reserved bytes of an "
                              "emulated caching allocator (see `assumed`)")
        plan.memory_fingerprint = fingerprint(config)
        plan.search_seconds = time.perf_counter() - started
        plan.trial_process = "fresh" if self.fresh else "same"
        if backend.device == "cuda":  # in the probe cache's key already; `run --plan` compares it
            plan.pytorch_cuda_alloc_conf = alloc_conf()


def make_plan(
    config: Config,
    on_trial: Callable[[Trial], None] | None = None,
    on_start: Callable[[int, int | None], None] | None = None,
    on_eval_trial: Callable[[Trial], None] | None = None,
    *,
    trainer=None,
) -> Plan:
    """Probe the workload, search the largest micro-batch, and plan micro × accumulation × world size.

    `on_start(micro, eval_batch)` is called before every trial run (eval_batch None for a training trial),
    `on_trial` after each training trial, `on_eval_trial` after each evaluation trial: progress for the CLI.
    With `trainer`, the trials run on that trainer (`Prober.for_trainer`) instead of one built from `config`.
    """
    started = time.perf_counter()
    per_device = None
    if config.effective_batch_size is not None:
        per_device = check_effective_batch(config.effective_batch_size, config.world_size)
    session = _Session(config, per_device, on_trial, trainer)
    session.prober.on_start, session.prober.on_eval_trial = on_start, on_eval_trial
    stopped_at_need = False
    closing = contextlib.ExitStack()  # the probe cache of the other checkpointing setting, if opened
    try:
        if isinstance(config.per_device_train_batch_size, int):
            micro = config.per_device_train_batch_size
            if session.trial_process == "fresh":
                session.go_fresh()
            trial = session.probe(micro)
            max_micro, capped = (micro if trial.fits else 0), False
        else:  # the plan never uses more than per_device: the search stops there unless --find-max
            result = session.search(needed=per_device, find_max=config.find_max)
            max_micro, capped = result.max_micro_batch_size, result.capped
            stopped_at_need = result.stopped_at_need
            if session.trial_process == "fresh":  # the edge as a fresh run meets it (issue 19)
                bound = max_micro if stopped_at_need else config.max_micro_batch_size
                max_micro = session.confirm(max_micro, bound)
                capped = max_micro == config.max_micro_batch_size
                stopped_at_need = stopped_at_need and max_micro == bound
        plan = _choose(config, session.prober, per_device, max_micro, session.trials, session.probe)
        while session.fresh and not _last_trial(session.trials, plan.per_device_train_batch_size).fresh_process:
            # a smaller split was chosen from in-process trials: its peak, too, is the fresh process's
            micro = plan.per_device_train_batch_size
            if not session.probe(micro).fits:
                max_micro = micro - 1
                if max_micro < 1:
                    raise _budget_error(session.trials[-1], session.usable, config)
            plan = _choose(config, session.prober, per_device, max_micro, session.trials, session.probe)
        run_trial = session.run_trial
        if plan.fits and trainer is None:  # a caller's trainer keeps its own args
            plan.checkpointing, run_trial = _choose_checkpointing(session, config, plan, closing)
        if plan.fits and evaluates(config):
            plan.per_device_eval_batch_size, plan.eval_trials = _plan_eval(
                config, session.prober, plan, session.search_usable, run_trial)
            chosen = [t for t in plan.eval_trials if t.micro_batch_size == plan.per_device_eval_batch_size]
            plan.eval_peak_memory_bytes = chosen[-1].peak_memory_bytes
    finally:
        closing.close()
        session.close()
    plan.stopped_at_need = stopped_at_need  # the report's limit row says "≥ N (not searched past ...)"
    session.finish(plan, capped, started)
    return plan


def _set_checkpointing(trainer, on: bool) -> None:
    """Train with activation checkpointing `on` or off from the next trial: `train()` turns it on from the
    args (transformers Trainer.train), but only the model can turn it off again."""
    trainer.args.activation_checkpointing = trainer.args.gradient_checkpointing = on  # TRL reads the old name
    model = trainer.model
    if not on and getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()


def _choose_checkpointing(
    session: _Session, config: Config, plan: Plan, closing: contextlib.ExitStack
) -> tuple[CheckpointingChoice, Callable[..., Trial]]:
    """The checkpointing the run trains with (`planner.choose_checkpointing`), and the `run_trial` for what follows.

    The search measured checkpointing as the config has it (TRL's default: on); unless the user set it, the
    planned micro-batch is also run without it (in a fresh worker when the plan's trials are fresh), through
    the probe cache of that setting, and then with it again, back to back. When off is chosen, the plan's peak
    and speed are those measured without it, and the evaluation trials run without it too.
    """
    prober, micro = session.prober, plan.per_device_train_batch_size
    user = modern_names(config.training_args).get("activation_checkpointing")
    without_config = dataclasses.replace(
        config, training_args={**modern_names(config.training_args), "activation_checkpointing": False})
    measured: dict[bool, Trial] = {True: _last_trial(session.trials, micro)}
    if session.fresh:  # the in-process prober is closed: a worker loads the workload from the config
        run_without, run_with = FreshTrials(without_config, session.backend, prober), \
            FreshTrials(config, session.backend, prober)
    else:
        run_without = run_with = prober.run_trial

    hits: list[Trial] = []  # the answers the probe cache of that setting gave

    def trial(on: bool) -> Trial:
        nonlocal run_without
        if on in measured:
            return measured[on]
        if not session.fresh:
            _set_checkpointing(prober.trainer, False)
        if session.cache is not None:
            cache = _open_cache(without_config, prober, session.backend, _without_description(prober, without_config,
                                                                                              session.fresh))
            closing.callback(cache.close)
            run_without = cache.wrap(run_without, prober._accumulation, session.usable, hits)
        raw = run_without(micro)
        measured[on] = ranks.agree(raw)
        cached = bool(hits) and hits[-1] is raw
        if session.on_trial and not cached:
            session.on_trial(measured[on])
        # an answer from the cache is compared with the stored time with it: an identical plan runs no trial
        if measured[on].fits and not measured[on].oom and session.backend.device != "estimate" and not cached:
            # timed again with it, right after: the search's trial may be minutes old on a machine whose load moved
            if not session.fresh:
                _set_checkpointing(prober.trainer, True)
            again = ranks.agree(run_with(micro))
            if not session.fresh:
                _set_checkpointing(prober.trainer, False)
            if again.fits:
                measured[True] = dataclasses.replace(measured[True], seconds=again.seconds)
        return measured[on]

    choice = choose_checkpointing(user, micro, trial)
    if choice.chosen_by == "user":
        return choice, session.run_trial
    if choice.activation_checkpointing:
        if not session.fresh:
            _set_checkpointing(prober.trainer, True)
        return choice, session.run_trial
    plan.peak_memory_bytes, plan.seconds_per_step = measured[False].peak_memory_bytes, measured[False].seconds
    return choice, run_without


def _without_description(prober: Prober, without_config: Config, fresh: bool) -> dict:
    """The probe-cache workload of the same trials without checkpointing: the session's, with that key changed."""
    description = dict(prober.description_fresh)
    description["config"] = fingerprint(without_config)
    description["training_args"] = {**description["training_args"], "activation_checkpointing": False,
                                     "gradient_checkpointing": False}
    if not fresh:
        description.pop("trial_process")
    return description


def _open_cache(config: Config, prober: Prober, backend: MemoryBackend, description: dict | None = None):
    """The probe cache for this workload (or for `description`), or None with --no-cache.

    Also keeps, on the prober, the description of the same workload's fresh-process trials.
    """
    if config.no_cache:
        return None
    from autobatch.cache import ProbeCache, cache_path, workload_description

    if description is None:
        description = workload_description(
            fingerprint(config), prober.trainer.model, prober.args, prober.max_length, prober.padded,
            backend.identity(), config.world_size,
        )
        prober.description_fresh = {**description, "trial_process": "fresh"}
    return ProbeCache(cache_path(config.cache), description, backend.budget_bytes)


def _last_trial(trials: list[Trial], micro_batch_size: int) -> Trial:
    return [t for t in trials if t.micro_batch_size == micro_batch_size][-1]


def evaluates(config: Config) -> bool:
    """Whether the run evaluates: an eval split or fraction, and an eval strategy other than "no"."""
    args = config.training_args
    strategy = args.get("eval_strategy", args.get("evaluation_strategy", "no"))
    return bool(config.dataset_test_split or config.eval_fraction) and strategy not in ("no", None)


def _plan_eval(
    config: Config, prober: Prober, plan: Plan, usable: int, run_trial: Callable[..., Trial] | None = None
) -> tuple[int, list[Trial]]:
    """Largest eval batch that fits beside training at the planned micro-batch (forward only, no grads).

    `run_trial`: the prober's, or the probe cache's wrapper around it.
    """
    fixed = config.training_args.get("per_device_eval_batch_size")
    micro = plan.per_device_train_batch_size
    trials: list[Trial] = []
    run_trial = run_trial or prober.run_trial

    def probe(size: int) -> Trial:
        trial = ranks.agree(run_trial(micro, eval_batch_size=size))
        trials.append(trial)
        return trial

    if isinstance(fixed, int):
        if not probe(fixed).fits:
            raise AutobatchError(
                f"per_device_eval_batch_size {fixed} does not fit beside training at micro-batch {micro}: "
                "lower it or leave it out to have it planned"
            )
        return fixed, trials
    try:
        result = search_max_micro_batch(probe, usable, config.max_micro_batch_size)
    except BudgetTooSmallError:
        raise AutobatchError(
            f"evaluation at batch 1 does not fit beside training at micro-batch {micro}: "
            "set a smaller --effective-batch-size split (--micro-batch-size) or a larger --memory-budget"
        ) from None
    return result.max_micro_batch_size, trials


def _plan_ladder_eval(config: Config, session: _Session, plans: list[Plan]) -> None:
    """The eval batch of every fitting rung, searched once per distinct micro-batch (at the ladder's largest
    accumulation, the worst case); without it `run --plan` evaluates at TRL's default of 8."""
    by_micro: dict[int, tuple[int, list[Trial]]] = {}
    for plan in plans:
        if not plan.fits:
            continue
        micro = plan.per_device_train_batch_size
        if micro not in by_micro:
            by_micro[micro] = _plan_eval(config, session.prober, plan, session.search_usable, session.run_trial)
        plan.per_device_eval_batch_size, plan.eval_trials = by_micro[micro]
        chosen = [t for t in plan.eval_trials if t.micro_batch_size == plan.per_device_eval_batch_size]
        plan.eval_peak_memory_bytes = chosen[-1].peak_memory_bytes


def _measured_options(per_device: int, max_micro: int, accumulation, trials: list[Trial], probe) -> list:
    """Options fastest first, re-ranked until the fastest has been measured, not just interpolated.

    Step time is not linear in the batch (measured here on CPU: micro 16 took 0.46 s where the line
    through 2 and 64 said 0.18 s), so an interpolated winner is timed, then the ranking is redone.
    """
    while True:
        options = plan_options(per_device, max_micro, [t for t in trials if t.fits])
        if isinstance(accumulation, int):
            options = [o for o in options if o.gradient_accumulation_steps == accumulation]
            if not options:
                raise ConfigError(
                    f"gradient_accumulation_steps {accumulation} cannot reach {per_device} samples per device "
                    f"with a micro-batch ≤ {max_micro}: set it to auto"
                )
        if options[0].measured:
            return options
        if not probe(options[0].micro_batch_size).fits:  # never an unverified answer
            max_micro = options[0].micro_batch_size - 1


def _choose(config: Config, prober: Prober, per_device: int | None, max_micro: int, trials, probe) -> Plan:
    """The plan: a fixed micro-batch checked, or the fastest exact split of the per-device samples."""
    world = config.world_size
    accumulation = config.gradient_accumulation_steps
    if isinstance(config.per_device_train_batch_size, int):
        micro = config.per_device_train_batch_size
        if per_device is None:
            per_device = micro * (accumulation if isinstance(accumulation, int) else 1)
        if per_device % micro:
            raise ConfigError(
                f"per_device_train_batch_size {micro} does not divide the {per_device} samples each device needs "
                f"for effective batch {per_device * world}: pick a divisor of {per_device}"
            )
        trial = next(t for t in trials if t.micro_batch_size == micro)
        options = [Option(micro, per_device // micro, trial.seconds, measured=True)]
    elif per_device is None:  # no target: the largest micro-batch that fits, accumulation as given (auto: 1)
        trial = [t for t in trials if t.micro_batch_size == max_micro][-1]
        options = [Option(max_micro, accumulation if isinstance(accumulation, int) else 1, trial.seconds, True)]
    else:
        options = _measured_options(per_device, max_micro, accumulation, trials, probe)
    chosen = options[0]
    trial = [t for t in trials if t.micro_batch_size == chosen.micro_batch_size][-1]
    notes = []
    if per_device is not None and not isinstance(config.per_device_train_batch_size, int):
        nearby = nearby_targets(per_device, world, max_micro, trials, chosen)
        note = nearby_note(per_device * world, chosen, nearby)
        notes = [note] if note else []
    return Plan(
        per_device_train_batch_size=chosen.micro_batch_size,
        gradient_accumulation_steps=chosen.gradient_accumulation_steps,
        effective_batch_size=chosen.micro_batch_size * chosen.gradient_accumulation_steps * world,
        world_size=world,
        max_micro_batch_size=max_micro,
        memory_budget_bytes=0,
        usable_memory_bytes=0,
        headroom=0.0,
        peak_memory_bytes=trial.peak_memory_bytes,
        rank_peak_bytes=trial.rank_peak_bytes,
        device="",
        max_length=prober.max_length,
        trials=trials,
        fits=trial.fits,
        seconds_per_step=trial.seconds,
        options=options,
        notes=notes,
    )


def ladder_rungs(effective_batch_sizes: list[int] | None, max_micro: int, world: int, target: int | None) -> list[int]:
    """The effective batch sizes a sweep plans: the given ones, or m·W·2^k for k = 0..4 plus the config's target."""
    rungs = set(effective_batch_sizes or [max_micro * world * 2**k for k in range(5)])
    if target is not None:
        rungs.add(target)
    return sorted(rungs)


@dataclass
class Ladder:
    """A sweep's plans (rung order), the one trials list they share, and the dataset's size in examples and
    mean tokens per example (for time per epoch and validation budgets)."""

    plans: list[Plan]
    trials: list[Trial]  # run by this probe
    examples: int
    tokens_per_example: float
    cached_trials: list[Trial] = field(default_factory=list)  # answered by the probe cache


def plan_ladder(
    config: Config,
    effective_batch_sizes: list[int] | None = None,
    on_trial: Callable[[Trial], None] | None = None,
) -> Ladder:
    """Probe once and plan every rung of a ladder of effective batch sizes exactly.

    One probe (`_Session`: the same budget, rank agreement and probe cache as `make_plan`) and one trials
    list: the largest micro-batch is searched once, then each rung is planned by `_choose` over the shared
    trials, so a trial runs only where a rung's fastest split needs a micro-batch not yet measured (or
    cached). Trials are measured at the ladder's largest accumulation (the most micro-batches held at once:
    the worst case for every rung). Without explicit sizes the ladder is m·W·2^k, k = 0..4, plus the
    config's target; its largest micro-batch m is confirmed again at that accumulation.
    """
    import dataclasses

    started = time.perf_counter()
    world = config.world_size
    for size in effective_batch_sizes or []:
        check_effective_batch(size, world)
    if config.effective_batch_size is not None:
        check_effective_batch(config.effective_batch_size, world)
    known = ladder_rungs(effective_batch_sizes, 1, world, config.effective_batch_size) if effective_batch_sizes else []
    session = _Session(config, max(known) // world if known else None, on_trial)
    prober = session.prober
    lengths = [len(ids) for ids in prober.trainer.train_dataset["input_ids"]]
    sweep_config = dataclasses.replace(config, per_device_train_batch_size="auto", gradient_accumulation_steps="auto")
    plans: list[Plan] = []
    try:
        result = session.search()
        max_micro, capped = result.max_micro_batch_size, result.capped
        rungs = ladder_rungs(effective_batch_sizes, max_micro, world, config.effective_batch_size)
        if not known:  # the default ladder accumulates up to 16 micro-batches: confirm m holds beside them
            prober.per_device = max(rungs) // world
        if session.trial_process == "fresh":  # the edge as a fresh run meets it, at that accumulation
            max_micro = session.confirm(max_micro, config.max_micro_batch_size)
            capped = max_micro == config.max_micro_batch_size
            rungs = ladder_rungs(effective_batch_sizes, max_micro, world, config.effective_batch_size)
        elif not known:
            while max_micro > 1 and not session.probe(max_micro).fits:
                max_micro -= 1
        for rung in rungs:
            rung_config = dataclasses.replace(sweep_config, effective_batch_size=rung)
            plans.append(_choose(rung_config, prober, rung // world, max_micro, session.trials, session.probe))
        if evaluates(config):  # each rung's plan.yaml must evaluate as it trains: one eval plan per micro-batch
            _plan_ladder_eval(config, session, plans)
    finally:
        session.close()
    for plan in plans:  # every rung holds the same two lists
        session.finish(plan, capped, started)
    return Ladder(plans, session.run, len(lengths), sum(lengths) / len(lengths), session.from_cache)
