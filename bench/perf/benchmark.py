"""`make bench`: step time of lcbench's learning rules, measured side by side in one run.

Two comparisons, each one interleaved round-robin so that drift in machine load hits every
contender alike (warm-up first; then per round every contender runs ``steps`` timed steps,
the start of the order rotating from round to round):

1. overhead: lcbench's BP (``methods.build_stages("bp")`` + ``sequential.train_step`` on the
   model cut into K groups) against a plain PyTorch loop on the same model, same initial
   weights, same batches and the same SGD settings; the goal is lcbench/plain <= 1.05.
2. methods: every rule's step time at K groups relative to BP at the same K.

Then (``speedup``) real runs on ranks: every decoupled rule on 2 ranks against BP in one
process and against data-parallel BP (DDP) on the same 2 ranks. ``make bench`` then runs the
GPU part (``bench.perf.gpu``), where CUDA is.

Figures are medians of the per-step times; ratios are ratios of those medians. A time budget
ends the rounds early on a loaded machine (every contender keeps the same number of steps).
The data are random CIFAR-shaped tensors (the data are not the point). The figures are
printed and written to ``results/bench/bench.csv``. On a CPU shared with other jobs,
``--threads 1`` avoids most of the slowdown from oversubscribed OpenMP threads.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import methods
from bench import models, prepare
from bench.config import RunConfig
from bench.executors import sequential
from bench.measure.provenance import cpu_name
from bench.models import runtime, split
from methods.base import TrainOptions

from . import speedup

INPUT_SHAPE, CLASSES = (3, 32, 32), 10
OUT = Path("results/bench/bench.csv")
COLUMNS = [
    "benchmark",
    "model",
    "groups",
    "method",
    "baseline",
    "ratio",
    "ms_per_step",
    "ms_q1",
    "ms_q3",
    "samples",
    "batch_size",
    "device",
    "device_name",
    "cpu",
    "threads",
    "torch",
    "load_avg",
]
#: the default run: ~5 min on 2 idle CPU cores (ResNet-20 BP step ~0.35 s); on a loaded
#: machine the time budget (seconds, 0 = none) ends the rounds early, after at least MIN_ROUNDS
DEFAULTS = dict(
    batch_size=128,
    warmup=2,
    overhead_steps=3,
    overhead_rounds=30,
    steps=1,
    rounds=20,
    budget=240,
    speedup_rounds=3,
    speedup_batches=20,
    speedup_models=("resnet20", "lc-vgg:32:10"),
)
QUICK = dict(
    batch_size=32,
    warmup=1,
    overhead_steps=1,
    overhead_rounds=3,
    steps=1,
    rounds=2,
    budget=0,
    speedup_rounds=0,
    speedup_batches=2,
    speedup_models=("resnet8",),
)
MIN_ROUNDS = 3
Step = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class Contender:
    """One thing being timed: a model under a rule (or the plain loop) and its step."""

    model: str
    groups: int
    method: str
    step: Step
    times: list[float] = field(default_factory=list)
    calls: int = 0

    def run(self, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
        """One training step on ``(x, y)``; returns its wall-clock seconds."""
        sequential.synchronize(device)
        start = time.perf_counter()
        self.step(self.calls, x, y)
        sequential.synchronize(device)
        self.calls += 1
        return time.perf_counter() - start

    def quartiles(self) -> tuple[float, float, float]:
        """(q1, median, q3) of the timed steps, in milliseconds."""
        ms = [1e3 * t for t in self.times]
        if len(ms) < 2:
            return ms[0], ms[0], ms[0]
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        return q1, statistics.median(ms), q3


def plain_step(
    model_name: str,
    train: TrainOptions,
    device: torch.device,
    *,
    seed: int = 0,
    input_shape=INPUT_SHAPE,
    precision: str = "fp32",
    compile: bool = False,
) -> Step:
    """The hand-written loop: model(x) -> cross-entropy -> backward -> SGD step, written as a
    practitioner would for speed: channels-last for a conv net, SGD fused on a GPU; with
    ``precision`` "bf16" the forward in autocast, with ``compile`` the model compiled as
    lcbench compiles a module (CUDA graphs on a GPU)."""
    torch.manual_seed(seed)  # the same initial weights as prepare.build_groups
    model = models.build_model(model_name, input_shape, CLASSES).to(device).train()
    conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if conv:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=train.lr,
        momentum=train.momentum,
        nesterov=train.nesterov,
        weight_decay=train.weight_decay,
        fused=device.type == "cuda" or None,
    )
    options = runtime.compile_options(device, cudagraphs=True)
    forward = torch.compile(model, **options) if compile else model

    def step(batch: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if options.get("mode") == "reduce-overhead" and compile:
            torch.compiler.cudagraph_mark_step_begin()
        if conv:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = forward(x)
        F.cross_entropy(logits.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def lcbench_step(
    model_name: str,
    method: str,
    groups: int,
    device: torch.device,
    *,
    seed: int = 0,
    input_shape=INPUT_SHAPE,
    split_by: str = "flops",
    precision: str = "fp32",
    compile: bool = False,
) -> Step:
    """Stages built as a run builds them (``prepare.build_groups``, ``methods.build_stages``,
    ``prepare.place``), stepped by the sequential executor."""
    cfg = RunConfig(
        method=method,
        groups=groups,
        model=model_name,
        seed=seed,
        split=split_by,
        precision=precision,
        compile=compile,
    ).validated()
    parts, _ = prepare.build_groups(cfg, input_shape, CLASSES)
    shapes = split.group_output_shapes(parts, input_shape)
    torch.manual_seed(seed)
    stages = methods.build_stages(
        cfg.method,
        parts,
        shapes,
        CLASSES,
        prepare.classification_loss,
        prepare.train_options(cfg, device),
        cfg.options,
        image_shape=input_shape,
    )
    prepare.place(cfg, stages, device)
    for stage in stages:
        stage.train(True)

    def step(batch: int, x: torch.Tensor, y: torch.Tensor) -> None:
        sequential.train_step(stages, batch, x, y)

    return step


def random_batches(
    count: int, batch_size: int, device: torch.device, *, seed: int = 0, input_shape=INPUT_SHAPE
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, *input_shape, generator=g).to(device),
            torch.randint(0, CLASSES, (batch_size,), generator=g).to(device),
        )
        for _ in range(count)
    ]


def interleave(
    contenders: Sequence[Contender],
    batches,
    device: torch.device,
    *,
    warmup: int,
    steps: int,
    rounds: int,
    deadline: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Warm every contender up, then ``rounds`` rounds in which each runs ``steps`` timed
    steps in turn (A A B B C C, next round starting one contender later). Every contender
    sees the same batches in the same order. Past MIN_ROUNDS, no round is started that
    would end after ``deadline`` (a ``time.perf_counter()`` value)."""
    for c in contenders:
        for i in range(warmup):
            c.run(*batches[i % len(batches)], device)
    n = len(contenders)
    for r in range(rounds):
        started = time.perf_counter()
        for c in (contenders[(r + i) % n] for i in range(n)):
            for s in range(steps):
                c.times.append(c.run(*batches[(r * steps + s) % len(batches)], device))
        took = time.perf_counter() - started
        if progress:
            progress(f"  round {r + 1}/{rounds}: {took:.1f} s")
        if (
            deadline is not None
            and r + 1 >= MIN_ROUNDS
            and r + 1 < rounds
            and time.perf_counter() + took > deadline
        ):
            if progress:
                progress(f"  time budget reached: stopping after {r + 1} rounds")
            return


