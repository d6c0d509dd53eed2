"""Every line a person reads: pure functions of Config, Plan, Trial, Rung and RunResult that return text.

Nothing here prints or decides: the CLI calls these and writes what they return (stdout for reports, stderr
for progress and notes). No torch here, so `autobatch --help` stays instant.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from autobatch.config import eval_strategy
from autobatch.units import format_bytes

if TYPE_CHECKING:
    from autobatch.config import Config
    from autobatch.planner import Plan, Trial
    from autobatch.train import RunResult


def setup_text(config: Config, command: str) -> str:
    """The derived numbers, before any work starts (nanoGPT style)."""
    args = config.training_args
    effective = config.effective_batch_size
    if config.dataset_name:
        dataset = config.dataset_name
    elif config.model_name_or_path is None:
        dataset = "built-in text sample"
    else:
        dataset = "none: a synthetic sequence of max_length tokens is measured"
    rows = [
        ("model", config.model_name_or_path or "built-in tiny causal LM"),
        ("dataset", dataset),
        ("device", config.device or "auto (cuda if available, else cpu)"),
        ("memory budget", "auto (free GPU memory / available RAM)" if config.memory_budget_bytes is None
         else f"{format_bytes(config.memory_budget_bytes)} ({config.memory_budget_bytes} bytes)"),
        ("headroom", "device default" if config.headroom is None else f"{config.headroom:g}"),
        ("max_length", args.get("max_length", "SFTConfig default (1024)")),
        ("effective batch", "largest micro-batch that fits" if effective is None
         else f"{effective} = micro-batch × accumulation × {config.world_size} process(es)"),
        ("micro-batch", "search up to " + str(config.max_micro_batch_size)
         if config.per_device_train_batch_size == "auto" else f"check {config.per_device_train_batch_size}"),
        ("accumulation", config.gradient_accumulation_steps),
        ("world size", config.world_size),
    ]
    if config.lora is not None:
        rows.append(("lora", ", ".join(f"{k}={v}" for k, v in config.lora.items())))
    rows += _memory_rows(config)
    for key in ("packing", "optim"):
        if key in args:
            rows.append((key, args[key]))
    return "\n".join([f"autobatch {command}:", *(f"  {label:<22} {value}" for label, value in rows)])


def _memory_rows(config: Config) -> list[tuple[str, Any]]:
    """The settings that change memory, TRL's defaults named as such: what the trials will measure."""
    args = config.training_args
    checkpointing = args.get("activation_checkpointing", args.get("gradient_checkpointing"))
    rows = [
        ("checkpointing", "true (SFTConfig default)" if checkpointing is None else checkpointing),
        ("dtype", config.model_args.get("dtype", "float32 (TRL ModelConfig default)")),
        ("bf16", args.get("bf16", "SFTConfig default: on where supported (off on cpu)")),
    ]
    if args.get("fp16"):
        rows.append(("fp16", True))
    if config.eval_fraction is not None or config.dataset_test_split is not None:
        held = (f"{config.eval_fraction:g} of the training data" if config.eval_fraction is not None
                else f"split {config.dataset_test_split}")
        rows.append(("evaluation", f"{held}, eval_strategy {eval_strategy(config)}"))
    return rows



def trial_line(trial: Trial, budget_bytes: int | None, label: str = "micro") -> str:
    """`micro=16 fits peak=31.2GiB (78% of budget) 0.42 s/micro-batch`: one trial, as it is printed."""
    status = "fits" if trial.fits else ("OOM" if trial.oom else "does not fit")
    share = f" ({trial.peak_memory_bytes / budget_bytes:.0%} of budget)" if budget_bytes else ""
    speed = f" {trial.seconds_per_micro_batch:.2f} s/micro-batch" if trial.fits and label == "micro" else ""
    fresh = " (fresh process)" if trial.fresh_process else ""
    return (f"{label}={trial.micro_batch_size} {status} peak={format_bytes(trial.peak_memory_bytes)}{share}{speed}{fresh}"
            + rank_peaks(trial.rank_peak_bytes))



def rank_peaks(peaks: list[int] | None) -> str:
    """` ranks 0..N-1: 10.5MiB, 10.6MiB` for an FSDP group trial (a rank ended before reporting: `?`)."""
    if not peaks or len(peaks) < 2:
        return ""
    return f" ranks 0..{len(peaks) - 1}: " + ", ".join(format_bytes(p) if p >= 0 else "?" for p in peaks)



