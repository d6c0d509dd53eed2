"""The plan file: plan.yaml (the config with the planned batch, for `trl sft --config` and `autobatch run --plan`)
and a run's plan.json, written, read, checked against a config, and resumed from a checkpoint.

plan.yaml holds only keys TRL reads; autobatch's own facts are `#` lines at its top, one of them the
machine-readable `# autobatch-plan: {...}` line (`read_plan_meta`): the memory fingerprint the plan holds for,
the model's content, the batch its probe measured, and keys trl sft has no field for (`hidden_keys`).
The memory fingerprint itself is `config.memory_fingerprint`: the probe cache keys by it too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from autobatch.binding import model_content
from autobatch.config import (
    LOCAL_DATA_FORMATS,
    MODEL_CONFIG_LORA_KEYS,
    SCRIPT_ARGUMENTS_KEYS,
    SFT_CHECKPOINTING_DEFAULT,
    TRAINER_KEYS,
    Config,
    build_config,
    memory_fingerprint,
    modern_names,
    resolved_path,
    write_atomic,
)
from autobatch.errors import AutobatchError, ConfigError
from autobatch.planner import CheckpointingChoice, Plan
from autobatch.rundir import PLAN_FILE, STATE_FILE, check_output_dir, resume_checkpoint
from autobatch.units import format_bytes
from autobatch.workload import fingerprint, model_path

logger = logging.getLogger(__name__)

PLAN_META_PREFIX = "# autobatch-plan: "
_LORA_TO_MODEL_CONFIG = {v: k for k, v in MODEL_CONFIG_LORA_KEYS.items()}


# ----------------------------------------------------------------------------------------- plan.yaml: written

def plan_yaml_text(config: Config, plan: Plan, model_path: str | os.PathLike | None = None) -> str:
    """The config with the planned batch filled in, as YAML that `trl sft --config` and `autobatch run` read.

    Only TRL keys are written (SFTConfig/TrainingArguments from `training_args`, ScriptArguments dataset
    keys, ModelConfig model and LoRA keys); autobatch's own facts are `#` comment lines at the top.
    `model_path` is the resolved path of the built-in model when `config.model_name_or_path` is None.
    """
    if not plan.fits:
        raise AutobatchError(f"micro-batch {plan.per_device_train_batch_size} does not fit the memory "
                             "budget: no plan to write")
    choice = plan.checkpointing
    if choice is not None:  # what the plan chose (or kept), not TRL's default
        config = dataclasses.replace(config, training_args={
            **modern_names(config.training_args), "activation_checkpointing": choice.activation_checkpointing})
    written = _as_written(config, plan.device, plan.precision)
    model = written.model_name_or_path or (str(model_path) if model_path is not None else None)
    if plan.assumed:  # an estimate: the GPU run builds the optimizer the estimate emulated, named
        written.training_args.setdefault("optim", plan.assumed["optim"])
    body: dict[str, Any] = {}
    if model is not None:
        body["model_name_or_path"] = model
    body.update(written.model_args)
    body.update(_dataset_keys(written))
    body["per_device_train_batch_size"] = plan.per_device_train_batch_size
    body["gradient_accumulation_steps"] = plan.gradient_accumulation_steps
    trainer_only = {k: v for k, v in written.training_args.items() if k in TRAINER_KEYS}
    body.update({k: v for k, v in written.training_args.items() if k not in TRAINER_KEYS})
    if plan.per_device_eval_batch_size:
        body["per_device_eval_batch_size"] = plan.per_device_eval_batch_size
    not_written = []
    if config.lora is not None:
        body["use_peft"] = True
        for key, value in config.lora.items():
            if key in _LORA_TO_MODEL_CONFIG:
                if value is not None:
                    body[_LORA_TO_MODEL_CONFIG[key]] = value
            else:
                not_written.append(f"lora.{key}={value!r}")

    budget, usable, peak = plan.memory_budget_bytes, plan.usable_memory_bytes, plan.peak_memory_bytes
    world = plan.world_size
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    launch = f" (launch {world} processes, e.g. torchrun --nproc_per_node {world})" if world > 1 else ""
    capped = " (capped by max_micro_batch_size)" if plan.capped else ""
    if plan.stopped_at_need:
        capped = " or more (not searched past what the plan needs)"
    lines = [
        (f"# Written by `autobatch plan` on {stamp}; use with `trl sft --config FILE` or "
         "`autobatch run --config FILE`."),
        (f"# effective batch {plan.effective_batch_size} = per_device_train_batch_size "
         f"{plan.per_device_train_batch_size} × gradient_accumulation_steps "
         f"{plan.gradient_accumulation_steps} × world size {world}{launch}"),
        (f"# device {plan.device}; memory budget {format_bytes(budget)} ({budget} bytes), headroom "
         f"{plan.headroom:g}, usable {format_bytes(usable)} ({usable} bytes)"),
        (f"# peak at micro-batch {plan.per_device_train_batch_size}: {format_bytes(peak)} ({peak} bytes); "
         f"largest micro-batch that fits: {plan.max_fitting_micro_batch_size}{capped}; max_length {plan.max_length}; "
         f"{len(plan.trials)} trials"),
    ]
    meta = {
        "device": plan.device, "memory_budget_bytes": budget, "usable_memory_bytes": usable, "headroom": plan.headroom,
        "peak_memory_bytes": peak, "max_micro_batch_size": plan.max_fitting_micro_batch_size, "max_length": plan.max_length,
        "effective_batch_size": plan.effective_batch_size, "world_size": world, "seconds_per_step": plan.seconds_per_micro_batch,
        "memory_fingerprint": memory_fingerprint(written, str(model_path) if model_path else None),
        "per_device_train_batch_size": plan.per_device_train_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "model_content": model_content(model),  # the plan holds for this model, wherever it is saved
    }
    if choice is not None:
        meta["checkpointing"] = choice.to_dict()
        on_off = "true" if choice.activation_checkpointing else "false"
        lines.append(f"# activation_checkpointing {on_off} ({'measured' if choice.chosen_by == 'measured' else 'yours'}): "
                     f"{choice.reason}")
    if plan.device == "cuda":  # the allocator setting the trials ran under; `run --plan` warns when it differs
        meta["pytorch_cuda_alloc_conf"] = plan.pytorch_cuda_alloc_conf
    if trainer_only:  # read back by autobatch (build_config), invisible to trl sft
        meta["autobatch_only"] = trainer_only
    lines.append(PLAN_META_PREFIX + json.dumps(meta, sort_keys=True, default=str))
    if model is None:
        lines.append("# model_name_or_path: the built-in tiny model (pass its path to write it here)")
    if config.dataset_name is None:
        lines.append("# dataset_name: none, autobatch uses its built-in text sample; set one for trl sft")
    for key, value in trainer_only.items():
        lines.append(f"# {key}: {value} is for autobatch run only (trl sft has no such key; kept in the line above)")
    if not_written:
        lines.append(f"# LoRA settings trl sft has no key for (autobatch run only): {', '.join(not_written)}")
    try:
        text = yaml.safe_dump(body, sort_keys=False, default_flow_style=False, allow_unicode=True)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot write the plan as YAML: {exc}") from None
    return "\n".join(lines) + "\n" + text


def _as_written(config: Config, device: str, precision: str | None = None) -> Config:
    """The config as plan.yaml states it: the precision the plan was measured with, current key names.

    `precision` ("bf16", "fp16", "fp32") is what the trials measured, written as bf16/fp16 so `trl sft`
    trains what was planned. Without it, on the cpu backend bf16/fp16 are off (the probe turned them off),
    so `trl sft` on that machine does not fall back to TRL's bf16 default, which the CPU refuses.
    """
    args = modern_names(config.training_args)
    args.setdefault("activation_checkpointing", SFT_CHECKPOINTING_DEFAULT)  # said, not left to TRL's default
    if device == "cpu":  # measured on the CPU: `trl sft` trains there too, even where a GPU is visible
        args["use_cpu"] = True
    if precision:
        args.update(bf16=precision == "bf16", fp16=precision == "fp16")
    elif device == "cpu":
        args["bf16"] = False
        if args.get("fp16"):
            args["fp16"] = False
    # trl sft may be started from elsewhere: local model and data alike are written as absolute paths
    return dataclasses.replace(config, training_args=args, dataset_name=resolved_path(config.dataset_name),
                               model_name_or_path=resolved_path(config.model_name_or_path))


def _dataset_keys(config: Config) -> dict[str, Any]:
    """The data as TRL spells it: a `datasets:` entry for a local file or a held-out fraction, else ScriptArguments.

    `trl sft` reads a local file only through DatasetMixtureConfig (`{path: json, data_files: FILE}`), and a
    held-out fraction only as its `test_split_size`; autobatch reads both spellings back.
    """
    name = config.dataset_name
    if name is None:
        return {}
    builder = LOCAL_DATA_FORMATS.get(Path(name).suffix.lower()) if os.path.isfile(name) else None
    if builder is None and config.eval_fraction is None:
        keys = {key: getattr(config, key) for key in SCRIPT_ARGUMENTS_KEYS}
        return {k: v for k, v in keys.items() if v is not None}
    entry: dict[str, Any] = {"path": builder, "data_files": name} if builder else {"path": name}
    if not builder and config.dataset_config is not None:
        entry["name"] = config.dataset_config
    entry["split"] = config.dataset_train_split
    keys = {"datasets": [entry]}
    if config.eval_fraction is not None:
        keys["test_split_size"] = config.eval_fraction
    return keys


def check_output_path(path: str | os.PathLike, flag: str = "--output") -> Path:
    """Fail before any work when the file could not be written: its directory must exist."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give a file name such as {path / 'plan.yaml'}")
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: directory {parent} does not exist; create it or choose another "
                          "path")
    try:  # the honest test: os.access says yes to root on a read-only or special filesystem
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write in {parent} ({exc.strerror or exc}); choose another "
                          "path") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path}: the file is not writable; choose another path")
    return path


