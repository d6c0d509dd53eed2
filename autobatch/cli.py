"""Command line: parse, call the library, print, exit code. The only module that prints.

`autobatch plan|run|sweep [--config FILE] [flags] [--any-sft-config-key VALUE ...]`. Values of keys the
parser does not know are read as YAML and handed on under their underscore name, as TRL's own parser
does (`--gradient-checkpointing false`, `--learning-rate 1e-5`). Only stdlib and autobatch.config/errors
are imported here at module level so `autobatch --help` is instant; torch comes with the command.

Past 600 lines on purpose: about half is the parser (every flag with its help, the one place a user reads
them); the rest is each command's parse, call, print, with every decision in `api` and every line in `report`,
and the keys the library's messages name said in the user's words (`_say`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shlex
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autobatch import __version__, report
from autobatch.config import (
    AUTOBATCH_KEYS,
    BUILTIN_CONFIG,
    Config,
    build_config,
    check_model_available,
    parse_value,
    read_yaml,
)
from autobatch.errors import AutobatchError, ConfigError, Interrupted
from autobatch.fields import sft_fields
from autobatch.interrupt import stop_on_signals
from autobatch.ranks import is_main
from autobatch.units import format_bytes

if TYPE_CHECKING:
    from autobatch.planner import Plan, Trial

#: Flags with a value, each mapped to its config key. Keys in _STRING_KEYS keep the text verbatim
#: (a model directory called "1" stays "1"); the others are read as YAML like pass-through values.
_VALUE_FLAGS = [
    ("--model", "model_name_or_path", "model directory or hub name (default: the built-in tiny model)"),
    ("--dataset", "dataset_name",
     "hub dataset, local json/jsonl/csv/parquet/txt file or a folder of them (default: the built-in text sample)"),
    ("--dataset-split", "dataset_train_split", "split to train on (default: train)"),
    ("--dataset-text-field", "dataset_text_field", "column with the text (default: text)"),
    ("--device", "device",
     "cuda, cpu (virtual device with a budget) or estimate (fake tensors); default: cuda if any, else cpu"),
    ("--memory-budget", "memory_budget",
     ("300MiB, 80GB, 2.5GiB or bytes; G = GiB = 2^30 bytes, GB = 10^9 "
      "(default: free GPU memory / available RAM or the cgroup limit)")),
    ("--headroom", "headroom", "fraction of the budget kept free, 0 <= h < 1 (default: by device)"),
    ("--max-micro-batch-size", "max_micro_batch_size", "largest micro-batch tried (default: 512)"),
    ("--effective-batch-size", "effective_batch_size",
     "samples per optimizer step over all devices, reached exactly"),
    ("--micro-batch-size", "per_device_train_batch_size",
     "check this micro-batch instead of searching (= per_device_train_batch_size)"),
    ("--world-size", "world_size", "number of processes (default: $WORLD_SIZE or 1)"),
    ("--nproc-per-node", "nproc_per_node",
     "FSDP: ranks per trial, launched from here (estimate: one rank of N traced); sets --world-size"),
    ("--max-length", "max_length", "tokens per example after truncation (SFTConfig max_length)"),
    ("--cache", "cache", "probe cache file (default: $XDG_CACHE_HOME/autobatch/probes.sqlite3)"),
    ("--trial-process", "trial_process",
     ("fresh: the plan's edge (max, max + 1, the planned size) measured in fresh worker processes; same: every "
      "trial in this process; auto (default): fresh on cuda, same elsewhere")),
]
#: Switches, each setting its config key to true.
_SWITCH_FLAGS = [
    ("--find-max", "find_max", "search on to the largest micro-batch that fits, past what the target needs"),
    ("--no-cache", "no_cache", "neither read nor write the probe cache: run every trial"),
]
#: What a `run` user looks for in --help (issue 11); each also works as a YAML key of the same name.
_VALUE_FLAGS += [
    ("--dataset-test-split", "dataset_test_split", "split to evaluate on (hub dataset or folder; needs --eval-strategy)"),
    ("--eval-fraction", "eval_fraction",
     "hold out this fraction of the training data for evaluation (TRL: test_split_size; needs --eval-strategy)"),
    ("--eval-strategy", "eval_strategy", "no, steps (with --eval-steps N) or epoch (default: no)"),
    ("--output-dir", "output_dir", "where run saves the model, checkpoints and plan.json (default: autobatch-out)"),
    ("--max-steps", "max_steps", "optimizer steps to train (default: -1 = num_train_epochs)"),
    ("--use-peft", "use_peft", "true: train LoRA adapters (TRL's defaults r 16, alpha 32, dropout 0.05)"),
    ("--lora-r", "lora_r", "LoRA rank (with --use-peft true)"),
    ("--lora-alpha", "lora_alpha", "LoRA alpha (with --use-peft true)"),
    ("--lora-target-modules", "lora_target_modules", "e.g. all-linear or [q_proj,v_proj] (with --use-peft true)"),
]
_STRING_KEYS = frozenset({
    "model_name_or_path", "dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split",
    "dataset_text_field", "output_dir", "run_name", "device", "model_revision", "hub_model_id", "cache", "trial_process",
})

_EPILOG = (
    "Any other --key VALUE (or --key_name VALUE) is an SFTConfig/TrainingArguments key, read as YAML: "
    "--gradient-checkpointing false --learning-rate 1e-5 --packing true --optim adamw_torch. "
    "Precedence: defaults < --config file < flags. Without --config and --model, the built-in "
    "tiny config is used."
)


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _make_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False, allow_abbrev=False)
    common.add_argument("--config", metavar="FILE", help="YAML file with TRL and autobatch keys")
    for flag, key, help_text in _VALUE_FLAGS:
        common.add_argument(flag, dest=key, metavar="VALUE", default=argparse.SUPPRESS, help=help_text)
    for flag, key, help_text in _SWITCH_FLAGS:
        common.add_argument(flag, dest=key, action="store_true", default=argparse.SUPPRESS, help=help_text)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    common.add_argument("--output", metavar="FILE",
                        help="write plan.yaml: the config with the planned batch, for `trl sft --config` "
                             "or `autobatch run --config`")
    common.add_argument("--plot", metavar="DIR",
                        help="write PNG pictures into DIR (memory per micro-batch; with run --gns and sweep, "
                             "the noise scale, loss per rung, time per rung); needs autobatch[plot]")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("-v", "--verbose", action="store_true", help="log progress and third-party warnings")

    parser = _Parser(prog="autobatch", allow_abbrev=False,
                     description="Find the largest micro-batch that fits, then plan SFTTrainer's batch for a "
                                 "target effective batch.")
    parser.add_argument("--version", action="version", version=f"autobatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    plan = commands.add_parser("plan", parents=[common], allow_abbrev=False, epilog=_EPILOG,
                               help="probe, then print the plan",
                               description="Probe real training steps to find the largest micro-batch "
                                           "that fits, then choose micro-batch × accumulation for the "
                                           "effective batch.")
    plan.set_defaults(func=_cmd_plan)
    run = commands.add_parser("run", parents=[common], allow_abbrev=False, epilog=_EPILOG,
                              help="plan, then train with SFTTrainer",
                              description="Plan as `autobatch plan` does (or reuse --plan), then train.")
    run.add_argument("--plan", metavar="FILE", help="reuse a saved plan.yaml instead of probing")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest complete checkpoint in output_dir")
    run.add_argument("--overwrite-output-dir", action="store_true",
                     help="train into an output_dir that holds an earlier run (its checkpoints are removed "
                          "when training starts); without it or --resume such a dir is refused")
    run.add_argument("--gns", action="store_true",
                     help="measure the gradient noise scale during the run (on one device it needs "
                          "accumulation >= 2); "
                          "writes OUTPUT_DIR/gns.json")
    run.add_argument("--gns-every", metavar="N", type=int,
                     help="measure one optimizer step in N (implies --gns); default: a seeded random sample of "
                          "steps costing about 0.5%% of step time (at least 12 steps measured)")
    run.set_defaults(func=_cmd_run)
    sweep = commands.add_parser("sweep", parents=[common], allow_abbrev=False, epilog=_EPILOG,
                                help="probe once, plan a ladder of effective batch sizes, recommend one",
                                description="Probe once, plan every effective batch size of a ladder exactly, "
                                            "show what each costs here and (with a noise scale) what the "
                                            "large-batch model predicts; --output writes the recommended rung.")
    _add_sweep_flags(sweep)
    sweep.set_defaults(func=_cmd_sweep)
    cache = commands.add_parser("cache", allow_abbrev=False, help="list, locate or clear the probe cache",
                                description="The probe cache stores every trial, keyed by everything that "
                                            "changes memory, so re-planning the same workload runs no trial.")
    cache.add_argument("action", nargs="?", choices=("list", "path", "clear"), default="list",
                       help="list entries (default), print the file's path, or delete every entry")
    cache.add_argument("--cache", metavar="FILE", help="the cache file (default: the user's cache directory)")
    cache.add_argument("--json", action="store_true", help="list as one JSON object")
    cache.add_argument("--debug", action="store_true", help="show tracebacks")
    cache.set_defaults(func=_cmd_cache)
    return parser


def _passthrough(extras: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """`--some-key VALUE` / `--some_key=VALUE` pairs the parser did not know -> config keys and values."""
    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    i = 0
    while i < len(extras):
        token = extras[i]
        flag, has_value, value = token.partition("=")
        key = flag[2:].replace("-", "_")
        if not flag.startswith("--") or not key:
            raise ConfigError(f"unexpected argument {token!r}: options are written --key value")
        if not has_value:
            nxt = extras[i + 1] if i + 1 < len(extras) else None
            if nxt is None or (nxt.startswith("-") and not _is_number(nxt)):
                raise ConfigError(f"{flag} needs a value: write {flag} VALUE (booleans too: {flag} true)")
            value, i = nxt, i + 1
        i += 1
        values[key] = value if key in _STRING_KEYS else parse_value(value)
        names[key] = flag
    return values, names


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _config_from_args(args: argparse.Namespace, extras: list[str]) -> Config:
    """Defaults < --config (or the built-in tiny config) < known flags and pass-through keys."""
    from autobatch.planfile import check_output_path, hidden_keys  # with rundir and workload: not for --help

    overrides, names = _passthrough(extras)
    for flag, key, _ in _VALUE_FLAGS:
        if key in vars(args):
            value = getattr(args, key)
            overrides[key] = value if key in _STRING_KEYS else parse_value(value)
            names[key] = flag
    for flag, key, _ in _SWITCH_FLAGS:
        if key in vars(args):
            overrides[key], names[key] = True, flag
    if args.output is not None:
        check_output_path(args.output)
    path = args.config
    if path is None and "model_name_or_path" not in overrides:
        path = BUILTIN_CONFIG
    # sweep --validate-tokens evaluates on the eval split or fraction whatever eval_strategy says (issue 24)
    args.names = _said_as(args.config, names)  # errors from below are said in the user's words, validation's too
    config = build_config(path, overrides, names, evaluates=bool(getattr(args, "validate_tokens", None)),
                          hidden=hidden_keys(path))
    check_model_available(config)  # its key said as the user gave it, like every error's (`_say`)
    return config


def _print_setup(config: Config, command: str) -> None:
    """The derived numbers, before any work starts (nanoGPT style)."""
    _err(report.setup_text(config, command))


def _progress_wanted(args: argparse.Namespace) -> bool:
    """Progress lines and the Trainer's bar: on a terminal only, never with --json."""
    return not args.json and sys.stderr.isatty()


