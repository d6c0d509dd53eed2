"""SFTConfig's keys and their plain types, read from the installed TRL and transformers source, not imported.

Importing trl imports torch (seconds to minutes on a loaded machine); reading the dataclass fields from the
source takes milliseconds, so an unknown key or a `learning_rate: fast` is refused before any heavy work
(issue 24). The late check in `workload.sft_config` stays: it sees what the import sees.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
from collections.abc import Iterable, Mapping
from pathlib import Path

#: Where SFTConfig's dataclass chain lives: (package, module file, class names), base classes last.
_SOURCES = (
    ("trl", "trainer/sft_config.py", "SFTConfig"),
    ("trl", "trainer/base_config.py", "_BaseConfig"),
    ("transformers", "training_args.py", "TrainingArguments"),
)
#: Annotations a value is checked against; anything richer (unions with str, dicts) is left to TRL.
_NUMBER = frozenset({"float", "Optional[float]", "float | None", "int | float", "float | int"})
_INTEGER = frozenset({"int", "Optional[int]", "int | None"})
#: Old names autobatch maps itself (workload.sft_config, config.modern_names).
OLD_NAMES = frozenset({"evaluation_strategy"})


def _package_dir(name: str) -> Path | None:
    """The package's folder, found without importing it (find_spec of a top-level name runs nothing)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def _class_fields(path: Path, class_name: str) -> dict[str, str]:
    """`name: annotation` of the class's init fields, as source text."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {item.target.id: ast.unparse(item.annotation) for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                    and not _init_false(item.value)}
    raise LookupError(f"{class_name} not in {path}")


def _init_false(value: ast.expr | None) -> bool:
    return (isinstance(value, ast.Call) and any(k.arg == "init" and isinstance(k.value, ast.Constant)
                                                and k.value.value is False for k in value.keywords))


@functools.cache
def sft_fields() -> dict[str, str] | None:
    """SFTConfig's init fields and their annotations; None when the source cannot be read (then only the
    late check runs)."""
    fields: dict[str, str] = {}
    try:
        for package, module, class_name in reversed(_SOURCES):
            folder = _package_dir(package)
            if folder is None:
                return None
            fields.update(_class_fields(folder / module, class_name))
    except (OSError, SyntaxError, LookupError):
        return None
    return fields


def closest_key(key: str, candidates: Iterable[str]) -> str | None:
    """The most similar candidate, or None when nothing is close (difflib's ratio >= 0.6)."""
    match = difflib.get_close_matches(key, sorted(set(candidates)), n=1, cutoff=0.6)
    return match[0] if match else None


def spelled_like(given: str, key: str) -> str:
    """`key` written the way the user wrote `given`: a flag as `--key-name`, a YAML key as it is."""
    return "--" + key.replace("_", "-") if given.startswith("--") else key


def key_problems(training_args: Mapping[str, object], names: Mapping[str, str], own_keys: Iterable[str],
                 skip: Iterable[str] = ()) -> list[str]:
    """An unknown key (closest of SFTConfig's and autobatch's own keys named) or a value of the wrong plain
    type, per key; [] when TRL's source is not readable."""
    fields = sft_fields()
    if fields is None:
        return []
    own, skipped = set(own_keys), set(skip) | OLD_NAMES
    unknown, problems = [], []
    for key, value in training_args.items():
        name = names.get(key, key)
        if key in skipped:
            continue
        if key not in fields:
            close = closest_key(key, set(fields) | own)
            unknown.append((name, f"did you mean {spelled_like(name, close)}?" if close else None))
            continue
        problem = _type_problem(fields[key], value)
        if problem:
            problems.append(f"{name} must be {problem}, got {value!r}")
    known = "keys are SFTConfig/TrainingArguments fields or autobatch options"
    if len(unknown) == 1:
        name, hint = unknown[0]
        problems.insert(0, f"unknown key {name}: {hint or 'see SFTConfig documentation'} ({known})")
    elif unknown:
        listed = ", ".join(f"{name} ({hint})" if hint else name for name, hint in unknown)
        problems.insert(0, f"unknown keys {listed}: {known}")
    return problems


def _type_problem(annotation: str, value: object) -> str | None:
    if value is None or isinstance(value, bool) and annotation not in _NUMBER | _INTEGER:
        return None
    if annotation in _NUMBER and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "a number (e.g. 2e-5)"
    if annotation in _INTEGER and (isinstance(value, bool) or not isinstance(value, int)):
        return "an integer"
    return None
