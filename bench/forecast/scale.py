"""`lcbench scale`: where each rule beats data-parallel and pipelined BP, forecast over
workers K, link bandwidths and profiles (``bench.forecast.predict``).

For every model, profile, K and bandwidth, each contender takes the configuration that
suits it best among those it could run on K workers: DDP the K replicas; pipelined BP and the
decoupled rules S stages (a power of two up to K and the model's blocks) x D = K/S replicas
of each, pipelined BP over M in {S, 2S, 4S} micro-batches; GN-DGL S stages x G neuron groups
x D. Best: the fastest that fits a device's memory, else the fastest. The rows (CSV) hold its
seconds per batch, its speedups over BP on one device, over DDP and over pipelined BP on the
same K, its memory per device and whether it fits; the map draws them; the summary says, per
rule and K, the bandwidth below which it beats DDP and whether it ever beats pipelined BP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

import methods

from . import predict
from .model import Link, fits
from .predict import RESERVE, Forecast, Setup, Times
from .profiles import Profile
from .workload import workload

WORKERS = (2, 4, 8, 16, 32, 64)
#: the map's bandwidth axis, bytes/s (0.1 to 1000 GB/s, four points a decade)
BANDWIDTHS = tuple(float(b) for b in np.logspace(8, 12, 17))
NEURON_GROUPS = 2


def parallel_rules() -> tuple[str, ...]:
    """The rules the map sets against DDP: those whose K workers run side by side."""
    return tuple(m.name for m in methods.contenders() if m.parallel)


def map_name(rule: str) -> str:
    """The rule's name on the map (its neuron groups for GN-DGL's kind)."""
    short = methods.contender(rule).short
    return f"{short} (G={NEURON_GROUPS})" if methods.contender(rule).neuron_grouped else short


ASSUMPTIONS = (
    "one link between any two workers, the profile's latency, its bandwidth (or the map's)",
    "messages between stages overlap computation (sent and received asynchronously)",
    "DDP: gradients all-reduced by a ring in torch's 25 MiB buckets as the backward pass fills "
    "them (Li et al., VLDB 2020)",
    "more workers than stages: each stage replicated, its replicas all-reducing its gradients "
    "(decoupled rules: overlapped with its backward pass; pipelined BP: after the flush)",
    "strong scaling: the global batch stays the run's, each worker taking its share",
    "workers in lockstep (DDP's replicas, a pipeline's stages) wait for the slowest, a step's "
    "time normal with the profile's cv and independent across workers; decoupled stages do not",
    f"fits: a worker's bytes at most {1 - RESERVE:.0%} of its device's memory (the rest: context, "
    "workspaces); bf16 halves saved activations, weights, gradients and messages stay fp32",
    "data held on the device: no input time, but where a profile timed it",
    "GN-DGL: the layer groups width-grouped as its runs build them (timed so where the profile "
    "calibrated them, else FLOPs at the profile's rate), a neuron group's worker taking 1/G "
    "of its layer group's work, parameters and activations, plus its head and the all-gather "
    "of the group's output",
    "async DGL: the first stage sets the pace (a slower stage below reuses or skips inputs)",
)


@dataclass(frozen=True)
class Point:
    """One contender's best configuration at one (K, bandwidth)."""

    rule: str
    forecast: Forecast
    fits: bool


