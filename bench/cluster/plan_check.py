"""The plan's price checked against the runs it prices, on this machine (``make plan-check``).

Rounds, as ``make bench`` takes them, each in legs (``legs``): the runs on ranks, then each
model's sequential runs; each leg calibrates this machine for its own runs (``lcbench
calibrate``: at the threads they have; the ranks' leg with the link and the shared-machine
slowdown, which the later legs borrow) and then trains them afresh into the round's own
folder. The calibrations are kept there (``here-rank.toml``, ``here-MODEL.toml``), so that
the check resumes where it stopped. Each run is priced by ``bench.cluster.plan`` on its
leg's calibration, taken a minute before it: on 2 shared cores the machine drifts from one
minute to the next (a step 10-30% slower), and a calibration three minutes old paired a run
with another machine state. The median over rounds of those ratios (5 by default: the
small CNN's blocks timed 8 times in a row, seconds apart, sum to 32.5 ms with a standard
deviation of 9%, as much at 30 steps a timing as at 10; with 3 rounds, 11 of 120 runs in five
checks fell out, mostly by one wild round; with 5, 2 of 72 in three: docs/running.md) is set against 0.85-1.15, the band
``make bench`` holds. Beside it, the plan's price on the calibrations
merged value by value (``calibrate.merge``; ``here.toml``, ``here-rank.toml``) and the
median measured training seconds (the epochs' ``epoch_time_s``).

    python -m bench.cluster.plan_check [--spec S] [--preset smoke] [--rounds 5] [--out DIR]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import click
import pandas as pd
import tomllib
import torch

import methods
from bench import prepare, sweep
from bench.config import LAUNCHED, RunConfig, UsageError, ranks
from bench.forecast import calibrate, profiles
from bench.records import check_writable, write_atomic

from . import plan

BAND = (0.85, 1.15)


def calibrations_needed(cfgs: list[RunConfig]) -> dict:
    """What to calibrate for ``cfgs``: their models (on their tasks), rules with a local
    module, per-device batch sizes (at least two: the forecast interpolates), the
    micro-batches a pipeline holds and the neuron groups a width-grouped rule takes."""
    tasks_of = {cfg.model: cfg.task for cfg in cfgs}
    rules = sorted({cfg.method for cfg in cfgs if methods.resolve(cfg.method).local_module})
    neuron_groups = sorted(
        {
            {**methods.option_defaults(cfg.method), **cfg.options}["neuron_groups"]
            for cfg in cfgs
            if methods.resolve(cfg.method).neuron_grouped
        }
    )
    sizes = {cfg.batch_size // (ranks(cfg) if cfg.executor == "ddp" else 1) for cfg in cfgs}
    held = {
        cfg.batch_size // cfg.options.get("microbatches", 4)
        for cfg in cfgs
        if methods.resolve(cfg.method).timing == "pipeline"
    }
    sizes |= held
    if len(sizes) == 1:
        sizes.add(max(1, min(sizes) // 2))
    return dict(
        tasks_of=tasks_of,
        rules=rules,
        sizes=sorted(sizes),
        held=sorted(held),
        neuron_groups=neuron_groups,
    )


def legs(cfgs: list[RunConfig]) -> list[tuple[str, list[RunConfig]]]:
    """A round's runs as legs, each priced on a calibration taken just before it (on 2 shared
    cores the machine drifts from one minute to the next): the runs on ranks (their
    calibration measures the link the others borrow), then each model's sequential runs."""
    ranked = [cfg for cfg in cfgs if cfg.executor in LAUNCHED]
    alone = [cfg for cfg in cfgs if cfg.executor not in LAUNCHED]
    out = [("here-rank", ranked)] if ranked else []
    for model in dict.fromkeys(cfg.model for cfg in alone):
        out.append((f"here-{model}", [cfg for cfg in alone if cfg.model == model]))
    return out


def calibrate_leg(cfgs: list[RunConfig], threads: int, link: dict | None, path: Path) -> dict:
    """This machine calibrated for ``cfgs`` at ``threads`` per process, with the link measured
    on two ranks where ``link`` (another leg's) is not given. Written to ``path``; a leg that
    has it is not calibrated again."""
    if path.exists():
        return tomllib.loads(path.read_text())
    need = calibrations_needed(cfgs)
    models = list(need["tasks_of"])
    table = calibrate.calibrate(
        models,
        need["tasks_of"][models[0]],
        threads=threads,
        link=link is None,
        name=path.stem,
        tasks_of=need["tasks_of"],
        methods_=need["rules"],
        batch_sizes=need["sizes"],
        held_sizes=need["held"],
        neuron_groups=need["neuron_groups"],
        device=torch.device("cpu"),
    )
    if link is not None:
        table["link"] = link["link"]
    calibrate.write(table, path)
    return table


def together(tables: list[dict]) -> dict:
    """One profile of several legs' calibrations at the same threads: the first's device and
    link, every leg's timed workloads."""
    return {**tables[0], "workloads": [w for t in tables for w in t.get("workloads", [])]}


