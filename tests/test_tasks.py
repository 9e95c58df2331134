import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar

from bench.data.tasks import TASKS, DataUnavailable, Task, iterate_batches, load_task

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


pytestmark = pytest.mark.usefixtures("isolated_env")


@pytest.fixture
def no_md5_check(monkeypatch):
    """torchvision's CIFAR loaders compare each file's md5 with the published files'
    (CIFAR10._check_integrity and _load_meta call torchvision.datasets.cifar.check_integrity);
    small test files cannot match, so check only that the files exist."""
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )


def _standardised(train, test):
    """Expected normalisation of raw (N, C, H, W) arrays: per-channel stats of train."""
    train, test = torch.as_tensor(train).double(), torch.as_tensor(test).double()
    mean, std = train.mean((0, 2, 3), keepdim=True), train.std((0, 2, 3), keepdim=True)
    return ((train - mean) / std).float(), ((test - mean) / std).float()


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _fake_cifar(root, classes, sizes):
    """Random uint8 images (N, 3, 32, 32) and labels written in the CIFAR python format."""
    rng = np.random.default_rng(0)
    label_key = "labels" if classes == 10 else "fine_labels"
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    splits = {}
    for name, n in sizes.items():
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, classes, n).tolist()
        batch = {
            "batch_label": name,
            "data": x.reshape(n, 3072),
            label_key: y,
            "filenames": [f"{i}.png" for i in range(n)],
        }
        if classes == 100:
            batch["coarse_labels"] = [c // 5 for c in y]
        _dump(folder / name, batch)
        splits[name] = (x, y)
    if classes == 10:
        _dump(
            folder / "batches.meta",
            {
                "label_names": [f"c{i}" for i in range(10)],
                "num_cases_per_batch": 3,
                "num_vis": 3072,
            },
        )
    else:
        _dump(
            folder / "meta",
            {
                "fine_label_names": [f"f{i}" for i in range(100)],
                "coarse_label_names": [f"k{i}" for i in range(20)],
            },
        )
    return splits


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loads_real_format(tmp_path, no_md5_check, offline, name, classes):
    if classes == 10:
        splits = _fake_cifar(
            tmp_path, 10, {f"data_batch_{i}": 3 for i in range(1, 6)} | {"test_batch": 4}
        )
        train = [splits[f"data_batch_{i}"] for i in range(1, 6)]
        test = splits["test_batch"]
    else:
        splits = _fake_cifar(tmp_path, 100, {"train": 15, "test": 4})
        train, test = [splits["train"]], splits["test"]
    train_x = np.concatenate([x for x, _ in train])
    train_y = [c for _, y in train for c in y]

    task = load_task(name, tmp_path)

    assert not offline
    assert (task.input_shape, task.num_classes, task.augment, task.default_model) == (
        (3, 32, 32),
        classes,
        "crop-flip",
        "resnet20",
    )
    assert task.train_x.shape == (15, 3, 32, 32) and task.test_x.shape == (4, 3, 32, 32)
    assert task.train_x.dtype == torch.float32 and task.train_y.dtype == torch.int64
    assert task.train_y.tolist() == train_y and task.test_y.tolist() == test[1]
    expected_train, expected_test = _standardised(train_x, test[0])
    torch.testing.assert_close(task.train_x, expected_train, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(task.test_x, expected_test, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(task.train_x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(task.train_x.std((0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)

    small = load_task(name, tmp_path, limit_train=2, limit_test=3)
    assert torch.equal(small.train_x, task.train_x[:2]) and torch.equal(
        small.test_y, task.test_y[:3]
    )


def test_data_dir_from_environment(tmp_path, monkeypatch, no_md5_check, offline):
    _fake_cifar(tmp_path, 10, {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 2})
    monkeypatch.setenv("LCBENCH_DATA", str(tmp_path))
    assert load_task("cifar10").train_x.shape[0] == 10


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "fashion-mnist"])
def test_missing_data_offline_says_where_to_put_it(tmp_path, monkeypatch, offline, name):
    monkeypatch.setenv("LCBENCH_SYSTEM_DATA", str(tmp_path / "no-system-copy"))
    data_dir = tmp_path / "data"
    with pytest.raises(DataUnavailable) as err:
        load_task(name, data_dir)
    message = str(err.value)
    assert offline, "the loader should have tried to download"
    assert "\n" not in message
    assert str(data_dir.resolve()) in message
    assert (
        "cifar-10-batches-py"
        if name == "cifar10"
        else "cifar-100-python"
        if name == "cifar100"
        else "t10k-images-idx3-ubyte"
    ) in message


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'mnist' .*cifar10"):
        load_task("mnist")


def test_digits_split_is_fixed():
    a, b = load_task("digits"), load_task("digits")
    assert a.train_x.shape == (1437, 1, 8, 8) and a.test_x.shape == (360, 1, 8, 8)
    assert (a.input_shape, a.num_classes, a.augment, a.default_model) == (
        (1, 8, 8),
        10,
        "none",
        "small-cnn",
    )
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert set(a.train_y.tolist()) == set(range(10)) == set(a.test_y.tolist())
    torch.testing.assert_close(a.train_x.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)


def _idx(magic, dims, payload):
    return gzip.compress(struct.pack(f">I{len(dims)}I", magic, *dims) + payload.tobytes())


def test_fashion_mnist_from_system_copy(tmp_path, monkeypatch, offline):
    """A fake Debian-style copy (gzipped IDX files) is unpacked into the cache once and loaded."""
    rng = np.random.default_rng(1)
    system = tmp_path / "datasets"
    (system / "fashion-mnist").mkdir(parents=True)
    raw = {}
    for split, n in [("train", 7), ("t10k", 5)]:
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        (system / "fashion-mnist" / f"{split}-images-idx3-ubyte.gz").write_bytes(
            _idx(0x803, (n, 28, 28), x)
        )
        (system / "fashion-mnist" / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            _idx(0x801, (n,), y)
        )
        raw[split] = (x[:, None], y)
    monkeypatch.setenv("LCBENCH_SYSTEM_DATA", str(system))

    task = load_task("fashion-mnist", tmp_path / "empty")

    assert not offline
    assert task.input_shape == (1, 28, 28) and task.augment == "none"
    assert task.train_x.shape == (7, 1, 28, 28) and task.test_x.shape == (5, 1, 28, 28)
    assert (
        task.train_y.tolist() == raw["train"][1].tolist()
        and task.test_y.tolist() == raw["t10k"][1].tolist()
    )
    expected_train, expected_test = _standardised(raw["train"][0], raw["t10k"][0])
    torch.testing.assert_close(task.train_x, expected_train, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(task.test_x, expected_test, atol=1e-5, rtol=1e-5)

    unpacked = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert sorted(p.name for p in unpacked) == sorted(
        [
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ]
    )
    assert torch.equal(load_task("fashion-mnist", tmp_path / "empty").test_x, task.test_x)
    assert unpacked == {
        p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()
    }


@pytest.mark.skipif(
    not SYSTEM_FASHION_MNIST.is_dir(),
    reason=f"no system Fashion-MNIST at {SYSTEM_FASHION_MNIST} (Debian package dataset-fashion-mnist)",
)
def test_fashion_mnist_system_copy_is_complete(tmp_path, offline):
    task = load_task("fashion-mnist", tmp_path / "empty")
    assert task.train_x.shape == (60000, 1, 28, 28) and task.test_x.shape == (10000, 1, 28, 28)
    assert (
        task.train_y.min() == 0
        and task.train_y.max() == 9
        and task.test_y.unique().tolist() == list(range(10))
    )


def _task(augment, x):
    y = torch.zeros(len(x), dtype=torch.int64)
    return Task("t", tuple(x.shape[1:]), 10, x, y, x, y, "resnet20", augment)


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_augment_none_is_identity():
    x = torch.randn(4, 3, 32, 32)
    assert _task("none", x).augment_batch(x, _seeded(0)) is x


def test_crop_flip_reproducible_and_shape():
    x = torch.randn(16, 3, 32, 32)
    task = _task("crop-flip", x)
    a, b = task.augment_batch(x, _seeded(3)), task.augment_batch(x, _seeded(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, task.augment_batch(x, _seeded(4)))


def test_crop_flip_of_constant_image_stays_in_padded_range():
    x = torch.full((64, 3, 32, 32), 2.5)
    out = _task("crop-flip", x).augment_batch(x, _seeded(0))
    assert set(out.unique().tolist()) == {0.0, 2.5}
    kept = (out == 2.5).flatten(1).sum(1)
    assert (kept >= 3 * 28 * 28).all() and (kept < 3 * 32 * 32).any()


def test_crop_flip_outputs_are_exactly_the_padded_crops_and_flips():
    """Every output is one of the 81 crops x 2 flips of the image, and all 162 occur."""
    image = torch.randn(2, 12, 12)
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    candidates = torch.stack(
        [
            crop.flip(-1) if flip else crop
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            for crop in [padded[:, dy : dy + 12, dx : dx + 12]]
        ]
    )
    x = image.expand(4000, 2, 12, 12)
    out = _task("crop-flip", x).augment_batch(x, _seeded(0))

    probe = torch.randn(2 * 12 * 12, dtype=torch.float64)
    match = (
        (
            (out.flatten(1).double() @ probe)[:, None]
            - (candidates.flatten(1).double() @ probe)[None]
        )
        .abs()
        .argmin(1)
    )
    assert torch.equal(out, candidates[match])
    assert match.unique().numel() == 162
    centred_flip = 2 * (4 * 9 + 4) + 1
    assert torch.equal(candidates[centred_flip], torch.flip(image, dims=[-1]))


def test_task_to_casts_x_only():
    x = torch.randn(3, 1, 8, 8)
    moved = _task("none", x).to("cpu", torch.float64)
    assert moved.train_x.dtype == torch.float64 and moved.test_x.dtype == torch.float64
    assert moved.train_y.dtype == torch.int64 and torch.equal(moved.train_x.float(), x)


@pytest.mark.parametrize("drop_last", [False, True])
def test_iterate_batches_covers_each_index_once(drop_last):
    batches = list(
        iterate_batches(103, 10, shuffle=True, generator=_seeded(0), drop_last=drop_last)
    )
    seen = torch.cat(batches)
    assert [len(b) for b in batches] == [10] * 10 + ([] if drop_last else [3])
    assert seen.unique().numel() == len(seen)
    if not drop_last:
        assert torch.equal(seen.sort().values, torch.arange(103))
    assert not torch.equal(seen, torch.arange(len(seen)))
    assert torch.equal(
        seen,
        torch.cat(
            list(iterate_batches(103, 10, shuffle=True, generator=_seeded(0), drop_last=drop_last))
        ),
    )


def test_iterate_batches_in_order_without_shuffle():
    assert torch.equal(
        torch.cat(list(iterate_batches(7, 3, shuffle=False, generator=None))), torch.arange(7)
    )


def test_task_registry():
    assert set(TASKS) == {
        "fashion-mnist",
        "seq-fashion-mnist",
        "digits",
        "synthetic",
        "cifar10",
        "cifar100",
        "imagenet32",
        "imagenet",
        "ptb",
    }
    assert TASKS["cifar100"].num_classes == 100 and TASKS["fashion-mnist"].input_shape == (
        1,
        28,
        28,
    )


def test_synthetic_task_is_fixed_and_has_every_class():
    a, b = load_task("synthetic"), load_task("synthetic")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.shape == (8192, 3, 32, 32) and a.test_x.shape == (1024, 3, 32, 32)
    counts = torch.bincount(a.train_y, minlength=10)
    assert counts.min() > 8192 / 10 / 3  # every class present in a fair share


CIFAR10_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.zip"
CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def _write_image_folders(root, classes, per_class, suffix=".png"):
    """Random images saved as ``root/<split>/<class>/<i><suffix>``; returns, per split, the
    written images (C, H, W) with the class name of each."""
    from PIL import Image

    rng = np.random.default_rng(1)
    written = {}
    for split, n in per_class.items():
        written[split] = []
        for name in reversed(classes):  # creation order must not matter
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                x = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(x).save(root / split / name / f"{i:04d}{suffix}")
                written[split].append((torch.from_numpy(x).permute(2, 0, 1), name))
    return written


@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_reads_image_folders_with_cifar_labels(tmp_path, offline, nested, monkeypatch):
    from bench.data import tasks

    root = tmp_path / "data"
    written = _write_image_folders(
        root / "cifar10" if nested else root, CIFAR10_NAMES, {"train": 3, "test": 2}
    )
    train_x, train_y, test_x, test_y = tasks.TASKS["cifar10"].load(root)
    for (x, y), pairs in (
        (((train_x, train_y)), written["train"]),
        ((test_x, test_y), written["test"]),
    ):
        assert x.dtype == torch.uint8 and x.shape == (len(pairs), 3, 32, 32)
        assert sorted(y.tolist()) == sorted(CIFAR10_NAMES.index(name) for _, name in pairs)
        by_image = {bytes(image.numpy()): CIFAR10_NAMES.index(name) for image, name in pairs}
        assert [by_image[bytes(image.numpy())] for image in x] == y.tolist()  # PNG: lossless
    assert train_y[:10].tolist() != sorted(
        train_y[:10].tolist()
    )  # shuffled: a slice has every class
    task = load_task("cifar10", root, limit_train=7)
    assert task.train_x.shape == (7, 3, 32, 32) and task.test_y.shape == (20,)
    monkeypatch.setattr(tasks, "_decode_folder", lambda *a: pytest.fail("decoded twice"))
    again = load_task("cifar10", root, limit_train=7)  # from the cache
    assert torch.equal(again.train_x, task.train_x) and torch.equal(again.test_y, task.test_y)


def test_image_folders_with_other_classes_are_refused_in_one_line(tmp_path, offline):
    names = [*CIFAR10_NAMES[:-1], "lorry"]
    _write_image_folders(tmp_path, names, {"train": 1, "test": 1})
    with pytest.raises(DataUnavailable) as err:
        load_task("cifar10", tmp_path)
    assert "lorry" in str(err.value) and "truck" in str(err.value) and "\n" not in str(err.value)


def test_cifar100_image_folders_take_the_alphabetical_fine_label_order(tmp_path, offline):
    names = [f"class{i:03d}" for i in range(100)]
    written = _write_image_folders(tmp_path, names, {"train": 1, "test": 1})
    task = load_task("cifar100", tmp_path)
    assert task.num_classes == 100 and sorted(task.train_y.tolist()) == list(range(100))
    assert len(written["test"]) == task.test_y.numel() == 100


@pytest.mark.skipif(not CIFAR10_ZIP.is_file(), reason=f"{CIFAR10_ZIP} is absent")
def test_the_shared_cifar10_jpeg_copy_decodes_with_cifar_labels(tmp_path, offline):
    """A slice of the public JPEG copy (cifar10/{train,test}/<class>/NNNN.jpg): each image
    decodes as PIL decodes it, under its class's CIFAR label."""
    import zipfile

    from PIL import Image

    with zipfile.ZipFile(CIFAR10_ZIP) as archive:
        names = [n for n in archive.namelist() if n.endswith(".jpg")]
        chosen = [
            n
            for split in ("train", "test")
            for c in CIFAR10_NAMES
            for n in [m for m in names if m.startswith(f"cifar10/{split}/{c}/")][:2]
        ]
        archive.extractall(tmp_path, chosen)
    train_x, train_y, test_x, test_y = TASKS["cifar10"].load(tmp_path)
    assert train_x.shape == (20, 3, 32, 32) and test_x.shape == (20, 3, 32, 32)
    expected = {}
    for name in chosen:
        image = torch.from_numpy(np.array(Image.open(tmp_path / name).convert("RGB"))).permute(
            2, 0, 1
        )
        expected[bytes(image.contiguous().numpy())] = CIFAR10_NAMES.index(name.split("/")[2])
    for x, y in ((train_x, train_y), (test_x, test_y)):
        assert [expected[bytes(image.numpy())] for image in x] == y.tolist()
