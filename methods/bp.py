"""Backprop split into stages: the gradient dL/dh_k travels upstream, every group steps on it."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Stage


@dataclass
class BPOptions:
    """Backprop has no local module."""


class BPStage(Stage):
    """Exact backprop: keep (input, output) of each batch until dL/dh_k arrives."""

    version = 1
    upstream = "gradient"
    decoupled = False

    def __init__(
        self,
        index,
        count,
        group,
        criterion,
        train,
        *,
        shape=None,
        classes=None,
        options: BPOptions | None = None,
    ):
        super().__init__(index, count, group, criterion, train)

    def forward(self, batch, x, y):
        if self.last:
            _, grad = self.true_loss(batch, x, y, keep_input=self.index > 0)
            return None, grad
        x = x.requires_grad_() if self.index > 0 else x
        with self.phase("forward"):
            h = self.group(x)
        self.kept[batch] = (x, h)
        return h.detach(), None

    def receive(self, batch, message):
        x, h = self.kept.pop(batch)
        self.backward(h, message)
        self.step(self.optimizer)
        return x.grad if self.index > 0 else None
