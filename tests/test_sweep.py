"""`lcbench sweep`: spec checking, resuming after SIGKILL, failures recorded, signals."""

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

from bench import sweep
from bench.cli import main
from bench.executors import sequential
from bench.records import COLUMNS

EXAMPLE = Path(__file__).parents[1] / "bench" / "experiments" / "example.toml"
TINY = """
[experiment]
name = "tiny"
[grid]
method = ["bp", "lc"]
seed = [0, 1]
[settings]
task = "digits"
epochs = 2
batch_size = 16
limit_train = 192
limit_test = 128
"""


def call(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def write(folder: Path, text: str, name: str = "spec.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def runs(out: Path) -> dict[str, dict]:
    """run_id -> run.json of every run folder under ``out``."""
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/*/run.json")}


def rows(out: Path) -> list[tuple]:
    """Every metrics row but the timing and memory figures, as compared between sweeps."""
    found = []
    for path in out.glob("*/*/metrics.csv"):
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                m = r["metric"]
                if m == "samples_per_s" or m.endswith(("_time_s", "_bytes")):
                    continue
                found.append((r["run_id"], r["epoch"], r["stage"], m, r["value"]))
    return found


def check_complete(out: Path) -> None:
    """Every visible file is a whole run.json, metrics.csv or checkpoint (hidden *.tmp may
    remain)."""
    for path in out.rglob("*"):
        if path.is_dir() or path.name.startswith("."):
            continue
        if path.parent.name == "checkpoints":
            json.loads(path.read_text()) if path.suffix == ".json" else torch.load(path)
            continue
        assert path.name in ("run.json", "metrics.csv"), path
        text = path.read_text()
        assert text.endswith("\n"), path
        if path.name == "run.json":
            json.loads(text)
            continue
        table = list(csv.reader(text.splitlines()))
        assert table[0] == COLUMNS, path
        for row in table[1:]:
            assert len(row) == len(COLUMNS), path
            int(row[COLUMNS.index("epoch")]), float(row[-1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny sweep run once without interruption: (spec, out folder)."""
    folder = tmp_path_factory.mktemp("reference")
    spec = write(folder, TINY)
    tally = sweep.run_sweep(sweep.load_spec(spec, out=str(folder / "out")), progress=False)
    assert (tally.ok, tally.skipped, tally.failed) == (4, 0, 0)
    return spec, folder / "out"


def test_sigkill_then_resume_repeats_nothing_and_matches_uninterrupted(reference, tmp_path):
    spec, reference_out = reference
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bench", "sweep", str(spec), "--out", str(out), "-q"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        statuses = [info.get("status") for info in runs(out).values()]
        if "ok" in statuses and "running" in statuses:
            break
        assert proc.poll() is None, "the sweep ended before it could be killed"
        assert time.monotonic() < deadline, "no run finished in time"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    check_complete(out)
    done = {
        run_id: (info["started"], (out / "tiny" / run_id / "metrics.csv").read_bytes())
        for run_id, info in runs(out).items()
        if info["status"] == "ok"
    }
    assert done

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{4 - len(done)} ok, {len(done)} skipped, 0 failed" in again.stdout
    check_complete(out)
    after = runs(out)
    assert {i["status"] for i in after.values()} == {"ok"} and len(after) == 4
    for run_id, (started, metrics) in done.items():
        assert after[run_id]["started"] == started
        assert (out / "tiny" / run_id / "metrics.csv").read_bytes() == metrics
    found = rows(out)
    assert len(found) == len(set(found)), "a row was written twice"
    assert set(found) == set(rows(reference_out)) and len(found) == len(rows(reference_out))


def test_second_invocation_skips_everything(reference, capsys):
    spec, out = reference
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.*")}
    code, stdout, _ = call(["sweep", str(spec), "--out", str(out), "-q"], capsys)
    assert code == 0 and "0 ok, 4 skipped, 0 failed" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.*")} == before


def test_failed_diverged_and_invalid_runs_are_recorded_and_the_sweep_goes_on(
    tmp_path, capsys, monkeypatch
):
    spec = write(
        tmp_path,
        """
[grid]
method = ["lc", "bp"]
lr = [1e6, 0.02]
groups = [6, 2]        # small-cnn has 5 blocks: K=6 is invalid when the run is prepared
[settings]
task = "digits"
epochs = 2
batch_size = 32
limit_train = 192
limit_test = 128
""",
    )
    real_train = sequential.train

    def train(prep, record, **kw):  # lc breaks at run time
        if prep.cfg.method == "lc":
            raise RuntimeError("boom")
        return real_train(prep, record, **kw)

    monkeypatch.setattr(sequential, "train", train)
    out = tmp_path / "out"
    code, stdout, err = call(["sweep", str(spec), "--out", str(out), "-q"], capsys)
    assert code == 1 and "1 ok, 0 skipped, 7 failed (1 diverged)" in stdout, err
    check_complete(out)
    found = {
        (i["config"]["method"], i["config"]["lr"], i["config"]["groups"]): i
        for i in runs(out).values()
    }
    assert len(found) == 8
    assert found["bp", 0.02, 2]["status"] == "ok"  # the last run: the sweep went on
    assert found["bp", 1e6, 2]["status"] == "diverged"
    assert "non-finite" in found["bp", 1e6, 2]["error"]
    for lr in (1e6, 0.02):
        assert found["lc", lr, 2]["status"] == "failed"
        assert found["lc", lr, 2]["error"] == "RuntimeError: boom"
        for method in ("lc", "bp"):
            assert found[method, lr, 6]["status"] == "failed"
            assert "6 groups" in found[method, lr, 6]["error"]


def test_sigterm_stops_cleanly_and_marks_the_run_interrupted(tmp_path, capsys, monkeypatch):
    spec = write(tmp_path, TINY.replace("epochs = 2", "epochs = 1"))
    real_train = sequential.train

    def train(prep, record, **kw):  # the second run is terminated while it trains
        if prep.cfg.method == "bp" and prep.cfg.seed == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_train(prep, record, **kw)

    monkeypatch.setattr(sequential, "train", train)
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    code, _, err = call(["sweep", str(spec), "--out", str(out), "-q"], capsys)
    assert code == 143
    assert "stopped by SIGTERM (1 ok, 0 skipped, 0 failed)" in err.splitlines()[-1]
    assert sorted((i["status"], i["error"]) for i in runs(out).values()) == [
        ("failed", "interrupted"),
        ("ok", None),
    ]
    assert signal.getsignal(signal.SIGTERM) == handler
    check_complete(out)


def test_example_spec_presets_and_option_axes(tmp_path):
    smoke = sweep.load_spec(EXAMPLE, "smoke")
    assert [(c.method, c.seed) for c in smoke] == [("bp", 0), ("bp", 1), ("lc", 0), ("lc", 1)]
    assert all(
        (c.task, c.model, c.groups, c.epochs, c.limit_train, c.experiment)
        == ("fashion-mnist", "small-cnn", 2, 1, 1024, "example")
        for c in smoke
    )
    assert smoke[2].options["critic_lr"] == 1e-4
    assert [c.run_id for c in sweep.load_spec(EXAMPLE, "smoke")] == [c.run_id for c in smoke]
    assert len({c.run_id for c in smoke + sweep.load_spec(EXAMPLE)}) == 8

    spec = write(
        tmp_path,
        """
[grid]
method = ["bp", "lc"]
seed = [0, 1]
[grid.options.lc]
critic_lr = [1e-4, 1e-3]
[presets.one-seed]
settings = { seed = 3 }
""",
    )
    cfgs = sweep.load_spec(spec, "one-seed")  # bp has no critic: its two cells are one run
    assert [(c.method, c.seed, c.options.get("critic_lr")) for c in cfgs] == [
        ("bp", 3, None),
        ("lc", 3, 1e-4),
        ("lc", 3, 1e-3),
    ]
    assert cfgs[0].experiment == "spec"


@pytest.mark.parametrize(
    "text, words",
    [
        ("[grid\nmethod = ['bp']\n", "bad TOML"),
        ("[grid]\nmethod = ['bp']\n[sweep]\nx = 1\n", "unknown key 'sweep'"),
        ("[grid]\nmethod = ['bp']\n[settings]\nepoch = 2\n", "unknown key 'epoch' in [settings]"),
        (
            "[grid]\nmethod = ['lc']\n[options.lc]\ncritic_size = 3\n",
            "unknown option 'critic_size'",
        ),
        (
            "[grid]\nmethod = ['bp']\n[presets.smoke]\nsettings = { foo = 1 }\n",
            "unknown key 'foo' in [presets.smoke.settings]",
        ),
        ("[grid]\nmethod = ['bp', 'sgd']\n", "unknown method 'sgd'"),
        ("[grid]\nmethod = ['bp']\ntask = ['mnist-x']\n", "unknown task 'mnist-x'"),
        ("[grid]\nmethod = ['bp']\nmodel = ['vgg99']\n", "unknown model 'vgg99'"),
        ("[grid]\n[settings]\nmethod = 'bp'\n", "empty grid"),
        ("[grid]\nmethod = ['bp']\nseed = []\n", "seed is an empty list"),
        ("[grid]\nmethod = ['bp']\nseed = [0, 'one']\n", "seed must be an integer"),
        ("[grid]\nmethod = ['bp']\nseed = 0\n", "seed must be a list"),
        ("[grid]\nmethod = ['bp']\n[settings]\nout = 'elsewhere'\n", "'out' cannot be set"),
        ("[grid]\nmethod = ['bp']\ngroups = [0]\n", "--groups must be at least 1"),
    ],
)
def test_malformed_spec_is_one_line_naming_the_file_and_exit_2(text, words, tmp_path, capsys):
    spec = write(tmp_path, text, "broken.toml")
    out = tmp_path / "out"
    code, _, err = call(["sweep", str(spec), "--out", str(out)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and str(spec) in err and words in err, err
    assert not out.exists()


def test_unknown_preset_and_missing_file(tmp_path, capsys):
    spec = write(tmp_path, "[grid]\nmethod = ['bp']\n")
    code, _, err = call(["sweep", str(spec), "--preset", "paper"], capsys)
    assert code == 2 and "unknown preset 'paper'" in err and err.count("\n") == 1
    code, _, err = call(["sweep", str(tmp_path / "nope.toml")], capsys)
    assert code == 2 and "nope.toml" in err and err.count("\n") == 1


def test_several_grids_are_a_union_and_a_preset_can_replace_them(tmp_path):
    spec = write(
        tmp_path,
        """
[[grid]]
method = ["bp", "lc"]
groups = [2]
[[grid]]
method = ["lc"]
groups = [4]
[settings]
task = "digits"
[presets.quick]
settings = { epochs = 1 }
[[presets.other.grid]]
method = ["dgl"]
groups = [3]
""",
    )
    cells = [(c.method, c.groups, c.epochs) for c in sweep.load_spec(spec)]
    assert cells == [("bp", 2, 3), ("lc", 2, 3), ("lc", 4, 3)]
    assert [(c.method, c.groups, c.epochs) for c in sweep.load_spec(spec, "quick")] == [
        ("bp", 2, 1),
        ("lc", 2, 1),
        ("lc", 4, 1),
    ]
    assert [(c.method, c.groups) for c in sweep.load_spec(spec, "other")] == [("dgl", 3)]


def test_a_stopped_run_continues_from_its_checkpoint_when_the_sweep_runs_again(
    tmp_path, monkeypatch
):
    spec = write(tmp_path, TINY.replace('["bp", "lc"]', '["lc"]').replace("[0, 1]", "[0]"))
    cfgs = sweep.load_spec(spec, out=str(tmp_path / "out"))
    step, starts = sequential.train_step, []

    def train_step(stages, batch, x, y):  # stopped in the middle of epoch 2
        starts.append(batch == 0)
        step(stages, batch, x, y)
        if sum(starts) == 2 and batch == 1:
            raise RuntimeError("stopped")

    with monkeypatch.context() as patch:
        patch.setattr(sequential, "train_step", train_step)
        assert sweep.run_sweep(cfgs, progress=False).failed == 1
    tally = sweep.run_sweep(cfgs, progress=False)
    assert (tally.ok, tally.failed) == (1, 0)
    (info,) = runs(tmp_path / "out").values()
    assert info["status"] == "ok" and [r["epoch"] for r in info["resumes"]] == [1]
    found = rows(tmp_path / "out")
    assert len(found) == len(set(found)) and {r[1] for r in found} == {"1", "2"}
