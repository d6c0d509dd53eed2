"""The workload, built one way for probe and run: SFTConfig, dataset, LoRA and the SFTTrainer itself.

The probe measures the trainer this module builds, and the run trains one built by the same calls, so
model loading (dtype, attention implementation), PEFT, gradient checkpointing and the optimizer are
the run's by construction rather than by imitation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import functools
import logging
import os
from pathlib import Path
from typing import Any

from autobatch import builtin
from autobatch.config import (
    AUTOBATCH_KEYS,
    LOCAL_DATA_FORMATS,
    TRAINER_KEYS,
    Config,
    memory_fingerprint,
    modern_names,
)
from autobatch.errors import AutobatchError, ConfigError

logger = logging.getLogger(__name__)

_PROBE_TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. "


def fingerprint(config: Config) -> dict[str, Any]:
    """The memory fingerprint a plan is keyed by, naming the built-in model by its resolved path."""
    return memory_fingerprint(config, model_path(config) if config.model_name_or_path is None else None)


def model_path(config: Config) -> str:
    """The model to load: the config's, or the built-in tiny model saved on first use."""
    if config.model_name_or_path is None:
        return str(builtin.builtin_model_dir())
    name = os.path.expanduser(config.model_name_or_path)
    looks_local = name.startswith((".", "/", "~")) or os.path.exists(name)
    if looks_local and not os.path.exists(name):
        raise ConfigError(f"model_name_or_path {config.model_name_or_path} does not exist; pass a model directory or "
                          "a hub name", keys=("model_name_or_path",))
    if os.path.isdir(name) and not os.path.exists(os.path.join(name, "config.json")):
        raise ConfigError(
            f"model_name_or_path {config.model_name_or_path} is not a model directory (no config.json); "
            "pass a directory written by save_pretrained or a hub name", keys=("model_name_or_path",)
        )
    if not looks_local:
        check_hub_reachable(name, "model_name_or_path")
    return name


