"""The CUDA paths: data held on the GPU, CUDA-event phase times, per-device memory figures
(allocator peaks and NVML). Run where a GPU is: `pytest -m gpu`."""
import csv
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def run(tmp_path, *args):
    result = subprocess.run([sys.executable, "-m", "bench", "run", "--task", "synthetic",
                             "--epochs", "2", "--limit-train", "2048", "--limit-test", "512",
                             "--device", "cuda", "--quiet", "--out", str(tmp_path), *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("*/*/metrics.csv")
    with open(path) as f:
        return {(int(r["epoch"]), r["stage"], r["metric"]): float(r["value"])
                for r in csv.DictReader(f)}


@pytest.mark.parametrize("method", ["bp", "lc", "dni", "pipe-bp", "gn"])
def test_cuda_run_reports_device_memory_and_event_times(method, tmp_path):
    got = run(tmp_path, "--method", method, "--groups", "2")
    for phase in ("train", "eval"):
        allocated = got[2, "", f"{phase}_cuda_max_allocated_bytes"]
        reserved = got[2, "", f"{phase}_cuda_max_reserved_bytes"]
        assert 0 < allocated <= reserved
        assert got[2, "", f"{phase}_nvml_used_bytes"] >= reserved
    # the training peak holds at least the parameters, gradients and optimizer state
    static = sum(got[1, k, m] for k in ("1", "2")
                 for m in ("param_bytes", "grad_bytes", "optimizer_state_bytes"))
    assert got[2, "", "train_cuda_max_allocated_bytes"] >= static
    busy = [got[2, k, "busy_time_s"] for k in ("1", "2")]
    assert all(b > 0 for b in busy)
    assert sum(busy) <= got[2, "", "epoch_time_s"] * 1.05  # events inside the timed epoch
    assert ("", "peak_rss_bytes") not in {(s, m) for _, s, m in got}


def test_distributed_on_one_gpu_with_two_ranks_is_a_usage_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench", "run", "--method", "lc",
                             "--task", "synthetic", "--executor", "distributed", "--device",
                             "cuda", "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has a GPU per rank")
    assert result.returncode == 2 and "GPU of its own" in result.stderr
    assert not any(tmp_path.iterdir())


def test_ddp_runs_on_nccl_with_a_gpu_per_rank(tmp_path):
    """As many ranks as GPUs (at least one): NCCL, the per-rank CUDA memory figures."""
    workers = torch.cuda.device_count()
    got = run(tmp_path, "--method", "bp", "--executor", "ddp", "--workers", str(workers),
              "--batch-size", str(64 * workers))
    for rank in range(1, workers + 1):
        assert got[2, str(rank), "train_cuda_max_allocated_bytes"] >= got[1, str(rank), "param_bytes"]
        assert got[2, str(rank), "busy_time_s"] > 0
    assert 0 <= got[2, "", "test_acc"] <= 1 and got[2, "", "epoch_time_s"] > 0
