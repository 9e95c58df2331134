"""What a model asks of a device, block by block, for one rule: FLOPs, bytes of parameters,
of activations saved for backward and of messages, and the rule's local work on each
block's output. Counted, not timed: a ``Workload`` is the same on every machine (times come
from a profile: ``bench.forecast.predict``)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import methods
from bench import models, prepare
from bench.config import RunConfig
from bench.data import tasks
from bench.measure import memory
from bench.measure.profile import SavedTensorMeter, count_flops, count_work_flops, dummy_input

#: the two batch sizes at which saved activations are metered (bytes = fixed + per sample x n)
METERED = (2, 4)
FLOAT = 4  # bytes of an fp32 element: weights, gradients and every message stay fp32
LABEL = 8  # bytes of an int64 label


class _Counted:
    """Bytes of a counted module's parameters, and of what it saves for a batch of ``n``."""

    @property
    def param_bytes(self) -> int:
        return FLOAT * self.params

    def saved(self, n: int) -> float:
        return self.saved_fixed + self.saved_per_sample * n


@dataclass(frozen=True)
class Block(_Counted):
    """One block of the model: forward FLOPs per sample, parameters (count, tensors), bytes
    saved for backward (fixed + per sample), output elements per sample, and the elements of
    its buffers (batch norm's running statistics: DDP broadcasts them before each forward)."""

    flops: float
    params: int
    tensors: int
    saved_fixed: float
    saved_per_sample: float
    out_shape: tuple
    saves_input: bool = True
    saves_output: bool = False
    buffers: int = 0

    @property
    def out_numel(self) -> int:
        return math.prod(self.out_shape)


@dataclass(frozen=True)
class Local(_Counted):
    """The rule's local module on a block's output: training FLOPs per sample of the stage's
    forward call and of the update the upstream message brings, its parameters, its
    optimizer, its saved bytes (fixed + per sample) and what goes upstream per sample."""

    forward_flops: float
    receive_flops: float
    params: int
    tensors: int
    optimizer: (
        str  # "adam" (LC critic, DNI synthesizer) or "sgd" (a parameter group of the stage's SGD)
    )
    saved_fixed: float
    saved_per_sample: float
    up_numel: int  # elements per sample sent upstream by the stage below (0: nothing)


@dataclass(frozen=True)
class Workload:
    """A model under a rule: its blocks, the rule's local work after each block (``None``
    after the last), and what the first stage receives per sample."""

    model: str
    task: str
    method: str
    width: float
    options: tuple  # the rule's options, as sorted (key, value) pairs
    blocks: tuple[Block, ...]
    local: tuple[Local | None, ...]  # after each block (None after the last)
    input_numel: int
    label_numel: int
    upstream: str | None  # what the rule sends upstream: "gradient", "loss" or None
    #: GN-DGL: the width-grouped blocks, (grouped, mixing) (None: the model cannot be grouped)
    grouped: tuple | None = None
    #: what the rule steps its groups below the last, and its last group, with: "sgd" (the
    #: run's) or "adam" (DNI's own, by default below the last group only)
    group_optimizers: tuple[str, str] = ("sgd", "sgd")

    def group_optimizer(self, last: bool) -> str:
        return self.group_optimizers[last]

    @property
    def params(self) -> int:
        return sum(b.params for b in self.blocks)


def _saved_bytes(run) -> tuple[float, float]:
    """``(fixed, per sample)`` of bytes saved for backward, from ``run(n)`` metered at the
    METERED batch sizes."""
    (n1, s1), (n2, s2) = [(n, run(n)) for n in METERED]
    per = (s2 - s1) / (n2 - n1)
    return s1 - per * n1, per


def _blocks(model: nn.Sequential, input_shape) -> list[Block]:
    out, x = [], dummy_input(model, input_shape, max(METERED))
    model.train()
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):  # as a run holds it (models.runtime)
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    for block in model:
        shares = []  # whether the block saves its input, its output (once per group, in a run)

        def metered(n, block=block, x=x):
            x_in = (
                x[:n]
                .clone(memory_format=torch.preserve_format)
                .requires_grad_(x.is_floating_point())
            )
            with SavedTensorMeter(block) as meter:
                y = block(x_in)
            shares[:] = [meter.saves(x_in), meter.saves(y)]
            return meter.bytes

        fixed, per = _saved_bytes(metered)
        flops = count_flops(block, x[:1])
        with torch.no_grad():
            x = block(x)
        out.append(
            Block(
                flops=float(flops),
                params=sum(p.numel() for p in block.parameters()),
                tensors=len(list(block.parameters())),
                saved_fixed=fixed,
                saved_per_sample=per,
                out_shape=tuple(x.shape[1:]),
                saves_input=shares[0],
                saves_output=shares[1],
                buffers=sum(b.numel() for b in block.buffers()),
            )
        )
    return out


def group_saved(blocks: Sequence[Block], n: int) -> float:
    """Bytes a group of consecutive ``blocks`` saves for backward on a batch of ``n``: each
    block's, less the output of one block saved again as the next one's input (one storage,
    which a run's meter counts once)."""
    shared = sum(
        FLOAT * a.out_numel * n
        for a, b in zip(blocks, blocks[1:])
        if a.saves_output and b.saves_input
    )
    return sum(b.saved(n) for b in blocks) - shared


