"""`lcbench plot RESULTS_DIR`: paper-style figures (PNG and PDF) of the runs under a folder.

- accuracy: test accuracy (a language model: perplexity) against epoch, per method;
- time: time per epoch, speedup against BP on one worker and against data-parallel BP (DDP)
  on the same ranks, per method and K;
- memory: peak memory per device (the largest stage, a DDP rank's replica) and per stage;
- tradeoff: accuracy against speedup, the trade-off every reader asks about;
- submodels: accuracy of every sub-model, and progressive inference (accuracy against mean
  FLOPs per sample as the confidence threshold moves);
- signals: how good the local signals are, per stage against epoch: the cosine between DNI's
  synthetic and the true gradient, the correlation between LC's critic losses and the true loss.

One colour per method (DDP its own) across all figures; seeds are averaged (bands: ± one
std); runs on ranks (distributed, ddp) are labelled with their ranks.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.ticker
from matplotlib.markers import MarkerStyle

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

import methods  # noqa: E402

from .table import (  # noqa: E402
    _rank,
    cells,
    facts,
    load_runs,
    method_label,
    rule,
    run_summary,
)


def colour(name: str) -> str:
    """The colour the rule (or ``ddp``) declares; one that no rule declares for a rule
    without one; grey for a name no rule has."""
    known = facts(name)
    if known is not None and known.colour:
        return known.colour
    plain = [m.name for m in methods.contenders() if not m.colour]
    if name not in plain:
        return "#555555"
    taken = {m.colour for m in methods.contenders() if m.colour}
    spare = [c for c in sns.color_palette("dark", 10).as_hex() if c not in taken]
    return spare[plain.index(name) % len(spare)]


def marker(name: str) -> str:
    """The marker the rule (or ``ddp``) declares."""
    known = facts(name)
    return known.marker if known is not None else "o"


def short_name(name: str) -> str:
    """The rule's name in figures (its declared ``short``)."""
    known = facts(name)
    return known.short if known is not None else name


def save(fig, out: Path, name: str) -> list[Path]:
    """``name``.png and .pdf in ``out``, each written to a temporary name then renamed."""
    paths = []
    for ext in ("png", "pdf"):
        path = out / f"{name}.{ext}"
        tmp = out / f".{name}.{os.getpid()}.tmp.{ext}"
        fig.savefig(tmp, dpi=150, bbox_inches="tight")
        os.replace(tmp, path)
        paths.append(path)
    plt.close(fig)
    return paths


def legend(fig, axes) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
        if ax.get_legend():
            ax.get_legend().remove()
    fig.legend(
        [handles[label] for label in labels],
        labels,
        loc="lower center",
        ncol=min(len(labels), 3),
        bbox_to_anchor=(0.5, 1.0),
        frameon=False,
        fontsize=7,
    )


def title(task: str, model: str) -> str:
    return f"{task}, {model}"


def accuracy(rows: pd.DataFrame, out: Path) -> list[Path]:
    whole = rows[(rows["stage"] == "") & rows["metric"].isin(["test_acc", "test_ppl"])].copy()
    whole = whole[
        ~(
            (whole["metric"] == "test_acc")
            & whole["run_id"].isin(whole[whole["metric"] == "test_ppl"]["run_id"])
        )
    ]  # a language model: perplexity only
    whole.loc[whole["metric"] == "test_acc", "value"] *= 100
    keys = facets(whole)
    fig, axes = wrapped(len(keys))
    for ax, (task, model) in zip(axes, keys):
        part = whole[(whole["task"] == task) & (whole["model"] == model)]
        curves = part.assign(rule=[rule(m, e) for m, e in zip(part["method"], part["executor"])])
        order = sorted(
            curves.groupby(["rule", "groups", "executor", "workers"]),
            key=lambda item: (
                _rank(item[0][0]),
                item[0][1:],
            ),
        )
        for (name, groups, executor, workers), runs in order:
            stats = runs.groupby("epoch")["value"].agg(["mean", "std"]).fillna(0)
            label = f"{short_name(name)}, {placed(groups, executor, workers)}"
            marker = "o" if executor == "sequential" else "s"  # modelled, or run on ranks
            (line,) = ax.plot(
                stats.index,
                stats["mean"],
                marker=marker,
                ms=3,
                label=label,
                color=colour(name),
                linestyle="-" if groups <= 2 else "--",
            )
            ax.fill_between(
                stats.index,
                stats["mean"] - stats["std"],
                stats["mean"] + stats["std"],
                color=line.get_color(),
                alpha=0.15,
            )
        perplexity = (part["metric"] == "test_ppl").any()
        ax.set(
            title=title(task, model),
            xlabel="epoch",
            ylabel="test perplexity" if perplexity else "test accuracy (%)",
        )
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    legend(fig, axes)
    return save(fig, out, "accuracy")


