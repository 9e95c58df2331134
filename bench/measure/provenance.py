"""Where and with what a run was made: versions, devices, host."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except OSError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def driver_version() -> str | None:
    """The NVIDIA driver version through NVML, where a GPU and nvidia-ml-py are present."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no library, no driver, no GPU: the figure is just absent
        return None


def lcbench_version() -> str | None:
    try:
        return metadata.version("lcbench")
    except metadata.PackageNotFoundError:
        return None


def device_memory_bytes(device: torch.device) -> int | None:
    """Memory of one device: the GPU's total, or the machine's RAM (which ranks on the CPU
    share)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def provenance(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "lcbench_version": lcbench_version(),
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": driver_version() if cuda else None,
        "device": str(device),
        "device_names": [torch.cuda.get_device_name(device)] if cuda else [cpu_name()],
        "device_memory_bytes": device_memory_bytes(device),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
    }
