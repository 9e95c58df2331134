"""Each learning rule checked against an expectation computed independently of methods/:
plain autograd on copies of the networks and hand-written optimizer steps."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import methods
from bench.executors.sequential import train_step
from methods.base import TrainOptions
from methods.gn import diversity

pytestmark = pytest.mark.usefixtures("float64")  # the rules are compared in float64

CLASSES, DIM, BATCH = 3, 6, 8
OPTS = TrainOptions(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def per_sample_ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def mlp_groups(k, seed=0):
    """K small groups: Linear+Tanh blocks, the last one ending in a classifier."""
    torch.manual_seed(seed)
    groups = [nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh()) for _ in range(k - 1)]
    groups.append(nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, CLASSES)))
    return groups


def stages_for(method, groups, **options):
    shapes = [(DIM,)] * (len(groups) - 1) + [(CLASSES,)]
    torch.manual_seed(1)
    return methods.build_stages(method, groups, shapes, CLASSES, per_sample_ce, OPTS, options)


def data(seed=2, n=BATCH):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def sgd_first_step(p, grad, o=OPTS):
    """SGD with Nesterov momentum and weight decay, first step, written out."""
    d = grad + o.weight_decay * p
    return p - o.lr * (d + o.momentum * d)


def adam_first_step(p, grad, lr, eps=1e-8):
    """Adam's first step: bias-corrected m = g, v = g^2."""
    return p - lr * grad / (grad.abs() + eps)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def assert_all_close(actual, expected, **kw):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **kw)


@pytest.mark.parametrize(
    "method, k, options",
    [
        ("bp", 2, {}),
        ("bp", 3, {}),
        ("bp", 4, {}),
        # micro-batches change nothing but rounding where no layer mixes samples
        ("pipe-bp", 2, {"microbatches": 2}),
        ("pipe-bp", 3, {"microbatches": 4}),
    ],
)
def test_bp_split_equals_unsplit_autograd(method, k, options):
    groups = mlp_groups(k)
    whole = copy.deepcopy(nn.Sequential(*groups))
    stages = stages_for(method, groups, **options)
    reference = torch.optim.SGD(
        whole.parameters(),
        lr=OPTS.lr,
        momentum=OPTS.momentum,
        nesterov=True,
        weight_decay=OPTS.weight_decay,
    )
    for step in range(5):
        x, y = data(seed=step)
        train_step(stages, step, x, y)
        reference.zero_grad()
        F.cross_entropy(whole(x), y).backward()
        reference.step()
    assert_all_close(params(nn.Sequential(*groups)), params(whole), rtol=1e-12, atol=1e-12)
    assert all(not s.kept for s in stages), "BP must not keep anything once a batch is done"


@pytest.mark.parametrize("method", ["dgl", "lc", "gn"])
def test_local_rules_send_no_gradient_upstream(method):
    """Group 0's update is the same whatever the groups below it are."""
    x, y = data()
    results = []
    for seed in (0, 5):
        groups = mlp_groups(3, seed=0)
        torch.manual_seed(seed)
        for g in groups[1:]:
            for p in g.parameters():
                p.data.normal_()
        options = {"neuron_groups": 1} if method == "gn" else {}
        stages = stages_for(method, groups, **options)
        train_step(stages, 0, x.clone(), y)
        results.append(params(groups[0]))
    assert_all_close(results[0], results[1], rtol=0, atol=0)


def test_dgl_group_update_equals_hand_computed_local_loss():
    x, y = data()
    groups = mlp_groups(2)
    stages = stages_for("dgl", groups)
    f, aux = copy.deepcopy(groups[0]), copy.deepcopy(stages[0].aux)
    loss = F.cross_entropy(aux(f(x)), y)
    grads = torch.autograd.grad(loss, list(f.parameters()) + list(aux.parameters()))
    nf = len(list(f.parameters()))
    expected_f = [sgd_first_step(p.detach(), g) for p, g in zip(f.parameters(), grads[:nf])]
    expected_aux = [sgd_first_step(p.detach(), g) for p, g in zip(aux.parameters(), grads[nf:])]
    train_step(stages, 0, x, y)
    assert_all_close(params(groups[0]), expected_f)
    assert_all_close(params(stages[0].aux), expected_aux)


