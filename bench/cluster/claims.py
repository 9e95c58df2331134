"""Workers that share a results folder: a run is claimed by an exclusive lock beside its
run.json (``RUN/.claim.lock``), tried for up to a second (``CLAIM_WAIT_S``; a reader asking
whether a run is claimed holds the lock for an instant) before the run is left to its holder.

The lock is ``filelock.FileLock``: ``flock(2)`` on the open lock file, held by the worker's
process and released by the kernel when that process ends, however it ends (a SIGKILLed
worker's claim goes with it; the next worker continues the run from its checkpoint). No
timeout is needed and none is used: a claim is never taken over while its holder lives.
On NFS, Linux emulates ``flock`` with POSIX byte-range locks (since 2.6.12), which NFS
carries to the server: the claim holds across hosts where the NFS lock service runs
(``lockd`` for NFSv3, built into NFSv4); a client that loses its server holds nothing.
Where locks are not to be had, ``--shard I/N`` splits the grid without them.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_NAME = ".claim.lock"
#: seconds a worker tries for a claim before it passes the run by: a reader that asks whether
#: a run is claimed (``held``) holds the lock for microseconds, a worker for the whole run
CLAIM_WAIT_S = 1.0


def lock_path(folder: Path) -> Path:
    return Path(folder) / LOCK_NAME


@contextmanager
def claim(folder: Path, wait: float = CLAIM_WAIT_S):
    """Yield True holding the run's claim, or False where another process holds it after
    ``wait`` seconds of trying."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path(folder), timeout=wait, poll_interval=0.01, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def held(folder: Path) -> bool:
    """Whether a live process holds the run's claim (a worker is training it now)."""
    path = lock_path(folder)
    if not path.exists():
        return False
    with claim(folder, wait=0) as mine:
        return not mine


def shard(items: list, spec: str | None) -> list:
    """Every N-th of ``items`` from the I-th (``spec`` "I/N", 0 <= I < N); all for None."""
    if spec is None:
        return items
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes I/N, e.g. 0/4 (got '{spec}')") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard I/N needs 0 <= I < N (got '{spec}')")
    return items[index::count]
