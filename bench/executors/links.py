"""What one rank of a distributed run holds: its part of the model, and its point-to-point
traffic on torch.distributed with the time spent waiting."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: outstanding sends before a rank waits (backpressure on a fast stage)
MAX_SENDS = 4


class Links:
    """Sends and receives of one rank; ``idle`` is the seconds it spent waiting on them."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.sends: deque = deque()
        self.idle = 0.0

    def wait(self, work) -> None:
        start = time.perf_counter()
        work.wait()
        self.idle += time.perf_counter() - start

    def irecv(self, shape, dtype, device, src: int):
        """``(work, buffer)``: a receive posted now, to be waited for (``wait``) later."""
        buf = torch.empty(shape, dtype=dtype, device=device)
        return dist.irecv(buf, src=src), buf

    def recv(self, shape, dtype, device, src: int) -> torch.Tensor:
        work, buf = self.irecv(shape, dtype, device, src)
        self.wait(work)
        return buf

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.sends.append(dist.isend(tensor.contiguous(), dst=dst))
        while len(self.sends) > MAX_SENDS:
            self.wait(self.sends.popleft())

    def flush(self) -> None:
        while self.sends:
            self.wait(self.sends.popleft())

    def pop_idle(self) -> float:
        idle, self.idle = self.idle, 0.0
        return idle


@dataclass
class Part:
    """What one rank trains: its stage, and how it trains and evaluates it."""

    stage: object
    label: str  # the ``stage`` column of the rank's own figures (time, memory, counts)
    layer: int  # its layer group: the busy times of one layer group's ranks are one worker
    epoch: Callable  # (batches, probe, steps, on_step) -> counts
    evaluate: Callable  # (test batches on rank 0, their sizes) -> {(stage, metric): value}
