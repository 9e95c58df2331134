"""The model zoo: every model by name, as an ``nn.Sequential`` list of blocks whose last block
is the classifier (or a language model's decoder).

- ``cnn``: the small CNN, the MLP, the CIFAR ResNets (basic blocks) and the wide ResNets;
- ``paper``: the papers' CNNs (pre-activation ResNets, the VGG-like net, the DNI paper's CNN,
  torchvision's);
- ``rnn``: the LSTMs;
- ``slicing``: one neuron group of a width-grouped layer group (GN-DGL on ranks);
- ``split``: cutting a model into K layer groups.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection

import torch
from torch import nn

from . import cnn, paper, rnn

MODELS: dict[str, Callable[..., nn.Sequential]] = {
    "mlp": cnn.mlp,
    "small-cnn": cnn.small_cnn,
    **{f"resnet{d}": functools.partial(cnn.resnet, d) for d in (8, 20, 32, 56, 110)},
    "resnet32x2": cnn.resnet32x2,
    **{f"resnet{d}": functools.partial(paper.preact_resnet, d) for d in paper.PREACT_STAGES},
    **{
        f"wrn{d}-{k}": functools.partial(cnn.wide_resnet, d, k)
        for d, k in ((16, 4), (16, 8), (28, 2), (28, 10), (40, 4))
    },
    "lc-vgg": paper.lc_vgg,
    "dni-cnn": paper.dni_cnn,
    "tv-vgg13-bn": functools.partial(paper.tv_vgg, "vgg13_bn"),
    "tv-vgg19-bn": functools.partial(paper.tv_vgg, "vgg19_bn"),
    "tv-resnet152": paper.tv_resnet152,
    "lstm": rnn.lstm,
    "lstm-lm": rnn.lstm_lm,
}


def model_names() -> list[str]:
    return list(MODELS)


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: float = 1.0,
    neuron_groups: int = 1,
    mix_at: Collection[int] = (),
) -> nn.Sequential:
    """Build model ``name`` for per-sample inputs of ``input_shape`` (C, H, W) and ``num_classes`` logits."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")
    if neuron_groups < 1 or width <= 0 or num_classes < 1:
        raise ValueError(
            f"{name}: need neuron_groups >= 1, width > 0 and num_classes >= 1, "
            f"got {neuron_groups}, {width}, {num_classes}"
        )
    model = MODELS[name](
        tuple(input_shape), num_classes, width=width, neuron_groups=neuron_groups, mix_at=mix_at
    )
    outside = sorted(i for i in mix_at if not 0 <= i < len(model))
    if outside:
        raise ValueError(f"{name}: mix_at indices {outside} are outside 0..{len(model) - 1}")
    for m in model.modules() if name not in paper.DEFAULT_INIT else ():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def build_width_grouped(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: float = 1.0,
    neuron_groups: int,
    mixing: bool = False,
) -> nn.Sequential:
    """Model ``name`` width-grouped into ``neuron_groups`` as GN-DGL builds it: every block's
    first layer grouped but block 0's, or (``mixing``, as the first block of a layer group
    is) none."""
    with torch.device("meta"):
        size = len(build_model(name, input_shape, num_classes, width=width))
    return build_model(
        name,
        input_shape,
        num_classes,
        width=width,
        neuron_groups=neuron_groups,
        mix_at=range(size) if mixing else (),
    )


#: the task on which a model's size is quoted (``lcbench list --models``)
REFERENCE_TASK = {
    "mlp": "digits",
    "small-cnn": "fashion-mnist",
    "lstm": "seq-fashion-mnist",
    "lstm-lm": "ptb",
    **{name: "imagenet" for name in ("tv-vgg13-bn", "tv-vgg19-bn", "tv-resnet152")},
}
REFERENCE_TASK = {name: REFERENCE_TASK.get(name, "cifar10") for name in MODELS}


def parameter_count(name: str, input_shape, num_classes: int) -> int:
    """Parameters of model ``name`` (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = build_model(name, input_shape, num_classes)
    return sum(p.numel() for p in model.parameters())
