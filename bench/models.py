"""Models as ``nn.Sequential`` lists of blocks; the last block is the classifier (it outputs logits).

Neuron groups (GN-DGL): with ``neuron_groups=G > 1``, block 0, the classifier and every block whose
index is in ``mix_at`` take all their input channels in their first conv (and projection shortcut);
every other conv is grouped (``groups=G``), so channel slice g of its output depends only on channel
slice g of the block's input. Between two mixing blocks the G slices are therefore independent.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Collection

import torch
from torch import nn

from . import paper_models, rnn


def _conv_bn(cin: int, cout: int, *, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


def _check_input(name: str, input_shape: tuple[int, ...], min_side: int) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape) < 1 or min(input_shape[1:]) < min_side:
        raise ValueError(f"{name} needs an input shape (C, H, W) with H, W >= {min_side}, got {tuple(input_shape)}")
    return tuple(input_shape)


def _check_groups(name: str, channels: Collection[int], groups: int) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(f"{name}: channel counts {sorted(set(bad))} are not divisible by neuron_groups={groups}")


def _grouping(index: int, mix_at: Collection[int], groups: int) -> int:
    """``groups`` argument of block ``index``'s first conv: 1 where the block mixes all channels."""
    return 1 if index == 0 or index in mix_at else groups


