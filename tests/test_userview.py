"""The user's view (issue 11): plan.yaml that `trl sft` runs, progress on a terminal only, no input silently
ignored, the no-target default, one-line errors for a too-long max_length and an unreachable hub, true words.
"""

import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios
import time
import warnings
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, MiB, call

from autobatch import cli, report
from autobatch.config import Config, build_config
from autobatch.errors import ConfigError
from autobatch.planfile import hidden_keys, plan_yaml_text, write_plan_yaml
from autobatch.planner import Option, Plan, Trial

BAR = r"\d+/2 \[\d\d:\d\d"  # tqdm's "2/2 [00:03<00:00, ...]": the Trainer's training bar


def small_plan(**changes) -> Plan:
    trials = [Trial(1, 60 * MiB, True, 0.05), Trial(2, 80 * MiB, True, 0.08), Trial(3, 301 * MiB, False, 0.0, oom=True)]
    plan = Plan(per_device_train_batch_size=2, gradient_accumulation_steps=1, effective_batch_size=2, world_size=1,
                max_fitting_micro_batch_size=2, memory_budget_bytes=300 * MiB, usable_memory_bytes=300 * MiB, headroom=0.0,
                peak_memory_bytes=80 * MiB, device="cpu", max_length=32, trials=trials,
                options=[Option(2, 1, 0.08, True)])
    for key, value in changes.items():
        setattr(plan, key, value)
    return plan


def environment() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def run_on_terminal(argv: list[str], cwd: Path, timeout_s: float = 300) -> tuple[int, str]:
    """Run argv with stdout and stderr on a pseudo-terminal; its exit code and everything it wrote."""
    master, slave = os.openpty()
    # A real terminal has a size; tqdm draws nothing on a 0-column one (a fresh pty's default).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=cwd, env=environment())
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return proc.returncode, b"".join(chunks).decode(errors="replace")


# ---------------------------------------------------------------------- plan.yaml -> trl sft, progress

def run_argv(model: Path, data: Path, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "autobatch.cli", "run", "--model", str(model), "--dataset", str(data),
            "--device", "cpu", "--memory-budget", "300MiB", "--max-length", "32", "--micro-batch-size", "2",
            "--gradient-checkpointing", "false", "--max-steps", "2", "--output-dir", out, *extra]


@pytest.fixture(scope="module")
def terminal_run(tiny_model_dir, tiny_dataset_file, tmp_path_factory):
    """`autobatch run` on a pseudo-terminal, evaluating a held-out fraction, writing plan.yaml."""
    work = tmp_path_factory.mktemp("terminal")
    code, output = run_on_terminal(
        run_argv(tiny_model_dir("llama"), tiny_dataset_file, "out", "--eval-fraction", "0.1", "--eval-strategy",
                 "steps", "--eval-steps", "2", "--per-device-eval-batch-size", "2", "--output", "plan.yaml"),
        cwd=work)
    return work, code, output


@pytest.mark.slow
def test_run_on_a_terminal_shows_trials_before_they_start_and_the_trainers_bar(terminal_run):
    import re

    _, code, output = terminal_run
    assert code == 0, output
    assert "loading " in output and " and its data …" in output
    assert output.index("trying micro=2 …") < output.index("micro=2 fits")
    assert output.index("trying eval batch=2 beside training at micro=2 …") < output.index("eval batch=2 fits")
    assert re.search(BAR, output), output


@pytest.mark.slow
def test_run_on_a_pipe_shows_no_bar_and_no_progress_lines(tiny_model_dir, tiny_dataset_file, tmp_path, monkeypatch):
    """Output that is not a terminal (here a buffer in this process, as a pipe is one in a shell's)."""
    import re

    monkeypatch.chdir(tmp_path)
    result = call(run_argv(tiny_model_dir("llama"), tiny_dataset_file, "out")[3:])
    assert result.returncode == 0, result.stderr
    assert "micro=2 fits" in result.stderr  # the result of each trial is still reported
    assert "trying" not in result.stderr and "loading" not in result.stderr
    assert not re.search(BAR, result.stderr + result.stdout)


