"""The cost model (bench.forecast.model): every formula against a hand computation or an
independent event-by-event simulation of the same schedule."""

import math
from dataclasses import replace

import pytest

from bench.forecast import model
from bench.forecast.model import Link, StageCost

MiB = 2**20


def test_messages_and_collectives_by_hand():
    link = Link(latency_s=1e-5, bandwidth=1e9)
    assert link.message(0) == 0.0
    assert link.message(1e6) == pytest.approx(1e-5 + 1e-3)
    # ring all-reduce on 4: 2 x 3 latencies, 2 x 3/4 of the bytes over the bandwidth
    assert link.allreduce(4e6, 4) == pytest.approx(6e-5 + 1.5 * 4e-3)
    assert link.allreduce(4e6, 1) == 0.0
    assert link.allgather(4e6, 4) == pytest.approx(3e-5 + 0.75 * 4e-3)
    measured = Link(1e-5, 1e9, collective_latency_s=2e-5, collective_bandwidth=5e8)
    assert measured.allreduce(1e6, 2) == pytest.approx(2 * 2e-5 + 1e6 / 5e8)
    assert measured.message(1e6) == link.message(1e6)


def test_ddp_buckets_fill_in_backward_order_first_one_small():
    """3 MiB over 1 s, then 30 MiB over 2 s: the 1 MiB first bucket is full a third into the
    first block; the next (25 MiB) 23/30 into the second; the last 7 MiB at the end."""
    got = model.buckets([(3 * MiB, 1.0), (30 * MiB, 2.0)])
    want = [(1 * MiB, 1 / 3), (25 * MiB, 1 + 2 * 23 / 30), (7 * MiB, 3.0)]
    assert [b for b, _ in got] == [b for b, _ in want]
    assert [t for _, t in got] == pytest.approx([t for _, t in want])
    assert sum(b for b, _ in got) == 33 * MiB


def test_ddp_overlaps_each_bucket_with_the_rest_of_the_backward_pass():
    link = Link(0.0, 25 * MiB)  # a 25 MiB bucket takes 1 s on two ranks (2 (D-1)/D = 1)
    stage = StageCost(
        forward_s=1.0, backward_s=3.0, update_s=0.5, grad_blocks=((3 * MiB, 1.0), (30 * MiB, 2.0))
    )
    # all-reduces one after another: 1 MiB from 1/3 s, 25 MiB from 2.533 s, 7 MiB after that
    first = 1 / 3 + 1 / 25
    second = max(1 + 2 * 23 / 30, first) + 1.0
    third = max(3.0, second) + 7 / 25
    assert model.allreduce_end(stage.grad_blocks, link, 2) == pytest.approx(third)
    assert model.ddp_step(stage, link, 2) == pytest.approx(1.0 + third + 0.5)
    assert model.ddp_step(stage, Link(0.0, 1e15), 2) == pytest.approx(stage.work_s)  # all hidden
    assert model.bp_step(stage) == pytest.approx(4.5)


