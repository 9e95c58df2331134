"""How good each stage's local signal is, on a fixed probe batch, off the clock.

- DNI / cDNI: the synthetic gradient M_k(h_k) against the true gradient dL/dh_k of the whole
  network's mean loss at that point: their cosine (``synth_cosine``), the relative error
  ||M - g|| / ||g|| (``synth_rel_error``) and the norm ratio ||M|| / ||g|| (``synth_norm_ratio``);
- LC: the per-sample Pearson correlation between critic k's loss and the true loss
  (``critic_corr``);
- every rule that steps a group on a local signal (LC, DGL, DNI, cDNI): the group's own
  parameter update under that signal against its update under backprop, the cosine of the two
  parameter gradients (``update_cosine``) and their norm ratio (``update_norm_ratio``). Summed
  over a batch, a signal's errors may cancel (a label-blind synthesizer: low ``synth_cosine``,
  a useful step) or add up (errors shared by the samples: high ``synth_cosine``, a useless
  step); the update is what the group is actually stepped along.

The probe changes nothing: modules keep their mode, BatchNorm statistics and the random
number generators are restored, and no parameter gradient is left behind.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.nn import functional as F

from bench.models import runtime


def wanted(stages) -> bool:
    """Whether any stage has a local signal to check."""
    return any(s.predicts is not None or s.head() is not None for s in stages if not s.last)


@contextmanager
def untouched(stages, device: torch.device):
    """Train mode for the probe; buffers, modes and RNG states as they were afterwards."""
    modules = [m for s in stages for m in s.modules()]
    modes = [(m, m.training) for top in modules for m in top.modules()]
    buffers = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for stage in stages:
            stage.train(True)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m, mode in modes:
                m.training = mode


#: samples of the probe batch on which ``feature_drift`` is measured (their features at the
#: start are kept, in checkpoints too)
DRIFT_SAMPLES = 32


def group_outputs(stages, x: torch.Tensor) -> list[torch.Tensor]:
    """h_1..h_{K-1} of ``x``: train mode, dropout drawn from a fixed seed, nothing changed."""
    runtime.step_begin()
    with untouched(stages, x.device), torch.no_grad(), torch.compiler.set_stance("force_eager"):
        torch.manual_seed(0)
        hs, h = [], x
        for stage in stages[:-1]:
            h = stage.group(h)
            hs.append(h.detach().clone())
    return hs


def movement_rows(stages, x: torch.Tensor, start: list[torch.Tensor]) -> dict:
    """``{(stage, metric): value}``: every group's ``weight_norm`` and, against its outputs
    ``start`` (``group_outputs`` when training began), its ``feature_drift`` on ``x``."""
    rows = {
        (str(s.index + 1), "weight_norm"): float(
            sum(p.detach().double().pow(2).sum() for p in s.group.parameters()) ** 0.5
        )
        for s in stages
    }
    for stage, now, then in zip(stages, group_outputs(stages, x), start):
        then = then.double()
        rows[str(stage.index + 1), "feature_drift"] = float(
            (now.double() - then).norm() / then.norm().clamp_min(1e-30)
        )
    return rows


def agreement(estimate: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, float]:
    """The cosine, relative error ||e - t|| / ||t|| and norm ratio ||e|| / ||t|| of an estimate
    against the truth, both flattened, in float64."""
    e, t = estimate.flatten().double(), truth.flatten().double()
    norm = t.norm().clamp_min(1e-30)
    return (
        float(F.cosine_similarity(e, t, dim=0, eps=1e-30)),
        float((e - t).norm() / norm),
        float(e.norm() / norm),
    )


def probe_rows(stages, x: torch.Tensor, y: torch.Tensor, criterion) -> dict:
    """``{(stage, metric): value}`` of every stage's local signal on the batch ``(x, y)``."""
    device = x.device
    rows = {}
    runtime.step_begin()  # a batch of its own for compiled modules
    # eager: the probe takes two gradients from one pass, which a compiled backward refuses
    with untouched(stages, device), torch.compiler.set_stance("force_eager"):
        hs, h = [], x
        for stage in stages:
            h = stage.group(h)
            if not stage.last:
                hs.append(h)
        per_sample = criterion(h, y)
        grads = torch.autograd.grad(per_sample.mean(), hs, retain_graph=True)
        for stage, h, g in zip(stages, hs, grads):
            label = str(stage.index + 1)
            local = stage.local_gradient(h.detach(), y)
            if local is not None:
                params = [p for p in stage.group.parameters() if p.requires_grad]
                true = torch.autograd.grad(h, params, g, retain_graph=True, materialize_grads=True)
                mine = torch.autograd.grad(
                    h, params, local, retain_graph=True, materialize_grads=True
                )
                cos, _, ratio = agreement(
                    *(torch.cat([t.flatten() for t in ts]) for ts in (mine, true))
                )
                rows[label, "update_cosine"], rows[label, "update_norm_ratio"] = cos, ratio
            if stage.predicts == "gradient":  # e.g. DNI's synthetic gradient
                (
                    rows[label, "synth_cosine"],
                    rows[label, "synth_rel_error"],
                    rows[label, "synth_norm_ratio"],
                ) = agreement(local, g)
            elif stage.predicts == "loss":  # e.g. LC's critic
                pair = torch.stack([stage.predicted_loss(h.detach(), y), per_sample.detach()])
                rows[label, "critic_corr"] = float(torch.corrcoef(pair.double())[0, 1])
    return rows
