"""Which recipe makes DNI and cDNI learn where the table states none?

The local-critic paper (Lee & Lee, ICLR 2019) trains LC's network with Nesterov SGD 0.1 and does
not say how it trained its DNI(3) baseline; every published DNI that learns on CIFAR-10 trains
the network itself with Adam (Jaderberg et al. 2017, appendix C; eugenium/DGL's
``dni_comparisons``: one Adam at 3e-5, "doesnt converge for dni" on its SGD line). This study
runs every candidate on two settings, beside BP, LC and the no-signal floor:

- ``cifar``: ``make fidelity-check``'s setting (lc-vgg at width 0.25, a 10,240-image slice of
  CIFAR-10, K=4 at the paper's cuts, batch 64, 4 epochs, SGD 0.1);
- ``fmnist``: ``make learning-check``'s (the small CNN on Fashion-MNIST, K=2, 3 epochs, SGD 0.02).

The candidates (``CANDIDATES``): (a) the published recipe, Adam for the network and the
synthesizers, at the published 3e-5, at 1e-3 (a rate fit for a budget of a few epochs) and at
3e-4 between them, and at 1e-3 with the synthesizers at the LC tables' Adam 1e-4;
(b) SGD for the network, the synthesizer regressing on the summed-loss gradient, its output
divided by B (``synth_fit=sum``); (c) SGD for the network and, at the network's rate, for the
synthesizer (``synth_optimizer=network``); (d) the running-RMS fit (``synth_fit=rms``); (e) the
synthetic gradient scaled by 0.1 (koz4k/dni-pytorch's ``factor``); the plain L2 fit with
Adam 1e-4 under SGD, the local-critic tables' synthesizer as it stood; and (f) Adam for the
groups that step on synthetic gradients only, the last group (true loss) on the table's SGD as
under BP, LC and the floor (``net_optimizer="adam-synthetic"``), at 1e-3, 1e-4 and 3e-5. Every
candidate names its optimizers and rates, so that it stays itself whatever DNI's defaults.

Per candidate, rule and setting: the test accuracy, how far above the floor, ``synth_cosine``
and ``synth_norm_ratio`` per stage after 10, 100 and the last steps (the run's diagnostics, on
one test batch), and whether it diverged. Candidates are ranked by their mean accuracy above
the floor over both settings and both rules; ``choose`` takes, among those within a point of
the best, the one that departs least from a published recipe.

    python -m bench.studies.dni_recipe --data-dir DIR       (part of `make fidelity-check`)

writes ``results/dni-recipe.csv`` (one row per measurement, appended as measured: an
interrupted study continues where it stopped) and ``figures/dni-recipe.png``. About 80 minutes
on 2 idle cores; ``--settings fmnist`` alone takes about 15.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from bench import prepare
from bench.config import RunConfig, UsageError
from bench.executors.sequential import evaluate, train_step
from bench.measure import diagnostics
from bench.records import check_writable, write_atomic
from bench.studies import dni_signal

SETTINGS = {
    # make fidelity-check's setting, as the signal study has it, on DNI's own options
    "cifar": replace(dni_signal.FIDELITY, options={}, epochs=4),
    "fmnist": RunConfig(method="dni", task="fashion-mnist", groups=2, epochs=3, device="cpu"),
}
#: the local modules of the fidelity check, shrunk with the network (bench/experiments/fidelity.toml)
SHRUNK = {"cifar": {"lc": {"critic_filters": 32}, "dni": {"synth_filters": 32}}}
#: steps after which the synthetic gradients are probed (and the last step of the run)
PROBE_STEPS = (10, 100)
#: a run whose training loss is not finite, or exceeds this, has diverged (stopped there)
LOSS_BOUND = 1e3


@dataclass(frozen=True)
class Candidate:
    name: str
    departure: int  # 0: a published recipe; 1: one published part moved; 2: an lcbench fit
    source: str
    settings: dict = field(default_factory=dict)  # RunConfig fields
    options: dict = field(default_factory=dict)  # DNI options


ADAM = {"optimizer": "adam", "weight_decay": 0.0}
#: every candidate names its optimizers and rates, so that it stays itself whatever the defaults
SGD = {"net_optimizer": "run", "synth_lr": 1e-4}  # the network on the table's SGD 0.1
CANDIDATES = [
    Candidate(
        "sgd, l2, adam 1e-4",
        1,
        "the LC tables' synthesizer (section 3.1) under the table's SGD",
        options=SGD,
    ),
    Candidate(
        "(a) adam 3e-5",
        0,
        "eugenium/DGL dni_comparisons",
        {**ADAM, "lr": 3e-5},
        {"net_optimizer": "adam", "net_lr": 3e-5, "synth_lr": 3e-5},
    ),
    Candidate(
        "(a) adam 1e-3",
        0,
        "eugenium/DGL's recipe at a short budget's rate",
        {**ADAM, "lr": 1e-3},
        {"net_optimizer": "adam", "net_lr": 1e-3, "synth_lr": 1e-3},
    ),
    Candidate(
        "(a) adam 3e-4",
        0,
        "eugenium/DGL's recipe at a rate between the two",
        {**ADAM, "lr": 3e-4},
        {"net_optimizer": "adam", "net_lr": 3e-4, "synth_lr": 3e-4},
    ),
    Candidate(
        "(a) adam 1e-3, synth 1e-4",
        1,
        "the network as (a) 1e-3, the synthesizers at the LC tables' Adam 1e-4",
        {**ADAM, "lr": 1e-3},
        {"net_optimizer": "adam", "net_lr": 1e-3, "synth_lr": 1e-4},
    ),
    Candidate("(b) sgd, sum fit", 2, "lcbench", options={**SGD, "synth_fit": "sum"}),
    Candidate("(c) sgd, sgd synth", 2, "lcbench", options={**SGD, "synth_optimizer": "network"}),
    Candidate("(d) sgd, rms fit", 2, "lcbench", options={**SGD, "synth_fit": "rms"}),
    Candidate(
        "(e) sgd, factor 0.1",
        1,
        "koz4k/dni-pytorch factor",
        options={**SGD, "synth_factor": 0.1},
    ),
    Candidate(
        "(f) adam 1e-3 below, sgd last",
        2,
        "lcbench: Adam (a) for the groups on synthetic gradients, the table's SGD for the last",
        options={"net_optimizer": "adam-synthetic", "net_lr": 1e-3, "synth_lr": 1e-3},
    ),
    Candidate(
        "(f) adam 1e-4 below, sgd last",
        2,
        "lcbench: as (f) 1e-3, the groups below the last and the synthesizers at 1e-4",
        options={"net_optimizer": "adam-synthetic", "net_lr": 1e-4, "synth_lr": 1e-4},
    ),
    Candidate(
        "(f) adam 3e-5 below, sgd last",
        2,
        "lcbench: as (f) 1e-4, the groups below the last and the synthesizers at (a)'s 3e-5",
        options={"net_optimizer": "adam-synthetic", "net_lr": 3e-5, "synth_lr": 3e-5},
    ),
]
REFERENCES = ("bp", "lc", "frozen")


def config(setting: str, method: str, candidate: Candidate | None, data_dir) -> RunConfig:
    base = SETTINGS[setting]
    family = "dni" if method in ("dni", "cdni") else method
    options = dict(SHRUNK.get(setting, {}).get(family, {}))
    fields = {}
    if candidate is not None:
        options.update(candidate.options)
        fields = candidate.settings
    return replace(base, method=method, options=options, data_dir=data_dir, **fields)


def probe(stages, x, y) -> dict[str, dict[str, float]]:
    """``{stage: {synth_cosine, synth_norm_ratio}}`` on ``(x, y)``, by the run's diagnostics."""
    prepare.reset_states(stages, y.shape[0])
    rows = diagnostics.probe_rows(stages, x, y, prepare.classification_loss)
    out = {}
    for (label, metric), value in rows.items():
        if metric in ("synth_cosine", "synth_norm_ratio"):
            out.setdefault(label, {})[metric] = value
    return out


