"""A trial measures what it says: auto_find_batch_size off, NEFTune hooks not piling up, estimate plans for a GPU."""

import pytest
import yaml
from helpers import plan_json

from autobatch.cli import main
from autobatch.config import build_config
from autobatch.errors import ConfigError
from autobatch.memory import CpuBackend, make_backend
from autobatch.planfile import plan_yaml_text
from autobatch.planner import Plan
from autobatch.trial import Prober


def test_auto_find_batch_size_trial_reports_the_real_oom_and_neftune_hooks_do_not_pile_up(tiny_model_dir):
    config = build_config(overrides={
        "model_name_or_path": str(tiny_model_dir("llama")), "device": "cpu", "headroom": 0, "max_length": 64,
        "auto_find_batch_size": True, "neftune_noise_alpha": 5,
    })
    prober = Prober(config, CpuBackend(10**12), 10**12)
    try:
        assert prober.args.auto_find_batch_size is False
        peak_2 = prober.run_trial(2).peak_memory_bytes
        prober.backend.budget_bytes = prober.usable_bytes = peak_2
        for _ in range(2):  # accelerate's retry would shrink 8 until it fitted and call that a fit
            trial = prober.run_trial(8)
            assert trial.oom and not trial.fits
        embeddings = prober.trainer.model.get_input_embeddings()
        neftune = [h for h in embeddings._forward_hooks.values() if "neftune" in h.__name__]
        assert not neftune  # the OOM'd train() never removed NEFTune's hook: we did
        assert prober.run_trial(2).fits
    finally:
        prober.close()


def test_run_refuses_auto_find_batch_size_with_one_line(tiny_model_dir, tmp_path, capsys):
    code = main(["run", "--model", str(tiny_model_dir("llama")), "--device", "cpu", "--auto-find-batch-size", "true",
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("autobatch: error: auto_find_batch_size: it restarts training at a smaller batch")
    assert "set auto_find_batch_size false" in err[-1]


def test_estimate_needs_the_target_cards_budget():
    with pytest.raises(ConfigError, match=r"^device estimate plans for a GPU .*memory_budget 80GB\)$"):
        make_backend("estimate", None)


def test_plan_yaml_says_the_precision_the_trials_measured():
    config = build_config(overrides={"model_name_or_path": "m", "bf16": True})
    plan = Plan(2, 4, 8, 1, 3, 100, 95, 0.05, 50, "estimate", 64, [], precision="fp32")
    text = plan_yaml_text(config, plan)
    body = yaml.safe_load(text)
    assert (body["bf16"], body["fp16"]) == (False, False)  # trl sft trains the fp32 the estimate measured


def test_estimate_with_lora_on_a_tiny_model(tiny_model_dir, capsys):
    plan = plan_json(["--model", str(tiny_model_dir("llama")), "--device", "estimate", "--memory-budget", "1GiB",
                      "--use-peft", "true", "--max-length", "32", "--max-micro-batch-size", "2"], capsys)
    assert plan["device"] == "estimate" and plan["headroom"] == 0.05 and plan["precision"] == "bf16"  # TRL default
    assert [t["fits"] for t in plan["trials"]] == [True, True] and plan["max_micro_batch_size"] == 2


@pytest.mark.slow
def test_estimate_with_lora_in_bf16_on_a_7b_llama_config(tmp_path, capsys):
    from transformers import LlamaConfig

    from autobatch.builtin import save_tokenizer

    save_tokenizer(tmp_path)
    LlamaConfig().save_pretrained(tmp_path)  # the defaults are Llama-2-7B's shape: 6.7e9 parameters
    plan = plan_json(["--model", str(tmp_path), "--device", "estimate", "--memory-budget", "80GB",
                      "--use-peft", "true", "--dtype", "bfloat16", "--max-length", "64",
                      "--micro-batch-size", "1", "--gradient-checkpointing", "true"], capsys)
    # one trial (micro-batch and checkpointing given: nothing searched or compared), each of 32 traced layers
    assert len(plan["trials"]) == 1
    peak = plan["trials"][0]["peak_memory_bytes"]
    assert plan["trials"][0]["fits"] and 13.4e9 < peak < 15e9  # bf16 frozen weights (13.5 GB) + adapters


def test_plan_yaml_with_its_precision_is_reusable_by_run_plan(tmp_path):
    from autobatch.planfile import load_plan, read_plan_meta, write_plan_yaml

    model = tmp_path / "model"  # a model directory is checked for its config.json when a config loads
    model.mkdir()
    (model / "config.json").write_text("{}")
    config = build_config(overrides={"model_name_or_path": str(model), "device": "cpu"})
    plan = Plan(2, 4, 8, 1, 3, 100, 95, 0.05, 50, "cpu", 64, [], precision="fp32")
    path = write_plan_yaml(tmp_path / "plan.yaml", plan_yaml_text(config, plan))
    assert read_plan_meta(path)["memory_fingerprint"]["bf16"] is False
    reused = load_plan(str(path), build_config(str(path)))  # not refused for the bf16/fp16 it wrote
    assert (reused.per_device_train_batch_size, reused.gradient_accumulation_steps) == (2, 4)


@pytest.mark.parametrize("device, expected", [("cuda", False), ("cpu", True)])
def test_use_cpu_follows_the_device(device, expected):
    from autobatch.workload import sft_config

    config = build_config(overrides={"use_cpu": not expected, "bf16": False})
    args, _ = sft_config(config, device, "unused-out")
    assert args.use_cpu is expected
