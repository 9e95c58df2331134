"""A sweep's plan before anything runs: each run's state in the results folder and its price
on a device profile (``lcbench sweep SPEC --plan``), and the grid's state alone (``--status``).

States: ``done`` (run.json ok), ``running`` (a live worker holds its claim), ``failed``
(failed or diverged, with its one-line error), ``partial`` (a checkpoint, its epoch, nobody
on it) and ``todo``.

A done run's measured training seconds stand beside the forecast ones (``measured_train_s``,
``measured_over_forecast``): where runs exist, the plan is checked against them.

The price of a run is ``bench.forecast``'s: seconds per training batch on the run's devices
times its batches (``--iterations``, or epochs x the task's training samples / batch), plus
what each epoch's first batch adds on ranks (the stages' fill), plus each epoch's evaluation
(the test samples' forward passes on one device). Devices: the run's ranks (distributed:
a GPU per stage; ddp: ``--workers``), 1 for the sequential executor, which runs every stage
in turn on its one device (its batch costs the sum of the stages). A run is priced at the
cuts it will train on (explicit, published or balanced by FLOPs as it will be; a split by
measured time at the forecast's balanced cuts). The floor (``frozen``) is priced as what it
runs: groups 1..K-1 forward only, the last group trained. The total wall-clock on N devices
is list scheduling: the longest runs first, each started as soon as as many devices as it
needs are free.
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

import methods

from .. import checkpoint, prepare
from ..config import RunConfig, ranks
from ..data.tasks import TASKS
from ..forecast import predict
from ..forecast.profiles import Profile
from ..forecast.workload import workload
from ..records import read_json, write_atomic
from ..schedule import epoch_steps
from . import claims

STATES = ("done", "running", "partial", "failed", "todo")
DEFAULT_PROFILE = "h100-sxm-nvlink"
#: the SLURM time limit asked for a run: its forecast times this, plus the start-up below
TIME_MARGIN = 1.5
START_UP_MIN = 10


@dataclass
class Entry:
    cfg: RunConfig
    state: str
    epoch: int | None = None  # the newest complete checkpoint's (partial, running)
    error: str = ""
    devices: int = 1
    seconds: float = math.nan  # the forecast wall-clock of the whole run
    train_s: float = math.nan  # its training part
    measured_train_s: float = math.nan  # a done run's training seconds, as measured
    profile: str = ""  # the profile it is priced on

    @property
    def device_hours(self) -> float:
        return self.devices * self.seconds / 3600


def state_of(cfg: RunConfig) -> tuple[str, int | None, str]:
    """``(state, checkpoint epoch, error)`` of a run in its results folder."""
    folder = prepare.run_folder(cfg)
    info = read_json(folder / "run.json") or {}
    if info.get("status") == "ok":
        return "done", None, ""
    epochs = checkpoint.Checkpoints(folder, {}).epochs() if folder.exists() else []
    epoch = epochs[-1] if epochs else None
    if folder.exists() and claims.held(folder):
        return "running", epoch, ""
    if info.get("status") in ("failed", "diverged"):
        return "failed", epoch, str(info.get("error") or info["status"]).splitlines()[0]
    return ("partial" if epochs else "todo"), epoch, ""


def devices(cfg: RunConfig) -> int:
    """The devices a run occupies: its ranks (one for the sequential executor)."""
    return ranks(cfg)


@functools.cache
def _workload(model: str, task: str, method: str, width: float, options: tuple):
    return workload(model, task, method, width=width, options=dict(options))


def _times(cfg: RunConfig, method: str, profile: Profile) -> predict.Times:
    """The forecast's times of ``cfg``'s model under ``method`` (workloads counted once)."""
    options = tuple(sorted(cfg.options.items())) if method == cfg.method else ()
    work = _workload(cfg.model, cfg.task, method, cfg.width, options)
    return predict.Times(work, profile, cfg.precision)


_CUTS: dict[str, tuple[int, ...] | None] = {}


def run_cuts(cfg: RunConfig) -> tuple[int, ...] | None:
    """The cuts ``cfg`` will train on (``None``: a split by time, balanced by the forecast)."""
    key = repr(
        (cfg.model, cfg.task, cfg.width, cfg.method, cfg.groups, cfg.split, cfg.cuts)
        + (sorted(cfg.options.items()), cfg.batch_size)
    )
    if key not in _CUTS:
        cuts = prepare.planned_cuts(cfg)
        _CUTS[key] = None if cuts is None else tuple(cuts)
    return _CUTS[key]


def frozen_seconds(cfg: RunConfig, profile: Profile) -> float:
    """The floor's batch: groups 1..K-1 forward only, the last group forward, backward and
    update; in turn on one device, or each group on its rank (the slowest sets the pace)."""
    one = methods.reference()
    times = _times(replace(cfg, method=one), one, profile)
    n, count = cfg.batch_size, len(times.work.blocks)
    cuts = run_cuts(cfg)
    if cuts is None:
        cuts = predict.balanced_cuts(times, cfg.groups, n, one)
    bounds = list(zip([0, *cuts], [*cuts, count]))
    stages = [sum(times.forward(j, n) for j in range(a, b)) for a, b in bounds]
    a = bounds[-1][0]
    stages[-1] += sum(times.backward(j, n, j > a) + times.update(j) for j in range(a, count))
    stages[0] += times.input(n)
    return sum(stages) if cfg.executor == "sequential" else max(stages)


def batch_seconds(cfg: RunConfig, profile: Profile) -> tuple[float, float]:
    """``(steady seconds per training batch, what an epoch's first batch adds)`` of ``cfg``
    on its devices, at the cuts it will train on: the second is the fill of stages on ranks
    (the first batch crosses every stage before the last one trains)."""
    how = predict.timing(cfg.method)
    if how == "floor":
        return frozen_seconds(cfg, profile), 0.0
    priced = replace(cfg, groups=1) if how == "one" else cfg
    times = _times(priced, cfg.method, profile)
    link = profile.link.link()
    setup = predict.setup_of(priced, None if how == "one" else run_cuts(cfg))
    if cfg.executor != "sequential" or how == "one":
        forecast = predict.predict(times, setup, link, cfg.batch_size)
        return forecast.step_s, forecast.fill_s
    return predict.one_device_step(times, setup, link, cfg.batch_size), 0.0


def priced(cfg: RunConfig, profile: Profile) -> tuple[float, float]:
    """``(training, evaluation)`` forecast seconds of the whole run on its devices."""
    cfg = prepare.resolve(cfg)
    sizes = TASKS[cfg.task].sizes
    if sizes is None:
        raise ValueError(f"task {cfg.task} states no split sizes to price it by")
    train = min(sizes[0], cfg.limit_train or sizes[0])
    test = min(sizes[1], cfg.limit_test or sizes[1])
    plan = epoch_steps(cfg, train // cfg.batch_size)
    step, fill = batch_seconds(cfg, profile)
    times = _times(cfg, methods.reference(), profile)
    size = cfg.eval_batch_size or cfg.batch_size
    forward = sum(times.forward(j, size) for j in range(len(times.work.blocks)))
    return sum(plan) * step + len(plan) * fill, len(plan) * math.ceil(test / size) * forward


def run_seconds(cfg: RunConfig, profile: Profile) -> float:
    """The forecast wall-clock of the whole run on its devices: training and evaluation."""
    return sum(priced(cfg, profile))


def measured_train_seconds(cfg: RunConfig) -> float:
    """A finished run's training seconds as measured (its epochs' ``epoch_time_s``)."""
    with open(prepare.run_folder(cfg) / "metrics.csv", newline="") as f:
        rows = csv.DictReader(f)
        return sum(
            float(r["value"]) for r in rows if r["metric"] == "epoch_time_s" and not r["stage"]
        )


def profile_for(cfg: RunConfig, profiles: Sequence[Profile]) -> Profile:
    """The profile a run is priced on: of several, the first calibrated at the run's CPU
    threads per process (its ranks share this machine's cores), else the first."""
    if len(profiles) > 1:
        threads = prepare.threads_per_rank(cfg)
        for profile in profiles:
            if profile.device.threads == threads:
                return profile
    return profiles[0]


def entries(cfgs: list[RunConfig], profiles: Sequence[Profile] = ()) -> list[Entry]:
    """Each run's state; with ``profiles``, its devices and price (``profile_for``)."""
    out = []
    for cfg in cfgs:
        state, epoch, error = state_of(cfg)
        entry = Entry(cfg, state, epoch, error, devices(cfg))
        if profiles:
            profile = profile_for(cfg, profiles)
            entry.profile = profile.name
            entry.train_s, evaluation = priced(cfg, profile)
            entry.seconds = entry.train_s + evaluation
            if state == "done":
                entry.measured_train_s = measured_train_seconds(cfg)
        out.append(entry)
    return out


def list_schedule(jobs: list[tuple[float, int]], count: int) -> float:
    """The makespan of ``(seconds, devices)`` jobs on ``count`` devices: longest first, each
    started when as many devices as it needs are free (inf if one needs more than there are)."""
    if any(need > count for _, need in jobs):
        return math.inf
    free = [0.0] * count
    end = 0.0
    for seconds, need in sorted(jobs, key=lambda j: -j[0]):
        free.sort()
        start = free[need - 1]
        for i in range(need):
            free[i] = start + seconds
        end = max(end, start + seconds)
    return end


def frame(items: list[Entry], priced: bool) -> pd.DataFrame:
    rows = []
    for e in items:
        row = {
            "run_id": e.cfg.run_id,
            "method": e.cfg.method,
            "task": e.cfg.task,
            "model": e.cfg.model,
            "groups": e.cfg.groups,
            "executor": e.cfg.executor,
            "state": e.state,
            "checkpoint_epoch": e.epoch,
            "devices": e.devices,
        }
        if priced:
            row.update(
                profile=e.profile,
                forecast_s=e.seconds,
                device_hours=e.device_hours,
                time_limit_min=time_limit_min(e.seconds),
                forecast_train_s=e.train_s,
                measured_train_s=e.measured_train_s,
                measured_over_forecast=e.measured_train_s / e.train_s,
            )
        row["error"] = e.error
        rows.append(row)
    return pd.DataFrame(rows)


def time_limit_min(seconds: float) -> int:
    """The SLURM time limit asked for a run forecast at ``seconds``: x TIME_MARGIN, plus
    START_UP_MIN minutes."""
    return math.ceil(seconds * TIME_MARGIN / 60) + START_UP_MIN


def totals(items: list[Entry], count: int) -> str:
    """The closing lines of a plan: runs by state, device-hours (all, and left), wall-clock
    on ``count`` devices for what is left."""
    left = [e for e in items if e.state != "done"]
    by_state = ", ".join(f"{sum(e.state == s for e in items)} {s}" for s in STATES)
    hours = sum(e.device_hours for e in items)
    left_hours = sum(e.device_hours for e in left)
    wall = list_schedule([(e.seconds, e.devices) for e in left], count)
    shown = "more devices than given" if math.isinf(wall) else f"{wall / 3600:,.1f} h"
    checked = sorted(e.measured_train_s / e.train_s for e in items if e.state == "done")
    check = (
        f"\nmeasured / forecast training time of the {len(checked)} done runs: "
        f"median {checked[len(checked) // 2]:.2f}, {checked[0]:.2f} to {checked[-1]:.2f}"
        if checked
        else ""
    )
    return (
        f"{len(items)} runs: {by_state}{check}\n"
        f"device-hours: {hours:,.1f} in all, {left_hours:,.1f} left\n"
        f"wall-clock of what is left on {count} devices (list scheduling): {shown}"
    )


def write(items: list[Entry], path: Path) -> pd.DataFrame:
    table = frame(items, priced=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, table.to_csv(index=False))
    return table
