import pytest
import torch

from bench.models import MODELS, build_model, model_names

PUBLISHED_PARAMS = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet56": 0.85e6, "resnet110": 1.7e6}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_resnet_param_counts_match_published(name):
    assert n_params(build_model(name, (3, 32, 32), 10)) == pytest.approx(PUBLISHED_PARAMS[name], rel=0.03)


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
    assert set(model_names()) == {"mlp", "small-cnn", "resnet8", "resnet20", "resnet32", "resnet56", "resnet110"}


@pytest.mark.parametrize("name, shape", [(n, (3, 32, 32)) for n in MODELS] + [("small-cnn", (1, 28, 28)),
                                                                              ("small-cnn", (1, 8, 8))])
def test_forward_shape(name, shape):
    model = build_model(name, shape, 7)
    assert model(torch.randn(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize("name, blocks", [("small-cnn", 5), ("resnet8", 5), ("resnet20", 11), ("resnet110", 56)])
def test_block_count(name, blocks):
    assert len(build_model(name, (3, 32, 32), 10)) == blocks


def test_width_scales_channels_to_multiples_of_neuron_groups():
    model = build_model("small-cnn", (1, 28, 28), 10, width=0.5, neuron_groups=3)
    assert [model[i][0].out_channels for i in range(4)] == [9, 9, 15, 15]  # 8 -> 9, 16 -> 15
    assert build_model("resnet20", (3, 32, 32), 10, width=2)[-1][-1].in_features == 128


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="vgg"), "unknown model 'vgg'"),
    (dict(name="resnet20", neuron_groups=3), "not divisible by neuron_groups=3"),
    (dict(name="small-cnn", input_shape=(1, 3, 3)), "H, W >= 4"),
    (dict(name="resnet20", input_shape=(32, 32)), "input shape"),
    (dict(name="resnet20", mix_at={11}), "outside"),
    (dict(name="resnet20", neuron_groups=0), "neuron_groups >= 1"),
])
def test_build_errors(kwargs, match):
    kwargs = {"input_shape": (3, 32, 32), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


@pytest.mark.parametrize("name", ["small-cnn", "resnet20"])
def test_one_neuron_group_is_the_plain_model(name):
    plain = build_model(name, (3, 32, 32), 10)
    grouped = build_model(name, (3, 32, 32), 10, neuron_groups=1, mix_at={0, 3})
    assert [(n, p.shape) for n, p in plain.named_parameters()] == \
           [(n, p.shape) for n, p in grouped.named_parameters()]


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
        bumped[:, gi * c_in:(gi + 1) * c_in] += torch.randn_like(bumped[:, gi * c_in:(gi + 1) * c_in])
        out = module(bumped)
        for go in range(groups):
            dep[gi, go] = not torch.equal(out[:, go * c_out:(go + 1) * c_out], base[:, go * c_out:(go + 1) * c_out])
    return dep


@torch.no_grad()
def test_neuron_groups_isolate_slices_between_mixing_blocks():
    model = build_model("resnet20", (3, 32, 32), 10, neuron_groups=2, mix_at={0, 3})
    independent = {(0, 0): True, (0, 1): False, (1, 0): False, (1, 1): True}
    assert slice_dependence(model[1], (16, 32, 32)) == independent  # identity shortcut
    assert slice_dependence(model[4], (16, 32, 32)) == independent  # strided, grouped projection shortcut
    assert slice_dependence(model[4:10], (16, 32, 32)) == independent  # a whole run of non-mixing blocks
    assert all(slice_dependence(model[3], (16, 32, 32)).values())  # mixing block


@torch.no_grad()
def test_neuron_groups_small_cnn():
    model = build_model("small-cnn", (1, 28, 28), 10, neuron_groups=2, mix_at={2})
    assert slice_dependence(model[1], (16, 28, 28)) == {(0, 0): True, (0, 1): False, (1, 0): False, (1, 1): True}
    assert all(slice_dependence(model[2], (16, 14, 14)).values())
