"""A sweep's rungs and their cost, the noise-scale model's verdict, the validation verdict, the optuna study.

`autobatch.sweep` (in `api`) decides with these: which rungs to validate, at what rate, which one wins. The
cost of a rung is measured (one probe, `probe.plan_ladder`): seconds per micro-batch at the worst-case
length, hence tokens/s, seconds per optimizer step and time per epoch. What a rung buys is a model's
prediction (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"): with the gradient noise
scale B_noise, reaching a given loss takes S = S_min·(1 + B_noise/B) optimizer steps, so a rung's sample
efficiency is 1/(1 + B/B_noise) and its time to that loss is S·(seconds per step). Predictions are labelled
as such; only validation runs (`validate_tokens`) measure loss. Messages name the sweep's keyword arguments
(`validate_tokens`), which the CLI says as its flags (`--validate-tokens`). Past 600 lines as the one home of a
sweep's numbers and their study; the validation run (`validate_point`) is the part to move out if it grows.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass

from autobatch.errors import ConfigError
from autobatch.planner import Plan

LORA_LARGE_BATCH = 32  # LoRA fine-tunes are reported to degrade past this effective batch (warned, not refused)
LR_RULES = ("sqrt", "linear", "none")


@dataclass
class Rung:
    """One effective batch size: its exact plan, its measured cost, and (with B_noise) the model's verdict."""

    plan: Plan
    tokens_per_s: float  # at the worst-case length, all devices
    seconds_per_optimizer_step: float
    steps_per_epoch: int
    epoch_seconds: float
    learning_rate: float
    lr_rule: str
    sample_efficiency: float | None = None  # 1/(1 + B/B_noise): predicted, not measured
    relative_steps: float | None = None  # S/S_min = 1 + B_noise/B: predicted
    time_to_target_s: float | None = None  # S_min·(1 + B_noise/B)·s/step, in units of S_min = 1 step: predicted

    @property
    def effective_batch_size(self) -> int:
        return self.plan.effective_batch_size

    def prediction(self) -> dict:
        data = asdict(self)
        del data["plan"]
        return data


def parse_sizes(text: str, key: str = "effective_batch_sizes") -> list[int]:
    """`8,16,32` -> [8, 16, 32]; every size a positive integer."""
    problem = ConfigError(f"{key} {text!r}: write positive integers separated by commas, e.g. 8,16,32", keys=(key,))
    try:
        sizes = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise problem from None
    if not sizes or min(sizes) < 1:
        raise problem
    return sizes


def parse_floats(text: str, key: str) -> list[float]:
    """`0.5,1,2` -> [0.5, 1.0, 2.0]; every value positive."""
    problem = ConfigError(f"{key} {text!r}: write positive numbers separated by commas, e.g. 0.5,1,2", keys=(key,))
    try:
        values = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise problem from None
    if not values or min(values) <= 0:
        raise problem
    return values


def default_lr_rule(optim: str) -> str:
    """sqrt for Adam-family optimizers (Malladi et al. 2022, the SDE scaling rule), linear for SGD."""
    return "linear" if "sgd" in optim.lower() else "sqrt"


def scaled_learning_rate(
    base_lr: float, base_batch: int, batch: int, rule: str, b_noise: float | None = None
) -> float:
    """The rate for `batch` from the config's rate at `base_batch`, by `rule`; never raised past B_noise.

    Past the noise scale larger batches stop reducing gradient noise, so the rate stops growing there.
    """
    if rule == "none":
        return base_lr
    ceiling = max(base_batch, b_noise) if b_noise else math.inf
    ratio = min(batch, ceiling) / base_batch if batch > base_batch else batch / base_batch
    return base_lr * (math.sqrt(ratio) if rule == "sqrt" else ratio)


