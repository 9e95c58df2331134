"""Local critic training (Lee & Lee): critics approximate the true loss, cascaded."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from . import modules
from .base import Stage, adam, option, snapshot, take_grads


@dataclass
class LCOptions:
    """Critic: ``critic_layers`` 3x3 convs of ``critic_filters``, then linear; Adam."""

    critic_filters: int = option(128, least=1)
    critic_layers: int = option(1, least=1)
    critic_lr: float = option(1e-4, above=0)


class LCStage(Stage):
    """f_k steps on dL_k/dθ_k only, L_k = CE(c_k(h_k), y); c_k steps on
    mean |L_k - L_{k+1}| when L_{k+1} (per sample, detached) arrives from below. The
    critic's forward runs once per batch: its pass (on copies of its weights) is kept until
    the message comes."""

    version = 1
    upstream = "loss"
    predicts = "loss"

    def __init__(
        self, index, count, group, criterion, train, *, shape, classes, options: LCOptions
    ):
        super().__init__(index, count, group, criterion, train)
        self.critic = None
        if not self.last:
            self.critic = modules.critic(
                shape, classes, filters=options.critic_filters, layers=options.critic_layers
            )
            self.critic_optimizer = adam(self.critic.parameters(), options.critic_lr, train)

    def forward(self, batch, x, y):
        if self.last:
            per_sample, _ = self.true_loss(batch, x, y, keep_input=False)
            return None, (per_sample if self.index > 0 else None)
        with self.phase("forward"):
            h = self.group(x)
            h_in = h.detach().requires_grad_()
            weights = snapshot(self.critic)
            logits = functional_call(self.critic, weights, (h_in,))
            per_sample = self.criterion(logits, y)
        with self.phase("backward"):  # the critic's pass is kept for its own update
            per_sample.mean().backward(inputs=[h_in], retain_graph=True)
            h.backward(h_in.grad)
        self.step(self.optimizer)
        self.record(logits, y, per_sample)
        self.kept[batch] = (per_sample, weights)
        return h.detach(), (per_sample.detach() if self.index > 0 else None)

    def receive(self, batch, message):
        per_sample, weights = self.kept.pop(batch)
        loss = (per_sample - message).abs().mean()
        self.backward(loss, inputs=list(weights.values()))
        take_grads(self.critic, weights)
        self.step(self.critic_optimizer)
        self.tally(per_sample.shape[0], critic_loss=loss)

    @torch.no_grad()
    def predicted_loss(self, h, y):
        """Per-sample loss of the critic on ``h``: the rule's estimate of the true loss."""
        return self.criterion(self.critic(h), y)

    def head(self):
        return self.critic

    def modules(self):
        return [self.group] + ([self.critic] if self.critic is not None else [])

    def optimizers(self):
        return [self.optimizer] + ([self.critic_optimizer] if self.critic is not None else [])
