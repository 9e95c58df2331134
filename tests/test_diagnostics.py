"""The local-signal diagnostics against figures computed independently: the true gradient by
autograd through an unsplit copy of the network, the correlation by hand."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import methods
from bench.measure import diagnostics
from methods.base import TrainOptions

pytestmark = pytest.mark.usefixtures("float64")


def ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def build(method):
    torch.manual_seed(0)
    groups = [
        nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh()),
        nn.Sequential(nn.Linear(5, 4), nn.Tanh()),
        nn.Sequential(nn.Linear(4, 3)),
    ]
    options = {"lc": {"critic_filters": 7}, "dgl": {"aux_channels": 7}, "frozen": {}}.get(
        method, {"synth_filters": 7}
    )
    stages = methods.build_stages(
        method, groups, [(5,), (4,), (3,)], 3, ce, TrainOptions(), options
    )
    for stage in stages[:-1]:
        for local in stage.modules()[1:]:
            for p in local.parameters():
                p.data.normal_(0, 0.5)
    return groups, stages


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def true_gradients(groups, x, y):
    """dL/dh_k of the mean loss of the unsplit network (a copy, in training mode)."""
    net = copy.deepcopy(nn.Sequential(*groups)).train()
    h1 = net[0](x)
    h2 = net[1](h1)
    return torch.autograd.grad(ce(net[2](h2), y).mean(), [h1, h2]), (h1.detach(), h2.detach())


@pytest.mark.parametrize("sign", [1, -1])
def test_synth_cosine_and_errors_are_against_the_true_gradient(sign, monkeypatch):
    groups, stages = build("dni")
    x, y = data()
    grads, _ = true_gradients(groups, x, y)
    for stage, g in zip(stages, grads):  # an oracle (or its opposite) in place of the synthesizer
        monkeypatch.setattr(stage, "synthetic_gradient", lambda h, y, g=g: sign * g)
    rows = diagnostics.probe_rows(stages, x, y, ce)
    for k in ("1", "2"):
        assert rows[k, "synth_cosine"] == pytest.approx(sign)
        assert rows[k, "synth_rel_error"] == pytest.approx(0 if sign == 1 else 2, abs=1e-9)
        assert rows[k, "synth_norm_ratio"] == pytest.approx(1)


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("sign", [1, -1])
def test_update_cosine_of_an_oracle_signal(sign, monkeypatch):
    """A group stepped along (minus) the true dL/dh_k makes (minus) backprop's update."""
    groups, stages = build("dni")
    x, y = data()
    grads, _ = true_gradients(groups, x, y)
    for stage, g in zip(stages, grads):
        monkeypatch.setattr(stage, "local_gradient", lambda h, y, g=g: sign * g)
    rows = diagnostics.probe_rows(stages, x, y, ce)
    for k in ("1", "2"):
        assert rows[k, "update_cosine"] == pytest.approx(sign)
        assert rows[k, "update_norm_ratio"] == pytest.approx(1)
    assert ("3", "update_cosine") not in rows


@pytest.mark.parametrize("method", ["lc", "dgl", "dni", "cdni"])
def test_update_cosine_against_backprop_on_an_unsplit_copy(method):
    """Group 1's parameter gradient from its local signal (the head's loss, or the synthetic
    gradient pushed through the group), against the whole network's, both by autograd."""
    groups, stages = build(method)
    x, y = data()
    net = copy.deepcopy(nn.Sequential(*groups)).train()
    true = flat(torch.autograd.grad(ce(net(x), y).mean(), list(net[0].parameters())))
    first = copy.deepcopy(groups[0]).train()
    h = first(x)
    local = copy.deepcopy(stages[0].modules()[1]).train()
    if method in ("lc", "dgl"):
        mine = torch.autograd.grad(ce(local(h), y).mean(), list(first.parameters()))
    else:
        s = local.gradient(h.detach(), y if method == "cdni" else None).detach() / x.shape[0]
        mine = torch.autograd.grad(h, list(first.parameters()), s)
    mine = flat(mine)
    rows = diagnostics.probe_rows(stages, x, y, ce)
    assert rows["1", "update_cosine"] == pytest.approx(cosine(mine, true))
    assert rows["1", "update_norm_ratio"] == pytest.approx(float(mine.norm() / true.norm()))
    assert abs(rows["1", "update_cosine"]) < 0.999  # a real estimate, not the true gradient


