"""benchmarks/throughput.py keeps working: its quick cpu run gives a consistent report (structure, not timings)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_throughput_benchmark_compares_the_seed_with_the_plan():
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--json"], check=False, capture_output=True,
                         text=True, timeout=1200)
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
