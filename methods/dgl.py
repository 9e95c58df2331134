"""Decoupled greedy learning: each group trains on its own auxiliary classifier's loss."""

from __future__ import annotations

from dataclasses import dataclass

from . import modules
from .base import Stage, option

#: the auxiliary nets: "mlp-sr", the DGL paper's "MLP-SR-aux" (its CIFAR and ImageNet
#: tables); "conv", that of the authors' DNI comparison (``modules.conv_auxiliary``)
AUX_NETS = {"mlp-sr": modules.auxiliary, "conv": modules.conv_auxiliary}


@dataclass
class DGLOptions:
    """Auxiliary net ``aux_net`` (default "MLP-SR-aux"); ``aux_channels`` defaults to the
    feature channels."""

    aux_channels: int | None = option(None, least=1)
    aux_net: str = option("mlp-sr", choices=tuple(AUX_NETS))


class DGLStage(Stage):
    """f_k and a_k step on CE(a_k(h_k), y) (one SGD optimizer, a parameter group each);
    nothing goes upstream."""

    version = 1

    def __init__(
        self,
        index,
        count,
        group,
        criterion,
        train,
        *,
        shape,
        classes,
        options: DGLOptions,
        head=None,
    ):
        super().__init__(index, count, group, criterion, train)
        self.aux = None
        if not self.last:
            self.aux = (
                head
                if head is not None
                else AUX_NETS[options.aux_net](shape, classes, channels=options.aux_channels)
            )
            self.optimizer.add_param_group({"params": list(self.aux.parameters())})

    def forward(self, batch, x, y):
        if self.last:
            self.true_loss(batch, x, y, keep_input=False)
            return None, None
        with self.phase("forward"):
            h = self.group(x)
            logits = self.aux(h)
            per_sample = self.criterion(logits, y)
        self.backward(per_sample.mean())
        self.step(self.optimizer)
        self.record(logits, y, per_sample)
        return h.detach(), None

    def head(self):
        return self.aux

    def modules(self):
        return [self.group] + ([self.aux] if self.aux is not None else [])