def test_lc_group_and_critic_updates_equal_hand_computed():
    """f_k steps on dL_k/dθ_k alone; c_k steps (Adam) on mean |L_k - L_{k+1}| only,
    L_{k+1} detached; the last critic is matched to the true loss."""
    x, y = data()
    groups = mlp_groups(3)
    stages = stages_for("lc", groups, critic_lr=1e-3)
    f = [copy.deepcopy(g) for g in groups]
    c = [copy.deepcopy(s.critic) for s in stages[:2]]
    h1 = f[0](x)
    l1 = F.cross_entropy(c[0](h1), y, reduction="none")
    h2 = f[1](h1.detach())
    l2 = F.cross_entropy(c[1](h2), y, reduction="none")
    l3 = F.cross_entropy(f[2](h2.detach()), y, reduction="none")  # the true loss
    expected = {}
    for name, net, loss in (("f0", f[0], l1), ("f1", f[1], l2)):
        grads = torch.autograd.grad(loss.mean(), list(net.parameters()), retain_graph=True)
        expected[name] = [sgd_first_step(p.detach(), g) for p, g in zip(net.parameters(), grads)]
    for name, critic, mine, target in (("c0", c[0], l1, l2), ("c1", c[1], l2, l3)):
        match = (mine - target.detach()).abs().mean()
        grads = torch.autograd.grad(match, list(critic.parameters()), retain_graph=True)
        expected[name] = [
            adam_first_step(p.detach(), g, 1e-3) for p, g in zip(critic.parameters(), grads)
        ]
    train_step(stages, 0, x, y)
    assert_all_close(params(groups[0]), expected["f0"])
    assert_all_close(params(groups[1]), expected["f1"])
    assert_all_close(params(stages[0].critic), expected["c0"])
    assert_all_close(params(stages[1].critic), expected["c1"])


def _two_forward_reference(method, groups, locals_, batches, local_lr):
    """The rule as it was written before the forward pass of the local module was kept:
    the group steps on a pass of the local module, which runs again for its own update when
    the message comes (plain torch: SGD for the groups, Adam for the local modules)."""
    sgd = [
        torch.optim.SGD(
            g.parameters(),
            lr=OPTS.lr,
            momentum=OPTS.momentum,
            nesterov=True,
            weight_decay=OPTS.weight_decay,
        )
        for g in groups
    ]
    adam = [torch.optim.Adam(m.parameters(), lr=local_lr) for m in locals_]
    for x, y in batches:
        hs, messages = [x], {}
        for k, g in enumerate(groups[:-1]):
            xin = hs[-1].detach().requires_grad_(k > 0)
            h = g(xin)
            if method == "lc":
                per_sample = F.cross_entropy(locals_[k](h), y, reduction="none")
                grads = torch.autograd.grad(per_sample.mean(), list(g.parameters()))
                messages[k - 1] = per_sample.detach()
            else:
                synthetic = locals_[k].gradient(h.detach()).detach()
                weights = list(g.parameters())
                grads = torch.autograd.grad(
                    h, weights + [xin] * (k > 0), grad_outputs=synthetic / BATCH
                )
                if k > 0:
                    messages[k - 1] = grads[-1] * BATCH
                grads = grads[: len(weights)]
            for p, gr in zip(g.parameters(), grads):
                p.grad = gr
            sgd[k].step()
            sgd[k].zero_grad()
            hs.append(h.detach())
        h = hs[-1].detach().requires_grad_()
        per_sample = F.cross_entropy(groups[-1](h), y, reduction="none")
        per_sample.mean().backward()
        messages[len(groups) - 2] = per_sample.detach() if method == "lc" else h.grad * BATCH
        sgd[-1].step()
        sgd[-1].zero_grad()
        for k in reversed(range(len(groups) - 1)):
            if method == "lc":
                loss = (
                    (F.cross_entropy(locals_[k](hs[k + 1]), y, reduction="none") - messages[k])
                    .abs()
                    .mean()
                )
            else:
                loss = locals_[k].fit_loss(locals_[k](hs[k + 1]), messages[k])
            loss.backward()
            adam[k].step()
            adam[k].zero_grad()


@pytest.mark.parametrize("method", ["lc", "dni"])
def test_one_forward_of_the_local_module_updates_as_two_did(method):
    """LC's critic and DNI's synthesizer run forward once per batch, their own update using
    that pass: over a few batches every weight equals the two-forward rule's."""
    batches = [data(seed) for seed in (2, 3, 4)]
    groups = mlp_groups(3)
    local = {"critic_lr": 1e-3} if method == "lc" else {"synth_lr": 1e-3, "net_optimizer": "run"}
    stages = stages_for(method, groups, **local)
    locals_ = [s.critic if method == "lc" else s.synth for s in stages[:2]]
    for m in locals_:
        _randomise(m, 9)
    ref_groups, ref_locals = copy.deepcopy(groups), copy.deepcopy(locals_)
    for t, (x, y) in enumerate(batches):
        train_step(stages, t, x, y)
    _two_forward_reference(method, ref_groups, ref_locals, batches, 1e-3)
    for mine, theirs in [*zip(groups, ref_groups), *zip(locals_, ref_locals)]:
        assert_all_close(params(mine), params(theirs))
    assert not any(s.kept for s in stages)


