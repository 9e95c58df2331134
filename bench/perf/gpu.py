"""`make bench`, GPU part (where CUDA is): what a step costs on a GPU, the figures users quote.

1. throughput: samples/s of lcbench's BP (the net cut into K groups, sequential executor)
   against the plain hand-written loop (``benchmark.plain_step``) on the same net, batch,
   SGD settings and data (on the GPU), at each setting (precision, and compilation: e.g.
   ``fp32``, ``bf16+compile``); goals: lcbench / plain >= 0.95 at every setting, and BP at
   the fastest setting >= 2x BP at the first (fp32);
2. methods: every rule's step time relative to BP's at the same setting, beside its FLOPs
   relative to BP's (one training step, forward, backward and local modules, counted by
   torch's FlopCounterMode); goal: ratio <= 1.2 x the FLOPs ratio (pipelined BP <= 1.3).

Each contender is timed over blocks of ``steps`` consecutive steps (one synchronisation
before and after, so the host may run ahead of the GPU as in a run), in rounds that rotate
the order; figures are medians over rounds. Compilation happens in the warm-up steps.
The code runs on any device (tests take the CPU); ``python -m bench.perf.gpu`` (in ``make
bench``) runs it where CUDA is, and says in one line that it skipped it elsewhere.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import methods
from bench import prepare
from bench.config import RunConfig
from bench.executors import sequential
from bench.models import runtime

from .benchmark import (
    INPUT_SHAPE,
    Contender,
    lcbench_step,
    machine,
    plain_step,
    random_batches,
    write_csv,
)

#: the issue's setting: lc-vgg cut at the paper's points into K=4, batch 128
DEFAULTS = dict(
    model="lc-vgg",
    groups=4,
    split_by="paper",
    batch_size=128,
    warmup=5,
    steps=20,
    rounds=5,
    settings=("fp32", "bf16+compile"),
)
OUT = Path("results/bench/gpu.csv")
COLUMNS = [
    "benchmark",
    "model",
    "groups",
    "method",
    "setting",
    "ms_per_step",
    "ms_q1",
    "ms_q3",
    "samples_per_s",
    "baseline",
    "ratio",
    "flops_ratio",
    "goal",
    "batch_size",
    "device",
    "device_name",
    "torch",
]


def parse_setting(text: str) -> tuple[str, bool]:
    """ "bf16+compile" -> ("bf16", True); "fp32" -> ("fp32", False)."""
    precision, _, extra = text.partition("+")
    if extra not in ("", "compile"):
        raise ValueError(f"unknown setting '{text}' (PRECISION or PRECISION+compile)")
    RunConfig(method="bp", precision=precision).validated()  # UsageError on a bad precision
    return precision, extra == "compile"


def at_precision(step, precision: str):
    """``step`` with the TF32 flags of ``precision`` (process-wide: contenders differ)."""

    def run(batch, x, y):
        runtime.set_precision(precision)
        step(batch, x, y)

    return run


def time_blocks(
    contenders: Sequence[Contender],
    batches,
    device: torch.device,
    *,
    warmup: int,
    steps: int,
    rounds: int,
    progress: Callable[[str], None] | None = None,
) -> None:
    """``warmup`` steps each, then ``rounds`` rounds in which each contender (the order
    rotating) runs ``steps`` steps in a row; one time per step per round."""
    for c in contenders:
        for i in range(warmup):
            c.step(c.calls, *batches[i % len(batches)])
            c.calls += 1
    n = len(contenders)
    for r in range(rounds):
        for c in (contenders[(r + i) % n] for i in range(n)):
            sequential.synchronize(device)
            start = time.perf_counter()
            for s in range(steps):
                c.step(c.calls, *batches[s % len(batches)])
                c.calls += 1
            sequential.synchronize(device)
            c.times.append((time.perf_counter() - start) / steps)
        if progress:
            progress(f"  round {r + 1}/{rounds}")


def training_flops(
    model: str,
    method: str,
    groups: int,
    split_by: str,
    device: torch.device,
    input_shape=INPUT_SHAPE,
    rows: int = 8,
) -> float:
    """FLOPs per sample of one training step of ``method`` (fp32, eager): every forward and
    backward pass of the groups and local modules, as FlopCounterMode counts them."""
    step = lcbench_step(model, method, groups, device, split_by=split_by, input_shape=input_shape)
    x, y = random_batches(1, rows, device, input_shape=input_shape)[0]
    with FlopCounterMode(display=False) as counter:
        step(0, x, y)
    return counter.get_total_flops() / rows


def run_gpu(
    device: torch.device,
    *,
    model: str = DEFAULTS["model"],
    groups: int = DEFAULTS["groups"],
    split_by: str = DEFAULTS["split_by"],
    batch_size: int = DEFAULTS["batch_size"],
    warmup: int = DEFAULTS["warmup"],
    steps: int = DEFAULTS["steps"],
    rounds: int = DEFAULTS["rounds"],
    settings: Sequence[str] = DEFAULTS["settings"],
    rules: Sequence[str] = tuple(methods.METHODS),
    input_shape=INPUT_SHAPE,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Both parts (see the module docstring); one row per contender (see COLUMNS)."""
    say = progress or (lambda _: None)
    train = prepare.train_options(RunConfig(method="bp").validated(), device)
    rules = ["bp", *[methods.resolve(m).name for m in rules if methods.resolve(m).name != "bp"]]
    batches = random_batches(steps, batch_size, device, input_shape=input_shape)
    info = {
        "model": model,
        "groups": groups,
        "batch_size": batch_size,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "torch": torch.__version__,
    }

    def contender(method, setting, *, plain=False) -> Contender:
        precision, compile = parse_setting(setting)
        build = (
            plain_step(
                model, train, device, input_shape=input_shape, precision=precision, compile=compile
            )
            if plain
            else lcbench_step(
                model,
                method,
                groups,
                device,
                split_by=split_by,
                input_shape=input_shape,
                precision=precision,
                compile=compile,
            )
        )
        return Contender(
            model,
            1 if plain else groups,
            "plain" if plain else method,
            at_precision(build, precision),
        )

    def row(benchmark, c, setting, baseline, **extra) -> dict:
        q1, median, q3 = c.quartiles()
        return {
            **info,
            "benchmark": benchmark,
            "method": c.method,
            "groups": c.groups,
            "setting": setting,
            "ms_per_step": median,
            "ms_q1": q1,
            "ms_q3": q3,
            "samples_per_s": 1e3 * batch_size / median,
            "baseline": baseline,
            **extra,
        }

    rows = []
    say(f"GPU throughput: plain loop vs lcbench BP ({model}, K={groups}), {', '.join(settings)}")
    pairs = [(contender("plain", s, plain=True), contender("bp", s)) for s in settings]
    time_blocks(
        [c for pair in pairs for c in pair],
        batches,
        device,
        warmup=warmup,
        steps=steps,
        rounds=rounds,
        progress=progress,
    )
    first = pairs[0][1].quartiles()[1]
    for setting, (plain, bp) in zip(settings, pairs):
        rows.append(row("gpu-throughput", plain, setting, "", ratio=1.0))
        rows.append(
            row(
                "gpu-throughput",
                bp,
                setting,
                "plain",
                ratio=plain.quartiles()[1] / bp.quartiles()[1],
                goal=0.95,
            )
        )
    rows.append(
        row(
            "gpu-speedup",
            pairs[-1][1],
            settings[-1],
            f"bp {settings[0]}",
            ratio=first / pairs[-1][1].quartiles()[1],
            goal=2.0,
        )
    )

    flops = {m: training_flops(model, m, groups, split_by, device, input_shape) for m in rules}
    for setting in settings:
        say(f"GPU methods at {setting}: {', '.join(rules)}")
        table = [contender(m, setting) for m in rules]
        time_blocks(
            table, batches, device, warmup=warmup, steps=steps, rounds=rounds, progress=progress
        )
        base = table[0].quartiles()[1]
        for c in table:
            share = flops[c.method] / flops["bp"]
            goal = 1.3 if c.method == "pipe-bp" else 1.2 * share
            rows.append(
                row(
                    "gpu-methods",
                    c,
                    setting,
                    "bp",
                    ratio=c.quartiles()[1] / base,
                    flops_ratio=share,
                    goal=goal,
                )
            )
    return rows


