"""Datasets behind one function: ``load_dataset(name, ...) -> DatasetBundle``, all in memory.

Names (see :data:`DATASETS`):

- ``shapes`` (default): procedural, seeded, offline, with ground-truth object masks
  (:mod:`resviz.data.shapes`). Defaults 5,000 train / 1,000 test images; deep plain nets stay near
  chance on it where residual nets of the same depth learn it (docs/experiments.md, section 1).
- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, upsampled; a seeded, stratified
  80/20 split.
- ``mnist``, ``fashion-mnist``, ``cifar10``: torchvision's files under ``root`` (default
  ``$RESVIZ_DATA`` or ``./data``); seeded, class-balanced subsets, 5,000 / 1,000 by default. With no
  ``root`` given, MNIST and Fashion-MNIST are also found where a system package installs them
  (Debian's ``dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist``).
- ``folder:<path>`` (or ``imagefolder``/``folder`` with ``root=<path>``): one sub-folder of images
  per class, optionally under ``train/`` and ``test/``; otherwise a seeded 80/20 split per class.

Every image is resized to ``input_size`` (default 32) with the bilinear, antialiased resize of
:mod:`resviz.data.preprocess` that :meth:`DatasetBundle.preprocess` and uploads also go through, then
normalised with the train split's per-channel mean and std (:class:`~resviz.data.preprocess.Normalization`).
Sizes above what a dataset holds are capped to what it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from resviz.data import files
from resviz.data.files import DatasetUnavailable, default_root
from resviz.data.preprocess import Normalization, image_to_input, resize
from resviz.data.shapes import SHAPE_CLASSES, make_shapes

__all__ = ["DATASETS", "DatasetBundle", "DatasetUnavailable", "available_datasets", "load_dataset"]

DEFAULT_INPUT_SIZE = 32
MAX_BYTES = 4 * 2**30  # refuse datasets whose tensors would take more memory than this
DEFAULT_SIZES = (5000, 1000)  # train, test for shapes and the torchvision datasets
TEST_FRACTION = 0.2  # digits and image folders without train/ and test/
DATASETS = {
    "shapes": "Procedural shapes (8 classes) on cluttered, noisy backgrounds; offline, with object masks.",
    "digits": "scikit-learn's 1,797 real 8x8 handwritten digits (10 classes), upsampled; offline.",
    "mnist": "MNIST handwritten digits (10 classes); needs its files under the data folder.",
    "fashion-mnist": "Fashion-MNIST clothing pictures (10 classes, 60,000 + 10,000 real 28x28 photos); from Debian's "
                     "dataset-fashion-mnist package or its files under the data folder.",
    "cifar10": "CIFAR-10 small colour photos (10 classes); needs its files under the data folder.",
    "imagefolder": "Your own images, one sub-folder per class: name it 'folder:<path>'.",
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "folder": "imagefolder"}


@dataclass(eq=False)
class DatasetBundle:
    """A dataset in memory: normalised tensors plus what is needed to show and extend them."""

    name: str  # what load_dataset was asked for, e.g. "shapes" or "folder:/abs/path"
    train: TensorDataset  # (x float32 normalised (N, C, H, W), y int64 (N,))
    test: TensorDataset
    classes: list[str]
    norm: Normalization  # per-channel mean and std of the train split, in [0, 1] units
    channels: int
    input_size: int
    train_masks: torch.Tensor | None = None  # bool (N, H, W) object masks (shapes only)
    test_masks: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)  # things a person should know, e.g. skipped files

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def mean(self) -> tuple[float, ...]:
        return self.norm.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.norm.std

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1], (C, H, W) or (N, C, H, W), to the model's input scale."""
        return self.norm.normalize(x01)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`normalize` for display: returns values clamped to [0, 1]."""
        return self.norm.denormalize(x)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A (1, C, H, W) model input from a PIL image: centre square crop, the dataset's resize and normalisation."""
        return image_to_input(image, self.norm, self.input_size)

    def info(self) -> dict[str, Any]:
        """JSON-able description to store with a checkpoint."""
        return {
            "name": self.name,
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "channels": self.channels,
            "input_size": self.input_size,
        }