def format_plan(plan: Plan, say: Callable[[str], str] = str) -> str:
    """The readable report: chosen row, memory, search cost, alternatives, notes and the flags to use.

    `say` words a note for its reader (notes name config keys; the CLI says them as the user typed them)."""
    micro, accumulation = plan.per_device_train_batch_size, plan.gradient_accumulation_steps
    budget, usable, peak = plan.memory_budget_bytes, plan.usable_memory_bytes, plan.peak_memory_bytes
    tried = {t.micro_batch_size: t for t in plan.cached_trials + plan.trials}
    largest = plan.max_fitting_micro_batch_size
    if plan.capped:
        limit = f"{largest} (capped by --max-micro-batch-size)"
    elif plan.stopped_at_need:
        limit = f"≥ {largest} (not searched past what the plan needs; --find-max searches on)"
    elif largest + 1 in tried and not tried[largest + 1].fits:
        limit = f"{largest} ({largest + 1} does not fit)"
    else:
        limit = str(largest)
    ooms = sum(1 for t in plan.trials if t.oom)
    left = budget - peak
    lines = [
        f"micro-batch {micro} × accumulation {accumulation} × world size {plan.world_size} = effective batch "
        f"{plan.effective_batch_size}" + ("" if plan.fits else f"   (micro-batch {micro} does NOT fit)"),
        (f"  peak memory      {format_bytes(peak)} of {format_bytes(usable)} usable "
         f"({_pct(peak, usable)}; budget {format_bytes(budget)}, headroom {plan.headroom:g})"),
        f"  left at peak     {format_bytes(left)} ({_pct(left, budget)} of budget)",
        *([f"  peak per rank   {rank_peaks(plan.rank_peak_bytes).strip()}"] if rank_peaks(plan.rank_peak_bytes) else []),
        f"  max micro-batch  {limit}",
        f"  trials           {len(plan.trials)}" + (f" ({ooms} OOM)" if ooms else "")
        + (f", {sum(t.fresh_process for t in plan.trials)} in fresh processes" if plan.trial_process == "fresh" else "")
        + (f" + {len(plan.cached_trials)} from the probe cache" if plan.cached_trials else "")
        + f", search {plan.search_seconds:.1f} s",
        f"  device           {plan.device}, max_length {plan.max_length}",
    ]
    if plan.checkpointing is not None:
        lines.append(f"  checkpointing    {checkpointing_text(plan.checkpointing)}")
    if plan.assumed:  # what an estimate emulated: the card it plans for
        a = plan.assumed
        lines += [f"  assumed device   {a['device']}, {format_bytes(a['memory_bytes'])}",
                  f"  assumed step     {a['precision']}, optimizer {a['optimizer']}, attention {a['attention']}",
                  (f"  assumed memory   {a['allocator']['name']}, expandable_segments "
                   f"{a['allocator']['expandable_segments']}, cuBLAS workspace "
                   f"{format_bytes(a['cublas_workspace_bytes'])} per handle (reserved bytes, the CUDA context not counted)")]
    if plan.per_device_eval_batch_size:
        eval_peak = plan.eval_peak_memory_bytes or 0
        lines.append(f"  eval batch       {plan.per_device_eval_batch_size} (peak {format_bytes(eval_peak)} with "
                     f"training state; {len(plan.eval_trials)} trials)")
    if plan.options:
        lines += ["", "  micro  accumulation  samples/s  s/micro-batch  s/optimizer-step   timing"]
        for option in plan.options[:10]:
            mark = "*" if option.micro_batch_size == micro else " "
            rate = option.samples_per_s
            lines.append(
                f"{mark} {option.micro_batch_size:>5}  {option.gradient_accumulation_steps:>12}  "
                f"{rate if math.isfinite(rate) else 0:>9.1f}  {option.seconds_per_micro_batch:>13.3f}  "
                f"{option.seconds_per_micro_batch * option.gradient_accumulation_steps:>16.3f}   "
                + ("measured" if option.measured else "interpolated")
            )
        if len(plan.options) > 10:
            lines.append(f"  ... {len(plan.options) - 10} more in --json")
        if plan.checkpointing and plan.checkpointing.chosen_by == "measured" and not plan.checkpointing.activation_checkpointing:
            lines.append("  (options timed with checkpointing on, as searched; the plan trains without it)")
    if plan.notes:
        lines.append("")
        lines += [f"note: {say(note)}" for note in plan.notes]
    use = f"use: --per_device_train_batch_size {micro} --gradient_accumulation_steps {accumulation}"
    if plan.per_device_eval_batch_size:
        use += f" --per_device_eval_batch_size {plan.per_device_eval_batch_size}"
    if plan.fits:  # a micro-batch that does not fit is no advice to follow
        lines += ["", use]
    return "\n".join(lines)



