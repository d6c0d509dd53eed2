"""autobatch: measure the largest micro-batch that fits, then plan SFTTrainer's batch for a target effective batch.

The public API (`plan`, `run`, `sweep`, `plan_trainer`, `apply_plan`, `save_plan`, `Plan`, `Trial`, `SweepResult`)
is loaded on first use, so `import autobatch` and `autobatch --help` stay free of torch.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "plan": "autobatch.api", "run": "autobatch.api", "sweep": "autobatch.api", "plan_trainer": "autobatch.api",
    "apply_plan": "autobatch.api", "save_plan": "autobatch.api", "load": "autobatch.api",
    "Plan": "autobatch.planner", "Trial": "autobatch.planner", "Config": "autobatch.config",
    "AutobatchError": "autobatch.errors", "ConfigError": "autobatch.errors", "SweepResult": "autobatch.api",
}
__all__ = [
    "AutobatchError",
    "Config",
    "ConfigError",
    "Plan",
    "SweepResult",
    "Trial",
    "__version__",
    "apply_plan",
    "load",
    "plan",
    "plan_trainer",
    "run",
    "save_plan",
    "sweep",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'autobatch' has no attribute {name!r}")
