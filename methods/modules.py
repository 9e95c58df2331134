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
        return nn.Sequential(
            nn.Linear(shape[1], width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, classes),
        )
    c, h, _ = shape
    width = channels or c
    convs = []
    for i in range(3):
        convs += [nn.Conv2d(c if i == 0 else width, width, 1), nn.BatchNorm2d(width), nn.ReLU()]
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(math.ceil(h / 4)),
        *convs,
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        _mlp(4 * width, 4 * width, classes),
    )


def conv_auxiliary(shape, classes: int, *, channels: int | None = None) -> nn.Module:
    """The auxiliary net of the DGL authors' DNI comparison (eugenium/DGL,
    dni_comparisons/cifar_dgl.py): the shape of their synthesizer, three 5x5 convs (BN + ReLU
    between them, the last one's weight zero-initialised as there), then global average
    pooling and a linear layer. Vector and sequence features take the 3-layer MLP."""
    if len(shape) != 3:
        return auxiliary(shape, classes, channels=channels)
    width = channels or shape[0]
    convs = [
        nn.Conv2d(shape[0], width, 5, padding=2),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 5, padding=2),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 5, padding=2),
    ]
    nn.init.zeros_(convs[-1].weight)
    return nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def _mlp(cin: int, width: int, classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(cin, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, classes),
    )


#: how a synthesizer is fitted: "l2", the published plain L2 on the mean-loss gradient; "sum",
#: plain L2 on the summed-loss gradient, the output divided by B; "rms", the targets divided by
#: their running RMS ("sum" and "rms" are lcbench variants, not published)
SYNTH_FITS = ("l2", "sum", "rms")


class Synthesizer(nn.Module):
    """DNI gradient model M(h[, y]): ``layers`` hidden convs of ``filters`` (``kernel`` x
    ``kernel``, resolution preserving; BN before each ReLU with ``batchnorm``), then an output
    conv back to the feature channels, zero-initialised (Jaderberg et al. 2017, appendix).
    cDNI adds a linear embedding of the one-hot label to the first layer's output, broadcast
    over space (on sequences: over the steps, or step by step for one label per step).
    Vectors take linear layers; sequences linear layers at every step, without BatchNorm.

    The targets it is fitted to, and ``gradient``'s output, are gradients of the *summed*
    batch loss (B x dL/dh of the mean loss: the units of the messages between stages).

    - ``fit="l2"`` (published: koz4k/dni-pytorch, which the DGL authors' DNI comparison
      uses): the network predicts dL/dh of the mean loss and regresses on it with the squared
      error summed per sample and averaged over the batch; its output is the synthetic
      gradient as it is.
    - ``fit="sum"`` (not published): the network regresses (the same L2) on the gradient of
      the summed loss, B times larger; the synthetic gradient is its output divided by B, so
      that a step of its zero-initialised output layer moves the synthetic gradient B times
      less than under ``"l2"``.
    - ``fit="rms"`` (not published): the network regresses (mean squared error) on the targets
      divided by ``scale``, a running RMS (per element) of the targets it has been fitted to,
      and its output times ``scale`` is the gradient: the fit does not depend on the
      gradients' scale."""

    #: weight of the newest batch in the running RMS of the targets (``fit="rms"``)
    SCALE_MOMENTUM = 0.01

    def __init__(
        self,
        shape,
        classes: int,
        *,
        conditioned: bool,
        filters: int = 128,
        kernel: int = 3,
        layers: int = 1,
        batchnorm: bool = False,
        fit: str = "l2",
    ):
        super().__init__()
        if fit not in SYNTH_FITS:
            raise ValueError(f"unknown synth_fit {fit!r} (choose from {', '.join(SYNTH_FITS)})")
        if layers < 1:
            raise ValueError(f"synth_layers must be at least 1 (got {layers})")
        conv, sequence = len(shape) == 3, len(shape) == 2
        width = shape[0] if conv else shape[-1]

        def layer(a, b):
            return nn.Conv2d(a, b, kernel, padding=kernel // 2) if conv else nn.Linear(a, b)

        def norm(n):
            if sequence or not batchnorm:
                return nn.Identity()
            return nn.BatchNorm2d(n) if conv else nn.BatchNorm1d(n)

        self.first = layer(width, filters)
        self.label = nn.Linear(classes, filters, bias=False) if conditioned else None
        rest = [norm(filters), nn.ReLU()]
        for _ in range(layers - 1):
            rest += [layer(filters, filters), norm(filters), nn.ReLU()]
        self.rest = nn.Sequential(*rest, layer(filters, width))
        nn.init.zeros_(self.rest[-1].weight)
        nn.init.zeros_(self.rest[-1].bias)
        self.conv, self.fit = conv, fit
        if fit == "rms":
            self.register_buffer("scale", torch.zeros(()))  # 0: no target seen yet

    def to_gradient(self, output: torch.Tensor) -> torch.Tensor:
        """The gradient of the summed batch loss that the network's ``output`` stands for."""
        if self.fit == "sum":
            return output
        return output * (self.scale if self.fit == "rms" else output.shape[0])

    def gradient(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The predicted gradient M(h[, y]) of the summed batch loss."""
        return self.to_gradient(self(h, y))

    def fit_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The regression loss of the network's ``output`` (``forward``) toward ``target``, a
        gradient of the summed batch loss (see the class doc for the two fits)."""
        n = target.shape[0]
        if self.fit in ("l2", "sum"):
            goal = target.detach() / n if self.fit == "l2" else target.detach()
            return (output - goal).pow(2).sum() / n
        rms = target.detach().pow(2).mean().sqrt()
        with torch.no_grad():  # the first nonzero target sets the scale
            self.scale.copy_(
                torch.where(
                    self.scale > 0, self.scale + self.SCALE_MOMENTUM * (rms - self.scale), rms
                )
            )
        return nn.functional.mse_loss(output, target / self.scale.clamp_min(1e-30))

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The network's own output (see ``to_gradient``)."""
        z = self.first(h)
        if self.label is not None:
            # the linear map of the one-hot label, read as a lookup: (B, F), or (B, T, F)
            e = nn.functional.embedding(y, self.label.weight.t())
            if self.conv:
                e = e[:, :, None, None]
            elif z.dim() == 3 and e.dim() == 2:
                e = e[:, None]
            z = z + e
        return self.rest(z)


def group_head(shape, classes: int, *, hidden: int = 128) -> nn.Module:
    """GN-DGL head: 3x3 stride-2 conv to twice the channels, BN, ReLU, global average
    pool, linear to ``hidden``, ReLU, linear to the classes."""
    if len(shape) <= 2:  # vectors, or sequences step by step
        return nn.Sequential(nn.Linear(shape[-1], hidden), nn.ReLU(), nn.Linear(hidden, classes))
    c = shape[0]
    return nn.Sequential(
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
        nn.BatchNorm2d(2 * c),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * c, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )
