"""Real model parallelism: one process per stage on torch.distributed (gloo on CPU, NCCL on
CUDA), launched by torchrun. Run as ``python -m bench.executors.distributed CONFIG.json``.

Stage k works on batch t while stage k+1 works on batch t-1. Downstream, rank k sends the
detached h_k and the labels to rank k+1. Upstream messages (BP gradients, DNI targets, LC
losses) arrive late: a rank posts the receive for batch t after its forward and applies
messages in batch order, waiting for the oldest only when more than ``lag`` batches are in
flight (0 for BP, which is exact; 1 for the decoupled rules). Only point-to-point ops of
torch.distributed move tensors.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
from collections import deque
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from bench import checkpoint, prepare
from bench.config import RunConfig, ranks_per_layer
from bench.data import tasks
from bench.measure import memory, timing
from bench.measure.provenance import now
from bench.records import save_weights
from bench.schedule import LRSchedule, epoch_steps
from methods.base import match_targets

from . import asynchronous, epochs, launch, neurons, pipeline
from .epochs import stage_label
from .links import Links, Part
from .sequential import Scores, synchronize


def upstream_shape(stage, h_shape: tuple) -> tuple | None:
    """Shape of the message this stage receives from the stage below, per batch."""
    if stage.last or stage.upstream is None:
        return None
    return h_shape if stage.upstream == "gradient" else h_shape[:1]


def train_epoch(
    stage,
    links: Links,
    *,
    batches,
    steps: int,
    batch_size: int,
    in_shape: tuple,
    y_shape: tuple,
    out_shape: tuple,
    device,
    dtype,
    probe=None,
    on_step=lambda t: None,
    progress: bool = False,
    image_shape: tuple | None = None,
) -> None:
    """One epoch of stage ``stage`` on its rank; ``batches`` yields data on rank 0 only.
    ``probe`` (a context manager) is entered around the first two iterations, which hold
    the first forward and the first upstream update. Where the rule's stages need the input
    image (``image_shape``: its per-sample shape), it travels down beside the labels."""
    k = links.rank
    lag = 1 if stage.decoupled else 0
    pending: deque = deque()  # (batch, work, buffer) for upstream messages not yet applied
    up_shape = upstream_shape(stage, (batch_size, *out_shape))

    def apply_oldest():
        batch, work, buf = pending.popleft()
        links.wait(work)
        reply = stage.receive(batch, buf)
        if reply is not None and k > 0:
            links.send(reply, k - 1)

    def post_input():  # the next batch's input travels while this one is computed
        return (
            links.irecv((batch_size, *in_shape), dtype, device, k - 1),
            links.irecv((batch_size, *y_shape), torch.int64, device, k - 1),
            links.irecv((batch_size, *image_shape), dtype, device, k - 1)
            if image_shape is not None
            else (None, None),
        )

    ahead = post_input() if k > 0 and steps else None
    for t in tqdm(range(steps), disable=not progress, leave=False, unit="batch", file=sys.stdout):
        on_step(t)
        with probe if probe is not None and t < 2 else nullcontext():
            if k == 0:
                x, y = next(batches)
                image = x
            else:
                (x_work, x), (y_work, y), (image_work, image) = ahead
                ahead = post_input() if t + 1 < steps else None
                for work in (x_work, y_work, image_work):
                    if work is not None:
                        links.wait(work)
            if image_shape is not None:
                stage.image = image
            h, up = stage.forward(t, x, y)
            if h is not None:
                links.send(h, k + 1)
                links.send(y, k + 1)
                if image_shape is not None:
                    links.send(image, k + 1)
            if up is not None and k > 0:
                links.send(up, k - 1)
            if up_shape is not None:
                buf = torch.empty(up_shape, dtype=dtype, device=device)
                pending.append((t, dist.irecv(buf, src=k + 1), buf))
                while len(pending) > lag:
                    apply_oldest()
    while pending:
        apply_oldest()
    links.flush()


def trainer(
    stage,
    links: Links,
    *,
    batch_size: int,
    in_shape: tuple,
    y_shape: tuple,
    out_shape: tuple,
    device,
    dtype,
    timer,
    progress: bool,
    image_shape: tuple | None = None,
):
    """``epoch(batches, probe, steps, on_step) -> counts``: one training epoch of ``steps``
    batches of this rank under its rule (pipelined BP on a pipeline schedule, asynchronous DGL
    without waiting, the others with late upstream messages); ``probe`` is entered around the
    first batch(es), ``on_step(t)`` called before batch t (the learning-rate schedule)."""
    if stage.epoch_loop == "pipeline":
        pipe = pipeline.Pipeline(stage, links, device=device, y_shape=(batch_size, *y_shape))
        pipeline.time_phases(stage, timer)

        def epoch(batches, probe, steps, on_step):
            for t in tqdm(
                range(steps), disable=not progress, leave=False, unit="batch", file=sys.stdout
            ):
                on_step(t)
                x, y = next(batches) if links.rank == 0 else (None, None)
                with probe if probe is not None and t == 0 else nullcontext():
                    pipe.step(x, y)
            links.flush()
            return {}
    elif stage.epoch_loop == "asynchronous":

        def epoch(batches, probe, steps, on_step):
            on_step(0)  # ranks below the first run their own number of steps: one rate an epoch
            return asynchronous.train_epoch(
                stage,
                links,
                batches=batches,
                steps=steps,
                batch_size=batch_size,
                in_shape=in_shape,
                y_shape=y_shape,
                device=device,
                dtype=dtype,
                probe=probe,
            )
    else:

        def epoch(batches, probe, steps, on_step):
            train_epoch(
                stage,
                links,
                batches=batches,
                steps=steps,
                batch_size=batch_size,
                in_shape=in_shape,
                y_shape=y_shape,
                out_shape=out_shape,
                device=device,
                dtype=dtype,
                probe=probe,
                on_step=on_step,
                progress=progress,
                image_shape=image_shape,
            )
            return {}

    return epoch


@torch.no_grad()
def evaluate(
    stage,
    links: Links,
    *,
    batches,
    sizes: list[int],
    in_shape,
    y_shape,
    device,
    dtype,
    criterion,
    inference=None,
) -> dict:
    """Pipelined evaluation: test batches flow down (``batches`` on rank 0; ``sizes`` their
    sizes); each rank scores its own sub-model. With ``inference`` (rank 0's
    ``submodels.Inference``; on the other ranks any true value) every scoring rank also sends
    its logits of each batch to rank 0, which gathers progressive inference and ensembles."""
    k, world = links.rank, links.world
    stage.train(False)
    scores = Scores()
    label = stage_label(stage)
    for n in sizes:
        if k == 0:
            x, y = next(batches)
        else:
            x = links.recv((n, *in_shape), dtype, device, k - 1)
            y = links.recv((n, *y_shape), torch.int64, device, k - 1)
        h = stage.group(x)
        logits = h if stage.last else stage.predict(h)
        if not stage.last:
            links.send(h, k + 1)
            links.send(y, k + 1)
        if logits is None:
            continue
        scores.add(label, logits, y, criterion)
        if inference and k > 0:
            links.send(match_targets(logits, y), 0)
        elif inference:
            classes = logits.shape[-1]
            inference.add(
                [match_targets(logits, y)]
                + [links.recv((n, classes), dtype, device, r) for r in range(1, world)],
                y,
            )
    links.flush()
    rows = scores.rows()
    if inference and k == 0:
        rows.update(inference.rows())
    return rows


def device_for(local_rank: int, cfg: RunConfig) -> torch.device:
    """One GPU per rank where there are several (round-robin), made the current device (NCCL's
    object collectives, such as gather_object, use it), else the CPU."""
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def stage_part(
    prep: prepare.Prepared,
    links: Links,
    *,
    y_shape: tuple,
    device,
    dtype,
    timer,
    progress: bool,
    inference=None,
) -> Part:
    """Rank k trains stage k (one layer group)."""
    cfg, rank = prep.cfg, links.rank
    stage = prep.stages[rank]
    in_shape = tuple(tasks.TASKS[cfg.task].input_shape) if rank == 0 else prep.shapes[rank - 1]

    def evaluate_part(batches, sizes):
        return evaluate(
            stage,
            links,
            batches=batches,
            sizes=sizes,
            in_shape=in_shape,
            y_shape=y_shape,
            device=device,
            dtype=dtype,
            criterion=prepare.classification_loss,
            inference=inference,
        )

    epoch = trainer(
        stage,
        links,
        batch_size=cfg.batch_size,
        in_shape=in_shape,
        y_shape=y_shape,
        out_shape=prep.shapes[rank],
        device=device,
        dtype=dtype,
        timer=timer,
        progress=progress,
        image_shape=tuple(tasks.TASKS[cfg.task].input_shape) if stage.needs_image else None,
    )
    return Part(stage, str(rank + 1), rank, epoch, evaluate_part)


def resume_point(store: checkpoint.Checkpoints, cfg: RunConfig, device) -> dict | None:
    """This rank's state at the newest epoch rank 0 found complete (every rank loads the
    same epoch), or None: then the files an earlier attempt left are removed."""
    found = store.latest() if dist.get_rank() == 0 and cfg.checkpoint_every else None
    epoch = torch.tensor([found or 0])
    dist.broadcast(epoch, src=0)
    if epoch.item():
        return store.load(int(epoch), device)
    store.remove()
    return None


def save_checkpoint(
    store: checkpoint.Checkpoints, epoch: int, state: dict, device, generator, record
) -> None:
    """Every rank writes its part of ``epoch`` (its stage's ``state``, RNG states; rank 0's
    ``record`` its rows); once all are written, rank 0 marks the epoch complete."""
    store.save(
        epoch,
        {
            "stages": [state],
            "rng": checkpoint.rng_state(device, generator),
            "rows": record.rows if record is not None else None,
        },
    )
    dist.barrier()
    store.commit(epoch)


def gather(label: str, rows: dict, *more) -> list[tuple] | None:
    """``(label, rows, *more)`` of every rank, on rank 0 in rank order (None elsewhere)."""
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((label, rows, *more), gathered, dst=0)
    return gathered


def merge(
    gathered: list[tuple], steps: int, batch_size: int, modelled: float | None = None
) -> dict:
    """The rows of every rank (``gather``'s) and the run's time: the slowest rank's
    wall-clock (beside the ``modelled`` K-worker time, given one) and compilation."""
    merged = {key: value for _, rows, *_ in gathered for key, value in rows.items()}
    wall = max(rows[label, "wall_time_s"] for label, rows, *_ in gathered)
    merged["", "epoch_time_s"] = wall
    merged["", "samples_per_s"] = steps * batch_size / wall
    if modelled is not None:
        merged["", "modelled_time_s"] = modelled
        merged["", "wall_over_modelled"] = wall / modelled
    compiled = [
        rows[label, "compile_time_s"]
        for label, rows, *_ in gathered
        if (label, "compile_time_s") in rows
    ]
    if compiled:  # the first epoch these processes train
        merged["", "compile_time_s"] = max(compiled)
    return merged


def finish(store: checkpoint.Checkpoints, record) -> None:
    """Every rank done: rank 0 (``record``) marks the run ok, then the checkpoints go."""
    dist.barrier()
    if record is not None:
        record.update(status="ok", ended=now())
    dist.barrier()
    store.remove()


def worker(cfg: RunConfig, cuts: list[int] | None, progress: bool) -> None:
    """The body of one rank: build its part, train, gather rows on rank 0, checkpoint."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = device_for(int(os.environ.get("LOCAL_RANK", rank)), cfg)
    cfg = prepare.resolve(cfg)
    if launch.diverged_before(prepare.run_folder(cfg)):
        return
    per_layer = ranks_per_layer(cfg)
    prep = prepare.prepare(cfg, stage=rank // per_layer, device=device, data=rank == 0, cuts=cuts)
    cfg = prep.cfg
    store = checkpoint.Checkpoints(
        prepare.run_folder(cfg), checkpoint.fingerprint(cfg, prep.stages, prep.cuts), rank
    )
    resumed = resume_point(store, cfg, device)
    record = (
        prepare.open_record(prep, resumed, launch.restart_note(prepare.run_folder(cfg), world))
        if rank == 0
        else None
    )
    task = prep.task
    counts = torch.tensor(
        [
            task.steps(cfg.batch_size),
            task.test_size(prepare.eval_batch_size(cfg, task)),
            prepare.eval_batch_size(cfg, task),
        ]
        if rank == 0
        else [0, 0, 0]
    )
    dist.broadcast(counts, src=0)
    steps, n_test, test_batch = (int(c) for c in counts)
    sizes = [min(test_batch, n_test - i) for i in range(0, n_test, test_batch)]
    y_shape = tuple(prep.shapes[-1][:-1])  # one target per sample, or per step (T,)
    dtype = torch.float32
    timer = timing.PhaseTimer(device)
    links = Links(rank, world)
    costs = prepare.static_rows(prep) if rank == 0 else {}
    if per_layer > 1:
        part = neurons.part(
            prep, links, device=device, dtype=dtype, timer=timer, progress=progress and rank == 0
        )
    else:
        wanted = prepare.inference(prep, costs) if rank == 0 else prepare.wants_inference(prep)
        part = stage_part(
            prep,
            links,
            y_shape=y_shape,
            device=device,
            dtype=dtype,
            timer=timer,
            progress=progress and rank == 0,
            inference=wanted,
        )
    prep.stages = None  # the other stages live on other ranks
    stage, label = part.stage, part.label
    stage.phase = timer
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    schedule, plan = LRSchedule(cfg, steps), epoch_steps(cfg, steps)
    done = epochs.resume([stage], resumed, device, generator)
    compiled = (
        prepare.warm_up_stage(prep, stage, part.layer, cfg.batch_size) if cfg.compile else None
    )

    def train(epoch, first, steps, probes):
        stage.train(True)
        data = task.train_batches(cfg.batch_size, generator) if rank == 0 else None
        timer.pop()  # off the clock: the last evaluation's phases and waits, the warm-up's
        links.pop_idle()
        dist.barrier()
        synchronize(device)
        start = time.perf_counter()
        counts = part.epoch(
            data, probes[0] if probes else None, steps, lambda t: schedule.apply([stage], first + t)
        )
        synchronize(device)
        seconds = time.perf_counter() - start
        rows = {(label, m): v for m, v in counts.items()}
        rows.update(timing.phase_rows(label, timer))
        rows[label, "idle_time_s"] = links.pop_idle()
        rows[label, "wall_time_s"] = seconds
        return rows

    def meet(steps, rows, learned):
        gathered = gather(label, rows, part.layer)
        if gathered is None:
            return None
        busy = [0.0] * cfg.groups  # per layer group: its slowest rank
        for rank_label, part_rows, layer in gathered:
            busy[layer] = max(busy[layer], part_rows[rank_label, "busy_time_s"])
        modelled = timing.stage_modelled_time(stage, busy, steps)
        return merge(gathered, steps, cfg.batch_size, modelled)

    process = epochs.Process(
        stages=[stage],
        labels=[label],
        label=label,
        probes=[memory.ActivationProbe(stage)],
        device=device,
        batch_rows=cfg.batch_size,
        eval_rows=test_batch,
        costs=costs,
        compiled=compiled,
        train=train,
        evaluate=lambda: part.evaluate(task.test_batches(test_batch) if rank == 0 else None, sizes),
        meet=meet,
        save=lambda epoch: save_checkpoint(
            store, epoch, stage.state_dict(), device, generator, record
        ),
    )
    epochs.run(process, record, plan=plan, done=done, every=cfg.checkpoint_every)
    if cfg.save_weights:
        save_weights(prepare.run_folder(cfg), part.label, stage)
    finish(store, record)


def main(argv: list[str] | None = None, *, executor: str = "distributed", body=worker) -> None:
    """One rank of ``executor``: read the config, join the process group and run
    ``body(cfg, cuts, progress)``; a rank that raises leaves its error in the run folder
    (``.rankN.error``, read by the launcher) and exits at once."""
    launch.end_on_sigterm()
    argv = sys.argv[1:] if argv is None else argv
    config = json.loads(Path(argv[0]).read_text())
    cfg = RunConfig(**config.get("config", config))
    cfg = replace(cfg, executor=executor)
    backend = "nccl" if cfg.device != "cpu" and torch.cuda.is_available() else "gloo"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=cfg.rank_timeout)
    dist.init_process_group(
        backend,
        store=launch.attempt_store(rank, world, timeout),
        rank=rank,
        world_size=world,
        timeout=timeout,
    )
    torch.set_num_threads(prepare.threads_per_rank(cfg))
    try:
        body(cfg, config.get("cuts"), progress=os.environ.get("LCBENCH_PROGRESS") == "1")
    except BaseException as e:
        launch.leave_error(prepare.run_folder(prepare.resolve(cfg)), rank, e)
        traceback.print_exc()
        os._exit(1)  # do not wait on peers that will never answer
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
