"""`make bench` smoke test: the structure of its figures and CSV, never their values."""

import csv
import math
import statistics

import pytest
import torch

import methods
from bench.perf import benchmark

TINY = dict(
    model_names=["resnet8"],
    batch_size=8,
    warmup=1,
    steps=1,
    rounds=2,
    overhead_steps=1,
    overhead_rounds=2,
    input_shape=(3, 16, 16),
    device=torch.device("cpu"),
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a shared machine run faster on one thread (no OpenMP oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_method_against_bp_and_the_plain_loop():
    rows = benchmark.run_benchmark(groups=[2], **TINY)
    for r in rows:
        assert set(r) == set(benchmark.COLUMNS)
        assert r["ms_per_step"] > 0 and math.isfinite(r["ms_per_step"])
        assert r["ratio"] > 0 and math.isfinite(r["ratio"])
    overhead = {r["method"]: r for r in rows if r["benchmark"] == "overhead"}
    assert set(overhead) == {"plain", "bp"}
    assert overhead["plain"]["ratio"] == 1.0 and overhead["bp"]["baseline"] == "plain"
    assert overhead["bp"]["samples"] == 2
    ranked = {r["method"]: r for r in rows if r["benchmark"] == "methods"}
    assert set(ranked) == set(methods.METHODS)
    assert ranked["bp"]["ratio"] == 1.0
    assert all(r["baseline"] == "bp" and r["groups"] == 2 for r in ranked.values())


def test_main_prints_tables_and_writes_the_csv(tmp_path, capsys):
    out = tmp_path / "bench" / "bench.csv"
    benchmark.main(
        [
            "--quick",
            "--models",
            "small-cnn",
            "--groups",
            "2",
            "3",
            "--methods",
            "bp",
            "dgl",
            "--batch-size",
            "8",
            "--out",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert "Overhead" in text and "Methods" in text
    with open(out) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == benchmark.COLUMNS
        rows = list(reader)
    assert len(rows) == 3 + 4  # plain + BP at K=2, 3; then bp, dgl at K=2, 3
    assert {(r["groups"], r["method"]) for r in rows if r["benchmark"] == "methods"} == {
        ("2", "bp"),
        ("2", "dgl"),
        ("3", "bp"),
        ("3", "dgl"),
    }
    assert all(float(r["ratio"]) > 0 for r in rows)
    assert [p.name for p in out.parent.iterdir()] == ["bench.csv"]  # no temporary file left


def test_interleave_is_round_robin_and_stops_at_the_deadline():
    order = []
    contenders = [
        benchmark.Contender("m", 1, name, lambda b, x, y, name=name: order.append(name))
        for name in "abc"
    ]
    batches = [(torch.zeros(1), torch.zeros(1))]
    benchmark.interleave(
        contenders, batches, torch.device("cpu"), warmup=1, steps=2, rounds=50, deadline=0.0
    )  # long past: stop as soon as MIN_ROUNDS are done
    assert order[:3] == list("abc")  # warm-up
    assert "".join(order[3:]) == "aabbccbbccaaccaabb"
    assert all(len(c.times) == 2 * benchmark.MIN_ROUNDS for c in contenders)


def test_speedups_against_bp_in_one_process_and_ddp_on_the_same_ranks(monkeypatch):
    """Real runs replaced by figures per contender and round: the contenders, their configs,
    and the speedups as medians of the per-round ratios to either baseline."""
    from bench.perf import speedup

    seen = []
    rate = {"bp": 100.0, "ddp": 150.0, "lc": 180.0}

    def measure_run(cfg):
        seen.append(cfg)
        name = "ddp" if cfg.executor == "ddp" else cfg.method
        faster = 2 if name == "lc" and cfg.experiment.endswith("-1") else 1  # round 2
        busy = {"bp": 10.0, "ddp": 14.0, "lc": 12.0}[name]  # sum of the stages' busy seconds
        return {
            "samples_per_s": rate[name] * faster,
            "wall_over_modelled": 1.1,
            "busy_s": busy,
            "epoch_time_s": 1280 / (rate[name] * faster),
            "modelled_time_s": 5.0,
            "split_balance": 0.8 if name == "lc" else 1.0,
            "cuts": (5,) if name == "lc" else (),
        }

    monkeypatch.setattr(speedup, "measure_run", measure_run)
    monkeypatch.setattr(speedup, "best_cut_bound", lambda cfg: 1.25)
    rows = speedup.run_speedups(
        contenders=[("lc", {})], rounds=2, forecast=False, progress=lambda _: None
    )
    ddp = [c for c in seen if c.executor == "ddp"]
    assert {(c.workers, c.groups, c.threads, c.batch_size) for c in ddp} == {(2, 1, 1, 128)}
    got = {r["method"]: r for r in rows}
    assert list(got) == ["bp", "ddp", "lc"] and got["ddp"]["ranks"] == got["lc"]["ranks"] == 2
    assert got["bp"]["speedup"] == 1.0 and got["ddp"]["speedup_ddp"] == 1.0
    assert got["ddp"]["speedup"] == pytest.approx(1.5)
    assert got["lc"]["speedup"] == pytest.approx(statistics.median([1.8, 3.6]))
    assert got["lc"]["speedup_ddp"] == pytest.approx(statistics.median([1.2, 2.4]))
    assert {c.task for c in seen} == {"fashion-mnist"} and {
        c.split for c in seen if c.method == "lc"
    } == {"flops"}
    assert got["lc"]["bound"] == pytest.approx(2 * 10 / 12)  # K T_BP / sum t_k
    assert got["lc"]["efficiency"] == pytest.approx(got["lc"]["speedup"] / (20 / 12))
    assert got["lc"]["speedup_modelled"] == pytest.approx(12.8 / 5.0)  # BP's time / modelled
    assert speedup.bound("pipe-bp", {"microbatches": 4}, 2, 10.0, 10.0) == pytest.approx(2 * 4 / 5)
    table = speedup.format_table(rows)
    assert "vs DDP" in table and "bound" in table and "effic." in table
    assert got["lc"]["balance"] == 0.8 and got["lc"]["best_cut_bound"] == 1.25
    assert (
        "lc >= 0.9 x bound x 0.94 = 1.41x: 2.70x ok (0.9 x the best cut's bound x 0.94 = 1.06x: ok)"
        in table
    )
    assert (
        "LC >= 1.4x BP: 2.70x ok (bound 1.67x, 1.57x here; at the best cut 1.25x, 1.17x here)"
        in table
    )


@pytest.mark.parametrize("method, bubble", [("lc", 1.0), ("pipe-bp", 4 / 5)])
def test_best_cut_bound_is_bps_time_over_the_slowest_stage_at_the_best_cut(
    method, bubble, monkeypatch
):
    """Blocks of 1 s, a local module of 0.5 s on any block's output, K=2: the best cut is
    after block 2 (2.5 s against 2 s), so BP's 4 s over 2.5 s; pipelined BP times its bubble."""
    from bench.config import RunConfig
    from bench.models import split
    from bench.perf import speedup

    seen = {}

    def training_costs(model, input_shape, by, *, batch_size, local_cost):
        seen.update(by=by, batch_size=batch_size)
        return [1.0] * 4, [0.5] * 3 + [0.0]

    monkeypatch.setattr(split, "training_costs", training_costs)
    cfg = RunConfig(
        method=method,
        groups=2,
        model="resnet20",
        batch_size=32,
        options={"microbatches": 4} if method == "pipe-bp" else {},
    )
    assert speedup.best_cut_bound(cfg) == pytest.approx(4 / 2.5 * bubble)
    assert seen == {"by": "time", "batch_size": 32}


def test_gpu_part_runs_anywhere_and_sets_each_rule_beside_its_flops(monkeypatch):
    """The GPU part's code on the CPU (its figures are the GPU's only where CUDA is)."""
    from bench.models import runtime
    from bench.perf import gpu

    monkeypatch.setattr(runtime, "BACKEND", "aot_eager")
    rows = gpu.run_gpu(
        torch.device("cpu"),
        model="small-cnn",
        groups=2,
        split_by="flops",
        batch_size=8,
        warmup=1,
        steps=1,
        rounds=1,
        settings=["fp32", "bf16+compile"],
        rules=["bp", "lc", "pipe-bp"],
        input_shape=(1, 28, 28),
    )
    assert all(set(r) <= set(gpu.COLUMNS) and r["ms_per_step"] > 0 for r in rows)
    assert [(r["benchmark"], r["method"], r["setting"]) for r in rows[:5]] == [
        ("gpu-throughput", "plain", "fp32"),
        ("gpu-throughput", "bp", "fp32"),
        ("gpu-throughput", "plain", "bf16+compile"),
        ("gpu-throughput", "bp", "bf16+compile"),
        ("gpu-speedup", "bp", "bf16+compile"),
    ]
    ranked = {(r["method"], r["setting"]): r for r in rows if r["benchmark"] == "gpu-methods"}
    assert set(ranked) == {
        (m, s) for m in ("bp", "lc", "pipe-bp") for s in ("fp32", "bf16+compile")
    }
    assert ranked["bp", "fp32"]["ratio"] == 1.0 and ranked["bp", "fp32"]["flops_ratio"] == 1.0
    assert ranked["pipe-bp", "fp32"]["flops_ratio"] == pytest.approx(1.0)
    assert ranked["pipe-bp", "fp32"]["goal"] == 1.3
    lc = ranked["lc", "fp32"]  # 128-filter critics on a small net: far more than BP
    assert lc["flops_ratio"] > 1.5 and lc["goal"] == pytest.approx(1.2 * lc["flops_ratio"])


def test_gpu_tables_print_samples_per_s_and_costs_beside_flops():
    from bench.perf import gpu

    common = dict(model="lc-vgg", groups=4, batch_size=128)
    rows = [
        dict(
            common,
            benchmark="gpu-throughput",
            method="plain",
            setting="fp32",
            samples_per_s=15000.0,
            ratio=1.0,
        ),
        dict(
            common,
            benchmark="gpu-throughput",
            method="bp",
            setting="fp32",
            samples_per_s=14500.0,
            ratio=0.967,
        ),
        dict(
            common,
            benchmark="gpu-speedup",
            method="bp",
            setting="bf16+compile",
            baseline="bp fp32",
            ratio=2.4,
            goal=2.0,
        ),
        dict(
            common,
            benchmark="gpu-methods",
            method="bp",
            setting="fp32",
            ms_per_step=8.5,
            ratio=1.0,
            flops_ratio=1.0,
            goal=1.2,
        ),
        dict(
            common,
            benchmark="gpu-methods",
            method="lc",
            setting="fp32",
            ms_per_step=12.0,
            ratio=1.41,
            flops_ratio=1.15,
            goal=1.38,
        ),
    ]
    text = gpu.format_tables(rows)
    assert "fp32                15000       14500   0.967" in text
    assert "BP at bf16+compile / BP at fp32: 2.40x samples/s (goal >= 2)" in text
    assert "lc          12.00   1.410        1.150    1.380  no" in text


def test_gpu_part_is_skipped_in_one_line_without_cuda(monkeypatch, capsys):
    from bench.perf import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu.main([])
    assert capsys.readouterr().out == "GPU part of make bench: skipped (no CUDA on this machine)\n"


def test_the_forecast_check_names_every_contender_outside_the_range_and_every_pair_misordered():
    from bench.perf import speedup

    def row(method, measured, predicted):
        return {
            "model": "m",
            "method": method,
            "measured_s": measured,
            "predicted_s": predicted,
            "predicted_over_measured": predicted / measured,
        }

    good = [row("bp", 10.0, 10.5), row("ddp", 5.0, 5.5), row("lc", 5.2, 5.0)]
    assert speedup.forecast_check(good) == [
        "m forecast / measured within 0.85-1.15 for every contender: ok",
        "m forecast orders the 2 pairs measured more than 10% apart as measured: ok",
    ]
    bad = [row("bp", 10.0, 10.5), row("ddp", 5.0, 12.0), row("lc", 8.0, 8.0)]
    assert speedup.forecast_check(bad) == [
        "m forecast / measured within 0.85-1.15 for every contender: MISSED (ddp 2.40)",
        "m forecast orders the 3 pairs measured more than 10% apart as measured: MISSED "
        "(bp/ddp, ddp/lc)",
    ]


def test_each_round_calibrates_and_the_medians_forecast_every_contender(monkeypatch):
    """The forecast of each contender comes from the median of the rounds' calibrations and
    its own cuts, beside the median of its measured epochs."""
    from bench.forecast import calibrate as calibration
    from bench.perf import speedup

    calls, seen = [], []

    def calibrate(model, task, runs, **kw):
        calls.append(model)
        return {
            "device": {
                "achieved_flops": {"fp32": 1e10},
                "overhead_s": 1e-3,
                "colocated_slowdown": 1.05,
            },
            "link": {"latency_s": 1e-4, "bandwidth_bytes_per_s": 3e9},
            "round": len(calls),
        }

    def measure_run(cfg):
        return {
            "samples_per_s": 100.0,
            "busy_s": 1.0,
            "epoch_time_s": 2.0 + len(calls),
            "split_balance": 1.0,
            "cuts": (3,) if cfg.executor == "distributed" else (),
        }

    class Forecast:
        def epoch_s(self, batches):
            return 3.0 * batches / 20

    monkeypatch.setattr(speedup, "calibration", calibrate)
    monkeypatch.setattr(speedup, "measure_run", measure_run)
    monkeypatch.setattr(speedup, "best_cut_bound", lambda cfg: 1.0)
    monkeypatch.setattr(
        calibration, "merge", lambda profiles: {"rounds": [p["round"] for p in profiles]}
    )
    monkeypatch.setattr(speedup.profiles, "parse", lambda data, origin: data)
    monkeypatch.setattr(
        speedup.predict,
        "for_run",
        lambda cfg, profile, cuts: seen.append((cfg.method, profile, cuts)) or Forecast(),
    )
    rows = speedup.run_speedups(contenders=[("lc", {})], rounds=3, progress=lambda _: None)
    assert calls == ["resnet20"] * 3
    assert seen == [
        ("bp", {"rounds": [1, 2, 3]}, None),
        ("bp", {"rounds": [1, 2, 3]}, None),
        ("lc", {"rounds": [1, 2, 3]}, (3,)),
    ]
    for r in rows:
        assert r["measured_s"] == 4.0 and r["predicted_s"] == 3.0  # the median round's epoch
        assert r["predicted_over_measured"] == 0.75
