"""Is DNI's label-blind signal there to be learned, and can its synthesizer keep up with it?

A synthesizer that sees only h_k can learn at most E[dL/dh_k | h_k]. Three measurements on one
DNI run (``synth_cosine``: the cosine between the synthetic and the true gradient of the probe
batch, as in the run's diagnostics) tell a defect in the rule's machinery from a limit of the
rule itself:

- **online**: the published rule for ``steps`` steps; the same with the synthesizers at 10x
  their rate; the same start with every group's learning rate at 0, so that the synthesizers'
  targets stand still. If the synthesizers reach a clear cosine only in the last, their
  targets, scale and fit work, and what defeats them is the network moving.
- **offline fit**: on the first run's network, frozen, fresh synthesizers (label-blind, and
  conditioned on the label as in cDNI) fitted for ``epochs`` passes over ``samples`` images, tested on
  ``held_out`` others: how much of the gradient E[g | h] (resp. E[g | h, y]) carries there.
- **staleness**: the first run trained on; that label-blind fit of the last synthesizer tested
  on the new targets ``later`` steps on: how fast the learnable signal moves away.

    python -m bench.studies.dni_signal --data-dir DIR     (part of `make fidelity-check`)

The defaults are `make fidelity-check`'s setting: lc-vgg at width 0.25, K=4 at the paper's cuts,
a slice of CIFAR-10, batch 64, lr 0.1 (about 7 minutes on 2 cores), with the synthesizer the
study was first run with (``STUDIED``: the DGL comparison's three 5x5 convs, of 32 filters, and
the running-RMS fit, not published), so that its table in the README stays reproducible.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from torch.nn import functional as F

from bench import prepare
from bench.config import RunConfig, UsageError
from bench.executors.sequential import train_step
from bench.measure import diagnostics
from bench.records import check_writable, write_atomic
from methods import modules
from methods.dni import DNIOptions

#: the synthesizer the study measured: three 5x5 convs (BN + ReLU between), the RMS fit, Adam
#: 1e-4, on the groups' SGD 0.1 (the run's optimizer: DNI's default is now its own Adam)
STUDIED = {
    "synth_filters": 32,
    "synth_layers": 2,
    "synth_kernel": 5,
    "synth_batchnorm": True,
    "synth_fit": "rms",
    "synth_lr": 1e-4,
    "net_optimizer": "run",
}
FIDELITY = RunConfig(
    method="dni",
    task="cifar10",
    model="lc-vgg",
    groups=4,
    split="paper",
    width=0.25,
    batch_size=64,
    lr=0.1,
    limit_train=10240,
    limit_test=2000,
    options=STUDIED,
    device="cpu",
)
PROBE_SIZE = 256


def batches(task, batch_size: int, generator: torch.Generator):
    """Training batches, epoch after epoch."""
    while True:
        yield from task.train_batches(batch_size, generator)


def train(stages, stream, start: int, steps: int) -> int:
    for step in range(start, start + steps):
        train_step(stages, step, *next(stream))
    return start + steps


def hold_groups(stages) -> None:
    """Every group's learning rate (and weight decay) at 0; the synthesizers still learn."""
    for stage in stages:
        for group in stage.optimizer.param_groups:
            group["lr"] = group["weight_decay"] = 0.0


def probe(stages, x, y) -> dict[int, tuple[float, float]]:
    """``{stage: (synth_cosine, synth_norm_ratio)}`` on the batch, by the run's diagnostics."""
    prepare.reset_states(stages, y.shape[0])
    rows = diagnostics.probe_rows(stages, x, y, prepare.classification_loss)
    return {
        int(label): (rows[label, "synth_cosine"], rows[label, "synth_norm_ratio"])
        for label, metric in rows
        if metric == "synth_cosine"
    }