def make_rungs(
    plans: list[Plan],
    examples: int,
    *,
    base_lr: float,
    base_batch: int,
    lr_rule: str,
    b_noise: float | None = None,
) -> list[Rung]:
    """Measured cost and, given B_noise, predicted efficiency and time to the same loss, per rung."""
    rungs = []
    for plan in plans:
        batch = plan.effective_batch_size
        step = plan.seconds_per_micro_batch * plan.gradient_accumulation_steps
        tokens = plan.per_device_train_batch_size * plan.world_size * plan.max_length
        steps = math.ceil(examples / batch) if examples else 0
        rung = Rung(
            plan=plan,
            tokens_per_s=tokens / plan.seconds_per_micro_batch if plan.seconds_per_micro_batch > 0 else 0.0,
            seconds_per_optimizer_step=step,
            steps_per_epoch=steps,
            epoch_seconds=steps * step,
            learning_rate=scaled_learning_rate(base_lr, base_batch, batch, lr_rule, b_noise),
            lr_rule=lr_rule,
        )
        rungs.append(rung)
    return predict(rungs, b_noise)


def predict(rungs: list[Rung], b_noise: float | None) -> list[Rung]:
    """Fill each rung's predicted efficiency, relative steps and time to the same loss from B_noise."""
    for rung in rungs:
        batch = rung.effective_batch_size
        if b_noise:
            rung.sample_efficiency = 1 / (1 + batch / b_noise)
            rung.relative_steps = 1 + b_noise / batch
            rung.time_to_target_s = rung.relative_steps * rung.seconds_per_optimizer_step
        else:
            rung.sample_efficiency = rung.relative_steps = rung.time_to_target_s = None
    return rungs


def recommend(rungs: list[Rung], b_noise: float | None, lora: bool = False) -> tuple[int, str]:
    """The recommended effective batch and why.

    With B_noise: the fastest predicted time to the same loss among rungs at most B_noise (sample efficiency
    ≥ 50%, McCandlish's critical batch); past it extra batch mostly buys compute, not time. Without it: the
    rung with the most tokens/s, with no claim about loss.
    """
    pool = [r for r in rungs if not lora or r.effective_batch_size <= LORA_LARGE_BATCH] or rungs
    if b_noise:
        efficient = [r for r in pool if r.effective_batch_size <= b_noise] or [min(pool, key=_batch)]
        best = min(efficient, key=lambda r: (r.time_to_target_s, r.effective_batch_size))
        return best.effective_batch_size, (
            f"fastest predicted time to the same loss among rungs with B <= B_noise {b_noise:.0f} "
            f"(sample efficiency {best.sample_efficiency:.0%}); a model's prediction until validated"
        )
    best = max(pool, key=lambda r: (round(r.tokens_per_s, 6), -r.effective_batch_size))
    return best.effective_batch_size, (
        "most tokens/s measured; no gradient noise scale, so nothing is predicted about loss "
        "(pass gns_file from `autobatch run --gns`, or validate_tokens)"
    )


def _batch(rung: Rung) -> int:
    return rung.effective_batch_size


def notes(rungs: list[Rung], lora: bool) -> list[str]:
    """Warnings a sweep's reader needs beside the table."""
    out = []
    if lora and any(r.effective_batch_size > LORA_LARGE_BATCH for r in rungs):
        out.append(f"LoRA: effective batches past {LORA_LARGE_BATCH} are reported to train worse than small ones "
                   "at the same tokens; validate before choosing one")
    return out


# ------------------------------------------------------------------------------------------- the study

