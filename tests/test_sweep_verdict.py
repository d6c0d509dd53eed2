"""The sweep from the user's side (issue 24): a rung's plan.yaml runs as written, and the verdict knows its noise."""

import json
import os
from pathlib import Path

import yaml

from autobatch.cli import main


def test_a_sweep_rungs_plan_yaml_runs_as_written_with_evaluation(tiny_model_dir, tiny_dataset_file, tmp_path,
                                                                  monkeypatch, capsys):
    """Eval batch planned, its own output_dir, model and data both absolute: `run --plan` from another folder
    trains and evaluates without an OOM fallback under the sweep's cpu budget."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    model = os.path.relpath(tiny_model_dir(), work)  # relative, as a user types it
    data = os.path.relpath(tiny_dataset_file, work)
    code = main(["sweep", "--model", model, "--dataset", data, "--device", "cpu", "--memory-budget", "60MiB",
                 "--max-length", "64", "--effective-batch-sizes", "4,8", "--gradient-checkpointing", "false",
                 "--eval-fraction", "0.25", "--eval-strategy", "steps", "--eval-steps", "1",
                 "--output-dir", "sweep", "--output", "rung.yaml", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    chosen = next(p for p in report["plans"] if p["effective_batch_size"] == report["recommended_effective_batch_size"])
    saved = yaml.safe_load((work / "rung.yaml").read_text())
    assert saved["per_device_eval_batch_size"] == chosen["per_device_eval_batch_size"] >= 1
    assert chosen["eval_trials"], "the eval batch was measured beside training"
    assert Path(saved["output_dir"]) == work / "sweep" / f"run-B{chosen['effective_batch_size']}"
    assert saved["model_name_or_path"] == str(tiny_model_dir())
    assert saved["datasets"][0]["data_files"] == str(tiny_dataset_file)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = main(["run", "--plan", str(work / "rung.yaml"), "--max-steps", "2", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    run = json.loads(captured.out)["run"]
    assert run["eval_fallbacks"] == [] and run["fallbacks"] == [], "no OOM in training or evaluation"
    assert any("eval_loss" in entry for entry in run["log_history"]), "it evaluated"
    assert Path(run["output_dir"]) == Path(saved["output_dir"])
    assert not (work / "sweep" / "config.json").exists(), "the model is not saved beside sweep.db"
