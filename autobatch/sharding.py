"""FSDP: the run's sharding in a trial, on cpu ranks and traced for N ranks under fake tensors.

Two things make an FSDP trial measure what the run holds:
- `fsdp_on_cpu`: accelerate turns an FSDP plugin into `DistributedType.FSDP` only for GPU-like distributed
  types; on `MULTI_CPU` (gloo ranks, `use_cpu`) it drops the plugin without a word and the Trainer trains
  DDP. The patch promotes `MULTI_CPU` to `FSDP` when a plugin is given, so cpu ranks shard as GPUs would.
- `fake_group`: one rank of an N-rank job in this process, on torch's fake process-group backend (its
  collectives do nothing), so under fake tensors a 7B model on 8 ranks is traced on a laptop: each
  parameter, gradient and optimizer state is a 1/N DTensor shard, and FSDP2's all-gathered parameters
  and reduce-scatter inputs are allocated and freed as in the run.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

from autobatch.errors import ConfigError

#: Keys of SFTConfig / TrainingArguments that ask for sharding.
FSDP_KEYS = ("fsdp", "fsdp_config")


def fsdp_requested(training_args: dict[str, Any]) -> bool:
    """The config shards with FSDP (the Trainer's `fsdp` key, or accelerate's environment)."""
    return bool(training_args.get("fsdp")) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def check_shardable(training_args: dict[str, Any]) -> None:
    """DeepSpeed is refused; FSDP is planned under its own sharding (FSDP2: `fsdp_version: 2`)."""
    named = ["deepspeed"] if training_args.get("deepspeed") else []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("true", "1"):
        named.append("$ACCELERATE_USE_DEEPSPEED")
    if named:
        raise ConfigError(
            f"{', '.join(named)}: DeepSpeed ZeRO is not supported (it is not among autobatch's dependencies and "
            "its sharding is not probed): use FSDP instead (fsdp: full_shard auto_wrap, fsdp_config: "
            "{fsdp_version: 2})"
        )
    if training_args.get("fsdp_config") and not training_args.get("fsdp"):
        raise ConfigError("fsdp_config without fsdp: add fsdp: full_shard auto_wrap (or remove fsdp_config)")
    if fsdp_requested(training_args):
        fsdp_config = training_args.get("fsdp_config") or {}
        version = fsdp_config.get("fsdp_version", fsdp_config.get("version", 1)) if isinstance(fsdp_config, dict) else 1
        if str(version) != "2":
            raise ConfigError(
                "fsdp is planned with FSDP2 only (the sharding autobatch traces and measures): add "
                "fsdp_config: {fsdp_version: 2}"
            )


#: What TrainingArguments writes into os.environ when it is given `fsdp` (transformers training_args.py sets
#: ACCELERATE_USE_FSDP and FSDP_* for accelerate to read): left behind, the next plan in the same process would
#: take any config for an FSDP one (`fsdp_requested` reads the launcher's ACCELERATE_USE_FSDP).
ENVIRONMENT_PREFIXES = ("ACCELERATE_", "FSDP_")


def held_parts(tensor) -> list:
    """The inner tensors of a wrapper subclass, which a memory count adds up in its place (its callers recurse).

    A DTensor (FSDP2's sharded parameters and gradients) is a wrapper whose own storage has the global size
    and holds nothing: what a rank holds is its local tensor(s).
    """
    import torch

    inner, _ = tensor.__tensor_flatten__()
    return [part for part in (getattr(tensor, name) for name in inner) if isinstance(part, torch.Tensor)]


@contextlib.contextmanager
def resizes_seen(on_resize: Callable[[Any], None]) -> Iterator[None]:
    """Inside, `on_resize(storage)` follows every `UntypedStorage.resize_`.

    FSDP2 frees and re-allocates its all-gathered parameters with `resize_`, which no dispatch mode sees
    (torch/distributed/fsdp/_fully_shard/_fsdp_param.py `free_storage`); torch's own MemTracker patches it
    the same way (torch/distributed/_tools/mem_tracker.py `_track_resize`).
    """
    import torch

    resize = torch.UntypedStorage.resize_

    def resize_(storage, size):
        out = resize(storage, size)
        on_resize(storage)
        return out

    torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = resize  # type: ignore[method-assign]


class ResizesSeen:
    """A dispatch-mode mixin: while the mode is entered, its `_resized(storage)` follows every storage resize
    (`resizes_seen`), which the mode's own `__torch_dispatch__` never sees."""

    def __enter__(self):
        self._resizes = resizes_seen(self._resized)
        self._resizes.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._resizes.__exit__(None, None, None)
        return super().__exit__(*exc)


@contextlib.contextmanager
def environment_kept() -> Iterator[None]:
    """Inside, trainers may write accelerate's variables; on exit os.environ holds exactly what it held before."""
    before = {k: v for k, v in os.environ.items() if k.startswith(ENVIRONMENT_PREFIXES)}
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith(ENVIRONMENT_PREFIXES) and k not in before]:
            del os.environ[key]
        os.environ.update(before)


