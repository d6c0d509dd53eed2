"""One trial in a process of its own: `python -m autobatch.trial_worker SPEC RESULT`, started by autobatch.launch.

The worker builds the workload from the config as the planning process would, runs one `Prober.run_trial`
on a backend with the parent's budget and allocator cap, and writes the trial back. Nothing ran on the
device before it in this process, so on a GPU its peak is what a fresh `trl sft` run meets at that size
(on an H200 within 0.7% of plain TRL, issue 19), and whatever the trial does to the process (a CUDA
error, a crash, a hang) ends with it.
"""

from __future__ import annotations

from autobatch.config import Config
from autobatch.launch import worker_main
from autobatch.memory import make_backend
from autobatch.trial import Prober


def run(spec: dict) -> dict:
    """The trial `spec` names (see `trial.FreshTrials.spec`), as a dict."""
    config = Config(**spec["config"])
    backend = make_backend(spec["device"], spec["budget_bytes"])
    if backend.device == "cuda":
        backend.cap_bytes = spec["usable_bytes"]  # the allocator refuses past the usable budget, as in the search
    prober = Prober(config, backend, spec["usable_bytes"], spec["per_device"], ddp=spec["ddp"])
    try:
        trial = prober.run_trial(spec["micro_batch_size"], eval_batch_size=spec["eval_batch_size"])
    finally:
        prober.close()
    return {"trial": trial.to_dict()}


if __name__ == "__main__":
    worker_main(run)
