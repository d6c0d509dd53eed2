"""Configuration: dataclass defaults, then YAML (`--config`), then CLI flags; validation. No torch here.

Keys are TRL's (SFTConfig/TrainingArguments, ScriptArguments, ModelConfig) plus autobatch's own fields.
Every key that is not autobatch's goes to `Config.training_args` untouched; its name and plain type are
checked against SFTConfig's fields read from TRL's source (`autobatch.fields`), before torch loads. Validation
collects every problem and raises one `ConfigError`. Also the memory fingerprint (which settings change a
step's memory), below both the probe cache and plan.yaml (`autobatch.planfile`), which key by it.

One module over ~600 lines on purpose: most of it is the key tables, the merge and the one validation pass
that collects every problem (`_validate` and its helpers), which read the same tables. The fingerprint (the
last ~80 lines: which of those keys change memory) is the only other piece; moved out, this module would still
be over 600 lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autobatch.errors import AutobatchError, ConfigError
from autobatch.fields import key_problems
from autobatch.planner import check_effective_batch
from autobatch.ranks import per_rank_budget
from autobatch.units import parse_bytes

logger = logging.getLogger(__name__)

#: The config used when neither --config nor --model is given (configs/tiny.yaml is a copy).
BUILTIN_CONFIG = Path(__file__).parent / "assets" / "tiny.yaml"

DEVICES = ("cuda", "cpu", "estimate")
DATASET_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
#: datasets' packaged builders for local files, by suffix (the `path:` of a TRL `datasets:` entry).
LOCAL_DATA_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
LOCAL_DATA_BUILDERS = frozenset(LOCAL_DATA_FORMATS.values())
#: SFTTrainer arguments (not SFTConfig fields) a config may name: autobatch run only, `trl sft` has no key.
TRAINER_KEYS = ("formatting_func",)

#: TRL ScriptArguments keys autobatch keeps as Config fields (trl/scripts/utils.py).
SCRIPT_ARGUMENTS_KEYS = ("dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split")

#: TRL ModelConfig LoRA keys (trl/trainer/model_config.py) -> peft LoraConfig names in `Config.lora`.
MODEL_CONFIG_LORA_KEYS = {
    "lora_r": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target_modules": "target_modules",
    "lora_target_parameters": "target_parameters",
    "lora_modules_to_save": "modules_to_save",
    "lora_task_type": "task_type",
    "use_rslora": "use_rslora",
    "use_dora": "use_dora",
}
_LORA_SECTION_ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}

#: What `use_peft: true` means in TRL (ModelConfig defaults, get_peft_config); a `lora:` section
#: starts from the same values so `trl sft` reading plan.yaml builds the same adapter.
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "task_type": "CAUSAL_LM"}

#: The other ModelConfig keys: how the model is loaded (they change memory), kept in `Config.model_args`.
MODEL_ARGS_KEYS = (
    "model_revision", "dtype", "attn_implementation", "load_in_8bit", "load_in_4bit",
    "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage",
)
_DTYPES = ("auto", "bfloat16", "float16", "float32")

#: Boolean keys whose string spellings ("true", "False", "yes", "0") are converted here.
BOOL_KEYS = frozenset({
    "packing", "gradient_checkpointing", "activation_checkpointing", "bf16", "fp16", "tf32", "use_cpu",
    "padding_free", "completion_only_loss", "assistant_only_loss", "shuffle_dataset", "eval_packing",
    "activation_offloading", "use_liger_kernel", "torch_compile", "group_by_length", "remove_unused_columns",
    "do_train", "do_eval", "push_to_hub", "load_best_model_at_end", "disable_tqdm", "trust_remote_code",
    "use_peft", "use_rslora", "use_dora", "load_in_8bit", "load_in_4bit", "use_bnb_nested_quant",
})
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _env_world_size() -> int:
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        return text  # type: ignore[return-value]  # reported by validate_config, naming WORLD_SIZE


@dataclass
class Config:
    """Everything a plan or run needs; field names are the YAML keys (and, hyphenated, the flags)."""

    model_name_or_path: str | None = None  # None: the built-in tiny model (autobatch.builtin)
    dataset_name: str | None = None  # hub name or local json/jsonl/csv/parquet/txt; None: built-in sample
    dataset_config: str | None = None
    dataset_train_split: str = "train"
    dataset_test_split: str | None = None
    eval_fraction: float | None = None
    effective_batch_size: int | None = None  # None: micro = max found, accumulation as given (auto -> 1)
    per_device_train_batch_size: int | str = "auto"  # "auto" or the size to check
    gradient_accumulation_steps: int | str = "auto"
    device: str | None = None  # cuda | cpu | estimate; None: decided by the memory backend
    memory_budget_bytes: int | None = None  # YAML/CLI `memory_budget`: "300MiB", "80GB", 12345
    headroom: float | None = None  # fraction of the budget kept free; None: the device's default
    max_micro_batch_size: int = 512
    world_size: int = field(default_factory=_env_world_size)
    nproc_per_node: int | None = None  # FSDP: launch this many ranks for every trial (sets world_size)
    lora: dict | None = None  # peft LoraConfig kwargs (r, lora_alpha, lora_dropout, target_modules, ...)
    model_args: dict = field(default_factory=dict)  # other TRL ModelConfig keys: dtype, attn_implementation
    training_args: dict = field(default_factory=dict)  # every other key, for SFTConfig, untouched
    find_max: bool = False  # search past what the target effective batch needs, to the true maximum
    cache: str | None = None  # probe cache file; None: $XDG_CACHE_HOME/autobatch/probes.sqlite3
    no_cache: bool = False  # neither read nor write the probe cache
    trial_process: str = "auto"  # fresh: the edge's trials in worker processes; same: all in this one; auto: fresh on cuda


_FIELDS = tuple(f.name for f in dataclasses.fields(Config))
#: Where trials run: `fresh` judges the edge in worker processes (autobatch.launch), `same` runs every trial
#: in the planning process, `auto` is fresh on cuda (allocator history: issue 19) and same elsewhere.
TRIAL_PROCESSES = ("auto", "fresh", "same")
_PLAIN_FIELDS = frozenset(_FIELDS) - {"lora", "model_args", "training_args", "memory_budget_bytes"}

#: Every top-level key with a meaning before SFTConfig is consulted (for closest-key suggestions).
AUTOBATCH_KEYS = frozenset(_PLAIN_FIELDS | {"memory_budget", "memory_budget_bytes", "lora", "use_peft", "datasets",
                                            "test_split_size"}
                           | set(MODEL_CONFIG_LORA_KEYS) | set(MODEL_ARGS_KEYS))


# ----------------------------------------------------------------------------------------------- YAML

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float: YAML 1.1 wants `1.0e-5`, TRL users write both."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """A command-line value read as YAML, as a config file would: 'false' -> False, '1e-5' -> 1e-05."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


