"""Config tests: sizes, YAML < CLI precedence, TRL key mapping, collected validation, plan.yaml. No torch
except the two tests that ask TRL itself whether our keys are its keys."""

import dataclasses
import os
import re
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, MiB, make_plan

from autobatch import config as config_module
from autobatch.config import (
    BUILTIN_CONFIG,
    MODEL_ARGS_KEYS,
    MODEL_CONFIG_LORA_KEYS,
    SCRIPT_ARGUMENTS_KEYS,
    Config,
    build_config,
    parse_value,
    validate_config,
)
from autobatch.errors import AutobatchError, ConfigError
from autobatch.planfile import plan_yaml_text, write_plan_yaml
from autobatch.units import format_bytes, parse_bytes

SHIPPED_CONFIGS = sorted((ROOT / "configs").glob("**/*.yaml"))


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- sizes

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("300MiB", 300 * 2**20),
        ("80GB", 80 * 10**9),
        ("2.5GiB", int(2.5 * 2**30)),
        ("12345", 12345),
        (12345, 12345),
        ("512 mib", 512 * 2**20),
        ("1k", 1024),
        ("1e3", 1000),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "", "300 furlongs", "MiB", "-5MiB", "0", "0.1"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ConfigError, match=r"--memory-budget"):
        parse_bytes(text)


def test_format_bytes():
    sizes = (512, 1536, 300 * MiB, 3 * 2**40)
    assert [format_bytes(n) for n in sizes] == ["512B", "1.5KiB", "300.0MiB", "3.0TiB"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("false", False), ("True", True), ("1e-5", 1e-5), ("1.0e-5", 1e-5), ("3", 3),
     ("adamw_torch", "adamw_torch"), ("[q_proj, v_proj]", ["q_proj", "v_proj"]), ("auto", "auto"),
     ("a: b: c", "a: b: c")],
)
def test_parse_value_reads_yaml(text, expected):
    assert parse_value(text) == expected


# ----------------------------------------------------------------------------------------- precedence

def test_defaults_then_yaml_then_cli(tmp_path):
    path = write(tmp_path, "max_length: 128\neffective_batch_size: 16\nmemory_budget: 300MiB\n"
                           "learning_rate: 1e-5\n")
    config = build_config(path, {"max_length": 64, "headroom": 0.2})
    # CLI beats YAML; 1e-5 is read as a float, as TRL's parser would
    assert config.training_args == {"max_length": 64, "learning_rate": 1e-5}
    assert config.effective_batch_size == 16  # from YAML
    assert config.memory_budget_bytes == 300 * MiB
    assert config.headroom == 0.2  # from CLI
    assert config.max_micro_batch_size == 512 and config.per_device_train_batch_size == "auto"  # defaults


def test_no_file_gives_defaults(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert build_config() == Config()
    assert Config().world_size == 1


def test_world_size_from_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert build_config(overrides={"effective_batch_size": 32}).world_size == 4
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        build_config()


def test_builtin_config_values():
    config = build_config(BUILTIN_CONFIG)
    assert config.model_name_or_path is None and config.dataset_name is None
    assert config.effective_batch_size == 16 and config.max_micro_batch_size == 64
    assert config.training_args["max_length"] == 256
    assert config.training_args["gradient_checkpointing"] is False and config.training_args["bf16"] is False
    assert config.training_args["output_dir"] == "autobatch-tiny-out"


# ------------------------------------------------------------------------------------------ TRL keys

def test_trl_model_config_lora_keys_map_into_lora(tmp_path):
    path = write(tmp_path, "use_peft: true\nlora_r: 8\nlora_alpha: 16\nlora_dropout: 0.1\n"
                           "lora_target_modules: [q_proj, v_proj]\nuse_rslora: 'true'\n")
    config = build_config(path)
    assert config.lora == {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "task_type": "CAUSAL_LM",
                           "target_modules": ["q_proj", "v_proj"], "use_rslora": True}
    assert not set(MODEL_CONFIG_LORA_KEYS) & set(config.training_args)


def test_lora_section_aliases_and_trl_defaults(tmp_path):
    path = write(tmp_path, "lora:\n  r: 4\n  alpha: 8\n  target_modules: all-linear\n  bias: lora_only\n")
    config = build_config(path)
    # unset keys take TRL's `use_peft` defaults, so `trl sft` reading plan.yaml builds the same adapter
    assert config.lora == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "task_type": "CAUSAL_LM",
                           "target_modules": "all-linear", "bias": "lora_only"}