def load_dataset(
    name: str = "shapes",
    *,
    root: str | Path | None = None,
    input_size: int | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    download: bool | None = None,
) -> DatasetBundle:
    """Load a dataset into memory.

    Args:
        name: a key of :data:`DATASETS` or ``"folder:<path>"``.
        root: data folder for the torchvision datasets (default ``$RESVIZ_DATA`` or ``./data``);
            the image folder itself for ``imagefolder``.
        input_size: side of the square images (default 32).
        train_size: images in the train split (None: the dataset's default; capped to what exists).
        test_size: images in the test split (likewise).
        seed: fixes generation, splits and subsets; the same seed gives identical tensors.
        download: torchvision datasets only. True: download when missing; False: never;
            None: try when missing, failing within seconds when offline.

    Raises:
        DatasetUnavailable: with a message for the user (missing files, bad folder, bad sizes).
    """
    key, folder = _parse_name(name, root)
    size = DEFAULT_INPUT_SIZE if input_size is None else int(input_size)
    if not 8 <= size <= 512:
        raise DatasetUnavailable(f"input_size must be between 8 and 512 pixels, got {input_size}.")
    for label, n in (("train_size", train_size), ("test_size", test_size)):
        if n is not None and int(n) < 1:
            raise DatasetUnavailable(f"{label} must be at least 1, got {n}.")
    if key == "shapes":
        n_train, n_test = train_size or DEFAULT_SIZES[0], test_size or DEFAULT_SIZES[1]
        return _load_shapes(size, n_train, n_test, seed)
    if key == "digits":
        return _load_digits(size, train_size, test_size, seed)
    if folder is not None:
        return _load_folder(folder, size, train_size, test_size, seed)
    data_root = Path(root).expanduser() if root is not None else default_root()
    n_train, n_test = train_size or DEFAULT_SIZES[0], test_size or DEFAULT_SIZES[1]
    if root is None and (system := _system_fallback(key, data_root)) is not None:
        return _load_files(key, lambda train: files.read_idx_folder(key, system, train), size, n_train, n_test, seed,
                           notes=[f"{files.SOURCES[key].title} read from {system}/ (a system package's copy)."])
    return _load_torchvision(key, data_root, size, n_train, n_test, seed, download)


def available_datasets(root: str | Path | None = None) -> dict[str, bool | str]:
    """Which datasets can load now: ``True``, or a string saying why not (test with ``is True``).

    Nothing is downloaded or decoded; torchvision datasets count as available when their files
    (or the archives ResViz unpacks) are under ``root``.
    """
    data_root = Path(root).expanduser() if root is not None else default_root()
    out: dict[str, bool | str] = {"shapes": True, "digits": True}
    for key, src in files.SOURCES.items():
        missing = files.missing_files(key, data_root)
        folder = data_root / src.folder
        packed = (data_root / src.archive).is_file() or all((folder / f"{m}.gz").is_file() for m in missing)
        found = not missing or packed or (root is None and files.system_folder(key) is not None)
        out[key] = True if found else files.where_message(key, data_root, missing)
    out["imagefolder"] = "Name a folder of your images, 'folder:<path>', with one sub-folder per class."
    return out


