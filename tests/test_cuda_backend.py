"""The cuda backend with `torch.cuda` replaced (no GPU here): allocator cap, one device per process, NVML by UUID."""

import sys
import types

import pytest
import torch
from helpers import GiB

from autobatch.errors import ConfigError
from autobatch.memory import CudaBackend, cuda_capacity_bytes, is_oom, make_backend


class FakeCuda:
    """Records the calls the backend makes; `devices` GPUs of 80 GiB, 70 GiB of each free."""

    def __init__(self, monkeypatch, devices: int = 1, fraction: float = 1.0) -> None:
        self.calls: list[tuple] = []
        self.fraction = fraction
        self.devices = devices
        for name in ("is_available", "device_count", "set_device", "mem_get_info", "memory_reserved",
                     "get_per_process_memory_fraction", "set_per_process_memory_fraction", "synchronize",
                     "reset_peak_memory_stats", "max_memory_reserved", "max_memory_allocated",
                     "get_device_properties", "empty_cache"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def is_available(self):
        return True

    def device_count(self):
        return self.devices

    def set_device(self, index):
        self.calls.append(("set_device", index))

    def mem_get_info(self, index=None):
        self.calls.append(("mem_get_info", index))
        return 70 * GiB, 80 * GiB

    def memory_reserved(self, index=None):
        return 0

    def get_per_process_memory_fraction(self, index=None):
        return self.fraction

    def set_per_process_memory_fraction(self, fraction, index=None):
        self.calls.append(("fraction", fraction, index))
        self.fraction = fraction

    def synchronize(self, index=None):
        pass

    def reset_peak_memory_stats(self, index=None):
        self.calls.append(("reset", index))

    def max_memory_reserved(self, index=None):
        return 12 * GiB

    def max_memory_allocated(self, index=None):
        return 10 * GiB

    def get_device_properties(self, index):
        return types.SimpleNamespace(uuid=f"0000000{index}-aaaa-bbbb-cccc-dddddddddddd", total_memory=80 * GiB)

    def empty_cache(self):
        pass


@pytest.fixture
def no_launcher(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # NVML absent unless a test provides it


def test_allocator_capped_at_usable_over_total_while_measuring_then_restored(monkeypatch, no_launcher):
    cuda = FakeCuda(monkeypatch, fraction=0.9)
    backend = make_backend("cuda", 40 * GiB)
    assert isinstance(backend, CudaBackend) and backend.budget_bytes == 40 * GiB
    backend.cap_bytes = 38 * GiB  # the probe sets the usable budget (5% headroom)
    with backend.measure() as measured:
        assert cuda.fraction == pytest.approx(38 / 80)
    assert cuda.fraction == 0.9  # what it was before
    assert [c for c in cuda.calls if c[0] == "fraction"] == [("fraction", 38 / 80, 0), ("fraction", 0.9, 0)]
    assert measured.peak_bytes == 12 * GiB and measured.allocated_peak_bytes == 10 * GiB


def test_cap_restored_when_the_trial_runs_out_of_memory(monkeypatch, no_launcher):
    cuda = FakeCuda(monkeypatch)
    backend = make_backend("cuda", 8 * GiB)
    with pytest.raises(torch.OutOfMemoryError), backend.measure():
        assert cuda.fraction == pytest.approx(8 / 80)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert cuda.fraction == 1.0


def test_two_visible_gpus_in_one_process_are_refused(monkeypatch, no_launcher):
    FakeCuda(monkeypatch, devices=2)
    with pytest.raises(ConfigError, match=r"2 GPUs are visible to one process .*CUDA_VISIBLE_DEVICES=0.*torchrun"):
        make_backend("cuda", None)


def test_local_rank_selects_the_device_before_capacity_is_read(monkeypatch, no_launcher):
    cuda = FakeCuda(monkeypatch, devices=4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("LOCAL_RANK", "2")
    backend = make_backend("cuda", None)
    assert cuda.calls[0] == ("set_device", 2)
    assert {c[1] for c in cuda.calls if c[0] == "mem_get_info"} == {2}
    assert backend.device_index == 2 and backend.budget_bytes == 70 * GiB
    with backend.measure():
        pass
    assert ("reset", 2) in cuda.calls and ("fraction", 70 / 80, 2) in cuda.calls


def test_local_rank_beyond_the_visible_gpus_is_refused(monkeypatch, no_launcher):
    FakeCuda(monkeypatch, devices=2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ConfigError, match=r"LOCAL_RANK 3 but only 2 GPU\(s\) are visible"):
        make_backend("cuda", None)


def test_nvml_is_asked_for_the_card_by_uuid_not_by_torch_index(monkeypatch, no_launcher):
    FakeCuda(monkeypatch, devices=2)
    asked = []
    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda uuid: asked.append(uuid) or "handle",
        nvmlDeviceGetHandleByIndex=lambda index: pytest.fail("NVML numbers cards in PCI order"),
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(free=60 * GiB),
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert cuda_capacity_bytes(1) == 60 * GiB  # NVML saw less free (another process): the smaller wins
    assert asked == ["GPU-00000001-aaaa-bbbb-cccc-dddddddddddd"]


@pytest.mark.parametrize(
    "message, device, expected",
    [
        ("CUDA out of memory. Tried to allocate 2.00 GiB", "cuda", True),
        ("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", "cuda", True),
        ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes", "cuda", False),
        ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes", "cpu", True),
        ("NCCL error in: ProcessGroupNCCL.cpp:1, unhandled cuda error, NCCL version 2.21: Out of memory", "cuda",
         False),
    ],
)
def test_host_ram_and_nccl_failures_are_not_device_ooms_on_cuda(message, device, expected):
    assert is_oom(RuntimeError(message), device) is expected
