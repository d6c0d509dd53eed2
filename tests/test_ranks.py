"""Several ranks, one plan: launcher variables, per-rank budgets, and real two-process runs (gloo on cpu)."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import AUTOBATCH, TORCHRUN, MiB

from autobatch import ranks
from autobatch.config import build_config
from autobatch.errors import ConfigError
from autobatch.sharding import check_shardable

needs_torchrun = pytest.mark.skipif(TORCHRUN is None or AUTOBATCH is None, reason="torchrun/autobatch not found")


def launcher(monkeypatch, world: int, rank: int, local_rank: int | None = None) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank if local_rank is None else local_rank))


def test_ranks_come_from_the_launcher_environment(monkeypatch):
    for name in ranks.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert ranks.current() == ranks.Ranks(1, 0, 0) and ranks.is_main()
    launcher(monkeypatch, 8, 5, 1)
    assert ranks.current() == ranks.Ranks(8, 5, 1) and not ranks.is_main()


@pytest.mark.parametrize("rank, expected", [(0, 160 * MiB), (1, 100 * MiB)])
def test_memory_budget_takes_one_value_per_rank(monkeypatch, rank, expected):
    launcher(monkeypatch, 2, rank)
    assert build_config(overrides={"memory_budget": "160MiB,100MiB"}).memory_budget_bytes == expected


def test_memory_budget_with_a_value_count_other_than_the_world_size_is_refused(monkeypatch):
    launcher(monkeypatch, 2, 0)
    with pytest.raises(ConfigError, match=r"--memory-budget has 3 values but the world size is 2"):
        build_config(overrides={"memory_budget": "1GiB,2GiB,3GiB"}, names={"memory_budget": "--memory-budget"})


def test_local_only_hides_the_launcher_from_the_trainer_but_not_from_us(monkeypatch):
    launcher(monkeypatch, 2, 1)
    with ranks.local_only():
        assert "WORLD_SIZE" not in os.environ and "LOCAL_RANK" not in os.environ
        assert ranks.current() == ranks.Ranks(2, 1, 1)  # rank 1 still prints nothing
        from accelerate.state import PartialState

        assert PartialState(cpu=True).num_processes == 1
    assert os.environ["WORLD_SIZE"] == "2" and os.environ["RANK"] == "1"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"deepspeed": "ds.json"}, r"deepspeed: DeepSpeed ZeRO is not supported .* use FSDP instead"),
    ({"fsdp": "full_shard auto_wrap"}, r"FSDP2 only .* fsdp_config: \{fsdp_version: 2\}"),
    ({"fsdp_config": {"fsdp_version": 2}}, r"fsdp_config without fsdp"),
])
def test_deepspeed_and_fsdp1_are_refused(overrides, message):
    config = build_config(overrides=overrides)
    with pytest.raises(ConfigError, match=message):
        check_shardable(config.training_args)


def test_fsdp2_is_accepted():
    config = build_config(overrides={"fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_version": 2}})
    check_shardable(config.training_args)


_LOCKSTEP = textwrap.dedent("""
    import json, pathlib, sys, time
    from autobatch import ranks
    from autobatch.planner import Trial, search_max_micro_batch

    me = ranks.current().rank
    ranks.init_group("cpu")
    usable = 100 if me == 0 else 60  # rank 1's device is smaller: 7 fits rank 0 but is an OOM on rank 1
    seen = []

    def local(size):
        time.sleep(0.2 * me)  # ranks reach each agreement at different times
        oom = 10 * size > usable
        return Trial(size, min(10 * size, usable + 1), fits=not oom, seconds_per_micro_batch=0.01 * (me + 1), oom=oom)

    def probe(size):
        trial = ranks.agree(local(size))
        seen.append([size, trial.fits])
        return trial

    result = search_max_micro_batch(probe, ranks.smallest(usable), 512)
    report = {"rank": me, "max": result.max_micro_batch_size, "trials": seen}
    (pathlib.Path(sys.argv[1]) / f"rank{me}.json").write_text(json.dumps(report))  # two ranks share one stdout