def simulate_pipeline(stages, hop, m, schedule):
    """GPipe or 1F1B op by op: a stage runs its ops in the schedule's order, each when its
    input has arrived (a message takes ``hop`` on a link that carries one at a time, each
    direction on its own); then each stage's update."""
    s = len(stages)
    order = []
    for k in range(s):
        if schedule == "gpipe":
            ops = [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
        else:  # 1F1B: S-k-1 forwards to fill, then one forward, one backward; then the rest
            warm = min(m, s - k - 1)
            ops = [("F", i) for i in range(warm)]
            for i in range(m - warm):
                ops += [("F", warm + i), ("B", i)]
            ops += [("B", i) for i in range(m - warm, m)]
        order.append(ops)
    done, free, link_free = {}, [0.0] * s, {}
    position = [0] * s
    while any(position[k] < len(order[k]) for k in range(s)):
        progressed = False
        for k in range(s):
            if position[k] == len(order[k]):
                continue
            kind, i = order[k][position[k]]
            if kind == "F":
                need = done.get(("F", k - 1, i)) if k else 0.0
                if need is None:
                    continue
                if k:
                    arrive = max(need, link_free.get(("down", k - 1), 0.0)) + hop
                    link_free["down", k - 1] = arrive
                    need = arrive
                start, cost = max(free[k], need), stages[k][0]
            else:
                need = done.get(("F", k, i)) if k == s - 1 else done.get(("B", k + 1, i))
                if need is None:
                    continue
                if k < s - 1:
                    arrive = max(need, link_free.get(("up", k), 0.0)) + hop
                    link_free["up", k] = arrive
                    need = arrive
                start, cost = max(free[k], need), stages[k][1]
            done[kind, k, i] = free[k] = start + cost
            position[k] += 1
            progressed = True
        assert progressed
    return max(free[k] + stages[k][2] for k in range(s))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_balanced_pipeline_takes_m_plus_s_minus_1_slots(schedule):
    f, g, u, s, m = 1.0, 2.0, 0.25, 4, 8
    stages = [StageCost(forward_s=f, backward_s=g, update_s=u)] * s
    want = (m + s - 1) * (f + g) + u  # GPipe (Huang et al.) and 1F1B (Narayanan et al.)
    assert model.pipeline_step(stages, Link(0.0, math.inf), m, schedule) == pytest.approx(want)
    assert simulate_pipeline([(f, g, u)] * s, 0.0, m, schedule) == pytest.approx(want)


@pytest.mark.parametrize(
    "times, hop",
    [
        ([(1.0, 2.0, 0.1), (2.0, 3.0, 0.2), (0.5, 1.0, 0.1)], 0.0),
        ([(1.0, 2.0, 0.1), (1.5, 2.5, 0.1)], 0.3),
        ([(0.2, 0.4, 0.0), (0.2, 0.4, 0.0)], 0.5),
    ],
)
def test_gpipe_equals_the_schedule_simulated_op_by_op(times, hop):
    """Unbalanced stages, links slower than a stage: GPipe's formula is exact."""
    m = 5
    stages = [StageCost(forward_s=f, backward_s=g, update_s=u, down_bytes=hop) for f, g, u in times]
    got = model.pipeline_step(stages, Link(0.0, 1.0), m, "gpipe")
    assert got == pytest.approx(simulate_pipeline(times, hop, m, "gpipe"))


@pytest.mark.parametrize(
    "times",
    [[(1.0, 2.0, 0.1), (2.0, 3.0, 0.2), (0.5, 1.0, 0.1)], [(1.0, 2.0, 0.0), (1.2, 2.4, 0.0)]],
)
def test_1f1b_is_within_a_tenth_of_the_schedule_simulated(times):
    """Unbalanced: 1F1B's formula (the slowest stage's F+G sets the pace) against the
    simulation; with a dominant stage the two agree closely."""
    m = 8
    stages = [StageCost(forward_s=f, backward_s=g, update_s=u) for f, g, u in times]
    got = model.pipeline_step(stages, Link(0.0, math.inf), m, "1f1b")
    assert got == pytest.approx(simulate_pipeline(times, 0.0, m, "1f1b"), rel=0.1)


@pytest.mark.parametrize("hop", [0.3, 1.0, 3.0])
def test_1f1b_pays_the_loop_of_a_micro_batch_through_slow_links(hop):
    """Where links are slow against a stage, a micro-batch returning to stage k sets the
    pace: two balanced stages take the simulated time exactly (F + G + hop per micro-batch
    once the first two have left), and unbalanced ones within 15% (the pace set by the
    slowest stage alone missed by up to half)."""
    f, g, m = 3.0, 5.0, 8
    stages = [StageCost(forward_s=f, backward_s=g, down_bytes=hop)] * 2
    want = 2 * (f + g) + 2 * hop + (f + g) + (m - 2) * (f + g + hop)
    assert model.pipeline_step(stages, Link(0.0, 1.0), m, "1f1b") == pytest.approx(want)
    assert simulate_pipeline([(f, g, 0.0)] * 2, hop, m, "1f1b") == pytest.approx(want)
    for times in ([(1.0, 2.0, 0.1), (2.0, 3.0, 0.2), (0.5, 1.0, 0.1)], [(1.0, 2.0, 0.0)] * 4):
        for m in (4, 16):
            stages = [
                StageCost(forward_s=a, backward_s=b, update_s=u, down_bytes=hop)
                for a, b, u in times
            ]
            got = model.pipeline_step(stages, Link(0.0, 1.0), m, "1f1b")
            assert got == pytest.approx(simulate_pipeline(times, hop, m, "1f1b"), rel=0.15)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_pipeline_schedules_handoff_lengthens_each_hop(schedule):
    """A schedule's own seconds per hand-off count as that much more message on each hop,
    in either schedule; a decoupled rule's messages do not pay it."""
    times = [(1.0, 2.0, 0.1), (2.0, 3.0, 0.2), (0.5, 1.0, 0.1)]
    with_handoff = [
        StageCost(forward_s=f, backward_s=g, update_s=u, down_bytes=0.5) for f, g, u in times
    ]
    longer = [StageCost(forward_s=f, backward_s=g, update_s=u, down_bytes=0.8) for f, g, u in times]
    got = model.pipeline_step(with_handoff, Link(0.0, 1.0, handoff_s=0.3), 6, schedule)
    assert got == pytest.approx(model.pipeline_step(longer, Link(0.0, 1.0), 6, schedule))
    assert got == pytest.approx(simulate_pipeline(times, 0.8, 6, schedule), rel=0.15)
    period = model.decoupled_period(with_handoff, Link(0.0, 1.0, handoff_s=0.3), lag=None)
    assert period == model.decoupled_period(with_handoff, Link(0.0, 1.0), lag=None)


def test_a_ddp_step_pays_its_buffers_broadcast_and_a_handoff_where_ranks_meet():
    """By hand, on 2 ranks: the work, the buffers' broadcast (alpha + bytes / beta), the one
    bucket's all-reduce after the backward (2 alpha + bytes / beta, none of it hidden: the
    bucket is ready when the backward ends), and the hand-off at each of the two points
    where the ranks wait for each other; without buffers, one such point."""
    link = Link(0.01, 1000.0, handoff_s=0.05)
    stage = StageCost(
        forward_s=1.0, backward_s=2.0, update_s=0.1, grad_blocks=((500.0, 2.0),), buffer_bytes=40.0
    )
    by_hand = 3.1 + (0.01 + 40 / 1000) + (2 * 0.01 + 500 / 1000) + 2 * 0.05
    assert model.ddp_step(stage, link, 2) == pytest.approx(by_hand)
    bare = replace(stage, buffer_bytes=0.0)
    assert model.ddp_step(bare, link, 2) == pytest.approx(3.1 + 0.52 + 0.05)
    assert model.ddp_step(stage, link, 1) == pytest.approx(3.1)


def test_a_models_buffers_are_counted_for_ddps_broadcast():
    """small-cnn's batch norms hold two running statistics per channel and a step count; the
    MLP holds none."""
    from bench import models as built

    net = built.build_model("small-cnn", (1, 28, 28), 10)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    blocks = workload.blocks("small-cnn", "fashion-mnist")
    assert sum(b.buffers for b in blocks) == sum(2 * m.num_features + 1 for m in norms) > 0
    assert sum(b.buffers for b in workload.blocks("mlp", "digits")) == 0


def test_lockstep_workers_pay_the_expected_slowest_by_hand_and_by_sampling():
    import torch

    assert model.expected_max_normal(1) == 0.0
    assert model.expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-9)
    assert model.expected_max_normal(3) == pytest.approx(1.5 / math.sqrt(math.pi), rel=1e-9)
    draws = torch.randn(400_000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert model.expected_max_normal(8) == pytest.approx(
        draws.max(1).values.mean().item(), rel=0.01
    )
    # Clark's formula: exact for two, close to sampling for unequal stages
    assert model.expected_max([2.0, 2.0], 0.1) == pytest.approx(model.lockstep(2.0, 0.1, 2))
    means = torch.tensor([1.0, 0.8, 0.9], dtype=torch.float64)
    sampled = (means + 0.2 * means * draws[:, :3]).max(1).values.mean().item()
    assert model.expected_max(means.tolist(), 0.2) == pytest.approx(sampled, rel=0.01)
    assert model.expected_max([1.0, 0.5], 0.0) == 1.0
    # DDP: its compute waits for the slowest of D ranks; the all-reduce after it does not vary
    link, stage = (
        Link(1e-3, 1e9),
        StageCost(forward_s=1.0, backward_s=2.0, update_s=0.5, grad_blocks=((4e9, 2.0),)),
    )
    plain = model.ddp_step(stage, link, 4)
    assert model.ddp_step(stage, link, 4, cv=0.1) == pytest.approx(
        plain + 3.5 * 0.1 * model.expected_max_normal(4)
    )
    # balanced 1F1B: the M - 1 steady slots each wait for the slowest of the S stages
    f, g, u, s, m, cv = 1.0, 2.0, 0.25, 4, 8, 0.1
    stages = [StageCost(forward_s=f, backward_s=g, update_s=u)] * s
    got = model.pipeline_step(stages, Link(0.0, math.inf), m, "1f1b", cv=cv)
    assert got == pytest.approx(s * (f + g) + (m - 1) * model.expected_max([f + g] * s, cv) + u)


def test_step_cv_is_the_cv_that_prices_the_straggle_it_was_measured_from():
    from bench.forecast import calibrate

    d = 0.07  # one rank 7% above the mean and the other 7% below, in turn
    ranks = [[1 + d, 1 - d] * 10, [1 - d, 1 + d] * 10]
    cv = calibrate.step_cv(ranks)
    assert cv == pytest.approx(d * math.sqrt(math.pi))
    assert model.lockstep(1.0, cv, 2) == pytest.approx(1 + d)
    assert calibrate.step_cv([[1.0, 2.0], [1.0, 2.0]]) == 0.0


def test_replicated_pipeline_stages_reduce_after_the_flush():
    link = Link(0.0, 1e6)
    stages = [StageCost(forward_s=1.0, backward_s=1.0, update_s=0.0, grad_blocks=((1e6, 0.0),))] * 2
    plain = model.pipeline_step(stages, link, 2, "1f1b", replicas=1)
    # on 2 replicas each stage all-reduces 1e6 bytes: 2 (D-1)/D x 1e6 / 1e6 = 1 s
    assert model.pipeline_step(stages, link, 2, "1f1b", replicas=2) == pytest.approx(plain + 1.0)


def simulate_decoupled(stages, down, up, batches, lag):
    """The distributed executor's loop (``executors.distributed.train_epoch``), event by event:
    stage k runs batch t's forward call once batch t has arrived (a message takes ``down`` on
    a link that carries one at a time), and then, while more than ``lag`` upstream messages
    are pending, waits for the oldest (sent ``up`` after stage k+1's forward call of it) and
    applies it. ``stages``: (forward call, upstream update) seconds."""
    s = len(stages)
    end, free, pending = {}, [0.0] * s, [[] for _ in range(s)]
    link_down, link_up = [0.0] * s, [0.0] * s

    def answer(k, b):  # when stage k+1's message about batch b reaches stage k
        return end[k + 1, b + 0.5]

    for t in range(batches):
        for k in range(s):
            arrive = end[k - 1, t] if k else 0.0
            end[k, t] = free[k] = max(free[k], arrive) + stages[k][0]
            if k < s - 1:
                link_down[k] = max(link_down[k], end[k, t]) + down
                end[k, t] = link_down[k]  # what stage k+1 waits for
            if k:
                link_up[k - 1] = max(link_up[k - 1], free[k]) + up
                end[k, t + 0.5] = link_up[k - 1]
            if k < s - 1:
                pending[k].append(t)
                while len(pending[k]) > lag and (k + 1, pending[k][0] + 0.5) in end:
                    b = pending[k].pop(0)
                    free[k] = max(free[k], answer(k, b)) + stages[k][1]
    for k in range(s - 1):
        for b in pending[k]:
            free[k] = max(free[k], answer(k, b)) + stages[k][1]
    return max(free)


def test_decoupled_period_is_the_slowest_stage_or_link_or_the_upstream_loop():
    link = Link(0.0, 1.0)  # a message of x bytes takes x seconds
    dgl = [StageCost(forward_s=1.0, down_bytes=0.2), StageCost(forward_s=1.5)]
    assert model.decoupled_period(dgl, link, lag=None) == pytest.approx(1.5)
    slow_link = [StageCost(forward_s=1.0, down_bytes=2.0), StageCost(forward_s=1.0)]
    assert model.decoupled_period(slow_link, link, lag=None) == pytest.approx(2.0)
    # LC-like: stage 2 answers; the loop F1 + down + F2 + up + R1 = 1 + 1 + 1 + 1 + 0.2 over 2
    lc = [
        StageCost(forward_s=1.0, receive_s=0.2, down_bytes=1.0),
        StageCost(forward_s=1.0, up_bytes=1.0),
    ]
    assert model.decoupled_period(lc, link, lag=1) == pytest.approx(4.2 / 2)
    assert model.decoupled_period(lc, Link(0.0, 1e12), lag=1) == pytest.approx(1.2)


@pytest.mark.parametrize(
    "stages, down, up",
    [
        ([(1.0, 0.2), (1.5, 0.0)], 0.1, 0.1),
        ([(1.0, 0.3), (0.8, 0.0)], 1.2, 1.2),
        ([(0.5, 0.1), (0.5, 0.1), (0.6, 0.0)], 0.0, 0.0),
    ],
)
def test_decoupled_epoch_against_the_executors_loop_simulated(stages, down, up):
    n = 40
    link = Link(0.0, 1.0)
    costs = [
        StageCost(
            forward_s=f,
            receive_s=r,
            down_bytes=down if k < len(stages) - 1 else 0.0,
            up_bytes=up if k else 0.0,
        )
        for k, (f, r) in enumerate(stages)
    ]
    got = model.decoupled_epoch(costs, link, n, lag=1)
    assert got == pytest.approx(simulate_decoupled(stages, down, up, n, 1), rel=0.03)


def test_memory_by_hand():
    assert model.optimizer_bytes(400, 3, "sgd") == 400
    assert model.optimizer_bytes(400, 3, "adam") == 800 + 12
    assert model.in_flight("gpipe", 8, 4, 0) == 8
    assert [model.in_flight("1f1b", 8, 4, k) for k in range(4)] == [4, 3, 2, 1]
    assert [model.in_flight("1f1b", 2, 4, k) for k in range(4)] == [2, 2, 2, 1]
    memory = model.StageMemory(
        param_bytes=100,
        grad_bytes=100,
        optimizer_bytes=100,
        activation_bytes=50,
        in_flight=3,
        local_activation_bytes=7,
    )
    assert memory.total == 457
    assert model.fits(90, 100, 0.1) and not model.fits(91, 100, 0.1)


# -- from a model to a forecast (bench.forecast.workload, profiles, predict) -------------

import tomllib  # noqa: E402
import torch  # noqa: E402

from bench import prepare, runner  # noqa: E402
from bench.config import RunConfig  # noqa: E402
from bench.forecast import calibrate, predict, profiles, scale, workload  # noqa: E402
from bench.forecast.predict import Setup, Times  # noqa: E402


def stated(**device) -> profiles.Profile:
    """A stated profile with round figures (1 TFLOP/s, 1 ms per block, 1 GB/s link)."""
    data = {
        "profile": {"name": "round", "kind": "stated"},
        "device": {
            "name": "d",
            "memory_bytes": 1e12,
            "peak_flops": {"fp32": 2e12, "bf16": 4e12},
            "efficiency": 0.5,
            "overhead_s": 1e-3,
            "memory_bandwidth_bytes_per_s": 5e9,
            **device,
        },
        "link": {"name": "l", "latency_s": 1e-5, "bandwidth_bytes_per_s": 2e9, "efficiency": 0.5},
    }
    return profiles.parse(data, "test")


def test_a_calibrated_handoff_is_read_kept_at_every_bandwidth_and_fitted_beyond_the_message():
    data = {
        "profile": {"name": "m", "kind": "measured"},
        "device": {
            "name": "d",
            "memory_bytes": 1e9,
            "achieved_flops": {"fp32": 1e9},
            "update_bytes_per_s": 1e9,
            "overhead_s": 0.0,
        },
        "link": {"latency_s": 1e-4, "bandwidth_bytes_per_s": 1e9, "pipeline_handoff_s": 2e-3},
    }
    spec = profiles.parse(data, "t").link
    assert spec.link().handoff_s == spec.link(bandwidth=5e9).handoff_s == 2e-3
    assert stated().link.link().handoff_s == 0.0  # a data sheet states none
    # hops of 1 KB, 1 MB and 4 MB timed at 2.1, 3.0 and 6.2 ms; the messages alone take
    # 0.1 + 0.001, 0.1 + 1.0 and 0.1 + 4.0 ms: beyond them 2.0, 1.9 and 2.1 ms
    sizes, hops = [1_000, 1_000_000, 4_000_000], [2.101e-3, 3.0e-3, 6.2e-3]
    assert calibrate.handoff_overhead(sizes, hops, 1e-4, 1e9) == pytest.approx(2.0e-3)
    assert calibrate.handoff_overhead(sizes, [0.0] * 3, 1e-4, 1e9) == 0.0


def test_a_stated_profile_turns_peaks_and_bytes_into_seconds_by_hand():
    profile = stated()
    work = workload.workload("small-cnn", "fashion-mnist", "lc")
    times = Times(work, profile)
    block = work.blocks[1]
    assert times.forward(1, 64) == pytest.approx(1e-3 / 3 + block.flops * 64 / 1e12)
    assert times.backward(1, 64, True) == pytest.approx(2e-3 / 3 + 2 * block.flops * 64 / 1e12)
    assert times.update(1) == pytest.approx(4 * block.params / 1e9)  # 5e9 / 5 bytes/s
    local = work.local[1]
    forward, receive = times.local(1, 64)
    assert forward == pytest.approx(1e-3 + local.forward_flops * 64 / 1e12)
    assert receive == pytest.approx(
        1e-3 + local.receive_flops * 64 / 1e12 + 4 * local.params * 7 / 5 / 1e9
    )  # Adam: 7 passes
    assert profile.link.link() == Link(1e-5, 1e9)
    assert Times(work, profile, "bf16").rate == 2e12


def test_gn_dgl_is_priced_from_its_width_grouped_blocks_where_a_profile_timed_them():
    """A sequential GN-DGL run's stage: each block's grouped (or, first in its stage, mixing)
    forward, backward and update as the profile timed them, plus its local module; from
    FLOPs where the profile timed no such grouping."""
    groups, n = 2, 32
    work = workload.workload("small-cnn", "fashion-mnist", "gn", options={"neuron_groups": groups})
    count = len(work.blocks)

    def blocks(base: float) -> list[dict]:  # block j: forward base + j, backward 10 x that
        return [
            {
                "forward_s": [base + j, base + j],
                "backward_s": [10 * (base + j)] * 2,
                "backward_first_s": [5 * (base + j)] * 2,
                "update_s": 0.5 * (base + j),
            }
            for j in range(count)
        ]

    timed = {
        "model": "small-cnn",
        "task": "fashion-mnist",
        "batch_sizes": [n, 2 * n],
        "input_s": [0.0, 0.0],
        "blocks": blocks(100.0),
        "grouped": [
            {"neuron_groups": groups, "mixing": False, "blocks": blocks(1.0)},
            {"neuron_groups": groups, "mixing": True, "blocks": blocks(2.0)},
        ],
    }
    data = {
        "profile": {"name": "t", "kind": "measured"},
        "device": {
            "memory_bytes": 1e12,
            "achieved_flops": {"fp32": 1e12},
            "overhead_s": 0.0,
            "update_bytes_per_s": 1e9,
        },
        "link": {"name": "l", "latency_s": 0.0, "bandwidth_bytes_per_s": 1e9},
        "workloads": [timed],
    }
    times = Times(work, profiles.parse(data, "t"))
    link = Link(0.0, 1e9)
    stages, _ = predict._decoupled(times, Setup("gn", 2, stages=2), link, n, [(0, 2), (2, count)])
    local = [times.local(1, n), (0.0, 0.0)]
    sgd = predict.STEP_PASSES[work.group_optimizer(False)]
    for (a, b), stage, (forward, receive) in zip([(0, 2), (2, count)], stages, local):
        first = [2.0 + a] + [1.0 + j for j in range(a + 1, b)]  # mixing, then grouped
        assert stage.forward_s == pytest.approx(sum(first) + forward)
        assert (
            stage.backward_s
            == pytest.approx(  # GN sends nothing up: no input gradient
                5 * first[0] + sum(10 * f for f in first[1:])
            )
        )
        assert stage.update_s == pytest.approx(sum(0.5 * f for f in first) * sgd)
        assert stage.receive_s == receive
    data["workloads"][0]["grouped"] = []  # untimed: from the grouped blocks' FLOPs
    times = Times(work, profiles.parse(data, "t"))
    stages, _ = predict._decoupled(times, Setup("gn", 2, stages=2), link, n, [(0, 2), (2, count)])
    grouped, mixing = work.grouped
    flops = mixing[2].flops + sum(x.flops for x in grouped[3:])
    assert stages[1].forward_s + stages[1].backward_s == pytest.approx(3 * flops * n / 1e12)


def test_grouped_blocks_are_timed_both_ways_and_none_for_a_model_without_groups():
    found = calibrate.time_grouped("small-cnn", "fashion-mnist", [4, 8], torch.device("cpu"), [2])
    assert [(g["neuron_groups"], g["mixing"]) for g in found] == [(2, False), (2, True)]
    count = len(workload.blocks("small-cnn", "fashion-mnist"))
    for g in found:
        assert len(g["blocks"]) == count
        assert all(min(b["forward_s"] + b["backward_s"]) > 0 for b in g["blocks"])
    assert calibrate.time_grouped("mlp", "fashion-mnist", [4, 8], torch.device("cpu"), [2]) == []
    table = profiles.parse(
        {
            "profile": {"kind": "measured"},
            "device": {
                "memory_bytes": 1,
                "achieved_flops": {"fp32": 1},
                "overhead_s": 0,
                "update_bytes_per_s": 1,
            },
            "link": {"latency_s": 0, "bandwidth_bytes_per_s": 1},
            "workloads": [
                {
                    "model": "small-cnn",
                    "task": "fashion-mnist",
                    "batch_sizes": [4, 8],
                    "input_s": [0, 0],
                    "blocks": found[0]["blocks"],
                    "grouped": found,
                }
            ],
        },
        "t",
    )
    parsed = table.timed[0].grouped[2, True]
    assert parsed["forward_s"][0] == tuple(found[1]["blocks"][0]["forward_s"])


def test_a_local_module_is_timed_on_features_laid_out_as_a_runs_group_hands_them_over():
    from bench import prepare
    from bench.config import RunConfig

    cfg = RunConfig(method="gn", task="fashion-mnist", model="small-cnn", device="cpu")
    prep = prepare.prepare(cfg, data=False)
    x, _ = prepare.stand_in(prep, 0, prep.stages[0].group, 4)
    handed = prep.stages[0].group(x)
    seen = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: seen.append(args[0]) if isinstance(m, prepare._PassThrough) else None
    )
    try:
        for device in (torch.device("cpu"), None):
            forward, _ = prepare.local_parts(
                prep.cfg, tuple(handed.shape[1:]), 10, 4, device=device
            )
            forward()
    finally:
        hook.remove()
    held = torch.channels_last
    assert handed.is_contiguous(memory_format=held) and not handed.is_contiguous()
    assert seen[0].is_contiguous(memory_format=held) and not seen[0].is_contiguous()
    assert seen[1].is_contiguous()  # unplaced, as built: the CPU's default layout


