"""Several processes, one plan: the launcher's ranks, one device per process, and trials agreed in lockstep.

Under `torchrun` / `accelerate launch` every rank probes its own device, and after each trial the ranks
all-reduce the verdict (one rank's OOM is everyone's), so the search, which is deterministic given its
inputs, takes the same path on every rank and all ranks adopt one plan.

Why trials are local: under DDP the gradient buckets are all-reduced during backward, so a rank that OOMs
mid-backward never joins and the others wait forever (Composer PR #2117). Here a trial holds no
collective: the Trainer is built and run with the launcher's variables hidden (a single-process state),
the memory DDP adds on top of a local step (its gradient buckets, one more copy of the trainable
gradients: torch/csrc/distributed/c10d/reducer.cpp, `gradient_as_bucket_view=False`) is held during the
trial as a block of that size, and the ranks meet only between trials, in `agree`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from autobatch.errors import AutobatchError, ConfigError
from autobatch.launch import LAUNCHER_VARIABLES

if TYPE_CHECKING:
    from autobatch.planner import Plan, Trial



@dataclass(frozen=True)
class Ranks:
    """This process's place among the launcher's processes (1, 0, 0 without a launcher)."""

    world_size: int
    rank: int
    local_rank: int

    @property
    def launched(self) -> bool:
        return self.world_size > 1


#: Rank 0 planning alone (`_launcher_hidden`): the group exists, but the other ranks are not in the trials.
_alone = False
#: The launcher's variables while `local_only` hides them from the Trainer (this process is still rank r).
_hidden: dict[str, str] = {}


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        text = os.environ.get(name, _hidden.get(name))
        if text not in (None, ""):
            try:
                return int(text)
            except ValueError:
                raise ConfigError(f"the {name} environment variable must be an integer, got {text!r}") from None
    return default


def current() -> Ranks:
    """World size, rank and local rank from the launcher's environment (torchrun, accelerate launch, MPI)."""
    return Ranks(
        world_size=_env_int(("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"), 1),
        rank=_env_int(("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"), 0),
        local_rank=_env_int(("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"), 0),
    )


def is_main() -> bool:
    """Only rank 0 prints reports and writes files."""
    return current().rank == 0


def select_cuda_device() -> int:
    """The GPU this process owns, made current before any other CUDA call.

    Under a launcher that is `LOCAL_RANK`; without one, exactly one GPU must be visible, since with
    several the Trainer silently wraps the model in `nn.DataParallel` and multiplies the batch.
    """
    import torch

    ranks = current()
    count = torch.cuda.device_count()  # NVML-based where available: creates no CUDA context
    if ranks.launched:
        if ranks.local_rank >= count:
            raise ConfigError(
                f"LOCAL_RANK {ranks.local_rank} but only {count} GPU(s) are visible: launch at most {count} "
                "processes per node or widen CUDA_VISIBLE_DEVICES"
            )
        torch.cuda.set_device(ranks.local_rank)
        return ranks.local_rank
    if count > 1:
        raise ConfigError(
            f"{count} GPUs are visible to one process (the Trainer would use nn.DataParallel): pick one with "
            f"CUDA_VISIBLE_DEVICES=0, or launch one process per GPU (torchrun --nproc_per_node {count} "
            "or accelerate launch)"
        )
    return 0


#: How long a cpu rank waits in a collective for a peer (ddp_timeout overrides it). With use_cpu transformers
#: does not hand ddp_timeout to the process group, so gloo's 30-minute default applied: a rank left alive
#: after its peer failed blocked the other that long (150 s measured, no error).
CPU_GROUP_TIMEOUT_S = 300
CUDA_GROUP_TIMEOUT_S = 1800  # TrainingArguments' ddp_timeout default


def group_timeout_s(config, device: str) -> int:
    """The process group's timeout: the config's ddp_timeout, else CPU_GROUP_TIMEOUT_S off cuda."""
    timeout = config.training_args.get("ddp_timeout")
    if timeout is not None:
        return int(timeout)
    return CUDA_GROUP_TIMEOUT_S if device == "cuda" else CPU_GROUP_TIMEOUT_S


def init_group(device: str, timeout_s: int | None = None) -> None:
    """The default process group for the ranks' agreement (and later DDP), if launched and not yet made.

    On cuda the group carries cpu tensors over gloo and cuda tensors over NCCL, so agreeing never
    touches the GPU's memory. Made here first, with `timeout_s`, the Trainer joins it instead of making
    one with gloo's default: a peer that stops taking part ends the waiting rank with an error after
    `timeout_s`.
    """
    ranks = current()
    if not ranks.launched:
        return
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s or (CUDA_GROUP_TIMEOUT_S if device == "cuda" else CPU_GROUP_TIMEOUT_S))
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device == "cuda" else "gloo", timeout=timeout)
        atexit.register(_destroy_group)


