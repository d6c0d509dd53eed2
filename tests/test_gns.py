"""The gradient noise scale: the estimator against synthetic ground truth, the hooks against explicit gradients.

Synthetic: per-example gradients drawn from N(G, Σ) with known |G|² and tr Σ, averaged over micro-batches of
unequal sizes, then fed to the pure estimator. Hooks: a tiny Llama trains one step at learning rate 0 and
the callback's per-micro-batch and accumulated norms are compared with gradients computed explicitly.
"""

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch

from autobatch import gns
from autobatch.config import build_config
from autobatch.workload import build_trainer, load_train_dataset, sft_config


def synthetic_steps(steps, sizes, g, sigma, seed=0):
    """Steps whose micro-batches of `sizes` average per-example gradients ~ N(g, diag(sigma²))."""
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        means, totals = [], [0.0] * len(g)
        for n in sizes:
            mean = [sum(rng.gauss(gi, si) for _ in range(n)) / n for gi, si in zip(g, sigma)]
            means.append(mean)
            totals = [t + m * n for t, m in zip(totals, mean)]
        big = [t / sum(sizes) for t in totals]  # weighted by size, as num_items_in_batch does
        out.append(gns.StepNorms([sum(x * x for x in m) for m in means], list(sizes), sum(x * x for x in big),
                                 1 / sum(sizes)))
    return out


def test_estimates_recover_known_signal_and_noise_with_unequal_micro_batches():
    g = [0.3, -0.2, 0.1, 0.4] * 4  # |G|² = 0.3² + 0.2² + 0.1² + 0.4² times 4 = 1.2
    sigma = [1.0] * 16  # tr Σ = 16
    steps = synthetic_steps(2000, [2, 3, 7], g, sigma)
    estimates = [gns.step_estimates(s) for s in steps]
    g2 = sum(e[0] for e in estimates) / len(estimates)
    trace = sum(e[1] for e in estimates) / len(estimates)
    assert g2 == pytest.approx(1.2, rel=0.1)
    assert trace == pytest.approx(16, rel=0.05)
    report = gns.summarize(estimates)
    assert report["resolved"] and report["low"] < 16 / 1.2 < report["high"]
    assert report["b_simple"] == pytest.approx(16 / 1.2, rel=0.1)


def test_no_pair_at_accumulation_one_and_open_interval_when_signal_is_unresolved():
    assert gns.step_estimates(gns.StepNorms([1.0], [4], 1.0, 1 / 4)) is None
    noise_only = [gns.step_estimates(s) for s in synthetic_steps(20, [1, 1], [0.0] * 8, [1.0] * 8)]
    report = gns.summarize(noise_only)
    assert not report["resolved"] and report["b_simple"] is None and report["high"] is None
    assert report["low"] > 0


def test_ema_is_bias_corrected():
    assert gns.ema_history([(2.0, 10.0)]) == [pytest.approx(5.0)]
    assert gns.ema_history([(2.0, 10.0), (2.0, 10.0)])[-1] == pytest.approx(5.0)


def test_report_is_written_atomically(tmp_path, monkeypatch):
    path = gns.write_report(tmp_path, {"b_simple": 3.0})
    assert path.name == "gns.json" and json.loads(path.read_text()) == {"b_simple": 3.0}

    def fail(fd):  # the new text is in the temp file by now: the write dies between writing and renaming
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        gns.write_report(tmp_path, {"b_simple": 4.0, "history": list(range(1000))})
    assert json.loads(path.read_text()) == {"b_simple": 3.0}  # the old report, whole
    assert [p.name for p in tmp_path.iterdir()] == ["gns.json"]  # no temp file left behind


