"""Sub-models at inference: costs, progressive inference and ensembles, checked against
figures computed by hand."""

import pytest
import torch
from torch import nn

import methods
from bench.executors.sequential import evaluate
from bench.measure import submodels
from bench.prepare import classification_loss
from methods.base import TrainOptions


def lc_stages(k=3, seed=0):
    """An MLP in k groups (6 -> 5 -> 4 -> 3 classes) with LC critics of 7 hidden units."""
    torch.manual_seed(seed)
    sizes = [6, 5, 4][:k]
    groups = [nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(sizes, sizes[1:])]
    groups.append(nn.Sequential(nn.Linear(sizes[-1], 3)))
    shapes = [(s,) for s in sizes[1:]] + [(3,)]
    return methods.build_stages(
        "lc", groups, shapes, 3, classification_loss, TrainOptions(), {"critic_filters": 7}
    )


def test_costs_count_each_group_head_and_sub_model_by_hand():
    stages = lc_stages()
    rows = submodels.costs(stages, (6,))
    linear = lambda a, b: 2 * a * b  # noqa: E731 multiply-adds of one sample, 2 FLOPs each
    assert rows["1", "group_flops"] == linear(6, 5) and rows["1", "group_params"] == 6 * 5 + 5
    assert rows["1", "local_flops"] == linear(5, 7) + linear(7, 3)
    assert rows["1", "local_params"] == (5 * 7 + 7) + (7 * 3 + 3)
    assert rows["2", "submodel_flops"] == linear(6, 5) + linear(5, 4) + linear(4, 7) + linear(7, 3)
    assert rows["", "model_flops"] == linear(6, 5) + linear(5, 4) + linear(4, 3)
    assert ("3", "local_flops") not in rows
    assert submodels.exit_flops(rows, stages) == [
        rows["1", "submodel_flops"],
        rows["1", "submodel_flops"] + rows["2", "group_flops"] + rows["2", "local_flops"],
        rows["1", "submodel_flops"]
        + rows["2", "submodel_flops"]
        - rows["1", "group_flops"]
        + rows["3", "group_flops"],
    ]


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_costs_count_the_synthesizer_as_a_local_module_without_a_sub_model(method):
    torch.manual_seed(0)
    groups = [nn.Sequential(nn.Linear(6, 5), nn.ReLU()), nn.Sequential(nn.Linear(5, 3))]
    stages = methods.build_stages(
        method, groups, [(5,), (3,)], 3, classification_loss, TrainOptions(), {"synth_filters": 7}
    )
    rows = submodels.costs(stages, (6,))
    linear = lambda a, b: 2 * a * b  # noqa: E731
    assert rows["1", "local_flops"] == linear(5, 7) + linear(7, 5)  # the label: a lookup
    assert rows["1", "local_params"] == sum(p.numel() for p in stages[0].synth.parameters())
    assert ("1", "submodel_flops") not in rows and ("2", "local_flops") not in rows


def logits_of(predictions, classes=3, confidence=5.0):
    """Logits whose argmax is ``predictions`` with a chosen margin."""
    z = torch.zeros(len(predictions), classes)
    z[torch.arange(len(predictions)), torch.tensor(predictions)] = confidence
    return z


def test_progressive_inference_at_threshold_0_uses_only_the_first_sub_model():
    y = torch.tensor([0, 1, 2, 0])
    exits = [logits_of([0, 0, 0, 0]), logits_of([0, 1, 0, 0]), logits_of([0, 1, 2, 0])]
    inference = submodels.Inference([10.0, 25.0, 45.0], thresholds=(0.0, 1.5))
    inference.add(exits, y)
    rows = inference.rows()
    assert rows["", "progressive_acc_t00"] == 2 / 4  # the first sub-model's accuracy
    assert rows["", "progressive_flops_t00"] == 10.0
    assert rows["", "progressive_acc_t150"] == 1.0  # above 1: only the main model answers
    assert rows["", "progressive_flops_t150"] == 45.0


