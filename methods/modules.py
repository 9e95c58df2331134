"""The rules' local modules, with the published defaults (see DESIGN.md).

Each builder takes the per-sample shape of the features it reads: ``(C, H, W)`` for conv
features, ``(D,)`` for vectors.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _conv_relu(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.ReLU()]


def critic(shape, classes: int, *, filters: int = 128, layers: int = 1) -> nn.Module:
    """LC critic: ``layers`` 3x3 convs of ``filters`` + ReLU, then a linear output layer."""
    if len(shape) == 1:
        body = []
        width = shape[0]
        for _ in range(layers):
            body += [nn.Linear(width, filters), nn.ReLU()]
            width = filters
        return nn.Sequential(*body, nn.Linear(width, classes))
    c, h, w = shape
    body = []
    for i in range(layers):
        body += _conv_relu(c if i == 0 else filters, filters, 3)
    return nn.Sequential(*body, nn.Flatten(), nn.Linear(filters * h * w, classes))


def auxiliary(shape, classes: int, *, channels: int | None = None) -> nn.Module:
    """DGL's "MLP-SR-aux": pool to a quarter of the side, three 1x1 conv+BN+ReLU,
    pool to 2x2, a 3-layer MLP. Vector features get the 3-layer MLP alone."""
    if len(shape) == 1:
        width = channels or shape[0]
        return _mlp(shape[0], width, classes)
    c, h, _ = shape
    width = channels or c
    convs = []
    for i in range(3):
        convs += [nn.Conv2d(c if i == 0 else width, width, 1), nn.BatchNorm2d(width), nn.ReLU()]
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(math.ceil(h / 4)), *convs,
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), _mlp(4 * width, 4 * width, classes))


def _mlp(cin: int, width: int, classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(cin, width), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, classes))


class Synthesizer(nn.Module):
    """DNI gradient model M(h[, y]): three 5x5 convs of 128 filters with BN+ReLU between
    them, the last zero-initialised; cDNI adds a linear embedding of the one-hot label to
    the first layer's output, broadcast over space."""

    def __init__(self, shape, classes: int, *, conditioned: bool, filters: int = 128,
                 kernel: int = 5):
        super().__init__()
        conv = len(shape) == 3
        cin = shape[0]

        def layer(a, b):
            return nn.Conv2d(a, b, kernel, padding=kernel // 2) if conv else nn.Linear(a, b)

        def norm(n):
            return nn.BatchNorm2d(n) if conv else nn.BatchNorm1d(n)

        self.first = layer(cin, filters)
        self.label = nn.Linear(classes, filters, bias=False) if conditioned else None
        self.rest = nn.Sequential(norm(filters), nn.ReLU(), layer(filters, filters),
                                  norm(filters), nn.ReLU(), layer(filters, cin))
        nn.init.zeros_(self.rest[-1].weight)
        nn.init.zeros_(self.rest[-1].bias)
        self.classes = classes

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        z = self.first(h)
        if self.label is not None:
            e = self.label(nn.functional.one_hot(y, self.classes).to(h.dtype))
            z = z + e.view(*e.shape, *([1] * (z.dim() - 2)))
        return self.rest(z)


def group_head(shape, classes: int, *, hidden: int = 128) -> nn.Module:
    """GN-DGL head: 3x3 stride-2 conv to twice the channels, BN, ReLU, global average
    pool, linear to ``hidden``, ReLU, linear to the classes."""
    if len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], hidden), nn.ReLU(), nn.Linear(hidden, classes))
    c = shape[0]
    return nn.Sequential(
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * c, hidden), nn.ReLU(), nn.Linear(hidden, classes))
