"""Checkpoints: a run stopped anywhere (an exception, SIGTERM, SIGKILL) continues from its last
epoch to the rows and weights of a run never stopped; checkpoints are written atomically,
pruned, and refused when they are not the run's."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import methods.lc
from bench import checkpoint, prepare, runner
from bench.cli import main
from bench.config import RunConfig
from bench.executors import sequential
from bench.records import RunFailed

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    task="digits",
    model="mlp",
    epochs=3,
    batch_size=64,
    limit_train=256,
    limit_test=128,
    save_weights=True,
)
ARGS = [
    "--task",
    "digits",
    "--model",
    "mlp",
    "--epochs",
    "3",
    "--batch-size",
    "64",
    "--limit-train",
    "256",
    "--limit-test",
    "128",
    "--save-weights",
    "--quiet",
]
#: stops a subprocess in the middle of epoch 2 (epoch 1's checkpoint written) and waits
HOOK = """
import os
if os.environ.get("LCBENCH_TEST_READY"):
    import time
    from bench.executors import sequential
    step, starts = sequential.train_step, []
    def train_step(stages, batch, x, y):
        starts.append(batch == 0)
        step(stages, batch, x, y)
        if sum(starts) == 2 and batch == 1:
            open(os.environ["LCBENCH_TEST_READY"], "w").close()
            time.sleep(600)
    sequential.train_step = train_step
"""


def run_folder(out: Path) -> Path:
    (path,) = out.glob("*/*/run.json")
    return path.parent


def learning_rows(folder: Path) -> list[dict]:
    """metrics.csv in order, time and memory figures left out."""
    with open(folder / "metrics.csv") as f:
        return [
            r
            for r in csv.DictReader(f)
            if not (r["metric"] == "samples_per_s" or r["metric"].endswith(("_time_s", "_bytes")))
        ]


def assert_same_weights(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (a / "weights").glob("stage*.pt"))
    assert names and names == sorted(p.name for p in (b / "weights").glob("stage*.pt"))
    for name in names:
        for x, y in zip(
            torch.load(a / "weights" / name), torch.load(b / "weights" / name), strict=True
        ):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def fail():
    raise RuntimeError("stopped")


def stop_in_epoch(monkeypatch, epoch: int, stop=fail):
    """Call ``stop()`` after batch 1 of ``epoch``."""
    step, starts = sequential.train_step, []

    def train_step(stages, batch, x, y):
        starts.append(batch == 0)
        step(stages, batch, x, y)
        if sum(starts) == epoch and batch == 1:
            stop()

    monkeypatch.setattr(sequential, "train_step", train_step)


def execute(cfg: RunConfig) -> Path:
    return runner.execute(prepare.prepare(cfg), progress=False).folder


def checkpoint_files(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "checkpoints").iterdir())


def call(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize("method", ["bp", "lc", "dni", "adgl"])
def test_a_run_stopped_mid_epoch_continues_to_the_rows_and_weights_of_one_never_stopped(
    method, tmp_path, monkeypatch
):
    whole = execute(RunConfig(method=method, **TINY, out=str(tmp_path / "whole")))
    cfg = RunConfig(method=method, **TINY, out=str(tmp_path / "stopped"))
    with monkeypatch.context() as patch:
        stop_in_epoch(patch, 3)
        with pytest.raises(RunFailed, match="stopped"):
            execute(cfg)
    folder = run_folder(tmp_path / "stopped")
    assert checkpoint_files(folder) == ["epoch1.json", "epoch1.pt", "epoch2.json", "epoch2.pt"]
    assert {r["epoch"] for r in learning_rows(folder)} == {"1", "2"}

    assert execute(cfg) == folder
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "ok" and [r["epoch"] for r in info["resumes"]] == [2]
    assert learning_rows(folder) == learning_rows(whole)  # in order: nothing repeated
    assert_same_weights(folder, whole)
    assert not (folder / "checkpoints").exists()  # removed once the run is ok


def test_a_replay_buffer_survives_a_checkpoint_empty_or_not(tmp_path):
    cfg = RunConfig(method="adgl", **TINY)
    (_, saved), (_, loaded) = prepare.prepare(cfg).stages, prepare.prepare(cfg).stages
    for pushed in (0, 3):
        for _ in range(pushed):
            saved.buffer.push(torch.randn(4, 8), torch.arange(4))
        torch.save(saved.state_dict(), tmp_path / "stage.pt")
        loaded.load_state_dict(torch.load(tmp_path / "stage.pt", weights_only=True))
        assert [uses for *_, uses in loaded.buffer.entries] == [0] * pushed
        assert torch.equal(loaded.buffer.generator.get_state(), saved.buffer.generator.get_state())


def test_a_checkpoint_torn_before_its_marker_is_never_read(tmp_path, monkeypatch):
    """Killed after epoch 2's rows and state were written but before its marker: the run
    continues from epoch 1, and epoch 2's rows are written once."""
    whole = execute(RunConfig(method="lc", **TINY, out=str(tmp_path / "whole")))
    cfg = RunConfig(method="lc", **TINY, out=str(tmp_path / "torn"))
    commit = checkpoint.Checkpoints.commit

    def dying_commit(self, epoch):
        if epoch == 2:
            fail()
        commit(self, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.Checkpoints, "commit", dying_commit)
        with pytest.raises(RunFailed, match="stopped"):
            execute(cfg)
    folder = run_folder(tmp_path / "torn")
    assert checkpoint_files(folder) == ["epoch1.json", "epoch1.pt", "epoch2.pt"]
    assert {r["epoch"] for r in learning_rows(folder)} == {"1", "2"}

    execute(cfg)
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "ok" and [r["epoch"] for r in info["resumes"]] == [1]
    assert learning_rows(folder) == learning_rows(whole)
    assert_same_weights(folder, whole)


