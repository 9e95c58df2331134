"""Every learning rule on the LSTM tasks: the rule invariants of tests/test_rules.py on LSTM
layer groups (float64), and a few real steps of every method on both RNN tasks."""

import copy
import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import methods
from bench.executors.sequential import train_step
from bench.models import build_model
from bench.models.rnn import reset_states
from bench.models.split import group_output_shapes, split_model
from bench.prepare import classification_loss
from methods.base import TrainOptions
from tests.test_datasets import write_ptb

OPTS = TrainOptions(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
FMNIST = Path("/usr/share/datasets/fashion-mnist")
VOCAB, T, B = 30, 6, 4


pytestmark = pytest.mark.usefixtures("float64")


def lm_groups(k=2, seed=0):
    """The LSTM language model, small, without dropout, cut into k groups."""
    torch.manual_seed(seed)
    model = build_model("lstm-lm", (T,), VOCAB, width=0.02).double()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return split_model(model, k, input_shape=(T,), cuts=[2] if k == 2 else None)


def classifier_groups(seed=0):
    torch.manual_seed(seed)
    model = build_model("lstm", (T, 5), 3, width=0.1).double()
    return split_model(model, 2, input_shape=(T, 5), cuts=[1])


def stages_for(method, groups, input_shape, classes, **options):
    shapes = group_output_shapes(groups, input_shape)
    torch.manual_seed(1)
    return methods.build_stages(method, groups, shapes, classes, classification_loss, OPTS, options)


def lm_batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randint(VOCAB, (B, T), generator=g), torch.randint(VOCAB, (B, T), generator=g)


def seq_batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(B, T, 5, generator=g), torch.randint(3, (B,), generator=g)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("method", ["bp", "pipe-bp"])
def test_bp_on_lstm_groups_equals_unsplit_truncated_bptt(method):
    """Stateful LSTM layers carry their state across windows (and micro-batches) exactly as
    the unsplit model trained with plain autograd does."""
    groups = lm_groups()
    whole = copy.deepcopy(nn.Sequential(*groups))
    options = {"microbatches": 2} if method == "pipe-bp" else {}
    stages = stages_for(method, groups, (T,), VOCAB, **options)
    reference = torch.optim.SGD(
        whole.parameters(),
        lr=OPTS.lr,
        momentum=OPTS.momentum,
        nesterov=True,
        weight_decay=OPTS.weight_decay,
    )
    for module in [whole, *groups]:
        reset_states(module, B)
    for step in range(3):
        x, y = lm_batch(step)
        train_step(stages, step, x, y)
        reference.zero_grad()
        classification_loss(whole(x), y).mean().backward()
        reference.step()
    for a, b in zip(params(nn.Sequential(*groups)), params(whole)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("task", ["lm", "classify"])
@pytest.mark.parametrize("method", ["dgl", "adgl", "lc", "gn"])
def test_local_rules_on_lstms_send_no_gradient_upstream(method, task):
    results = []
    for seed in (0, 5):
        groups = lm_groups() if task == "lm" else classifier_groups()
        torch.manual_seed(seed)
        for p in groups[1].parameters():
            p.data.normal_()
        options = {"neuron_groups": 1} if method == "gn" else {}
        shape, classes = ((T,), VOCAB) if task == "lm" else ((T, 5), 3)
        stages = stages_for(method, groups, shape, classes, **options)
        for stage in stages:
            reset_states(stage.group, B)
        x, y = lm_batch(0) if task == "lm" else seq_batch(0)
        train_step(stages, 0, x, y)
        results.append(params(groups[0]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_dni_target_on_lstm_features_is_the_true_gradient_at_the_last_boundary(method):
    groups = lm_groups()
    stages = stages_for(method, groups, (T,), VOCAB)
    for stage in stages:
        reset_states(stage.group, B)
    last = copy.deepcopy(groups[1])
    reset_states(last, B)
    x, y = lm_batch(0)
    with torch.no_grad():
        h = copy.deepcopy(groups[0])(x)
    h = h.detach().requires_grad_()
    (expected,) = torch.autograd.grad(classification_loss(last(h), y).sum(), h)
    received = {}
    original = stages[0].receive
    stages[0].receive = lambda b, m: (received.setdefault(b, m.clone()), original(b, m))[1]
    train_step(stages, 0, x, y)
    torch.testing.assert_close(received[0], expected)


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_synthesizer_on_sequences_is_per_step_and_sees_labels_in_cdni(method):
    stage = stages_for(method, lm_groups(), (T,), VOCAB)[0]
    torch.manual_seed(3)
    for p in stage.synth.parameters():
        p.data.normal_(0, 0.3)
    h = torch.randn(B, T, stage.synth.first.in_features)
    y1, y2 = torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.long)
    a, b = stage.synth.gradient(h, y1), stage.synth.gradient(h, y2)
    assert a.shape == h.shape
    assert torch.equal(a, b) == (method == "dni")
    torch.testing.assert_close(stage.synth.gradient(h[:, :2], y1[:, :2]), a[:, :2])  # step by step


ALL = ["bp", "pipe-bp", "dgl", "adgl", "lc", "dni", "cdni", "gn", "frozen"]
#: in make test: a rule of each kind (the others in make test-all, to keep it under 10 min)
EACH_KIND = ("bp", "pipe-bp", "lc", "dni", "gn")
EVERY = [m if m in EACH_KIND else pytest.param(m, marks=pytest.mark.slow) for m in ALL]


def run(tmp_path, *args):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            *args,
            "--epochs",
            "1",
            "--quiet",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (path,) = (tmp_path / "out").glob("*/*/metrics.csv")
    with open(path) as f:
        return {(r["stage"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)}


@pytest.mark.parametrize("method", EVERY)
def test_every_method_trains_the_lstm_language_model_on_ptb_files(method, tmp_path):
    write_ptb(tmp_path / "data" / "ptb", repeat=60)
    options = ["-o", "microbatches=2"] if method == "pipe-bp" else []
    got = run(
        tmp_path,
        "--method",
        method,
        "--task",
        "ptb",
        "--data-dir",
        str(tmp_path / "data"),
        "--batch-size",
        "2",
        "--width",
        "0.05",
        *options,
    )
    assert math.isfinite(got["", "train_loss"]) and got["", "test_ppl"] > 1
    assert got["", "test_ppl"] == pytest.approx(math.exp(got["", "test_loss"]))


@pytest.mark.parametrize("method", ["lc"])
def test_a_test_split_smaller_than_one_batch_trains_without_the_probe(method, tmp_path):
    """The diagnostics' probe takes one test batch of the training size: where there is
    none, the run goes without it (it used to end in a bare StopIteration)."""
    write_ptb(tmp_path / "data" / "ptb", repeat=60)
    test = tmp_path / "data" / "ptb" / "ptb.test.txt"
    test.write_text(" a cat sat on a dog \n")  # 7 words: not one window of 20 streams
    got = run(
        tmp_path,
        "--method",
        method,
        "--task",
        "ptb",
        "--data-dir",
        str(tmp_path / "data"),
        "--batch-size",
        "20",
        "--width",
        "0.05",
    )
    assert math.isfinite(got["", "train_loss"])
    assert not any(metric in ("update_cosine", "feature_drift") for _, metric in got)


@pytest.mark.skipif(not FMNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("method", EVERY)
def test_every_method_trains_on_sequential_fashion_mnist(method, tmp_path):
    got = run(
        tmp_path,
        "--method",
        method,
        "--task",
        "seq-fashion-mnist",
        "--limit-train",
        "512",
        "--limit-test",
        "256",
        "--batch-size",
        "64",
        "--lr",
        "0.1",
    )
    assert math.isfinite(got["", "train_loss"]) and 0 <= got["", "test_acc"] <= 1
    if methods.resolve(method).has_submodels:
        assert ("1", "test_acc") in got and ("", "ensemble_all_acc") in got