def train(cfg: RunConfig, progress=print) -> list[dict]:
    """One run of ``cfg`` on the sequential executor's steps: rows of its probes and its end."""
    prep = prepare.prepare(cfg)
    task, stages = prep.task, prep.stages
    generator = torch.Generator().manual_seed(cfg.seed)
    x_probe, y_probe = next(iter(task.test_batches(cfg.batch_size)))
    steps_per_epoch = task.steps(cfg.batch_size)
    last = steps_per_epoch * cfg.epochs
    rows, step, diverged, started = [], 0, False, time.perf_counter()

    def sample(at):
        for stage, values in probe(stages, x_probe, y_probe).items():
            rows.append({"step": at, "stage": int(stage), **values})

    for _ in range(cfg.epochs):
        for stage in stages:
            stage.train(True)
        prepare.reset_states(stages, cfg.batch_size)
        for x, y in task.train_batches(cfg.batch_size, generator):
            train_step(stages, step, x, y)
            step += 1
            if step in PROBE_STEPS or step == last:
                sample(step)
            if step % 20 == 0 or step == last:
                loss = stages[-1].pop_metrics().get("train_loss", 0.0)
                if not math.isfinite(loss) or loss > LOSS_BOUND:
                    diverged = True
                    break
        if diverged:
            sample(step)
            break
    prepare.reset_states(stages, prepare.eval_batch_size(cfg, task))
    scores = evaluate(
        stages, task.test_batches(prepare.eval_batch_size(cfg, task)), prepare.classification_loss
    )
    accuracy = scores["", "test_acc"]
    accuracy = accuracy if math.isfinite(accuracy) and not diverged else 1 / task.num_classes
    ended = f" (diverged at step {step})" if diverged else ""
    seconds = time.perf_counter() - started
    progress(f"  {cfg.method}: test accuracy {accuracy:.4f}{ended} in {seconds:.0f} s")
    end = {"step": step, "stage": 0, "test_acc": accuracy, "diverged": diverged}
    return [end, *rows]


