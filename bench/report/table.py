"""`lcbench table NAME RESULTS_DIR`: our runs beside the published numbers, as Markdown,
LaTeX and CSV.

Per cell (task, model, method and its variant, K, executor, workers, threads per process,
precision and compilation; one row per cell, seeds aggregated):
- the final test accuracy in % (a language model: test perplexity) as mean ± std over the
  seeds, and the number of seeds;
- for a decoupled rule, its score above the no-signal floor (``frozen``: groups 1..K-1 held
  at their initial weights, the last trained; same task, model and K): what its local
  signals add (perplexity: the floor's minus the cell's);
- the published number of the same cell (``bench/references/NAME.csv``: paper, table, row,
  column) and the difference; a cell without one says so, and published cells that lcbench
  did not run are listed too;
- workers: the K devices the cell stands for: modelled (the sequential executor: its K layer
  groups) or real ranks (distributed: one per stage; ddp: ``--workers``) of so many threads;
- time per epoch (training only), in the steady state (the median of the epochs after the
  first, which warms up), marked as what it is: the modelled K-worker time for the sequential
  executor, the measured wall-clock (slowest rank) for the distributed and ddp ones;
- time to accuracy (MLPerf Training, DAWNBench): for each fraction in ``TTA_FRACTIONS``, the
  epochs the cell's seed-averaged learning curve needs to reach that fraction of BP's final
  score on one worker (perplexity: BP's over the fraction, lower is better), times its time
  per epoch, marked as that is; "never" with the best fraction of BP's score it reached;
- speedup against BP on one worker: the time of BP in one process (the sequential executor,
  same task and model, K where there is one) over the cell's; modelled against modelled,
  measured (BP's wall-clock) against measured;
- for the rules that run their K workers side by side (decoupled, pipelined BP): the
  modelled speedup (BP's one-worker time over the cell's modelled time), the rule's own bound
  (K T_BP / sum_k t_k from the stages' busy times: BP's time over the slowest stage's at
  perfect balance, the rule's extra work included; times M / (M + K - 1), the bubble, for
  pipelined BP), the efficiency (the speedup over that bound) and the split's balance (the
  ``split_balance`` row: the mean stage's training FLOPs over the largest stage's; 1 is
  even: where it is low, the blocks allow no even cut and the speedup stays below the bound);
- speedup against DDP: the time of data-parallel BP on the same number of ranks with the
  same threads per rank over the cell's, for cells measured on ranks (a modelled time is
  not set against a measured one);
- peak memory per device (per rank): the largest stage's bytes (parameters, gradients,
  optimizer state, saved activations; device-independent, as every executor measures them),
  beside BP's on one worker (its stages summed: the whole net) and DDP's per rank (same K);
- a note where BP's whole net needs more than one device's memory (the run's GPU, or the
  machine's RAM): BP on one worker and DDP are then impossible, model parallelism is not.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

import methods
from bench.config import RunConfig, ranks
from bench.records import read_json

REFERENCES = Path(__file__).parents[1] / "references"
CELL = [
    "task",
    "model",
    "method",
    "variant",
    "groups",
    "executor",
    "workers",
    "threads",
    "precision",
]
#: executors whose time is measured on real ranks (the sequential executor's is modelled)
MEASURED = ("distributed", "ddp")
#: time to accuracy: the fractions of BP's final score (one worker) a cell is timed to reach
TTA_FRACTIONS = (0.95, 0.99)


def tta_name(fraction: float) -> str:
    """``tta95`` for 0.95: the stem of the columns ``tta95_epochs`` and ``tta95_s``."""
    return f"tta{100 * fraction:g}"


def load_runs(folder: Path) -> pd.DataFrame:
    """Every metrics row of the runs under ``folder`` whose run.json says ``ok``, or
    ``diverged`` (their cells say so, with the epoch)."""
    frames = []
    for path in sorted(Path(folder).rglob("run.json")):
        info = read_json(path)
        if (
            not info
            or info.get("status") not in ("ok", "diverged")
            or not (path.parent / "metrics.csv").is_file()
        ):
            continue
        frame = pd.read_csv(path.parent / "metrics.csv", dtype={"stage": str, "run_id": str})
        frame["stage"] = frame["stage"].fillna("")
        config = info.get("config", {})
        provenance = info.get("provenance", {})
        frame["microbatches"] = config.get("options", {}).get("microbatches")
        frame["neuron_groups"] = config.get("options", {}).get("neuron_groups")
        frame["variant"] = methods.variant(config["method"], config.get("options", {}))
        frame["workers"] = workers(config)
        frame["batch_size"] = config.get("batch_size")
        measured = config.get("executor") in MEASURED  # threads per rank matter to its time
        frame["threads"] = (
            (config.get("threads") or provenance.get("cpu_threads")) if measured else None
        )
        frame["device_mem_mib"] = (provenance.get("device_memory_bytes") or math.nan) / 2**20
        frame["precision"] = precision(config)
        frame["diverged"] = info["status"] == "diverged"
        frames.append(frame)
    if not frames:
        return pd.DataFrame(
            columns=["run_id", *CELL, "seed", "batch_size", "epoch", "stage", "metric", "value"]
        )
    return pd.concat(frames, ignore_index=True)


def precision(config: dict) -> str:
    """How a run computed: ``fp32`` (the default), ``tf32`` or ``bf16``, and ``compiled``."""
    return config.get("precision", "fp32") + (" compiled" if config.get("compile") else "")


def workers(config: dict) -> int:
    """The K devices a run stands for: its ranks, or (sequential) its K layer groups."""
    fields = {k: v for k, v in config.items() if k in RunConfig.field_names()}
    cfg = RunConfig(**fields)
    return cfg.groups if cfg.executor == "sequential" else ranks(cfg)


def run_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per run: its final score, time per epoch and peak memory per device."""
    out = []
    for run_id, run in rows.groupby("run_id"):
        whole = run[run["stage"] == ""]
        last = whole[whole["epoch"] == whole["epoch"].max()].set_index("metric")["value"]
        perplexity = "test_ppl" in last
        score = last["test_ppl"] if perplexity else 100 * last.get("test_acc", math.nan)
        diverged = bool(run["diverged"].iloc[0]) if "diverged" in run else False
        score = math.nan if diverged else score
        per_epoch = whole.pivot_table(index="epoch", columns="metric", values="value")
        scores = per_epoch.get("test_ppl" if perplexity else "test_acc", pd.Series(dtype=float))
        curve = scores.reindex(range(1, int(whole["epoch"].max()) + 1)) * (1 if perplexity else 100)
        busy = run[run["metric"] == "busy_time_s"].assign(
            layer=lambda f: f["stage"].str.split(".").str[0]
        )
        per_epoch["busy_s"] = busy.groupby(["epoch", "layer"])["value"].max().groupby("epoch").sum()
        executor = run["executor"].iloc[0]
        time_metric = "epoch_time_s" if executor in MEASURED else "modelled_time_s"
        peaks = run[(run["metric"] == "peak_mem_bytes") & (run["epoch"] == 1)]["value"]
        balance = whole[whole["metric"] == "split_balance"]["value"]
        # the whole net on one device: a ddp rank holds it all, the stages of a split hold parts
        whole_net = peaks.max() if executor == "ddp" else peaks.sum()
        first = run.iloc[0]
        out.append(
            {
                **first[CELL + ["seed"]].to_dict(),
                "run_id": run_id,
                **first[["microbatches", "neuron_groups", "threads", "device_mem_mib"]].to_dict(),
                "metric": "test perplexity" if perplexity else "test accuracy (%)",
                "score": score,
                "curve": tuple(curve),
                "epochs": int(whole["epoch"].max()),
                "diverged_at": int(whole["epoch"].max()) if diverged else math.nan,
                "time_s": steady(per_epoch, time_metric),
                "wall_s": steady(per_epoch, "epoch_time_s"),
                "modelled_s": steady(per_epoch, "modelled_time_s"),
                "busy_s": steady(per_epoch, "busy_s"),
                "balance": balance.iloc[0] if len(balance) else math.nan,
                "peak_mem_mib": peaks.max() / 2**20 if len(peaks) else math.nan,
                "whole_net_mib": whole_net / 2**20 if len(peaks) else math.nan,
            }
        )
    return pd.DataFrame(out)


