"""One rank of an FSDP trial group: `python -m autobatch.fsdp_worker SPEC RESULT`, started by
`trial.GroupProber` through autobatch.launch with the launcher's variables set.

The rank joins a gloo group with a short timeout, builds the workload with the run's FSDP sharding, runs one
trial and writes its own report (rank, trial, shape) to the group's report dir before it exits. A rank that
runs out of memory exits with the error, and the launcher ends the other ranks at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from autobatch import sharding
from autobatch.config import Config
from autobatch.launch import free_port, worker_main


def run(spec: dict) -> dict:
    import torch  # the torch boundary: memory and trial import torch

    from autobatch.memory import make_backend
    from autobatch.trial import Prober

    if "WORLD_SIZE" not in os.environ:  # a group of one (launch sets these for two or more): FSDP still needs them
        os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    rank = int(os.environ.get("RANK", "0"))
    config = Config(**spec["config"])
    backend = make_backend(spec["device"], spec["budgets"][rank])
    if backend.device == "cuda":
        backend.cap_bytes = spec["usables"][rank]
    sharding.init_short_group(spec["group_timeout_s"])
    with sharding.fsdp_on_cpu():
        prober = Prober(config, backend, spec["usables"][rank], spec["per_device"], sharded=True)
        try:
            trial = prober.run_trial(spec["micro_batch_size"])
        finally:
            prober.close()
    report = {"rank": rank, "trial": trial.to_dict(), "max_length": prober.max_length, "padded": prober.padded,
              "precision": prober.precision}
    path = Path(spec["report_dir"]) / f"rank-{rank}.json"
    path.with_suffix(".partial").write_text(json.dumps(report))
    path.with_suffix(".partial").replace(path)
    if trial.oom:  # exit at once: a peer left in the next collective is ended by the launcher
        raise torch.OutOfMemoryError(f"rank {rank} ran out of memory at micro-batch {spec['micro_batch_size']}")
    return report


if __name__ == "__main__":
    worker_main(run)
