"""A run made ready: config -> task, model, split, stages, all built and checked before
anything is written; then its record opened. Shared by every executor."""

from __future__ import annotations

import ctypes
import gc
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import methods
from methods.base import TrainOptions, match_targets

from . import checkpoint, models
from .config import LAUNCHED, RunConfig, UsageError, ranks, ranks_per_layer
from .data import tasks
from .measure import profile, submodels
from .measure.profile import dummy_input
from .measure.provenance import now, provenance
from .models import paper, rnn, runtime, slicing, split
from .records import RunRecord, read_json


def classification_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy; for one target per step (a language model) the mean over a
    sample's steps; a step-by-step head's output is read at the last step where there is one
    target per sequence."""
    logits = match_targets(logits, y)
    if y.dim() == 2:
        return (
            F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
            .view(y.shape)
            .mean(1)
        )
    return F.cross_entropy(logits, y, reduction="none")


@dataclass
class Prepared:
    """Everything a run needs, built and checked before anything is written."""

    cfg: RunConfig
    task: tasks.Task | None  # None on the ranks of a distributed run that get no data
    device: torch.device
    cuts: list[int]
    shapes: list[tuple]  # per-sample output shape of each group
    stage_params: list[int]  # parameters of each group
    stages: list[methods.Stage]  # every stage; a distributed rank uses its own only


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve(cfg: RunConfig) -> RunConfig:
    """Validated config with the task's default model filled in (no data loaded)."""
    cfg = cfg.validated()
    if cfg.task not in tasks.TASKS:
        raise UsageError(f"unknown task '{cfg.task}' (choose from {', '.join(tasks.TASKS)})")
    model = cfg.model or tasks.TASKS[cfg.task].default_model
    if model not in models.MODELS:
        raise UsageError(f"unknown model '{model}' (choose from {', '.join(models.MODELS)})")
    return replace(cfg, model=model)


class _PassThrough(nn.Module):
    """A layer group that does nothing (one parameter, so that it has an optimizer)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


def local_parts(
    cfg: RunConfig, shape: tuple, classes: int, batch_size: int, device: torch.device | None = None
):
    """The rule's local work on features of per-sample ``shape``, one batch at a time, as two
    callables: the stage's forward call (its local module's forward and backward, the update)
    and what it does when the upstream message comes (``None`` where the rule sends none),
    on a stage of a do-nothing group, with random features and messages (on ``device``, run
    as ``place`` runs a stage there, conv features channels-last as a run's conv groups hand
    them over: ``runtime.as_held``; else on the CPU as built). The second stands
    for the message of the last batch the first ran."""
    last = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), classes))
    stage = methods.build_stages(
        cfg.method,
        [_PassThrough(), last],
        [shape, (classes,)],
        classes,
        classification_loss,
        train_options(cfg, device),
        cfg.options,
        image_shape=tasks.TASKS[cfg.task].input_shape,
    )[0]
    if device is not None:
        place(replace(cfg, compile=False), [stage], device)
    x = torch.randn(batch_size, *shape, device=device)
    if device is not None:  # a conv group's features, as a run holds them
        x = runtime.as_held(x)
    y = torch.randint(classes, (batch_size,), device=device)
    if stage.needs_image:  # a random image for a rule that reconstructs it
        stage.image = torch.rand(batch_size, *tasks.TASKS[cfg.task].input_shape, device=device)
    message = {"gradient": x, "loss": y.float(), None: None}[stage.upstream]
    batches = iter(range(1 << 30))
    done: list[int] = []

    def forward():
        done.append(next(batches))
        stage.forward(done[-1], *stage.input(done[-1], x, y))

    def receive():
        stage.receive(done.pop(), message)

    return forward, (receive if message is not None else None)


def local_work(cfg: RunConfig, shape: tuple, classes: int, batch_size: int):
    """One batch of the rule's local work on features of per-sample ``shape``, as a callable:
    its forward call, then (with a random message) its upstream update (``local_parts``)."""
    forward, receive = local_parts(cfg, shape, classes, batch_size)

    def work():
        forward()
        if receive is not None:
            receive()

    return work


def local_cost(cfg: RunConfig, shape: tuple, classes: int) -> float:
    """What the rule's local work on features of ``shape`` adds to a stage, in the units of
    the split: training FLOPs per sample (forward and backward, counted as the rule runs
    them) or measured seconds of a batch."""
    if cfg.split == "time":
        return split.seconds(local_work(cfg, shape, classes, cfg.batch_size))
    return local_training_flops(cfg, shape, classes)


def local_training_flops(cfg: RunConfig, shape: tuple, classes: int) -> float:
    """Training FLOPs per sample of the rule's local work on features of ``shape``."""
    batch = 2 * cfg.options.get("microbatches", 1)  # two samples (per micro-batch) suffice
    return profile.count_work_flops(local_work(cfg, shape, classes, batch)) / batch


