"""Classification tasks held in memory as normalised tensors, with on-device augmentation.

Data are looked for under `data_dir` (else `$LCBENCH_DATA`, else `$LCBENCH_CACHE/data`),
then in the system's copy (`$LCBENCH_SYSTEM_DATA`, default /usr/share/datasets, where
Debian's dataset-fashion-mnist lives), then downloaded by torchvision into the first.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

Splits = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

_FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DataUnavailable(Exception):
    """Data set not found locally and not downloadable; str(e) is one line saying where to put the files."""


@dataclass
class Task:
    """A data set as tensors: x normalised float (N, *input_shape), or stored raw (uint8) with
    the per-channel ``scale`` (mean, std) applied batch by batch; y int64. Every task offers
    ``steps``, ``test_size``, ``train_batches``, ``test_batches``, ``eval_batch_size`` and
    ``to`` (see also ``text.TokenTask``, ``imagenet.FolderTask``)."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    default_model: str
    augment: str
    scale: tuple[torch.Tensor, torch.Tensor] | None = None
    eval_batch_size: int = 1000

    @property
    def n_train(self) -> int:
        return self.train_x.shape[0]

    @property
    def n_test(self) -> int:
        return self.test_x.shape[0]

    def steps(self, batch_size: int) -> int:
        """Training batches per epoch (the last partial batch is dropped)."""
        return self.n_train // batch_size

    def test_size(self, batch_size: int) -> int:
        """Test samples (all of them, whatever the batch size)."""
        return self.n_test

    def to(self, device, dtype=torch.float32) -> Task:
        """Copy with x moved to `device` and cast to `dtype` (raw x keeps its type), y moved."""
        cast = (lambda x: x.to(device)) if self.scale else (lambda x: x.to(device, dtype))
        return replace(
            self,
            train_x=cast(self.train_x),
            train_y=self.train_y.to(device),
            test_x=cast(self.test_x),
            test_y=self.test_y.to(device),
            scale=self.scale and tuple(t.to(device, dtype) for t in self.scale),
        )

    def _ready(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return x
        mean, std = self.scale
        return (x.to(mean.dtype) - mean) / std

    def train_batches(self, batch_size: int, generator: torch.Generator):
        """One epoch of shuffled, augmented (x, y) batches of ``batch_size`` (the last partial
        one dropped); order and augmentation from ``generator``."""
        for idx in iterate_batches(
            self.n_train, batch_size, shuffle=True, generator=generator, drop_last=True
        ):
            yield self.augment_batch(self._ready(self.train_x[idx]), generator), self.train_y[idx]

    def test_batches(self, batch_size: int):
        """The test split in order, in batches of at most ``batch_size``."""
        for i in range(0, self.n_test, batch_size):
            yield self._ready(self.test_x[i : i + batch_size]), self.test_y[i : i + batch_size]

    def augment_batch(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """This task's training augmentation of batch `x`, all randomness from `generator` (on x.device)."""
        if self.augment == "none":
            return x
        if self.augment == "crop-flip":
            return crop_flip(x, generator)
        raise ValueError(f"unknown augmentation {self.augment!r}")


def crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Per sample: random crop of `x` (N, C, H, W) zero-padded by `padding`, then a horizontal flip with p=1/2."""
    n, c, h, w = x.shape
    dev = x.device
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=dev)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=dev)
    flip = torch.rand(n, 1, generator=generator, device=dev) < 0.5
    rows = dy + torch.arange(h, device=dev)  # (n, h): source rows in the padded image
    cols = dx + torch.arange(w, device=dev)  # (n, w): source columns
    cols = torch.where(flip, cols.flip(1), cols)
    padded = F.pad(x, (padding,) * 4)
    index = (
        rows[:, :, None] * padded.shape[3] + cols[:, None, :]
    )  # (n, h, w): flat source positions
    return padded.flatten(2).gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)


@dataclass(frozen=True)
class TaskInfo:
    """What is known about a task without loading it. Either `load(root)` gives raw
    (N, C, H, W) splits, normalised here and shaped to `input_shape`, or `build(root,
    limit_train=, limit_test=)` gives the task itself (text, ImageNet)."""

    input_shape: tuple[int, ...]
    num_classes: int
    default_model: str
    augment: str
    load: Callable[[Path], Splits] | None = None
    build: Callable[..., object] | None = None
    #: (training, test) samples of the full splits (a language model: windows of its steps),
    #: to price a run before its data is loaded (``lcbench sweep --plan``)
    sizes: tuple[int, int] | None = None


def cache_dir() -> Path:
    """Where unpacked system copies (and default downloads) go: `$LCBENCH_CACHE` or ~/.cache/lcbench."""
    return Path(os.environ.get("LCBENCH_CACHE") or Path.home() / ".cache" / "lcbench").expanduser()


def system_data_dir() -> Path:
    """The system's data sets: `$LCBENCH_SYSTEM_DATA` or /usr/share/datasets."""
    return Path(os.environ.get("LCBENCH_SYSTEM_DATA") or "/usr/share/datasets")


def _splits(cls, root: Path) -> tuple:
    return cls(root, train=True), cls(root, train=False)


def unavailable(
    name: str, root: Path, error: Exception, expected: str, folder: Path | None = None
) -> DataUnavailable:
    """The one-line error for data that is neither here nor downloadable: what to put where."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return DataUnavailable(
        f"{name}: not found in {root.resolve()} and download failed ({reason}); "
        f"put {expected} in {(folder or root).resolve()} (or pass --data-dir / set LCBENCH_DATA)"
    )


def _download(cls, root: Path, name: str, expected: str) -> tuple:
    """Train and test splits downloaded into `root`, or DataUnavailable saying where to put them."""
    try:
        return cls(root, train=True, download=True), cls(root, train=False, download=True)
    except (OSError, RuntimeError) as e:
        raise unavailable(name, root, e, expected) from e


def _gunzip(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with gzip.open(src) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _system_fashion_mnist() -> Path | None:
    """A torchvision root holding the system's gzipped Fashion-MNIST, unpacked once into the cache."""
    src = [system_data_dir() / "fashion-mnist" / f"{f}.gz" for f in _FASHION_MNIST_FILES]
    if not all(p.is_file() for p in src):
        return None
    stamp = repr([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in src])
    root = cache_dir() / f"fashion-mnist-{hashlib.sha1(stamp.encode()).hexdigest()[:12]}"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, p in zip(_FASHION_MNIST_FILES, src):
        if not (raw / name).is_file():
            _gunzip(p, raw / name)
    return root


def _load_fashion_mnist(root: Path) -> Splits:
    cls = torchvision.datasets.FashionMNIST
    try:
        train, test = _splits(cls, root)
    except RuntimeError:
        system = _system_fashion_mnist()
        if system is not None:
            train, test = _splits(cls, system)
        else:
            expected = "FashionMNIST/raw/{" + ",".join(_FASHION_MNIST_FILES) + "}[.gz]"
            train, test = _download(cls, root, "fashion-mnist", expected)
    return train.data.unsqueeze(1), train.targets, test.data.unsqueeze(1), test.targets


#: CIFAR-10's label order (CIFAR-100's fine labels are in alphabetical order)
CIFAR10_CLASSES = (
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
)


def _image_folder_root(root: Path, name: str) -> Path | None:
    """Where ``train/<class>/*`` and ``test/<class>/*`` are: ``root`` or ``root/<name>``."""
    for candidate in (root, root / name):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    return None


def _decode_folder(
    folder: Path, classes: tuple[str, ...] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``folder/<class>/*`` (PNG or JPEG, read by torchvision's ImageFolder) as
    uint8 (N, C, H, W) and labels in CIFAR's class order, shuffled by a fixed permutation so
    that the first N samples (``--limit-train``) hold every class."""
    data = torchvision.datasets.ImageFolder(folder)
    if classes is not None and tuple(data.classes) != tuple(sorted(classes)):
        raise DataUnavailable(
            f"{folder}: class folders {', '.join(data.classes)} are not "
            f"CIFAR's ({', '.join(classes)})"
        )
    order = {c: (classes.index(c) if classes else i) for i, c in enumerate(data.classes)}
    images, labels = [], []
    for path, index in data.samples:
        images.append(torchvision.transforms.functional.pil_to_tensor(data.loader(path)))
        labels.append(order[data.classes[index]])
    x, y = torch.stack(images), torch.tensor(labels, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


def _load_image_folders(root: Path, name: str, classes: tuple[str, ...] | None) -> Splits:
    """A copy laid out as ``train/<class>/*`` and ``test/<class>/*``, decoded once into a
    cache file (keyed by the folder, its file count and newest change)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    stamp = repr(
        (str(root.resolve()), len(files), max((p.stat().st_mtime_ns for p in files), default=0))
    )
    cached = cache_dir() / f"{name}-folders-{hashlib.sha1(stamp.encode()).hexdigest()[:12]}.pt"
    if cached.is_file():
        return torch.load(cached)
    splits = (*_decode_folder(root / "train", classes), *_decode_folder(root / "test", classes))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    try:
        torch.save(splits, tmp)
        os.replace(tmp, cached)
    finally:
        tmp.unlink(missing_ok=True)
    return splits


def _cifar_loader(
    cls, name: str, expected: str, classes: tuple[str, ...] | None
) -> Callable[[Path], Splits]:
    """torchvision's CIFAR files under ``root``, else image folders, else a download."""

    def load(root: Path) -> Splits:
        try:
            train, test = _splits(cls, root)
        except RuntimeError:
            folders = _image_folder_root(root, name)
            if folders is not None:
                return _load_image_folders(folders, name, classes)
            train, test = _download(
                cls, root, name, expected + " or train/<class>/, test/<class>/ image folders"
            )
        x = [torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous() for d in (train, test)]
        y = [torch.tensor(d.targets, dtype=torch.int64) for d in (train, test)]
        return x[0], y[0], x[1], y[1]

    return load


def _load_digits(root: Path) -> Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).unsqueeze(1)
    y = torch.from_numpy(digits.target).to(torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:-360], perm[-360:]
    return x[train], y[train], x[test], y[test]


def _load_synthetic(root: Path) -> Splits:
    """CIFAR-shaped Gaussian images whose label is the argmax of a fixed random linear map of
    the image: learnable, needs no files, for timing and for tests. Always the same data."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9216, 3, 32, 32, generator=g)
    y = (x.flatten(1) @ torch.randn(3 * 32 * 32, 10, generator=g)).argmax(1)
    return x[:8192], y[:8192], x[8192:], y[8192:]


def _build(module: str, function: str):
    """A task builder of ``bench.<module>`` (imported when used: those modules import this one)."""

    def build(root: Path, **limits):
        return getattr(importlib.import_module(f"bench.data.{module}"), function)(root, **limits)

    return build


TASKS: dict[str, TaskInfo] = {
    "fashion-mnist": TaskInfo(
        (1, 28, 28), 10, "small-cnn", "none", _load_fashion_mnist, sizes=(60000, 10000)
    ),
    # the same images read by an LSTM row by row: 28 steps of 28 pixels
    "seq-fashion-mnist": TaskInfo(
        (28, 28), 10, "lstm", "none", _load_fashion_mnist, sizes=(60000, 10000)
    ),
    "digits": TaskInfo((1, 8, 8), 10, "small-cnn", "none", _load_digits, sizes=(1437, 360)),
    "synthetic": TaskInfo((3, 32, 32), 10, "resnet20", "none", _load_synthetic, sizes=(8192, 1024)),
    "cifar10": TaskInfo(
        (3, 32, 32),
        10,
        "resnet20",
        "crop-flip",
        _cifar_loader(
            torchvision.datasets.CIFAR10,
            "cifar10",
            "cifar-10-python.tar.gz or its extracted cifar-10-batches-py/",
            CIFAR10_CLASSES,
        ),
        sizes=(50000, 10000),
    ),
    "cifar100": TaskInfo(
        (3, 32, 32),
        100,
        "resnet20",
        "crop-flip",
        _cifar_loader(
            torchvision.datasets.CIFAR100,
            "cifar100",
            "cifar-100-python.tar.gz or its extracted cifar-100-python/",
            None,
        ),
        sizes=(50000, 10000),
    ),
    "imagenet32": TaskInfo(
        (3, 32, 32),
        1000,
        "resnet32x2",
        "crop-flip",
        build=_build("imagenet", "build_imagenet32"),
        sizes=(1281167, 50000),
    ),
    "imagenet": TaskInfo(
        (3, 224, 224),
        1000,
        "tv-vgg13-bn",
        "torchvision",
        build=_build("imagenet", "build_imagenet"),
        sizes=(1281167, 50000),
    ),
    # word-level language model: windows of 35 words, 10,000 words of vocabulary
    "ptb": TaskInfo(
        (35,),
        10000,
        "lstm-lm",
        "none",
        build=_build("text", "build_ptb"),
        sizes=(929589 // 35, 82430 // 35),  # Mikolov's splits: 929,589 and 82,430 words
    ),
}


def _normalise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 copies standardised per channel with the train split's mean and std."""
    train, test = train.to(torch.float32, copy=True), test.to(torch.float32, copy=True)
    mean = train.mean((0, 2, 3), keepdim=True)
    std = train.std((0, 2, 3), keepdim=True)
    return train.sub_(mean).div_(std), test.sub_(mean).div_(std)


def _head(t: torch.Tensor, n: int | None) -> torch.Tensor:
    return t if n is None else t[:n].clone()


def load_task(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Task:
    """Load task `name` on the CPU; `limit_*` keep the first N samples (statistics use the full train split)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (choose from {', '.join(TASKS)})")
    info = TASKS[name]
    root = Path(data_dir or os.environ.get("LCBENCH_DATA") or cache_dir() / "data").expanduser()
    if info.build is not None:
        return info.build(root, limit_train=limit_train, limit_test=limit_test)
    train_x, train_y, test_x, test_y = info.load(root)
    train_x, test_x = _normalise(train_x, test_x)
    return Task(
        name=name,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        train_x=_head(train_x, limit_train).view(-1, *info.input_shape),
        train_y=_head(train_y, limit_train),
        test_x=_head(test_x, limit_test).view(-1, *info.input_shape),
        test_y=_head(test_y, limit_test),
        default_model=info.default_model,
        augment=info.augment,
    )


def iterate_batches(
    n: int,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Index tensors covering range(n) once, in random order when `shuffle`, on the generator's device."""
    device = generator.device if generator is not None else torch.device("cpu")
    order = (
        torch.randperm(n, generator=generator, device=device)
        if shuffle
        else torch.arange(n, device=device)
    )
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
