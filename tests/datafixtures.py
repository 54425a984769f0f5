"""Tiny dataset files in the real on-disk formats, so the loaders run offline exactly as on real data.

Every image of class ``k`` is a constant ``level(k)`` so a test can check that labels stay attached
to the right pixels through subsetting, resizing and normalisation.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import TensorDataset

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def level(label: np.ndarray | int) -> np.ndarray:
    """Grey level (0..255) of every pixel of a class-``label`` image."""
    return 20 * (np.asarray(label) + 1)


def _labels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % 10).astype(np.uint8)


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """Write a uint8 array in the idx format of LeCun's MNIST files (big-endian header)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 60, n_test: int = 30, compress: bool = False) -> Path:
    """``root/<folder>/raw/`` with the four idx files of ``n_train`` and ``n_test`` 28x28 images."""
    raw = root / folder / "raw"
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        y = _labels(n, seed)
        x = np.broadcast_to(level(y)[:, None, None], (n, 28, 28)).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y, compress)
    return raw


def cifar_batch(n: int, seed: int) -> dict:
    """One CIFAR-10 batch dict: rows of 3072 bytes (R plane, G plane, B plane, each row-major).

    Red is ``level(label)``, green 100, blue 200, and the red plane's top row is 255 so a test can
    tell channel order and orientation apart.
    """
    y = _labels(n, seed)
    planes = np.empty((n, 3, 32, 32), dtype=np.uint8)
    planes[:, 0] = level(y)[:, None, None]
    planes[:, 1], planes[:, 2] = 100, 200
    planes[:, 0, 0, :] = 255
    names = [f"{i}.png" for i in range(n)]
    return {"batch_label": f"batch {seed}", "labels": y.tolist(), "data": planes.reshape(n, 3072), "filenames": names}


def write_cifar(root: Path, n_per_batch: int = 12, n_test: int = 30, as_tarball: bool = False) -> Path:
    """``root/cifar-10-batches-py/`` with data_batch_1..5, test_batch and batches.meta (pickle protocol 2).

    With ``as_tarball`` the folder is packed into ``root/cifar-10-python.tar.gz`` (as downloaded) instead.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": cifar_batch(n_per_batch, i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(n_test, 9)
    batches["batches.meta"] = {"num_cases_per_batch": n_per_batch, "label_names": CIFAR_NAMES, "num_vis": 3072}
    for name, obj in batches.items():
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    if as_tarball:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        for name in batches:
            (folder / name).unlink()
        folder.rmdir()
    return folder


def write_image_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (20, 14), mode: str = "RGB") -> Path:
    """``root/<class>/<i>.png``: ``classes`` maps a class name to its image count; every image is distinct."""
    rng = np.random.default_rng(0)
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            arr[:2, :2] = 40 * c  # a class mark in the top-left corner
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def channel_problem(n_train: int, n_test: int, seed: int = 0) -> SimpleNamespace:
    """A learnable 3-class problem in memory (16x16, 3 channels): the class sets which channel is brighter.

    ``train`` and ``test`` are TensorDatasets drawn from one seeded generator.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n_train + n_test,), generator=g)
    x = torch.randn(n_train + n_test, 3, 16, 16, generator=g) * 0.5
    x[torch.arange(len(y)), y] += 1.0
    return SimpleNamespace(train=TensorDataset(x[:n_train], y[:n_train]), test=TensorDataset(x[n_train:], y[n_train:]))
