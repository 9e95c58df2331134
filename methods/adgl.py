"""Asynchronous DGL with a replay buffer (Belilovsky et al., 2020, the asynchronous setting).

Stage k > 1 does not train on the activation that just arrived but on one drawn at random
(``input``) from a bounded buffer of the latest activations of the stage above; each entry is used at
most ``max_reuse`` times. A stage whose input is late therefore keeps training on what it
has, and a stage below a slow one is not stalled. With ``buffer_size = max_reuse = 1`` the
rule is DGL. ``slow_stage`` / ``slow_ms`` make one stage slower on purpose (a sleep in its
forward pass) to show how the others cope.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .base import option
from .dgl import DGLOptions, DGLStage


@dataclass
class ADGLOptions(DGLOptions):
    """DGL's auxiliary net, plus the replay buffer and an optional slowed stage (1-based)."""

    buffer_size: int = option(8, least=1)
    max_reuse: int = option(2, least=1)
    slow_stage: int = option(0, least=0)
    slow_ms: float = option(0.0, least=0)


class ReplayBuffer:
    """The last ``size`` (x, y) pushed, each drawn at most ``max_reuse`` times."""

    def __init__(self, size: int, max_reuse: int, generator: torch.Generator):
        self.size, self.max_reuse, self.generator = size, max_reuse, generator
        self.entries: list[list] = []  # [x, y, uses], oldest first
        self.discarded = 0  # entries evicted before their first use

    def push(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.entries.append([x, y, 0])
        if len(self.entries) > self.size:
            self.discarded += self.entries.pop(0)[2] == 0

    def pop_discarded(self) -> int:
        count, self.discarded = self.discarded, 0
        return count

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def unused(self) -> int:
        """Entries never drawn yet."""
        return sum(e[2] == 0 for e in self.entries)

    def state_dict(self) -> dict:
        return {
            "entries": self.entries,
            "discarded": self.discarded,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.entries = [list(entry) for entry in state["entries"]]
        self.discarded = state["discarded"]
        self.generator.set_state(state["generator"].cpu())

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A uniformly drawn entry and how many times it has now been used; it leaves the
        buffer on its ``max_reuse``-th use."""
        i = int(torch.randint(len(self.entries), (), generator=self.generator))
        entry = self.entries[i]
        entry[2] += 1
        if entry[2] >= self.max_reuse:
            self.entries.pop(i)
        return entry[0], entry[1], entry[2]


class ADGLStage(DGLStage):
    """DGL on inputs drawn from a replay buffer (see ``input``)."""

    epoch_loop = "asynchronous"

    version = 1

    def __init__(
        self, index, count, group, criterion, train, *, shape, classes, options: ADGLOptions
    ):
        super().__init__(
            index, count, group, criterion, train, shape=shape, classes=classes, options=options
        )
        seed = torch.initial_seed() + index  # the run's seed, without drawing from its stream
        self.buffer = (
            None
            if index == 0
            else ReplayBuffer(
                options.buffer_size, options.max_reuse, torch.Generator().manual_seed(seed)
            )
        )
        self.delay = options.slow_ms / 1000 if options.slow_stage == index + 1 else 0.0

    def input(self, batch, x, y):
        """Push what arrived (if anything: ``x`` may be None) and draw from the buffer."""
        if self.buffer is None:
            return x, y
        if x is not None:
            self.buffer.push(x, y)
        x, y, uses = self.buffer.draw()
        self.tally(y.shape[0], reuse_frac=torch.tensor(float(uses > 1)))
        return x, y

    def state_dict(self):
        return {
            **super().state_dict(),
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
        }

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])

    def forward(self, batch, x, y):
        if self.delay:
            with self.phase("forward"):
                time.sleep(self.delay)
        return super().forward(batch, x, y)
