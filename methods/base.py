"""The stage interface shared by every learning rule.

A stage is layer group k of K under one rule: the group, the rule's local module and the
optimizers. Stages exchange only tensors tagged with a batch id:

- ``input(batch, x, y)`` picks what the stage trains on: what arrived, or (asynchronous
  DGL) a draw from a buffer of past arrivals;
- ``forward(batch, x, y)`` takes the (detached) activation of the stage above and the
  labels, trains whatever the rule trains at once, and returns ``(h, up)``: ``h`` the
  detached output for the stage below (``None`` for the last stage) and ``up`` the message
  for the stage above if it is ready now (LC, DNI), else ``None``.
- ``receive(batch, message)`` applies an upstream message for ``batch`` when it arrives,
  possibly late; it returns the message for the stage above when this produces one (BP).

A stage keeps, per batch in flight, only what it needs to act on the upstream message.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch
from torch import nn

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Per-sample loss: ``criterion(logits, y) -> (B,)``."""


#: the main network's optimizers: "sgd" (every table but one) and "adam" (the DGL authors'
#: DNI comparison: Adam 3e-5 for network and local modules alike)
OPTIMIZERS = ("sgd", "adam")


@dataclass
class TrainOptions:
    """Optimizer settings of the main network (and of local modules that share them);
    ``momentum`` and ``nesterov`` are SGD's."""

    optimizer: str = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    clip: float | None = None  # largest gradient norm of each parameter group (a module)
    fused: bool = False  # one fused kernel per optimizer step (CUDA); else torch's default


def match_targets(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logits shaped like the targets: a step-by-step head's output (B, T, C) for one target
    per sequence (B,) is read at the last step."""
    return logits[:, -1] if logits.dim() == y.dim() + 2 else logits


def correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(number of right predictions, number of targets): per sample, or per step (LM)."""
    return (match_targets(logits, y).argmax(-1) == y).sum(), y.numel()


def main_optimizer(params, opts: TrainOptions) -> torch.optim.Optimizer:
    """The main network's optimizer: SGD with (Nesterov) momentum and weight decay, or Adam
    (with L2 weight decay as torch's ``Adam`` applies it). A local module trained with the
    same settings joins it as a parameter group of its own (``optimizer.add_param_group``):
    one step for the stage."""
    if opts.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=opts.lr, weight_decay=opts.weight_decay, fused=opts.fused or None
        )
    return torch.optim.SGD(
        params,
        lr=opts.lr,
        momentum=opts.momentum,
        nesterov=opts.nesterov and opts.momentum > 0,
        weight_decay=opts.weight_decay,
        fused=opts.fused or None,
    )


def adam(params, lr: float, opts: TrainOptions) -> torch.optim.Adam:
    """A local module's Adam (LC critics, DNI synthesizers)."""
    return torch.optim.Adam(params, lr=lr, fused=opts.fused or None)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of ``module``'s parameters to run it with (``torch.func.functional_call``) when
    the pass is kept for a later update: the module may step before that update comes."""
    return {name: p.detach().clone().requires_grad_() for name, p in module.named_parameters()}


def take_grads(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """The gradients found on ``snapshot`` copies, as ``module``'s own."""
    for name, p in module.named_parameters():
        p.grad = weights[name].grad


