"""--precision and --compile on the CPU (bench.models.runtime): bf16 autocast inside each
module with fp32 weights, losses and messages; channels-last conv nets; compiled modules,
compiled before the timed epochs. Compilation takes the "aot_eager" backend here (the same
graphs, no code generation); one test with inductor is marked slow. The CUDA paths (TF32,
CUDA graphs, fused optimizers) are in test_gpu.py."""

import copy
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import methods
from bench import prepare
from bench.cli import main
from bench.config import RunConfig
from bench.executors import sequential
from bench.measure.profile import count_flops
from bench.models import runtime

TINY = dict(task="digits", groups=2, limit_train=64, limit_test=32, batch_size=16, device="cpu")
RUN = [
    "--task",
    "digits",
    "--epochs",
    "2",
    "--limit-train",
    "128",
    "--limit-test",
    "64",
    "--batch-size",
    "32",
    "--quiet",
]


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    monkeypatch.setattr(runtime, "BACKEND", "aot_eager")
    monkeypatch.setenv("LCBENCH_COMPILE_BACKEND", "aot_eager")  # for runs in other processes


def prepared(method: str, **settings):
    """A run's stages, built as `lcbench run` builds them, and a training batch."""
    prep = prepare.prepare(RunConfig(method=method, **{**TINY, **settings}))
    x, y = next(prep.task.train_batches(TINY["batch_size"], torch.Generator().manual_seed(0)))
    return prep, x, y


def parameters(stages) -> list[torch.Tensor]:
    return [p for s in stages for m in s.modules() for p in m.parameters()]


