"""Local critic training (Lee & Lee): critics approximate the true loss, cascaded."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import modules
from .base import Stage, adam


@dataclass
class LCOptions:
    """Critic: ``critic_layers`` 3x3 convs of ``critic_filters``, then linear; Adam."""

    critic_filters: int = 128
    critic_layers: int = 1
    critic_lr: float = 1e-4


class LCStage(Stage):
    """f_k steps on dL_k/dθ_k only, L_k = CE(c_k(h_k), y); c_k steps on
    mean |L_k - L_{k+1}| when L_{k+1} (per sample, detached) arrives from below."""

    upstream = "loss"

    def __init__(self, index, count, group, criterion, train, *, shape, classes,
                 options: LCOptions):
        super().__init__(index, count, group, criterion, train)
        self.critic = None
        if not self.last:
            self.critic = modules.critic(shape, classes, filters=options.critic_filters,
                                         layers=options.critic_layers)
            self.critic_optimizer = adam(self.critic.parameters(), options.critic_lr, train)

    def forward(self, batch, x, y):
        if self.last:
            per_sample, _ = self.true_loss(batch, x, y, keep_input=False)
            return None, (per_sample if self.index > 0 else None)
        with self.phase("forward"):
            h = self.group(x)
            logits = self.critic(h)
            per_sample = self.criterion(logits, y)
        self.backward(per_sample.mean(), inputs=list(self.group.parameters()))
        self.step(self.optimizer)
        self.record(logits, y, per_sample)
        h = h.detach()
        self.kept[batch] = (h, y)
        return h, (per_sample.detach() if self.index > 0 else None)

    def receive(self, batch, message):
        h, y = self.kept.pop(batch)
        with self.phase("forward"):
            loss = (self.criterion(self.critic(h), y) - message).abs().mean()
        self.backward(loss)
        self.step(self.critic_optimizer)
        self.tally(y.shape[0], critic_loss=loss)

    @torch.no_grad()
    def critic_loss(self, h, y):
        """Per-sample loss of the critic on ``h``: the rule's estimate of the true loss."""
        return self.criterion(self.critic(h), y)

    def head(self):
        return self.critic

    def modules(self):
        return [self.group] + ([self.critic] if self.critic is not None else [])

    def optimizers(self):
        return [self.optimizer] + ([self.critic_optimizer] if self.critic is not None else [])
