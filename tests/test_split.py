import itertools
import random

import pytest
import torch
from torch import nn

from bench.measure.profile import (
    SavedTensorMeter,
    count_flops,
    grad_bytes,
    optimizer_state_bytes,
    param_bytes,
)
from bench.models import build_model
from bench.models.split import (
    SplitError,
    balanced_cuts,
    block_costs,
    group_output_shapes,
    resolve_cuts,
    split_model,
)

CIFAR = (3, 32, 32)


def brute_force_cuts(costs, k):
    """All cut lists in lexicographic order; the first with the smallest largest-group cost."""
    n = len(costs)

    def worst(cuts):
        bounds = [0, *cuts, n]
        return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))

    return list(min(itertools.combinations(range(1, n), k - 1), key=worst))


def test_balanced_cuts_match_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        costs = [rng.randint(0, 6) for _ in range(n)]  # small integers: exact sums and many ties
        k = rng.randint(1, n)
        assert balanced_cuts(costs, k) == brute_force_cuts(costs, k), (costs, k)


def test_balanced_cuts_examples():
    assert balanced_cuts([1, 2, 1], 2) == [1]  # tie: earlier cut
    assert balanced_cuts([5, 1, 1, 1, 1, 1], 2) == [1]
    assert balanced_cuts([1.5, 0.5, 2.0], 3) == [1, 2]
    assert balanced_cuts([3.0], 1) == []


@pytest.mark.parametrize("n, k", [(5, 6), (5, 0), (0, 1)])
def test_balanced_cuts_bad_k(n, k):
    with pytest.raises(SplitError, match=f"cannot split {n} blocks into {k} groups"):
        balanced_cuts([1.0] * n, k)


def test_split_error_is_value_error():
    assert issubclass(SplitError, ValueError)


@pytest.mark.parametrize(
    "k, cuts, match",
    [
        (3, [4], "3 groups need 2 cuts"),
        (3, [4, 4], "strictly increasing"),
        (3, [6, 4], "strictly increasing"),
        (2, [0], r"1\.\.10"),
        (2, [11], r"1\.\.10"),
        (12, None, "cannot split 11 blocks into 12 groups"),
        (0, [], "cannot split 11 blocks into 0 groups"),
    ],
)
def test_explicit_cuts_validation(k, cuts, match):
    model = build_model("resnet20", CIFAR, 10)
    with pytest.raises(SplitError, match=match):
        split_model(model, k, input_shape=CIFAR, cuts=cuts)


def test_resolve_cuts():
    model = build_model("resnet8", (3, 16, 16), 10)
    assert resolve_cuts(model, 3, input_shape=(3, 16, 16), cuts=(2, 3)) == [2, 3]
    assert resolve_cuts(model, 1, input_shape=(3, 16, 16)) == []
    for by in ("flops", "params", "activations"):
        costs = block_costs(model, (3, 16, 16), by)
        assert resolve_cuts(model, 3, input_shape=(3, 16, 16), by=by) == balanced_cuts(costs, 3)


@pytest.mark.parametrize("train", [False, True])
def test_split_model_composes_to_the_whole_model(train):
    torch.manual_seed(0)
    model = build_model("resnet20", CIFAR, 10).train(train)
    groups = split_model(model, 4, input_shape=CIFAR)
    assert len(groups) == 4 and all(len(g) > 0 for g in groups)
    assert all(a is b for a, b in zip([b for g in groups for b in g], model))  # shared, not copied
    x = torch.randn(4, *CIFAR)
    expected = model(x)
    out = x
    for g in groups:
        out = g(out)
    assert torch.equal(out, expected)


def test_group_output_shapes():
    model = build_model("resnet20", CIFAR, 10).train()
    groups = split_model(model, 3, input_shape=CIFAR, cuts=[4, 7])
    assert group_output_shapes(groups, CIFAR) == [(16, 32, 32), (32, 16, 16), (10,)]
    assert all(m.training for m in model.modules())  # mode restored


def test_block_costs_flops_and_params():
    model = build_model("resnet20", CIFAR, 10)
    flops = block_costs(model, CIFAR, "flops")
    assert flops[0] == 2 * 9 * 3 * 16 * 32 * 32  # stem conv, 2 FLOPs per multiply-add, per sample
    assert flops[1] == 2 * (2 * 9 * 16 * 16 * 32 * 32)  # two 3x3 16->16 convs
    assert flops[-1] == 2 * 64 * 10  # the linear layer (pooling is not counted)
    assert sum(flops) == count_flops(model, torch.randn(1, *CIFAR))
    params = block_costs(model, CIFAR, "params")
    assert sum(params) == sum(p.numel() for p in model.parameters())
    assert params[0] == 9 * 3 * 16 + 2 * 16
    with pytest.raises(ValueError, match="unknown cost"):
        block_costs(model, CIFAR, "seconds")


