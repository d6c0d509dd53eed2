"""Memory backends: the only module that knows which device a trial runs on.

Three backends share one interface (`budget_bytes`, `measure()`, `tensor_mode()`, `cleanup()`):

- `cuda`: the caching allocator's own peak counters; OOM is torch's `OutOfMemoryError`.
- `cpu`: a virtual device with a budget. A `TorchDispatchMode` counts the bytes of every live tensor
  storage (each once, released when freed), the quantity `torch.cuda.max_memory_allocated` reports, and
  raises a CUDA-style `torch.OutOfMemoryError` when an op pushes that count past the budget.
- `estimate`: the same counting under `FakeTensorMode`: no compute, no memory, so a model far bigger
  than this machine is measured from its config alone; a size past the budget is measured in full
  (it does not fit, but its whole peak is known). Blind to scratch allocated inside one kernel
  (flash attention, cuBLAS workspace) and to fragmentation: its figures are estimates.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from autobatch.config import format_bytes
from autobatch.errors import ConfigError

logger = logging.getLogger(__name__)

DEVICES = ("cuda", "cpu", "estimate")

# Every message torch, CUDA, cuDNN and cuBLAS use for an allocation failure (accelerate's
# utils/memory.py `should_reduce_batch_size` recognises the same family).
_OOM_MESSAGES = re.compile(
    r"CUDA out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED|"
    r"CUDNN_STATUS_ALLOC_FAILED|cuDNN error: CUDNN_STATUS_NOT_SUPPORTED\. This error may appear if you "
    r"passed in a non-contiguous input|DefaultCPUAllocator: can't allocate memory|out of memory",
    re.IGNORECASE,
)


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error, by type or by any message variant; False for anything else."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and len(exc.args) == 1 and bool(_OOM_MESSAGES.search(str(exc.args[0])))


@dataclass
class Measurement:
    """Filled in when a `measure()` block exits: the highest memory seen inside it."""

    peak_bytes: int = 0  # includes an allocation refused for the budget (where a failed trial stopped)
    held_peak_bytes: int = 0  # the most ever held: never above the budget on the cpu backend


class LiveBytesMode(TorchDispatchMode):
    """Counts live tensor-storage bytes op by op; raises a CUDA-style OOM past `budget_bytes`.

    A storage is counted once (views share it) and released by a weakref finalizer when torch frees
    it. Storages alive when the mode starts (weights, gradients, optimizer state) are counted from
    the start, so the peak is the quantity `torch.cuda.max_memory_allocated` reports.
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
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor):
                    self._track(obj)
        self.peak_bytes = self.held_peak_bytes = self.live_bytes

    def _track(self, tensor: torch.Tensor) -> int:
        if tensor.is_sparse or tensor.device.type == "cuda":
            return 0
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
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if self.budget_bytes is not None and self.live_bytes > self.budget_bytes:
            over = self.live_bytes
            del out
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {format_bytes(added)}. Virtual device of "
                f"{format_bytes(self.budget_bytes)} would hold {format_bytes(over)} "
                f"(autobatch cpu backend, --memory-budget)."
            )
        self.held_peak_bytes = max(self.held_peak_bytes, self.live_bytes)
        return out


class MemoryBackend:
    """Interface shared by the three backends."""

    device: str = ""
    #: what the budget came from, for the report ("--memory-budget", "available RAM", "free GPU memory")
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

    def cleanup(self) -> None:
        """Release what a trial left behind, so the next one starts from the same baseline."""
        gc.collect()

    def identity(self) -> dict[str, Any]:
        """What about this device changes a trial's peak (a probe-cache key): kind and allocator settings."""
        import os

        return {"device": self.device, "torch_device": self.torch_device,
                "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")}


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


class EstimateBackend(CpuBackend):
    """The cpu counting under `FakeTensorMode`: shapes and bytes without compute."""

    device = "estimate"
    fake = True
    # Nothing is allocated, so a size past the budget is measured in full rather than stopped: its peak
    # lets the search interpolate between a fit and a failure instead of bisecting blind.
    stops_at_budget = False

    def __init__(self, budget_bytes: int) -> None:
        super().__init__(budget_bytes)
        from torch._subclasses.fake_tensor import FakeTensorMode

        self._fake_mode = FakeTensorMode(allow_non_fake_inputs=True)

    def tensor_mode(self) -> contextlib.AbstractContextManager:
        return self._fake_mode


class CudaBackend(MemoryBackend):
    """A real GPU: the caching allocator's peak reserved bytes, which is what runs out first."""

    device = "cuda"

    @contextlib.contextmanager
    def measure(self) -> Iterator[Measurement]:
        result = Measurement()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            yield result
        finally:
            torch.cuda.synchronize()
            result.peak_bytes = result.held_peak_bytes = torch.cuda.max_memory_reserved()
            logger.debug("cuda peak allocated %s", format_bytes(torch.cuda.max_memory_allocated()))

    def cleanup(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def identity(self) -> dict[str, Any]:
        """The card too: its name and total memory (a different GPU model is a different cache entry)."""
        index = torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        return {**super().identity(), "name": properties.name, "total_memory_bytes": properties.total_memory}


def cuda_capacity_bytes(device_index: int = 0) -> int:
    """What this process can use on the GPU: free memory plus what our allocator already holds.

    Memory other processes hold does not count. NVML, when present, is asked too (it sees other
    processes the same way) and the smaller answer wins.
    """
    free, _total = torch.cuda.mem_get_info(device_index)
    capacity = free + torch.cuda.memory_reserved(device_index)
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            capacity = min(capacity, int(info.free) + torch.cuda.memory_reserved(device_index))
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - NVML missing, no driver, or any NVMLError: torch's figure stands
        logger.debug("NVML not used: %s", exc)
    return capacity


def available_ram_bytes() -> int:
    """Available RAM (Linux `MemAvailable`), the cpu backend's budget when none is given."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_backend(device: str | None, memory_budget_bytes: int | None) -> MemoryBackend:
    """The backend for `--device` (None: cuda when available, else cpu) and `--memory-budget`."""
    device = device or default_device()
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available; use --device cpu or --device estimate")
        capacity = cuda_capacity_bytes(torch.cuda.current_device())
        backend: MemoryBackend = CudaBackend(min(capacity, memory_budget_bytes or capacity))
        backend.budget_source = "--memory-budget" if memory_budget_bytes else "free GPU memory"
        return backend
    cls = CpuBackend if device == "cpu" else EstimateBackend
    if memory_budget_bytes is None:
        backend = cls(available_ram_bytes())
        backend.budget_source = "available RAM"
    else:
        backend = cls(memory_budget_bytes)
        backend.budget_source = "--memory-budget"
    return backend
