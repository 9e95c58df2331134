"""`lcbench report`: one self-contained HTML page per experiment, checked as a person would see
it in a real browser (headless Chromium, where installed): the table's cells, every figure
loaded, the failed run with its one-line error."""

import csv
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from bench.cli import main
from bench.executors import sequential
from bench.report import table

TINY = ["--task", "digits", "--model", "mlp", "--batch-size", "64", "--limit-train", "256",
        "--limit-test", "128", "--epochs", "2", "--quiet", "--experiment", "table2"]  # fmt: skip
CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None
)


def call(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main(args)
    return done.value.code, capsys.readouterr().err


class Page(HTMLParser):
    """What a page holds: its images (attributes) and the text of every table cell."""

    def __init__(self):
        super().__init__()
        self.images, self.cells, self.inside = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        self.inside = tag in ("td", "th") or self.inside
        if tag in ("td", "th"):
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.inside = False

    def handle_data(self, data):
        if self.inside:
            self.cells[-1] += data


def parsed(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """An experiment with one run ok (LC) and one that failed (DGL, raising in epoch 2)."""
    out = tmp_path_factory.mktemp("results")
    with pytest.raises(SystemExit) as done:
        main(["run", "--method", "lc", *TINY, "--out", str(out)])
    assert done.value.code == 0
    step = sequential.train_step
    calls = []

    def failing(stages, batch, x, y):
        calls.append(batch)
        if len(calls) == 6:
            raise RuntimeError("injected fault in epoch 2")
        return step(stages, batch, x, y)

    sequential.train_step = failing
    try:
        with pytest.raises(SystemExit) as done:
            main(["run", "--method", "dgl", *TINY, "--out", str(out)])
        assert done.value.code == 1
    finally:
        sequential.train_step = step
    return out


def test_report_holds_the_table_every_figure_and_each_run(results, capsys):
    code, _ = call(["report", str(results)], capsys)
    assert code == 0
    path = results / "report-table2.html"
    text = path.read_text()
    page = parsed(text)
    (lc,) = results.glob("table2/lc-*/metrics.csv")
    with open(lc) as f:
        final = [r for r in csv.DictReader(f) if r["metric"] == "test_acc" and not r["stage"]]
    ours = 100 * float(final[-1]["value"])  # the last epoch's, in percent
    assert f"{ours:.2f} (1)" in page.cells  # our cell as the table prints it (1 seed)
    with open(table.REFERENCES / "table2.csv") as f:
        published = [float(r["value"]) for r in csv.DictReader(f)]
    assert published and all(  # beside every published number
        any(c.startswith(f"{v:.2f}") for c in page.cells) for v in published
    )
    assert "injected fault in epoch 2" in " ".join(page.cells) and "failed" in page.cells
    assert len(page.images) >= 3 and all(
        i["src"].startswith("data:image/png;base64,") for i in page.images
    )
    assert not re.search(r'src="(?!data:)', text)  # nothing fetched from elsewhere: offline


@pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)"
)
def test_report_renders_in_headless_chromium_with_every_figure(results, capsys, tmp_path):
    call(["report", str(results), "--out", str(tmp_path)], capsys)
    path = tmp_path / "report-table2.html"
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    seen = parsed(done.stdout)
    drawn = parsed(path.read_text())
    assert seen.images and len(seen.images) == len(drawn.images)
    assert all(i.get("data-loaded") == "true" for i in seen.images)  # decoded, with a size
    assert seen.cells == drawn.cells  # the browser shows every cell the page holds


def test_report_of_a_folder_without_runs_is_one_line(tmp_path, capsys):
    code, err = call(["report", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "no run under" in err
