"""Memory backends: the only module that knows which device a trial runs on.

Three backends share one interface (`budget_bytes`, `measure()`, `tensor_mode()`, `cleanup()`):

- `cuda`: the caching allocator's own peak counters; OOM is torch's `OutOfMemoryError`. While a trial or
  the run measures, the allocator itself is capped at the budget (`set_per_process_memory_fraction`), so
  going past it is a real allocator OOM, not a figure compared afterwards.
- `cpu`: a virtual device with a budget. A `TorchDispatchMode` counts the bytes of every live tensor
  storage (each once, released when freed), the quantity `torch.cuda.max_memory_allocated` reports, and
  raises a CUDA-style `torch.OutOfMemoryError` when an op pushes that count past the budget.
- `estimate`: the cuda step emulated under `FakeTensorMode` (autobatch.estimate): no compute, no memory, so a
  model far bigger than this machine is measured from its config alone; the peak is the reserved bytes of an
  emulated caching allocator (autobatch.allocator). A size past the budget is measured in full (it does not
  fit, but its whole peak is known).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from autobatch import estimate, ranks, sharding
from autobatch.errors import ConfigError
from autobatch.units import format_bytes

logger = logging.getLogger(__name__)


# Every message torch, CUDA, cuDNN and cuBLAS use for an allocation failure, beside what accelerate's
# utils/memory.py `should_reduce_batch_size` recognises.
_OOM_MESSAGES = re.compile(
    r"CUDA out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED|"
    r"DefaultCPUAllocator: can't allocate memory|out of memory",
    re.IGNORECASE,
)
# Not "this micro-batch does not fit the GPU": host RAM, and NCCL's own buffers (a communicator failure,
# which a smaller micro-batch would only hide).
_NOT_DEVICE_OOM = re.compile(r"DefaultCPUAllocator|NCCL", re.IGNORECASE)


def is_oom(exc: BaseException, device: str | None = None) -> bool:
    """True for a device out-of-memory error, by type or message; False for anything else.

    On cuda, host-RAM allocator failures and NCCL "out of memory" errors are not device OOMs.
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not (isinstance(exc, RuntimeError) and len(exc.args) == 1 and isinstance(exc.args[0], str)):
        return False
    from accelerate.utils.memory import should_reduce_batch_size

    message = str(exc.args[0])
    if not (should_reduce_batch_size(exc) or _OOM_MESSAGES.search(message)):
        return False
    return device != "cuda" or not _NOT_DEVICE_OOM.search(message)


@dataclass
class Measurement:
    """Filled in when a `measure()` block exits: the highest memory seen inside it."""

    peak_bytes: int = 0  # includes an allocation refused for the budget (where a failed trial stopped)
    held_peak_bytes: int = 0  # the most ever held: never above the budget on the cpu backend
    allocated_peak_bytes: int = 0  # tensors alone (cuda: max_memory_allocated; cpu: the same as held)


class LiveBytesMode(sharding.ResizesSeen, TorchDispatchMode):
    """Counts live tensor-storage bytes op by op; raises a CUDA-style OOM past `budget_bytes`.

    A storage is counted once (views share it) and released by a weakref finalizer when torch frees
    it. Storages alive when the mode starts (weights, gradients, optimizer state) are counted from
    the start, so the peak is the quantity `torch.cuda.max_memory_allocated` reports; with `fake`, only
    fake tensors are (real ones in this process are not on the device being traced).
    """

    def __init__(self, budget_bytes: int | None, fake: bool = False) -> None:
        super().__init__()
        self.budget_bytes = budget_bytes
        self.fake = fake
        self.live: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._active = True
        with warnings.catch_warnings():  # isinstance() on some module proxies warns of deprecation
            warnings.simplefilter("ignore")
            from torch._subclasses.fake_tensor import FakeTensor

            kind = FakeTensor if fake else torch.Tensor
            for obj in gc.get_objects():
                if isinstance(obj, kind):
                    self._track(obj)
        self.peak_bytes = self.held_peak_bytes = self.live_bytes

    def _track(self, tensor: torch.Tensor) -> int:
        if tensor.is_sparse or tensor.device.type == "cuda":
            return 0
        if is_traceable_wrapper_subclass(tensor):
            return sum(self._track(part) for part in sharding.held_parts(tensor))
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # e.g. tensor subclasses without storage
            return 0
        key = storage._cdata
        if key in self.live:
            return 0
        size = storage.nbytes()
        self.live[key] = size
        self.live_bytes += size
        weakref.finalize(storage, self._release, key)
        return size

    def _release(self, key: int) -> None:
        size = self.live.pop(key, 0)
        self.live_bytes -= size

    def stop(self) -> None:
        self._active = False

    def _resized(self, storage: torch.UntypedStorage) -> None:
        if not self._active:
            return
        key, size = storage._cdata, storage.nbytes()
        if key not in self.live:
            weakref.finalize(storage, self._release, key)
            self.live[key] = 0
        self.live_bytes += size - self.live[key]
        self.live[key] = size
        self._account(size)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fake and func is torch.ops.aten._local_scalar_dense.default:
            # `.item()` has no value under FakeTensorMode; a constant lets TRL's metric logging through.
            return 1
        out = func(*args, **(kwargs or {}))
        if not self._active:
            return out
        added = 0
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                added += self._track(item)
        try:
            self._account(added)
        except torch.OutOfMemoryError:
            del out
            raise
        return out

    def _account(self, added: int) -> None:
        """Peak after `added` bytes were allocated; a CUDA-style OOM past the budget."""
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if self.budget_bytes is not None and self.live_bytes > self.budget_bytes:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {format_bytes(added)}. Virtual device of "
                f"{format_bytes(self.budget_bytes)} would hold {format_bytes(self.live_bytes)} "
                f"(autobatch cpu backend, memory_budget)."
            )
        self.held_peak_bytes = max(self.held_peak_bytes, self.live_bytes)


