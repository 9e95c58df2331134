"""How a run's modules run on its device: precision, memory format and compilation.

- ``--precision fp32`` (the default, the papers' semantics: no TF32 anywhere), ``tf32``
  (TF32 matmuls and convolutions on CUDA) or ``bf16``: each module of a stage (its group
  and each local module) computes under bf16 autocast and returns fp32, so the master
  weights, the optimizers, the losses and every message between stages stay fp32;
- channels-last memory format for modules with 2-d convolutions (weights and 4-d inputs),
  whatever the precision and device;
- ``--compile``: each such module's forward in training compiled by torch.compile (with
  CUDA graphs where the executor and rule allow them: ``cudagraphs``); evaluation runs
  eagerly. ``warm_up`` compiles before the timed epochs and puts the stages back as they
  were, so a compiled run trains on the same batches with the same updates.

``apply`` installs this as an instance ``forward`` of each module: state dict keys, hooks
and the stages' code are unchanged, and a deep copy (FLOP counts) runs plain.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map

#: torch.compile's backend; tests take "aot_eager" (the same graphs, no code generation)
BACKEND = os.environ.get("LCBENCH_COMPILE_BACKEND", "inductor")
#: compiled graphs a code object may hold: each compiled module adds a few to the same one
RECOMPILE_LIMIT = 64
_cudagraphs = False  # whether a compiled module of this process uses CUDA graphs


def set_precision(precision: str) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA: on for ``tf32`` only (torch's
    default lets cuDNN use it)."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def compile_options(device: torch.device, cudagraphs: bool) -> dict:
    """torch.compile's arguments: static shapes; CUDA graphs (mode "reduce-overhead") on a
    GPU where they are allowed."""
    options = {"backend": BACKEND, "dynamic": False}
    if BACKEND == "inductor" and cudagraphs and device.type == "cuda":
        options["mode"] = "reduce-overhead"
    return options


def _to_convert(value) -> bool:
    """Whether ``value`` is an image batch not yet in channels-last memory format."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 4
        and value.is_floating_point()
        and not value.is_contiguous(memory_format=torch.channels_last)
    )


class Reformat(torch.autograd.Function):
    """``x`` in ``memory_format``, its gradient back in the format ``x`` came in: a message
    that arrived in the default format is answered in it, and a channels-last group whose
    output leaves in the default format (a pipeline's send) gets its gradient back in
    channels-last (given the default one, the small CNN's first pipeline stage took 13%
    longer per micro-batch on the CPU)."""

    @staticmethod
    def forward(ctx, x, memory_format):
        if x.is_contiguous():
            ctx.source = torch.contiguous_format
        elif x.is_contiguous(memory_format=torch.channels_last):
            ctx.source = torch.channels_last
        else:
            ctx.source = None
        return x.contiguous(memory_format=memory_format)

    @staticmethod
    def backward(ctx, grad):
        if ctx.source is None:
            return grad, None
        return grad.contiguous(memory_format=ctx.source), None


def _fp32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


class Forward:
    """``module.forward`` in bf16 autocast with fp32 outputs (``bf16``), on channels-last
    inputs (``channels_last``), compiled in training (``compile_options``)."""

    def __init__(
        self,
        module: nn.Module,
        *,
        device_type: str,
        bf16: bool,
        channels_last: bool,
        compile_options: dict | None,
    ):
        self.module, self.device_type = module, device_type
        self.bf16, self.channels_last = bf16, channels_last
        self.compiled = torch.compile(self.run, **compile_options) if compile_options else None

    def run(self, *args, **kwargs):
        if self.channels_last:
            args = tuple(
                Reformat.apply(a, torch.channels_last) if _to_convert(a) else a for a in args
            )
        forward = type(self.module).forward
        if not self.bf16:
            return forward(self.module, *args, **kwargs)
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = forward(self.module, *args, **kwargs)
        return tree_map(_fp32, out)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None and self.module.training:
            return self.compiled(*args, **kwargs)
        return self.run(*args, **kwargs)

    def __deepcopy__(self, memo):
        """A copy of the module runs plain: fp32, eager, its own memory format."""
        return Forward(
            copy.deepcopy(self.module, memo),
            device_type=self.device_type,
            bf16=False,
            channels_last=False,
            compile_options=None,
        )


def hold_channels_last(module: nn.Module) -> bool:
    """Whether ``module`` runs channels-last (it has 2-d convolutions); if so, its weights
    are put in that format."""
    if not any(isinstance(m, nn.Conv2d) for m in module.modules()):
        return False
    module.to(memory_format=torch.channels_last)
    return True


def as_held(x: torch.Tensor) -> torch.Tensor:
    """``x`` laid out as a channels-last net meets it: an image batch (or a conv group's
    features) channels-last, anything else as it is."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def modules_of(stage) -> list[nn.Module]:
    """The modules a stage calls: its group and local modules (a list of heads opened)."""
    return [
        m for top in stage.modules() for m in (top if isinstance(top, nn.ModuleList) else [top])
    ]


def apply(
    stages: Sequence,
    *,
    precision: str,
    compile: bool,
    device: torch.device,
    cudagraphs: bool = False,
) -> None:
    """Run every module of ``stages`` as the run asks (see the module docstring); modules
    already set up are left as they are. ``cudagraphs``: whether the executor and rule let
    compiled modules use CUDA graphs (what a module returns stays valid until the next
    ``step_begin``, not beyond)."""
    global _cudagraphs
    bf16 = precision == "bf16"
    options = compile_options(device, cudagraphs) if compile else None
    if compile:
        import torch._dynamo as dynamo

        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _cudagraphs |= options.get("mode") == "reduce-overhead"
    for stage in stages:
        for module in modules_of(stage):
            if isinstance(module.__dict__.get("forward"), Forward):
                continue
            conv = hold_channels_last(module)
            if bf16 or conv or compile:
                module.forward = Forward(
                    module,
                    device_type=device.type,
                    bf16=bf16,
                    channels_last=conv,
                    compile_options=options,
                )


def step_begin() -> None:
    """A new batch: where compiled modules use CUDA graphs, the outputs of the last batch
    may now be overwritten (and those of this one live until the next call)."""
    if _cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()


def warm_up(
    stages: Sequence, step: Callable[[], None], device: torch.device, repeats: int = 2
) -> float:
    """Seconds of ``repeats`` calls of ``step`` (a training batch on stand-in data: the
    first compiles, the next catches recompiles and records CUDA graphs), after which the
    stages (modules, optimizers, tallies, what they keep) and torch's random states are
    put back as they were."""
    saved = copy.deepcopy([stage.state_dict() for stage in stages])
    cuda = device.type == "cuda"
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    for stage, state in zip(stages, saved, strict=True):
        stage.load_state_dict(state)
    torch.set_rng_state(rng[0])
    if cuda:
        torch.cuda.set_rng_state(rng[1], device)
    return seconds
