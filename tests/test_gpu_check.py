"""benchmarks/gpu_check.py keeps working: its cpu mode (tiny sizes) runs every check a CPU can run."""

import json

import pytest
from helpers import ROOT, run_script

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_passes_on_cpu(tmp_path):
    out = run_script(SCRIPT, "--device", "cpu", "--out", str(tmp_path))  # its checks start their own processes
    assert out.returncode == 0, out.stderr[-3000:]
    [result] = tmp_path.glob("gpu_check-cpu-*.json")
    checks = {c["check"]: c["passed"] for c in json.loads(result.read_text())["checks"]}
    assert checks["TRL alone, allocator capped: max trains, max + 1 OOMs"] is True
    assert checks["plan's peak vs plain TRL's fresh peak at the planned size: within 1%, safe side"] is True
    assert checks["real OOM mid-run (ballast at step 2): fallback, run finishes"] is True
    assert checks["sweep --validate-tokens: rungs exact, runs on the device, noise scale measured"] is True
    assert checks["FSDP, world size 1: planned, then trained at the planned size under torchrun"] is True
    assert list(checks.values()).count(True) == 6 and list(checks.values()).count(None) == 3
    assert (tmp_path / result.name.replace(".json", ".md")).read_text().count("| pass |") == 6
