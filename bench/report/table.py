"""`lcbench table NAME RESULTS_DIR`: our runs beside the published numbers, as Markdown,
LaTeX and CSV.

Per cell (task, model, method, K, executor; one row per cell, seeds aggregated):
- the final test accuracy in % (a language model: test perplexity) as mean ± std over the
  seeds, and the number of seeds;
- the published number of the same cell (``bench/references/NAME.csv``: paper, table, row,
  column) and the difference; a cell without one says so, and published cells that lcbench
  did not run are listed too;
- time per epoch (training only): the modelled K-worker time for the sequential executor,
  the measured wall-clock for the distributed one; the speedup against BP is the ratio of
  BP's time to the method's, same task, model, executor (and K where there is one);
- peak memory per device: the largest stage's bytes (parameters, gradients, optimizer state,
  saved activations; device-independent, as every executor measures them).
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.records import read_json

REFERENCES = Path(__file__).parents[1] / "references"
CELL = ["task", "model", "method", "groups", "executor"]


def load_runs(folder: Path) -> pd.DataFrame:
    """Every metrics row of the runs under ``folder`` whose run.json says ``ok``."""
    frames = []
    for path in sorted(Path(folder).rglob("run.json")):
        info = read_json(path)
        if not info or info.get("status") != "ok" or not (path.parent / "metrics.csv").is_file():
            continue
        frame = pd.read_csv(path.parent / "metrics.csv", dtype={"stage": str, "run_id": str})
        frame["stage"] = frame["stage"].fillna("")
        config = info.get("config", {})
        frame["microbatches"] = config.get("options", {}).get("microbatches")
        frame["neuron_groups"] = config.get("options", {}).get("neuron_groups")
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["run_id", *CELL, "seed", "epoch", "stage", "metric", "value"])
    return pd.concat(frames, ignore_index=True)


def run_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per run: its final score, time per epoch and peak memory per device."""
    out = []
    for run_id, run in rows.groupby("run_id"):
        whole = run[run["stage"] == ""]
        last = whole[whole["epoch"] == whole["epoch"].max()].set_index("metric")["value"]
        perplexity = "test_ppl" in last
        score = last["test_ppl"] if perplexity else 100 * last.get("test_acc", math.nan)
        per_epoch = whole.pivot_table(index="epoch", columns="metric", values="value")
        distributed = run["executor"].iloc[0] == "distributed"
        time_metric = "epoch_time_s" if distributed else "modelled_time_s"
        peaks = run[(run["metric"] == "peak_mem_bytes") & (run["epoch"] == 1)]["value"]
        out.append({**run.iloc[0][CELL + ["seed"]].to_dict(), "run_id": run_id,
                    "microbatches": run["microbatches"].iloc[0],
                    "neuron_groups": run["neuron_groups"].iloc[0],
                    "metric": "test perplexity" if perplexity else "test accuracy (%)",
                    "score": score, "epochs": int(whole["epoch"].max()),
                    "time_s": per_epoch[time_metric].mean() if time_metric in per_epoch else math.nan,
                    "peak_mem_mib": peaks.max() / 2**20 if len(peaks) else math.nan})
    return pd.DataFrame(out)


ORDER = ["bp", "pipe-bp", "dni", "cdni", "dgl", "adgl", "lc", "gn"]


def method_label(method: str, groups: int, microbatches=None, neuron_groups=None) -> str:
    """The papers' names: LC(n) and DNI(n) with n = K-1 local modules."""
    n = groups - 1
    microbatches = int(microbatches) if pd.notna(microbatches) else None
    neuron_groups = int(neuron_groups) if pd.notna(neuron_groups) else None
    return {"bp": "BP", "lc": f"LC({n})", "dni": f"DNI({n})", "cdni": f"cDNI({n})",
            "dgl": "DGL", "adgl": "async DGL",
            "pipe-bp": "pipelined BP" + (f" (M={microbatches})" if microbatches else ""),
            "gn": "GN-DGL" + (f" (G={neuron_groups})" if neuron_groups else ""),
            }.get(method, method)


def cells(runs: pd.DataFrame) -> pd.DataFrame:
    """Seeds aggregated per cell, with the speedup against BP."""
    if runs.empty:
        return pd.DataFrame()
    grouped = runs.groupby(CELL, dropna=False, sort=False)
    table = grouped.agg(mean=("score", "mean"), std=("score", "std"), seeds=("seed", "nunique"),
                        time_s=("time_s", "mean"), peak_mem_mib=("peak_mem_mib", "max"),
                        metric=("metric", "first"), microbatches=("microbatches", "first"),
                        neuron_groups=("neuron_groups", "first")).reset_index()
    bp = table[table["method"] == "bp"]

    def speedup(row) -> float:
        same = bp[(bp["task"] == row["task"]) & (bp["model"] == row["model"])
                  & (bp["executor"] == row["executor"])]
        exact = same[same["groups"] == row["groups"]]
        base = (exact if len(exact) else same)["time_s"]
        return base.iloc[0] / row["time_s"] if len(base) else math.nan

    table["speedup"] = table.apply(speedup, axis=1)
    rank = table["method"].map(lambda m: ORDER.index(m) if m in ORDER else len(ORDER))
    return (table.assign(_rank=rank).sort_values(["task", "model", "_rank", "groups", "executor"])
            .drop(columns="_rank").reset_index(drop=True))