def _destroy_group() -> None:
    """Tear the group down before the interpreter does: gloo's threads left to static destructors abort the
    process ("terminate called without an active exception", seen here in 1 of 6 two-rank runs), which the
    launcher reports as a failed rank after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _group_ready() -> bool:
    """A process group of several ranks exists (the launcher's variables may be hidden by `local_only`)."""
    import torch.distributed as dist

    return not _alone and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree(trial: Trial) -> Trial:
    """The trial as every rank sees it: fits only if it fit everywhere; peaks and seconds the worst rank's.

    All ranks get the same numbers, so the search (deterministic given them) takes one path everywhere.
    """
    if not _group_ready():
        return trial
    import torch
    import torch.distributed as dist

    values = torch.tensor(
        [float(not trial.fits), float(trial.oom), float(trial.peak_memory_bytes),
         float(trial.peak_allocated_bytes or 0), trial.seconds_per_micro_batch],
        dtype=torch.float64,
    )
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    unfit, oom, peak, allocated, seconds = values.tolist()
    return replace(
        trial, fits=not unfit, oom=bool(oom), peak_memory_bytes=int(peak),
        peak_allocated_bytes=int(allocated) if trial.peak_allocated_bytes is not None else None,
        seconds_per_micro_batch=seconds,
    )


def smallest(value: int) -> int:
    """The smallest `value` over the ranks (the usable budget the shared search aims at)."""
    if not _group_ready():
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


#: How long ranks 1..N-1 wait for rank 0's FSDP plan: a search of trial groups can take hours on a large model.
#: A rank 0 that dies is no reason to wait: the launcher (torchrun, accelerate launch) ends the others at once.
PLAN_WAIT_S = 6 * 3600


def planned_on_rank_0(make_plan: Callable[[], Plan], device: str, timeout_s: int | None = None) -> Plan:
    """Under a launcher, rank 0 plans alone, as from a shell, and every rank gets its plan.

    FSDP's trials are groups of fresh processes on all the ranks' devices (`trial.GroupProber`): the launcher's
    own ranks cannot share one group's trials (a rank's OOM would stall the others), so rank 0 launches them
    with the launcher's variables out of sight, while the other ranks wait in a broadcast on a gloo group of
    their own (`PLAN_WAIT_S`). A refusal on rank 0 is every rank's, with its exit code.
    """
    from datetime import timedelta

    import torch.distributed as dist

    init_group(device, timeout_s)  # the run's group, which the Trainer joins after the plan
    waiting = dist.new_group(backend="gloo", timeout=timedelta(seconds=PLAN_WAIT_S))
    box: list = [None]
    error = None
    if current().rank == 0:
        try:
            with _launcher_hidden():
                box[0] = ("plan", make_plan())
        except AutobatchError as exc:
            error, box[0] = exc, ("error", exc.exit_code, str(exc), exc.keys)
    dist.broadcast_object_list(box, src=0, group=waiting)
    dist.destroy_process_group(waiting)
    if error is not None:
        raise error
    kind, *answer = box[0]
    if kind == "error":
        code, message, keys = answer
        refusal = (ConfigError if code == ConfigError.exit_code else AutobatchError)(message, keys=keys)
        refusal.said_by_rank_0 = True  # one line for the user: rank 0's
        raise refusal
    return answer[0]


@contextlib.contextmanager
def _launcher_hidden() -> Iterator[None]:
    """This process as if started from a shell: the launcher's variables out of the environment (and of
    `current()`), back on exit."""
    global _alone
    saved = {name: os.environ.pop(name) for name in LAUNCHER_VARIABLES if name in os.environ}
    _alone = True
    try:
        yield
    finally:
        _alone = False
        os.environ.update(saved)


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """A single-process world for trials: the launcher's variables hidden and accelerate's state fresh.

    The Trainer built inside neither wraps DDP nor shards the data, so a trial holds no collective a rank
    could miss; accelerate's shared state is reset on the way in and out, so the run after it sees the
    launcher again and joins the existing process group.
    """
    if not current().launched:
        yield
        return
    saved = {name: os.environ.pop(name) for name in LAUNCHER_VARIABLES if name in os.environ}
    _hidden.update(saved)
    _reset_accelerate()
    try:
        yield
    finally:
        os.environ.update(saved)
        _hidden.clear()
        _reset_accelerate()


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def per_rank_budget(text: str, name: str = "--memory-budget") -> str:
    """This rank's entry of a comma-separated per-rank budget (`160MiB,100MiB`); a single value is everyone's."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) == 1:
        return parts[0]
    ranks = current()
    if len(parts) != ranks.world_size:
        raise ConfigError(
            f"{name} has {len(parts)} values but the world size is {ranks.world_size}: give one value, "
            "or one per rank"
        )
    return parts[ranks.rank]