def test_synth_cosine_of_the_synthesizer_itself():
    groups, stages = build("dni")
    x, y = data()
    grads, (h1, h2) = true_gradients(groups, x, y)
    rows = diagnostics.probe_rows(stages, x, y, ce)
    for k, (h, g) in enumerate(zip((h1, h2), grads)):
        s = stages[k].synth.train().gradient(h).detach() / 16
        assert rows[str(k + 1), "synth_cosine"] == pytest.approx(
            float((s * g).sum() / (s.norm() * g.norm()))
        )


def test_critic_corr_is_the_per_sample_correlation_with_the_true_loss():
    groups, stages = build("lc")
    x, y = data()
    net = copy.deepcopy(nn.Sequential(*groups)).train()
    h1 = net[0](x).detach()
    true = ce(net[2](net[1](h1)), y).detach()
    mine = ce(stages[0].critic(h1), y).detach()
    a, b = mine - mine.mean(), true - true.mean()
    rows = diagnostics.probe_rows(stages, x, y, ce)
    assert rows["1", "critic_corr"] == pytest.approx(float((a * b).sum() / (a.norm() * b.norm())))
    assert ("3", "critic_corr") not in rows and -1 <= rows["2", "critic_corr"] <= 1


@pytest.mark.parametrize("method", ["lc", "dgl", "dni"])
def test_the_probe_changes_nothing(method):
    groups, stages = build(method)
    for stage in stages:
        stage.train(False)
    x, y = data()
    before = [copy.deepcopy(m.state_dict()) for s in stages for m in s.modules()]
    rng = torch.get_rng_state()
    diagnostics.probe_rows(stages, x, y, ce)
    after = [m.state_dict() for s in stages for m in s.modules()]
    for a, b in zip(before, after):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m.training for s in stages for m in s.modules())
    assert all(p.grad is None for s in stages for m in s.modules() for p in m.parameters())


def test_weight_norm_and_feature_drift_say_which_groups_moved():
    """Against the outputs at the start: the floor's frozen groups have drift 0 and their
    weight norm as built; a trained group moves, its drift computed by hand on the same batch."""
    from bench.executors.sequential import train_step

    x, y = data()
    for method in ("frozen", "dgl"):
        groups, stages = build(method)
        norms = [
            float(torch.cat([p.detach().flatten() for p in g.parameters()]).norm()) for g in groups
        ]
        start = diagnostics.group_outputs(stages, x)
        assert len(start) == 2
        for t in range(3):
            train_step(stages, t, x, y)
        rows = diagnostics.movement_rows(stages, x, start)
        net = copy.deepcopy(nn.Sequential(*groups)).train()
        with torch.no_grad():
            h1 = net[0](x)
            h2 = net[1](h1)
        for k, (h, then) in enumerate(zip((h1, h2), start), 1):
            assert rows[str(k), "feature_drift"] == pytest.approx(
                float((h - then).norm() / then.norm())
            )
        now = [
            float(torch.cat([p.detach().flatten() for p in g.parameters()]).norm()) for g in groups
        ]
        assert [rows[str(k), "weight_norm"] for k in (1, 2, 3)] == pytest.approx(now)
        if method == "frozen":
            assert rows["1", "feature_drift"] == rows["2", "feature_drift"] == 0
            assert now[:2] == norms[:2] and now[2] != norms[2]
        else:
            assert rows["1", "feature_drift"] > 0 and rows["2", "feature_drift"] > 0