def test_cli_lora_keys_override_yaml_section(tmp_path):
    path = write(tmp_path, "lora: {r: 4, dropout: 0.0}\n")
    assert build_config(path, {"lora_r": 32}).lora["r"] == 32
    assert build_config(path, {"use_peft": False}).lora is None
    assert build_config(overrides={"use_peft": "true"}).lora["r"] == 16


def test_lora_keys_without_use_peft_are_an_error():
    with pytest.raises(ConfigError, match=r"--lora-r would be ignored: LoRA is off; add `use_peft: true`"):
        build_config(overrides={"lora_r": 8}, names={"lora_r": "--lora-r"})


def test_conflicting_lora_spellings(tmp_path):
    path = write(tmp_path, "use_peft: true\nlora_alpha: 16\nlora: {alpha: 32}\n")
    with pytest.raises(ConfigError, match="disagree"):
        build_config(path)


def test_model_config_keys_go_to_model_args(tmp_path):
    path = write(tmp_path, "dtype: bfloat16\nattn_implementation: sdpa\nmodel_revision: main\n")
    config = build_config(path)
    assert config.model_args == {"dtype": "bfloat16", "attn_implementation": "sdpa", "model_revision": "main"}
    assert config.training_args == {}


def test_other_keys_pass_into_training_args(tmp_path):
    path = write(tmp_path, "max_length: 128\noptim: adamw_torch\nneftune_noise_alpha: 5\n")
    config = build_config(path)
    assert config.training_args == {"max_length": 128, "optim": "adamw_torch", "neftune_noise_alpha": 5}
    assert config.memory_budget_bytes is None


def test_unknown_yaml_keys_are_refused_at_load_naming_the_closest_key(tmp_path):
    """autobatch's own keys are candidates too (issue 24: effective_batch_szie was offered an eval key)."""
    path = write(tmp_path, "max_lenght: 128\nmemory_budjet: 1GiB\neffective_batch_szie: 8\n")
    with pytest.raises(ConfigError) as caught:
        build_config(path)
    message = str(caught.value)
    assert message.startswith("unknown keys max_lenght (in ") and message.endswith(
        ": keys are SFTConfig/TrainingArguments fields or autobatch options")
    for typo, meant in (("max_lenght", "max_length"), ("memory_budjet", "memory_budget"),
                        ("effective_batch_szie", "effective_batch_size")):
        assert re.search(rf"{typo} \(in [^)]*\) \(did you mean {meant}\?\)", message), message


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("False", False), ("no", False), (1, True)])
def test_boolean_strings_are_converted(value, expected):
    config = build_config(overrides={"packing": value, "gradient_checkpointing": value, "bf16": value})
    assert config.training_args == {"packing": expected, "gradient_checkpointing": expected, "bf16": expected}


# ------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_length": 0}, "max_length must be a positive integer"),
        ({"max_length": "long"}, "max_length must be a positive integer"),
        ({"effective_batch_size": 0}, "effective_batch_size must be a positive integer"),
        ({"effective_batch_size": -8}, "effective_batch_size must be a positive integer"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be auto or a positive int"),
        ({"gradient_accumulation_steps": "x"}, "gradient_accumulation_steps must be auto or a positive int"),
        ({"headroom": 1}, "headroom must be a fraction"),
        ({"headroom": -0.1}, "headroom must be a fraction"),
        ({"device": "tpu"}, "device must be one of cuda, cpu, estimate"),
        ({"memory_budget": "lots"}, "memory_budget: cannot read 'lots'"),
        ({"max_micro_batch_size": 0}, "max_micro_batch_size must be an integer >= 1"),
        ({"world_size": 0}, "world_size must be an integer >= 1"),
        ({"packing": "maybe"}, "packing must be true or false"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"use_peft": True, "lora_r": 0}, "LoRA rank"),
        ({"lora": {"dropout": 1.5}}, "lora.dropout must be a fraction"),
        ({"lora": 3}, "lora must be a mapping"),
        ({"eval_fraction": 1.5}, "eval_fraction must be a fraction"),
        ({"dataset_name": "missing/data.jsonl"}, "no such file 'missing/data.jsonl'"),
    ],
)
def test_bad_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=overrides)