@pytest.mark.parametrize("method", ["lc", "dni"])
def test_a_kept_pass_survives_an_update_of_its_module_before_its_message(method):
    """On ranks a stage runs batch t+1 before batch t's message comes, and batch t-1's
    message steps the local module in between: the kept pass was run on copies of the weights."""
    groups = mlp_groups(2)
    stage = stages_for(method, groups)[0]
    (x0, y0), (x1, y1) = data(2), data(3)
    message = (
        (lambda x, y: torch.rand(BATCH))
        if method == "lc"
        else (lambda x, y: torch.randn(BATCH, DIM))
    )
    stage.forward(0, x0, y0)
    stage.forward(1, x1, y1)
    local = stage.critic if method == "lc" else stage.synth
    before = params(local)
    stage.receive(0, message(x0, y0))
    assert any(not torch.equal(a, b) for a, b in zip(params(local), before))
    stage.receive(1, message(x1, y1))  # its pass was run before the step above
    assert not stage.kept


def test_lc_critic_untouched_by_its_own_loss_before_the_message():
    x, y = data()
    groups = mlp_groups(2)
    stages = stages_for("lc", groups)
    before = params(stages[0].critic)
    stages[0].forward(0, x, y)
    assert all(p.grad is None for p in stages[0].critic.parameters())
    assert_all_close(params(stages[0].critic), before, rtol=0, atol=0)
    assert 0 in stages[0].kept  # waits for L_{k+1}


def _randomise(module, seed):
    """Random weights (and, for a synthesizer, a target scale as if it had been fitted)."""
    torch.manual_seed(seed)
    for p in module.parameters():
        p.data.normal_(0, 0.5)
    if isinstance(module, methods.modules.Synthesizer) and module.fit == "rms":
        module.scale.fill_(1.7)


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_dni_targets_are_bootstrapped_gradients(method):
    """The message to stage k is J_{k+1}^T M_{k+1}(h_{k+1}) (summed-loss scale), and the
    true gradient of the summed loss at the last boundary."""
    x, y = data()
    groups = mlp_groups(3)
    stages = stages_for(method, groups)
    for i, s in enumerate(stages[:2]):
        _randomise(s.synth, 10 + i)
    f = [copy.deepcopy(g) for g in groups]
    m1 = copy.deepcopy(stages[1].synth)
    h1 = f[0](x).detach().requires_grad_()
    h2 = f[1](h1)
    synthetic = m1.gradient(h2.detach(), y if method == "cdni" else None).detach()
    (target_0,) = torch.autograd.grad(h2, h1, grad_outputs=synthetic)
    h2 = h2.detach().requires_grad_()
    (target_1,) = torch.autograd.grad(F.cross_entropy(f[2](h2), y, reduction="sum"), h2)
    received = {}
    for s in stages[:2]:
        s.receive = (
            lambda orig, i: lambda b, m: (received.__setitem__(i, m.clone()), orig(b, m))[1]
        )(s.receive, s.index)
    train_step(stages, 0, x, y)
    torch.testing.assert_close(received[0], target_0)
    torch.testing.assert_close(received[1], target_1)


@pytest.mark.parametrize("net", ["adam-synthetic", "adam", "run"])
def test_dni_group_steps_on_synthetic_gradient(net):
    """By default (``adam-synthetic``) a group below the last steps on its synthetic gradient
    with the rule's own Adam at ``net_lr``, without weight decay, and the last group, on the
    true loss, with the run's SGD; ``net_optimizer=adam``: every group on that Adam (the
    published DNI recipe); ``run``: every group on the run's SGD."""
    x, y = data()
    groups = mlp_groups(2)
    stages = stages_for("dni", groups, net_optimizer=net, net_lr=2e-3)
    _randomise(stages[0].synth, 3)
    f, m = copy.deepcopy(groups[0]), copy.deepcopy(stages[0].synth)
    h = f(x)
    grads = torch.autograd.grad(
        h, list(f.parameters()), grad_outputs=m.gradient(h.detach()).detach() / BATCH
    )
    step = sgd_first_step if net == "run" else (lambda p, g: adam_first_step(p, g, 2e-3))
    expected = [step(p.detach(), g) for p, g in zip(f.parameters(), grads)]
    train_step(stages, 0, x, y)
    assert_all_close(params(groups[0]), expected)
    last = stages[1].optimizer
    assert isinstance(last, torch.optim.Adam if net == "adam" else torch.optim.SGD)
    if net == "adam":
        assert last.param_groups[0]["lr"] == 2e-3 and last.param_groups[0]["weight_decay"] == 0
    else:
        assert last.param_groups[0]["lr"] == OPTS.lr
    if net != "run":
        stages[0].scale_lr(0.1)  # a schedule's factor applies to the rule's own rate
        assert stages[0].optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)
    stages[1].scale_lr(0.1)
    assert last.param_groups[0]["lr"] == pytest.approx(0.1 * (2e-3 if net == "adam" else OPTS.lr))


