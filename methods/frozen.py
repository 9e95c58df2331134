"""The no-signal floor: groups 1..K-1 held at their initial weights, the last group trained
on the true loss. What a decoupled rule's local signal adds is its accuracy above this
floor, on the same net, split and protocol (an lcbench control, not a published rule)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Stage


@dataclass
class FrozenOptions:
    """The floor has no local module."""


class FrozenStage(Stage):
    """Groups 1..K-1 forward only (no gradient, no step; BatchNorm statistics still track the
    batches, as under every rule); the last group steps on the true loss."""

    version = 1

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
        options: FrozenOptions | None = None,
    ):
        super().__init__(index, count, group, criterion, train)

    def forward(self, batch, x, y):
        if self.last:
            self.true_loss(batch, x, y, keep_input=False)
            return None, None
        with self.phase("forward"), torch.no_grad():
            h = self.group(x)
        return h, None