def steady(per_epoch: pd.DataFrame, metric: str) -> float:
    """A time per epoch in the steady state: the median over the epochs after the first
    (which warms up: allocator, caches, lazy initialisation), the first alone if it is all."""
    if metric not in per_epoch:
        return math.nan
    values = per_epoch[metric].dropna()
    return float(values.iloc[1:].median() if len(values) > 1 else values.median())


def mean_curve(curves) -> tuple:
    """The seeds' learning curves (score per epoch, epoch 1 first) averaged epoch by epoch;
    NaN at an epoch that not every seed scored."""
    return tuple(pd.DataFrame(list(curves)).mean(skipna=False))


def epochs_to(curve, target: float, lower_better: bool = False) -> int | None:
    """Time to accuracy, the measure of MLPerf Training (Mattson et al., MLSys 2020) and
    DAWNBench (Coleman et al., 2017), in epochs: the first epoch (1-based) at which ``curve``
    (the seed-averaged score per epoch) reaches ``target`` (a perplexity: falls to it);
    None if it never does."""
    for epoch, score in enumerate(curve, 1):
        if score <= target if lower_better else score >= target:
            return epoch
    return None


def facts(name: str) -> methods.Method | None:
    """What the rule (or ``ddp``) declares; None for a name no rule has (an old results
    folder's)."""
    try:
        return methods.contender(name)
    except ValueError:
        return None


