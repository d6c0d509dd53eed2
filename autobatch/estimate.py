"""The estimate backend's step: the cuda training step emulated under fake cpu tensors, counted as the card counts.

Why not fake tensors on a cuda device: torch 2.13's cpu build makes a fake cuda tensor, but autograd aborts
the process on it ("PyTorch is not linked with support for cuda devices", InputMetadata needs the cuda
DeviceGuard), so the step runs on fake *cpu* tensors and each place where the cuda run takes another path is
emulated here, each measured on the H200 (benchmarks/estimate_vs_gpu.py):

- precision: the trainer keeps `bf16`/`fp16` as configured; accelerate then runs forward under
  `torch.autocast("cpu", dtype)`. CPU and CUDA autocast cast the same ops a transformer uses to the low
  precision (linear, matmul, bmm, baddbmm, addmm, SDPA) and both cache the cast weights until the outermost
  autocast exits (aten/src/ATen/autocast_mode.cpp `cached_cast`), so the bf16 activations and the bf16 copy
  of the weights held through forward are the card's. Weights keep the dtype they were loaded with.
- optimizer: the Trainer's own choice (`adamw_torch_fused` by default) is built as on the card. The fused
  kernel updates in place: `_fused_adamw_` allocates nothing beyond the state (exp_avg, exp_avg_sq: 2 × the
  trainable parameters, and a 4-byte step each). An unfused AdamW on cuda parameters takes the foreach path
  (torch/optim/optimizer.py `_default_to_fused_or_foreach`: cuda tensors → foreach), whose
  `_foreach_sqrt(exp_avg_sqs)` holds one more copy of the parameters; on cpu it would take the per-tensor
  loop, so `_default_to_fused_or_foreach` is answered as for cuda tensors.
- attention: SDPA on cuda runs flash or memory-efficient attention (a padded batch's mask rules flash out),
  both O(s) beside their output: out plus a float32 logsumexp of batch × heads × s (efficient attention
  pads s to a multiple of 32). The cpu kernel torch picks under fake tensors,
  `_scaled_dot_product_flash_attention_for_cpu`, has those outputs too; the math kernel's s × s buffer never
  appears. The boolean mask SDPA turns into an additive one (batch × 1 × s × s) is made on both devices.
- TRL's loss: the fused LM head (trl/kernels/chunked_logprob.py) folds each `[4096, chunk]` logits tile with a
  Triton kernel on cuda (in place, nothing allocated) and accumulates the gradient GEMMs with
  `addmm(..., out_dtype=float32, out=acc)`; its torch fallback for other devices makes several tile-sized
  float32 temporaries and float32 copies of the operands. The cuda behaviour is patched in.
- kernel scratch: memory-efficient attention's backward takes `delta` and a float32 query-gradient
  accumulator from the allocator for the length of the op (`AllocatorMode._kernel_scratch`).
- cuBLAS: each (handle, stream) gets a workspace from the caching allocator on its first GEMM
  (aten/src/ATen/cuda/CublasHandlePool.cpp, 32 MiB on Hopper and later); forward runs on the main thread and
  backward on the autograd engine's device thread, each with its own handle: two workspaces.
- allocator: every storage's malloc and free goes through `autobatch.allocator.CachingAllocator`, and the
  trial's peak is its reserved peak (what `torch.cuda.max_memory_reserved` reports). The CUDA context and
  the kernels' code are outside the allocator and not counted, as on the card.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from autobatch import allocator, sharding

#: cuBLAS workspace per handle on sm90+ (CublasHandlePool.cpp `getChosenWorkspaceSize`, ":4096:8" = 32 MiB)
CUBLAS_WORKSPACE_BYTES = 32 << 20
_GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
          torch.ops.aten.baddbmm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.out}

#: The card the estimate plans for, as reported (the kernels' choices above are Hopper's: H100/H200).
DEVICE_KIND = "cuda (emulated: NVIDIA Hopper, CUDA caching allocator)"
ATTENTION_KERNEL = "SDPA flash / memory-efficient (O(s) per head, no s × s scores)"


class AllocatorMode(sharding.ResizesSeen, TorchDispatchMode):
    """Every new tensor storage is a malloc of the emulated caching allocator, freed when torch frees it.

    Storages alive when the mode starts (fake tensors only: the weights, gradients, held batches) are
    allocated first, as they were on the card before the trial.
    """

    def __init__(self) -> None:
        super().__init__()
        self.allocator = allocator.CachingAllocator()
        self.live: dict[int, int | None] = {}
        self._active = True
        self._workspaces: set[int] = set()
        from torch._subclasses.fake_tensor import FakeTensor

        with warnings.catch_warnings():  # isinstance() on some module proxies warns of deprecation
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                if isinstance(obj, FakeTensor):
                    self._track(obj)

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.is_sparse:
            return
        if is_traceable_wrapper_subclass(tensor):  # FSDP2's DTensor: the rank holds its local shard
            for part in sharding.held_parts(tensor):
                self._track(part)
            return
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # e.g. tensor subclasses without storage
            return
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = self.allocator.malloc(storage.nbytes())
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        handle = self.live.pop(key, None)
        if handle is not None and self._active:
            self.allocator.free(handle)

    def _resized(self, storage: torch.UntypedStorage) -> None:
        """A storage resized in place (FSDP2's all-gather buffers): on cuda its old block is freed and a
        block of the new size allocated (nothing for size 0)."""
        if not self._active:
            return
        key = storage._cdata
        if key not in self.live:
            weakref.finalize(storage, self._release, key)
        handle = self.live.pop(key, None)
        if handle is not None:
            self.allocator.free(handle)
        self.live[key] = self.allocator.malloc(storage.nbytes()) if storage.nbytes() else None

    def stop(self) -> None:
        self._active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            # `.item()` has no value under FakeTensorMode; a constant lets TRL's metric logging through.
            return 1
        if func in _GEMMS and self._active:
            thread = threading.get_ident()
            if thread not in self._workspaces:  # the handle's workspace, allocated once and kept
                self._workspaces.add(thread)
                self.allocator.malloc(CUBLAS_WORKSPACE_BYTES)
        scratch = self._kernel_scratch(func, args) if self._active else []
        out = func(*args, **(kwargs or {}))
        for handle in scratch:
            self.allocator.free(handle)
        if self._active:
            for item in tree_flatten(out)[0]:
                if isinstance(item, torch.Tensor):
                    self._track(item)
        return out


    def _kernel_scratch(self, func, args) -> list[int]:
        """Scratch a cuda kernel takes from the allocator for the length of one op (freed when it returns).

        Memory-efficient attention's backward (aten/src/ATen/native/transformers/cuda/attention_backward.cu)
        allocates `delta` (batch × heads × s, float32) and, for bf16/fp16, a float32 accumulator for the query
        gradient (batch × heads × s × head_dim); the cpu kernel that stands in for it allocates only its outputs.
        """
        if func is not torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
            return []
        batch, heads, length, dim = args[1].shape
        scratch = [self.allocator.malloc(batch * heads * length * 4)]
        if args[1].dtype in (torch.bfloat16, torch.float16):
            scratch.append(self.allocator.malloc(batch * heads * length * dim * 4))
        return scratch


def _fold_in_place(tile, *args, **kwargs) -> None:
    """The Triton fold of TRL's fused LM head: reads and rewrites the tile in place, allocates nothing."""


def _addmm_fp32_cuda(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`torch.addmm(acc, a, b, out_dtype=float32, out=acc)`, TRL's cuda path: cuBLAS writes into `acc`, no
    float32 copies of the operands (the cpu fallback's `a.float()`, `b.float()`)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)


def _foreach_as_on_cuda(params, differentiable: bool, use_fused: bool = False) -> tuple[bool, bool]:
    """torch's default for cuda parameters: fused when asked, else foreach (not the cpu per-tensor loop)."""
    if differentiable:
        return False, False
    return bool(use_fused), not use_fused


@contextlib.contextmanager
def cuda_step() -> Iterator[None]:
    """Inside: TRL's fused LM head and torch's optimizer default take their cuda paths (module docstring)."""
    from torch.optim import adam
    from trl.kernels import chunked_logprob

    patches = [(chunked_logprob, "_forward_tile", _fold_in_place), (chunked_logprob, "_backward_tile", _fold_in_place),
               (chunked_logprob, "_addmm_fp32", _addmm_fp32_cuda), (adam, "_default_to_fused_or_foreach", _foreach_as_on_cuda)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def assumptions(args, budget_bytes: int, precision: str) -> dict[str, Any]:
    """What an estimate assumed, for the table and `--json`: device, precision, optimizer, attention, allocator."""
    optim = str(getattr(args.optim, "value", args.optim))
    return {
        "device": DEVICE_KIND, "memory_bytes": budget_bytes, "precision": precision, "optim": optim,
        "optimizer": optim + (" (in-place fused kernel, no temporaries)" if "fused" in optim else ""),
        "attention": ATTENTION_KERNEL, "allocator": dict(allocator.SETTINGS),
        "cublas_workspace_bytes": CUBLAS_WORKSPACE_BYTES,
    }
