"""The CNNs of the papers lcbench reproduces, as ``nn.Sequential`` lists of blocks, with their
published cut points.

- ``resnet50/101/152``: the pre-activation bottleneck ResNet for 32x32 inputs of the
  official local-critic code (hjdw2/Local-critic-training, ``resnet_model.py``): a 3x3 stem
  of 64 filters, stages of 3-4-{6,23,36}-3 bottlenecks (64/128/256/512 x 4 channels), then
  BN-ReLU, global average pooling and a linear layer. Cut points of that code for ResNet-101:
  K=2 after the stem, stages 1-2 and the first 10 blocks of stage 3; K=4 after the stem and
  stages 1-2, then every 8 blocks.
- ``lc-vgg``: the VGG-like CNN (BN + ReLU) of the ICLR-2019 local-critic paper. The paper
  gives its size (about 7.9M parameters) and critic counts LC(1), LC(3), LC(5), not a layer
  list that could be checked here; this is nine 3x3 convs (3 x 128, 3 x 256, 3 x 512, a 2x2
  max-pool after each three), global average pooling, FC 512, FC classes: 7.94M parameters
  for 10 classes. Critic positions (cut points) chosen here for K=2, 4, 6: at the pooling
  stages first.
- ``tv-vgg13-bn``, ``tv-vgg19-bn``, ``tv-resnet152``: torchvision's models, one block per
  conv (VGG) or residual block (ResNet), as split in the DGL paper: VGG-13 layer-wise
  (K=10), VGG-19 at its pooling stages (K=4); ResNet-152 with K=2 takes the default split.
- ``resnet32x2``: the CIFAR ResNet-32 at twice the width (neuron-groups paper).
- ``dni-cnn``: the CIFAR-10 CNN of the DNI paper (Jaderberg et al. 2017, appendix), as the
  DGL authors' DNI comparison builds it (eugenium/DGL, dni_comparisons): three blocks of a
  5x5 conv of 128 filters (resolution preserving), BN, ReLU and a 3x3 pooling of stride 3
  (max after the first, average after the others), then a linear layer on the 128 features
  left; PyTorch's default initialisation, as there. Cut after each block: K=4 is the DNI
  runs' three synthesizers (the last before the linear layer), K=3 the DGL run's three
  layer groups (the linear layer the last group's head).

Width-grouped variants (GN-DGL) follow ``bench.models.cnn``: block 0, the classifier and the
blocks in ``mix_at`` mix all channels; the other convs are grouped.
"""

from __future__ import annotations

import torchvision
from torch import nn

PAPER_CUTS: dict[str, dict[int, list[int]]] = {
    "resnet101": {2: [18], 4: [8, 16, 24]},
    "lc-vgg": {2: [6], 4: [3, 6, 8], 6: [2, 3, 5, 6, 8]},
    "tv-vgg13-bn": {10: list(range(1, 10))},
    "tv-vgg19-bn": {4: [4, 8, 12]},
    "dni-cnn": {3: [1, 2], 4: [1, 2, 3]},
}

PREACT_STAGES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _grouping(index: int, mix_at, groups: int) -> int:
    return 1 if index == 0 or index in mix_at else groups


def _channels(base: int, width: float, groups: int) -> int:
    return groups * max(1, round(base * width / groups))


