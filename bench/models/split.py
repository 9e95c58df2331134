"""Cutting a model (an ``nn.Sequential`` of blocks) into K contiguous layer groups."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bench.measure.profile import SavedTensorMeter, count_flops, dummy_input

COST_KINDS = ("flops", "params", "activations", "time")
REPEATS = 3  # timed repetitions per block or local module (after one warm-up); the median counts


class SplitError(ValueError):
    """A model cannot be cut as asked."""


def block_costs(
    model: nn.Sequential, input_shape, by: str = "flops", *, batch_size: int = 2
) -> list[float]:
    """Cost of each block: forward FLOPs per sample, parameter count, activation bytes saved for
    backward per sample, or measured seconds of a forward and backward pass of a batch of
    ``batch_size`` (the block in training mode on a detached input, as in a decoupled stage).
    The model is not modified (a copy runs the dummy batch, so BatchNorm statistics stay put)."""
    if by not in COST_KINDS:
        raise ValueError(f"unknown cost {by!r} (choose from {', '.join(COST_KINDS)})")
    if by == "params":
        return [float(sum(p.numel() for p in block.parameters())) for block in model]
    work = copy.deepcopy(model).train()
    x = dummy_input(work, input_shape, batch_size)
    costs = []
    for block in work:
        x = x.detach()
        if by == "time":
            costs.append(
                seconds(lambda: block(x.requires_grad_(x.is_floating_point())).sum().backward())
            )
            with torch.no_grad():
                x = block(x)
        elif by == "flops":
            costs.append(count_flops(block, x) / batch_size)
            with torch.no_grad():
                x = block(x)
        else:
            with SavedTensorMeter(block) as meter:
                x = block(x)
            costs.append(meter.bytes / batch_size)
    return costs


def seconds(work) -> float:
    """Median wall-clock seconds of ``work()`` over REPEATS calls, after one warm-up call."""
    work()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _check_k(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise SplitError(f"cannot split {n} blocks into {k} groups")


def balanced_cuts(costs: Sequence[float], k: int, ends: Sequence[float] | None = None) -> list[int]:
    """The k-1 cut indices of the contiguous partition of ``costs`` into k non-empty groups with the
    smallest largest-group cost (exact DP). A group that ends after block j but is not the last also
    costs ``ends[j]`` (its local module). Among optimal partitions, the lexicographically smallest
    cut list (earliest cuts) is returned."""
    n = len(costs)
    _check_k(n, k)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(i: int, j: int) -> float:
        return prefix[j] - prefix[i] + (ends[j - 1] if ends is not None and j < n else 0.0)

    # best[g][i]: smallest largest-group cost of blocks i..n-1 cut into g groups
    best = [[float("inf")] * (n + 1) for _ in range(k + 1)]
    best[0][n] = 0.0
    for g in range(1, k + 1):
        for i in range(n - g + 1):
            best[g][i] = min(max(cost(i, j), best[g - 1][j]) for j in range(i + 1, n - g + 2))
    target = best[k][0]
    cuts, i = [], 0
    for g in range(
        k, 1, -1
    ):  # earliest cut that keeps both this group and the rest within the optimum
        i = next(
            j for j in range(i + 1, n - g + 2) if cost(i, j) <= target and best[g - 1][j] <= target
        )
        cuts.append(i)
    return cuts


def group_costs(
    costs: Sequence[float], cuts: Sequence[int], ends: Sequence[float] | None = None
) -> list[float]:
    """What each group of the partition at ``cuts`` costs: its blocks' ``costs`` and, for a
    group that is not the last, ``ends[j]`` of its last block j (its local module)."""
    bounds = [0, *cuts, len(costs)]
    return [
        sum(costs[a:b]) + (ends[b - 1] if ends is not None and b < len(costs) else 0.0)
        for a, b in zip(bounds, bounds[1:])
    ]


def training_costs(
    model: nn.Sequential,
    input_shape,
    by: str,
    *,
    batch_size: int = 2,
    local_cost: Callable[[tuple], float] | None = None,
):
    """``(costs, ends)``: what each block costs to train (by FLOPs: 3 x its forward; by time:
    its measured forward and backward) and what the rule's local work costs on each block's
    output (``local_cost(shape)``; ``None`` without it), as ``resolve_cuts`` balances them."""
    costs = block_costs(model, input_shape, by, batch_size=batch_size if by == "time" else 2)
    if by == "flops":
        costs = [3 * c for c in costs]
    ends = None
    if by in ("flops", "time") and local_cost is not None:
        shapes = [tuple(s) for s in group_output_shapes(list(model), input_shape)]
        cache: dict[tuple, float] = {}
        for shape in shapes[:-1]:  # the last block ends the last group: no local module
            if shape not in cache:
                cache[shape] = local_cost(shape)
        ends = [cache[shape] for shape in shapes[:-1]] + [0.0]
    return costs, ends


def _check_cuts(cuts: Sequence[int], n: int, k: int) -> list[int]:
    cuts = list(cuts)
    if len(cuts) != k - 1:
        raise SplitError(f"{k} groups need {k - 1} cuts, got {len(cuts)}: {cuts}")
    if any(not 1 <= c <= n - 1 for c in cuts):
        raise SplitError(f"cuts {cuts} must lie in 1..{n - 1} for {n} blocks")
    if any(a >= b for a, b in zip(cuts, cuts[1:])):
        raise SplitError(f"cuts {cuts} must be strictly increasing")
    return cuts


def resolve_cuts(
    model: nn.Sequential,
    k: int,
    *,
    input_shape,
    by: str = "flops",
    cuts: Sequence[int] | None = None,
    batch_size: int = 2,
    local_cost: Callable[[tuple], float] | None = None,
) -> list[int]:
    """The k-1 cut indices: ``cuts`` validated, or balanced by ``by`` (see ``block_costs``).
    By FLOPs or time a stage costs what it trains: its blocks forward and backward (by FLOPs,
    a block's backward taken as twice its forward) and, for a group that is not the last,
    ``local_cost(shape)``, the rule's local work on its output of per-sample ``shape``
    (critic, auxiliary net, synthesizer) in the same units, since the slowest stage, local
    module included, bounds a decoupled pipeline. Timing runs where the model is built, on
    the CPU: on a GPU the relative costs of the blocks may differ."""
    _check_k(len(model), k)
    if cuts is not None:
        return _check_cuts(cuts, len(model), k)
    if k == 1:
        return []
    costs, ends = training_costs(
        model, input_shape, by, batch_size=batch_size, local_cost=local_cost
    )
    return balanced_cuts(costs, k, ends)


def split_model(
    model: nn.Sequential,
    k: int,
    *,
    input_shape,
    by: str = "flops",
    cuts: Sequence[int] | None = None,
) -> list[nn.Sequential]:
    """The model cut into k ``nn.Sequential`` groups that share (do not copy) its blocks."""
    bounds = [0, *resolve_cuts(model, k, input_shape=input_shape, by=by, cuts=cuts), len(model)]
    blocks = list(model)
    return [nn.Sequential(*blocks[a:b]) for a, b in zip(bounds, bounds[1:])]


def group_output_shapes(groups: Sequence[nn.Module], input_shape) -> list[tuple[int, ...]]:
    """Per-sample output shape of each group, from one dummy sample run through them in eval mode."""
    if not groups:
        return []
    modes = [(m, m.training) for g in groups for m in g.modules()]
    x = dummy_input(groups[0], input_shape, 1)
    shapes = []
    try:
        with torch.no_grad():
            for g in groups:
                x = g.eval()(x)
                shapes.append(tuple(x.shape[1:]))
    finally:
        for m, mode in modes:
            m.training = mode
    return shapes