def trainer_with_gns(model_dir, data, out, accumulation, token_normalised, **overrides):
    config = build_config(overrides={
        "model_name_or_path": str(model_dir), "dataset_name": str(data), "device": "cpu", "max_length": 48,
        "learning_rate": 0.0, "max_steps": 1, "gradient_checkpointing": False, "train_sampling_strategy": "sequential",
        "report_to": "none", "disable_tqdm": True, "save_strategy": "no", "max_grad_norm": 1e-3, **overrides,
    })
    args, _ = sft_config(config, "cpu", str(out), per_device_train_batch_size=2,
                         gradient_accumulation_steps=accumulation)
    trainer = build_trainer(config, args, train_dataset=load_train_dataset(config))
    if not token_normalised:
        trainer.model_accepts_loss_kwargs = False  # the Trainer then divides each mean loss by accumulation
    callback = gns.gns_callback().attach(trainer)
    trainer.add_callback(callback)
    return trainer, callback


def flat_grad(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}).loss
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]).double()


@pytest.mark.parametrize("token_normalised", [True, False], ids=["num_items", "divide"])
@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_hooked_norms_equal_explicit_per_micro_batch_gradients(
    tiny_model_dir, tiny_dataset_file, tmp_path, accumulation, token_normalised
):
    trainer, callback = trainer_with_gns(tiny_model_dir(), tiny_dataset_file, tmp_path, accumulation, token_normalised)
    trainer.train()
    assert callback.token_normalised() is token_normalised
    (step,) = callback.raw
    batches = [b for _, b in zip(range(accumulation), trainer.get_train_dataloader())]
    grads = [flat_grad(trainer.model, b) for b in batches]  # lr 0: the weights are those the step saw
    tokens = [float((b["labels"][..., 1:] != -100).sum()) for b in batches]
    assert len(set(tokens)) == min(accumulation, 2)  # unequal micro-batches, so the weighting matters
    assert step.small_sq == pytest.approx([float(g @ g) for g in grads], rel=1e-4)
    weights = [n / sum(tokens) for n in tokens] if token_normalised else [1 / accumulation] * accumulation
    big = sum(w * g for w, g in zip(weights, grads))
    assert step.big_sq == pytest.approx(float(big @ big), rel=1e-4)  # pre-clip: max_grad_norm is tiny
    expected_pairs = 0 if accumulation == 1 else 1
    assert len(callback.recorder.tokens) == expected_pairs
    assert step.inv_big == pytest.approx(sum(w * w / n for w, n in zip(weights, tokens)))
    assert math.isfinite(callback.report()["overhead"])


def exact_b_simple(model_dir, data, max_length):
    """tr Σ / |G|² from every per-sequence gradient of the dataset (sample covariance), at the saved weights."""
    import json as _json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    grads = []
    for line in data.read_text().splitlines():
        ids = tokenizer(_json.loads(line)["text"] + tokenizer.eos_token, return_tensors="pt").input_ids[:, :max_length]
        grads.append(flat_grad(model, {"input_ids": ids, "labels": ids}))
    stacked = torch.stack(grads)
    mean = stacked.mean(0)
    trace = ((stacked - mean) ** 2).sum(1).sum() / (len(grads) - 1)
    return float(trace / (mean @ mean)), ids.shape[1] - 1


