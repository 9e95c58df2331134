"""A local signal that runs away is said in the epoch it is seen, on stderr and in run.json."""

import json
import math

import pytest

from bench.records import RUNAWAY_BOUNDS, RunFailed, RunRecord, stop_if_diverged


def record(tmp_path):
    rec = RunRecord(
        tmp_path / "run",
        {k: "x" for k in ("run_id", "method", "task", "model", "groups", "executor", "seed")},
        {},
    )
    rec.start()
    return rec


def test_a_synthetic_gradient_past_its_bound_is_one_line_naming_stage_and_ratio(tmp_path, capsys):
    rec = record(tmp_path)
    bound = RUNAWAY_BOUNDS["synth_norm_ratio"]
    rows = {
        ("", "train_loss"): 2.0,
        ("1", "synth_norm_ratio"): 3.5e4,
        ("2", "synth_norm_ratio"): bound,  # at the bound: not past it
        ("3", "critic_loss"): 1.0,
    }
    stop_if_diverged(rec, rows, 1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "epoch 1, stage 1" in lines[0] and "3.5e+04" in lines[0] and "diverging" in lines[0]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["warnings"] == [
        {"epoch": 1, "stage": "1", "metric": "synth_norm_ratio", "value": 3.5e4, "bound": bound}
    ]
    assert info["status"] == "running"  # a warning, not an end


def test_a_non_finite_critic_loss_is_said_and_run_json_stays_strict_json(tmp_path, capsys):
    rec = record(tmp_path)
    rows = {("", "train_loss"): math.nan, ("2", "critic_loss"): math.inf}
    with pytest.raises(RunFailed, match="diverged at epoch 3"):
        stop_if_diverged(rec, rows, 3)
    assert "epoch 3, stage 2: critic loss inf nats" in capsys.readouterr().err
    text = (tmp_path / "run" / "run.json").read_text()
    info = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in run.json"))
    assert info["status"] == "diverged"
    assert info["warnings"][0]["value"] == "inf"


def test_warnings_accumulate_over_epochs(tmp_path, capsys):
    rec = record(tmp_path)
    for epoch in (1, 2):
        stop_if_diverged(rec, {("", "train_loss"): 1.0, ("1", "critic_loss"): 60.0 * epoch}, epoch)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [w["epoch"] for w in info["warnings"]] == [1, 2]
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
