"""Local learning with neuron groups (GN-DGL): DGL where each layer group is also split
width-wise into G neuron groups, each with its own head and loss, plus a diversity term.

The group itself must be width-grouped (grouped convs inside, full mixing only where a
layer group starts); the model builder does that. Here a neuron group is a channel slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch
from torch import nn
from torch.nn import functional as F

from . import modules
from .base import Stage, match_targets, option


@dataclass
class GNOptions:
    """Neuron groups G, diversity weight and temperature, head kind ("group" or "mlp-sr")."""

    neuron_groups: int = option(2, least=1)
    diversity_weight: float = option(0.5, least=0)
    temperature: float = option(3.0, above=0)
    head: str = option("group", choices=("group", "mlp-sr"))
    head_hidden: int = option(128, least=1)


def diversity(logits: list[torch.Tensor], y: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over pairs of groups of the inner product of their non-target predictions
    (softmax at ``temperature``, true class removed, renormalised, L2-normalised)."""
    if len(logits) < 2:
        return logits[0].new_zeros(())
    logits = [match_targets(z, y).reshape(-1, z.shape[-1]) for z in logits]  # rows: targets
    y = y.reshape(-1)
    # the true class zeroed rather than removed: the same sums and norms, without the
    # device sync of a boolean mask
    others = 1 - F.one_hot(y, logits[0].shape[1]).to(logits[0].dtype)
    q = []
    for z in logits:
        p = F.softmax(z / temperature, dim=1) * others
        q.append(F.normalize(p / p.sum(1, keepdim=True), dim=1))
    return torch.stack([(a * b).sum(1).mean() for a, b in combinations(q, 2)]).mean()


class GNStage(Stage):
    """Each neuron group g steps on CE(head_g(own channels + others detached), y);
    the loss is the sum over groups plus ``diversity_weight`` times the diversity term."""

    version = 1

    def __init__(
        self, index, count, group, criterion, train, *, shape, classes, options: GNOptions
    ):
        super().__init__(index, count, group, criterion, train)
        self.options = options
        self.heads = None
        if not self.last:
            channels = shape[-1] if len(shape) == 2 else shape[0]
            if channels % options.neuron_groups:
                raise ValueError(
                    f"{channels} channels do not split into {options.neuron_groups} neuron groups"
                )
            build = {
                "group": lambda: modules.group_head(shape, classes, hidden=options.head_hidden),
                "mlp-sr": lambda: modules.auxiliary(shape, classes),
            }
            self.heads = nn.ModuleList(build[options.head]() for _ in range(options.neuron_groups))
            self.optimizer.add_param_group({"params": list(self.heads.parameters())})

    def forward(self, batch, x, y):
        if self.last:
            self.true_loss(batch, x, y, keep_input=False)
            return None, None
        with self.phase("forward"):
            h = self.group(x)
            # neuron groups are channel slices: dim 1 of conv features, the last of sequences
            channels = -1 if h.dim() == 3 else 1
            chunks = h.chunk(self.options.neuron_groups, dim=channels)
            logits, losses = [], []
            for g, head in enumerate(self.heads):
                seen = torch.cat(
                    [c if j == g else c.detach() for j, c in enumerate(chunks)], channels
                )
                logits.append(head(seen))
                losses.append(self.criterion(logits[-1], y))
            div = diversity(logits, y, self.options.temperature)
        self.backward(torch.stack(losses).mean(1).sum() + self.options.diversity_weight * div)
        self.step(self.optimizer)
        self.record(torch.stack(logits).mean(0), y, torch.stack(losses).mean(0))
        self.tally(y.shape[0], diversity=div)
        return h.detach(), None

    def predict(self, h):
        if self.heads is None:
            return None
        return torch.stack([head(h) for head in self.heads]).mean(0)

    def modules(self):
        return [self.group] + ([self.heads] if self.heads is not None else [])
