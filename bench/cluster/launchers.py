"""A sweep's runs as cluster jobs through submitit: SLURM, or the same jobs as local processes.

One job per run left to do (``--array-parallelism N``: one job array per shape of job, at most
N of its runs at once). A job asks for the run's devices (``plan.devices``) as GPUs on one
node, or as nodes x ``--gpus-per-node`` where the run needs more than a node holds; one task
per node, which starts the run:

- on one node, as ``lcbench sweep`` would (``sweep.run_sweep`` of that run: its claim, its
  checkpoints, torchrun on the node for a run on ranks);
- on several, torchrun on every node, the rendezvous from SLURM's environment (submitit's
  ``JobEnvironment``: the first host of the job's node list, this node's index, the number
  of nodes; the port derived from the job id, so that every node agrees), the entry point
  reading the run's config written beside its run.json at submission.

A job that times out or is preempted is requeued (submitit's ``Checkpointable``: SLURM signals
USR2 90 s before the end, submitit requeues the job) and the run continues from its own
newest checkpoint. The time limit asked for is the plan's forecast x ``plan.TIME_MARGIN``
plus ``plan.START_UP_MIN`` minutes, unless ``--time-limit`` says otherwise.
"""

from __future__ import annotations

import math
import subprocess
import sys
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path

import submitit
import tomllib

from .. import prepare, sweep
from ..config import RunConfig, UsageError
from ..executors.launch import ENTRY, write_config
from . import plan

LAUNCHERS = ("slurm", "local")
SUBMITIT_FOLDER = ".submitit"  # under OUT/EXPERIMENT: the jobs' scripts, pickles and logs
CONFIG_NAME = "job-config.json"  # beside run.json: the resolved run a multi-node job reads


@dataclass
class Cluster:
    """Where and how the jobs are asked for (options, or a spec's ``[launcher]`` table)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: int | None = None  # minutes; None: the plan's forecast x margin + start-up
    gpus_per_node: int = 8
    cpus_per_task: int | None = None
    array_parallelism: int | None = None
    sbatch: dict = field(default_factory=dict)  # extra sbatch options, e.g. {"constraint": "h100"}
    setup: list = field(default_factory=list)  # shell lines run before the job, e.g. a module load


def load_cluster(path) -> Cluster:
    """The spec's ``[launcher]`` table as a Cluster (defaults where it is silent), checked."""
    with open(path, "rb") as f:
        launcher = sweep.table(tomllib.load(f), "launcher", "")
    hints = typing.get_type_hints(Cluster)
    sweep.check_keys(launcher, list(hints), f"{path}: [launcher]")
    for key, value in launcher.items():
        if not sweep.fits(value, hints[key]):
            raise UsageError(
                f"{path}: [launcher] {key} must be {sweep.type_name(hints[key])}, got {value!r}"
            )
    return Cluster(**launcher)


def shape(cfg: RunConfig, cluster: Cluster) -> tuple[int, int]:
    """``(nodes, GPUs per node)`` of the run's job; UsageError where its devices do not split
    evenly over whole nodes."""
    need = plan.devices(cfg)
    nodes = math.ceil(need / cluster.gpus_per_node)
    if need % nodes:
        raise UsageError(
            f"run {cfg.run_id} needs {need} GPUs, which do not split evenly over {nodes} nodes "
            f"of {cluster.gpus_per_node} (--gpus-per-node)"
        )
    return nodes, need // nodes


