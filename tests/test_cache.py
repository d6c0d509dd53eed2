"""Probe cache tests: what a stored trial answers under another budget, the `cache` command, and whole plans
answered from the cache (same plan, no trial), re-probed when the workload changes, safe when corrupt or shared.
"""

import json
import os
import subprocess
import sys

import pytest
from helpers import MiB

from autobatch import cache
from autobatch.cli import main
from autobatch.planner import Trial

DESCRIPTION = {"config": {"model_name_or_path": "m", "max_length": 64}, "device": {"device": "cpu"}}


def stored(path, budget, trials: dict[int, Trial]) -> cache.ProbeCache:
    probes = cache.ProbeCache(path, DESCRIPTION, budget)
    for size, trial in trials.items():
        probes.store(size, 1, None, trial)
    return probes


def test_a_stored_peak_answers_under_any_budget_and_an_oom_only_under_a_smaller_one(tmp_path):
    path = tmp_path / "c.sqlite3"
    stored(path, 100 * MiB, {4: Trial(4, 60 * MiB, True, 0.5), 8: Trial(8, 100 * MiB + 1, False, 0.0, oom=True)}).close()
    smaller = cache.ProbeCache(path, DESCRIPTION, 50 * MiB)
    assert smaller.lookup(4, 1, None, 50 * MiB) == Trial(4, 60 * MiB, False, 0.5, cached=True)  # now too big
    assert smaller.lookup(8, 1, None, 50 * MiB).oom  # ran out of 100 MiB: out of 50 MiB too
    assert smaller.lookup(4, 2, None, 50 * MiB) is None  # another accumulation is another trial
    larger = cache.ProbeCache(path, DESCRIPTION, 200 * MiB)
    assert larger.lookup(4, 1, None, 200 * MiB).fits
    assert larger.lookup(8, 1, None, 200 * MiB) is None  # out of 100 MiB says nothing about 200 MiB
    other = cache.ProbeCache(path, {**DESCRIPTION, "world_size": 2}, 100 * MiB)
    assert other.lookup(4, 1, None, 100 * MiB) is None


def test_a_cache_answer_is_marked_on_the_answer_and_a_trial_run_is_not(tmp_path):
    runs = []

    def run_trial(micro_batch_size, eval_batch_size=None):
        runs.append(micro_batch_size)
        return Trial(micro_batch_size, micro_batch_size * MiB, True, 0.1)

    probes = stored(tmp_path / "c.sqlite3", 100 * MiB, {4: Trial(4, 4 * MiB, True, 0.5)})
    wrapped = probes.wrap(run_trial, lambda micro: 1, 100 * MiB)
    answers = [wrapped(4), wrapped(2), wrapped(2)]  # 2 ran once, then the cache answers it too
    probes.close()
    assert [(t.micro_batch_size, t.cached) for t in answers] == [(4, True), (2, False), (2, True)]
    assert runs == [2] and probes.hits == 2
    assert "cached" not in answers[0].to_dict()  # the --json keys are the plan's two lists, as before


def test_the_fingerprint_ignores_key_order():
    assert cache.workload_key({"a": 1, "b": {"c": 2, "d": 3}}) == cache.workload_key({"b": {"d": 3, "c": 2}, "a": 1})
    assert cache.workload_key({"a": 1}) != cache.workload_key({"a": 2})


