"""The cost model: step time and memory per device of each contender, from per-stage costs
and a link. Pure arithmetic on seconds and bytes; every formula is written once, here.

Notation: S stages (layer groups), D data-parallel replicas of each (K = S x D workers),
M micro-batches, N batches. A ``StageCost`` holds one stage's seconds on one worker for the
batch (or micro-batch) it sees; a ``Link`` moves messages and reduces gradients.

- Messages: Hockney's model, alpha + s / beta (Hockney, Parallel Computing 20, 1994).
- All-reduce: the ring algorithm, 2 (D-1) alpha + 2 (D-1)/D s / beta (Patarasuk & Yuan,
  JPDC 69, 2009; Thakur, Rabenseifner & Gropp, IJHPCA 19, 2005); all-gather half of it.
- DDP: gradients all-reduced bucket by bucket as the backward pass fills them, one bucket
  after another (Li et al., "PyTorch Distributed", VLDB 13, 2020, sections 3.2.3-3.2.4;
  torch's defaults: 25 MiB buckets, the first 1 MiB).
- Pipelined BP: GPipe flushes all forward passes, then all backward passes (Huang et al.,
  NeurIPS 2019); 1F1B alternates them once the pipeline is full (Narayanan et al., SC 2021,
  section 2.2: bubble (S-1)/M of the ideal time).
- Decoupled rules: the stages pipeline batches; the slowest stage, the busiest link, or the
  wait for the late upstream message (LC, DNI: at most ``lag`` batches ahead) sets the rate.
- Workers that wait for each other every step (DDP's all-reduce, a pipeline's hand-off of
  each micro-batch) wait for the slowest: a step whose time varies from one step to the
  next (coefficient of variation ``cv``) costs the expected maximum over the workers, the
  normal order statistic for identical workers (Tippett, Biometrika 17, 1925; David &
  Nagaraja, "Order Statistics", 2003, section 4.5) and Clark's moment formula for unequal
  stages (Clark, Operations Research 9, 1961). A decoupled stage that may run ahead of the
  one that waits for it does not pay it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist

#: the standard normal (its density and distribution function)
NORMAL = NormalDist()

#: DDP's gradient buckets (torch.nn.parallel.DistributedDataParallel's defaults)
BUCKET_BYTES = 25 * 2**20
FIRST_BUCKET_BYTES = 2**20


@dataclass(frozen=True)
class Link:
    """What joins two workers: ``latency_s`` (alpha) per message and ``bandwidth`` (beta,
    bytes/s per direction, as achieved); full duplex. Collectives take the same alpha and
    beta, or their own (``collective_latency_s``, ``collective_bandwidth``: a measured
    all-reduce fitted to the ring's formula). ``handoff_s``: what a message costs beyond its
    transfer where the ranks that meet on it are computing (their communication threads
    wait for a core): a pipeline schedule's hop per micro-batch, each point of a DDP step
    where ranks wait for each other. Measured on a pipeline's hops (``lcbench calibrate``),
    0 where not."""

    latency_s: float
    bandwidth: float
    collective_latency_s: float | None = None
    collective_bandwidth: float | None = None
    handoff_s: float = 0.0

    def _collective(self) -> tuple[float, float]:
        if self.collective_bandwidth is None:
            return self.latency_s, self.bandwidth
        return self.collective_latency_s, self.collective_bandwidth

    def message(self, nbytes: float) -> float:
        """Seconds to move one message of ``nbytes`` (nothing: 0)."""
        return self.latency_s + nbytes / self.bandwidth if nbytes > 0 else 0.0

    def allreduce(self, nbytes: float, ranks: int) -> float:
        """Ring all-reduce of ``nbytes`` on ``ranks`` workers."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        alpha, beta = self._collective()
        return 2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * nbytes / beta

    def broadcast(self, nbytes: float, ranks: int) -> float:
        """Pipelined ring broadcast of ``nbytes`` from one worker to ``ranks`` - 1 others."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        alpha, beta = self._collective()
        return (ranks - 1) * alpha + nbytes / beta

    def allgather(self, nbytes: float, ranks: int) -> float:
        """Ring all-gather of ``nbytes`` in all (each worker holds 1/ranks of them)."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        alpha, beta = self._collective()
        return (ranks - 1) * alpha + (ranks - 1) / ranks * nbytes / beta


@dataclass(frozen=True)
class StageCost:
    """One stage on one worker, per batch (per micro-batch in a pipeline), in seconds.

    ``forward_s``/``backward_s`` are the group's passes (a decoupled rule's forward also
    holds its local module's work in the stage's forward call), ``update_s`` its optimizer
    step, taken once per batch; ``receive_s`` what a decoupled stage does when the upstream
    message comes (LC's critic, DNI's synthesizer update).
    ``grad_bytes``/``grad_blocks``: the gradients all-reduced among the stage's replicas,
    block by block in the order the backward pass produces them (last block first), each
    with the seconds of backward it takes. ``down_bytes``/``up_bytes``: the messages to the
    next stage and to the one above.
    """

    forward_s: float = 0.0
    backward_s: float = 0.0
    update_s: float = 0.0
    receive_s: float = 0.0
    input_s: float = 0.0
    gather_s: float = 0.0  # a collective inside the forward call (GN-DGL's all-gather)
    down_bytes: float = 0.0
    up_bytes: float = 0.0
    grad_blocks: tuple[tuple[float, float], ...] = ()  # (bytes, backward seconds), last block first
    buffer_bytes: float = 0.0  # what DDP broadcasts before each forward (the model's buffers)

    @property
    def call_s(self) -> float:
        """The forward call of a decoupled stage: everything before its output leaves."""
        return self.input_s + self.forward_s + self.backward_s + self.update_s + self.gather_s

    @property
    def work_s(self) -> float:
        return self.call_s + self.receive_s


def buckets(
    grad_blocks: Sequence[tuple[float, float]],
    *,
    cap: float = BUCKET_BYTES,
    first: float = FIRST_BUCKET_BYTES,
) -> list[tuple[float, float]]:
    """DDP's buckets as ``(bytes, ready_s)``: gradients fill buckets in the order the backward
    pass produces them (the first bucket ``first`` bytes, the rest ``cap``); a bucket is ready
    when its last byte is, a block's bytes produced evenly over its backward seconds."""
    out, size, clock, limit = [], 0.0, 0.0, first
    for nbytes, seconds in grad_blocks:
        left = nbytes
        while left > 0:
            take = min(left, limit - size)
            size += take
            ready = clock + seconds * (1 - (left - take) / nbytes)
            left -= take
            if size >= limit:
                out.append((size, ready))
                size, limit = 0.0, cap
        clock += seconds
    if size > 0:
        out.append((size, clock))
    return out


def allreduce_end(grad_blocks: Sequence[tuple[float, float]], link: Link, ranks: int) -> float:
    """Seconds from the start of the backward pass until the last bucket is reduced: each
    bucket's all-reduce starts when it is ready and the one before it is done."""
    end = 0.0
    for nbytes, ready in buckets(grad_blocks):
        end = max(end, ready) + link.allreduce(nbytes, ranks)
    return end


def exposed_allreduce(stage: StageCost, link: Link, ranks: int) -> float:
    """The all-reduce seconds the backward pass does not hide."""
    if ranks <= 1 or not stage.grad_blocks:
        return 0.0
    return max(0.0, allreduce_end(stage.grad_blocks, link, ranks) - stage.backward_s)


def expected_max_normal(n: int) -> float:
    """E[max of ``n`` independent standard normals]: the integral of x n phi(x) Phi(x)^(n-1),
    by the midpoint rule on [-8, 8] (0 for one worker, 1/sqrt(pi) for two)."""
    if n <= 1:
        return 0.0
    steps, low, high = 4000, -8.0, 8.0
    h = (high - low) / steps
    total = 0.0
    for i in range(steps):
        x = low + (i + 0.5) * h
        total += x * n * NORMAL.pdf(x) * NORMAL.cdf(x) ** (n - 1)
    return total * h


def lockstep(seconds: float, cv: float, workers: int) -> float:
    """Expected seconds of a step of mean ``seconds`` when ``workers`` identical workers each
    take it, its time varying with coefficient of variation ``cv``, and all wait for the
    slowest: seconds (1 + cv e_n), e_n the expected maximum of n standard normals."""
    return seconds * (1 + cv * expected_max_normal(workers))


def expected_max(means: Sequence[float], cv: float) -> float:
    """Expected maximum of independent normal times of ``means``, each with standard
    deviation cv x its mean: Clark's formula (1961) for the maximum of two normals, applied
    one after the other with the maximum so far taken as normal (exact for two)."""
    mean, var = means[0], (cv * means[0]) ** 2
    for m in means[1:]:
        v = (cv * m) ** 2
        theta = math.sqrt(var + v)
        if theta == 0:
            mean, var = max(mean, m), 0.0
            continue
        a = (mean - m) / theta
        pdf, cdf, rest = NORMAL.pdf(a), NORMAL.cdf(a), NORMAL.cdf(-a)
        first = mean * cdf + m * rest + theta * pdf
        second = (mean**2 + var) * cdf + (m**2 + v) * rest + (mean + m) * theta * pdf
        mean, var = first, max(0.0, second - first**2)
    return mean


def bp_step(stage: StageCost) -> float:
    """BP on one device: the whole net forward, backward, update, one after the other."""
    return stage.work_s


def ddp_step(stage: StageCost, link: Link, ranks: int, cv: float = 0.0) -> float:
    """Data-parallel BP on ``ranks`` workers (``stage``: one replica at its batch share):
    the buffers' broadcast before the forward (torch's DDP, ``broadcast_buffers``), forward,
    backward with the bucketed all-reduce overlapped, the update; every step waits for the
    slowest rank (``lockstep``), and each point where ranks wait for each other (the
    broadcast, the last all-reduce) pays the link's hand-off."""
    if ranks <= 1:
        return stage.work_s
    syncs = bool(stage.grad_blocks) + (stage.buffer_bytes > 0)
    return (
        lockstep(stage.work_s, cv, ranks)
        + link.broadcast(stage.buffer_bytes, ranks)
        + exposed_allreduce(stage, link, ranks)
        + syncs * link.handoff_s
    )


def _flow_shop(times: Sequence[float], jobs: int, cv: float = 0.0) -> float:
    """Makespan of ``jobs`` identical jobs through machines of ``times`` in order: the sum
    plus (jobs - 1) times the slowest (exact for identical jobs; with times that vary,
    the expected slowest)."""
    return sum(times) + (jobs - 1) * expected_max(times, cv) if times else 0.0


def pipeline_step(
    stages: Sequence[StageCost],
    link: Link,
    microbatches: int,
    schedule: str,
    replicas: int = 1,
    cv: float = 0.0,
) -> float:
    """Pipelined BP, one batch of M micro-batches (``stages``: per micro-batch; ``update_s``
    and ``input_s`` once per batch), then each stage's all-reduce among its ``replicas``
    (after its last backward pass, as Megatron-LM does) and its update.

    GPipe: the forward passes as a flow shop of M micro-batches through stages and links,
    then the backward passes back; stage k's last backward ends after stages S-1..k have
    passed all M (exact). 1F1B: the first micro-batch's round trip, sum_k (F_k + G_k) and
    its hops, then M-1 slots each of the slowest stage's F+G (or link): (M + S - 1)(F + G)
    when balanced; or, where links are slow, of the loop that returns a micro-batch to
    stage k: S - k micro-batches circle through stages k..S-1 and their hops twice, so
    once the first S - k have left, each later one waits (sum_{j>=k} F_j + G_j + 2 hops)
    / (S - k). Stages hand each micro-batch over and wait for it: with times that vary
    (``cv``), the slowest is the expected slowest."""
    m, first = microbatches, stages[0].input_s
    hops = [link.message(s.down_bytes) + link.handoff_s for s in stages[:-1]]
    if schedule == "gpipe":
        forward = _flow_shop(_interleave([s.forward_s for s in stages], hops), m, cv)
        ends = []
        for k in range(len(stages)):
            tail = _interleave([s.backward_s for s in stages[k:]][::-1], hops[k:][::-1])
            ends.append(forward + _flow_shop(tail, m, cv))
    elif schedule == "1f1b":
        work = [s.forward_s + s.backward_s for s in stages]
        busiest = expected_max(work + hops, cv)
        slots = (m - 1) * busiest
        for k in range(len(stages) - 1):
            circling = in_flight(schedule, m, len(stages), k)
            loop = (sum(work[k:]) + 2 * sum(hops[k:])) / circling
            slots = max(slots, (circling - 1) * busiest + (m - circling) * loop)
        total = sum(work) + 2 * sum(hops) + slots
        lead = [sum(s.backward_s for s in stages[:k]) + sum(hops[:k]) for k in range(len(stages))]
        ends = [total - t for t in lead]
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return first + max(
        end + exposed_allreduce(replace(s, backward_s=0.0), link, replicas) + s.update_s
        for end, s in zip(ends, stages)
    )


def _interleave(stages: Sequence[float], hops: Sequence[float]) -> list[float]:
    """Stage and link times in the order a message meets them."""
    out = []
    for k, t in enumerate(stages):
        out.append(t)
        if k < len(hops):
            out.append(hops[k])
    return out


def decoupled_period(
    stages: Sequence[StageCost], link: Link, *, lag: int | None, replicas: int = 1
) -> float:
    """Steady seconds per batch of a decoupled rule on S stages: the largest of
    - a stage's work (forward call, upstream update, input; its all-reduce not hidden);
    - a link's traffic per batch, each direction on its own;
    - with upstream messages (``lag``: how many batches a stage may run ahead of the message
      it waits for), the loop stage k -> k+1 -> k: over lag + 1 batches stage k's forward
      call, the message down, stage k+1's forward call, the message up and the update it
      brings (F_k + c_down + F_{k+1} + c_up + R_k) / (lag + 1), F the forward calls."""
    work = [s.work_s + exposed_allreduce(s, link, replicas) for s in stages]
    bounds = list(work)
    for s, below in zip(stages, stages[1:]):
        down, up = link.message(s.down_bytes), link.message(below.up_bytes)
        bounds.append(max(down, up))
        if lag is not None and below.up_bytes > 0:
            loop = s.call_s + down + below.call_s + up + s.receive_s
            bounds.append(loop / (lag + 1))
    return max(bounds)


def decoupled_epoch(
    stages: Sequence[StageCost], link: Link, batches: int, *, lag: int | None, replicas: int = 1
) -> float:
    """N batches: the first crosses every stage and link (fill), the other N-1 follow at
    the steady period."""
    fill = sum(s.work_s for s in stages) + sum(link.message(s.down_bytes) for s in stages[:-1])
    return fill + (batches - 1) * decoupled_period(stages, link, lag=lag, replicas=replicas)


# -- memory per device -----------------------------------------------------------------


@dataclass(frozen=True)
class StageMemory:
    """Bytes one worker holds for its stage, as a run measures them (``peak_mem_bytes``):
    parameters, their gradients, optimizer state, activations the group saves for backward
    (per batch or micro-batch it holds, times how many it holds at once) and those of its
    local module; and, beside what a run meters, the inputs an asynchronous stage keeps in
    its replay buffer (``buffer_bytes``; see ``replay_buffer_bytes``)."""

    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes: float  # for one (micro-)batch
    in_flight: int = 1
    local_activation_bytes: float = 0.0
    buffer_bytes: float = 0.0
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def total(self) -> float:
        return (
            self.param_bytes
            + self.grad_bytes
            + self.optimizer_bytes
            + self.activation_bytes * self.in_flight
            + self.local_activation_bytes
            + self.buffer_bytes
        )


def replay_buffer_bytes(
    entries: int, batch: float, input_bytes: float, label_bytes: float
) -> float:
    """A full replay buffer of asynchronous DGL (Belilovsky et al. 2020, its asynchronous
    setting): ``entries`` batches of ``batch`` inputs and labels, each kept whole
    (``input_bytes`` and ``label_bytes`` per sample)."""
    return entries * batch * (input_bytes + label_bytes)


def optimizer_bytes(param_bytes: float, tensors: int, kind: str) -> float:
    """Optimizer state: SGD with momentum one buffer per parameter; Adam two moments and a
    4-byte step count per tensor (torch.optim's state)."""
    if kind == "sgd":
        return param_bytes
    if kind == "adam":
        return 2 * param_bytes + 4 * tensors
    if kind == "none":
        return 0.0
    raise ValueError(f"unknown optimizer {kind!r}")


def in_flight(schedule: str, microbatches: int, stages: int, k: int) -> int:
    """Micro-batches whose activations stage k holds at once: GPipe all M; 1F1B at most
    S - k (Narayanan et al. 2021, section 2.2)."""
    return microbatches if schedule == "gpipe" else min(microbatches, stages - k)


def fits(total_bytes: float, device_bytes: float, reserve: float) -> bool:
    """Whether a worker's bytes fit a device that keeps ``reserve`` of its memory for
    itself (context, workspaces, fragmentation)."""
    return total_bytes <= device_bytes * (1 - reserve)