class Stage:
    """Layer group ``index`` (0-based) of ``count`` under a learning rule."""

    #: what the rule sends upstream: "gradient" (shaped like the stage's input: BP, DNI),
    #: "loss" (one value per sample: LC) or None (DGL, GN-DGL)
    upstream: str | None = None
    #: what the rule's local signal estimates, which the diagnostics set against the truth:
    #: "gradient" (``local_gradient`` estimates dL/dh: DNI's synthetic gradient), "loss"
    #: (``predicted_loss`` estimates each sample's loss: LC's critic) or None
    predicts: str | None = None
    #: how the distributed executor runs an epoch of this stage on its rank: "messages" (a
    #: batch at a time, late upstream messages applied as they arrive), "pipeline" (a
    #: schedule of micro-batches: pipelined BP) or "asynchronous" (never waiting for the
    #: stage above: asynchronous DGL)
    epoch_loop = "messages"
    #: whether the stage also needs the batch's input image (InfoPro's decoders reconstruct
    #: it): the executors set ``self.image`` to it before each ``forward``
    needs_image = False
    #: whether the stage below may run ahead of the updates this stage waits for
    #: (False for BP: its next forward needs this batch's step)
    decoupled = True
    #: micro-batches per batch (pipelined BP); the modelled time of a pipeline depends on it
    microbatches = 1
    #: (micro-)batches whose saved activations the group holds at once on its device
    in_flight = 1
    #: the rule's version, in every checkpoint's fingerprint: raise it when the rule's update
    #: changes (a checkpoint of another version is refused; an edit that leaves it, a comment
    #: or a refactoring, keeps checkpoints good)
    version = 1

    def __init__(
        self, index: int, count: int, group: nn.Module, criterion: Criterion, train: TrainOptions
    ):
        self.index = index
        self.count = count
        self.group = group
        self.criterion = criterion
        self.train_options = train
        self.optimizer = main_optimizer(group.parameters(), train)
        self.kept: dict[int, tuple] = {}
        self.phase: Callable[[str], ContextManager] = lambda name: nullcontext()
        """``with self.phase("forward" | "backward" | "update"):`` marks the rule's work;
        an executor may replace it with a timer. The rule itself measures nothing."""
        self._sums: dict[str, tuple[torch.Tensor, int]] = {}
        self.image: torch.Tensor | None = None

    @property
    def last(self) -> bool:
        return self.index == self.count - 1

    # -- the rule ---------------------------------------------------------------------
    def input(self, batch: int, x: torch.Tensor | None, y: torch.Tensor | None):
        """The ``(x, y)`` this stage trains on for ``batch``: what arrived from the stage
        above, except for rules that draw from a buffer of past arrivals (asynchronous
        DGL), where ``x`` may be None (nothing new arrived)."""
        return x, y

    def forward(self, batch: int, x: torch.Tensor, y: torch.Tensor):
        raise NotImplementedError

    def receive(self, batch: int, message: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError(f"{type(self).__name__} takes no upstream message")

    def head(self) -> nn.Module | None:
        """The local module that makes ``f_1..f_k -> head`` a classifier (sub-model), if any."""
        return None

    def predict(self, h: torch.Tensor) -> torch.Tensor | None:
        """Sub-model logits from this group's output, or ``None`` where the rule has none."""
        head = self.head()
        return None if head is None or self.last else head(h)

    def predicted_loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The rule's estimate of each sample's loss from ``h`` (``predicts == "loss"``)."""
        return None

    def local_gradient(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """What the rule steps this group along: its estimate of dL/dh at the group's output
        ``h`` (of the mean batch loss). Here the gradient of the head's mean cross-entropy,
        for the rules whose group trains on its head alone (LC, DGL); ``None`` for the last
        group and for rules with no head. Rules with another signal override it."""
        head = None if self.last else self.head()
        if head is None:
            return None
        h = h.detach().requires_grad_()
        with torch.enable_grad():
            return torch.autograd.grad(self.criterion(head(h), y).mean(), h)[0]

    # -- plumbing shared by the rules -----------------------------------------------
    def modules(self) -> list[nn.Module]:
        """Every trained module of the stage: the group and its local modules."""
        return [self.group]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def train(self, mode: bool = True) -> None:
        for module in self.modules():
            module.train(mode)

    def state_dict(self) -> dict:
        """What carries the stage from one batch to the next: its modules' and optimizers'
        states, what it keeps for batches in flight and its running tallies."""
        return {
            "modules": [module.state_dict() for module in self.modules()],
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers()],
            "kept": self.kept,
            "tallies": self._sums,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s ``state``."""
        for module, saved in zip(self.modules(), state["modules"], strict=True):
            module.load_state_dict(saved)
        for optimizer, saved in zip(self.optimizers(), state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        self.kept, self._sums = dict(state["kept"]), dict(state["tallies"])

    def scale_lr(self, factor: float) -> None:
        """Set the main network's optimizer (and the modules sharing it) to ``factor`` times
        the base rate; critics and synthesizers, with their own Adam, keep theirs."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.train_options.lr * factor

    def step(self, *optimizers: torch.optim.Optimizer) -> None:
        """Step ``optimizers`` (each parameter group's gradient clipped to its own norm first,
        with ``clip``) and clear their gradients."""
        with self.phase("update"):
            for optimizer in optimizers:
                if self.train_options.clip is not None:
                    for group in optimizer.param_groups:
                        torch.nn.utils.clip_grad_norm_(group["params"], self.train_options.clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    def backward(self, tensor: torch.Tensor, gradient: torch.Tensor | None = None, **kw) -> None:
        with self.phase("backward"):
            tensor.backward(gradient, **kw)

    def true_loss(self, batch: int, x: torch.Tensor, y: torch.Tensor, *, keep_input: bool):
        """Last stage of every rule: backprop the task loss through the group and step it.

        Returns the per-sample loss (detached) and the gradient w.r.t. the input when
        ``keep_input`` (the message BP and DNI send upstream).
        """
        x = x.requires_grad_() if keep_input else x
        with self.phase("forward"):
            logits = self.group(x)
            per_sample = self.criterion(logits, y)
        self.backward(per_sample.mean())
        self.step(self.optimizer)
        self.record(logits, y, per_sample)
        return per_sample.detach(), (x.grad if keep_input else None)

    def record(self, logits: torch.Tensor, y: torch.Tensor, per_sample: torch.Tensor) -> None:
        """Tally this batch's training loss and accuracy of the group's (local) output."""
        right, targets = correct(logits, y)
        self.tally(y.shape[0], train_loss=per_sample.mean(), train_acc=right / targets)

    def tally(self, n: int, **means: torch.Tensor) -> None:
        """Accumulate batch means weighted by ``n`` samples, on the device (no sync; one
        kernel per metric once its sum exists)."""
        for name, value in means.items():
            if name in self._sums:
                total, count = self._sums[name]
                self._sums[name] = (total.add_(value.detach(), alpha=n), count + n)
            else:
                self._sums[name] = (value.detach() * n, n)

    def pop_metrics(self) -> dict[str, float]:
        """Per-sample means of the tallied training metrics since the last call."""
        out = {name: float(total) / count for name, (total, count) in self._sums.items()}
        self._sums = {}
        return out


def option(default, *, least=None, above=None, choices=None):
    """A rule option: its default, and the values it takes (at least ``least``, above
    ``above``, or one of ``choices``), checked with its type by ``options_from``."""
    return field(default=default, metadata={"least": least, "above": above, "choices": choices})


def _kind(hint) -> tuple[type, bool]:
    """``(type, None allowed)`` of an option's annotation (``int``, ``float``, ``bool``,
    ``str``, or one of them ``| None``)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0], True) if args else (hint, False)