def train_options(cfg: RunConfig, device: torch.device | None = None) -> TrainOptions:
    """The optimizers' settings; fused optimizer steps on a GPU."""
    return TrainOptions(
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        clip=cfg.clip_grad,
        fused=device is not None and device.type == "cuda",
    )


def cudagraphs(cfg: RunConfig) -> bool:
    """Whether compiled modules may use CUDA graphs, whose outputs live until the next
    batch only: the sequential executor, whose messages are all applied within the batch,
    under a rule that keeps no activation across batches (an asynchronous rule's replay
    buffer does)."""
    return cfg.executor == "sequential" and methods.resolve(cfg.method).timing != "asynchronous"


def place(cfg: RunConfig, stages, device: torch.device) -> None:
    """Move ``stages`` to ``device`` and run them at the run's precision, memory format and
    compilation (``models.runtime``)."""
    runtime.set_precision(cfg.precision)
    for stage in stages:
        for module in stage.modules():
            module.to(device)
    runtime.apply(
        stages,
        precision=cfg.precision,
        compile=cfg.compile,
        device=device,
        cudagraphs=cudagraphs(cfg),
    )


def stand_in(prep: Prepared, k: int, module: nn.Module, rows: int):
    """A random batch of ``rows`` shaped as stage ``k`` receives it (word ids where
    ``module`` starts with an embedding) and labels: what a warm-up trains on."""
    info = tasks.TASKS[prep.cfg.task]
    shape = info.input_shape if k == 0 else prep.shapes[k - 1]
    y = torch.randint(info.num_classes, (rows, *prep.shapes[-1][:-1]), device=prep.device)
    return dummy_input(module, shape, rows, device=prep.device), y