def parallel(name: str) -> bool:
    """Whether the rule's K workers run side by side (decoupled, or pipelined)."""
    return bool(facts(name) and facts(name).parallel)


def local(name: str) -> bool:
    """Whether the rule's groups learn from a local signal (set against the floor)."""
    return bool(facts(name) and facts(name).local)


def _rank(name: str) -> int:
    order = [m.name for m in methods.contenders()]
    return order.index(name) if name in order else len(order)


def rule(method: str, executor: str) -> str:
    """The contender: the method, or ``ddp`` for data-parallel BP."""
    return "ddp" if executor == "ddp" else method


def method_label(
    method: str,
    groups: int,
    microbatches=None,
    neuron_groups=None,
    executor: str | None = None,
    precision: str | None = None,
    variant: str | None = None,
) -> str:
    """The papers' names: LC(n) and DNI(n) with n = K-1 local modules; BP (DDP); the floor;
    a variant (not published), a precision other than the default fp32, or compilation, in
    brackets."""
    microbatches = int(microbatches) if pd.notna(microbatches) else None
    neuron_groups = int(neuron_groups) if pd.notna(neuron_groups) else None
    how = f" [{variant}]" if isinstance(variant, str) and variant else ""
    how += f" [{precision}]" if isinstance(precision, str) and precision != "fp32" else ""
    known = facts("ddp" if executor == "ddp" else method)
    if known is None:
        return method + how
    shown = dict(microbatches=microbatches, neuron_groups=neuron_groups)
    return known.table_label(groups, **shown) + how


