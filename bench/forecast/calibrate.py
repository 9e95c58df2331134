"""`lcbench calibrate`: measure on the machine at hand what the forecast needs, and write it
as a profile (TOML, ``kind = "measured"``).

- Each block of each model, timed in place during whole training steps at a few per-device
  batch sizes (``time_blocks``): forward, backward with and without the input's gradient,
  also as a pipeline holds its micro-batches, and width-grouped as GN-DGL builds it
  (``time_grouped``); its optimizer step; each rule's local module
  (its forward call, and the update the upstream message brings: ``time_locals``, every
  module in turn); the input pipeline per batch. Medians over repeated steps after a
  warm-up.
- The device's achieved FLOP/s and fixed overhead per block: t = overhead + 3 F n / rate,
  fitted over the timed blocks (F a block's forward FLOPs per sample, n the batch).
- The link, on two ranks of the backend in use (gloo on the CPU, NCCL between two GPUs):
  one-way time of a ping-pong over message sizes, and an all-reduce over sizes, each fitted
  to its formula (alpha + s / beta; ring: 2 alpha + s / beta on two ranks); and how much
  slower two workers compute when they share this machine (``colocated_slowdown``), and how
  much a step taken by both in lockstep waits for the slower (``step_cv``), at the middle
  calibrated batch size; and what torch.distributed.pipelining's 1F1B schedule adds to each
  micro-batch's hop beyond the message, with stand-in stages that compute while it moves,
  each as long a micro-batch as half the model (``pipeline_handoff_s``).

Models are timed as a run holds them (channels-last for a conv net), in a process whose
heap and garbage collector are set as a run's are (``prepare``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F

import methods
from bench import models, prepare
from bench.config import RunConfig
from bench.data import tasks
from bench.measure.profile import dummy_input
from bench.measure.provenance import cpu_name, device_memory_bytes, now
from bench.models import runtime

from . import workload
from .model import expected_max_normal
from .profiles import dumps

REPEATS = 5
#: message sizes of the ping-pong and the all-reduce (bytes): 4 B to 16 MiB
SIZES = tuple(4**i for i in range(1, 13))
#: sizes at or below which a message's time is all latency; at or above which, bandwidth
SMALL, LARGE = 1024, 256 * 1024
#: micro-batch sizes (bytes) and count at which a pipeline schedule's hand-off is timed
HANDOFF_SIZES = (1024, 256 * 1024, 1024 * 1024)
HANDOFF_MICROBATCHES = 4
#: turns of step and stand-ins alone per size; the most layers a stand-in takes
HANDOFF_REPEATS, MAX_STAND_IN_DEPTH = 15, 256
#: turns in which every local module is called once (``time_locals``)
LOCAL_TURNS = 9


def seconds(work: Callable[[], object], device: torch.device, repeats: int = REPEATS) -> float:
    """Median seconds of ``work()`` over ``repeats`` calls after a warm-up call (the device
    synchronised around each)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    work()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        work()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Clock:
    """Time stamps: perf_counter on the CPU, CUDA events on a GPU (read after one sync)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def stamp(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def between(self, a, b) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a


def _as_a_run_holds(net: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``net`` in the memory format a run holds it in (``models.runtime``: channels-last for
    a net with 2-d convolutions); returns what lays out its inputs likewise."""
    return runtime.as_held if runtime.hold_channels_last(net) else (lambda x: x)


