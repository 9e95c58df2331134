"""One run to completion: a prepared config handed to its executor, run.json's status kept
true throughout (``running``, then ``ok``, ``failed`` or ``diverged``), continued from its
last checkpoint where an earlier attempt left one."""

from __future__ import annotations

from . import prepare
from .config import LAUNCHED, ranks
from .executors import launch, sequential
from .records import RunRecord


def execute(prep: prepare.Prepared, *, progress: bool = True) -> RunRecord:
    """Run a prepared config to completion, keeping run.json's status true throughout: on
    its ranks (distributed, ddp), under torchrun where it may be restarted
    (``--max-restarts``), else here. A checkpoint that is not this run's raises
    checkpoint.Mismatch before anything is written."""
    cfg = prep.cfg
    if cfg.executor in LAUNCHED or cfg.max_restarts:  # the ranks load their own parts
        sequential.checkpoints(prep)  # refused here, before anything is written
        prepare.check_writable(cfg)
        return launch.run(
            cfg,
            prepare.run_folder(cfg),
            ranks=ranks(cfg),
            threads=prepare.threads_per_rank(cfg),
            cuts=prep.cuts,
            progress=progress,
        )
    return sequential.run(prep, progress=progress)
