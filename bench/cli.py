"""The ``lcbench`` command line."""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import replace
from pathlib import Path

import click

import methods

from . import models, prepare, runner
from . import sweep as sweeps
from .cluster import claims
from .cluster import plan as plans
from .config import RunConfig, UsageError, ranks
from .data import tasks
from .executors import launch
from .records import RunFailed, check_writable


def parse_options(pairs: tuple[str, ...]) -> dict:
    """``key=value`` pairs; values parsed as int, float, bool or left as strings."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option expects key=value, got '{pair}'")
        lowered = text.lower()
        if lowered in ("true", "false"):
            out[key] = lowered == "true"
            continue
        for cast in (int, float):
            try:
                out[key] = cast(text)
                break
            except ValueError:
                pass
        else:
            out[key] = text
    return out


def parse_ints(text: str | None, option: str) -> list[int] | None:
    """Comma-separated integers (cut points, milestones)."""
    if text is None:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise UsageError(f"{option} expects comma-separated integers, got '{text}'") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="lcbench")
def cli():
    """Decoupled training (LC, DGL, DNI, cDNI, GN-DGL) against backprop, measured."""


#: RunConfig fields given as comma-separated integers on the command line
INT_LISTS = ("lr_milestones", "cuts")


def run_setting_options(command):
    """One option of `lcbench run` per RunConfig field: its name, type, default and help
    from the field (the defaults are written once, in bench/config.py)."""
    hints = typing.get_type_hints(RunConfig)
    for f in reversed(dataclasses.fields(RunConfig)):
        meta = f.metadata
        if meta.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        decls = [flag, *([meta["short"]] if "short" in meta else []), f.name]
        kwargs = {"help": meta.get("help", ""), "envvar": meta.get("envvar")}
        required = f.default is dataclasses.MISSING
        if kind is bool:
            decls[0] = f"{flag}/--no-{flag[2:]}"
            kwargs.update(default=f.default, show_default=True)
        else:
            if "choices" in meta:
                kwargs["type"] = click.Choice(meta["choices"])
            elif kind in (int, float):
                kwargs["type"] = kind
            if f.name in INT_LISTS:
                kwargs["metavar"] = "N1,N2,..."
            kwargs.update(required=required, metavar=meta.get("metavar", kwargs.get("metavar")))
            if not required:
                kwargs.update(default=f.default, show_default=f.default is not None)
        command = click.option(*decls, **kwargs)(command)
    return command


@cli.command()
@run_setting_options
@click.option(
    "--neuron-groups",
    "-G",
    type=int,
    default=None,
    help="GN-DGL: neuron groups per layer group (default 2; the same as -o neuron_groups=G).",
)
@click.option(
    "--option",
    "-o",
    "option_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Option of the rule's local module, e.g. critic_lr=1e-3 (see `lcbench list`).",
)
@click.option(
    "--emit-config",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write the resolved run (config and cut points) to this file and stop: what "
    "`torchrun ... -m bench.executors.distributed FILE` (ddp: bench.executors.ddp) "
    "takes on several nodes.",
)
@click.option(
    "--no-checkpoint",
    is_flag=True,
    help="Neither write nor continue from checkpoints (the run starts over).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def run(neuron_groups, option_pairs, emit_config, no_checkpoint, quiet, **settings):
    """Train one network with one learning rule; write metrics.csv and run.json.

    A run killed or stopped (SIGTERM, Ctrl-C) continues from its last checkpoint when the
    same command is run again: no epoch repeated, the same numbers as an uninterrupted run
    on the sequential executor. A checkpoint that is not this run's is refused."""
    options = parse_options(option_pairs)
    if neuron_groups is not None:
        options["neuron_groups"] = neuron_groups
    for name in INT_LISTS:
        settings[name] = parse_ints(settings[name], "--" + name.replace("_", "-"))
    if no_checkpoint:
        settings["checkpoint_every"] = 0
    cfg = RunConfig(options=options, **settings)
    prep = prepare.prepare(cfg)
    if emit_config:
        try:
            launch.write_config(emit_config, prep.cfg, prep.cuts)
        except OSError as e:
            raise UsageError(
                f"cannot write --emit-config {emit_config}: {e.strerror or e}"
            ) from None
        entry = launch.ENTRY.get(prep.cfg.executor)
        click.echo(
            f"wrote {emit_config}: {ranks(prep.cfg)} ranks" + (f" of -m {entry}" if entry else "")
        )
        return
    try:
        with sweeps.stop_on_signals():
            record = runner.execute(prep, progress=not quiet)
    except sweeps.Interrupted as e:
        again = (
            "continue from its last checkpoint" if prep.cfg.checkpoint_every else "start it over"
        )
        click.echo(f"lcbench: run stopped by {e}; run the same command again to {again}", err=True)
        sys.exit(e.exit_code)
    if not quiet:
        click.echo(summary(record))
    click.echo(f"wrote {record.folder}")


