"""FSDP planned under its own sharding: real 2-rank gloo groups on cpu, and one rank of N traced on a fake group."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autobatch import sharding
from autobatch.builtin import save_model_shape
from autobatch.config import build_config
from autobatch.errors import ConfigError
from autobatch.probe import make_plan

FSDP = {"fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_version": 2}}
ROOT = Path(__file__).resolve().parent.parent


def _config(model, **overrides):
    return build_config(overrides={
        "model_name_or_path": str(model), "headroom": 0, "max_length": 64, "gradient_checkpointing": False,
        "no_cache": True, **FSDP, **overrides,
    })


def test_estimate_needs_a_world_of_several(tiny_model_dir):
    config = _config(tiny_model_dir("llama"), device="estimate", memory_budget="1GiB", per_device_train_batch_size=1)
    with pytest.raises(ConfigError, match=r"pass world_size N \(or nproc_per_node N\)") as refused:
        make_plan(config)
    assert {"world_size", "nproc_per_node"} <= set(refused.value.keys)  # the CLI says them as the flags typed


def test_nproc_per_node_sets_the_world_size_and_must_agree_with_it():
    assert build_config(overrides={"nproc_per_node": 4}).world_size == 4
    with pytest.raises(ConfigError, match="nproc_per_node 4 and world_size 2 differ"):
        build_config(overrides={"nproc_per_node": 4, "world_size": 2})


def _hand_peak_bytes(vocab: int, hidden: int, intermediate: int, layers: int, world: int) -> tuple[int, int]:
    """(parameters, per-rank peak) of a Llama trained with FSDP2 and fp32 AdamW, from its shape alone.

    Sharded state: weights, gradients and AdamW's two moments, 4 + 4 + 8 = 16 bytes a parameter, 1/N on
    each rank. On top, at the peak (the end of the second backward), what FSDP2 holds unsharded: one decoder
    layer's gathered weights and its full gradient before the reduce-scatter, and the embedding and LM head
    (their own units, accelerate's fsdp2_prepare_model; the head is kept gathered through backward).
    Activations of one 64-token sequence are left out (a few MB against GBs).
    """
    layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden  # attention, MLP, two RMSNorms
    embeddings = 2 * vocab * hidden  # untied embedding and LM head
    parameters = layers * layer + embeddings + hidden  # + the final norm
    sharded = 16 * parameters // world
    return parameters, sharded + 2 * 4 * layer + 4 * embeddings


@pytest.mark.slow
def test_estimate_of_a_7b_llama_on_8_ranks_matches_the_hand_calculation(tmp_path):
    model = save_model_shape(tmp_path / "llama-7b", "llama-2-7b")
    config = _config(model, device="estimate", memory_budget="80GB", nproc_per_node=8, per_device_train_batch_size=1)
    plan = make_plan(config)
    parameters, hand = _hand_peak_bytes(32000, 4096, 11008, 32, 8)
    assert parameters == 6_738_415_616  # Llama-2-7B's published count
    assert plan.world_size == 8 and plan.fits
    assert abs(plan.peak_memory_bytes / hand - 1) < 0.05, (plan.peak_memory_bytes, hand)
    assert plan.peak_memory_bytes > 16 * parameters // 8  # the sharded state alone is a floor


@pytest.fixture(scope="module")
def group_plan_at_2(tiny_model_dir):
    """The tiny Llama's plan at micro-batch 2 on two real gloo ranks (one trial, one group of two processes), for
    the tests that compare its per-rank peaks with another measurement."""
    return make_plan(_config(tiny_model_dir("llama"), device="cpu", memory_budget="1GiB", nproc_per_node=2,
                             per_device_train_batch_size=2))


@pytest.mark.slow
def test_two_rank_estimate_traces_the_real_two_rank_peak(tiny_model_dir, group_plan_at_2, monkeypatch):
    """The traced rank (fake group, fake tensors, DTensor shards, FSDP2's resized all-gather buffers) holds what a
    real rank of two gloo ranks holds, compared like for like: both counted by the cpu backend's live bytes, both
    on cpu kernels. What the estimate adds for the card (allocator blocks, cuBLAS workspaces, cuda kernels) is
    checked against the H200 in test_estimate.py."""
    from autobatch import estimate, memory

    model, real = tiny_model_dir("llama"), group_plan_at_2
    monkeypatch.setattr(memory.EstimateBackend, "measure", memory.CpuBackend.measure)
    monkeypatch.setattr(estimate, "cuda_step", contextlib.nullcontext)
    traced = make_plan(_config(model, device="estimate", memory_budget="1GiB", nproc_per_node=2,
                               per_device_train_batch_size=2, bf16=False))
    assert real.rank_peak_bytes is not None and len(real.rank_peak_bytes) == 2
    assert abs(traced.peak_memory_bytes / max(real.rank_peak_bytes) - 1) < 0.03, (traced.peak_memory_bytes,
                                                                                  real.rank_peak_bytes)


_PLAIN_RUN = textwrap.dedent("""
    # A plain 2-rank FSDP2 SFTTrainer run (torchrun), its peak under the cpu backend's counter.
    import gc, json, os, sys
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from autobatch import sharding
    from autobatch.memory import CpuBackend
    from torch.distributed.tensor import DTensor

    model, out = sys.argv[1], sys.argv[2]
    sharding.init_short_group()
    rank = int(os.environ["RANK"])
    args = SFTConfig(output_dir=out + "/run", max_steps=2, per_device_train_batch_size=2, use_cpu=True, bf16=False,
                     report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, max_length=64,
                     activation_checkpointing=False, fsdp="full_shard auto_wrap", fsdp_config={"fsdp_version": 2})
    # every rank's batch: one example truncated to 64 tokens and one of 63, as a trial's worst case
    texts = [{"text": "x" * 200}, {"text": "x" * int(sys.argv[3])}] * 8
    with sharding.fsdp_on_cpu():
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(texts))
        lengths = sorted({len(ids) for ids in trainer.train_dataset["input_ids"]})
        # the run moves only its shards to the device: the host copy loaded before sharding is not counted
        trainer.model = trainer.model_wrapped = trainer.accelerator.prepare(trainer.model)
        trainer.accelerator._models.clear()
        gc.collect()
        with CpuBackend(10**12).measure() as measured:
            trainer.train()
    weight = trainer.model.model.layers[0].mlp.gate_proj.weight
    json.dump({"rank": rank, "peak": measured.peak_bytes, "type": str(trainer.accelerator.distributed_type),
               "dtensor": isinstance(weight, DTensor), "local": weight.to_local().numel(), "global": weight.numel(),
               "lengths": lengths}, open(f"{out}/rank-{rank}.json", "w"))
""")


@pytest.mark.slow
def test_plan_peak_per_rank_matches_a_plain_two_rank_fsdp_run(tiny_model_dir, group_plan_at_2, tmp_path):
    model = tiny_model_dir("llama")
    script = tmp_path / "plain.py"
    script.write_text(_PLAIN_RUN)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    shorter = 62  # characters that tokenize (with EOS) to 63 tokens; checked below
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
                    str(model), str(tmp_path), str(shorter)], check=True, env=env, timeout=600, capture_output=True)
    runs = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert runs[0]["lengths"] == [63, 64]
    for run in runs:  # really sharded: accelerate kept the FSDP plugin on cpu (sharding.fsdp_on_cpu)
        assert run["type"] == "DistributedType.FSDP" and run["dtensor"] and run["local"] * 2 == run["global"]
    plan = group_plan_at_2
    assert plan.rank_peak_bytes is not None
    for run, planned in zip(runs, plan.rank_peak_bytes):
        assert abs(planned / run["peak"] - 1) < 0.01, (planned, run["peak"])


@pytest.mark.slow
def test_rank_1_out_of_memory_ends_the_trial_on_both_ranks(tiny_model_dir, caplog):
    from autobatch.trial import GroupProber

    model = tiny_model_dir("llama")
    config = _config(model, device="cpu", memory_budget="1GiB", nproc_per_node=2)
    # rank 1's device holds 12 MB: micro-batch 2 (about 20 MB a rank) runs out there and nowhere else
    # The stated bound: rank 0, left waiting in a collective, is ended by the launcher once rank 1 exits
    # (launch.GRACE_S); past the trial timeout run_trial would raise a timeout WorkerError, not report an OOM.
    prober = GroupProber(config, "cpu", [10**9, 12 * 10**6], [10**9, 12 * 10**6], None, timeout_s=120)
    with caplog.at_level("INFO", logger="autobatch.sharding"):
        trial = prober.run_trial(2)
    assert trial.oom and not trial.fits
    assert trial.rank_peak_bytes[1] > 12 * 10**6
    assert prober.failures == ["micro-batch 2: rank 1 of 2 ran out of memory; the trial was ended on every rank"]
    assert prober.run_trial(1).fits  # the next trial is a fresh group: nothing of the last one is left


def _fsdp_flags(model, dataset, budget: str = "24MiB") -> list[str]:
    """`autobatch plan` of an FSDP2 job of the tiny Llama on two ranks, searching (no micro-batch given)."""
    return ["--model", str(model), "--dataset", str(dataset), "--device", "cpu", "--memory-budget", budget,
            "--headroom", "0", "--max-length", "64", "--fsdp", "full_shard auto_wrap", "--fsdp-config",
            "{fsdp_version: 2}", "--gradient-checkpointing", "false", "--effective-batch-size", "8", "--no-cache"]


@pytest.fixture(scope="module")
def fsdp_plan(tiny_model_dir, tiny_dataset_file, tmp_path_factory):
    """`autobatch plan --nproc-per-node 2` of that job at micro-batch 2, from a shell: (its --json, its plan.yaml).
    One group trial, shared by the tests that run the plan and that compare it with a launcher's."""
    from helpers import call

    path = tmp_path_factory.mktemp("fsdp-plan") / "plan.yaml"
    done = call(["plan", *_fsdp_flags(tiny_model_dir("llama"), tiny_dataset_file), "--nproc-per-node", "2",
                 "--micro-batch-size", "2", "--output", str(path), "--json"])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), path