""")


@needs_torchrun
def test_one_rank_ooms_in_a_trial_the_other_passes_and_both_move_on_together(tmp_path):
    script = tmp_path / "lockstep.py"
    script.write_text(_LOCKSTEP)
    out = subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", "--standalone", str(script), str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    reports = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert reports[0]["max"] == reports[1]["max"] == 6
    assert reports[0]["trials"] == reports[1]["trials"]  # one search path
    assert [7, False] in reports[0]["trials"]  # rank 0 fit 7 alone; rank 1's OOM was everyone's


@needs_torchrun
def test_target_not_divisible_by_the_world_size_fails_fast_on_every_rank(tiny_model_dir, tmp_path):
    started = time.perf_counter()
    out = subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", "--standalone", AUTOBATCH, "run", "--model",
         str(tiny_model_dir("llama")), "--device", "cpu", "--effective-batch-size", "15", "--output-dir",
         str(tmp_path / "out")],
        check=False, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - started
    message = "autobatch: error: --effective-batch-size 15 is not a multiple of world size 2: use 14 or 16"
    assert out.returncode != 0
    # torchrun stops the other rank as soon as one exits, so it may not live to print the refusal (it then says
    # it was stopped, as a user's SIGTERM is told); each rank computes the refusal alone from the launcher's
    # environment (checked below, rank by rank)
    stopped = "autobatch: error: stopped by SIGTERM before training started: nothing was trained"
    errors = [line for line in out.stderr.splitlines() if line.startswith("autobatch: error:")]
    assert message in errors and set(errors) <= {message, stopped}, out.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    assert elapsed < 60
    for rank in ("0", "1"):
        alone = subprocess.run(
            [AUTOBATCH, "run", "--model", str(tiny_model_dir("llama")), "--device", "cpu", "--effective-batch-size",
             "15", "--output-dir", str(tmp_path / "out")],
            check=False, capture_output=True, text=True, timeout=120,
            env={**os.environ, "WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank},
        )
        assert alone.returncode == 2 and message in alone.stderr, alone.stderr[-2000:]


@pytest.mark.slow
@needs_torchrun
def test_torchrun_two_ranks_run_on_the_smaller_ranks_micro_batch(tiny_model_dir, tiny_dataset_file, tmp_path):
    """The must-show: 160MiB and 100MiB ranks, effective batch 16 = micro × accumulation × 2, one set of files."""
    out_dir = tmp_path / "out"
    out = subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", "--standalone", AUTOBATCH, "run", "--model",
         str(tiny_model_dir("llama")), "--dataset", str(tiny_dataset_file), "--device", "cpu",
         "--memory-budget", "160MiB,100MiB", "--headroom", "0", "--max-length", "128",
         "--effective-batch-size", "16", "--max-steps", "3", "--output-dir", str(out_dir), "--gns"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads((out_dir / "plan.json").read_text())
    micro, accumulation = plan["per_device_train_batch_size"], plan["gradient_accumulation_steps"]
    assert micro * accumulation * 2 == 16 and plan["world_size"] == 2
    assert plan["memory_budget_bytes"] == 160 * MiB  # rank 0 wrote it ...
    trials = {t["micro_batch_size"]: t for t in plan["trials"]}
    limit = plan["max_micro_batch_size"]
    # ... but the limit is the 100MiB rank's: the next size ran out of memory there, not on rank 0
    assert trials[limit]["fits"] and trials[limit]["peak_memory_bytes"] <= 100 * MiB
    assert trials[limit + 1]["oom"] and 100 * MiB < trials[limit + 1]["peak_memory_bytes"] < 160 * MiB
    assert out.stdout.count(f"micro-batch {micro} × accumulation {accumulation} × world size 2 = effective "
                            "batch 16") == 1  # only rank 0 reports
    assert f"trained 3 steps, micro-batch {micro} × accumulation {accumulation} = effective 16" in out.stdout
    assert "OOM survived" not in out.stdout and "out of memory" not in out.stderr
    state = json.loads((out_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["train_batch_size"] == micro
    noise = json.loads((out_dir / "gns.json").read_text())  # rank-local micro-batch against the global batch
    assert noise["steps"] == 3 and noise["unit"] == "sequences"
    print(out.stdout)


def test_an_oom_mid_run_under_several_ranks_stops_with_one_line_not_a_split():
    import torch

    from autobatch.errors import AutobatchError
    from autobatch.train import _stop_if_ranks

    batch = {"input_ids": torch.zeros(4, 8, dtype=torch.long)}
    assert _stop_if_ranks(1, 5, batch) is None  # one process: the split fallback goes ahead
    with pytest.raises(AutobatchError, match=r"out of memory at step 5 on rank \d of 2 \(micro-batch 4\): .*`resume`"):
        _stop_if_ranks(2, 5, batch)


_MID_RUN_OOM = textwrap.dedent("""
    import sys
    import torch
    from transformers import TrainerCallback
    from autobatch import ranks, train
    from autobatch.config import build_config
    from autobatch.probe import make_plan

    model, data, out = sys.argv[1:4]
    config = build_config(overrides={
        "model_name_or_path": model, "dataset_name": data, "device": "cpu", "memory_budget": "160MiB",
        "headroom": 0, "max_length": 64, "effective_batch_size": 8, "max_micro_batch_size": 4, "max_steps": 4,
        "output_dir": out, "save_strategy": "no", "gradient_checkpointing": False,
    })
    plan = make_plan(config)
    peak_1 = next(t.peak_memory_bytes for t in plan.trials if t.micro_batch_size == 1)
    held = []

    class Ballast(TrainerCallback):  # rank 1 alone loses memory at step 2: its next step runs out
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2 and ranks.current().rank == 1 and not held:
                held.append(torch.empty(plan.usable_memory_bytes - peak_1, dtype=torch.uint8))

    train.run(config, plan, callbacks=[Ballast()])
