"""Learning rules behind one stage interface, registered by name."""

from __future__ import annotations

import importlib
import os
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
from .infopro import InfoProOptions, InfoProStage
from .lc import LCOptions, LCStage
from .pipebp import PipeBPOptions, PipeBPStage

#: how a rule's K workers relate: BP and its data-parallel form (baseline), BP over
#: micro-batches (pipelined), a local signal per layer group (decoupled), lcbench's floor
#: (control). The table's speedup and bound columns follow from it (pipelined, decoupled),
#: and so does its above-floor column (decoupled).
FAMILIES = ("baseline", "pipelined", "decoupled", "control")
#: how the forecast (bench.forecast.predict) times a contender: BP on one device, data-parallel
#: BP, a pipeline of micro-batches, decoupled stages whose late messages meet in lockstep,
#: decoupled stages that never wait for each other, the floor (frozen groups forward only)
TIMINGS = ("one", "data-parallel", "pipeline", "decoupled", "asynchronous", "floor")


@dataclass(frozen=True)
class Method:
    """A rule and every fact about it that the rest of lcbench reads: its stage and
    options, its family, its names in tables (``label``: ``{n}`` the K-1 local modules)
    and figures (``short``), its colour and marker, and how the forecast times it."""

    name: str
    stage: type[Stage] | None  # None: a contender that is an executor's (data-parallel BP)
    options: type
    summary: str
    has_submodels: bool
    family: str
    label: str
    short: str
    colour: str | None = None  # None: the figures give it one no rule declares
    marker: str = "o"
    timing: str = "decoupled"
    #: options named in its label: (option, letter), e.g. ("microbatches", "M") -> " (M=4)"
    label_options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family must be one of {', '.join(FAMILIES)}")
        if self.timing not in TIMINGS:
            raise ValueError(f"{self.name}: timing must be one of {', '.join(TIMINGS)}")

    @property
    def parallel(self) -> bool:
        """Its K workers run side by side (decoupled, or pipelined over micro-batches)."""
        return self.family in ("pipelined", "decoupled")

    @property
    def local(self) -> bool:
        """Its groups learn from a local signal: set against the no-signal floor."""
        return self.family == "decoupled"

    @property
    def neuron_grouped(self) -> bool:
        """Its layer groups split by width into neuron groups (an option ``neuron_groups``):
        the net is built width-grouped and may put each neuron group on a rank."""
        return any(f.name == "neuron_groups" for f in fields(self.options))

    @property
    def local_module(self) -> bool:
        """It trains a module of its own beside each group but the last (critic, auxiliary
        net, synthesizer): timed by ``lcbench calibrate``, counted by the forecast."""
        return self.family == "decoupled"

    def table_label(self, groups: int, **shown) -> str:
        """Its name in a table cell at K = ``groups``, with the options of ``label_options``
        that are ``shown`` (None: not shown)."""
        text = self.label.format(n=groups - 1)
        for option, letter in self.label_options:
            if shown.get(option) is not None:
                text += f" ({letter}={shown[option]})"
        return text


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "bp",
            BPStage,
            BPOptions,
            "backprop through all groups (reference)",
            False,
            "baseline",
            "BP",
            "BP",
            "#0173b2",
            "o",
            "one",
        ),
        Method(
            "pipe-bp",
            PipeBPStage,
            PipeBPOptions,
            "pipelined backprop over micro-batches (GPipe / 1F1B schedules)",
            False,
            "pipelined",
            "pipelined BP",
            "pipelined BP",
            "#029e73",
            "P",
            "pipeline",
            (("microbatches", "M"),),
        ),
        Method(
            "frozen",
            FrozenStage,
            FrozenOptions,
            "no-signal floor: groups 1..K-1 held at their initial weights, the last trained",
            False,
            "control",
            "floor ({n} frozen)",
            "floor",
            "#56b4e9",
            "x",
            "floor",
        ),
        Method(
            "dni",
            DNIStage,
            DNIOptions,
            "decoupled neural interfaces: synthetic gradients",
            False,
            "decoupled",
            "DNI({n})",
            "DNI",
            "#fbafe4",
            "v",
        ),
        Method(
            "cdni",
            CDNIStage,
            DNIOptions,
            "DNI with label-conditioned synthesizers",
            False,
            "decoupled",
            "cDNI({n})",
            "cDNI",
            "#949494",
            "^",
        ),
        Method(
            "dgl",
            DGLStage,
            DGLOptions,
            "decoupled greedy learning: auxiliary classifiers",
            True,
            "decoupled",
            "DGL",
            "DGL",
            "#d55e00",
            "D",
        ),
        Method(
            "adgl",
            ADGLStage,
            ADGLOptions,
            "asynchronous DGL: inputs drawn from a replay buffer of the stage above",
            True,
            "decoupled",
            "async DGL",
            "async DGL",
            "#cc78bc",
            "d",
            "asynchronous",
        ),
        Method(
            "lc",
            LCStage,
            LCOptions,
            "local critic training: cascaded loss-matching critics",
            True,
            "decoupled",
            "LC({n})",
            "LC",
            "#ca9161",
            "*",
        ),
        Method(
            "infopro",
            InfoProStage,
            InfoProOptions,
            "InfoPro: a decoder's reconstruction of the image and a head's loss per group",
            False,
            "decoupled",
            "InfoPro",
            "InfoPro",
            "#8c564b",
            "p",
        ),
        Method(
            "gn",
            GNStage,
            GNOptions,
            "GN-DGL: local learning with neuron groups",
            True,
            "decoupled",
            "GN-DGL",
            "GN-DGL",
            "#ece133",
            "h",
            label_options=(("neuron_groups", "G"),),
        ),
    ]
}

