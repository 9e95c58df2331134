"""--tensorboard: the event files of a run, read back, hold every row of its metrics.csv (per
stage where it has one), and its config as hparams; without the package, one line."""

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main

TINY = ["--task", "digits", "--model", "mlp", "--batch-size", "64", "--limit-train", "256",
        "--limit-test", "128", "--epochs", "2", "--quiet"]  # fmt: skip


def csv_rows(out: Path) -> dict[tuple, float]:
    (path,) = out.glob("*/*/metrics.csv")
    with open(path) as f:
        return {
            (int(r["epoch"]), r["stage"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)
        }


def events(folder: Path) -> tuple[dict[tuple, float], dict[str, float]]:
    """(epoch, stage, metric) -> value of the curves, and the hparams' metrics, read back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = folder.iterdir()
    found, final = {}, {}
    for path in sorted({p.parent for p in run.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                if tag.startswith("hparam/"):
                    final[tag.removeprefix("hparam/")] = event.value
                else:
                    metric, _, stage = tag.partition("/stage")
                    found[event.step, stage, metric] = event.value
    return found, final


def same(a: float, b: float) -> bool:
    """Equal as float32 (event files hold float32); NaN equal to NaN."""
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-30)


@pytest.mark.parametrize(
    "args",
    [["--method", "lc"],
     pytest.param(["--method", "bp", "--executor", "ddp", "--workers", "2"],
                  marks=[pytest.mark.dist, pytest.mark.slow]),
     pytest.param(["--method", "lc", "--executor", "distributed"],
                  marks=[pytest.mark.dist, pytest.mark.slow])],
    ids=["sequential", "ddp", "distributed"],
)  # fmt: skip
def test_a_tensorboard_log_holds_the_values_of_metrics_csv(args, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    out, logs = tmp_path / "out", tmp_path / "tb"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "run", *args, *TINY, "--out", str(out),
         "--tensorboard", str(logs)],
        capture_output=True, text=True, timeout=300, env=os.environ,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = csv_rows(out)
    curves, final = events(logs)
    assert curves.keys() == rows.keys()
    assert all(same(curves[k], rows[k]) for k in rows)
    assert any(stage for _, stage, _ in rows)  # per-stage figures are there, tagged per stage
    assert same(final["test_acc"], rows[2, "", "test_acc"])


def test_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else find(name, *a),
    )
    with pytest.raises(SystemExit) as done:
        main(["run", "--method", "lc", *TINY, "--out", str(tmp_path / "out"),
              "--tensorboard", str(tmp_path / "tb")])  # fmt: skip
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1
    assert "--tensorboard needs the tensorboard package" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "tb").exists()
