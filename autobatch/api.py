"""The Python API: plan a config or the trainer a script already built, apply the plan, run, save it.

```python
trainer = SFTTrainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[cb])
plan = autobatch.plan_trainer(trainer, memory_budget="24GiB")   # trials on this trainer; nothing it keeps changes
plan.apply(trainer)                                             # its batch × accumulation, then:
trainer.train()
```

```python
result = autobatch.sweep("sft.yaml", effective_batch_sizes=[8, 16, 32], validate_tokens=20000)
result.recommended, result.reason                   # the chosen effective batch and why
autobatch.save_plan(result.plan, "rung.yaml", result.rung_config)
```

The CLI is a thin layer over `plan`, `run` and `sweep` here: one code path, where every decision is made;
the CLI parses, prints what `report` formats and exits. Heavy imports stay inside functions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autobatch import ladder, planfile, report, rundir
from autobatch.config import (
    BUILTIN_CONFIG,
    Config,
    build_config,
    parse_memory_budget,
    validate_config,
)
from autobatch.errors import AutobatchError, ConfigError
from autobatch.ladder import EvalResult, Point, Rung
from autobatch.planner import Plan, Trial

if TYPE_CHECKING:
    from autobatch.probe import Ladder
    from autobatch.train import RunResult

ConfigLike = Config | str | os.PathLike | None
OnTrial = Callable[[Trial], None] | None


def load(config_or_path: ConfigLike = None, **overrides: Any) -> Config:
    """A validated Config: a `Config`, a YAML path, or None (the built-in tiny config unless
    `model_name_or_path` is given), with `overrides` under their YAML names (`memory_budget="300MiB"`)."""
    return _load(config_or_path, overrides)


def _load(config_or_path: ConfigLike, overrides: dict[str, Any], evaluates: bool = False) -> Config:
    """`load`; `evaluates`: the caller evaluates whatever eval_strategy says (sweep's validation runs), so eval
    data without an eval_strategy is not refused as unused."""
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
        return validate_config(config, evaluates)
    path = config_or_path
    if path is None and "model_name_or_path" not in overrides:
        path = BUILTIN_CONFIG
    return build_config(path, overrides, evaluates=evaluates, hidden=planfile.hidden_keys(path))


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


# ------------------------------------------------------------------------------------------------ sweep

@dataclass
class SweepResult:
    """What a sweep decided: every rung (its plan, measured cost, learning rate and the model's prediction), the
    recommended effective batch and why, the validation runs' eval losses. `to_dict()` is `autobatch sweep
    --json`; `save_plan(result.plan, path, result.rung_config)` writes what `sweep --output` writes."""

    rungs: list[Rung]  # rung order
    recommended: int  # the recommended effective batch size
    reason: str
    notes: list[str]
    ladder: Ladder  # the one probe's trials (run here and from the cache) and the data's tokens per example
    gradient_noise_scale: dict | None  # the report the verdict used: gns_file's, else the validation runs' best
    results: list[EvalResult]  # each validation run's per-example eval losses; empty without validate_tokens
    rung_config: Config  # the recommended rung: its batch, learning rate and own output_dir, OUTPUT_DIR/run-B{B}
    storage: str  # the optuna study's storage URL
    study_name: str
    plots: dict[str, str | None] = field(default_factory=dict)  # PNG name -> path; None: not drawn (see notes)

    @property
    def chosen(self) -> Rung:
        return next(r for r in self.rungs if r.effective_batch_size == self.recommended)

    @property
    def plan(self) -> Plan:
        """The recommended rung's plan."""
        return self.chosen.plan

    def to_dict(self) -> dict:
        return {
            "plans": [{**r.plan.to_dict(), "prediction": r.prediction()} for r in self.rungs],
            "trials": [t.to_dict() for t in self.ladder.trials],
            "cached_trials": [t.to_dict() for t in self.ladder.cached_trials],
            "gradient_noise_scale": self.gradient_noise_scale,
            "recommended_effective_batch_size": self.recommended,
            "recommendation_reason": self.reason,
            "eval_losses": ladder.eval_bars(self.results),
            "notes": self.notes,
            "study": {"storage": self.storage, "name": self.study_name},
        }


def sweep(
    config_or_path: ConfigLike = None,
    *,
    effective_batch_sizes: list[int] | str | None = None,
    lr_scaling: str | None = None,
    gns_file: str | os.PathLike | None = None,
    validate_tokens: int | None = None,
    lr_multipliers: list[float] | str | None = None,
    max_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str = ladder.STUDY_NAME,
    resume: bool = False,
    plot_dir: str | os.PathLike | None = None,
    on_checked: Callable[[Config], None] | None = None,
    on_trial: OnTrial = None,
    on_validation_budget: Callable[[tuple[int, int], int], None] | None = None,
    on_too_big: Callable[[list[int], float], None] | None = None,
    on_examples: Callable[[float, list[int], float], None] | None = None,
    on_validation_cost: Callable[[int, float], None] | None = None,
    on_validated: Callable[[Point, float, dict], None] | None = None,
    **overrides: Any,
) -> SweepResult:
    """Probe once, plan a ladder of effective batch sizes exactly, recommend one (what `autobatch sweep` does).

    The keywords are the command's flags: `effective_batch_sizes` (default m·W·2^k, k = 0..4, plus the
    config's target), `lr_scaling` ("sqrt", "linear", "none"), `gns_file` (a gns.json: its B_noise drives the
    verdict), `validate_tokens` (train each rung about that many tokens and compare eval losses), optionally at
    `lr_multipliers` of its rate, at most `max_trials` runs, none started after `timeout` seconds; the optuna
    study `study_name` in `storage` (default sqlite:///OUTPUT_DIR/sweep.db), continued with `resume`;
    `plot_dir` gets the PNGs. Arguments are checked before any work, then `on_checked(config)` is called. Along
    the way: `on_trial` per probe trial; with `validate_tokens`, `on_validation_budget((fewest, most) rungs,
    rates)` before the probe, then `on_too_big(sizes, tokens_per_example)` for rungs one step of which is past
    the budget, `on_examples(examples, sizes, tokens_per_example)` (an int when every run sees the same
    examples), `on_validation_cost(runs, seconds)` and `on_validated(point, eval_loss, measured)` per run.
    """
    config = _load(config_or_path, overrides, evaluates=bool(validate_tokens))
    sizes = _sizes(effective_batch_sizes)
    multipliers = _multipliers(lr_multipliers)
    if lr_multipliers and not validate_tokens:
        raise ConfigError("lr_multipliers needs validate_tokens N (the rates are compared by training)",
                          keys=("lr_multipliers", "validate_tokens"))
    if validate_tokens is not None and validate_tokens < 1:
        raise ConfigError("validate_tokens must be a positive number of tokens, e.g. validate_tokens 20000",
                          keys=("validate_tokens",))
    if validate_tokens and config.device == "estimate":
        raise ConfigError("validate_tokens trains, and device estimate cannot: use device cpu or cuda",
                          keys=("validate_tokens", "device"))
    if lr_scaling is not None and lr_scaling not in ladder.LR_RULES:
        raise ConfigError(f"lr_scaling {lr_scaling!r}: use one of {', '.join(ladder.LR_RULES)}", keys=("lr_scaling",))
    gns_report = read_gns_file(gns_file) if gns_file else None
    plots = _plot_dir(plot_dir)
    if on_checked:
        on_checked(config)
    from autobatch.probe import evaluates, plan_ladder

    output_dir = str(rundir.check_output_dir(config))
    storage = storage or ladder.default_storage(output_dir)
    # A study that may exist is opened (and refused without resume) before minutes of probing; a new
    # default one is created after the probe, so a sweep that fails there leaves nothing on disk.
    study = ladder.open_study(storage, study_name, resume) if not ladder.is_new(storage) else None
    if study is not None:
        ladder.check_validation_budget(study, validate_tokens)  # before the probe
    if validate_tokens and on_validation_budget:
        on_validation_budget(_validation_rungs(config, sizes), len(multipliers))
    planned = plan_ladder(config, sizes, on_trial=on_trial)
    if study is None:
        study = ladder.open_study(storage, study_name, resume)
    rungs, recommended, reason, notes = _verdict(config, planned, lr_scaling, gns_report)
    points = [Point(r, r.learning_rate * m, m) for r in rungs for m in multipliers]
    results: list[EvalResult] = []
    if validate_tokens:
        recommended, reason, gns_report, verdict_notes, results = _validate(
            config, study, points, planned, gns_report, output_dir, validate_tokens, max_trials, timeout,
            on_too_big, on_examples, on_validation_cost, on_validated)
        notes += verdict_notes
        ladder.predict(rungs, _usable_noise_scale(gns_report, rungs, notes))
    else:
        ladder.record_predictions(study, points, "predicted time to target" if gns_report else "epoch seconds")
    result = SweepResult(rungs, recommended, reason, notes, planned, gns_report, results,
                         _rung_config(config, rungs, recommended, output_dir, evaluates(config)), storage, study_name)
    if plots is not None:
        result.plots = _plot_sweep(plots, study, result)
    return result


def _sizes(value: list[int] | str | None) -> list[int] | None:
    if not value:
        return None
    return ladder.parse_sizes(value if isinstance(value, str) else ",".join(map(str, value)))


def _multipliers(value: list[float] | str | None) -> list[float]:
    if not value:
        return [1.0]
    return ladder.parse_floats(value if isinstance(value, str) else ",".join(map(str, value)), "lr_multipliers")


def read_gns_file(path: str | os.PathLike) -> dict:
    """A gns.json written by `autobatch run --gns` (`gns.write_report`), checked."""
    try:
        noise = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"gns_file {path}: cannot read it ({exc}); write one with autobatch run --gns",
                          keys=("gns_file",)) from None
    if not isinstance(noise, dict) or "low" not in noise or "b_simple" not in noise:
        raise ConfigError(f"gns_file {path}: not a gns.json written by autobatch run --gns", keys=("gns_file",))
    return noise


def _plot_dir(path: str | os.PathLike | None) -> Path | None:
    """The plot directory, matplotlib checked and the directory made before any work; None without one."""
    if not path:
        return None
    from autobatch import plots

    plots.require()
    return plots.plot_dir(str(path))


def _validation_rungs(config: Config, sizes: list[int] | None) -> tuple[int, int]:
    """How many rungs validation will train, known before the probe: (fewest, most), as the default ladder
    m·W·2^k for k = 0..4 gains the target only when it is not one of them."""
    if sizes:
        from autobatch.probe import ladder_rungs

        count = len(ladder_rungs(sizes, 1, config.world_size, config.effective_batch_size))
        return count, count
    return (5, 5) if config.effective_batch_size is None else (5, 6)


def _verdict(config: Config, planned: Ladder, rule: str | None, gns_report: dict | None):
    """Rungs with their learning rates and predictions, the recommended effective batch, its reason, notes.

    The base rate is the config's `learning_rate` (SFTConfig's default without one) at the config's
    effective batch (the smallest rung without one)."""
    from trl import SFTConfig

    args = config.training_args
    base_lr = args.get("learning_rate", SFTConfig.__dataclass_fields__["learning_rate"].default)
    rule = rule or ladder.default_lr_rule(str(args.get("optim", "adamw_torch")))
    plans = planned.plans
    base_batch = config.effective_batch_size or plans[0].effective_batch_size
    notes: list[str] = []
    b_noise = _usable_noise_scale(gns_report, plans, notes)
    rungs = ladder.make_rungs(plans, planned.examples, base_lr=base_lr, base_batch=base_batch, lr_rule=rule,
                              b_noise=b_noise)
    recommended, reason = ladder.recommend(rungs, b_noise, lora=config.lora is not None)
    notes += ladder.notes(rungs, config.lora is not None)
    if gns_report and not gns_report.get("resolved"):
        notes.append(report.unresolved_gns_note(gns_report))
    notes.append(report.lr_note(rule, base_lr, base_batch, b_noise))
    return rungs, recommended, reason, notes


def _usable_noise_scale(gns_report: dict | None, rungs: list, notes: list[str]) -> float | None:
    """B_noise when resolved and not below the smallest rung; else None, the reason added to `notes` once."""
    b_noise = gns_report.get("b_simple") if gns_report and gns_report.get("resolved") else None
    sizes = [r.effective_batch_size for r in rungs]
    if ladder.noise_scale_below_rungs(b_noise, sizes):
        note = report.noise_below_rungs_note(b_noise, min(sizes))
        if note not in notes:
            notes.append(note)
        return None
    return b_noise


def _validate(config: Config, study, points: list[Point], planned: Ladder, gns_report: dict | None,
              output_dir: str, tokens: int, max_trials: int | None, timeout: float | None,
              on_too_big, on_examples, on_validation_cost, on_validated):
    """Validation runs as study trials: the rungs one step of which fits the token budget, each on the same
    examples where it can. Returns (recommended B, reason, noise report, notes, eval results)."""
    import optuna

    device = planned.plans[0].device
    too_big = sorted({p.rung.effective_batch_size for p in points
                      if p.rung.effective_batch_size * planned.tokens_per_example > tokens})
    points = [p for p in points if p.rung.effective_batch_size not in too_big]
    if too_big and on_too_big:
        on_too_big(too_big, planned.tokens_per_example)
    if not points:
        raise ConfigError(f"validate_tokens {tokens} is less than one optimizer step at every rung: raise it",
                          keys=("validate_tokens",))
    sizes = sorted({p.rung.effective_batch_size for p in points})
    examples = ladder.validation_examples(tokens, sizes, planned.tokens_per_example)
    if on_examples:
        on_examples(examples, sizes, planned.tokens_per_example)
    if on_validation_cost:
        on_validation_cost(len(points), sum(ladder.validation_steps(examples, p.rung) * p.rung.seconds_per_optimizer_step
                                            for p in points))

    def validate(point: Point, trial) -> tuple[float, dict]:
        name = f"B{point.rung.effective_batch_size}-lr{point.learning_rate:.3g}-trial{trial.number}"
        loss, attrs = ladder.validate_point(config, point, examples, device, str(Path(output_dir) / "validate" / name))
        if on_validated:
            on_validated(point, loss, attrs)
        return loss, attrs

    ladder.check_validation_budget(study, tokens, examples)
    ladder.run_validation_study(study, points, validate, max_trials, timeout)
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.params.get("effective_batch_size") in sizes]  # a resumed study may hold other rungs
    noise = gns_report or ladder.best_noise_scale(
        [t.user_attrs["gradient_noise_scale"] for t in done if t.user_attrs.get("gradient_noise_scale")])
    if not done:
        raise AutobatchError("no validation trial finished: raise timeout or max_trials, then resume",
                             keys=("timeout", "max_trials", "resume"))
    seen = report.seen_text(examples, tokens)
    results = [EvalResult(t.params["effective_batch_size"], t.params["learning_rate"], t.user_attrs["eval_losses"],
                          t.user_attrs.get("lr_multiplier", 1.0)) for t in done if t.user_attrs.get("eval_losses")]
    if results and len(results) == len(done):
        verdict = ladder.judge(results, {p.rung.effective_batch_size: p.rung.tokens_per_s for p in points})
        reason, notes = ladder.verdict_text(verdict, planned.tokens_per_example, seen)
        return verdict.recommended, reason, noise, notes, results
    best = min(done, key=lambda t: t.value)  # a study from before per-example losses were stored
    reason = report.lowest_loss_reason(seen, best.value, best.params["learning_rate"])
    return best.params["effective_batch_size"], reason, noise, [report.NO_ERROR_BARS_NOTE], []


def _rung_config(config: Config, rungs: list[Rung], recommended: int, output_dir: str, evaluating: bool) -> Config:
    """The recommended rung as a config to run: its batch and rate, and its own output_dir (training into the
    sweep's folder would land the model beside sweep.db); eval data only the validation runs used is dropped
    when the config does not evaluate (a run without eval_strategy refuses it)."""
    chosen = next(r for r in rungs if r.effective_batch_size == recommended)
    rung_config = dataclasses.replace(
        config, effective_batch_size=recommended,
        training_args={**config.training_args, "learning_rate": chosen.learning_rate,
                       "output_dir": str(Path(output_dir).resolve() / f"run-B{recommended}")})
    if not evaluating:
        rung_config = dataclasses.replace(rung_config, eval_fraction=None, dataset_test_split=None)
    return rung_config


def _plot_sweep(directory: Path, study, result: SweepResult) -> dict[str, str | None]:
    """memory.png, time_to_target.png (None when no usable noise scale predicts it), and from validation runs
    eval_loss.png (the verdict's losses with their error bars), loss_vs_tokens.png (training loss) and
    noise_scale.png. Returns each PNG's path by name, in the order drawn."""
    import optuna

    from autobatch import plots

    written: dict[str, str | None] = {}
    plan, noise = result.plan, result.gradient_noise_scale
    if plan.trials:
        written["memory.png"] = str(plots.plot_memory(plan.trials, plan.usable_memory_bytes, plan.memory_budget_bytes,
                                                      plan.per_device_train_batch_size, directory))
    if noise and not any(r.time_to_target_s is not None for r in result.rungs):
        written["time_to_target.png"] = None
    else:
        written["time_to_target.png"] = str(plots.plot_time_to_target(result.rungs, result.recommended, directory))
    if result.results:
        bars = ladder.eval_bars(result.results)
        written["eval_loss.png"] = str(plots.plot_eval_losses(bars, result.recommended, directory))
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    curves = {f"B={t.params['effective_batch_size']} lr={t.params['learning_rate']:.3g}": t.user_attrs["loss_curve"]
              for t in done if t.user_attrs.get("loss_curve")}
    if curves:
        written["loss_vs_tokens.png"] = str(plots.plot_loss_curves(curves, directory))
    if noise and noise.get("history"):
        written["noise_scale.png"] = str(plots.plot_noise_scale(noise, directory))
    return written
