"""Pipelined backprop (GPipe / 1F1B): exact backprop over M micro-batches per batch.

The batch is cut into ``microbatches`` equal chunks that pass through the group one at a
time (so BatchNorm normalises each chunk on its own, as in a real pipeline); gradients of
the chunks accumulate and every group steps once per batch on the mean loss. This is what
torch.distributed.pipelining computes with either schedule; the schedule only changes the
order of the chunks' forward and backward passes, hence time and memory, not the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import option
from .bp import BPStage

SCHEDULES = ("1f1b", "gpipe")


@dataclass
class PipeBPOptions:
    """Micro-batches per batch (the batch size must divide by it) and the schedule."""

    microbatches: int = option(4, least=1)
    schedule: str = option("1f1b", choices=SCHEDULES)


class PipeBPStage(BPStage):
    """BP whose group sees the batch as M micro-batches; one step per batch."""

    epoch_loop = "pipeline"

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
        options: PipeBPOptions,
    ):
        super().__init__(index, count, group, criterion, train)
        self.microbatches = options.microbatches
        self.schedule = options.schedule
        # GPipe runs every forward before any backward; 1F1B starts backward passes as
        # soon as the last stage can, so stage k holds at most K - k micro-batches
        self.in_flight = (
            self.microbatches if self.schedule == "gpipe" else min(self.microbatches, count - index)
        )

    def chunks(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if t.shape[0] % self.microbatches:
            raise ValueError(
                f"a batch of {t.shape[0]} does not split into {self.microbatches} micro-batches"
            )
        return t.chunk(self.microbatches)

    def forward(self, batch, x, y):
        xs = [c.detach().requires_grad_(self.index > 0) for c in self.chunks(x)]
        if self.last:
            return None, self._last_forward(xs, y)
        with self.phase("forward"):
            hs = [self.group(c) for c in xs]
        self.kept[batch] = (xs, hs)
        return torch.cat([h.detach() for h in hs]), None

    def _last_forward(self, xs, y):
        """Mean loss of each micro-batch, backpropagated at once (divided by M: the batch's
        mean loss); the group steps when the batch is done."""
        logits, per_sample = [], []
        for c, target in zip(xs, self.chunks(y)):
            with self.phase("forward"):
                logits.append(self.group(c))
                per_sample.append(self.criterion(logits[-1], target))
            self.backward(per_sample[-1].mean() / self.microbatches)
        self.step(self.optimizer)
        self.record(torch.cat(logits), y, torch.cat(per_sample))
        return torch.cat([c.grad for c in xs]) if self.index > 0 else None

    def receive(self, batch, message):
        xs, hs = self.kept.pop(batch)
        for h, grad in zip(hs, self.chunks(message)):
            self.backward(h, grad)
        self.step(self.optimizer)
        return torch.cat([c.grad for c in xs]) if self.index > 0 else None