def summary(record) -> str:
    """The last epoch's test figures, one line per (sub-)model."""
    rows = [r for r in record.rows if r["metric"] in ("test_acc", "test_loss")]
    if not rows:
        return "no epochs trained"
    last = max(r["epoch"] for r in rows)
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["epoch"] == last:
            table.setdefault(r["stage"], {})[r["metric"]] = r["value"]
    seconds = sum(r["value"] for r in record.rows if r["metric"] == "epoch_time_s")
    lines = [
        f"{record.info['run_id']}  ({last} epochs, {seconds:.1f} s training)",
        f"  {'output':<14}{'test_acc':>10}{'test_loss':>11}",
    ]
    for stage in sorted(table, key=lambda s: (s == "", s.zfill(4))):
        name = "final" if stage == "" else f"sub-model {stage}"
        lines.append(
            f"  {name:<14}{table[stage]['test_acc']:>10.4f}{table[stage]['test_loss']:>11.4f}"
        )
    return "\n".join(lines)


@cli.command()
@click.argument("spec", metavar="SPEC.toml")
@click.option("--preset", "-p", default=None, help="Lay the spec's [presets.NAME] over it.")
@click.option(
    "--out",
    default="results",
    show_default=True,
    help="Results folder: runs go to OUT/NAME/RUN_ID/.",
)
@click.option(
    "--data-dir",
    default=None,
    envvar="LCBENCH_DATA",
    help="Where data sets are looked for first [env LCBENCH_DATA].",
)
@click.option(
    "--tensorboard",
    default=None,
    metavar="DIR",
    help="Also write every row, as it is measured, to TensorBoard event files under "
    "DIR/RUN_ID (per stage where it has one; the config as hparams at the end); "
    "needs `pip install 'lcbench[tensorboard]'`.",
)
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="No progress bars (the line per finished run and the tally remain).",
)
@click.option(
    "--plan",
    "show_plan",
    is_flag=True,
    help="Run nothing: each run's state and forecast price (devices, wall-clock, "
    "device-hours) to OUT/NAME/plan.csv, and the totals.",
)
@click.option(
    "--status",
    "show_status",
    is_flag=True,
    help="Run nothing: what is done, running (claimed), failed (its error), partly done "
    "(its checkpoint's epoch) and left.",
)
@click.option(
    "--profile",
    "profile_names",
    multiple=True,
    default=(plans.DEFAULT_PROFILE,),
    show_default=True,
    help="Device profile the plan prices runs on (a shipped name or a TOML path; see "
    "`lcbench scale --help`). Repeatable: each run is priced on the first calibrated at its "
    "threads per process (CPU calibrations), else the first.",
)
@click.option(
    "--devices",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Devices the plan's total wall-clock is scheduled on.",
)
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="Run only every N-th run of the grid from the I-th (0 <= I < N), without claims: "
    "for file systems without locks.",
)
@click.option(
    "--launcher",
    type=click.Choice(["slurm", "local"]),
    default=None,
    help="Submit a job per run left (submitit) instead of running here: slurm, or local "
    "(the same jobs as processes on this machine).",
)
@click.option("--wait", is_flag=True, help="With --launcher: wait for the jobs to end.")
@click.option("--partition", default=None, help="SLURM partition [launcher] partition.")
@click.option("--account", default=None, help="SLURM account [launcher] account.")
@click.option("--qos", default=None, help="SLURM quality of service [launcher] qos.")
@click.option(
    "--time-limit",
    type=click.IntRange(min=1),
    default=None,
    metavar="MIN",
    help=f"Minutes per job [launcher] time_limit (default: the plan's forecast x "
    f"{plans.TIME_MARGIN} + {plans.START_UP_MIN}).",
)
@click.option(
    "--gpus-per-node",
    type=click.IntRange(min=1),
    default=None,
    help="GPUs a node has [launcher] gpus_per_node (default 8): a run needing more spans nodes.",
)
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=None)
@click.option(
    "--array-parallelism",
    type=click.IntRange(min=1),
    default=None,
    help="Submit job arrays, at most N of their runs at once.",
)
@click.option(
    "--sbatch",
    "sbatch_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="Extra sbatch option, repeatable, e.g. --sbatch constraint=h100 [launcher] sbatch.",
)
@click.pass_context
def sweep(
    ctx,
    spec,
    preset,
    out,
    data_dir,
    tensorboard,
    quiet,
    show_plan,
    show_status,
    profile_names,
    devices,
    shard,
    launcher,
    wait,
    partition,
    account,
    qos,
    time_limit,
    gpus_per_node,
    cpus_per_task,
    array_parallelism,
    sbatch_items,
):
    """Run the grid of an experiment spec, skipping runs already ok (so it resumes).

    \b
    SPEC.toml (see bench/experiments/example.toml):
      [experiment]           name = "NAME": runs go to OUT/NAME/RUN_ID/ (default: file name)
      [grid]                 KEY = [v1, v2, ...]: the runs are the cartesian product;
                             KEY: method, task, model, groups, seed or any other field
                             of `lcbench run` (epochs, lr, batch_size, limit_train, ...)
      [grid.options.METHOD]  OPTION = [v1, v2, ...]: a method option as a grid axis
      [settings]             KEY = value: shared by every run
      [options.METHOD]       OPTION = value (see `lcbench list --methods`)
      [presets.NAME]         a partial spec (experiment, grid, settings, options) laid
                             over the rest by --preset NAME; a key it sets replaces
                             the base's value, in [grid] or [settings] alike
      Not spec keys: experiment, out, data_dir (the name, --out and --data-dir decide).

    A failed, diverged or invalid run is recorded (run.json) and the sweep goes on; the
    exit status is then 1. Ctrl-C / SIGTERM stop it cleanly (exit 130 / 143); run the
    same command again to resume (a stopped run continues from its last checkpoint).
    A malformed spec: one line and exit 2, nothing run.
    """
    cfgs = sweeps.load_spec(spec, preset, out=out, data_dir=data_dir)
    if tensorboard:
        cfgs = [replace(cfg, tensorboard=tensorboard).validated() for cfg in cfgs]
    try:
        cfgs = claims.shard(cfgs, shard)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if show_plan or show_status:
        ctx.exit(report_plan(cfgs, profile_names if show_plan else (), devices))
    if launcher is not None:
        from .cluster import launchers  # submitit, where jobs are submitted

        cluster = launchers.load_cluster(spec)
        given = dict(
            partition=partition,
            account=account,
            qos=qos,
            time_limit=time_limit,
            gpus_per_node=gpus_per_node,
            cpus_per_task=cpus_per_task,
            array_parallelism=array_parallelism,
        )
        cluster = replace(cluster, **{k: v for k, v in given.items() if v is not None})
        cluster.sbatch = {**cluster.sbatch, **parse_options(sbatch_items)}
        jobs = launchers.submit(cfgs, launcher, cluster, [_profile(p) for p in profile_names])
        for cfg, job in jobs:
            click.echo(f"submitted job {job.job_id}: {cfg.run_id}")
        click.echo(f"sweep {cfgs[0].experiment}: {len(jobs)} jobs submitted ({launcher})")
        if not wait:
            click.echo(f"follow them with: lcbench sweep {spec} --status")
            ctx.exit(0)
        launchers.wait(jobs, echo=click.echo)
        ctx.exit(report_plan(cfgs, (), devices, fail_on_failed=True))
    try:
        tally = sweeps.run_sweep(cfgs, progress=not quiet, locks=shard is None)
    except sweeps.Interrupted as e:
        click.echo(
            f"lcbench: sweep stopped by {e} ({e.tally.line()}); run it again to resume", err=True
        )
        ctx.exit(e.exit_code)
    click.echo(f"sweep {cfgs[0].experiment}: {tally.line()}")
    ctx.exit(1 if tally.failed else 0)