class MemoryBackend:
    """Interface shared by the three backends."""

    device: str = ""
    #: what the budget came from, for the plan's notes ("memory_budget", "available RAM", "free GPU memory")
    budget_source: str = ""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes

    @property
    def torch_device(self) -> str:
        return "cuda" if self.device == "cuda" else "cpu"

    def tensor_mode(self) -> contextlib.AbstractContextManager:
        """Context in which the workload is built and run (fake tensors for `estimate`)."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:  # pragma: no cover - overridden
        raise NotImplementedError
        yield

    def keep_headroom(self, headroom: float) -> int:
        """The usable budget, budget × (1 − headroom): its one home, for the probe and the run alike. On cuda
        the allocator is capped there too, so a trial or a step past it is a real OOM."""
        usable = int(self.budget_bytes * (1 - headroom))
        if hasattr(self, "cap_bytes"):
            self.cap_bytes = usable
        return usable

    def cleanup(self) -> None:
        """Release what a trial left behind, so the next one starts from the same baseline."""
        gc.collect()

    def identity(self) -> dict[str, Any]:
        """What about this device changes a trial's peak (a probe-cache key): kind and allocator settings."""
        return {"device": self.device, "torch_device": self.torch_device, "alloc_conf": alloc_conf()}


class CpuBackend(MemoryBackend):
    """The cpu virtual device: live storage bytes counted, OOM raised past the budget."""

    device = "cpu"
    fake = False
    stops_at_budget = True  # raise OOM past the budget, as a GPU would (and so this machine's RAM is safe)

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        result = Measurement()
        mode = LiveBytesMode(self.budget_bytes if self.stops_at_budget else None, fake=self.fake)
        try:
            with mode:
                yield result
        finally:
            mode.stop()
            result.peak_bytes, result.held_peak_bytes = mode.peak_bytes, mode.held_peak_bytes
            result.allocated_peak_bytes = mode.peak_bytes


class EstimateBackend(CpuBackend):
    """The cuda step under `FakeTensorMode`, counted by an emulated caching allocator (`autobatch.estimate`)."""

    device = "estimate"
    fake = True
    # Nothing is allocated, so a size past the budget is measured in full rather than stopped: its peak
    # lets the search interpolate between a fit and a failure instead of bisecting blind.
    stops_at_budget = False

    def __init__(self, budget_bytes: int) -> None:
        super().__init__(budget_bytes)
        from torch._subclasses.fake_tensor import FakeTensorMode

        self._fake_mode = FakeTensorMode(allow_non_fake_inputs=True)

    @contextlib.contextmanager
    def tensor_mode(self) -> Iterator[None]:
        with self._fake_mode, estimate.cuda_step():  # looked up on the module: tests plant another
            yield

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        """Peak reserved bytes of the emulated caching allocator (allocated: its blocks' bytes)."""
        result = Measurement()
        mode = estimate.AllocatorMode()
        try:
            with mode:
                yield result
        finally:
            mode.stop()
            result.peak_bytes = result.held_peak_bytes = mode.allocator.peak_reserved_bytes
            result.allocated_peak_bytes = mode.allocator.peak_allocated_bytes