STUDY_NAME = "autobatch-sweep"
HEARTBEAT_S = 2  # a trial whose process died is seen as failed after 2 heartbeats (optuna's grace period)
PARAMS = ("effective_batch_size", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate")


@dataclass
class Point:
    """One trial of the study: a rung at a learning rate (× a multiplier when validating)."""

    rung: Rung
    learning_rate: float
    multiplier: float = 1.0

    def params(self) -> dict:
        plan = self.rung.plan
        return {"effective_batch_size": plan.effective_batch_size,
                "per_device_train_batch_size": plan.per_device_train_batch_size,
                "gradient_accumulation_steps": plan.gradient_accumulation_steps,
                "learning_rate": self.learning_rate}


SQLITE = "sqlite:///"


def default_storage(output_dir: str) -> str:
    """sqlite:///OUTPUT_DIR/sweep.db (the directory is made when the study is opened)."""
    return SQLITE + os.path.abspath(os.path.join(output_dir, "sweep.db"))


def _new_sqlite_file(storage_url: str) -> str | None:
    """The path of an SQLite storage whose file is not made yet (no study there to refuse or resume)."""
    path = storage_url[len(SQLITE):] if storage_url.startswith(SQLITE) else None
    return path if path and not os.path.exists(path) else None


def is_new(storage_url: str) -> bool:
    return _new_sqlite_file(storage_url) is not None


def open_study(storage_url: str, name: str, resume: bool):
    """The study, its schema created once here before any trial runs; heartbeats mark a killed trial failed and
    RetryFailedTrialCallback queues it again. Without `resume`, an existing study with trials is refused."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    new_file = _new_sqlite_file(storage_url)
    if new_file:
        os.makedirs(os.path.dirname(new_file) or ".", exist_ok=True)
    try:
        with _quiet_optuna():
            storage = RDBStorage(storage_url, heartbeat_interval=HEARTBEAT_S, grace_period=2 * HEARTBEAT_S,
                                 heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
    except (ValueError, ImportError, SQLAlchemyError) as exc:  # a bad URL, an unreachable database
        raise ConfigError(f"storage {storage_url}: cannot open it ({type(exc).__name__}: {exc})",
                          keys=("storage",)) from None
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)
    if study.trials and not resume:
        raise ConfigError(f"storage {storage_url} already holds study {name!r} with {len(study.trials)} trials: "
                          "pass resume to continue it, or another output_dir / storage",
                          keys=("storage", "resume", "output_dir"))
    return study


@contextlib.contextmanager
def _quiet_optuna():
    """Heartbeats and their retry callback are marked experimental by optuna; that is not the user's news."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _key(params: dict) -> tuple:
    """A point is its effective batch and rate; its micro-batch split may differ between probes (timing)."""
    return params.get("effective_batch_size"), round(params.get("learning_rate", 0.0), 12)


def _distributions() -> dict:
    """Fixed ranges, so a resumed study with another ladder or split stays compatible with the stored one."""
    from optuna.distributions import FloatDistribution, IntDistribution

    ints = IntDistribution(1, 2**24)
    return {"effective_batch_size": ints, "per_device_train_batch_size": ints, "gradient_accumulation_steps": ints,
            "learning_rate": FloatDistribution(0.0, 10.0)}


def record_predictions(study, points: list[Point], objective_name: str) -> int:
    """Each point not in the study yet, as a complete trial: its measured cost and predicted objective."""
    import optuna

    done = {_key(t.params) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
    added = 0
    for point in points:
        if _key(point.params()) in done:
            continue
        rung = point.rung
        value = rung.time_to_target_s if rung.time_to_target_s is not None else rung.epoch_seconds
        study.add_trial(optuna.trial.create_trial(
            params=point.params(), distributions=_distributions(), value=value,
            user_attrs={**_measured(rung), "objective": objective_name},
        ))
        added += 1
    return added


def _measured(rung: Rung) -> dict:
    plan = rung.plan
    return {"peak_memory_bytes": plan.peak_memory_bytes, "tokens_per_s": rung.tokens_per_s,
            "seconds_per_optimizer_step": rung.seconds_per_optimizer_step, "epoch_seconds": rung.epoch_seconds,
            "predicted_time_to_target": rung.time_to_target_s, "sample_efficiency": rung.sample_efficiency,
            "lr_rule": rung.lr_rule}


def _fail_dead_trials(study, fail_stale_trials) -> None:
    """Fail (and, by the retry callback, queue again once) the trials a killed sweep left RUNNING.

    Resumed within the heartbeat grace period of the kill, their heartbeat is not stale yet: they were
    queued again here, then failed and retried by optuna at the next trial start, so one point ran twice.
    Waiting out the grace period (at most a few seconds, only while such a trial exists) lets optuna fail
    each one first, and its retry is the only copy queued.
    """
    import time

    import optuna

    running = (optuna.trial.TrialState.RUNNING,)
    storage = study._storage
    grace = getattr(storage, "grace_period", None) or 2 * HEARTBEAT_S
    deadline = time.monotonic() + grace + (getattr(storage, "heartbeat_interval", None) or HEARTBEAT_S) + 1
    while True:
        with _quiet_optuna():
            fail_stale_trials(study)
        if not study.get_trials(deepcopy=False, states=running) or time.monotonic() > deadline:
            return
        time.sleep(0.25)


def check_validation_budget(study, tokens: int | None, examples: float | None = None) -> None:
    """A study's validation runs all train on one budget: a resumed sweep with another --validate-tokens is
    refused, so a result is never labelled with examples it did not see. The first sweep records it."""
    stored_tokens = study.user_attrs.get("validate_tokens")
    stored_examples = study.user_attrs.get("validate_examples")
    if tokens is None or stored_tokens is None and examples is None:
        return
    if stored_tokens not in (None, tokens) or (examples is not None and stored_examples not in (None, examples)):
        raise ConfigError(
            f"validate_tokens {tokens}: the study's validation runs trained with validate_tokens {stored_tokens} "
            f"({stored_examples} examples each); resume with validate_tokens {stored_tokens}, or validate the new "
            "budget into another output_dir / storage", keys=("validate_tokens", "output_dir", "storage")
        )
    if examples is not None:
        study.set_user_attr("validate_tokens", tokens)
        study.set_user_attr("validate_examples", examples)


class ProbeMiss(Exception):
    """A validation run ran out of memory at a point the probe said fits: a failed trial, flagged, not a crash."""


def _queued_key(trial) -> tuple:
    """A trial's point: its params over the ones it was queued with. A sweep killed between a trial's suggest
    calls leaves some params set, and its retry copies only those: keyed on them alone, its point looked
    missing and was queued (and trained) a second time."""
    return _key({**trial.system_attrs.get("fixed_params", {}), **trial.params})


def run_validation_study(study, points: list[Point], validate, max_trials: int | None, timeout_s: float | None):
    """Every point without a complete trial is queued once, then run by `study.optimize` (validate(point,
    trial) -> (eval loss, user attrs)). Trials left running by a killed sweep are failed first (stale
    heartbeat) and queued again by the retry callback, so each point ends with exactly one complete trial."""
    import optuna
    from optuna.storages import fail_stale_trials

    states = optuna.trial.TrialState
    _fail_dead_trials(study, fail_stale_trials)
    by_key = {_key(p.params()): p for p in points}
    # RUNNING left after the wait: a live process is heartbeating it; its point is not queued twice either
    seen = {_queued_key(t) for t in study.get_trials(deepcopy=False,
                                                     states=(states.COMPLETE, states.WAITING, states.RUNNING))}
    for key, point in by_key.items():
        if key not in seen:
            study.enqueue_trial(point.params(), skip_if_exists=False)
    waiting = len(study.get_trials(deepcopy=False, states=(states.WAITING,)))
    if max_trials is not None:
        waiting = min(waiting, max_trials)
    def objective(trial) -> float:
        params = {k: trial.suggest_float(k, 0.0, 10.0) if k == "learning_rate" else trial.suggest_int(k, 1, 2**24)
                  for k in PARAMS}
        point = by_key[_key(params)]
        try:
            loss, attrs = validate(point, trial)
        except Exception as exc:  # only an OOM is a result here; anything else stops the sweep
            from autobatch.memory import is_oom

            if not is_oom(exc):
                raise
            trial.set_user_attr("probe_miss", True)  # the probe said this point fits; the run said otherwise
            trial.set_user_attr("error", " ".join(str(exc).split())[:500])
            raise ProbeMiss(f"B={point.rung.effective_batch_size}: out of memory in a validation run") from None
        for name, value in {**_measured(point.rung), **attrs, "lr_multiplier": point.multiplier}.items():
            trial.set_user_attr(name, value)
        return loss

    if waiting:
        study.optimize(objective, n_trials=waiting, timeout=timeout_s, catch=(ProbeMiss,))
    return study


# ---------------------------------------------------------------------------------------- validation runs


EQUAL_EXAMPLES_SLACK = 0.5  # how far from the asked budget the common example count may land


def common_examples(tokens: int, sizes: list[int], tokens_per_example: float) -> int | None:
    """How many examples every rung trains on: the multiple of every B nearest the token budget. With the same
    seed and data order each rung then sees the same examples, so eval losses compare at exactly equal tokens.
    None when that multiple is more than half the budget off it (each rung then rounds to its own whole steps)."""
    target = tokens / tokens_per_example
    step = math.lcm(*sizes)
    examples = step * max(1, round(target / step))
    return examples if abs(examples - target) <= EQUAL_EXAMPLES_SLACK * target else None


def validation_examples(tokens: int, sizes: list[int], tokens_per_example: float) -> float:
    """The examples each validation run trains on: `common_examples` when there is one (an int: the same examples
    for every rung), else the budget's (a float: each rung rounds to its own whole steps)."""
    examples = common_examples(tokens, sizes, tokens_per_example)
    return examples if examples is not None else tokens / tokens_per_example


def validation_steps(examples: float, rung: Rung) -> int:
    """Optimizer steps for a rung to train on about `examples` examples: the same data for every rung."""
    return max(1, round(examples / rung.effective_batch_size))


def gns_split(micro: int, accumulation: int) -> tuple[int, int]:
    """The plan's split, or half the micro-batch × 2 when it does not accumulate: the same effective batch (the
    smaller micro-batch fits too), with the small/big gradient pair the noise scale needs."""
    if accumulation == 1 and micro % 2 == 0:
        return micro // 2, 2
    return micro, accumulation


def validate_point(config, point: Point, examples: float, device: str, output_dir: str,
                   on_gns=None) -> tuple[float, dict]:
    """A fresh SFTTrainer at the point's plan and rate, same seed and data order, trained on about `examples`
    examples; returns (eval loss, what was measured: tokens seen, wall time, loss curve keyed by tokens, gns)."""
    import time as _time

    from autobatch import gns as gns_module
    from autobatch.train import _datasets
    from autobatch.workload import build_trainer, sft_config

    plan = point.rung.plan
    steps = validation_steps(examples, point.rung)
    micro, accumulation = gns_split(plan.per_device_train_batch_size, plan.gradient_accumulation_steps)
    args, _ = sft_config(
        config, device, output_dir, per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation, learning_rate=point.learning_rate,
        max_steps=steps, save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True,
        report_to="none", include_num_input_tokens_seen="non_padding",
    )
    train, evaluation = _datasets(config)
    if evaluation is None:  # a held-out tenth, the same for every point
        parts = train.train_test_split(test_size=0.1, seed=0)
        train, evaluation = parts["train"], parts["test"]
    trainer = build_trainer(config, args, train_dataset=train, eval_dataset=evaluation)
    from transformers import PrinterCallback, ProgressCallback

    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    callback = gns_module.gns_callback().attach(trainer)
    trainer.add_callback(callback)
    started = _time.perf_counter()
    trainer.train()
    seconds = _time.perf_counter() - started
    eval_loss = trainer.evaluate()["eval_loss"]
    losses = per_example_losses(trainer)
    curve = [{"tokens": e.get("num_input_tokens_seen"), "loss": e["loss"]}
             for e in trainer.state.log_history if "loss" in e]
    noise = callback.report(resamples=200)
    callback.detach()
    if on_gns:
        on_gns(point, noise)
    seen = trainer.state.num_input_tokens_seen
    return eval_loss, {"eval_loss": eval_loss, "tokens_seen": int(seen), "steps": steps, "wall_seconds": seconds,
                       "trained_micro_batch_size": micro, "trained_gradient_accumulation_steps": accumulation,
                       "loss_curve": curve, "gradient_noise_scale": _plain(noise),
                       "eval_losses": [round(v, 6) for v in losses]}


def per_example_losses(trainer) -> list[float]:
    """Mean token loss of every eval example, in the eval loader's (sequential) order: the same examples in the
    same order for every validation run, so rungs compare example by example. The eval batch is the run's."""
    import torch

    model = trainer.model
    model.eval()
    losses: list[float] = []
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            batch = trainer._prepare_inputs(batch)
            labels = batch["labels"]
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
            logits = model(**inputs).logits[:, :-1]
            target = labels[:, 1:]
            token = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), target, ignore_index=-100,
                                                      reduction="none")
            counted = (target != -100).sum(1)
            losses.extend((token.sum(1) / counted.clamp(min=1)).tolist())
            del logits, token
    return losses