def test_dni_published_fit_is_plain_l2_on_the_raw_targets():
    """The default fit (koz4k/dni-pytorch): net(h) predicts dL/dh of the mean loss, the
    summed-loss target divided by B; the loss is the squared error summed per sample, averaged
    over the batch; one Adam step on it. The group steps on net(h) as it is."""
    x, y = data()
    stage = stages_for("dni", mlp_groups(2), synth_lr=1e-3)[0]
    assert stage.synth.fit == "l2" and not hasattr(stage.synth, "scale")
    _randomise(stage.synth, 5)
    net = copy.deepcopy(stage.synth)
    h = copy.deepcopy(stage.group)(x).detach()
    stage.forward(0, x, y)
    message = 1e-4 * torch.randn(h.shape, generator=torch.Generator().manual_seed(6))
    loss = ((net(h) - message / BATCH) ** 2).sum() / BATCH
    grads = torch.autograd.grad(loss, list(net.parameters()))
    expected = [adam_first_step(p.detach(), gr, 1e-3) for p, gr in zip(net.parameters(), grads)]
    stage.receive(0, message)
    assert_all_close(params(stage.synth), expected)
    torch.testing.assert_close(stage.synthetic_gradient(h, y), stage.synth(h))


def test_dni_synthesizer_rms_variant_fits_targets_divided_by_their_running_rms():
    """``synth_fit=rms`` (not published): M(h) = scale * net(h); net regresses (L2, Adam) on
    target / scale, where scale is the RMS of the first target, then moves 1% of the way to
    each new target's RMS."""
    x, y = data()
    stage = stages_for("dni", mlp_groups(2), synth_lr=1e-3, synth_fit="rms")[0]
    _randomise(stage.synth, 5)
    stage.synth.scale.zero_()  # nothing fitted yet
    net = copy.deepcopy(stage.synth)
    h = copy.deepcopy(stage.group)(x).detach()
    stage.forward(0, x, y)
    g = torch.Generator().manual_seed(6)
    message = 1e-4 * torch.randn(h.shape, generator=g)
    rms = message.pow(2).mean().sqrt()
    loss = F.mse_loss(net(h), message / rms)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    expected = [adam_first_step(p.detach(), gr, 1e-3) for p, gr in zip(net.parameters(), grads)]
    stage.receive(0, message)
    assert_all_close(params(stage.synth), expected)
    torch.testing.assert_close(stage.synth.scale, rms)
    stage.forward(1, x, y)
    stage.receive(1, 3 * message)
    torch.testing.assert_close(stage.synth.scale, rms + 0.01 * (3 * rms - rms))
    torch.testing.assert_close(
        stage.synthetic_gradient(h, y), stage.synth.scale * stage.synth(h) / BATCH
    )


def test_dni_sum_fit_regresses_the_summed_loss_gradient_and_steps_on_it_over_b():
    """``synth_fit=sum`` (not published): net(h) regresses (the same L2) on the summed-loss
    target as it is, and the group steps on net(h) / B."""
    x, y = data()
    stage = stages_for("dni", mlp_groups(2), synth_lr=1e-3, synth_fit="sum")[0]
    _randomise(stage.synth, 5)
    net = copy.deepcopy(stage.synth)
    h = copy.deepcopy(stage.group)(x).detach()
    stage.forward(0, x, y)
    message = 1e-4 * torch.randn(h.shape, generator=torch.Generator().manual_seed(6))
    loss = ((net(h) - message) ** 2).sum() / BATCH
    grads = torch.autograd.grad(loss, list(net.parameters()))
    expected = [adam_first_step(p.detach(), gr, 1e-3) for p, gr in zip(net.parameters(), grads)]
    stage.receive(0, message)
    assert_all_close(params(stage.synth), expected)
    torch.testing.assert_close(stage.synthetic_gradient(h, y), stage.synth(h) / BATCH)


