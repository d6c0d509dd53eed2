"""The output dir of `autobatch run`, checked before any probing: an earlier run there, its checkpoints, what
`--resume` can continue from, and the eval data evaluation needs. No torch here, so a command that cannot
run is refused in well under a second rather than after the torch import and minutes of probing.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from autobatch import __version__, ranks, sharding
from autobatch.builtin import is_builtin_model_path
from autobatch.config import Config, eval_strategy, write_atomic
from autobatch.errors import ConfigError

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
#: Written by `autobatch run` into the output dir it trains in: what autobatch may later resume, overwrite or
#: delete there is known by this file, not by name patterns (a model's own folder has config.json too).
MARKER_FILE = ".autobatch-run"
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
        raise ConfigError(f"output_dir {out}: {existing} is not a writable directory; pass output_dir with one",
                          keys=("output_dir",))
    return path


def earlier_run_files(path: Path) -> list[str]:
    """What in `path` belongs to an earlier run: its checkpoint-N folders and plan.json (sorted names)."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if CHECKPOINT_NAME.match(p.name) or p.name == PLAN_FILE)


def is_run_dir(path: Path) -> bool:
    """Whether autobatch claimed `path` for a run (its marker file is there)."""
    return (path / MARKER_FILE).is_file()


def claim_output_dir(path: Path) -> None:
    """Create the output dir and mark it as autobatch's, before anything is written into it."""
    path.mkdir(parents=True, exist_ok=True)
    if not is_run_dir(path):
        write_atomic(path / MARKER_FILE, json.dumps({"written_by": "autobatch run", "version": __version__}) + "\n")


def foreign_files(path: Path) -> list[str]:
    """The entries of an existing output dir that autobatch did not write: all of them, unless it holds the marker."""
    if not path.is_dir() or is_run_dir(path):
        return []
    return sorted(p.name for p in path.iterdir())


