"""Checkpoints: a run's state at the end of an epoch, from which it continues exactly.

``RUN/checkpoints/`` holds, for each checkpointed epoch E, the state of the stages
(``epochE.pt``, or one ``epochE.rankR.pt`` per rank of a distributed run: modules,
optimizers, in-flight state, replay buffers), the RNG states, and with the run-level part
(the sequential file, rank 0's) the rows written so far; then, written last,
``epochE.json``: the run's fingerprint. An epoch without its ``.json`` is incomplete and
never read. Every file is written atomically; the newest ``KEEP`` epochs are kept.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

from .config import RunConfig, UsageError
from .measure.provenance import lcbench_version, now
from .records import read_json, replace_atomic, write_atomic

FOLDER = "checkpoints"
KEEP = 2
MARKER = re.compile(r"^\.?epoch(\d+)\.json(\..+\.tmp)?$")


class StorageFault(OSError):
    """A checkpoint that could not be written (a full or read-only folder): the previous one
    is kept, whole, and the run continues from it once the fault is gone."""


class Mismatch(UsageError):
    """A checkpoint written by another run or another version of a rule: never loaded."""


def fingerprint(cfg: RunConfig, stages, cuts: list[int]) -> dict:
    """What a checkpoint must match to be continued: the run's key (every field that
    changes results), its cut points, lcbench's version, each rule's class with the version
    it declares (``Stage.version``, raised when its update changes; an edit that does not
    change it, a comment, leaves the checkpoint good), and the shapes of every stage's state."""
    shapes = [
        [name, list(t.shape)]
        for stage in stages
        for module in stage.modules()
        for name, t in module.state_dict().items()
    ]
    found = {
        "config": cfg.key(),
        "cuts": cuts,
        "lcbench": lcbench_version(),
        "rules": sorted({f"{type(s).__module__}.{type(s).__qualname__}" for s in stages}),
        "rule_version": sorted({f"{type(s).__qualname__} {type(s).version}" for s in stages}),
        "shapes": hashlib.sha1(json.dumps(shapes).encode()).hexdigest()[:12],
        "run_id": cfg.run_id,
    }
    return json.loads(json.dumps(found))  # as read back from a marker


def differences(saved, current: dict) -> str:
    """What differs between a saved fingerprint (whatever was read) and ``current``, briefly."""
    saved = saved if isinstance(saved, dict) else {}
    out = []
    for key, value in current.items():
        if key == "config" and isinstance(saved.get(key), dict):
            out += [
                f"{field} {saved[key].get(field)!r} there, {v!r} here"
                for field, v in value.items()
                if saved[key].get(field) != v
            ]
        elif saved.get(key) != value and (key != "run_id" or not out):  # else said above
            out.append(f"{key} {saved.get(key)!r} there, {value!r} here")
    return "; ".join(out[:3]) or "unreadable"


def due(every: int, epoch: int) -> bool:
    """Whether epoch ``epoch`` ends with a checkpoint (``every`` 0: never)."""
    return every > 0 and epoch % every == 0