def test_local_modules_are_timed_in_turn_each_part_on_its_own(monkeypatch):
    """A fake clock advanced only by the fake modules' work: each module is called once a
    turn, every module in turn, and its forward call and upstream update are each the
    median of their own times."""
    from bench import prepare

    now, calls = [0.0], []

    def parts(cfg, shape, classes, n, device=None):
        key = (cfg.method, shape, n)

        def work(seconds, part):
            def call():
                calls.append((*key, part))
                now[0] += seconds * (1 + 0.5 * (len(calls) % 7 == 0))  # now and then slow

            return call

        forward = work(1e-3 * n * shape[0], "forward")
        return forward, (work(2e-3 * n, "receive") if cfg.method == "lc" else None)

    monkeypatch.setattr(prepare, "local_parts", parts)
    monkeypatch.setattr(calibrate.time, "perf_counter", lambda: now[0])
    wanted = [("lc", (2, 3, 3)), ("dgl", (2, 3, 3)), ("dgl", (4, 3, 3))]
    found = calibrate.time_locals(wanted, "fashion-mnist", [4, 8], torch.device("cpu"), turns=5)
    keys = [(m, shape, n) for m, shape in wanted for n in (4, 8)]
    one_turn = [
        (*k, part) for k in keys for part in ("forward", "receive")[: 2 if k[0] == "lc" else 1]
    ]
    assert calls == one_turn * (2 + 5)
    assert [(f["method"], tuple(f["shape"])) for f in found] == wanted
    for f, (method, shape) in zip(found, wanted):
        assert f["forward_s"] == pytest.approx([1e-3 * n * shape[0] for n in (4, 8)])
        assert f.get("receive_s") == (
            [pytest.approx(2e-3 * n) for n in (4, 8)] if method == "lc" else None
        )
    assert found[0]["options"]["critic_filters"] == 128  # the rule's defaults, as a run has them