_SMALLER_RANK = textwrap.dedent("""
    # `autobatch run` where rank 1's device is smaller than the plan's budget: a real OOM mid-run there alone
    # (the plan file itself cannot be edited: --plan refuses a changed batch).
    import os, sys
    from autobatch import train
    from autobatch.cli import main

    planned = train._run_backend

    def smaller(config, plan):
        backend = planned(config, plan)
        if os.environ.get("RANK") == "1":
            backend.budget_bytes = 12 * 10**6
        return backend

    train._run_backend = smaller
    sys.exit(main(sys.argv[1:]))
""")


def _torchrun_run(plan, out_dir, script=None):
    from helpers import AUTOBATCH, TORCHRUN

    return subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", "--standalone", str(script or AUTOBATCH), "run", "--plan", str(plan),
         "--config", str(plan), "--device", "cpu", "--max-steps", "2", "--output-dir", str(out_dir)],
        check=False, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_plan_yaml_carries_fsdp_and_torchrun_trains_it_then_a_mid_run_oom_stops_every_rank(fsdp_plan, tmp_path):
    import yaml

    _, plan = fsdp_plan
    body = yaml.safe_load(plan.read_text())
    assert (body["fsdp"], body["fsdp_config"]) == ("full_shard auto_wrap", {"fsdp_version": 2})
    assert body["per_device_train_batch_size"] * body["gradient_accumulation_steps"] * 2 == 8
    done = _torchrun_run(plan, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 2
    script = tmp_path / "smaller_rank.py"
    script.write_text(_SMALLER_RANK)
    stopped = _torchrun_run(plan, tmp_path / "oom", script)
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("autobatch: error:")]
    assert stopped.returncode != 0  # torchrun ended rank 0 once rank 1 exited: no hang
    oom = ("autobatch: error: out of memory at step 0 on rank 1 of 2 (micro-batch 2): the ranks cannot split one "
           "step together inside DDP or FSDP, so the run stops; resume from the last checkpoint with --resume after "
           "planning with a smaller --memory-budget or per_device_train_batch_size")  # as --config plan.yaml has it
    peer = "autobatch: error: rank 0 of 2 stopped: another rank left the run (its own line says why)"
    # one line a rank: rank 1 names the OOM; rank 0, if it lives to print before torchrun ends it, says why it stopped
    assert errors.count(oom) == 1 and set(errors) <= {oom, peer}, errors