def rows_of(out: Path) -> dict[tuple, float]:
    (path,) = out.glob("*/*/metrics.csv")
    with open(path) as f:
        return {
            (int(r["epoch"]), r["stage"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)
        }


def test_bf16_computes_inside_the_modules_and_keeps_weights_losses_and_messages_fp32():
    prep, x, y = prepared("lc", precision="bf16")
    first, last = prep.stages
    inside = []
    for module in (first.group, first.critic):
        conv = next(m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        conv.register_forward_hook(lambda m, a, out: inside.append(out.dtype))
    h, _ = first.forward(0, x, y)
    _, loss = last.forward(0, h, y)
    assert inside == [torch.bfloat16, torch.bfloat16]  # the group's, then the critic's
    assert h.dtype == torch.float32 and loss.dtype == torch.float32  # down, and up (L_2)
    first.receive(0, loss)
    assert all(p.dtype == torch.float32 for p in parameters(prep.stages))
    state = [
        v
        for s in prep.stages
        for o in s.optimizers()
        for st in o.state.values()
        for v in st.values()
        if torch.is_tensor(v) and v.numel() > 1
    ]
    assert state and all(v.dtype == torch.float32 for v in state)
    assert all(math.isfinite(v) for s in prep.stages for v in s.pop_metrics().values())


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_every_rule_trains_in_bf16_compiled(method):
    prep, x, y = prepared(method, precision="bf16", compile=True)
    before = [p.detach().clone() for p in parameters(prep.stages)]
    for batch in range(2):
        sequential.train_step(prep.stages, batch, x, y)
    after = parameters(prep.stages)
    assert all(p.dtype == torch.float32 for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert math.isfinite(prep.stages[-1].pop_metrics()["train_loss"])
    assert all(not s.kept for s in prep.stages)


def test_a_channels_last_conv_net_trains_as_the_contiguous_one():
    prep, x, y = prepared("dgl")
    contiguous = copy.deepcopy(prep.stages)  # a copy runs plain ...
    for stage in contiguous:
        for module in stage.modules():
            module.to(memory_format=torch.contiguous_format)  # ... on default-format weights
    conv = next(m for m in prep.stages[0].group.modules() if isinstance(m, nn.Conv2d))
    seen = []
    conv.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    for batch in range(2):
        sequential.train_step(prep.stages, batch, x, y)
        sequential.train_step(contiguous, batch, x, y)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(parameters(prep.stages), parameters(contiguous), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_pipeline_stage_sends_the_default_format_and_backpropagates_in_its_own():
    """Pipelined BP's stage output leaves in the default memory format (the schedule's sends
    need it), and the gradient that comes back reaches its channels-last group in the
    group's own format; the group's gradients are those of the group unwrapped."""
    from bench.executors.pipeline import Contiguous

    torch.manual_seed(0)
    group = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    group.to(memory_format=torch.channels_last)
    plain = copy.deepcopy(group)
    x = torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 8, 6, 6)  # as a receive hands it over: the default format
    arrived = []
    group[-1].register_full_backward_pre_hook(lambda m, g: arrived.append(g[0]))
    out = Contiguous(group)(x)
    assert out.is_contiguous() and not group(x).is_contiguous()
    out.backward(grad)
    assert arrived[0].is_contiguous(memory_format=torch.channels_last)
    assert not arrived[0].is_contiguous()
    plain(x).backward(grad)
    for a, b in zip(group.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_a_copy_of_a_module_runs_plain_and_counts_the_same_flops():
    prep, x, _ = prepared("bp", precision="bf16")
    group = prep.stages[0].group
    plain = copy.deepcopy(group)
    seen = []
    for module in (group, plain):
        conv = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
        conv.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    assert group(x).dtype == plain(x).dtype == torch.float32
    assert seen == [torch.bfloat16, torch.float32]
    assert count_flops(plain, x) == count_flops(group, x) > 0


def test_warm_up_puts_the_stages_and_the_random_state_back():
    prep, x, y = prepared("dni", compile=True)  # Adam state, the synthesizers' running scale
    sequential.train_step(prep.stages, 0, x, y)  # state worth restoring
    before = copy.deepcopy([s.state_dict() for s in prep.stages])
    rng = torch.get_rng_state()
    assert sequential.warm_up(prep) > 0
    assert torch.equal(torch.get_rng_state(), rng)
    for saved, stage in zip(before, prep.stages):
        now = stage.state_dict()
        torch.testing.assert_close(now["modules"], saved["modules"], rtol=0, atol=0)
        torch.testing.assert_close(
            [o["state"] for o in now["optimizers"]],
            [o["state"] for o in saved["optimizers"]],
            rtol=0,
            atol=0,
        )
        torch.testing.assert_close(now["tallies"], saved["tallies"], rtol=0, atol=0)
        assert not now["kept"] and all(
            p.grad is None for m in stage.modules() for p in m.parameters()
        )


@pytest.mark.parametrize("method", ["bp", "lc"])
def test_a_compiled_run_learns_as_the_eager_one_with_its_compile_time_apart(
    method, tmp_path, capsys, monkeypatch
):
    from torch._dynamo.utils import counters

    compiled_in_epochs = []
    epoch = sequential.train_epoch

    def counted(*args, **kwargs):  # graphs compiled during an epoch (the memory probe's too)
        before = counters["stats"]["unique_graphs"]
        seconds = epoch(*args, **kwargs)
        compiled_in_epochs.append(counters["stats"]["unique_graphs"] - before)
        return seconds

    monkeypatch.setattr(sequential, "train_epoch", counted)
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "run",
                    "--method",
                    method,
                    "--groups",
                    "2",
                    *RUN,
                    *extra,
                    "--save-weights",
                    "--out",
                    str(tmp_path / name),
                ]
            )
        assert exit_info.value.code == 0, capsys.readouterr().err
    eager, compiled = rows_of(tmp_path / "eager"), rows_of(tmp_path / "compiled")
    learning = [
        k
        for k in eager
        if k[2] in ("train_loss", "train_acc", "test_loss", "test_acc", "critic_loss")
    ]
    assert learning and all(
        compiled[k] == pytest.approx(eager[k], rel=1e-5, abs=1e-6) for k in learning
    )
    assert compiled[1, "", "compile_time_s"] > 0
    assert [k for k in compiled if k[2] == "compile_time_s"] == [(1, "", "compile_time_s")]
    assert not [k for k in eager if k[2] == "compile_time_s"]
    assert compiled[1, "", "epoch_time_s"] > 0
    assert compiled_in_epochs == [0, 0, 0, 0]  # eager, then compiled: all in the warm-up
    saved = [
        torch.load(next((tmp_path / name).glob("*/*/weights/stage1.pt")))
        for name in ("eager", "compiled")
    ]
    assert [list(m) for m in saved[0]] == [list(m) for m in saved[1]]  # the same keys
    (info,) = (tmp_path / "compiled").glob("*/*/run.json")
    config = json.loads(info.read_text())["config"]
    assert (config["precision"], config["compile"]) == ("fp32", True)


def test_precision_and_compile_are_in_the_run_key_only_when_set():
    plain = RunConfig(method="bp").validated()
    assert "precision" not in plain.key() and "compile" not in plain.key()  # earlier ids stay
    ids = {
        RunConfig(method="bp", **kw).validated().run_id
        for kw in ({}, {"precision": "bf16"}, {"precision": "tf32"}, {"compile": True})
    }
    assert len(ids) == 4


def test_tf32_only_with_precision_tf32():
    for precision, tf32 in (("tf32", True), ("fp32", False), ("bf16", False)):
        runtime.set_precision(precision)
        assert torch.backends.cuda.matmul.allow_tf32 is tf32
        assert torch.backends.cudnn.allow_tf32 is tf32
    runtime.set_precision("fp32")


@pytest.mark.dist
@pytest.mark.parametrize(
    "args",
    [
        ["--method", "lc", "--groups", "2", "--executor", "distributed"],
        pytest.param(
            ["--method", "pipe-bp", "--groups", "2", "--executor", "distributed"],
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["--method", "bp", "--executor", "ddp", "--workers", "2", "--groups", "1"],
            marks=pytest.mark.slow,
        ),
    ],
)
def test_both_options_on_ranks(args, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            *args,
            *RUN,
            "--epochs",
            "1",
            "--precision",
            "bf16",
            "--compile",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "LCBENCH_COMPILE_BACKEND": "aot_eager"},
    )
    assert result.returncode == 0, result.stderr
    got = rows_of(tmp_path)
    assert got[1, "", "compile_time_s"] > 0 and got[1, "1", "compile_time_s"] > 0
    assert got[1, "", "compile_time_s"] == max(got[1, r, "compile_time_s"] for r in ("1", "2"))
    assert math.isfinite(got[1, "", "train_loss"]) and got[1, "", "test_acc"] > 0


@pytest.mark.slow
def test_inductor_compiles_a_run_that_learns_as_the_eager_one(tmp_path, monkeypatch):
    """The real compiler (C++ code generation on the CPU: about a minute)."""
    monkeypatch.setattr(runtime, "BACKEND", "inductor")
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "run",
                    "--method",
                    "lc",
                    "--groups",
                    "2",
                    *RUN,
                    "--epochs",
                    "1",
                    *extra,
                    "--out",
                    str(tmp_path / name),
                ]
            )
        assert exit_info.value.code == 0
    eager, compiled = rows_of(tmp_path / "eager"), rows_of(tmp_path / "compiled")
    assert compiled[1, "", "compile_time_s"] > 0
    for key in [(1, "", "train_loss"), (1, "", "test_loss"), (1, "1", "critic_loss")]:
        assert compiled[key] == pytest.approx(eager[key], rel=1e-3)