def test_every_problem_in_one_error():
    names = {"max_length": "--max-length", "device": "--device", "memory_budget": "--memory-budget"}
    with pytest.raises(ConfigError) as caught:
        overrides = {"max_length": 0, "device": "tpu", "memory_budget": "lots", "headroom": 2}
        build_config(overrides=overrides, names=names)
    message = str(caught.value)
    assert message.startswith("4 problems:") and "\n" not in message
    for part in ("--max-length", "--device", "--memory-budget", "headroom"):
        assert part in message


def test_yaml_problems_name_the_file(tmp_path):
    path = write(tmp_path, "max_length: -1\n")
    with pytest.raises(ConfigError, match=rf"max_length \(in {path}\) must be a positive integer"):
        build_config(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4},
         r"4 × gradient_accumulation_steps 4 × world size 1 = 16, not effective_batch_size 32"),
        ({"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "world_size": 3},
         r"not a multiple of world size 3: use 30 or 33"),
        ({"per_device_train_batch_size": 5}, r"per_device_train_batch_size 5 does not divide the 32 samples"),
        ({"gradient_accumulation_steps": 3}, r"gradient_accumulation_steps 3 does not divide the 32 samples"),
    ],
)
def test_effective_batch_is_never_rounded(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides={"effective_batch_size": 32, **overrides})


def test_exact_effective_batch_is_accepted():
    config = build_config(overrides={"effective_batch_size": 32, "per_device_train_batch_size": 4,
                                     "gradient_accumulation_steps": 4, "world_size": 2})
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (4, 4)
    config = build_config(overrides={"per_device_train_batch_size": "AUTO"})
    assert config.per_device_train_batch_size == "auto"


def test_validate_config_checks_a_python_config():
    config = validate_config(Config(device="CPU", training_args={"packing": "yes"}))
    assert config.device == "cpu" and config.training_args == {"packing": True}
    with pytest.raises(ConfigError, match="effective_batch_size must be a positive integer"):
        validate_config(Config(effective_batch_size=0))


# ----------------------------------------------------------------------------------------- files