def write_plan_yaml(path: str | os.PathLike, text: str, flag: str = "--output") -> Path:
    """Write `text` atomically (see `write_atomic`): never half-written."""
    path = check_output_path(path, flag)
    try:
        return write_atomic(path, text)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write it ({exc.strerror or exc})") from None


def write_plan(plan: Plan, path: str | os.PathLike, config: Config | None = None) -> str:
    """Write the plan atomically: `.json` as `to_dict()`, anything else as plan.yaml (`autobatch.save_plan`)."""
    if str(path).endswith(".json"):
        text = json.dumps(plan.to_dict(), indent=2, default=str)
    elif config is None:
        model = plan.memory_fingerprint.get("model_name_or_path")
        text = plan_yaml_text(Config(model_name_or_path=model, world_size=plan.world_size), plan)
    else:
        builtin = model_path(config) if config.model_name_or_path is None else None
        text = plan_yaml_text(config, plan, model_path=builtin)
    return str(write_plan_yaml(path, text, flag="path"))


# -------------------------------------------------------------------------------- plan.yaml: read and checked

def read_plan_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The machine-readable `# autobatch-plan: {...}` line of a plan.yaml; ConfigError if there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(PLAN_META_PREFIX):
                    return json.loads(line[len(PLAN_META_PREFIX):])
    except (OSError, ValueError) as exc:
        raise ConfigError(f"`plan` {path}: cannot read it ({exc}); write one with autobatch plan --output "
                          "(autobatch.save_plan)", keys=("plan",)) from None
    raise ConfigError(f"`plan` {path}: not a plan written by autobatch plan --output (autobatch.save_plan); write "
                      "one with it", keys=("plan",))


