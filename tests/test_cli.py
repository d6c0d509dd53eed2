"""CLI tests: help, import cost, exit codes and one-line errors, flag pass-through, the plan report.

The probe is replaced by a fake `autobatch.probe` module, so these run in milliseconds without torch;
the real probe is driven end to end in test_probe.py.
"""

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, MiB, make_plan

from autobatch import cli, units
from autobatch import config as config_module
from autobatch.config import build_config
from autobatch.errors import BudgetTooSmallError
from autobatch.planner import Plan, Trial

CONTRACT_KEYS = {"per_device_train_batch_size", "gradient_accumulation_steps", "effective_batch_size",
                 "world_size", "max_micro_batch_size", "memory_budget_bytes", "peak_memory_bytes", "device",
                 "max_length", "trials"}


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=120, check=False)


def fake_plan(config, fits: bool = True) -> Plan:
    trials = [Trial(1, 60 * MiB, True, 0.05), Trial(17, 250 * MiB, True, 0.40),
              Trial(18, 301 * MiB, False, 0.0, oom=True)]
    return make_plan(world_size=config.world_size, usable_memory_bytes=300 * MiB, headroom=0.0, trials=trials,
                     fits=fits, notes=["bf16/fp16 off on the cpu backend"], search_seconds=1.5)


@pytest.fixture
def probe(monkeypatch):
    """A fake autobatch.probe: records the Config it was given, reports the trials, returns a fixed Plan."""
    seen: dict = {"calls": 0}
    module = types.ModuleType("autobatch.probe")

    def make_plan(config, on_trial=None, **progress):
        seen["calls"] += 1
        seen["config"] = config
        print("noise a library printed on stdout")
        plan = seen.get("raise") and seen["raise"]
        if plan:
            raise plan
        result = fake_plan(config, fits=seen.get("fits", True))
        for trial in result.trials:
            if on_trial:
                on_trial(trial)
        return result

    module.make_plan = make_plan
    monkeypatch.setitem(sys.modules, "autobatch.probe", module)
    from autobatch import builtin  # torch-free: the real module, its model folder faked

    monkeypatch.setattr(builtin, "builtin_model_dir", lambda: Path("/cache/autobatch/tiny-model"))
    # The models named here are fakes the fake probe never loads: no path or hub cache to check them against.
    monkeypatch.setattr(config_module, "_model_problems", lambda model, name: [])
    monkeypatch.setattr(cli, "check_model_available", lambda config: None)
    return seen


# ------------------------------------------------------------------------------------- help, imports