def format_tables(rows: Sequence[dict]) -> str:
    """Throughput beside the plain loop's, then each rule's cost beside its FLOPs."""
    out = [
        "GPU: lcbench BP (K groups) against a plain loop on the same net: samples/s "
        "(ratio goal >= 0.95)",
        f"{'setting':<14} {'plain':>10} {'lcbench BP':>11} {'ratio':>7}",
    ]
    throughput = [r for r in rows if r["benchmark"] == "gpu-throughput"]
    for plain, bp in zip(throughput[::2], throughput[1::2]):
        out.append(
            f"{bp['setting']:<14} {plain['samples_per_s']:>10.0f} "
            f"{bp['samples_per_s']:>11.0f} {bp['ratio']:>7.3f}"
        )
    for r in rows:
        if r["benchmark"] == "gpu-speedup":
            out.append(
                f"BP at {r['setting']} / BP at {r['baseline'].split()[-1]}: "
                f"{r['ratio']:.2f}x samples/s (goal >= {r['goal']:g})"
            )
    head = f"{'method':<8} {'ms/step':>8} {'vs BP':>7} {'FLOPs vs BP':>12} {'goal <=':>8}  ok"
    for setting in dict.fromkeys(r["setting"] for r in rows if r["benchmark"] == "gpu-methods"):
        out += [
            "",
            f"GPU: step time of every rule relative to BP at {setting}, beside its "
            f"FLOPs (goal: 1.2 x FLOPs ratio; pipelined BP 1.3)",
            head,
        ]
        for r in rows:
            if r["benchmark"] == "gpu-methods" and r["setting"] == setting:
                ok = "yes" if r["ratio"] <= r["goal"] else "no"
                out.append(
                    f"{r['method']:<8} {r['ms_per_step']:>8.2f} {r['ratio']:>7.3f} "
                    f"{r['flops_ratio']:>12.3f} {r['goal']:>8.3f}  {ok}"
                )
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="python -m bench.perf.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda where there is one), cuda, cuda:N")
    p.add_argument("--model", default=d["model"], help=f"(default {d['model']})")
    p.add_argument("--groups", type=int, default=d["groups"], help=f"K (default {d['groups']})")
    p.add_argument("--split", default=d["split_by"], help=f"how to cut (default {d['split_by']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--warmup", type=int, default=d["warmup"], help="untimed steps per contender")
    p.add_argument("--steps", type=int, default=d["steps"], help="steps per timed block")
    p.add_argument("--rounds", type=int, default=d["rounds"])
    p.add_argument(
        "--settings",
        nargs="+",
        default=list(d["settings"]),
        help="PRECISION or PRECISION+compile, the first the baseline "
        f"(default {' '.join(d['settings'])})",
    )
    p.add_argument("--methods", nargs="+", default=list(methods.METHODS))
    p.add_argument("--out", type=Path, default=OUT, help=f"CSV file (default {OUT})")
    args = p.parse_args(argv)
    try:
        for setting in args.settings:
            parse_setting(setting)
        args.methods = [methods.resolve(m).name for m in args.methods]
    except ValueError as e:
        p.error(str(e))
    if min(args.groups, args.batch_size, args.steps, args.rounds) < 1 or args.warmup < 0:
        p.error("--groups, --batch-size, --steps and --rounds must be at least 1, --warmup 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "auto" and not torch.cuda.is_available():
        print("GPU part of make bench: skipped (no CUDA on this machine)")
        return
    device = prepare.resolve_device(args.device)
    info = machine(device)
    print(
        f"lcbench bench, GPU part: {info['device']} ({info['device_name']}), torch "
        f"{info['torch']}; {args.model} at K={args.groups} ({args.split}), batch "
        f"{args.batch_size}; warm-up {args.warmup}, {args.rounds} rounds of {args.steps} "
        f"steps per contender (medians)",
        flush=True,
    )
    started = time.perf_counter()
    rows = run_gpu(
        device,
        model=args.model,
        groups=args.groups,
        split_by=args.split,
        batch_size=args.batch_size,
        warmup=args.warmup,
        steps=args.steps,
        rounds=args.rounds,
        settings=args.settings,
        rules=args.methods,
        progress=lambda text: print(text, flush=True),
    )
    print()
    print(format_tables(rows))
    write_csv(rows, args.out, COLUMNS)
    print(f"\nwrote {args.out} ({len(rows)} rows) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
