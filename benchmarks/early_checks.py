"""How long bad input takes to be refused (issue 24: a typo took 26-94 s, a wrong --model 104 s).

Runs each bad command in a fresh interpreter and prints its wall time, exit code, whether torch was imported
and the error line. `taskset -c 0 python benchmarks/early_checks.py` beside a busy loop on core 0 shows it
under load.

    python benchmarks/early_checks.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = ("import sys\nfrom autobatch import cli\nrc = cli.main(sys.argv[1:])\n"
         "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\nsys.exit(rc)\n")


def cases(scratch: Path) -> list[list[str]]:
    return [
        ["plan", "--effective-batch-szie", "8"],
        ["plan", "--memory-budjet", "300MiB"],
        ["plan", "--max-lenght", "32"],
        ["run", "--model", str(scratch / "no-model")],
        ["plan", "--model", "someone/not-downloaded"],
        ["plan", "--learning-rate", "fast"],
        ["plan", "--output", "/proc/plan.yaml"],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the slowest is printed")
    options = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as scratch:
        for argv in cases(Path(scratch)):
            slowest, result = 0.0, None
            for _ in range(options.repeat):
                started = time.perf_counter()
                result = subprocess.run([sys.executable, "-c", CHILD, *argv], check=False, capture_output=True,
                                        text=True, env=env)
                slowest = max(slowest, time.perf_counter() - started)
            error = (result.stderr.strip().splitlines() or ["(no error)"])[-1]
            torch = result.stdout.strip().splitlines()[-1]
            print(f"{slowest:6.2f} s  exit {result.returncode}  {torch:<18}  autobatch {' '.join(argv)}")
            print(f"          {error}")


if __name__ == "__main__":
    main()
