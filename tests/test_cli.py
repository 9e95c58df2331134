"""`lcbench run` / `lcbench list`: records, determinism and bad input."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main
from bench.records import COLUMNS

FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--task", "digits", "--epochs", "2", "--batch-size", "64", "--quiet"]


def lcbench(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def read_rows(folder: Path) -> list[dict]:
    (run,) = [p for p in folder.glob("*/*") if p.is_dir()]
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def call(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize(
    "args, words",
    [
        (["--method", "sgd"], "unknown method 'sgd'"),
        (["--method", "lc", "--task", "mnist-x"], "unknown task 'mnist-x'"),
        (["--method", "lc", "--model", "vgg99"], "unknown model 'vgg99'"),
        (["--method", "lc", "--groups", "0"], "--groups must be at least 1"),
        (["--method", "lc", "--groups", "6"], "cannot split 5 blocks into 6 groups"),
        (["--method", "lc", "--epochs", "-1"], "--epochs must not be negative"),
        (["--method", "lc", "--option", "critic_size=3"], "unknown option(s) for lc: critic_size"),
        (
            ["--method", "gn", "--neuron-groups", "3", "--model", "resnet8", "--task", "cifar10"],
            "do not split into 3 neuron groups",
        ),
        (["--method", "lc", "--cuts", "3,2", "--groups", "3"], "cuts"),
        (["--method", "lc", "--groups", "two"], "'two' is not a valid integer"),
        (
            ["--method", "gn", "--neuron-groups", "0"],
            "option neuron_groups of gn must be an integer at least 1",
        ),
        (
            ["--method", "dni", "-o", "synth_lr=-1"],
            "option synth_lr of dni must be a finite number above 0",
        ),
        (
            ["--method", "pipe-bp", "-o", "microbatches=200", "--batch-size", "64"],
            "more micro-batches than it has samples",
        ),
        (
            ["--method", "lc", "--precision", "bogus"],
            "unknown precision 'bogus' (choose from fp32, tf32, bf16)",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, words, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = call(
        ["run", *args, "--task", "digits", "--out", str(out)]
        if "--task" not in args
        else ["run", *args, "--out", str(out)],
        capsys,
    )
    assert code == 2
    assert err.count("\n") == 1 and words in err, err
    assert "Traceback" not in err
    assert not out.exists()


def test_unwritable_out_is_one_line_and_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = call(["run", "--method", "dgl", *TINY, "--out", str(blocker / "sub")], capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot write to --out" in err
    assert blocker.read_text() == "not a folder"


def test_missing_data_offline_is_one_line_and_exit_2(tmp_path, capsys, offline):
    empty = tmp_path / "data"
    empty.mkdir()
    out = tmp_path / "out"
    code, _, err = call(
        ["run", "--method", "lc", "--task", "cifar10", "--data-dir", str(empty), "--out", str(out)],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1 and str(empty) in err
    assert not out.exists()


@pytest.mark.slow  # make test-all; the restart and checkpoint tests compare whole runs too
def test_same_seed_twice_gives_identical_metrics(tmp_path):
    for name in ("a", "b"):
        result = lcbench(
            "run", "--method", "lc", *TINY, "--seed", "3", "--out", str(tmp_path / name)
        )
        assert result.returncode == 0, result.stderr

    def timing(metric):  # clocks and the process's RSS vary; everything else must not
        return metric.endswith(("_time_s", "_per_s")) or metric == "peak_rss_bytes"

    a, b = ([r for r in read_rows(tmp_path / n) if not timing(r["metric"])] for n in "ab")
    assert a == b and len(a) > 0
    other = lcbench("run", "--method", "lc", *TINY, "--seed", "4", "--out", str(tmp_path / "c"))
    assert other.returncode == 0
    c = [r for r in read_rows(tmp_path / "c") if not timing(r["metric"])]
    assert [r["value"] for r in a] != [r["value"] for r in c]


@pytest.mark.skipif(not FMNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_lc_four_groups_on_fashion_mnist_writes_records(tmp_path):
    result = lcbench(
        "run",
        "--method",
        "lc",
        "--groups",
        "4",
        "--task",
        "fashion-mnist",
        "--epochs",
        "1",
        "--limit-train",
        "1024",
        "--limit-test",
        "500",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "sub-model 3" in result.stdout
    (run,) = (tmp_path / "adhoc").iterdir()
    with open(run / "metrics.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == COLUMNS
    got = {(r["stage"], r["metric"]) for r in rows}
    for stage in ("", "1", "2", "3"):
        assert {(stage, "test_acc"), (stage, "test_loss"), (stage, "train_loss")} <= got
    assert {("1", "critic_loss"), ("", "epoch_time_s"), ("", "split_balance")} <= got
    for stage in ("1", "2", "3"):  # the local signals, every epoch
        assert {
            (stage, "critic_corr"),
            (stage, "update_cosine"),
            (stage, "update_norm_ratio"),
        } <= got
    assert ("4", "update_cosine") not in got
    assert {r["method"] for r in rows} == {"lc"} and {r["groups"] for r in rows} == {"4"}
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "ok" and info["config"]["groups"] == 4
    assert len(info["split"]["cuts"]) == 3
    for key in ("lcbench_version", "git_sha", "torch", "hostname", "cpu"):
        assert key in info["provenance"]
    assert not list(run.glob(".*.tmp"))


def test_list_names_every_method_model_and_task(capsys):
    code, out, _ = call(["list"], capsys)
    assert code == 0
    for name in (
        "bp",
        "dgl",
        "lc",
        "dni",
        "cdni",
        "gn",
        "resnet110",
        "small-cnn",
        "fashion-mnist",
        "digits",
        "cifar10",
        "cifar100",
        "critic_lr=0.0001",
    ):
        assert name in out


def test_help_documents_run_options(capsys):
    code, out, _ = call(["run", "--help"], capsys)
    assert code == 0 and "--groups" in out and "--neuron-groups" in out
    assert "--checkpoint-every" in out and "--no-checkpoint" in out


def test_run_options_are_the_run_configs_fields():
    """`lcbench run` has one option per RunConfig field (its rule options aside: -o), with
    the field's default and help: the defaults are written once, in bench/config.py (the
    optimizer's, once more upstream, in methods.base.TrainOptions, which RunConfig takes)."""
    import dataclasses

    from bench import cli as cli_module
    from bench.config import RunConfig
    from methods.base import TrainOptions

    params = {p.name: p for p in cli_module.run.params}
    for f in dataclasses.fields(RunConfig):
        if f.name == "options":
            continue
        param = params[f.name]
        assert param.help == f.metadata["help"], f.name
        if f.default is dataclasses.MISSING:
            assert param.required, f.name
        else:
            assert param.default == f.default, f.name
    for name in ("optimizer", "lr", "momentum", "nesterov", "weight_decay"):
        assert getattr(RunConfig, name) == getattr(TrainOptions, name)
    assert params["nesterov"].secondary_opts == ["--no-nesterov"]
    assert params["lr_milestones"].metavar == "N1,N2,..."
