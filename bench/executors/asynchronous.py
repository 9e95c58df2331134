"""Asynchronous DGL across ranks: no rank waits for another while it has something to
train on.

Each message downstream is (header = batch id, h, y). A sender thread per rank moves
outputs to the next rank; when ``MAX_IN_FLIGHT`` outputs are already waiting for it, a new
one is dropped (the stage below is slower; its buffer would have evicted it anyway). A
receiver thread per rank k > 0 takes messages from the rank above as they come (keeping the
newest ``buffer_size``); between steps the stage moves whatever arrived into its replay
buffer, trains on the buffer, and blocks only while the buffer is empty. An epoch ends for rank 0 after its batches; for
rank k > 0 when the rank above says so (header -1) and every entry has been trained on at
least once. (Threads, because gloo reports a pending point-to-point op as complete only
once it has been waited on, so it cannot be polled.) Counts per rank (steps, inputs
received, inputs discarded before any use, outputs dropped) go to the records.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from methods.adgl import ADGLStage

#: outputs waiting to be sent before a rank drops new ones
MAX_IN_FLIGHT = 2
END = -1


class Worker(threading.Thread):
    """A daemon thread whose exception is re-raised by ``result()`` in the caller."""

    def __init__(self, body):
        super().__init__(daemon=True)
        self.body, self.error = body, None

    def run(self):
        try:
            self.body()
        except BaseException as e:  # reported to the training thread
            self.error = e

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error


class Downstream:
    """Dropping, non-blocking sends of (batch id, h, y) to the next rank."""

    def __init__(self, links, device):
        self.links, self.dst, self.device = links, links.rank + 1, device
        self.outbox: queue.Queue = queue.Queue(MAX_IN_FLIGHT)
        self.dropped = 0
        self.thread = Worker(self._send_all)
        self.thread.start()

    def _send_all(self):
        while True:
            message = self.outbox.get()
            for t in message:
                dist.send(t, dst=self.dst)
            if int(message[0]) == END:
                return

    def offer(self, batch: int, h: torch.Tensor, y: torch.Tensor) -> None:
        header = torch.tensor([batch], dtype=torch.int64, device=self.device)
        try:
            self.outbox.put_nowait((header, h.contiguous(), y.contiguous()))
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        """Send what waits, then tell the next rank that the epoch is over."""
        self.outbox.put((torch.tensor([END], dtype=torch.int64, device=self.device),))
        self.thread.result()


class Upstream:
    """Messages from the rank above, received by a thread as they come into an inbox that
    keeps the newest ``size`` (older ones are counted in ``discarded``)."""

    def __init__(self, links, *, shape: tuple, y_shape: tuple, dtype, device, size: int):
        self.links, self.src = links, links.rank - 1
        self.shape, self.y_shape, self.dtype, self.device = shape, y_shape, dtype, device
        self.inbox: queue.Queue = queue.Queue(size)
        self.ended = False
        self.received = self.discarded = 0
        self.thread = Worker(self._receive_all)
        self.thread.start()

    def _put(self, message) -> None:
        while True:
            try:
                return self.inbox.put_nowait(message)
            except queue.Full:
                try:
                    self.inbox.get_nowait()
                    self.discarded += 1
                except queue.Empty:
                    pass

    def _receive_all(self):
        while True:
            header = torch.empty(1, dtype=torch.int64, device=self.device)
            dist.recv(header, src=self.src)
            if int(header) == END:
                self._put(None)
                return
            h = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            y = torch.empty(self.y_shape, dtype=torch.int64, device=self.device)
            dist.recv(h, src=self.src)
            dist.recv(y, src=self.src)
            self.received += 1
            self._put((h, y))

    def poll(self, buffer, *, block: bool) -> None:
        """Move every arrived message into ``buffer``; with ``block``, wait for one first."""
        while not self.ended:
            start = time.perf_counter()
            try:
                message = self.inbox.get(block=block)
            except queue.Empty:
                return
            finally:
                self.links.idle += time.perf_counter() - start if block else 0.0
            block = False
            if message is None:
                self.ended = True
                self.thread.result()
            else:
                buffer.push(*message)


def train_epoch(
    stage: ADGLStage,
    links,
    *,
    batches,
    steps: int,
    batch_size: int,
    in_shape: tuple,
    y_shape: tuple,
    device,
    dtype,
    probe=None,
) -> dict[str, float]:
    """One asynchronous epoch of this rank; returns its counts."""
    rank, world = links.rank, links.world
    down = Downstream(links, device) if rank < world - 1 else None
    up = (
        None
        if rank == 0
        else Upstream(
            links,
            shape=(batch_size, *in_shape),
            y_shape=(batch_size, *y_shape),
            dtype=dtype,
            device=device,
            size=stage.buffer.size,
        )
    )
    done = 0

    def train(x, y):
        nonlocal done
        x, y = stage.input(done, x, y)
        with probe if probe is not None and done == 0 else nullcontext():
            h, _ = stage.forward(done, x, y)
        if down is not None:
            down.offer(done, h, y)
        done += 1

    if up is None:
        for _ in range(steps):
            train(*next(batches))
    else:
        buffer = stage.buffer
        while True:
            up.poll(buffer, block=len(buffer) == 0)
            if up.ended and buffer.unused == 0:
                break
            train(None, None)
    if down is not None:
        down.close()
    counts = {"train_steps": done, "dropped_outputs": down.dropped if down else 0}
    if up is not None:
        counts["received_inputs"] = up.received
        counts["discarded_inputs"] = up.discarded + stage.buffer.pop_discarded()
    return counts