@contextlib.contextmanager
def fsdp_on_cpu() -> Iterator[None]:
    """While inside, accelerate keeps an FSDP plugin on cpu ranks (`MULTI_CPU` becomes `FSDP`).

    Private API, scoped and undone on exit: accelerate/state.py `AcceleratorState.__init__` only sets
    `DistributedType.FSDP` for MULTI_GPU-like types, so on cpu the Trainer would silently train DDP and a
    trial would measure unsharded memory. Measured here: with the patch, SFTTrainer on 2 gloo ranks holds
    DTensor parameters, half on each rank, and its losses equal DDP's.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__  # type: ignore[method-assign]
    try:
        yield
    finally:
        AcceleratorState.__init__ = original  # type: ignore[method-assign]


@contextlib.contextmanager
def fake_group(world_size: int, rank: int = 0) -> Iterator[None]:
    """This process as rank `rank` of `world_size` on torch's fake backend: collectives are no-ops.

    The launcher's variables are set so accelerate and the Trainer see a distributed run of that size
    (and join this group rather than make one); all are restored and the group destroyed on exit.
    """
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise ConfigError("device estimate with FSDP traces one rank alone: run it without a launcher", keys=("device",))
    names = {"WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": str(rank),
             "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    # `fully_shard` without a mesh builds one from `torch.arange` (device_mesh.py) and looks it up with
    # `nonzero`, which a fake tensor cannot answer: the default mesh is built outside fake mode.
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.fsdp._fully_shard import _fully_shard

    default_mesh = _fully_shard._init_default_mesh

    def _init_default_mesh(*args, **kwargs):
        with unset_fake_temporarily():
            return default_mesh(*args, **kwargs)

    _fully_shard._init_default_mesh = _init_default_mesh
    # accelerate puts cpu rank r on `cpu:r` (state.py `set_device`), FSDP2 on `cpu`: the same memory, but
    # fake tensors refuse to mix the two, so the traced rank is put on `cpu`.
    import torch
    from accelerate.state import PartialState

    set_device = PartialState.set_device

    def on_cpu(self) -> None:
        set_device(self)
        if self.device is not None and self.device.type == "cpu":
            self.device = torch.device("cpu")

    PartialState.set_device = on_cpu  # type: ignore[method-assign]
    # accelerate matches the optimizer's parameters to their shards by data pointer (accelerator.py
    # `_prepare_fsdp2`, utils/modeling.py `_get_parameter_id`); every fake tensor's is 0, so all would map
    # to one shard and AdamW would hold state for one parameter. A fake tensor gets a key of its own.
    import accelerate.accelerator as accelerator_module
    from torch._subclasses.fake_tensor import is_fake

    parameter_id = accelerator_module._get_parameter_id
    keys = itertools.count(1)

    def _get_parameter_id(param):
        if not is_fake(param):
            return parameter_id(param)
        if not hasattr(param, "_autobatch_key"):
            param._autobatch_key = ("fake", next(keys))
        return param._autobatch_key

    accelerator_module._get_parameter_id = _get_parameter_id
    try:
        yield
    finally:
        _fully_shard._init_default_mesh = default_mesh
        PartialState.set_device = set_device  # type: ignore[method-assign]
        accelerator_module._get_parameter_id = parameter_id
        dist.destroy_process_group()
        _forget_meshes()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _forget_meshes() -> None:
    """Drop DTensor's caches keyed by the traced group's device meshes, which keep the meshes' tensors alive after
    the group is gone: a later in-process trial would count them in its baseline (80 B after a 7B trace on 8
    ranks, seen as an in-process peak 80 B above a fresh process's). Private caches, cleared where present."""
    with contextlib.suppress(ImportError, AttributeError):
        from torch.distributed.tensor import _collective_utils, _redistribute, debug

        debug._clear_sharding_prop_cache()
        _collective_utils.MeshTopoInfo.build_from_mesh.cache_clear()
        _redistribute._gen_transform_infos.cache_clear()


@contextlib.contextmanager
def sharded_trials(device: str, world_size: int) -> Iterator[None]:
    """Where FSDP trials run: `estimate` traces rank 0 of `world_size` on a fake group; cpu ranks keep the
    FSDP plugin (`fsdp_on_cpu`); cuda needs nothing (accelerate shards there itself)."""
    with contextlib.ExitStack() as stack:
        if device == "estimate":
            if world_size < 2:
                raise ConfigError("device estimate with fsdp traces one rank of several: pass world_size N "
                                  "(or nproc_per_node N), N >= 2", keys=("device", "fsdp", "world_size", "nproc_per_node"))
            stack.enter_context(fake_group(world_size))
        if device in ("estimate", "cpu"):
            stack.enter_context(fsdp_on_cpu())
        yield


def launches_groups(device: str) -> bool:
    """FSDP trials are groups of world-size ranks launched from here (`--nproc-per-node N`; one rank without
    it), unless under a launcher or traced (estimate)."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    return device != "estimate" and not launched


#: A trial group's gloo timeout: a rank blocked in a collective gives up after this (transformers passes
#: no `ddp_timeout` with `use_cpu`, leaving gloo's 30 minutes); the coordinator ends the group sooner.
GROUP_TIMEOUT_S = 60
#: How long one trial group may take before the coordinator ends every rank.
TRIAL_GROUP_TIMEOUT_S = 900


def init_short_group(timeout_s: float = GROUP_TIMEOUT_S) -> None:
    """The launcher's gloo group, made before the Trainer makes one with gloo's 30-minute default."""
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))


@contextlib.contextmanager
def sharded_run(training_args: dict[str, Any], device: str) -> Iterator[None]:
    """Around building the run's trainer: on cpu ranks the FSDP plugin is kept and the launcher's group made
    with a short timeout first (a rank that stops leaves the others blocked for at most that long)."""
    if not (fsdp_requested(training_args) and device == "cpu"):
        yield
        return
    init_short_group()
    with fsdp_on_cpu():
        yield


def shard_before_training(trainer) -> None:
    """Shard the model before the run's memory is measured: on a GPU the unsharded host copy the Trainer
    loads is never device memory (accelerate moves only the shards), so it is not the run's peak either."""
    import gc

    trainer.model = trainer.model_wrapped = trainer.accelerator.prepare(trainer.model)
    trainer.accelerator._models.clear()
    gc.collect()
