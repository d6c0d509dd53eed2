"""The output dir of `autobatch run`, checked before any probing: an earlier run there, its checkpoints, what
`--resume` can continue from, and the eval data evaluation needs. No torch here, so a command that cannot
run is refused in well under a second rather than after the torch import and minutes of probing.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from autobatch import ranks, sharding
from autobatch.config import Config
from autobatch.errors import ConfigError

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
STATE_FILE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME: written last into a checkpoint
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR + "-" + step

def check_output_dir(config: Config) -> Path:
    """The output dir, checked before any probing: its nearest existing ancestor must be a writable dir."""
    out = config.training_args.get("output_dir") or "autobatch-out"
    path = Path(out).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {out}: {existing} is not a writable directory; pass --output-dir with one")
    return path


def earlier_run_files(path: Path) -> list[str]:
    """What in `path` belongs to an earlier run: its checkpoint-N folders and plan.json (sorted names)."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if CHECKPOINT_NAME.match(p.name) or p.name == PLAN_FILE)


def check_output_dir_state(config: Config, resume: bool, overwrite: bool) -> None:
    """Refuse a dir holding an earlier run unless --resume or --overwrite-output-dir; delete nothing."""
    path = check_output_dir(config)
    found = earlier_run_files(path)
    if found and not (resume or overwrite):
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ConfigError(
            f"output_dir {path} holds an earlier run ({shown}): pass --resume to continue it, "
            "--overwrite-output-dir to train over it, or choose another --output-dir; nothing was changed"
        )


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """checkpoint-N folders holding trainer_state.json (the Trainer writes it last), newest first."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in path.iterdir()
             if (m := CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True) if (p / STATE_FILE).is_file()]


def resume_checkpoint(config: Config, warn: bool = True) -> Path:
    """The newest complete checkpoint to resume from, checked before any probing.

    A newer folder without trainer_state.json was cut mid-save: it is skipped with a warning.
    """
    path = check_output_dir(config)
    complete = complete_checkpoints(path)
    newest = complete[0] if complete else None
    folders = path.iterdir() if path.is_dir() else []
    cut = [p.name for p in folders if CHECKPOINT_NAME.match(p.name) and p not in complete]
    for name in sorted(cut, key=lambda n: int(n.split("-")[1])):
        if warn and (newest is None or int(name.split("-")[1]) > int(newest.name.split("-")[1])):
            logger.warning("--resume: skipping %s: no %s, it was cut mid-save", path / name, STATE_FILE)
    if newest is None:
        what = f"only incomplete ones ({', '.join(sorted(cut))})" if cut else "none"
        raise ConfigError(
            f"--resume: no complete checkpoint in {path} ({what}); run without --resume to start training"
        )
    return newest


def check_can_run(config: Config, resume: bool = False, overwrite: bool = False) -> None:
    """What makes a run fail, checked before minutes of probing rather than after: the device, the output
    dir (writable; an earlier run there only with --resume or --overwrite-output-dir), a checkpoint for
    --resume, and the eval split evaluation needs."""
    if config.device == "estimate":
        raise ConfigError(
            "--device estimate only plans (fake tensors cannot train): plan with it and --output plan.yaml, "
            "then autobatch run --plan plan.yaml --device cuda"
        )
    if config.training_args.get("auto_find_batch_size"):
        raise ConfigError(
            "auto_find_batch_size: it restarts training at a smaller batch and fights the plan (autobatch's "
            "own OOM fallback keeps the effective batch); set auto_find_batch_size false or remove it"
        )
    sharding.check_shardable(config.training_args)
    if (config.nproc_per_node or 1) > 1 and not ranks.current().launched:
        raise ConfigError(
            f"--nproc-per-node {config.nproc_per_node}: autobatch run trains under your launcher: plan with "
            f"autobatch plan --nproc-per-node {config.nproc_per_node} --output plan.yaml, then torchrun "
            f"--nproc-per-node {config.nproc_per_node} -m autobatch run --plan plan.yaml (or accelerate launch "
            "with trl sft --config plan.yaml)"
        )
    check_output_dir_state(config, resume, overwrite)
    if resume:
        resume_checkpoint(config)
    check_eval_split(config)


def check_eval_split(config: Config) -> None:
    """Evaluation needs eval data (a split or a fraction; a local file's single split is checked in config)."""
    args = config.training_args
    strategy = args.get("eval_strategy", args.get("evaluation_strategy", "no"))
    if strategy not in ("no", None) and not (config.dataset_test_split or config.eval_fraction):
        raise ConfigError(
            f"eval_strategy {strategy!r} needs eval data: pass --dataset-test-split SPLIT or "
            "--eval-fraction 0.1, or --eval-strategy no"
        )