def time_blocks(
    model_name: str,
    task: str,
    batch_sizes: Sequence[int],
    device: torch.device,
    *,
    width: float = 1.0,
    precision: str = "fp32",
    repeats: int = 2 * REPEATS,
    held_sizes: Sequence[int] = (),
    neuron_groups: int = 1,
    mixing: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> dict:
    """Every block's forward and backward seconds at each batch size, timed in place during
    whole training steps (forward, loss, backward; hooks mark where each block starts and
    ends), so that each block meets its input as a run does (caches included): medians over
    ``repeats`` steps per size, the sizes taken in turn. The backward pass of a block that
    starts a stage whose input needs no gradient (``backward_first_s``) is scaled by the
    ratio of the two, timed on the block alone at the smallest size (``_input_grad_ratio``). At ``held_sizes``
    also ``*_held_s``: the forward pass while another batch's graph is alive and that batch's
    backward pass after it, adding its gradients to those already there, as a pipeline of
    micro-batches runs them (memory that cannot be reused costs time; autograd accumulates
    every micro-batch's gradients after the first into ``.grad``). The optimizer step: once
    per block. ``neuron_groups``: the model width-grouped as GN-DGL builds it, every block's
    first layer grouped but block 0's, or (``mixing``) none (``bench.models.cnn``)."""
    info = tasks.TASKS[task]
    torch.manual_seed(0)
    net = models.build_width_grouped(
        model_name,
        info.input_shape,
        info.num_classes,
        width=width,
        neuron_groups=neuron_groups,
        mixing=mixing,
    ).to(device)
    layout = _as_a_run_holds(net)
    net.train()
    runtime.set_precision(precision)
    clock, count = Clock(device), len(net)
    stamps: dict = {}
    hooks = []
    for j, block in enumerate(net):
        hooks += [
            block.register_forward_pre_hook(
                lambda m, a, j=j: stamps.__setitem__(("f", j), clock.stamp())
            ),
            block.register_forward_hook(
                lambda m, a, o, j=j: stamps.__setitem__(("F", j), clock.stamp())
            ),
            block.register_full_backward_pre_hook(
                lambda m, g, j=j: stamps.__setitem__(("b", j), clock.stamp())
            ),
        ]
    inputs = {}
    for n in sorted(set(batch_sizes) | set(held_sizes)):
        inputs[n] = (
            layout(dummy_input(net, info.input_shape, n, device=device)),
            torch.randint(info.num_classes, (n,), device=device),
        )

    def loss(x, y):
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            logits = net(x)
        return F.cross_entropy(logits.float(), y)

    def step(x, y, held: bool):
        """One timed forward and backward pass: ``held``, the forward while another batch's
        graph is alive and the backward of that other batch after it, into gradients an
        earlier micro-batch left (a pipeline's order)."""
        if held:
            loss(x, y).backward()
        other = loss(x, y) if held else None
        stamps.clear()
        timed = loss(x, y)
        stamps["loss"] = clock.stamp()
        (other if held else timed).backward()
        stamps["end"] = clock.stamp()
        if clock.cuda:
            torch.cuda.synchronize(device)
        forward = [clock.between(stamps["f", j], stamps["F", j]) for j in range(count)]
        forward[-1] += clock.between(stamps["F", count - 1], stamps["loss"])
        backward = [
            clock.between(stamps["b", j], stamps["b", j - 1] if j else stamps["end"])
            for j in range(count)
        ]
        backward[-1] += clock.between(stamps["loss"], stamps["b", count - 1])
        if held:
            timed.backward()
        net.zero_grad(set_to_none=True)
        return forward, backward

    kinds = [(n, False) for n in batch_sizes] + [(n, True) for n in held_sizes]
    times = {kind: [] for kind in kinds}
    try:
        for rep in range(repeats + 1):
            for n, held in kinds:
                figures = step(*inputs[n], held)
                if rep:  # the first is a warm-up
                    times[n, held].append(figures)
            progress(f"  {model_name}: step {rep}/{repeats}") if rep % REPEATS == 0 else None
    finally:
        for hook in hooks:
            hook.remove()
    blocks = [{} for _ in net]
    ratios, x = [], inputs[batch_sizes[0]][0]
    for block in net:  # at the smallest size: the ratio hardly depends on the batch
        ratios.append(_input_grad_ratio(block, x, device, precision, repeats))
        with torch.no_grad():
            x = block(x)
    for (_, held), figures in times.items():
        suffix = "_held_s" if held else "_s"
        for j, ratio in enumerate(ratios):
            forward = statistics.median(f[j] for f, _ in figures)
            backward = statistics.median(b[j] for _, b in figures)
            if j == 0:  # in place, the data needs no gradient
                backward, first = backward / ratio, backward
            else:
                first = backward * ratio
            for key, value in (
                ("forward", forward),
                ("backward", backward),
                ("backward_first", first),
            ):
                blocks[j].setdefault(key + suffix, []).append(value)
    train = prepare.train_options(RunConfig(method=methods.reference()).validated(), device)
    for j, block in enumerate(net):
        params = list(block.parameters())
        blocks[j]["update_s"] = 0.0
        if params:
            for p in params:
                p.grad = torch.zeros_like(p)
            optimizer = torch.optim.SGD(
                params,
                lr=1e-9,
                momentum=train.momentum,
                nesterov=train.nesterov,
                weight_decay=train.weight_decay,
                fused=train.fused or None,
            )
            blocks[j]["update_s"] = seconds(optimizer.step, device)
    return {"blocks": blocks}


def time_grouped(
    model_name: str,
    task: str,
    batch_sizes: Sequence[int],
    device: torch.device,
    neuron_groups: Sequence[int],
    precision: str = "fp32",
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict]:
    """The blocks width-grouped into each of ``neuron_groups`` (GN-DGL), grouped and mixing
    (``time_blocks``): ``{"neuron_groups", "mixing", "blocks"}`` for each; none for a model
    without width-grouped layers."""
    out = []
    for g in neuron_groups:
        for mixing in (False, True):
            progress(f"  {model_name}: {g} neuron groups{', mixing' if mixing else ''}")
            try:
                timed = time_blocks(
                    model_name,
                    task,
                    batch_sizes,
                    device,
                    precision=precision,
                    neuron_groups=g,
                    mixing=mixing,
                )
            except ValueError:  # no width-grouped layers (an MLP), or a width G does not split
                break
            out.append({"neuron_groups": g, "mixing": mixing, **timed})
    return out


def _input_grad_ratio(block, x, device, precision: str, repeats: int) -> float:
    """How much of ``block``'s backward pass on ``x`` is left when its input needs no
    gradient: the median, over ``repeats`` pairs, of the two backward passes timed alone one
    right after the other (each after an untimed forward), so that a pair meets the machine in
    one state; a warm-up pair first."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def backward(grad: bool) -> float:
        x_in = x.detach().requires_grad_(grad and x.is_floating_point())
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            out = block(x_in)
        loss = out.float().sum()
        sync()
        start = time.perf_counter()
        loss.backward()
        sync()
        return time.perf_counter() - start

    ratios = []
    for rep in range(repeats + 1):
        with_grad, without = backward(True), backward(False)
        if rep and with_grad > 0:
            ratios.append(without / with_grad)
    block.zero_grad(set_to_none=True)
    return statistics.median(ratios) if ratios else 1.0


def time_input(
    task: str, batch_sizes: Sequence[int], device: torch.device, data_dir=None, limit: int = 4096
) -> list[float]:
    """Seconds to draw one augmented training batch of each size, as a run's rank 0 does."""
    data = tasks.load_task(task, data_dir, limit_train=limit, limit_test=1).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    out = []
    for n in batch_sizes:

        def draw(n=n):
            batches = data.train_batches(n, generator)
            for _ in range(min(4, data.steps(n))):
                next(batches)

        out.append(seconds(draw, device) / min(4, data.steps(n)))
    return out


def time_locals(
    wanted: Sequence[tuple[str, tuple]],
    task: str,
    batch_sizes: Sequence[int],
    device: torch.device,
    precision: str = "fp32",
    turns: int = LOCAL_TURNS,
) -> list[dict]:
    """Each ``(rule, shape)``'s local module on features of ``shape`` at each batch size:
    its stage's forward call and the update the upstream message brings
    (``prepare.local_parts``), each timed on its own, one call of each module in turn
    ``turns`` times after two warm-up calls, the median of its turns (a slow stretch of the
    machine falls on one turn of every module, not on every turn of one)."""
    classes = tasks.TASKS[task].num_classes
    cfgs = {
        method: RunConfig(
            method=method, task=task, precision=precision, device=str(device)
        ).validated()
        for method, _ in wanted
    }
    parts = {
        (method, shape, n): prepare.local_parts(cfgs[method], shape, classes, n, device=device)
        for method, shape in wanted
        for n in batch_sizes
    }
    samples: dict = {key: ([], []) for key in parts}
    for turn in range(-2, turns):
        for key, (forward, receive) in parts.items():
            spent = _each_timed([forward] + ([receive] if receive else []), device)
            if turn >= 0:
                for into, t in zip(samples[key], spent):
                    into.append(t)
    out = []
    for method, shape in wanted:
        times = [samples[method, shape, n] for n in batch_sizes]
        entry = {
            "method": method,
            "shape": list(shape),
            "options": {k: v for k, v in cfgs[method].options.items() if v is not None},
            "forward_s": [statistics.median(f) for f, _ in times],
        }
        if times[0][1]:
            entry["receive_s"] = [statistics.median(r) for _, r in times]
        out.append(entry)
    return out


def _each_timed(calls: Sequence[Callable[[], object]], device: torch.device) -> list[float]:
    """Seconds of each of ``calls``, made one after the other (the device synchronised
    between them)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spent = []
    sync()
    for call in calls:
        start = time.perf_counter()
        call()
        sync()
        spent.append(time.perf_counter() - start)
    return spent


def fit_rate(
    flops: Sequence[float], timed: dict, batch_sizes: Sequence[int]
) -> tuple[float, float]:
    """``(FLOP/s, overhead_s)``: least squares of a block's forward and backward seconds
    against t = overhead + 3 F n / rate over every block with FLOPs and every batch size
    (through the origin where the blocks are too small to tell the two apart)."""
    xs, ts = [], []
    for f, block in zip(flops, timed["blocks"]):
        if f <= 0:
            continue
        for i, n in enumerate(batch_sizes):
            xs.append(3 * f * n)
            ts.append(block["forward_s"][i] + block["backward_s"][i])
    mx, mt = statistics.fmean(xs), statistics.fmean(ts)
    spread = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / spread if spread else 0.0
    if slope <= 0 or mt - slope * mx < 0:  # blocks too small to tell the two apart: no overhead
        return sum(x * x for x in xs) / sum(x * t for x, t in zip(xs, ts)), 0.0
    return 1 / slope, mt - slope * mx


def fit_link(
    sizes: Sequence[int], times: Sequence[float], hops: float = 1.0
) -> tuple[float, float]:
    """``(alpha, beta)`` of t = hops x alpha + s / beta: alpha from the small messages' times,
    beta from the large ones' (least squares through the latency)."""
    small = [t for s, t in zip(sizes, times) if s <= SMALL] or [min(times)]
    alpha = statistics.median(small) / hops
    large = [(s, t - hops * alpha) for s, t in zip(sizes, times) if s >= LARGE]
    beta = sum(s * s for s, _ in large) / sum(s * t for s, t in large)
    return alpha, beta


def handoff_overhead(
    sizes: Sequence[int], handoffs: Sequence[float], alpha: float, beta: float
) -> float:
    """What a pipeline schedule adds to a micro-batch's hop beyond its message (alpha + s /
    beta): the median over the timed sizes, none below 0."""
    return max(0.0, statistics.median(h - (alpha + s / beta) for s, h in zip(sizes, handoffs)))


def _together(op: Callable[[], None], device: torch.device, repeats: int) -> list[float]:
    """Seconds of ``op`` on this rank at each of ``repeats`` calls both ranks start together
    (a barrier before each, as DDP's all-reduce joins them), after one untimed."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 1):
        dist.barrier()
        sync()
        start = time.perf_counter()
        op()
        sync()
        if i:
            times.append(time.perf_counter() - start)
    return times


def _median_seconds(op: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of ``op`` on both ranks at once."""
    return statistics.median(_together(op, device, repeats))


def _ping_pong(rank: int, device: torch.device, size: int, repeats: int) -> float:
    """One-way seconds of a message of ``size`` bytes: half a round trip."""
    buf = torch.zeros(max(1, size // 4), device=device)
    peer = 1 - rank

    def round_trip():
        for transfer in (dist.send, dist.recv) if rank == 0 else (dist.recv, dist.send):
            transfer(buf, peer)

    return _median_seconds(round_trip, device, repeats) / 2


def _allreduce(device: torch.device, size: int, repeats: int) -> float:
    buf = torch.zeros(max(1, size // 4), device=device)
    return _median_seconds(lambda: dist.all_reduce(buf), device, repeats)


def _shared(rank: int, work: Callable[[], None], device: torch.device, rounds: int = 9) -> float:
    """How much slower ``work`` runs on this rank while the other rank runs it too than
    while the other waits: the median over ``rounds`` of (both at once) / (alone), each
    phase two calls, the phases of a round one after the other (the machine's speed drifts)."""

    def timed() -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        work()
        work()
        sync()
        return time.perf_counter() - start

    work()
    ratios = []
    for _ in range(rounds):
        alone = 0.0
        for turn in (0, 1):
            dist.barrier()
            if rank == turn:
                alone = timed()
            dist.barrier()
        ratios.append(timed() / alone)
    return statistics.median(ratios)


class _StandIn(torch.nn.Module):
    """A pipeline stage that passes its input on (scaled) and computes beside it, forward
    and backward (``depth`` layers): what a hand-off meets when both ranks are busy."""

    def __init__(self, device: torch.device, depth: int, width: int = 192):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), device=device))
        self.burn = torch.nn.Sequential(
            *(torch.nn.Linear(width, width, device=device) for _ in range(depth))
        )
        self.side = torch.randn(width, width, device=device)

    def forward(self, x):
        return x * self.scale + 0 * self.burn(self.side).mean()


def _stand_in_depth(device: torch.device, stage_s: float, probe: int = 8) -> int:
    """Layers of a stand-in whose forward and backward take ``stage_s`` (rank 0's measure,
    so that both ranks build the same), from a ``probe``-layer stand-in timed on both ranks
    at once."""
    stand_in = _StandIn(device, probe)
    x = torch.ones(1, device=device)
    per_layer = _median_seconds(lambda: stand_in(x).sum().backward(), device, 9) / probe
    depth = [max(1, min(MAX_STAND_IN_DEPTH, round(stage_s / per_layer)))]
    dist.broadcast_object_list(depth, src=0)
    return depth[0]


def _handoffs(
    rank: int,
    device: torch.device,
    stage_s: float,
    microbatches: int = HANDOFF_MICROBATCHES,
    repeats: int = HANDOFF_REPEATS,
):
    """Seconds a micro-batch's hand-off adds to a 1F1B schedule of torch.distributed.pipelining
    on the two ranks, at each of ``HANDOFF_SIZES`` (bytes per micro-batch), with stand-in
    stages that compute while messages move, each about as long a micro-batch as a stage
    (``stage_s``: the hand-off grows with how long the ranks it meets stay busy). From the
    schedule's step T and the stand-in's own forward and backward w per micro-batch (both
    ranks computing, no messages), taken in turn ``repeats`` times (the machine drifts), the
    median hop h of two balanced stages, T = (M + 1) w + M h (``model.pipeline_step``)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    torch.manual_seed(0)
    stand_in = _StandIn(device, _stand_in_depth(device, stage_s))
    handoffs = []
    for size in HANDOFF_SIZES:  # a schedule per size: a stage keeps the shapes it first met
        stage = PipelineStage(stand_in, rank, 2, device)
        schedule = Schedule1F1B(stage, microbatches, loss_fn=lambda out, y: out.mean())
        x = torch.randn(microbatches, max(1, size // 4), device=device)

        def step(x=x):
            if rank == 0:
                schedule.step(x)
            else:
                schedule.step(target=x)

        def alone(x=x):
            inputs = x.clone().requires_grad_(rank == 1)
            for chunk in inputs.chunk(microbatches):
                stand_in(chunk).mean().backward()

        hops = []
        for _ in range(repeats):
            t = _median_seconds(step, device, 1)
            w = _median_seconds(alone, device, 1) / microbatches
            hops.append((t - (microbatches + 1) * w) / microbatches)
        handoffs.append(max(0.0, statistics.median(hops)))
    return handoffs


def step_cv(times: Sequence[Sequence[float]]) -> float:
    """The variation of a step's time that lockstep workers pay for: from each rank's
    seconds per step (``times``, one list per rank, steps started together), the mean
    excess of the slowest rank over the ranks' mean, in units of the expected maximum of as
    many standard normals (``model.lockstep`` inverted: the cv that prices what was seen)."""
    steps = list(zip(*times))
    slowest = statistics.fmean(max(s) for s in steps)
    mean = statistics.fmean(statistics.fmean(s) for s in steps)
    return max(0.0, slowest / mean - 1) / expected_max_normal(len(times))


def link_worker(config: dict) -> None:
    """One of two ranks: the ping-pong, the all-reduce, the shared-machine slowdown and the
    straggle of steps taken in lockstep; rank 0 writes them to ``config['out']``."""
    prepare.settle_process()  # as a run's rank is
    backend = "nccl" if config["device"] == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    torch.set_num_threads(config["threads"] or torch.get_num_threads())
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    pingpong = [_ping_pong(rank, device, s, 20 if s < LARGE else 5) for s in SIZES]
    allreduce = [_allreduce(device, s, 20 if s < LARGE else 5) for s in SIZES]
    info = tasks.TASKS[config["task"]]
    torch.manual_seed(0)
    net = models.build_model(config["model"], info.input_shape, info.num_classes).to(device).train()
    layout = _as_a_run_holds(net)
    x = layout(dummy_input(net, info.input_shape, config["batch_size"], device=device))
    micro = layout(dummy_input(net, info.input_shape, config["microbatch"], device=device))

    def step(batch: torch.Tensor) -> Callable[[], None]:
        return lambda: net(batch).float().sum().backward()

    stage_s = _median_seconds(step(micro), device, 9) / 2
    handoffs = _handoffs(rank, device, stage_s)
    slowdown = _shared(rank, step(x), device)
    steps = _together(step(x), device, 20)
    figures = [None, None] if rank == 0 else None
    dist.gather_object((slowdown, steps), figures, dst=0)
    if rank == 0:
        Path(config["out"]).write_text(
            json.dumps(
                {
                    "sizes": list(SIZES),
                    "pingpong_s": pingpong,
                    "allreduce_s": allreduce,
                    "handoff_sizes": list(HANDOFF_SIZES),
                    "handoff_s": handoffs,
                    "handoff_stage_s": stage_s,
                    "colocated_slowdown": statistics.fmean(f[0] for f in figures),
                    "step_cv": step_cv([f[1] for f in figures]),
                    "backend": backend,
                }
            )
        )
    dist.destroy_process_group()


def measure_link(
    device: torch.device,
    *,
    threads: int | None,
    model: str,
    task: str,
    batch_size: int,
    microbatch: int,
    timeout: float = 600,
) -> dict:
    """The link and the shared-machine slowdown, on two ranks started by torchrun (``model``
    at ``batch_size`` for the slowdown, a stage of it at ``microbatch`` for the hand-off)."""
    from bench.executors.launch import free_port

    with tempfile.TemporaryDirectory(prefix="lcbench-calibrate-") as tmp:
        config = {
            "device": device.type,
            "threads": threads,
            "model": model,
            "task": task,
            "batch_size": batch_size,
            "microbatch": microbatch,
            "out": str(Path(tmp) / "link.json"),
        }
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config))
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "-m",
            "bench.forecast.calibrate",
            str(path),
        ]
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        if done.returncode != 0 or not Path(config["out"]).is_file():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the link measurement on two ranks failed: {tail}")
        return json.loads(Path(config["out"]).read_text())


def calibrate(
    model_names: Sequence[str],
    task: str,
    *,
    tasks_of: dict[str, str] | None = None,
    methods_: Sequence[str] = (),
    batch_sizes: Sequence[int] = (32, 64, 128),
    device: torch.device = torch.device("cpu"),  # noqa: B008 (immutable)
    threads: int | None = None,
    precision: str = "fp32",
    link: bool = True,
    local_sizes: Sequence[int] | None = None,
    local_after: dict | None = None,
    held_sizes: Sequence[int] = (),
    neuron_groups: Sequence[int] | None = None,
    data_dir=None,
    name: str = "measured",
    progress: Callable[[str], None] = lambda _: None,
) -> dict:
    """The profile of this machine (as TOML-ready tables): every model's blocks timed on
    ``task`` (``tasks_of``: {model: task} where one differs) at ``batch_sizes``, each of
    ``methods_``'s local modules at ``local_sizes`` (default the same) on the output of every
    block (``local_after``: {(model, method): block indices} to time fewer), the blocks as a
    pipeline holds them at ``held_sizes`` (its micro-batches: ``time_blocks``), the blocks
    width-grouped into each of ``neuron_groups`` (default: the defaults of ``methods_`` that
    take neuron groups; a model that cannot be grouped is left out), both ways (``grouped``),
    the fitted rate and overhead, and (``link``) the link and the shared-machine slowdown on
    two ranks."""
    prepare.settle_process()  # as a run's process is
    batch_sizes = sorted(set(batch_sizes))
    if neuron_groups is None:
        neuron_groups = [
            methods.option_defaults(m)["neuron_groups"]
            for m in methods_
            if methods.resolve(m).neuron_grouped
        ]
    neuron_groups = sorted({g for g in neuron_groups if g > 1})
    local_sizes = sorted(set(local_sizes or batch_sizes))
    task_of = {m: (tasks_of or {}).get(m, task) for m in model_names}
    with prepare.torch_threads(threads or torch.get_num_threads()):
        timed, flops = [], []
        for model_name in model_names:
            task = task_of[model_name]
            blocks = workload.blocks(model_name, task)
            entry = {
                "model": model_name,
                "task": task,
                "width": 1.0,
                "precision": precision,
                "threads": torch.get_num_threads(),
                "batch_sizes": batch_sizes,
                "held_batch_sizes": sorted(set(held_sizes)),
                "input_s": time_input(task, batch_sizes, device, data_dir),
                **time_blocks(
                    model_name,
                    task,
                    batch_sizes,
                    device,
                    precision=precision,
                    held_sizes=sorted(set(held_sizes)),
                    progress=progress,
                ),
                "local": [],
            }
            wanted = [
                (method, shape)
                for method in methods_
                for shape in dict.fromkeys(
                    blocks[j].out_shape
                    for j in (local_after or {}).get((model_name, method), range(len(blocks) - 1))
                )
            ]
            if wanted:
                progress(
                    f"  {model_name}: {len(wanted)} local modules, in turn, {LOCAL_TURNS} turns"
                )
                for local in time_locals(wanted, task, local_sizes, device, precision):
                    entry["local"].append({**local, "batch_sizes": local_sizes})
            entry["grouped"] = time_grouped(
                model_name, task, batch_sizes, device, neuron_groups, precision, progress
            )
            timed.append(entry)
            flops.append([b.flops for b in blocks])
        joined = {"blocks": [b for t in timed for b in t["blocks"]]}
        rate, overhead = fit_rate([f for fs in flops for f in fs], joined, batch_sizes)
        params = sum(b.param_bytes for m in model_names for b in workload.blocks(m, task_of[m]))
        stepped = sum(b["update_s"] for t in timed for b in t["blocks"])
    cuda = device.type == "cuda"
    out = {
        "profile": {
            "name": name,
            "kind": "measured",
            "created": now(),
            "summary": f"measured by lcbench calibrate on {os.uname().nodename}: "
            f"{', '.join(f'{m} on {t}' for m, t in task_of.items())}, batches "
            f"{', '.join(map(str, batch_sizes))}",
        },
        "device": {
            "name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
            "memory_bytes": float(device_memory_bytes(device) or 0),
            "achieved_flops": {precision: rate},
            "overhead_s": overhead,
            "update_bytes_per_s": params / stepped,
            "colocated_slowdown": 1.0,
            "step_cv": 0.0,
            "threads": threads or torch.get_num_threads(),
            "source": f"lcbench calibrate, {now()}; torch {torch.__version__}",
        },
        "workloads": timed,
    }
    if link:
        progress("  the link: ping-pong and all-reduce on two ranks")
        measured = measure_link(
            device,
            threads=threads,
            model=model_names[0],
            task=task_of[model_names[0]],
            batch_size=batch_sizes[len(batch_sizes) // 2],
            microbatch=max(1, max(batch_sizes) // HANDOFF_MICROBATCHES),
        )
        alpha, beta = fit_link(measured["sizes"], measured["pingpong_s"])
        ring_alpha, ring_beta = fit_link(measured["sizes"], measured["allreduce_s"], hops=2)
        out["device"]["colocated_slowdown"] = measured["colocated_slowdown"]
        out["device"]["step_cv"] = measured["step_cv"]
        out["link"] = {
            "name": f"{measured['backend']} between two ranks on this machine",
            "latency_s": alpha,
            "bandwidth_bytes_per_s": beta,
            "allreduce_latency_s": ring_alpha,
            "allreduce_bandwidth_bytes_per_s": ring_beta,
            "pipeline_handoff_s": handoff_overhead(
                measured["handoff_sizes"], measured["handoff_s"], alpha, beta
            ),
            "sizes": measured["sizes"],
            "pingpong_s": measured["pingpong_s"],
            "allreduce_s": measured["allreduce_s"],
            "handoff_sizes": measured["handoff_sizes"],
            "handoff_s": measured["handoff_s"],
            "handoff_stage_s": measured["handoff_stage_s"],
            "source": "lcbench calibrate: one-way time of a ping-pong (alpha + s / beta), "
            "all-reduce on two ranks (2 alpha + s / beta), a 1F1B schedule's hop per "
            "micro-batch with stand-in stages computing as long as half the model a "
            "micro-batch (handoff_stage_s; the hop beyond the message)",
        }
    return out


def merge(calibrations: Sequence[dict]) -> dict:
    """One profile from several calibrations of the same things at different times: every
    number the median of its values (element by element in lists), other values the first's."""
    first = calibrations[0]
    if isinstance(first, dict):
        return {k: merge([c[k] for c in calibrations]) for k in first}
    if isinstance(first, list):
        return [merge([c[i] for c in calibrations]) for i in range(len(first))]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(calibrations)
    return first


def write(profile: dict, path: Path) -> None:
    """The profile as TOML, atomically."""
    from bench.records import write_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), "# written by lcbench calibrate\n" + dumps(profile))


if __name__ == "__main__":
    link_worker(json.loads(Path(sys.argv[1]).read_text()))
