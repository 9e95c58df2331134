"""The training schedule: how many batches each epoch has and the main network's rate of each."""

from __future__ import annotations

import bisect
import itertools
import math

from .config import RunConfig


def epoch_steps(cfg: RunConfig, steps: int) -> list[int]:
    """Training batches of each epoch: ``steps`` each, or up to ``iterations`` in all."""
    if cfg.iterations is None:
        return [steps] * cfg.epochs
    full, rest = divmod(cfg.iterations, steps)
    return [steps] * full + ([rest] if rest else [])


class LRSchedule:
    """The main network's rate at iteration i, as a factor of ``--lr``:

    - ``step``: gamma^(milestones <= i);
    - ``cosine`` (InfoPro's ``--cos_lr``, blackfeather-wang/InfoPro-Pytorch,
      ``train.py: adjust_learning_rate``): one rate per epoch e = 1..E, c(e) = (1 + cos(pi e /
      E)) / 2 of ``--lr``; during the first W = ``lr_warmup`` epochs blended linearly from
      ``lr_warmup_start``: c(e) w + start (1 - w), w = (e - 1) / W. The last epoch runs at 0,
      as there."""

    def __init__(self, cfg: RunConfig, steps: int):
        self.milestones = sorted(cfg.lr_milestones or [])
        self.gamma = cfg.lr_gamma
        self.cosine = cfg.lr_schedule == "cosine"
        self.steps, self.epochs = steps, len(epoch_steps(cfg, steps))
        self.warmup, self.start = cfg.lr_warmup, cfg.lr_warmup_start / cfg.lr
        self.factor = 1.0

    def factor_at(self, iteration: int) -> float:
        if not self.cosine:
            return self.gamma ** bisect.bisect_right(self.milestones, iteration)
        epoch = iteration // self.steps + 1
        factor = (1 + math.cos(math.pi * epoch / self.epochs)) / 2
        if epoch <= self.warmup:
            blend = (epoch - 1) / self.warmup
            factor = factor * blend + self.start * (1 - blend)
        return factor

    def apply(self, stages, iteration: int) -> None:
        """Set ``stages``' rates for ``iteration`` (a no-op while the factor stays)."""
        factor = self.factor_at(iteration)
        if factor != self.factor:
            for stage in stages:
                stage.scale_lr(factor)
            self.factor = factor


def scheduled(batches, stages, schedule: LRSchedule, first: int, count: int):
    """``count`` of ``batches``, the rates set for each one's iteration (``first`` + i)."""
    for i, batch in enumerate(itertools.islice(batches, count)):
        schedule.apply(stages, first + i)
        yield batch