class PreActBottleneck(nn.Module):
    """BN-ReLU before every conv: 1x1, 3x3 (stride), 1x1 to 4x; the projection shortcut
    (where the shape changes) takes the pre-activated input."""

    def __init__(
        self, cin: int, planes: int, stride: int, *, first_groups: int = 1, groups: int = 1
    ):
        super().__init__()
        out = 4 * planes
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False, groups=first_groups)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False, groups=groups)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False, groups=groups)
        self.shortcut = (
            nn.Conv2d(cin, out, 1, stride, bias=False, groups=first_groups)
            if stride != 1 or cin != out
            else None
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        pre = self.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


def preact_resnet(
    depth: int,
    input_shape,
    num_classes: int,
    *,
    width: float = 1.0,
    neuron_groups: int = 1,
    mix_at=(),
) -> nn.Sequential:
    """Pre-activation bottleneck ResNet-{50,101,152} for small images (see the module doc)."""
    c = input_shape[0]
    stem = _channels(64, width, neuron_groups)
    blocks: list[nn.Module] = [nn.Sequential(nn.Conv2d(c, stem, 3, 1, 1, bias=False))]
    cin = stem
    for stage, count in enumerate(PREACT_STAGES[depth]):
        planes = _channels(64 * 2**stage, width, neuron_groups)
        for j in range(count):
            stride = 2 if stage > 0 and j == 0 else 1
            blocks.append(
                PreActBottleneck(
                    cin,
                    planes,
                    stride,
                    groups=neuron_groups,
                    first_groups=_grouping(len(blocks), mix_at, neuron_groups),
                )
            )
            cin = 4 * planes
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


def lc_vgg(
    input_shape, num_classes: int, *, width: float = 1.0, neuron_groups: int = 1, mix_at=()
) -> nn.Sequential:
    """The VGG-like CNN of the local-critic paper (see the module doc)."""
    cin = input_shape[0]
    blocks = []
    for i, base in enumerate([128] * 3 + [256] * 3 + [512] * 3):
        cout = _channels(base, width, neuron_groups)
        layers = [
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False, groups=_grouping(i, mix_at, neuron_groups)),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]
        if i % 3 == 2:
            layers.append(nn.MaxPool2d(2))
        blocks.append(nn.Sequential(*layers))
        cin = cout
    hidden = max(1, round(512 * width))
    blocks.append(
        nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(cin, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
    )
    return nn.Sequential(*blocks)


def dni_cnn(
    input_shape, num_classes: int, *, width: float = 1.0, neuron_groups: int = 1, mix_at=()
) -> nn.Sequential:
    """The DNI paper's CIFAR-10 CNN (see the module doc)."""
    if neuron_groups != 1:
        raise ValueError("dni-cnn has no width-grouped variant (GN-DGL)")
    if len(input_shape) != 3 or min(input_shape[1:]) < 27:
        raise ValueError(f"dni-cnn takes images of at least 27x27 (got {input_shape})")
    cin, side = input_shape[0], input_shape[1]
    width_ = max(1, round(128 * width))
    blocks = []
    for pool in (nn.MaxPool2d, nn.AvgPool2d, nn.AvgPool2d):
        blocks.append(
            nn.Sequential(
                nn.Conv2d(cin, width_, 5, padding=2), nn.BatchNorm2d(width_), nn.ReLU(), pool(3)
            )
        )
        cin, side = width_, side // 3
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(width_ * side * side, num_classes)))
    return nn.Sequential(*blocks)


#: models initialised as their reference code leaves them (PyTorch's defaults), not with the
#: zoo's Kaiming initialisation of every conv
DEFAULT_INIT = ("dni-cnn",)


def _no_groups(name: str, neuron_groups: int, width: float) -> None:
    if neuron_groups != 1 or width != 1.0:
        raise ValueError(
            f"{name} is torchvision's model as published: no --width, no neuron groups"
        )


def tv_vgg(
    name: str,
    input_shape,
    num_classes: int,
    *,
    width: float = 1.0,
    neuron_groups: int = 1,
    mix_at=(),
) -> nn.Sequential:
    """torchvision's VGG (BN): a block per conv-BN-ReLU (with the max-pool after it), then
    the classifier."""
    _no_groups(f"tv-{name.replace('_', '-')}", neuron_groups, width)
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    blocks, current = [], []
    for layer in model.features:
        if isinstance(layer, nn.MaxPool2d):
            blocks[-1].append(layer)
            continue
        current.append(layer)
        if isinstance(layer, nn.ReLU):
            blocks.append(current)
            current = []
    return nn.Sequential(
        *(nn.Sequential(*b) for b in blocks),
        nn.Sequential(model.avgpool, nn.Flatten(), *model.classifier),
    )


def tv_resnet152(
    input_shape, num_classes: int, *, width: float = 1.0, neuron_groups: int = 1, mix_at=()
) -> nn.Sequential:
    """torchvision's ResNet-152: the stem, each bottleneck, then pooling and the classifier."""
    _no_groups("tv-resnet152", neuron_groups, width)
    model = torchvision.models.resnet152(weights=None, num_classes=num_classes)
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    body = [
        block
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
        for block in stage
    ]
    return nn.Sequential(stem, *body, nn.Sequential(model.avgpool, nn.Flatten(), model.fc))
