"""Runs that heal themselves: a rank killed mid-run with --max-restarts left is started again
by torchrun's elastic agent from the newest checkpoint, and the run ends ok with the rows and
weights of a run never killed; with no restart left it fails in one line naming the rank."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_distributed import check_failed, leftover_ranks, metrics, run_folder, tagged

pytestmark = pytest.mark.dist

TINY = [
    "--task",
    "digits",
    "--model",
    "mlp",
    "--batch-size",
    "64",
    "--limit-train",
    "256",
    "--limit-test",
    "128",
    "--epochs",
    "3",
    "--save-weights",
    "--quiet",
]
#: sends rank ``LCBENCH_TEST_VICTIM`` signal ``LCBENCH_TEST_SIGNAL`` at its
#: ``LCBENCH_TEST_CALL``-th tally (4 batches an epoch) in each of the first
#: ``LCBENCH_TEST_KILLS`` attempts
KILL = """
import os, signal
if (os.environ.get("RANK") == os.environ.get("LCBENCH_TEST_VICTIM")
        and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) < int(os.environ["LCBENCH_TEST_KILLS"])):
    import methods.base as base
    calls, original = [], base.Stage.tally
    def tally(self, n, **means):
        calls.append(n)
        if len(calls) == int(os.environ["LCBENCH_TEST_CALL"]):
            os.kill(os.getpid(), getattr(signal, os.environ["LCBENCH_TEST_SIGNAL"]))
        return original(self, n, **means)
    base.Stage.tally = tally
"""
#: rows that depend on the machine (time, memory, how long a rank waited)
TIMING = ("_time_s", "_bytes", "samples_per_s", "wall_over_modelled")


def start(
    out: Path,
    args: list[str],
    *,
    kills: int = 0,
    victim: int = 1,
    call: int = 6,
    sig: str = "SIGKILL",
    tmp: Path | None = None,
) -> subprocess.Popen:
    """The run of ``args`` under ``out``; ``kills``: in its first attempts, its rank
    ``victim`` sent ``sig`` at its ``call``-th tally (batch 2 of epoch 2 where it tallies
    once a batch)."""
    env = tagged(out)
    if kills:
        (tmp / "inject").mkdir(exist_ok=True)
        (tmp / "inject" / "sitecustomize.py").write_text(KILL)
        env.update(
            PYTHONPATH=f"{tmp / 'inject'}{os.pathsep}{os.getcwd()}",
            LCBENCH_TEST_VICTIM=str(victim),
            LCBENCH_TEST_KILLS=str(kills),
            LCBENCH_TEST_CALL=str(call),
            LCBENCH_TEST_SIGNAL=sig,
        )
    return subprocess.Popen(
        [sys.executable, "-m", "bench", "run", *args, *TINY, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def learning(out: Path) -> dict:
    return {k: v for k, v in metrics(out).items() if not k[2].endswith(TIMING)}


@pytest.mark.parametrize(
    "args, victim, call",
    [
        (["--method", "lc", "--executor", "distributed"], 1, 6),  # the last stage: once a batch
        # make test-all: make test keeps under 10 minutes
        pytest.param(["--method", "bp", "--executor", "ddp", "--workers", "2"], 1, 6,
                     marks=pytest.mark.slow),
        # sequential, under torchrun: both LC stages tally, twice a batch
        pytest.param(["--method", "lc"], 0, 20, marks=pytest.mark.slow),
    ],
    ids=["distributed", "ddp", "sequential"],
)  # fmt: skip
def test_a_rank_killed_with_a_restart_left_restarts_to_the_rows_of_a_run_never_killed(
    args, victim, call, tmp_path
):
    whole = start(tmp_path / "whole", args)
    killed = start(
        tmp_path / "killed",
        [*args, "--max-restarts", "2"],
        kills=1,
        victim=victim,
        call=call,
        tmp=tmp_path,
    )
    for proc in (killed, whole):
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    info = json.loads((run_folder(tmp_path / "killed") / "run.json").read_text())
    assert info["status"] == "ok" and "resumes" not in info
    (restart,) = info["restarts"]
    assert restart["attempt"] == 1 and restart["rank"] == victim and restart["from_epoch"] == 1
    assert f"rank {victim} died without a word" in restart["reason"]
    got, want = learning(tmp_path / "killed"), learning(tmp_path / "whole")
    assert sorted({k[0] for k in got}) == [1, 2, 3]  # every epoch once (a dict: once per key)
    if "distributed" in args:  # messages arrive when they arrive; what is learned does not
        assert {k[2] for k in got} >= {"train_loss", "test_acc"}
    assert got == want
    for a, b in zip(
        *(
            sorted((run_folder(tmp_path / d) / "weights").glob("stage*.pt"))
            for d in ("killed", "whole")
        ),
        strict=True,
    ):
        for x, y in zip(torch.load(a), torch.load(b), strict=True):  # a stage's state dicts
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not (run_folder(tmp_path / "killed") / "checkpoints").exists()


def test_a_rank_killed_with_no_restart_left_fails_the_run_naming_it(tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    proc = start(
        out,
        ["--method", "lc", "--executor", "distributed", "--max-restarts", "1"],
        kills=2,
        tmp=tmp_path,
    )
    _, err = proc.communicate(timeout=240)
    check_failed(
        out,
        subprocess.CompletedProcess(proc.args, proc.returncode, "", err),
        "rank 1 was killed by SIGKILL",
        started,
    )
    info = json.loads((run_folder(out) / "run.json").read_text())
    assert [(r["attempt"], r["rank"], r["from_epoch"]) for r in info["restarts"]] == [(1, 1, 1)]
    assert not leftover_ranks(out)


def test_a_rank_that_stops_answering_with_a_restart_left_is_restarted(tmp_path):
    """SIGSTOP rank 1 in epoch 2: rank 0 gives up after --rank-timeout, the stopped rank is
    killed at once and torchrun restarts the group, which ends ok; run.json names the rank."""
    out = tmp_path / "out"
    started = time.monotonic()
    args = [
        "--method",
        "lc",
        "--executor",
        "distributed",
        "--max-restarts",
        "1",
        "--rank-timeout",
        "5",
    ]
    proc = start(out, args, kills=1, sig="SIGSTOP", tmp=tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert time.monotonic() - started < 60  # not torchrun's 30 s wait on the stopped rank
    info = json.loads((run_folder(out) / "run.json").read_text())
    (restart,) = info["restarts"]
    assert restart["rank"] == 1 and restart["from_epoch"] == 1
    assert "rank 1 stopped answering: rank 0 waited --rank-timeout" in restart["reason"]
    assert sorted({k[0] for k in learning(out)}) == [1, 2, 3] and not leftover_ranks(out)