def hidden_keys(path: str | os.PathLike | None) -> dict[str, Any]:
    """The keys a plan.yaml keeps in its `# autobatch-plan:` line because trl sft has no field for them
    (`formatting_func`), for `config.build_config(path, hidden=...)`; {} for an ordinary config."""
    if path is None:
        return {}
    try:
        return read_plan_meta(path).get("autobatch_only") or {}
    except ConfigError:
        return {}


def load_plan(path: str, config: Config) -> Plan:
    """A plan saved by `autobatch plan --output`, refused unless it holds for `config`: the same memory
    settings, the same model content (wherever it is saved), and the batch its probe measured."""
    meta = read_plan_meta(path)  # first: a missing or foreign file is a `plan` problem, not a config one
    saved = build_config(path)
    differences = plan_differences(meta, config, path)
    if differences:
        raise ConfigError(
            f"`plan` {path} was made for other memory settings ({'; '.join(differences)}): "
            "plan again without `plan`, or run with the settings it was made for", keys=("plan",)
        )
    micro, accumulation = check_planned_batch(path, meta, config, saved)
    _warn_alloc_conf(path, meta)
    return Plan(
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        effective_batch_size=micro * accumulation * saved.world_size,
        world_size=saved.world_size,
        max_fitting_micro_batch_size=meta["max_micro_batch_size"],
        memory_budget_bytes=meta["memory_budget_bytes"],
        usable_memory_bytes=meta["usable_memory_bytes"],
        headroom=meta["headroom"],
        peak_memory_bytes=meta["peak_memory_bytes"],
        device=meta["device"],
        max_length=meta["max_length"],
        trials=[],
        seconds_per_micro_batch=meta.get("seconds_per_step", 0.0),
        notes=[f"reused {path}: no probing"],
        memory_fingerprint=fingerprint(config),
        per_device_eval_batch_size=saved.training_args.get("per_device_eval_batch_size"),
        checkpointing=CheckpointingChoice.from_dict(meta["checkpointing"]) if meta.get("checkpointing") else None,
        pytorch_cuda_alloc_conf=meta.get("pytorch_cuda_alloc_conf"),
    )


