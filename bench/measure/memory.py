"""Memory per stage and per device (see DESIGN.md, "Measurement").

- ``ActivationProbe``: bytes autograd saves for backward in each of a stage's modules,
  for one batch (saved-tensor hooks; off the hot path the rest of the time).
- ``static_memory``: bytes of parameters, gradients and optimizer state.
- ``device_memory``: peak RSS, and on CUDA max allocated/reserved and NVML used memory.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from methods import Stage

from .profile import SavedTensorMeter, optimizer_state_bytes, param_bytes


def _metered(module: nn.Module) -> list[nn.Module]:
    """The modules whose forward calls are metered: containers called piecewise are opened."""
    return list(module) if isinstance(module, nn.ModuleList) else [module]


class ActivationProbe:
    """Peak bytes saved for backward by a stage's group and by its local modules.

    Hooks meter each forward call of the group and of each local module; a module called
    more than once per batch (a recomputed critic) counts its largest call. Parameters and
    buffers are not activations (see ``SavedTensorMeter``).
    """

    def __init__(self, stage: Stage):
        self.stage = stage
        self.peak: dict[nn.Module, int] = {}
        self._open: dict[nn.Module, SavedTensorMeter] = {}
        self._handles = []

    def __enter__(self) -> ActivationProbe:
        for module in (m for top in self.stage.modules() for m in _metered(top)):
            self._handles.append(module.register_forward_pre_hook(self._start))
            self._handles.append(module.register_forward_hook(self._stop))
        return self

    def _start(self, module, args):
        self._open[module] = SavedTensorMeter(module).__enter__()

    def _stop(self, module, args, output):
        meter = self._open.pop(module)
        meter.__exit__(None, None, None)
        self.peak[module] = max(self.peak.get(module, 0), meter.bytes)

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def group_bytes(self) -> int:
        return self.peak.get(self.stage.group, 0)

    @property
    def local_bytes(self) -> int:
        return sum(v for m, v in self.peak.items() if m is not self.stage.group)


@contextmanager
def probing(probes: Sequence[ActivationProbe]):
    """All ``probes`` attached at once."""
    with ExitStack() as stack:
        for probe in probes:
            stack.enter_context(probe)
        yield


def static_memory(stage: Stage) -> dict[str, int]:
    """Parameters, their gradients (allocated during every backward: one per trainable
    parameter) and optimizer state, in bytes, for the group and its local modules."""
    modules = stage.modules()
    trainable = sum(
        p.numel() * p.element_size() for m in modules for p in m.parameters() if p.requires_grad
    )
    return {
        "param_bytes": sum(param_bytes(m) for m in modules),
        "grad_bytes": trainable,
        "optimizer_state_bytes": sum(optimizer_state_bytes(o) for o in stage.optimizers()),
    }


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def nvml_used_bytes(device: torch.device) -> int | None:
    """Memory used on the GPU as NVML sees it (all processes), where NVML is available."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no library, no driver: the figure is just not written
        return None


def reset_device_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_memory(device: torch.device, phase: str) -> dict[str, int]:
    """Memory of one phase (``train``/``eval``) since the last reset: on CUDA the
    allocator's peaks and NVML's used memory; on the CPU the process's peak RSS so far."""
    if device.type != "cuda":
        return {"peak_rss_bytes": peak_rss_bytes()}
    out = {
        f"{phase}_cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device),
        f"{phase}_cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(device),
    }
    used = nvml_used_bytes(device)
    if used is not None:
        out[f"{phase}_nvml_used_bytes"] = used
    return out


def memory_rows(stages, probes: list[ActivationProbe], labels: list[str]) -> dict:
    """Per-stage bytes, under each stage's label: parameters, gradients, optimizer state,
    activations saved for backward by the group (times the batches or micro-batches it holds
    at once) and by its local modules, and their sum (the stage's peak)."""
    rows = {}
    for stage, probe, label in zip(stages, probes, labels, strict=True):
        figures = {
            **static_memory(stage),
            "activation_bytes": probe.group_bytes * stage.in_flight,
            "local_activation_bytes": probe.local_bytes,
        }
        figures["peak_mem_bytes"] = sum(figures.values())
        rows.update({(label, k): v for k, v in figures.items()})
    return rows
