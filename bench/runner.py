"""One run to completion: a prepared config handed to its executor, run.json's status kept
true throughout (``running``, then ``ok``, ``failed`` or ``diverged``), continued from its
last checkpoint where an earlier attempt left one."""
from __future__ import annotations

import time

import torch

from . import checkpoint, prepare
from .config import LAUNCHED, ranks
from .executors import launch, sequential
from .measure.provenance import now
from .records import RunFailed, RunRecord, save_weights


def execute(prep: prepare.Prepared, *, progress: bool = True) -> RunRecord:
    """Run a prepared config to completion, keeping run.json's status true throughout: on
    its ranks (distributed, ddp), under torchrun where it may be restarted
    (``--max-restarts``), else here. A checkpoint that is not this run's raises
    checkpoint.Mismatch before anything is written."""
    cfg = prep.cfg
    store = checkpoint.Checkpoints(prepare.run_folder(cfg),
                                   checkpoint.fingerprint(cfg, prep.stages, prep.cuts))
    epoch = store.latest() if cfg.checkpoint_every else None
    if cfg.executor in LAUNCHED or cfg.max_restarts:  # the ranks load their own parts
        prepare.check_writable(cfg)
        return launch.run(cfg, prepare.run_folder(cfg), ranks=ranks(cfg),
                          threads=prepare.threads_per_rank(cfg), cuts=prep.cuts, progress=progress)
    return run_here(prep, store, epoch, progress=progress)


def run_here(prep: prepare.Prepared, store: checkpoint.Checkpoints, epoch: int | None, *,
             progress: bool, restart: dict | None = None) -> RunRecord:
    """The sequential executor in this process, from the checkpoint of ``epoch`` (None: from
    the start); ``restart``: what torchrun's restart of this process is noted as."""
    cfg = prep.cfg
    resumed = store.load(epoch, prep.device) if epoch else None
    if resumed is None:
        store.remove()  # what an earlier attempt left is not continued
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # before the record: its provenance says so
    record = prepare.open_record(prep, resumed, restart)
    start = time.perf_counter()
    try:
        sequential.train(prep, record, progress=progress, resumed=resumed,
                         store=store if cfg.checkpoint_every else None)
    except RunFailed:
        raise
    except BaseException as e:
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
        try:
            record.update(status="failed", error=reason, ended=now())
        except OSError as lost:  # the run's folder itself is gone or unwritable
            reason += f" (and run.json could not be written: {lost.strerror or lost})"
        if isinstance(e, Exception):
            raise RunFailed(f"run {cfg.run_id} failed: {reason}") from e
        raise
    if cfg.save_weights:
        for stage in prep.stages:
            save_weights(record.folder, str(stage.index + 1), stage)
    record.update(status="ok", ended=now(), wall_time_s=time.perf_counter() - start)
    store.remove()
    return record
