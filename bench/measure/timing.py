"""Busy time per stage and the modelled K-worker time (see DESIGN.md, "Measurement").

- ``PhaseTimer``: a stage's busy time split into forward / backward / update; CUDA events
  on a GPU (read after one synchronisation per epoch), perf_counter on the CPU.
- ``modelled_time``: the critical path of a K-worker pipeline built from per-stage times.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from methods import Stage

PHASES = ("forward", "backward", "update")


class PhaseTimer:
    """Accumulates one stage's busy seconds per phase; install with ``stage.phase = timer``.

    On CUDA two events per phase (reused from epoch to epoch), recorded on the stream that
    was current when the timer was made: no device query and no sync per batch."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._free: list[torch.cuda.Event] = []
        self._stream = torch.cuda.current_stream(device) if self.cuda else None

    def _record(self) -> torch.cuda.Event:
        event = self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)
        event.record(self._stream)
        return event

    def start(self, name: str):
        """Begin timing phase ``name``; pass the token returned to ``stop``."""
        return name, self._record() if self.cuda else time.perf_counter()

    def stop(self, token) -> None:
        name, begun = token
        if self.cuda:
            self._events.append((name, begun, self._record()))
        else:
            self.seconds[name] += time.perf_counter() - begun

    @contextmanager
    def __call__(self, name: str):
        token = self.start(name)
        yield
        self.stop(token)

    def pop(self) -> dict[str, float]:
        """Seconds per phase since the last call (synchronises CUDA once)."""
        if self._events:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self.seconds[name] += start.elapsed_time(end) / 1000
                self._free += (start, end)
            self._events.clear()
        out, self.seconds = self.seconds, dict.fromkeys(PHASES, 0.0)
        return out


def modelled_time(
    stage_seconds: Sequence[float], batches: int, *, decoupled: bool, microbatches: int = 1
) -> float:
    """Critical path of K workers over ``batches`` batches from the per-stage busy seconds
    (totals over those batches). Decoupled rules pipeline, so the slowest stage bounds
    the rate: sum_k t_k + (N-1) max_k t_k; BP without pipelining: N sum_k t_k; BP
    pipelined over M micro-batches (GPipe, 1F1B): N (M+K-1) max_k t_k / M."""
    per_batch = [s / batches for s in stage_seconds]
    if decoupled:
        return sum(per_batch) + (batches - 1) * max(per_batch)
    if microbatches > 1:
        return batches * (microbatches + len(per_batch) - 1) * max(per_batch) / microbatches
    return batches * sum(per_batch)


def stage_modelled_time(stage: Stage, busy: list[float], steps: int) -> float:
    """The K-worker time of ``stage``'s rule from the per-stage busy seconds."""
    return modelled_time(busy, steps, decoupled=stage.decoupled, microbatches=stage.microbatches)


def phase_rows(label: str, timer: PhaseTimer) -> dict:
    """One stage's (or rank's) busy seconds by phase since the last call, and their sum."""
    phases = timer.pop()
    rows = {(label, f"{name}_time_s"): v for name, v in phases.items()}
    rows[label, "busy_time_s"] = sum(phases.values())
    return rows


def time_rows(stages, timers: list[PhaseTimer], steps: int) -> dict:
    """Per-stage busy seconds by phase, and the modelled K-worker time of the epoch."""
    rows, busy = {}, []
    for stage, timer in zip(stages, timers):
        label = str(stage.index + 1)
        rows.update(phase_rows(label, timer))
        busy.append(rows[label, "busy_time_s"])
    rows["", "modelled_time_s"] = stage_modelled_time(stages[0], busy, steps)
    return rows
