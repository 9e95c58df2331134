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


def _conv_bn(
    cin: int, cout: int, *, kernel: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


def _check_input(name: str, input_shape: tuple[int, ...], min_side: int) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape) < 1 or min(input_shape[1:]) < min_side:
        raise ValueError(
            f"{name} needs an input shape (C, H, W) with H, W >= {min_side}, got {tuple(input_shape)}"
        )
    return tuple(input_shape)


def _check_groups(name: str, channels: Collection[int], groups: int) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(
            f"{name}: channel counts {sorted(set(bad))} are not divisible by neuron_groups={groups}"
        )


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
        self.shortcut = (
            nn.Sequential(*_conv_bn(cin, cout, kernel=1, stride=stride, groups=first_groups))
            if project
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class WideBasicBlock(nn.Module):
    """Zagoruyko & Komodakis (2016) pre-activation "basic-wide" block B(3,3): BN-ReLU-conv3x3
    (stride), BN-ReLU-conv3x3 (no dropout, as in the paper's main results); where the shape
    changes, a 1x1 conv shortcut that takes the pre-activated input (as the official code,
    szagoruyko/wide-residual-networks, does), else the identity."""

    def __init__(self, cin: int, cout: int, stride: int, *, first_groups: int = 1, groups: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False, groups=first_groups)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False, groups=groups)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False, groups=first_groups)
            if stride != 1 or cin != cout
            else None
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return out + shortcut


def small_cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: float = 1.0,
    neuron_groups: int = 1,
    mix_at: Collection[int] = (),
) -> nn.Sequential:
    """Four conv+BN+ReLU blocks (16, 16, 32, 32 channels at width 1; max-pool after the 2nd
    and 4th), then a linear classifier."""
    c, h, w = _check_input("small-cnn", input_shape, 4)
    w1, w2 = (neuron_groups * max(1, round(base * width / neuron_groups)) for base in (16, 32))
    blocks = []
    for i, (cin, cout, pool) in enumerate(
        [(c, w1, False), (w1, w1, True), (w1, w2, False), (w2, w2, True)]
    ):
        layers = _conv_bn(cin, cout, kernel=3, groups=_grouping(i, mix_at, neuron_groups)) + [
            nn.ReLU(inplace=True)
        ]
        blocks.append(nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else [])))
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(w2 * (h // 4) * (w // 4), num_classes)))
    return nn.Sequential(*blocks)


def resnet(
    depth: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: float = 1.0,
    neuron_groups: int = 1,
    mix_at: Collection[int] = (),
) -> nn.Sequential:
    """CIFAR ResNet of depth 6n+2: stem, 3 stages of n basic blocks (16/32/64 channels x width), classifier."""
    name = f"resnet{depth}"
    c, _, _ = _check_input(name, input_shape, 1)
    n = (depth - 2) // 6
    widths = [max(1, round(base * width)) for base in (16, 32, 64)]
    _check_groups(name, widths, neuron_groups)
    blocks: list[nn.Module] = [
        nn.Sequential(*_conv_bn(c, widths[0], kernel=3), nn.ReLU(inplace=True))
    ]
    cin = _residual_stages(blocks, BasicBlock, widths[0], widths, n, mix_at, neuron_groups)
    blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)))
    return nn.Sequential(*blocks)


def _residual_stages(
    blocks: list, block, cin: int, widths, n: int, mix_at, neuron_groups: int
) -> int:
    """Append three stages of ``n`` residual ``block``s of ``widths`` channels (strides 1, 2,
    2) to ``blocks``, each block's first conv grouped unless it mixes; return the width out."""
    for stage, cout in enumerate(widths):
        for j in range(n):
            stride = 2 if stage > 0 and j == 0 else 1
            first = _grouping(len(blocks), mix_at, neuron_groups)
            blocks.append(block(cin, cout, stride, first_groups=first, groups=neuron_groups))
            cin = cout
    return cin


def wide_resnet(
    depth: int,
    k: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: float = 1.0,
    neuron_groups: int = 1,
    mix_at: Collection[int] = (),
) -> nn.Sequential:
    """WRN-depth-k of Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016, arXiv:1605.07146, Table 1
    and Fig. 1(b); official code szagoruyko/wide-residual-networks): a 3x3 conv stem of 16 channels, 3 groups
    of n = (depth - 4) / 6 wide blocks of 16k, 32k, 64k channels (strides 1, 2, 2; every width x ``width``),
    then BN-ReLU, global average pooling and a linear classifier. No dropout, as in the paper's main
    results."""
    name = f"wrn{depth}-{k}"
    c, _, _ = _check_input(name, input_shape, 1)
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"{name}: a wide ResNet's depth is 6n+4 with n >= 1")
    n = (depth - 4) // 6
    stem = max(1, round(16 * width))
    widths = [max(1, round(base * k * width)) for base in (16, 32, 64)]
    _check_groups(name, [stem, *widths], neuron_groups)
    blocks: list[nn.Module] = [nn.Sequential(nn.Conv2d(c, stem, 3, 1, 1, bias=False))]
    cin = _residual_stages(blocks, WideBasicBlock, stem, widths, n, mix_at, neuron_groups)
    blocks.append(
        nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(cin, num_classes),
        )
    )
    return nn.Sequential(*blocks)


def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: float = 1.0,
    neuron_groups: int = 1,
    mix_at: Collection[int] = (),
) -> nn.Sequential:
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
