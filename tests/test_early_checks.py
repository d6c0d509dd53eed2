"""Bad input fails before torch loads (issue 24): a typo in a key (autobatch's own or TRL's, flag or YAML) gets
the closest key, a missing model dir, a learning rate that is not a number and an unwritable --output are
refused, each with exit 2 and one line, and torch never imported (checked in the child process)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from autobatch.config import build_config
from autobatch.errors import ConfigError
from autobatch.fields import closest_key, key_problems, sft_fields

#: Runs the CLI in a fresh interpreter, then says on the last stdout line whether torch was imported.
_CHILD = ("import sys\nfrom autobatch import cli\nrc = cli.main(sys.argv[1:])\n"
          "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\nsys.exit(rc)\n")


def run_cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", _CHILD, *argv], check=False, capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def assert_refused_before_torch(result: subprocess.CompletedProcess, pattern: str, code: int = 2) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autobatch: error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert result.stdout.strip().splitlines()[-1] == "torch not imported"


@pytest.mark.parametrize(("argv", "pattern"), [
    (["--effective-batch-szie", "8"], r"unknown key --effective-batch-szie: did you mean --effective-batch-size\?"),
    (["--memory-budjet", "300MiB"], r"unknown key --memory-budjet: did you mean --memory-budget\?"),
    (["--max-lenght", "32"], r"unknown key --max-lenght: did you mean --max-length\?"),
    (["--learning-rate", "fast"], r"--learning-rate must be a number \(e\.g\. 2e-5\), got 'fast'"),
    (["--max-steps", "1.5"], r"--max-steps must be an integer, got 1\.5"),
], ids=["autobatch-key", "budget-key", "trl-key", "learning-rate-type", "max-steps-type"])
def test_flag_typos_and_types_fail_before_torch(argv, pattern):
    assert_refused_before_torch(run_cli("plan", *argv), pattern)


def test_yaml_typos_name_autobatch_keys_before_torch(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("effective_batch_szie: 8\nlearning_rate: fast\n")
    result = run_cli("plan", "--config", str(config))
    assert_refused_before_torch(result, r"2 problems: unknown key effective_batch_szie \(in .*c\.yaml\): did you "
                                        r"mean effective_batch_size\?.*learning_rate \(in .*\) must be a number")


def test_missing_model_dir_fails_before_torch(tmp_path):
    assert_refused_before_torch(run_cli("run", "--model", str(tmp_path / "no-model")),
                                r"--model .*no-model: no such directory")


def test_offline_hub_name_not_in_the_cache_fails_before_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    result = run_cli("plan", "--model", "someone/not-downloaded")
    assert_refused_before_torch(result, r"--model: could not load 'someone/not-downloaded': not a local directory, "
                                        r"and it could not be downloaded from the hub \(HF_HUB_OFFLINE=1", code=1)


def test_unwritable_output_fails_before_torch(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        writable = os.access(locked, os.W_OK) and os.geteuid() == 0  # root writes anyway: use a special fs
        target = Path("/proc/plan.yaml") if writable else locked / "plan.yaml"
        result = run_cli("plan", "--output", str(target))
    finally:
        locked.chmod(0o755)
    assert_refused_before_torch(result, rf"--output {target}: cannot write in {target.parent} ")
    assert not list(locked.iterdir())


def test_sft_fields_read_from_source_are_the_live_ones():
    """The source reading (no import) agrees with the dataclass TRL builds, names and plain types."""
    import dataclasses

    trl = pytest.importorskip("trl")
    live = {f.name: f for f in dataclasses.fields(trl.SFTConfig) if f.init}
    read = sft_fields()
    assert read is not None and set(read) == set(live)
    assert read["learning_rate"] == "float" and read["max_steps"] == "int"


def test_closest_key_prefers_autobatch_keys_over_trl_ones():
    assert closest_key("effective_batch_szie", ["per_device_eval_batch_size", "effective_batch_size"]) == \
        "effective_batch_size"
    assert closest_key("zzzz", ["max_length"]) is None


def test_key_problems_accept_what_trl_accepts():
    ok = {"learning_rate": 1e-5, "max_steps": 10, "warmup_steps": 0.1, "eval_steps": None, "optim": "adamw_torch",
          "formatting_func": "m:f", "evaluation_strategy": "no"}
    assert key_problems(ok, {}, {"effective_batch_size"}, skip={"formatting_func"}) == []
    assert key_problems({"learning_rate": True}, {}, set()) == ["learning_rate must be a number (e.g. 2e-5), got True"]


def test_a_plan_json_given_to_plan_says_what_it_is_and_what_to_pass(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text(json.dumps({"per_device_train_batch_size": 2, "trials": []}))
    assert_refused_before_torch(run_cli("run", "--plan", str(out / "plan.json")),
                                rf"--plan {out / 'plan.json'}: this is a plan\.json, the record a run keeps in its "
                                rf"output dir; --plan takes a plan\.yaml .* autobatch run --output-dir {out} --resume")


def test_a_missing_plan_is_named_as_the_plan_the_user_passed(tmp_path):
    """It was said as `--config nope.yaml: file not found` (the plan is read as the run's config too)."""
    import autobatch
    from autobatch.errors import ConfigError

    missing = tmp_path / "nope.yaml"
    assert_refused_before_torch(run_cli("run", "--plan", str(missing)),
                                rf"--plan {missing}: cannot read it \(No such file or directory\); write one with "
                                r"autobatch plan --output plan\.yaml")
    with pytest.raises(ConfigError, match=rf"^`plan` {missing}: cannot read it .*autobatch\.save_plan"):
        autobatch.run(device="cpu", plan=str(missing), output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_sweep_validation_evaluates_on_the_eval_split_without_an_eval_strategy():
    """The README says the sweep evaluates on dataset_test_split / eval_fraction: with --validate-tokens that
    input reaches the validation runs, so it is not refused for want of an eval_strategy (issue 24)."""
    values = {"eval_fraction": 0.2, "dataset_test_split": None}
    with pytest.raises(ConfigError, match="eval_fraction 0.2 is never used: eval_strategy is no"):
        build_config(overrides=values)
    assert build_config(overrides=values, evaluates=True).eval_fraction == 0.2


def test_sweep_eval_fraction_is_refused_only_without_validation(tmp_path):
    assert_refused_before_torch(run_cli("sweep", "--eval-fraction", "0.2", "--output-dir", str(tmp_path)),
                                r"--eval-fraction 0\.2 is never used")