@pytest.mark.parametrize("command", [[], ["plan"], ["run"], ["sweep"]], ids=lambda c: " ".join(c) or "main")
def test_help(command):
    result = run_cli("-m", "autobatch.cli", *command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: autobatch")
    if command:
        assert "--memory-budget" in result.stdout and "--gradient-checkpointing false" in result.stdout


def test_python_dash_m_autobatch():
    result = run_cli("-m", "autobatch", "--version")
    assert result.returncode == 0 and result.stdout.startswith("autobatch ")


def test_importing_the_cli_does_not_import_torch():
    code = ("import autobatch.cli, sys; heavy = {'torch', 'transformers', 'trl', 'datasets'} & "
            "set(sys.modules); assert not heavy, heavy")
    result = run_cli("-c", code)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------ bad input

BAD_INPUT = [
    (["plan", "--config", "missing.yaml"], r"--config missing\.yaml: file not found"),
    (["plan", "--config", "{malformed}"], r"not valid YAML at line 3, column 1: .* started at line 2"),
    (["plan", "--config", "{list}"], r"top level must be a mapping"),
    (["plan", "--memory-budget", "lots"], r"--memory-budget: cannot read 'lots' as a size"),
    (["plan", "--effective-batch-size", "0"], r"--effective-batch-size must be a positive integer, got 0"),
    (["plan", "--max-length", "0"], r"--max-length must be a positive integer"),
    (["plan", "--device", "tpu"], r"--device must be one of cuda, cpu, estimate, got 'tpu'"),
    (["plan", "--headroom", "1.5"], r"--headroom must be a fraction"),
    (["plan", "--learning-rate"], r"--learning-rate needs a value"),
    (["plan", "--learning-rate", "--json"], r"--learning-rate needs a value"),
    (["plan", "--gradient-checkpointing", "maybe"], r"--gradient-checkpointing must be true or false"),
    (["plan", "--micro-batch-size", "5", "--effective-batch-size", "32"], r"--micro-batch-size 5 does not "),
    (["plan", "stray"], r"unexpected argument 'stray'"),
    (["plan", "--output", "{nodir}"], r"--output .*: directory .* does not exist"),
    (["plan", "--max-length", "0", "--device", "tpu"], r"^2 problems: --device .*; --max-length"),
    (["fly"], r"invalid choice: 'fly'"),
    ([], r"choose a command"),
]


def _fill(args: list[str], tmp_path: Path) -> list[str]:
    (tmp_path / "malformed.yaml").write_text("max_length: 128\neffective_batch_size: [32\n")
    (tmp_path / "list.yaml").write_text("- max_length\n")
    paths = {"{malformed}": tmp_path / "malformed.yaml", "{list}": tmp_path / "list.yaml",
             "{nodir}": tmp_path / "no" / "plan.yaml"}
    return [str(paths.get(a, a)) for a in args]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=[" ".join(a) or "none" for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys, probe):
    code = cli.main(_fill(args, tmp_path))
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("autobatch: error: ")
    assert re.search(message, lines[0].removeprefix("autobatch: error: ")), lines[0]
    assert captured.out == "" and probe["calls"] == 0


@pytest.mark.parametrize(
    "args",
    [["plan", "--config", "missing.yaml"], ["plan", "--memory-budget", "lots"], ["plan", "--learning-rate"],
     ["plan", "--max-length", "0"]],
)
def test_bad_input_in_a_real_process(args):
    result = run_cli("-m", "autobatch", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("autobatch: error: ")


def test_debug_shows_the_traceback(capsys):
    assert cli.main(["plan", "--memory-budget", "lots", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.strip().endswith(f"cannot read 'lots' as a size; write e.g. {units.EXAMPLES}")


# ------------------------------------------------------------------------------------------ config

def test_flags_pass_through_as_training_args(probe, capsys):
    argv = ["plan", "--model", "models/tiny", "--learning-rate", "1e-5", "--gradient-checkpointing", "false",
            "--packing=true", "--optim", "adamw_torch", "--warmup_steps", "-0.1", "--output-dir", "out/1",
            "--max-length", "128", "--dataset-text-field", "content", "--memory-budget", "300MiB",
            "--micro-batch-size", "16", "--gradient-accumulation-steps", "2", "--use-peft", "true",
            "--lora-r", "4"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    config = probe["config"]
    assert config.model_name_or_path == "models/tiny"
    assert config.training_args == {"learning_rate": 1e-5, "gradient_checkpointing": False, "packing": True,
                                    "optim": "adamw_torch", "warmup_steps": -0.1, "output_dir": "out/1",
                                    "max_length": 128, "dataset_text_field": "content"}
    assert config.memory_budget_bytes == 300 * MiB
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (16, 2)
    assert config.lora["r"] == 4


def test_builtin_config_without_config_or_model(probe):
    assert cli.main(["plan"]) == 0
    assert probe["config"].training_args["max_length"] == 256 and probe["config"].effective_batch_size == 16
    assert cli.main(["plan", "--model", "models/tiny"]) == 0
    assert probe["config"].training_args == {} and probe["config"].effective_batch_size is None


def test_cli_beats_yaml(tmp_path, probe):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: a/model\nmax_length: 512\neffective_batch_size: 64\nbf16: true\n")
    assert cli.main(["plan", "--config", str(path), "--max-length", "64", "--bf16", "false"]) == 0
    config = probe["config"]
    assert config.training_args == {"max_length": 64, "bf16": False} and config.effective_batch_size == 64


def test_setup_is_printed_before_probing(probe, capsys):
    cli.main(["plan", "--memory-budget", "300MiB", "--device", "cpu"])
    err = capsys.readouterr().err
    setup = err[: err.index("micro=1 ")]
    for fact in ("built-in tiny causal LM", "cpu", "300.0MiB (314572800 bytes)", "max_length", "256", "16"):
        assert fact in setup


def test_setup_names_what_is_measured(probe, capsys):
    cli.main(["plan", "--model", "models/tiny", "--dtype", "bfloat16"])
    setup = capsys.readouterr().err
    assert "dataset                none: a synthetic sequence of max_length tokens is measured" in setup
    assert "checkpointing          true (SFTConfig default)" in setup
    assert "dtype                  bfloat16" in setup and "bf16                   SFTConfig default" in setup


# --------------------------------------------------------------------------------------------- output

def test_json_is_the_only_thing_on_stdout(probe, capsys):
    assert cli.main(["plan", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert CONTRACT_KEYS <= set(data)
    assert data["trials"][0] == {"micro_batch_size": 1, "peak_memory_bytes": 60 * MiB, "fits": True,
                                 "seconds": 0.05, "oom": False, "peak_allocated_bytes": None,
                                 "fresh_process": False, "rank_peak_bytes": None}
    assert "noise a library printed" in captured.err
    assert "autobatch plan:" not in captured.err and "memory budget" not in captured.err, "no settings block"


def test_table_and_trial_lines(probe, capsys):
    assert cli.main(["plan", "--memory-budget", "300MiB"]) == 0
    captured = capsys.readouterr()
    assert "micro=17 fits peak=250.0MiB (83% of budget) 0.40 s/micro-batch" in captured.err
    assert "micro=18 OOM peak=301.0MiB (100% of budget)" in captured.err
    out = captured.out
    assert "micro-batch 16 × accumulation 2 × world size 1 = effective batch 32" in out
    assert "max micro-batch  17 (18 does not fit)" in out
    assert "3 (1 OOM)" in out and "interpolated" in out and "note: bf16/fp16 off" in out
    assert out.strip().endswith("use: --per_device_train_batch_size 16 --gradient_accumulation_steps 2")


def test_output_writes_a_loadable_plan(tmp_path, probe, capsys):
    path = tmp_path / "plan.yaml"
    assert cli.main(["plan", "--output", str(path)]) == 0
    data = yaml.safe_load(path.read_text())
    assert data["model_name_or_path"] == "/cache/autobatch/tiny-model"
    config = build_config(path)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (16, 2)
    assert f"wrote {path}" in capsys.readouterr().err


def test_plan_that_does_not_fit_writes_nothing(tmp_path, probe, capsys):
    probe["fits"] = False
    path = tmp_path / "plan.yaml"
    assert cli.main(["plan", "--micro-batch-size", "16", "--output", str(path)]) == 1
    assert not path.exists()
    assert "does not fit" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (BudgetTooSmallError("micro-batch 1 needs 2.0GiB but the usable budget is 300.0MiB: try ..."), 1,
         "autobatch: error: micro-batch 1 needs 2.0GiB but the usable budget is 300.0MiB: try ..."),
        (RuntimeError("weird\nthing"), 1,
         "autobatch: error: RuntimeError: weird thing (rerun with --debug for the traceback)"),
    ],
)
def test_runtime_errors_are_one_line(probe, capsys, error, code, message):
    probe["raise"] = error
    assert cli.main(["plan"]) == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == message


def test_a_budget_too_small_names_keys_and_the_cli_says_them_as_typed(request, capsys):
    """issue 18.4: the advice names keys for Python (`autobatch.plan()` raises it); the CLI says the flags."""
    from autobatch.probe import _budget_error

    config = build_config(overrides={"gradient_checkpointing": False})
    error = _budget_error(Trial(1, 400 * MiB, False, 0.0, oom=True), 300 * MiB, config)
    assert str(error).endswith("try a larger memory_budget, gradient_checkpointing true, LoRA (a lora: section), "
                               "a shorter max_length, bf16 on a GPU")
    probe = request.getfixturevalue("probe")  # the CLI's probe faked from here on
    probe["raise"] = error
    assert cli.main(["plan", "--memory-budget", "300MiB"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "autobatch: error: micro-batch 1 needs more than 400.0MiB but the usable budget is 300.0MiB: try a larger "
        "--memory-budget, --gradient-checkpointing true, LoRA (a lora: section), a shorter --max-length, bf16 on a GPU")


def test_debug_reraises_unexpected_errors(probe):
    probe["raise"] = RuntimeError("weird")
    with pytest.raises(RuntimeError, match="weird"):
        cli.main(["plan", "--debug"])


def test_sweep_refuses_bad_sizes_before_probing(probe, capsys):
    assert cli.main(["sweep", "--effective-batch-sizes", "8,x"]) == 2
    assert capsys.readouterr().err.strip() == (
        "autobatch: error: --effective-batch-sizes '8,x': write positive integers separated by commas, e.g. 8,16,32")
    assert probe["calls"] == 0