@pytest.mark.slow
def test_under_torchrun_rank_0_plans_as_a_shell_would_and_every_rank_gets_the_plan(
    tiny_model_dir, tiny_dataset_file, fsdp_plan
):
    """`torchrun --nproc_per_node 2 autobatch plan` with fsdp: rank 0 launches the trial groups (the launcher's ranks
    cannot share one group's trials), the other rank waits, and the plan is the one `--nproc-per-node 2` makes.

    The micro-batch is given: one trial, one group of two processes (each ~10 s of CPU to start torch and TRL).
    Choosing the next size to try is the planner's, the same under a launcher as from a shell (test_probe.py)."""
    from helpers import AUTOBATCH, TORCHRUN, error_lines

    flags = _fsdp_flags(tiny_model_dir("llama"), tiny_dataset_file)
    launched = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--standalone", str(AUTOBATCH), "plan", *flags,
                               "--micro-batch-size", "2", "--json"],
                              check=False, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-3000:]
    under_launcher = json.loads(launched.stdout)  # rank 0 alone prints
    from_shell, _ = fsdp_plan
    # what the measurements decide (which split is fastest among sizes that fit is timing, and noise on a busy machine)
    def measured(plan: dict) -> tuple:
        trials = {t["micro_batch_size"]: t["fits"] for t in plan["trials"]}
        return plan["world_size"], plan["effective_batch_size"], plan["max_micro_batch_size"], trials

    def peaks(plan: dict) -> dict:
        return {t["micro_batch_size"]: t["rank_peak_bytes"] for t in plan["trials"]}

    assert measured(under_launcher) == measured(from_shell)
    # and each rank's peak, to a few bytes: seen once in CI, rank 1 at micro 2 counted 20 B (of 21 MB) more in one
    for micro, launched_peaks in peaks(under_launcher).items():
        assert launched_peaks == pytest.approx(peaks(from_shell)[micro], abs=1024), micro
    assert under_launcher["max_micro_batch_size"] == 2 and len(under_launcher["rank_peak_bytes"]) == 2
    small = _fsdp_flags(tiny_model_dir("llama"), tiny_dataset_file, "4MiB")  # micro-batch 1 does not fit: rank 0's
    # refusal is every rank's
    refused = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--standalone", str(AUTOBATCH), "plan", *small],
                             check=False, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    lines = error_lines(refused.stderr)
    assert refused.returncode != 0 and len(lines) == 1 and "micro-batch 1 needs" in lines[0], refused.stderr[-2000:]


