"""Learning rules behind one stage interface, registered by name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from torch import nn

from .adgl import ADGLOptions, ADGLStage
from .base import Criterion, Stage, TrainOptions, options_from
from .bp import BPOptions, BPStage
from .dgl import DGLOptions, DGLStage
from .dni import CDNIStage, DNIOptions, DNIStage
from .frozen import FrozenOptions, FrozenStage
from .gn import GNOptions, GNStage
from .lc import LCOptions, LCStage
from .pipebp import PipeBPOptions, PipeBPStage


@dataclass(frozen=True)
class Method:
    name: str
    stage: type[Stage]
    options: type
    summary: str
    has_submodels: bool


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("bp", BPStage, BPOptions, "backprop through all groups (reference)", False),
        Method(
            "pipe-bp",
            PipeBPStage,
            PipeBPOptions,
            "pipelined backprop over micro-batches (GPipe / 1F1B schedules)",
            False,
        ),
        Method(
            "dgl", DGLStage, DGLOptions, "decoupled greedy learning: auxiliary classifiers", True
        ),
        Method(
            "adgl",
            ADGLStage,
            ADGLOptions,
            "asynchronous DGL: inputs drawn from a replay buffer of the stage above",
            True,
        ),
        Method(
            "lc", LCStage, LCOptions, "local critic training: cascaded loss-matching critics", True
        ),
        Method(
            "dni", DNIStage, DNIOptions, "decoupled neural interfaces: synthetic gradients", False
        ),
        Method("cdni", CDNIStage, DNIOptions, "DNI with label-conditioned synthesizers", False),
        Method("gn", GNStage, GNOptions, "GN-DGL: local learning with neuron groups", True),
        Method(
            "frozen",
            FrozenStage,
            FrozenOptions,
            "no-signal floor: groups 1..K-1 held at their initial weights, the last trained",
            False,
        ),
    ]
}

ALIASES = {
    "backprop": "bp",
    "pipelined-bp": "pipe-bp",
    "pipeline": "pipe-bp",
    "async-dgl": "adgl",
    "local-critic": "lc",
    "local-critic-training": "lc",
    "greedy": "dgl",
    "decoupled-greedy": "dgl",
    "synthetic-gradients": "dni",
    "neuron-groups": "gn",
    "gn-dgl": "gn",
    "floor": "frozen",
}


def resolve(name: str) -> Method:
    """The method registered under ``name`` or one of its aliases."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in METHODS:
        raise ValueError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[key]


def option_defaults(name: str) -> dict:
    """The rule's local-module options with their published defaults."""
    return {f.name: f.default for f in fields(resolve(name).options)}


def variant(name: str, options: dict) -> str:
    """What of ``options`` is not a published recipe: what the rule's options class says is
    lcbench's choice (``chosen``), then its ``VARIANT_OPTIONS`` away from their defaults
    (e.g. ``synth_fit=rms``); empty if none."""
    method = resolve(name)
    defaults = option_defaults(method.name)
    chosen = getattr(method.options, "chosen", None)
    parts = [chosen({**defaults, **options})] if chosen is not None else []
    parts += [
        f"{k}={options[k]}"
        for k in getattr(method.options, "VARIANT_OPTIONS", ())
        if k in options and options[k] != defaults[k]
    ]
    return ", ".join(p for p in parts if p)


def build_stages(
    name: str,
    groups: Sequence[nn.Module],
    shapes: Sequence[tuple],
    classes: int,
    criterion: Criterion,
    train: TrainOptions,
    options: dict | None = None,
) -> list[Stage]:
    """One stage per layer group; ``shapes[k]`` is the per-sample output shape of group k."""
    method = resolve(name)
    opts = options_from(method.options, dict(options or {}), method.name)
    count = len(groups)
    return [
        method.stage(
            k, count, group, criterion, train, shape=shapes[k], classes=classes, options=opts
        )
        for k, group in enumerate(groups)
    ]


__all__ = [
    "METHODS",
    "ALIASES",
    "Method",
    "Stage",
    "TrainOptions",
    "build_stages",
    "resolve",
    "option_defaults",
    "variant",
]
