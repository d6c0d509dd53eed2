"""benchmarks/throughput.py keeps working: its quick cpu run gives a consistent report (structure, not timings)."""

import json

import pytest
from helpers import ROOT, run_script


@pytest.mark.slow
def test_the_throughput_benchmark_compares_the_seed_with_the_plan():
    out = run_script(ROOT / "benchmarks" / "throughput.py", "--quick", "--json")  # each case in its own process
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    job, choice, rows = result["job"], result["checkpointing_choice"], result["rows"]
    assert job["effective_batch_size"] == 32 and result["device"] == "cpu" and result["peak_flops"] is None
    names = [r["name"] for r in rows]
    assert names[0] == "seed 4 × 8, checkpointing on (TRL default)"
    assert sum(name.startswith("seed 4 × 8") for name in names) == (1 if choice["activation_checkpointing"] else 2)
    planned = [r for r in rows if r["name"].startswith("plan ")]
    assert planned and len({(r["micro"], r["accumulation"]) for r in planned}) == 1
    assert [r["checkpointing"] for r in planned][-1] is choice["activation_checkpointing"]
    for row in rows:
        assert row["micro"] * row["accumulation"] == row["effective_batch_size"] == 32
        assert row["steps_timed"] == job["steps"] - job["warmup_steps"]
        assert row["samples_per_s"] == pytest.approx(32 / row["step_s"])
        assert row["tokens_per_s"] > row["samples_per_s"] > 0 and row["mfu"] is None
        assert row["vs_seed"] == pytest.approx(row["samples_per_s"] / rows[0]["samples_per_s"])
