"""The distributed executor on 2 CPU ranks (gloo, torchrun): learning as in the sequential
executor, exact pipelined backprop, asynchronous DGL, neuron groups on ranks, faults and
continuing from a checkpoint."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.executors.launch import ENTRY

pytestmark = pytest.mark.dist

FMNIST = Path("/usr/share/datasets/fashion-mnist")
DIGITS = ["--task", "digits", "--batch-size", "64", "--quiet"]


def tagged(out) -> dict:
    """The environment of a run writing under ``out``, tagged so that the torchrun agent and
    ranks it starts (they inherit it) can be told from other test suites' on this machine."""
    return {**os.environ, "LCBENCH_TEST_OUT": str(out)}


def lcbench(*args, env=None, timeout=300):
    out = args[args.index("--out") + 1] if "--out" in args else ""
    return subprocess.run(
        [sys.executable, "-m", "bench", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**tagged(out), **(env or {})},
    )


def run_folder(out: Path) -> Path:
    (folder,) = out.glob("*/*/run.json")
    return folder.parent


def metrics(out: Path) -> dict[tuple, float]:
    """(epoch, stage, metric) -> value of the one run under ``out``."""
    with open(run_folder(out) / "metrics.csv") as f:
        return {
            (int(r["epoch"]), r["stage"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)
        }


def weights(out: Path) -> list[dict]:
    return [torch.load(p) for p in sorted((run_folder(out) / "weights").glob("stage*.pt"))]


def ranks_of(out: Path) -> dict[int, tuple[str, list[bytes]]]:
    """pid -> (command line, environment) of the torchrun agent and ranks (either executor)
    of the run under ``out``."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            any(entry in cmd for entry in ENTRY.values())
            and f"LCBENCH_TEST_OUT={out}".encode() in env
        ):
            found[int(proc.name)] = (cmd, env)
    return found


def leftover_ranks(out: Path) -> list[str]:
    """Command lines of the run's torchrun agent or ranks still alive."""
    return [cmd for cmd, _ in ranks_of(out).values()]


@pytest.mark.skipif(not FMNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) for m in ("dgl", "lc")])
def test_distributed_learns_like_sequential_on_fashion_mnist(method, tmp_path):
    args = [
        "--method",
        method,
        "--task",
        "fashion-mnist",
        "--epochs",
        "1",
        "--limit-train",
        "6144",
        "--limit-test",
        "2000",
        "--quiet",
    ]
    acc = {}
    for executor in ("sequential", "distributed"):
        result = lcbench(*args, "--executor", executor, "--out", str(tmp_path / executor))
        assert result.returncode == 0, result.stderr
        acc[executor] = metrics(tmp_path / executor)[1, "", "test_acc"]
    assert acc["sequential"] > 0.7
    assert abs(acc["distributed"] - acc["sequential"]) < 0.04, acc