def done_keys(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    frame = pd.read_csv(path)
    return set(zip(frame["setting"], frame["method"], frame["candidate"]))


def run(
    settings, path: Path, data_dir=None, methods=("dni", "cdni"), progress=print
) -> pd.DataFrame:
    """Every reference and candidate run of ``settings`` not yet in the CSV at ``path``."""
    done = done_keys(path)
    for setting in settings:
        jobs = [(m, None) for m in REFERENCES] + [(m, c) for c in CANDIDATES for m in methods]
        for method, candidate in jobs:
            name = candidate.name if candidate else "reference"
            if (setting, method, name) in done:
                continue
            progress(f"{setting} / {name}")
            rows = train(config(setting, method, candidate, data_dir), progress)
            frame = pd.read_csv(path) if path.exists() else pd.DataFrame()
            new = pd.DataFrame(
                [{"setting": setting, "method": method, "candidate": name, **r} for r in rows]
            )
            write_atomic(path, pd.concat([frame, new], ignore_index=True).to_csv(index=False))
    return pd.read_csv(path)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per setting, rule and candidate: accuracy, above the floor, diverged; and the ranking
    (mean above the floor over every setting and rule)."""
    ends = frame[frame["stage"] == 0]
    floors = ends[ends["method"] == "frozen"].set_index("setting")["test_acc"]
    cells = ends[ends["candidate"] != "reference"].copy()
    cells["above_floor"] = cells["test_acc"] - cells["setting"].map(floors)
    return cells[["setting", "method", "candidate", "test_acc", "above_floor", "diverged"]]


def choose(frame: pd.DataFrame, tolerance: float = 0.01) -> tuple[Candidate, pd.Series]:
    """The candidate with the best mean accuracy above the floor, or, among those within
    ``tolerance`` of it, the one that departs least from a published recipe."""
    mean = summary(frame).groupby("candidate")["above_floor"].mean().sort_values(ascending=False)
    known = {c.name: c for c in CANDIDATES}
    close = [known[n] for n, v in mean.items() if v >= mean.iloc[0] - tolerance and n in known]
    return min(close, key=lambda c: (c.departure, -mean[c.name])), mean


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Accuracy above the floor per candidate (bars per setting and rule), and synth_cosine
    against the step (one line per candidate, mean over stages)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    cells = summary(frame)
    cells["cell"] = cells["setting"] + " " + cells["method"]
    probes = frame[frame["stage"] > 0].groupby(["setting", "method", "candidate", "step"])
    cos = probes["synth_cosine"].mean().reset_index()
    fig, axes = plt.subplots(1, 2, figsize=(6.3, 4.2), layout="constrained")
    sns.barplot(cells, y="candidate", x="above_floor", hue="cell", ax=axes[0], orient="h")
    axes[0].axvline(0, color="black", lw=0.8)
    axes[0].set(xlabel="test accuracy above the floor", ylabel="", title="accuracy")
    axes[0].legend(fontsize=6, title=None)
    sns.lineplot(
        cos,
        x="step",
        y="synth_cosine",
        hue="candidate",
        style="setting",
        ax=axes[1],
        marker="o",
        errorbar=None,
    )
    axes[1].set(xscale="log", title="synth_cosine, stages' mean")
    axes[1].legend(fontsize=5, title=None, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    for ax in axes:
        ax.tick_params(labelsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.studies.dni_recipe", description=__doc__.split("\n")[0]
    )
    p.add_argument("--data-dir", help="where the CIFAR-10 copy is (as for lcbench run)")
    p.add_argument(
        "--settings", default="cifar,fmnist", help="comma-separated: cifar, fmnist (both)"
    )
    p.add_argument("--out", type=Path, default=Path("results/dni-recipe.csv"), help="the CSV")
    p.add_argument("--figure", type=Path, default=Path("figures/dni-recipe.png"))
    args = p.parse_args(argv)
    args.settings = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown or not args.settings:
        p.error(f"--settings takes {', '.join(SETTINGS)} (got {', '.join(unknown) or 'none'})")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        check_writable(args.out)  # before minutes of work, not after
        frame = run(
            args.settings, args.out, args.data_dir, progress=lambda text: print(text, flush=True)
        )
    except UsageError as e:
        print(f"dni_recipe: {e}", file=sys.stderr)
        sys.exit(2)
    frame = frame[frame["setting"].isin(args.settings)]
    print()
    print(summary(frame).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    best, mean = choose(frame)
    print("\nmean accuracy above the floor:")
    print(mean.to_string(float_format=lambda v: f"{v:+.4f}"))
    print(f"\nchosen: {best.name} ({best.source})")
    plot(frame, args.figure)
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
