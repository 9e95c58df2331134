"""Data-parallel BP, the baseline a user with K workers would otherwise run: the whole net on
each of K ranks, wrapped in torch's DistributedDataParallel (gloo on CPU, NCCL on CUDA),
launched by torchrun as the distributed executor is. Run as
``python -m bench.executors.ddp CONFIG.json``.

Every rank draws the same global batch of ``--batch-size`` from the same seeded generator
(the batches one-process BP sees) and trains on its slice of batch_size / K samples. DDP
averages the gradients over the ranks during the backward pass, which, with equal slices, is
the gradient of the mean loss over the global batch; every rank then takes the same SGD step.
BatchNorm layers normalise with their own slice's statistics, and rank 0's running statistics
are the ones broadcast and evaluated (DDP's default), so a net with BatchNorm learns slightly
differently from one-process BP.

Checkpoints as the distributed executor's: each rank its replica's state (identical weights
and optimizer state; its own BatchNorm statistics) and RNG states, rank 0 the rows; a run
continues from the newest epoch complete on every rank, to the numbers of one never stopped.

Records as the distributed executor's: per rank (``stage`` = rank 1..K) its busy time by
phase (the all-reduce runs inside ``backward_time_s``), ``wall_time_s`` and memory; for the
whole run the slowest rank's ``epoch_time_s``, the training loss and accuracy averaged over
the ranks, and rank 0's test figures.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bench import checkpoint, prepare
from bench.config import RunConfig
from bench.measure import memory, timing
from bench.records import save_weights
from bench.schedule import LRSchedule, epoch_steps, scheduled

from . import distributed, epochs, launch, sequential


def shards(batches, rank: int, world: int):
    """Rank ``rank``'s slice of each global ``(x, y)`` batch (``world`` equal slices)."""
    for x, y in batches:
        size = x.shape[0] // world
        yield x[rank * size : (rank + 1) * size], y[rank * size : (rank + 1) * size]


@contextmanager
def unwrapped(stage):
    """The stage with its plain group in place of the DDP replica (evaluation on one rank,
    weights without DDP's ``module.`` prefix)."""
    replica = stage.group
    stage.group = replica.module
    try:
        yield stage
    finally:
        stage.group = replica


def worker(cfg: RunConfig, cuts: list[int] | None, progress: bool) -> None:
    """The body of one rank: its replica trained on its slices, rows gathered on rank 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != cfg.workers:
        raise ValueError(f"torchrun started {world} ranks for --workers {cfg.workers}")
    device = distributed.device_for(int(os.environ.get("LOCAL_RANK", rank)), cfg)
    if launch.diverged_before(prepare.run_folder(prepare.resolve(cfg))):
        return
    prep = prepare.prepare(cfg, stage=0, device=device, cuts=cuts)
    cfg, task = prep.cfg, prep.task
    folder = prepare.run_folder(cfg)
    store = checkpoint.Checkpoints(
        folder, checkpoint.fingerprint(cfg, prep.stages, prep.cuts), rank
    )
    resumed = distributed.resume_point(store, cfg, device)
    record = (
        prepare.open_record(prep, resumed, launch.restart_note(folder, world))
        if rank == 0
        else None
    )
    costs = prepare.static_rows(prep) if rank == 0 else {}
    (stage,) = prep.stages
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    # before DDP wraps the group: its state without "module."
    done = epochs.resume([stage], resumed, device, generator)
    stage.group = DistributedDataParallel(
        stage.group,
        device_ids=[device] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )  # the gradients live in DDP's buckets, not beside them
    timer = timing.PhaseTimer(device)
    stage.phase = timer
    label = str(rank + 1)
    shard = cfg.batch_size // world
    test_batch = prepare.eval_batch_size(cfg, task)
    schedule, plan = (
        LRSchedule(cfg, task.steps(cfg.batch_size)),
        epoch_steps(cfg, task.steps(cfg.batch_size)),
    )
    compiled = prepare.warm_up_stage(prep, stage, 0, shard) if cfg.compile else None
    timer.pop()  # the warm-up's phases

    def train(epoch, first, steps, probes):
        batches = shards(task.train_batches(cfg.batch_size, generator), rank, world)
        dist.barrier()
        seconds = sequential.train_epoch(
            [stage],
            scheduled(batches, [stage], schedule, first, steps),
            device=device,
            total=steps,
            progress=progress and rank == 0,
            desc=f"epoch {epoch}/{len(plan)}",
            probes=probes,
        )
        rows = timing.phase_rows(label, timer)
        rows[label, "wall_time_s"] = seconds
        return rows

    def evaluate():
        if rank > 0:
            return {}
        with unwrapped(stage):
            return sequential.evaluate(
                [stage], task.test_batches(test_batch), prepare.classification_loss
            )

    def meet(steps, rows, learned):
        gathered = distributed.gather(label, rows)
        if gathered is None:
            return None
        merged = distributed.merge(gathered, steps, cfg.batch_size)
        for key in learned:  # of equal slices: the global batch's mean is the ranks' mean
            merged[key] = sum(part[key] for _, part in gathered) / world
        return merged

    def save(epoch):
        with unwrapped(stage):  # its state without DDP's "module."
            state = stage.state_dict()
        distributed.save_checkpoint(store, epoch, state, device, generator, record)

    process = epochs.Process(
        stages=[stage],
        labels=[label],
        label=label,
        probes=[memory.ActivationProbe(stage)],
        device=device,
        batch_rows=shard,
        eval_rows=test_batch,
        costs=costs,
        compiled=compiled,
        train=train,
        evaluate=evaluate,
        meet=meet,
        save=save,
    )
    epochs.run(process, record, plan=plan, done=done, every=cfg.checkpoint_every)
    if cfg.save_weights and rank == 0:
        with unwrapped(stage):
            save_weights(folder, "1", stage)
    distributed.finish(store, record)


def main(argv: list[str] | None = None) -> None:
    distributed.main(argv, executor="ddp", body=worker)


if __name__ == "__main__":
    main()