def _start_printer(micro: int, eval_batch: int | None) -> None:
    """`trying micro=512 …` before a trial starts: a large trial can take minutes."""
    _err(report.start_line(micro, eval_batch))


def _eval_trial_printer(budget_bytes: int | None) -> Callable[[Trial], None]:
    """One stderr line per evaluation trial: `eval batch=8 fits peak=...`."""
    return lambda trial: _err(report.trial_line(trial, budget_bytes, "eval batch"))


def _trial_printer(budget_bytes: int | None) -> Callable[[Trial], None]:
    """One stderr line per trial: `micro=16 fits peak=31.2GiB (78% of budget) 0.42 s/step`."""
    return lambda trial: _err(report.trial_line(trial, budget_bytes))


def _json_safe(value: Any) -> Any:
    """Non-finite floats become null so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _plan_json(plan: Plan) -> str:
    return json.dumps(_json_safe(plan.to_dict()), allow_nan=False)


def _builtin_model_path(config: Config) -> str | None:
    if config.model_name_or_path is not None:
        return None
    from autobatch.builtin import builtin_model_dir

    return str(builtin_model_dir())


def _progress_callbacks(config: Config, progress: bool) -> dict[str, Any]:
    """The probe's progress hooks: a line before each trial on a terminal, and one after each eval trial."""
    extra: dict[str, Any] = {"on_eval_trial": _eval_trial_printer(config.memory_budget_bytes)}
    if progress:
        _err(report.loading_line(config))
        extra["on_start"] = _start_printer
    return extra