def test_dni_factor_scales_the_gradient_the_group_steps_on():
    """``synth_factor`` (koz4k/dni-pytorch's ``factor``): the group steps on factor x M(h)/B,
    so plain SGD moves it factor times as far; the synthesizer's own fit is unchanged."""
    x, y = data()
    plain = TrainOptions(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0)
    moved = {}
    for factor in (1.0, 0.25):
        groups = mlp_groups(2)
        shapes = [(DIM,), (CLASSES,)]
        torch.manual_seed(1)
        options = {"synth_factor": factor, "net_optimizer": "run"}
        stage = methods.build_stages("dni", groups, shapes, CLASSES, per_sample_ce, plain, options)[
            0
        ]
        _randomise(stage.synth, 5)
        before = params(stage.group)
        stage.forward(0, x, y)
        moved[factor] = [a - b for a, b in zip(params(stage.group), before)]
    assert any(d.abs().max() > 0 for d in moved[1.0])
    assert_all_close(moved[0.25], [0.25 * d for d in moved[1.0]])


def test_dni_synthesizer_on_the_network_optimizer_takes_its_settings_and_schedule():
    """``synth_optimizer=network`` (not published): the synthesizer steps with the groups'
    optimizer: the run's SGD (rate, momentum, weight decay) under ``net_optimizer=run``, and
    follows its schedule; the rule's own Adam by default."""
    own = stages_for("dni", mlp_groups(2), synth_optimizer="network", net_lr=2e-3)[0]
    assert isinstance(own.synth_optimizer, torch.optim.Adam)
    assert own.synth_optimizer.param_groups[0]["lr"] == 2e-3
    stage = stages_for("dni", mlp_groups(2), synth_optimizer="network", net_optimizer="run")[0]
    group = stage.synth_optimizer.param_groups[0]
    assert isinstance(stage.synth_optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        OPTS.lr,
        OPTS.momentum,
        OPTS.nesterov,
        OPTS.weight_decay,
    )
    stage.scale_lr(0.1)
    assert stage.synth_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * OPTS.lr)
    adam = stages_for("dni", mlp_groups(2))[0]
    adam.scale_lr(0.1)
    assert isinstance(adam.synth_optimizer, torch.optim.Adam)
    assert adam.synth_optimizer.param_groups[0]["lr"] == methods.dni.CHOSEN_LR  # unscheduled


def test_dni_synthesizer_scale_is_set_by_the_first_nonzero_target():
    """A bootstrapped target is exactly zero while the synthesizer below the next stage is
    still zero: it must not fix the scale."""
    synth = methods.modules.Synthesizer((DIM,), CLASSES, conditioned=False, filters=4, fit="rms")
    h = torch.randn(BATCH, DIM)
    assert synth.fit_loss(synth(h), torch.zeros(BATCH, DIM)) == 0 and synth.scale == 0
    target = torch.full((BATCH, DIM), -3e-5)
    synth.fit_loss(synth(h), target)
    torch.testing.assert_close(synth.scale, torch.tensor(3e-5))


def test_dni_rms_fit_does_not_depend_on_the_targets_scale():
    """Targets c times smaller give predictions exactly c times smaller: Adam, which moves
    weights by about its rate whatever the gradient's scale, cannot overshoot small targets."""
    torch.manual_seed(7)
    h = torch.randn(BATCH, DIM)
    target = torch.randn(BATCH, DIM)
    predictions = []
    for c in (1.0, 1e-5):
        synth = methods.modules.Synthesizer(
            (DIM,), CLASSES, conditioned=False, filters=16, fit="rms"
        )
        _randomise(synth, 8)
        synth.scale.zero_()
        opt = torch.optim.Adam(synth.parameters(), lr=1e-3)
        for _ in range(20):
            loss = synth.fit_loss(synth(h), c * target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        predictions.append(synth.gradient(h).detach() / c)
    torch.testing.assert_close(predictions[1], predictions[0])


def test_each_tables_synthesizer_shape():
    """The local-critic tables' module (default): one 3x3 conv of 128 + ReLU, an output conv
    back to the channels, zero-initialised. The DGL comparison's: three 5x5 convs of 128
    with BN + ReLU between them."""
    shape = (16, 8, 8)
    lc_table = methods.modules.Synthesizer(shape, 10, conditioned=False)
    convs = [m for m in lc_table.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (16, 128, (3, 3)),
        (128, 16, (3, 3)),
    ]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in lc_table.modules())
    assert not convs[-1].weight.any() and not convs[-1].bias.any()
    dgl = methods.modules.Synthesizer(
        shape, 10, conditioned=True, layers=2, kernel=5, batchnorm=True
    )
    convs = [m for m in dgl.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (16, 128, (5, 5)),
        (128, 128, (5, 5)),
        (128, 16, (5, 5)),
    ]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in dgl.modules()) == 2
    assert methods.option_defaults("dni") == {
        "synth_layers": 1,
        "synth_kernel": 3,
        "synth_filters": 128,
        "synth_batchnorm": False,
        "synth_fit": "l2",
        "synth_lr": methods.dni.CHOSEN_LR,
        "net_optimizer": "adam-synthetic",
        "net_lr": methods.dni.CHOSEN_LR,
        "synth_optimizer": "adam",
        "synth_factor": 1.0,
    }
    with pytest.raises(ValueError, match="synth_fit"):
        stages_for("dni", mlp_groups(2), synth_fit="scaled")