def checkpointing_text(choice) -> str:
    """`off (measured: micro-batch 8 fits without it: 1.19× faster ...)`: the choice and why."""
    said = "yours, kept" if choice.chosen_by == "user" else f"measured: {choice.reason}"
    return f"{'on' if choice.activation_checkpointing else 'off'} ({said})"



def _pct(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole else "n/a"



def format_sweep(rungs: list, ladder, gns_report: dict | None, recommended: int, reason: str,
                 notes: list[str], results: list = (), say: Callable[[str], str] = str) -> str:
    """The sweep table: measured cost per rung, then the model's predictions when B_noise is known; `say` words
    the reason and the notes, as in `format_plan`."""
    predicted = any(r.sample_efficiency is not None for r in rungs)
    head = (f"  {'B':>5}  {'micro×acc×W':>12}  {'peak':>9}  {'tokens/s':>9}  {'s/step':>7}  {'epoch s':>8}  "
            f"{'lr':>9}")
    if predicted:
        head += f"  {'efficiency':>10}  {'steps×':>6}  {'time×S_min':>10}"
    cached = f" + {len(ladder.cached_trials)} from the probe cache" if ladder.cached_trials else ""
    lines = [f"{len(ladder.trials)} trials{cached}, one probe; every plan exact (micro × accumulation × world = B)",
             "", head]
    for rung in rungs:
        plan = rung.plan
        mark = "*" if rung.effective_batch_size == recommended else " "
        split = f"{plan.per_device_train_batch_size}×{plan.gradient_accumulation_steps}×{plan.world_size}"
        row = (f"{mark} {rung.effective_batch_size:>5}  {split:>12}  {format_bytes(plan.peak_memory_bytes):>9}  "
               f"{rung.tokens_per_s:>9.0f}  {rung.seconds_per_optimizer_step:>7.3f}  {rung.epoch_seconds:>8.1f}  "
               f"{rung.learning_rate:>9.3g}")
        if predicted:
            row += (f"  {rung.sample_efficiency:>10.0%}  {rung.relative_steps:>6.2f}  "
                    f"{rung.time_to_target_s:>10.3f}")
        lines.append(row)
    lines += ["", "measured: peak, tokens/s, s/step (per optimizer step), epoch s (at the worst-case length)"]
    if predicted:
        lines.append("predicted (McCandlish et al. 2018, not measured): efficiency 1/(1 + B/B_noise), steps× = "
                     "steps to the same loss / S_min, time×S_min = steps× · s/step")
    if gns_report:
        lines.append("gradient noise scale: " + gns_text(gns_report))
    if results:
        lines += ["", f"  {'B':>5}  {'lr':>9}  {'eval loss':>9}  {'± s.e.':>7}  {'examples':>8}   (validation, measured)"]
        for r in sorted(results, key=lambda r: (r.effective_batch_size, r.learning_rate)):
            lines.append(f"  {r.effective_batch_size:>5}  {r.learning_rate:>9.3g}  {r.mean:>9.4f}  {r.sem:>7.4f}  "
                         f"{len(r.losses):>8}")
    lines += ["", f"recommended effective batch {recommended}: {say(reason)}"]
    lines += [f"note: {say(note)}" for note in notes]
    return "\n".join(lines)



def gns_text(report: dict) -> str:
    """`B_noise 41 sequences (90% interval 30–60), 612 loss tokens, 48 steps` or `B_noise > 30 ...`."""
    steps = f"{report.get('steps', 0)} steps"
    if report.get("reason"):
        return f"not measured: {report['reason']}"
    if not report.get("resolved"):
        return f"B_noise > {report.get('low') or 0:.3g} {report.get('unit', 'sequences')} (interval open-ended), {steps}"
    tokens = f", {report['b_simple_tokens']:.0f} loss tokens" if report.get("b_simple_tokens") else ""
    return (f"B_noise {report['b_simple']:.3g} {report.get('unit', 'sequences')} (90% interval "
            f"{report['low']:.3g}–{report['high']:.3g}){tokens}, {steps}")



def describe_entry(entry) -> str:
    """`abc123  model  max_length 512 (examples 512)  estimate  world 1  5 trials  2026-11-26 12:00`."""
    description = entry.description
    config, args = description.get("config", {}), description.get("training_args", {})
    used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
    return (f"{entry.fingerprint[:12]}  {config.get('model_name_or_path')}  max_length {args.get('max_length')} "
            f"(longest example {description.get('example_length')})  {description.get('device', {}).get('device')}"
            f"  world {description.get('world_size')}  {entry.trials} trial(s)  {used}")




def start_line(micro: int, eval_batch: int | None) -> str:
    """`trying micro=512 …` before a trial starts: a large trial can take minutes."""
    if eval_batch is None:
        return f"trying micro={micro} …"
    return f"trying eval batch={eval_batch} beside training at micro={micro} …"


def loading_line(config: Config, training: bool = False) -> str:
    """`loading MODEL and its data …`: said on a terminal before the slow part starts."""
    return f"loading {config.model_name_or_path or 'the built-in model'} and its data{' for training' if training else ''} …"


def cache_listing(path: Any, entries: list) -> str:
    """`autobatch cache list`: the file, then one line per workload."""
    return "\n".join([f"{path}: {len(entries)} workload(s)", *("  " + describe_entry(e) for e in entries)])


def cleared_line(count: int, path: Any) -> str:
    return f"cleared {count} trial(s) from {path}"


def gns_accumulation_note() -> str:
    """Said before a --gns run that has nothing to measure."""
    return ("note: --gns with accumulation 1: no small/big gradient pair on one device, nothing to measure "
            "(set --effective-batch-size to twice the micro-batch or more)")


def gns_written_line(path: Any, report: dict) -> str:
    """`wrote .../gns.json (gns overhead 0.4% of step time, 12 of 300 steps measured)`."""
    overhead = report.get("overhead")
    measured = f", {report.get('measured_steps')} of {report.get('optimizer_steps')} steps measured"
    return f"wrote {path}" + (f" (gns overhead {overhead:.1%} of step time{measured})" if overhead is not None else "")


def summary_lines(result: RunResult) -> list[str]:
    """The closing summary the CLI prints."""
    trained = result.global_step - result.resumed_from_step
    resumed = f" (resumed at step {result.resumed_from_step}, now at {result.global_step})" if result.resumed_from_step else ""
    lines = [
        (f"trained {trained} steps{resumed}, micro-batch {result.per_device_train_batch_size} × accumulation "
         f"{result.gradient_accumulation_steps} = effective {result.effective_batch_size}"),
        (f"peak memory {format_bytes(result.peak_memory_bytes)} (probe predicted "
         f"{format_bytes(result.predicted_peak_memory_bytes)}; budget {format_bytes(result.memory_budget_bytes)}, "
         f"{result.device})"),
    ]
    if result.samples_per_s:
        # Trainer's training_loss is the mean over the steps this invocation trained, not the last loss
        losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
        last = f", last logged loss {losses[-1]:.4f}" if losses else ""
        lines.append(f"{result.samples_per_s:.1f} samples/s, mean train loss {result.train_loss:.4f} over "
                     f"{trained} steps{last}")
    for event in result.fallbacks:
        lines.append(
            f"OOM survived at step {event.global_step}: continued with micro-batch {event.per_device_train_batch_size}"
            f" × accumulation {event.gradient_accumulation_steps}"
        )
    if result.eval_fallbacks:
        lines.append(f"OOM in evaluation survived: eval batch lowered to {result.eval_fallbacks[-1]}")
    lines.append(f"model saved to {result.output_dir}")
    return lines


def run_text(result: RunResult, noise: dict | None) -> str:
    """The closing summary of `autobatch run`, the noise scale beside it when measured."""
    lines = summary_lines(result)
    if noise is not None:
        lines.insert(-1, "gradient noise scale: " + gns_text(noise))
    return "\n".join(lines)


def study_line(name: str, storage: str) -> str:
    return f"study {name!r} in {storage} (open it with optuna.load_study or optuna-dashboard)"


def validation_budget_text(rungs: tuple[int, int], rates: int, tokens: int, max_trials: int | None) -> str:
    """What --validate-tokens will cost, said before the probe: runs × tokens (seconds follow the probe);
    `rungs` is (fewest, most), "5–6" when the ladder's target may add one."""
    count = str(rungs[0]) if rungs[0] == rungs[1] else f"{rungs[0]}–{rungs[1]}"
    runs = f"{count} rungs × {rates} rate(s)" + (f", at most {max_trials} this time" if max_trials else "")
    return (f"validation: {runs}, each about {tokens} tokens of training plus an evaluation; "
            "the probe comes first, then the predicted seconds")


def too_big_text(too_big: list[int], tokens: int, tokens_per_example: float) -> str:
    """The rungs left out of validation: one optimizer step there is past the token budget."""
    return (f"validation: not run at B = {', '.join(map(str, too_big))}: one optimizer step there is more than "
            f"--validate-tokens {tokens} (about {tokens_per_example:.0f} tokens per example), so they "
            "could not be compared at equal tokens; raise --validate-tokens to include them")


def validation_cost_text(runs: int, seconds: float) -> str:
    return (f"validation: {runs} runs, predicted {seconds:.0f} s of training "
            "(at the worst-case length; shorter examples train faster)")


def examples_text(examples: float, sizes: list[int], tokens_per_example: float) -> str:
    """What every validation run trains on: the same examples (an int count), or each rung its own whole steps."""
    if isinstance(examples, int):
        return same_examples_text(examples, tokens_per_example)
    return unequal_examples_text(examples, sizes)


def same_examples_text(examples: int, tokens_per_example: float) -> str:
    return (f"validation: every run trains on the same {examples} examples in the same order (about "
            f"{examples * tokens_per_example:.0f} tokens, a multiple of every B), so eval losses compare at equal tokens")


def unequal_examples_text(examples: float, sizes: list[int]) -> str:
    """No count every B divides near the budget: each rung rounds to whole steps, and says so."""
    seen = [max(1, round(examples / size)) * size for size in sizes]
    return (f"validation: no multiple of every B ({', '.join(map(str, sizes))}) is near {examples:.0f} examples, so "
            f"each run trains whole steps on {min(seen)} to {max(seen)} examples: the rung that sees more is favoured; "
            "--effective-batch-sizes with a smaller common multiple compares at equal tokens")


def validated_line(batch: int, learning_rate: float, loss: float, attrs: dict) -> str:
    return (f"validated B={batch} lr={learning_rate:.3g}: eval loss {loss:.4f} "
            f"after {attrs['tokens_seen']} tokens, {attrs['wall_seconds']:.1f} s")


def seen_text(examples: float, tokens: int) -> str:
    """What every validation run saw, for the verdict: the same examples, or about the token budget."""
    return f"the same {examples} examples" if isinstance(examples, int) else f"about {tokens} tokens"


def lowest_loss_reason(seen: str, loss: float, learning_rate: float) -> str:
    """The reason for a winner from a study without per-example losses (no error bars)."""
    return f"lowest eval loss after {seen} (measured: {loss:.4f} at learning rate {learning_rate:.3g})"


NO_ERROR_BARS_NOTE = "no per-example eval losses in the study, so no error bars: this difference may be noise"


def unresolved_gns_note(report: dict) -> str:
    return f"gradient noise scale unresolved (B_noise > {report.get('low') or 0:.0f}): no verdict on loss"


def lr_note(rule: str, base_lr: float, base_batch: int, b_noise: float | None) -> str:
    """How each rung's learning rate was set."""
    return (f"learning rate: {rule} scaling from {base_lr:g} at effective batch {base_batch}"
            + (f", not raised past B_noise {b_noise:.0f}" if b_noise else ""))


def noise_below_rungs_note(b_noise: float, smallest: int) -> str:
    return (f"B_noise {b_noise:.3g} is below the smallest rung ({smallest}): every rung is past the noise scale, "
            "so no efficiency or time-to-target is predicted (they would be numbers with nothing behind them)")


def time_to_target_skipped_line() -> str:
    return "time_to_target.png not drawn: no usable noise scale to predict time to a loss from (see the notes)"