def check_option(cls, name: str, value, method: str) -> None:
    """ValueError, one line, unless ``value`` has option ``name``'s type and range."""
    (f,) = [f for f in fields(cls) if f.name == name]
    kind, optional = _kind(typing.get_type_hints(cls)[name])
    if value is None and optional:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: number and math.isfinite(value),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    rule = f.metadata
    if ok and rule.get("choices") is not None and value not in rule["choices"]:
        raise ValueError(
            f"option {name} of {method} must be one of {', '.join(rule['choices'])} (got {value!r})"
        )
    if ok and rule.get("least") is not None:
        ok = value >= rule["least"]
    if ok and rule.get("above") is not None:
        ok = value > rule["above"]
    if not ok:
        bound = (
            f" at least {rule['least']}"
            if rule.get("least") is not None
            else f" above {rule['above']}"
            if rule.get("above") is not None
            else ""
        )
        what = {
            int: "an integer",
            float: "a finite number",
            bool: "true or false",
            str: "a string",
        }[kind]
        raise ValueError(
            f"option {name} of {method} must be {what}{bound}"
            f"{' or unset' if optional else ''} (got {value!r})"
        )


def options_from(cls, values: dict, method: str):
    """Build a rule's option dataclass from a dict, rejecting unknown keys and values of the
    wrong type or range (``option``); an int where a float is due is a float."""
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(
            f"unknown option(s) for {method}: {', '.join(unknown)} "
            f"(choose from {', '.join(sorted(names)) or 'none'})"
        )
    for name, value in values.items():
        check_option(cls, name, value, method)
    hints = typing.get_type_hints(cls)
    return cls(
        **{
            k: float(v) if _kind(hints[k])[0] is float and v is not None else v
            for k, v in values.items()
        }
    )