def test_checkpoint_every_n_and_no_checkpoint_leave_the_run_id_alone(tmp_path, monkeypatch):
    configs = [
        RunConfig(method="bp", **TINY, checkpoint_every=n, out=str(tmp_path / str(n)))
        for n in (1, 2, 0)
    ]
    assert len({prepare.resolve(cfg).run_id for cfg in configs}) == 1
    for cfg in configs[1:]:
        with monkeypatch.context() as patch:
            stop_in_epoch(patch, 3)
            with pytest.raises(RunFailed):
                execute(cfg)
    assert checkpoint_files(run_folder(tmp_path / "2")) == ["epoch2.json", "epoch2.pt"]
    never = run_folder(tmp_path / "0")
    assert not (never / "checkpoints").exists()
    execute(configs[2])  # starts over
    info = json.loads((never / "run.json").read_text())
    assert info["status"] == "ok" and "resumes" not in info
    assert {r["epoch"] for r in learning_rows(never)} == {"1", "2", "3"}


def test_only_the_newest_two_complete_epochs_are_kept(tmp_path):
    store = checkpoint.Checkpoints(tmp_path, {"run_id": "x"})
    store.folder.mkdir()
    for leftover in (".epoch1.pt.killed.tmp", "epoch9.pt"):  # what an earlier attempt left
        (store.folder / leftover).write_text("")
    for epoch in range(1, 5):
        store.save(epoch, {"value": torch.tensor(epoch)})
        assert store.latest() == (epoch - 1 or None)  # not complete before its marker
        store.commit(epoch)
    assert checkpoint_files(tmp_path) == ["epoch3.json", "epoch3.pt", "epoch4.json", "epoch4.pt"]
    assert store.load(store.latest(), torch.device("cpu"))["value"] == 4

    ranks = [checkpoint.Checkpoints(tmp_path / "dist", {"run_id": "x"}, rank) for rank in (0, 1)]
    for epoch in (1, 2, 3):
        for store in ranks:
            store.save(epoch, {})
        for store in reversed(ranks):  # only rank 0 marks
            store.commit(epoch)
    assert checkpoint_files(tmp_path / "dist") == [
        "epoch2.json",
        "epoch2.rank0.pt",
        "epoch2.rank1.pt",
        "epoch3.json",
        "epoch3.rank0.pt",
        "epoch3.rank1.pt",
    ]


