"""End-to-end probe tests on the cpu budget backend: tiny models loaded from disk, real SFTTrainer steps.

The cpu backend makes memory deterministic, so these assert exact facts: the reported maximum fits a
real `SFTTrainer.train()` under the same budget and the next size runs out of memory.
"""

import gc
import math

import pytest
import torch
from helpers import peaks, plan_json

from autobatch.cli import main
from autobatch.config import build_config
from autobatch.memory import CpuBackend
from autobatch.probe import make_plan
from autobatch.trial import Prober
from autobatch.workload import build_trainer, load_tokenizer, sft_config, synthetic_dataset

MAX_LENGTH = 256
EFFECTIVE = 48


def config_for(model_dir, **overrides):
    values = {
        "model_name_or_path": str(model_dir), "device": "cpu", "headroom": 0, "max_length": MAX_LENGTH,
        "gradient_checkpointing": False, "effective_batch_size": EFFECTIVE,
    }
    values.update(overrides)
    return build_config(overrides=values)


#: The (architecture, true maximum) cases the budget tests set up: 6 × 256 tokens is before TRL's 4096-token kink,
#: 20 × 256 past it. Each architecture once (what differs between them is the model's layers), Llama on both sides.
EXACT_CASES = (("llama", 6), ("llama", 20), ("gpt2", 20), ("opt", 6))


@pytest.fixture(scope="session")
def budget_between(tiny_model_dir):
    """Factory: budget_between(arch, size) -> a budget whose true limit for `config_for(arch)` is `size`,
    halfway between the trial peaks of size and size + 1.

    The peaks at each case's size and the next are measured once a session by one Prober an
    architecture: the tests that need only a budget share that measurement instead of each building a trainer.
    """
    measured: dict[str, dict[int, int]] = {}

    def budget(arch: str, size: int) -> int:
        if arch not in measured:
            sizes = [b for name, m in EXACT_CASES if name == arch for b in (m, m + 1)]
            measured[arch] = peaks(config_for(tiny_model_dir(arch)), sizes)
        low, high = measured[arch][size], measured[arch][size + 1]
        assert low < high
        return (low + high) // 2

    return budget


