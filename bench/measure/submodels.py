"""What the sub-models of the local rules (LC, DGL, GN-DGL) are worth at inference.

Sub-model k is f_1..f_k followed by the local head of stage k; the final output is the whole
network. Beside each one's accuracy (``evaluate`` in the executors) this module gives:

- costs: forward FLOPs per sample (``torch.utils.flop_counter``) and parameters of every
  group, every local head and every sub-model;
- progressive inference (Lee & Lee): each test sample goes through sub-model 1, 2, ... and
  stops at the first whose largest softmax probability reaches the threshold (the final
  output otherwise); its accuracy and its mean FLOPs per sample, which count every group
  and head evaluated on the way;
- ensembles: the sum of the sub-models' logits (as in the official local-critic code), with
  and without the final output.

Only for one target per sample (classification); a language model has none of these.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from methods.base import match_targets

from .profile import count_flops, dummy_input

THRESHOLDS = (0.5, 0.7, 0.9, 0.95, 0.99)


def head_of(stage) -> nn.Module | None:
    """The module that turns stage k's output into sub-model k's logits, if any."""
    if stage.last:
        return None
    heads = getattr(stage, "heads", None)
    return heads if heads is not None else stage.head()


def costs(stages, input_shape) -> dict[tuple[str, str], float]:
    """``{(stage, metric): value}``: ``group_flops``, ``group_params`` per stage ("1".."K"),
    ``local_flops``, ``local_params`` where the rule has a local module, ``submodel_flops``,
    ``submodel_params`` where that module is a head, and ``model_flops``, ``model_params`` of
    the whole network.
    FLOPs of one forward pass per sample, measured on CPU copies in eval mode."""
    rows = {}
    x = dummy_input(stages[0].group, input_shape, 1, device="cpu")
    flops_so_far = params_so_far = 0.0
    for stage in stages:
        label = str(stage.index + 1)
        group = copy.deepcopy(stage.group).cpu().eval()
        group_flops = count_flops(group, x)
        params = sum(p.numel() for p in group.parameters())
        with torch.no_grad():
            x = group(x)
        flops_so_far += group_flops
        params_so_far += params
        rows[label, "group_flops"], rows[label, "group_params"] = group_flops, params
        locals_ = [copy.deepcopy(m).cpu().eval() for m in stage.modules()[1:]]
        if locals_:  # critic, auxiliary net, neuron-group heads, synthesizer
            local_flops = sum(_local_flops(m, x) for m in locals_)
            local_params = sum(p.numel() for m in locals_ for p in m.parameters())
            rows[label, "local_flops"], rows[label, "local_params"] = local_flops, local_params
            if head_of(stage) is not None:
                rows[label, "submodel_flops"] = flops_so_far + local_flops
                rows[label, "submodel_params"] = params_so_far + local_params
    rows["", "model_flops"], rows["", "model_params"] = flops_so_far, params_so_far
    return rows


def _local_flops(module: nn.Module, h: torch.Tensor) -> float:
    """FLOPs of one forward pass of a local module on features ``h``: a head (or every
    neuron-group head, for GN-DGL), or a synthesizer (cDNI's with a label)."""
    if isinstance(module, nn.ModuleList):
        return sum(count_flops(m, h) for m in module)
    if getattr(module, "label", None) is not None:  # cDNI's synthesizer reads the label too
        return count_flops(module, h, torch.zeros(h.shape[0], dtype=torch.long))
    return count_flops(module, h)


def exit_flops(rows: dict, stages) -> list[float]:
    """Cumulative FLOPs per sample to reach each exit of progressive inference: every group
    and every head evaluated up to it (the final exit after all heads have said no)."""
    out, total = [], 0.0
    for stage in stages:
        label = str(stage.index + 1)
        total += rows[label, "group_flops"] + rows.get((label, "local_flops"), 0.0)
        out.append(total)
    return out


class Inference:
    """Progressive inference and ensembles, accumulated batch by batch over the test set."""

    def __init__(self, flops: list[float], thresholds=THRESHOLDS):
        self.flops = torch.tensor(flops, dtype=torch.float64)
        self.thresholds = thresholds
        self.n = 0
        self.sums: dict[str, float] = {}

    def _add(self, name: str, value: torch.Tensor) -> None:
        """Sums stay on the device until ``rows`` reads them."""
        self.sums[name] = self.sums.get(name, 0.0) + value.double()

    @torch.no_grad()
    def add(self, logits: list[torch.Tensor], y: torch.Tensor) -> None:
        """``logits``: sub-model 1, 2, ... then the final output, for one test batch."""
        logits = [match_targets(z, y).float() for z in logits]
        right = torch.stack([z.argmax(-1) == y for z in logits])  # (exits, n)
        confidence = torch.stack([F.softmax(z, -1).amax(-1) for z in logits])
        self.n += y.numel()
        self.flops = flops = self.flops.to(y.device)
        for t in self.thresholds:
            passes = confidence >= t
            passes[-1] = True  # the final output always answers
            exit_at = passes.to(torch.int8).argmax(0)  # the first exit that answers
            self._add(f"t{t}_acc", right.gather(0, exit_at[None]).sum())
            self._add(f"t{t}_flops", flops[exit_at].sum())
        subs = torch.stack(logits[:-1]).sum(0)
        self._add("ensemble_sub", (subs.argmax(-1) == y).sum())
        self._add("ensemble_all", ((subs + logits[-1]).argmax(-1) == y).sum())

    def rows(self) -> dict[tuple[str, str], float]:
        """The figures of the test batches added since the last call (one evaluation), then
        the tallies start afresh for the next."""
        out = {}
        for t in self.thresholds:
            tag = f"{round(t * 100):02d}"
            out["", f"progressive_acc_t{tag}"] = float(self.sums[f"t{t}_acc"]) / self.n
            out["", f"progressive_flops_t{tag}"] = float(self.sums[f"t{t}_flops"]) / self.n
        out["", "ensemble_submodels_acc"] = float(self.sums["ensemble_sub"]) / self.n
        out["", "ensemble_all_acc"] = float(self.sums["ensemble_all"]) / self.n
        self.n, self.sums = 0, {}
        return out
