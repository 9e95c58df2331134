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

from bench import models, prepare, runner
from bench.config import RunConfig
from bench.data import tasks
from bench.forecast import calibrate, predict, profiles
from bench.models import split

CONTENDERS = (("lc", {}), ("dgl", {}), ("dni", {}), ("pipe-bp", {"microbatches": 4}))


def last_epoch(record) -> dict[str, float]:
    """Whole-network figures of the run's last epoch, ``busy_s``: the sum over its layer
    groups of their busy seconds (a layer group's slowest rank), and the split's balance
    (``split_balance``, an epoch-1 row)."""
    last = max(r["epoch"] for r in record.rows)
    rows = [r for r in record.rows if r["epoch"] == last]
    busy: dict[str, float] = {}
    for r in rows:
        if r["metric"] == "busy_time_s":
            layer = str(r["stage"]).split(".")[0]
            busy[layer] = max(busy.get(layer, 0.0), float(r["value"]))
    balance = next((r["value"] for r in record.rows if r["metric"] == "split_balance"), math.nan)
    return {
        **{r["metric"]: r["value"] for r in rows if r["stage"] == ""},
        "busy_s": sum(busy.values()),
        "split_balance": balance,
        "cuts": tuple(record.info.get("split", {}).get("cuts") or ()),
    }


def bound(method: str, options: dict, ranks: int, bp_busy: float, busy: float) -> float:
    """The rule's own speedup bound on ``ranks`` workers: K T_BP / sum_k t_k (perfect
    balance of its stages' busy time, its local modules included), times the bubble
    M / (M + K - 1) of pipelined BP over M micro-batches."""
    if method in ("bp", "ddp"):
        return math.nan
    m = options.get("microbatches", 1)
    return ranks * bp_busy / busy * (m / (m + ranks - 1) if method == "pipe-bp" else 1.0)


def best_cut_bound(cfg: RunConfig) -> float:
    """The rule's bound at the best cut its model's blocks allow, from measured parts: each
    block's forward and backward and the rule's local work on each block's output, timed
    one after another in this process (one thread; a batch of ``cfg.batch_size``), cut by
    the same DP that balances ``--split time``: BP's time (all blocks) over the slowest
    stage's there, times pipelined BP's bubble. Where it is below a goal, no cut reaches it."""
    info = tasks.TASKS[cfg.task]
    timed = replace(cfg, split="time").validated()
    model = models.build_model(cfg.model, info.input_shape, info.num_classes, width=cfg.width)
    with prepare.torch_threads(1):
        costs, ends = split.training_costs(
            model,
            info.input_shape,
            "time",
            batch_size=cfg.batch_size,
            local_cost=lambda shape: prepare.local_cost(timed, shape, info.num_classes),
        )
    stages = split.group_costs(costs, split.balanced_cuts(costs, cfg.groups, ends), ends)
    m = cfg.options.get("microbatches", 1)
    bubble = m / (m + cfg.groups - 1) if cfg.method == "pipe-bp" else 1.0
    return sum(costs) / max(stages) * bubble


def measure_run(cfg: RunConfig) -> dict[str, float]:
    prep = prepare.prepare(cfg)
    return last_epoch(runner.execute(prep, progress=False))