def setups(
    rule: str,
    workers: int,
    blocks: int,
    batch_size: int,
    *,
    stages: int | None = None,
    neuron_groups: int = NEURON_GROUPS,
) -> list[Setup]:
    """The configurations ``rule`` could run on ``workers`` (see the module docstring)."""
    how = predict.timing(rule)
    if how == "data-parallel":
        return [Setup(rule, workers)] if batch_size % workers == 0 else []
    groups = neuron_groups if methods.contender(rule).neuron_grouped else 1
    out = []
    s = 2
    while s * groups <= workers and s <= blocks:
        if (stages is None or s == stages) and workers % (s * groups) == 0:
            replicas = workers // (s * groups)
            if batch_size % replicas == 0:
                if how == "pipeline":
                    out += [
                        Setup(rule, workers, s, microbatches=m)
                        for m in (s, 2 * s, 4 * s)
                        if (batch_size // replicas) % m == 0
                    ]
                else:
                    out.append(Setup(rule, workers, s, neuron_groups=groups))
        s *= 2
    return out


def best(times: Times, candidates: Iterable[Setup], link: Link, batch_size: int) -> Point | None:
    """The fastest of ``candidates`` that fits, else the fastest (None: no candidate)."""
    points = []
    for setup in candidates:
        forecast = predict.predict(times, setup, link, batch_size)
        points.append(
            Point(
                setup.rule,
                forecast,
                fits(forecast.memory_bytes, times.profile.device.memory_bytes, RESERVE),
            )
        )
    if not points:
        return None
    return min(points, key=lambda p: (not p.fits, p.forecast.step_s))


def grid(
    model: str,
    task: str,
    profile: Profile,
    *,
    batch_size: int = 128,
    workers: Sequence[int] = WORKERS,
    rules: Sequence[str] | None = None,
    bandwidths: Sequence[float] = BANDWIDTHS,
    precision: str = "fp32",
    width: float = 1.0,
    options: dict | None = None,
    stages: int | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict]:
    """The rows of one model on one profile: every rule, K and bandwidth (and the profile's own
    link, marked ``own_link``)."""
    options = options or {}
    rules = parallel_rules() if rules is None else rules
    one, ddp_name, pipeline = (methods.timed_as(t) for t in ("one", "data-parallel", "pipeline"))
    base = Times(workload(model, task, one, width=width), profile, precision)
    timed = {
        rule: Times(
            workload(
                model,
                task,
                rule,
                width=width,
                options={k: v for k, v in options.items() if k in _option_names(rule)},
            ),
            profile,
            precision,
        )
        for rule in rules
    }
    blocks = len(base.work.blocks)
    bp = predict.predict(base, Setup(one, 1), profile.link.link(), batch_size)
    bp_fits = fits(bp.memory_bytes, profile.device.memory_bytes, RESERVE)
    links = [(profile.link.link(), True)] + [
        (Link(profile.link.latency_s, b), False) for b in bandwidths
    ]
    rows = []
    for k in workers:
        progress(f"  {model} on {profile.name}: K={k}")
        for link, own in links:
            ddp = best(base, setups(ddp_name, k, blocks, batch_size), link, batch_size)
            points = {
                rule: best(
                    timed[rule],
                    setups(rule, k, blocks, batch_size, stages=stages),
                    link,
                    batch_size,
                )
                for rule in rules
                if not methods.contender(rule).neuron_grouped or timed[rule].work.grouped
            }
            pipe = points.get(pipeline) or best(
                timed.get(pipeline) or base,
                setups(pipeline, k, blocks, batch_size, stages=stages),
                link,
                batch_size,
            )
            for rule, point in [(ddp_name, ddp), *points.items()]:
                if point is None:
                    continue
                rows.append(
                    _row(
                        model,
                        task,
                        profile,
                        k,
                        link,
                        own,
                        batch_size,
                        precision,
                        rule,
                        point,
                        bp,
                        bp_fits,
                        ddp,
                        pipe,
                    )
                )
    return rows


def _option_names(rule: str) -> set[str]:
    import methods

    return set(methods.option_defaults(rule))


def _row(
    model, task, profile, k, link, own, batch_size, precision, rule, point, bp, bp_fits, ddp, pipe
) -> dict:
    f = point.forecast
    return {
        "model": model,
        "task": task,
        "profile": profile.name,
        "device": profile.device.name,
        "link": profile.link.name if own else "swept",
        "own_link": own,
        "bandwidth_gbps": 8 * link.bandwidth / 1e9,
        "latency_us": 1e6 * link.latency_s,
        "workers": k,
        "rule": rule,
        "stages": f.setup.stages,
        "replicas": f.setup.replicas,
        "neuron_groups": f.setup.neuron_groups,
        "microbatches": f.setup.microbatches,
        "batch_size": batch_size,
        "precision": precision,
        "step_s": f.step_s,
        "speedup_vs_bp": bp.step_s / f.step_s,
        "speedup_vs_ddp": ddp.forecast.step_s / f.step_s if ddp else math.nan,
        "speedup_vs_pipe_bp": pipe.forecast.step_s / f.step_s if pipe else math.nan,
        "mem_per_device_bytes": f.memory_bytes,
        "fits": point.fits,
        "bp_mem_bytes": bp.memory_bytes,
        "bp_fits": bp_fits,
        "ddp_fits": ddp.fits if ddp else False,
        "times": f.source,
        "kind": "forecast",
    }


def crossovers(rows: Sequence[dict]) -> list[dict]:
    """Per model, profile, rule and K: the link bandwidths (Gb/s) at which the rule beats DDP,
    as the runs of swept bandwidths where it does (``<X``: up to X, where the all-reduce costs
    DDP most; ``>X``: from X up, where the rule's own messages no longer bound it; ``X-Y``;
    ``any``; ``never``), and whether it beats pipelined BP at any swept bandwidth."""
    out = []
    groups: dict = {}
    for r in rows:
        if r["rule"] != methods.DDP.name:
            groups.setdefault((r["model"], r["profile"], r["rule"], r["workers"]), []).append(r)
    for (model, profile, rule, k), part in groups.items():
        swept = sorted((r for r in part if not r["own_link"]), key=lambda r: r["bandwidth_gbps"])
        own = next(r for r in part if r["own_link"])
        wins = [r["speedup_vs_ddp"] > 1 for r in swept]
        out.append(
            {
                "model": model,
                "profile": profile,
                "rule": rule,
                "workers": k,
                "beats_ddp": _ranges([r["bandwidth_gbps"] for r in swept], wins),
                "beats_ddp_on_own_link": own["speedup_vs_ddp"] > 1,
                "speedup_vs_ddp_own_link": own["speedup_vs_ddp"],
                "beats_pipe_bp_somewhere": rule != methods.timed_as("pipeline")
                and any(r["speedup_vs_pipe_bp"] > 1 for r in swept),
                "speedup_vs_pipe_bp_own_link": own["speedup_vs_pipe_bp"],
            }
        )
    return out


def _ranges(bandwidths: Sequence[float], wins: Sequence[bool]) -> str:
    """The runs of ``wins`` over the sorted ``bandwidths``, as text (see ``crossovers``)."""
    if all(wins):
        return "any"
    runs, start = [], None
    for i, win in enumerate([*wins, False]):
        if win and start is None:
            start = i
        elif not win and start is not None:
            runs.append((start, i - 1))
            start = None
    last = len(wins) - 1
    text = [
        f"<{_gbps(bandwidths[b])}"
        if a == 0
        else f">{_gbps(bandwidths[a])}"
        if b == last
        else f"{_gbps(bandwidths[a])}-{_gbps(bandwidths[b])}"
        for a, b in runs
    ]
    return ", ".join(text) or "never"


def _gbps(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def draw_maps(rows: Sequence[dict], out) -> list:
    """Per model and profile, one figure: a row per rule, its speedup over DDP and over
    pipelined BP against K (x) and link bandwidth (y), blue where it wins; the crossover
    (speedup 1) as a black line, the profile's own bandwidth dashed, hatched where the rule
    does not fit a device, and where DDP starts or stops fitting one device a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    from bench.report.plots import save

    paths = []
    for model, profile in dict.fromkeys((r["model"], r["profile"]) for r in rows):
        part = [r for r in rows if (r["model"], r["profile"]) == (model, profile)]
        swept = [r for r in part if not r["own_link"]]
        rules = [rule for rule in parallel_rules() if any(r["rule"] == rule for r in swept)]
        ks = sorted({r["workers"] for r in swept})
        bands = sorted({r["bandwidth_gbps"] for r in swept})
        own = next(r["bandwidth_gbps"] for r in part if r["own_link"])
        fig, axes = plt.subplots(
            len(rules),
            2,
            figsize=(6.3, 1.35 * len(rules) + 0.8),
            sharex=True,
            sharey=True,
            squeeze=False,
            layout="constrained",
        )
        norm = TwoSlopeNorm(vcenter=0.0, vmin=-3.0, vmax=3.0)
        for i, rule in enumerate(rules):
            for j, (column, label) in enumerate(
                (("speedup_vs_ddp", "over DDP"), ("speedup_vs_pipe_bp", "over pipelined BP"))
            ):
                ax = axes[i][j]
                if rule == methods.timed_as("pipeline") and j == 1:
                    ax.set_axis_off()
                    continue
                value = np.full((len(bands), len(ks)), np.nan)
                misfit = np.zeros_like(value)
                for r in swept:
                    if r["rule"] == rule:
                        y, x = bands.index(r["bandwidth_gbps"]), ks.index(r["workers"])
                        value[y, x] = math.log2(r[column])
                        misfit[y, x] = not r["fits"]
                mesh = ax.pcolormesh(
                    range(len(ks)),
                    bands,
                    np.clip(value, -3, 3),
                    cmap="RdBu",
                    norm=norm,
                    shading="nearest",
                )
                if np.nanmin(value) < 0 < np.nanmax(value):
                    ax.contour(
                        range(len(ks)), bands, value, levels=[0.0], colors="black", linewidths=1.2
                    )
                if misfit.any():
                    ax.contourf(
                        range(len(ks)),
                        bands,
                        misfit,
                        levels=[0.5, 1.5],
                        hatches=["//"],
                        colors="none",
                    )
                ax.axhline(own, color="black", linestyle="--", linewidth=0.8)
                ax.set_yscale("log")
                ax.set_title(f"{map_name(rule)} {label}", fontsize=8)
                ax.tick_params(labelsize=7)
                _fit_lines(ax, swept, ks)
        for ax in axes[-1]:
            ax.set_xticks(range(len(ks)), [str(k) for k in ks])
            ax.set_xlabel("workers K", fontsize=8)
        for row in axes:
            row[0].set_ylabel("link (Gb/s)", fontsize=8)
        bar = fig.colorbar(mesh, ax=axes, shrink=0.5, pad=0.02)
        bar.set_ticks([-3, -2, -1, 0, 1, 2, 3], labels=["1/8", "1/4", "1/2", "1", "2", "4", "8"])
        bar.set_label("speedup (blue: the rule wins)", fontsize=8)
        bp_fits = part[0]["bp_fits"]
        fig.suptitle(
            f"{model} on {profile}: forecast speedup, batch {part[0]['batch_size']} "
            f"({part[0]['precision']})\ndashed: the profile's own link; BP "
            f"{'fits' if bp_fits else 'does not fit'} one device; hatched: does not fit",
            fontsize=8,
        )
        paths += save(fig, _folder(out), f"scale-{model}-{profile}")
    return paths


def _fit_lines(ax, swept, ks) -> None:
    """A dotted line where DDP's replica starts or stops fitting one device, as K grows."""
    fit = [next((r["ddp_fits"] for r in swept if r["workers"] == k), None) for k in ks]
    for x, (a, b) in enumerate(zip(fit, fit[1:])):
        if a is not None and b is not None and a != b:
            ax.axvline(x + 0.5, color="dimgray", linestyle=":", linewidth=1)


def _folder(out):
    from pathlib import Path

    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def summary(rows: Sequence[dict]) -> str:
    """The crossovers as Markdown, a table per model (a row per profile and rule, a column per
    K), with the assumptions they rest on."""
    cross = crossovers(rows)
    ks = sorted({c["workers"] for c in cross})
    lines = [
        "Where each rule beats data-parallel BP on K workers: the link bandwidths (Gb/s, "
        "swept from 0.8 to 8000) at which it does (`<X`: up to X; `>X`: from X up; `any`; "
        "`never`); `P`: it also beats pipelined BP at some bandwidth. The profile's own link "
        "in brackets."
    ]
    for model in dict.fromkeys(c["model"] for c in cross):
        lines += [
            "",
            f"**{model}**",
            "",
            "| profile (link) | rule | " + " | ".join(f"K={k}" for k in ks) + " |",
            "|---|---|" + "---|" * len(ks),
        ]
        part = [c for c in cross if c["model"] == model]
        for profile, rule in dict.fromkeys((c["profile"], c["rule"]) for c in part):
            own = next(
                r["bandwidth_gbps"] for r in rows if r["profile"] == profile and r["own_link"]
            )
            cells = {c["workers"]: c for c in part if (c["profile"], c["rule"]) == (profile, rule)}
            lines.append(
                f"| {profile} ({_gbps(own)}) | {map_name(rule)} | "
                + " | ".join(_cell(cells.get(k)) for k in ks)
                + " |"
            )
    return "\n".join(lines + ["", "Assumptions:", *(f"- {a}" for a in ASSUMPTIONS)])


def _cell(c) -> str:
    return "" if c is None else c["beats_ddp"] + (" P" if c["beats_pipe_bp_somewhere"] else "")


def time_to_accuracy(results, fractions: Sequence[float] = (0.95, 0.99)) -> dict:
    """From the runs under ``results`` (``lcbench table``'s cells): per (task, model, rule,
    K) the epochs its learning curve needs to reach each fraction of BP's final score, and
    its batches per epoch; a forecast epoch is that many of the forecast's batches."""
    from pathlib import Path

    from bench.report import table

    runs = table.load_runs(Path(results))
    cells = table.cells(table.run_summary(runs))
    first = runs[
        (runs["epoch"] == 1)
        & (runs["stage"] == "")
        & runs["metric"].isin(["samples_per_s", "epoch_time_s"])
    ]
    steps = {}
    for (task, model, method, executor, batch), part in first.groupby(
        ["task", "model", "method", "executor", "batch_size"]
    ):
        whole = part.set_index("metric")["value"]
        if len(whole) == 2:
            steps[task, model, "ddp" if executor == "ddp" else method] = (
                whole["samples_per_s"] * whole["epoch_time_s"] / batch
            )
    out = {}
    for _, cell in cells.iterrows():
        rule = "ddp" if cell["executor"] == "ddp" else cell["method"]
        key = (cell["task"], cell["model"], rule)
        if key not in steps or cell.get("variant"):  # the published rule's curve only
            continue
        out[(*key, int(cell["groups"]))] = {
            "steps_per_epoch": round(steps[key]),
            **{f: cell.get(f"{table.tta_name(f)}_epochs", math.nan) for f in fractions},
        }
    return out


def with_time_to_accuracy(rows: list[dict], tta: dict, fractions=(0.95, 0.99)) -> None:
    """Add to each row whose rule ran (at its K stages; DDP and BP at any) the forecast time to
    each fraction of BP's accuracy: the run's epochs to it x its batches per epoch x the
    forecast's seconds per batch (NaN where it never got there or did not run)."""
    from bench.report.table import tta_name

    for r in rows:
        found = next(
            (
                v
                for (task, model, rule, k), v in tta.items()
                if (task, model, rule) == (r["task"], r["model"], r["rule"])
                and (k == r["stages"] or predict.timing(rule) in ("data-parallel", "one"))
            ),
            None,
        )
        for f in fractions:
            epochs = found[f] if found else math.nan
            r[f"{tta_name(f)}_epochs"] = epochs
            r[f"{tta_name(f)}_s"] = (
                epochs * found["steps_per_epoch"] * r["step_s"] if found else math.nan
            )


def write(rows: Sequence[dict], out, *, maps: bool = True) -> list:
    """scale.csv, scale.md and (``maps``) the maps into ``out``; the paths written."""
    from pathlib import Path

    import pandas as pd

    from bench.records import write_atomic

    out = _folder(Path(out))
    write_atomic(out / "scale.csv", pd.DataFrame(list(rows)).to_csv(index=False))
    write_atomic(out / "scale.md", summary(rows) + "\n")
    write_atomic(out / "crossovers.csv", pd.DataFrame(crossovers(rows)).to_csv(index=False))
    return [
        out / "scale.csv",
        out / "crossovers.csv",
        out / "scale.md",
        *(draw_maps(rows, out) if maps else []),
    ]
