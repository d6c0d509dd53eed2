"""The cpu budget backend counts like the CUDA allocator's `max_memory_allocated` and fails like CUDA."""

import pytest
import torch
from helpers import MiB

from autobatch.errors import ConfigError
from autobatch.memory import (
    CpuBackend,
    CudaBackend,
    EstimateBackend,
    LiveBytesMode,
    MemoryBackend,
    is_oom,
    make_backend,
)


def test_live_bytes_count_each_storage_once_and_release_it():
    with LiveBytesMode(budget_bytes=None) as mode:
        start = mode.live_bytes
        a = torch.empty(MiB, dtype=torch.uint8)
        view = a[: MiB // 2]  # a view shares the storage: not counted again
        assert mode.live_bytes - start == MiB
        del a, view
        assert mode.live_bytes == start
        b = torch.empty(2 * MiB, dtype=torch.uint8)
        del b
    assert mode.peak_bytes - start == 2 * MiB


def test_tensors_alive_before_the_mode_count_from_the_start():
    weights = torch.empty(3 * MiB, dtype=torch.uint8)
    with LiveBytesMode(budget_bytes=None) as mode:
        assert mode.live_bytes >= 3 * MiB
    del weights


def test_going_past_the_budget_raises_a_cuda_style_oom_that_accelerate_recognises():
    from accelerate.utils.memory import should_reduce_batch_size

    backend = CpuBackend(budget_bytes=64 * MiB)
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory. Tried to allocate") as info, \
            backend.measure():
        torch.empty(128 * MiB, dtype=torch.uint8)
    assert should_reduce_batch_size(info.value)
    assert is_oom(info.value)


@pytest.mark.parametrize(
    "error, expected",
    [
        (torch.OutOfMemoryError("anything"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("CUDA out of memory"), False),
        (KeyError("out of memory"), False),
    ],
)
def test_oom_is_recognised_by_type_and_message_only(error, expected):
    assert is_oom(error) is expected


def test_estimate_backend_counts_fake_tensors_without_memory():
    backend = EstimateBackend(budget_bytes=10**12)
    with backend.tensor_mode(), backend.measure() as measured:
        big = torch.empty(50 * 2**30, dtype=torch.uint8)  # 50 GiB: nothing is allocated
        del big
    assert measured.peak_bytes >= 50 * 2**30


def test_cuda_device_without_a_gpu_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="^device cuda: no GPU is available; use device cpu or device estimate$"):
        make_backend("cuda", None)


def test_a_cpu_budget_past_the_machines_ram_is_refused_in_one_line(capsys):
    """issue 23 (messages): --memory-budget 1TiB on the cpu backend, which really allocates, was accepted."""
    from autobatch.cli import main
    from autobatch.memory import total_ram_bytes
    from autobatch.units import format_bytes, parse_bytes

    budget = f"{total_ram_bytes() * 2 // 2**20}MiB"
    assert main(["plan", "--device", "cpu", "--memory-budget", budget]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("autobatch: error")]
    assert len(lines) == 1 and "more than this machine's RAM" in lines[0] and "micro=" not in lines[0]
    assert lines[0].startswith(f"autobatch: error: --memory-budget {format_bytes(parse_bytes(budget))} is more")
    assert lines[0].endswith("plan for a larger GPU with --device estimate"), "keys said as the flags typed"


def test_usable_budget_has_one_home_that_the_probe_and_the_run_use(monkeypatch):
    """issue 18.4: budget × (1 − headroom) is computed by `keep_headroom` alone (the cuda allocator capped
    there); the probe's usable budget and the run's cap are both its answer."""
    from autobatch import api, train

    cuda = CudaBackend(1000 * MiB)
    assert cuda.keep_headroom(0.25) == cuda.cap_bytes == 750 * MiB
    assert CpuBackend(1000 * MiB).keep_headroom(0.1) == 900 * MiB
    asked = []
    keep = MemoryBackend.keep_headroom
    monkeypatch.setattr(MemoryBackend, "keep_headroom",
                        lambda self, headroom: asked.append(headroom) or keep(self, headroom) - MiB)
    plan = api.plan(device="cpu", memory_budget="300MiB", headroom=0.2, max_length=32, max_micro_batch_size=2)
    assert asked == [0.2] and plan.usable_memory_bytes == 240 * MiB - MiB
    train._run_backend(api.load(device="cpu", memory_budget="300MiB"), plan)
    assert asked == [0.2, 0.2], "the run caps at the plan's headroom through the same function"


class _FakeNvml:
    """pynvml with two GPUs (indices 0 and 1, UUIDs GPU-a and GPU-b) and the given free bytes."""

    def __init__(self, free: list[int]) -> None:
        self.free, self.open = free, 0

    def nvmlInit(self):
        self.open += 1

    def nvmlShutdown(self):
        self.open -= 1

    def nvmlDeviceGetCount(self):
        return len(self.free)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return "ab".index(uuid[-1])

    def nvmlDeviceGetMemoryInfo(self, handle):
        return type("Info", (), {"free": self.free[handle]})()


@pytest.mark.parametrize(("visible", "budget", "expected"), [
    (None, None, 60 * 10**9), ("0", None, 70 * 10**9), ("GPU-b", None, 60 * 10**9), (None, 50 * 10**9, 50 * 10**9),
])
def test_an_fsdp_coordinator_on_cuda_takes_its_budget_from_nvml_without_a_cuda_context(
    monkeypatch, visible, budget, expected
):
    """The process that launches FSDP trial groups trains nothing: it must not pick a GPU (several are visible to
    it, which a training process refuses) nor make a context on one (about 0.5 GiB a rank's worker would lose)."""
    import sys

    from autobatch import memory, ranks

    nvml = _FakeNvml([70 * 10**9, 60 * 10**9])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for touches_the_gpu in (torch.cuda.mem_get_info, torch.cuda.set_device):
        monkeypatch.setattr(torch.cuda, touches_the_gpu.__name__, lambda *a, **k: pytest.fail("a CUDA context"))
    monkeypatch.setattr(ranks, "select_cuda_device", lambda: pytest.fail("the coordinator picked a GPU"))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    backend = memory.make_backend("cuda", budget, coordinator=True)
    assert (backend.device, backend.budget_bytes, nvml.open) == ("cuda", expected, 0)


def test_an_fsdp_coordinator_on_cuda_without_nvml_asks_for_a_budget(monkeypatch):
    import sys

    from autobatch import memory

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="pass memory_budget"):
        memory.make_backend("cuda", None, coordinator=True)