@pytest.mark.slow
def test_written_plan_trains_through_trls_own_sft_entry(terminal_run, tmp_path):
    """What `trl sft --config plan.yaml` does, in-process: TRL's parser (no key left over) then its main()."""
    from trl.scripts import sft

    work, code, output = terminal_run
    assert code == 0, output
    plan = work / "plan.yaml"
    data = yaml.safe_load(plan.read_text())
    assert data["bf16"] is False and data["datasets"][0]["path"] == "json" and data["test_split_size"] == 0.1
    parser = sft.make_parser(prog="trl sft")
    *parsed, from_config, from_cli = parser.parse_args_and_config(
        ["--config", str(plan), "--max_steps", "2", "--output_dir", str(tmp_path / "trl-out")],
        return_remaining_strings=True, separate_remaining_strings=True)
    assert (from_config, from_cli) == ([], [])  # `trl sft` hands leftovers to accelerate, which refuses them
    script, training, model, mixture = parsed
    assert (training.per_device_train_batch_size, training.bf16, training.eval_strategy) == (2, False, "steps")
    sft.main(script, training, model, mixture)
    state = json.loads((tmp_path / "trl-out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and any("eval_loss" in entry for entry in state["log_history"])


# ------------------------------------------------------------------------------- plan.yaml content

def test_plan_yaml_keeps_autobatch_only_keys_out_of_trls_way(tiny_dataset_file, tmp_path):
    config = build_config(overrides={"model_name_or_path": "some/model", "dataset_name": str(tiny_dataset_file),
                                     "formatting_func": "my_formats:to_text", "gradient_checkpointing": False,
                                     "fp16": True})
    path = write_plan_yaml(tmp_path / "plan.yaml", plan_yaml_text(config, small_plan()))
    data = yaml.safe_load(path.read_text())
    assert "formatting_func" not in data and "gradient_checkpointing" not in data and "dataset_name" not in data
    assert data["datasets"] == [{"path": "json", "data_files": str(tiny_dataset_file), "split": "train"}]
    assert (data["activation_checkpointing"], data["bf16"], data["fp16"]) == (False, False, False)
    import trl
    from trl.scripts.utils import DatasetMixtureConfig

    parser = trl.TrlParser((trl.ScriptArguments, trl.SFTConfig, trl.ModelConfig, DatasetMixtureConfig))
    parser.parse_args_and_config(args=["--config", str(path)], fail_with_unknown_args=True)
    again = build_config(path, hidden=hidden_keys(path))  # autobatch reads back what trl sft cannot hold
    assert again.training_args["formatting_func"] == "my_formats:to_text"
    assert again.dataset_name == str(tiny_dataset_file) and again.dataset_train_split == "train"


def test_cli_and_load_read_a_plan_yamls_autobatch_only_keys_back(tmp_path):
    """build_config takes them as `hidden` (config never imports planfile): every reader of a --config passes them."""
    import autobatch

    model = tmp_path / "model"  # a local directory: the CLI checks offline that the model can load
    model.mkdir()
    (model / "config.json").write_text("{}")
    config = build_config(overrides={"model_name_or_path": str(model), "formatting_func": "my_formats:to_text"})
    path = write_plan_yaml(tmp_path / "plan.yaml", plan_yaml_text(config, small_plan()))
    args, extras = cli._make_parser().parse_known_args(["run", "--config", str(path)])
    assert cli._config_from_args(args, extras).training_args["formatting_func"] == "my_formats:to_text"
    assert autobatch.load(path).training_args["formatting_func"] == "my_formats:to_text"
    ordinary = tmp_path / "c.yaml"
    ordinary.write_text("max_length: 64\n")
    assert hidden_keys(ordinary) == {} and hidden_keys(None) == {}


def test_plan_yaml_for_an_estimate_keeps_the_users_precision():
    config = build_config(overrides={"model_name_or_path": "some/model", "bf16": True})
    data = yaml.safe_load(plan_yaml_text(config, small_plan(device="estimate")))
    assert data["bf16"] is True


def test_trls_datasets_spelling_is_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("datasets:\n  - path: org/reviews\n    name: en\n    split: train[:90%]\ntest_split_size: 0.1\n"
                    "eval_strategy: epoch\n")
    config = build_config(path)
    assert (config.dataset_name, config.dataset_config, config.dataset_train_split) == ("org/reviews", "en",
                                                                                         "train[:90%]")
    assert config.eval_fraction == 0.1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("datasets: [{path: a}, {path: b}]\n", "autobatch reads one entry"),
        ("datasets: [{path: json, data_files: a.jsonl, columns: [text]}]\n", "columns not supported"),
        ("datasets: [{path: json, data_files: [a.jsonl, b.jsonl]}]\n", "needs data_files: one local file"),
    ],
)
def test_datasets_spellings_autobatch_cannot_honour_are_errors(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        build_config(path)


def test_a_folder_of_data_files_is_a_dataset_with_its_splits(tmp_path):
    from autobatch.workload import load_train_dataset

    for split, rows in (("train", 6), ("test", 2)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(rows)))
    config = build_config(overrides={"model_name_or_path": "m", "dataset_name": str(tmp_path),
                                     "dataset_test_split": "test", "eval_strategy": "steps"})
    assert len(load_train_dataset(config)) == 6
    assert len(load_train_dataset(config, split="test")) == 2