#: Keys that validation's advice names (what to set instead), not as the user gave them: the CLI says them as flags.
ADVICE_KEYS = ("eval_fraction", "eval_strategy", "eval_steps")


def read_yaml(path: str | os.PathLike) -> dict:
    """The top-level mapping of a config file; missing, unreadable or not a mapping: one ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"`config` {path}: file not found", keys=("config",)) from None
    except IsADirectoryError:
        raise ConfigError(f"`config` {path}: is a directory, expected a YAML file", keys=("config",)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"`config` {path}: cannot read it ({exc})", keys=("config",)) from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and start:
            problem += f" ({context} started at line {start.line + 1})"
        raise ConfigError(f"`config` {path}: not valid YAML{where}: {problem}", keys=("config",)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"`config` {path}: the top level must be a mapping of keys (e.g. `max_length: 256`), "
            f"got a {type(data).__name__}", keys=("config",)
        )
    return data


# ------------------------------------------------------------------------------------- layers, merge

@dataclass
class _Merged:
    """Layers applied so far (defaults < YAML < CLI), with the name each key was given by, for messages."""

    fields: dict = field(default_factory=dict)
    training_args: dict = field(default_factory=dict)
    model_args: dict = field(default_factory=dict)
    lora_on: bool | None = None
    lora: dict = field(default_factory=dict)
    names: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    def apply(self, data: Mapping, names: Mapping[str, str]) -> None:
        layer_lora: dict = {}
        switches: dict[str, bool] = {}
        for key, value in data.items():
            if not isinstance(key, str):
                self.problems.append(f"key {key!r} must be a string")
                continue
            name = names.get(key, key)
            if key in ("memory_budget", "memory_budget_bytes"):
                self._set(self.fields, "memory_budget_bytes", value, name)
            elif key in _PLAIN_FIELDS:
                self._set(self.fields, key, value, name)
            elif key == "datasets":
                self._dataset_mixture(value, name)
            elif key == "test_split_size":  # TRL's DatasetMixtureConfig name for a held-out fraction
                self._set(self.fields, "eval_fraction", value, name)
            elif key == "lora":
                self._lora_section(value, name, layer_lora, switches)
            elif key == "use_peft":
                flag = _as_bool(value)
                if flag is None:
                    self.problems.append(f"{name} must be true or false, got {value!r}")
                else:
                    switches[name] = flag
            elif key in MODEL_CONFIG_LORA_KEYS:
                self._put_lora(layer_lora, MODEL_CONFIG_LORA_KEYS[key], value, name)
            elif key in MODEL_ARGS_KEYS:
                self._set(self.model_args, key, value, name)
            else:
                self._set(self.training_args, key, value, name)
        if len(set(switches.values())) > 1:
            self.problems.append(f"{' and '.join(switches)} disagree on whether LoRA is on: keep one")
        elif switches:
            self.lora_on = next(iter(switches.values()))
        self.lora.update(layer_lora)

    def _set(self, target: dict, key: str, value: Any, name: str) -> None:
        target[key] = value
        self.names[key] = name

    def _dataset_mixture(self, value: Any, name: str) -> None:
        """TRL's `datasets:` list (DatasetMixtureConfig), one entry: local files or a hub/folder name.

        `{path: json, data_files: FILE, split: train}` is the spelling for a local file that `trl sft` and
        autobatch both read; `{path: NAME_OR_FOLDER, name: CONFIG, split: SPLIT}` names a hub dataset or folder.
        """
        entry = value[0] if isinstance(value, list) and len(value) == 1 else None
        if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
            self.problems.append(f"{name}: autobatch reads one entry `- {{path: json, data_files: FILE, split: "
                                 f"train}}` or `- {{path: HUB_NAME_OR_FOLDER, split: train}}`; got {value!r}")
            return
        extra = sorted(set(entry) - {"path", "name", "data_files", "split"} - {k for k, v in entry.items() if v is None})
        if extra:
            self.problems.append(f"{name}: {', '.join(extra)} not supported by autobatch; remove it")
            return
        path, files, split = entry["path"], entry.get("data_files"), entry.get("split") or "train"
        if path in LOCAL_DATA_BUILDERS:
            if not isinstance(files, str):
                self.problems.append(f"{name}: path {path} needs data_files: one local file (a string)")
                return
            self._set(self.fields, "dataset_name", files, f"{name}[0].data_files")
        else:
            if files is not None:
                self.problems.append(f"{name}: data_files goes with path: json|csv|parquet|text; remove it")
                return
            self._set(self.fields, "dataset_name", path, f"{name}[0].path")
            self._set(self.fields, "dataset_config", entry.get("name"), f"{name}[0].name")
        self._set(self.fields, "dataset_train_split", split, f"{name}[0].split")

    def _lora_section(self, value: Any, name: str, layer_lora: dict, switches: dict) -> None:
        if value is None or value is False:
            switches[name] = False
        elif value is True:
            switches[name] = True
        elif isinstance(value, Mapping):
            switches[name] = True
            for key, item in value.items():
                self._put_lora(layer_lora, _LORA_SECTION_ALIASES.get(key, key), item, f"{name}.{key}")
        else:
            self.problems.append(
                f"{name} must be a mapping of LoraConfig keys (r, lora_alpha, lora_dropout, target_modules), "
                f"true or null; got {value!r}"
            )

    def _put_lora(self, layer_lora: dict, key: str, value: Any, name: str) -> None:
        if key in layer_lora and layer_lora[key] != value:
            first = self.names[f"lora.{key}"]
            self.problems.append(f"{first} and {name} disagree ({layer_lora[key]!r} vs {value!r}): keep one")
            return
        layer_lora[key] = value
        self.names[f"lora.{key}"] = name

    def config(self) -> Config:
        lora = None
        if self.lora_on:
            lora = {**LORA_DEFAULTS, **self.lora}
        elif self.lora and self.lora_on is None:  # no input silently ignored
            given = ", ".join(self.names[f"lora.{k}"] for k in self.lora)
            self.problems.append(f"{given} would be ignored: LoRA is off; add `use_peft: true` (or --use-peft "
                                 "true) to use it, or remove it")
        return Config(
            **self.fields,
            lora=lora,
            model_args=dict(self.model_args),
            training_args=dict(self.training_args),
        )


def build_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    names: Mapping[str, str] | None = None,
    *,
    evaluates: bool = False,
    hidden: Mapping[str, Any] | None = None,
) -> Config:
    """Dataclass defaults < the YAML file at `path` < `overrides` (CLI flags), validated.

    `overrides` use the YAML key names; `names` says how each was spelled on the command line
    (`{"max_length": "--max-length"}`) so messages name what the user typed. `hidden`: the keys a plan.yaml
    at `path` keeps out of trl's way (`planfile.hidden_keys(path)`), read below the file's YAML.
    """
    merged = _Merged()
    if path is not None:
        data = read_yaml(path)
        trainer_only = hidden or {}
        merged.apply(trainer_only, {key: f"{key} (in the autobatch-plan line of {path})" for key in trainer_only})
        where = "the built-in tiny.yaml" if Path(path) == BUILTIN_CONFIG else path
        merged.apply(data, {key: f"{key} (in {where})" for key in data if isinstance(key, str)})
    if overrides:
        merged.apply(overrides, names or {})
    return _validate(merged.config(), merged.names, list(merged.problems), evaluates)


def eval_strategy(config: Config) -> str:
    """The run's eval strategy under its name or its old one (`evaluation_strategy`), "no" when unset: the one
    home of "is evaluation on" (`!= "no"`) for validation, the output-dir checks, the probe and the report."""
    args = config.training_args
    strategy = args.get("eval_strategy", args.get("evaluation_strategy"))
    return "no" if strategy is None else str(getattr(strategy, "value", strategy))


def parse_memory_budget(value: str | int, name: str = "memory_budget") -> int:
    """The one parser of `memory_budget` (YAML, flag, keyword): a size, or one per rank (`160MiB,100MiB`) of
    which this rank's; in bytes. The error names `name`."""
    if isinstance(value, str) and "," in value:
        value = per_rank_budget(value, name)
    return parse_bytes(value, name)


