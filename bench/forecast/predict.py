"""A contender on K workers, forecast: its stages' costs from a workload and a profile, fed
to the formulas of ``bench.forecast.model``.

Seconds of each part come from the profile: timed by ``lcbench calibrate`` where the profile
holds the model (interpolated between the timed batch sizes), else from FLOPs at the
profile's achieved FLOP/s plus its fixed overhead per block (a block's backward pass taken as
twice its forward, as the FLOPs split does) and its optimizer step from the parameter bytes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, replace

import methods
from bench.models import split

from . import model
from .model import Link, StageCost, StageMemory
from .profiles import Profile, ProfileError
from .workload import FLOAT, LABEL, Workload, group_saved

#: the timings of stages that each train on a local signal (``methods.TIMINGS``)
DECOUPLED = ("decoupled", "asynchronous")


def timing(rule: str) -> str:
    """How the forecast times the contender ``rule`` (what the rule declares)."""
    return methods.contender(rule).timing


def rules() -> tuple[str, ...]:
    """The contenders the forecast prices (every rule but the floor, and DDP)."""
    return tuple(m.name for m in methods.contenders() if m.timing != "floor")


#: passes over the parameter bytes of an optimizer step (SGD momentum: p, g, m read, p, m
#: written; Adam also its second moment)
STEP_PASSES = {"sgd": 1.0, "adam": 7 / 5}
#: the share of a device's memory kept for the CUDA context, workspaces and fragmentation
RESERVE = 0.1


def interpolate(sizes, values, n: float) -> float:
    """``values`` measured at batch ``sizes``, at ``n``: piecewise linear, the end segments
    extended (one size: proportional)."""
    if len(sizes) == 1:
        return values[0] * n / sizes[0]
    i = min(max(bisect.bisect_left(sizes, n), 1), len(sizes) - 1)
    (a, b), (ta, tb) = (sizes[i - 1], sizes[i]), (values[i - 1], values[i])
    return max(0.0, ta + (tb - ta) * (n - a) / (b - a))


class Times:
    """Seconds of a workload's parts on one device of a profile, at a per-device batch."""

    def __init__(self, work: Workload, profile: Profile, precision: str = "fp32"):
        self.work, self.profile, self.precision = work, profile, precision
        device = profile.device
        if precision not in device.flops:
            raise ProfileError(
                f"profile {profile.name} has no {precision} rate (it has {', '.join(device.flops)})"
            )
        self.rate = device.flops[precision]
        self.timed = profile.timed_for(work.model, work.task, work.width, precision)
        self.source = "timed" if self.timed is not None else "flops"
        self.built: dict = {}  # (setup, batch) -> what ``_build`` made of them (no link in it)

    def _flops(self, flops: float, n: float, share: float) -> float:
        return self.profile.device.overhead_s * share + flops * n / self.rate

    def grouped(
        self, j: int, mixing: bool, n: float, input_grad: bool, last: bool = False
    ) -> tuple[float, float, float]:
        """Block j width-grouped (GN-DGL, all its neuron groups; ``mixing``: its first layer
        sees every channel): ``(forward, backward, update)`` seconds, timed where the profile
        timed the model so grouped, else from its FLOPs and bytes."""
        passes = STEP_PASSES[self.work.group_optimizer(last)]
        g = dict(self.work.options).get("neuron_groups")
        timed = self.timed.grouped.get((g, mixing)) if self.timed else None
        if timed is not None:
            sizes = self.timed.batch_sizes
            key = "backward_s" if input_grad else "backward_first_s"
            return (
                interpolate(sizes, timed["forward_s"][j], n),
                interpolate(sizes, timed[key][j], n),
                timed["update_s"][j] * passes,
            )
        block = self.work.grouped[1 if mixing else 0][j]
        return (
            self._flops(block.flops, n, 1 / 3),
            self._flops(2 * block.flops, n, 2 / 3),
            block.param_bytes * passes / self.profile.device.update_bytes_per_s,
        )

    def _timed(self, key: str, j: int, n: float, held: bool) -> float:
        """A timed pass, as a pipeline holds its micro-batches where it was timed so
        (``held``) and asked for."""
        if held and self.timed.held.get("sizes"):
            return interpolate(self.timed.held["sizes"], self.timed.held[key][j], n)
        return interpolate(self.timed.batch_sizes, getattr(self.timed, key + "_s")[j], n)

    def forward(self, j: int, n: float, held: bool = False) -> float:
        if self.timed:
            return self._timed("forward", j, n, held)
        return self._flops(self.work.blocks[j].flops, n, 1 / 3)

    def backward(self, j: int, n: float, input_grad: bool, held: bool = False) -> float:
        if self.timed:
            return self._timed("backward" if input_grad else "backward_first", j, n, held)
        return self._flops(2 * self.work.blocks[j].flops, n, 2 / 3)

    def update(self, j: int, last: bool = False) -> float:
        """Block j's optimizer step (``last``: in the last group)."""
        passes = STEP_PASSES[self.work.group_optimizer(last)]
        if self.timed:  # timed with SGD
            return self.timed.update_s[j] * passes
        return self.work.blocks[j].param_bytes * passes / self.profile.device.update_bytes_per_s

    def input(self, n: float) -> float:
        """The input pipeline's seconds per batch of ``n`` (0 where untimed: data held and
        augmented on the device, as lcbench does)."""
        return interpolate(self.timed.batch_sizes, self.timed.input_s, n) if self.timed else 0.0

    def local(self, j: int, n: float) -> tuple[float, float]:
        """``(forward call, upstream update)`` seconds of the rule's local work after block j."""
        local = self.work.local[j]
        if local is None:
            return 0.0, 0.0
        key = (self.work.method, self.work.options, self.work.blocks[j].out_shape)
        if self.timed and key in self.timed.local:
            sizes, forward, receive = self.timed.local[key]
            return (
                interpolate(sizes, forward, n),
                interpolate(sizes, receive, n) if receive else 0.0,
            )
        step = (
            local.param_bytes
            * STEP_PASSES[local.optimizer]
            / self.profile.device.update_bytes_per_s
        )
        forward = self._flops(local.forward_flops, n, 1.0)
        if local.receive_flops:
            return forward, self._flops(local.receive_flops, n, 1.0) + step
        return forward + step, 0.0


