"""A rule defined here and nowhere else gets everything the built-in rules get: sequential and
distributed runs, every column of the table, a colour in the figures and a row in the report,
a forecast row in `lcbench scale`, its options in `lcbench list` and in the bad-input draws.

The rule, "toy": each group but the last trains on a linear classifier of its output (DGL's
stage with a one-layer head), declared with ``methods.register``; ranks started by torchrun register it too,
through ``LCBENCH_RULES`` naming this module."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch
from torch import nn

import methods
from methods.base import option
from methods.dgl import DGLStage

ROOT = Path(__file__).resolve().parents[1]
MODULE = "tests.test_new_rule"


@dataclass
class ToyOptions:
    """The linear head's inputs are the group's output, flattened; ``head_bias`` adds a bias."""

    head_bias: bool = option(True)


class ToyStage(DGLStage):
    """DGL whose auxiliary net is one linear layer: f_k and it step on CE(head(h_k), y)."""

    def __init__(self, index, count, group, criterion, train, *, shape, classes, options):
        head = None
        if index < count - 1:
            head = nn.Sequential(
                nn.Flatten(), nn.Linear(math.prod(shape), classes, options.head_bias)
            )
        super().__init__(
            index, count, group, criterion, train, shape=shape, classes=classes, options=options,
            head=head,
        )  # fmt: skip


TOY = methods.Method(
    "toy",
    ToyStage,
    ToyOptions,
    "a one-layer DGL, defined in a test",
    True,
    "decoupled",
    "Toy({n})",
    "Toy",
)

if MODULE in os.environ.get("LCBENCH_RULES", "").split(","):  # a rank torchrun started
    methods.register(TOY)


@pytest.fixture
def toy(monkeypatch):
    methods.register(TOY)
    monkeypatch.setenv("LCBENCH_RULES", MODULE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    yield TOY
    methods.unregister(TOY.name)


def lcbench(*args, capsys):
    from bench.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, err
    return out


BASE = ("--task", "digits", "--model", "mlp", "--epochs", "1", "--batch-size", "64")
BASE += ("--limit-train", "512", "--limit-test", "128", "--device", "cpu", "-q")


def test_a_rule_declared_outside_methods_gets_everything(toy, tmp_path, capsys):
    from bench.report import page, plots, table

    out = str(tmp_path / "results")
    runs = [
        ("--method", "bp", "--groups", "1"),
        ("--method", "bp", "--executor", "ddp", "--workers", "2"),
        ("--method", "frozen", "--groups", "2"),
        ("--method", "toy", "--groups", "2"),
        ("--method", "toy", "--groups", "2", "--executor", "distributed"),
    ]
    for run in runs:
        lcbench("run", *run, *BASE, "--experiment", "new", "--out", out, capsys=capsys)
    folder = Path(out) / "new"

    cells = table.cells(table.run_summary(table.load_runs(folder)))
    mine = cells[cells["method"] == "toy"].set_index("executor")
    assert set(mine.index) == {"sequential", "distributed"}
    ranked = mine.loc["distributed"]
    for column in ("speedup", "bound", "speedup_ddp", "above_floor", "efficiency"):
        assert torch.isfinite(torch.tensor(float(ranked[column]))), column
    floor = cells[cells["method"] == "frozen"]["mean"].iloc[0]
    assert ranked["above_floor"] == pytest.approx(ranked["mean"] - floor, abs=1e-9)
    assert list(cells["method"])[-2:] == ["toy", "toy"]  # after the built-in rules
    shown = page.numbers(folder)  # the table as `lcbench table` and the report print it
    assert "Toy(1)" in shown.to_string()

    colours = {m.name: plots.colour(m.name) for m in methods.contenders()}
    assert colours["toy"] not in {c for n, c in colours.items() if n != "toy"}
    assert "Toy(1)" in page.page(folder)

    listed = lcbench("list", "--methods", capsys=capsys)
    assert "toy" in listed and "head_bias" in listed

    scale_out = tmp_path / "scale"
    lcbench(
        "scale", "mlp", "-t", "digits", "--profile", "a100-pcie", "--workers", "2,4",
        "--rules", "toy", "--no-maps", "--out", str(scale_out), capsys=capsys,
    )  # fmt: skip
    with open(scale_out / "scale.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["rule"] == "toy"]
    assert rows and all(float(r["step_s"]) > 0 for r in rows)


def test_a_declared_rule_in_the_bad_input_draws(toy, tmp_path_factory, capsys, monkeypatch):
    """The bad-input test's draws reach the new rule's options: drawn at random, each is
    refused in one line with exit 2 and nothing written, or starts a run."""
    from hypothesis import given
    from hypothesis import strategies as st

    from bench import runner, sweep
    from tests import test_bad_input as bad

    def execute(prep, **_):
        raise bad.Started(prep.cfg)

    monkeypatch.setattr(runner, "execute", execute)
    monkeypatch.setattr(sweep.runner, "execute", execute)
    keys = [*(f.name for f in fields(ToyOptions)), "bogus"]

    @bad.DRAWS
    @given(
        key=st.sampled_from(keys),
        value=bad.numbers(False) | st.sampled_from(["true", "false", "x", ""]),
    )
    def draw(key, value):
        out = tmp_path_factory.mktemp("run") / "out"
        argv = ["run", "--method", "toy", *bad.BASE, "--out", str(out), "-o", f"{key}={value}"]
        bad.outcome(argv, out, capsys)

    draw()
