"""`autobatch sweep`: a ladder of effective batch sizes, what each costs here, a verdict, and an optuna study.

The cost of a rung is measured (one probe, `probe.plan_ladder`): seconds per micro-batch at the worst-case
length, hence tokens/s, seconds per optimizer step and time per epoch. What a rung buys is a model's
prediction (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"): with the gradient noise
scale B_noise, reaching a given loss takes S = S_min·(1 + B_noise/B) optimizer steps, so a rung's sample
efficiency is 1/(1 + B/B_noise) and its time to that loss is S·(seconds per step). Predictions are labelled
as such; only validation runs (`--validate-tokens`) measure loss.
"""

from __future__ import annotations

import math
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


def parse_sizes(text: str, flag: str = "--effective-batch-sizes") -> list[int]:
    """`8,16,32` -> [8, 16, 32]; every size a positive integer."""
    try:
        sizes = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: write positive integers separated by commas, e.g. 8,16,32") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"{flag} {text!r}: write positive integers separated by commas, e.g. 8,16,32")
    return sizes


def parse_floats(text: str, flag: str) -> list[float]:
    """`0.5,1,2` -> [0.5, 1.0, 2.0]; every value positive."""
    try:
        values = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: write positive numbers separated by commas, e.g. 0.5,1,2") from None
    if not values or min(values) <= 0:
        raise ConfigError(f"{flag} {text!r}: write positive numbers separated by commas, e.g. 0.5,1,2")
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
        step = plan.seconds_per_step * plan.gradient_accumulation_steps
        tokens = plan.per_device_train_batch_size * plan.world_size * plan.max_length
        steps = math.ceil(examples / batch) if examples else 0
        rung = Rung(
            plan=plan,
            tokens_per_s=tokens / plan.seconds_per_step if plan.seconds_per_step > 0 else 0.0,
            seconds_per_optimizer_step=step,
            steps_per_epoch=steps,
            epoch_seconds=steps * step,
            learning_rate=scaled_learning_rate(base_lr, base_batch, batch, lr_rule, b_noise),
            lr_rule=lr_rule,
        )
        if b_noise:
            rung.sample_efficiency = 1 / (1 + batch / b_noise)
            rung.relative_steps = 1 + b_noise / batch
            rung.time_to_target_s = rung.relative_steps * step
        rungs.append(rung)
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
        "(pass --gns-file from `autobatch run --gns`, or --validate-tokens)"
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
