"""Sweeps: a TOML spec -> the grid of RunConfigs -> runs, resumable.

A run whose ``run.json`` says ``ok`` is skipped, so running a sweep again resumes it; a
run that was stopped continues from its last checkpoint.
A run that fails, diverges or is invalid for its cell is recorded and the sweep goes on.
SIGINT / SIGTERM stop it cleanly: the current run is recorded ``failed`` ("interrupted").
The spec format is described in ``bench/experiments/example.toml``.
"""

from __future__ import annotations

import itertools
import signal
import sys
import threading
import time
import types
import typing
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import tomllib
from tqdm import tqdm

import methods

from . import prepare, runner
from .cluster import claims
from .config import RunConfig, UsageError
from .measure.provenance import now
from .records import RunFailed, RunRecord, read_json

LAYER = ("experiment", "grid", "settings", "options")  # what the spec and each preset may set
EXPERIMENT_KEYS = ("name", "description")
FIELD_TYPES = {
    k: v
    for k, v in typing.get_type_hints(RunConfig).items()
    if k not in (*RunConfig.OUTPUT_FIELDS, "options")
}

Key = str | tuple  # a RunConfig field, or (method, option)


# -- reading a spec ---------------------------------------------------------------------


def load_spec(
    path, preset: str | None = None, *, out: str = "results", data_dir: str | None = None
) -> list[RunConfig]:
    """The runs of the spec at ``path`` (``preset`` laid over it), each resolved, in grid
    order, without duplicates. A malformed spec raises UsageError naming the file."""
    try:
        try:
            with open(path, "rb") as f:
                spec = tomllib.load(f)
        except OSError as e:
            raise UsageError(f"cannot read the spec: {e.strerror or e}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"bad TOML: {e}") from None
        return expand(spec, preset, Path(path).stem, out=out, data_dir=data_dir)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None


def expand(
    spec: dict, preset: str | None, default_name: str, *, out: str, data_dir: str | None
) -> list[RunConfig]:
    """Validate the parsed spec and return its resolved runs."""
    check_keys(spec, (*LAYER, "presets", "launcher"), "the spec's top level")
    presets = table(spec, "presets", "")
    layers = {
        name: parse_layer(table(presets, name, "presets."), f"presets.{name}.") for name in presets
    }
    experiment, fixed, grids, _ = parse_layer(
        {k: v for k, v in spec.items() if k not in ("presets", "launcher")}, ""
    )
    if preset is not None:
        if preset not in layers:
            choices = ", ".join(layers) or "none defined"
            raise UsageError(f"unknown preset '{preset}' (choose from {choices})")
        p_experiment, p_fixed, p_grids, p_replaces = layers[preset]
        experiment.update(p_experiment)
        if p_replaces:  # [[presets.NAME.grid]]: the preset's grids instead of the spec's
            grids = p_grids
        for key, value in p_fixed.items():  # a preset's value replaces the base's, grid or not
            for axes in grids:
                axes.pop(key, None)
            fixed[key] = value
        for key, values in p_grids[0].items() if p_grids and not p_replaces else ():
            fixed.pop(key, None)
            for axes in grids:
                axes[key] = values
    name = experiment.get("name", default_name)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise UsageError(f"[experiment] name must be a plain folder name (got '{name}')")
    if not grids or not all(grids):
        raise UsageError("empty grid: [grid] needs at least one key with a list of values")
    if any("method" not in fixed and "method" not in axes for axes in grids):
        raise UsageError("no method: set method = [...] in [grid]")

    runs: dict[str, RunConfig] = {}
    for axes in grids:
        for combo in itertools.product(*axes.values()):
            values = {**fixed, **dict(zip(axes, combo))}
            method = canonical_method(values["method"], "method")
            options = {
                k[1]: v for k, v in values.items() if isinstance(k, tuple) and k[0] == method
            }
            settings = {k: v for k, v in values.items() if isinstance(k, str)}
            cfg = prepare.resolve(
                RunConfig(**settings, options=options, experiment=name, out=out, data_dir=data_dir)
            )
            runs.setdefault(cfg.run_id, cfg)
    return list(runs.values())


def parse_layer(layer: dict, where: str) -> tuple[dict, dict, list[dict], bool]:
    """One layer (the spec or a preset): its ``[experiment]`` table, its fixed values, its
    grids (one ``[grid]`` or several ``[[grid]]``: axes keyed by RunConfig field or (method,
    option), type-checked) and whether it gave a list of grids."""
    check_keys(layer, LAYER, f"[{where[:-1]}]" if where else "the spec's top level")
    experiment = table(layer, "experiment", where)
    check_keys(experiment, EXPERIMENT_KEYS, f"[{where}experiment]")
    for key, value in experiment.items():
        if not isinstance(value, str):
            raise UsageError(f"[{where}experiment] {key} must be a string, got {value!r}")
    fixed = {}
    settings = {
        **table(layer, "settings", where),
        **option_items(table(layer, "options", where), f"{where}options"),
    }
    for key, value in settings.items():
        label = f"{where}settings" if isinstance(key, str) else f"{where}options.{key[0]}"
        hint = checked_key(key, label)
        fixed[key] = typed(key, value, hint, label)
    listed = isinstance(layer.get("grid"), list)
    raw = layer["grid"] if listed else ([table(layer, "grid", where)] if "grid" in layer else [])
    grids = []
    for i, grid in enumerate(raw):
        label = f"{where}grid" + (f"[{i}]" if listed else "")
        if not isinstance(grid, dict):
            raise UsageError(f"[{label}] must be a table, got {grid!r}")
        axes = parse_grid(grid, label)
        clash = [key for key in fixed if key in axes]
        if clash:
            raise UsageError(
                f"'{name_of(clash[0])}' is both a grid axis and a fixed value"
                f"{' in [' + where[:-1] + ']' if where else ''}"
            )
        grids.append(axes)
    return experiment, fixed, grids, listed


def parse_grid(grid: dict, where: str) -> dict:
    """The axes of one grid table: ``KEY = [values]`` and ``[options.METHOD]`` axes."""
    grid = dict(grid)
    grid_options = table(grid, "options", f"{where}.")
    grid.pop("options", None)
    axes = {}
    for key, values in {**grid, **option_items(grid_options, f"{where}.options")}.items():
        label = where if isinstance(key, str) else f"{where}.options.{key[0]}"
        hint = checked_key(key, label)
        if not isinstance(values, list):
            raise UsageError(f"[{label}] {name_of(key)} must be a list of values, got {values!r}")
        if not values:
            raise UsageError(f"[{label}] {name_of(key)} is an empty list")
        axes[key] = [typed(key, v, hint, label) for v in values]
    return axes


def option_items(tables: dict, where: str) -> dict:
    """``{method: {option: value}}`` flattened to ``{(method, option): value}``."""
    items = {}
    for method in tables:
        name = canonical_method(method, f"[{where}.{method}]")
        items.update({(name, k): v for k, v in table(tables, method, f"{where}.").items()})
    return items


def table(parent: dict, name: str, where: str) -> dict:
    """``parent[name]`` (empty when absent), which must be a TOML table."""
    value = parent.get(name, {})
    if not isinstance(value, dict):
        raise UsageError(f"[{where}{name}] must be a table, got {value!r}")
    return value


def check_keys(mapping: dict, allowed, where: str) -> None:
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        raise UsageError(f"unknown key '{unknown[0]}' in {where} (allowed: {', '.join(allowed)})")


def canonical_method(name, where: str) -> str:
    try:
        return methods.resolve(name).name
    except ValueError:
        raise UsageError(
            f"{where}: unknown method '{name}' (choose from {', '.join(methods.METHODS)})"
        ) from None


def checked_key(key: Key, where: str):
    """The type the values of ``key`` must have; UsageError for a key a spec cannot set."""
    if isinstance(key, tuple):
        method, option = key
        hints = typing.get_type_hints(methods.resolve(method).options)
        if option not in hints:
            raise UsageError(
                f"unknown option '{option}' for {method} in [{where}] "
                f"(choose from {', '.join(hints) or 'none'})"
            )
        return hints[option]
    if key in RunConfig.OUTPUT_FIELDS:
        raise UsageError(
            f"'{key}' cannot be set in a spec (the experiment name, --out and "
            f"--data-dir decide where runs go and what they read)"
        )
    if key == "options":
        raise UsageError(f"'options' in [{where}]: use [options.METHOD] tables")
    if key not in FIELD_TYPES:
        raise UsageError(f"unknown key '{key}' in [{where}] (choose from {', '.join(FIELD_TYPES)})")
    return FIELD_TYPES[key]


def typed(key: Key, value, hint, where: str):
    """``value`` checked against ``hint`` (an int where a float is due becomes a float)."""
    if not fits(value, hint):
        raise UsageError(f"[{where}] {name_of(key)} must be {type_name(hint)}, got {value!r}")
    floats = hint is float or float in typing.get_args(hint)
    return float(value) if floats and isinstance(value, int) else value


def fits(value, hint) -> bool:
    """Whether a TOML value fits a type hint (an int is a float; a bool is not a number)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(fits(v, args[0]) for v in value)
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, origin or hint)


def type_name(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if typing.get_origin(hint) is list:
        return f"a list ({type_name(args[0])} each)"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def name_of(key: Key) -> str:
    return key if isinstance(key, str) else key[1]


# -- running it -------------------------------------------------------------------------


@dataclass
class Tally:
    """How the runs of a sweep ended (``failed`` includes ``diverged``; ``claimed``: left to
    the other workers training them, or that tried them since this one started)."""

    ok: int = 0
    skipped: int = 0
    failed: int = 0
    diverged: int = 0
    claimed: int = 0

    def line(self) -> str:
        extra = f" ({self.diverged} diverged)" if self.diverged else ""
        others = f", {self.claimed} left to other workers" if self.claimed else ""
        return f"{self.ok} ok, {self.skipped} skipped, {self.failed} failed{extra}{others}"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the sweep; ``tally`` says how far it got."""

    def __init__(self, signum: int = signal.SIGINT, tally: Tally | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.tally = signum, tally

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def stop_on_signals():
    """While inside: SIGINT and SIGTERM (where not ignored) raise Interrupted, the first
    one only, so that the interrupted run's record is written in peace; handlers restored
    on leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: signal.signal(s, handler) for s, h in previous.items() if h != signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def status_of(cfg: RunConfig) -> str | None:
    info = read_json(prepare.run_folder(cfg) / "run.json")
    return info.get("status") if isinstance(info, dict) else None


def run_sweep(cfgs: list[RunConfig], *, progress: bool = True, locks: bool = True) -> Tally:
    """Run every config whose run.json is not ``ok``, one after another, recording failures
    and going on; one line per finished run to stderr. Raises Interrupted (with the tally)
    on SIGINT/SIGTERM, UsageError where the results folder cannot be written.

    With ``locks`` (not under ``--shard``), any number of workers may run the same grid on
    one results folder: a run is trained by the worker that holds its claim
    (``bench.cluster.claims``); the others pass it by, and pass by a run that failed since they
    started (another worker tried it: it is not tried twice in one round)."""
    tally = Tally()
    started = time.time()
    with stop_on_signals():
        try:
            cfgs = [prepare.resolve(cfg) for cfg in cfgs]
            todo = [cfg for cfg in cfgs if status_of(cfg) != "ok"]
            tally.skipped = len(cfgs) - len(todo)
            tqdm.write(
                f"{len(cfgs)} runs: {tally.skipped} already ok, {len(todo)} to run", file=sys.stderr
            )
            with tqdm(
                total=len(todo),
                unit="run",
                disable=not progress,
                dynamic_ncols=True,
                file=sys.stderr,
            ) as bar:
                for i, cfg in enumerate(todo, 1):
                    bar.set_description(f"run {i} of {len(todo)}")
                    with claimed(cfg, locks) as mine:
                        other = None if mine else "claimed by another worker"
                        info = read_json(prepare.run_folder(cfg) / "run.json") or {}
                        if mine and info.get("status") == "ok":
                            other = "done by another worker"
                        elif mine and info.get("status") in ("failed", "diverged"):
                            if written_since(cfg, started):
                                other = "tried by another worker since this one started"
                        if other is None:
                            status, detail = run_one(cfg, progress=progress)
                    if other is not None:
                        tally.claimed += 1
                        tqdm.write(
                            f"run {i} of {len(todo)}: {'passed':<8} {cfg.run_id}  {other}",
                            file=sys.stderr,
                        )
                        bar.update()
                        continue
                    tally.ok += status == "ok"
                    tally.failed += status != "ok"
                    tally.diverged += status == "diverged"
                    tqdm.write(
                        f"run {i} of {len(todo)}: {status:<8} {cfg.run_id}  {detail}",
                        file=sys.stderr,
                    )
                    bar.update()
        except KeyboardInterrupt as e:
            stop = e if isinstance(e, Interrupted) else Interrupted()
            stop.tally = tally
            raise stop from None
    return tally


def written_since(cfg: RunConfig, since: float) -> bool:
    """Whether the run's run.json was last written after ``since`` (a ``time.time()``)."""
    try:
        return (prepare.run_folder(cfg) / "run.json").stat().st_mtime > since
    except OSError:
        return False


@contextmanager
def claimed(cfg: RunConfig, locks: bool):
    """True holding the run's claim (always, without ``locks``); UsageError where the
    results folder cannot be written."""
    stack = ExitStack()
    try:
        mine = stack.enter_context(claims.claim(prepare.run_folder(cfg))) if locks else True
    except OSError as e:
        raise UsageError(f"cannot write to --out {cfg.out}: {e.strerror or e}") from None
    with stack:
        yield mine


def run_one(cfg: RunConfig, *, progress: bool) -> tuple[str, str]:
    """Prepare and execute one run; return its final status and a short detail."""
    try:
        prep = prepare.prepare(cfg)
    except Exception as e:  # an invalid cell (UsageError) or a bug building it
        error = str(e) if isinstance(e, UsageError) else f"{type(e).__name__}: {e}"
        record_invalid(cfg, error)
        return "failed", error
    try:
        record = runner.execute(prep, progress=progress)
    except UsageError as e:  # a checkpoint that is not this run's: left as it is
        return "failed", str(e)
    except RunFailed as e:
        info = read_json(prepare.run_folder(cfg) / "run.json") or {}
        return info.get("status", "failed"), info.get("error") or str(e)
    acc = [r["value"] for r in record.rows if r["metric"] == "test_acc" and r["stage"] == ""]
    detail = f"{record.info.get('wall_time_s', 0):.1f} s"
    return "ok", detail + (f", test_acc {acc[-1]:.4f}" if acc else "")


def record_invalid(cfg: RunConfig, error: str) -> None:
    """A run folder for a cell that could not even be prepared: status failed, its error."""
    info = {
        "run_id": cfg.run_id,
        "experiment": cfg.experiment,
        "status": "failed",
        "error": error,
        "config": asdict(cfg),
        "started": now(),
        "ended": None,
    }
    record = RunRecord(prepare.run_folder(cfg), {**asdict(cfg), "run_id": cfg.run_id}, info)
    try:
        record.start()
        record.update(status="failed", error=error, ended=now())
    except OSError as e:
        raise UsageError(f"cannot write to --out {cfg.out}: {e.strerror or e}") from None
