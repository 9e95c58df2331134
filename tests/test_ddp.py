"""Data-parallel BP (``--executor ddp``) on 2 CPU ranks (gloo, torchrun): one step equals plain
backprop on the global batch, the records, bad input, a failing rank."""

import json
import os
import time

import pytest
import torch
from torch.nn import functional as F

from bench import models
from bench.cli import main
from bench.data import tasks
from bench.executors.ddp import shards
from tests.test_distributed import FAULT, check_failed, lcbench, metrics, run_folder, weights

DDP = [
    "--method",
    "bp",
    "--executor",
    "ddp",
    "--workers",
    "2",
    "--task",
    "digits",
    "--model",
    "mlp",
    "--batch-size",
    "64",
    "--limit-train",
    "384",
    "--limit-test",
    "64",
    "--quiet",
]


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """The record of one DDP step on 2 ranks (32 samples each), its weights saved."""
    out = tmp_path_factory.mktemp("ddp")
    result = lcbench(*DDP, "--iterations", "1", "--save-weights", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def plain_step(seed=0, batch_size=64, limit_train=384) -> dict:
    """One SGD step of plain torch autograd on the first global batch of a run, from the
    weights the run starts with."""
    torch.manual_seed(seed)
    model = models.build_model("mlp", (1, 8, 8), 10)
    task = tasks.load_task("digits", limit_train=limit_train)
    x, y = next(task.train_batches(batch_size, torch.Generator().manual_seed(seed)))
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return model.state_dict()


@pytest.mark.dist
def test_one_ddp_step_is_the_bp_step_on_the_global_batch(one_step):
    (saved,) = weights(one_step)  # one replica's weights (they are the same on every rank)
    expected = plain_step()
    assert saved[0].keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(saved[0][name], value, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    initial = models.build_model("mlp", (1, 8, 8), 10).state_dict()
    assert not torch.allclose(initial["0.1.weight"], expected["0.1.weight"])  # a real step


@pytest.mark.dist
def test_ddp_records_name_the_executor_with_figures_per_rank(one_step):
    info = json.loads((run_folder(one_step) / "run.json").read_text())
    assert info["status"] == "ok" and info["config"]["executor"] == "ddp"
    assert info["config"]["workers"] == 2 and info["config"]["groups"] == 1
    with open(run_folder(one_step) / "metrics.csv") as f:
        assert {line.split(",")[5] for line in f.readlines()[1:]} == {"ddp"}
    got = metrics(one_step)
    for rank in ("1", "2"):
        for metric in (
            "forward_time_s",
            "backward_time_s",
            "update_time_s",
            "busy_time_s",
            "wall_time_s",
            "param_bytes",
            "activation_bytes",
            "peak_mem_bytes",
            "peak_rss_bytes",
        ):
            assert got[1, rank, metric] > 0, (rank, metric)
    assert got[1, "", "epoch_time_s"] == max(got[1, r, "wall_time_s"] for r in ("1", "2"))
    assert got[1, "", "samples_per_s"] == pytest.approx(64 / got[1, "", "epoch_time_s"])
    assert got[1, "", "train_loss"] > 0 and got[1, "", "test_acc"] >= 0


def test_each_rank_takes_its_slice_of_the_global_batch():
    x, y = torch.arange(12.0).view(6, 2), torch.arange(6)
    parts = [next(shards(iter([(x, y)]), rank, 3)) for rank in range(3)]
    assert [p[1].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), x)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--method", "lc", "--executor", "ddp", "--workers", "2"], "--executor ddp trains BP"),
        (
            ["--method", "bp", "--executor", "ddp", "--workers", "3", "--batch-size", "64"],
            "--batch-size 64 does not split into 3 equal shards",
        ),
        (["--method", "bp", "--executor", "ddp"], "--executor ddp needs --workers"),
        (
            ["--method", "bp", "--executor", "ddp", "--workers", "2", "--groups", "2"],
            "--groups must be 1",
        ),
        (
            ["--method", "bp", "--executor", "distributed", "--workers", "2"],
            "--workers is for --executor ddp",
        ),
        (["--method", "bp", "--executor", "ddp", "--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_bad_ddp_input_is_one_line_and_exit_2(args, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["run", *args, "--task", "digits", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.dist
def test_a_ddp_rank_that_raises_fails_the_run_naming_it(tmp_path):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAULT)
    started = time.monotonic()
    result = lcbench(
        *DDP,
        "--epochs",
        "2",
        "--out",
        str(tmp_path / "out"),
        env={"PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{os.getcwd()}"},
    )
    check_failed(tmp_path / "out", result, "rank 1 failed: RuntimeError: injected fault", started)
