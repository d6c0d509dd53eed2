"""Each part of the estimate's cuda emulation moves the figure by what a hand calculation says."""

import json

import pytest
import torch
from helpers import ROOT, run_script

from autobatch.allocator import round_size
from autobatch.estimate import CUBLAS_WORKSPACE_BYTES, AllocatorMode, cuda_step

KiB, MiB = 2**10, 2**20


def _fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


@pytest.mark.parametrize("bf16", [False, True])
def test_autocast_bf16_activations_and_cached_weight_copy(bf16):
    """Linear(1024, 1024) on 64 rows: fp32 adds its 256 KiB output; bf16 adds the cached bf16 weight (2 MiB) and
    bias (2 KiB, one 2048 B block), the bf16 input (128 KiB) and a bf16 output (128 KiB). Both: one cuBLAS workspace."""
    with _fake():
        layer = torch.nn.Linear(1024, 1024)
        x = torch.randn(64, 1024)
        with AllocatorMode() as mode:
            start = mode.allocator.allocated_bytes
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = layer(x)
                grown = mode.allocator.allocated_bytes - start
    expected = (2 * MiB + 2048 + 128 * KiB + 128 * KiB) if bf16 else 256 * KiB
    assert y.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert grown == expected + CUBLAS_WORKSPACE_BYTES


def test_a_storage_resized_in_place_frees_and_reallocates_its_block():
    """FSDP2 frees an all-gathered parameter with `storage.resize_(0)` and gathers it again with `resize_(n)`; on
    cuda each is a free and a malloc of the allocator, so a freed gather buffer is no longer held."""
    with _fake(), AllocatorMode() as mode:
        start = mode.allocator.allocated_bytes
        buffer = torch.empty(MiB, dtype=torch.uint8) * 1  # an op's output: 1 MiB, tracked
        held = mode.allocator.allocated_bytes - start
        buffer.untyped_storage().resize_(0)
        freed = mode.allocator.allocated_bytes - start
        buffer.untyped_storage().resize_(4 * MiB)
        regathered = mode.allocator.allocated_bytes - start
    assert (held, freed, regathered) == (MiB, 0, 4 * MiB)


def _chunked_logprob_peak(emulate: bool, tokens: int = 64, hidden: int = 64, vocab: int = 1000, chunk: int = 512):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    with _fake(), (cuda_step() if emulate else torch.no_grad()):
        h = torch.randn(tokens, hidden)
        w = torch.randn(vocab, hidden)
        targets = torch.zeros(tokens, dtype=torch.long)
        with AllocatorMode() as mode:
            start = mode.allocator.allocated_bytes
            ChunkedLogProbFunction.apply(h, w, None, targets, 1.0, chunk)
            return mode.allocator.peak_allocated_bytes - start


def test_trl_loss_folds_tiles_in_place_as_triton_does_on_cuda():
    """On cuda TRL's fused LM head holds one [tokens, chunk] tile (fp32 here: 128 KiB) and per-token statistics; the
    torch fallback for other devices makes tile-sized float32 temporaries (at least two more tiles)."""
    tile = 64 * 512 * 4
    emulated, fallback = _chunked_logprob_peak(True), _chunked_logprob_peak(False)
    per_token = round_size(64 * 4)
    assert emulated <= CUBLAS_WORKSPACE_BYTES + tile + 16 * per_token
    assert fallback - emulated >= 2 * tile


@pytest.fixture(scope="module")
def wide_tiny_model(tmp_path_factory):
    """Parameters outweigh activations at 16 tokens: the peak is the optimizer step."""
    from autobatch.builtin import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("wide") / "model", "llama", hidden_size=256, intermediate_size=512,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


def _trial(model_dir, **overrides):
    from autobatch.config import build_config
    from autobatch.memory import EstimateBackend
    from autobatch.trial import Prober

    config = build_config(overrides={"model_name_or_path": str(model_dir), "device": "estimate", "memory_budget": 2**30,
                                     "max_length": 16, "headroom": 0, "no_cache": True, **overrides})
    prober = Prober(config, EstimateBackend(2**30), 2**30)
    try:
        trial = prober.run_trial(1)
        params = sum(round_size(p.untyped_storage().nbytes()) for p in prober.trainer.model.parameters())
        return trial, params, prober.precision
    finally:
        prober.close()


def test_foreach_adamw_holds_one_more_copy_of_the_parameters_than_fused(wide_tiny_model):
    """cuda's default unfused AdamW is foreach: `_foreach_sqrt(exp_avg_sq)` is one more fp32 copy of the
    parameters at the step; the fused kernel updates in place."""
    fused, params, precision = _trial(wide_tiny_model, optim="adamw_torch_fused")
    foreach, _, _ = _trial(wide_tiny_model, optim="adamw_torch")
    assert precision == "bf16"  # TRL's default, kept: the estimate emulates the cuda run's autocast
    extra = foreach.peak_allocated_bytes - fused.peak_allocated_bytes
    assert abs(extra - params) <= 0.01 * params


@pytest.mark.parametrize(("flags", "expected"), [({"bf16": False}, "fp32"), ({"bf16": False, "fp16": True}, "fp16")])
def test_estimate_keeps_the_configured_precision(wide_tiny_model, flags, expected):
    _, _, precision = _trial(wide_tiny_model, **flags)
    assert precision == expected


@pytest.mark.slow
def test_estimate_vs_gpu_quick_mode_is_within_3_percent_of_the_h200():
    done = run_script(ROOT / "benchmarks" / "estimate_vs_gpu.py", "--quick", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    row = json.loads(out)["rows"][0]
    assert row["precision"] == "bf16"
    assert abs(row["ratio"] - 1) <= 0.03, row