def test_floor_trains_the_last_group_and_leaves_the_others_bitwise_unchanged():
    groups = mlp_groups(3)
    before = [params(g) for g in groups]
    stages = stages_for("frozen", groups)
    last = copy.deepcopy(groups[-1])
    x, y = data()
    h = groups[1](groups[0](x)).detach()
    grad = torch.autograd.grad(per_sample_ce(last(h), y).mean(), list(last.parameters()))
    for t, seed in enumerate((2, 3, 4)):
        train_step(stages, t, *data(seed))
    for group, saved in zip(groups[:-1], before):
        for a, b in zip(params(group), saved):
            assert torch.equal(a, b)
    assert all(not torch.equal(a, b) for a, b in zip(params(groups[-1]), before[-1]))
    stages = stages_for("frozen", [copy.deepcopy(g) for g in mlp_groups(3)])
    train_step(stages, 0, x, y)  # one step: the last group's is plain SGD on the true loss
    assert_all_close(
        params(stages[-1].group),
        [sgd_first_step(p.detach(), g) for p, g in zip(last.parameters(), grad)],
    )


def test_adam_as_the_main_optimizer_is_torchs_adam():
    """The DGL comparison's protocol: Adam for the network (``optimizer="adam"``)."""
    x, y = data()
    groups = mlp_groups(2)
    ref = copy.deepcopy(groups[0])
    torch.manual_seed(1)
    stages = methods.build_stages(
        "dgl",
        groups,
        [(DIM,), (CLASSES,)],
        CLASSES,
        per_sample_ce,
        TrainOptions(optimizer="adam", lr=1e-3, weight_decay=0.0),
        {},
    )
    aux = copy.deepcopy(stages[0].aux)
    loss = per_sample_ce(aux(ref(x)), y).mean()
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    train_step(stages, 0, x, y)
    assert isinstance(stages[0].optimizer, torch.optim.Adam)
    assert_all_close(
        params(groups[0]),
        [adam_first_step(p.detach(), g, 1e-3) for p, g in zip(ref.parameters(), grads)],
    )
    stages[0].scale_lr(0.1)
    assert stages[0].optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_dgl_comparison_auxiliary_net():
    aux = methods.modules.conv_auxiliary((128, 10, 10), 10)
    convs = [m for m in aux.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (128, 128, (5, 5))
    ] * 3
    assert not convs[-1].weight.any() and aux(torch.randn(2, 128, 10, 10)).shape == (2, 10)
    stage = stages_for("dgl", mlp_groups(2), aux_net="conv")[0]  # vectors: the MLP
    assert isinstance(stage.aux[0], nn.Linear)


def test_cdni_synthesizer_sees_labels_dni_does_not():
    h = torch.randn(BATCH, DIM)
    y1 = torch.zeros(BATCH, dtype=torch.long)
    y2 = torch.full((BATCH,), 2)
    outputs = {}
    for method in ("dni", "cdni"):
        stage = stages_for(method, mlp_groups(2))[0]
        _randomise(stage.synth, 4)
        stage.synth.eval()
        with torch.no_grad():
            outputs[method] = (stage.synth.gradient(h, y1), stage.synth.gradient(h, y2))
    assert torch.equal(*outputs["dni"])
    assert not torch.allclose(*outputs["cdni"])


def grouped_conv_groups():
    """A width-grouped conv layer group (mixing first conv, then groups=2) + classifier."""
    torch.manual_seed(0)
    first = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU()
    )
    last = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, CLASSES))
    return [first, last]