def test_timed_blocks_are_interpolated_between_the_batch_sizes():
    assert predict.interpolate((32, 64, 128), (1.0, 2.0, 6.0), 64) == 2.0
    assert predict.interpolate((32, 64, 128), (1.0, 2.0, 6.0), 96) == pytest.approx(4.0)
    assert predict.interpolate((32, 64, 128), (1.0, 2.0, 6.0), 16) == pytest.approx(0.5)
    assert predict.interpolate((32,), (1.0,), 64) == 2.0


def test_workload_counts_flops_params_and_the_bytes_a_group_saves():
    work = workload.workload("resnet8", "fashion-mnist", "dni")
    net = __import__("bench.models", fromlist=["build_model"]).build_model(
        "resnet8", (1, 28, 28), 10
    )
    assert work.params == sum(p.numel() for p in net.parameters())
    assert [b.params for b in work.blocks] == [sum(p.numel() for p in b.parameters()) for b in net]
    assert work.blocks[-1].out_shape == (10,) and work.local[-1] is None
    assert all(
        loc.up_numel == math.prod(b.out_shape) for b, loc in zip(work.blocks, work.local[:-1])
    )
    from bench.measure.profile import SavedTensorMeter

    torch.manual_seed(0)
    group = torch.nn.Sequential(*list(net)[1:4]).train()
    x = torch.randn(5, 16, 28, 28, requires_grad=True)
    with SavedTensorMeter(group) as meter:
        group(x)
    assert workload.group_saved(work.blocks[1:4], 5) == meter.bytes