def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"`config` .*nope\.yaml: file not found"):
        build_config(tmp_path / "nope.yaml")


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "max_length: 128\neffective_batch_size: [32\nbf16: false\n")
    with pytest.raises(ConfigError, match=rf"`config` {path}: not valid YAML at line \d+"):
        build_config(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        build_config(write(tmp_path, text))


def test_config_directory_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        build_config(tmp_path)


def test_empty_file_is_the_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert build_config(write(tmp_path, "# nothing\n")) == Config()


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = build_config(path)
    assert config.per_device_train_batch_size == "auto" and config.gradient_accumulation_steps == "auto"
    assert config.effective_batch_size == {"tiny.yaml": 16, "seed-opt350m-imdb.yaml": 32}[path.name]


def test_shipped_configs_exist():
    assert {p.name for p in SHIPPED_CONFIGS} >= {"tiny.yaml", "seed-opt350m-imdb.yaml"}


def test_tiny_config_copy_is_identical():
    assert (ROOT / "configs" / "tiny.yaml").read_bytes() == BUILTIN_CONFIG.read_bytes()


def test_seed_config_is_the_classic_example():
    config = build_config(ROOT / "configs" / "seed-opt350m-imdb.yaml")
    assert (config.model_name_or_path, config.dataset_name, config.dataset_train_split) == (
        "facebook/opt-350m", "imdb", "train")
    assert config.training_args == {"dataset_text_field": "text", "learning_rate": 1e-5, "weight_decay": 0.01,
                                    "max_steps": 1000, "logging_steps": 100, "save_steps": 500,
                                    "output_dir": "opt350m-imdb-sft"}


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_training_keys_are_sft_config_fields(path):
    trl = pytest.importorskip("trl")
    valid = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    assert set(build_config(path).training_args) <= valid, set(build_config(path).training_args) - valid


# ------------------------------------------------------------------------------------------ plan.yaml

def allowed_plan_keys(config: Config) -> set[str]:
    trl_model_keys = {"model_name_or_path", "use_peft", *MODEL_CONFIG_LORA_KEYS, *MODEL_ARGS_KEYS}
    batch = {"per_device_train_batch_size", "gradient_accumulation_steps", "activation_checkpointing", "use_cpu"}
    return set(config.training_args) | set(SCRIPT_ARGUMENTS_KEYS) | trl_model_keys | batch


def test_plan_yaml_round_trips(tmp_path):
    source = write(tmp_path, "model_name_or_path: some/model\ndataset_name: imdb\ndataset_text_field: text\n"
                             "effective_batch_size: 32\nmax_length: 256\nlearning_rate: 1e-5\nbf16: false\n"
                             "memory_budget: 300MiB\ndevice: cpu\nheadroom: 0.1\nmax_micro_batch_size: 64\n"
                             "dtype: float32\nlora: {r: 8, target_modules: [q_proj, v_proj]}\n")
    config = build_config(source)
    text = plan_yaml_text(config, make_plan())
    data = yaml.safe_load(text)
    assert set(data) <= allowed_plan_keys(config)
    autobatch_only = {"effective_batch_size", "memory_budget", "device", "headroom", "max_micro_batch_size"}
    assert not autobatch_only & set(data)
    assert data["use_cpu"] is True  # measured on the CPU: trl sft trains there too
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("effective batch 32 = per_device_train_batch_size 16 × gradient_accumulation_steps 2" in line
               for line in header)
    assert any("memory budget 300.0MiB (314572800 bytes)" in line for line in header)

    plan_path = tmp_path / "plan.yaml"
    write_plan_yaml(plan_path, text)
    again = build_config(plan_path)
    assert (again.per_device_train_batch_size, again.gradient_accumulation_steps) == (16, 2)
    assert again.training_args == {**config.training_args, "activation_checkpointing": True,  # TRL's default, said
                                   "use_cpu": True}
    assert again.lora == config.lora and again.model_args == config.model_args
    assert (again.model_name_or_path, again.dataset_name) == ("some/model", "imdb")


def test_plan_yaml_writes_the_builtin_model_path():
    config = build_config(BUILTIN_CONFIG)
    data = yaml.safe_load(plan_yaml_text(config, make_plan(), model_path="/cache/autobatch/tiny"))
    assert data["model_name_or_path"] == "/cache/autobatch/tiny"
    assert "dataset_name" not in data  # the built-in sample has no TRL name; a comment says so
    assert data["max_length"] == 256 and data["per_device_train_batch_size"] == 16


def test_plan_yaml_keeps_lora_keys_trl_cannot_express_as_comments():
    config = build_config(overrides={"lora": {"r": 8, "bias": "all"}})
    text = plan_yaml_text(config, make_plan())
    assert "bias" not in yaml.safe_load(text) and "lora.bias='all'" in text


def test_plan_yaml_refuses_a_plan_that_does_not_fit():
    with pytest.raises(AutobatchError, match="does not fit"):
        plan_yaml_text(Config(), make_plan(fits=False))


def test_plan_yaml_is_read_by_trl_sft(tmp_path):
    """`trl sft --config plan.yaml` parses with TRL's own parser, unknown keys failing."""
    trl = pytest.importorskip("trl")
    from trl.scripts.utils import DatasetMixtureConfig

    config = build_config(overrides={"model_name_or_path": "some/model", "dataset_name": "imdb",
                                     "bf16": False, "max_length": 128, "learning_rate": 1e-5,
                                     "use_peft": True, "lora_r": 8, "lora_target_modules": ["q_proj"],
                                     "dtype": "float32"})
    path = write_plan_yaml(tmp_path / "plan.yaml", plan_yaml_text(config, make_plan()))
    parser = trl.TrlParser((trl.ScriptArguments, trl.SFTConfig, trl.ModelConfig, DatasetMixtureConfig))
    script, training, model, _ = parser.parse_args_and_config(args=["--config", str(path)],
                                                              fail_with_unknown_args=True)
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (16, 2)
    assert training.max_length == 128 and training.learning_rate == 1e-5
    assert (model.use_peft, model.lora_r, model.model_name_or_path) == (True, 8, "some/model")
    assert script.dataset_name == "imdb"


# -------------------------------------------------------------------------------------- atomic write

def test_write_plan_yaml_into_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"--output .*: directory .* does not exist"):
        write_plan_yaml(tmp_path / "no" / "plan.yaml", "a: 1\n")