def _parse_name(name: str, root: str | Path | None) -> tuple[str, Path | None]:
    if name.startswith("folder:"):
        return "imagefolder", Path(name.split(":", 1)[1]).expanduser()
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in DATASETS:
        raise DatasetUnavailable(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or 'folder:<path>'.")
    if key == "imagefolder":
        if root is None:
            raise DatasetUnavailable("The image-folder dataset needs a folder: pass root=<path> or name it 'folder:<path>'.")
        return key, Path(root).expanduser()
    return key, None


def _subseed(seed: int, purpose: int) -> int:
    """An independent 63-bit seed per (seed, purpose): train and test never share a random stream."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, purpose]).generate_state(2)
    return (int(state[0]) << 31) ^ int(state[1])


def _generator(seed: int, purpose: int) -> torch.Generator:
    return torch.Generator().manual_seed(_subseed(seed, purpose))


def _class_rank(labels: torch.Tensor) -> torch.Tensor:
    """For each position, how many earlier positions hold the same label."""
    onehot = torch.nn.functional.one_hot(labels, int(labels.max()) + 1 if len(labels) else 1)
    return (onehot.cumsum(0) - onehot).gather(1, labels[:, None])[:, 0]


def _balanced(idx: torch.Tensor, labels: torch.Tensor, n: int | None, g: torch.Generator) -> torch.Tensor:
    """A random subset of ``idx`` of size ``n`` (all when None or more) with classes as equal as possible."""
    idx = idx[torch.randperm(len(idx), generator=g)]
    if n is None or n >= len(idx):
        return idx
    rank = _class_rank(labels[idx])
    pick = idx[torch.argsort(rank, stable=True)[:n]]  # round robin over classes, random within a class
    return pick[torch.randperm(n, generator=g)]


def _split_per_class(labels: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train/test split taking TEST_FRACTION of every class (and leaving each class a train image)."""
    idx = torch.randperm(len(labels), generator=g)
    counts = torch.bincount(labels)
    n_test = torch.minimum((counts * TEST_FRACTION + 0.5).floor().long(), (counts - 1).clamp_min(0))
    is_test = _class_rank(labels[idx]) < n_test[labels[idx]]
    return idx[~is_test], idx[is_test]


def _check_memory(n_images: int, channels: int, size: int) -> None:
    need = n_images * channels * size * size * 4
    if need > MAX_BYTES:
        raise DatasetUnavailable(
            f"{n_images:,} images of {channels}x{size}x{size} would take {need / 2**30:.1f} GiB of memory "
            f"(the limit is {MAX_BYTES / 2**30:.0f} GiB); lower train_size, test_size or input_size."
        )


def _bundle(name: str, train: tuple, test: tuple, classes: list[str], **extra: Any) -> DatasetBundle:
    """Normalise [0, 1] images with the train split's per-channel statistics and wrap everything."""
    (x_train, y_train), (x_test, y_test) = train, test
    if len(y_train) == 0 or len(y_test) == 0:
        raise DatasetUnavailable(f"{name} has too few usable images for both a train and a test split.")
    std, mean = torch.std_mean(x_train, dim=(0, 2, 3), correction=0)
    mean_t = tuple(float(m) for m in mean)
    std_t = tuple(float(s) if s > 1e-6 else 1.0 for s in std)  # a constant channel stays as it is
    m, s = torch.tensor(mean_t).view(-1, 1, 1), torch.tensor(std_t).view(-1, 1, 1)
    return DatasetBundle(
        name=name,
        train=TensorDataset(x_train.sub_(m).div_(s), y_train.long()),
        test=TensorDataset(x_test.sub_(m).div_(s), y_test.long()),
        classes=list(classes),
        norm=Normalization(mean_t, std_t),
        channels=x_train.shape[1],
        input_size=x_train.shape[-1],
        **extra,
    )


def _load_shapes(size: int, n_train: int, n_test: int, seed: int) -> DatasetBundle:
    _check_memory(n_train + n_test, 3, size)
    train = make_shapes(int(n_train), size, _subseed(seed, 1))
    test = make_shapes(int(n_test), size, _subseed(seed, 2))
    return _bundle(
        "shapes",
        (train.images, train.labels),
        (test.images, test.labels),
        list(SHAPE_CLASSES),
        train_masks=train.masks,
        test_masks=test.masks,
    )


def _load_digits(size: int, n_train: int | None, n_test: int | None, seed: int) -> DatasetBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div_(16)[:, None]  # (1797, 1, 8, 8), ink 0..16
    y = torch.from_numpy(digits.target).long()
    train_idx, test_idx = _split_per_class(y, _generator(seed, 3))
    train_idx, test_idx = _balanced(train_idx, y, n_train, _generator(seed, 1)), _balanced(test_idx, y, n_test, _generator(seed, 2))
    return _bundle(
        "digits",
        (resize(x[train_idx], size), y[train_idx]),
        (resize(x[test_idx], size), y[test_idx]),
        [str(d) for d in range(10)],
    )


def _system_fallback(key: str, data_root: Path) -> Path | None:
    """A system package's folder for ``key`` when the data root does not hold the dataset itself."""
    if key not in files.SYSTEM_FOLDERS:
        return None
    src = files.SOURCES[key]
    in_root = all((data_root / src.folder / f).is_file() or (data_root / src.folder / f"{f}.gz").is_file() for f in src.files)
    return None if in_root else files.system_folder(key)


def _load_torchvision(
    key: str, root: Path, size: int, n_train: int, n_test: int, seed: int, download: bool | None
) -> DatasetBundle:
    files.unpack_archives(key, root)
    missing = files.missing_files(key, root)
    if missing:
        if download is False:
            raise DatasetUnavailable(files.where_message(key, root, missing))
        files.download(key, root)
    return _load_files(key, lambda train: files.read_source(key, root, train=train), size, n_train, n_test, seed)


def _load_files(key: str, read: Any, size: int, n_train: int, n_test: int, seed: int, **extra: Any) -> DatasetBundle:
    """Seeded, class-balanced subsets of both splits that ``read(train)`` returns (uint8 images)."""
    _check_memory(n_train + n_test, 3 if key == "cifar10" else 1, size)
    splits = []
    for split, n in ((1, n_train), (2, n_test)):
        x, y, classes = read(split == 1)
        pick = _balanced(torch.arange(len(y)), y, n, _generator(seed, split))
        splits.append((resize(x[pick].float().div_(255), size), y[pick]))
    return _bundle(key, splits[0], splits[1], classes, **extra)


def _load_folder(path: Path, size: int, n_train: int | None, n_test: int | None, seed: int) -> DatasetBundle:
    path = path.resolve()
    classes, pool, test_pool, notes = files.scan_folder(path)
    labels = torch.tensor([label for _, label in pool], dtype=torch.long)
    if test_pool is None:
        train_idx, test_idx = _split_per_class(labels, _generator(seed, 3))
        train_s, test_s, test_labels = pool, pool, labels
    else:
        train_idx, train_s, test_s = torch.arange(len(pool)), pool, test_pool
        test_labels = torch.tensor([label for _, label in test_pool], dtype=torch.long)
        test_idx = torch.arange(len(test_pool))
    train_idx = _balanced(train_idx, labels, n_train, _generator(seed, 1))
    test_idx = _balanced(test_idx, test_labels, n_test, _generator(seed, 2))
    _check_memory(len(train_idx) + len(test_idx), 3, size)
    x_tr, y_tr, gray_tr, bad_tr = files.decode_images([train_s[i] for i in train_idx.tolist()], size)
    x_te, y_te, gray_te, bad_te = files.decode_images([test_s[i] for i in test_idx.tolist()], size)
    bad = bad_tr + bad_te
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        notes.append(f"Skipped {len(bad)} unreadable image{'s' if len(bad) > 1 else ''}: {shown}")
    if gray_tr and gray_te:  # keep one channel when every image is greyscale
        x_tr, x_te = x_tr[:, :1], x_te[:, :1]
    return _bundle(f"folder:{path}", (x_tr, y_tr), (x_te, y_te), classes, notes=notes)
