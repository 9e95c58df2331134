"""Decoupled neural interfaces: synthetic gradients, bootstrapped from the stage below.

Scale convention: synthesizers' targets are gradients of the *summed* batch loss (B times
dL/dh of the mean loss, the units of the messages between stages); the group is stepped on
M(h)/B, the rule's estimate of dL/dh. The published fit (``synth_fit="l2"``) regresses on the
mean-loss gradient as it is; ``synth_fit="rms"`` (not published) on the targets divided by
their running RMS (``modules.Synthesizer``; see DESIGN.md, DNI).

A label-blind synthesizer can learn at most E[dL/dh | h]; on lc-vgg at lr 0.1 that part moves
faster than it can follow (``python -m bench.studies.dni_signal``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from . import modules
from .base import Stage, adam, option, snapshot, take_grads


@dataclass
class DNIOptions:
    """The synthesizer of the local-critic tables (Lee & Lee, ICLR 2019, section 3.1: "each
    additional module is composed of a convolutional layer and an output layer", the
    critic's: one 3x3 conv of 128 filters + ReLU, Adam 1e-4), fitted with the published
    plain L2. The DGL authors' DNI comparison (eugenium/DGL, dni_comparisons) uses
    ``synth_layers=2, synth_kernel=5, synth_batchnorm=True`` (three 5x5 convs of 128, BN +
    ReLU between them). ``synth_fit="rms"``: targets divided by their running RMS (not
    published)."""

    synth_layers: int = option(1, least=1)
    synth_kernel: int = option(3, least=1)
    synth_filters: int = option(128, least=1)
    synth_batchnorm: bool = False
    synth_fit: str = option("l2", choices=modules.SYNTH_FITS)
    synth_lr: float = option(1e-4, above=0)

    #: options whose non-default values are lcbench's variants, not the published rule
    VARIANT_OPTIONS = ("synth_fit",)

    def __post_init__(self):
        if self.synth_kernel % 2 == 0:
            raise ValueError(
                f"option synth_kernel of dni must be odd: a conv of even size does "
                f"not preserve the resolution (got {self.synth_kernel})"
            )


class DNIStage(Stage):
    """f_k steps on h_k.backward(M_k(h_k)) at once; M_k regresses (L2) on the target
    J_{k+1}^T M_{k+1}(h_{k+1}) (the true gradient for the last synthesizer), from the same
    forward pass, kept until the target comes."""

    version = 2  # 2: the published plain L2 fit by default (was the running-RMS fit)
    upstream = "gradient"
    conditioned = False

    def __init__(
        self, index, count, group, criterion, train, *, shape, classes, options: DNIOptions
    ):
        super().__init__(index, count, group, criterion, train)
        self.synth = None
        if not self.last:
            self.synth = modules.Synthesizer(
                shape,
                classes,
                conditioned=self.conditioned,
                filters=options.synth_filters,
                kernel=options.synth_kernel,
                layers=options.synth_layers,
                batchnorm=options.synth_batchnorm,
                fit=options.synth_fit,
            )
            self.synth_optimizer = adam(self.synth.parameters(), options.synth_lr, train)

    def _label(self, y):
        return y if self.conditioned else None

    @torch.no_grad()
    def synthetic_gradient(self, h, y):
        """The rule's estimate of dL/dh of the mean batch loss (what the group steps on)."""
        return self.synth.gradient(h, self._label(y)) / y.shape[0]

    def local_gradient(self, h, y):
        return None if self.last else self.synthetic_gradient(h.detach(), y)

    def forward(self, batch, x, y):
        n = y.shape[0]
        keep_input = self.index > 0
        if self.last:
            _, grad = self.true_loss(batch, x, y, keep_input=keep_input)
            return None, (grad * n if keep_input else None)
        x = x.requires_grad_() if keep_input else x
        with self.phase("forward"):
            h = self.group(x)
            weights = snapshot(self.synth)  # the pass is kept for the synthesizer's update
            output = functional_call(self.synth, weights, (h.detach(), self._label(y)))
        self.backward(h, self.synth.to_gradient(output.detach()) / n)
        self.step(self.optimizer)
        self.kept[batch] = (output, weights)
        return h.detach(), (x.grad * n if keep_input else None)

    def receive(self, batch, message):
        output, weights = self.kept.pop(batch)
        loss = self.synth.fit_loss(output, message)
        self.backward(loss, inputs=list(weights.values()))
        take_grads(self.synth, weights)
        self.step(self.synth_optimizer)
        self.tally(output.shape[0], synth_loss=loss)

    def modules(self):
        return [self.group] + ([self.synth] if self.synth is not None else [])

    def optimizers(self):
        return [self.optimizer] + ([self.synth_optimizer] if self.synth is not None else [])


class CDNIStage(DNIStage):
    """cDNI: the synthesizer also sees the one-hot label."""

    conditioned = True