def test_gn_no_gradient_crosses_between_neuron_groups():
    """Neuron group 0's parameters (output slice 0 of each conv) get the same update
    whatever head 1 is; slice 1's update does depend on it (the test can fail)."""
    x = torch.randn(BATCH, 1, 6, 6)
    _, y = data()
    slices = []
    for head_seed in (0, 9):
        groups = grouped_conv_groups()
        torch.manual_seed(1)
        stages = methods.build_stages(
            "gn",
            groups,
            [(4, 6, 6), (CLASSES,)],
            CLASSES,
            per_sample_ce,
            OPTS,
            {"neuron_groups": 2, "diversity_weight": 0.0},
        )
        _randomise(stages[0].heads[1], head_seed)
        train_step(stages, 0, x, y)
        slices.append([(p[:2].clone(), p[2:].clone()) for p in groups[0].parameters()])
    for (own_a, _), (own_b, _) in zip(*slices):
        assert torch.equal(own_a, own_b)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(*slices))


def test_gn_heads_see_other_groups_detached():
    groups = grouped_conv_groups()
    stage = methods.build_stages(
        "gn", groups, [(4, 6, 6), (CLASSES,)], CLASSES, per_sample_ce, OPTS, {"neuron_groups": 2}
    )[0]
    h = torch.randn(BATCH, 4, 6, 6, requires_grad=True)
    _, y = data()
    chunks = h.chunk(2, dim=1)
    seen = torch.cat([chunks[0], chunks[1].detach()], 1)
    (grad,) = torch.autograd.grad(F.cross_entropy(stage.heads[0](seen), y), h)
    assert grad[:, 2:].abs().sum() == 0 and grad[:, :2].abs().sum() > 0


def test_gn_diversity_matches_formula():
    torch.manual_seed(0)
    z = [torch.randn(BATCH, 4) for _ in range(3)]
    y = torch.randint(0, 4, (BATCH,))
    q = []
    for logits in z:
        p = torch.softmax(logits / 3.0, 1)
        rows = []
        for i in range(BATCH):
            r = torch.cat([p[i, : y[i]], p[i, y[i] + 1 :]])
            r = r / r.sum()
            rows.append(r / r.norm())
        q.append(torch.stack(rows))
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = sum((q[a] * q[b]).sum(1).mean() for a, b in pairs) / 3
    torch.testing.assert_close(diversity(z, y, 3.0), expected)
    assert diversity(z[:1], y, 3.0) == 0


def test_gn_with_one_group_is_dgl():
    final = {}
    for method, options in (("dgl", {}), ("gn", {"neuron_groups": 1, "head": "mlp-sr"})):
        groups = mlp_groups(3)
        stages = stages_for(method, groups, **options)
        for step in range(3):
            x, y = data(seed=step)
            train_step(stages, step, x, y)
        final[method] = params(nn.Sequential(*groups))
    assert_all_close(final["gn"], final["dgl"], rtol=0, atol=0)


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="unknown option"):
        stages_for("lc", mlp_groups(2), critic_size=3)


def test_pipelined_bp_normalises_each_micro_batch_on_its_own():
    """With BatchNorm the update is the mean over micro-batches of each one's own gradient."""
    torch.manual_seed(0)
    groups = [
        nn.Sequential(nn.Linear(DIM, DIM), nn.BatchNorm1d(DIM), nn.Tanh()),
        nn.Sequential(nn.Linear(DIM, CLASSES)),
    ]
    whole = copy.deepcopy(nn.Sequential(*groups))
    stages = stages_for("pipe-bp", groups, microbatches=2)
    x, y = data()
    loss = sum(F.cross_entropy(whole(xc), yc) for xc, yc in zip(x.chunk(2), y.chunk(2))) / 2
    grads = torch.autograd.grad(loss, list(whole.parameters()))
    expected = [sgd_first_step(p.detach(), g) for p, g in zip(whole.parameters(), grads)]
    train_step(stages, 0, x, y)
    assert_all_close(params(nn.Sequential(*groups)), expected)


def test_pipelined_bp_rejects_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="does not split into 3 micro-batches"):
        train_step(stages_for("pipe-bp", mlp_groups(2), microbatches=3), 0, *data())


def test_async_dgl_with_a_buffer_of_one_used_once_is_dgl():
    final = {}
    for method, options in (("dgl", {}), ("adgl", {"buffer_size": 1, "max_reuse": 1})):
        groups = mlp_groups(3)
        stages = stages_for(method, groups, **options)
        for step in range(3):
            train_step(stages, step, *data(seed=step))
        final[method] = params(nn.Sequential(*groups))
    assert_all_close(final["adgl"], final["dgl"], rtol=0, atol=0)


