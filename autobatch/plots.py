"""Pictures for `--plot DIR`: memory against micro-batch, eval and training loss, B_noise over steps, time per rung.

matplotlib is imported only here and only when a plot is asked for (the `plot` extra), with the Agg backend
so no display is needed. Each function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
from pathlib import Path

from autobatch.errors import AutobatchError, ConfigError

MiB = 2**20


def require() -> None:
    """Fail before any work when matplotlib is missing, with the install line."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise AutobatchError("--plot needs matplotlib: pip install 'autobatch[plot]'") from None


def _pyplot():
    require()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dir(path: str) -> Path:
    """The --plot directory, created; a file in the way is refused."""
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--plot {path}: not a directory; pass a directory for the PNG files")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _finish(fig, ax, labels: tuple[str, str, str], path: Path, grid_axis: str = "both", legend: bool = True) -> Path:
    """Axis labels and title, legend and grid, then the PNG."""
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(labels[2])
    if legend:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis=grid_axis)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_memory(trials: list, usable_bytes: int, budget_bytes: int, chosen_micro: int, directory: Path) -> Path:
    """Peak memory of every trial against its micro-batch: fits, does not fit, OOM, the budget, the choice."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    groups = [("fits", [t for t in trials if t.fits], "o", "tab:blue"),
              ("over budget", [t for t in trials if not t.fits and not t.oom], "s", "tab:orange"),
              ("OOM (peak where it stopped)", [t for t in trials if t.oom], "x", "tab:red")]
    for label, group, marker, color in groups:
        if group:
            ax.scatter([t.micro_batch_size for t in group], [t.peak_memory_bytes / MiB for t in group],
                       marker=marker, color=color, label=label, zorder=3)
    highest = max((t.peak_memory_bytes for t in trials), default=0)
    if budget_bytes > 4 * highest > 0:  # a whole machine's RAM would flatten every trial onto the axis
        ax.set_ylim(0, 1.25 * highest / MiB)
        ax.text(0.01, 0.98, f"budget {budget_bytes / MiB:,.0f} MiB: far above every trial, not drawn",
                transform=ax.transAxes, va="top", fontsize=8)
    else:
        ax.axhline(budget_bytes / MiB, color="black", linestyle="--", label="budget")
        if usable_bytes != budget_bytes:
            ax.axhline(usable_bytes / MiB, color="gray", linestyle=":", label="usable (after headroom)")
    chosen = [t for t in trials if t.micro_batch_size == chosen_micro and t.fits]
    if chosen:
        ax.scatter([chosen_micro], [chosen[-1].peak_memory_bytes / MiB], marker="*", s=260, color="tab:green",
                   label=f"chosen micro-batch {chosen_micro}", zorder=4)
    return _finish(fig, ax, ("micro-batch size", "peak memory (MiB)", "Trial peak memory against micro-batch"),
                   directory / "memory.png")


def plot_loss_curves(curves: dict[str, list[dict]], directory: Path) -> Path:
    """Training loss against tokens seen, one line per validation run: runs compared at equal tokens."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, curve in curves.items():
        points = [(c["tokens"], c["loss"]) for c in curve if c.get("tokens") is not None]
        if points:
            ax.plot(*zip(*points), marker=".", label=label)
    return _finish(fig, ax, ("tokens seen", "training loss",
                             "Training loss against tokens (the verdict uses eval_loss.png)"),
                   directory / "loss_vs_tokens.png")


def plot_eval_losses(bars: list[dict], recommended: int, directory: Path) -> Path:
    """The eval loss the verdict uses, per rung and rate, with ±2 standard errors: the noise it judged against."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    by_multiplier: dict[float, list[dict]] = {}
    for bar in bars:
        by_multiplier.setdefault(bar.get("lr_multiplier", 1.0), []).append(bar)
    for shift, (multiplier, group) in enumerate(sorted(by_multiplier.items())):
        group.sort(key=lambda b: b["effective_batch_size"])
        nudge = 1.03 ** (shift - (len(by_multiplier) - 1) / 2)  # side by side, so the bars do not hide each other
        ax.errorbar([b["effective_batch_size"] * nudge for b in group], [b["eval_loss"] for b in group],
                    yerr=[2 * b["standard_error"] if math.isfinite(b["standard_error"]) else 0 for b in group],
                    marker="o", capsize=4, label=f"lr × {multiplier:g} of the rung's rate")
    ax.axvline(recommended, color="tab:green", linestyle=":", label=f"recommended B={recommended}")
    ax.set_xscale("log", base=2)
    return _finish(fig, ax, ("effective batch size", "eval loss (mean per example, ±2 s.e.)",
                             "Eval loss per rung, with its noise"), directory / "eval_loss.png")


def plot_noise_scale(report: dict, directory: Path) -> Path:
    """The smoothed B_noise after each step, with the whole run's bootstrap interval as a band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    history = [(h["step"], h["b_simple_ema"]) for h in report.get("history", []) if h.get("b_simple_ema") is not None
               and math.isfinite(h["b_simple_ema"]) and h["b_simple_ema"] > 0]
    if history:
        ax.plot(*zip(*history), color="tab:blue", label="B_simple (bias-corrected moving averages)")
    low, high = report.get("low"), report.get("high")
    if low is not None and high is not None:
        ax.axhspan(low, high, color="tab:blue", alpha=0.15, label="90% interval (block bootstrap, all steps)")
    elif low is not None:
        ax.axhline(low, color="tab:red", linestyle="--", label=f"B_noise > {low:.0f} (open-ended)")
    if report.get("b_simple"):
        ax.axhline(report["b_simple"], color="black", linewidth=0.8, label=f"B_simple {report['b_simple']:.3g}")
    return _finish(fig, ax, ("optimizer step", f"B_noise ({report.get('unit', 'sequences')})",
                             "Gradient noise scale over training"), directory / "noise_scale.png")


def plot_time_to_target(rungs: list, recommended: int, directory: Path) -> Path:
    """Predicted time to the same loss per rung (in units of S_min steps), else measured time per epoch."""
    plt = _pyplot()
    predicted = all(r.time_to_target_s is not None for r in rungs)
    values = [r.time_to_target_s if predicted else r.epoch_seconds for r in rungs]
    names = [str(r.effective_batch_size) for r in rungs]
    colors = ["tab:green" if r.effective_batch_size == recommended else "tab:gray" for r in rungs]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.bar(names, values, color=colors)
    labels = ("effective batch size (green: recommended)",
              "predicted s × S_min to the same loss" if predicted else "measured s per epoch",
              "Time to target per rung (a model's prediction)" if predicted else "Time per epoch per rung")
    return _finish(fig, ax, labels, directory / "time_to_target.png", grid_axis="y", legend=False)