class BasicBlock(nn.Module):
    """He et al. (2016) basic block: two 3x3 conv+BN, with a 1x1 conv+BN projection where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, *, first_groups: int = 1, groups: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cout, kernel=3, stride=stride, groups=first_groups),
            nn.ReLU(inplace=True),
            *_conv_bn(cout, cout, kernel=3, groups=groups),
        )
        project = stride != 1 or cin != cout
        self.shortcut = (nn.Sequential(*_conv_bn(cin, cout, kernel=1, stride=stride, groups=first_groups))
                         if project else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def small_cnn(input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0,
              neuron_groups: int = 1, mix_at: Collection[int] = ()) -> nn.Sequential:
    """Four conv+BN+ReLU blocks (16, 16, 32, 32 channels at width 1; max-pool after the 2nd and 4th), then a linear classifier."""
    c, h, w = _check_input("small-cnn", input_shape, 4)
    w1, w2 = (neuron_groups * max(1, round(base * width / neuron_groups)) for base in (16, 32))
    blocks = []
    for i, (cin, cout, pool) in enumerate([(c, w1, False), (w1, w1, True), (w1, w2, False), (w2, w2, True)]):
        layers = _conv_bn(cin, cout, kernel=3, groups=_grouping(i, mix_at, neuron_groups)) + [nn.ReLU(inplace=True)]
        blocks.append(nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else [])))
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(w2 * (h // 4) * (w // 4), num_classes)))
    return nn.Sequential(*blocks)


def resnet(depth: int, input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0,
           neuron_groups: int = 1, mix_at: Collection[int] = ()) -> nn.Sequential:
    """CIFAR ResNet of depth 6n+2: stem, 3 stages of n basic blocks (16/32/64 channels x width), classifier."""
    name = f"resnet{depth}"
    c, _, _ = _check_input(name, input_shape, 1)
    n = (depth - 2) // 6
    widths = [max(1, round(base * width)) for base in (16, 32, 64)]
    _check_groups(name, widths, neuron_groups)
    blocks: list[nn.Module] = [nn.Sequential(*_conv_bn(c, widths[0], kernel=3), nn.ReLU(inplace=True))]
    cin = widths[0]
    for stage, cout in enumerate(widths):
        for j in range(n):
            stride = 2 if stage > 0 and j == 0 else 1
            first = _grouping(len(blocks), mix_at, neuron_groups)
            blocks.append(BasicBlock(cin, cout, stride, first_groups=first, groups=neuron_groups))
            cin = cout
    blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)))
    return nn.Sequential(*blocks)


def mlp(input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0, neuron_groups: int = 1,
        mix_at: Collection[int] = ()) -> nn.Sequential:
    """Three hidden ReLU layers of 256 units x width, then a linear classifier (no BatchNorm, so
    micro-batching does not change what it computes)."""
    if neuron_groups != 1:
        raise ValueError("mlp has no width-grouped layers: it takes neuron_groups=1 only")
    hidden = max(1, round(256 * width))
    d = 1
    for side in input_shape:
        d *= side
    blocks = [nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU())]
    blocks += [nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()) for _ in range(2)]
    blocks.append(nn.Sequential(nn.Linear(hidden, num_classes)))
    return nn.Sequential(*blocks)


def resnet32x2(input_shape, num_classes: int, *, width: float = 1.0, **grouping) -> nn.Sequential:
    """ResNet-32 at twice the width (the neuron-groups paper's ResNet-32x2)."""
    return resnet(32, input_shape, num_classes, width=2 * width, **grouping)


MODELS: dict[str, Callable[..., nn.Sequential]] = {
    "mlp": mlp,
    "small-cnn": small_cnn,
    **{f"resnet{d}": functools.partial(resnet, d) for d in (8, 20, 32, 56, 110)},
    "resnet32x2": resnet32x2,
    **{f"resnet{d}": functools.partial(paper_models.preact_resnet, d)
       for d in paper_models.PREACT_STAGES},
    "lc-vgg": paper_models.lc_vgg,
    "tv-vgg13-bn": functools.partial(paper_models.tv_vgg, "vgg13_bn"),
    "tv-vgg19-bn": functools.partial(paper_models.tv_vgg, "vgg19_bn"),
    "tv-resnet152": paper_models.tv_resnet152,
    "lstm": rnn.lstm,
    "lstm-lm": rnn.lstm_lm,
}


def model_names() -> list[str]:
    return list(MODELS)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0,
                neuron_groups: int = 1, mix_at: Collection[int] = ()) -> nn.Sequential:
    """Build model ``name`` for per-sample inputs of ``input_shape`` (C, H, W) and ``num_classes`` logits."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")
    if neuron_groups < 1 or width <= 0 or num_classes < 1:
        raise ValueError(f"{name}: need neuron_groups >= 1, width > 0 and num_classes >= 1, "
                         f"got {neuron_groups}, {width}, {num_classes}")
    model = MODELS[name](tuple(input_shape), num_classes, width=width, neuron_groups=neuron_groups, mix_at=mix_at)
    outside = sorted(i for i in mix_at if not 0 <= i < len(model))
    if outside:
        raise ValueError(f"{name}: mix_at indices {outside} are outside 0..{len(model) - 1}")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


class ChannelSlice(nn.Module):
    """Channel slice ``index`` of ``count`` equal slices (dim 1)."""

    def __init__(self, index: int, count: int):
        super().__init__()
        self.index, self.count = index, count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.chunk(self.count, dim=1)[self.index]


def neuron_slice(module: nn.Module, index: int, groups: int) -> nn.Module:
    """Neuron group ``index`` of a width-grouped module (see the module docstring), as a
    module of its own with copies of that group's weights: grouped convs keep their
    ``index``-th group, mixing convs (``groups=1``, whose input is the full width) the
    ``index``-th slice of their output channels, BatchNorms that slice of their channels,
    and the identity shortcut of a mixing block picks that slice of its input. Then
    ``cat([neuron_slice(m, g, G)(x) for g in range(G)], 1) == m(x)``. A linear classifier
    mixes every channel and cannot be sliced."""
    module = copy.deepcopy(module)
    _slice_children(module, index, groups)
    return module


def _slice_children(parent: nn.Module, index: int, groups: int) -> None:
    if isinstance(parent, paper_models.PreActBottleneck):
        raise ValueError("a pre-activation block normalises its whole input: it cannot be cut "
                         "into neuron groups on ranks of their own")
    if isinstance(parent, BasicBlock) and parent.body[0].groups == 1 and isinstance(
            parent.shortcut, nn.Identity):
        parent.shortcut = ChannelSlice(index, groups)
    for name, child in parent.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(parent, name, _slice_conv(child, index, groups))
        elif isinstance(child, nn.BatchNorm2d):
            setattr(parent, name, _slice_norm(child, index, groups))
        elif isinstance(child, nn.Linear):
            raise ValueError("a linear layer mixes every channel: it cannot be cut into neuron groups")
        elif list(child.parameters(recurse=False)):
            raise ValueError(f"{type(child).__name__} layers cannot be cut into neuron groups "
                             f"on ranks of their own")
        else:
            _slice_children(child, index, groups)


def _rows(t: torch.Tensor | None, index: int, groups: int) -> torch.Tensor | None:
    return None if t is None else t.detach().chunk(groups)[index].clone()


def _slice_conv(conv: nn.Conv2d, index: int, groups: int) -> nn.Conv2d:
    if conv.groups not in (1, groups):
        raise ValueError(f"a conv with {conv.groups} groups is not cut into {groups} neuron groups")
    cin = conv.in_channels // conv.groups  # a grouped conv sees its own slice; a mixing one all
    out = nn.Conv2d(cin, conv.out_channels // groups, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, bias=conv.bias is not None)
    with torch.no_grad():
        out.weight.copy_(_rows(conv.weight, index, groups))
        if conv.bias is not None:
            out.bias.copy_(_rows(conv.bias, index, groups))
    return out.to(conv.weight.device)


def _slice_norm(norm: nn.BatchNorm2d, index: int, groups: int) -> nn.BatchNorm2d:
    out = nn.BatchNorm2d(norm.num_features // groups, norm.eps, norm.momentum, norm.affine,
                         norm.track_running_stats).to(norm.weight.device)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(norm, name) is not None:
                getattr(out, name).copy_(_rows(getattr(norm, name), index, groups))
        if norm.num_batches_tracked is not None:
            out.num_batches_tracked.copy_(norm.num_batches_tracked)
    out.train(norm.training)
    return out


#: the task on which a model's size is quoted (``lcbench list --models``)
REFERENCE_TASK = {
    "mlp": "digits", "small-cnn": "fashion-mnist", "lstm": "seq-fashion-mnist", "lstm-lm": "ptb",
    **{name: "imagenet" for name in ("tv-vgg13-bn", "tv-vgg19-bn", "tv-resnet152")},
}
REFERENCE_TASK = {name: REFERENCE_TASK.get(name, "cifar10") for name in MODELS}


def parameter_count(name: str, input_shape, num_classes: int) -> int:
    """Parameters of model ``name`` (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = build_model(name, input_shape, num_classes)
    return sum(p.numel() for p in model.parameters())
