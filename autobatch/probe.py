"""Planning: `make_plan` and `plan_ladder` tie trials, the probe cache, search and planner together.

A planning session (`_Session`) owns the backend and its usable budget, the process group, one prober
(autobatch.trial) and the probe cache in front of its trials; the search, the checkpointing and evaluation
choices and the sweep's ladder of effective batch sizes ask it for answers and build the plans from them.

One module over ~600 lines on purpose: `make_plan` and `plan_ladder` are two uses of one `_Session` and its
private helpers (the choice of a split, checkpointing, the eval batch, the probe cache); one trial is
autobatch.trial's, the search and arithmetic autobatch.planner's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from autobatch import ranks, sharding
from autobatch.cache import ProbeCache, cache_path, workload_description
from autobatch.config import Config, eval_strategy, modern_names
from autobatch.errors import AutobatchError, BudgetTooSmallError, ConfigError
from autobatch.estimate import assumptions
from autobatch.memory import MemoryBackend, alloc_conf, check_cpu_budget, default_device, make_backend
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
)
from autobatch.trial import FreshTrials, GroupProber, Prober
from autobatch.units import format_bytes
from autobatch.workload import fingerprint

CUDA_DEFAULT_HEADROOM = 0.05  # fragmentation and kernel workspaces the peak counters do not show
#: Reserved bytes the planning process may keep (its CUDA context is outside them) before a plan says so.
FRESH_HELD_NOTE_BYTES = 64 * 2**20


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
    hints = ["a larger memory_budget"]
    if modern_names(config.training_args).get("activation_checkpointing") is False:  # either name
        hints.append("gradient_checkpointing true")
    if not config.lora:
        hints.append("LoRA (a lora: section)")
    hints += ["a shorter max_length", "bf16 on a GPU"]
    return BudgetTooSmallError(
        f"micro-batch 1 needs {needs} but the usable budget is {format_bytes(usable_bytes)}: "
        f"try {', '.join(hints)}",
        trial, keys=("memory_budget", "gradient_checkpointing", "max_length"),
    )


class _Session:
    """One probe, as `make_plan` and `plan_ladder` share it: the backend and its usable budget (the cuda
    allocator capped there), the process group, the Prober, the probe cache in front of its trials, and
    the one list every answer the search used goes into, run or given by the cache. After `close`, `build`
    makes each plan, once, with all its facts."""

    def __init__(self, config: Config, per_device: int | None, on_trial: Callable[[Trial], None] | None,
                 trainer=None) -> None:
        sharding.check_shardable(config.training_args)
        sharded = sharding.fsdp_requested(config.training_args)
        if sharded and trainer is not None:
            raise ConfigError("plan_trainer does not plan an FSDP trainer: plan from its config with "
                              "autobatch.plan(...) or `autobatch plan` (the fsdp keys in the YAML)")
        self.config, self.on_trial = config, on_trial
        # FSDP: the trials run sharded on every rank (estimate: one rank traced on a fake group of world size)
        group = sharded and sharding.launches_groups(config.device or default_device())  # from a shell
        self.backend = make_backend(config.device, config.memory_budget_bytes, coordinator=group)
        check_cpu_budget(self.backend.device, config.memory_budget_bytes)
        self.headroom = resolve_headroom(config, self.backend.device)
        self.usable = self.backend.keep_headroom(self.headroom)  # on cuda a trial past it is a real OOM
        self._scope = contextlib.ExitStack()
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
        return self.cache.wrap(run_trial, self.prober._accumulation, self.usable)

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
        trial = ranks.agree(self.run_trial(size))  # one search path on every rank; a cache answer stays marked
        self.trials.append(trial)
        if self.on_trial and not trial.cached:
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
            self.run = [t for t in self.trials if not t.cached]
            self.from_cache = [t for t in self.trials if t.cached]

    def build(self, choice: _Choice, *, capped: bool, started: float, stopped_at_need: bool = False,
              checkpointing: CheckpointingChoice | None = None, evaluation: dict | None = None) -> Plan:
        """The plan of `choice`, built once after `close` with every fact this probe knows: its budget, device,
        cache and search. `evaluation`: the eval batch's fields (`_plan_eval`), when the run evaluates."""
        backend, config, prober = self.backend, self.config, self.prober
        option, trial = choice.options[0], choice.trial
        assumed = None
        if backend.device == "estimate":
            assumed = assumptions(prober.args, backend.budget_bytes, prober.precision)
        return Plan(
            per_device_train_batch_size=option.micro_batch_size,
            gradient_accumulation_steps=option.gradient_accumulation_steps,
            effective_batch_size=option.micro_batch_size * option.gradient_accumulation_steps * config.world_size,
            world_size=config.world_size,
            max_fitting_micro_batch_size=choice.max_micro,
            memory_budget_bytes=backend.budget_bytes,
            usable_memory_bytes=self.usable,
            headroom=self.headroom,
            peak_memory_bytes=trial.peak_memory_bytes,
            device=backend.device,
            max_length=prober.max_length,
            trials=self.run,
            fits=trial.fits,
            capped=capped,
            seconds_per_micro_batch=trial.seconds_per_micro_batch,
            options=choice.options,
            notes=self._notes(choice.notes, capped),
            memory_fingerprint=fingerprint(config),
            search_seconds=time.perf_counter() - started,
            precision=prober.precision,
            cached_trials=self.from_cache,
            cache_path=None if self.cache is None else str(self.cache.path),
            stopped_at_need=stopped_at_need,  # the report's limit row says "≥ N (not searched past ...)"
            checkpointing=checkpointing,
            assumed=assumed,
            trial_process="fresh" if self.fresh else "same",
            # in the probe cache's key already; `run --plan` compares it
            pytorch_cuda_alloc_conf=alloc_conf() if backend.device == "cuda" else None,
            rank_peak_bytes=trial.rank_peak_bytes,
            **(evaluation or {}),
        )

    def _notes(self, own: list[str], capped: bool) -> list[str]:
        """The prober's notes, the choice's own, then what the cache, budget, cap and backend add."""
        backend, cache = self.backend, self.cache
        notes = [*self.prober.notes, *own]
        if cache is not None and cache.broken:
            notes.append(f"probe cache {cache.path} ignored ({cache.broken}); every trial ran")
        elif cache is not None and (hits := sum(c.hits for c in self.caches)):
            run = "no trial run" if not self.run else f"{len(self.run)} trial(s) run"
            notes.append(f"{hits} answer(s) from the probe cache {cache.path}, {run} "
                         "(no_cache measures again)")
        if backend.budget_source:
            notes.append(f"budget: {format_bytes(backend.budget_bytes)} from {backend.budget_source}")
        if capped:
            notes.append(
                f"stopped at max_micro_batch_size {self.config.max_micro_batch_size}: a larger micro-batch may fit"
            )
        if backend.device == "estimate":
            notes.append("estimate backend: the cuda step emulated under fake tensors, reserved bytes of an "
                         "emulated caching allocator (see `assumed`)")
        return notes


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
    The process environment is left as found (`sharding.environment_kept`).
    """
    with sharding.environment_kept():
        if trainer is None and _fsdp_under_launcher(config):  # the same plan as from a shell, on every rank
            device = config.device or default_device()
            return ranks.planned_on_rank_0(lambda: _make_plan(config, on_trial, on_start, on_eval_trial, None),
                                           device, ranks.group_timeout_s(config, device))
        return _make_plan(config, on_trial, on_start, on_eval_trial, trainer)


def _fsdp_under_launcher(config: Config) -> bool:
    """FSDP trials are groups rank 0 launches (`ranks.planned_on_rank_0`); a traced estimate needs no group."""
    return (sharding.fsdp_requested(config.training_args) and ranks.current().launched
            and config.device != "estimate")


def _make_plan(config: Config, on_trial, on_start, on_eval_trial, trainer) -> Plan:
    started = time.perf_counter()
    per_device = None
    if config.effective_batch_size is not None:
        per_device = check_effective_batch(config.effective_batch_size, config.world_size)
    session = _Session(config, per_device, on_trial, trainer)
    session.prober.on_start, session.prober.on_eval_trial = on_start, on_eval_trial
    stopped_at_need = False
    checkpointing, evaluation = None, None
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
        choice = _choose(config, per_device, max_micro, session.trials, session.probe)
        while session.fresh and not _last_trial(session.trials, choice.micro_batch_size).fresh_process:
            # a smaller split was chosen from in-process trials: its peak, too, is the fresh process's
            micro = choice.micro_batch_size
            if not session.probe(micro).fits:
                max_micro = micro - 1
                if max_micro < 1:
                    raise _budget_error(session.trials[-1], session.usable, config)
            choice = _choose(config, per_device, max_micro, session.trials, session.probe)
        run_trial = session.run_trial
        # a caller's trainer keeps its own args; FSDP trial groups train the config's setting (their ranks are
        # launched from the config, with no trainer here to switch)
        if choice.trial.fits and trainer is None and not isinstance(session.prober, GroupProber):
            checkpointing, run_trial, without = _choose_checkpointing(session, config, choice.micro_batch_size,
                                                                      closing)
            if without is not None:  # trained without it: the plan's peak and speed are those measured so
                choice = dataclasses.replace(choice, trial=without)
        if choice.trial.fits and evaluates(config):
            evaluation = _plan_eval(config, session.prober, choice.micro_batch_size, session.search_usable, run_trial)
    finally:
        closing.close()
        session.close()
    return session.build(choice, capped=capped, started=started, stopped_at_need=stopped_at_need,
                         checkpointing=checkpointing, evaluation=evaluation)


def _set_checkpointing(trainer, on: bool) -> None:
    """Train with activation checkpointing `on` or off from the next trial: `train()` turns it on from the
    args (transformers Trainer.train), but only the model can turn it off again."""
    trainer.args.activation_checkpointing = trainer.args.gradient_checkpointing = on  # TRL reads the old name
    model = trainer.model
    if not on and getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()


def _choose_checkpointing(
    session: _Session, config: Config, micro: int, closing: contextlib.ExitStack
) -> tuple[CheckpointingChoice, Callable[..., Trial], Trial | None]:
    """The checkpointing the run trains with (`planner.choose_checkpointing`), the `run_trial` for what follows,
    and the trial without it when that is what the run trains with (None otherwise).

    The search measured checkpointing as the config has it (TRL's default: on); unless the user set it, the
    planned micro-batch `micro` is also run without it (in a fresh worker when the plan's trials are fresh),
    through the probe cache of that setting, and then with it again, back to back. When off is chosen, the
    plan's peak and speed are those measured without it, and the evaluation trials run without it too.
    """
    prober = session.prober
    user = modern_names(config.training_args).get("activation_checkpointing")
    without_config = dataclasses.replace(
        config, training_args={**modern_names(config.training_args), "activation_checkpointing": False})
    measured: dict[bool, Trial] = {True: _last_trial(session.trials, micro)}
    if session.fresh:  # the in-process prober is closed: a worker loads the workload from the config
        run_without, run_with = FreshTrials(without_config, session.backend, prober), \
            FreshTrials(config, session.backend, prober)
    else:
        run_without = run_with = prober.run_trial

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
            run_without = cache.wrap(run_without, prober._accumulation, session.usable)
        measured[on] = ranks.agree(run_without(micro))
        cached = measured[on].cached
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
                measured[True] = dataclasses.replace(measured[True], seconds_per_micro_batch=again.seconds_per_micro_batch)
        return measured[on]

    choice = choose_checkpointing(user, micro, trial)
    if choice.chosen_by == "user":
        return choice, session.run_trial, None
    if choice.activation_checkpointing:
        if not session.fresh:
            _set_checkpointing(prober.trainer, True)
        return choice, session.run_trial, None
    return choice, run_without, measured[False]


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
    return bool(config.dataset_test_split or config.eval_fraction) and eval_strategy(config) != "no"


def _plan_eval(
    config: Config, prober: Prober, micro: int, usable: int, run_trial: Callable[..., Trial] | None = None
) -> dict:
    """Largest eval batch that fits beside training at micro-batch `micro` (forward only, no grads), as the plan's
    fields: the batch, its trials and its peak (training, then evaluation, optimizer state alive).

    `run_trial`: the prober's, or the probe cache's wrapper around it.
    """
    fixed = config.training_args.get("per_device_eval_batch_size")
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
        return _eval_fields(fixed, trials)
    try:
        result = search_max_micro_batch(probe, usable, config.max_micro_batch_size)
    except BudgetTooSmallError:
        raise AutobatchError(
            f"evaluation at batch 1 does not fit beside training at micro-batch {micro}: "
            "set a smaller effective_batch_size split (per_device_train_batch_size) or a larger memory_budget",
            keys=("effective_batch_size", "per_device_train_batch_size", "memory_budget"),
        ) from None
    return _eval_fields(result.max_micro_batch_size, trials)


def _eval_fields(size: int, trials: list[Trial]) -> dict:
    peak = [t for t in trials if t.micro_batch_size == size][-1].peak_memory_bytes
    return {"per_device_eval_batch_size": size, "eval_trials": trials, "eval_peak_memory_bytes": peak}


def _plan_ladder_eval(config: Config, session: _Session, choices: list[_Choice]) -> dict[int, dict]:
    """The eval batch of every fitting rung by its micro-batch, searched once per distinct micro-batch (at the
    ladder's largest accumulation, the worst case); without it `run --plan` evaluates at TRL's default of 8."""
    by_micro: dict[int, dict] = {}
    for choice in choices:
        micro = choice.micro_batch_size
        if choice.trial.fits and micro not in by_micro:
            by_micro[micro] = _plan_eval(config, session.prober, micro, session.search_usable, session.run_trial)
    return by_micro


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


@dataclass
class _Choice:
    """A split chosen over the trials so far: what the plan trains with, before the probe's facts are added."""

    options: list[Option]  # fastest first: the first is the plan's
    trial: Trial  # the chosen micro-batch's measurement: the plan's peak, speed and fit
    max_micro: int  # the largest micro-batch the choice could use
    notes: list[str]

    @property
    def micro_batch_size(self) -> int:
        return self.options[0].micro_batch_size


def _choose(config: Config, per_device: int | None, max_micro: int, trials, probe) -> _Choice:
    """A fixed micro-batch checked, or the fastest exact split of the per-device samples."""
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
        options = [Option(micro, per_device // micro, trial.seconds_per_micro_batch, measured=True)]
    elif per_device is None:  # no target: the largest micro-batch that fits, accumulation as given (auto: 1)
        trial = [t for t in trials if t.micro_batch_size == max_micro][-1]
        steps = accumulation if isinstance(accumulation, int) else 1
        options = [Option(max_micro, steps, trial.seconds_per_micro_batch, True)]
    else:
        options = _measured_options(per_device, max_micro, accumulation, trials, probe)
    chosen = options[0]
    trial = [t for t in trials if t.micro_batch_size == chosen.micro_batch_size][-1]
    notes = []
    if per_device is not None and not isinstance(config.per_device_train_batch_size, int):
        nearby = nearby_targets(per_device, world, max_micro, trials, chosen)
        note = nearby_note(per_device * world, chosen, nearby)
        notes = [note] if note else []
    return _Choice(options, trial, max_micro, notes)


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
    if sharding.fsdp_requested(config.training_args):
        raise ConfigError("sweep does not plan FSDP jobs yet: plan each effective batch with autobatch plan "
                          "instead (nproc_per_node N, effective_batch_size B, the same fsdp settings)",
                          keys=("fsdp", "nproc_per_node", "effective_batch_size"))
    started = time.perf_counter()
    world = config.world_size
    for size in effective_batch_sizes or []:
        check_effective_batch(size, world, "effective_batch_sizes")
    if config.effective_batch_size is not None:
        check_effective_batch(config.effective_batch_size, world)
    known = ladder_rungs(effective_batch_sizes, 1, world, config.effective_batch_size) if effective_batch_sizes else []
    session = _Session(config, max(known) // world if known else None, on_trial)
    prober = session.prober
    lengths = [len(ids) for ids in prober.trainer.train_dataset["input_ids"]]
    sweep_config = dataclasses.replace(config, per_device_train_batch_size="auto", gradient_accumulation_steps="auto")
    choices: list[_Choice] = []
    evaluations: dict[int, dict] = {}
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
            choices.append(_choose(rung_config, rung // world, max_micro, session.trials, session.probe))
        if evaluates(config):  # each rung's plan.yaml must evaluate as it trains: one eval plan per micro-batch
            evaluations = _plan_ladder_eval(config, session, choices)
    finally:
        session.close()
    plans = [session.build(choice, capped=capped, started=started,  # every rung holds the same two lists
                           evaluation=evaluations.get(choice.micro_batch_size) if choice.trial.fits else None)
             for choice in choices]
    return Ladder(plans, session.run, len(lengths), sum(lengths) / len(lengths), session.from_cache)