def _probe(config: Config, progress: bool = False) -> Plan:
    from autobatch import api

    extra = _progress_callbacks(config, progress)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the report / the one JSON object
        return api.plan(config, on_trial=_trial_printer(config.memory_budget_bytes), **extra)


def _refuse_unfit(plan: Plan, output: str | None) -> None:
    if not plan.fits:
        raise AutobatchError(
            f"micro-batch {plan.per_device_train_batch_size} does not fit: peak "
            f"{format_bytes(plan.peak_memory_bytes)}, usable {format_bytes(plan.usable_memory_bytes)}; "
            "use --micro-batch-size auto or a larger --memory-budget"
            + ("; nothing written" if output else "")
        )


def _write_output(config: Config, plan: Plan, output: str | None) -> None:
    if output and is_main():
        from autobatch.planfile import plan_yaml_text, write_plan_yaml

        path = write_plan_yaml(output, plan_yaml_text(config, plan, model_path=_builtin_model_path(config)))
        _err(f"wrote {path}")


def _cmd_plan(args: argparse.Namespace, extras: list[str]) -> int:
    config = _config_from_args(args, extras)
    plots = _plot_dir(args)
    if not args.json:  # --json: one JSON object on stdout and nothing else
        _print_setup(config, "plan")
    _quiet_third_party(args.verbose)
    plan = _probe(config, _progress_wanted(args))
    print(_plan_json(plan) if args.json else report.format_plan(plan, _sayer(args.names)), flush=True)
    _plot_memory(plots, plan)
    _refuse_unfit(plan, args.output)
    _write_output(config, plan, args.output)
    return 0


