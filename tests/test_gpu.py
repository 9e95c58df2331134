"""The CUDA paths: data held on the GPU, CUDA-event phase times, per-device memory figures
(allocator peaks and NVML). Run where a GPU is: `pytest -m gpu`."""

import csv
import math
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def run(tmp_path, *args):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            "--task",
            "synthetic",
            "--epochs",
            "2",
            "--limit-train",
            "2048",
            "--limit-test",
            "512",
            "--device",
            "cuda",
            "--quiet",
            "--out",
            str(tmp_path),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("*/*/metrics.csv")
    with open(path) as f:
        return {
            (int(r["epoch"]), r["stage"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)
        }


@pytest.mark.parametrize("method", ["bp", "lc", "dni", "pipe-bp", "gn"])
def test_cuda_run_reports_device_memory_and_event_times(method, tmp_path):
    got = run(tmp_path, "--method", method, "--groups", "2")
    for phase in ("train", "eval"):
        allocated = got[2, "", f"{phase}_cuda_max_allocated_bytes"]
        reserved = got[2, "", f"{phase}_cuda_max_reserved_bytes"]
        assert 0 < allocated <= reserved
        assert got[2, "", f"{phase}_nvml_used_bytes"] >= reserved
    # the training peak holds at least the parameters, gradients and optimizer state
    static = sum(
        got[1, k, m]
        for k in ("1", "2")
        for m in ("param_bytes", "grad_bytes", "optimizer_state_bytes")
    )
    assert got[2, "", "train_cuda_max_allocated_bytes"] >= static
    busy = [got[2, k, "busy_time_s"] for k in ("1", "2")]
    assert all(b > 0 for b in busy)
    assert sum(busy) <= got[2, "", "epoch_time_s"] * 1.05  # events inside the timed epoch
    assert ("", "peak_rss_bytes") not in {(s, m) for _, s, m in got}


def test_distributed_on_one_gpu_with_two_ranks_is_a_usage_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            "--method",
            "lc",
            "--task",
            "synthetic",
            "--executor",
            "distributed",
            "--device",
            "cuda",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has a GPU per rank")
    assert result.returncode == 2 and "GPU of its own" in result.stderr
    assert not any(tmp_path.iterdir())


def test_ddp_runs_on_nccl_with_a_gpu_per_rank(tmp_path):
    """As many ranks as GPUs (at least one): NCCL, the per-rank CUDA memory figures."""
    workers = torch.cuda.device_count()
    got = run(
        tmp_path,
        "--method",
        "bp",
        "--executor",
        "ddp",
        "--workers",
        str(workers),
        "--batch-size",
        str(64 * workers),
    )
    for rank in range(1, workers + 1):
        assert (
            got[2, str(rank), "train_cuda_max_allocated_bytes"] >= got[1, str(rank), "param_bytes"]
        )
        assert got[2, str(rank), "busy_time_s"] > 0
        assert got[2, str(rank), "eval_cuda_max_allocated_bytes"] > 0  # per rank (docs/records.md)
    assert 0 <= got[2, "", "test_acc"] <= 1 and got[2, "", "epoch_time_s"] > 0


DIGITS = ["--task", "digits", "--groups", "2", "--batch-size", "128"]


@pytest.mark.parametrize("method", ["bp", "pipe-bp", "dgl", "adgl", "lc", "dni", "gn"])
def test_every_rule_runs_in_bf16_compiled_on_cuda(method, tmp_path):
    """CUDA graphs where the rule allows them (all but asynchronous DGL); compile time apart."""
    got = run(tmp_path, "--method", method, *DIGITS, "--precision", "bf16", "--compile")
    assert got[1, "", "compile_time_s"] > 0 and (2, "", "compile_time_s") not in got
    assert math.isfinite(got[2, "", "train_loss"]) and got[2, "", "test_acc"] > 0.15
    assert got[2, "", "epoch_time_s"] > 0 and got[2, "1", "busy_time_s"] > 0


@pytest.mark.parametrize("method", ["bp", "lc"])
def test_compiled_with_cuda_graphs_learns_as_eager_on_cuda(method, tmp_path):
    eager = run(tmp_path / "eager", "--method", method, *DIGITS)
    compiled = run(tmp_path / "compiled", "--method", method, *DIGITS, "--compile")
    assert compiled[2, "", "train_loss"] == pytest.approx(eager[2, "", "train_loss"], rel=0.05)
    assert compiled[2, "", "test_acc"] == pytest.approx(eager[2, "", "test_acc"], abs=0.05)


def test_fused_optimizers_tf32_flags_and_phase_events_without_device_queries(monkeypatch):
    from bench import prepare
    from bench.config import RunConfig
    from bench.executors import sequential
    from bench.measure import timing

    prep = prepare.prepare(
        RunConfig(
            method="lc",
            task="digits",
            groups=2,
            device="cuda",
            precision="tf32",
            limit_train=512,
            limit_test=128,
        )
    )
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert all(g["fused"] for s in prep.stages for o in s.optimizers() for g in o.param_groups)
    timers = [timing.PhaseTimer(prep.device) for _ in prep.stages]
    for stage, timer in zip(prep.stages, timers):
        stage.phase = timer
    streams = []
    record = torch.cuda.Event.record
    monkeypatch.setattr(
        torch.cuda.Event,
        "record",
        lambda self, stream=None: streams.append(stream) or record(self, stream),
    )
    x, y = next(prep.task.train_batches(128, torch.Generator(device=prep.device).manual_seed(0)))
    for batch in range(3):
        sequential.train_step(prep.stages, batch, x, y)
    assert streams and all(s is not None for s in streams)  # no current-stream query per event
    assert all(sum(timer.pop().values()) > 0 for timer in timers)
    prepare.prepare(RunConfig(method="bp", task="digits", device="cuda"))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_ddp_bf16_compiled_on_nccl(tmp_path):
    workers = torch.cuda.device_count()
    got = run(
        tmp_path,
        "--method",
        "bp",
        "--task",
        "digits",
        "--executor",
        "ddp",
        "--workers",
        str(workers),
        "--batch-size",
        str(64 * workers),
        "--precision",
        "bf16",
        "--compile",
    )
    assert got[1, "", "compile_time_s"] > 0 and math.isfinite(got[2, "", "train_loss"])


def test_gpu_part_of_make_bench(tmp_path):
    out = tmp_path / "gpu.csv"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.perf.gpu",
            "--model",
            "resnet8",
            "--groups",
            "2",
            "--split",
            "flops",
            "--batch-size",
            "64",
            "--warmup",
            "3",
            "--steps",
            "3",
            "--rounds",
            "2",
            "--methods",
            "bp",
            "lc",
            "pipe-bp",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert "samples/s" in result.stdout and "beside its FLOPs" in result.stdout
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert {r["benchmark"] for r in rows} == {"gpu-throughput", "gpu-speedup", "gpu-methods"}
    assert all(float(r["samples_per_s"]) > 0 for r in rows)