def measured(cfgs: list[RunConfig]) -> dict[str, float]:
    """Each done run's measured training seconds, by run id."""
    return {
        cfg.run_id: plan.measured_train_seconds(cfg)
        for cfg in cfgs
        if plan.state_of(cfg)[0] == "done"
    }


def check(cfgs_of_round, rounds: int, out: Path, progress) -> pd.DataFrame:
    """Calibrate and run ``rounds`` times, leg by leg (``legs``); one row per run: its
    forecast on the rounds' calibrations merged (the plan's price), its median measured
    seconds, and the median over rounds of its measured / forecast, each priced on the
    calibration of its own leg in its own round (taken a minute before it)."""
    first = cfgs_of_round(0)
    threads = {False: torch.get_num_threads(), True: prepare.threads_per_rank(_a_rank_run(first))}
    tables: dict[bool, list[dict]] = {False: [], True: []}  # per round, at each threads
    seconds, ratios = {}, {}
    for r in range(rounds):
        cfgs, link, own = cfgs_of_round(r), None, {False: [], True: []}
        for name, runs in legs(cfgs):
            ranked = runs[0].executor in LAUNCHED
            progress(f"round {r + 1}/{rounds}: calibrating for {len(runs)} runs ({name})")
            table = calibrate_leg(runs, threads[ranked], link, Path(cfgs[0].out) / f"{name}.toml")
            link = link or table
            own[ranked].append(table)
            progress(f"round {r + 1}/{rounds}: training {len(runs)} runs ({name})")
            tally = sweep.run_sweep(runs, progress=False)
            if tally.failed:
                progress(f"round {r + 1}/{rounds}: {tally.line()}")
            profile = profiles.parse(table, name)
            done = measured(runs)
            for cfg in (c for c in runs if c.run_id in done):
                value = done[cfg.run_id]
                seconds.setdefault(cfg.run_id, []).append(value)
                ratios.setdefault(cfg.run_id, []).append(value / plan.priced(cfg, profile)[0])
        for ranked, found in own.items():
            if found:
                tables[ranked].append(together(found))
    merged = []
    for ranked, name in ((False, "here"), (True, "here-rank")):
        if tables[ranked]:
            table = calibrate.merge(tables[ranked])
            table["profile"] = {**table["profile"], "name": name}
            calibrate.write(table, out / f"{name}.toml")
            merged.append(profiles.parse(table, name))
    rows = []
    for cfg in first:
        profile = plan.profile_for(cfg, merged)
        train, _ = plan.priced(cfg, profile)
        values, paired = seconds.get(cfg.run_id, []), ratios.get(cfg.run_id, [])
        ratio = statistics.median(paired) if paired else float("nan")
        rows.append(
            {
                "run_id": cfg.run_id,
                "method": cfg.method,
                "executor": cfg.executor,
                "profile": profile.name,
                "rounds": len(values),
                "forecast_train_s": train,
                "measured_train_s": statistics.median(values) if values else float("nan"),
                "round_ratios": " ".join(f"{v:.3f}" for v in paired),
                "measured_over_forecast": ratio,
                "within": BAND[0] <= ratio <= BAND[1],
            }
        )
    return pd.DataFrame(rows)


def _a_rank_run(cfgs: list[RunConfig]) -> RunConfig:
    ranked = [cfg for cfg in cfgs if cfg.executor in LAUNCHED]
    return ranked[0] if ranked else RunConfig(method=methods.reference(), executor="ddp", workers=2)


@click.command()
@click.option("--spec", default="bench/experiments/table2.toml", show_default=True)
@click.option("--preset", default="smoke", show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--out", default="results/plan-check", show_default=True, help="Results folder.")
@click.option("--data-dir", default=None, envvar="LCBENCH_DATA")
def main(spec, preset, rounds, out, data_dir):
    """Calibrate, run the preset's grid and price it, ROUNDS times; print each run's median
    measured / forecast training time and how many lie within 0.85-1.15."""
    folder = Path(out)

    def cfgs_of_round(r: int) -> list[RunConfig]:
        return sweep.load_spec(spec, preset, out=str(folder / f"round-{r}"), data_dir=data_dir)

    try:
        check_writable(folder / "plan-check.csv")  # before minutes of work, not after
        frame = check(cfgs_of_round, rounds, folder, lambda text: click.echo(text, err=True))
    except UsageError as e:
        click.echo(f"plan_check: {e}", err=True)
        sys.exit(2)
    write_atomic(folder / "plan-check.csv", frame.to_csv(index=False))
    shown = frame.drop(columns=["run_id"]).assign(run=frame.run_id.str.slice(0, 44))
    click.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    ratios = frame.measured_over_forecast
    click.echo(
        f"{int(frame.within.sum())} of {len(frame)} runs within {BAND[0]}-{BAND[1]} "
        f"(median {ratios.median():.2f}, {ratios.min():.2f} to {ratios.max():.2f}); "
        f"wrote {folder / 'plan-check.csv'}"
    )


if __name__ == "__main__":
    main()