def calibration(
    model: str, task: str, runs: dict, *, batch_size: int, groups: int, progress=print
) -> dict:
    """This machine calibrated for the contenders (``bench.forecast.calibrate``), one thread
    as their ranks run: the blocks at the batches they compute (the global batch, its share
    on each of K ranks, a micro-batch, also as a pipeline holds it), each rule's local module
    at its run's cut, the link and the slowdown of two ranks sharing the machine."""
    sizes, held = {batch_size, batch_size // groups}, set()
    after = {}
    for name, cfg in runs.items():
        sizes.add(batch_size // cfg.options.get("microbatches", 1))
        if cfg.method == "pipe-bp":
            held.add(batch_size // cfg.options.get("microbatches", 4))
        if cfg.executor == "distributed" and name != "pipe-bp":
            cuts = prepare.build_groups(
                cfg, tasks.TASKS[task].input_shape, tasks.TASKS[task].num_classes
            )[1]
            after[model, name] = [c - 1 for c in cuts]
    return calibrate.calibrate(
        [model],
        task,
        methods_=[m for _, m in after],
        batch_sizes=sorted(sizes),
        threads=1,
        local_sizes=[batch_size],
        local_after=after,
        held_sizes=sorted(held),
        name=f"cpu-{model}",
        progress=progress,
    )


def run_speedups(
    *,
    model: str = "resnet20",
    groups: int = 2,
    batch_size: int = 128,
    batches: int = 20,
    epochs: int = 2,
    rounds: int = 3,
    split: str = "flops",
    task: str = "fashion-mnist",
    contenders=CONTENDERS,
    forecast: bool = True,
    profile_out=None,
    progress=print,
) -> list[dict]:
    """One row per contender (the baselines first): median samples/s; median speedups over
    BP in one process (measured, and modelled from the ranks' busy times) and over DDP on
    ``groups`` ranks; the rule's bound and the efficiency (measured speedup / bound); median
    wall/model ratio. With ``forecast``, every round starts by calibrating the machine
    (``calibration``); their medians make one profile (written to ``profile_out``), from
    which each contender's last epoch is forecast (``predicted_s``) beside its median
    measured time (``measured_s``)."""
    with tempfile.TemporaryDirectory(prefix="lcbench-speedup-") as out:
        base = RunConfig(
            method="bp",
            groups=1,
            task=task,
            model=model,
            epochs=epochs,
            batch_size=batch_size,
            limit_train=batches * batch_size,
            limit_test=batch_size,
            threads=1,
            device="cpu",
            experiment="speedup",
            out=out,
        )
        runs = {"bp": base, "ddp": replace(base, executor="ddp", workers=groups)}
        for method, options in contenders:
            runs[method] = replace(
                base,
                method=method,
                groups=groups,
                executor="distributed",
                split=split,
                options=dict(options),
            )
        best = {}
        for method, _ in contenders:
            best[method] = best_cut_bound(runs[method])
            progress(
                f"  {method:<8} bound at the best cut of {model}'s blocks: {best[method]:.2f}x"
            )
        figures: dict[str, list[dict]] = {name: [] for name in runs}
        calibrations = []
        for r in range(rounds):
            if forecast:
                calibrations.append(
                    calibration(
                        model,
                        task,
                        runs,
                        batch_size=batch_size,
                        groups=groups,
                        progress=lambda _: None,
                    )
                )
                progress(f"  round {r + 1}/{rounds} calibrated: {_rate(calibrations[-1])}")
            order = list(runs)[r % len(runs) :] + list(runs)[: r % len(runs)]
            for name in order:
                # a fresh folder per round: the run id is the same, and a run is not resumed
                cfg = replace(runs[name], experiment=f"speedup-{r}")
                figures[name].append(measure_run(cfg))
                progress(
                    f"  round {r + 1}/{rounds} {name:<8} "
                    f"{figures[name][-1]['samples_per_s']:8.1f} samples/s"
                )
    profile = None
    if forecast:
        merged = calibrate.merge(calibrations)
        if profile_out:
            calibrate.write(merged, profile_out)
        profile = profiles.parse(merged, f"calibrated on {model}")

    def median(name: str, figure) -> float:
        """The median over rounds of ``figure(contender's, BP's)``, each from the same round."""
        return statistics.median(figure(f, b) for f, b in zip(figures[name], figures["bp"]))

    rows = []
    for name, cfg in runs.items():
        ranks = 1 if name == "bp" else groups
        speedup = median(name, lambda f, b: f["samples_per_s"] / b["samples_per_s"])
        limit = median(name, lambda f, b: bound(name, cfg.options, ranks, b["busy_s"], f["busy_s"]))
        measured = statistics.median(f["epoch_time_s"] for f in figures[name])
        predicted = (
            predict.for_run(cfg, profile, figures[name][0]["cuts"] or None).epoch_s(batches)
            if profile
            else math.nan
        )
        rows.append(
            {
                "method": name,
                "ranks": ranks,
                "model": model,
                "task": task,
                "batch_size": batch_size,
                "split": cfg.split if cfg.executor == "distributed" else "-",
                "samples_per_s": statistics.median(f["samples_per_s"] for f in figures[name]),
                "speedup": speedup,
                "speedup_modelled": median(
                    name, lambda f, b: b["epoch_time_s"] / f.get("modelled_time_s", math.nan)
                ),
                "bound": limit,
                "efficiency": speedup / limit,
                "balance": statistics.median(f["split_balance"] for f in figures[name]),
                "best_cut_bound": best.get(name, math.nan),
                "speedup_ddp": statistics.median(
                    f["samples_per_s"] / d["samples_per_s"]
                    for f, d in zip(figures[name], figures["ddp"])
                ),
                "wall_over_modelled": statistics.median(
                    f.get("wall_over_modelled", math.nan) for f in figures[name]
                ),
                "measured_s": measured,
                "predicted_s": predicted,
                "predicted_over_measured": predicted / measured,
            }
        )
    return rows


def _rate(profile: dict) -> str:
    device, link = profile["device"], profile.get("link", {})
    return (
        f"{device['achieved_flops']['fp32'] / 1e9:.1f} GFLOP/s, overhead "
        f"{1e3 * device['overhead_s']:.2f} ms/block, two ranks x{device['colocated_slowdown']:.3f}, "
        f"step cv {device.get('step_cv', 0.0):.3f}, "
        f"link {1e6 * link.get('latency_s', math.nan):.0f} us + s / "
        f"{link.get('bandwidth_bytes_per_s', math.nan) / 1e9:.2f} GB/s"
    )


#: the machine's efficiency on 2 ranks: two compute-bound processes here run at 1.88x one
MACHINE_EFFICIENCY = 0.94


def reach(r) -> str:
    """What the rule's bounds allow on this machine: at perfect balance, and at the best cut."""
    return (
        f"(bound {r['bound']:.2f}x, {r['bound'] * MACHINE_EFFICIENCY:.2f}x here; at the best cut "
        f"{r['best_cut_bound']:.2f}x, {r['best_cut_bound'] * MACHINE_EFFICIENCY:.2f}x here)"
    )


def targets(rows) -> list[str]:
    """The goals of the model-parallel comparison (K=2), each with its verdict and, beside a
    speed goal, what the rule's bounds allow (a goal above them is out of reach)."""
    by = {(r["model"], r["method"]): r for r in rows}
    out = []
    for (model, method), r in by.items():
        goal = {"dgl": 1.7, "lc": 1.4}.get(method)
        if goal is not None:
            out.append(
                f"{model} {method.upper()} >= {goal}x BP: {r['speedup']:.2f}x "
                f"{'ok' if r['speedup'] >= goal else 'MISSED'} {reach(r)}"
            )
        if method not in ("bp", "ddp"):
            goal = 0.9 * r["bound"] * MACHINE_EFFICIENCY
            best = 0.9 * min(r["bound"], r["best_cut_bound"]) * MACHINE_EFFICIENCY
            out.append(
                f"{model} {method} >= 0.9 x bound x {MACHINE_EFFICIENCY} = {goal:.2f}x: "
                f"{r['speedup']:.2f}x {'ok' if r['speedup'] >= goal else 'MISSED'}"
                f" (0.9 x the best cut's bound x {MACHINE_EFFICIENCY} = {best:.2f}x: "
                f"{'ok' if r['speedup'] >= best else 'MISSED'})"
            )
        if method in ("dgl", "lc") and (model, "pipe-bp") in by:
            pipe = by[model, "pipe-bp"]["speedup"]
            out.append(
                f"{model} {method} faster than pipelined BP: {r['speedup']:.2f}x vs "
                f"{pipe:.2f}x {'ok' if r['speedup'] > pipe else 'MISSED'}"
            )
    return out


#: how close a forecast must come to the measured epoch time, and the difference in measured
#: time beyond which the forecast must order two contenders as the measurements do
FORECAST_RANGE = (0.85, 1.15)
ORDER_MARGIN = 1.10


def forecast_check(rows) -> list[str]:
    """Per model: every contender's forecast within FORECAST_RANGE of its measured epoch time,
    and every pair whose measured times differ by more than ORDER_MARGIN ordered alike."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        part = [r for r in rows if r["model"] == model and math.isfinite(r["predicted_s"])]
        if not part:
            continue
        low, high = FORECAST_RANGE
        outside = [
            f"{r['method']} {r['predicted_over_measured']:.2f}"
            for r in part
            if not low <= r["predicted_over_measured"] <= high
        ]
        out.append(
            f"{model} forecast / measured within {low}-{high} for every contender: "
            + ("ok" if not outside else "MISSED (" + ", ".join(outside) + ")")
        )
        pairs = [
            (a, b)
            for i, a in enumerate(part)
            for b in part[i + 1 :]
            if max(a["measured_s"], b["measured_s"])
            > ORDER_MARGIN * min(a["measured_s"], b["measured_s"])
        ]
        wrong = [
            f"{a['method']}/{b['method']}"
            for a, b in pairs
            if (a["measured_s"] - b["measured_s"]) * (a["predicted_s"] - b["predicted_s"]) <= 0
        ]
        out.append(
            f"{model} forecast orders the {len(pairs)} pairs measured more than "
            f"{ORDER_MARGIN - 1:.0%} apart as measured: "
            + ("ok" if not wrong else f"MISSED ({', '.join(wrong)})")
        )
    return out


def format_table(rows) -> str:
    lines = [
        "Model parallelism: K ranks x 1 thread against BP in 1 process x 1 thread "
        "(the machine allows ~1.88x for K=2), measured and modelled (from the ranks' busy",
        "times); bound: the rule's own, K T_BP / sum_k t_k (its local modules' work included;",
        "pipelined BP times its bubble M / (M+K-1)); efficiency: measured / bound; and against",
        "data-parallel BP (ddp) on the same K ranks x 1 thread (equal resources); best cut: the",
        "bound at the best cut the blocks allow (BP's time over the slowest stage's at that cut, from",
        "each block and local module timed alone); balance: how evenly the run's cuts share the",
        "rule's training FLOPs (mean stage / largest); epoch: the last epoch's measured seconds",
        "(median over rounds) and the forecast from this machine's calibration (bench.forecast)",
        f"{'model':<10}{'method':<9}{'ranks':>6}{'samples/s':>11}{'vs BP':>8}{'modelled':>10}"
        f"{'bound':>8}{'effic.':>8}{'best cut':>10}{'balance':>9}{'vs DDP':>8}{'wall/model':>12}"
        f"{'epoch (s)':>11}{'forecast':>10}{'fc/meas':>9}",
    ]
    for r in rows:
        lines.append(
            f"{r['model']:<10}{r['method']:<9}{r['ranks']:>6}{r['samples_per_s']:>11.1f}"
            f"{r['speedup']:>8.2f}{r['speedup_modelled']:>10.2f}{r['bound']:>8.2f}"
            f"{r['efficiency']:>8.2f}{r['best_cut_bound']:>10.2f}{r['balance']:>9.2f}"
            f"{r['speedup_ddp']:>8.2f}{r['wall_over_modelled']:>12.2f}"
            f"{r['measured_s']:>11.2f}{r['predicted_s']:>10.2f}"
            f"{r['predicted_over_measured']:>9.2f}"
        )
    return "\n".join(lines + ["", *targets(rows), *forecast_check(rows)])
