"""The PTB and ImageNet32 loaders on small files written in the real formats, and the
sequential Fashion-MNIST view."""

import numpy as np
import pytest
import torch

from bench.data.tasks import DataUnavailable, load_task

PTB_LINES = {
    "train": [" the cat sat on the mat ", " a dog <unk> N years ago ", " the dog sat "],
    "valid": [" the cat "],
    "test": [" a cat sat on a dog ", " the zebra sat "],  # "zebra" is not in the vocabulary
}


pytestmark = pytest.mark.usefixtures("isolated_env")


def write_ptb(folder, repeat=1):
    folder.mkdir(parents=True)
    for split, lines in PTB_LINES.items():
        (folder / f"ptb.{split}.txt").write_text("\n".join(lines * repeat) + "\n")


def test_ptb_reads_mikolovs_files_into_word_ids(tmp_path, offline):
    write_ptb(tmp_path / "simple-examples" / "data")  # the layout of Mikolov's archive
    task = load_task("ptb", tmp_path)
    assert not offline
    words = "the cat sat on mat <eos> a dog <unk> N years ago".split()
    vocab = {w: i for i, w in enumerate(words)}  # order of first appearance in train
    train = [vocab[w] for line in PTB_LINES["train"] for w in line.split() + ["<eos>"]]
    test = [
        vocab.get(w, vocab["<unk>"]) for line in PTB_LINES["test"] for w in line.split() + ["<eos>"]
    ]
    assert task.train_tokens.tolist() == train and task.test_tokens.tolist() == test
    assert (task.input_shape, task.num_classes, task.default_model) == ((35,), 10000, "lstm-lm")


def test_ptb_windows_are_parallel_streams_with_next_word_targets(tmp_path):
    write_ptb(tmp_path / "ptb")
    task = load_task("ptb", tmp_path)
    task.bptt = 3
    tokens = task.train_tokens  # 18 words: 2 streams of 8 (+1 for the targets), 2 windows of 3
    assert tokens.numel() == 18
    batches = list(task.train_batches(2))
    assert task.steps(2) == len(batches) == 2
    streams, targets = tokens[:16].view(2, 8), tokens[1:17].view(2, 8)
    for t, (x, y) in enumerate(batches):
        assert torch.equal(x, streams[:, 3 * t : 3 * t + 3])
        assert torch.equal(y, targets[:, 3 * t : 3 * t + 3])
    assert task.test_size(2) == 2 * len(list(task.test_batches(2)))


def test_ptb_missing_offline_says_where_to_put_the_files(tmp_path, offline):
    with pytest.raises(DataUnavailable) as err:
        load_task("ptb", tmp_path / "data")
    message = str(err.value)
    assert offline and "\n" not in message
    assert "ptb.train.txt" in message and str((tmp_path / "data").resolve()) in message


def test_ptb_with_too_many_words_is_not_ptb(tmp_path):
    folder = tmp_path / "ptb"
    folder.mkdir()
    (folder / "ptb.train.txt").write_text(" ".join(f"w{i}" for i in range(10001)) + "\n")
    for split in ("valid", "test"):
        (folder / f"ptb.{split}.txt").write_text("w1 w2\n")
    with pytest.raises(DataUnavailable, match="not the preprocessed PTB"):
        load_task("ptb", tmp_path)


def write_imagenet32(folder, sizes, rng):
    """Batches in the published npz format: data (N, 3072) uint8, labels 1..1000."""
    folder.mkdir(parents=True)
    written = {}
    for name, n in sizes.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(1, 1001, n)
        np.savez(folder / name, data=data, labels=list(labels), mean=data.mean(0))
        written[name] = (data, labels)
    return written


def test_imagenet32_reads_the_npz_batches(tmp_path, offline):
    rng = np.random.default_rng(0)
    sizes = {f"train_data_batch_{i}.npz": 3 for i in range(1, 11)} | {"val_data.npz": 5}
    written = write_imagenet32(tmp_path / "imagenet32", sizes, rng)
    task = load_task("imagenet32", tmp_path, limit_test=4)
    assert (task.input_shape, task.num_classes) == ((3, 32, 32), 1000)
    assert task.n_train == 30 and task.n_test == 4
    first = written["train_data_batch_1.npz"]
    assert torch.equal(
        task.train_x[0], torch.from_numpy(first[0][0]).view(3, 32, 32)
    )  # R, G, B planes
    assert task.train_x.dtype == torch.uint8  # kept raw on the device
    assert task.train_y[:3].tolist() == (first[1] - 1).tolist()  # labels from 0
    raw = np.concatenate([written[f"train_data_batch_{i}.npz"][0] for i in range(1, 11)])
    raw = raw.reshape(-1, 3, 1024).astype(np.float64)
    mean, std = raw.mean((0, 2)), raw.std((0, 2), ddof=1)
    ((x, y),) = list(task.test_batches(10))
    expected = (
        torch.from_numpy(written["val_data.npz"][0][:4]).view(4, 3, 32, 32).double()
        - torch.tensor(mean).view(3, 1, 1)
    ) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(x.double(), expected, rtol=1e-5, atol=1e-5)
    assert y.tolist() == (written["val_data.npz"][1][:4] - 1).tolist()
    batches = list(task.train_batches(8, torch.Generator().manual_seed(0)))
    assert len(batches) == 3 and batches[0][0].dtype == torch.float32


def test_imagenet32_missing_says_where_to_get_it(tmp_path):
    with pytest.raises(DataUnavailable) as err:
        load_task("imagenet32", tmp_path)
    message = str(err.value)
    assert "\n" not in message and "Imagenet32_train_npz.zip" in message
    assert "image-net.org" in message and str(tmp_path.resolve()) in message


def test_imagenet_missing_says_what_to_put_where(tmp_path):
    with pytest.raises(DataUnavailable) as err:
        load_task("imagenet", tmp_path)
    assert "ILSVRC2012_devkit_t12.tar.gz" in str(err.value) and "\n" not in str(err.value)


def test_sequential_fashion_mnist_is_the_images_row_by_row(tmp_path, monkeypatch):
    from tests.test_tasks import _idx

    rng = np.random.default_rng(1)
    system = tmp_path / "datasets" / "fashion-mnist"
    system.mkdir(parents=True)
    for split, n in [("train", 6), ("t10k", 4)]:
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (system / f"{split}-images-idx3-ubyte.gz").write_bytes(_idx(0x803, (n, 28, 28), x))
        (system / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            _idx(0x801, (n,), rng.integers(0, 10, n, dtype=np.uint8))
        )
    monkeypatch.setenv("LCBENCH_SYSTEM_DATA", str(tmp_path / "datasets"))
    images, rows = (
        load_task("fashion-mnist", tmp_path / "x"),
        load_task("seq-fashion-mnist", tmp_path / "x"),
    )
    assert rows.input_shape == (28, 28) and rows.default_model == "lstm"
    assert torch.equal(rows.train_x, images.train_x[:, 0]) and torch.equal(
        rows.test_y, images.test_y
    )