def with_references(table: pd.DataFrame, references: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the published number of each cell, and the published cells lcbench did
    not run appended (their own columns empty)."""
    rows, used = [], set()
    for _, cell in table.iterrows():
        match = references[(references["task"] == cell["task"]) & (references["model"] == cell["model"])
                           & (references["method"] == cell["method"])
                           & (references["groups"].isna() | (references["groups"] == cell["groups"]))]
        ref = match.iloc[0] if len(match) else None
        if ref is not None:
            used.add(ref.name)
        rows.append({**cell.to_dict(), **reference_columns(ref)})
    for index, ref in references.iterrows():
        if index not in used:
            rows.append({"task": ref["task"], "model": ref["model"], "method": ref["method"],
                         "groups": ref["groups"], "executor": "", "metric": "test accuracy (%)",
                         **reference_columns(ref)})
    out = pd.DataFrame(rows)
    out["delta"] = out.get("mean", math.nan) - out["published"]
    return out


def reference_columns(ref) -> dict:
    if ref is None:
        return {"published": math.nan, "published_std": math.nan, "source": ""}
    source = f"{ref['paper']}, {ref['table']}, row {ref['row']}, column {ref['column']}"
    return {"published": ref["value"], "published_std": ref["std"], "source": source,
            "published_row": ref["row"]}


def _pm(mean, std, digits=2) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if pd.notna(std) else "")


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """The table as text, one row per cell, in the papers' vocabulary."""
    out = []
    for _, r in table.iterrows():
        ran = pd.notna(r.get("mean"))
        groups = int(r["groups"]) if pd.notna(r["groups"]) else None
        label = (method_label(r["method"], groups, r.get("microbatches"), r.get("neuron_groups"))
                 if groups else r.get("published_row", r["method"]))
        if ran:
            ours = _pm(r["mean"], r["std"]) + f" ({int(r['seeds'])})"
        elif r["model"] == "dgl-3layer-cnn":
            ours = "not in lcbench (network not reproduced)"
        else:
            ours = "not run"
        out.append({
            "task": r["task"], "model": r["model"], "method": label,
            "K": str(groups) if groups else "", "executor": r.get("executor") or "",
            "metric": r["metric"], "ours (seeds)": ours,
            "published": _pm(r["published"], r["published_std"]) or "no published number",
            "Δ": f"{r['delta']:+.2f}" if pd.notna(r.get("delta")) else "",
            "time/epoch (s)": f"{r['time_s']:.2f}" if pd.notna(r.get("time_s")) else "",
            "speedup vs BP": f"{r['speedup']:.2f}x" if pd.notna(r.get("speedup")) else "",
            "peak mem/device (MiB)": f"{r['peak_mem_mib']:.1f}" if pd.notna(r.get("peak_mem_mib")) else "",
            "source": r.get("source") or "",
        })
    return pd.DataFrame(out)


def orderings(numbers: pd.DataFrame) -> list[str]:
    """Per task and model: the cells ranked by our score and by the published one, best
    first, and how many pairs of the cells that have both are ranked alike."""
    lines = []
    both = numbers[numbers.get("mean", pd.Series(dtype=float)).notna() & numbers["published"].notna()]
    for (task, model), part in both.groupby(["task", "model"], sort=False):
        lower_better = part["metric"].iloc[0] == "test perplexity"
        labels = [method_label(m, int(k), mb, ng) for m, k, mb, ng in zip(
            part["method"], part["groups"], part["microbatches"], part["neuron_groups"])]
        ours = dict(zip(labels, part["mean"]))
        published = dict(zip(labels, part["published"]))

        def ranked(scores):
            return sorted(scores, key=scores.get, reverse=not lower_better)

        pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
        alike = sum((ours[a] - ours[b]) * (published[a] - published[b]) > 0 for a, b in pairs)
        lines.append(f"{task}, {model}: ours {' > '.join(ranked(ours))}; published "
                     f"{' > '.join(ranked(published))}; {alike} of {len(pairs)} pairs ranked alike")
    return lines


def markdown(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |"
            for row in frame.itertuples(index=False)]
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
    md = markdown(text) + ("\n\nOrdering (best first):\n\n" + "\n".join(f"- {line}" for line in ranks)
                           if ranks else "")
    paths = [out / f"{name}.md", out / f"{name}.tex", out / f"{name}.csv"]
    write_atomic(paths[0], md + "\n")
    write_atomic(paths[1], text.to_latex(index=False, escape=True))
    write_atomic(paths[2], numbers.to_csv(index=False))
    return md, paths
