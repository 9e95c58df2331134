"""A local signal that runs away is said in the epoch it is seen, on stderr and in run.json."""

import json
import math
from pathlib import Path

import pytest

from bench.records import (
    RUNAWAY_AFTER,
    RUNAWAY_BOUNDS,
    RunFailed,
    RunRecord,
    stop_if_diverged,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")


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
    stop_if_diverged(rec, rows, 1, 100)
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
        stop_if_diverged(rec, rows, 3, 7)  # non-finite: said at once
    assert "epoch 3, stage 2: critic loss inf nats" in capsys.readouterr().err
    text = (tmp_path / "run" / "run.json").read_text()
    info = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in run.json"))
    assert info["status"] == "diverged"
    values = {w["metric"]: w["value"] for w in info["warnings"]}
    assert values == {"critic_loss": "inf", "train_loss": "nan"}


def test_a_training_loss_past_its_bound_is_said_for_the_whole_network(tmp_path, capsys):
    rec = record(tmp_path)
    stop_if_diverged(rec, {("", "train_loss"): 7.5e19}, 1, 100)
    assert "epoch 1: training loss 7.5e+19 nats (bound 100)" in capsys.readouterr().err
    assert rec.info["warnings"][0]["metric"] == "train_loss"


def test_a_synthesizers_first_steps_are_not_judged(tmp_path, capsys):
    rec = record(tmp_path)
    rows = {("", "train_loss"): 2.0, ("1", "synth_norm_ratio"): 49.0}
    stop_if_diverged(rec, rows, 1, RUNAWAY_AFTER - 1)
    assert capsys.readouterr().err == "" and "warnings" not in rec.info
    stop_if_diverged(rec, rows, 2, RUNAWAY_AFTER)
    assert "epoch 2, stage 1" in capsys.readouterr().err


def test_warnings_accumulate_over_epochs(tmp_path, capsys):
    rec = record(tmp_path)
    for epoch in (1, 2):
        rows = {("", "train_loss"): 1.0, ("1", "critic_loss"): 60.0 * epoch}
        stop_if_diverged(rec, rows, epoch, 100 * epoch)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [w["epoch"] for w in info["warnings"]] == [1, 2]
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


@pytest.mark.skipif(not FMNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_a_run_whose_synthetic_gradients_run_away_says_so_in_that_epoch(tmp_path, capsys):
    """DNI's synthesizer at 50x its rate overshoots on Fashion-MNIST (its network, on Adam,
    still learns): the line comes in epoch 1 (100 batches), naming the stage and the ratio,
    and run.json keeps it."""
    from bench.cli import main

    args = [
        "run",
        "--method",
        "dni",
        "-o",
        "synth_lr=0.05",
        "--task",
        "fashion-mnist",
        "--epochs",
        "1",
        "--limit-train",
        "12800",
        "--limit-test",
        "256",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 0, err
    line = next(x for x in err.splitlines() if "diverging" in x)
    assert line.startswith("lcbench: epoch 1, stage 1: synthetic gradients ")
    ratio = float(line.split("synthetic gradients ")[1].split(" x")[0])
    (info,) = tmp_path.glob("*/*/run.json")
    warning = json.loads(info.read_text())["warnings"][0]
    assert warning["metric"] == "synth_norm_ratio" and warning["epoch"] == 1
    assert ratio == pytest.approx(warning["value"], rel=1e-2) and ratio > warning["bound"]