def _plot_dir(args: argparse.Namespace):
    """The --plot directory, matplotlib checked before any work; None without --plot."""
    if not args.plot:
        return None
    from autobatch import plots

    plots.require()
    return plots.plot_dir(args.plot)


def _plot_memory(directory, plan: Plan) -> None:
    if directory is not None and plan.trials:
        from autobatch import plots

        path = plots.plot_memory(plan.trials, plan.usable_memory_bytes, plan.memory_budget_bytes,
                                 plan.per_device_train_batch_size, directory)
        _err(f"wrote {path}")


def _cmd_run(args: argparse.Namespace, extras: list[str]) -> int:
    if args.gns_every is not None:
        if args.gns_every < 1:
            raise ConfigError(f"--gns-every {args.gns_every}: measure one step in N needs N >= 1 (1: every step)")
        args.gns = True
    if args.plan:
        _check_plan_yaml(args.plan)
    if args.plan and not args.config:
        args.config = args.plan  # a plan.yaml is a whole config: run it as it was planned
    config = _config_from_args(args, extras)
    plots = _plot_dir(args)
    if not args.json:  # --json: one JSON object on stdout and nothing else
        _print_setup(config, "run")
    _quiet_third_party(args.verbose)
    from autobatch import api

    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the report / the one JSON object
        plan = api.run_plan(config, args.plan, resume=args.resume, overwrite=args.overwrite_output_dir,
                            on_trial=_trial_printer(config.memory_budget_bytes),
                            **_progress_callbacks(config, _progress_wanted(args)))
    if not args.json:
        print(report.format_plan(plan, _sayer(args.names)), flush=True)
    _refuse_unfit(plan, args.output)
    _write_output(config, plan, args.output)
    _show_training_progress(config, _progress_wanted(args))
    callbacks = _gns_callbacks(args.gns, args.gns_every, config, plan)
    try:
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            result = api.train_plan(config, plan, resume=args.resume, overwrite=args.overwrite_output_dir,
                                    callbacks=callbacks, stop=getattr(args, "stop", None))
    except Interrupted as exc:
        if exc.checkpoint is None:
            raise
        raise Interrupted(f"{exc}; continue with: {_resume_command(getattr(args, 'argv', None))}",
                          exc.signum, exc.checkpoint) from None
    noise = _gns_report(callbacks, result.output_dir)
    _plot_memory(plots, plan)
    if plots is not None and noise is not None:
        from autobatch.plots import plot_noise_scale

        _err(f"wrote {plot_noise_scale(noise, plots)}")
    if args.json:
        out = {"plan": plan.to_dict(), "run": result.to_dict()}
        if args.gns:
            out["gradient_noise_scale"] = noise
        print(json.dumps(_json_safe(out), allow_nan=False), flush=True)
    else:
        print(report.run_text(result, noise), flush=True)
    return 0


