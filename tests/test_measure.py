"""Memory and time accounting checked against figures computed by hand."""

import csv
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import methods
from bench.executors.sequential import train_step
from bench.measure import memory, timing
from bench.models import build_model
from bench.models.split import resolve_cuts, split_model
from methods.base import TrainOptions

B, D_IN, HIDDEN, CLASSES = 4, 5, 7, 3
FLOAT = 4


def ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def test_tiny_stage_memory_by_hand():
    """Linear(5,7) -> ReLU -> Linear(7,3) trained by DGL (K=2) on float32, batch 4."""
    torch.manual_seed(0)
    groups = [
        nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU()),
        nn.Sequential(nn.Linear(HIDDEN, CLASSES)),
    ]
    stages = methods.build_stages(
        "lc", groups, [(HIDDEN,), (CLASSES,)], CLASSES, ce, TrainOptions(), {"critic_filters": 6}
    )
    probes = [memory.ActivationProbe(s) for s in stages]
    x, y = torch.randn(B, D_IN), torch.randint(0, CLASSES, (B,))
    with memory.probing(probes):
        train_step(stages, 0, x, y)
    group_params = D_IN * HIDDEN + HIDDEN
    critic_params = HIDDEN * 6 + 6 + 6 * CLASSES + CLASSES
    first = memory.static_memory(stages[0])
    assert first["param_bytes"] == FLOAT * (group_params + critic_params)
    assert first["grad_bytes"] == FLOAT * (group_params + critic_params)
    # SGD momentum: one buffer per group parameter; Adam: two moments per critic
    # parameter plus one float32 step counter per critic tensor (4 tensors)
    assert first["optimizer_state_bytes"] == FLOAT * (group_params + 2 * critic_params + 4)
    # group 1 saves its input (for the weight gradient) and the ReLU output
    assert probes[0].group_bytes == FLOAT * B * (D_IN + HIDDEN)
    # the critic: Linear saves its input h (the group's output, counted again here since
    # it is the critic's own saved tensor), ReLU saves its output, the last Linear its input
    assert probes[0].local_bytes == FLOAT * B * (HIDDEN + 6)
    # group 2 (last) on a detached input: Linear saves its input only
    assert probes[1].group_bytes == FLOAT * B * HIDDEN
    assert probes[1].local_bytes == 0


def test_modelled_time_by_hand():
    # 3 stages at 2, 5, 1 s per batch over 10 batches
    totals = [20.0, 50.0, 10.0]
    assert timing.modelled_time(totals, 10, decoupled=True) == pytest.approx(8 + 9 * 5)
    assert timing.modelled_time(totals, 10, decoupled=False) == pytest.approx(10 * 8)


def activation_bytes_per_stage(model, cuts, shape):
    groups = split_model(model, len(cuts) + 1, input_shape=shape, cuts=cuts)
    stages = methods.build_stages("bp", groups, [None] * len(groups), 10, ce, TrainOptions())
    probes = [memory.ActivationProbe(s) for s in stages]
    x, y = torch.randn(2, *shape), torch.randint(0, 10, (2,))
    with memory.probing(probes):
        train_step(stages, 0, x, y)
    return [p.group_bytes for p in probes]


def test_resnet56_stage_activations_add_up_to_the_whole_network():
    shape = (3, 32, 32)
    torch.manual_seed(0)
    model = build_model("resnet56", shape, 10)
    (whole,) = activation_bytes_per_stage(model, [], shape)
    flops_cuts = resolve_cuts(model, 4, input_shape=shape, by="flops")
    parts = activation_bytes_per_stage(model, flops_cuts, shape)
    assert sum(parts) == pytest.approx(whole, rel=0.05)
    balanced = resolve_cuts(model, 4, input_shape=shape, by="activations")
    parts = activation_bytes_per_stage(model, balanced, shape)
    assert sum(parts) == pytest.approx(whole, rel=0.05)
    assert max(parts) <= whole / 3


def test_run_writes_time_and_memory_for_every_stage(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            "--method",
            "dni",
            "--groups",
            "3",
            "--task",
            "digits",
            "--epochs",
            "1",
            "--quiet",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("adhoc/*/metrics.csv")
    rows = list(csv.DictReader(open(path)))
    got = {(r["stage"], r["metric"]): float(r["value"]) for r in rows}
    for k in ("1", "2", "3"):
        for metric in (
            "forward_time_s",
            "backward_time_s",
            "update_time_s",
            "busy_time_s",
            "param_bytes",
            "grad_bytes",
            "optimizer_state_bytes",
            "activation_bytes",
            "peak_mem_bytes",
        ):
            assert got[k, metric] > 0, (k, metric)
        assert got[k, "busy_time_s"] == pytest.approx(
            sum(got[k, f"{p}_time_s"] for p in ("forward", "backward", "update"))
        )
    busy = [got[k, "busy_time_s"] for k in ("1", "2", "3")]
    assert got["", "modelled_time_s"] < sum(busy)  # decoupled: the stages overlap
    assert got["", "modelled_time_s"] >= max(busy)
    assert got["", "peak_rss_bytes"] > 0
    assert got["", "epoch_time_s"] >= sum(busy) * 0.9


FREEZING = """
import gc
from bench import prepare
from bench.config import RunConfig
loaded = [[]]  # held before any run
cfg = RunConfig(method="bp", groups=1, task="digits", model="mlp", epochs=1, out="{out}")
built = prepare.prepare(cfg)
frozen = gc.get_freeze_count()
tracked = gc.get_objects()
cycle = [dict()]
cycle[0]["self"] = cycle  # a cycle a run leaves behind
del cycle
collected = gc.collect()
prepare.prepare(cfg)  # a second run in the same process freezes nothing more
params = [p for stage in built.stages for p in stage.group.parameters()]
print(
    frozen > 50_000,
    any(o is loaded for o in tracked),
    all(any(o is p for o in tracked) for p in params),
    collected > 0,
    gc.get_freeze_count() == frozen,
)
"""


def test_a_run_finds_its_processs_libraries_frozen_and_its_own_objects_collected(tmp_path):
    """Before a run builds anything, the objects its process holds (the libraries: tens of
    thousands, each full collection walked them all, ~150 ms, stalling the ranks that wait)
    are frozen once; the run's own objects (its parameters) stay tracked, a cycle it leaves
    is collected, and a second run in the process freezes nothing more."""
    done = subprocess.run(
        [sys.executable, "-c", FREEZING.format(out=tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False", "True", "True", "True"], done.stdout


FAULTING_STEPS = """
import resource, torch
from bench import prepare
held = prepare.hold_freed_memory()
torch.manual_seed(0)
torch.set_num_threads(1)
net = torch.nn.Sequential(
    torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
    torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
    torch.nn.Flatten(), torch.nn.Linear(32 * 14 * 14, 10),
)
x = torch.randn(128, 16, 14, 14)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        net(x.clone()).sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(held, *faults)
"""


def test_a_held_heap_stops_faulting_pages_once_its_steps_have_grown_it():
    """A fresh process's training steps (batches of ~1.6 MB tensors) fault new pages step
    after step while glibc's thresholds move (here 12,000-20,000 pages every 5 steps); with
    them held, the first steps grow the heap and the later ones fault next to nothing: rounds
    5-12 together under a quarter of round 1's pages."""

    done = subprocess.run([sys.executable, "-c", FAULTING_STEPS], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    held, *counts = done.stdout.split()
    if held == "False":
        pytest.skip("this C library has no mallopt (not glibc)")
    faults = [int(c) for c in counts]
    assert sum(faults[4:]) < faults[0] / 4, faults