# --------------------------------------------------------------------------------- no input ignored

@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dataset_train_split": "validation"},
         r"--dataset-split 'validation': --dataset .* is one local file, whose only split is train; drop it"),
        ({"dataset_test_split": "test", "eval_strategy": "steps"},
         r"--dataset-test-split 'test': .* hold out part of it with eval_fraction 0.1 instead"),
        ({"dataset_config": "en"}, r"dataset_config 'en': .* no configs; drop it"),
        ({"eval_fraction": 0.25},
         r"--eval-fraction 0.25 is never used: eval_strategy is no; set eval_strategy steps and eval_steps N"),
    ],
)
def test_inputs_a_local_file_or_no_eval_strategy_would_ignore_are_errors(tiny_dataset_file, overrides, message):
    names = {"dataset_name": "--dataset", "dataset_train_split": "--dataset-split",
             "dataset_test_split": "--dataset-test-split", "eval_fraction": "--eval-fraction"}
    with pytest.raises(ConfigError, match=message):
        build_config(overrides={"dataset_name": str(tiny_dataset_file), **overrides}, names=names)


def test_validation_advice_names_a_key_as_the_config_file_has_it_else_as_a_flag(tmp_path, capsys):
    from helpers import error_lines

    from autobatch.cli import main

    job = tmp_path / "job.yaml"
    job.write_text("eval_strategy: 'no'\neval_fraction: 0.25\n")
    assert main(["plan", "--config", str(job)]) == 2
    said = (f"autobatch: error: eval_fraction (in {job}) 0.25 is never used: eval_strategy is no; set eval_strategy "
            "steps and --eval-steps N (or epoch) to evaluate, or drop it")  # eval_strategy is in job.yaml, eval_steps not
    assert error_lines(capsys.readouterr().err) == [said]


def test_a_test_split_without_eval_strategy_is_an_error_and_with_one_is_evaluated():
    with pytest.raises(ConfigError, match="dataset_test_split 'test' is never used"):
        build_config(overrides={"dataset_name": "org/data", "dataset_test_split": "test"})
    from autobatch.probe import evaluates

    config = build_config(overrides={"dataset_name": "org/data", "dataset_test_split": "test", "eval_strategy": "steps"})
    assert evaluates(config)


# --------------------------------------------------------------------------------------- defaults

def test_without_a_target_the_plan_is_the_largest_micro_batch_with_no_accumulation():
    from autobatch.probe import _choose

    # micro 1 is the fastest per sample: a "fastest split of 17 samples" would say 1 × 17
    trials = [Trial(1, 10 * MiB, True, 0.01), Trial(2, 20 * MiB, True, 0.2), Trial(17, 170 * MiB, True, 1.0),
              Trial(18, 181 * MiB, False, 0.0)]
    chosen = _choose(Config(), None, 17, trials, probe=None).options[0]
    assert (chosen.micro_batch_size, chosen.gradient_accumulation_steps) == (17, 1)
    chosen = _choose(Config(gradient_accumulation_steps=4), None, 17, trials, None).options[0]
    assert (chosen.micro_batch_size, chosen.gradient_accumulation_steps) == (17, 4)


def test_the_old_checkpointing_name_is_mapped_without_a_warning(tmp_path):
    from autobatch.workload import sft_config

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args, _ = sft_config(Config(training_args={"gradient_checkpointing": False}), "cpu", str(tmp_path))
        default, _ = sft_config(Config(), "cpu", str(tmp_path))
    assert (args.activation_checkpointing, default.activation_checkpointing) == (False, True)
    with pytest.raises(ConfigError, match="gradient_checkpointing False and activation_checkpointing True disagree"):
        sft_config(Config(training_args={"gradient_checkpointing": False, "activation_checkpointing": True}), "cpu",
                   str(tmp_path))


# -------------------------------------------------------------------------------------- clear lines


