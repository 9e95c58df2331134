"""Starting a run on ranks on this node: torchrun with one process per stage
(``distributed``), per data-parallel replica (``ddp``), or the one process of a sequential
run that may be restarted (``sequential`` with ``--max-restarts``).

The parent watches torchrun; when a rank raises or is killed, torchrun stops the others,
and the parent records the run as failed with one line naming the first failed rank. A rank
that stops answering without dying (stopped, stuck in a collective) is noticed by a peer
after ``--rank-timeout`` seconds (the process group's timeout): that peer fails, torchrun
kills the rest, the silent one included, and the line names it.

With ``--max-restarts N`` torchrun's elastic agent starts the ranks again instead, up to N
times; each new attempt continues from the newest checkpoint complete on every rank, and
its rank 0 notes in run.json which rank failed and why (``restart_note``).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from bench.config import RunConfig
from bench.measure.provenance import now
from bench.records import RunFailed, RunRecord, read_json, write_atomic

FAILURE = re.compile(r"^\s*rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", re.M)
#: what a rank raises when a peer died first: never the cause of a failure
PEER_LOST = re.compile(
    r"closed by peer|reset by peer|broken pipe|remote (worker|process)|"
    r"connection refused|timed? ?out",
    re.I,
)


#: what a rank raises when a peer did not answer within the process group's timeout
TIMED_OUT = re.compile(r"timed? ?out|timeout", re.I)
#: what a rank leaves when torchrun (or the launcher) ends it with the rest of the group
TERMINATED = "stopped by SIGTERM with the group"


def end_on_sigterm() -> None:
    """In a rank: SIGTERM (torchrun ending the group) raises SystemExit, so that the rank
    leaves a note that it was alive and ended with the group: not the one that failed."""

    def ended(signum, frame):
        raise SystemExit(TERMINATED)

    signal.signal(signal.SIGTERM, ended)


#: the module each rank of an executor runs (``python -m MODULE CONFIG.json``)
ENTRY = {
    "distributed": "bench.executors.distributed",
    "ddp": "bench.executors.ddp",
    "sequential": "bench.executors.single",
}
#: torchrun tells each rank which attempt it belongs to (0: the first)
ATTEMPT = "TORCHELASTIC_RESTART_COUNT"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(cfg: RunConfig, config_path: Path, ranks: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(ranks),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "--monitor-interval",
        "0.5",
        "--max-restarts",
        str(cfg.max_restarts),
        "-m",
        ENTRY[cfg.executor],
        str(config_path),
    ]


def attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The store a rank's process group meets in, its keys under a prefix of its own attempt:
    torchrun's agent keeps one store across restarts, and a restarted group that read the
    failed attempt's keys would try to join ranks that are gone, and hang."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not agent,
        timeout=timeout,
    )
    return dist.PrefixStore(f"lcbench/attempt{os.environ.get(ATTEMPT, '0')}", store)


def first_failure(folder: Path, log: str, ranks: int = 0) -> str:
    """One line: which rank failed first and why. A rank's own error (its ``.rankN.error``:
    time and message) comes first, earliest first; then a rank killed by a signal (from
    torchrun's failure report); errors caused by a lost peer only where nothing else is
    known."""
    errors, ended = {}, set()
    for path in folder.glob(".rank*.error"):
        stamp, _, message = path.read_text().partition(" ")
        rank = int(path.name[5:-6])
        if TERMINATED in message:
            ended.add(rank)
        else:
            errors[rank] = (float(stamp), message.strip())
    exits = {int(rank): int(code) for rank, code in FAILURE.findall(log)}
    own = sorted((t, r) for r, (t, message) in errors.items() if not PEER_LOST.search(message))
    if own:
        rank = own[0][1]
        return f"rank {rank} failed: {errors[rank][1]}"
    killed = sorted(r for r, code in exits.items() if code < 0 and -code != signal.SIGTERM)
    waited = sorted(r for r, (_, message) in errors.items() if TIMED_OUT.search(message))
    silent = killed or [
        r for r in range(ranks) if r not in errors and r not in exits and r not in ended
    ]
    if waited and silent:  # a peer gave up on it; it was then stopped with the rest
        return f"rank {silent[0]} stopped answering: rank {waited[0]} waited --rank-timeout for it"
    if killed:
        return f"rank {killed[0]} was killed by {signal.Signals(-exits[killed[0]]).name}"
    if silent and not exits and all(PEER_LOST.search(m) for _, m in errors.values()):
        return f"rank {silent[0]} died without a word (killed?)" + (
            f"; rank {min(errors)} lost it" if errors else ""
        )
    if errors:
        rank = min(errors, key=lambda r: errors[r][0])
        return f"rank {rank} failed: {errors[rank][1]}"
    if exits:
        rank = min(exits)
        return f"rank {rank} exited with status {exits[rank]}"
    return "the distributed run failed (see workers.log)"


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's ranks: each in a session of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid
            ):
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
            os.kill(pid, signal.SIGCONT)  # a stopped rank takes the signal at once
        except ProcessLookupError:
            pass


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP: state T in /proc/PID/stat)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "Tt"
    except (OSError, IndexError):
        return False


def stop(proc: subprocess.Popen) -> None:
    """Stop torchrun and every rank it started (SIGTERM, then SIGKILL); a stopped rank
    (SIGSTOP) is killed at once, since it would not answer."""
    ranks = children(proc.pid)
    signal_all([p for p in ranks if stopped(p)], signal.SIGKILL)
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        signal_all(ranks, sig)
        try:
            proc.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    deadline = time.monotonic() + 2
    while (
        left := [p for p in ranks if Path(f"/proc/{p}").exists()]
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_all(left, signal.SIGKILL)


#: seconds torchrun has to end the group after a rank reported its error, before the
#: launcher stops it (torchrun waits 30 s on a rank that ignores SIGTERM: a stopped one)
AFTER_ERROR = 3.0


def wait(proc: subprocess.Popen, folder: Path, restarts: int = 0) -> int:
    """torchrun's exit status; once a rank has reported an error (``.rankN.error``), the
    group gets ``AFTER_ERROR`` seconds to end before it is stopped, unless torchrun may
    restart it (``restarts``): then torchrun stops the group itself, a stopped rank (which
    would keep torchrun waiting its 30 s) killed at once."""
    failed_at = None
    while True:
        try:
            return proc.wait(0.5)
        except subprocess.TimeoutExpired:
            pass
        if restarts:
            if any(folder.glob(".rank*.error")):
                signal_all([p for p in children(proc.pid) if stopped(p)], signal.SIGKILL)
            continue
        if failed_at is None and any(folder.glob(".rank*.error")):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > AFTER_ERROR:
            stop(proc)
            return proc.wait()


def write_config(path: Path, cfg: RunConfig, cuts: list[int]) -> None:
    """What every rank reads: the resolved config and the cut points."""
    write_atomic(Path(path), json.dumps({"config": asdict(cfg), "cuts": cuts}, indent=2) + "\n")


def run(
    cfg: RunConfig, folder: Path, *, ranks: int, threads: int, cuts: list[int], progress: bool
) -> RunRecord:
    """Run ``cfg`` on ``ranks`` local processes of ``threads`` CPU threads, the model cut at
    ``cuts``; return the record rank 0 wrote."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".rank*.error"):  # an earlier attempt's, not this one's
        stale.unlink()
    with tempfile.TemporaryDirectory(prefix="lcbench-") as tmp:
        config_path = Path(tmp) / "config.json"
        write_config(config_path, cfg, cuts)
        log_path = Path(tmp) / "workers.log"
        env = {
            **os.environ,
            "LCBENCH_PROGRESS": "1" if progress else "0",
            "OMP_NUM_THREADS": str(threads),
        }
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                torchrun_command(cfg, config_path, ranks),
                stdout=None,
                stderr=log,
                env=env,
                start_new_session=True,
            )
            try:
                code = wait(proc, folder, cfg.max_restarts)
            except BaseException:
                stop(proc)
                mark_failed(folder, "interrupted")
                raise
            stop(proc)  # any rank left behind
        text = log_path.read_text(errors="replace")
        if code != 0:
            if folder.exists():
                write_atomic(folder / "workers.log", text)
            reason = first_failure(folder, text, ranks)
            mark_failed(folder, reason)
            raise RunFailed(reason)
        record = RunRecord.load(folder)
        if record.info.get("restarts"):  # what each attempt said, beside what run.json notes
            write_atomic(folder / "workers.log", text)
    if record.info.get("status") == "diverged":  # a restart found it so and stopped at once
        raise RunFailed(f"run {cfg.run_id} diverged: {record.info.get('error')}")
    return record