def placed(groups, executor, workers) -> str:
    """K for a split net (and its ranks where it ran on ranks); a DDP run's ranks."""
    if executor == "ddp":
        return f"{int(workers)} ranks"
    return f"K={int(groups)}" + (f", {int(workers)} ranks" if executor == "distributed" else "")


def label_of(
    method,
    groups,
    microbatches=None,
    neuron_groups=None,
    executor="sequential",
    workers=None,
    variant=None,
) -> str:
    name = method_label(method, int(groups), microbatches, neuron_groups, executor, variant=variant)
    return f"{name}, {placed(groups, executor, workers)}"


def labels(table: pd.DataFrame) -> list[str]:
    variants = table["variant"] if "variant" in table else [None] * len(table)
    return [
        label_of(*row)
        for row in zip(
            table["method"],
            table["groups"],
            table["microbatches"],
            table["neuron_groups"],
            table["executor"],
            table["workers"],
            variants,
        )
    ]


def colours(table: pd.DataFrame) -> list:
    return [colour(rule(m, e)) for m, e in zip(table["method"], table["executor"])]


def bars(ax, table: pd.DataFrame, column: str, xlabel: str, names: bool = True) -> None:
    """One horizontal bar per cell, in the table's order from the top; the cells' names on
    the y axis where ``names`` (the first panel of a row)."""
    ax.barh(range(len(table)), table[column], color=colours(table))
    ax.set_yticks(range(len(table)), labels(table) if names else [], fontsize=7)
    ax.set_ylim(len(table) - 0.5, -0.5)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.grid(axis="x", alpha=0.3)


def rows_of(count: int, cells: int, columns: int = 3, per_bar: float = 0.2) -> tuple:
    """``count`` rows of ``columns`` panels, a row a facet, for ``cells`` bars each at most
    (``per_bar`` inches each), at a page's width: ``(figure, axes)``."""
    height = max(2.0, 0.9 + per_bar * cells)
    return plt.subplots(count, columns, figsize=(PAGE_WIDTH, height * count), squeeze=False)


def facets(table: pd.DataFrame) -> list[tuple[str, str]]:
    """The (task, model) pairs: one column of panels each."""
    return sorted(set(zip(table["task"], table["model"])))


#: a page's text width (16 cm): every figure is drawn to be read at that width, two panels
#: to a row (a figure of more facets side by side is wider in proportion)
PAGE_WIDTH = 16 / 2.54


def grid(rows: int, columns: int, height: float = 2.6):
    """``rows`` x ``columns`` panels, two columns to a page's width."""
    width = PAGE_WIDTH * max(1.0, columns / 2)
    fig, axes = plt.subplots(rows, columns, figsize=(width, height * rows), squeeze=False)
    return fig, axes


