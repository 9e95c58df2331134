"""`lcbench report`: one self-contained HTML page per experiment, to read offline or send to a
colleague: the table (the published numbers beside ours where the experiment has references),
every figure (PNG, inlined), and each run with its status, its one-line error where it
failed, its restarts and its provenance."""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

import pandas as pd

from bench.records import read_json, write_atomic

from . import plots, table

REFERENCE_COLUMNS = ["task", "model", "method", "groups", "value", "std", "paper", "table", "row",
                     "column"]  # fmt: skip
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 1em 0; }
.failed { color: #a00; } .ok { color: #070; }
"""
#: marks every figure the browser decoded (``data-loaded``), for a reader's check
LOADED = (
    "window.addEventListener('load', () => document.querySelectorAll('img').forEach("
    "i => i.dataset.loaded = String(i.complete && i.naturalWidth > 0)));"
)


def experiments(results: Path) -> list[Path]:
    """The experiment folders under ``results`` (``results`` itself where its runs lie
    directly in it): each holds RUN_ID/run.json."""
    results = Path(results)
    if any(results.glob("*/run.json")):
        return [results]
    return sorted({p.parent.parent for p in results.glob("*/*/run.json")})


def runs(folder: Path) -> pd.DataFrame:
    """One row per run: id, rule, status, error, restarts, when, where."""
    rows = []
    for path in sorted(folder.glob("*/run.json")):
        info = read_json(path) or {}
        config, machine = info.get("config", {}), info.get("provenance", {})
        restarts = info.get("restarts", [])
        rows.append({
            "run": info.get("run_id", path.parent.name),
            "method": config.get("method", ""),
            "groups": config.get("groups", ""),
            "executor": config.get("executor", ""),
            "seed": config.get("seed", ""),
            "status": info.get("status", "unreadable"),
            "error": info.get("error") or "",
            "restarts": "; ".join(f"rank {r.get('rank')}: {r.get('reason')}" for r in restarts),
            "started": info.get("started", ""),
            "ended": info.get("ended", ""),
            "host": machine.get("hostname", ""),
            "device": machine.get("device", ""),
            "torch": machine.get("torch", ""),
            "lcbench": machine.get("lcbench_version", ""),
            "git": machine.get("git_sha", ""),
        })  # fmt: skip
    return pd.DataFrame(rows)


def numbers(folder: Path) -> pd.DataFrame:
    """The experiment's table as text: with the published numbers where
    bench/references/NAME.csv exists for it."""
    path = table.REFERENCES / f"{folder.name}.csv"
    references = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=REFERENCE_COLUMNS)
    cells = table.cells(table.run_summary(table.load_runs(folder)))
    if cells.empty:
        return cells
    return table.formatted(table.with_references(cells, references))


def figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def page(folder: Path) -> str:
    """The HTML of one experiment."""
    name = html.escape(folder.name)
    listed = runs(folder)
    text = numbers(folder)
    parts = [f"<h1>{name}</h1>"]
    if not listed.empty:
        tally = listed["status"].value_counts()
        parts.append("<p>" + ", ".join(f"{n} {html.escape(s)}" for s, n in tally.items()) + "</p>")
    parts.append("<h2>Table</h2>")
    parts.append(
        text.to_html(index=False, na_rep="", border=0)
        if not text.empty
        else "<p>No finished run yet.</p>"
    )
    with tempfile.TemporaryDirectory(prefix="lcbench-report-") as tmp:
        try:
            drawn = plots.plot_all(folder, Path(tmp))
        except ValueError:  # no finished run
            drawn = []
        pngs = [p for p in drawn if p.suffix == ".png"]
        if pngs:
            parts.append("<h2>Figures</h2>")
            parts += [figure(p) for p in pngs]
    failed = listed[listed["status"] != "ok"] if not listed.empty else listed
    if not failed.empty:
        parts.append("<h2>Runs that did not end ok</h2>")
        parts.append(failed[["run", "status", "error"]].to_html(index=False, border=0))
    if not listed.empty:
        parts.append("<h2>Runs and their provenance</h2>")
        parts.append(listed.to_html(index=False, border=0, classes="runs"))
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>lcbench: {name}</title><style>{STYLE}</style>"
        f"<script>{LOADED}</script></head>\n<body>\n{body}\n</body></html>\n"
    )


def write(results: Path, out: Path | None = None) -> list[Path]:
    """``report-EXPERIMENT.html`` for every experiment under ``results`` (into ``out``,
    default ``results``)."""
    found = experiments(results)
    if not found:
        raise ValueError(f"no run under {results}")
    out = Path(out or results)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for folder in found:
        path = out / f"report-{folder.name}.html"
        write_atomic(path, page(folder))
        paths.append(path)
    return paths