def test_cache_command_lists_locates_and_clears(tmp_path, capsys):
    path = tmp_path / "c.sqlite3"
    stored(path, 100 * MiB, {1: Trial(1, MiB, True, 0.1), 2: Trial(2, 2 * MiB, True, 0.1)}).close()
    assert main(["cache", "path", "--cache", str(path)]) == 0
    assert capsys.readouterr().out.strip() == str(path)
    assert main(["cache", "list", "--cache", str(path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["trials"] for e in listed["entries"]] == [2]
    assert listed["entries"][0]["description"] == DESCRIPTION
    assert main(["cache", "clear", "--cache", str(path)]) == 0
    assert "cleared 2 trial(s)" in capsys.readouterr().out
    assert main(["cache", "--cache", str(path)]) == 0
    assert "0 workload(s)" in capsys.readouterr().out


def test_cache_path_defaults_to_the_user_cache_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["cache", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "autobatch" / "probes.sqlite3")


def test_cache_command_on_a_corrupt_file_is_one_line_and_exit_1(tmp_path, capsys):
    path = tmp_path / "c.sqlite3"
    path.write_bytes(b"not a database" * 100)
    assert main(["cache", "list", "--cache", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"--cache {path}: cannot read it" in err and "Traceback" not in err


def plan(args: list[str], capsys) -> tuple[dict, str]:
    code = main(["plan", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out), captured.err


def sizes(trials: list[dict]) -> list[int]:
    return [t["micro_batch_size"] for t in trials]


def batch(report: dict) -> tuple[int, int, int]:
    return (report["per_device_train_batch_size"], report["gradient_accumulation_steps"],
            report["max_micro_batch_size"])


# The tiny Llama at 64 tokens, effective batch 16: peaks of about 11.8 MiB at micro-batch 1 and 9.3 MiB more
# per sample, so 64 MiB holds 6 and 57.6 MiB (10% less) holds 5.
def tiny_args(model, cache_file, budget: int = 64 * MiB, max_length: int = 64, effective: int = 16) -> list[str]:
    return ["--model", str(model), "--device", "cpu", "--memory-budget", str(budget), "--headroom", "0",
            "--max-length", str(max_length), "--gradient-checkpointing", "false",
            "--effective-batch-size", str(effective), "--cache", str(cache_file)]


def test_second_plan_runs_no_trial_and_a_changed_workload_or_budget_reprobes(tiny_model_dir, tmp_path, capsys):
    model, cache_file = tiny_model_dir("llama"), tmp_path / "probes.sqlite3"
    first, _ = plan(tiny_args(model, cache_file), capsys)
    assert first["cached_trials"] == [] and first["max_micro_batch_size"] == 6
    second, _ = plan(tiny_args(model, cache_file), capsys)
    assert second["trials"] == []
    assert sorted(sizes(second["cached_trials"])) == sorted(sizes(first["trials"]))
    assert batch(second) == batch(first)
    assert any("from the probe cache" in note for note in second["notes"])

    smaller, _ = plan(tiny_args(model, cache_file, budget=int(64 * MiB * 0.9)), capsys)
    assert len(smaller["trials"]) <= 2
    answers = {t["micro_batch_size"]: t for t in smaller["cached_trials"] + smaller["trials"]}
    best = smaller["max_micro_batch_size"]
    assert best == 5 and answers[best]["fits"] and not answers[best + 1]["fits"]

    shorter, _ = plan(tiny_args(model, cache_file, max_length=48) + ["--micro-batch-size", "2"], capsys)
    assert sizes(shorter["trials"]) == [2] and shorter["cached_trials"] == []


def test_no_cache_neither_reads_nor_writes(tiny_model_dir, tmp_path, capsys):
    cache_file = tmp_path / "probes.sqlite3"
    args = tiny_args(tiny_model_dir("llama"), cache_file) + ["--micro-batch-size", "2", "--no-cache"]
    report, _ = plan(args, capsys)
    assert sizes(report["trials"]) == [2] and report["cache_path"] is None
    assert not cache_file.exists()


def test_a_corrupt_cache_is_one_warning_and_a_correct_plan(tiny_model_dir, tmp_path, capsys):
    cache_file = tmp_path / "probes.sqlite3"
    cache_file.write_bytes(b"\x00garbage" * 512)
    args = tiny_args(tiny_model_dir("llama"), cache_file, budget=10**9, effective=4)
    report, err = plan(args, capsys)
    assert err.count("probe cache") == 1 and "ignored" in err
    assert report["max_micro_batch_size"] == 4 and report["stopped_at_need"]
    assert report["per_device_train_batch_size"] * report["gradient_accumulation_steps"] == 4
    assert sizes(report["trials"]) == [1, 2, 4] and report["cached_trials"] == []


@pytest.mark.slow
def test_two_plans_at_once_on_one_cache_are_both_correct(tiny_model_dir, tmp_path):
    cache_file = tmp_path / "probes.sqlite3"
    args = [sys.executable, "-m", "autobatch", "plan", "--json",
            *tiny_args(tiny_model_dir("llama"), cache_file, budget=10**9, effective=4)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    reports = []
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
        assert "probe cache" not in err
        reports.append(json.loads(out))
    for report in reports:  # which divisor wins is a matter of measured step times; the maximum is not
        assert report["max_micro_batch_size"] == 4 and report["stopped_at_need"]
        assert report["per_device_train_batch_size"] * report["gradient_accumulation_steps"] == 4
    entries = cache.list_entries(cache_file)
    assert len(entries) == 1 and entries[0].trials >= len(reports[0]["trials"])


# ------------------------------------------------------------------- the key, by construction (issue 23.2)

#: Config fields that are not in `memory_fingerprint`, and why a stored trial stays valid when they change.
CONFIG_NOT_KEYED = {
    "eval_fraction": "changes which examples train; the longest one the trials copy is keyed (example_length)",
    "dataset_test_split": "the eval data; the longest train example is keyed (example_length)",
    "effective_batch_size": "the accumulation it implies is a column of the trial's row",
    "per_device_train_batch_size": "a column of the trial's row",
    "gradient_accumulation_steps": "a column of the trial's row",
    "device": "the backend's identity is keyed (description['device'])",
    "memory_budget_bytes": "a peak is valid under any budget; an OOM row stores the budget it ran under",
    "headroom": "compares a stored peak with the usable bytes at lookup",
    "max_micro_batch_size": "where the search stops, not what a trial holds",
    "find_max": "where the search stops, not what a trial holds",
    "cache": "where trials are stored",
    "no_cache": "whether trials are stored",
    "nproc_per_node": "sets world_size (validation makes them agree), which is keyed",
    "trial_process": "where a trial runs (this process or a fresh one), not what its training step holds",
}


def _sft_config(tmp_path, **values):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **values)


def test_every_sftconfig_field_is_keyed_or_named_irrelevant_with_a_reason(tmp_path):
    """A field that changes memory and is in neither list fails here: the key is built from every field."""
    import dataclasses

    from trl import SFTConfig

    from autobatch.config import NOT_MEMORY_KEYS

    fields = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    keyed = set(cache.memory_args(_sft_config(tmp_path)))
    unaccounted = sorted(f for f in fields if f not in keyed and not NOT_MEMORY_KEYS.get(f, "").strip())
    assert unaccounted == []
    assert sorted(set(NOT_MEMORY_KEYS) - fields) == [], "a stale entry names no SFTConfig field"
    known_to_change_memory = {"pad_to_multiple_of", "label_smoothing_factor", "max_length", "packing", "optim",
                              "weight_decay", "activation_checkpointing", "model_init_kwargs", "torch_compile"}
    assert known_to_change_memory <= keyed


@pytest.mark.parametrize("field, value", [("pad_to_multiple_of", 256), ("label_smoothing_factor", 0.1)])
def test_a_memory_setting_outside_the_old_list_changes_the_key(tmp_path, field, value):
    """Reproduction: --pad-to-multiple-of 256 was answered with the peak measured without it (3.9x low)."""
    import torch

    model = torch.nn.Linear(2, 2)
    key = [cache.workload_key(cache.workload_description({}, model, args, 64, True, {"device": "cpu"}, 1))
           for args in (_sft_config(tmp_path), _sft_config(tmp_path, **{field: value}))]
    assert key[0] != key[1]
    same = cache.workload_description({}, model, _sft_config(tmp_path / "elsewhere", seed=7), 64, True,
                                      {"device": "cpu"}, 1)
    assert cache.workload_key(same) == key[0], "an output dir or a seed is not a new workload"


def test_every_model_loading_and_config_field_is_in_the_plan_key_or_named_irrelevant():
    import dataclasses

    from autobatch.config import (
        MODEL_ARGS_KEYS,
        MODEL_CONFIG_LORA_KEYS,
        Config,
        build_config,
        memory_fingerprint,
    )

    base = memory_fingerprint(build_config(overrides={"model_name_or_path": "m"}))
    for key in MODEL_ARGS_KEYS:
        changed = build_config(overrides={"model_name_or_path": "m"})
        changed.model_args[key] = "x"
        assert memory_fingerprint(changed) != base, key
    for key in MODEL_CONFIG_LORA_KEYS.values():
        changed = build_config(overrides={"model_name_or_path": "m"})
        changed.lora = {key: "x"}
        assert memory_fingerprint(changed) != base, key
    for field in dataclasses.fields(Config):
        if field.name in CONFIG_NOT_KEYED or field.name in ("lora", "model_args"):
            continue
        changed = dataclasses.replace(build_config(overrides={"model_name_or_path": "m"}),
                                      **{field.name: {"training_args": {"pad_to_multiple_of": 8}}.get(
                                          field.name, "other")})
        assert memory_fingerprint(changed) != base, f"{field.name}: keyed, or in CONFIG_NOT_KEYED with a reason"


# ------------------------------------------------------------ another program's SQLite file (issue 23.3)

def optuna_study_file(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its handler holds an earlier test's captured stderr
    path = tmp_path / "sweep.db"
    study = optuna.create_study(storage=f"sqlite:///{path}", study_name="s")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    return path


def checksum(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("action", ["clear", "list"])
def test_cache_command_on_an_optuna_study_is_refused_and_changes_nothing(tmp_path, capsys, action):
    """Reproduction: `cache clear --cache OUT/sweep.db` wiped the study's trials; `list` changed its journal mode."""
    path = optuna_study_file(tmp_path)
    before, names = checksum(path), sorted(p.name for p in tmp_path.iterdir())
    assert main(["cache", action, "--cache", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not an autobatch probe cache" in err and "not changed" in err and "Traceback" not in err
    assert checksum(path) == before and sorted(p.name for p in tmp_path.iterdir()) == names


def test_a_plan_never_writes_into_another_programs_sqlite_file(tmp_path, caplog):
    import logging

    path = optuna_study_file(tmp_path)
    before = checksum(path)
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        probes = cache.ProbeCache(path, DESCRIPTION, 100 * MiB)
        probes.store(1, 1, None, Trial(1, MiB, True, 0.1))
    assert probes.broken and "not an autobatch probe cache" in caplog.text and "another `cache`" in caplog.text
    assert checksum(path) == before


@pytest.mark.parametrize("tables", [0, 1])
def test_a_cache_another_plan_is_creating_is_joined_not_refused(tmp_path, tables):
    """Two plans at once on a new cache: the second may open it after the first set WAL and before its tables
    were all there; it was refused as not a probe cache (seen with three test workers on two cores)."""
    import sqlite3

    path = tmp_path / "probes.sqlite3"
    first = sqlite3.connect(path, isolation_level=None)
    first.execute("PRAGMA journal_mode = WAL")
    first.executescript(cache._SCHEMA.split(";")[0] + ";" if tables else "")
    probes = cache.ProbeCache(path, DESCRIPTION, 100 * MiB)
    probes.store(1, 1, None, Trial(1, MiB, True, 0.1))
    assert not probes.broken
    probes.close()
    first.close()
    again = cache.ProbeCache(path, DESCRIPTION, 100 * MiB)
    assert again.lookup(1, 1, None, 100 * MiB).peak_memory_bytes == MiB
