"""The reference executor: one process; per batch every stage in order, then the upstream
messages of that same batch. Deterministic for a seed."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from tqdm import tqdm

from bench import checkpoint, prepare
from bench.measure import diagnostics, memory, timing
from bench.measure.provenance import now
from bench.models import runtime
from bench.records import RunFailed, RunRecord, save_weights
from bench.schedule import LRSchedule, epoch_steps, scheduled
from methods import Stage
from methods.base import correct

from . import epochs
from .epochs import stage_label


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
    probes: Sequence[memory.ActivationProbe] = (),
) -> float:
    """Train on every ``(x, y)`` of ``batches``; return the wall-clock seconds it took.
    ``probes`` are attached around the first batch."""
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
        with memory.probing(probes) if batch == 0 else nullcontext():
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


def train(
    prep: prepare.Prepared,
    record: RunRecord,
    *,
    store: checkpoint.Checkpoints,
    progress: bool = True,
    resumed: dict | None = None,
) -> None:
    """The epochs (``epochs.run``) of every stage in this process, with the local-signal
    diagnostics; checkpoints to ``store``. A run ``resumed`` from a checkpoint continues
    after its epoch as if it had never stopped: at an epoch's end no batch is in flight, so
    the stages, the RNG states and the rows are all there is."""
    cfg, task, device, stages = prep.cfg, prep.task, prep.device, prep.stages
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    timers = [timing.PhaseTimer(device) for _ in stages]
    for stage, timer in zip(stages, timers):
        stage.phase = timer
    probes = [memory.ActivationProbe(stage) for stage in stages]
    costs = prepare.static_rows(prep)
    probe = next(iter(task.test_batches(cfg.batch_size)), None)
    signals = probe is not None and diagnostics.wanted(stages)
    drift_x = probe[0][: diagnostics.DRIFT_SAMPLES] if probe is not None else None
    schedule, plan = (
        LRSchedule(cfg, task.steps(cfg.batch_size)),
        epoch_steps(cfg, task.steps(cfg.batch_size)),
    )
    done = epochs.resume(stages, resumed, device, generator)
    if resumed is not None:
        drift_start = resumed["drift_start"]
    elif drift_x is not None:
        prepare.reset_states(stages, drift_x.shape[0])
        drift_start = diagnostics.group_outputs(stages, drift_x)
    compiled = warm_up(prep) if cfg.compile else None
    for timer in timers:
        timer.pop()  # the warm-up's phases
    size = prepare.eval_batch_size(cfg, task)

    def train_stages(epoch, first, steps, probes):
        batches = task.train_batches(cfg.batch_size, generator)
        seconds = train_epoch(
            stages,
            scheduled(batches, stages, schedule, first, steps),
            device=device,
            total=steps,
            progress=progress,
            desc=f"epoch {epoch}/{len(plan)}",
            probes=probes,
        )
        rows = {
            ("", "epoch_time_s"): seconds,
            ("", "samples_per_s"): steps * cfg.batch_size / seconds,
        }
        rows.update(timing.time_rows(stages, timers, steps))
        return rows

    def diagnose():
        rows = {}
        if signals:
            prepare.reset_states(stages, probe[1].shape[0])
            rows.update(diagnostics.probe_rows(stages, *probe, prepare.classification_loss))
        if drift_x is not None:
            prepare.reset_states(stages, drift_x.shape[0])
            rows.update(diagnostics.movement_rows(stages, drift_x, drift_start))
        return rows

    def save(epoch):
        store.save(
            epoch,
            {
                "stages": [stage.state_dict() for stage in stages],
                "rng": checkpoint.rng_state(device, generator),
                "drift_start": drift_start if drift_x is not None else None,
                "rows": record.rows,
            },
        )
        store.commit(epoch)

    process = epochs.Process(
        stages=stages,
        labels=[str(stage.index + 1) for stage in stages],
        label="",
        probes=probes,
        device=device,
        batch_rows=cfg.batch_size,
        eval_rows=size,
        costs=costs,
        compiled=compiled,
        train=train_stages,
        evaluate=lambda: evaluate(
            stages,
            task.test_batches(size),
            prepare.classification_loss,
            prepare.inference(prep, costs),
        ),
        meet=lambda steps, rows, learned: rows,  # the run's rows are all here
        save=save,
        diagnose=diagnose,
    )
    epochs.run(process, record, plan=plan, done=done, every=cfg.checkpoint_every)


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
        train(prep, record, store=store, progress=progress, resumed=resumed)
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
