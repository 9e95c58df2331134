"""One run to completion: a prepared config handed to its executor, run.json's status kept
true throughout (``running``, then ``ok``, ``failed`` or ``diverged``)."""
from __future__ import annotations

import time

import torch

from . import prepare
from .config import LAUNCHED, ranks
from .executors import launch, sequential
from .measure.provenance import now
from .records import RunFailed, RunRecord, save_weights


def execute(prep: prepare.Prepared, *, progress: bool = True) -> RunRecord:
    """Run a prepared config to completion, keeping run.json's status true throughout."""
    if prep.cfg.executor in LAUNCHED:
        prepare.check_writable(prep.cfg)
        return launch.run(prep.cfg, prepare.run_folder(prep.cfg), ranks=ranks(prep.cfg),
                          threads=prepare.threads_per_rank(prep.cfg), cuts=prep.cuts, progress=progress)
    if prep.cfg.threads:
        torch.set_num_threads(prep.cfg.threads)  # before the record: its provenance says so
    record = prepare.open_record(prep)
    start = time.perf_counter()
    try:
        sequential.train(prep, record, progress=progress)
    except RunFailed:
        raise
    except BaseException as e:
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
        record.update(status="failed", error=reason, ended=now())
        if isinstance(e, Exception):
            raise RunFailed(f"run {prep.cfg.run_id} failed: {reason}") from e
        raise
    if prep.cfg.save_weights:
        for stage in prep.stages:
            save_weights(record.folder, str(stage.index + 1), stage)
    record.update(status="ok", ended=now(), wall_time_s=time.perf_counter() - start)
    return record