@dataclass(frozen=True)
class Setup:
    """How a contender uses K workers: S stages x D replicas (x G neuron groups for GN-DGL),
    M micro-batches and the schedule for pipelined BP, the cuts (None: balanced here)."""

    rule: str
    workers: int
    stages: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"
    neuron_groups: int = 1
    cuts: tuple[int, ...] | None = None

    @property
    def replicas(self) -> int:
        return self.workers // (self.stages * self.neuron_groups)


@dataclass(frozen=True)
class Forecast:
    setup: Setup
    step_s: float  # steady seconds per batch
    fill_s: float  # what the first batch adds (a decoupled pipeline's fill)
    memory: tuple[StageMemory, ...]  # per stage, on each of its workers
    cuts: tuple[int, ...]
    source: str  # "timed" or "flops"

    def epoch_s(self, batches: int) -> float:
        return self.fill_s + batches * self.step_s

    @property
    def memory_bytes(self) -> float:
        """The busiest worker's bytes."""
        return max(m.total for m in self.memory)


def _stage_bounds(cuts, n_blocks) -> list[tuple[int, int]]:
    bounds = [0, *cuts, n_blocks]
    return list(zip(bounds, bounds[1:]))


def balanced_cuts(times: Times, stages: int, n: float, rule: str) -> tuple[int, ...]:
    """Cuts that balance the stages' forecast seconds at per-device batch ``n`` (the local
    work at each cut included), by the splitter's DP."""
    key = ("cuts", stages, n, timing(rule) in DECOUPLED)
    if key not in times.built:
        work = times.work
        costs = [
            times.forward(j, n) + times.backward(j, n, True) + times.update(j)
            for j in range(len(work.blocks))
        ]
        ends = (
            [sum(times.local(j, n)) for j in range(len(work.blocks))]
            if timing(rule) in DECOUPLED
            else None
        )
        times.built[key] = tuple(split.balanced_cuts(costs, stages, ends))
    return times.built[key]