def validate_config(config: Config, evaluates: bool = False) -> Config:
    """A checked, normalized copy of a Config built in Python ("auto" lower-cased, "true" -> True, ...)."""
    return _validate(config, {}, [], evaluates)


# -------------------------------------------------------------------------------------------- checks

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    if _is_int(value) and value in (0, 1):
        return bool(value)
    return None


def _validate(config: Config, names: Mapping[str, str], problems: list[str], evaluates: bool = False) -> Config:
    """`evaluates`: the command evaluates whatever eval_strategy says (sweep --validate-tokens)."""
    def name(key: str) -> str:
        if key in names:
            return names[key]
        if key == "world_size" and "WORLD_SIZE" in os.environ:
            return "the WORLD_SIZE environment variable"
        return key

    out = dataclasses.replace(
        config,
        lora=None if config.lora is None else dict(config.lora),
        model_args=dict(config.model_args),
        training_args=dict(config.training_args),
    )

    # Strings: model, dataset.
    for key in ("model_name_or_path", "dataset_name", "dataset_config", "dataset_test_split"):
        value = getattr(out, key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            problems.append(f"{name(key)} must be a non-empty string, got {value!r}")
    if not isinstance(out.dataset_train_split, str) or not out.dataset_train_split.strip():
        problems.append(f"{name('dataset_train_split')} must be a split name such as train, "
                        f"got {out.dataset_train_split!r}")
    dataset = out.dataset_name
    local_file = isinstance(dataset, str) and dataset.lower().endswith(DATASET_FILE_SUFFIXES)
    if local_file and not os.path.exists(dataset):
        problems.append(f"{name('dataset_name')}: no such file {dataset!r}; "
                        "give an existing file or a hub name")
    if out.eval_fraction is not None:
        if not _is_number(out.eval_fraction) or not 0 < out.eval_fraction < 1:
            problems.append(f"{name('eval_fraction')} must be a fraction between 0 and 1 (e.g. 0.05), "
                            f"got {out.eval_fraction!r}")
        elif out.dataset_test_split is not None:
            problems.append(f"{name('eval_fraction')} and {name('dataset_test_split')} both choose the eval "
                            "data: keep one")
    problems.extend(_ignored_input_problems(out, name, local_file, evaluates))

    # Batch arithmetic.
    ok_batch = True
    if out.effective_batch_size is not None and not (_is_int(out.effective_batch_size)
                                                     and out.effective_batch_size > 0):
        problems.append(f"{name('effective_batch_size')} must be a positive integer, "
                        f"got {out.effective_batch_size!r}")
        ok_batch = False
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        value = getattr(out, key)
        if isinstance(value, str) and value.strip().lower() == "auto":
            setattr(out, key, "auto")
        elif not (_is_int(value) and value > 0):
            problems.append(f"{name(key)} must be auto or a positive integer, got {value!r}")
            ok_batch = False
    if not (_is_int(out.max_micro_batch_size) and out.max_micro_batch_size >= 1):
        problems.append(f"{name('max_micro_batch_size')} must be an integer >= 1, "
                        f"got {out.max_micro_batch_size!r}")
    if out.nproc_per_node is not None:
        if not (_is_int(out.nproc_per_node) and out.nproc_per_node >= 1):
            problems.append(f"{name('nproc_per_node')} must be an integer >= 1, got {out.nproc_per_node!r}")
        elif out.world_size not in (1, out.nproc_per_node):
            problems.append(f"{name('nproc_per_node')} {out.nproc_per_node} and {name('world_size')} "
                            f"{out.world_size} differ: give one of them")
        else:
            out.world_size = out.nproc_per_node
    if not (_is_int(out.world_size) and out.world_size >= 1):
        problems.append(f"{name('world_size')} must be an integer >= 1, got {out.world_size!r}")
        ok_batch = False
    if ok_batch:
        problems.extend(_batch_problems(out, name))

    # Device and memory.
    if out.device is not None:
        device = out.device.strip().lower() if isinstance(out.device, str) else out.device
        if device not in DEVICES:
            problems.append(f"{name('device')} must be one of {', '.join(DEVICES)}, got {out.device!r}")
        else:
            out.device = device
    if out.memory_budget_bytes is not None:
        try:
            out.memory_budget_bytes = parse_memory_budget(out.memory_budget_bytes, name("memory_budget_bytes"))
        except ConfigError as exc:
            problems.append(str(exc))
    if out.headroom is not None and not (_is_number(out.headroom) and 0 <= out.headroom < 1):
        problems.append(f"{name('headroom')} must be a fraction with 0 <= headroom < 1 (e.g. 0.1), "
                        f"got {out.headroom!r}")

    # Search and probe cache.
    for key in ("find_max", "no_cache"):
        flag = _as_bool(getattr(out, key))
        if flag is None:
            problems.append(f"{name(key)} must be true or false, got {getattr(out, key)!r}")
        else:
            setattr(out, key, flag)
    if out.trial_process not in TRIAL_PROCESSES:
        problems.append(f"{name('trial_process')} must be one of {', '.join(TRIAL_PROCESSES)}, "
                        f"got {out.trial_process!r}")
    if out.cache is not None and (not isinstance(out.cache, str) or not out.cache.strip()):
        problems.append(f"{name('cache')} must be a file path, got {out.cache!r}")

    # Keys handed to TRL: only what can be checked without importing it.
    for args in (out.training_args, out.model_args):
        for key, value in args.items():
            if key in BOOL_KEYS and value is not None:
                flag = _as_bool(value)
                if flag is None:
                    problems.append(f"{name(key)} must be true or false, got {value!r}")
                else:
                    args[key] = flag
    problems.extend(key_problems(out.training_args, names, AUTOBATCH_KEYS, skip=TRAINER_KEYS))
    problems.extend(_model_problems(out.model_name_or_path, name("model_name_or_path")))
    max_length = out.training_args.get("max_length")
    if max_length is not None and not (_is_int(max_length) and max_length > 0):
        problems.append(f"{name('max_length')} must be a positive integer (tokens per example), "
                        f"got {max_length!r}")
    dtype = out.model_args.get("dtype")
    if dtype is not None and dtype not in _DTYPES:
        problems.append(f"{name('dtype')} must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if out.lora is not None:
        problems.extend(_lora_problems(out.lora, names))

    if problems:
        text = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
        raise ConfigError(text, keys=ADVICE_KEYS)  # the subjects are named as given already (`name`)
    return out


def _model_problems(model: Any, name: str) -> list[str]:
    """A model that is not there fails here, before torch loads (issue 24: it took 104 s to say so)."""
    if not isinstance(model, str) or not model.strip():
        return []  # reported above
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            return [(f"{name} {model}: not a model directory (no config.json); pass a directory written by "
                     "save_pretrained or a hub name")]
        return []
    if path.startswith((".", "/", "~")) or os.path.exists(path):
        return [f"{name} {model}: no such directory; pass a model directory or a hub name"]
    return []


def check_model_available(config: Config) -> None:
    """Offline (HF_HUB_OFFLINE=1), a hub name that is not in the local hub cache cannot load: said before torch
    loads. Not part of validation, so a config file validates the same on any machine."""
    model = config.model_name_or_path
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if not offline or not isinstance(model, str) or os.path.exists(os.path.expanduser(model)):
        return
    from huggingface_hub import constants  # no torch, no network

    if not os.path.isdir(os.path.join(constants.HF_HUB_CACHE, "models--" + model.replace("/", "--"))):
        # runtime (exit 1), as when the download itself fails: the name may be right, the machine offline
        raise AutobatchError(f"model_name_or_path: could not load {model!r}: not a local directory, and it could "
                             f"not be downloaded from the hub (HF_HUB_OFFLINE=1, not in the hub cache "
                             f"{constants.HF_HUB_CACHE}): download it where the hub is reachable, or pass "
                             "model_name_or_path /path/to/local/copy", keys=("model_name_or_path",))


def _ignored_input_problems(config: Config, name, local_file: bool, evaluates: bool = False) -> list[str]:
    """Inputs that would reach nothing: each is an error saying what to do instead (issue 11)."""
    problems = []
    if local_file:
        where = f"{name('dataset_name')} {config.dataset_name} is one local file, whose only split is train"
        if config.dataset_train_split != "train":
            problems.append(f"{name('dataset_train_split')} {config.dataset_train_split!r}: {where}; drop it, or "
                            f"give a folder with a {config.dataset_train_split}.jsonl file, or a hub dataset")
        if config.dataset_test_split is not None:
            problems.append(f"{name('dataset_test_split')} {config.dataset_test_split!r}: {where}; hold out part "
                            "of it with eval_fraction 0.1 instead, or give a folder with a test file")
        if config.dataset_config is not None:
            problems.append(f"{name('dataset_config')} {config.dataset_config!r}: {where} and no configs; drop it")
    if eval_strategy(config) == "no" and not evaluates:
        for key in ("eval_fraction", "dataset_test_split"):
            if getattr(config, key) is not None:
                problems.append(f"{name(key)} {getattr(config, key)!r} is never used: eval_strategy is no; set "
                                "eval_strategy steps and eval_steps N (or epoch) to evaluate, or drop it")
    return problems


def _batch_problems(config: Config, name) -> list[str]:
    """Effective batch = micro × accumulation × world size exactly: we never round an effective batch."""
    effective, world = config.effective_batch_size, config.world_size
    micro, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    if effective is None:
        return []
    try:
        per_device = check_effective_batch(effective, world, name("effective_batch_size"))
    except ConfigError as exc:
        return [str(exc)]
    target = f"{name('effective_batch_size')} {effective}"
    if _is_int(micro) and _is_int(accumulation):
        if micro * accumulation == per_device:
            return []
        product = f"{name('per_device_train_batch_size')} {micro} × {name('gradient_accumulation_steps')} " \
                  f"{accumulation} × world size {world} = {micro * accumulation * world}"
        return [f"{product}, not {target}: set one of them to auto or make them multiply to it exactly"]
    for key, value in (("per_device_train_batch_size", micro), ("gradient_accumulation_steps", accumulation)):
        if _is_int(value) and per_device % value:
            problem = f"{name(key)} {value} does not divide the {per_device} samples per device of {target}"
            return [f"{problem}: choose a divisor of {per_device} or auto"]
    return []


def _lora_problems(lora: dict, names: Mapping[str, str]) -> list[str]:
    def name(key: str) -> str:
        return names.get(f"lora.{key}", f"lora.{key}")

    problems = []
    r = lora.get("r")
    if not (_is_int(r) and r > 0):
        problems.append(f"{name('r')} (LoRA rank) must be a positive integer, got {r!r}")
    alpha = lora.get("lora_alpha")
    if not (_is_number(alpha) and alpha > 0):
        problems.append(f"{name('lora_alpha')} must be a positive number, got {alpha!r}")
    dropout = lora.get("lora_dropout")
    if not (_is_number(dropout) and 0 <= dropout < 1):
        problems.append(f"{name('lora_dropout')} must be a fraction with 0 <= dropout < 1, got {dropout!r}")
    targets = lora.get("target_modules")
    if targets is not None and not (
        (isinstance(targets, str) and targets) or
        (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        problems.append(f"{name('target_modules')} must be a list of module names or all-linear, "
                        f"got {targets!r}")
    for key in ("use_rslora", "use_dora"):
        if key in lora and lora[key] is not None:
            flag = _as_bool(lora[key])
            if flag is None:
                problems.append(f"{name(key)} must be true or false, got {lora[key]!r}")
            else:
                lora[key] = flag
    return problems


# -------------------------------------------------------------------------------- memory fingerprint

#: SFTConfig's default for (gradient|activation)_checkpointing (trl/trainer/sft_config.py: True, unlike Trainer).
SFT_CHECKPOINTING_DEFAULT = True

#: SFTConfig/TrainingArguments fields that do NOT change a trial's peak, each with the reason. Every other
#: field is in the probe cache key (`cache.memory_args`): a new or forgotten field is keyed, never ignored.
NOT_MEMORY_KEYS: dict[str, str] = {
    **dict.fromkeys(("output_dir", "max_steps", "num_train_epochs", "save_strategy", "eval_strategy",
                     "logging_strategy", "disable_tqdm", "report_to", "train_sampling_strategy",
                     "auto_find_batch_size"), "the probe sets its own value for every trial (trial.Prober._build)"),
    **dict.fromkeys(("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size"),
                    "a column of the trial's own row in the cache (micro_batch_size, accumulation, eval_batch_size)"),
    **dict.fromkeys(("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "adam_beta1",
                     "adam_beta2", "adam_epsilon"),
                    "a scalar of the update or its schedule, not the size of any tensor (weight_decay is keyed: "
                    "plain Adam adds it to the gradients out of place)"),
    **dict.fromkeys(("logging_steps", "logging_first_step", "log_on_each_node", "log_level", "log_level_replica",
                     "run_name", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id"),
                    "logging: trials log nothing"),
    **dict.fromkeys(("eval_steps", "eval_delay", "eval_on_start"), "when evaluation runs, not what it holds"),
    **dict.fromkeys(("save_steps", "save_on_each_node", "save_total_limit", "save_only_model",
                     "enable_jit_checkpoint", "push_to_hub", "hub_private_repo", "hub_model_id", "hub_strategy",
                     "hub_always_push", "hub_revision", "load_best_model_at_end", "metric_for_best_model",
                     "greater_is_better", "resume_from_checkpoint", "ignore_data_skip",
                     "restore_callback_states_from_checkpoint"), "saving and resuming: trials save nothing"),
    "hub_token": "a credential: never stored, and it changes no tensor",
    "seed": "which random numbers, not how many",
    "data_seed": "which examples, not their length: trials copy the longest one (example_length is keyed)",
    "do_train": "not read by Trainer.train()",
    "do_eval": "not read by Trainer.train()",
    "do_predict": "not read by Trainer.train()",
    "local_rank": "set by the launcher; the world size is keyed",
    "dataset_num_proc": "processes that tokenize the data before training, not the training step",
}


def memory_fingerprint(config: Config, model_path: str | None = None) -> dict[str, Any]:
    """Everything in a config that changes the memory a training step needs (the key a plan is valid for)."""
    return {  # local paths resolved: `./model` and `/abs/model` are the same workload
        "model_name_or_path": resolved_path(config.model_name_or_path or model_path),
        "model_args": dict(sorted(config.model_args.items())),
        "lora": dict(sorted((config.lora or {}).items())),
        "dataset_name": resolved_path(config.dataset_name),
        "dataset_config": config.dataset_config,
        "dataset_train_split": config.dataset_train_split,
        "world_size": config.world_size,
        **{key: value for key, value in memory_training_args(config.training_args).items()},
    }


def memory_training_args(training_args: Mapping[str, Any]) -> dict[str, Any]:
    """The training args that can change memory: all but `NOT_MEMORY_KEYS`, under current names, with
    SFTConfig's checkpointing default said (so `gradient_checkpointing: true` and no key at all compare equal)."""
    args = modern_names(training_args)
    args.setdefault("activation_checkpointing", SFT_CHECKPOINTING_DEFAULT)
    return {key: value for key, value in sorted(args.items()) if key not in NOT_MEMORY_KEYS}


def modern_names(training_args: Mapping[str, Any]) -> dict[str, Any]:
    """`gradient_checkpointing[_kwargs]` under the name transformers now reads, `activation_checkpointing[_kwargs]`.

    transformers 5 warns on every TrainingArguments built with the old name (a FutureWarning per trial);
    TRL's SFTConfig sets it by default. Both names with different values: one ConfigError.
    """
    args = dict(training_args)
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in args:
            value = args.pop(old)
            if args.get(new, value) != value:
                raise ConfigError(f"{old} {value!r} and {new} {args[new]!r} disagree ({old} is the old name of "
                                  f"{new}): keep {new}")
            args[new] = value
    return args


def resolved_path(name: Any) -> Any:
    """A local path as an absolute one (the same file from any working directory); a hub name as it is."""
    if isinstance(name, str) and os.path.exists(os.path.expanduser(name)):
        return os.path.abspath(os.path.expanduser(name))
    return name


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically: a temp file in the same directory, fsync, then os.replace.

    A reader (or a run killed mid-write) sees the old file or the new one, never half of one. Every file
    autobatch writes itself goes through here; OSError propagates for the caller to name its flag.
    """
    path = Path(path)
    tmp_name = None
    try:
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False) as tmp:
            tmp_name = tmp.name
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:  # a signal mid-write too: leave no temp file behind
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
        raise
    return path