def _group_optimizers(cfg: RunConfig, classes: int, shape: tuple) -> tuple[str, str]:
    """What the rule steps a group below the last (its output of ``shape``) and the last group
    with: ``"adam"`` where it is an Adam of the rule's own, else ``"sgd"``."""
    stages = methods.build_stages(
        cfg.method,
        [nn.Linear(1, 1), nn.Linear(1, classes)],
        [shape, (classes,)],
        classes,
        prepare.classification_loss,
        prepare.train_options(cfg),
        cfg.options,
        image_shape=tasks.TASKS[cfg.task].input_shape,
    )
    kinds = ["adam" if isinstance(s.optimizer, torch.optim.Adam) else "sgd" for s in stages]
    return kinds[0], kinds[1]


def _local(cfg: RunConfig, shape: tuple, classes: int) -> Local:
    """The rule's local work on features of ``shape`` (``prepare.local_parts``): FLOPs counted
    as the rule runs it, bytes metered by the run's own probe."""
    flops = []
    for part in (0, 1):
        n = 2
        parts = prepare.local_parts(cfg, shape, classes, n)
        if parts[part] is None:
            flops.append(0.0)
            continue
        if part == 1:
            parts[0]()
        flops.append(count_work_flops(parts[part]) / n)
    stage = methods.build_stages(
        cfg.method,
        [prepare._PassThrough(), nn.Linear(1, classes)],
        [shape, (classes,)],
        classes,
        prepare.classification_loss,
        prepare.train_options(cfg),
        cfg.options,
        image_shape=tasks.TASKS[cfg.task].input_shape,
    )[0]
    prepare.place(cfg, [stage], torch.device("cpu"))  # channels-last, as a run holds it
    local = [m for m in stage.modules() if m is not stage.group]
    params = [p for m in local for p in m.parameters()]
    separate = [o for o in stage.optimizers() if o is not stage.optimizer]

    def metered(n):
        probe = memory.ActivationProbe(stage)
        x, y = torch.randn(n, *shape), torch.randint(classes, (n,))
        if stage.needs_image:
            stage.image = torch.rand(n, *tasks.TASKS[cfg.task].input_shape)
        with probe:
            stage.forward(0, x, y)
        stage.kept.clear()
        return probe.local_bytes

    fixed, per = _saved_bytes(metered)
    up = {"gradient": math.prod(shape), "loss": 1, None: 0}[stage.upstream]
    return Local(
        forward_flops=flops[0],
        receive_flops=flops[1],
        params=sum(p.numel() for p in params),
        tensors=len(params),
        optimizer="adam" if separate else "sgd",
        saved_fixed=fixed,
        saved_per_sample=per,
        up_numel=up,
    )


@functools.cache
def blocks(
    model: str, task: str, width: float = 1.0, neuron_groups: int = 1, mixing: bool = False
) -> tuple[Block, ...]:
    """Every block of ``model`` on ``task``, counted once per process; width-grouped into
    ``neuron_groups`` (GN-DGL: grouped convolutions but in block 0, or, ``mixing``, in the
    first conv of every block, as the first block of each layer group has it)."""
    info = tasks.TASKS[task]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = models.build_width_grouped(
            model,
            info.input_shape,
            info.num_classes,
            width=width,
            neuron_groups=neuron_groups,
            mixing=mixing,
        )
        return tuple(_blocks(net, info.input_shape))


@functools.cache
def local(method: str, task: str, shape: tuple, options: tuple = ()) -> Local | None:
    """The local work of ``method`` (with ``options``, sorted pairs) on features of
    ``shape``; ``None`` for a rule without a local module (BP, pipelined BP, the floor)."""
    if not methods.resolve(method).local_module:
        return None
    cfg = RunConfig(method=method, task=task, options=dict(options)).validated()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _local(cfg, shape, tasks.TASKS[task].num_classes)


def workload(
    model: str,
    task: str,
    method: str | None = None,
    *,
    width: float = 1.0,
    options: dict | None = None,
) -> Workload:
    """Count ``model`` on ``task`` under ``method`` (its local modules with ``options``;
    default the reference, BP)."""
    method = method or methods.reference()
    info = tasks.TASKS[task]
    cfg = RunConfig(
        method=method, task=task, model=model, width=width, options=dict(options or {})
    ).validated()
    counted = blocks(model, task, width)
    pairs = tuple(sorted((k, v) for k, v in cfg.options.items() if v is not None))
    grouped = None
    if methods.resolve(cfg.method).neuron_grouped:
        try:
            grouped = tuple(
                blocks(model, task, width, cfg.options["neuron_groups"], mixing)
                for mixing in (False, True)
            )
        except ValueError:  # a model without width-grouped layers (an MLP, torchvision's)
            pass
    after = tuple(local(cfg.method, task, b.out_shape, pairs) for b in counted[:-1]) + (None,)
    return Workload(
        model=model,
        task=task,
        method=cfg.method,
        width=width,
        options=pairs,
        blocks=counted,
        local=after,
        input_numel=math.prod(info.input_shape),
        label_numel=math.prod(counted[-1].out_shape[:-1]) or 1,
        upstream=methods.resolve(cfg.method).stage.upstream,
        grouped=grouped,
        group_optimizers=_group_optimizers(cfg, info.num_classes, counted[0].out_shape),
    )