def _check_plan_yaml(path: str) -> None:
    """`--plan OUTPUT_DIR/plan.json` is the record of a run, not a plan to run: said, with what to pass instead."""
    try:
        with open(path, encoding="utf-8") as f:
            is_json = f.read(1) == "{"
    except OSError as exc:  # not as --config: that is not what the user passed
        raise ConfigError(f"--plan {path}: cannot read it ({exc.strerror or exc}); write one with autobatch plan "
                          "--output plan.yaml") from None
    if is_json:
        folder = Path(path).parent
        raise ConfigError(f"--plan {path}: this is a plan.json, the record a run keeps in its output dir; --plan "
                          "takes a plan.yaml (autobatch plan --output plan.yaml, or sweep --output); to continue "
                          f"that run: autobatch run --output-dir {shlex.quote(str(folder))} --resume")


def _resume_command(argv: list[str] | None) -> str:
    """The command line that continues an interrupted run: the same one, with --resume."""
    argv = sys.argv[1:] if argv is None else argv
    argv = [a for a in argv if a not in ("--resume", "--overwrite-output-dir")]
    return shlex.join(["autobatch", *argv, "--resume"])


def _show_training_progress(config: Config, progress: bool) -> None:
    """The Trainer's own bar on a terminal, as `trl sft` shows it; none on a pipe or with --json.

    Quieting transformers' logging to errors also turns `disable_tqdm` on (TrainingArguments' default
    follows the log level), so it is set here unless the config chose it.
    """
    config.training_args.setdefault("disable_tqdm", not progress)
    if progress:
        _err(report.loading_line(config, training=True))


def _gns_callbacks(wanted: bool, every: int | None, config: Config, plan: Plan) -> list:
    """The gradient-noise-scale callback when --gns is given; says up front when it cannot measure."""
    if not wanted:
        return []
    from autobatch.gns import gns_callback

    if plan.gradient_accumulation_steps == 1 and config.world_size == 1:
        _err(report.gns_accumulation_note())
    return [gns_callback(every)]