def _memory(
    work: Workload,
    a: int,
    b: int,
    n: float,
    *,
    last: bool,
    in_flight: int = 1,
    precision: str = "fp32",
    share: float = 1.0,
    batch: float | None = None,
    blocks=None,
) -> StageMemory:
    """Bytes of the stage of blocks a..b-1 (``blocks``: these, counted otherwise) on one
    worker at (micro-)batch ``n``; ``share`` of them for a neuron group (GN-DGL). A
    micro-batch of a ``batch`` is a view of it: the first block that saves its input keeps
    the batch's whole input alive (as a run meters it)."""
    blocks = blocks or work.blocks[a:b]
    whole = 0.0
    if batch is not None and blocks[0].saves_input:
        size = work.input_numel if a == 0 else work.blocks[a - 1].out_numel
        whole = (batch - n) * FLOAT * size
    params = sum(x.param_bytes for x in blocks) * share
    local = None if last else work.local[b - 1]
    scale = 0.5 if precision == "bf16" else 1.0  # autocast saves bf16 activations
    local_params = local.param_bytes * share if local else 0
    tensors = sum(x.tensors for x in blocks)
    optimizer = model.optimizer_bytes(params, tensors, work.group_optimizer(last))
    if local is not None:
        optimizer += model.optimizer_bytes(local_params, local.tensors, local.optimizer)
    return StageMemory(
        param_bytes=params + local_params,
        grad_bytes=params + local_params,
        optimizer_bytes=optimizer,
        activation_bytes=(group_saved(blocks, n) + whole) * scale * share,
        in_flight=in_flight,
        local_activation_bytes=local.saved(n) * scale * share if local else 0.0,
    )


def _grad_blocks(times: Times, a: int, b: int, n: float, input_grad: bool, share: float = 1.0):
    work = times.work
    return tuple(
        (work.blocks[j].param_bytes * share, times.backward(j, n, input_grad or j > a))
        for j in range(b - 1, a - 1, -1)
    )