def wrapped(count: int, height: float = 2.6) -> tuple:
    """``count`` panels two to a row at a page's width (a lone panel at 60% of it), the
    spare one hidden: ``(figure, the panels)``."""
    columns = min(count, 2)
    rows = math.ceil(count / 2)
    width = PAGE_WIDTH if columns == 2 else 0.6 * PAGE_WIDTH
    fig, axes = plt.subplots(rows, columns, figsize=(width, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def heading(fig, text: str) -> None:
    """A figure's title, wrapped to its width."""
    inches = fig.get_size_inches()[0]
    fig.suptitle(textwrap.fill(text, int(inches * 14)), fontsize=9)


def time_and_speedup(table: pd.DataFrame, out: Path) -> list[Path]:
    """Per (task, model), a row: time per epoch, speedup against BP on one worker beside each
    rule's bound, and speedup against DDP on the same ranks."""
    keys = facets(table)
    cells = max(((table["task"] == t) & (table["model"] == m)).sum() for t, m in keys)
    fig, axes = rows_of(len(keys), cells)
    for row, (task, model) in enumerate(keys):
        part = table[(table["task"] == task) & (table["model"] == model)]
        time, speedup, ddp = axes[row]
        bars(time, part, "time_s", "time per epoch (s)")
        bars(speedup, part, "speedup", "speedup vs BP (1 worker)\n| the rule's bound", names=False)
        speedup.set_title(title(task, model), fontsize=9)
        if part["bound"].notna().any():  # each parallel rule's own bound, beside its speedup
            speedup.scatter(
                part["bound"],
                range(len(part)),
                marker="|",
                s=120,
                lw=2,
                color="black",
                zorder=3,
            )
        bars(ddp, part, "speedup_ddp", "speedup vs DDP (same ranks)", names=False)
        for ax in (speedup, ddp):
            ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    heading(
        fig,
        "Time per training epoch on K workers (modelled: sequential executor; measured: "
        "distributed, ddp), speedup against BP on one worker beside the rule's bound, and "
        "against DDP",
    )
    fig.tight_layout()
    return save(fig, out, "time")


def memory(rows: pd.DataFrame, table: pd.DataFrame, out: Path) -> list[Path]:
    stages = rows[
        (rows["metric"] == "peak_mem_bytes") & (rows["epoch"] == 1) & (rows["stage"] != "")
    ].copy()
    stages["MiB"] = stages["value"] / 2**20
    keys = facets(table)
    cells = max(((table["task"] == t) & (table["model"] == m)).sum() for t, m in keys)
    fig, axes = rows_of(len(keys), cells, columns=2, per_bar=0.3)  # a bar per stage beside
    for row, (task, model) in enumerate(keys):
        part = table[(table["task"] == task) & (table["model"] == model)]
        device, per = axes[row]
        bars(device, part, "peak_mem_mib", "peak memory per device (MiB)")
        device.set_title(f"{title(task, model)}: the largest stage", fontsize=9)
        one_worker = part["bp_mem_mib"].max()
        if pd.notna(one_worker):
            device.axvline(one_worker, color=colour(methods.reference()), lw=1, ls="--")
            device.annotate(
                "BP on one worker",
                (one_worker, 0),
                xytext=(2, 2),
                textcoords="offset points",
                fontsize=7,
                color=colour(methods.reference()),
                xycoords=("data", "axes fraction"),
            )
        per_stage = stages[(stages["task"] == task) & (stages["model"] == model)].copy()
        per_stage["rule"] = [
            label_of(m, k, executor=e, workers=w)
            for m, k, e, w in zip(
                per_stage["method"],
                per_stage["groups"],
                per_stage["executor"],
                per_stage["workers"],
            )
        ]
        order = [
            label_of(m, k, executor=e, workers=w)
            for m, k, e, w in zip(part["method"], part["groups"], part["executor"], part["workers"])
        ]
        sns.barplot(
            data=per_stage,
            y="rule",
            x="MiB",
            hue="stage",
            order=list(dict.fromkeys(order)),
            ax=per,
            errorbar=None,
            palette="Greys",
            orient="h",
        )
        per.set_title("per stage (DDP: per rank)", fontsize=9)
        per.set(ylabel="", xlabel="peak memory (MiB)")
        per.tick_params(axis="y", labelsize=7)
        per.legend(title="stage", fontsize=6, title_fontsize=7)
        per.grid(axis="x", alpha=0.3)
    heading(fig, "Peak memory: parameters, gradients, optimizer state and saved activations")
    fig.tight_layout()
    return save(fig, out, "memory")


def tradeoff(table: pd.DataFrame, out: Path) -> list[Path]:
    keys = facets(table)
    fig, axes = wrapped(len(keys), height=3.2)
    for ax, (task, model) in zip(axes, keys):
        part = table[(table["task"] == task) & (table["model"] == model)]
        for _, r in part.iterrows():
            name = rule(r["method"], r["executor"])
            ax.scatter(
                r["speedup"],
                r["mean"],
                color=colour(name),
                s=55 if r["workers"] <= 2 else 90,
                marker=marker(name),
                edgecolor="black" if MarkerStyle(marker(name)).is_filled() else None,
                linewidth=0.4,
                label=short_name(name),
            )
            ax.annotate(
                placed(r["groups"], r["executor"], r["workers"]),
                (r["speedup"], r["mean"]),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
        ax.axvline(1.0, color="grey", lw=0.8, ls=":")
        ax.set(
            xlabel="speedup against BP (1 worker)",
            ylabel=part["metric"].iloc[0],
            title=title(task, model),
        )
        ax.grid(alpha=0.3)
    legend(fig, axes)
    return save(fig, out, "tradeoff")


def submodels(rows: pd.DataFrame, out: Path) -> list[Path]:
    final = rows[rows.groupby("run_id")["epoch"].transform("max") == rows["epoch"]]
    with_subs = final[final["metric"].str.startswith("progressive_acc")]["run_id"].unique()
    final = final[final["run_id"].isin(with_subs)]
    if final.empty:  # no rule with sub-models ran: say so rather than draw nothing
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.text(
            0.5, 0.5, "no run of a rule with sub-models (LC, DGL, GN-DGL)", ha="center", va="center"
        )
        ax.set_axis_off()
        return save(fig, out, "submodels")
    keys = facets(final)
    fig, axes = grid(2, len(keys))
    for col, (task, model) in enumerate(keys):
        part = final[(final["task"] == task) & (final["model"] == model)]
        subs = part[part["metric"] == "test_acc"].copy()
        subs["sub-model"] = subs["stage"].replace("", "final")
        subs["value"] *= 100
        subs["rule"] = [
            label_of(m, k, executor=e, workers=w)
            for m, k, e, w in zip(subs["method"], subs["groups"], subs["executor"], subs["workers"])
        ]
        hue = sorted(set(subs["sub-model"]) - {"final"}, key=int) + ["final"]
        sns.barplot(
            data=subs,
            y="rule",
            x="value",
            hue="sub-model",
            hue_order=hue,
            ax=axes[0][col],
            errorbar="sd",
            palette="Blues",
            orient="h",
        )
        axes[0][col].set_title(f"{title(task, model)}: every sub-model", fontsize=9)
        axes[0][col].set(ylabel="", xlabel="test accuracy (%)")
        axes[0][col].tick_params(axis="y", labelsize=7)
        axes[0][col].legend(title="sub-model", fontsize=6, title_fontsize=7)
        axes[0][col].grid(axis="x", alpha=0.3)
        prog = part[part["metric"].str.startswith("progressive_")].copy()
        prog["threshold"] = prog["metric"].str.rsplit("_t", n=1).str[1]
        prog["kind"] = prog["metric"].str.split("_").str[1]
        run = ["method", "groups", "executor", "workers"]
        wide = prog.pivot_table(
            index=[*run, "threshold"], columns="kind", values="value"
        ).reset_index()
        ax = axes[1][col]
        for (method, groups, executor, workers), curve in wide.groupby(run):
            curve = curve.sort_values("flops")
            ax.plot(
                curve["flops"] / 1e6,
                100 * curve["acc"],
                marker="o",
                ms=3,
                color=colour(method),
                ls="-" if groups <= 2 else "--",
                label=f"{short_name(method)}, {placed(groups, executor, workers)}",
            )
        ax.set_title("progressive inference (confidence 0.5 .. 0.99)", fontsize=9)
        ax.set(xlabel="mean MFLOPs per sample", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return save(fig, out, "submodels")


SIGNALS = {
    "synth_cosine": "synthetic vs true gradient: cosine",
    "critic_corr": "critic loss vs true loss: correlation",
    "update_cosine": "group's update vs backprop's: cosine",
}


def signals(rows: pd.DataFrame, out: Path) -> list[Path]:
    part = rows[rows["metric"].isin(list(SIGNALS))]
    if part.empty:  # no DNI or LC run: say so rather than draw nothing
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.text(
            0.5,
            0.5,
            "no run of a rule with a local signal to check (LC, DGL, DNI, cDNI)",
            ha="center",
            va="center",
        )
        ax.set_axis_off()
        return save(fig, out, "signals")
    keys = sorted(set(zip(part["task"], part["model"], part["metric"])))
    fig, axes = wrapped(len(keys), height=2.8)
    for ax, (task, model, metric) in zip(axes, keys):
        cell = part[(part["task"] == task) & (part["model"] == model) & (part["metric"] == metric)]
        for (method, groups, stage), runs in cell.groupby(["method", "groups", "stage"]):
            stats = runs.groupby("epoch")["value"].agg(["mean", "std"]).fillna(0)
            (line,) = ax.plot(
                stats.index,
                stats["mean"],
                marker="o",
                ms=3,
                color=colour(method),
                alpha=0.4 + 0.6 * int(stage) / int(groups),
                label=f"{short_name(method)} (K={groups}), stage {stage}",
            )
            ax.fill_between(
                stats.index,
                stats["mean"] - stats["std"],
                stats["mean"] + stats["std"],
                color=line.get_color(),
                alpha=0.1,
            )
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=f"{title(task, model)}", xlabel="epoch", ylabel=SIGNALS[metric], ylim=(-1, 1))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    legend(fig, axes)
    return save(fig, out, "signals")


def plot_all(results: Path, out: Path) -> list[Path]:
    """Every figure of the runs under ``results`` into ``out``."""
    rows = load_runs(results)
    if rows.empty:
        raise ValueError(f"no finished run under {results}")
    out.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="ticks", context="paper")
    table = cells(run_summary(rows))
    return [
        *accuracy(rows, out),
        *time_and_speedup(table, out),
        *memory(rows, table, out),
        *tradeoff(table, out),
        *submodels(rows, out),
        *signals(rows, out),
    ]
