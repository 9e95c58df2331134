"""The reference executor: one process; per batch every stage in order, then the upstream
messages of that same batch. Deterministic for a seed."""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence

import torch
from tqdm import tqdm

from methods import Stage


def train_step(stages: Sequence[Stage], batch: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """One batch: forward (and local updates) down the stages, then the messages upstream."""
    up: list[torch.Tensor | None] = [None] * len(stages)
    for stage in stages:
        x, y = stage.input(batch, x, y)
        x, up[stage.index] = stage.forward(batch, x, y)
    for k in range(len(stages) - 1, 0, -1):
        if up[k] is not None:
            reply = stages[k - 1].receive(batch, up[k])
            if reply is not None:
                up[k - 1] = reply


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(stages: Sequence[Stage], batches, *, device: torch.device, total: int | None = None,
                desc: str = "", progress: bool = True,
                first_batch: Callable[[], ContextManager] = nullcontext) -> float:
    """Train on every ``(x, y)`` of ``batches``; return the wall-clock seconds it took.
    ``first_batch()`` is entered around the first batch (e.g. a memory probe)."""
    for stage in stages:
        stage.train(True)
    synchronize(device)
    start = time.perf_counter()
    for batch, (x, y) in enumerate(tqdm(batches, total=total, desc=desc, leave=False, disable=not progress,
                                        unit="batch", dynamic_ncols=True)):
        if batch == 0:
            with first_batch():
                train_step(stages, batch, x, y)
        else:
            train_step(stages, batch, x, y)
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(stages: Sequence[Stage], x: torch.Tensor, y: torch.Tensor,
             criterion: Callable, batch_size: int) -> dict[str, dict[str, float]]:
    """Test loss and accuracy of the final output ("") and of every sub-model ("1".."K-1")."""
    for stage in stages:
        stage.train(False)
    sums: dict[str, torch.Tensor] = {}
    for i in range(0, x.shape[0], batch_size):
        h, target = x[i:i + batch_size], y[i:i + batch_size]
        for stage in stages:
            h = stage.group(h)
            logits = h if stage.last else stage.predict(h)
            if logits is None:
                continue
            label = "" if stage.last else str(stage.index + 1)
            loss = criterion(logits, target).sum()
            correct = (logits.argmax(1) == target).sum()
            total = sums.get(label, torch.zeros(2, dtype=torch.float64, device=x.device))
            sums[label] = total + torch.stack([loss.double(), correct.double()])
    n = x.shape[0]
    return {label: {"test_loss": float(v[0]) / n, "test_acc": float(v[1]) / n}
            for label, v in sums.items()}