def _gns_report(callbacks: list, output_dir: str) -> dict | None:
    """gns.json written atomically into the output dir; its overhead is printed."""
    if not callbacks:
        return None
    from autobatch.gns import write_report

    noise = callbacks[0].report()
    _err(report.gns_written_line(write_report(output_dir, noise), noise))
    return noise


def _add_sweep_flags(sweep: argparse.ArgumentParser) -> None:
    sweep.add_argument("--effective-batch-sizes", metavar="B,B,...",
                       help="rungs to plan (default: m·W·2^k for k = 0..4 plus the config's target; "
                            "m = the largest micro-batch that fits)")
    sweep.add_argument("--lr-scaling", choices=["sqrt", "linear", "none"],
                       help="learning rate per rung from the config's rate at its effective batch "
                            "(default: sqrt for Adam-family optimizers, linear for SGD)")
    sweep.add_argument("--gns-file", metavar="FILE",
                       help="gns.json written by `autobatch run --gns`: its B_noise drives the verdict")
    sweep.add_argument("--validate-tokens", metavar="N", type=int,
                       help="train each rung for about N tokens (fresh SFTTrainer, same seed and data order) "
                            "and compare eval loss at equal tokens")
    sweep.add_argument("--lr-multipliers", metavar="X,X,...",
                       help="with --validate-tokens: also validate each rung at these multiples of its rate")
    sweep.add_argument("--max-trials", metavar="N", type=int, help="run at most N validation trials this time")
    sweep.add_argument("--timeout", metavar="SECONDS", type=float,
                       help="start no validation trial after this many seconds")
    sweep.add_argument("--storage", metavar="URL",
                       help="optuna storage URL (default: sqlite:///OUTPUT_DIR/sweep.db)")
    sweep.add_argument("--study-name", metavar="NAME", default="autobatch-sweep", help="default: autobatch-sweep")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the study in --storage: failed or missing trials run, done ones do not")


#: The sweep's own keys (its keyword arguments, not config keys), each said as its flag.
_SWEEP_KEYS = ("effective_batch_sizes", "lr_scaling", "gns_file", "validate_tokens", "lr_multipliers", "max_trials",
               "timeout", "storage", "study_name", "resume")


def _cmd_sweep(args: argparse.Namespace, extras: list[str]) -> int:
    """Parse, then `api.sweep` decides (checks, probe, verdict, validation runs, plots); the table is printed here."""
    from autobatch import api

    config = _config_from_args(args, extras)
    args.names.update({key: "--" + key.replace("_", "-") for key in _SWEEP_KEYS})
    tokens = args.validate_tokens

    def checked(config: Config) -> None:  # arguments checked, nothing done yet: the setup, as plan and run say it
        if not args.json:  # --json: one JSON object on stdout and nothing else
            _print_setup(config, "sweep")
        _quiet_third_party(args.verbose)

    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the report / the one JSON object
        result = api.sweep(
            config, effective_batch_sizes=args.effective_batch_sizes, lr_scaling=args.lr_scaling,
            gns_file=args.gns_file, validate_tokens=tokens, lr_multipliers=args.lr_multipliers,
            max_trials=args.max_trials, timeout=args.timeout, storage=args.storage, study_name=args.study_name,
            resume=args.resume, plot_dir=args.plot, on_checked=checked,
            on_trial=_trial_printer(config.memory_budget_bytes),
            on_validation_budget=lambda rungs, rates: _err(
                report.validation_budget_text(rungs, rates, tokens, args.max_trials)),
            on_too_big=lambda sizes, per_example: _err(report.too_big_text(sizes, tokens, per_example)),
            on_examples=lambda examples, sizes, per_example: _err(report.examples_text(examples, sizes, per_example)),
            on_validation_cost=lambda runs, seconds: _err(report.validation_cost_text(runs, seconds)),
            on_validated=lambda point, loss, attrs: _err(
                report.validated_line(point.rung.effective_batch_size, point.learning_rate, loss, attrs)),
        )
    if args.json:
        print(json.dumps(_json_safe(result.to_dict()), allow_nan=False), flush=True)
    else:
        print(report.format_sweep(result.rungs, result.ladder, result.gradient_noise_scale, result.recommended,
                                  result.reason, result.notes, result.results, _sayer(args.names)), flush=True)
        _err(report.study_line(result.study_name, result.storage))
    for path in result.plots.values():
        _err(f"wrote {path}" if path is not None else report.time_to_target_skipped_line())
    if args.output:
        _write_output(result.rung_config, result.plan, args.output)
    return 0


