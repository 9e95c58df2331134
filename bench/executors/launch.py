"""Starting a run on ranks on this node: torchrun with one process per stage
(``distributed``) or per data-parallel replica (``ddp``).

The parent watches torchrun; when a rank raises or is killed, torchrun stops the others,
and the parent records the run as failed with one line naming the first failed rank.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench.config import RunConfig
from bench.measure.provenance import now
from bench.records import RunFailed, RunRecord, read_json, write_atomic

FAILURE = re.compile(r"^\s*rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", re.M)
#: what a rank raises when a peer died first: never the cause of a failure
PEER_LOST = re.compile(r"closed by peer|reset by peer|broken pipe|remote (worker|process)|"
                       r"connection refused|timed? ?out", re.I)


#: the module each rank of an executor runs (``python -m MODULE CONFIG.json``)
ENTRY = {"distributed": "bench.executors.distributed", "ddp": "bench.executors.ddp"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(cfg: RunConfig, config_path: Path, ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "--monitor-interval", "0.5",
            "-m", ENTRY[cfg.executor], str(config_path)]


def first_failure(folder: Path, log: str) -> str:
    """One line: which rank failed first and why. A rank's own error (its ``.rankN.error``:
    time and message) comes first, earliest first; then a rank killed by a signal (from
    torchrun's failure report); errors caused by a lost peer only where nothing else is
    known."""
    errors = {}
    for path in folder.glob(".rank*.error"):
        stamp, _, message = path.read_text().partition(" ")
        errors[int(path.name[5:-6])] = (float(stamp), message.strip())
    exits = {int(rank): int(code) for rank, code in FAILURE.findall(log)}
    own = sorted((t, r) for r, (t, message) in errors.items() if not PEER_LOST.search(message))
    if own:
        rank = own[0][1]
        return f"rank {rank} failed: {errors[rank][1]}"
    killed = sorted(r for r, code in exits.items() if code < 0 and -code != signal.SIGTERM)
    if killed:
        return f"rank {killed[0]} was killed by {signal.Signals(-exits[killed[0]]).name}"
    if errors:
        rank = min(errors, key=lambda r: errors[r][0])
        return f"rank {rank} failed: {errors[rank][1]}"
    if exits:
        rank = min(exits)
        return f"rank {rank} exited with status {exits[rank]}"
    return "the distributed run failed (see workers.log)"


def stop(proc: subprocess.Popen) -> None:
    """Stop torchrun and every rank it started (they share its process group)."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def write_config(path: Path, cfg: RunConfig, cuts: list[int]) -> None:
    """What every rank reads: the resolved config and the cut points."""
    write_atomic(Path(path), json.dumps({"config": asdict(cfg), "cuts": cuts}, indent=2) + "\n")


def run(cfg: RunConfig, folder: Path, *, ranks: int, threads: int, cuts: list[int],
        progress: bool) -> RunRecord:
    """Run ``cfg`` on ``ranks`` local processes of ``threads`` CPU threads, the model cut at
    ``cuts``; return the record rank 0 wrote."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".rank*.error"):  # an earlier attempt's, not this one's
        stale.unlink()
    with tempfile.TemporaryDirectory(prefix="lcbench-") as tmp:
        config_path = Path(tmp) / "config.json"
        write_config(config_path, cfg, cuts)
        log_path = Path(tmp) / "workers.log"
        env = {**os.environ, "LCBENCH_PROGRESS": "1" if progress else "0",
               "OMP_NUM_THREADS": str(threads)}
        with open(log_path, "w") as log:
            proc = subprocess.Popen(torchrun_command(cfg, config_path, ranks), stdout=None,
                                    stderr=log, env=env, start_new_session=True)
            try:
                code = proc.wait()
            except BaseException:
                stop(proc)
                mark_failed(folder, "interrupted")
                raise
            stop(proc)  # any rank left behind
        text = log_path.read_text(errors="replace")
        if code != 0:
            if folder.exists():
                write_atomic(folder / "workers.log", text)
            reason = first_failure(folder, text)
            mark_failed(folder, reason)
            raise RunFailed(reason)
    return RunRecord.load(folder)


def mark_failed(folder: Path, reason: str) -> None:
    """run.json says ``failed`` with ``reason`` (created if rank 0 never wrote it)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = read_json(folder / "run.json") or {}
    if info.get("status") in ("ok", "diverged"):
        return
    info.update(status="failed", error=reason, ended=now())
    write_atomic(folder / "run.json", json.dumps(info, indent=2, default=str) + "\n")