def machine(device: torch.device) -> dict:
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg": round(os.getloadavg()[0], 2),
    }


def row(benchmark: str, c: Contender, baseline: Contender, batch_size: int, info: dict) -> dict:
    q1, median, q3 = c.quartiles()
    ratio = 1.0 if c is baseline else median / baseline.quartiles()[1]
    return {
        "benchmark": benchmark,
        "model": c.model,
        "groups": c.groups,
        "method": c.method,
        "baseline": baseline.method,
        "ratio": ratio,
        "ms_per_step": median,
        "ms_q1": q1,
        "ms_q3": q3,
        "samples": len(c.times),
        "batch_size": batch_size,
        **info,
    }


def run_benchmark(
    *,
    model_names: Sequence[str] = ("resnet20",),
    groups: Sequence[int] = (2, 4),
    rules: Sequence[str] = tuple(methods.METHODS),
    batch_size: int = DEFAULTS["batch_size"],
    device: torch.device = torch.device("cpu"),  # noqa: B008 (immutable)
    warmup: int = DEFAULTS["warmup"],
    overhead_steps: int = DEFAULTS["overhead_steps"],
    overhead_rounds: int = DEFAULTS["overhead_rounds"],
    steps: int = DEFAULTS["steps"],
    rounds: int = DEFAULTS["rounds"],
    budget: float = 0,
    seed: int = 0,
    input_shape=INPUT_SHAPE,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Both comparisons for every model; one row per contender (see COLUMNS). A ``budget``
    in seconds (0: none) is shared out between the comparisons, 1:2 (overhead:methods)."""
    rules = ["bp", *[methods.resolve(m).name for m in rules if methods.resolve(m).name != "bp"]]
    train = prepare.train_options(RunConfig(method="bp").validated())
    info = machine(device)
    say = progress or (lambda _: None)
    end = time.perf_counter() + budget if budget else None
    shares = [1, 2] * len(model_names)  # what is left of the budget goes by these weights

    def deadline() -> float | None:
        if end is None:
            return None
        weight, now = shares.pop(0), time.perf_counter()
        return now + (end - now) * weight / (weight + sum(shares))

    rows = []
    for name in model_names:
        batches = random_batches(
            max(steps, overhead_steps), batch_size, device, seed=seed, input_shape=input_shape
        )
        say(f"{name}: overhead, plain loop vs lcbench BP at K={', '.join(map(str, groups))}")
        plain = Contender(
            name, 1, "plain", plain_step(name, train, device, seed=seed, input_shape=input_shape)
        )
        bps = [
            Contender(
                name,
                k,
                "bp",
                lcbench_step(name, "bp", k, device, seed=seed, input_shape=input_shape),
            )
            for k in groups
        ]
        interleave(
            [plain, *bps],
            batches,
            device,
            warmup=warmup,
            steps=overhead_steps,
            rounds=overhead_rounds,
            deadline=deadline(),
            progress=progress,
        )
        rows += [row("overhead", c, plain, batch_size, info) for c in [plain, *bps]]

        say(f"{name}: methods {', '.join(rules)} at K={', '.join(map(str, groups))}")
        table = {
            k: [
                Contender(
                    name, k, m, lcbench_step(name, m, k, device, seed=seed, input_shape=input_shape)
                )
                for m in rules
            ]
            for k in groups
        }
        interleave(
            [c for k in groups for c in table[k]],
            batches,
            device,
            warmup=warmup,
            steps=steps,
            rounds=rounds,
            deadline=deadline(),
            progress=progress,
        )
        rows += [row("methods", c, table[k][0], batch_size, info) for k in groups for c in table[k]]
    return rows


def format_tables(rows: Sequence[dict]) -> str:
    """The overhead comparison (K=1: the plain loop on the unsplit model), then the methods
    relative to BP."""
    head = f"{'model':<10} {'K':>2} {'method':<7} {'ms/step':>9} {'IQR (ms)':>17} {'n':>4} {'ratio':>7}"

    def line(r: dict) -> str:
        iqr = f"{r['ms_q1']:.1f}-{r['ms_q3']:.1f}"
        return (
            f"{r['model']:<10} {r['groups']:>2} {r['method']:<7} {r['ms_per_step']:>9.1f} "
            f"{iqr:>17} {r['samples']:>4} {r['ratio']:>7.3f}"
        )

    out = [
        "Overhead: lcbench BP (build_stages + sequential.train_step) / plain PyTorch loop"
        " (goal <= 1.05)",
        head,
    ]
    out += [line(r) for r in rows if r["benchmark"] == "overhead"]
    out += ["", "Methods: step time relative to lcbench BP at the same K", head]
    out += [line(r) for r in rows if r["benchmark"] == "methods"]
    return "\n".join(out)


def write_csv(rows: Sequence[dict], path: Path, columns: Sequence[str] = COLUMNS) -> None:
    """Write ``rows`` atomically (a temporary file in the same folder, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(tmp, path)


def speedup_model(text: str, batch_size: int, batches: int) -> tuple[str, int, int]:
    """``MODEL[:BATCH[:BATCHES]]`` -> (model, batch, batches per epoch)."""
    name, *numbers = text.split(":")
    if len(numbers) > 2 or any(int(n) < 1 for n in numbers):
        raise ValueError(text)
    numbers = [int(n) for n in numbers] + [batch_size, batches][len(numbers) :]
    return name, numbers[0], numbers[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.perf.benchmark", description=__doc__.split("\n")[0]
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--models", nargs="+", default=["resnet20"])
    p.add_argument("--groups", nargs="+", type=int, default=[2, 4], help="values of K")
    p.add_argument("--methods", nargs="+", default=list(methods.METHODS))
    d = DEFAULTS
    p.add_argument("--batch-size", type=int, help=f"(default {d['batch_size']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps per contender ({d['warmup']})")
    p.add_argument(
        "--steps",
        type=int,
        help=f"timed steps per contender per round, methods comparison ({d['steps']})",
    )
    p.add_argument("--rounds", type=int, help=f"rounds, methods comparison ({d['rounds']})")
    p.add_argument(
        "--overhead-steps",
        type=int,
        help=f"timed steps per contender per round, plain vs BP ({d['overhead_steps']})",
    )
    p.add_argument(
        "--overhead-rounds", type=int, help=f"rounds, plain vs BP ({d['overhead_rounds']})"
    )
    p.add_argument(
        "--budget",
        type=float,
        help="seconds for the timed part: rounds end early "
        f"past it, after at least {MIN_ROUNDS} ({d['budget']}; 0: no limit)",
    )
    p.add_argument(
        "--speedup-rounds",
        type=int,
        help="rounds of the model-parallel comparison "
        f"(real runs on 2 ranks x 1 thread against BP in 1 process and DDP on "
        f"2 ranks x 1 thread; "
        f"{d['speedup_rounds']}; 0: skip it)",
    )
    p.add_argument(
        "--speedup-batches",
        type=int,
        help=f"batches per epoch of those runs ({d['speedup_batches']})",
    )
    p.add_argument(
        "--speedup-models",
        nargs="+",
        metavar="MODEL[:BATCH[:BATCHES]]",
        help="models of those runs, each with its batch and batches per epoch where "
        f"they are not --batch-size and --speedup-batches ({' '.join(d['speedup_models'])})",
    )
    p.add_argument(
        "--speedup-only",
        action="store_true",
        help="only the model-parallel comparison (skip the step-time ones)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a fast smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's, "
        f"{torch.get_num_threads()} here); 1 suffers less from other jobs' load",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT, help=f"CSV file (default {OUT})")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        if key != "speedup_models" and getattr(args, key) < (
            0 if key in ("warmup", "budget", "speedup_rounds") else 1
        ):
            p.error(f"--{key.replace('_', '-')} is too small: {getattr(args, key)}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1 (got {args.threads})")
    if min(args.groups) < 1:
        p.error(f"--groups must be at least 1 (got {min(args.groups)})")
    try:
        args.speedup_models = [
            speedup_model(text, args.batch_size, args.speedup_batches)
            for text in args.speedup_models
        ]
    except ValueError:
        p.error(
            f"--speedup-models takes MODEL[:BATCH[:BATCHES]], got {' '.join(args.speedup_models)}"
        )
    unknown = [
        m for m in [*args.models, *(m for m, _, _ in args.speedup_models)] if m not in models.MODELS
    ]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)} (choose from {', '.join(models.MODELS)})")
    try:
        args.methods = [methods.resolve(m).name for m in args.methods]
        args.device = prepare.resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine(device)
    print(
        f"lcbench bench: {info['device']} ({info['device_name']}), {info['threads']} threads, "
        f"torch {info['torch']}; batch {args.batch_size} of random {INPUT_SHAPE} inputs, "
        f"{CLASSES} classes; warm-up {args.warmup}; plain vs BP {args.overhead_rounds} rounds x "
        f"{args.overhead_steps} steps, methods {args.rounds} rounds x {args.steps} steps "
        f"(round-robin, medians; budget {args.budget:g} s); load average {info['load_avg']}",
        flush=True,
    )
    started = time.perf_counter()
    if not args.speedup_only:
        rows = run_benchmark(
            model_names=args.models,
            groups=args.groups,
            rules=args.methods,
            batch_size=args.batch_size,
            device=device,
            warmup=args.warmup,
            overhead_steps=args.overhead_steps,
            overhead_rounds=args.overhead_rounds,
            steps=args.steps,
            rounds=args.rounds,
            budget=args.budget,
            seed=args.seed,
            progress=lambda text: print(text, flush=True),
        )
        print()
        print(format_tables(rows))
        write_csv(rows, args.out)
        print(
            f"\nwrote {args.out} ({len(rows)} rows) in {time.perf_counter() - started:.0f} s; "
            f"load average {os.getloadavg()[0]:.2f}"
        )
    if args.speedup_rounds:
        started = time.perf_counter()
        parallel = []
        for name, batch_size, batches in args.speedup_models:
            print(
                f"\nmodel parallelism against BP and DDP: {name} on Fashion-MNIST, K=2, batch {batch_size}, "
                f"{batches} batches x 2 epochs per run, {args.speedup_rounds} rounds, each after "
                f"calibrating the machine for the forecast",
                flush=True,
            )
            parallel += speedup.run_speedups(
                model=name,
                batch_size=batch_size,
                batches=batches,
                rounds=args.speedup_rounds,
                profile_out=args.out.with_name(f"profile-cpu-{name}.toml"),
                progress=lambda text: print(text, flush=True),
            )
        print()
        print(speedup.format_table(parallel))
        path = args.out.with_name("speedup.csv")
        write_csv(parallel, path, list(parallel[0]))
        print(
            f"\nwrote {path} in {time.perf_counter() - started:.0f} s; "
            f"load average {os.getloadavg()[0]:.2f}"
        )


if __name__ == "__main__":
    main()