def check_hub_reachable(name: str, flag: str, timeout_s: float = 3.0) -> None:
    """A hub name with no hub in reach fails here in seconds, not after a minute of retry lines.

    huggingface_hub retries each request with back-off and logs every retry; offline that is 11-22 lines
    over up to 51 s (measured) before its error. Skipped when HF_HUB_OFFLINE is set (the local cache is
    used) or a proxy is configured (a direct connection says nothing then).
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise AutobatchError(
            f"{flag} {name}: not a local path, and the hub ({host}) is unreachable ({exc.strerror or exc}): "
            "set HF_HUB_OFFLINE=1 to use a copy already in the local cache, or pass a local copy", keys=(flag,)
        ) from None


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, sorted(set(valid) | AUTOBATCH_KEYS), n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def sft_config(config: Config, device: str, output_dir: str, **overrides: Any):
    """The SFTConfig the run will use: the config's keys, TRL's defaults, and the cpu fallback.

    Returns (SFTConfig, notes). On the cpu and estimate backends bf16/fp16 are turned off and the trainer
    is told `use_cpu`, since TRL's default bf16 is refused on CPU; the note says so.
    """
    from trl import SFTConfig

    valid = sorted(f.name for f in dataclasses.fields(SFTConfig) if f.init)
    kwargs = modern_names({k: v for k, v in config.training_args.items() if k not in TRAINER_KEYS})
    notes = []
    if "evaluation_strategy" in kwargs:
        kwargs.setdefault("eval_strategy", kwargs.pop("evaluation_strategy"))
        kwargs.pop("evaluation_strategy", None)
        notes.append("evaluation_strategy is the old name of eval_strategy: read as eval_strategy")
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        problems = "; ".join(f"unknown key {k!r}{_closest(k, valid)}" for k in unknown)
        raise ConfigError(f"{problems}: keys must be SFTConfig/TrainingArguments fields or autobatch options")
    kwargs.update(overrides)
    # SFTConfig's default turns checkpointing on under the old name, which warns once per SFTConfig built.
    default = next(f.default for f in dataclasses.fields(SFTConfig) if f.name == "gradient_checkpointing")
    kwargs.setdefault("activation_checkpointing", default)
    if config.model_args:  # TRL ModelConfig keys (dtype, attn_implementation) reach the model loader here
        kwargs["model_init_kwargs"] = {**_model_init_kwargs(config.model_args), **(kwargs.get("model_init_kwargs") or {})}
    kwargs["output_dir"] = output_dir
    kwargs.setdefault("report_to", "none")
    if device == "estimate":  # the cuda step, emulated: precision as configured (autobatch.estimate)
        kwargs["use_cpu"] = True
        if kwargs.get("fp16"):  # accelerate has no fp16 autocast on cpu; bf16's activations take the same bytes
            kwargs.update(fp16=False, bf16=True)
            notes.append("fp16 measured with bf16 autocast on the estimate backend (the same 2-byte activations)")
    elif device != "cuda":
        wanted = kwargs.get("bf16", True) or kwargs.get("fp16", False)
        if wanted:
            dtype = config.model_args.get("dtype") or "float32"
            notes.append(f"bf16/fp16 off on the {device} backend (no mixed precision there): peaks are for "
                         f"{dtype} weights and activations" + (" (dtype auto: the checkpoint's)" if dtype == "auto" else ""))
        kwargs.update(bf16=False, fp16=False, use_cpu=True)
    else:
        kwargs["use_cpu"] = False  # use_cpu follows --device: a cuda trial never measures the CPU
    try:
        return SFTConfig(**kwargs), notes
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid training arguments: {str(exc).splitlines()[0]}") from exc


def _model_init_kwargs(model_args: dict) -> dict:
    """TRL ModelConfig keys as `from_pretrained` keywords; quantized loading is not probed yet."""
    quantized = [k for k in model_args if k.startswith(("load_in_", "bnb_", "use_bnb"))]
    if quantized:
        raise ConfigError(f"{', '.join(quantized)}: quantized loading is not supported by autobatch yet; remove it")
    renamed = {"model_revision": "revision"}
    return {renamed.get(k, k): v for k, v in model_args.items()}


def formatting_func(config: Config):
    """The `formatting_func: module:function` of the config, imported; None if not set."""
    spec = config.training_args.get("formatting_func")
    if spec is None:
        return None
    module_name, _, name = str(spec).partition(":")
    if not module_name or not name:
        raise ConfigError(f"formatting_func {spec!r}: write it as module:function (e.g. my_formats:to_text)")
    import importlib
    import sys

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a module beside the config, as `python -m` would find it
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"formatting_func {spec!r}: cannot import it ({exc})") from None
    if not callable(function):
        raise ConfigError(f"formatting_func {spec!r} is not a function")
    return function


def lora_config(config: Config):
    """peft.LoraConfig from the config's lora section, or None."""
    if not config.lora:
        return None
    from peft import LoraConfig

    kwargs = {"task_type": "CAUSAL_LM", **config.lora}
    valid = sorted(f.name for f in dataclasses.fields(LoraConfig) if f.init)
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise ConfigError("; ".join(f"lora: unknown key {k!r}{_closest(k, valid)}" for k in unknown))
    return LoraConfig(**kwargs)