def test_progressive_inference_stops_at_the_first_confident_sub_model():
    y = torch.tensor([0, 1])
    first = torch.tensor([[9.0, 0, 0], [0.2, 0, 0]])  # sample 0: confident; sample 1: not
    second = torch.tensor([[0, 9.0, 0], [0, 9.0, 0]])
    final = torch.tensor([[9.0, 0, 0], [9.0, 0, 0]])
    inference = submodels.Inference([1.0, 3.0, 6.0], thresholds=(0.9,))
    inference.add([first, second, final], y)
    rows = inference.rows()
    assert rows["", "progressive_acc_t90"] == 1.0  # sample 0 at exit 1, sample 1 at exit 2
    assert rows["", "progressive_flops_t90"] == (1.0 + 3.0) / 2


def test_ensembles_sum_the_logits_with_and_without_the_main_model():
    y = torch.tensor([0, 1])
    a = torch.tensor([[2.0, 0, 0], [0, 0, 3.0]])
    b = torch.tensor([[0, 1.0, 0], [0, 2.0, 0]])
    final = torch.tensor([[0, 5.0, 0], [0, 5.0, 0]])
    inference = submodels.Inference([1.0, 2.0, 3.0], thresholds=())
    inference.add([a, b, final], y)
    rows = inference.rows()
    assert rows["", "ensemble_submodels_acc"] == 0.5  # a + b: sample 0 -> 0 (right), 1 -> 2
    assert rows["", "ensemble_all_acc"] == 0.5  # + final: sample 0 -> 1, sample 1 -> 1


def test_evaluate_reports_sub_models_progressive_inference_and_ensembles():
    stages = lc_stages()
    torch.manual_seed(5)
    x, y = torch.randn(40, 6), torch.randint(3, (40,))
    costs = submodels.costs(stages, (6,))
    inference = submodels.Inference(submodels.exit_flops(costs, stages), thresholds=(0.0, 2.0))
    rows = evaluate(stages, [(x[:25], y[:25]), (x[25:], y[25:])], classification_loss, inference)
    with torch.no_grad():
        h1 = stages[0].group(x)
        h2 = stages[1].group(h1)
        out = [stages[0].critic(h1), stages[1].critic(h2), stages[2].group(h2)]
    acc = [float((z.argmax(1) == y).float().mean()) for z in out]
    assert rows["1", "test_acc"] == pytest.approx(acc[0]) and rows["", "test_acc"] == pytest.approx(
        acc[2]
    )
    assert rows["", "progressive_acc_t00"] == pytest.approx(acc[0])
    assert rows["", "progressive_acc_t200"] == pytest.approx(acc[2])
    ensemble = float(((out[0] + out[1]).argmax(1) == y).float().mean())
    assert rows["", "ensemble_submodels_acc"] == pytest.approx(ensemble)
    loss = float(classification_loss(out[1], y).mean())
    assert rows["2", "test_loss"] == pytest.approx(loss)


def test_lc_on_resnet101_with_the_official_cut_on_cifar10_files(tmp_path, monkeypatch, capsys):
    """`lcbench run --method lc --groups 2 --model resnet101 --task cifar10` on CIFAR-10 files
    the test writes: the official code's cut, sub-model rows, costs of both groups."""
    import csv
    import os

    import torchvision.datasets.cifar

    from bench.cli import main
    from tests.test_tasks import _fake_cifar

    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )
    _fake_cifar(
        tmp_path / "data", 10, {f"data_batch_{i}": 4 for i in range(1, 6)} | {"test_batch": 6}
    )
    with pytest.raises(SystemExit) as done:
        main(
            [
                "run",
                "--method",
                "lc",
                "--groups",
                "2",
                "--model",
                "resnet101",
                "--task",
                "cifar10",
                "--split",
                "paper",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--data-dir",
                str(tmp_path / "data"),
                "--out",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
    assert done.value.code == 0, capsys.readouterr().err
    (path,) = (tmp_path / "out").glob("*/*/metrics.csv")
    with open(path) as f:
        got = {(r["stage"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)}
    assert {
        ("1", "test_acc"),
        ("", "test_acc"),
        ("1", "critic_loss"),
        ("", "ensemble_all_acc"),
        ("1", "submodel_flops"),
        ("2", "group_flops"),
    } <= set(got)
    assert (
        got["1", "group_params"] + got["2", "group_params"] == got["", "model_params"] == 42_505_290
    )
    import json

    info = json.loads((path.parent / "run.json").read_text())
    assert info["split"] == {"by": "paper", "cuts": [18]}
