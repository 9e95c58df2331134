"""Models as ``nn.Sequential`` lists of blocks; the last block is the classifier (it outputs logits).

Neuron groups (GN-DGL): with ``neuron_groups=G > 1``, block 0, the classifier and every block whose
index is in ``mix_at`` take all their input channels in their first conv (and projection shortcut);
every other conv is grouped (``groups=G``), so channel slice g of its output depends only on channel
slice g of the block's input. Between two mixing blocks the G slices are therefore independent.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn


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