def report_plan(cfgs, profile_names=(), devices: int = 8, fail_on_failed=False) -> int:
    """Print (and, with profiles, write OUT/NAME/plan.csv) the grid's states and prices;
    the exit status: 1 where runs failed and ``fail_on_failed``, else 0."""
    profiles_ = [_profile(name) for name in profile_names]
    try:
        items = plans.entries(cfgs, profiles_)
    except ValueError as e:  # a run the forecast cannot price
        raise UsageError(str(e)) from None
    import pandas as pd

    table = plans.frame(items, priced=bool(profiles_))
    hidden = (
        "task",
        "model",
        "groups",
        "executor",
        *(["profile"] if len(profiles_) < 2 else []),
        "forecast_train_s",
        "measured_train_s",
    )
    shown = [c for c in table.columns if c not in hidden]
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        click.echo(table[shown].to_string(index=False, float_format=lambda v: f"{v:,.2f}"))
    if profiles_:
        path = Path(cfgs[0].out) / cfgs[0].experiment / "plan.csv"
        try:
            plans.write(items, path)
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
        names = ", ".join(p.name for p in profiles_)
        click.echo(f"\non {names}: " + plans.totals(items, devices))
        click.echo(f"wrote {path}")
    else:
        counts = ", ".join(f"{sum(e.state == s for e in items)} {s}" for s in plans.STATES)
        click.echo(f"\n{len(items)} runs: {counts}")
    return 1 if fail_on_failed and any(e.state == "failed" for e in items) else 0