def gradients_at_cuts(stages, task, samples: int, seed: int):
    """h_k and the true gradient of the summed loss at every cut, for ``samples`` training
    images in batches of the run (train-mode BatchNorm), the network unchanged."""
    device = next(stages[0].group.parameters()).device
    hs, gs, ys, n = [[] for _ in stages[:-1]], [[] for _ in stages[:-1]], [], 0
    with diagnostics.untouched(stages, device):
        generator = torch.Generator(device=device).manual_seed(seed)
        for x, y in batches(task, 64, generator):
            cuts, h = [], x
            for stage in stages:
                h = stage.group(h)
                if not stage.last:
                    cuts.append(h)
            grads = torch.autograd.grad(prepare.classification_loss(h, y).sum(), cuts)
            for k, (h_k, g_k) in enumerate(zip(cuts, grads)):
                hs[k].append(h_k.detach())
                gs[k].append(g_k)
            ys.append(y)
            n += y.shape[0]
            if n >= samples:
                break
    return (
        [torch.cat(h)[:samples] for h in hs],
        [torch.cat(g)[:samples] for g in gs],
        torch.cat(ys)[:samples],
    )


def fit_synthesizer(
    h, g, y, *, conditioned: bool, filters: int, epochs: int, lr: float, classes: int, seed: int = 0
) -> modules.Synthesizer:
    """A fresh synthesizer of the rule's architecture fitted (L2, Adam at ``lr``, batches of
    64) to the fixed targets ``g`` over ``epochs`` passes; its ``scale`` is their RMS."""
    torch.manual_seed(seed)
    synth = modules.Synthesizer(
        tuple(h.shape[1:]),
        classes,
        conditioned=conditioned,
        filters=filters,
        kernel=5,
        layers=2,
        batchnorm=True,
        fit="rms",
    )
    synth.scale.fill_(g.pow(2).mean().sqrt())
    optimizer = torch.optim.Adam(synth.parameters(), lr)
    for _ in range(epochs):
        for idx in torch.randperm(h.shape[0]).split(64):
            loss = F.mse_loss(synth(h[idx], y[idx] if conditioned else None), g[idx] / synth.scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return synth


@torch.no_grad()
def cosine(synth: modules.Synthesizer, h, g, y) -> tuple[float, float]:
    """Mean over batches of ``PROBE_SIZE`` of the cosine and norm ratio of the synthetic
    gradient against ``g``, each batch flattened (as ``synth_cosine``)."""
    cos, ratio = [], []
    for idx in torch.arange(h.shape[0]).split(PROBE_SIZE):
        label = y[idx] if synth.label is not None else None
        c, _, r = diagnostics.agreement(synth.gradient(h[idx], label), g[idx])
        cos.append(c)
        ratio.append(r)
    return sum(cos) / len(cos), sum(ratio) / len(ratio)


def run(
    cfg: RunConfig = FIDELITY,
    *,
    steps: int = 200,
    samples: int = 8192,
    held_out: int = 1024,
    epochs: int = 9,
    lr: float = 1e-3,
    later=(5, 15, 40),
    progress=print,
) -> list[dict]:
    """The three measurements (module doc) as tidy rows."""
    if prepare.resolve(cfg).method != "dni":
        raise UsageError(f"the study is of DNI's label-blind synthesizer, not {cfg.method}")
    rows = []

    def add(part, stage, synthesizer, step, values):
        rows.append(
            {
                "part": part,
                "stage": stage,
                "synthesizer": synthesizer,
                "step": step,
                "synth_cosine": values[0],
                "synth_norm_ratio": values[1],
            }
        )

    rate = cfg.options.get("synth_lr", DNIOptions.synth_lr)
    online = {
        "online, as published": (cfg, False),
        f"online, synthesizers at lr {10 * rate:g}": (
            replace(cfg, options={**cfg.options, "synth_lr": 10 * rate}),
            False,
        ),
        "online, groups at lr 0": (cfg, True),
    }
    runs = {}
    for part, (part_cfg, held) in online.items():
        prep = prepare.prepare(part_cfg)
        if held:
            hold_groups(prep.stages)
        stream = batches(prep.task, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
        started = time.perf_counter()
        step = train(prep.stages, stream, 0, steps)
        x, y = next(iter(prep.task.test_batches(PROBE_SIZE)))
        for stage, values in probe(prep.stages, x, y).items():
            add(part, stage, "label-blind", step, values)
        progress(f"{part}: {steps} steps in {time.perf_counter() - started:.0f} s")
        runs[part] = (prep, stream, step)
    prep, stream, step = runs["online, as published"]
    classes = prep.task.num_classes
    filters = prep.cfg.options.get("synth_filters", 128)
    hs, gs, y = gradients_at_cuts(prep.stages, prep.task, samples + held_out, cfg.seed + 1)
    fit, test = slice(0, samples), slice(samples, samples + held_out)
    blind = None  # the last stage's label-blind fit, for the staleness
    for k, (h, g) in enumerate(zip(hs, gs)):
        for conditioned in (False, True):
            started = time.perf_counter()
            synth = fit_synthesizer(
                h[fit],
                g[fit],
                y[fit],
                conditioned=conditioned,
                filters=filters,
                epochs=epochs,
                lr=lr,
                classes=classes,
            )
            name = "conditioned" if conditioned else "label-blind"
            add("offline fit", k + 1, name, step, cosine(synth, h[test], g[test], y[test]))
            progress(f"offline fit, stage {k + 1}, {name}: {time.perf_counter() - started:.0f} s")
            if not conditioned:
                blind = synth
    for later_step in later:
        step = train(prep.stages, stream, step, later_step - (step - steps))
        hs, gs, y = gradients_at_cuts(prep.stages, prep.task, samples + held_out, cfg.seed + 1)
        add(
            "staleness",
            len(hs),
            "label-blind",
            step,
            cosine(blind, hs[-1][test], gs[-1][test], y[test]),
        )
    progress(f"staleness: {steps} + {', '.join(map(str, later))} steps")
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a text table, one line per measurement."""
    frame = pd.DataFrame(rows)
    return frame.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.studies.dni_signal", description=__doc__.split("\n")[0]
    )
    p.add_argument("--data-dir", help="where the CIFAR-10 copy is (as for lcbench run)")
    p.add_argument("--steps", type=int, default=200, help="steps of the online runs (200)")
    p.add_argument("--samples", type=int, default=8192, help="images the offline fits see (8192)")
    p.add_argument("--held-out", type=int, default=1024, help="images they are tested on (1024)")
    p.add_argument("--epochs", type=int, default=9, help="passes of the offline fits (9)")
    p.add_argument("--out", type=Path, help="CSV file for the rows")
    args = p.parse_args(argv)
    for key in ("steps", "samples", "held_out", "epochs"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1 (got {getattr(args, key)})")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = replace(FIDELITY, data_dir=args.data_dir)
    if args.out is not None:
        try:
            check_writable(args.out)  # before minutes of work, not after
        except UsageError as e:
            print(f"dni_signal: {e}", file=sys.stderr)
            sys.exit(2)
    print(
        f"DNI's label-blind signal: {cfg.model} x {cfg.width} on {cfg.task}, K={cfg.groups} "
        f"({cfg.split} cuts), batch {cfg.batch_size}, lr {cfg.lr}",
        flush=True,
    )
    try:
        rows = run(
            cfg,
            steps=args.steps,
            samples=args.samples,
            held_out=args.held_out,
            epochs=args.epochs,
            progress=lambda text: print(text, flush=True),
        )
    except UsageError as e:
        print(f"dni_signal: {e}", file=sys.stderr)
        sys.exit(2)
    print()
    print(format_table(rows))
    if args.out is not None:
        write_atomic(args.out, pd.DataFrame(rows).to_csv(index=False))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
