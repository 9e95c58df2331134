"""The reference executor: one process; per batch every stage in order, then the upstream
messages of that same batch. Deterministic for a seed."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext

import torch
from tqdm import tqdm

from bench import checkpoint, prepare
from bench.measure import diagnostics, memory, timing
from bench.measure.provenance import now
from bench.models import runtime
from bench.records import RunFailed, RunRecord, save_weights, stop_if_diverged
from bench.schedule import LRSchedule, epoch_steps, scheduled
from methods import Stage
from methods.base import correct


def train_step(stages: Sequence[Stage], batch: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """One batch: forward (and local updates) down the stages, then the messages upstream."""
    runtime.step_begin()
    up: list[torch.Tensor | None] = [None] * len(stages)
    image = x
    for stage in stages:
        if stage.needs_image:
            stage.image = image
        x, y = stage.input(batch, x, y)
        x, up[stage.index] = stage.forward(batch, x, y)
    for k in range(len(stages) - 1, 0, -1):
        if up[k] is not None:
            reply = stages[k - 1].receive(batch, up[k])
            if reply is not None:
                up[k - 1] = reply


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(
    stages: Sequence[Stage],
    batches,
    *,
    device: torch.device,
    total: int | None = None,
    desc: str = "",
    progress: bool = True,
    first_batch: Callable[[], ContextManager] = nullcontext,
) -> float:
    """Train on every ``(x, y)`` of ``batches``; return the wall-clock seconds it took.
    ``first_batch()`` is entered around the first batch (e.g. a memory probe)."""
    for stage in stages:
        stage.train(True)
    synchronize(device)
    start = time.perf_counter()
    for batch, (x, y) in enumerate(
        tqdm(
            batches,
            total=total,
            desc=desc,
            leave=False,
            disable=not progress,
            unit="batch",
            dynamic_ncols=True,
        )
    ):
        if batch == 0:
            with first_batch():
                train_step(stages, batch, x, y)
        else:
            train_step(stages, batch, x, y)
    synchronize(device)
    return time.perf_counter() - start


class Scores:
    """Test loss and accuracy of each output, summed over batches on the device (read once,
    by ``rows``): per sample, or per step for a language model (which also gets its
    perplexity)."""

    def __init__(self):
        self.sums: dict[str, list] = {}  # label -> [loss x targets, right, targets]
        self.per_step = False

    def add(self, label: str, logits: torch.Tensor, y: torch.Tensor, criterion) -> None:
        right, targets = correct(logits, y)
        steps = targets // y.shape[0]  # targets per sample
        self.per_step |= steps > 1
        total = self.sums.setdefault(label, [0.0, 0, 0])
        total[0] = total[0] + criterion(logits, y).double().sum() * steps
        total[1] = total[1] + right
        total[2] += targets

    def rows(self) -> dict[tuple[str, str], float]:
        out = {}
        for label, (loss, right, targets) in self.sums.items():
            loss, right = float(loss), float(right)
            out[label, "test_loss"] = loss / targets
            out[label, "test_acc"] = right / targets
            if self.per_step:
                out[label, "test_ppl"] = math.exp(min(loss / targets, 700.0))
        return out


@torch.no_grad()
def evaluate(
    stages: Sequence[Stage], batches, criterion: Callable, inference=None
) -> dict[tuple[str, str], float]:
    """``{(stage, metric): value}`` over the test ``batches``: loss and accuracy of the final
    output ("") and of every sub-model ("1".."K-1"), and (``inference``, a
    ``submodels.Inference``) progressive inference and ensembles."""
    for stage in stages:
        stage.train(False)
    scores = Scores()
    for h, target in batches:
        outputs = []
        for stage in stages:
            h = stage.group(h)
            logits = h if stage.last else stage.predict(h)
            if logits is not None:
                scores.add(stage_label(stage), logits, target, criterion)
                outputs.append(logits)
        if inference is not None:
            inference.add(outputs, target)
    return {**scores.rows(), **(inference.rows() if inference is not None else {})}


def warm_up(prep: prepare.Prepared) -> float:
    """Seconds to compile every module the stages run in training: two batches on stand-in
    data, then the stages and random states as they were (``runtime.warm_up``)."""

    def step():
        train_step(
            prep.stages, -1, *prepare.stand_in(prep, 0, prep.stages[0].group, prep.cfg.batch_size)
        )

    prepare.reset_states(prep.stages, prep.cfg.batch_size)
    return runtime.warm_up(prep.stages, step, prep.device)


def stage_label(stage: Stage) -> str:
    """Figures of the last stage describe the whole network (empty stage column)."""
    return "" if stage.last else str(stage.index + 1)


def train(
    prep: prepare.Prepared,
    record: RunRecord,
    *,
    progress: bool = True,
    resumed: dict | None = None,
    store: checkpoint.Checkpoints | None = None,
) -> None:
    """The epochs: train, measure, evaluate, write rows, checkpoint (to ``store``, when
    due); RunFailed on divergence. A run ``resumed`` from a checkpoint continues after its
    epoch as if it had never stopped: at an epoch's end no batch is in flight, so the
    stages, the RNG states and the rows are all there is."""
    cfg, task, device = prep.cfg, prep.task, prep.device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    steps = task.steps(cfg.batch_size)
    timers = [timing.PhaseTimer(device) for _ in prep.stages]
    for stage, timer in zip(prep.stages, timers):
        stage.phase = timer
    probes = [memory.ActivationProbe(stage) for stage in prep.stages]
    costs = prepare.static_rows(prep)
    probe = next(iter(task.test_batches(cfg.batch_size)), None)
    signals = probe is not None and diagnostics.wanted(prep.stages)
    drift_x = probe[0][: diagnostics.DRIFT_SAMPLES] if probe is not None else None
    schedule, plan = LRSchedule(cfg), epoch_steps(cfg, steps)
    done = 0
    if resumed is not None:
        done = resumed["epoch"]
        for stage, state in zip(prep.stages, resumed["stages"], strict=True):
            stage.load_state_dict(state)
        checkpoint.set_rng_state(resumed["rng"], device, generator)
        drift_start = resumed["drift_start"]
    elif drift_x is not None:
        prepare.reset_states(prep.stages, drift_x.shape[0])
        drift_start = diagnostics.group_outputs(prep.stages, drift_x)
    compiled = {("", "compile_time_s"): warm_up(prep)} if cfg.compile else {}
    for timer in timers:
        timer.pop()  # the warm-up's phases
    for epoch, steps in enumerate(plan[done:], done + 1):
        memory.reset_device_peaks(device)
        prepare.reset_states(prep.stages, cfg.batch_size)
        batches = scheduled(
            task.train_batches(cfg.batch_size, generator),
            prep.stages,
            schedule,
            sum(plan[: epoch - 1]),
            steps,
        )
        seconds = train_epoch(
            prep.stages,
            batches,
            device=device,
            total=steps,
            progress=progress,
            desc=f"epoch {epoch}/{len(plan)}",
            first_batch=(lambda: memory.probing(probes)) if epoch == 1 else nullcontext,
        )
        rows = {}
        for stage in prep.stages:
            for metric, value in stage.pop_metrics().items():
                rows[stage_label(stage), metric] = value
        rows["", "epoch_time_s"] = seconds
        rows["", "samples_per_s"] = steps * cfg.batch_size / seconds
        rows.update(timing.time_rows(prep.stages, timers, steps))
        rows.update(compiled if epoch == done + 1 else {})
        if epoch == 1:
            rows.update(memory.memory_rows(prep.stages, probes))
            rows.update(costs)
        rows.update({("", k): v for k, v in memory.device_memory(device, "train").items()})
        memory.reset_device_peaks(device)
        size = prepare.eval_batch_size(cfg, task)
        prepare.reset_states(prep.stages, size)
        rows.update(
            evaluate(
                prep.stages,
                task.test_batches(size),
                prepare.classification_loss,
                prepare.inference(prep, costs),
            )
        )
        if device.type == "cuda":
            rows.update({("", k): v for k, v in memory.device_memory(device, "eval").items()})
        if signals:
            prepare.reset_states(prep.stages, probe[1].shape[0])
            rows.update(diagnostics.probe_rows(prep.stages, *probe, prepare.classification_loss))
        if drift_x is not None:
            prepare.reset_states(prep.stages, drift_x.shape[0])
            rows.update(diagnostics.movement_rows(prep.stages, drift_x, drift_start))
        record.add(epoch, rows)
        stop_if_diverged(record, rows, epoch, sum(plan[:epoch]))
        if store is not None and checkpoint.due(cfg.checkpoint_every, epoch):
            store.save(
                epoch,
                {
                    "stages": [stage.state_dict() for stage in prep.stages],
                    "rng": checkpoint.rng_state(device, generator),
                    "drift_start": drift_start if drift_x is not None else None,
                    "rows": record.rows,
                },
            )
            store.commit(epoch)


def checkpoints(prep: prepare.Prepared) -> tuple[checkpoint.Checkpoints, int | None]:
    """The run's checkpoints and the newest complete epoch among them (None: none, or
    ``--no-checkpoint``); a checkpoint that is not this run's raises checkpoint.Mismatch."""
    cfg = prep.cfg
    store = checkpoint.Checkpoints(
        prepare.run_folder(cfg), checkpoint.fingerprint(cfg, prep.stages, prep.cuts)
    )
    return store, store.latest() if cfg.checkpoint_every else None


def run(prep: prepare.Prepared, *, progress: bool, restart: dict | None = None) -> RunRecord:
    """The sequential executor in this process, from the run's newest checkpoint (none:
    from the start); ``restart``: what torchrun's restart of this process is noted as."""
    cfg = prep.cfg
    store, epoch = checkpoints(prep)
    resumed = store.load(epoch, prep.device) if epoch else None
    if resumed is None:
        store.remove()  # what an earlier attempt left is not continued
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # before the record: its provenance says so
    record = prepare.open_record(prep, resumed, restart)
    start = time.perf_counter()
    try:
        train(
            prep,
            record,
            progress=progress,
            resumed=resumed,
            store=store if cfg.checkpoint_every else None,
        )
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
