"""The reference documents every metric metrics.csv can hold: the names runs of every rule
write, and the names the executors write on ranks (read from their source), each matched by
a row of docs/records.md."""

import csv
import re
from pathlib import Path

import pytest

import methods
from bench import prepare, runner
from bench.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
#: a family's placeholder in docs/records.md and what it stands for
PLACEHOLDERS = {"NN": r"\d+", "PHASE": r"[a-z]+"}


def documented() -> list[re.Pattern]:
    """The metric names of docs/records.md's tables (first column, in backticks)."""
    text = (ROOT / "docs" / "records.md").read_text()
    names = []
    for line in text.splitlines():
        if line.startswith("| `"):
            names += re.findall(r"`([A-Za-z0-9_]+)`", line.split("|")[1])
    assert names, "no metric table in docs/records.md"
    out = []
    for name in names:
        pattern = re.escape(name)
        for token, regex in PLACEHOLDERS.items():
            pattern = pattern.replace(token, regex)
        out.append(re.compile(pattern + "$"))
    return out


def written_by_runs(tmp_path: Path) -> set[str]:
    """Every metric a short sequential run of each rule writes (sub-models, diagnostics and
    memory included)."""
    names = set()
    for method in methods.METHODS:
        options = {"neuron_groups": 1} if method == "gn" else {}  # an MLP has no width groups
        images = methods.METHODS[method].stage.needs_image  # a decoder wants image features
        model = "small-cnn" if images else "mlp"
        cfg = RunConfig(method=method, task="digits", model=model, epochs=1, batch_size=64,
                        limit_train=128, limit_test=64, out=str(tmp_path), checkpoint_every=0,
                        options=options)  # fmt: skip
        record = runner.execute(prepare.prepare(cfg), progress=False)
        with open(record.folder / "metrics.csv") as f:
            names |= {row["metric"] for row in csv.DictReader(f)}
    return names


def written_on_ranks() -> set[str]:
    """The metric names the rank executors write literally: rows keyed (stage, "name")."""
    names = set()
    for path in (ROOT / "bench" / "executors").glob("*.py"):
        text = path.read_text()
        names |= set(
            re.findall(r'\[\s*(?:label|rank_label|"")\s*,\s*"([a-z][a-z0-9_]+)"\s*\]', text)
        )
        names |= set(
            re.findall(r'\(\s*(?:label|rank_label|"")\s*,\s*"([a-z][a-z0-9_]+)"\s*\)', text)
        )
    return names


def test_every_metric_a_run_can_write_is_documented(tmp_path):
    patterns = documented()
    on_ranks = written_on_ranks()
    assert {"idle_time_s", "wall_time_s", "epoch_time_s"} <= on_ranks  # the reader reads them
    names = written_by_runs(tmp_path) | on_ranks
    missing = sorted(n for n in names if not any(p.match(n) for p in patterns))
    assert not missing, f"undocumented in docs/records.md: {', '.join(missing)}"


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_every_page_of_the_reference_is_linked_from_the_readme(page):
    assert f"docs/{page.name}" in (ROOT / "README.md").read_text()