def _cmd_cache(args: argparse.Namespace, extras: list[str]) -> int:
    """`autobatch cache [list|path|clear]`: the probe cache, by the sqlite3 module only (no torch)."""
    import sqlite3

    from autobatch import cache

    if extras:
        raise ConfigError(f"unexpected argument {extras[0]!r} (see autobatch cache --help)")
    path = cache.cache_path(args.cache)
    if args.action == "path":
        print(path, flush=True)
        return 0
    try:
        if args.action == "clear":
            count = cache.clear(path)
            print(report.cleared_line(count, path), flush=True)
            return 0
        entries = cache.list_entries(path)
    except cache.NotACache as exc:
        raise ConfigError(f"--cache {path}: {exc}; it was not changed: pass the probe cache's path "
                          "(`autobatch cache path`)") from None
    except (sqlite3.Error, OSError) as exc:
        raise AutobatchError(f"--cache {path}: cannot read it ({exc}); delete the file or pass another "
                             "--cache") from None
    if args.json:
        print(json.dumps({"path": str(path), "entries": [vars(e) for e in entries]}, default=str), flush=True)
        return 0
    print(report.cache_listing(path, entries), flush=True)
    return 0


def _err(text: str, every_rank: bool = False) -> None:
    """stderr, from rank 0 only under a launcher (errors from every rank: each exits on its own)."""
    if every_rank or is_main():
        sys.stderr.write(text + "\n")  # one write: lines of two ranks sharing a pipe do not interleave
        sys.stderr.flush()


class _SaidAsTyped(logging.Formatter):
    """A warning from below that names keys (`extra={"keys": ...}`) is said in the user's words, as errors are
    (on this handler only: the record other handlers see is left as it was)."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.args = args  # its `names` are known once the config is built, after logging starts

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        keys = getattr(record, "keys", ())
        return _say(text, keys, getattr(self.args, "names", {})) if keys else text


@contextlib.contextmanager
def _logging_to_stderr(verbose: bool, debug: bool, args: argparse.Namespace):
    """autobatch's loggers to stderr while a command runs: INFO with -v, DEBUG with --debug, else WARNING."""
    logger = logging.getLogger("autobatch")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SaidAsTyped(args))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:  # main() may be called again in-process (tests, notebooks): leave no handler behind
        logger.removeHandler(handler)
        logger.setLevel(level)


