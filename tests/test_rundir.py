"""What `autobatch run` checks before probing (no torch needed), the cgroup budget, and atomic writes."""

import json
import logging
import os
import subprocess
import sys

import pytest
from helpers import error_lines, listing

from autobatch import rundir
from autobatch.cli import main
from autobatch.config import build_config, write_atomic
from autobatch.errors import ConfigError
from autobatch.memory import cgroup_memory_room_bytes


def checkpoint(out, step: int, complete: bool = True, train_batch_size: int = 4):
    rundir.claim_output_dir(out)  # an earlier autobatch run's dir
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")  # a whole, empty safetensors
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "train_batch_size": train_batch_size}))
    return path


@pytest.mark.parametrize("earlier", ["checkpoint", "plan.json"])
def test_output_dir_of_an_earlier_run_is_refused_and_left_alone(tmp_path, capsys, earlier):
    out = tmp_path / "out"
    if earlier == "checkpoint":
        checkpoint(out, 2)
    else:
        rundir.claim_output_dir(out)
        (out / "plan.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    before = listing(out)
    assert main(["run", "--device", "cpu", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    shown = "checkpoint-2" if earlier == "checkpoint" else earlier
    assert line == (f"autobatch: error: --output-dir {out} holds an earlier run ({shown}): pass --resume to "
                    "continue it, --overwrite-output-dir to train over it, or choose another --output-dir; nothing "
                    "was changed")
    assert "micro=" not in err and listing(out) == before


def test_an_earlier_run_is_refused_in_the_words_of_python_of_the_command_line_and_of_a_config_file(tmp_path,
                                                                                                    capsys):
    """Below the CLI the message names keys and keyword arguments; the CLI says each as the user gave it."""
    import autobatch

    out = tmp_path / "out"
    checkpoint(out, 2)
    with pytest.raises(ConfigError) as caught:
        autobatch.run(device="cpu", output_dir=str(out))
    assert "pass `resume` to continue it, `overwrite` to train over it, or choose another output_dir" in str(
        caught.value) and "--" not in str(caught.value)
    config = tmp_path / "job.yaml"
    config.write_text(f"output_dir: {out}\n")
    assert main(["run", "--device", "cpu", "--config", str(config)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"autobatch: error: output_dir {out} holds") and line.endswith(
        "pass --resume to continue it, --overwrite-output-dir to train over it, or choose another output_dir; "
        "nothing was changed")


def test_output_dir_autobatch_did_not_claim_is_refused_whatever_the_flags(tmp_path):
    """The final save writes README.md, config.json, tokenizer files: a folder of someone's files is not a run dir."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("notes")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(ConfigError, match=r"holds files autobatch did not write \(README.md\)"):
            rundir.check_can_run(build_config(overrides={"output_dir": str(out)}), **flags)
    rundir.check_can_run(build_config(overrides={"output_dir": str(tmp_path / "new")}))  # new or empty: fine
    (tmp_path / "empty").mkdir()
    rundir.check_can_run(build_config(overrides={"output_dir": str(tmp_path / "empty")}))


@pytest.mark.parametrize("flag", [[], ["--overwrite-output-dir"], ["--resume"]])
def test_output_dir_that_is_the_model_folder_is_refused_with_nothing_touched(tiny_model_dir, tiny_dataset_file,
                                                                             tmp_path, capsys, flag):
    """issue 23.1: --output-dir M with --model M deleted the shards and overwrote config.json and the tokenizer."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    (model / "checkpoint-3").mkdir()  # even a folder with an autobatch-looking name is not autobatch's
    before = {p: p.read_bytes() for p in sorted(model.rglob("*")) if p.is_file()}
    assert main(["run", "--model", str(model), "--dataset", str(tiny_dataset_file), "--output-dir", str(model),
                 "--device", "cpu",
                 "--memory-budget", "200MiB", "--max-steps", "1", *flag]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "did not write" in line and "the --model folder" in line and "nothing was changed" in line
    assert {p: p.read_bytes() for p in sorted(model.rglob("*")) if p.is_file()} == before


def test_resume_in_an_empty_dir_fails_with_one_line_before_torch_loads(tmp_path):
    """No probing, no torch import: the refusal costs the time of `autobatch --help`."""
    code = (
        "import sys\nfrom autobatch.cli import main\n"
        f"code = main(['run', '--resume', '--output-dir', {str(tmp_path / 'empty')!r}])\n"
        "print('torch' in sys.modules, code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "2"], done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "--resume: no complete checkpoint" in lines[0] and "without --resume" in lines[0]
    assert not (tmp_path / "empty").exists()


def test_resume_takes_the_newest_complete_checkpoint_and_warns_of_a_cut_one(tmp_path, caplog):
    out = tmp_path / "out"
    checkpoint(out, 2)
    newest = checkpoint(out, 10)
    checkpoint(out, 12, complete=False)  # cut mid-save: no trainer_state.json
    checkpoint(out, 4)
    config = build_config(overrides={"output_dir": str(out)})
    with caplog.at_level(logging.WARNING, logger="autobatch"):
        assert rundir.resume_checkpoint(config, warn=True) == newest
    assert [r.getMessage() for r in caplog.records] == [
        f"`resume`: skipping {out / 'checkpoint-12'}: no trainer_state.json, it was cut mid-save"]  # --resume at the CLI
    assert [p.name for p in rundir.complete_checkpoints(out)] == ["checkpoint-10", "checkpoint-4", "checkpoint-2"]


def test_resume_with_only_a_cut_checkpoint_is_refused(tmp_path):
    out = tmp_path / "out"
    checkpoint(out, 3, complete=False)
    with pytest.raises(ConfigError, match=r"no complete checkpoint .*only incomplete ones \(checkpoint-3\)"):
        rundir.check_can_run(build_config(overrides={"output_dir": str(out)}), resume=True)


def test_resume_without_plan_json_takes_the_batch_from_the_checkpoint(tmp_path):
    from autobatch import planfile

    out = tmp_path / "out"
    path = checkpoint(out, 4, train_batch_size=4)
    plan = planfile.resume_plan(build_config(overrides={"output_dir": str(out), "effective_batch_size": 24}))
    assert (plan.per_device_train_batch_size, plan.gradient_accumulation_steps, plan.effective_batch_size) == (4, 6, 24)
    assert plan.trials == [] and "trainer_state.json" in plan.notes[0]
    with pytest.raises(ConfigError, match="pass the effective_batch_size"):  # the accumulation is not in the checkpoint
        planfile.plan_from_checkpoint(build_config(overrides={"output_dir": str(out), "effective_batch_size": None}),
                                      path)
    with pytest.raises(ConfigError, match="gives micro-batch 4"):  # a different micro-batch would move the data
        planfile.plan_from_checkpoint(build_config(overrides={"output_dir": str(out), "effective_batch_size": 24,
                                                              "per_device_train_batch_size": 8}), path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"eval_strategy": "steps"}, "needs eval data"),
        ({"eval_strategy": "steps", "dataset_test_split": "test", "dataset_name": "{data}"}, "only split is train"),
    ],
    ids=["no-eval-data", "local-file-has-no-test-split"],
)
def test_eval_data_is_checked_before_probing(tmp_path, overrides, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    values = {k: v.format(data=data) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises(ConfigError, match=message):
        rundir.check_can_run(build_config(overrides={"output_dir": str(tmp_path / "out"), **values}))


def write_cgroup(tmp_path, lines: list[str], files: dict[str, str]):
    (tmp_path / "proc").write_text("\n".join(lines) + "\n")
    for name, text in files.items():
        path = tmp_path / "fs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return cgroup_memory_room_bytes(tmp_path / "proc", tmp_path / "fs")


def test_cgroup_v2_limit_less_usage_not_counting_inactive_page_cache(tmp_path):
    room = write_cgroup(tmp_path, ["0::/job.slice/run-1"], {
        "job.slice/run-1/memory.max": "8000000000\n", "job.slice/run-1/memory.current": "3000000000\n",
        "job.slice/run-1/memory.stat": "anon 2500000000\ninactive_file 500000000\nactive_file 1\n"})
    assert room == (8_000_000_000 - (3_000_000_000 - 500_000_000), "cgroup v2")


def test_cgroup_v1_limit_in_the_mount_root_as_a_container_sees_it(tmp_path):
    room = write_cgroup(tmp_path, ["4:memory:/docker/abc", "1:cpu:/docker/abc"], {
        "memory/memory.limit_in_bytes": "4294967296\n", "memory/memory.usage_in_bytes": "1073741824\n",
        "memory/memory.stat": "total_inactive_file 0\n"})
    assert room == (4294967296 - 1073741824, "cgroup v1")


@pytest.mark.parametrize(
    "lines, files",
    [
        (["0::/"], {"memory.max": "max\n", "memory.current": "5\n"}),
        (["4:memory:/"], {"memory/memory.limit_in_bytes": "9223372036854771712\n"}),
        (["1:cpu:/"], {}),
    ],
    ids=["v2-max", "v1-unlimited", "no-memory-controller"],
)
def test_cgroup_without_a_limit_gives_none(tmp_path, lines, files):
    assert write_cgroup(tmp_path, lines, files) is None


def test_default_cpu_budget_is_the_cgroup_room_when_smaller(monkeypatch):
    from autobatch import memory

    monkeypatch.setattr(memory, "available_ram_bytes", lambda: 16 * 2**30)
    monkeypatch.setattr(memory, "cgroup_memory_room_bytes", lambda: (3 * 2**30, "cgroup v2"))
    backend = memory.make_backend("cpu", None)
    assert backend.budget_bytes == 3 * 2**30 and backend.budget_source == "cgroup v2 memory limit less what is in use"
    monkeypatch.setattr(memory, "cgroup_memory_room_bytes", lambda: (32 * 2**30, "cgroup v2"))
    backend = memory.make_backend("cpu", None)
    assert backend.budget_bytes == 16 * 2**30 and backend.budget_source == "available RAM"


def test_write_atomic_leaves_the_old_file_and_no_temp_file_when_it_fails(tmp_path, monkeypatch):
    target = tmp_path / "plan.json"
    target.write_text("old")

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    monkeypatch.undo()
    write_atomic(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_overwrite_output_dir_removes_only_the_earlier_checkpoints(tmp_path):
    from autobatch import train

    out = tmp_path / "out"
    checkpoint(out, 2)
    checkpoint(out, 5, complete=False)
    (out / "plan.json").write_text("{}")
    (out / "checkpoint-notes.txt").write_text("not a checkpoint folder")
    rundir.check_can_run(build_config(overrides={"output_dir": str(out)}), overwrite=True)
    assert len(list(out.iterdir())) == 5, "the check itself changes nothing"
    train._remove_earlier_checkpoints(str(out))
    assert sorted(p.name for p in out.iterdir()) == [".autobatch-run", "checkpoint-notes.txt", "plan.json"]


def test_a_run_without_training_data_names_the_flag_at_the_command_line_and_the_key_in_python(
    tiny_model_dir, tmp_path, capsys
):
    import autobatch
    from autobatch.errors import ConfigError

    args = ["run", "--model", str(tiny_model_dir("llama")), "--device", "cpu", "--output-dir", str(tmp_path / "out")]
    assert main(args) == 2
    said = "autobatch: error: run needs training data: pass --dataset (a hub name or a local json/jsonl/csv file)"
    assert error_lines(capsys.readouterr().err) == [said]
    with pytest.raises(ConfigError, match=r"pass dataset_name \(a hub name"):
        autobatch.run(model_name_or_path=str(tiny_model_dir("llama")), device="cpu", output_dir=str(tmp_path / "py"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "py").exists()


def test_an_output_dir_under_a_file_is_refused_with_the_flag_typed(tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    assert main(["run", "--device", "cpu", "--output-dir", str(blocker / "out")]) == 2
    said = (f"autobatch: error: --output-dir {blocker / 'out'}: {blocker} is not a writable directory; "
            "pass --output-dir with one")
    assert error_lines(capsys.readouterr().err) == [said]
    assert blocker.read_text() == "a file, not a folder"