def test_a_key_is_named_as_the_user_typed_it(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """issue 18.4: below the CLI a message names the config key; the CLI says the flag the user typed, a YAML
    key stays a key, and Python is told its keyword (not `--max-length`, a flag it never typed)."""
    import autobatch

    model = tiny_model_dir("llama")
    with pytest.raises(ConfigError) as raised:
        autobatch.plan(model_name_or_path=str(model), max_length=4096, device="cpu")
    assert str(raised.value) == f"max_length 4096 is beyond the 2048 positions of {model}: use max_length 2048 or less"
    with pytest.raises(ConfigError, match=r"^model_name_or_path \S*none: no such directory"):
        autobatch.plan(model_name_or_path=str(tmp_path / "none"), device="cpu")
    config = tmp_path / "c.yaml"
    config.write_text(f"model_name_or_path: {model}\nmax_length: 4096\ndevice: cpu\n")
    assert cli.main(["plan", "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"autobatch: error: max_length 4096 is beyond the 2048 positions of {model}: use max_length 2048 or less")
    assert cli.main(["plan", "--device", "estimate"]) == 2  # a key not typed: a person at the CLI is told the flag
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "autobatch: error: --device estimate plans for a GPU this machine does not have: pass --memory-budget with "
        "that card's memory (e.g. --memory-budget 80GB)")
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert cli.main(["sweep", "--effective-batch-sizes", "9,16", "--device", "cpu", "--memory-budget", "300MiB"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "autobatch: error: --effective-batch-sizes 9 is not a multiple of world size 2: use 8 or 10")


def test_max_length_past_the_models_positions_is_one_line(tiny_model_dir, capsys):
    model = tiny_model_dir("llama")
    code = cli.main(["plan", "--model", str(model), "--max-length", "4096", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (f"autobatch: error: --max-length 4096 is beyond the 2048 positions of {model}: "
                       "use --max-length 2048 or less")


@pytest.mark.parametrize("flag", ["--model", "--dataset"])
def test_unreachable_hub_is_one_line_naming_hf_hub_offline(tiny_model_dir, monkeypatch, capsys, flag):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    argv = ["plan", "--device", "cpu", "--memory-budget", "300MiB"]
    argv += ["--model", "org/some-model"] if flag == "--model" else ["--model", str(tiny_model_dir("llama")),
                                                                    "--dataset", "org/some-data"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"autobatch: error: {flag} org/some-")
    assert "the hub (127.0.0.1) is unreachable" in err[-1] and "set HF_HUB_OFFLINE=1" in err[-1]
    assert not any("retry" in line.lower() for line in err)


# -------------------------------------------------------------------------------------------- words

def test_a_plan_that_does_not_fit_has_no_use_line_and_columns_say_their_unit():
    unfit = report.format_plan(small_plan(fits=False))
    assert "does NOT fit" in unfit and "use:" not in unfit
    fits = report.format_plan(small_plan(options=[Option(2, 3, 0.5, True)], gradient_accumulation_steps=3))
    assert "s/micro-batch  s/optimizer-step" in fits
    assert "0.500             1.500" in fits  # 3 micro-batches of 0.5 s per optimizer step


def test_summary_says_mean_loss_and_the_steps_this_invocation_trained():
    from autobatch.report import summary_lines
    from autobatch.train import RunResult

    result = RunResult(output_dir="out", global_step=4, train_loss=1.75, samples_per_s=10.0, peak_memory_bytes=1,
                       predicted_peak_memory_bytes=1, memory_budget_bytes=2, device="cpu",
                       per_device_train_batch_size=2, gradient_accumulation_steps=1, effective_batch_size=2,
                       log_history=[{"loss": 9.0}, {"loss": 2.0}, {"loss": 1.5}, {"train_loss": 1.75}],
                       resumed_from_step=2)
    lines = summary_lines(result)
    assert lines[0].startswith("trained 2 steps (resumed at step 2, now at 4), micro-batch 2")
    assert "mean train loss 1.7500 over 2 steps, last logged loss 1.5000" in lines[2]


def test_notes_name_keys_and_the_cli_says_them_as_the_user_typed_them():
    """issue 18.4: a plan's notes name config keys (what `autobatch.plan()` returns); the CLI's report says each
    as the user gave it: the flag they typed or would type, or the key as their --config file has it."""
    plan = small_plan(notes=["budget: 300 MiB from memory_budget",
                             "stopped at max_micro_batch_size 2: a larger micro-batch may fit",
                             "effective batch 3 ...: effective_batch_size 4 trains faster (see max_length_note.txt)",
                             "`resume` without plan.json: micro-batch from out/checkpoint-2/trainer_state.json"])
    python = report.format_plan(plan)
    assert "note: budget: 300 MiB from memory_budget" in python and "stopped at max_micro_batch_size 2" in python
    flags = report.format_plan(plan, cli._sayer(cli._said_as(None, {})))
    assert "note: budget: 300 MiB from --memory-budget" in flags
    assert "note: stopped at --max-micro-batch-size 2: a larger" in flags
    assert "--effective-batch-size 4 trains faster (see max_length_note.txt)" in flags  # a file name is not a key
    assert "note: --resume without plan.json: micro-batch from out/checkpoint-2/trainer_state.json" in flags
    in_file = report.format_plan(plan, cli._sayer(cli._said_as(None, {"memory_budget": "memory_budget"})))
    assert "from memory_budget" in in_file and "--max-micro-batch-size 2" in in_file
    assert "use: --per_device_train_batch_size 2" in flags  # the TRL flags to use are not notes: left as they are