def real_train_peak(config, micro: int, budget: int, tmp_path) -> int | None:
    """Peak of two real optimizer steps of SFTTrainer.train() at `micro` under `budget`; None on OOM.

    Each batch is the worst case a run on real data meets: max_length examples and one a token shorter,
    so it is padded. The dataset holds one batch more than two steps use, as a long run's loader always
    has one ahead.
    """
    accumulation = math.ceil(EFFECTIVE / micro)
    args, _ = sft_config(
        config, "cpu", str(tmp_path / f"train-{micro}"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation, max_steps=2, save_strategy="no", logging_steps=1,
        disable_tqdm=True, train_sampling_strategy="sequential",
    )
    ids = synthetic_dataset(load_tokenizer(config.model_name_or_path), MAX_LENGTH)[0]["input_ids"]
    from datasets import Dataset

    batch = [ids] * (micro - 1) + [ids[:-1]] if micro > 1 else [ids]
    rows = batch * (accumulation * 2 + 1)
    trainer = build_trainer(config, args, train_dataset=Dataset.from_dict({"input_ids": rows}))
    gc.collect()
    peak = None
    try:
        with CpuBackend(budget).measure() as measured:
            trainer.train()
        peak = measured.peak_bytes
    except torch.OutOfMemoryError:
        pass
    del trainer
    gc.collect()
    return peak


def real_train_fits(config, micro: int, budget: int, tmp_path) -> bool:
    return real_train_peak(config, micro, budget, tmp_path) is not None


@pytest.mark.parametrize(("arch", "true_max"), EXACT_CASES)
def test_plan_max_is_exact_under_real_sfttrainer(arch, true_max, tiny_model_dir, budget_between, capsys, tmp_path):
    model_dir = tiny_model_dir(arch)
    config = config_for(model_dir)
    budget = budget_between(arch, true_max)
    plan = plan_json(
        ["--model", str(model_dir), "--device", "cpu", "--memory-budget", str(budget), "--headroom", "0",
         "--max-length", str(MAX_LENGTH), "--gradient-checkpointing", "false",
         "--effective-batch-size", str(EFFECTIVE)],
        capsys,
    )
    assert plan["max_micro_batch_size"] == true_max
    assert plan["per_device_train_batch_size"] * plan["gradient_accumulation_steps"] == EFFECTIVE
    assert plan["effective_batch_size"] == EFFECTIVE and plan["world_size"] == 1
    assert plan["memory_budget_bytes"] == budget and plan["device"] == "cpu" and plan["max_length"] == MAX_LENGTH
    trials = {t["micro_batch_size"]: t for t in plan["trials"]}
    assert trials[true_max]["fits"] and not trials[true_max + 1]["fits"]
    assert plan["peak_memory_bytes"] == trials[plan["per_device_train_batch_size"]]["peak_memory_bytes"]
    assert len(plan["trials"]) <= (5 if true_max < 16 else 8)
    assert real_train_fits(config, true_max, budget, tmp_path)
    assert not real_train_fits(config, true_max + 1, budget, tmp_path)


def test_trial_peak_equals_the_real_train_peak_to_the_byte(tiny_model_dir, tmp_path):
    config = config_for(tiny_model_dir("opt"))
    trial_peak = peaks(config, [4])[4]
    assert real_train_peak(config, 4, 10**12, tmp_path) == trial_peak
    assert not real_train_fits(config, 4, trial_peak - 1, tmp_path)


def test_gradient_checkpointing_changes_the_peak_and_the_plan(tiny_model_dir):
    model = tiny_model_dir("llama")
    settings = {"max_length": 512, "effective_batch_size": None}
    plain = peaks(config_for(model, **settings), [1, 2, 3, 4])
    saved = peaks(config_for(model, gradient_checkpointing=True, **settings), [1, 2, 4])
    assert saved[2] - saved[1] < plain[2] - plain[1], "checkpointing keeps fewer activations per sample"
    budget = saved[4]  # 4 fits with checkpointing, not without
    assert plain[3] <= budget < plain[4]
    plan_plain = make_plan(config_for(model, memory_budget=budget, **settings))
    plan_saved = make_plan(config_for(model, memory_budget=budget, gradient_checkpointing=True, **settings))
    assert plan_plain.max_micro_batch_size == 3
    assert plan_saved.max_micro_batch_size >= 4


def test_lora_changes_the_peak_and_the_plan(tiny_model_dir):
    wide = tiny_model_dir("llama-wide")
    full = config_for(wide, max_length=64, effective_batch_size=None)
    lora = config_for(wide, max_length=64, effective_batch_size=None,
                      lora={"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    full_peaks, lora_peaks = peaks(full, [1, 2, 3]), peaks(lora, [1])
    assert lora_peaks[1] < full_peaks[1], "no gradients or AdamW moments for frozen weights"
    budget = (full_peaks[2] + full_peaks[3]) // 2
    plan_full = make_plan(config_for(wide, max_length=64, effective_batch_size=None, memory_budget=budget))
    plan_lora = make_plan(config_for(wide, max_length=64, effective_batch_size=None, memory_budget=budget,
                                     lora={"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}))
    assert plan_full.max_micro_batch_size == 2
    assert plan_lora.max_micro_batch_size > 2


def test_fixed_micro_batch_is_checked_not_searched(tiny_model_dir):
    config = config_for(tiny_model_dir("llama"), per_device_train_batch_size=8, memory_budget="4GiB")
    plan = make_plan(config)
    assert [t.micro_batch_size for t in plan.trials] == [8]
    assert plan.per_device_train_batch_size == 8 and plan.gradient_accumulation_steps == 6 and plan.fits


def test_budget_too_small_for_one_names_the_need_and_the_fixes(tiny_model_dir, capsys):
    code = main(["plan", "--model", str(tiny_model_dir("llama")), "--device", "cpu", "--memory-budget", "1MiB",
                 "--max-length", "256", "--gradient-checkpointing", "false"])
    err = capsys.readouterr().err
    assert code == 1
    assert "micro-batch 1 needs" in err and "gradient-checkpointing" in err and "max-length" in err
    assert "Traceback" not in err


def test_estimate_backend_finds_its_own_max(tiny_model_dir):
    """The estimate emulates the cuda step (bf16 kept, allocator segments), not the cpu one: its search is exact
    against its own trials, and the plan says what it assumed."""
    from autobatch.memory import EstimateBackend

    true_max = 20  # 20 × 256 tokens: past TRL's 4096-token bend, where the peaks stop lying on one line

    model = tiny_model_dir("llama")
    prober = Prober(config_for(model, device="estimate", memory_budget=2**40), EstimateBackend(2**40), 2**40,
                    per_device=EFFECTIVE)
    try:
        budget = prober.run_trial(true_max).peak_memory_bytes  # true_max fits exactly at its own peak
    finally:
        prober.close()
    estimate = make_plan(config_for(model, memory_budget=budget, device="estimate", find_max=True))
    tried = {t.micro_batch_size: t for t in estimate.trials}
    best = estimate.max_micro_batch_size
    assert best >= true_max and tried[best].fits and not tried[best + 1].fits  # exact against its own trials
    assert estimate.device == "estimate" and any("estimate" in note for note in estimate.notes)
    assert estimate.precision == estimate.assumed["precision"] == "bf16"
    assert estimate.assumed["optim"] == "adamw_torch_fused" and estimate.assumed["memory_bytes"] == budget


@pytest.mark.slow
def test_estimate_backend_plans_a_1b_llama_from_its_config_alone(tmp_path, capsys):
    from transformers import LlamaConfig

    from autobatch.builtin import save_tokenizer

    save_tokenizer(tmp_path)
    LlamaConfig(  # TinyLlama-1.1B's shape: 4.4 GB of fp32 weights, 17.6 GB with AdamW; never allocated here
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=2048,
    ).save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    # checkpointing given (TRL's default, on): the plan does not also try 32 without it (test_checkpointing.py).
    # The micro-batch is given: one trace of the 1B step (the search over estimate trials is the opt-350m test's)
    plan = plan_json(["--model", str(tmp_path), "--device", "estimate", "--memory-budget", "40GiB",
                      "--max-length", "1024", "--effective-batch-size", "32", "--gradient-checkpointing", "true",
                      "--micro-batch-size", "32"], capsys)
    [trial] = plan["trials"]
    # 32 per device fits 40 GiB (bf16 autocast, emulated allocator), over the weights, gradients and two AdamW
    # moments in fp32 (17.6 GB) by the activations of 32 × 1024 tokens, checkpointed
    assert plan["max_micro_batch_size"] == 32 and trial["micro_batch_size"] == 32 and trial["fits"]
    assert 17.6 * 10**9 < trial["peak_memory_bytes"] < plan["usable_memory_bytes"]
    assert (plan["per_device_train_batch_size"], plan["gradient_accumulation_steps"]) == (32, 1)


@pytest.mark.slow
def test_opt350m_shape_target_32_is_planned_in_three_trials(tmp_path, capsys):
    """The issue's case (17 trials, 8 OOM before): 512 tokens, 16 GiB, effective batch 32 -> 1, 2, 32."""
    from autobatch.builtin import save_model_shape

    model = save_model_shape(tmp_path / "opt-350m", "opt-350m")
    plan = plan_json(["--model", str(model), "--device", "estimate", "--memory-budget", "16GiB", "--max-length",
                      "512", "--effective-batch-size", "32", "--no-cache"], capsys)
    assert [t["micro_batch_size"] for t in plan["trials"]] == [1, 2, 32]
    assert plan["stopped_at_need"] and plan["max_micro_batch_size"] == 32
    assert (plan["per_device_train_batch_size"], plan["gradient_accumulation_steps"]) == (32, 1)
    assert plan["trials"][-1]["fits"] and plan["trials"][-1]["peak_memory_bytes"] < 16 * 2**30


@pytest.mark.parametrize("content, problem", [
    (b"\xff\xfe\xfa not text\n", "cannot parse it"),
    (b"not json\n", "cannot parse it"),
    (b"", "has no examples"),
], ids=["not-utf8", "not-json", "empty"])
def test_a_bad_dataset_file_is_named_with_the_fix(tiny_model_dir, tmp_path, capsys, content, problem):
    """issue 23 (messages): an empty file gave StopIteration; a non-UTF-8 or non-JSON one named no file."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    code = main(["plan", "--model", str(tiny_model_dir("llama")), "--dataset", str(data), "--device", "cpu",
                 "--memory-budget", "200MiB"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("autobatch: error")]
    assert code == 2 and len(lines) == 1 and f"--dataset {data}" in lines[0] and problem in lines[0], lines


def test_a_read_only_datasets_cache_is_reported_as_such(tiny_model_dir, tmp_path, monkeypatch):
    """issue 23 (messages): a read-only XDG_CACHE_HOME was reported as a dataset that "could not be downloaded"."""
    import datasets

    from autobatch.errors import AutobatchError
    from autobatch.workload import load_train_dataset

    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a"}\n')
    cache = tmp_path / "ro" / "huggingface" / "datasets"

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(cache / "json"))

    monkeypatch.setattr(datasets, "load_dataset", read_only)
    config = build_config(overrides={"model_name_or_path": str(tiny_model_dir("llama")), "dataset_name": str(data)})
    with pytest.raises(AutobatchError, match=f"cannot write the datasets cache at {cache / 'json'} .*HF_DATASETS_CACHE") as info:
        load_train_dataset(config)
    assert "downloaded" not in str(info.value)


def test_trials_measure_the_longest_example_after_truncation():
    """The worst-case shape: the longest tokenized example wherever it sits (tiny_dataset_file's lengths are
    unsorted for this), and a batch of it padded by one token so attention builds its padding mask."""
    from types import SimpleNamespace

    from datasets import Dataset

    lengths = [5, 3, 9, 7]
    dataset = Dataset.from_dict({"input_ids": [list(range(n)) for n in lengths], "mark": lengths})
    prober = SimpleNamespace(trainer=SimpleNamespace(train_dataset=dataset))
    example = Prober._longest_example(prober)
    assert example["mark"] == 9 and len(example["input_ids"]) == 9
    prober.example, prober.max_length, prober.padded = example, 9, True
    assert [len(e["input_ids"]) for e in Prober._examples(prober, 3)] == [9, 9, 8]
    prober.padded = False  # packing / padding-free: every row full length
    assert [len(e["input_ids"]) for e in Prober._examples(prober, 3)] == [9, 9, 9]
