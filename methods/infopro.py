"""InfoPro: each group trains on lambda_1 x the reconstruction of the input image from its
output (through a decoder) plus lambda_2 x a supervised loss through an auxiliary head (Wang,
Ni, Song, Yang & Huang, "Revisiting Locally Supervised Learning: an Alternative to
End-to-End Training", ICLR 2021; official code blackfeather-wang/InfoPro-Pytorch, files under
"Experiments on CIFAR-SVHN-STL10/": ``networks/resnet.py``, ``networks/auxiliary_nets.py``,
``networks/losses.py``, ``train.py``, ``comand.sh``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .base import Stage, option

#: the head's loss: "contrast" (supervised contrastive, the loss of every command the
#: official code ships, InfoPro (Contrast)) or "cross_entropy" (InfoPro (Softmax))
AUX_LOSSES = ("contrast", "cross_entropy")


@dataclass
class InfoProOptions:
    """lambda_1 (reconstruction) and lambda_2 (the head's loss) at the first and at the last
    local module, linear between them (``networks/resnet.py``: ratio i / (K-2) for local
    module i; K = 2 takes the first pair). Defaults: the official README's example command
    (ResNet-110, K = 2: ``--ixx_1 5 --ixy_1 0.5 --ixx_2 0 --ixy_2 0``); ``comand.sh`` gives
    the pair for each net and K (bench/experiments/infopro.toml sets them)."""

    lambda1_first: float = option(5.0, least=0)  # --ixx_1
    lambda2_first: float = option(0.5, least=0)  # --ixy_1
    lambda1_last: float = option(0.0, least=0)  # --ixx_2
    lambda2_last: float = option(0.0, least=0)  # --ixy_2
    aux_loss: str = option("contrast", choices=AUX_LOSSES)  # --local_loss_mode
    aux_widen: int = option(1, least=1)  # --aux_net_widen
    feature_dim: int = option(128, least=1)  # --aux_net_feature_dim
    decoder_widen: int = option(1, least=1)  # Decoder(widen=1)
    temperature: float = option(0.07, above=0)  # SupConLoss(temperature=0.07)

    @staticmethod
    def chosen(options: dict) -> str:
        """What a cell of this rule says is not published: the reconstruction target."""
        return "image scaled to [0, 1] per batch: lcbench's adaptation"


class Decoder(nn.Module):
    """``auxiliary_nets.Decoder``: the features resized to the image (bilinear, corners
    aligned), a 3x3 conv to 12 x widen channels, BN, ReLU, a 3x3 conv to the image's
    channels, a sigmoid."""

    def __init__(self, channels: int, image_shape: tuple, widen: int):
        super().__init__()
        self.size = tuple(image_shape[1:])
        self.layers = nn.Sequential(
            nn.Conv2d(channels, 12 * widen, 3, padding=1),
            nn.BatchNorm2d(12 * widen),
            nn.ReLU(inplace=True),
            nn.Conv2d(12 * widen, image_shape[0], 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, h):
        h = F.interpolate(h, size=self.size, mode="bilinear", align_corners=True)
        return self.layers(h)


def auxiliary(channels: int, out: int, widen: int, feature_dim: int) -> nn.Sequential:
    """``auxiliary_nets.AuxClassifier`` "1c2f": a 3x3 conv without bias (16 -> 32 and 32 ->
    64 channels at stride 2, 64 -> 64 at stride 1; here: doubling at stride 2 below 64),
    BN, ReLU, global average pooling, linear to feature_dim x widen, ReLU, linear to ``out``."""
    wide = channels < 64
    conv_out = 2 * channels if wide else channels
    hidden = feature_dim * widen
    return nn.Sequential(
        nn.Conv2d(channels, conv_out, 3, stride=2 if wide else 1, padding=1, bias=False),
        nn.BatchNorm2d(conv_out),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(conv_out, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out),
    )


def supervised_contrast(z: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """``losses.SupConLoss`` on one view: L2-normalised features; for each sample, the mean
    over the other samples of its class of -log softmax of the similarities / temperature
    (itself left out of the softmax); averaged over the samples that have such a partner."""
    z = F.normalize(z, dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(y), dtype=torch.bool, device=y.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (y[:, None] == y[None, :]) & ~self_mask
    count = positive.sum(1)
    mean = log_prob.masked_fill(~positive, 0.0).sum(1) / count.clamp(min=1)
    return -(mean[count > 0]).mean() if bool((count > 0).any()) else logits.new_zeros(())


def reconstruction_target(image: torch.Tensor) -> torch.Tensor:
    """The image in [0, 1]. The official code restores the pixels with the data set's mean
    and std; a stage here sees the standardised image only, so each channel is mapped to
    [0, 1] over the batch: an affine map as the restore is, its constants the batch's
    (lcbench's adaptation)."""
    flat = image.transpose(0, 1).flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    shape = (1, -1) + (1,) * (image.dim() - 2)
    return (image - low.view(shape)) / (high - low).clamp(min=1e-8).view(shape)


class InfoProStage(Stage):
    """f_k, its decoder and its head step on lambda_1 BCE(decoder(h_k), x) + lambda_2 head
    loss (one optimizer: the official code's single SGD over the network and its auxiliary
    nets); nothing goes upstream. The last group trains on the true loss."""

    needs_image = True
    version = 1

    def __init__(
        self, index, count, group, criterion, train, *, shape, classes, options, image_shape
    ):
        super().__init__(index, count, group, criterion, train)
        self.options = options
        self.decoder = self.aux = None
        if self.last:
            return
        if len(shape) != 3 or image_shape is None or len(image_shape) != 3:
            raise ValueError(
                f"infopro: its decoder needs image-shaped features and input, got {shape} "
                f"from {image_shape}"
            )
        ratio = index / (count - 2) if count > 2 else 0.0
        self.lambda1 = options.lambda1_first * (1 - ratio) + options.lambda1_last * ratio
        self.lambda2 = options.lambda2_first * (1 - ratio) + options.lambda2_last * ratio
        contrast = options.aux_loss == "contrast"
        out = options.feature_dim if contrast else classes
        self.aux = auxiliary(shape[0], out, options.aux_widen, options.feature_dim)
        self.decoder = Decoder(shape[0], tuple(image_shape), options.decoder_widen)
        for module in (self.decoder, self.aux):
            self.optimizer.add_param_group({"params": list(module.parameters())})

    def forward(self, batch, x, y):
        if self.last:
            self.true_loss(batch, x, y, keep_input=False)
            return None, None
        with self.phase("forward"):  # both terms, whatever their weights (as the official code)
            h = self.group(x)
            target = reconstruction_target(self.image)
            loss = self.lambda1 * F.binary_cross_entropy(self.decoder(h), target)
            out = self.aux(h)
            if self.options.aux_loss == "contrast":
                per_sample = None
                loss = loss + self.lambda2 * supervised_contrast(out, y, self.options.temperature)
            else:
                per_sample = self.criterion(out, y)
                loss = loss + self.lambda2 * per_sample.mean()
        self.backward(loss)
        self.step(self.optimizer)
        if per_sample is not None:
            self.record(out, y, per_sample)
        self.tally(y.shape[0], local_loss=loss)
        return h.detach(), None

    def head(self):
        return self.aux if self.options.aux_loss == "cross_entropy" else None

    def local_gradient(self, h, y):
        """None: the local loss needs the batch's image, which a probe does not carry."""
        return None

    def modules(self):
        return [self.group, *([] if self.last else [self.decoder, self.aux])]