def plan_differences(meta: dict, config: Config, path: str) -> list[str]:
    """What differs between the settings and model a plan.yaml was made for and `config`'s.

    The config is compared as plan.yaml writes it (current key names, cpu precision off), with keys it
    leaves to defaults (bf16, fp16, use_cpu) taken as planned; the model by content, not by path.
    """
    saved = dict(meta["memory_fingerprint"])
    current = fingerprint(_as_written(config, meta["device"]))
    for key in ("bf16", "fp16", "use_cpu"):
        if key not in config.training_args and key in saved:
            current[key] = saved[key]
    model = model_path(config)
    if "model_content" in meta:
        now = model_content(model)
        if meta["model_content"] is not None and now is not None:
            saved.pop("model_name_or_path", None)
            current.pop("model_name_or_path", None)
            for part in ("config", "weights"):
                if meta["model_content"][part] != now[part]:
                    saved[f"model {part}"], current[f"model {part}"] = meta["model_content"][part], now[part]
    else:
        logger.warning("`plan` %s was written before plans were bound to the model's content: the model at %s is "
                       "taken to be the one it was made for (plan again to bind it)", path, model,
                       extra={"keys": ("plan",)})
    differences = fingerprint_differences(saved, current)
    if config.memory_budget_bytes is not None and config.memory_budget_bytes != meta["memory_budget_bytes"]:
        differences.append(f"memory_budget: {meta['memory_budget_bytes']} -> {config.memory_budget_bytes}")
    if config.device not in (None, meta["device"]) and meta["device"] != "estimate":  # estimate plans for a GPU
        differences.append(f"device: {meta['device']} -> {config.device}")
    return differences


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: saved -> current` for each memory-relevant setting that differs."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def check_planned_batch(path: str, meta: dict, config: Config, saved: Config) -> tuple[int, int]:
    """The micro-batch × accumulation the plan's probe measured; a hand-edited one is refused in one line.

    `config` may be another file (`--config tiny.yaml --plan plan.yaml`): where it leaves the batch to
    autobatch (auto), the plan file's values are taken.
    """
    micro, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    micro = micro if isinstance(micro, int) else saved.per_device_train_batch_size
    accumulation = accumulation if isinstance(accumulation, int) else saved.gradient_accumulation_steps
    if not (isinstance(micro, int) and isinstance(accumulation, int)):
        raise ConfigError(f"`plan` {path}: per_device_train_batch_size and gradient_accumulation_steps must be set",
                          keys=("plan",))
    planned = (meta.get("per_device_train_batch_size", micro), meta.get("gradient_accumulation_steps", accumulation))
    effective = micro * accumulation * config.world_size
    wanted = config.effective_batch_size
    if (micro, accumulation) != planned or effective != meta["effective_batch_size"] or wanted not in (None, effective):
        raise ConfigError(
            f"`plan` {path}: per_device_train_batch_size {micro} × gradient_accumulation_steps {accumulation} is not "
            f"what it planned ({planned[0]} × {planned[1]}, effective {meta['effective_batch_size']}; the peak it "
            f"states is for micro-batch {planned[0]}): restore those values, or plan micro-batch {micro} again "
            f"into {path} to check the new size", keys=("plan",)
        )
    return micro, accumulation


def _warn_alloc_conf(path: str, meta: dict) -> None:
    """One line when this run's allocator setting is not the one the plan was measured under: the edge
    moves with it (an H200 fitted 43 with expandable_segments:True, 39 without; issue 19)."""
    if "pytorch_cuda_alloc_conf" not in meta:  # not a cuda plan, or written before the setting was recorded
        return
    from autobatch.memory import alloc_conf  # memory imports torch: kept out of the CLI's start-up

    planned, now = meta["pytorch_cuda_alloc_conf"], alloc_conf()
    if planned != now:
        logger.warning("`plan` %s was measured with PYTORCH_CUDA_ALLOC_CONF=%s but this run has %s: the largest "
                       "micro-batch may differ; run with the plan's setting or plan again", path,
                       planned or "(unset)", now or "(unset)", extra={"keys": ("plan",)})


# --------------------------------------------------------------------------- plan.json: a run's plan, resumed

def write_run_plan(output_dir: str | os.PathLike, plan: Plan) -> Path:
    """OUT/plan.json: the plan a run trains with, which `--resume` reuses (`saved_plan`)."""
    return write_atomic(Path(output_dir, PLAN_FILE), json.dumps(plan.to_dict(), indent=2))


def saved_plan(config: Config) -> Plan | None:
    """The plan of an earlier run in this output dir (for `--resume`), None if there is none.

    Refused when the config's memory settings or batch no longer match it: resuming with another
    micro-batch or accumulation would change the effective batch mid-run.
    """
    path = check_output_dir(config) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        plan = Plan.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        # The checkpoint holds the micro-batch too: resuming stays possible (advising a plain run was a dead end)
        logger.warning("`resume`: %s is unreadable (%s): the batch comes from the checkpoint instead", path,
                       type(exc).__name__, extra={"keys": ("resume",)})
        return None
    differences = fingerprint_differences(plan.memory_fingerprint, fingerprint(config))
    for key, wanted in (
        ("per_device_train_batch_size", config.per_device_train_batch_size),
        ("gradient_accumulation_steps", config.gradient_accumulation_steps),
        ("effective_batch_size", config.effective_batch_size),
        ("memory_budget_bytes", config.memory_budget_bytes),
        ("device", config.device),
    ):
        if wanted not in (None, "auto", getattr(plan, key)):
            differences.append(f"{key}: {getattr(plan, key)!r} -> {wanted!r}")
    if differences:
        raise ConfigError(
            f"`resume`: {path} was planned for other settings ({'; '.join(differences)}): "
            "resume with the settings it was made for, or train into a new output_dir", keys=("resume", "output_dir")
        )
    note = f"reused {path} to resume: no probing"
    return dataclasses.replace(plan, notes=[*plan.notes, *([] if note in plan.notes else [note])])  # said once


def check_resume_batch(config: Config, plan: Plan, plan_file: str) -> None:
    """--resume --plan: the plan must state the batch the run trained with, or the effective batch changes
    mid-run (and plan.json would be overwritten with the other one)."""
    checkpoint = resume_checkpoint(config)
    path = check_output_dir(config) / PLAN_FILE
    try:
        before = json.loads(path.read_text())
        trained = (before["per_device_train_batch_size"], before["gradient_accumulation_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        state = json.loads((checkpoint / STATE_FILE).read_text())
        trained = (state.get("train_batch_size"), plan.gradient_accumulation_steps)
    if trained != (plan.per_device_train_batch_size, plan.gradient_accumulation_steps):
        raise ConfigError(
            f"`resume` `plan` {plan_file}: it states micro-batch {plan.per_device_train_batch_size} × accumulation "
            f"{plan.gradient_accumulation_steps}, but the run in {path.parent} trained with {trained[0]} × "
            f"{trained[1]}: resume without `plan` (the run's own {PLAN_FILE} is used), or train the new plan into "
            "another output_dir", keys=("resume", "plan", "output_dir")
        )


def resume_plan(config: Config) -> Plan:
    """The plan `--resume` trains with: OUT/plan.json, else the newest complete checkpoint's batch."""
    checkpoint = resume_checkpoint(config)
    return saved_plan(config) or plan_from_checkpoint(config, checkpoint)


def plan_from_checkpoint(config: Config, checkpoint: Path) -> Plan:
    """For --resume without plan.json: the micro-batch from the checkpoint's trainer_state.json, the
    accumulation from the config's effective batch (or accumulation); refused where either is unknown."""
    try:
        micro = json.loads((checkpoint / STATE_FILE).read_text()).get("train_batch_size")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"`resume`: cannot read {checkpoint / STATE_FILE} ({exc})", keys=("resume",)) from None
    world = config.world_size
    accumulation = config.gradient_accumulation_steps
    effective = config.effective_batch_size
    known = isinstance(accumulation, int) or not isinstance(micro, int)
    if not known and effective and effective % (micro * world) == 0:
        accumulation = effective // (micro * world)
    wanted = config.per_device_train_batch_size
    if not isinstance(micro, int) or not isinstance(accumulation, int) or wanted not in ("auto", None, micro):
        raise ConfigError(
            f"`resume`: {checkpoint.parent} has no readable {PLAN_FILE} and {checkpoint / STATE_FILE} gives "
            f"micro-batch {micro}; pass the effective_batch_size (or gradient_accumulation_steps) the run used, "
            "so the data position stays exact", keys=("resume", "effective_batch_size", "gradient_accumulation_steps")
        )
    return Plan(
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        effective_batch_size=micro * accumulation * world,
        world_size=world,
        max_fitting_micro_batch_size=micro,
        memory_budget_bytes=config.memory_budget_bytes or 0,
        usable_memory_bytes=0,
        headroom=config.headroom or 0.0,
        peak_memory_bytes=0,
        device=config.device or "",
        max_length=config.training_args.get("max_length") or 0,
        trials=[],
        notes=[f"`resume` without {PLAN_FILE}: micro-batch from {checkpoint / STATE_FILE}, no probing"],
        memory_fingerprint=fingerprint(config),
    )
