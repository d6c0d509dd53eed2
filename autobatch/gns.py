"""The gradient noise scale (McCandlish et al. 2018): the estimator, pure arithmetic, and the Trainer hooks.

Each optimizer step that accumulates gives two gradient norms at two batch sizes: each micro-batch's own
gradient (B_small) and the accumulated one (B_big). For a mean gradient over B examples,
E|G_B|² = |G|² + tr(Σ)/B, so two sizes give unbiased estimates of |G|² and tr(Σ); their ratio is
B_simple = tr(Σ)/|G|², the batch size past which a larger batch mostly adds compute, not progress.
Under DDP, B_small is a rank's micro-batch and B_big the global batch, so accumulation 1 has a pair too.
The arithmetic (`step_estimates`, `summarize`) is separate from the hooks (`GnsCallback`) so it is tested
on synthetic ground truth; the hooks are tested against explicitly computed per-micro-batch gradients.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from autobatch.config import write_atomic

logger = logging.getLogger(__name__)

GNS_FILE = "gns.json"
EMA_DECAY = 0.95
INTERVAL = (0.05, 0.95)  # a 90% bootstrap interval
RESAMPLES = 1000
MIN_STEPS = 6
#: `run --gns` measures a seeded random sample of optimizer steps so its expected share of step time stays
#: here: half the 1% aim, since the in-run meter that sets the chance is host time (on the H200 it read
#: 4.54% where A/B read 3.20%; on cpu 3.4% where A/B read 5.1%, README).
TARGET_OVERHEAD = 0.005
#: ... yet at least this many measured steps in a run that has them, so the interval has steps to stand on.
MIN_MEASURED_STEPS = 2 * MIN_STEPS
#: Steps measured before the chance is set: their cost is what sets it (the first one carries warm-up).
FIRST_MEASURED_STEPS = 2


@dataclass
class StepNorms:
    """One optimizer step: each micro-batch's squared gradient norm (as a mean over its own items) and size,
    the accumulated gradient's squared norm, and 1/B_big for the accumulated gradient's weighting."""

    small_sq: list[float]
    small_sizes: list[float]
    big_sq: float
    inv_big: float  # Σ w_i²/n_i for G_big = Σ w_i·g_i: 1/(Σ n_i) when weighted by size, 1/(A²)·Σ 1/n_i if equal


def step_estimates(step: StepNorms) -> tuple[float, float] | None:
    """Unbiased (|G|², tr Σ) from one step, None without two distinct batch sizes (accumulation 1).

    With unequal micro-batches E[mean_i |g_i|²] = |G|² + tr(Σ)·mean(1/n_i), so B_small = 1/mean(1/n_i).
    """
    inv_small = sum(1 / n for n in step.small_sizes) / len(step.small_sizes)
    if inv_small - step.inv_big <= 1e-12 * inv_small:
        return None
    small = sum(step.small_sq) / len(step.small_sq)
    b_small, b_big = 1 / inv_small, 1 / step.inv_big
    g2 = (b_big * step.big_sq - b_small * small) / (b_big - b_small)
    trace = (small - step.big_sq) / (inv_small - step.inv_big)
    return g2, trace


def ema_history(estimates: list[tuple[float, float]], decay: float = EMA_DECAY) -> list[float | None]:
    """B_simple after each step from bias-corrected moving averages of |G|² and tr Σ, smoothed separately."""
    g2 = trace = 0.0
    history: list[float | None] = []
    for i, (g, t) in enumerate(estimates, start=1):
        g2, trace = decay * g2 + (1 - decay) * g, decay * trace + (1 - decay) * t
        correction = 1 - decay**i
        history.append((trace / correction) / (g2 / correction) if g2 > 0 else None)
    return history


def _ratio(estimates: list[tuple[float, float]]) -> float:
    g2 = sum(g for g, _ in estimates)
    return sum(t for _, t in estimates) / g2 if g2 > 0 else math.inf


def bootstrap_interval(
    estimates: list[tuple[float, float]], resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """A moving-block bootstrap over steps of tr Σ / |G|² (ratio of means): (low, high); high may be inf.

    Blocks of about n^(1/3) consecutive steps keep the correlation of neighbouring steps in each resample.
    """
    n = len(estimates)
    block = max(1, round(n ** (1 / 3)))
    starts = range(n - block + 1)
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        sample: list[tuple[float, float]] = []
        while len(sample) < n:
            start = rng.choice(starts)
            sample += estimates[start:start + block]
        ratios.append(_ratio(sample[:n]))
    ratios.sort()
    low = ratios[int(INTERVAL[0] * (resamples - 1))]
    high = ratios[math.ceil(INTERVAL[1] * (resamples - 1))]
    return max(low, 0.0), high


def summarize(
    estimates: list[tuple[float, float]], unit: str = "sequences", resamples: int = RESAMPLES
) -> dict:
    """B_simple over the steps (ratio of mean tr Σ to mean |G|²) with a bootstrap interval.

    `resolved` is False when the interval is open-ended (|G|² not shown positive): then only `low` is
    reported, as "B_noise > low", and `b_simple` and `high` are None, never a made-up point value.
    """
    if len(estimates) < MIN_STEPS:  # a bootstrap over a handful of steps says nothing
        return {"b_simple": None, "low": None, "high": None, "unit": unit, "steps": len(estimates),
                "resolved": False, "reason": f"{len(estimates)} steps with a small/big pair, fewer than {MIN_STEPS}"}
    low, high = bootstrap_interval(estimates, resamples)
    point = _ratio(estimates)
    resolved = math.isfinite(high) and math.isfinite(point) and point > 0
    return {
        "b_simple": point if resolved else None,
        "low": low,
        "high": high if resolved else None,
        "unit": unit,
        "steps": len(estimates),
        "resolved": resolved,
    }


def measure_chance(
    step_cost: float | None, step: int, total_steps: int | None, measured: int,
    target: float = TARGET_OVERHEAD, min_measured: int = MIN_MEASURED_STEPS,
) -> float:
    """The chance of measuring optimizer step `step` (0-based) so the expected cost stays at `target`.

    `step_cost` is what a measured step costs as a share of step time (None until measured). The chance is
    target / cost, raised to spread the measured steps still owed to `min_measured` over the steps left
    (`total_steps` known), so a short run still gets an interval; the first steps are measured to learn the cost.
    """
    if step_cost is None or measured < FIRST_MEASURED_STEPS:
        return 1.0
    chance = target / step_cost if step_cost > 0 else 1.0
    if total_steps and total_steps > step and measured < min_measured:
        chance = max(chance, (min_measured - measured) / (total_steps - step))
    return min(1.0, chance)


def expected_overhead(measured_cost: float, idle_cost: float, chance: float) -> float:
    """The mean cost a step of a sampled run: measured steps at `measured_cost`, the rest at `idle_cost`
    (hooks registered, returning at once)."""
    return chance * measured_cost + (1 - chance) * idle_cost


def write_report(output_dir: str | os.PathLike, report: dict) -> Path:
    """gns.json in `output_dir`, written atomically (`config.write_atomic`): never half-written."""
    return write_atomic(Path(output_dir) / GNS_FILE, json.dumps(report, indent=2))


@dataclass
class _Micro:
    sq: object  # a 0-dim tensor on the device: no sync until the step ends
    sequences: int
    tokens: object


@dataclass
class GnsRecorder:
    """Per-step norms in both units, as collected by the callback."""

    sequences: list[tuple[float, float]] = field(default_factory=list)
    tokens: list[tuple[float, float]] = field(default_factory=list)


def micro_weights(rows: list[tuple[float, float, float]], world: int, token_normalised: bool,
                  across_devices: bool) -> tuple[list[float], list[float]]:
    """(each micro-batch's squared mean gradient, its weight in the step's gradient) from the hooked norms.

    `rows` holds (hooked squared norm, loss tokens, sequences) of every micro-batch of one step, rank by rank
    (`world` equal groups). The hooked gradient is c·(the micro-batch's own mean gradient), where c is how
    the Trainer scaled that micro-batch's loss: n/N_rank by the step's token count (`num_items_in_batch`),
    W·n/N_all when that count is summed over ranks and the loss multiplied back by the world size
    (`average_tokens_across_devices`), or 1/A when each mean loss is divided by accumulation. DDP then
    averages the ranks, so each weight is c/W.
    """
    per_rank = len(rows) // world
    total = sum(n for _, n, _ in rows)
    means, weights = [], []
    for rank in range(world):
        group = rows[rank * per_rank:(rank + 1) * per_rank]
        local = sum(n for _, n, _ in group)
        for hooked, tokens, _ in group:
            if not token_normalised:
                scale = 1 / per_rank
            elif across_devices:
                scale = world * tokens / total
            else:
                scale = tokens / local
            means.append(hooked / scale**2)
            weights.append(scale / world)
    return means, weights


def gns_callback(every: int | None = 1, seed: int = 0, target: float = TARGET_OVERHEAD):
    """A TrainerCallback measuring the gradient noise scale during `train()`; call `.attach(trainer)` first.

    `every` k measures one optimizer step in k (steps 1, k + 1, ...): the hooks return at once on the others,
    so the cost falls about k-fold while a long run still gives many estimates. `every=None` (what
    `run --gns` does by default) measures a seeded random sample of steps instead, with the chance set from
    the measured cost of a measured step (`measure_chance`): about `target` of step time in all."""
    from transformers import TrainerCallback

    class GnsCallback(TrainerCallback):
        """Per-parameter gradient hooks sum each micro-batch's squared gradient (B_small: the rank-local
        micro-batch); the accumulated gradient's pre-clip norm (B_big: the global batch) is the one the
        Trainer asks accelerate's `clip_grad_norm_` for every step, after DDP's all-reduce and fp16's
        unscale, so it costs no extra pass. Under several ranks the micro-batch norms are gathered once a
        step. Both are rescaled for how the Trainer normalised the loss (`micro_weights`)."""

        def __init__(self) -> None:
            self.every = every
            self.active = True  # whether this step is measured
            self.measured_steps = 0
            self.optimizer_steps = 0
            self.rng = random.Random(seed)
            self.step_costs: list[float] = []  # hook time over step time of each measured step
            self._hook_at_begin = 0.0
            self.recorder = GnsRecorder()
            self.trainer = None
            self.handles: list = []
            self.micro: list[_Micro] = []
            self.big_norm = None
            self.hook_seconds = 0.0
            self.step_seconds = 0.0
            self._step_started = 0.0
            self._accelerator = None
            self.raw: list[StepNorms] = []  # token-unit norms of every step, for tests and plots

        def attach(self, trainer) -> GnsCallback:
            import torch

            self.trainer = trainer
            model = trainer.model
            self._current: list = []  # this micro-batch's per-parameter gradient norms

            norm = torch.linalg.vector_norm

            def on_grad(grad):  # one reduction kernel, no full-size temporary; summed when the micro-batch ends
                if not self.active:
                    return
                started = time.perf_counter()
                self._current.append(norm(grad.detach(), dtype=torch.float32))
                self.hook_seconds += time.perf_counter() - started

            def on_forward(module, args, kwargs):
                if not self.active or not module.training or not torch.is_grad_enabled():
                    return
                started = time.perf_counter()
                self._close_micro()
                labels = kwargs.get("labels")
                if labels is None:
                    labels = kwargs.get("input_ids", args[0] if args else None)
                    tokens = labels[..., 1:].numel()
                else:
                    tokens = (labels[..., 1:] != -100).sum()
                self._pending = (labels.shape[0], tokens)
                self.hook_seconds += time.perf_counter() - started

            for param in model.parameters():
                if param.requires_grad:
                    self.handles.append(param.register_hook(on_grad))
            self.handles.append(model.register_forward_pre_hook(on_forward, with_kwargs=True))
            self._pending = None
            return self

        def _watch_clip(self) -> None:
            """Keep the first norm accelerate's `clip_grad_norm_` returns each step: the pre-clip norm of
            the step's (all-reduced, unscaled) gradient, which the Trainer computes every step anyway."""
            accelerator = self.trainer.accelerator
            if self._accelerator is accelerator:
                return
            original = accelerator.clip_grad_norm_

            def clip_grad_norm_(*args, **kwargs):
                norm = original(*args, **kwargs)
                if self.big_norm is None:
                    self.big_norm = norm
                return norm

            accelerator.clip_grad_norm_ = clip_grad_norm_  # on this instance only; detach() removes it
            self._accelerator = accelerator

        def _close_micro(self) -> None:
            if self._pending is not None and self._current:
                import torch

                self.micro.append(_Micro(torch.stack(self._current).square().sum(), *self._pending))
            self._pending, self._current = None, []

        def detach(self) -> None:
            for handle in self.handles:
                handle.remove()
            self.handles = []
            if self._accelerator is not None:
                vars(self._accelerator).pop("clip_grad_norm_", None)
                self._accelerator = None

        def step_cost(self) -> float | None:
            """A measured step's cost as a share of its step time: the median over measured steps, so the
            first (warm-up) does not set it; None before any."""
            costs = sorted(self.step_costs)
            return costs[len(costs) // 2] if costs else None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.every is not None:
                self.active = state.global_step % self.every == 0
            else:
                chance = measure_chance(self.step_cost(), state.global_step, state.max_steps or None,
                                        self.measured_steps, target)
                self.active = self.rng.random() < chance
            self._hook_at_begin = self.hook_seconds
            self._watch_clip()
            self.micro, self.big_norm, self._current, self._pending = [], None, [], None
            self._step_started = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if not self.active:
                return
            self.measured_steps += 1
            started = time.perf_counter()
            self._close_micro()
            if self.micro:
                self._record(args)
            self.micro, self.big_norm = [], None
            self.hook_seconds += time.perf_counter() - started

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self._step_started
            self.step_seconds += seconds
            self.optimizer_steps += 1
            if self.active and seconds > 0:
                self.step_costs.append((self.hook_seconds - self._hook_at_begin) / seconds)

        def token_normalised(self) -> bool:
            """Whether the Trainer divides each micro-batch's summed loss by the step's token count."""
            trainer = self.trainer
            if trainer.loss_is_scaled_for_ga is not None:
                return bool(trainer.loss_is_scaled_for_ga)
            return bool(trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None)

        def _loss_scale(self) -> float:
            """fp16's loss scale, which the hooked gradients carry and accelerate's norm does not."""
            scaler = getattr(self.trainer.accelerator, "scaler", None)
            return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

        def _rows(self) -> list[tuple[float, float, float]]:
            """(hooked squared norm, tokens, sequences) of every micro-batch of the step, gathered over ranks."""
            import torch

            device = self.micro[0].sq.device
            local = torch.stack([torch.stack([m.sq.double(), torch.as_tensor(m.tokens, device=device).double(),
                                              torch.tensor(float(m.sequences), device=device, dtype=torch.float64)])
                                 for m in self.micro])
            accelerator = self.trainer.accelerator
            if accelerator.num_processes > 1:  # every rank runs the same number of micro-batches a step
                local = accelerator.gather(local)
            return [tuple(row) for row in local.cpu().tolist()]

        def _big_sq(self) -> float:
            """The step's gradient, squared: accelerate's pre-clip norm, or (when the Trainer did not ask for
            one, so nothing was clipped either) the gradients as they stand, unscaled."""
            if self.big_norm is not None:
                return float(self.big_norm) ** 2
            params = [p for p in self.trainer.model.parameters() if p.grad is not None]
            return sum(float(p.grad.detach().float().pow(2).sum()) for p in params) / self._loss_scale() ** 2

        def _record(self, args) -> None:
            rows = self._rows()
            if any(tokens <= 0 for _, tokens, _ in rows):  # a micro-batch with no loss tokens has no mean gradient
                return
            world = self.trainer.accelerator.num_processes
            across = world > 1 and bool(getattr(args, "average_tokens_across_devices", False))
            scale = self._loss_scale() ** 2
            means, weights = micro_weights([(h / scale, n, s) for h, n, s in rows], world,
                                           self.token_normalised(), across)
            big = self._big_sq()
            for unit, column, out in (("tokens", 1, self.recorder.tokens), ("sequences", 2, self.recorder.sequences)):
                sizes = [row[column] for row in rows]
                step = StepNorms(means, sizes, big, sum(w * w / n for w, n in zip(weights, sizes)))
                if unit == "tokens":
                    self.raw.append(step)
                estimate = step_estimates(step)
                if estimate is not None:
                    out.append(estimate)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "loss" not in logs or len(self.recorder.sequences) < 1:
                return
            smoothed = ema_history(self.recorder.sequences)[-1]
            if smoothed is not None:
                logs["gns_b_simple"] = smoothed
                if state.log_history and state.log_history[-1].get("step") == state.global_step:
                    state.log_history[-1]["gns_b_simple"] = smoothed  # the Trainer stored a copy already

        def report(self, resamples: int = RESAMPLES) -> dict:
            """The gns.json object; `reason` says why nothing was measured when accumulation was 1."""
            report = summarize(self.recorder.sequences, "sequences", resamples)
            tokens = summarize(self.recorder.tokens, "tokens", resamples)
            report.update(
                b_simple_tokens=tokens["b_simple"], low_tokens=tokens["low"], high_tokens=tokens["high"],
                overhead=self.hook_seconds / self.step_seconds if self.step_seconds else None, measured_every=self.every,
                measured_steps=self.measured_steps, optimizer_steps=self.optimizer_steps,
                measured_step_overhead=self.step_cost(),
                sampling=(f"one step in {self.every}" if self.every is not None else
                          f"seeded random sample (seed {seed}): about {target:.1%} of step time, at least "
                          f"{MIN_MEASURED_STEPS} steps where the run has them"),
                history=[{"step": i + 1, "b_simple_ema": v} for i, v in enumerate(ema_history(self.recorder.sequences))],
            )
            if not self.measured_steps:
                report["reason"] = f"no optimizer step was measured ({report['sampling']})"
            elif not self.recorder.sequences:
                report["reason"] = ("accumulation 1 on one device: no small/big gradient pair to compare "
                                    "(set gradient_accumulation_steps >= 2; sweep measures at >= 2)")
            return report

    return GnsCallback()
