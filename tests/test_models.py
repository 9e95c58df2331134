import pytest
import torch

from bench.models import MODELS, build_model, model_names

PUBLISHED_PARAMS = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet56": 0.85e6, "resnet110": 1.7e6}
# torchvision's documented parameter counts (1000 classes)
TORCHVISION_PARAMS = {
    "tv-vgg13-bn": 133_053_736,
    "tv-vgg19-bn": 143_678_248,
    "tv-resnet152": 60_192_808,
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_resnet_param_counts_match_published(name):
    assert n_params(build_model(name, (3, 32, 32), 10)) == pytest.approx(
        PUBLISHED_PARAMS[name], rel=0.03
    )


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 32, 32)])
def test_small_cnn_param_count_by_hand(shape):
    c, h, w = shape

    def conv_bn(cin, cout):  # 3x3 conv without bias, BN weight and bias
        return 9 * cin * cout + 2 * cout

    linear = (32 * (h // 4) * (w // 4) + 1) * 10
    expected = conv_bn(c, 16) + conv_bn(16, 16) + conv_bn(16, 32) + conv_bn(32, 32) + linear
    assert n_params(build_model("small-cnn", shape, 10)) == expected


def test_model_names():
    assert model_names() == list(MODELS)
    assert set(model_names()) == {
        "mlp",
        "small-cnn",
        "resnet8",
        "resnet20",
        "resnet32",
        "resnet56",
        "resnet110",
        "resnet32x2",
        "resnet50",
        "resnet101",
        "resnet152",
        "wrn16-4",
        "wrn16-8",
        "wrn28-2",
        "wrn28-10",
        "wrn40-4",
        "lc-vgg",
        "dni-cnn",
        "tv-vgg13-bn",
        "tv-vgg19-bn",
        "tv-resnet152",
        "lstm",
        "lstm-lm",
    }


WIDE_RESNETS = [n for n in MODELS if n.startswith("wrn")]  # forward-tested at a small width below
IMAGE_MODELS = [n for n in MODELS if not n.startswith(("lstm", "wrn"))]


@pytest.mark.parametrize(
    "name, shape",
    [(n, (3, 32, 32)) for n in IMAGE_MODELS]
    + [("small-cnn", (1, 28, 28)), ("small-cnn", (1, 8, 8))],
)
def test_forward_shape(name, shape):
    model = build_model(name, shape, 7)
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_lstm_models_forward_shapes():
    assert build_model("lstm", (28, 28), 10)(torch.randn(3, 28, 28)).shape == (3, 10)
    lm = build_model("lstm-lm", (35,), 50, width=0.1)
    assert lm(torch.randint(50, (4, 35))).shape == (4, 35, 50)
    assert len(lm) == 4  # embedding, two LSTM layers, decoder: split by LSTM layers


@pytest.mark.parametrize(
    "name, blocks", [("small-cnn", 5), ("resnet8", 5), ("resnet20", 11), ("resnet110", 56)]
)
def test_block_count(name, blocks):
    assert len(build_model(name, (3, 32, 32), 10)) == blocks


def test_width_scales_channels_to_multiples_of_neuron_groups():
    model = build_model("small-cnn", (1, 28, 28), 10, width=0.5, neuron_groups=3)
    assert [model[i][0].out_channels for i in range(4)] == [9, 9, 15, 15]  # 8 -> 9, 16 -> 15
    assert build_model("resnet20", (3, 32, 32), 10, width=2)[-1][-1].in_features == 128


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="vgg"), "unknown model 'vgg'"),
        (dict(name="resnet20", neuron_groups=3), "not divisible by neuron_groups=3"),
        (dict(name="small-cnn", input_shape=(1, 3, 3)), "H, W >= 4"),
        (dict(name="resnet20", input_shape=(32, 32)), "input shape"),
        (dict(name="resnet20", mix_at={11}), "outside"),
        (dict(name="resnet20", neuron_groups=0), "neuron_groups >= 1"),
        (dict(name="wrn16-4", neuron_groups=3), "not divisible by neuron_groups=3"),
    ],
)
def test_build_errors(kwargs, match):
    kwargs = {"input_shape": (3, 32, 32), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


@pytest.mark.parametrize("name", ["small-cnn", "resnet20", "wrn16-4"])
def test_one_neuron_group_is_the_plain_model(name):
    plain = build_model(name, (3, 32, 32), 10)
    grouped = build_model(name, (3, 32, 32), 10, neuron_groups=1, mix_at={0, 3})
    assert [(n, p.shape) for n, p in plain.named_parameters()] == [
        (n, p.shape) for n, p in grouped.named_parameters()
    ]


def slice_dependence(module, shape, groups=2):
    """For each (input slice, output slice), whether perturbing the input slice changes the output slice."""
    torch.manual_seed(0)
    module.eval()
    x = torch.randn(2, *shape)
    base = module(x)
    c_in, c_out = shape[0] // groups, base.shape[1] // groups
    dep = {}
    for gi in range(groups):
        bumped = x.clone()
        bumped[:, gi * c_in : (gi + 1) * c_in] += torch.randn_like(
            bumped[:, gi * c_in : (gi + 1) * c_in]
        )
        out = module(bumped)
        for go in range(groups):
            dep[gi, go] = not torch.equal(
                out[:, go * c_out : (go + 1) * c_out], base[:, go * c_out : (go + 1) * c_out]
            )
    return dep


@torch.no_grad()
def test_neuron_groups_isolate_slices_between_mixing_blocks():
    model = build_model("resnet20", (3, 32, 32), 10, neuron_groups=2, mix_at={0, 3})
    independent = {(0, 0): True, (0, 1): False, (1, 0): False, (1, 1): True}
    assert slice_dependence(model[1], (16, 32, 32)) == independent  # identity shortcut
    assert (
        slice_dependence(model[4], (16, 32, 32)) == independent
    )  # strided, grouped projection shortcut
    assert (
        slice_dependence(model[4:10], (16, 32, 32)) == independent
    )  # a whole run of non-mixing blocks
    assert all(slice_dependence(model[3], (16, 32, 32)).values())  # mixing block


@torch.no_grad()
def test_neuron_groups_small_cnn():
    model = build_model("small-cnn", (1, 28, 28), 10, neuron_groups=2, mix_at={2})
    assert slice_dependence(model[1], (16, 28, 28)) == {
        (0, 0): True,
        (0, 1): False,
        (1, 0): False,
        (1, 1): True,
    }
    assert all(slice_dependence(model[2], (16, 14, 14)).values())


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_torchvision_models_have_their_published_parameter_counts(name):
    assert n_params(build_model(name, (3, 224, 224), 1000)) == TORCHVISION_PARAMS[name]


def preact_bottleneck_params(cin, planes, projection):
    bn = 2  # weight and bias per channel
    count = (
        bn * cin
        + cin * planes
        + bn * planes
        + 9 * planes * planes
        + bn * planes
        + planes * 4 * planes
    )
    return count + (cin * 4 * planes if projection else 0)


@pytest.mark.parametrize("depth, stages", [(50, (3, 4, 6, 3)), (101, (3, 4, 23, 3))])
def test_preact_resnet_parameter_count_by_hand(depth, stages):
    expected, cin = 9 * 3 * 64, 64  # the stem: a bias-free 3x3 conv
    for stage, count in enumerate(stages):
        planes = 64 * 2**stage
        for j in range(count):
            expected += preact_bottleneck_params(cin, planes, projection=j == 0)
            cin = 4 * planes
    expected += 2 * 2048 + 2048 * 10 + 10  # final BN, linear layer
    model = build_model(f"resnet{depth}", (3, 32, 32), 10)
    assert n_params(model) == expected
    assert len(model) == 1 + sum(stages) + 1
    if depth == 101:
        assert expected == pytest.approx(42.5e6, rel=0.01)  # the usual figure for CIFAR ResNet-101


def test_lc_vgg_is_about_7_9_million_parameters_counted_by_hand():
    convs = [
        (3, 128),
        (128, 128),
        (128, 128),
        (128, 256),
        (256, 256),
        (256, 256),
        (256, 512),
        (512, 512),
        (512, 512),
    ]
    expected = sum(9 * a * b + 2 * b for a, b in convs) + (512 * 512 + 512) + (512 * 10 + 10)
    model = build_model("lc-vgg", (3, 32, 32), 10)
    assert n_params(model) == expected == pytest.approx(7.9e6, rel=0.01)
    assert len(model) == 10


def test_dni_cnn_counted_by_hand_with_pytorchs_default_initialisation():
    """Three 5x5 convs of 128 (+ BN), pooled 32 -> 10 -> 3 -> 1, and a linear layer."""
    expected = (25 * 3 * 128 + 128 + 256) + 2 * (25 * 128 * 128 + 128 + 256) + (128 * 10 + 10)
    torch.manual_seed(0)
    model = build_model("dni-cnn", (3, 32, 32), 10)
    assert n_params(model) == expected and len(model) == 4
    torch.manual_seed(0)
    default = torch.nn.Conv2d(3, 128, 5, padding=2)  # the first module built: the same draw
    assert torch.equal(model[0][0].weight, default.weight)
    assert [tuple(model[:i](torch.randn(2, 3, 32, 32)).shape[1:]) for i in (1, 2, 3)] == [
        (128, 10, 10),
        (128, 3, 3),
        (128, 1, 1),
    ]
    with pytest.raises(ValueError, match="27x27"):
        build_model("dni-cnn", (1, 8, 8), 10)


@pytest.mark.parametrize(
    "name, k, cuts",
    [
        ("resnet101", 2, [18]),
        ("resnet101", 4, [8, 16, 24]),
        ("lc-vgg", 6, [2, 3, 5, 6, 8]),
        ("tv-vgg13-bn", 10, list(range(1, 10))),
    ],
)
def test_paper_cut_points_split_the_model(name, k, cuts):
    from bench.models.split import split_model
    from bench.prepare import paper_cuts

    model = build_model(name, (3, 32, 32), 10)
    groups = split_model(model, k, input_shape=(3, 32, 32), cuts=paper_cuts(name, k))
    assert [len(g) for g in groups[:-1]] == [b - a for a, b in zip([0, *cuts], cuts)]
    if name == "resnet101" and k == 2:  # stem, stages 1-2 (3 + 4 blocks), 10 blocks of stage 3
        assert len(groups[0]) == 1 + 3 + 4 + 10
    if name == "tv-vgg13-bn":  # layer-wise: one conv per group, the last with the classifier
        assert all(sum(isinstance(m, torch.nn.Conv2d) for m in g.modules()) == 1 for g in groups)


def test_resnet32x2_is_resnet32_at_twice_the_width():
    a, b = (
        build_model("resnet32x2", (3, 32, 32), 10),
        build_model("resnet32", (3, 32, 32), 10, width=2),
    )
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    assert n_params(a) == pytest.approx(
        4 * n_params(build_model("resnet32", (3, 32, 32), 10)), rel=0.02
    )


@torch.no_grad()
@pytest.mark.parametrize(
    "name, shape, block", [("resnet101", (3, 32, 32), 2), ("lc-vgg", (3, 32, 32), 1)]
)
def test_paper_models_isolate_neuron_groups(name, shape, block):
    model = build_model(name, shape, 10, neuron_groups=2, mix_at={0})
    x = torch.randn(2, *shape)
    h = model[:block](x)
    assert slice_dependence(model[block], tuple(h.shape[1:])) == {
        (0, 0): True,
        (0, 1): False,
        (1, 0): False,
        (1, 1): True,
    }


def wide_block_params(
    cin, cout
):  # BN-ReLU-conv3x3-BN-ReLU-conv3x3, a 1x1 conv where the shape changes
    bn = 2  # weight and bias per channel
    return (
        bn * cin + 9 * cin * cout + bn * cout + 9 * cout * cout + (cin * cout if cin != cout else 0)
    )


def wide_resnet_params(depth, k, cin=3, classes=10):
    n = (depth - 4) // 6
    expected, c = 9 * cin * 16, 16  # the stem: a bias-free 3x3 conv of 16 channels
    for cout in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            expected += wide_block_params(c, cout)
            c = cout
    return expected + 2 * c + c * classes + classes  # final BN, linear layer


def test_wrn_28_10_has_the_papers_36_5_million_parameters_counted_by_hand():
    with torch.device("meta"):
        model = build_model("wrn28-10", (3, 32, 32), 10)
    assert n_params(model) == wide_resnet_params(28, 10) == 36_479_194  # the paper's 36.5M
    assert len(model) == 1 + 3 * 4 + 1  # stem, n = 4 blocks per group, head


@pytest.mark.parametrize(
    "name, depth, k, published",
    [
        ("wrn16-4", 16, 4, 2.75e6),
        ("wrn16-8", 16, 8, 11.0e6),
        ("wrn28-2", 28, 2, 1.47e6),
        ("wrn40-4", 40, 4, 8.9e6),
    ],
)
def test_wide_resnet_parameter_counts(name, depth, k, published):
    with torch.device("meta"):
        model = build_model(name, (3, 32, 32), 10)
    assert n_params(model) == wide_resnet_params(depth, k) == pytest.approx(published, rel=0.01)
    assert len(model) == 1 + 3 * (depth - 4) // 6 + 1


@pytest.mark.parametrize(
    "name, shape", [(n, (3, 32, 32)) for n in WIDE_RESNETS] + [("wrn16-4", (1, 28, 28))]
)
def test_wide_resnet_forward_shape(name, shape):
    model = build_model(name, shape, 7, width=0.25)
    assert model(torch.randn(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize("name, width", [("wrn16-4", 0.25), ("wrn28-10", 0.125)])
def test_wide_resnet_splits_at_block_boundaries_into_the_same_function(name, width):
    from bench.models.split import resolve_cuts

    torch.manual_seed(0)
    model = build_model(name, (3, 32, 32), 10, width=width).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = model(x)
    for k in (2, 3, 4):
        cuts = resolve_cuts(model, k, input_shape=(3, 32, 32), by="flops")
        bounds = [0, *cuts, len(model)]
        groups = [model[a:b] for a, b in zip(bounds, bounds[1:])]
        assert len(groups) == k and all(len(g) > 0 for g in groups)
        assert [b for g in groups for b in g] == list(model)  # together, every block once, in order
        h = x
        with torch.no_grad():
            for g in groups:
                h = g(h)
        assert torch.equal(h, whole)


@torch.no_grad()
def test_wide_resnet_neuron_groups():
    model = build_model("wrn16-4", (3, 32, 32), 10, width=0.25, neuron_groups=2, mix_at={3})
    groups = [
        [m.groups for m in block.modules() if isinstance(m, torch.nn.Conv2d)] for block in model
    ]
    assert groups[0] == [1]  # the stem mixes
    assert groups[1] == groups[5] == [2, 2, 2]  # conv1, conv2, projection shortcut: grouped
    assert groups[2] == groups[4] == groups[6] == [2, 2]  # identity shortcut
    assert groups[3] == [
        1,
        2,
        1,
    ]  # a mixing block: its first conv and its shortcut take every channel
    assert isinstance(model[-1][-1], torch.nn.Linear)  # the classifier mixes
    independent = {(0, 0): True, (0, 1): False, (1, 0): False, (1, 1): True}
    assert slice_dependence(model[2], (16, 32, 32)) == independent  # identity shortcut
    assert (
        slice_dependence(model[5], (32, 16, 16)) == independent
    )  # strided, grouped projection shortcut
    assert all(slice_dependence(model[3], (16, 32, 32)).values())  # mixing block


@torch.no_grad()
def test_grouped_lstm_isolates_neuron_groups():
    from bench.models.rnn import LSTMLayer

    layer = LSTMLayer(8, 8, groups=2, mix=False)
    x = torch.randn(2, 5, 8)
    base = layer(x)
    bumped = x.clone()
    bumped[..., :4] += 1
    out = layer(bumped)
    assert not torch.equal(out[..., :4], base[..., :4]) and torch.equal(out[..., 4:], base[..., 4:])


def test_stateful_lstm_carries_its_state_across_windows_and_micro_batches():
    from bench.models.rnn import LSTMLayer, reset_states

    torch.manual_seed(0)
    layer = LSTMLayer(3, 4, stateful=True)
    x = torch.randn(4, 10, 3)
    whole = layer.cells[0](x)[0]
    reset_states(layer, 4)
    windows = torch.cat([layer(x[:, :5]), layer(x[:, 5:])], 1)  # truncated BPTT: state carried
    torch.testing.assert_close(windows, whole)
    reset_states(layer, 4)
    chunks = [layer(x[:2, :5]), layer(x[2:, :5]), layer(x[:2, 5:]), layer(x[2:, 5:])]
    torch.testing.assert_close(torch.cat([torch.cat(chunks[:2]), torch.cat(chunks[2:])], 1), whole)


def test_list_models_reports_parameter_counts(capsys):
    from bench.cli import main

    with pytest.raises(SystemExit):
        main(["list", "--models"])
    out = capsys.readouterr().out
    for name, count in [
        ("resnet101", "42,505,290"),
        ("lc-vgg", "7,944,330"),
        ("wrn28-10", "36,479,194"),
        ("tv-vgg13-bn", "133,053,736"),
        ("resnet32", "466,906"),
    ]:
        line = next(line for line in out.splitlines() if line.split()[0] == name)
        assert count in line