@pytest.mark.parametrize(
    "method, options",
    [
        ("lc", {}),
        ("dni", {}),
        ("dgl", {}),
        ("gn", {"neuron_groups": 2}),
        ("pipe-bp", {"schedule": "gpipe", "microbatches": 4}),
        ("pipe-bp", {"schedule": "1f1b", "microbatches": 4}),
    ],
)
def test_memory_model_equals_the_bytes_a_run_measured(tmp_path, method, options):
    cfg = RunConfig(
        method=method,
        groups=2,
        task="digits",
        model="small-cnn",
        epochs=1,
        batch_size=32,
        limit_train=64,
        limit_test=32,
        options=options,
        device="cpu",
        out=str(tmp_path),
        checkpoint_every=0,
    )
    prep = prepare.prepare(cfg)
    record = runner.execute(prep, progress=False)
    measured = {(r["stage"], r["metric"]): r["value"] for r in record.rows if r["epoch"] == 1}
    forecast = predict.for_run(prep.cfg, stated(), prep.cuts)
    for k, memory in enumerate(forecast.memory, 1):
        stage = str(k)
        assert memory.param_bytes == measured[stage, "param_bytes"]
        assert memory.grad_bytes == measured[stage, "grad_bytes"]
        assert memory.optimizer_bytes == measured[stage, "optimizer_state_bytes"]
        assert memory.activation_bytes * memory.in_flight == pytest.approx(
            measured[stage, "activation_bytes"], abs=64
        )
        assert memory.local_activation_bytes == pytest.approx(
            measured[stage, "local_activation_bytes"], abs=64
        )
        assert memory.total == pytest.approx(measured[stage, "peak_mem_bytes"], abs=256)


