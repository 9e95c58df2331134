"""The rules' local modules, with the published defaults (see DESIGN.md).

Each builder takes the per-sample shape of the features it reads: ``(C, H, W)`` for conv
features, ``(D,)`` for vectors, ``(T, D)`` for sequences. On sequences a module works at
every step (``nn.Linear`` acts on the last dimension); where the targets are one per
sequence, the loss reads its last step (``methods.base.match_targets``).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _conv_relu(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.ReLU()]


def critic(shape, classes: int, *, filters: int = 128, layers: int = 1) -> nn.Module:
    """LC critic: ``layers`` 3x3 convs of ``filters`` + ReLU, then a linear output layer."""
    if len(shape) <= 2:  # vectors, or sequences step by step
        body = []
        width = shape[-1]
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
    if len(shape) == 2:  # sequences: the 3-layer MLP at every step, without BatchNorm
        width = channels or shape[1]
        return nn.Sequential(nn.Linear(shape[1], width), nn.ReLU(), nn.Linear(width, width),
                             nn.ReLU(), nn.Linear(width, classes))
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
    the first layer's output, broadcast over space (on sequences: over the steps, or step by
    step for one label per step). Vectors take linear layers; sequences linear layers at
    every step, without BatchNorm.

    Scale: the network regresses on targets divided by ``scale``, a running RMS (per element)
    of the targets it has been fitted to, and ``M(h)`` is its output times ``scale``. So the
    regression targets are O(1) per element whatever the gradients' scale: Adam moves the
    zero-initialised output layer by about its learning rate per step whatever the target's
    scale, and raw targets of ~1e-4 per element (wide conv feature maps) are overshot a
    hundredfold (see DESIGN.md, DNI)."""

    #: weight of the newest batch in the running RMS of the targets
    SCALE_MOMENTUM = 0.01

    def __init__(self, shape, classes: int, *, conditioned: bool, filters: int = 128,
                 kernel: int = 5):
        super().__init__()
        conv, sequence = len(shape) == 3, len(shape) == 2
        width = shape[0] if conv else shape[-1]

        def layer(a, b):
            return nn.Conv2d(a, b, kernel, padding=kernel // 2) if conv else nn.Linear(a, b)

        def norm(n):
            if sequence:
                return nn.Identity()
            return nn.BatchNorm2d(n) if conv else nn.BatchNorm1d(n)

        self.first = layer(width, filters)
        self.label = nn.Linear(classes, filters, bias=False) if conditioned else None
        self.rest = nn.Sequential(norm(filters), nn.ReLU(), layer(filters, filters),
                                  norm(filters), nn.ReLU(), layer(filters, width))
        nn.init.zeros_(self.rest[-1].weight)
        nn.init.zeros_(self.rest[-1].bias)
        self.conv = conv
        self.register_buffer("scale", torch.zeros(()))  # 0: no target seen yet

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None, *,
                normalised: bool = False) -> torch.Tensor:
        """The predicted gradient M(h[, y]), in the units of the targets; ``normalised``:
        the network's own output, the gradient divided by ``scale``. (Both go through the
        module's call, so whatever runs the module, e.g. autocast or a compiler, runs both.)"""
        z = self.first(h)
        if self.label is not None:
            # the linear map of the one-hot label, read as a lookup: (B, F), or (B, T, F)
            e = nn.functional.embedding(y, self.label.weight.t())
            if self.conv:
                e = e[:, :, None, None]
            elif z.dim() == 3 and e.dim() == 2:
                e = e[:, None]
            z = z + e
        out = self.rest(z)
        return out if normalised else out * self.scale

    def normalised(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The network's own output: the gradient divided by ``scale``."""
        return self(h, y, normalised=True)

    def fit_loss(self, h: torch.Tensor, y: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        """The L2 regression loss toward ``target``, both divided by the running RMS of the
        targets (updated with this one first)."""
        rms = target.detach().pow(2).mean().sqrt()
        with torch.no_grad():  # the first nonzero target sets the scale
            self.scale.copy_(torch.where(self.scale > 0, self.scale + self.SCALE_MOMENTUM * (rms - self.scale),
                                         rms))
        return nn.functional.mse_loss(self.normalised(h, y), target / self.scale.clamp_min(1e-30))


def group_head(shape, classes: int, *, hidden: int = 128) -> nn.Module:
    """GN-DGL head: 3x3 stride-2 conv to twice the channels, BN, ReLU, global average
    pool, linear to ``hidden``, ReLU, linear to the classes."""
    if len(shape) <= 2:  # vectors, or sequences step by step
        return nn.Sequential(nn.Linear(shape[-1], hidden), nn.ReLU(), nn.Linear(hidden, classes))
    c = shape[0]
    return nn.Sequential(
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * c, hidden), nn.ReLU(), nn.Linear(hidden, classes))