def check_output_dir_state(config: Config, resume: bool, overwrite: bool) -> None:
    """Refuse a dir autobatch did not claim (a model's folder, anyone's files) whatever the flags, and one
    holding an earlier run unless --resume or --overwrite-output-dir; delete nothing."""
    path = check_output_dir(config)
    foreign = foreign_files(path)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        model = config.model_name_or_path
        whose = (" (it is the model_name_or_path folder: the final save would overwrite the model)"
                 if model and os.path.isdir(os.path.expanduser(model)) and path.resolve() ==
                 Path(model).expanduser().resolve() else "")
        raise ConfigError(
            f"output_dir {path} holds files autobatch did not write ({shown}){whose}: choose a new or empty "
            f"output_dir; nothing was changed", keys=("output_dir", "model_name_or_path")
        )
    found = earlier_run_files(path)
    if found and not (resume or overwrite):
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ConfigError(
            f"output_dir {path} holds an earlier run ({shown}): pass `resume` to continue it, "
            "`overwrite` to train over it, or choose another output_dir; nothing was changed",
            keys=("output_dir", "resume", "overwrite"),
        )


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from (naming the file), or None when it is whole.

    Read without torch: trainer_state.json must be JSON with a global_step (the Trainer writes it last, so a
    folder without it was cut mid-save); every torch save (*.pt, *.pth, *.bin: zip archives) must have its
    central directory; every *.safetensors its header and all the bytes the header promises.
    """
    import zipfile

    state = path / STATE_FILE
    if not state.is_file():
        return f"no {STATE_FILE}, it was cut mid-save"
    try:
        step = json.loads(state.read_text()).get("global_step")
    except (OSError, ValueError, AttributeError) as exc:
        return f"{STATE_FILE} is unreadable ({type(exc).__name__})"
    if not isinstance(step, int):
        return f"{STATE_FILE} has no global_step"
    for file in sorted(path.iterdir()):
        if file.suffix in (".pt", ".pth", ".bin") and file.is_file():
            try:
                with zipfile.ZipFile(file) as archive:
                    archive.infolist()
            except (OSError, zipfile.BadZipFile):
                return f"{file.name} is truncated or corrupt (not a complete torch save)"
        elif file.suffix == ".safetensors" and file.is_file() and not _whole_safetensors(file):
            return f"{file.name} is truncated or corrupt"
    return None


def _whole_safetensors(path: Path) -> bool:
    """The safetensors header parses and the file holds every byte its tensors' offsets name."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size >= 8 + size + end
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoint-N folder, newest first."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in path.iterdir()
             if (m := CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """checkpoint-N folders that are whole (`checkpoint_problem`), newest first."""
    return [p for p in checkpoint_folders(output_dir) if checkpoint_problem(p) is None]


def resume_checkpoint(config: Config, warn: bool = False) -> Path:
    """The newest whole checkpoint to resume from, checked before any probing.

    A newer folder that is not whole (cut mid-save, an empty trainer_state.json, a truncated optimizer.pt) is
    skipped; with `warn` (once, where the run resumes) each is named with its problem.
    """
    path = check_output_dir(config)
    broken: list[str] = []
    for folder in checkpoint_folders(path):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        broken.append(folder.name)
        if warn:
            logger.warning("`resume`: skipping %s: %s", folder, problem, extra={"keys": ("resume",)})
    if broken:
        raise ConfigError(
            f"`resume`: no complete checkpoint in {path}, only incomplete ones ({', '.join(reversed(broken))}): "
            "pass `overwrite` instead of `resume` to start over (they are removed), or choose another output_dir",
            keys=("resume", "overwrite", "output_dir"),
        )
    raise ConfigError(f"`resume`: no complete checkpoint in {path} (none); run without `resume` to start training",
                      keys=("resume",))


def check_can_run(config: Config, resume: bool = False, overwrite: bool = False) -> None:
    """What makes a run fail, checked before minutes of probing rather than after: the device, training data,
    the output dir (writable; an earlier run there only with --resume or --overwrite-output-dir), a checkpoint for
    --resume, and the eval split evaluation needs."""
    if config.device == "estimate":
        raise ConfigError(
            "device estimate only plans (fake tensors cannot train): plan with it and save the plan (autobatch "
            "plan --output plan.yaml), then train that on cuda (autobatch run --plan plan.yaml --device cuda)",
            keys=("device",),
        )
    if config.training_args.get("auto_find_batch_size"):
        raise ConfigError(
            "auto_find_batch_size: it restarts training at a smaller batch and fights the plan (autobatch's "
            "own OOM fallback keeps the effective batch); set auto_find_batch_size false or remove it"
        )
    check_training_data(config)
    sharding.check_shardable(config.training_args)
    if (config.nproc_per_node or 1) > 1 and not ranks.current().launched:
        raise ConfigError(
            f"nproc_per_node {config.nproc_per_node}: autobatch run trains under your launcher: plan with "
            f"autobatch plan --nproc-per-node {config.nproc_per_node} --output plan.yaml, then torchrun "
            f"--nproc-per-node {config.nproc_per_node} -m autobatch run --plan plan.yaml (or accelerate launch "
            "with trl sft --config plan.yaml)", keys=("nproc_per_node",)
        )
    check_output_dir_state(config, resume, overwrite)
    if resume:
        resume_checkpoint(config)
    check_eval_split(config)


def check_training_data(config: Config) -> None:
    """A model of the user's needs --dataset (the built-in model trains on its built-in sample): before probing."""
    model = config.model_name_or_path
    if config.dataset_name is None and model is not None and not is_builtin_model_path(model):
        raise ConfigError("run needs training data: pass dataset_name (a hub name or a local json/jsonl/csv file)",
                          keys=("dataset_name",))


def check_eval_split(config: Config) -> None:
    """Evaluation needs eval data (a split or a fraction; a local file's single split is checked in config)."""
    strategy = eval_strategy(config)
    if strategy != "no" and not (config.dataset_test_split or config.eval_fraction):
        raise ConfigError(
            f"eval_strategy {strategy!r} needs eval data: pass --dataset-test-split SPLIT or "
            "--eval-fraction 0.1, or --eval-strategy no"
        )