def rng_state(device: torch.device, generator: torch.Generator) -> dict:
    """torch's global RNG (CPU, and the device's on CUDA) and the data order's generator."""
    return {
        "cpu": torch.get_rng_state(),
        "data": generator.get_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict, device: torch.device, generator: torch.Generator) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    generator.set_state(state["data"].cpu())
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class Checkpoints:
    """The checkpoints of one run as one process writes them: the sequential executor's
    (``rank`` None) or one rank's of a distributed run (rank 0 keeps the markers)."""

    def __init__(self, run_folder: Path, fingerprint: dict, rank: int | None = None):
        self.folder = Path(run_folder) / FOLDER
        self.fingerprint, self.rank = fingerprint, rank
        suffix = "" if rank is None else rf"\.rank{rank}"
        self.own = re.compile(rf"^\.?epoch(\d+){suffix}\.pt(\..+\.tmp)?$")
        self.marks = rank in (None, 0)

    def part(self, epoch: int) -> Path:
        """This process's file of ``epoch``."""
        rank = "" if self.rank is None else f".rank{self.rank}"
        return self.folder / f"epoch{epoch}{rank}.pt"

    def marker(self, epoch: int) -> Path:
        return self.folder / f"epoch{epoch}.json"

    def epochs(self) -> list[int]:
        """The complete (marked) epochs, oldest first."""
        found = [MARKER.match(p.name) for p in self.folder.glob("epoch*.json")]
        return sorted(int(m[1]) for m in found if m and not m[2])

    def check(self, saved, path: Path) -> None:
        if saved != self.fingerprint:
            raise Mismatch(
                f"checkpoint {path} is not this run's "
                f"({differences(saved, self.fingerprint)}): "
                f"remove {self.folder} to start the run over"
            )

    def latest(self) -> int | None:
        """The newest complete epoch, its fingerprint checked (Mismatch), or None."""
        epochs = self.epochs()
        if not epochs:
            return None
        marker = self.marker(epochs[-1])
        self.check((read_json(marker) or {}).get("fingerprint"), marker)
        return epochs[-1]

    def load(self, epoch: int, device: torch.device) -> dict:
        """This process's state at the end of ``epoch`` (tensors on ``device``)."""
        path = self.part(epoch)
        if not path.is_file():
            raise Mismatch(
                f"checkpoint {path} is missing: remove {self.folder} to start the run over"
            )
        state = torch.load(path, map_location=device, weights_only=True)
        self.check(state.get("fingerprint"), path)
        return state

    def save(self, epoch: int, state: dict) -> None:
        """Write this process's part of ``epoch`` (not yet complete: see ``commit``);
        StorageFault where the folder is full or read-only."""
        state = {**state, "epoch": epoch, "fingerprint": self.fingerprint}
        # serialized in memory first: torch's zip writer turns a full disk into "unexpected
        # pos" (a RuntimeError without errno); a plain write says ENOSPC, and the size is known
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getbuffer()
        with self.faults(epoch, len(data)):
            self.folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.folder).free
            if len(data) > free:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.part(epoch)))
            replace_atomic(self.part(epoch), lambda f: f.write(data))

    def commit(self, epoch: int) -> None:
        """Once every part of ``epoch`` is saved: mark it complete (the marking process) and
        keep only this process's files of the newest ``KEEP`` epochs up to ``epoch`` (later
        ones are what an earlier attempt left unfinished)."""
        if self.marks:
            marker = {"epoch": epoch, "written": now(), "fingerprint": self.fingerprint}
            with self.faults(epoch):
                write_atomic(self.marker(epoch), json.dumps(marker, indent=2) + "\n")
        self.prune(KEEP, upto=epoch)

    @contextlib.contextmanager
    def faults(self, epoch: int, size: int | None = None):
        """An OSError writing ``epoch`` as one line saying what is kept and what to do; for a
        full disk, the bytes the checkpoint needs (``size``) and the bytes free."""
        try:
            yield
        except OSError as e:
            kept = [e_ for e_ in self.epochs() if e_ < epoch]
            room = ""
            if e.errno == errno.ENOSPC and size is not None:
                free = shutil.disk_usage(
                    self.folder if self.folder.exists() else self.folder.parent
                ).free
                room = f": it needs {size:,} bytes, {free:,} are free"
            raise StorageFault(
                f"cannot write the checkpoint of epoch {epoch} to {self.folder} "
                f"({e.strerror or e}{room}); "
                + (f"epoch {kept[-1]}'s is kept: " if kept else "")
                + "run the same command again once the folder is writable"
            ) from None

    def remove(self) -> None:
        """Remove the run's checkpoints (the marking process) or this rank's files."""
        if self.marks:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            self.prune(0)

    def prune(self, keep: int, upto: float = math.inf) -> None:
        """Keep this process's files of its newest ``keep`` epochs up to ``upto``; remove the
        rest and any temporary file a killed write left."""
        try:
            names = [p.name for p in self.folder.iterdir()]
        except FileNotFoundError:
            return
        for pattern in [self.own] + ([MARKER] if self.marks else []):
            files = [(self.folder / name, pattern.match(name)) for name in names]
            files = [(p, int(m[1]), bool(m[2])) for p, m in files if m]
            epochs = sorted({e for _, e, temporary in files if not temporary and e <= upto})
            kept = epochs[max(0, len(epochs) - keep) :]
            for path, epoch, temporary in files:
                if temporary or epoch not in kept:
                    path.unlink(missing_ok=True)


def saved_cuts(run_folder: Path) -> list[int] | None:
    """The cut points of the newest complete checkpoint of the run in ``run_folder``."""
    store = Checkpoints(run_folder, {})
    epochs = store.epochs()
    info = read_json(store.marker(epochs[-1])) if epochs else None
    return ((info or {}).get("fingerprint") or {}).get("cuts")