def test_an_epochs_busy_and_idle_seconds_are_its_training_alone(tmp_path):
    """Each rank's busy and idle seconds of an epoch fit inside its wall-clock training
    time, in the second epoch too: the evaluation after the first (forward passes that
    pipelined BP's hooks charge, test batches a rank waits for) is not counted in it."""
    args = ["--method", "pipe-bp", "-o", "schedule=1f1b", *DIGITS, "--model", "mlp"]
    args += ["--epochs", "2", "--limit-train", "128", "--eval-batch-size", "2"]
    args += ["--executor", "distributed"]
    result = lcbench(*args, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    got = metrics(tmp_path)
    for epoch in (1, 2):
        for rank in ("1", "2"):
            busy, idle = got[epoch, rank, "busy_time_s"], got[epoch, rank, "idle_time_s"]
            assert busy + idle <= got[epoch, rank, "wall_time_s"], (epoch, rank, busy, idle)


def test_records_keep_the_schema_with_figures_per_rank(tmp_path):
    result = lcbench(
        "--method",
        "dni",
        *DIGITS,
        "--epochs",
        "1",
        "--executor",
        "distributed",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    with open(run_folder(tmp_path) / "metrics.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    from bench.records import COLUMNS

    assert reader.fieldnames == COLUMNS
    assert {r["executor"] for r in rows} == {"distributed"}
    got = metrics(tmp_path)
    for rank in ("1", "2"):
        for metric in (
            "forward_time_s",
            "backward_time_s",
            "update_time_s",
            "busy_time_s",
            "idle_time_s",
            "wall_time_s",
            "param_bytes",
            "activation_bytes",
            "peak_mem_bytes",
            "peak_rss_bytes",
        ):
            assert got[1, rank, metric] > 0, (rank, metric)
    assert got[1, "1", "synth_loss"] >= 0 and got[1, "", "test_acc"] > 0.1
    assert got[1, "", "modelled_time_s"] > 0 and got[1, "", "wall_over_modelled"] > 0
    info = json.loads((run_folder(tmp_path) / "run.json").read_text())
    assert info["status"] == "ok" and info["config"]["executor"] == "distributed"


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(
            ["pipe-bp", "-o", "schedule=gpipe"], marks=pytest.mark.slow
        ),  # 1F1B's path too
        ["pipe-bp", "-o", "schedule=1f1b"],
        ["bp"],
    ],
)
def test_pipelined_and_plain_bp_on_ranks_end_with_the_parameters_of_sequential_bp(method, tmp_path):
    """torch.distributed.pipelining, 2 ranks, 4 micro-batches, and BP on 2 ranks with each
    next input received while a batch is computed, against one-process BP on a model without
    BatchNorm (micro-batches then change nothing but rounding)."""
    args = [
        "--task",
        "digits",
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--limit-train",
        "384",
        "--save-weights",
        "--quiet",
    ]
    assert lcbench("--method", "bp", *args, "--out", str(tmp_path / "bp")).returncode == 0
    result = lcbench(
        "--method", *method, *args, "--executor", "distributed", "--out", str(tmp_path / "pipe")
    )
    assert result.returncode == 0, result.stderr
    expected, actual = weights(tmp_path / "bp"), weights(tmp_path / "pipe")
    assert len(expected) == len(actual) == 2
    for stage_a, stage_b in zip(expected, actual):
        for state_a, state_b in zip(stage_a, stage_b):
            for name in state_a:
                torch.testing.assert_close(state_b[name], state_a[name], rtol=1e-5, atol=1e-6)
    initial = lcbench("--method", "bp", *args, "--epochs", "0", "--out", str(tmp_path / "init"))
    assert initial.returncode == 0
    first_layer = "0.1.weight"  # group 1, block 0 = Flatten, Linear, ReLU
    assert not torch.allclose(
        expected[0][0][first_layer], weights(tmp_path / "init")[0][0][first_layer]
    )


@pytest.mark.slow  # in make test-all: make test stays under 10 minutes
def test_async_dgl_slowed_stage_does_not_stall_the_others(tmp_path):
    """Stage 2 sleeps 100 ms per step: stage 1 still runs its batches at its own pace (it
    drops what stage 2 cannot take); then stage 1 sleeps 60 ms and stage 2 keeps training on
    its replay buffer (more steps than inputs received)."""
    args = [
        "--method",
        "adgl",
        *DIGITS,
        "--epochs",
        "1",
        "--limit-train",
        "1280",
        "--executor",
        "distributed",
    ]
    steps, slow = 1280 // 64, 0.100  # stage 2 at a fifth of stage 1's pace or less, on any load
    result = lcbench(
        *args,
        "-o",
        "slow_stage=2",
        "-o",
        f"slow_ms={1000 * slow:g}",
        "--out",
        str(tmp_path / "slow2"),
    )
    assert result.returncode == 0, result.stderr
    got = metrics(tmp_path / "slow2")
    assert got[1, "1", "train_steps"] == steps
    assert got[1, "1", "wall_time_s"] < 0.3 * steps * slow  # it did not wait for stage 2
    assert got[1, "2", "train_steps"] * slow <= got[1, "2", "wall_time_s"] + 0.05
    assert got[1, "2", "received_inputs"] + got[1, "1", "dropped_outputs"] == steps
    assert got[1, "2", "discarded_inputs"] > 0  # too slow to use them all: it took the newest

    result = lcbench(
        *args,
        "-o",
        "slow_stage=1",
        "-o",
        "slow_ms=60",
        "-o",
        "max_reuse=4",
        "--out",
        str(tmp_path / "slow1"),
    )
    assert result.returncode == 0, result.stderr
    got = metrics(tmp_path / "slow1")
    assert got[1, "2", "received_inputs"] == steps
    assert got[1, "2", "train_steps"] > 1.5 * steps  # kept training on reused inputs
    assert got[1, "", "reuse_frac"] > 0.3


@pytest.mark.slow  # in make test-all: make test stays under 10 minutes
def test_neuron_groups_on_ranks_of_their_own_match_sequential(tmp_path):
    """GN-DGL with K=1, G=2 on 2 ranks: each rank holds one neuron group; the classifier sees
    both. The sequential executor computes the same thing, so accuracy agrees closely."""
    args = ["--method", "gn", "--groups", "1", "--neuron-groups", "2", *DIGITS, "--epochs", "2"]
    acc = {}
    for name, extra in (
        ("seq", []),
        ("dist", ["--executor", "distributed", "--placement", "neuron"]),
    ):
        result = lcbench(*args, *extra, "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        acc[name] = metrics(tmp_path / name)
    assert acc["seq"][2, "", "test_acc"] > 0.8
    assert abs(acc["dist"][2, "", "test_acc"] - acc["seq"][2, "", "test_acc"]) <= 0.02
    dist = acc["dist"]
    busy = [dist[2, rank, "busy_time_s"] for rank in ("1.1", "1.2")]  # a rank per neuron group
    assert all(b > 0 for b in busy)
    assert dist[2, "", "modelled_time_s"] == pytest.approx(
        max(busy)
    )  # K=1: one step of the slowest


@pytest.mark.parametrize(
    "args, words",
    [
        (["--method", "lc"], "--placement neuron needs"),
        (["--method", "gn", "--task", "seq-fashion-mnist"], "LSTM layers cannot be cut"),
        (["--method", "gn", "--task", "cifar10", "--model", "resnet50"], "pre-activation block"),
    ],
)
def test_neuron_placement_is_checked_before_anything_runs(
    args, words, capsys, tmp_path, monkeypatch
):
    import bench.data.tasks
    from bench.cli import main

    monkeypatch.setattr(bench.data.tasks, "load_task", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(SystemExit) as e:
        main(
            [
                "run",
                *args,
                "--placement",
                "neuron",
                "--executor",
                "distributed",
                "--out",
                str(tmp_path / "out"),
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


FAULT = """
import os
if os.environ.get("RANK") == "1":
    import methods.base as base
    calls = []
    original = base.Stage.tally
    def tally(self, n, **means):
        calls.append(n)
        if len(calls) == 6:  # batch 2 of epoch 2 (4 batches an epoch)
            raise RuntimeError("injected fault")
        return original(self, n, **means)
    base.Stage.tally = tally
"""


def check_failed(out: Path, result, words: str, started: float) -> None:
    assert time.monotonic() - started < 60
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    info = json.loads((run_folder(out) / "run.json").read_text())
    assert info["status"] == "failed" and words in info["error"]
    deadline = time.monotonic() + 10
    while leftover_ranks(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not leftover_ranks(out)


@pytest.mark.slow  # make test-all; tests/test_restarts.py continues runs on ranks in make test
def test_a_rank_that_raises_fails_the_run_which_then_continues_from_its_last_epoch(tmp_path):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAULT)
    out = tmp_path / "out"
    args = [
        "--method",
        "lc",
        *DIGITS,
        "--epochs",
        "2",
        "--limit-train",
        "256",
        "--executor",
        "distributed",
        "--out",
        str(out),
    ]
    started = time.monotonic()
    result = lcbench(*args, env={"PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{os.getcwd()}"})
    check_failed(out, result, "rank 1 failed: RuntimeError: injected fault", started)
    folder = run_folder(out)
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
        "epoch1.json",
        "epoch1.rank0.pt",
        "epoch1.rank1.pt",
    ]
    epoch1 = metrics(out)

    again = lcbench(*args)  # every rank continues from epoch 1's checkpoint
    assert again.returncode == 0, again.stderr
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "ok" and [r["epoch"] for r in info["resumes"]] == [1]
    with open(folder / "metrics.csv") as f:
        keys = [(r["epoch"], r["stage"], r["metric"]) for r in csv.DictReader(f)]
    assert len(keys) == len(set(keys)) and {k[0] for k in keys} == {"1", "2"}
    assert {k: v for k, v in metrics(out).items() if k[0] == 1} == epoch1
    assert not (folder / "checkpoints").exists()


def training_on_ranks(out: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """A long LC run on 2 ranks under ``out`` (with ``args``), once its first epoch is done,
    and the pid of its rank 1."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            "--method",
            "lc",
            *DIGITS,
            "--epochs",
            "500",
            "--executor",
            "distributed",
            *args,
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=tagged(out),
    )
    victim = None
    while victim is None:
        assert proc.poll() is None and time.monotonic() - started < 60
        for metrics_file in out.glob("*/*/metrics.csv"):
            if metrics_file.read_text().count("\n") > 1:  # an epoch is done: training is on
                victim = rank_pid(out, 1)
        time.sleep(0.1)
    return proc, victim


def test_a_rank_that_stops_answering_is_caught_within_the_rank_timeout(tmp_path):
    """SIGSTOP: the rank neither dies nor answers. Its peer gives up after --rank-timeout,
    the run fails in one line naming the rank, and no process is left (the stopped one
    included)."""
    out = tmp_path / "out"
    proc, victim = training_on_ranks(out, "--rank-timeout", "5")
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=90)
    finally:
        os.kill(victim, signal.SIGKILL) if rank_pid(out, 1) else None
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    check_failed(out, result, "rank 1 stopped answering: rank 0 waited --rank-timeout", stopped)
    assert time.monotonic() - stopped < 20  # 5 s of timeout, then the group is stopped


def rank_pid(out: Path, rank: int) -> int | None:
    """The pid of rank ``rank`` of the run under ``out``."""
    for pid, (_, env) in ranks_of(out).items():
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def test_a_sweep_runs_distributed_cells(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text("""
[grid]
method = ["dgl"]
executor = ["sequential", "distributed"]
[settings]
task = "digits"
epochs = 1
batch_size = 64
limit_train = 256
""")
    result = subprocess.run(
        [sys.executable, "-m", "bench", "sweep", str(spec), "--out", str(tmp_path / "out"), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "2 ok, 0 skipped, 0 failed" in result.stdout
    executors = set()
    for path in (tmp_path / "out").glob("*/*/metrics.csv"):
        with open(path) as f:
            executors |= {r["executor"] for r in csv.DictReader(f)}
    assert executors == {"sequential", "distributed"}


def test_emit_config_is_what_torchrun_takes(tmp_path):
    config = tmp_path / "run.json"
    result = lcbench(
        "--method",
        "lc",
        *DIGITS,
        "--epochs",
        "1",
        "--limit-train",
        "256",
        "--executor",
        "distributed",
        "--emit-config",
        str(config),
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0 and "2 ranks" in result.stdout, result.stderr
    assert not (tmp_path / "out").exists()
    torchrun = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(launch_port()),
            "-m",
            "bench.executors.distributed",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert torchrun.returncode == 0, torchrun.stderr
    info = json.loads((run_folder(tmp_path / "out") / "run.json").read_text())
    assert info["status"] == "ok" and info["config"]["executor"] == "distributed"


def launch_port() -> int:
    from bench.executors.launch import free_port

    return free_port()


IN_SECOND_EPOCH = """
import os
if os.environ.get("RANK") == "1":
    import methods.base as base
    original, calls = base.Stage.pop_metrics, []
    def pop_metrics(self):
        calls.append(1)
        if len(calls) == 2:  # the end of epoch 2's training, after epoch 1's checkpoint
            raise RuntimeError("injected fault in epoch 2")
        return original(self)
    base.Stage.pop_metrics = pop_metrics
"""


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param(
            ["--method", "bp", "--executor", "ddp", "--workers", "2", "--groups", "1"],
            marks=pytest.mark.slow,
        ),
        pytest.param(["--method", "lc", "--executor", "distributed"], marks=pytest.mark.slow),
    ],
)
def test_a_continued_compiled_run_times_its_compilation_in_its_first_epoch(rule, tmp_path):
    """compile_time_s is written in the first epoch a process trains (docs/records.md): in
    epoch 1, and again in epoch 2 when a run that failed in epoch 2 is continued there, per
    rank and for the run (the slowest rank's)."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(IN_SECOND_EPOCH)
    out = tmp_path / "out"
    args = [*rule, *DIGITS, "--epochs", "2", "--limit-train", "256", "--compile"]
    args += ["--out", str(out)]
    backend = {"LCBENCH_COMPILE_BACKEND": "aot_eager"}
    inject = {"PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{os.getcwd()}", **backend}
    assert lcbench(*args, env=inject).returncode == 1
    again = lcbench(*args, env=backend)
    assert again.returncode == 0, again.stderr
    info = json.loads((run_folder(out) / "run.json").read_text())
    assert [r["epoch"] for r in info["resumes"]] == [1]
    got = metrics(out)
    for epoch in (1, 2):
        ranks = [got[epoch, r, "compile_time_s"] for r in ("1", "2")]
        assert min(ranks) > 0 and got[epoch, "", "compile_time_s"] == max(ranks)