def test_environment_kept_undoes_what_a_trainer_writes_for_accelerate(monkeypatch):
    """TrainingArguments with `fsdp` sets ACCELERATE_USE_FSDP: left behind, the next plan in the process would
    be refused as an FSDP1 job (seen: 17 tests after one in-process FSDP estimate)."""
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with sharding.environment_kept():
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_STATE_DICT_TYPE"] = "SHARDED_STATE_DICT"
        assert sharding.fsdp_requested({})
    assert "ACCELERATE_USE_FSDP" not in os.environ and not sharding.fsdp_requested({})
    assert os.environ["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"


def test_a_sweep_of_an_fsdp_job_is_refused_with_one_line(tiny_model_dir, tiny_dataset_file, tmp_path, capsys):
    from helpers import error_lines

    from autobatch.cli import main

    code = main(["sweep", "--model", str(tiny_model_dir("llama")), "--dataset", str(tiny_dataset_file), "--device",
                 "cpu", "--memory-budget", "24MiB", "--fsdp", "full_shard auto_wrap", "--fsdp-config",
                 "{fsdp_version: 2}", "--nproc-per-node", "2", "--effective-batch-sizes", "4,8", "--no-cache",
                 "--output-dir", str(tmp_path / "sweep")])
    lines = error_lines(capsys.readouterr().err)
    said = ("autobatch: error: sweep does not plan FSDP jobs yet: plan each effective batch with autobatch plan "
            "instead (--nproc-per-node N, --effective-batch-size B, the same --fsdp settings)")
    assert code == 2 and lines == [said]
    assert not (tmp_path / "sweep").exists()