""")


@pytest.mark.slow
@needs_torchrun
def test_an_oom_on_one_rank_mid_run_stops_every_rank_without_a_hang(tiny_model_dir, tiny_dataset_file, tmp_path):
    script = tmp_path / "mid_run_oom.py"
    script.write_text(_MID_RUN_OOM)
    out = subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", "--standalone", str(script), str(tiny_model_dir("llama")),
         str(tiny_dataset_file), str(tmp_path / "out")],
        check=False, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert out.returncode != 0  # bounded by the timeout: the launcher stopped the rank left waiting
    assert "out of memory at step 2 on rank 1 of 2" in out.stderr, out.stderr[-3000:]


LINGER = """
import sys, time
from autobatch import ranks
from autobatch.config import build_config

config = build_config(overrides={"ddp_timeout": int(sys.argv[1])})
ranks.init_group("cpu", ranks.group_timeout_s(config, "cpu"))
if ranks.current().rank == 1:
    time.sleep(300)  # alive after its peer failed, never joining the collective
else:
    try:
        ranks.smallest(1)  # an all-reduce rank 1 never joins
    except Exception as exc:  # gloo's timeout
        print("ended by", type(exc).__name__, flush=True)
        sys.exit(3)
"""


def test_a_lingering_rank_ends_its_peer_within_the_group_timeout(tmp_path):
    """issue 23 (ranks): with use_cpu the Trainer's group had gloo's 30-minute default (150 s blocked, measured);
    autobatch makes the group first with ddp_timeout (CPU_GROUP_TIMEOUT_S by default): here 3 s."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", LINGER, "3"], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=120)  # far below the 30 minutes it blocked for before
        assert procs[0].returncode == 3 and "ended by" in out and "AttributeError" not in out, (out, err)
        assert procs[1].poll() is None, "the peer ended because the lingering rank was still alive, not after it"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
