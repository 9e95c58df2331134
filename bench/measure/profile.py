"""Device-independent compute and memory accounting: FLOPs, parameter/gradient/optimizer bytes, and the
bytes of tensors autograd saves for backward."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def dummy_input(model: nn.Module, input_shape, batch_size: int, device=None) -> torch.Tensor:
    """A random batch for ``model`` (on its device unless ``device`` is given): word ids where
    it starts with an embedding, else Gaussian values of its parameters' type."""
    ref = next(model.parameters(), None)
    device = device or (ref.device if ref is not None else None)
    first = next((m for m in model.modules() if not list(m.children())), None)
    if isinstance(first, nn.Embedding):
        return torch.randint(first.num_embeddings, (batch_size, *input_shape), device=device)
    dtype = ref.dtype if ref is not None else None
    return torch.randn(batch_size, *input_shape, device=device, dtype=dtype)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def count_flops(module: nn.Module, x: torch.Tensor, *args) -> int:
    """FLOPs of one forward pass of ``module`` on ``x`` (and ``args``) (a multiply-add counts 2; only ops that
    ``FlopCounterMode`` knows, e.g. matmul and convolution, are counted). LSTMs, which run as
    fused kernels that it does not know, count 2 x steps x rows x (4H x (input + H)) per layer
    (the gate matmuls)."""
    lstm_flops = []

    def lstm_hook(lstm, args, output):
        steps = args[0].shape[1] if lstm.batch_first else args[0].shape[0]
        rows = args[0].shape[0] if lstm.batch_first else args[0].shape[1]
        for name, w in lstm.named_parameters():
            if name.startswith("weight_"):  # weight_ih_l*, weight_hh_l*: (4H, in) and (4H, H)
                lstm_flops.append(2 * steps * rows * w.numel())

    handles = [
        m.register_forward_hook(lstm_hook) for m in module.modules() if isinstance(m, nn.LSTM)
    ]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x, *args)
    finally:
        for handle in handles:
            handle.remove()
    return counter.get_total_flops() + sum(lstm_flops)


def count_work_flops(work) -> int:
    """FLOPs of ``work()``, forward and backward passes alike (the ops ``FlopCounterMode``
    knows; a multiply-add counts 2)."""
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


def param_bytes(module: nn.Module) -> int:
    return sum(_nbytes(p) for p in module.parameters())


def grad_bytes(module: nn.Module) -> int:
    """Bytes of the ``.grad`` tensors present on ``module``'s parameters."""
    return sum(_nbytes(p.grad) for p in module.parameters() if p.grad is not None)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of all tensors held in ``opt.state`` (momentum buffers, Adam moments, step counters)."""
    return sum(
        _nbytes(v)
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


class SavedTensorMeter:
    """Bytes of activation memory that autograd saves for backward while the context is active.

    Rule: every tensor that autograd saves is attributed to its storage, and each distinct storage is
    counted once with its full size (a view keeps its whole storage alive; ReLU's output saved again as
    the next layer's input counts once). Storages that exist anyway are not activations and are not
    counted: those of ``nn.Parameter`` objects and of views of them (e.g. the transposed weight that
    ``linear`` saves), and those of the parameters and buffers of the modules given to the constructor
    (e.g. BatchNorm's running statistics). ``bytes`` is the total, which is the peak held by the graph
    when the context is wrapped around a forward pass whose graph is still alive.

        with SavedTensorMeter(model) as m:
            loss = criterion(model(x), y)
        m.bytes
    """

    def __init__(self, *exclude: nn.Module):
        self.bytes = 0
        self._seen: set[tuple[torch.device, int]] = {
            self._key(t) for module in exclude for t in (*module.parameters(), *module.buffers())
        }
        # never traced by torch.compile (it would compile the hook at every call, around a
        # compiled module's eager parts)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(
            torch.compiler.disable(self._pack), torch.compiler.disable(_unpack)
        )

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[torch.device, int]:
        return t.device, t.untyped_storage().data_ptr()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        is_param = isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)
        key = self._key(t)
        if not is_param and key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return (
            t.detach()
        )  # same storage; returning ``t`` itself would make a reference cycle for saved outputs

    def saves(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s storage (not a parameter's) was saved, and counted."""
        return self._key(t) in self._seen

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