def test_adgl_replay_buffer_forecast_equals_the_bytes_a_full_buffer_holds(tmp_path):
    cfg = RunConfig(
        method="adgl",
        groups=2,
        task="digits",
        model="small-cnn",
        epochs=1,
        batch_size=32,
        limit_train=160,
        limit_test=32,
        device="cpu",
        options={"buffer_size": 3, "max_reuse": 100},
        out=str(tmp_path),
        checkpoint_every=0,
    )
    prep = prepare.prepare(cfg)
    runner.execute(prep, progress=False)
    entries = prep.stages[1].buffer.entries
    assert len(entries) == 3  # five batches pushed, each reusable: the buffer is full
    held = sum(x.nbytes + y.nbytes for x, y, _ in entries)
    forecast = predict.for_run(prep.cfg, stated(), prep.cuts)
    assert forecast.memory[0].buffer_bytes == 0
    assert forecast.memory[1].buffer_bytes == held
    assert model.replay_buffer_bytes(3, 32, 4 * 100, 8) == 3 * 32 * 408


def test_a_contender_at_twice_the_bandwidth_never_slows_and_ddp_pays_for_its_all_reduce():
    profile = stated()
    base = Times(workload.workload("resnet20", "cifar10", "bp"), profile)
    lc = Times(workload.workload("resnet20", "cifar10", "lc"), profile)
    slow, fast = Link(1e-5, 1e8), Link(1e-5, 2e8)
    for times, setup in [
        (base, Setup("ddp", 4)),
        (lc, Setup("lc", 4, stages=2)),
        (base, Setup("pipe-bp", 4, stages=4, microbatches=8)),
    ]:
        assert (
            predict.predict(times, setup, fast, 128).step_s
            <= predict.predict(times, setup, slow, 128).step_s
        )
    bp = predict.predict(base, Setup("bp", 1), slow, 128)
    ddp = predict.predict(base, Setup("ddp", 4), Link(0.0, 1e15), 128)
    # four replicas at a quarter of the batch, an infinitely fast link: BP's FLOPs / 4 plus
    # the fixed overheads and updates each replica pays in full
    overhead = len(base.work.blocks) * 1e-3 + sum(
        base.update(j) for j in range(len(base.work.blocks))
    )
    assert ddp.step_s == pytest.approx((bp.step_s - overhead) / 4 + overhead)