@cli.command()
@click.argument("name", metavar="NAME")
@click.argument("results", metavar="RESULTS_DIR", type=click.Path(file_okay=False))
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False),
    help="Where NAME.md, NAME.tex and NAME.csv go (default: RESULTS_DIR).",
)
def table(name, results, out):
    """Our runs beside the published numbers (bench/references/NAME.csv), with the delta,
    time per epoch, speedup against BP on one worker and against data-parallel BP (DDP) on the
    same ranks, and peak memory per device beside BP's and DDP's, as Markdown (printed), LaTeX
    and CSV. Runs are read from RESULTS_DIR/NAME/ (or RESULTS_DIR)."""
    from .report import table as tables

    if not (tables.REFERENCES / f"{name}.csv").is_file():
        known = ", ".join(p.stem for p in sorted(tables.REFERENCES.glob("*.csv")))
        raise UsageError(f"no table '{name}' (choose from {known})")
    if not Path(results).is_dir():
        raise UsageError(f"no results folder {results}")
    try:
        md, paths = tables.write(name, Path(results), Path(out) if out else None)
    except OSError as e:
        raise UsageError(f"cannot write the table: {e.strerror or e}") from None
    click.echo(md)
    click.echo("wrote " + ", ".join(map(str, paths)))


@cli.command()
@click.argument("results", metavar="RESULTS_DIR", type=click.Path(file_okay=False))
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False),
    help="Where report-EXPERIMENT.html goes (default: RESULTS_DIR).",
)
def report(results, out):
    """One self-contained HTML page per experiment under RESULTS_DIR (report-NAME.html): the
    table with the published numbers beside ours, every figure, each run's status and
    provenance, failed runs with their one-line error. Readable offline in any browser."""
    from .report import page

    if not Path(results).is_dir():
        raise UsageError(f"no results folder {results}")
    try:
        paths = page.write(Path(results), Path(out) if out else None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot write the report: {e.strerror or e}") from None
    click.echo("wrote " + ", ".join(map(str, paths)))


@cli.command()
@click.argument("results", metavar="RESULTS_DIR", type=click.Path(file_okay=False))
@click.option(
    "--out",
    default="figures",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the figures go (PNG and PDF).",
)
def plot(results, out):
    """Paper-style figures of the runs under RESULTS_DIR: accuracy against epoch, time per
    epoch and speedup, memory per device and per stage, accuracy against speedup, sub-model
    accuracy and progressive inference."""
    from .report import plots

    if not Path(results).is_dir():
        raise UsageError(f"no results folder {results}")
    try:
        paths = plots.plot_all(Path(results), Path(out))
    except ValueError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot write the figures: {e.strerror or e}") from None
    click.echo(f"wrote {len(paths)} files to {out}: " + ", ".join(p.name for p in paths))


@cli.command()
@click.option(
    "--model",
    "model_names",
    multiple=True,
    default=("resnet20",),
    show_default=True,
    metavar="MODEL[@TASK]",
    help="Model whose blocks are timed (repeatable), on --task or the TASK named after @.",
)
@click.option(
    "--task",
    "-t",
    default="fashion-mnist",
    show_default=True,
    help="Task: " + ", ".join(tasks.TASKS),
)
@click.option(
    "--method",
    "rules",
    multiple=True,
    help="Rule whose local modules are timed (repeatable; default: every rule with one).",
)
@click.option(
    "--batch-sizes",
    default="32,64,128",
    show_default=True,
    metavar="N1,N2,...",
    help="Per-device batch sizes to time at (the forecast interpolates between them).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--threads",
    type=int,
    default=None,
    help="CPU threads while timing (as a rank of a run would have them).",
)
@click.option("--precision", default="fp32", show_default=True, help="fp32, tf32 or bf16.")
@click.option(
    "--link",
    "link_from",
    default="measure",
    show_default=True,
    help="measure: a ping-pong and an all-reduce on two ranks (gloo on the CPU, NCCL "
    "on two GPUs); or the name of a shipped profile whose link to keep (one GPU).",
)
@click.option(
    "--data-dir",
    default=None,
    envvar="LCBENCH_DATA",
    help="Where data sets are looked for first [env LCBENCH_DATA].",
)
@click.option("--name", default=None, help="The profile's name (default: the file's stem).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The profile (TOML).")
def calibrate(
    model_names,
    task,
    rules,
    batch_sizes,
    device,
    threads,
    precision,
    link_from,
    data_dir,
    name,
    out,
):
    """Measure this machine for the forecast and write it as a profile: every block of each
    model timed in place (forward, backward, update) at a few batch sizes, each rule's local
    module, the input pipeline, the achieved FLOP/s and overhead fitted to them, and the link
    (latency, bandwidth, all-reduce) with the slowdown of two workers sharing the machine.
    `lcbench scale --profile FILE` forecasts from it."""
    from .forecast import calibrate as calibration
    from .forecast import profiles

    sizes = parse_ints(batch_sizes, "--batch-sizes")
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-sizes must be positive integers, got '{batch_sizes}'")
    if task not in tasks.TASKS:
        raise UsageError(f"unknown task '{task}' (choose from {', '.join(tasks.TASKS)})")
    tasks_of = dict(m.split("@", 1) for m in model_names if "@" in m)
    model_names = [m.split("@", 1)[0] for m in model_names]
    unknown = [m for m in model_names if m not in models.MODELS]
    if unknown:
        raise UsageError(f"unknown model '{unknown[0]}' (choose from {', '.join(models.MODELS)})")
    for t in tasks_of.values():
        if t not in tasks.TASKS:
            raise UsageError(f"unknown task '{t}' (choose from {', '.join(tasks.TASKS)})")
    try:
        rules = [methods.resolve(r).name for r in rules] or [
            m.name for m in methods.METHODS.values() if m.local_module
        ]
    except ValueError as e:
        raise UsageError(str(e)) from None
    if precision not in profiles.PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(profiles.PRECISIONS)}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    dev = prepare.resolve_device(device)
    kept = None
    if link_from != "measure":
        kept = _profile(link_from).link
    elif dev.type == "cuda" and __import__("torch").cuda.device_count() < 2:
        raise UsageError(
            "--link measure needs two GPUs on this machine; name a shipped profile "
            "whose link to keep instead (--link h100-sxm-nvlink, ...)"
        )
    check_writable(Path(out))
    try:
        profile = calibration.calibrate(
            model_names,
            task,
            tasks_of=tasks_of,
            methods_=[r for r in rules if methods.resolve(r).local_module],
            batch_sizes=sizes,
            device=dev,
            threads=threads,
            precision=precision,
            link=kept is None,
            data_dir=data_dir,
            name=name or Path(out).stem,
            progress=lambda text: click.echo(text, err=True),
        )
    except tasks.DataUnavailable as e:
        raise UsageError(str(e)) from None
    if kept is not None:
        profile["link"] = {
            "name": kept.name,
            "latency_s": kept.latency_s,
            "bandwidth_bytes_per_s": kept.bandwidth,
            "efficiency": 1.0,
            "source": f"kept from profile {link_from}: {kept.source}",
        }
    calibration.write(profile, Path(out))
    device_ = profile["device"]
    click.echo(
        f"wrote {out}: {device_['name']}, {device_['achieved_flops'][precision] / 1e9:.1f} "
        f"GFLOP/s achieved, {1e6 * device_['overhead_s']:.0f} us per block per step, a step's "
        f"time varying by {device_['step_cv']:.3f} of itself; link "
        f"{1e6 * profile['link']['latency_s']:.1f} us + s / "
        f"{profile['link']['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s"
    )


