"""Dataset files on disk: torchvision's MNIST, Fashion-MNIST and CIFAR-10, and folders of images.

Readers return raw tensors (uint8 images or [0, 1] floats); :mod:`resviz.data.datasets` turns them into
bundles. Every failure a person can fix (missing files, no network, an empty folder) is raised as
:class:`DatasetUnavailable` whose message says exactly what to put where.

CIFAR-10 is read here rather than through ``torchvision.datasets.CIFAR10``: torchvision insists on
the published md5 of every batch file and unpickles them with the full pickle machinery. We accept
any file in the same format (so tests can write small real-format fixtures) but unpickle with an
allow-list that can only rebuild numpy arrays, then check shapes and labels. Downloads still go
through torchvision, which verifies the archive's md5.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import socket
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image, ImageOps

from resviz.data.preprocess import image_to_unit

PROBE_TIMEOUT = 3.0  # seconds to wait for a TCP connection before declaring "offline"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class DatasetUnavailable(ValueError):  # noqa: N818 - the public name other modules code against
    """A dataset cannot be loaded now; ``str(err)`` is a message for the user that says what to do."""


@dataclass(frozen=True)
class Source:
    """Where one torchvision dataset lives under the data root, and where people get it."""

    title: str  # shown to people
    folder: str  # relative to the root, holds ``files``
    files: tuple[str, ...]
    archive: str  # what the download page offers; unpacked for you when found in place
    page: str  # where a person downloads it
    classes: tuple[str, ...]


SOURCES = {
    "mnist": Source(
        "MNIST",
        "MNIST/raw",
        _MNIST_FILES,
        "the four .gz files",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        tuple(str(i) for i in range(10)),
    ),
    "fashion-mnist": Source(
        "Fashion-MNIST",
        "FashionMNIST/raw",
        _MNIST_FILES,
        "the four .gz files",
        "https://github.com/zalandoresearch/fashion-mnist",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "cifar10": Source(
        "CIFAR-10",
        "cifar-10-batches-py",
        (*_CIFAR_TRAIN, "test_batch", "batches.meta"),
        "cifar-10-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar.html",
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
}


# Where system packages install MNIST-style datasets as the four gzipped IDX files, side by side (Debian's
# dataset-fashion-mnist: ``apt-get install dataset-fashion-mnist``). Searched when no data root is given.
SYSTEM_FOLDERS: dict[str, tuple[Path, ...]] = {
    "mnist": (Path("/usr/share/datasets/mnist"),),
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned bytes, 3-d images / 1-d labels


def system_folder(key: str) -> Path | None:
    """The first of ``SYSTEM_FOLDERS[key]`` holding all four IDX files (gzipped or not), else None."""
    for folder in SYSTEM_FOLDERS.get(key, ()):
        if all((folder / name).is_file() or (folder / f"{name}.gz").is_file() for name in SOURCES[key].files):
            return folder
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """One IDX file of unsigned bytes (``path`` or ``path.gz``), read without unpacking it to disk."""
    raw = gzip.decompress(path.with_name(path.name + ".gz").read_bytes()) if not path.is_file() else path.read_bytes()
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise ValueError(f"{path.name}: not an IDX file of {ndim}-d unsigned bytes (magic {magic:#010x})")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path.name}: {body.size} bytes where its header promises {int(np.prod(dims))}")
    return body.reshape(dims)


def read_idx_folder(key: str, folder: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One split of an MNIST-style dataset from a flat folder of IDX files (a system package's layout)."""
    prefix = "train" if train else "t10k"
    try:
        x = _read_idx(folder / f"{prefix}-images-idx3-ubyte", 3)
        y = _read_idx(folder / f"{prefix}-labels-idx1-ubyte", 1)
    except (OSError, EOFError, ValueError) as err:  # gzip.BadGzipFile is an OSError
        raise DatasetUnavailable(f"{SOURCES[key].title} files in {folder}/ are unreadable ({err}).") from err
    if len(x) != len(y) or (len(y) and int(y.max()) >= 10):
        raise DatasetUnavailable(f"{SOURCES[key].title} files in {folder}/ do not match each other.")
    return torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64)), list(SOURCES[key].classes)


def default_root() -> Path:
    """The data root: ``$RESVIZ_DATA`` when set, else ``./data``."""
    return Path(os.environ.get("RESVIZ_DATA") or "data")


def missing_files(key: str, root: Path) -> list[str]:
    """Names of ``key``'s files that are not under ``root`` (an empty list means it can load)."""
    src = SOURCES[key]
    return [f for f in src.files if not (root / src.folder / f).is_file()]


def where_message(key: str, root: Path, missing: list[str]) -> str:
    """Tell a person which files to put where for ``key``."""
    src, folder = SOURCES[key], root / SOURCES[key].folder
    found = "was not found in" if len(missing) == len(src.files) else f"is incomplete (missing {', '.join(missing)}) in"
    if key == "cifar10":
        how = f"Put {src.archive} (the Python version, from {src.page}) in {root}/ and ResViz unpacks it"
    else:
        how = f"Put {', '.join(src.files[:-1])} and {src.files[-1]} there (or the .gz files from {src.page})"
    system = ""
    if key == "fashion-mnist":
        system = " Or install Debian's package (`apt-get install dataset-fashion-mnist`), which ResViz finds by itself."
    return (
        f"{src.title} {found} {folder}/. {how}; or load it with download=True while online. "
        f"The data folder is $RESVIZ_DATA when set, else ./data.{system}"
    )


def unpack_archives(key: str, root: Path) -> None:
    """Unpack archives a person dropped in place: MNIST-style ``*.gz`` files, CIFAR's tarball."""
    src, folder = SOURCES[key], root / SOURCES[key].folder
    if key == "cifar10":
        tar_path = root / src.archive
        if missing_files(key, root) and tar_path.is_file():
            with tarfile.open(tar_path) as tar:
                tar.extractall(root, filter="data")  # the "data" filter refuses paths that escape root
        return
    for name in src.files:
        gz = folder / f"{name}.gz"
        if not (folder / name).is_file() and gz.is_file():
            with gzip.open(gz, "rb") as fin, open(folder / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)


def reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` s (DNS included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a hung DNS lookup cannot hold us past the timeout
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result) and result[0]


def _torchvision_class(key: str) -> type:
    from torchvision import datasets

    return {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[key]


def download(key: str, root: Path) -> None:
    """Download ``key`` with torchvision, failing fast (and with instructions) when offline."""
    cls = _torchvision_class(key)
    url = urlparse(cls.url if key == "cifar10" else cls.mirrors[0])
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    missing = missing_files(key, root)
    where = where_message(key, root, missing)
    if not reachable(host, port):
        raise DatasetUnavailable(f"Cannot reach {host} to download {SOURCES[key].title} (offline?). {where}")
    try:
        cls(str(root), train=True, download=True)
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
        reason = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        raise DatasetUnavailable(f"Downloading {SOURCES[key].title} failed: {reason}. {where}") from err


def read_source(key: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read one split of an on-disk torchvision dataset.

    Returns:
        uint8 images (N, C, H, W), int64 labels (N,), class names.
    """
    try:
        if key == "cifar10":
            return _read_cifar(root / SOURCES[key].folder, train)
        ds = _torchvision_class(key)(str(root), train=train, download=False)
        x, y = ds.data, ds.targets.long()
    except (AssertionError, OSError, RuntimeError, TypeError, ValueError, pickle.UnpicklingError) as err:
        raise DatasetUnavailable(f"{SOURCES[key].title} files under {root / SOURCES[key].folder}/ are unreadable ({err}).") from err
    if x.ndim != 3 or len(x) != len(y) or (len(y) and int(y.max()) >= 10):
        raise DatasetUnavailable(f"{SOURCES[key].title} files under {root / SOURCES[key].folder}/ do not match each other.")
    return x[:, None], y, list(SOURCES[key].classes)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle plain containers and numpy arrays, nothing else (no code can run)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes with protocol 2
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if name == "_reconstruct":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = _ArrayUnpickler(f, encoding="latin1").load()  # the batches were written by Python 2
    if not isinstance(obj, dict):
        raise ValueError(f"{path.name} does not hold a dict")
    return obj


def _read_cifar(folder: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    xs, ys = [], []
    for name in _CIFAR_TRAIN if train else ("test_batch",):
        batch = _unpickle(folder / name)
        data, labels = np.asarray(batch["data"]), np.asarray(batch.get("labels", batch.get("fine_labels")))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
            raise ValueError(f"{name} is not a CIFAR-10 batch")
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        ys.append(torch.from_numpy(labels.astype(np.int64)))
    classes = [str(c) for c in _unpickle(folder / "batches.meta")["label_names"]]
    y = torch.cat(ys)
    if len(classes) != 10 or y.min() < 0 or y.max() >= 10:
        raise ValueError("labels or label_names are out of range")
    return torch.cat(xs), y, classes


def _scan(directory: Path, class_to_idx: dict[str, int] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sub-folder names) and (file, label) pairs, the way torchvision's ImageFolder finds them."""
    from torchvision.datasets.folder import find_classes, make_dataset

    if class_to_idx is None:
        try:
            _, class_to_idx = find_classes(str(directory))
        except FileNotFoundError:
            return [], []
    samples = make_dataset(str(directory), class_to_idx, extensions=IMAGE_EXTENSIONS, allow_empty=True)
    return sorted(class_to_idx, key=class_to_idx.get), samples


def scan_folder(path: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]] | None, list[str]]:
    """Find the images of a class-per-sub-folder directory.

    ``path/<class>/*`` gives one pool to split; ``path/train/<class>/*`` with ``path/test/<class>/*``
    gives the two splits as they are. Class folders without images are dropped with a note.

    Returns:
        classes, train samples, test samples (None without train/ and test/), notes.
    """
    if not path.is_dir():
        raise DatasetUnavailable(f"The image folder {path} does not exist.")
    split = (path / "train").is_dir() and (path / "test").is_dir()
    top = path / "train" if split else path
    classes, samples = _scan(top)
    if not classes:
        raise DatasetUnavailable(
            f"{top} has no class sub-folders. Put your images in one sub-folder per class, "
            f"e.g. {top}/cats/1.png and {top}/dogs/1.png."
        )
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    kept = [c for c, n in zip(classes, counts) if n]
    empty = [c for c, n in zip(classes, counts) if not n]
    notes = [f"Ignored class folders without images: {', '.join(empty)}."] if empty else []
    if not kept:
        raise DatasetUnavailable(f"The class folders in {top} hold no images (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    if len(kept) < 2:
        raise DatasetUnavailable(
            f"{top} has images for one class only ({kept[0]}); a classifier needs at least two class folders with images."
        )
    index = {c: i for i, c in enumerate(kept)}
    _, samples = _scan(top, index)
    test = _scan(path / "test", index)[1] if split else None
    return kept, samples, test, notes


def decode_images(samples: list[tuple[str, int]], size: int) -> tuple[torch.Tensor, torch.Tensor, bool, list[str]]:
    """Decode (file, label) pairs into RGB (N, 3, size, size) floats in [0, 1].

    Returns:
        images, int64 labels, whether every image was greyscale, names of the files skipped as unreadable.
    """
    xs, ys, bad, gray = [], [], [], True
    for file, label in samples:
        try:
            with Image.open(file) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (2 * size, 2 * size))  # let libjpeg decode big photos at reduced scale
                xs.append(image_to_unit(ImageOps.exif_transpose(img), size, 3))  # upright, as viewers show it
                gray = gray and img.mode in _GRAY_MODES
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # UnidentifiedImageError is an OSError
            bad.append(Path(file).name)
            continue
        ys.append(label)
    x = torch.stack(xs) if xs else torch.zeros(0, 3, size, size)
    return x, torch.tensor(ys, dtype=torch.long), gray and bool(xs), bad
