"""LightningDataModules for the command line: digits (default), CIFAR, ImageFolder, FakeData.

Each exposes ``num_classes`` and ``num_channels`` so the command line can size the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets
from torchvision.transforms import v2 as T


class _Base(pl.LightningDataModule):
    num_classes: int
    num_channels: int

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be an int >= 0, got {num_workers!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset[Any]
        self.val_set: Dataset[Any]
        self.test_set: Dataset[Any]

    def _loader(self, dataset: Dataset[Any], shuffle: bool) -> DataLoader[Any]:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.test_set, shuffle=False)


class DigitsDataModule(_Base):
    """scikit-learn's bundled handwritten digits: 1,797 8x8 grey images, 10 classes, no download.

    A fixed, seeded split: ``test_fraction`` held out for the final test, ``val_fraction`` for
    validation, the rest for training. Pixels are scaled to [0, 1] and standardised.

    Args:
        batch_size: images per batch.
        val_fraction: share of the images used for validation.
        test_fraction: share of the images held out for testing.
        seed: seed of the split.
        num_workers: DataLoader worker processes.
    """

    num_classes = 10
    num_channels = 1

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < value < 1:
                raise ValueError(f"`{name}` must be a fraction in (0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1:
            raise ValueError("`val_fraction + test_fraction` must leave images to train on")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        x = (x - 0.3) / 0.4  # roughly zero mean, unit variance
        y = torch.tensor(labels, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_test = round(self.test_fraction * len(x))
        n_val = round(self.val_fraction * len(x))
        test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])


class CIFARDataModule(_Base):
    """CIFAR-10 or CIFAR-100 through torchvision (random crop with padding 4, horizontal flip).

    Args:
        root: folder holding (or to receive) ``cifar-10-batches-py`` / ``cifar-100-python``.
        variant: 10 or 100.
        download: download when the files are missing (needs internet).
        batch_size: images per batch.
        val_size: training images held out for validation (the official test set is the test).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        root: str = "data",
        variant: Literal[10, 100] = 10,
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 2,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if variant not in (10, 100):
            raise ValueError(f"`variant` must be 10 or 100, got {variant!r}")
        self.root, self.variant, self.download, self.val_size = root, variant, download, val_size
        self.num_classes = variant
        self.num_channels = 3
        if not download and not (Path(root) / self._folder).is_dir():
            raise self._missing()

    @property
    def _folder(self) -> str:
        return "cifar-10-batches-py" if self.variant == 10 else "cifar-100-python"

    def _missing(self) -> FileNotFoundError:
        return FileNotFoundError(
            f"CIFAR-{self.variant} is not in {os.path.abspath(self.root)!r}: put the extracted "
            f"{self._folder!r} folder there (from the official tar.gz), or pass "
            "--data.download=true on a machine with internet."
        )

    def prepare_data(self) -> None:
        self._dataset(train=True, transform=None)
        self._dataset(train=False, transform=None)

    def _dataset(self, train: bool, transform: Any) -> Dataset[Any]:
        cls = datasets.CIFAR10 if self.variant == 10 else datasets.CIFAR100
        try:
            return cls(self.root, train=train, transform=transform, download=self.download)
        except RuntimeError as err:  # missing or corrupted files
            raise self._missing() from err

    def setup(self, stage: str) -> None:
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        normalise = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
        augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *normalise])
        plain = T.Compose(normalise)
        train, val = self._dataset(True, augment), self._dataset(True, plain)
        order = torch.randperm(50000, generator=torch.Generator().manual_seed(0)).tolist()
        self.train_set = Subset(train, order[self.val_size :])
        self.val_set = Subset(val, order[: self.val_size])
        self.test_set = self._dataset(False, plain)


class ImageFolderDataModule(_Base):
    """Any folder of class subfolders: ``root/train/<class>/*.jpg``, ``root/val/<class>/...``
    (and optionally ``root/test``; the validation set is the test set otherwise).

    Args:
        root: the folder holding ``train`` and ``val``.
        image_size: side of the square crops.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
    """

    num_channels = 3

    def __init__(
        self, root: str, image_size: int = 224, batch_size: int = 64, num_workers: int = 4
    ) -> None:
        super().__init__(batch_size, num_workers)
        missing = [s for s in ("train", "val") if not (Path(root) / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"`root` {os.path.abspath(root)!r} must hold the folders 'train' and 'val' "
                f"(one subfolder per class); missing: {missing}"
            )
        self.root, self.image_size = Path(root), image_size
        self.num_classes = len(datasets.folder.find_classes(str(self.root / "train"))[0])

    def setup(self, stage: str) -> None:
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        tail = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
        size = self.image_size
        train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *tail])
        eval_tf = T.Compose([T.Resize(int(size * 1.14)), T.CenterCrop(size), *tail])
        self.train_set = datasets.ImageFolder(str(self.root / "train"), train_tf)
        self.val_set = datasets.ImageFolder(str(self.root / "val"), eval_tf)
        test = self.root / "test"
        self.test_set = datasets.ImageFolder(str(test), eval_tf) if test.is_dir() else self.val_set


class FakeDataModule(_Base):
    """torchvision's FakeData (random images, fixed per index): for smoke tests and timing.

    Args:
        num_samples: images in the training set (validation and test get a quarter each).
        image_size: side of the square images.
        num_classes: number of classes.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
    """

    num_channels = 3

    def __init__(
        self, num_samples: int = 256, image_size: int = 32, num_classes: int = 10,
        batch_size: int = 32, num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.num_samples, self.image_size, self.num_classes = num_samples, image_size, num_classes

    def setup(self, stage: str) -> None:
        tf = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True)])
        shape = (3, self.image_size, self.image_size)

        def fake(n: int, offset: int) -> Dataset[Any]:
            return datasets.FakeData(n, shape, self.num_classes, tf, random_offset=offset)

        quarter = max(1, self.num_samples // 4)
        self.train_set = fake(self.num_samples, 0)
        self.val_set = fake(quarter, 1_000_000)
        self.test_set = fake(quarter, 2_000_000)