def _profile(name: str):
    from .forecast import profiles

    try:
        return profiles.load(name)
    except profiles.ProfileError as e:
        raise UsageError(str(e)) from None


@cli.command()
@click.argument("model_names", metavar="[MODEL]...", nargs=-1)
@click.option("--task", "-t", default=None, help="Task (default: the run's, else cifar10).")
@click.option(
    "--run",
    "run_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Take the model, task, batch, rule options and precision from a run folder.",
)
@click.option(
    "--results",
    default=None,
    type=click.Path(file_okay=False),
    help="A results folder: every model in it (unless MODELs are named), and their "
    "runs' learning curves for the time to 95% and 99% of BP's accuracy.",
)
@click.option(
    "--profile",
    "profile_names",
    multiple=True,
    help="A shipped profile's name or a profile file (repeatable; default: every shipped profile).",
)
@click.option(
    "--workers",
    default=",".join(map(str, (2, 4, 8, 16, 32, 64))),
    show_default=True,
    metavar="K1,K2,...",
    help="Numbers of workers.",
)
@click.option(
    "--rules",
    default=None,
    help="The contenders set against DDP (and BP on one device), comma-separated "
    "(default: every rule whose workers run side by side).",
)
@click.option(
    "--batch-size",
    "-b",
    type=int,
    default=None,
    help="Global batch (default: the run's, else 128).",
)
@click.option(
    "--precision", default=None, help="fp32, tf32 or bf16 (default: the run's, else fp32)."
)
@click.option(
    "--stages",
    type=int,
    default=None,
    help="Pin the layer groups S of pipelined BP and the decoupled rules (default: "
    "the best for each K).",
)
@click.option(
    "--out",
    default="results/scale",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where scale.csv, scale.md and the maps go.",
)
@click.option("--no-maps", is_flag=True, help="Only the CSV and the summary.")
def scale(
    model_names,
    task,
    run_dir,
    results,
    profile_names,
    workers,
    rules,
    batch_size,
    precision,
    stages,
    out,
    no_maps,
):
    """Forecast each rule against data-parallel BP (DDP) and pipelined BP on K workers over
    links of every bandwidth, from profiles of the hardware (shipped: data-sheet peaks at a
    stated efficiency; or measured by `lcbench calibrate`): scale.csv (a row per rule, model,
    profile, K and bandwidth: seconds per batch, speedups, memory per device, fits), scale.md
    (per rule and K, the bandwidth below which it beats DDP and whether it ever beats
    pipelined BP, and the assumptions) and a map per model and profile."""
    from .forecast import profiles
    from .forecast import scale as scaling
    from .records import read_json

    ks = parse_ints(workers, "--workers")
    if not ks or min(ks) < 1:
        raise UsageError(f"--workers must be positive integers, got '{workers}'")
    known = scaling.parallel_rules()
    chosen = [r.strip() for r in (rules or ",".join(known)).split(",") if r.strip()]
    bad = [r for r in chosen if r not in known]
    if bad:
        raise UsageError(f"unknown rule '{bad[0]}' for --rules (choose from {', '.join(known)})")
    options, pairs = {}, []
    config = {}
    if run_dir:
        info = read_json(Path(run_dir) / "run.json")
        if not isinstance(info, dict) or "config" not in info:
            raise UsageError(f"no run.json in {run_dir}")
        config = info["config"]
        options = dict(config.get("options", {}))
        pairs.append((config["task"], config["model"]))
    task = task or config.get("task")
    for name in model_names:
        pairs.append((task or models.REFERENCE_TASK.get(name, "cifar10"), name))
    if results and not model_names and not run_dir:
        from .report import table

        runs = table.load_runs(Path(results))
        pairs += list(dict.fromkeys(zip(runs["task"], runs["model"])))
    if not pairs:
        raise UsageError("name a MODEL, a --run or a --results folder with runs")
    for t, m in pairs:
        if m not in models.MODELS:
            raise UsageError(f"unknown model '{m}' (choose from {', '.join(models.MODELS)})")
        if t not in tasks.TASKS:
            raise UsageError(f"unknown task '{t}' (choose from {', '.join(tasks.TASKS)})")
    batch_size = batch_size or config.get("batch_size") or 128
    precision = precision or config.get("precision") or "fp32"
    if batch_size < 1 or (stages is not None and stages < 2):
        raise UsageError("--batch-size must be positive and --stages at least 2")
    if precision not in profiles.PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(profiles.PRECISIONS)}")
    chosen_profiles = [_profile(p) for p in (profile_names or profiles.shipped())]
    check_writable(Path(out) / "scale.csv")
    rows = []
    for t, m in pairs:
        for profile in chosen_profiles:
            try:
                rows += scaling.grid(
                    m,
                    t,
                    profile,
                    batch_size=batch_size,
                    workers=ks,
                    rules=chosen,
                    precision=precision,
                    options=options,
                    stages=stages,
                    progress=lambda text: click.echo(text, err=True),
                )
            except profiles.ProfileError as e:
                raise UsageError(str(e)) from None
    if results:
        scaling.with_time_to_accuracy(rows, scaling.time_to_accuracy(results))
    paths = scaling.write(rows, Path(out), maps=not no_maps)
    click.echo(scaling.summary(rows))
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@cli.command(name="list")
@click.option("--methods", "what", flag_value="methods", help="Only the learning rules.")
@click.option("--models", "what", flag_value="models", help="Only the models.")
@click.option("--tasks", "what", flag_value="tasks", help="Only the tasks.")
def list_(what):
    """Show the learning rules (with their options), models and tasks."""
    if what in (None, "methods"):
        click.echo("methods:")
        aliases = {}
        for alias, name in methods.ALIASES.items():
            aliases.setdefault(name, []).append(alias)
        for name, m in methods.METHODS.items():
            extra = f" (also: {', '.join(aliases[name])})" if name in aliases else ""
            click.echo(f"  {name:<9}{m.summary}{extra} [{m.family}]")
            defaults = methods.option_defaults(name)
            if defaults:
                click.echo(
                    "           options: " + ", ".join(f"{k}={v}" for k, v in defaults.items())
                )
            chosen = methods.variant(name, {})
            if chosen:
                click.echo(f"           not published: {chosen} (docs/rules.md)")
    if what in (None, "models"):
        click.echo("models (parameters on the task named):")
        for name in models.MODELS:
            task = models.REFERENCE_TASK[name]
            info = tasks.TASKS[task]
            count = models.parameter_count(name, info.input_shape, info.num_classes)
            click.echo(f"  {name:<14}{count:>13,}  {task}")
    if what in (None, "tasks"):
        click.echo("tasks:")
        for name, info in tasks.TASKS.items():
            shape = "x".join(map(str, info.input_shape))
            click.echo(
                f"  {name:<14}{shape:<10}{info.num_classes:>4} classes  "
                f"default model {info.default_model}"
            )


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input is one line and exit 2; a failed run one line and exit 1."""
    try:
        code = cli.main(args=argv, prog_name="lcbench", standalone_mode=False)
    except (UsageError, click.UsageError) as e:
        message = e.format_message() if isinstance(e, click.ClickException) else str(e)
        click.echo(f"lcbench: error: {message}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"lcbench: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except RunFailed as e:
        click.echo(f"lcbench: {e}", err=True)
        sys.exit(1)
    except (click.Abort, KeyboardInterrupt):
        click.echo("lcbench: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
