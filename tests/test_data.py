"""The LightningDataModules of the command line (nam_lightning.data): splits, shapes, errors."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from nam_lightning.data import (
    CIFARDataModule,
    DigitsDataModule,
    FakeDataModule,
    ImageFolderDataModule,
)

N_DIGITS = 1797


def rows(dataset: TensorDataset) -> Counter[tuple[bytes, int]]:
    """The dataset as a multiset of (image bytes, label)."""
    x, y = dataset.tensors
    return Counter((img.numpy().tobytes(), int(label)) for img, label in zip(x, y, strict=True))


def digits(**kwargs: object) -> DigitsDataModule:
    dm = DigitsDataModule(**kwargs)  # type: ignore[arg-type]
    dm.setup("fit")
    return dm


def write_image_folder(root: Path, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """A tiny ImageFolder: 2 classes, 3 PNGs of different sizes per class and split."""
    g = torch.Generator().manual_seed(0)
    for split in splits:
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                side = 20 + 4 * i
                pixels = torch.randint(0, 256, (side, side + 2, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


# --- digits ----------------------------------------------------------------------------------


def test_digits_split_sizes_sum_to_the_whole_dataset() -> None:
    dm = digits()
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sizes == [N_DIGITS - 359 - 180, 180, 359]  # round(0.1 * 1797), round(0.2 * 1797)
    assert sum(sizes) == N_DIGITS


def test_digits_splits_partition_the_dataset() -> None:
    """Disjoint and complete: the three splits together are exactly the dataset (as a multiset,
    since the digits dataset itself may repeat an image)."""
    from sklearn.datasets import load_digits

    dm = digits()
    images, labels = load_digits(return_X_y=True)
    x = (torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0 - 0.3) / 0.4
    whole = rows(TensorDataset(x, torch.tensor(labels)))
    parts = [rows(dm.train_set), rows(dm.val_set), rows(dm.test_set)]
    assert parts[0] + parts[1] + parts[2] == whole
    # no image occurs in two splits more often than it occurs in the dataset
    for a, b in ((0, 1), (0, 2), (1, 2)):
        for key in parts[a].keys() & parts[b].keys():
            assert parts[a][key] + parts[b][key] <= whole[key]


def test_digits_split_is_fixed_by_the_seed() -> None:
    a, b, c = digits(seed=0), digits(seed=0), digits(seed=1)
    for name in ("train_set", "val_set", "test_set"):
        for ta, tb in zip(getattr(a, name).tensors, getattr(b, name).tensors, strict=True):
            assert torch.equal(ta, tb)
    assert not torch.equal(a.test_set.tensors[0], c.test_set.tensors[0])
    assert len(a.test_set) == len(c.test_set)
    # the split does not depend on the global random state
    torch.manual_seed(123)
    assert torch.equal(digits(seed=0).val_set.tensors[1], a.val_set.tensors[1])


def test_digits_fractions_set_the_split_sizes() -> None:
    dm = digits(val_fraction=0.25, test_fraction=0.5)
    assert (len(dm.val_set), len(dm.test_set)) == (round(0.25 * N_DIGITS), round(0.5 * N_DIGITS))
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == N_DIGITS


def test_digits_values_shapes_and_sizes() -> None:
    dm = digits()
    assert (dm.num_classes, dm.num_channels) == (10, 1)
    x, y = dm.train_set.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.long
    assert x.shape[1:] == (1, 8, 8)
    everything = torch.cat([dm.train_set.tensors[0], dm.val_set.tensors[0], dm.test_set.tensors[0]])
    # pixels 0..16 scaled to [0, 1], then (p - 0.3) / 0.4
    assert everything.min() == pytest.approx(-0.75)
    assert everything.max() == pytest.approx(1.75)
    assert abs(float(everything.mean())) < 0.2
    assert 0.7 < float(everything.std()) < 1.3
    labels = torch.cat([dm.train_set.tensors[1], dm.val_set.tensors[1], dm.test_set.tensors[1]])
    assert set(labels.tolist()) == set(range(10))


def test_digits_loaders() -> None:
    dm = digits(batch_size=16)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,)
    # validation and test are not shuffled: two passes give the same first batch
    for loader in (dm.val_dataloader, dm.test_dataloader):
        first, again = next(iter(loader())), next(iter(loader()))
        assert torch.equal(first[0], again[0])
    assert sum(len(b[1]) for b in dm.test_dataloader()) == len(dm.test_set)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction + test_fraction"),
        ({"val_fraction": 0.6, "test_fraction": 0.6}, "val_fraction + test_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_digits_bad_arguments(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"`{name}`")):
        DigitsDataModule(**kwargs)  # type: ignore[arg-type]


# --- FakeData --------------------------------------------------------------------------------


def test_fakedata_shapes_and_sizes() -> None:
    dm = FakeDataModule(num_samples=32, image_size=16, num_classes=5, batch_size=8)
    dm.setup("fit")
    assert (dm.num_classes, dm.num_channels) == (5, 3)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (32, 8, 8)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
    assert y.shape == (8,) and int(y.min()) >= 0 and int(y.max()) < 5
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # tiny sets still get a validation and test image
    small = FakeDataModule(num_samples=2)
    small.setup("fit")
    assert len(small.val_set) == len(small.test_set) == 1


def test_fakedata_is_deterministic_and_splits_differ() -> None:
    a, b = FakeDataModule(num_samples=8, image_size=8), FakeDataModule(num_samples=8, image_size=8)
    a.setup("fit")
    torch.manual_seed(99)  # the images depend on the index only, not on the global state
    b.setup("fit")
    for i in range(3):
        assert torch.equal(a.train_set[i][0], b.train_set[i][0])
        assert a.train_set[i][1] == b.train_set[i][1]
        assert torch.equal(a.test_set[i % 2][0], b.test_set[i % 2][0])
    assert torch.equal(a.train_set[0][0], a.train_set[0][0])
    assert not torch.equal(a.train_set[0][0], a.val_set[0][0])
    assert not torch.equal(a.val_set[0][0], a.test_set[0][0])


# --- ImageFolder -----------------------------------------------------------------------------


def test_imagefolder_classes_shapes_and_test_fallback(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs")
    dm = ImageFolderDataModule(str(root), image_size=16, batch_size=4, num_workers=0)
    assert (dm.num_classes, dm.num_channels) == (2, 3)
    dm.setup("fit")
    assert dm.train_set.classes == ["cat", "dog"]  # type: ignore[attr-defined]
    assert len(dm.train_set) == len(dm.val_set) == 6  # type: ignore[arg-type]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert set(y.tolist()) <= {0, 1}
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 3, 16, 16)
    # without root/test the validation set is the test set
    assert dm.test_set is dm.val_set
    assert torch.equal(next(iter(dm.test_dataloader()))[0], xv)


def test_imagefolder_uses_a_test_folder_when_there_is_one(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs", ("train", "val", "test"))
    dm = ImageFolderDataModule(str(root), image_size=8, batch_size=2, num_workers=0)
    dm.setup("test")
    assert dm.test_set is not dm.val_set
    assert Path(dm.test_set.root).name == "test"  # type: ignore[attr-defined]
    assert next(iter(dm.test_dataloader()))[0].shape == (2, 3, 8, 8)


def test_imagefolder_counts_classes_from_the_train_folders(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs")
    (root / "train" / "fox").mkdir()
    Image.new("RGB", (10, 10)).save(root / "train" / "fox" / "0.png")
    assert ImageFolderDataModule(str(root), num_workers=0).num_classes == 3


@pytest.mark.parametrize("present", [(), ("train",), ("val",)])
def test_imagefolder_missing_folders(tmp_path: Path, present: tuple[str, ...]) -> None:
    root = tmp_path / "data"
    for split in present:
        (root / split / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as info:
        ImageFolderDataModule(str(root))
    message = str(info.value)
    assert os.path.abspath(root) in message
    assert "'train'" in message and "'val'" in message
    missing = [s for s in ("train", "val") if s not in present]
    assert f"missing: {missing}" in message


# --- CIFAR (offline: only the error path) ----------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "folder"), [(10, "cifar-10-batches-py"), (100, "cifar-100-python")]
)
def test_cifar_without_files_says_where_to_put_them(
    tmp_path: Path, variant: int, folder: str
) -> None:
    """No internet here: only the error path is tested (no files under root, no download)."""
    # Missing files are reported when the data module is built, before any training.
    with pytest.raises(FileNotFoundError) as info:
        CIFARDataModule(root=str(tmp_path), variant=variant, num_workers=0)  # type: ignore[arg-type]
    message = str(info.value)
    assert os.path.abspath(tmp_path) in message
    assert folder in message
    assert "--data.download=true" in message
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded or written


def test_cifar_bad_variant() -> None:
    with pytest.raises(ValueError, match="`variant`"):
        CIFARDataModule(variant=7)  # type: ignore[arg-type]
