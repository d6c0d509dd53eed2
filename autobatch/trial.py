"""One trial: a workload's peak memory and step time at one micro-batch size, measured by its own `train()`.

A trial is SFTTrainer's own `train()` for two optimizer steps — forward with labels through TRL's
`compute_loss` (fused LM head), backward, gradient clipping, optimizer step, zero_grad — on copies of
the longest example the run can produce. Two steps, because AdamW's moments appear at the first
`step()` and a one-step trial under-counts by them (measured on a tiny Llama); two micro-batches per
step when the run accumulates, because the second backward adds into existing gradients.

`Prober` runs trials in this process (on a trainer built once, or a caller's own), `FreshTrials` each in a
worker process of its own, `GroupProber` each in a fresh FSDP process group. Planning (which sizes to try,
the cache in front, the plan) is autobatch.probe's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable

from autobatch import launch, ranks, sharding
from autobatch.config import Config, modern_names
from autobatch.errors import ConfigError, WorkerError
from autobatch.memory import MemoryBackend, is_oom
from autobatch.planner import Trial, steady_seconds
from autobatch.snapshot import TrainerSnapshot, ZeroLearningRate, trial_callbacks
from autobatch.units import format_bytes
from autobatch.workload import build_trainer, load_train_dataset, sft_config

logger = logging.getLogger(__name__)

#: Optimizer steps a timed trial runs: the first is warm-up (AdamW's state created, the allocator growing,
#: kernels loaded lazily), the median of the rest is the step time options are ranked by (`steady_seconds`).
#: Two steps already give the peak; a trial that times nothing (estimate backend, evaluation) runs two.
TIMED_TRIAL_STEPS = 4
MEMORY_TRIAL_STEPS = 2
#: A trial worker still running after this long is hung: the whole process group is ended (autobatch.launch).
#: A trial is a model load and two steps; an hour covers a large model read from a slow disk.
TRIAL_TIMEOUT_S = 3600.0
#: What a trial worker (trial_worker, fsdp_worker) imports before its work: launch's warm process imports it once.
WORKER_IMPORTS = ("torch", "transformers", "datasets", "peft", "trl.trainer.sft_trainer", "autobatch.trial")


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
        trial = Trial(size, peak, fits=not oom and peak <= self.usable_bytes, seconds_per_micro_batch=seconds,
                      oom=oom,
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
    """One line a trial: `micro=16 fits peak=31.2GiB (78% of budget) 0.42 s/micro-batch`."""
    verdict = "fits" if trial.fits else ("OOM" if trial.oom else "does not fit")
    share = 100 * trial.peak_memory_bytes / usable_bytes
    return (
        f"micro={trial.micro_batch_size} {verdict} peak={format_bytes(trial.peak_memory_bytes)} "
        f"({share:.0f}% of budget) {trial.seconds_per_micro_batch:.2f} s/micro-batch"
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
                                       TRIAL_TIMEOUT_S, env=self._device_env(), imports=WORKER_IMPORTS)
        except WorkerError as exc:  # which trial, then what happened to it
            what = f"eval batch {eval_batch_size} after micro-batch" if eval_batch_size else "micro-batch"
            raise WorkerError(f"trial of {what} {micro_batch_size}: {exc}", exc.kind, exc.rank) from None
        trial = Trial.from_dict(result["trial"], fresh_process=True)
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
                              "or eval_strategy no", keys=("per_device_eval_batch_size", "eval_strategy"))
        if self.on_start:
            self.on_start(micro_batch_size, None)
        with tempfile.TemporaryDirectory(prefix="autobatch-fsdp-") as report_dir:
            failed = None
            try:
                launch.run_group(self.nproc, "autobatch.fsdp_worker", self.spec(micro_batch_size, report_dir),
                                 self.timeout_s, imports=WORKER_IMPORTS)
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
            return Trial(micro_batch_size, max(known) if known else max(self.budgets) + 1, fits=False, seconds_per_micro_batch=0.0,
                         oom=True,
                         rank_peak_bytes=[p if p is not None else -1 for p in peaks], fresh_process=True)
        trials = [by_rank[r]["trial"] for r in range(self.nproc)]
        return Trial(micro_batch_size, max(peaks), fits=all(t["fits"] for t in trials),
                     seconds_per_micro_batch=max(t["seconds"] for t in trials), oom=any(t["oom"] for t in trials),
                     peak_allocated_bytes=max(t["peak_allocated_bytes"] or 0 for t in trials),
                     rank_peak_bytes=peaks, fresh_process=True)

    def close(self) -> None:
        pass
