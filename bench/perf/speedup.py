"""`make bench`, part 3: real model parallelism against one process and against data
parallelism on as many ranks, measured side by side.

Two baselines: BP in one process with one thread, and data-parallel BP (DDP: the whole net on
each of K ranks of one thread, ``lcbench run --executor ddp``, the same global batch). Each
decoupled rule (and the pipelined-BP baseline) runs on K ranks of one thread each (``lcbench
run --executor distributed``), the same model, batch and data. Each contender is a real run
(``prepare.prepare`` / ``runner.execute``) of ``epochs`` epochs over ``batches`` batches; its
figures are those of its last epoch (the first one warms up). Rounds interleave the
contenders so that drift in the machine's load hits them alike; a contender's figure is the
median over rounds.

Speedup = samples/s of the contender / samples/s of a baseline in the same round: against BP
in one process (its limit on K ranks is K, on this 2-core machine about 1.88 for K=2) and
against DDP on the same K ranks x 1 thread (equal resources: above 1, the rule beats what a
user with K workers would otherwise run). ``wall/model`` is how far the contender's real
epoch time is from the modelled K-worker time computed from its ranks' busy times.
"""
from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import replace

from bench import prepare, runner
from bench.config import RunConfig

CONTENDERS = (("lc", {}), ("dgl", {}), ("dni", {}), ("pipe-bp", {"microbatches": 4}))


def last_epoch(record) -> dict[str, float]:
    """Whole-network figures of the run's last epoch."""
    last = max(r["epoch"] for r in record.rows)
    return {r["metric"]: r["value"] for r in record.rows if r["epoch"] == last and r["stage"] == ""}


def measure_run(cfg: RunConfig) -> dict[str, float]:
    prep = prepare.prepare(cfg)
    return last_epoch(runner.execute(prep, progress=False))


def run_speedups(*, model: str = "resnet20", groups: int = 2, batch_size: int = 128,
                 batches: int = 10, epochs: int = 2, rounds: int = 3, split: str = "time",
                 contenders=CONTENDERS, progress=print) -> list[dict]:
    """One row per contender (the baselines first): median samples/s, median speedups over
    BP in one process and over DDP on ``groups`` ranks, median wall/model ratio."""
    with tempfile.TemporaryDirectory(prefix="lcbench-speedup-") as out:
        base = RunConfig(method="bp", groups=1, task="synthetic", model=model, epochs=epochs,
                         batch_size=batch_size, limit_train=batches * batch_size, limit_test=
                         batch_size, threads=1, device="cpu", experiment="speedup", out=out)
        runs = {"bp": base, "ddp": replace(base, executor="ddp", workers=groups)}
        for method, options in contenders:
            runs[method] = replace(base, method=method, groups=groups, executor="distributed",
                                   split=split, options=dict(options))
        figures: dict[str, list[dict]] = {name: [] for name in runs}
        for r in range(rounds):
            order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
            for name in order:
                # a fresh folder per round: the run id is the same, and a run is not resumed
                cfg = replace(runs[name], experiment=f"speedup-{r}")
                figures[name].append(measure_run(cfg))
                progress(f"  round {r + 1}/{rounds} {name:<8} "
                         f"{figures[name][-1]['samples_per_s']:8.1f} samples/s")

    def speedup(name: str, baseline: str) -> float:
        return statistics.median(f["samples_per_s"] / b["samples_per_s"]
                                 for f, b in zip(figures[name], figures[baseline]))

    rows = []
    for name, cfg in runs.items():
        split_by = cfg.split if cfg.executor == "distributed" else "-"
        rows.append({
            "method": name, "ranks": 1 if name == "bp" else groups, "model": model,
            "batch_size": batch_size, "split": split_by,
            "samples_per_s": statistics.median(f["samples_per_s"] for f in figures[name]),
            "speedup": speedup(name, "bp"), "speedup_ddp": speedup(name, "ddp"),
            "wall_over_modelled": statistics.median(f.get("wall_over_modelled", math.nan)
                                                    for f in figures[name]),
        })
    return rows


def format_table(rows) -> str:
    lines = ["Model parallelism: K ranks x 1 thread against BP in 1 process x 1 thread "
             "(speedup limit here: ~1.88 for K=2)",
             "and against data-parallel BP (ddp) on the same K ranks x 1 thread (equal resources)",
             f"{'model':<10}{'method':<9}{'ranks':>6}{'samples/s':>11}{'vs BP':>8}{'vs DDP':>8}"
             f"{'wall/model':>12}"]
    for r in rows:
        lines.append(f"{r['model']:<10}{r['method']:<9}{r['ranks']:>6}{r['samples_per_s']:>11.1f}"
                     f"{r['speedup']:>8.2f}{r['speedup_ddp']:>8.2f}{r['wall_over_modelled']:>12.2f}")
    return "\n".join(lines)