def _plain(report: dict) -> dict:
    """A gns report with infinities as None (optuna stores JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in report.items()}


def best_noise_scale(reports: list[dict]) -> dict | None:
    """Of the validation runs' gns reports, the resolved one with the narrowest relative interval; else the one
    with the highest lower bound, then the most steps (a run without a small/big pair measured none)."""
    resolved = [r for r in reports if r.get("resolved")]
    if not resolved:
        return max(reports, key=lambda r: (r.get("low") or 0, r.get("steps") or 0), default=None)
    return min(resolved, key=lambda r: (r["high"] - r["low"]) / r["b_simple"])


# ------------------------------------------------------------------------------- the verdict and its noise

NOISE_Z = 2.0  # a difference counts when it is more than twice its standard error (about 95%, two-sided)


def standard_error(values: list[float]) -> float:
    """The standard error of the mean of `values` (sample standard deviation / √n); inf for fewer than 2."""
    n = len(values)
    if n < 2:
        return math.inf
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def difference(a: list[float], b: list[float]) -> tuple[float, float, bool]:
    """mean(b) − mean(a), its standard error, and whether it was paired. The same eval examples in the same
    order (equal lengths) are compared example by example, which cancels what the examples share (a hard
    example is hard for every rung); otherwise the two standard errors add in quadrature."""
    if len(a) == len(b) and len(a) >= 2:
        diffs = [y - x for x, y in zip(a, b)]
        return sum(diffs) / len(diffs), standard_error(diffs), True
    mean_a = sum(a) / len(a) if a else math.nan
    mean_b = sum(b) / len(b) if b else math.nan
    return mean_b - mean_a, math.hypot(standard_error(a), standard_error(b)), False


@dataclass
class EvalResult:
    """One validation run's eval losses, one per eval example in the eval set's order."""

    effective_batch_size: int
    learning_rate: float
    losses: list[float]
    multiplier: float = 1.0  # of the rung's scaled rate (--lr-multipliers)

    @property
    def mean(self) -> float:
        return sum(self.losses) / len(self.losses)

    @property
    def sem(self) -> float:
        return standard_error(self.losses)


@dataclass
class Verdict:
    """What the validation runs say, noise included: a winner only beyond it."""

    best: EvalResult  # lowest mean eval loss, each rung at its best tried rate
    per_rung: dict[int, EvalResult]  # each rung at its best tried rate
    tied: list[int]  # rungs whose difference from the best is within NOISE_Z standard errors
    paired: bool  # every comparison was example by example
    unresolved: dict[int, str]  # rungs whose best rate is at the grid's edge: "highest" or "lowest"
    eval_examples: int
    examples_needed: int | None = None  # eval examples that would resolve the closest tie (estimate)
    recommended: int = 0

    @property
    def resolved(self) -> bool:
        return not self.tied


def judge(results: list[EvalResult], speed: dict[int, float] | None = None, z: float = NOISE_Z) -> Verdict:
    """Compare validation runs: each rung at its best tried learning rate, then rungs against the best.

    A rung within `z` standard errors of the best is tied with it; among tied rungs the recommendation is
    the fastest (`speed`: tokens/s per rung), since loss cannot tell them apart. The eval examples that would
    separate the closest tie follow from the standard error's 1/√n: n·(z·se/d)². A rung whose best rate was
    the highest or lowest of two or more tried is unresolved: its best may lie past the grid.
    """
    by_rung: dict[int, list[EvalResult]] = {}
    for result in results:
        by_rung.setdefault(result.effective_batch_size, []).append(result)
    per_rung, unresolved = {}, {}
    for batch, runs in sorted(by_rung.items()):
        best = min(runs, key=lambda r: r.mean)
        per_rung[batch] = best
        rates = sorted(r.learning_rate for r in runs)
        if len(rates) >= 2 and best.learning_rate in (rates[0], rates[-1]):
            unresolved[batch] = "highest" if best.learning_rate == rates[-1] else "lowest"
    best = min(per_rung.values(), key=lambda r: (r.mean, r.effective_batch_size))
    tied, paired, factor = [], True, 0.0
    for batch, other in per_rung.items():
        if batch == best.effective_batch_size:
            continue
        gap, se, was_paired = difference(best.losses, other.losses)
        paired = paired and was_paired
        if not gap > z * se:
            tied.append(batch)
            factor = math.inf if gap <= 0 or not math.isfinite(se) else max(factor, (z * se / gap) ** 2)
    examples = len(best.losses)
    needed = None if not tied or not math.isfinite(factor) else math.ceil(examples * factor)
    pool = [best.effective_batch_size, *tied]
    recommended = max(pool, key=lambda b: ((speed or {}).get(b, 0.0), -b)) if tied else best.effective_batch_size
    return Verdict(best, per_rung, sorted(tied), paired, unresolved, examples, needed, recommended)


def verdict_text(verdict: Verdict, tokens_per_example: float, seen: str) -> tuple[str, list[str]]:
    """The recommendation's reason and the notes beside it, error bars included."""
    best = verdict.best
    how = "paired over the same eval examples" if verdict.paired else "unpaired"
    bar = f"{best.mean:.4f} ± {best.sem:.4f}"
    notes = []
    if len(verdict.per_rung) == 1:
        reason = (f"the only rung validated (eval loss after {seen}: {bar} at learning rate "
                  f"{best.learning_rate:.3g}); nothing to compare it with")
    elif verdict.resolved:
        reason = (f"lowest eval loss after {seen} (measured: {bar} at learning rate {best.learning_rate:.3g}; "
                  f"every other rung is more than {NOISE_Z:g} standard errors worse, {how})")
    else:
        tied = ", ".join(str(b) for b in [best.effective_batch_size, *verdict.tied])
        reason = (f"rungs {tied} are indistinguishable at this budget (eval losses within {NOISE_Z:g} standard "
                  f"errors, {how}; lowest {bar} at B={best.effective_batch_size}): the fastest of them is "
                  "recommended")
        if verdict.examples_needed is not None:
            more = verdict.examples_needed / max(verdict.eval_examples, 1)
            notes.append(f"to tell them apart: about {verdict.examples_needed} eval examples "
                         f"(≈{verdict.examples_needed * tokens_per_example:,.0f} tokens, {more:.1f}× the "
                         f"{verdict.eval_examples} used; a larger dataset_test_split or eval_fraction), or more "
                         "validate_tokens if the runs keep drifting apart")
        else:
            notes.append("no difference measured at all between the tied rungs: a larger eval set or more "
                         "validate_tokens may separate them")
    for batch, edge in verdict.unresolved.items():
        side = "raise" if edge == "highest" else "lower"
        notes.append(f"B={batch}: its best learning rate {verdict.per_rung[batch].learning_rate:.3g} is the {edge} "
                     f"tried, so B={batch} is unresolved (its best may lie past the grid): {side} lr_multipliers "
                     "past the edge to compare it at its own best rate")
    return reason, notes


def noise_scale_below_rungs(b_noise: float | None, sizes: list[int]) -> bool:
    """B_noise below the smallest rung: every rung is past it, so the model's efficiency and time-to-target
    columns would compare rungs all on the flat part of the curve, numbers with nothing behind them."""
    return bool(b_noise) and bool(sizes) and b_noise < min(sizes)


def eval_bars(results: list[EvalResult]) -> list[dict]:
    """Per rung and rate: mean eval loss and its standard error, for the loss plot and --json."""
    return [{"effective_batch_size": r.effective_batch_size, "learning_rate": r.learning_rate,
             "lr_multiplier": r.multiplier, "eval_loss": r.mean, "standard_error": r.sem, "examples": len(r.losses)}
            for r in results]