def _quiet_third_party(verbose: bool) -> None:
    """Silence transformers/datasets info logs, their loading/saving bars and known FutureWarnings unless -v.

    Environment variables cover libraries not imported yet; the logging APIs those already imported.
    The Trainer's own training bar (tqdm, not transformers' logging.tqdm) is left alone for `run`.
    """
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights", "Writing model shards"
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category,
                                module=r"(transformers|trl|peft|accelerate|datasets|torch|huggingface_hub)(\.|$)")
    # torch's lazy deprecated attribute, touched when the cpu backend walks gc.get_objects()
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated",
                            category=FutureWarning)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def _join_dash_values(argv: list[str]) -> list[str]:
    """`--memory-budget -5GiB` as `--memory-budget=-5GiB`: argparse reads a value that starts with a dash
    as a flag and says only "expected one argument"; joined, it reaches the check that says what is wrong."""
    flags = {flag for flag, _, _ in _VALUE_FLAGS}
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in flags and arg[:1] == "-" and arg[1:2] in tuple("0123456789."):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `autobatch` command; returns the exit code (0 ok, 1 runtime error, 2 bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    args = None
    try:
        args, extras = _make_parser().parse_known_args(_join_dash_values(argv))
        if args.command is None:
            raise ConfigError("choose a command: plan, run, sweep or cache (see autobatch --help)")
        args.argv = argv
        with _logging_to_stderr("-v" in argv or "--verbose" in argv, debug, args), stop_on_signals() as args.stop, \
                contextlib.ExitStack() as quiet:
            if not is_main():  # rank 0 reports; the other ranks' stdout goes nowhere
                quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
            return args.func(args, extras)
    except AutobatchError as exc:
        if debug:
            traceback.print_exc()
        _err(f"autobatch: error: {_one_line(_as_typed(exc, getattr(args, 'names', {})))}",
             every_rank=not getattr(exc, "said_by_rank_0", False))
        return exc.exit_code
    except KeyboardInterrupt:
        _err("autobatch: interrupted", every_rank=True)
        return 130
    except Exception as exc:
        if debug:
            raise
        message = f"{type(exc).__name__}: {_one_line(str(exc))}"
        _err(f"autobatch: error: {message} (rerun with --debug for the traceback)", every_rank=True)
        return 1


def _said_as(config_path: str | None, names: dict[str, str]) -> dict[str, str]:
    """How each key is named to this user: the flag they typed, else the key as their --config file has it,
    else the command line's flag for it (a person at the command line is told flags; see `_say`)."""
    said = {key: flag for flag, key, _ in (*_VALUE_FLAGS, *_SWITCH_FLAGS)}
    for key in read_yaml(config_path) if config_path else ():
        said[key] = key
    return {**said, **names}


#: Names below the CLI that are keyword arguments of the Python API, not config keys, and their flags.
_CALL_FLAGS = {"plan": "--plan", "resume": "--resume", "overwrite": "--overwrite-output-dir", "config": "--config"}


def _as_typed(exc: AutobatchError, names: dict[str, str]) -> str:
    """The error's message with each key it names (`AutobatchError.keys`) as the user typed it (`_say`)."""
    return _say(str(exc), getattr(exc, "keys", ()), names)


def _say(text: str, keys: tuple[str, ...], names: dict[str, str]) -> str:
    """`text` with each of `keys` as the user typed it: the flag where one was given, the key where their config
    file has it, else the flag for it (any config key is `--key-name` here).

    A key that is also a plain word (plan, resume) is named in backticks, and only that form is replaced."""
    for key in keys:
        said = names.get(key) or _CALL_FLAGS.get(key) or "--" + key.replace("_", "-")
        if f"`{key}`" in text:
            text = text.replace(f"`{key}`", said)
        else:  # a key inside a path or file name (/mnt/storage/sweep.db, resume.yaml) is not the key
            text = re.sub(rf"(?<![\w/.-]){re.escape(key)}(?![\w/-]|\.\w)", said, text)
    return text


_NAMED = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b|(?<=`)[a-z]+(?=`)")


def _sayer(names: dict[str, str]) -> Callable[[str], str]:
    """`_say` for notes, which name keys without listing them: each snake_case word that is a key (the user's,
    autobatch's or SFTConfig's), and each keyword in backticks (`resume`), is said as the user typed it."""
    known = names.keys() | AUTOBATCH_KEYS | set(sft_fields() or ()) | _CALL_FLAGS.keys()
    return lambda text: _say(text, tuple(dict.fromkeys(w for w in _NAMED.findall(text) if w in known)), names)


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


if __name__ == "__main__":
    raise SystemExit(main())