def test_block_costs_activations_leave_model_untouched():
    model = build_model("small-cnn", (1, 8, 8), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    costs = block_costs(model, (1, 8, 8), "activations", batch_size=2)
    # block 0 per sample: conv input 1x8x8, BN input 16x8x8, ReLU output 16x8x8 (float32), plus BN's saved
    # batch mean and inverse std (16 floats each) shared by the batch of 2
    assert costs[0] == 4 * (64 + 2 * 16 * 64) + 2 * 16 * 4 / 2
    # classifier: flatten is a view of the input (its storage, 32x2x2 floats); the weight is not counted
    assert costs[-1] == 4 * 32 * 2 * 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# --- bench.measure.profile ---


@pytest.mark.parametrize("input_grad", [False, True])
def test_saved_tensor_meter_mlp(input_grad):
    batch, d_in, hidden, d_out = 4, 5, 7, 3
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
    x = torch.randn(batch, d_in, requires_grad=input_grad)
    with SavedTensorMeter() as meter:
        loss = net(x).sum()
    # torch 2.14 saves: linear 1 -> x (for the weight grad; plus W1^T when x needs a grad), ReLU -> its output,
    # linear 2 -> its input (the same ReLU output) and W2^T. Weights are parameters and the ReLU output is
    # one storage, so the activations are x and the ReLU output.
    assert meter.bytes == 4 * batch * (d_in + hidden)
    loss.backward()  # the graph still works through the hooks
    assert net[0].weight.grad is not None


def test_saved_tensor_meter_excludes_module_buffers():
    bn = nn.BatchNorm1d(6).train()
    x = torch.randn(5, 6)
    with SavedTensorMeter(bn) as meter:
        bn(x)
    # input (5x6), batch mean and inverse std (6 each); running stats (buffers) and weight are excluded
    assert meter.bytes == 4 * (5 * 6 + 6 + 6)
    with SavedTensorMeter() as unexcluded:
        bn(x)
    assert unexcluded.bytes == meter.bytes + 4 * (6 + 6)  # running mean and var


def test_flops_and_byte_counters():
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    assert count_flops(net, torch.randn(4, 5)) == 2 * 4 * (5 * 7 + 7 * 3)
    n = (5 * 7 + 7) + (7 * 3 + 3)
    assert param_bytes(net) == 4 * n
    assert grad_bytes(net) == 0
    net(torch.randn(4, 5)).sum().backward()
    assert grad_bytes(net) == 4 * n
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(net.parameters())
    assert optimizer_state_bytes(sgd) == optimizer_state_bytes(adam) == 0
    sgd.step()
    adam.step()
    assert optimizer_state_bytes(sgd) == 4 * n  # one momentum buffer per parameter
    assert (
        optimizer_state_bytes(adam) == 2 * 4 * n + 4 * 4
    )  # two moments, plus a float32 step per tensor


def test_balanced_cuts_charge_a_local_module_to_the_group_it_ends():
    # blocks 1, 1, 1, 1; a local module after block j costs ends[j]
    assert balanced_cuts([1, 1, 1, 1], 2) == [2]
    # a module costing 2 after block 1 (index 1) makes [0,1] + 2 = 4: better cut after block 0
    assert balanced_cuts([1, 1, 1, 1], 2, ends=[0.5, 2, 2, 0]) == [1]  # 1 + 0.5 vs 3
    # the dear module after block 0 pushes the cut to block 1; ends[-1] (the last group) never counts
    assert balanced_cuts([1, 1, 1], 2, ends=[5, 0, 100]) == [2]


def test_split_by_measured_time_charges_the_local_module(monkeypatch):
    """Equal block times; a local module that is dear after the first stage's blocks moves the
    cut so that the stage carrying it gets fewer blocks."""
    model = build_model("resnet8", CIFAR, 10)
    monkeypatch.setattr("bench.models.split.seconds", lambda work: 1.0)
    shapes = {}
    cuts = resolve_cuts(
        model,
        2,
        input_shape=CIFAR,
        by="time",
        local_cost=lambda shape: shapes.setdefault(shape, 3.0),
    )
    assert cuts == [1]  # 1 block + 3 vs 4 blocks
    assert set(shapes) == {(16, 32, 32), (32, 16, 16), (64, 8, 8)}  # the classifier has none
    assert resolve_cuts(model, 2, input_shape=CIFAR, by="time") == [
        2
    ]  # no local work: 2 | 3 blocks


def test_split_by_flops_charges_each_stage_its_training_flops_and_local_work():
    """A stage costs its blocks forward and backward (3x their forward FLOPs) plus, where it is
    not the last, the rule's local work on its output: a dear local module after the early,
    wide blocks pushes the cut to where it is cheaper."""
    model = build_model("resnet8", CIFAR, 10)
    forward = block_costs(model, CIFAR, "flops")
    local = {(16, 32, 32): 10 * sum(forward), (32, 16, 16): 0.0, (64, 8, 8): 0.0}
    cuts = resolve_cuts(model, 2, input_shape=CIFAR, local_cost=lambda shape: local[shape])
    shapes = [tuple(s) for s in group_output_shapes(list(model), CIFAR)]
    ends = [local.get(s, 0.0) for s in shapes[:-1]] + [0.0]
    assert (
        cuts
        == balanced_cuts([3 * c for c in forward], 2, ends)
        != resolve_cuts(model, 2, input_shape=CIFAR)
    )
    assert shapes[cuts[0] - 1] != (16, 32, 32)


def test_local_cost_counts_the_rules_own_local_work():
    """Training FLOPs per sample of the local module, as each rule runs it: LC's critic forward
    once, backward to its input and to its weights (its linear layer's input gradient twice);
    none for backprop."""
    from bench.config import RunConfig
    from bench.prepare import local_cost

    shape = (16, 32, 32)
    critic_forward = 2 * 9 * 16 * 128 * 32 * 32 + 2 * 128 * 32 * 32 * 10
    linear_input_grad = 2 * 128 * 32 * 32 * 10
    lc = local_cost(RunConfig(method="lc").validated(), shape, 10)
    assert lc == 3 * critic_forward + linear_input_grad
    for method in ("bp", "pipe-bp"):
        assert local_cost(RunConfig(method=method).validated(), shape, 10) == 0
    synth_forward = 2 * 9 * 128 * 32 * 32 * (16 + 16)  # the tables' one conv + output conv
    dni = local_cost(RunConfig(method="dni").validated(), shape, 10)
    assert 2 * synth_forward < dni < 3 * synth_forward  # no input gradient into its first conv
    dgl_comparison = RunConfig(
        method="dni", options={"synth_layers": 2, "synth_kernel": 5, "synth_batchnorm": True}
    ).validated()
    synth_forward = 2 * 25 * 128 * 32 * 32 * (16 + 128 + 16)
    assert 2 * synth_forward < local_cost(dgl_comparison, shape, 10) < 3 * synth_forward


def test_split_balance_row_is_the_best_bound_any_cut_allows():
    """``split_balance``: the mean stage training FLOPs over the largest, at the run's cuts.
    Under the FLOPs split the bound at those cuts (K T_BP / sum_k c_k x balance, in FLOPs:
    T_BP / max_k c_k) is the best of every cut, found here by trying them all."""
    from bench import prepare
    from bench.config import RunConfig

    shape = (1, 28, 28)
    cfg = RunConfig(method="lc", groups=2, task="fashion-mnist", model="resnet20", device="cpu")
    prep = prepare.prepare(cfg, data=False)
    balance = prepare.static_rows(prep)["", "split_balance"]
    model = build_model("resnet20", shape, 10)
    forward = [3 * c for c in block_costs(model, shape, "flops")]
    shapes = [tuple(s) for s in group_output_shapes(list(model), shape)]
    local = {s: prepare.local_cost(prep.cfg, s, 10) for s in set(shapes)}

    def stage_costs(cut):
        return [sum(forward[:cut]) + local[shapes[cut - 1]], sum(forward[cut:])]

    chosen = stage_costs(prep.cuts[0])
    assert balance == pytest.approx(sum(chosen) / 2 / max(chosen))
    best = max(sum(forward) / max(stage_costs(c)) for c in range(1, len(forward)))
    assert 2 * sum(forward) / sum(chosen) * balance == pytest.approx(best)
    assert 0.5 < balance < 1
    bp = prepare.prepare(
        RunConfig(method="bp", groups=1, task="fashion-mnist", model="resnet20", device="cpu"),
        data=False,
    )
    assert prepare.static_rows(bp)["", "split_balance"] == 1.0