def diverged_before(folder: Path) -> bool:
    """Whether this attempt was started again after the run diverged (nothing to continue:
    every attempt would diverge where the first did)."""
    info = read_json(Path(folder) / "run.json") if os.environ.get(ATTEMPT, "0") != "0" else None
    return isinstance(info, dict) and info.get("status") == "diverged"


def leave_error(folder: Path, rank: int, error: BaseException) -> None:
    """In a rank that fails: its one-line error in the run folder (``.rankN.error``: time and
    message), for the launcher and the next attempt; a RunFailed is told by its cause."""
    if isinstance(error, RunFailed) and error.__cause__ is not None:
        error = error.__cause__
    reason = (
        "interrupted"
        if isinstance(error, KeyboardInterrupt)
        else f"{type(error).__name__}: {error}"
    )
    if folder.exists():
        (folder / f".rank{rank}.error").write_text(f"{time.time()} {reason.splitlines()[0]}\n")


def restart_note(folder: Path, ranks: int) -> dict | None:
    """In an attempt that torchrun's elastic agent started again, for rank 0 to note: the
    attempt, when, which rank failed in the attempt before and why (its ranks' error
    files, removed once read); None in the first attempt."""
    attempt = int(os.environ.get(ATTEMPT, "0"))
    if attempt == 0:
        return None
    reason = first_failure(folder, "", ranks)
    for path in folder.glob(".rank*.error"):
        path.unlink(missing_ok=True)
    rank = re.match(r"rank (\d+)", reason)
    return {
        "attempt": attempt,
        "at": now(),
        "rank": int(rank[1]) if rank else None,
        "reason": reason,
    }


def mark_failed(folder: Path, reason: str) -> None:
    """run.json says ``failed`` with ``reason`` (created if rank 0 never wrote it)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = read_json(folder / "run.json") or {}
    if info.get("status") in ("ok", "diverged"):
        return
    info.update(status="failed", error=reason, ended=now())
    write_atomic(folder / "run.json", json.dumps(info, indent=2, default=str) + "\n")
