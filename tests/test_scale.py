"""`lcbench scale` and `lcbench calibrate`: the forecast's rows, summary and maps, a profile
measured here, and bad input."""

import csv
import math

import pytest
import tomllib

from bench.cli import main
from bench.forecast import profiles, scale


def call(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_scale_writes_rows_a_summary_and_a_map_per_model_and_profile(tmp_path, capsys):
    out = tmp_path / "scale"
    code, text, _ = call(
        [
            "scale",
            "small-cnn",
            "--task",
            "fashion-mnist",
            "--profile",
            "h100-sxm-nvlink",
            "--profile",
            "rtx4090-10gbe",
            "--workers",
            "2,4",
            "--rules",
            "pipe-bp,dgl,lc",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    with open(out / "scale.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["profile"] for r in rows} == {"h100-sxm-nvlink", "rtx4090-10gbe"}
    assert {r["rule"] for r in rows} == {"ddp", "pipe-bp", "dgl", "lc"}
    swept = [r for r in rows if r["own_link"] == "False"]
    assert len({float(r["bandwidth_gbps"]) for r in swept}) == len(scale.BANDWIDTHS)
    for r in rows:
        assert int(r["stages"]) * int(r["replicas"]) * int(r["neuron_groups"]) == int(r["workers"])
        assert float(r["step_s"]) > 0 and r["kind"] == "forecast" and r["times"] == "flops"
        assert float(r["speedup_vs_ddp"]) == pytest.approx(
            next(
                float(d["step_s"])
                for d in rows
                if d["rule"] == "ddp"
                and (d["profile"], d["workers"], d["bandwidth_gbps"], d["own_link"])
                == (r["profile"], r["workers"], r["bandwidth_gbps"], r["own_link"])
            )
            / float(r["step_s"])
        )
    assert "Where each rule beats data-parallel BP" in text and "Assumptions:" in text
    summary = (out / "scale.md").read_text()
    assert "| profile (link) | rule | K=2 | K=4 |" in summary and "**small-cnn**" in summary
    assert len([x for x in summary.splitlines() if x.startswith("| h100-sxm-nvlink")]) == 3
    with open(out / "crossovers.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 2 * 3  # profiles x K x rules
    for profile in ("h100-sxm-nvlink", "rtx4090-10gbe"):
        assert (out / f"scale-small-cnn-{profile}.png").stat().st_size > 10_000
    assert not list(out.glob(".*"))  # no temporary file left


def test_on_a_slow_link_ddps_all_reduce_dominates_and_a_decoupled_rule_wins():
    """lc-vgg's gradients (32 MB) outweigh the activations at its cuts: at 0.8 Gb/s DDP's ring
    all-reduce alone takes longer than a decoupled rule's whole step; the summary tells the
    bandwidths where it wins as the rows do."""
    profile = profiles.load("h100-25gbe")
    rows = scale.grid("lc-vgg", "cifar10", profile, workers=[4], rules=["dgl"])
    swept = sorted((r for r in rows if not r["own_link"]), key=lambda r: r["bandwidth_gbps"])
    slowest = [r for r in swept if r["bandwidth_gbps"] == swept[0]["bandwidth_gbps"]]
    ddp, dgl = (next(r for r in slowest if r["rule"] == rule) for rule in ("ddp", "dgl"))
    params = 7_944_330 * 4
    ring = 2 * 3 * profile.link.latency_s + 2 * 3 / 4 * params / (ddp["bandwidth_gbps"] * 1e9 / 8)
    assert ddp["step_s"] >= ring > dgl["step_s"]
    (cross,) = scale.crossovers(rows)
    first_loss = next(
        r["bandwidth_gbps"] for r in swept if r["rule"] == "dgl" and r["speedup_vs_ddp"] <= 1
    )
    last_win = max(
        r["bandwidth_gbps"]
        for r in swept
        if r["rule"] == "dgl" and r["bandwidth_gbps"] < first_loss
    )
    assert cross["beats_ddp"].startswith(f"<{scale._gbps(last_win)}")
    line = next(x for x in scale.summary(rows).splitlines() if "| DGL |" in x)
    assert f"| {cross['beats_ddp']}" in line


def test_the_bandwidths_a_rule_wins_at_are_told_as_runs():
    grid = [1.0, 10.0, 100.0, 1000.0]
    assert scale._ranges(grid, [True] * 4) == "any"
    assert scale._ranges(grid, [False] * 4) == "never"
    assert scale._ranges(grid, [True, True, False, False]) == "<10"
    assert scale._ranges(grid, [False, False, True, True]) == ">100"
    assert scale._ranges(grid, [False, True, True, False]) == "10-100"
    assert scale._ranges(grid, [True, False, False, True]) == "<1, >1000"


@pytest.mark.parametrize(
    "args, words",
    [
        (["scale", "vgg99"], "unknown model 'vgg99'"),
        (["scale", "resnet20", "--workers", "0"], "--workers must be positive integers"),
        (["scale", "resnet20", "--workers", "a,b"], "--workers expects comma-separated integers"),
        (["scale", "resnet20", "--profile", "tpu-v9"], "no profile 'tpu-v9'"),
        (["scale", "resnet20", "--rules", "sgd"], "unknown rule 'sgd'"),
        (
            ["scale", "resnet20", "--precision", "fp64"],
            "--precision must be one of fp32, tf32, bf16",
        ),
        (["scale", "resnet20", "--stages", "1"], "--stages at least 2"),
        (["scale"], "name a MODEL, a --run or a --results folder"),
        (["scale", "resnet20", "--out", "/proc/lcbench"], "cannot write"),
        (["calibrate", "--model", "vgg99", "--out", "p.toml"], "unknown model 'vgg99'"),
        (
            ["calibrate", "--batch-sizes", "0,8", "--out", "p.toml"],
            "--batch-sizes must be positive",
        ),
        (["calibrate", "--method", "sgd", "--out", "p.toml"], "unknown method 'sgd'"),
        (["calibrate", "--link", "tpu-v9", "--out", "p.toml"], "no profile 'tpu-v9'"),
        (["calibrate", "--out", "/proc/lcbench/p.toml"], "cannot write"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = call(args, capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_a_malformed_profile_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[profile]\nkind = 'measured'\n[device]\n")
    code, _, err = call(
        ["scale", "resnet20", "--profile", str(bad), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "no [link] table" in err and len(err.strip().splitlines()) == 1


@pytest.mark.dist
def test_calibrate_measures_this_machine_and_scale_forecasts_from_it(tmp_path, capsys):
    path = tmp_path / "here.toml"
    code, out, _ = call(
        [
            "calibrate",
            "--model",
            "mlp",
            "--task",
            "digits",
            "--method",
            "dgl",
            "--batch-sizes",
            "8,16",
            "--threads",
            "1",
            "--out",
            str(path),
        ],
        capsys,
    )
    assert code == 0 and "GFLOP/s achieved" in out
    data = tomllib.loads(path.read_text())
    (timed,) = data["workloads"]
    assert timed["model"] == "mlp" and timed["batch_sizes"] == [8, 16]
    assert len(timed["blocks"]) == 4 and all(len(b["forward_s"]) == 2 for b in timed["blocks"])
    assert {tuple(local["shape"]) for local in timed["local"]} == {(256,)}
    assert data["link"]["latency_s"] > 0 and data["link"]["bandwidth_bytes_per_s"] > 0
    assert data["device"]["colocated_slowdown"] > 0 and data["device"]["step_cv"] >= 0
    assert data["link"]["pipeline_handoff_s"] >= 0 and len(data["link"]["handoff_s"]) == 3
    assert data["link"]["handoff_stage_s"] > 0  # the stand-ins' work: half the mlp at 16 / 4
    profile = profiles.load(str(path))
    assert profile.kind == "measured" and profile.device.flops["fp32"] > 0
    rows = scale.grid("mlp", "digits", profile, workers=[2], rules=["dgl"], batch_size=16)
    assert {r["times"] for r in rows} == {"timed"}
    assert all(math.isfinite(r["step_s"]) and r["step_s"] > 0 for r in rows)