def test_setups_are_the_splits_k_workers_allow():
    assert scale.setups("ddp", 8, 10, 128) == [Setup("ddp", 8)]
    pipes = scale.setups("pipe-bp", 8, 10, 128)
    assert {(s.stages, s.replicas, s.microbatches) for s in pipes} == {
        (2, 4, 2),
        (2, 4, 4),
        (2, 4, 8),
        (4, 2, 4),
        (4, 2, 8),
        (4, 2, 16),
        (8, 1, 8),
        (8, 1, 16),
        (8, 1, 32),
    }
    assert [(s.stages, s.replicas) for s in scale.setups("lc", 8, 3, 128)] == [(2, 4)]
    assert [(s.stages, s.neuron_groups, s.replicas) for s in scale.setups("gn", 8, 10, 128)] == [
        (2, 2, 2),
        (4, 2, 1),
    ]
    assert scale.setups("lc", 8, 10, 128, stages=4) == [Setup("lc", 8, 4)]


def test_profiles_round_trip_as_toml_and_shipped_ones_cite_their_figures():
    data = {
        "profile": {"name": "x", "kind": "measured"},
        "device": {"achieved_flops": {"fp32": 1e9}, "memory_bytes": 1.0, "name": "cpu"},
        "workloads": [
            {
                "model": "m",
                "batch_sizes": [1, 2],
                "blocks": [{"forward_s": [0.1, 0.2]}],
                "local": [{"method": "lc", "options": {}, "shape": [3, 4]}],
            }
        ],
    }
    assert tomllib.loads(profiles.dumps(data)) == data
    for name in profiles.shipped():
        profile = profiles.load(name)
        source = profile.device.source.lower()
        assert profile.kind == "stated" and "nvidia" in source and "https://" in source
        assert any(word in source for word in ("datasheet", "data sheet", "whitepaper"))
        assert profile.link.source and profile.device.memory_bytes >= 24e9
        assert set(profile.device.flops) == {"fp32", "tf32", "bf16"}
        assert profile.device.flops["bf16"] >= profile.device.flops["fp32"]


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: d.pop("link"), "no [link] table"),
        (lambda d: d["device"].update(efficiency=-1), "'efficiency' must be a positive number"),
        (lambda d: d["device"].update(peak_flops={"fp64": 1e12}), "FLOP/s for fp32, tf32, bf16"),
        (lambda d: d["profile"].update(kind="guessed"), "kind must be 'stated' or 'measured'"),
        (lambda d: d["device"].update(step_cv=-0.1), "'step_cv' must be a number"),
    ],
)
def test_a_bad_profile_is_one_line_naming_what_is_wrong(change, words):
    data = tomllib.loads((profiles.SHIPPED / "a100-pcie.toml").read_text())
    change(data)
    with pytest.raises(profiles.ProfileError, match=re.escape(words)):
        profiles.parse(data, "bad.toml")


