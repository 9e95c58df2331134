"""The one epoch loop (``bench.executors.epochs``): its order and its rules (compilation in
the first epoch a process trains, memory and costs in epoch 1, checkpoints when due, a stop
on divergence), and every executor running its epochs through it."""

import csv
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bench import prepare, runner
from bench.config import RunConfig
from bench.executors import ddp, distributed, epochs
from bench.measure import memory
from bench.records import RunFailed


class Stub:
    """A stage as the loop sees it: a module, no optimizer, a training loss per epoch."""

    index, last, in_flight = 0, True, 1

    def __init__(self, losses):
        self.group, self.losses = nn.Linear(2, 2), iter(losses)

    def modules(self):
        return [self.group]

    def optimizers(self):
        return []

    def pop_metrics(self):
        return {"train_loss": next(self.losses)}


class Record:
    def __init__(self):
        self.epochs, self.info = {}, {}

    def add(self, epoch, rows):
        self.epochs[epoch] = rows

    def update(self, **fields):
        self.info.update(fields)


def stub_process(calls: list, losses, *, compiled=None, meets=True) -> epochs.Process:
    """A process of one ``Stub`` whose hooks note their calls in ``calls``."""
    stage = Stub(losses)

    def train(epoch, first, steps, probes):
        calls.append(("train", epoch, first, steps, probes))
        return {("", "epoch_time_s"): 1.0}

    def meet(steps, rows, learned):
        calls.append(("meet", set(learned)))
        return rows if meets else None

    return epochs.Process(
        stages=[stage],
        labels=["1"],
        label="",
        probes=[memory.ActivationProbe(stage)],
        device=torch.device("cpu"),
        batch_rows=4,
        eval_rows=8,
        costs={("", "model_params"): 6},
        compiled=compiled,
        train=train,
        evaluate=lambda: calls.append(("evaluate",)) or {("", "test_acc"): 0.5},
        meet=meet,
        save=lambda epoch: calls.append(("save", epoch)),
        diagnose=lambda: calls.append(("diagnose",)) or {},
    )


def test_an_epoch_trains_tallies_evaluates_meets_and_checkpoints_in_that_order():
    calls, record = [], Record()
    process = stub_process(calls, [2.0, 1.5], compiled=3.0)
    epochs.run(process, record, plan=[5, 4], done=0, every=1)
    assert calls == [
        ("train", 1, 0, 5, process.probes),  # the probes around epoch 1's first batch
        ("evaluate",),
        ("diagnose",),
        ("meet", {("", "train_loss")}),
        ("save", 1),
        ("train", 2, 5, 4, []),
        ("evaluate",),
        ("diagnose",),
        ("meet", {("", "train_loss")}),
        ("save", 2),
    ]
    first, second = record.epochs[1], record.epochs[2]
    assert first["", "train_loss"] == 2.0 and second["", "train_loss"] == 1.5
    assert first["", "compile_time_s"] == 3.0 and ("", "compile_time_s") not in second
    for key in [("1", "param_bytes"), ("1", "peak_mem_bytes"), ("", "model_params")]:
        assert key in first and key not in second  # memory and costs: epoch 1's
    for rows in (first, second):
        assert rows["", "test_acc"] == 0.5 and rows["", "peak_rss_bytes"] > 0


def test_a_resumed_process_times_its_compilation_in_the_first_epoch_it_trains():
    calls, record = [], Record()
    process = stub_process(calls, [2.0, 1.8, 1.6], compiled=3.0)
    epochs.run(process, record, plan=[3, 3, 3, 2], done=1, every=2)
    assert [c[1:] for c in calls if c[0] == "train"] == [
        (2, 3, 3, []),
        (3, 6, 3, []),
        (4, 9, 2, []),
    ]
    assert [c[1] for c in calls if c[0] == "save"] == [2, 4]
    assert sorted(record.epochs) == [2, 3, 4]
    assert [("", "compile_time_s") in record.epochs[e] for e in (2, 3, 4)] == [True, False, False]
    assert not any(("1", "param_bytes") in rows for rows in record.epochs.values())


def test_a_rank_whose_rows_meet_elsewhere_records_nothing_and_still_checkpoints():
    calls, record = [], Record()
    epochs.run(stub_process(calls, [2.0, 1.5], meets=False), record, plan=[1, 1], done=0, every=1)
    assert record.epochs == {} and [c[1] for c in calls if c[0] == "save"] == [1, 2]


def test_a_non_finite_training_loss_stops_the_run_before_its_checkpoint():
    calls, record = [], Record()
    with pytest.raises(RunFailed, match="diverged at epoch 2"):
        epochs.run(
            stub_process(calls, [2.0, math.nan, 1.0]), record, plan=[1, 1, 1], done=0, every=1
        )
    assert sorted(record.epochs) == [1, 2] and record.info["status"] == "diverged"
    assert [c[1] for c in calls if c[0] == "save"] == [1]


@pytest.fixture
def one_rank():
    """A process group of this process alone (gloo), where a rank's body runs in-process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def one_process(executor: str, out) -> dict:
    """Epoch 1 of BP on the whole net in one process of ``executor``: (stage, metric) -> value."""
    cfg = RunConfig(method="bp", executor=executor, groups=1, task="digits", model="mlp",
                    epochs=1, batch_size=64, limit_train=128, limit_test=64, device="cpu",
                    out=str(out), workers=1 if executor == "ddp" else None)  # fmt: skip
    if executor == "sequential":
        runner.execute(prepare.prepare(cfg), progress=False)
    else:
        body = {"distributed": distributed.worker, "ddp": ddp.worker}[executor]
        body(cfg, None, progress=False)
    (path,) = out.glob("*/*/metrics.csv")
    with open(path) as f:
        return {(r["stage"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)}


def test_every_executor_runs_its_epochs_through_the_one_loop(one_rank, tmp_path, monkeypatch):
    """One process of BP on each executor: each goes through ``epochs.run`` once and writes
    the same learning figures and the rows every executor writes."""
    looped, loop = [], epochs.run

    def run(process, record, **kw):
        looped.append(process.label)
        return loop(process, record, **kw)

    monkeypatch.setattr(epochs, "run", run)
    got = {
        name: one_process(name, tmp_path / name) for name in ("sequential", "distributed", "ddp")
    }
    assert looped == ["", "1", "1"]  # the whole run's process; rank 1 of each group
    for metric in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert got["distributed"]["", metric] == pytest.approx(got["sequential"]["", metric])
        assert got["ddp"]["", metric] == pytest.approx(got["sequential"]["", metric])
    everywhere = {("", m) for m in ("epoch_time_s", "samples_per_s", "model_params")} | {
        ("1", m) for m in ("forward_time_s", "busy_time_s", "param_bytes", "peak_mem_bytes")
    }
    for rows in got.values():
        assert everywhere <= rows.keys()
    # the process's own figures: the whole run's in one process, a rank's on ranks
    assert ("", "peak_rss_bytes") in got["sequential"]
    assert all(("1", "peak_rss_bytes") in got[name] for name in ("distributed", "ddp"))
