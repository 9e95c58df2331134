"""Run records: ``metrics.csv`` (tidy rows) and ``run.json`` (config, status, provenance).

Every write goes to a temporary name in the same folder and is renamed over the target,
so a reader (or a run killed at any instant) never sees a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from bench.config import UsageError
from bench.measure.provenance import now

UMASK = os.umask(0)
os.umask(UMASK)

COLUMNS = [
    "run_id",
    "method",
    "task",
    "model",
    "groups",
    "executor",
    "seed",
    "epoch",
    "stage",
    "metric",
    "value",
]


class RunFailed(RuntimeError):
    """A run raised, diverged or lost a rank; its run.json says so. One-line message."""


def check_writable(path: Path) -> None:
    """UsageError unless a file can be written at ``path`` (checked before minutes of work;
    nothing is left behind)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (fsynced first)."""
    replace_atomic(path, lambda f: f.write(text.encode()))


def replace_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` with what ``write(file)`` writes, in one rename (fsynced first)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes files private; results are shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class RunRecord:
    """The folder of one run: appends metric rows and keeps run.json current."""

    def __init__(self, folder: Path, identity: dict, info: dict):
        self.folder = Path(folder)
        self.identity = {k: identity[k] for k in COLUMNS[:7]}
        self.info = info
        self.rows: list[dict] = []
        self.curves = None  # bench.measure.curves.Curves where --tensorboard asks for them

    @classmethod
    def load(cls, folder: Path) -> RunRecord:
        """The record of a finished run, read back from its files."""
        folder = Path(folder)
        info = read_json(folder / "run.json") or {}
        with open(folder / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            row["epoch"], row["value"] = int(row["epoch"]), float(row["value"])
        record = cls.__new__(cls)
        record.folder, record.info, record.rows, record.curves = folder, info, rows, None
        record.identity = {k: rows[0][k] for k in COLUMNS[:7]} if rows else {}
        return record

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.write_metrics()
        self.update(status="running")

    def add(self, epoch: int, metrics: dict[tuple[str, str], float]) -> None:
        """Append ``{(stage, metric): value}`` rows for ``epoch`` and write them out."""
        for (stage, metric), value in metrics.items():
            self.rows.append(
                {**self.identity, "epoch": epoch, "stage": stage, "metric": metric, "value": value}
            )
        self.write_metrics()
        if self.curves is not None:
            self.curves.add(epoch, metrics)

    def write_metrics(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_atomic(self.folder / "metrics.csv", buffer.getvalue())

    def update(self, **fields) -> None:
        self.info.update(fields)
        write_atomic(self.folder / "run.json", json.dumps(self.info, indent=2, default=str) + "\n")
        if self.curves is not None and fields.get("status") in ("ok", "failed", "diverged"):
            self.curves.close()
            self.curves = None


def save_weights(folder: Path, label: str, stage) -> None:
    """The state dicts of a stage's modules (group first) to ``folder/weights/stage{label}.pt``,
    written atomically."""
    path = folder / "weights" / f"stage{label}.pt"
    path.parent.mkdir(exist_ok=True)
    replace_atomic(
        path, lambda f: torch.save([module.state_dict() for module in stage.modules()], f)
    )


#: past these a run is running away, said in the epoch it is seen: a synthetic gradient this
#: many times the true gradient's norm (``synth_norm_ratio``), a critic whose mean
#: |L_k - L_{k+1}| is this many nats (``critic_loss``), a training loss of this many nats
#: (chance is ln C: 2.3 for 10 classes, 9.2 for PTB's 10,000 words)
RUNAWAY_BOUNDS = {"synth_norm_ratio": 10.0, "critic_loss": 50.0, "train_loss": 100.0}
#: ... once this many batches are trained: a zero-initialised synthesizer stepped by Adam
#: overshoots for its first tens of steps (``tests/test_studies.py``), and settles
RUNAWAY_AFTER = 100
RUNAWAY_WHAT = {
    "synth_norm_ratio": "synthetic gradients {value:.3g} x the true gradient's norm",
    "critic_loss": "critic loss {value:.3g} nats",
    "train_loss": "training loss {value:.3g} nats",
}


def runaway(rows: dict[tuple[str, str], float]) -> list[dict]:
    """The local signals of one epoch's ``rows`` past ``RUNAWAY_BOUNDS`` (non-finite ones too)."""
    found = []
    for (stage, metric), value in sorted(rows.items()):
        bound = RUNAWAY_BOUNDS.get(metric)
        if bound is not None and not value <= bound:
            shown = value if math.isfinite(value) else str(value)  # run.json stays strict JSON
            found.append({"stage": stage, "metric": metric, "value": shown, "bound": bound})
    return found


def stop_if_diverged(
    record: RunRecord, rows: dict[tuple[str, str], float], epoch: int, trained: int
) -> None:
    """Say, in one line per stage on stderr and in run.json's ``warnings``, every local signal
    of ``epoch``'s ``rows`` past its bound (once ``trained`` batches reach RUNAWAY_AFTER, or
    non-finite); then mark the run ``diverged`` in run.json and raise RunFailed if the
    epoch's training loss is not finite."""
    found = [
        item
        for item in runaway(rows)
        if trained >= RUNAWAY_AFTER or not math.isfinite(float(item["value"]))
    ]
    for item in found:
        what = RUNAWAY_WHAT[item["metric"]].format(value=float(item["value"]))
        where = f", stage {item['stage']}" if item["stage"] else ""
        print(
            f"lcbench: epoch {epoch}{where}: {what} "
            f"(bound {item['bound']:g}): the run is diverging",
            file=sys.stderr,
            flush=True,
        )
    if found:
        warnings = record.info.get("warnings", []) + [{"epoch": epoch, **i} for i in found]
        record.update(warnings=warnings)
    loss = rows["", "train_loss"]
    if not math.isfinite(loss):
        record.update(
            status="diverged", error=f"non-finite training loss at epoch {epoch}", ended=now()
        )
        raise RunFailed(f"run {record.info.get('run_id')} diverged at epoch {epoch}")