def cells(runs: pd.DataFrame) -> pd.DataFrame:
    """Seeds aggregated per cell, with the speedups against BP on one worker and against DDP,
    their memory beside the cell's, and a note where BP's whole net exceeds one device."""
    if runs.empty:
        return pd.DataFrame()
    grouped = runs.groupby(CELL, dropna=False, sort=False)
    table = grouped.agg(
        mean=("score", "mean"),
        std=("score", "std"),
        seeds=("seed", "nunique"),
        time_s=("time_s", "mean"),
        wall_s=("wall_s", "mean"),
        modelled_s=("modelled_s", "mean"),
        busy_s=("busy_s", "mean"),
        balance=("balance", "mean"),
        peak_mem_mib=("peak_mem_mib", "max"),
        whole_net_mib=("whole_net_mib", "max"),
        device_mem_mib=("device_mem_mib", "min"),
        curve=("curve", mean_curve),
        diverged_at=("diverged_at", "min"),
        metric=("metric", "first"),
        microbatches=("microbatches", "first"),
        neuron_groups=("neuron_groups", "first"),
    ).reset_index()
    bp = table[(table["method"] == methods.reference()) & (table["executor"] != "ddp")]
    ddp = table[table["executor"] == "ddp"]
    floors = table[table["method"].isin(methods.of_family("control"))]

    def above_floor(row) -> float:
        """The cell's score above the floor's (same task, model, K and precision; the same
        executor first): accuracy points, or perplexity the floor's minus the cell's."""
        if not local(row["method"]):
            return math.nan
        same = floors[
            (floors["task"] == row["task"])
            & (floors["model"] == row["model"])
            & (floors["groups"] == row["groups"])
            & (floors["precision"] == row["precision"])
        ]
        if not len(same):
            return math.nan
        exact = same[same["executor"] == row["executor"]]
        floor = (exact if len(exact) else same).iloc[0]["mean"]
        return floor - row["mean"] if row["metric"] == "test perplexity" else row["mean"] - floor

    def one_worker_bp(row) -> pd.Series | None:
        """BP in one process (the sequential executor), K where there is one."""
        same = bp[
            (bp["task"] == row["task"])
            & (bp["model"] == row["model"])
            & (bp["executor"] == "sequential")
            & (bp["precision"] == row["precision"])
        ]
        exact = same[same["groups"] == row["groups"]]
        base = exact if len(exact) else same
        return base.iloc[0] if len(base) else None

    def same_k_ddp(row, threads: bool) -> pd.Series | None:
        """DDP on the cell's K workers (with the same threads per rank where asked)."""
        same = ddp[
            (ddp["task"] == row["task"])
            & (ddp["model"] == row["model"])
            & (ddp["workers"] == row["workers"])
            & (ddp["precision"] == row["precision"])
        ]
        if threads:
            same = same[
                (same["threads"] == row["threads"])
                | (same["threads"].isna() & pd.isna(row["threads"]))
            ]
        return same.iloc[0] if len(same) else None

    def baselines(row) -> pd.Series:
        measured = row["executor"] in MEASURED
        base, data_parallel = one_worker_bp(row), same_k_ddp(row, threads=True)
        sized = same_k_ddp(row, threads=False)
        whole = bp[(bp["task"] == row["task"]) & (bp["model"] == row["model"])][
            "whole_net_mib"
        ].max()
        return pd.Series(
            {
                "speedup": (
                    base["wall_s" if measured else "time_s"] / row["time_s"]
                    if base is not None
                    else math.nan
                ),
                "speedup_modelled": (
                    base["time_s"] / row["modelled_s"]
                    if base is not None and parallel(row["method"])
                    else math.nan
                ),
                "bound": bound(row, base),
                "speedup_ddp": (
                    data_parallel["time_s"] / row["time_s"]
                    if measured and data_parallel is not None
                    else math.nan
                ),
                "above_floor": above_floor(row),
                "bp_mem_mib": base["whole_net_mib"] if base is not None else math.nan,
                "ddp_mem_mib": sized["peak_mem_mib"] if sized is not None else math.nan,
                "note": (
                    f"the whole net needs {whole:.0f} MiB (BP's stages), one device has "
                    f"{row['device_mem_mib']:.0f}: no BP on one worker, no DDP"
                    if whole > row["device_mem_mib"]
                    else ""
                ),
                **time_to_accuracy(row, base),
            }
        )

    table = table.join(table.apply(baselines, axis=1))
    table["efficiency"] = table["speedup"] / table["bound"]
    order = [rule(m, e) for m, e in zip(table["method"], table["executor"])]
    rank = [_rank(r) for r in order]
    return (
        table.assign(_rank=rank, _other=table["precision"] != "fp32")
        .sort_values(
            ["task", "model", "_rank", "groups", "workers", "executor", "_other", "precision"]
        )
        .drop(columns=["_rank", "_other", "curve"])
        .reset_index(drop=True)
    )


def bound(row, base) -> float:
    """The rule's own speedup bound on its K workers: BP's time over the slowest stage's at
    perfect balance, K T_BP / sum_k t_k from the stages' busy times (the rule's extra work, a
    critic, synthesizer or auxiliary net, included), times M / (M + K - 1) for the bubble of
    pipelined BP over M micro-batches."""
    if base is None or not parallel(row["method"]) or not row["busy_s"] > 0:
        return math.nan
    k = row["workers"]
    bubble = 1.0
    pipelined = facts(row["method"]).timing == "pipeline"
    if pipelined and pd.notna(row["microbatches"]):
        bubble = row["microbatches"] / (row["microbatches"] + row["groups"] - 1)
    return k * base["busy_s"] / row["busy_s"] * bubble