def equal_length_data(path, rows=64, chars=40):
    """Texts of exactly `chars` characters (+ EOS): sequence and token units then differ by a constant."""
    import json as _json

    rng = random.Random(0)
    words = ["river", "stone", "ford", "summer", "water", "children", "bank", "hedge", "evening", "farmer", "head", "field", "rain"]
    lines = []
    for _ in range(rows):
        text = ""
        while len(text) < chars:
            text += rng.choice(words) + " "
        lines.append(_json.dumps({"text": text[:chars]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_run_gns_brackets_the_exact_noise_scale_at_learning_rate_zero(tiny_model_dir, tmp_path, capsys):
    """`autobatch run --gns` as a user types it, at learning rate 0 (the population is fixed): its interval
    holds B_simple computed from every per-sequence gradient of the dataset, and is not vacuous."""
    import json as _json

    from autobatch.cli import main

    data = equal_length_data(tmp_path / "equal.jsonl")
    model = tiny_model_dir()
    out = tmp_path / "out"
    code = main(["run", "--gns", "--gns-every", "1", "--model", str(model), "--dataset", str(data), "--device", "cpu",
                 "--memory-budget", "4GiB", "--micro-batch-size", "2", "--effective-batch-size", "8",
                 "--max-length", "64", "--learning-rate", "0", "--num-train-epochs", "4", "--output-dir", str(out),
                 "--gradient-checkpointing", "false", "--save-strategy", "'no'", "--disable-tqdm", "true"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = _json.loads((out / "gns.json").read_text())
    exact, tokens_per_sequence = exact_b_simple(model, data, 64)
    print(f"exact {exact:.3f}, interval {report['low']:.3f}-{report['high']:.3f}, b_simple {report['b_simple']:.3f}, overhead {report['overhead']:.2%}")
    assert report["steps"] == 32 and report["resolved"]  # every step (--gns-every 1): 64 sequences / 8 a step × 4 epochs
    assert report["low"] < exact < report["high"]
    assert report["high"] < 3 * report["low"]  # not vacuous
    assert report["b_simple_tokens"] == pytest.approx(report["b_simple"] * tokens_per_sequence, rel=1e-6)
    assert f"B_noise {report['b_simple']:.3g} sequences" in captured.out


def test_run_gns_writes_gns_json_logs_it_and_shows_it(tiny_model_dir, tmp_path, capsys):
    import json as _json

    from autobatch.cli import main

    data = equal_length_data(tmp_path / "equal.jsonl", rows=24, chars=20)
    out = tmp_path / "out"
    code = main(["run", "--gns", "--model", str(tiny_model_dir()), "--dataset", str(data), "--device", "cpu",
                 "--memory-budget", "4GiB", "--micro-batch-size", "2", "--effective-batch-size", "4",
                 "--max-length", "32", "--learning-rate", "0", "--num-train-epochs", "1", "--output-dir", str(out),
                 "--gradient-checkpointing", "false", "--save-strategy", "'no'", "--logging-steps", "2",
                 "--disable-tqdm", "true"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = _json.loads((out / "gns.json").read_text())
    assert set(report) >= {"b_simple", "low", "high", "unit", "b_simple_tokens", "steps", "resolved", "overhead"}
    assert report["steps"] == 6 and report["unit"] == "sequences"
    assert "gradient noise scale: " in captured.out and "gns overhead" in captured.err
    history = _json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("gns_b_simple" in entry for entry in history)


def test_gns_every_measures_one_step_in_n_and_the_hooks_idle_on_the_others(tiny_model_dir, tmp_path, capsys):
    import json as _json

    from autobatch.cli import main

    data = equal_length_data(tmp_path / "equal.jsonl", rows=28, chars=20)
    args = ["run", "--model", str(tiny_model_dir()), "--dataset", str(data), "--device", "cpu",
            "--memory-budget", "4GiB", "--micro-batch-size", "2", "--effective-batch-size", "4", "--max-length", "32",
            "--num-train-epochs", "1", "--gradient-checkpointing", "false", "--save-strategy", "'no'",
            "--disable-tqdm", "true"]
    code = main([*args, "--gns-every", "3", "--output-dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = _json.loads((tmp_path / "out" / "gns.json").read_text())
    assert report["measured_every"] == 3 and report["steps"] == 3  # steps 1, 4 and 7 of 7
    assert ", 3 of 7 steps measured)" in captured.err
    assert (report["measured_steps"], report["optimizer_steps"], report["sampling"]) == (3, 7, "one step in 3")
    assert main([*args, "--gns-every", "0", "--output-dir", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "autobatch: error: --gns-every 0: measure one step in N needs N >= 1 (1: every step)")
    assert not (tmp_path / "none").exists()


_DDP_STEPS = '''
import sys
import torch
from autobatch import gns
from autobatch.config import build_config
from autobatch.workload import build_trainer, load_train_dataset, sft_config

model_dir, data, out = sys.argv[1:4]
for case in sys.argv[4:]:  # one launch, every case: each rank starts torch and TRL once, not once a case
    accumulation, mode = int(case.split("-")[0]), case.split("-")[1]
    config = build_config(overrides={
        "model_name_or_path": model_dir, "dataset_name": data, "device": "cpu", "max_length": 48,
        "learning_rate": 0.0, "max_steps": 1, "gradient_checkpointing": False, "train_sampling_strategy": "sequential",
        "report_to": "none", "disable_tqdm": True, "save_strategy": "no", "max_grad_norm": 1e-3})
    args, _ = sft_config(config, "cpu", f"{out}/{case}", per_device_train_batch_size=2,
                         gradient_accumulation_steps=accumulation)
    trainer = build_trainer(config, args, train_dataset=load_train_dataset(config))
    if mode == "divide":
        trainer.model_accepts_loss_kwargs = False
    callback = gns.gns_callback().attach(trainer)
    trainer.add_callback(callback)
    trainer.train()
    model, rank = trainer.model, trainer.accelerator.process_index
    grads, tokens = [], []
    for _, batch in zip(range(accumulation), trainer.get_train_dataloader()):  # this rank's micro-batches, in order
        model.zero_grad(set_to_none=True)
        model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]).double())
        tokens.append(float((batch["labels"][..., 1:] != -100).sum()))
    (step,) = callback.raw
    torch.save({"grads": grads, "tokens": tokens, "small_sq": step.small_sq, "big_sq": step.big_sq,
                "inv_big": step.inv_big, "pairs": len(callback.recorder.tokens)}, f"{out}/{case}-rank{rank}.pt")
'''
_DDP_CASES = [(accumulation, mode) for accumulation in (1, 2) for mode in ("num_items", "divide")]


@pytest.fixture(scope="module")
def ddp_steps(tiny_model_dir, tiny_dataset_file, tmp_path_factory):
    """Every case's two rank reports from one `torchrun --nproc_per_node 2` launch: {(accumulation, mode): [r0, r1]}."""
    import os
    import subprocess

    from helpers import TORCHRUN

    if TORCHRUN is None:
        pytest.skip("torchrun not found")
    out = tmp_path_factory.mktemp("ddp-gns")
    script = out / "ddp_steps.py"
    script.write_text(_DDP_STEPS)
    cases = [f"{accumulation}-{mode}" for accumulation, mode in _DDP_CASES]
    done = subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", "--standalone", str(script), str(tiny_model_dir()), str(tiny_dataset_file),
         str(out), *cases],
        check=False, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {case: [torch.load(out / f"{name}-rank{r}.pt") for r in (0, 1)] for case, name in zip(_DDP_CASES, cases)}


@pytest.mark.slow
@pytest.mark.parametrize("accumulation, mode", _DDP_CASES)
def test_under_ddp_the_small_batch_is_a_ranks_micro_batch_and_the_big_one_the_global_batch(
    ddp_steps, accumulation, mode
):
    """Two gloo ranks, one step at learning rate 0: every micro-batch of both ranks (gathered) against its
    explicit gradient, and the step's norm against the global batch's gradient, weighted as the Trainer
    weights it (tokens over both ranks with num_items_in_batch, equal shares when it divides)."""
    ranks = ddp_steps[accumulation, mode]
    grads = [g for r in ranks for g in r["grads"]]
    tokens = [n for r in ranks for n in r["tokens"]]
    assert len(set(tokens)) > 1  # unequal micro-batches, so the weighting matters
    for report in ranks:  # both ranks hold the same gathered step
        assert report["small_sq"] == pytest.approx([float(g @ g) for g in grads], rel=1e-4)
        weights = [n / sum(tokens) for n in tokens] if mode == "num_items" else [1 / len(grads)] * len(grads)
        big = sum(w * g for w, g in zip(weights, grads))
        assert report["big_sq"] == pytest.approx(float(big @ big), rel=1e-4)  # pre-clip, after the all-reduce
        assert report["inv_big"] == pytest.approx(sum(w * w / n for w, n in zip(weights, tokens)))
        assert report["pairs"] == 1  # accumulation 1 too: the rank's micro-batch against the global batch


def test_the_overhead_benchmark_times_steps_with_and_without_the_hooks():
    """benchmarks/gns_overhead.py keeps working: its quick cpu run gives both figures for the built-in size."""
    from helpers import ROOT, run_script

    out = run_script(ROOT / "benchmarks" / "gns_overhead.py", "--quick", "--cycles", "3", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    [row] = json.loads(out.stdout)["rows"]
    assert row["cycles"] == 3 and row["tokens_per_micro_batch"] == 4 * 256
    assert 100_000 < row["parameters"] < 300_000  # the built-in model's size
    assert row["step_s_without"] > 0 and row["step_s_with"] > 0
    # The gns measured the "on" step of each cycle (warm-up cycles included), not the "off" or "idle" ones.
    assert row["measured_steps"] == 3 + 2
    assert 0 < row["meter_overhead"] < 1  # the hooks ran on the measured steps, and took only a part of them
    # the default (sampled) figure: a long run's chance from the meter, between the idle and measured costs
    assert row["default_chance"] == pytest.approx(min(1.0, gns.TARGET_OVERHEAD / row["meter_overhead"]))
    assert row["default_overhead"] == pytest.approx(
        row["default_chance"] * row["ab_overhead"] + (1 - row["default_chance"]) * row["idle_overhead"])


# ------------------------------------------------------------------ sampled steps: --gns within its aim


def simulate_sampling(cost: float, total: int | None, steps: int, seed: int = 0) -> int:
    """Measured steps of a run whose measured steps cost `cost` of step time, as the callback decides them."""
    rng, measured = random.Random(seed), 0
    for step in range(steps):
        if rng.random() < gns.measure_chance(cost if measured else None, step, total, measured):
            measured += 1
    return measured


def test_measure_chance_learns_the_cost_first_then_aims_at_the_target():
    assert gns.measure_chance(None, 0, 100, 0) == 1.0
    assert gns.measure_chance(0.05, 1, None, 1) == 1.0  # still learning the cost
    assert gns.measure_chance(0.05, 50, None, 5) == pytest.approx(gns.TARGET_OVERHEAD / 0.05)
    assert gns.measure_chance(0.001, 50, None, 5) == 1.0  # cheap steps: every one


def test_measure_chance_owes_a_short_run_its_minimum_of_measured_steps():
    # 10 steps left and 10 still owed: every one is measured
    assert gns.measure_chance(0.05, 20, 30, gns.MIN_MEASURED_STEPS - 10) == 1.0
    for seed in range(20):
        assert simulate_sampling(0.05, 30, 30, seed) >= gns.MIN_MEASURED_STEPS


@pytest.mark.parametrize("cost", [0.051, 0.025, 0.012])  # the cpu figures of a measured step (README)
def test_a_long_sampled_run_costs_about_the_target(cost):
    steps = 20_000
    share = simulate_sampling(cost, steps, steps) / steps
    assert share * cost == pytest.approx(gns.TARGET_OVERHEAD, rel=0.1)
    assert gns.expected_overhead(cost, 0.0, share) <= 0.01


def test_run_gns_samples_steps_by_default_and_says_so(tiny_model_dir, tmp_path, capsys):
    import json as _json

    from autobatch.cli import main

    data = equal_length_data(tmp_path / "equal.jsonl", rows=60, chars=20)
    code = main(["run", "--model", str(tiny_model_dir()), "--dataset", str(data), "--device", "cpu",
                 "--memory-budget", "4GiB", "--micro-batch-size", "2", "--effective-batch-size", "4",
                 "--max-length", "32", "--num-train-epochs", "1", "--gradient-checkpointing", "false",
                 "--save-strategy", "'no'", "--disable-tqdm", "true", "--gns", "--output-dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = _json.loads((tmp_path / "out" / "gns.json").read_text())
    assert report["optimizer_steps"] == 15 and report["measured_every"] is None
    assert gns.MIN_MEASURED_STEPS <= report["measured_steps"] <= 15
    assert report["sampling"].startswith("seeded random sample")
    assert 0 < report["measured_step_overhead"] < 1 and 0 < report["overhead"] < 1
    assert f", {report['measured_steps']} of 15 steps measured)" in captured.err