#: data-parallel BP (``--executor ddp``): a contender of the table, its figures and the
#: forecast, though not a rule of its own
DDP = Method(
    "ddp",
    None,
    BPOptions,
    "data-parallel backprop: the whole net on each rank (DistributedDataParallel)",
    False,
    "baseline",
    "BP (DDP)",
    "BP (DDP)",
    "#de8f05",
    "s",
    "data-parallel",
)


def register(method: Method) -> Method:
    """Add a rule (one defined outside ``methods/``, e.g. in a test or a lab's own package;
    ``LCBENCH_RULES`` names modules that register theirs in every process lcbench starts)."""
    if method.name in METHODS or method.name == DDP.name:
        raise ValueError(f"a rule named '{method.name}' is registered already")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    METHODS.pop(name, None)


def contenders() -> list[Method]:
    """Every contender in the tables' order: BP, then data-parallel BP, then the rules."""
    rules = list(METHODS.values())
    return rules[:1] + [DDP] + rules[1:]


def contender(name: str) -> Method:
    """The contender ``name`` (a rule, or ``ddp``)."""
    return DDP if name == DDP.name else resolve(name)


def timed_as(timing: str) -> str:
    """The first contender the forecast times as ``timing`` (e.g. "pipeline")."""
    return next(m.name for m in contenders() if m.timing == timing)


def reference() -> str:
    """The rule every other is set against: BP on one worker (timing "one")."""
    return timed_as("one")


def of_family(*families: str) -> tuple[str, ...]:
    """The names of the contenders of ``families``, in order."""
    return tuple(m.name for m in contenders() if m.family in families)


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
    image_shape: tuple | None = None,
) -> list[Stage]:
    """One stage per layer group; ``shapes[k]`` is the per-sample output shape of group k,
    ``image_shape`` the input's (given to the stages of a rule that ``needs_image``)."""
    method = resolve(name)
    opts = options_from(method.options, dict(options or {}), method.name)
    count = len(groups)
    extra = {"image_shape": image_shape} if method.stage.needs_image else {}
    return [
        method.stage(
            k,
            count,
            group,
            criterion,
            train,
            shape=shapes[k],
            classes=classes,
            options=opts,
            **extra,
        )
        for k, group in enumerate(groups)
    ]


def _plugins() -> None:
    """Import the modules named in ``LCBENCH_RULES`` (comma-separated), which register rules
    of their own."""
    for name in filter(None, os.environ.get("LCBENCH_RULES", "").split(",")):
        importlib.import_module(name.strip())


__all__ = [
    "METHODS",
    "DDP",
    "FAMILIES",
    "TIMINGS",
    "contender",
    "contenders",
    "of_family",
    "reference",
    "timed_as",
    "register",
    "unregister",
    "ALIASES",
    "Method",
    "Stage",
    "TrainOptions",
    "build_stages",
    "resolve",
    "option_defaults",
    "variant",
]

_plugins()