def master_port(job_id: str) -> int:
    """The rendezvous port of a multi-node job, the same on every node (from its job id)."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def torchrun_argv(cfg: RunConfig, config_path: Path, env) -> list[str]:
    """The torchrun command of one node of a multi-node run (``env``: submitit's
    JobEnvironment, or anything with ``num_nodes``, ``node``, ``hostnames``, ``job_id``)."""
    per_node = plan.devices(cfg) // env.num_nodes
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(env.num_nodes),
        "--nproc-per-node",
        str(per_node),
        "--node-rank",
        str(env.node),
        "--master-addr",
        env.hostnames[0],
        "--master-port",
        str(master_port(env.job_id)),
        "--max-restarts",
        str(cfg.max_restarts),
        "-m",
        ENTRY[cfg.executor],
        str(config_path),
    ]


class RunJob(submitit.helpers.Checkpointable):
    """One run as a job; requeued as it is (``checkpoint``), it continues from the run's own
    checkpoints."""

    def __init__(self, cfg: RunConfig, config_path: str | None = None):
        self.cfg, self.config_path = cfg, config_path

    def __call__(self) -> str:
        env = submitit.JobEnvironment()
        if env.num_nodes > 1:
            argv = torchrun_argv(self.cfg, Path(self.config_path), env)
            done = subprocess.run(argv, check=False)
            if done.returncode:
                raise RuntimeError(f"torchrun on node {env.node} exited {done.returncode}")
            return "ok"
        tally = sweep.run_sweep([self.cfg], progress=False)
        return "ok" if tally.ok or tally.skipped else "failed" if tally.failed else "passed"


def executor(kind: str, folder: Path, cluster: Cluster, nodes: int, gpus: int, minutes: int):
    """A submitit executor asking for ``nodes`` x ``gpus`` for ``minutes``."""
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster=kind)
    params = dict(timeout_min=minutes, nodes=nodes, tasks_per_node=1)
    if kind == "slurm":
        params.update(gpus_per_node=gpus)
        extra = {
            "slurm_partition": cluster.partition,
            "slurm_account": cluster.account,
            "slurm_qos": cluster.qos,
            "cpus_per_task": cluster.cpus_per_task,
            "slurm_array_parallelism": cluster.array_parallelism,
            "slurm_setup": cluster.setup or None,
        }
        params.update({k: v for k, v in extra.items() if v is not None})
        if cluster.sbatch:
            params["slurm_additional_parameters"] = dict(cluster.sbatch)
    ex.update_parameters(**params)
    return ex


def submit(
    cfgs: list[RunConfig], kind: str, cluster: Cluster, profiles
) -> list[tuple[RunConfig, submitit.Job]]:
    """Submit a job for every run not done and not running, its time limit its forecast on
    ``profiles`` (``plan.profile_for``); the jobs in submission order."""
    if kind not in LAUNCHERS:
        raise UsageError(f"unknown launcher '{kind}' (choose from {', '.join(LAUNCHERS)})")
    todo = [e for e in plan.entries(cfgs) if e.state not in ("done", "running")]
    if kind == "local":  # the local executor runs on this machine's device, one node
        cluster = replace(
            cluster, gpus_per_node=max(plan.devices(e.cfg) for e in todo) if todo else 1
        )
    groups: dict[tuple, list] = {}
    for entry in todo:
        nodes, gpus = shape(entry.cfg, cluster)
        seconds = plan.run_seconds(entry.cfg, plan.profile_for(entry.cfg, profiles))
        minutes = cluster.time_limit or plan.time_limit_min(seconds)
        groups.setdefault((nodes, gpus), []).append((entry.cfg, minutes))
    if not todo:
        return []
    folder = Path(todo[0].cfg.out) / todo[0].cfg.experiment / SUBMITIT_FOLDER
    jobs = []
    try:
        for (nodes, gpus), runs in groups.items():
            jobs += _submit_group(kind, folder, cluster, nodes, gpus, runs)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:  # no SLURM, sbatch refused
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise UsageError(
            f"--launcher {kind}: {lines[-1].strip()} ({len(jobs)} jobs were submitted before)"
        ) from None
    return jobs


def _submit_group(kind, folder, cluster, nodes, gpus, runs):
    """Submit the ``runs`` (``(cfg, minutes)``) that ask for ``nodes`` x ``gpus``, for the
    longest of their minutes; the jobs in order."""
    ex = executor(kind, folder, cluster, nodes, gpus, max(m for _, m in runs))
    calls = [RunJob(cfg, str(job_config(cfg)) if nodes > 1 else None) for cfg, _ in runs]
    if cluster.array_parallelism and kind == "slurm":
        with ex.batch():
            submitted = [ex.submit(call) for call in calls]
    else:
        submitted = [ex.submit(call) for call in calls]
    return [(cfg, job) for (cfg, _), job in zip(runs, submitted)]


def job_config(cfg: RunConfig) -> Path:
    """The resolved run written beside its run.json, for the nodes of a multi-node job."""
    folder = prepare.run_folder(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_NAME
    write_config(path, cfg, prepare.prepare(cfg, data=False).cuts)
    return path


def wait(jobs, echo=print) -> None:
    """Wait for every job; one line per job as it ends."""
    for cfg, job in jobs:
        try:
            outcome = job.result()
        except (
            Exception
        ) as e:  # submitit's FailedJobError and the like: the run's own record says more
            outcome = f"failed ({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__})"
        echo(f"job {job.job_id}: {outcome:<8} {cfg.run_id}")
