"""Shared fixtures: tiny models built from configs and a tiny local dataset; nothing touches the hub.

xdist-safe: every cache and file a test writes lives under tmp_path_factory, which pytest-xdist gives each
worker its own of; helpers shared by test modules are in helpers.py."""

import json
import os

import pytest

from autobatch.builtin import save_tiny_model  # light: torch and transformers load inside its functions

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any test imports huggingface_hub, which reads it once
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the Rust tokenizer
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # pytest-xdist workers share the cores: one thread each (set before torch is imported, which reads it
    # once), or two workers on two cores each start two threads and every step waits on the other's.
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = "1"

_PROSE = (
    "The river ran low that summer, and the stones of the old ford showed above the water for the first "
    "time in years. Children crossed on them to the far bank, where the blackberries grew thick along the "
    "hedge. In the evenings the farmers walked down to look at the river and shook their heads. "
)


@pytest.fixture(scope="session", autouse=True)
def _import_time_objects_frozen():
    """The training stack imported, then its ~400k import-time objects moved out of the collector's reach
    (`gc.freeze`): every `gc.collect` a trial makes, and the cpu device's walk of `gc.get_objects()` for the
    tensors alive when a measurement starts, then look only at what the tests built. That takes a third off
    each in-process trial. What is frozen lives as long as the worker anyway; no model exists yet.

    Its value: the bytes of the tensors the imports made (two int64 scalars today), which the cpu device no
    longer sees in this process but does in a fresh one (`test_fresh` compares the two to the byte)."""
    import gc

    import peft  # noqa: F401
    import torch
    from trl import SFTTrainer  # noqa: F401

    import autobatch.trial  # noqa: F401

    gc.collect()
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                for t in gc.get_objects() if type(t) is torch.Tensor and t.device.type == "cpu"}
    gc.freeze()
    yield sum(storages.values())
    gc.unfreeze()


@pytest.fixture(scope="session", autouse=True)
def _builtin_model_cache(tmp_path_factory):
    """Build the built-in model, which commands without --model use, in a temp dir, not in ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOBATCH_CACHE", str(tmp_path_factory.mktemp("autobatch-cache")))
        yield


@pytest.fixture(scope="module", autouse=True)
def _module_probe_cache(tmp_path_factory):
    """Module-scoped fixtures that plan get a probe cache of their module's, never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache-module")))
        yield


@pytest.fixture(scope="session", autouse=True)
def _one_warm_process_across_probe_caches():
    """Workers of every test share one warm process (autobatch.launch): its key ignores XDG_CACHE_HOME, which each
    test sets below. Only the probe cache (the parent's) and the hub's cache dir (offline here) are read from it."""
    from autobatch import launch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch, "RUN_TIME_VARIABLES", launch.RUN_TIME_VARIABLES | {"XDG_CACHE_HOME"})
        yield


@pytest.fixture(autouse=True)
def _fresh_probe_cache(tmp_path_factory, monkeypatch):
    """Each test its own probe cache (XDG_CACHE_HOME), so no test answers another's trials from it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


@pytest.fixture(autouse=True)
def _accelerate_environment_kept():
    """A trainer given `fsdp` writes accelerate's variables into os.environ (ACCELERATE_USE_FSDP, FSDP_*): an
    in-process run of one would make every later test in this worker an FSDP job."""
    from autobatch.sharding import environment_kept

    with environment_kept():
        yield


# Named variants: (architecture, config overrides). "llama-wide" has enough weight memory (~2.2M parameters)
# that LoRA's savings on gradients and AdamW moments show against the activations.
VARIANTS = {"llama-wide": ("llama", {"hidden_size": 256, "intermediate_size": 1024})}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: tiny_model_dir("llama") -> a saved tiny model of that architecture (or VARIANTS name),
    built once per session."""
    built = {}

    def make(name: str = "llama"):
        if name not in built:
            arch, overrides = VARIANTS.get(name, (name, {}))
            built[name] = save_tiny_model(tmp_path_factory.mktemp(f"tiny-{name}"), arch, **overrides)
        return built[name]

    return make


@pytest.fixture(scope="session")
def tiny_dataset_file(tmp_path_factory):
    """A jsonl of 64 {"text": ...} examples from 20 to ~930 characters, so some exceed 512 tokens."""
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    long_prose = _PROSE * 4
    with path.open("w") as f:
        for i in range(64):
            n = 20 + (i * 397) % 911  # lengths spread over the range without sorting
            f.write(json.dumps({"text": long_prose[:n].strip()}) + "\n")
    return path


@pytest.fixture
def planted(monkeypatch):
    """`planted(step_seconds)`: trials' step times from a planted clock (helpers.PlantedClock), no wall clock."""
    from helpers import install_planted

    return install_planted(monkeypatch)