def rehearse(stage: methods.Stage, batch: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """``stage`` alone through one batch: its forward, then a random stand-in for the
    upstream message where the rule waits for one."""
    h, _ = stage.forward(batch, *stage.input(batch, x, y))
    if stage.upstream is not None and not stage.last:
        message = (
            torch.randn_like(h)
            if stage.upstream == "gradient"
            else torch.rand(y.shape[0], device=h.device)
        )
        stage.receive(batch, message)


def warm_up_stage(prep: Prepared, stage: methods.Stage, k: int, rows: int) -> float:
    """Seconds to compile what ``stage`` (of layer group ``k``) runs in training: two
    stand-in batches of ``rows`` through it alone (``rehearse``), after which it is as it
    was (``runtime.warm_up``). On ranks, every rank at once: some stages gather or reduce
    across ranks."""
    reset_states([stage], rows)
    return runtime.warm_up(
        [stage], lambda: rehearse(stage, -1, *stand_in(prep, k, stage.group, rows)), prep.device
    )


def threads_per_rank(cfg: RunConfig) -> int:
    """CPU threads of each process: ``--threads``, else cores / ranks for a run on ranks
    (distributed, ddp), else torch's default."""
    if cfg.threads:
        return cfg.threads
    if cfg.executor in LAUNCHED:
        return max(1, (os.cpu_count() or 1) // ranks(cfg))
    return torch.get_num_threads()


#: glibc's ``mallopt`` parameters, and the values ``hold_freed_memory`` gives them
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (its dynamic threshold's ceiling on 64 bits)
TRIM_THRESHOLD = 1 << 30


def hold_freed_memory() -> bool:
    """Keep the memory a training step frees in this process's heap for the next step: a
    fixed mmap threshold (32 MiB) and trim threshold (1 GiB) for glibc's allocator. Left
    dynamic, they move while a fresh process trains, and it maps and faults in new pages
    for a whole epoch (a rank of DGL on 2 CPU ranks: 89,000 page faults and an epoch 1.1-1.3
    times its next; warm processes: none). True where the C library takes them (glibc)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def freeze_what_is_loaded() -> None:
    """Once per process, before a run builds anything: the objects the process holds so far
    (its libraries: some 250,000 here) are collected once and frozen out of the garbage
    collector's way for good (``gc.freeze``). A full collection otherwise walks them all,
    ~150 ms here, at some step of some rank, and on ranks it stalls every rank that waits
    for the collecting one (pipelined BP on 2 CPU ranks: one an epoch after the first, 5-7%
    of a 2-epoch run). Runs' own objects stay the collector's, so what a run leaves in
    cycles is collected as before. Done once: a process with objects frozen is left as it is."""
    if not gc.get_freeze_count():
        gc.collect()
        gc.freeze()


def settle_process() -> None:
    """This process as a run trains in it, and as the calibration times in it: its heap
    keeps what a step frees (``hold_freed_memory``) and its libraries are out of the garbage
    collector's way (``freeze_what_is_loaded``)."""
    hold_freed_memory()
    freeze_what_is_loaded()


@contextmanager
def torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def paper_cuts(model: str, groups: int) -> list[int]:
    """The published cut points of ``model`` for ``groups`` layer groups."""
    known = paper.PAPER_CUTS.get(model, {})
    if groups not in known:
        have = ", ".join(f"K={k}" for k in known) or "none"
        raise UsageError(
            f"--split paper: no published cut points for {model} with K={groups} "
            f"(published: {have})"
        )
    return known[groups]


def resolve_cuts(cfg: RunConfig, model, input_shape, classes: int, cuts=None) -> list[int]:
    """Where ``model`` is cut for ``cfg``: ``cuts`` where given, else the run's own (explicit,
    published, or balanced by ``cfg.split`` with the rule's local work at each cut)."""
    if cuts is None and cfg.cuts is None and cfg.split == "paper" and cfg.groups > 1:
        cuts = paper_cuts(cfg.model, cfg.groups)
    local = lambda shape: local_cost(cfg, shape, classes)  # noqa: E731
    with torch_threads(threads_per_rank(cfg)):  # time the blocks as the ranks will run them
        return split.resolve_cuts(
            model,
            cfg.groups,
            input_shape=input_shape,
            by=cfg.split,
            cuts=cfg.cuts if cuts is None else cuts,
            batch_size=cfg.batch_size,
            local_cost=local,
        )


def planned_cuts(cfg: RunConfig) -> list[int] | None:
    """The cuts a run will train on, known without running it: explicit, published or
    balanced by FLOPs; ``None`` for a split by measured time (known only where it runs)."""
    if cfg.split == "time" and cfg.cuts is None and cfg.groups > 1:
        return None
    info = tasks.TASKS[cfg.task]
    model = models.build_model(cfg.model, info.input_shape, info.num_classes, width=cfg.width)
    try:
        return resolve_cuts(cfg, model, info.input_shape, info.num_classes)
    except ValueError as e:
        raise UsageError(str(e)) from None


def build_groups(cfg: RunConfig, input_shape, classes: int, cuts: list[int] | None = None):
    """The model split into ``cfg.groups`` layer groups (width-grouped for GN-DGL), at
    ``cuts`` where given (a distributed rank takes those its launcher resolved)."""
    torch.manual_seed(cfg.seed)
    model = models.build_model(cfg.model, input_shape, classes, width=cfg.width)
    cuts = resolve_cuts(cfg, model, input_shape, classes, cuts)
    if methods.resolve(cfg.method).neuron_grouped:  # the width-grouped net
        torch.manual_seed(cfg.seed)
        model = models.build_model(
            cfg.model,
            input_shape,
            classes,
            width=cfg.width,
            neuron_groups=cfg.options["neuron_groups"],
            mix_at=[0, *cuts],
        )
    groups = split.split_model(model, cfg.groups, input_shape=input_shape, cuts=cuts)
    return groups, cuts


def prepare(
    cfg: RunConfig,
    *,
    stage: int | None = None,
    device: torch.device | None = None,
    data: bool = True,
    cuts: list[int] | None = None,
) -> Prepared:
    """Resolve, load and build; any bad input raises UsageError before a file is written.

    A rank of a distributed run moves only its ``stage`` to ``device``, only rank 0 loads
    the ``data`` (the others receive activations and labels), and every rank takes the
    ``cuts`` its launcher resolved (a split by measured time differs from one measure to
    the next). The process is settled for training first (``settle_process``)."""
    settle_process()
    cfg = resolve(cfg)
    device = device or resolve_device(cfg.device)
    info = tasks.TASKS[cfg.task]
    if cuts is None and cfg.cuts is None and cfg.split == "time" and cfg.checkpoint_every:
        cuts = checkpoint.saved_cuts(run_folder(cfg))  # resumed on the split it was trained on
    try:
        groups, cuts = build_groups(cfg, info.input_shape, info.num_classes, cuts)
        shapes = split.group_output_shapes(groups, info.input_shape)
        torch.manual_seed(cfg.seed)
        stages = methods.build_stages(
            cfg.method,
            groups,
            shapes,
            info.num_classes,
            classification_loss,
            train_options(cfg, device),
            cfg.options,
            image_shape=tasks.TASKS[cfg.task].input_shape,
        )
        if cfg.placement == "neuron" and stage is None:  # can each layer group be sliced?
            for group in groups:
                body = list(group)[:-1] if group is groups[-1] else list(group)
                slicing.neuron_slice(nn.Sequential(*body), 0, ranks_per_layer(cfg))
    except ValueError as e:  # SplitError, channel/neuron-group mismatch, bad option value
        raise UsageError(str(e)) from None
    if (
        cfg.executor in LAUNCHED
        and stage is None
        and device.type == "cuda"
        and torch.cuda.device_count() < ranks(cfg)
    ):
        fewer = "--workers" if cfg.executor == "ddp" else "--groups"
        raise UsageError(
            f"--executor {cfg.executor} on CUDA gives each of the {ranks(cfg)} ranks "
            f"a GPU of its own, and this machine has {torch.cuda.device_count()}: "
            f"add --device cpu (gloo) or use fewer {fewer}"
        )
    if cfg.batch_size % stages[0].microbatches:
        raise UsageError(
            f"--batch-size {cfg.batch_size} does not split into "
            f"{stages[0].microbatches} micro-batches"
        )
    place(cfg, stages if stage is None else [stages[stage]], device)
    parameters = [sum(p.numel() for p in g.parameters()) for g in groups]
    if not data:
        return Prepared(cfg, None, device, cuts, shapes, parameters, stages)
    try:
        task = tasks.load_task(
            cfg.task, cfg.data_dir, limit_train=cfg.limit_train, limit_test=cfg.limit_test
        ).to(device)
    except tasks.DataUnavailable as e:
        raise UsageError(str(e)) from None
    if task.steps(cfg.batch_size) < 1:
        raise UsageError(
            f"--batch-size {cfg.batch_size} leaves no whole training batch in {cfg.task}"
        )
    return Prepared(cfg, task, device, cuts, shapes, parameters, stages)


def eval_batch_size(cfg: RunConfig, task) -> int:
    """The test batch size: the run's, else the task's (a language model's test streams)."""
    return cfg.eval_batch_size or task.eval_batch_size


def static_rows(prep: Prepared) -> dict:
    """FLOPs and parameters of every group, local head and sub-model, and the split's
    balance (epoch 1's rows)."""
    rows = submodels.costs(prep.stages, tasks.TASKS[prep.cfg.task].input_shape)
    rows["", "split_balance"] = split_balance(prep, rows)
    return rows


def split_balance(prep: Prepared, rows: dict) -> float:
    """How evenly the run's cuts share the rule's training work, in FLOPs: the mean stage
    cost over the largest (1: even). A stage costs 3 x its group's forward FLOPs and, but for
    the last, the rule's local training FLOPs on its output (what the FLOPs split balances,
    making the largest as small as the blocks allow). Where it is low, no pipeline of these
    stages comes near the rule's bound at perfect balance."""
    count, classes = len(prep.stages), tasks.TASKS[prep.cfg.task].num_classes
    with torch.random.fork_rng(devices=[]):  # the counting run draws; the run's draws stay put
        costs = [
            3 * rows[str(k + 1), "group_flops"]
            + (local_training_flops(prep.cfg, prep.shapes[k], classes) if k < count - 1 else 0.0)
            for k in range(count)
        ]
    return sum(costs) / count / max(costs)


def wants_inference(prep: Prepared) -> bool:
    """Whether progressive inference and ensembles apply: the rule has sub-models, there are
    several groups, and the task one target per sample."""
    per_step = len(prep.shapes[-1]) > 1  # the final output has a target per step
    return methods.resolve(prep.cfg.method).has_submodels and len(prep.stages) > 1 and not per_step


def inference(prep: Prepared, costs: dict) -> submodels.Inference | None:
    """Progressive inference and ensembles, where they apply (``wants_inference``)."""
    if not wants_inference(prep):
        return None
    return submodels.Inference(submodels.exit_flops(costs, prep.stages))


def run_folder(cfg: RunConfig) -> Path:
    return Path(cfg.out) / cfg.experiment / cfg.run_id


def check_writable(cfg: RunConfig) -> None:
    """UsageError unless the run's folder can be created (it is left in place)."""
    try:
        run_folder(cfg).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write to --out {cfg.out}: {e.strerror or e}") from None


def open_record(
    prep: Prepared, resumed: dict | None = None, restart: dict | None = None
) -> RunRecord:
    """Create the run folder (UsageError if it cannot be written) and its files. A run
    ``resumed`` from a checkpoint (its ``epoch`` and ``rows``) keeps its run.json, the
    resume noted in ``resumes`` (or, when torchrun's elastic agent started it again, the
    ``restart`` in ``restarts``, with the epoch it continues from), and the rows written up
    to that epoch."""
    cfg = prep.cfg
    folder = run_folder(cfg)
    machine = provenance(prep.device)
    info = {
        "run_id": cfg.run_id,
        "experiment": cfg.experiment,
        "status": "running",
        "error": None,
        "config": asdict(cfg),
        "started": now(),
        "ended": None,
        "split": {"by": cfg.split if cfg.cuts is None else "explicit", "cuts": prep.cuts},
        "parameters_per_stage": prep.stage_params,
        "provenance": machine,
    }
    record = RunRecord(folder, {**asdict(cfg), "run_id": cfg.run_id}, info)
    if resumed is not None or restart is not None:
        before = read_json(folder / "run.json")
        if isinstance(before, dict) and before.get("run_id") == cfg.run_id:
            info.update({k: before[k] for k in ("started", "resumes", "restarts") if k in before})
    if restart is not None:
        info["restarts"] = [
            *info.get("restarts", []),
            {**restart, "from_epoch": resumed["epoch"] if resumed else 0},
        ]
    elif resumed is not None:
        info["resumes"] = [
            *info.get("resumes", []),
            {"epoch": resumed["epoch"], "at": now(), "host": machine["hostname"]},
        ]
    if resumed is not None:
        record.rows = list(resumed["rows"])
    if cfg.tensorboard:
        from bench.measure.curves import Curves

        try:
            record.curves = Curves(
                cfg.tensorboard, cfg.run_id, asdict(cfg), resumed["epoch"] if resumed else 0
            )
        except OSError as e:
            raise UsageError(
                f"cannot write to --tensorboard {cfg.tensorboard}: {e.strerror or e}"
            ) from None
    try:
        record.start()
    except OSError as e:
        raise UsageError(f"cannot write to --out {cfg.out}: {e.strerror or e}") from None
    return record


def reset_states(stages, rows: int) -> None:
    """Start every stateful layer (a language model's LSTMs) afresh for batches of ``rows``."""
    for stage in stages:
        for module in stage.modules():
            rnn.reset_states(module, rows)