def test_fits_recover_the_rate_overhead_latency_and_bandwidth_they_were_made_from():
    flops = [1e6, 2e6, 0.0]
    sizes = [8, 16, 32]
    blocks = [
        {
            "forward_s": [2e-3 / 3 + f * n / 1e9 for n in sizes],
            "backward_s": [4e-3 / 3 + 2 * f * n / 1e9 for n in sizes],
        }
        for f in flops
    ]
    rate, overhead = calibrate.fit_rate(flops, {"blocks": blocks}, sizes)
    assert rate == pytest.approx(1e9) and overhead == pytest.approx(2e-3)
    noise = [
        {"forward_s": [1e-3, 0.9e-3, 0.8e-3], "backward_s": [0.0] * 3}
    ]  # all overhead, falling
    rate, overhead = calibrate.fit_rate([1e6], {"blocks": noise}, sizes)
    assert overhead == 0.0 and rate == pytest.approx(
        sum((3e6 * n) ** 2 for n in sizes)
        / sum(3e6 * n * t for n, t in zip(sizes, noise[0]["forward_s"]))
    )
    sizes = calibrate.SIZES
    alpha, beta = calibrate.fit_link(sizes, [5e-5 + s / 2e9 for s in sizes])
    assert beta == pytest.approx(2e9, rel=1e-3) and alpha == pytest.approx(5e-5, rel=0.02)
    alpha, beta = calibrate.fit_link(sizes, [2 * 5e-5 + s / 1e9 for s in sizes], hops=2)
    assert beta == pytest.approx(1e9, rel=1e-3) and alpha == pytest.approx(5e-5, rel=0.02)
    assert calibrate.merge(
        [{"a": [1, 5], "b": "x"}, {"a": [3, 4], "b": "y"}, {"a": [2, 9], "b": "z"}]
    ) == {"a": [2, 5], "b": "x"}


import re  # noqa: E402


def test_workers_sharing_a_machine_slow_each_other_as_much_as_they_compute_at_once():
    """s = 1.5: DDP's two replicas compute all the time, so each is 1.5x slower; beside an
    idle stage a decoupled stage is barely slowed (1 + 0.5 u, u the other's busy share)."""
    alone, shared = stated(), stated(colocated_slowdown=1.5)
    fast = Link(0.0, 1e15)
    work = workload.workload("resnet20", "cifar10", "bp")
    ddp = [
        predict.predict(Times(work, p), Setup("ddp", 2), fast, 128).step_s for p in (alone, shared)
    ]
    assert ddp[1] == pytest.approx(1.5 * ddp[0])
    assert predict.predict(Times(work, shared), Setup("bp", 1), fast, 128).step_s == pytest.approx(
        predict.predict(Times(work, alone), Setup("bp", 1), fast, 128).step_s
    )
    dgl = workload.workload("resnet20", "cifar10", "dgl")
    setup = Setup("dgl", 2, stages=2, cuts=(9,))  # the first stage does nearly all the work
    plain = predict.predict(Times(dgl, alone), setup, fast, 128)
    slowed = predict.predict(Times(dgl, shared), setup, fast, 128)
    times = Times(dgl, alone)
    second = sum(
        times.forward(j, 128) + times.backward(j, 128, j > 9) + times.update(j)
        for j in range(9, len(dgl.blocks))
    )
    assert slowed.step_s == pytest.approx(plain.step_s * (1 + 0.5 * second / plain.step_s))
