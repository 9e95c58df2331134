"""Profiles: what a device and the link between two of them can do, as TOML files.

A *stated* profile (shipped under ``bench/profiles/``) holds a data sheet's peak FLOP/s,
memory and memory bandwidth, a link's nominal latency and bandwidth, and the efficiencies
assumed to turn peaks into achieved rates. A *measured* profile is written by ``lcbench
calibrate``: the achieved FLOP/s and per-block overhead fitted to timed blocks, the link's
latency and bandwidth fitted to a ping-pong and an all-reduce, and the timed blocks and
local modules themselves (``[[workloads]]``), which the forecast uses for those models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from .model import Link

SHIPPED = Path(__file__).parents[1] / "profiles"
PRECISIONS = ("fp32", "tf32", "bf16")


class ProfileError(ValueError):
    """A profile that cannot be read or used: one line saying why."""


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: float
    flops: dict  # achieved FLOP/s by precision (measured, or peak x efficiency)
    overhead_s: float  # per block per training step, whatever the batch
    update_bytes_per_s: float  # parameter bytes an SGD step gets through per second
    colocated_slowdown: float = 1.0  # compute time x this when the K workers share the machine
    step_cv: float = 0.0  # a step's time from one step to the next: standard deviation / mean
    threads: int = 0  # CPU threads per process it was calibrated at (0: not stated)
    source: str = ""
    assumptions: tuple[str, ...] = ()


@dataclass(frozen=True)
class LinkSpec:
    name: str
    latency_s: float
    bandwidth: float  # achieved bytes/s per direction
    allreduce: tuple[float, float] | None = None  # measured ring-equivalent (alpha, beta)
    source: str = ""
    handoff_s: float = 0.0  # a message between computing ranks, beyond its transfer (Link)

    def link(self, bandwidth: float | None = None) -> Link:
        """The link, at another achieved ``bandwidth`` where given (a map's axis); a measured
        all-reduce keeps its own fit only at the measured bandwidth, a pipeline schedule's
        hand-off (work on the ranks, not on the wire) at every bandwidth."""
        if bandwidth is None and self.allreduce is not None:
            return Link(self.latency_s, self.bandwidth, *self.allreduce, self.handoff_s)
        return Link(self.latency_s, bandwidth or self.bandwidth, handoff_s=self.handoff_s)


@dataclass(frozen=True)
class Timed:
    """Blocks and local modules of one model timed by ``lcbench calibrate``: seconds at each
    of ``batch_sizes`` (per block: forward, backward with and without the input's gradient;
    the update once per step), the input pipeline's seconds per batch, and each rule's local
    module (forward call, upstream update) on the features of a shape; at ``held`` sizes
    (a pipeline's micro-batches), the blocks' passes while another micro-batch's graph is
    alive; and the blocks width-grouped into neuron groups (``grouped``)."""

    model: str
    task: str
    width: float
    precision: str
    threads: int
    batch_sizes: tuple[int, ...]
    input_s: tuple[float, ...]
    forward_s: tuple[tuple[float, ...], ...]
    backward_s: tuple[tuple[float, ...], ...]
    backward_first_s: tuple[tuple[float, ...], ...]
    update_s: tuple[float, ...]
    local: dict = field(
        default_factory=dict
    )  # (method, options, shape) -> (sizes, forward_s, receive_s)
    held: dict = field(default_factory=dict)  # as a pipeline holds them: "sizes", "forward_s", ...
    #: width-grouped (GN-DGL): (neuron groups, mixing) -> {"forward_s", "backward_s",
    #: "backward_first_s": per block, per batch size; "update_s": per block}
    grouped: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    name: str
    summary: str
    kind: str  # "stated" or "measured"
    device: Device
    link: LinkSpec
    timed: tuple[Timed, ...] = ()

    def timed_for(self, model: str, task: str, width: float, precision: str) -> Timed | None:
        return next(
            (
                t
                for t in self.timed
                if (t.model, t.task, t.precision) == (model, task, precision)
                and math.isclose(t.width, width)
            ),
            None,
        )


def _number(table: dict, key: str, where: str, *, positive: bool = True) -> float:
    value = table.get(key)
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or (positive and value <= 0)
        or value < 0
    ):
        raise ProfileError(
            f"{where}: '{key}' must be a {'positive ' if positive else ''}number, got {value!r}"
        )
    return float(value)


def parse(data: dict, origin: str) -> Profile:
    """A profile from its TOML ``data`` (``origin`` names it in errors)."""
    try:
        head, dev, lnk = data["profile"], data["device"], data["link"]
    except KeyError as e:
        raise ProfileError(f"{origin}: no [{e.args[0]}] table") from None
    kind = head.get("kind", "stated")
    if kind not in ("stated", "measured"):
        raise ProfileError(f"{origin}: [profile] kind must be 'stated' or 'measured', got {kind!r}")
    where = f"{origin} [device]"
    if kind == "measured":
        flops = dict(dev.get("achieved_flops", {}))
        assumptions = ()
    else:
        efficiency = _number(dev, "efficiency", where)
        flops = {p: v * efficiency for p, v in dict(dev.get("peak_flops", {})).items()}
        assumptions = (
            f"achieved FLOP/s = the data sheet's peak x {efficiency:g} (stated)",
            f"{dev.get('overhead_s', 0):g} s per block per step (stated)",
            f"a step's time varies by {dev.get('step_cv', 0):g} of itself from step to "
            "step (stated; 0: ranks in lockstep never wait for a straggler)",
        )
    if not flops or any(p not in PRECISIONS for p in flops):
        raise ProfileError(
            f"{where}: FLOP/s for {', '.join(PRECISIONS)} expected, got {sorted(flops)}"
        )
    for p in flops:
        _number(flops, p, where)
    if kind == "measured":
        update = _number(dev, "update_bytes_per_s", where)
    else:
        update = (
            _number(dev, "memory_bandwidth_bytes_per_s", where) / 5
        )  # SGD: p, g, m read; p, m written
    device = Device(
        name=str(dev.get("name", "")),
        memory_bytes=_number(dev, "memory_bytes", where),
        flops=flops,
        overhead_s=_number(dev, "overhead_s", where, positive=False),
        update_bytes_per_s=update,
        colocated_slowdown=float(dev.get("colocated_slowdown", 1.0)),
        threads=int(dev.get("threads", 0)),
        step_cv=_number(dev, "step_cv", where, positive=False) if "step_cv" in dev else 0.0,
        source=str(dev.get("source", "")),
        assumptions=assumptions,
    )
    where = f"{origin} [link]"
    efficiency = float(lnk.get("efficiency", 1.0))
    allreduce = None
    if "allreduce_latency_s" in lnk:
        allreduce = (
            _number(lnk, "allreduce_latency_s", where, positive=False),
            _number(lnk, "allreduce_bandwidth_bytes_per_s", where),
        )
    link = LinkSpec(
        name=str(lnk.get("name", "")),
        latency_s=_number(lnk, "latency_s", where, positive=False),
        bandwidth=_number(lnk, "bandwidth_bytes_per_s", where) * efficiency,
        allreduce=allreduce,
        source=str(lnk.get("source", "")),
        handoff_s=_number(lnk, "pipeline_handoff_s", where, positive=False)
        if "pipeline_handoff_s" in lnk
        else 0.0,
    )
    timed = tuple(
        _timed(t, f"{origin} [[workloads]] {i + 1}")
        for i, t in enumerate(data.get("workloads", []))
    )
    return Profile(
        name=str(head.get("name", Path(origin).stem)),
        summary=str(head.get("summary", "")),
        kind=kind,
        device=device,
        link=link,
        timed=timed,
    )


def _timed(t: dict, where: str) -> Timed:
    try:
        sizes = tuple(int(n) for n in t["batch_sizes"])
        blocks = t["blocks"]
        local = {
            (
                entry["method"],
                tuple(sorted(entry.get("options", {}).items())),
                tuple(entry["shape"]),
            ): (
                tuple(int(n) for n in entry.get("batch_sizes", sizes)),
                tuple(entry["forward_s"]),
                tuple(entry.get("receive_s", ())),
            )
            for entry in t.get("local", [])
        }
        return Timed(
            model=t["model"],
            task=t["task"],
            width=float(t.get("width", 1.0)),
            precision=t.get("precision", "fp32"),
            threads=int(t.get("threads", 0)),
            batch_sizes=sizes,
            input_s=tuple(t["input_s"]),
            forward_s=tuple(tuple(b["forward_s"]) for b in blocks),
            backward_s=tuple(tuple(b["backward_s"]) for b in blocks),
            backward_first_s=tuple(tuple(b["backward_first_s"]) for b in blocks),
            update_s=tuple(float(b["update_s"]) for b in blocks),
            local=local,
            grouped={
                (int(g["neuron_groups"]), bool(g["mixing"])): {
                    **{
                        key: tuple(tuple(b[key]) for b in g["blocks"])
                        for key in ("forward_s", "backward_s", "backward_first_s")
                    },
                    "update_s": tuple(float(b["update_s"]) for b in g["blocks"]),
                }
                for g in t.get("grouped", [])
            },
            held={
                "sizes": tuple(int(n) for n in t.get("held_batch_sizes", ())),
                **{
                    key: tuple(tuple(b[key + "_held_s"]) for b in blocks)
                    for key in ("forward", "backward", "backward_first")
                    if t.get("held_batch_sizes")
                },
            },
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ProfileError(f"{where}: malformed ({type(e).__name__}: {e})") from None


def shipped() -> list[str]:
    """The names of the profiles that ship with lcbench."""
    return sorted(p.stem for p in SHIPPED.glob("*.toml"))


def load(name_or_path: str) -> Profile:
    """A shipped profile by name, or a profile file."""
    path = Path(name_or_path)
    if not path.suffix and (SHIPPED / f"{name_or_path}.toml").is_file():
        path = SHIPPED / f"{name_or_path}.toml"
    if not path.is_file():
        raise ProfileError(
            f"no profile '{name_or_path}' (shipped: {', '.join(shipped())}; or a "
            f".toml file written by lcbench calibrate)"
        )
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"cannot read profile {path}: {e}") from None
    return parse(data, str(path))


def dumps(data: dict) -> str:
    """``data`` (tables, arrays of tables, numbers, strings, booleans and arrays of them)
    as TOML that ``tomllib`` reads back equal."""
    lines: list[str] = []

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(float(v)) if isinstance(v, float) else str(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {type(v).__name__} as TOML")

    def table(prefix: str, body: dict, array: bool) -> None:
        if prefix:
            lines.extend(["", f"[[{prefix}]]" if array else f"[{prefix}]"])
        nested = []
        for k, v in body.items():
            if (
                isinstance(v, dict)
                and v
                and (not prefix or any(isinstance(x, (dict, list)) for x in v.values()))
            ):
                nested.append((k, v, False))
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                nested.append((k, v, True))
            else:
                lines.append(f"{k} = {value(v)}")
        for k, v, is_array in nested:
            name = f"{prefix}.{k}" if prefix else k
            for item in v if is_array else [v]:
                table(name, item, is_array)

    table("", data, False)
    return "\n".join(lines).lstrip("\n") + "\n"