def load_train_dataset(config: Config, split: str | None = None):
    """The training dataset (or `split` of it) from a hub name or a local json/jsonl/csv/parquet/txt file."""
    import datasets

    name = config.dataset_name
    if name is None:
        if config.model_name_or_path is not None and not builtin.is_builtin_model_path(config.model_name_or_path):
            return None  # the probe then measures a synthetic example of max_length tokens

        name = str(builtin.builtin_dataset_path())  # the built-in model trains on the shipped text sample
    path = Path(os.path.expanduser(name))
    try:
        if path.suffix in LOCAL_DATA_FORMATS or path.exists():
            if not path.exists():
                raise ConfigError(f"dataset_name {name} does not exist; pass a local json/jsonl/csv/parquet/txt "
                                  "file", keys=("dataset_name",))
            if path.is_dir():  # a folder of data files; its file names give the splits (train.jsonl, test.jsonl)
                return datasets.load_dataset(str(path), split=split or config.dataset_train_split)
            builder = LOCAL_DATA_FORMATS.get(path.suffix)
            if builder is None:
                raise ConfigError(
                    f"dataset_name {name}: cannot read it: use a .json, .jsonl, .csv, .parquet or .txt file, or a "
                    "folder", keys=("dataset_name",)
                )
            return _not_empty(datasets.load_dataset(builder, data_files=str(path), split="train"), name, "train")
        check_hub_reachable(name, "dataset_name")
        split = split or config.dataset_train_split
        return _not_empty(datasets.load_dataset(name, config.dataset_config, split=split), name, split)
    except ConfigError:
        raise
    except StopIteration:  # datasets' json builder on a file with no line: next() on no table
        raise ConfigError(f"dataset_name {name}: it has no examples: pass data with at least one",
                          keys=("dataset_name",)) from None
    except datasets.exceptions.DatasetGenerationError as exc:  # the file's content: not JSON, not UTF-8, bad CSV
        cause = exc.__cause__ or exc
        detail = " ".join(str(cause).split())[:200] or type(cause).__name__
        raise ConfigError(f"dataset_name {path if path.exists() else name}: cannot parse it ({type(cause).__name__}: "
                          f"{detail}): fix the file (UTF-8; for .json/.jsonl one JSON object per line) or pass "
                          "another", keys=("dataset_name",)) from exc
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOSPC) and exc.filename:
            raise AutobatchError(
                f"dataset_name {name}: cannot write the datasets cache at {exc.filename} ({exc.strerror}): set "
                "HF_DATASETS_CACHE (or XDG_CACHE_HOME) to a writable directory with free space", keys=("dataset_name",)
            ) from exc
        raise _not_downloadable(name, exc) from exc
    except ValueError as exc:
        raise ConfigError(f"dataset_name {name}: {str(exc).splitlines()[0]}", keys=("dataset_name",)) from exc


def _not_empty(dataset, name: str, split: str):
    """An empty dataset is refused here, not met as a StopIteration deep in the probe."""
    if len(dataset) == 0:
        raise ConfigError(f"dataset_name {name}: split {split!r} has no examples: pass data with at least one",
                          keys=("dataset_name",))
    return dataset


def _not_downloadable(name: str, exc: BaseException) -> AutobatchError:
    return AutobatchError(
        f"dataset_name: could not load {name!r} ({type(exc).__name__}); it is not a local file and could not be "
        "downloaded: download it where the hub is reachable, or pass a local json/jsonl/csv/parquet file",
        keys=("dataset_name",),
    )


def check_text_field(dataset, args, formatted: bool = False) -> None:
    """A dataset that is neither tokenized nor conversational must have the text field TRL reads."""
    columns = dataset.column_names or []
    if formatted:
        return
    if "input_ids" in columns or "messages" in columns or "prompt" in columns:
        return
    if args.dataset_text_field not in columns:
        raise ConfigError(
            f"dataset_text_field {args.dataset_text_field!r} is not a field of the dataset; "
            f"its fields are {', '.join(columns)}: set dataset_text_field to one of them", keys=("dataset_text_field",)
        )


def synthetic_dataset(tokenizer, max_length: int):
    """A one-example tokenized dataset of exactly max_length tokens: the worst case without data."""
    from datasets import Dataset

    ids: list[int] = []
    while len(ids) < max_length:
        ids.extend(tokenizer(_PROBE_TEXT * 64, add_special_tokens=False)["input_ids"])
    return Dataset.from_dict({"input_ids": [ids[:max_length]]})


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise AutobatchError(_load_failure(path, exc), keys=("model_name_or_path",)) from exc