class CudaBackend(MemoryBackend):
    """A real GPU: the caching allocator's peak reserved bytes, which is what runs out first.

    `--memory-budget` counts the allocator's reserved bytes: the CUDA context, NCCL's buffers and lazily
    loaded kernels live outside it (`mem_get_info`'s free figure already excludes them).
    """

    device = "cuda"

    def __init__(self, budget_bytes: int, device_index: int = 0, total_bytes: int | None = None) -> None:
        super().__init__(budget_bytes)
        self.device_index = device_index
        self.total_bytes = total_bytes
        #: where the allocator is capped while measuring; the probe lowers it to the usable budget
        self.cap_bytes = budget_bytes

    @contextlib.contextmanager
    def capped(self) -> Iterator[None]:
        """The caching allocator refuses to reserve past `cap_bytes` inside; the old fraction is restored after.

        torch caps reserved memory at fraction × total memory (c10/cuda/CUDACachingAllocator.cpp,
        `allowed_memory_maximum`), so past the cap an allocation is a real `OutOfMemoryError`.
        """
        total = self.total_bytes or torch.cuda.mem_get_info(self.device_index)[1]
        before = torch.cuda.get_per_process_memory_fraction(self.device_index)
        torch.cuda.set_per_process_memory_fraction(min(1.0, self.cap_bytes / total), self.device_index)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(before, self.device_index)

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        result = Measurement()
        torch.cuda.synchronize(self.device_index)
        torch.cuda.reset_peak_memory_stats(self.device_index)
        try:
            with self.capped():
                yield result
        finally:
            torch.cuda.synchronize(self.device_index)
            result.peak_bytes = result.held_peak_bytes = torch.cuda.max_memory_reserved(self.device_index)
            result.allocated_peak_bytes = torch.cuda.max_memory_allocated(self.device_index)

    def cleanup(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def identity(self) -> dict[str, Any]:
        """The card too: its name and total memory (a different GPU model is a different cache entry)."""
        index = torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        return {**super().identity(), "name": properties.name, "total_memory_bytes": properties.total_memory}


def alloc_conf() -> str | None:
    """The caching allocator's setting in this process: PYTORCH_CUDA_ALLOC_CONF (or torch's newer name,
    PYTORCH_ALLOC_CONF); None is torch's default. On an H200 `expandable_segments:True` fitted 43 where the
    default fitted 39 (issue 19), so a plan holds only under the setting it was measured with."""
    import os

    return os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")


def cuda_capacity_bytes(device_index: int = 0) -> int:
    """What this process can use on the GPU: free memory plus what our allocator already holds.

    Memory other processes hold does not count. NVML, when present, is asked too (it sees other
    processes the same way) and the smaller answer wins. NVML numbers GPUs in PCI order and ignores
    `CUDA_VISIBLE_DEVICES`, so the card is found by its UUID, never by torch's index.
    """
    free, _total = torch.cuda.mem_get_info(device_index)
    capacity = free + torch.cuda.memory_reserved(device_index)
    try:
        import pynvml

        uuid = str(torch.cuda.get_device_properties(device_index).uuid)
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            capacity = min(capacity, int(info.free) + torch.cuda.memory_reserved(device_index))
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - NVML missing, no driver, or any NVMLError: torch's figure stands
        logger.debug("NVML not used: %s", exc)
    return capacity


def total_ram_bytes() -> int:
    """The machine's RAM (Linux `MemTotal`)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_cpu_budget(device: str, budget_bytes: int | None) -> None:
    """A --memory-budget for the cpu backend, which really allocates its trials: past the machine's RAM it can
    only end in the kernel's OOM killer (1 TiB was accepted on a 24 GiB machine)."""
    total = total_ram_bytes()
    if device == "cpu" and budget_bytes is not None and budget_bytes > total:
        raise ConfigError(
            f"memory_budget {format_bytes(budget_bytes)} is more than this machine's RAM ({format_bytes(total)}): "
            f"the cpu backend really allocates it; pass at most {format_bytes(total)}, or plan for a larger "
            "GPU with device estimate", keys=("memory_budget", "device")
        )


def available_ram_bytes() -> int:
    """Available RAM (Linux `MemAvailable`), the cpu backend's budget when none is given."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


#: A cgroup v1 "no limit" is the largest page-aligned signed 64-bit value; anything this large is no limit.
_NO_CGROUP_LIMIT = 2**60


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _inactive_file_bytes(stat_path: Path, key: str) -> int:
    """Reclaimable page cache a cgroup's usage counts (what `docker stats` subtracts too)."""
    try:
        for line in stat_path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_memory_room_bytes(
    proc_cgroup: str | os.PathLike = "/proc/self/cgroup", root: str | os.PathLike = "/sys/fs/cgroup"
) -> tuple[int, str] | None:
    """(limit less usage, "cgroup v2"/"cgroup v1") of this process's memory cgroup; None without a limit.

    The kernel's OOM killer ends a container at its cgroup limit, whatever `MemAvailable` says. Usage
    is the group's (every process in it, page cache less its inactive, reclaimable part). The group's
    own directory is tried first, then the mount root (a container sees its own group there).
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    root = Path(root)
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":  # v2: "0::/group"
            files, version = ("memory.max", "memory.current", "inactive_file"), "cgroup v2"
            bases = [root / group.lstrip("/"), root]
        elif "memory" in controllers.split(","):
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            version = "cgroup v1"
            bases = [root / "memory" / group.lstrip("/"), root / "memory"]
        else:
            continue
        for base in bases:
            limit = _read_int(base / files[0])
            if limit is None or limit >= _NO_CGROUP_LIMIT:
                continue
            usage = (_read_int(base / files[1]) or 0) - _inactive_file_bytes(base / "memory.stat", files[2])
            return max(limit - max(usage, 0), 0), version
    return None


def default_ram_budget() -> tuple[int, str]:
    """The cpu backend's budget without --memory-budget, and where it came from (the plan notes it).

    min(MemAvailable, the cgroup v2/v1 limit less what the group already uses).
    """
    available = available_ram_bytes()
    room = cgroup_memory_room_bytes()
    if room is not None and room[0] < available:
        return room[0], f"{room[1]} memory limit less what is in use"
    return available, "available RAM"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def nvml_free_bytes() -> int | None:
    """The least free memory NVML reports over the GPUs this process may use (`CUDA_VISIBLE_DEVICES`, as indices
    or UUIDs), without a CUDA context; None without NVML. NVML numbers GPUs in PCI order and CUDA may not, so
    the least over all of them stands for each rank's."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVML missing or no driver
        logger.debug("NVML not used: %s", exc)
        return None
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        names = [n.strip() for n in visible.split(",") if n.strip()] if visible is not None else \
            [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        handles = [pynvml.nvmlDeviceGetHandleByUUID(n) if n.startswith(("GPU-", "MIG-"))
                   else pynvml.nvmlDeviceGetHandleByIndex(int(n)) for n in names]
        return min((int(pynvml.nvmlDeviceGetMemoryInfo(h).free) for h in handles), default=None)
    finally:
        pynvml.nvmlShutdown()


def _coordinator_backend(memory_budget_bytes: int | None) -> MemoryBackend:
    """cuda as FSDP trial groups' coordinator sees it: this process trains nothing, so it owns no GPU and makes
    no CUDA context (one would hold about 0.5 GiB of the card a rank's worker then trials on). The budget is
    the least of `--memory-budget` and NVML's free memory; each worker caps its own card there."""
    free = nvml_free_bytes()
    if free is None and memory_budget_bytes is None:
        raise ConfigError("FSDP trial groups on cuda read each GPU's free memory through NVML, which is not "
                          "available here: pass memory_budget (e.g. memory_budget 80GB)", keys=("memory_budget",))
    budget = min(b for b in (free, memory_budget_bytes) if b is not None)
    backend = CudaBackend(budget, device_index=0, total_bytes=None)
    backend.budget_source = "memory_budget" if memory_budget_bytes and budget == memory_budget_bytes else \
        "free GPU memory (NVML, the least over the visible GPUs)"
    return backend


def make_backend(device: str | None, memory_budget_bytes: int | None, coordinator: bool = False) -> MemoryBackend:
    """The backend for `--device` (None: cuda when available, else cpu) and `--memory-budget`.

    A `coordinator` (FSDP trial groups launched from this process) trains nothing on cuda: see
    `_coordinator_backend`.
    """
    device = device or default_device()
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda: no GPU is available; use device cpu or device estimate", keys=("device",))
        if coordinator:
            return _coordinator_backend(memory_budget_bytes)
        index = ranks.select_cuda_device()  # LOCAL_RANK's GPU, current before any other CUDA call
        capacity = cuda_capacity_bytes(index)
        total = torch.cuda.mem_get_info(index)[1]
        backend: MemoryBackend = CudaBackend(min(capacity, memory_budget_bytes or capacity), index, total)
        backend.budget_source = "memory_budget" if memory_budget_bytes else "free GPU memory"
        return backend
    cls = CpuBackend if device == "cpu" else EstimateBackend
    if device == "estimate" and memory_budget_bytes is None:
        raise ConfigError(
            "device estimate plans for a GPU this machine does not have: pass memory_budget with that "
            "card's memory (e.g. memory_budget 80GB)", keys=("device", "memory_budget")
        )
    if memory_budget_bytes is None:
        budget, source = default_ram_budget()
        backend = cls(budget)
        backend.budget_source = source
    else:
        backend = cls(memory_budget_bytes)
        backend.budget_source = "memory_budget"
    return backend
