"""The epoch loop every executor runs (``run``): train, tally, evaluate, record, checkpoint,
stop on divergence. A ``Process`` is one process's part in it: the stages it trains, and the
hooks where the executors differ (how a batch reaches a stage, how ranks meet, how a
checkpoint is written)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench import checkpoint, prepare
from bench.measure import memory
from bench.records import RunRecord, stop_if_diverged


def stage_label(stage) -> str:
    """Figures of the last stage describe the whole network (empty stage column)."""
    return "" if stage.last else str(stage.index + 1)


def resume(stages, resumed: dict | None, device: torch.device, generator) -> int:
    """The epoch a run continues after (0: none), the stages' and the RNG states of its
    checkpoint ``resumed`` loaded."""
    if resumed is None:
        return 0
    for stage, state in zip(stages, resumed["stages"], strict=True):
        stage.load_state_dict(state)
    checkpoint.set_rng_state(resumed["rng"], device, generator)
    return resumed["epoch"]


@dataclass
class Process:
    """One process's part of the epochs: what it trains, and the hooks."""

    stages: list  # the stages this process trains
    labels: list[str]  # the stage column of each one's memory figures
    label: str  # the stage column of the process's own figures ("": the whole run's)
    probes: list  # each stage's memory.ActivationProbe
    device: torch.device
    batch_rows: int  # samples of a training batch here
    eval_rows: int  # samples of a test batch
    costs: dict  # the split's cost rows (epoch 1) where this process writes them, else {}
    compiled: float | None  # seconds of the warm-up that compiled (None: not compiled)
    #: (epoch, its first iteration, steps, probes) -> rows of the epoch's time (and counts):
    #: the batches through the stages, ``probes`` (epoch 1's; else none) around the first
    train: Callable[[int, int, int, list], dict]
    evaluate: Callable[[], dict]  # the test rows
    #: (steps, rows, the stages' training rows among them) -> the run's rows of the epoch
    #: (None: they come together on another rank)
    meet: Callable[[int, dict, dict], dict | None]
    save: Callable[[int], None]  # the checkpoint of an epoch
    diagnose: Callable[[], dict] = dict  # rows measured off the clock after evaluation


def run(process: Process, record: RunRecord | None, *, plan: list[int], done: int, every: int):
    """Epochs ``done`` + 1 .. ``len(plan)`` (``plan``: each one's iterations) of ``process``;
    the run's rows added to ``record`` where they come together (RunFailed on divergence); a
    checkpoint every ``every`` epochs."""
    p, device, label = process, process.device, process.label
    for epoch, steps in enumerate(plan[done:], done + 1):
        first = sum(plan[: epoch - 1])
        memory.reset_device_peaks(device)
        prepare.reset_states(p.stages, p.batch_rows)
        timed = p.train(epoch, first, steps, p.probes if epoch == 1 else [])
        learned = {(stage_label(s), m): v for s in p.stages for m, v in s.pop_metrics().items()}
        rows = {**learned, **timed}
        if p.compiled is not None and epoch == done + 1:  # the first epoch this process trains
            rows[label, "compile_time_s"] = p.compiled
        if epoch == 1:
            rows.update(memory.memory_rows(p.stages, p.probes, p.labels))
            rows.update(p.costs)
        rows.update({(label, m): v for m, v in memory.device_memory(device, "train").items()})
        memory.reset_device_peaks(device)
        prepare.reset_states(p.stages, p.eval_rows)
        rows.update(p.evaluate())
        if device.type == "cuda":
            rows.update({(label, m): v for m, v in memory.device_memory(device, "eval").items()})
        rows.update(p.diagnose())
        merged = p.meet(steps, rows, learned)
        if merged is not None:
            record.add(epoch, merged)
            stop_if_diverged(record, merged, epoch, first + steps)
        if checkpoint.due(every, epoch):
            p.save(epoch)