def _load_failure(path: str, exc: BaseException) -> str:
    if os.path.isdir(path):
        return f"model_name_or_path: could not load {path}: {str(exc).splitlines()[0]}"
    return (
        f"model_name_or_path: could not load {path!r}: not a local directory, and it could not be downloaded from "
        "the hub (offline?): download it where the hub is reachable, or set model_name_or_path to a local copy"
    )


def build_trainer(
    config: Config, args, *, train_dataset=None, eval_dataset=None, fake: bool = False, trainer_cls=None, callbacks=None
):
    """The SFTTrainer for this workload; `fake` builds the model from its config (estimate backend)."""
    from trl import SFTTrainer

    trainer_cls = trainer_cls or SFTTrainer
    path = model_path(config)
    check_max_length(path, args.max_length, config.model_name_or_path or "the built-in model")
    tokenizer = load_tokenizer(path)
    if train_dataset is None:
        train_dataset = synthetic_dataset(tokenizer, args.max_length or 1024)
    else:
        check_text_field(train_dataset, args, formatted="formatting_func" in config.training_args)
    model: Any = _fake_model(path, args) if fake else path
    try:
        with _fake_safe_to() if fake else contextlib.nullcontext():
            trainer = trainer_cls(
                model=model,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=tokenizer,
                peft_config=lora_config(config),
                formatting_func=formatting_func(config),
                callbacks=callbacks,
            )
    except OSError as exc:
        raise AutobatchError(_load_failure(path, exc), keys=("model_name_or_path",)) from exc
    if fake:  # the Trainer moves the (peft-wrapped) model again in train()
        trainer.model.to = functools.partial(_to_without_swap, trainer.model)
    return trainer


def _to_without_swap(module, *args, **kwargs):
    """`Module.to` for fake modules: parameters re-bound instead of swapped, the device left as it is.

    `Module._apply` swaps a FakeTensor parameter in place, which FakeTensorMode's weak references forbid
    ("Couldn't swap Linear.weight"); peft moves every new adapter layer with `.to()`. Under the estimate
    backend every tensor is a fake cpu tensor, so only a dtype change has an effect.
    """
    import torch

    _device, dtype, _non_blocking, _format = torch._C._nn._parse_to(*args, **kwargs)
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                    continue
                with torch.no_grad():
                    converted = tensor.to(dtype)
                is_param = isinstance(tensor, torch.nn.Parameter)
                table[name] = torch.nn.Parameter(converted, tensor.requires_grad) if is_param else converted
    return module


@contextlib.contextmanager
def _fake_safe_to():
    """`torch.nn.Module.to` is `_to_without_swap` while a trainer is built around a fake model."""
    import torch

    original = torch.nn.Module.to
    torch.nn.Module.to = _to_without_swap
    try:
        yield
    finally:
        torch.nn.Module.to = original


def check_max_length(path: str, max_length: int | None, name: str) -> None:
    """max_length past the model's position table: one line with both numbers, not an IndexError mid-trial."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return  # the model load that follows reports it
    positions = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if isinstance(positions, int) and max_length is not None and max_length > positions:
        raise ConfigError(f"max_length {max_length} is beyond the {positions} positions of {name}: "
                          f"use max_length {positions} or less", keys=("max_length",))


def _fake_model(path: str, args):
    """The model built from its config alone, for use inside FakeTensorMode: no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise AutobatchError(_load_failure(path, exc), keys=("model_name_or_path",)) from exc
    dtype = (args.model_init_kwargs or {}).get("dtype", "float32")
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    elif dtype == "auto":
        dtype = getattr(model_config, "dtype", None) or torch.float32
    model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    # Fake parameters cannot be swapped by `Module.to`; they already sit on the (fake) cpu device.
    model.to = lambda *a, **k: model
    return model
