"""The pipelined-BP baseline on torch.distributed.pipelining: one rank per layer group,
each batch cut into M micro-batches and run by a GPipe or 1F1B schedule. Exact backprop:
every group steps once per batch on the gradient of the batch's mean loss.

Rank 0 feeds the batches and sends the labels to the last rank, which computes the loss.
Busy time per phase comes from hooks on the group: forward from its forward hooks,
backward from the gradient of its output arriving to the last gradient of its parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from bench.models import runtime
from methods.pipebp import PipeBPStage

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class Contiguous(nn.Module):
    """A group whose output is in the default memory format (a channels-last conv net's
    is not), as the schedule's point-to-point sends need it; its gradient comes back to the
    group in the group's own (``runtime.Reformat``)."""

    def __init__(self, group: nn.Module):
        super().__init__()
        self.group = group

    def forward(self, x):
        return runtime.Reformat.apply(self.group(x), torch.contiguous_format)


def time_phases(stage: PipeBPStage, timer) -> list:
    """Hooks that charge the group's forward and backward passes to ``timer``; returns
    their handles."""
    module = stage.group
    forward, backward = [], []
    params = tuple(p for p in module.parameters() if p.requires_grad)

    def end_backward(_grads):
        if backward:
            timer.stop(backward.pop())

    return [
        module.register_forward_pre_hook(lambda m, a: forward.append(timer.start("forward"))),
        module.register_forward_hook(lambda m, a, o: timer.stop(forward.pop())),
        module.register_full_backward_pre_hook(
            lambda m, g: backward.append(timer.start("backward"))
        ),
        torch.autograd.graph.register_multi_grad_hook(params, end_backward),
    ]


class Pipeline:
    """One rank's part of the pipeline schedule."""

    def __init__(self, stage: PipeBPStage, links, *, device: torch.device, y_shape: tuple):
        self.stage, self.links = stage, links
        self.rank, self.world = links.rank, links.world
        self.y_shape = y_shape  # of a batch's labels
        pipe_stage = PipelineStage(Contiguous(stage.group), self.rank, self.world, device)
        self.schedule = SCHEDULES[stage.schedule](
            pipe_stage,
            n_microbatches=stage.microbatches,
            loss_fn=lambda out, y: stage.criterion(out, y).mean(),
        )
        self.device = device

    def step(self, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
        """One batch through the pipeline, then this rank's update."""
        stage, last = self.stage, self.rank == self.world - 1
        if self.world > 1 and self.rank == 0:
            self.links.send(y, self.world - 1)
        elif self.world > 1 and last:
            y = self.links.recv(self.y_shape, torch.int64, self.device, 0)
        if self.rank == 0:
            out = self.schedule.step(x, target=y if last else None)
        else:
            out = self.schedule.step(target=y if last else None)
        stage.step(stage.optimizer)
        if last:
            with torch.no_grad():
                stage.record(out, y, stage.criterion(out, y))
