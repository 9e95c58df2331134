"""GN-DGL with each neuron group on a rank of its own: K layer groups x G neuron groups.

Rank k*G + g holds neuron group g of layer group k: a copy of that group's slice of the
width-grouped layer group (``models.slicing.neuron_slice``) and its auxiliary head (the last layer
group: the classifier instead). Per batch it computes its channel slice from the full
input, all-gathers the slices of its layer group's G ranks (torch.distributed collectives
on that layer group's process group), and trains on the full width with the other slices
detached: head g's cross-entropy plus the diversity term over the G heads' predictions
(the others' detached), which gives each rank exactly the gradients of the sequential rule.
The last layer group's classifier sees the gathered features with only its own slice
attached, which gives its slice the exact backprop gradient and every rank the same
classifier update. Rank (k, g) sends the full h_k downstream to rank (k+1, g); the G ranks
of layer group 0 get the batch by broadcast from rank 0.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from bench import prepare
from bench.config import ranks_per_layer
from bench.data import tasks
from bench.models.slicing import neuron_slice
from methods.base import Stage
from methods.gn import GNStage, diversity

from .epochs import stage_label
from .links import Part
from .sequential import Scores


class NeuronGroupStage(Stage):
    """Neuron group ``g`` of a GN-DGL stage; ``gather(t)`` returns the G ranks' tensors.
    Only neuron group 0 tallies the layer group's training figures."""

    def __init__(self, stage: GNStage, g: int, gather):
        self.g, self.neurons, self.gather = g, stage.options.neuron_groups, gather
        self.options = stage.options
        blocks = list(stage.group)
        body = nn.Sequential(*(blocks[:-1] if stage.last else blocks))
        self.slice = neuron_slice(body, g, self.neurons)
        self.top = blocks[-1] if stage.last else stage.heads[g]  # classifier or head g
        network = nn.Sequential(self.slice, self.top) if stage.last else self.slice
        super().__init__(stage.index, stage.count, network, stage.criterion, stage.train_options)
        self.group = self.slice  # what the rank's activation probe meters as the group
        if not stage.last:  # the head steps with the slice: a parameter group of its own
            self.optimizer.add_param_group({"params": list(self.top.parameters())})

    def full_width(self, x: torch.Tensor) -> torch.Tensor:
        """The layer group's output: every rank's slice, this rank's own attached."""
        with self.phase("forward"):
            own = self.slice(x)
        slices = self.gather(own.detach())
        slices[self.g] = own
        return torch.cat(slices, 1)

    def forward(self, batch, x, y):
        h = self.full_width(x)
        if self.last:
            with self.phase("forward"):
                logits = self.top(h)
                per_sample = self.criterion(logits, y)
            self.backward(per_sample.mean())
            self.step(self.optimizer)
            if self.g == 0:
                self.record(logits, y, per_sample)
            return None, None
        with self.phase("forward"):
            logits = self.top(h)
            loss = self.criterion(logits, y)
        every = self.gather(logits.detach())
        every[self.g] = logits
        div = diversity(every, y, self.options.temperature)
        self.backward(loss.mean() + self.options.diversity_weight * div)
        self.step(self.optimizer)
        if self.g == 0:
            with torch.no_grad():
                losses = torch.stack([self.criterion(z, y) for z in every])
                self.record(torch.stack(every).mean(0), y, losses.mean(0))
                self.tally(y.shape[0], diversity=div)
        return h.detach(), None

    @torch.no_grad()
    def predict_full(self, x: torch.Tensor):
        """(h_k at full width, logits of the layer group's sub-model or final output)."""
        h = self.full_width(x)
        if self.last:
            return None, self.top(h)
        return h, torch.stack(self.gather(self.top(h))).mean(0)

    def modules(self):
        return [self.slice, self.top]


def part(prep: prepare.Prepared, links, *, device, dtype, timer, progress: bool):
    """Rank k*G + g trains neuron group g of layer group k (see the module docstring)."""
    cfg, rank = prep.cfg, links.rank
    G = ranks_per_layer(cfg)
    k, g = divmod(rank, G)
    layers = [dist.new_group(list(range(j * G, (j + 1) * G))) for j in range(cfg.groups)]
    mine = layers[k]

    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(G)]
        dist.all_gather(out, t.contiguous(), group=mine)
        return out

    stage = NeuronGroupStage(prep.stages[k], g, gather)
    prepare.place(cfg, [stage], device)
    in_shape = tuple(tasks.TASKS[cfg.task].input_shape) if k == 0 else prep.shapes[k - 1]

    def inputs(n: int, x=None, y=None):
        """This rank's (x, y): broadcast in layer group 0, received from above elsewhere."""
        if k > 0:
            return (
                links.recv((n, *in_shape), dtype, device, rank - G),
                links.recv((n,), torch.int64, device, rank - G),
            )
        if rank != 0:
            x = torch.empty((n, *in_shape), dtype=dtype, device=device)
            y = torch.empty((n,), dtype=torch.int64, device=device)
        for t in (x, y):
            dist.broadcast(t, src=0, group=mine)
        return x, y

    def send(h, y):
        links.send(h, rank + G)
        links.send(y, rank + G)

    def epoch(batches, probe, steps, on_step):
        for t in tqdm(
            range(steps), disable=not progress, leave=False, unit="batch", file=sys.stdout
        ):
            on_step(t)
            x, y = inputs(cfg.batch_size, *(next(batches) if rank == 0 else (None, None)))
            if probe is not None and t == 0:
                with probe:
                    h, _ = stage.forward(t, x, y)
            else:
                h, _ = stage.forward(t, x, y)
            if h is not None:
                send(h, y)
        links.flush()
        return {}

    def evaluate(batches, sizes):
        stage.train(False)
        scores = Scores()
        for n in sizes:
            x, y = inputs(n, *(next(batches) if rank == 0 else (None, None)))
            h, logits = stage.predict_full(x)
            if h is not None:
                send(h, y)
            scores.add(stage_label(stage), logits, y, prepare.classification_loss)
        links.flush()
        return {} if g else scores.rows()

    return Part(stage, f"{k + 1}.{g + 1}", k, epoch, evaluate)
