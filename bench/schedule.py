"""The training schedule: how many batches each epoch has and the SGD rate of each one."""

from __future__ import annotations

import bisect
import itertools

from .config import RunConfig


def epoch_steps(cfg: RunConfig, steps: int) -> list[int]:
    """Training batches of each epoch: ``steps`` each, or up to ``iterations`` in all."""
    if cfg.iterations is None:
        return [steps] * cfg.epochs
    full, rest = divmod(cfg.iterations, steps)
    return [steps] * full + ([rest] if rest else [])


class LRSchedule:
    """Step decay: the SGD rate of iteration i is lr x gamma^(milestones <= i)."""

    def __init__(self, cfg: RunConfig):
        self.milestones = sorted(cfg.lr_milestones or [])
        self.gamma = cfg.lr_gamma
        self.factor = 1.0

    def apply(self, stages, iteration: int) -> None:
        """Set ``stages``' rates for ``iteration`` (a no-op unless a milestone was passed)."""
        factor = self.gamma ** bisect.bisect_right(self.milestones, iteration)
        if factor != self.factor:
            for stage in stages:
                stage.scale_lr(factor)
            self.factor = factor


def scheduled(batches, stages, schedule: LRSchedule, first: int, count: int):
    """``count`` of ``batches``, the rates set for each one's iteration (``first`` + i)."""
    for i, batch in enumerate(itertools.islice(batches, count)):
        schedule.apply(stages, first + i)
        yield batch
