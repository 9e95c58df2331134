"""InfoPro checked against what is computed here by hand: the local loss of each group
(lambda_1 x the decoder's BCE against the image in [0, 1], plus lambda_2 x the head's loss),
lambda interpolated across the local modules as the official code does, the supervised
contrastive loss written as a loop, and the cpu preset's spec."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import methods
from bench import sweep
from bench.executors.sequential import train_step
from methods.base import TrainOptions
from methods.infopro import supervised_contrast

pytestmark = pytest.mark.usefixtures("float64")

IMAGE, CLASSES, BATCH = (3, 8, 8), 4, 6
OPTS = TrainOptions(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def groups(k: int) -> list[nn.Module]:
    torch.manual_seed(0)
    body = [
        nn.Sequential(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.Tanh())
        for i in range(k - 1)
    ]
    return [*body, nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, CLASSES))]


def stages_for(parts, **options):
    shapes = [(8, 8, 8)] * (len(parts) - 1) + [(CLASSES,)]
    torch.manual_seed(1)
    ce = lambda logits, y: F.cross_entropy(logits, y, reduction="none")  # noqa: E731
    return methods.build_stages(
        "infopro", parts, shapes, CLASSES, ce, OPTS, options, image_shape=IMAGE
    )


def data():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, *IMAGE, generator=g)
    return x, torch.tensor([0, 1, 0, 2, 3, 1])


def in_unit_range(x):
    """Each channel mapped to [0, 1] over the batch, written out channel by channel."""
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        low, high = x[:, c].min(), x[:, c].max()
        out[:, c] = (x[:, c] - low) / (high - low)
    return out


def sgd_first_step(p, grad):
    d = grad + OPTS.weight_decay * p
    return p - OPTS.lr * (d + OPTS.momentum * d)


@pytest.mark.parametrize("k", [2, 3])
def test_each_groups_update_is_its_weighted_local_loss(k):
    """Module i of K-1 weighs the reconstruction and the head's cross-entropy by the pairs
    interpolated at i / (K-2) (K = 2: the first pair); one SGD step over the group, its
    decoder and its head."""
    first, last = (5.0, 0.5), (1.0, 2.0)
    parts = groups(k)
    options = dict(
        lambda1_first=first[0],
        lambda2_first=first[1],
        lambda1_last=last[0],
        lambda2_last=last[1],
        aux_loss="cross_entropy",
    )
    stages = stages_for(parts, **options)
    x, y = data()
    expected, h = [], x
    for i, stage in enumerate(stages[:-1]):
        ratio = i / (k - 2) if k > 2 else 0.0
        l1 = first[0] * (1 - ratio) + last[0] * ratio
        l2 = first[1] * (1 - ratio) + last[1] * ratio
        f, decoder, aux = (copy.deepcopy(m) for m in (parts[i], stage.decoder, stage.aux))
        out = f(h)
        loss = l1 * F.binary_cross_entropy(decoder(out), in_unit_range(x))
        loss = loss + l2 * F.cross_entropy(aux(out), y)
        modules = (f, decoder, aux)
        every = [p for m in modules for p in m.parameters()]
        grads = torch.autograd.grad(loss, every)
        expected.append([sgd_first_step(p.detach(), g) for p, g in zip(every, grads)])
        h = out.detach()
    train_step(stages, 0, x, y)
    for i, stage in enumerate(stages[:-1]):
        got = [p.detach() for m in (parts[i], stage.decoder, stage.aux) for p in m.parameters()]
        for a, b in zip(got, expected[i], strict=True):
            torch.testing.assert_close(a, b)


def test_supervised_contrast_is_the_loop_over_anchors_and_positives():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(7, 5, generator=g)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # class 2 and 3 have no partner
    t = 0.07
    u = z / z.norm(dim=1, keepdim=True)
    terms = []
    for i in range(len(y)):
        positives = [j for j in range(len(y)) if j != i and y[j] == y[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(u[i] @ u[k]) / t) for k in range(len(y)) if k != i)
        terms.append(
            -sum(float(u[i] @ u[j]) / t - math.log(denominator) for j in positives) / len(positives)
        )
    assert float(supervised_contrast(z, y, t)) == pytest.approx(sum(terms) / len(terms))


def test_the_contrast_head_outputs_features_and_the_last_group_trains_on_the_true_loss():
    parts = groups(2)
    stages = stages_for(parts)
    assert stages[0].aux[-1].out_features == 128 and stages[0].head() is None
    assert stages[1].decoder is None and stages[1].aux is None
    x, y = data()
    last = copy.deepcopy(parts[1])
    h = parts[0](x).detach()
    grads = torch.autograd.grad(F.cross_entropy(last(h), y), list(last.parameters()))
    expected = [sgd_first_step(p.detach(), g) for p, g in zip(last.parameters(), grads)]
    train_step(stages, 0, x, y)
    for a, b in zip((p.detach() for p in parts[1].parameters()), expected, strict=True):
        torch.testing.assert_close(a, b)


def test_the_specs_paper_cuts_and_lambdas_and_its_cpu_preset():
    """The paper grid cuts ResNet-32 and ResNet-110 where configs.py's InfoPro table ends
    each local module (stage s, block b: lcbench's block 1 + (s-1) n + b, cut after it)."""
    paper = {
        (c.model, c.groups): c
        for c in sweep.load_spec("bench/experiments/infopro.toml")
        if c.method == "infopro"
    }
    n = {"resnet32": 5, "resnet110": 18}
    ends = {
        ("resnet32", 4): [(1, 2), (2, 1), (3, 0)],
        ("resnet110", 8): [(1, 4), (1, 11), (2, 0), (2, 7), (2, 14), (3, 3), (3, 10)],
    }
    for (model, k), points in ends.items():
        assert paper[model, k].cuts == [2 + (s - 1) * n[model] + b for s, b in points]
    assert sorted(k for m, k in paper if m == "resnet110") == [2, 4, 8, 16]
    assert paper["resnet32", 16].options["lambda2_first"] == 0.05
    protocol = {
        (c.epochs, c.batch_size, c.lr, c.lr_schedule, c.lr_warmup, c.lr_warmup_start)
        for c in paper.values()
    }
    assert protocol == {(160, 1024, 0.8, "cosine", 10, 0.01)}  # train.py's with --cos_lr
    cpu = sweep.load_spec("bench/experiments/infopro.toml", "cpu")
    assert {c.method for c in cpu} == {"bp", "dgl", "infopro", "frozen"}
    assert all(c.task == "fashion-mnist" and c.epochs == 3 for c in cpu)


@pytest.mark.dist
def test_on_ranks_the_image_travels_down_to_every_stage_that_reconstructs_it(tmp_path):
    """K = 3 on 3 ranks: the second stage, on rank 1, reconstructs the image that only rank 0
    loads, so the image travels down beside the labels; the run learns."""
    import csv
    import subprocess
    import sys

    args = ["--method", "infopro", "--groups", "3", "--task", "digits", "--epochs", "2"]
    args += ["--limit-train", "512", "--limit-test", "256"]
    args += ["--executor", "distributed", "--batch-size", "64", "--out", str(tmp_path), "-q"]
    args += ["-o", "lambda1_last=1", "-o", "lambda2_last=0.5"]  # the second module's weights
    result = subprocess.run(
        [sys.executable, "-m", "bench", "run", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("*/*/metrics.csv")
    with open(path) as f:
        rows = {(r["stage"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)}
    assert all(math.isfinite(rows[s, "local_loss"]) and rows[s, "local_loss"] > 0 for s in "12")
    assert rows["", "test_acc"] > 0.3  # 10 classes