def test_async_dgl_stage_trains_on_buffered_inputs_with_their_own_labels():
    """Stage 2 draws (h, y) pairs from its buffer: the labels it passes on are those of the
    input it drew, and an input is drawn at most max_reuse times."""
    groups = mlp_groups(2)
    stage = stages_for("adgl", groups, buffer_size=3, max_reuse=2)[1]
    pushed = [data(seed=s) for s in range(3)]
    drawn = [stage.input(0, *pair) for pair in pushed]
    drawn += [stage.input(0, None, None) for _ in range(3)]  # nothing new arrives
    assert len(stage.buffer) == 0  # 3 inputs x 2 uses, all spent
    for x, y in drawn:
        (match,) = [yy for xx, yy in pushed if xx is x]
        assert match is y
    counts = [sum(x is xx for x, _ in drawn) for xx, _ in pushed]
    assert counts == [2, 2, 2]


def test_replay_buffer_keeps_the_newest_and_counts_evictions():
    from methods.adgl import ReplayBuffer

    buffer = ReplayBuffer(2, 3, torch.Generator().manual_seed(0))
    for i in range(4):
        buffer.push(torch.tensor([i]), torch.tensor([i]))
    assert [int(e[0]) for e in buffer.entries] == [2, 3]
    assert buffer.pop_discarded() == 2 and buffer.unused == 2


def test_step_decay_scales_sgd_rates_and_leaves_adam_critics_alone():
    from bench.config import RunConfig
    from bench.schedule import LRSchedule, epoch_steps

    stages = stages_for("lc", mlp_groups(2))
    schedule = LRSchedule(RunConfig(method="lc", lr_milestones=[3, 5], lr_gamma=0.1), 4)
    rates = []
    for i in range(7):
        schedule.apply(stages, i)
        rates.append(stages[0].optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.1] * 3 + [0.01] * 2 + [0.001] * 2)
    assert stages[0].critic_optimizer.param_groups[0]["lr"] == 1e-4
    assert epoch_steps(RunConfig(method="lc", epochs=2), 5) == [5, 5]
    assert epoch_steps(RunConfig(method="lc", epochs=2, iterations=12), 5) == [5, 5, 2]


def test_cosine_schedule_is_infopros_rate_per_epoch_with_its_warm_up():
    """``--lr-schedule cosine``: the rate of epoch e (1..E) as InfoPro's ``--cos_lr`` sets it
    (train.py, adjust_learning_rate, with lr 0.8, E = 160, 10 warm-up epochs from 0.01),
    written out here from that formula; the same rate for every batch of an epoch."""
    from bench.config import RunConfig
    from bench.schedule import LRSchedule

    lr, epochs, steps = 0.8, 160, 3
    cfg = RunConfig(method="bp", lr=lr, epochs=epochs, lr_schedule="cosine", lr_warmup=10, groups=1)
    (stage,) = methods.build_stages(
        "bp", mlp_groups(1), [(CLASSES,)], CLASSES, per_sample_ce, TrainOptions(lr=lr)
    )
    schedule = LRSchedule(cfg, steps)

    def official(e):
        cosine = 0.5 * lr * (1 + math.cos(math.pi * e / epochs))
        return cosine * (e - 1) / 10 + 0.01 * (11 - e) / 10 if e <= 10 else cosine

    for e in (1, 2, 5, 10, 11, 80, 159, 160):
        for t in range(steps):
            schedule.apply([stage], (e - 1) * steps + t)
            assert stage.optimizer.param_groups[0]["lr"] == pytest.approx(official(e), abs=1e-12)
    assert official(1) == pytest.approx(0.01) and official(160) == pytest.approx(0.0)


def test_clip_bounds_each_optimizers_gradient_norm():
    groups = mlp_groups(1)
    stage = methods.build_stages(
        "bp",
        groups,
        [(CLASSES,)],
        CLASSES,
        per_sample_ce,
        TrainOptions(lr=1.0, momentum=0.0, weight_decay=0.0, clip=1e-3),
    )[0]
    before = params(groups[0])
    x, y = data()
    train_step([stage], 0, x * 100, y)
    moved = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(params(groups[0]), before)))
    assert moved == pytest.approx(
        1e-3, rel=1e-6
    )  # plain SGD at lr 1: the step is the clipped gradient