def time_to_accuracy(row, base) -> dict:
    """Per fraction f of ``TTA_FRACTIONS``: the epochs the cell's mean curve needs to reach f
    times BP's final score (``base``: BP on one worker; a perplexity: BP's over f) and those
    epochs times the cell's steady time per epoch (NaN both where it never does); and
    ``best_of_bp``, the best fraction of BP's score the curve reached."""
    lower = row["metric"] == "test perplexity"
    bp = base["mean"] if base is not None else math.nan
    curve = pd.Series(row["curve"], dtype=float)
    out = {"best_of_bp": (bp / curve.min() if lower else curve.max() / bp) if bp > 0 else math.nan}
    for fraction in TTA_FRACTIONS:
        target = bp / fraction if lower else bp * fraction
        epochs = epochs_to(row["curve"], target, lower) if bp > 0 else None
        out[f"{tta_name(fraction)}_epochs"] = epochs if epochs else math.nan
        out[f"{tta_name(fraction)}_s"] = epochs * row["time_s"] if epochs else math.nan
    return out


def with_references(table: pd.DataFrame, references: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the published number of each cell, and the published cells lcbench did
    not run appended (their own columns empty)."""
    rows, used = [], set()
    for _, cell in table.iterrows():
        match = references[
            (references["task"] == cell["task"])
            & (references["model"] == cell["model"])
            & (references["method"] == cell["method"])
            & (references["groups"].isna() | (references["groups"] == cell["groups"]))
        ]
        ref = match.iloc[0] if len(match) else None
        if ref is not None:
            used.add(ref.name)
        rows.append({**cell.to_dict(), **reference_columns(ref)})
    for index, ref in references.iterrows():
        if index not in used:
            rows.append(
                {
                    "task": ref["task"],
                    "model": ref["model"],
                    "method": ref["method"],
                    "groups": ref["groups"],
                    "executor": "",
                    "metric": "test accuracy (%)",
                    **reference_columns(ref),
                }
            )
    out = pd.DataFrame(rows)
    out["delta"] = out.get("mean", math.nan) - out["published"]
    return out


def reference_columns(ref) -> dict:
    if ref is None:
        return {"published": math.nan, "published_std": math.nan, "source": ""}
    source = f"{ref['paper']}, {ref['table']}, row {ref['row']}, column {ref['column']}"
    return {
        "published": ref["value"],
        "published_std": ref["std"],
        "source": source,
        "published_row": ref["row"],
    }


def _pm(mean, std, digits=2) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if pd.notna(std) else "")


def _times(value) -> str:
    return f"{value:.2f}x" if pd.notna(value) else ""


def _mib(value) -> str:
    return f"{value:.1f}" if pd.notna(value) else ""


def _tta(r, fraction: float) -> str:
    """ "412.3 modelled (7 ep)", "never (best 91% of BP)", or empty without a BP baseline."""
    stem = tta_name(fraction)
    epochs, best = r.get(f"{stem}_epochs"), r.get("best_of_bp")
    if pd.notna(epochs):
        how = "measured" if r.get("executor") in MEASURED else "modelled"
        seconds = f"{r[f'{stem}_s']:.1f} {how} " if pd.notna(r.get(f"{stem}_s")) else ""
        return f"{seconds}({int(epochs)} ep)"
    # the best rounded down: a cell that never reached 99% is never shown at 99%
    return f"never (best {math.floor(100 * best + 1e-9)}% of BP)" if pd.notna(best) else ""


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """The table as text, one row per cell, in the papers' vocabulary."""
    out = []
    for _, r in table.iterrows():
        ran = pd.notna(r.get("mean"))
        groups = int(r["groups"]) if pd.notna(r["groups"]) else None
        label = (
            method_label(
                r["method"],
                groups,
                r.get("microbatches"),
                r.get("neuron_groups"),
                r.get("executor"),
                r.get("precision"),
                r.get("variant"),
            )
            if groups
            else r.get("published_row", r["method"])
        )
        workers = r.get("workers")
        if pd.isna(workers) or not ran:
            workers = ""
        elif r.get("executor") == "sequential":
            workers = f"{int(workers)} (modelled)"
        else:
            threads = r.get("threads")
            workers = f"{int(workers)}" + (
                f" × {int(threads)} thread{'s' * (threads > 1)}" if pd.notna(threads) else ""
            )
        if ran:
            ours = _pm(r["mean"], r["std"]) + f" ({int(r['seeds'])})"
        elif pd.notna(r.get("diverged_at")):
            ours = f"diverged (epoch {int(r['diverged_at'])})"
        else:
            ours = "not run"
        out.append(
            {
                "task": r["task"],
                "model": r["model"],
                "method": label,
                "K": str(groups) if groups else "",
                "executor": r.get("executor") or "",
                "workers": workers,
                "metric": r["metric"],
                "ours (seeds)": ours,
                "above floor": f"{r['above_floor']:+.2f}" if pd.notna(r.get("above_floor")) else "",
                "published": _pm(r["published"], r["published_std"]) or "no published number",
                "Δ": f"{r['delta']:+.2f}" if pd.notna(r.get("delta")) else "",
                "time/epoch (s)": (
                    f"{r['time_s']:.2f} "
                    f"{'measured' if r.get('executor') in MEASURED else 'modelled'}"
                    if pd.notna(r.get("time_s"))
                    else ""
                ),
                **{f"time to {100 * f:g}% of BP (s)": _tta(r, f) for f in TTA_FRACTIONS},
                "speedup vs BP (1 worker)": _times(r.get("speedup")),
                "modelled speedup": _times(r.get("speedup_modelled")),
                "bound": _times(r.get("bound")),
                "split balance (FLOPs)": (
                    f"{r['balance']:.2f}"
                    if pd.notna(r.get("balance")) and parallel(r.get("method"))
                    else ""
                ),
                "efficiency": f"{r['efficiency']:.2f}" if pd.notna(r.get("efficiency")) else "",
                "speedup vs DDP (same ranks)": _times(r.get("speedup_ddp")),
                "peak mem/device (MiB)": _mib(r.get("peak_mem_mib")),
                "BP mem, 1 worker (MiB)": _mib(r.get("bp_mem_mib")),
                "DDP mem/rank (MiB)": _mib(r.get("ddp_mem_mib")),
                "note": r.get("note") if isinstance(r.get("note"), str) else "",
                "source": r.get("source") or "",
            }
        )
    return pd.DataFrame(out)


def orderings(numbers: pd.DataFrame) -> list[str]:
    """Per task and model: the cells ranked by our score and by the published one, best
    first, and how many pairs of the cells that have both are ranked alike."""
    lines = []
    both = numbers[
        numbers.get("mean", pd.Series(dtype=float)).notna() & numbers["published"].notna()
    ]
    for (task, model), part in both.groupby(["task", "model"], sort=False):
        lower_better = part["metric"].iloc[0] == "test perplexity"
        labels = [
            method_label(m, int(k), mb, ng, precision=p, variant=v)
            for m, k, mb, ng, p, v in zip(
                part["method"],
                part["groups"],
                part["microbatches"],
                part["neuron_groups"],
                part.get("precision", [None] * len(part)),
                part.get("variant", [None] * len(part)),
            )
        ]
        ours = dict(zip(labels, part["mean"]))
        published = dict(zip(labels, part["published"]))

        def ranked(scores):
            return sorted(scores, key=scores.get, reverse=not lower_better)

        pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1 :]]
        alike = sum((ours[a] - ours[b]) * (published[a] - published[b]) > 0 for a, b in pairs)
        lines.append(
            f"{task}, {model}: ours {' > '.join(ranked(ours))}; published "
            f"{' > '.join(ranked(published))}; {alike} of {len(pairs)} pairs ranked alike"
        )
    return lines


