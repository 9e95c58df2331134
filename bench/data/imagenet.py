"""ImageNet tasks, from local copies.

- ``imagenet32``: the downsampled 32x32 ImageNet of Chrabaszcz, Loshchilov and Hutter (2017)
  in its published npz batch format (``train_data_batch_1.npz`` .. ``_10.npz``,
  ``val_data.npz``: ``data`` (N, 3072) uint8, the 1024 red, then green, then blue pixels of
  each image; ``labels`` 1..1000). Held on the device as uint8 (3.9 GB for the training
  split) and normalised batch by batch.
- ``imagenet``: torchvision's ImageNet (ILSVRC 2012: the devkit and the train and val
  archives or folders), streamed from disk with the usual augmentation (random resized
  crop 224, flip; test: resize 256, centre crop 224).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from .tasks import DataUnavailable, Task

IMAGENET32_TRAIN = [f"train_data_batch_{i}.npz" for i in range(1, 11)]
IMAGENET32_TEST = "val_data.npz"
IMAGENET32_WHERE = (
    "download Imagenet32_train_npz.zip and Imagenet32_val_npz.zip (Downsampled "
    "ImageNet 32x32) from https://image-net.org/download-images and unpack "
    f"{IMAGENET32_TRAIN[0]} .. {IMAGENET32_TRAIN[-1]} and {IMAGENET32_TEST} into"
)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet statistics


def _find_imagenet32(root: Path) -> tuple[Path, Path] | None:
    """Folders of the training batches and of the validation file."""
    for train, test in (
        (root, root),
        (root / "imagenet32", root / "imagenet32"),
        (root / "Imagenet32_train_npz", root / "Imagenet32_val_npz"),
    ):
        if (
            all((train / f).is_file() for f in IMAGENET32_TRAIN)
            and (test / IMAGENET32_TEST).is_file()
        ):
            return train, test
    return None


def _read_npz(path: Path, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as batch:
        data, labels = batch["data"][:limit], np.asarray(batch["labels"])[:limit]
    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)).view(-1, 3, 32, 32)
    return x, torch.from_numpy(labels.astype(np.int64) - 1)


def _read_split(paths: list[Path], limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for path in paths:
        left = None if limit is None else limit - sum(len(y) for y in ys)
        if left is not None and left <= 0:
            break
        x, y = _read_npz(path, left)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def channel_stats(x: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in float64 by chunks."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for i in range(0, x.shape[0], chunk):
        part = x[i : i + chunk].to(torch.float64)
        total += part.sum((0, 2, 3))
        squares += (part**2).sum((0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    std = ((squares - n * mean**2) / (n - 1)).sqrt()
    return mean.float().view(-1, 1, 1), std.float().view(-1, 1, 1)


def build_imagenet32(
    root: Path, *, limit_train: int | None = None, limit_test: int | None = None
) -> Task:
    found = _find_imagenet32(root)
    if found is None:
        raise DataUnavailable(
            f"imagenet32: not found in {root.resolve()}; {IMAGENET32_WHERE} "
            f"{(root / 'imagenet32').resolve()} (or pass --data-dir)"
        )
    train_dir, test_dir = found
    train_x, train_y = _read_split([train_dir / f for f in IMAGENET32_TRAIN], limit_train)
    test_x, test_y = _read_split([test_dir / IMAGENET32_TEST], limit_test)
    return Task(
        "imagenet32",
        (3, 32, 32),
        1000,
        train_x,
        train_y,
        test_x,
        test_y,
        "resnet32x2",
        "crop-flip",
        scale=channel_stats(train_x),
    )


@dataclass
class FolderTask:
    """A data set streamed from disk through a torchvision dataset and DataLoader."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    train_set: object
    test_set: object
    default_model: str
    device: torch.device = torch.device("cpu")
    workers: int = 8
    eval_batch_size: int = 250

    def steps(self, batch_size: int) -> int:
        return len(self.train_set) // batch_size

    def test_size(self, batch_size: int) -> int:
        return len(self.test_set)

    def _batches(self, loader):
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_batches(self, batch_size: int, generator: torch.Generator):
        seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
        loader = DataLoader(
            self.train_set,
            batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),
        )
        return self._batches(loader)

    def test_batches(self, batch_size: int):
        return self._batches(
            DataLoader(
                self.test_set,
                batch_size,
                num_workers=self.workers,
                pin_memory=self.device.type == "cuda",
            )
        )

    def to(self, device, dtype=None) -> FolderTask:
        return replace(self, device=torch.device(device))


def build_imagenet(
    root: Path, *, limit_train: int | None = None, limit_test: int | None = None
) -> FolderTask:
    normalise = transforms.Normalize(MEAN, STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalise,
        ]
    )
    test_tf = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalise]
    )
    folder = root / "imagenet" if (root / "imagenet").is_dir() else root
    try:
        train = torchvision.datasets.ImageNet(str(folder), "train", transform=train_tf)
        test = torchvision.datasets.ImageNet(str(folder), "val", transform=test_tf)
    except (OSError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataUnavailable(
            f"imagenet: not usable in {folder.resolve()} ({reason}); put "
            f"ILSVRC2012_devkit_t12.tar.gz and ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar "
            f"(or their extracted train/ and val/ folders) there (or pass --data-dir)"
        ) from e
    if limit_train is not None:
        train = Subset(train, range(min(limit_train, len(train))))
    if limit_test is not None:
        test = Subset(test, range(min(limit_test, len(test))))
    return FolderTask("imagenet", (3, 224, 224), 1000, train, test, "tv-vgg13-bn")