def test_write_plan_yaml_onto_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        write_plan_yaml(tmp_path, "a: 1\n")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(config_module.os, "replace", broken_replace)
    with pytest.raises(ConfigError, match="No space left on device"):
        write_plan_yaml(tmp_path / "plan.yaml", "a: 1\n")
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = write(tmp_path, "old: 1\n", "plan.yaml")
    monkeypatch.setattr(config_module.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(ConfigError, match="I/O error"):
        write_plan_yaml(target, "new: 2\n")
    assert target.read_text() == "old: 1\n" and os.listdir(tmp_path) == ["plan.yaml"]


@pytest.mark.parametrize("budget", ["300MiB", "2.5GiB", "80GB", 123456789, "160MiB,100MiB"])
def test_memory_budget_is_read_alike_by_build_config_and_api_load(monkeypatch, budget):
    """issue 18.4: one parser of memory_budget: `autobatch.load(config, memory_budget=...)` takes what a
    YAML file or --memory-budget takes (it refused the per-rank `160MiB,100MiB`)."""
    from autobatch import api

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    built = build_config(overrides={"memory_budget": budget}).memory_budget_bytes
    loaded = api.load(build_config(), memory_budget=budget).memory_budget_bytes
    assert built == loaded == config_module.parse_memory_budget(budget)
    assert loaded != build_config().memory_budget_bytes


@pytest.mark.parametrize("args, on", [({"eval_strategy": "steps"}, True), ({"evaluation_strategy": "epoch"}, True),
                                      ({"eval_strategy": "no"}, False), ({}, False)])
def test_whether_evaluation_is_on_has_one_answer(args, on):
    """issue 18.4: "evaluation is on" is `eval_strategy(config) != "no"` everywhere (the old name read too): the
    probe plans an eval batch, the output-dir check asks for eval data, exactly when it is on."""
    from autobatch import probe, rundir

    with_data = dataclasses.replace(build_config(), eval_fraction=0.1, training_args=args)
    without = dataclasses.replace(with_data, eval_fraction=None)
    assert (config_module.eval_strategy(with_data) != "no") == on
    assert probe.evaluates(with_data) == on and not probe.evaluates(without)
    if on:
        with pytest.raises(ConfigError, match=r"needs eval data"):
            rundir.check_eval_split(without)
    else:
        rundir.check_eval_split(without)


def test_a_multiple_of_the_world_size_is_one_message_from_config_and_planner():
    """issue 18.4: config validation and the probe's planner refuse an effective batch off the world size with
    the same words (one helper, `planner.check_effective_batch`), naming the config key."""
    from autobatch.planner import check_effective_batch

    with pytest.raises(ConfigError) as planned:
        check_effective_batch(30, 4)
    with pytest.raises(ConfigError) as built:
        build_config(overrides={"effective_batch_size": 30, "world_size": 4})
    assert str(planned.value) == "effective_batch_size 30 is not a multiple of world size 4: use 28 or 32"
    assert str(planned.value) in str(built.value)