def markdown(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = [
        "| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([head, rule, *body])


def build(name: str, results: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(numbers, text) of table ``name`` from the runs under ``results`` (its ``name``
    experiment folder where there is one)."""
    folder = results / name if (results / name).is_dir() else results
    references = pd.read_csv(REFERENCES / f"{name}.csv")
    numbers = with_references(cells(run_summary(load_runs(folder))), references)
    return numbers, formatted(numbers)


def write(name: str, results: Path, out: Path | None = None) -> tuple[str, list[Path]]:
    """Write NAME.md, NAME.tex and NAME.csv (into ``out``, default ``results``); return the
    Markdown and the paths."""
    from bench.records import write_atomic

    numbers, text = build(name, results)
    out = Path(out or results)
    out.mkdir(parents=True, exist_ok=True)
    ranks = orderings(numbers)
    md = markdown(text) + (
        "\n\nOrdering (best first):\n\n" + "\n".join(f"- {line}" for line in ranks) if ranks else ""
    )
    paths = [out / f"{name}.md", out / f"{name}.tex", out / f"{name}.csv"]
    write_atomic(paths[0], md + "\n")
    write_atomic(paths[1], text.to_latex(index=False, escape=True))
    write_atomic(paths[2], numbers.to_csv(index=False))
    return md, paths