def test_a_checkpoint_that_is_not_the_runs_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    args = ["run", "--method", "lc", *ARGS, "--out", str(tmp_path)]
    with monkeypatch.context() as patch:
        stop_in_epoch(patch, 2)
        assert call(args, capsys)[0] == 1
    mine = run_folder(tmp_path)
    other = prepare.run_folder(
        prepare.resolve(RunConfig(method="lc", **TINY, lr=0.05, out=str(tmp_path)))
    )
    shutil.copytree(mine / "checkpoints", other / "checkpoints")  # another config's
    code, _, err = call([*args, "--lr", "0.05"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "lr 0.02 there, 0.05 here" in err and "to start the run over" in err
    assert sorted(p.name for p in other.iterdir()) == ["checkpoints"]  # nothing written

    before = {p.name: p.read_bytes() for p in mine.iterdir() if p.is_file()}
    with monkeypatch.context() as patch:  # another version of the rule: its update changed
        patch.setattr(methods.lc.LCStage, "version", methods.lc.LCStage.version + 1)
        code, _, err = call(args, capsys)
    assert code == 2 and err.count("\n") == 1 and "rule_version" in err and "LCStage" in err, err
    assert {p.name: p.read_bytes() for p in mine.iterdir() if p.is_file()} == before


def test_a_checkpoint_survives_a_harmless_edit_of_the_rules_source(tmp_path, monkeypatch, capsys):
    """A comment added to the rule's file leaves its version, and the run continues."""
    args = ["run", "--method", "lc", *ARGS, "--out", str(tmp_path)]
    with monkeypatch.context() as patch:
        stop_in_epoch(patch, 2)
        assert call(args, capsys)[0] == 1
    source = Path(methods.lc.__file__)
    text = source.read_text()
    try:
        source.write_text(text + "\n# a harmless comment\n")
        code, _, err = call(args, capsys)
    finally:
        source.write_text(text)
    assert code == 0, err
    info = json.loads((run_folder(tmp_path) / "run.json").read_text())
    assert info["status"] == "ok"


def test_sigterm_stops_a_run_that_the_same_command_continues(tmp_path, monkeypatch, capsys):
    args = ["run", "--method", "dni", *ARGS, "--out", str(tmp_path)]
    handler = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        stop_in_epoch(patch, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
        code, _, err = call(args, capsys)
    assert code == 143 and err.count("\n") == 1 and "stopped by SIGTERM" in err, err
    assert signal.getsignal(signal.SIGTERM) == handler
    folder = run_folder(tmp_path)
    info = json.loads((folder / "run.json").read_text())
    assert (info["status"], info["error"]) == ("failed", "interrupted")
    assert checkpoint_files(folder) == ["epoch1.json", "epoch1.pt"]
    assert call(args, capsys)[0] == 0
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "ok" and [r["epoch"] for r in info["resumes"]] == [1]


def lcbench(*args, env=None, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "bench", "run", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_sigkill_mid_epoch_then_the_same_command_matches_a_run_never_killed(tmp_path):
    args = ["--method", "lc", *ARGS]
    whole = lcbench(*args, "--out", str(tmp_path / "whole"))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    ready = tmp_path / "ready"
    out = tmp_path / "killed"
    proc = lcbench(
        *args,
        "--out",
        str(out),
        env={"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "LCBENCH_TEST_READY": str(ready)},
    )
    deadline = time.monotonic() + 240
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "epoch 2 never started"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    folder = run_folder(out)
    assert json.loads((folder / "run.json").read_text())["status"] == "running"
    assert checkpoint_files(folder) == ["epoch1.json", "epoch1.pt"]

    again = lcbench(*args, "--out", str(out))
    assert again.wait(300) == 0 and whole.wait(300) == 0, again.stderr.read()
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "ok" and [r["epoch"] for r in info["resumes"]] == [1]
    assert learning_rows(folder) == learning_rows(run_folder(tmp_path / "whole"))
    assert_same_weights(folder, run_folder(tmp_path / "whole"))


@pytest.mark.parametrize(
    "errno_, words", [(28, "No space left on device"), (30, "Read-only file system")]
)
def test_a_checkpoint_folder_that_fills_up_or_turns_read_only_keeps_the_last_one(
    errno_, words, tmp_path, monkeypatch, capsys
):
    """Epoch 2's checkpoint cannot be written (the folder full or read-only: the OSError the
    file system raises, injected). The run fails in one line saying so, epoch 1's checkpoint
    is whole and readable, and once the fault is gone the same command continues from it and
    ends ok with every epoch once. (A real full tmpfs: the test below.)"""
    args = ["run", "--method", "lc", *ARGS, "--out", str(tmp_path)]
    folder = prepare.run_folder(prepare.resolve(RunConfig(method="lc", **TINY, out=str(tmp_path))))
    write = checkpoint.replace_atomic

    def failing(path, writer):
        if Path(path).name.startswith("epoch2"):
            raise OSError(errno_, os.strerror(errno_), str(path))
        write(path, writer)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "replace_atomic", failing)
        code, _, err = call(args, capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "cannot write the checkpoint of epoch 2" in err and words in err, err
    assert "epoch 1's is kept" in err
    assert checkpoint_files(folder) == ["epoch1.json", "epoch1.pt"]
    assert torch.load(folder / "checkpoints" / "epoch1.pt", weights_only=False)["epoch"] == 1
    code, _, err = call(args, capsys)
    assert code == 0, err
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "ok" and [r["epoch"] for r in info["resumes"]] == [1]
    with open(folder / "metrics.csv") as f:
        epochs = [
            int(r["epoch"])
            for r in csv.DictReader(f)
            if r["metric"] == "test_acc" and r["stage"] == ""
        ]
    assert epochs == [1, 2, 3]


def mount_tmpfs(path: Path, size: int) -> None:
    """A real tmpfs of ``size`` bytes at ``path``; the test is skipped where none can be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"no tmpfs can be mounted here: {done.stderr.strip() or done.returncode}")


def test_a_real_full_tmpfs_says_the_bytes_needed_and_free_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, capsys
):
    """Torch's zip writer turns ENOSPC into "unexpected pos" (a RuntimeError, no errno): the
    checkpoint is serialized in memory first, so a full disk is one line with the bytes the
    checkpoint needs and the bytes free. On a tmpfs that holds one checkpoint but not two,
    epoch 2's fails, epoch 1's stays whole, and with room made the same command continues."""
    args = ["run", "--method", "lc", *ARGS]
    with monkeypatch.context() as patch:  # one checkpoint, kept, to learn its size
        patch.setattr(checkpoint.Checkpoints, "remove", lambda self: None)
        code, _, err = call([*args, "--epochs", "1", "--out", str(tmp_path / "size")], capsys)
    assert code == 0, err
    (one,) = (tmp_path / "size").glob("*/*/checkpoints/epoch1.pt")
    size = one.stat().st_size
    cfg = prepare.resolve(RunConfig(method="lc", **TINY, out=str(tmp_path / "out")))
    folder = prepare.run_folder(cfg) / "checkpoints"
    mount_tmpfs(folder, size * 3 // 2)
    try:
        code, _, err = call([*args, "--out", str(tmp_path / "out")], capsys)
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "cannot write the checkpoint of epoch 2" in err and "No space left on device" in err
        found = re.search(r"it needs ([\d,]+) bytes, ([\d,]+) are free", err)
        needed, free = (int(n.replace(",", "")) for n in found.groups())
        assert needed > free and abs(needed - size) < size / 100, err  # epoch 2: more rows
        assert "epoch 1's is kept" in err
        assert sorted(p.name for p in folder.iterdir()) == ["epoch1.json", "epoch1.pt"]
        assert torch.load(folder / "epoch1.pt", weights_only=False)["epoch"] == 1
        subprocess.run(["mount", "-o", f"remount,size={size * 4}", str(folder)], check=True)
        code, _, err = call([*args, "--out", str(tmp_path / "out")], capsys)
        assert code == 0, err
        info = json.loads((folder.parent / "run.json").read_text())
        assert info["status"] == "ok" and [r["epoch"] for r in info["resumes"]] == [1]
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_run_whose_folder_is_removed_mid_run_fails_in_one_line(tmp_path, monkeypatch, capsys):
    args = ["run", "--method", "lc", *ARGS, "--out", str(tmp_path)]
    folder = prepare.run_folder(prepare.resolve(RunConfig(method="lc", **TINY, out=str(tmp_path))))
    with monkeypatch.context() as patch:
        stop_in_epoch(patch, 2, lambda: shutil.rmtree(folder))
        code, _, err = call(args, capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "run.json could not be written" in err
