"""The Python API: plan a config or the trainer a script already built, apply the plan, run, save it.

```python
trainer = SFTTrainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[cb])
plan = autobatch.plan_trainer(trainer, memory_budget="24GiB")   # trials on this trainer; nothing it keeps changes
plan.apply(trainer)                                             # its batch × accumulation, then:
trainer.train()
```

The CLI is a thin layer over `plan` and `run` here: one code path. Heavy imports stay inside functions.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from autobatch import planfile
from autobatch.config import (
    BUILTIN_CONFIG,
    Config,
    build_config,
    parse_memory_budget,
    validate_config,
)
from autobatch.errors import AutobatchError, ConfigError
from autobatch.planner import Plan, Trial

if TYPE_CHECKING:
    from autobatch.train import RunResult

ConfigLike = Config | str | os.PathLike | None
OnTrial = Callable[[Trial], None] | None


def load(config_or_path: ConfigLike = None, **overrides: Any) -> Config:
    """A validated Config: a `Config`, a YAML path, or None (the built-in tiny config unless
    `model_name_or_path` is given), with `overrides` under their YAML names (`memory_budget="300MiB"`)."""
    if isinstance(config_or_path, Config):
        if not overrides:
            return config_or_path
        names = {f.name for f in dataclasses.fields(Config)} - {"training_args"}
        fields = {k: v for k, v in overrides.items() if k in names}
        training = {k: v for k, v in overrides.items() if k not in names}
        if "memory_budget" in training:
            fields["memory_budget_bytes"] = parse_memory_budget(training.pop("memory_budget"), "memory_budget")
        config = dataclasses.replace(
            config_or_path, **fields, training_args={**config_or_path.training_args, **training}
        )
        return validate_config(config)
    path = config_or_path
    if path is None and "model_name_or_path" not in overrides:
        path = BUILTIN_CONFIG
    return build_config(path, overrides, hidden=planfile.hidden_keys(path))


def plan(
    config_or_path: ConfigLike = None,
    *,
    on_trial: OnTrial = None,
    on_start: Callable[[int, int | None], None] | None = None,
    on_eval_trial: OnTrial = None,
    **overrides: Any,
) -> Plan:
    """Probe the config's workload and plan micro-batch × accumulation × world size (what `autobatch plan` does).

    `on_trial` is called with each Trial as it finishes (the CLI prints them); `on_start(micro, eval_batch)`
    before each trial runs, `on_eval_trial` after each evaluation trial.
    """
    from autobatch.probe import make_plan

    return make_plan(load(config_or_path, **overrides), on_trial=on_trial, on_start=on_start,
                     on_eval_trial=on_eval_trial)


def run_plan(
    config: Config,
    plan_file: Plan | str | os.PathLike | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_trial: OnTrial = None,
    on_start: Callable[[int, int | None], None] | None = None,
    on_eval_trial: OnTrial = None,
) -> Plan:
    """The plan a run trains with: `plan_file` (a Plan, or a plan.yaml checked against the config), else with
    `resume` the plan saved in output_dir (or the newest checkpoint's batch), else a fresh probe.

    The one home of a run's preconditions (output dir state, checkpoint for `resume`, eval data): checked here
    first, before torch and probing, once per run; `train_plan` then trains without checking again."""
    from autobatch import rundir

    rundir.check_can_run(config, resume=resume, overwrite=overwrite)
    if isinstance(plan_file, Plan):
        return plan_file
    from autobatch.probe import make_plan

    if plan_file is not None:
        plan = planfile.load_plan(str(plan_file), config)
        if resume:
            planfile.check_resume_batch(config, plan, str(plan_file))
        return plan
    if resume:
        return planfile.resume_plan(config)
    return make_plan(config, on_trial=on_trial, on_start=on_start, on_eval_trial=on_eval_trial)


def run(
    config_or_path: ConfigLike = None,
    *,
    plan: Plan | str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list | None = None,
    on_fallback: Callable | None = None,
    on_trial: OnTrial = None,
    stop=None,
    **overrides: Any,
) -> RunResult:
    """Plan (or take `plan`: a Plan or a plan.yaml path), then train with SFTTrainer (`autobatch run`).

    `resume` continues from the newest complete checkpoint in output_dir; `overwrite` trains over an earlier
    run there; `stop` is the `autobatch.interrupt` handle that turns SIGTERM/SIGINT into a checkpoint.
    """
    config = load(config_or_path, **overrides)
    plan = run_plan(config, plan, resume=resume, overwrite=overwrite, on_trial=on_trial)
    return train_plan(config, plan, resume=resume, overwrite=overwrite, callbacks=callbacks,
                      on_fallback=on_fallback, stop=stop)


def train_plan(
    config: Config,
    plan: Plan,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list | None = None,
    on_fallback: Callable | None = None,
    stop=None,
) -> RunResult:
    """Train the plan `run_plan` gave for `config` (its preconditions were checked there, so not again here):
    `run` is `run_plan` then this; the CLI prints and saves the plan in between."""
    from autobatch import train

    if not plan.fits:
        raise AutobatchError(f"micro-batch {plan.per_device_train_batch_size} does not fit the memory budget: "
                             "plan with per_device_train_batch_size='auto' or a larger memory_budget")
    return train.run(config, plan, resume=resume, overwrite=overwrite, callbacks=callbacks,
                     on_fallback=on_fallback, stop=stop)


def plan_trainer(
    trainer,
    effective_batch_size: int | None = None,
    memory_budget: int | str | None = None,
    device: str | None = None,
    *,
    headroom: float | None = None,
    max_micro_batch_size: int = 512,
    on_trial: OnTrial = None,
) -> Plan:
    """Probe `trainer` itself and plan its batch; the trainer is given back as it was.

    The trials are the CLI's (two optimizer steps of the trainer's own `train()` on copies of the longest
    example of its train dataset), so its model, PEFT, data collator, `compute_loss`, optimizer settings and
    callbacks are in the measurement. Weights, gradients, optimizer, scheduler, state, callbacks and RNG are
    as before (see `autobatch.snapshot`). `effective_batch_size` defaults to the trainer's own
    (per_device_train_batch_size × gradient_accumulation_steps × world size); `memory_budget` is bytes or
    "24GiB"; `device` is "cuda" or "cpu" (default: where the trainer trains).
    """
    from autobatch.probe import make_plan

    return make_plan(trainer_config(trainer, effective_batch_size, memory_budget, device, headroom,
                                    max_micro_batch_size), on_trial=on_trial, trainer=trainer)


def trainer_config(trainer, effective_batch_size=None, memory_budget=None, device=None, headroom=None,
                   max_micro_batch_size: int = 512) -> Config:
    """The Config `make_plan` reads for a trainer: budget and target from the caller, the rest from its args."""
    args = trainer.args
    trains_on = "cuda" if args.device.type == "cuda" else "cpu"
    if device == "estimate":
        raise ConfigError("device='estimate' cannot probe a built trainer (its weights are real): "
                          "leave device out, or plan from a config with autobatch.plan(..., device='estimate')")
    if device not in (None, trains_on):
        raise ConfigError(f"device={device!r} but the trainer trains on {trains_on}: leave device out")
    world = args.world_size
    if effective_batch_size is None:
        effective_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    model_config = getattr(trainer.model, "config", None)
    overrides = {
        "model_name_or_path": getattr(model_config, "_name_or_path", "") or type(trainer.model).__name__,
        "device": trains_on,
        "memory_budget": memory_budget,
        "headroom": headroom,
        "effective_batch_size": effective_batch_size,
        "max_micro_batch_size": max_micro_batch_size,
        "world_size": world,
    }
    if trainer.eval_dataset is not None and str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "no":
        overrides["dataset_test_split"] = "eval_dataset"  # the trainer's own: plan the eval batch too
        overrides["eval_strategy"] = "steps"
    return build_config(None, {k: v for k, v in overrides.items() if v is not None})


def apply_plan(trainer, plan: Plan, *, oom_fallback: bool = False):
    """Set the plan's micro-batch, accumulation (and eval batch) on `trainer`, so `trainer.train()` runs it.

    With `oom_fallback`, an OOM mid-run splits the micro-batch instead of ending the run (the effective
    batch stays exact; `trainer.fallbacks` lists each event): the trainer's class becomes a subclass of
    its own with `autobatch.train`'s fallback mixed in. Returns the trainer.
    """
    args = trainer.args
    if plan.world_size != args.world_size:
        raise ConfigError(f"the plan is for world size {plan.world_size} but the trainer runs on {args.world_size}: "
                          "plan under the same launcher")
    if not plan.fits:
        raise AutobatchError(f"micro-batch {plan.per_device_train_batch_size} does not fit: nothing applied")
    args.per_device_train_batch_size = plan.per_device_train_batch_size
    args.gradient_accumulation_steps = plan.gradient_accumulation_steps
    if plan.per_device_eval_batch_size:
        args.per_device_eval_batch_size = plan.per_device_eval_batch_size
    trainer._train_batch_size = args.train_batch_size  # Trainer.__init__ cached the old one here
    if oom_fallback and not hasattr(trainer, "splits"):
        from autobatch.train import trainer_class

        trainer.__class__ = trainer_class(type(trainer))
        trainer.fallbacks, trainer.eval_fallbacks, trainer.on_fallback = [], [], None
    return trainer


def save_plan(plan: Plan, path: str | os.PathLike, config: ConfigLike = None) -> str:
    """Write the plan atomically: `.json` as `to_dict()`, anything else as plan.yaml (the config with the
    planned batch, for `trl sft --config` / `autobatch run --plan`). Returns the path written."""
    return planfile.write_plan(plan, path, None if config is None else load(config))