def predict(times: Times, setup: Setup, link: Link, batch_size: int) -> Forecast:
    """The contender of ``setup`` on a global batch of ``batch_size``: its steady seconds per
    batch and its memory per worker. Where the profile's workers share a machine
    (``colocated_slowdown`` s > 1), a worker computes 1 + (s - 1) u times slower, u the mean
    share of the step the other workers compute (all of it under DDP, little beside an idle
    stage)."""
    if setup.rule not in rules():
        raise ValueError(f"unknown contender {setup.rule!r} (choose from {', '.join(rules())})")
    key = (setup, batch_size)
    if setup.neuron_groups > 1:  # its all-gather depends on the link
        stages, memory, cuts = _build(times, setup, link, batch_size)
    else:
        if key not in times.built:
            times.built[key] = _build(times, setup, link, batch_size)
        stages, memory, cuts = times.built[key]
    cv = times.profile.device.step_cv
    step, fill = _timing(setup, stages, link, cv)
    s = times.profile.device.colocated_slowdown
    if setup.workers > 1 and s != 1:
        per = setup.microbatches if timing(setup.rule) == "pipeline" else 1
        busy = [
            min(
                1.0,
                ((st.forward_s + st.backward_s + st.receive_s) * per + st.update_s + st.input_s)
                / step,
            )
            for st in stages
        ]
        workers = [u for u in busy for _ in range(setup.workers // len(stages))]
        others = [(sum(workers) - u) / (len(workers) - 1) for u in busy]
        stages = [_slowed(st, 1 + (s - 1) * u) for st, u in zip(stages, others)]
        step, fill = _timing(setup, stages, link, cv)
    return Forecast(setup, step, fill, memory, cuts, times.source)


def one_device_step(times: Times, setup: Setup, link: Link, batch_size: int) -> float:
    """Seconds per batch of the contender's stages run one after another on one device (the
    sequential executor): the sum of every stage's work, its micro-batches included."""
    stages, _, _ = _build(times, setup, link, batch_size)
    per = setup.microbatches if timing(setup.rule) == "pipeline" else 1
    return sum(
        (st.forward_s + st.backward_s + st.receive_s) * per + st.update_s + st.input_s
        for st in stages
    )


def _slowed(stage: StageCost, factor: float) -> StageCost:
    """``stage`` with its computing ``factor`` times slower (its messages unchanged)."""
    return replace(
        stage,
        forward_s=stage.forward_s * factor,
        backward_s=stage.backward_s * factor,
        update_s=stage.update_s * factor,
        receive_s=stage.receive_s * factor,
        input_s=stage.input_s * factor,
        grad_blocks=tuple((b, t * factor) for b, t in stage.grad_blocks),
    )


def _timing(setup: Setup, stages: list[StageCost], link: Link, cv: float) -> tuple[float, float]:
    """``(steady seconds per batch, what the first batch adds)`` of the contender; ``cv``:
    how much a step's time varies, paid where workers wait for each other every step."""
    how, d = timing(setup.rule), setup.replicas
    if how == "one":
        return model.bp_step(stages[0]), 0.0
    if how == "data-parallel":
        return model.ddp_step(stages[0], link, setup.workers, cv), 0.0
    if how == "pipeline":
        return model.pipeline_step(stages, link, setup.microbatches, setup.schedule, d, cv), 0.0
    if (
        how == "asynchronous"
    ):  # no stage waits: the first sets the pace, the others draw from buffers
        step = max(stages[0].work_s, link.message(stages[0].down_bytes) if len(stages) > 1 else 0.0)
        lag = None
    else:
        lag = 1 if any(st.up_bytes for st in stages) else None
        step = model.decoupled_period(stages, link, lag=lag, replicas=d)
    fill = model.decoupled_epoch(stages, link, 1, lag=lag, replicas=d) - step
    return step, max(0.0, fill)


def _build(times: Times, setup: Setup, link: Link, batch_size: int):
    """``(stages, memory per stage, cuts)`` of the contender, at the profile's own speed."""
    work, rule = times.work, setup.rule
    n_blocks, d = len(work.blocks), setup.replicas
    if timing(rule) in ("one", "data-parallel"):
        n = batch_size / setup.workers
        stage = StageCost(
            forward_s=sum(times.forward(j, n) for j in range(n_blocks)),
            backward_s=sum(times.backward(j, n, j > 0) for j in range(n_blocks)),
            update_s=sum(times.update(j) for j in range(n_blocks)),
            input_s=times.input(batch_size),
            grad_blocks=_grad_blocks(times, 0, n_blocks, n, False),
            buffer_bytes=FLOAT * sum(b.buffers for b in work.blocks),
        )
        return [stage], (_memory(work, 0, n_blocks, n, last=True, precision=times.precision),), ()
    cuts = tuple(setup.cuts or balanced_cuts(times, setup.stages, batch_size / d, rule))
    bounds = _stage_bounds(cuts, n_blocks)
    if timing(rule) != "pipeline":
        return (*_decoupled(times, setup, link, batch_size, bounds), cuts)
    m = batch_size / d / setup.microbatches
    held = setup.microbatches > 1  # micro-batches whose graphs are alive at once
    stages = [
        StageCost(
            forward_s=sum(times.forward(j, m, held) for j in range(a, b)),
            backward_s=sum(times.backward(j, m, j > 0, held) for j in range(a, b)),
            update_s=sum(times.update(j) for j in range(a, b)),
            input_s=times.input(batch_size) if k == 0 else 0.0,
            down_bytes=m * FLOAT * work.blocks[b - 1].out_numel,
            grad_blocks=tuple((nbytes, 0.0) for nbytes, _ in _grad_blocks(times, a, b, m, k > 0)),
        )
        for k, (a, b) in enumerate(bounds)
    ]  # reduced after the last backward: all ready
    memory = tuple(
        _memory(
            work,
            a,
            b,
            m,
            last=k == len(bounds) - 1,
            precision=times.precision,
            in_flight=model.in_flight(setup.schedule, setup.microbatches, len(bounds), k),
            batch=batch_size / d,
        )
        for k, (a, b) in enumerate(bounds)
    )
    return stages, memory, cuts


def _decoupled(times: Times, setup: Setup, link: Link, batch_size: int, bounds):
    """A decoupled rule's stages and memory: every stage's forward call (group forward and
    backward, local module, update) and upstream update per batch. GN-DGL's layer groups are
    width-grouped (their first block mixing every channel, the others grouped), a neuron
    group on a worker of its own taking 1/G of it and all-gathering its output."""
    work, rule, d = times.work, setup.rule, setup.replicas
    n = batch_size / d
    g = setup.neuron_groups
    sends_gradient = work.upstream == "gradient"
    stages, memory = [], []
    for k, (a, b) in enumerate(bounds):
        last = k == len(bounds) - 1
        input_grad = k > 0 and sends_gradient
        forward, receive = (0.0, 0.0) if last else times.local(b - 1, n)
        out_bytes = n * FLOAT * work.blocks[b - 1].out_numel
        below_local = work.local[a - 1] if k > 0 else None
        common = dict(
            receive_s=receive / g,
            input_s=times.input(batch_size) if k == 0 else 0.0,
            gather_s=link.allgather(out_bytes, g) if g > 1 and not last else 0.0,
            down_bytes=0.0 if last else out_bytes + n * LABEL * work.label_numel,
            up_bytes=n * FLOAT * below_local.up_numel if below_local is not None else 0.0,
        )
        if work.grouped:
            grouped, mixing = work.grouped
            blocks = [mixing[a], *grouped[a + 1 : b]]
            parts = [times.grouped(j, j == a, n, input_grad or j > a, last) for j in range(a, b)]
            stages.append(
                StageCost(
                    forward_s=(sum(p[0] for p in parts) + forward) / g,
                    backward_s=sum(p[1] for p in parts) / g,
                    update_s=sum(p[2] for p in parts) / g,
                    grad_blocks=tuple((x.param_bytes / g, 0.0) for x in blocks[::-1]),
                    **common,
                )
            )
            memory.append(
                _memory(
                    work, a, b, n, last=last, precision=times.precision, share=1 / g, blocks=blocks
                )
            )
            continue
        stages.append(
            StageCost(
                forward_s=(sum(times.forward(j, n) for j in range(a, b)) + forward) / g,
                backward_s=sum(times.backward(j, n, input_grad or j > a) for j in range(a, b)) / g,
                update_s=sum(times.update(j, last) for j in range(a, b)) / g,
                grad_blocks=_grad_blocks(times, a, b, n, input_grad, 1 / g),
                **common,
            )
        )
        held = _memory(work, a, b, n, last=last, precision=times.precision, share=1 / g)
        if timing(rule) == "asynchronous" and k > 0:
            entries = {**methods.option_defaults(rule), **dict(work.options)}["buffer_size"]
            held = replace(
                held,
                buffer_bytes=model.replay_buffer_bytes(
                    entries, n, FLOAT * work.blocks[a - 1].out_numel, LABEL * work.label_numel
                ),
            )
        memory.append(held)
    return stages, tuple(memory)


def setup_of(cfg, cuts: Sequence[int] | None = None) -> Setup:
    """The contender a run config stands for (``bench.config.RunConfig``): BP in one process,
    DDP on its ranks, or its rule on its layer groups (their ranks when distributed, else
    the K workers the sequential executor models), at the run's cuts."""
    if cfg.executor == "ddp":
        return Setup(methods.DDP.name, cfg.workers)
    how = timing(cfg.method)
    if how == "one" and cfg.groups == 1:
        return Setup(cfg.method, 1)
    options = {**methods.option_defaults(cfg.method), **cfg.options}
    neurons = options.get("neuron_groups", 1)
    placed = neurons if cfg.placement == "neuron" else 1
    return Setup(
        cfg.method,
        cfg.groups * placed,
        stages=cfg.groups,
        microbatches=options.get("microbatches", 4) if how == "pipeline" else 1,
        schedule=options.get("schedule", "1f1b"),
        neuron_groups=placed,
        cuts=tuple(cuts) if cuts is not None else None,
    )


def for_run(cfg, profile: Profile, cuts: Sequence[int] | None = None) -> Forecast:
    """The forecast of a run (its model, task, rule, options, batch and cuts) on ``profile``."""
    from .workload import workload

    work = workload(
        cfg.model,
        cfg.task,
        cfg.method if cfg.executor != "ddp" else methods.reference(),
        width=cfg.width,
        options=cfg.options,
    )
    return predict(
        Times(work, profile, cfg.precision),
        setup_of(cfg, cuts),
        profile.link.link(),
        cfg.batch_size,
    )
