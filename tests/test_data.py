"""Datasets: the procedural shapes, scikit-learn digits, torchvision files on disk, image folders."""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datafixtures import CIFAR_NAMES, level, write_cifar, write_image_folder, write_mnist
from PIL import Image

from resviz.data import files as datafiles
from resviz.data.datasets import DATASETS, DatasetBundle, DatasetUnavailable, available_datasets, load_dataset
from resviz.data.shapes import _SDF, SHAPE_CLASSES, _draw_params, make_shapes


def small_shapes(seed: int = 0, size: int = 16) -> DatasetBundle:
    return load_dataset("shapes", input_size=size, train_size=80, test_size=40, seed=seed)


def images01(bundle: DatasetBundle, split: str = "train") -> torch.Tensor:
    return bundle.denormalize(getattr(bundle, split).tensors[0])


# -- shapes ----------------------------------------------------------------------------------


def test_shapes_bundle_layout() -> None:
    b = small_shapes()
    x, y = b.train.tensors
    assert x.dtype == torch.float32 and x.shape == (80, 3, 16, 16)
    assert y.dtype == torch.int64 and y.shape == (80,)
    assert b.test.tensors[0].shape == (40, 3, 16, 16)
    assert b.train_masks.dtype == torch.bool and b.train_masks.shape == (80, 16, 16)
    assert b.test_masks.shape == (40, 16, 16)
    assert b.classes == list(SHAPE_CLASSES) and len(b.classes) >= 6
    assert (b.channels, b.input_size, b.num_classes) == (3, 16, len(SHAPE_CLASSES))
    assert int(y.min()) >= 0 and int(y.max()) < b.num_classes


def test_shapes_are_deterministic_and_seeded() -> None:
    a, b, c = small_shapes(seed=5), small_shapes(seed=5), small_shapes(seed=6)
    for split in ("train", "test"):
        for ta, tb in zip(getattr(a, split).tensors, getattr(b, split).tensors):
            assert torch.equal(ta, tb)
    assert torch.equal(a.train_masks, b.train_masks) and torch.equal(a.test_masks, b.test_masks)
    assert not torch.equal(images01(a), images01(c))


def test_shapes_train_and_test_never_coincide() -> None:
    b = small_shapes()
    train, test = images01(b).flatten(1), images01(b, "test").flatten(1)
    assert torch.cdist(test, train).min() > 1.0  # no test image is (nearly) a train image


def test_shapes_classes_are_balanced() -> None:
    y = small_shapes().train.tensors[1]
    counts = torch.bincount(y, minlength=len(SHAPE_CLASSES))
    assert int(counts.max() - counts.min()) <= 1


def test_normalised_train_split_has_zero_mean_unit_std() -> None:
    b = load_dataset("shapes", input_size=16, train_size=400, test_size=200, seed=1)
    x = b.train.tensors[0]
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-4, rtol=0)
    assert b.test.tensors[0].mean((0, 2, 3)).abs().max() < 0.15  # same distribution, train's statistics


def test_normalize_and_denormalize_invert_each_other() -> None:
    b = small_shapes()
    x01 = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(b.denormalize(b.normalize(x01)), x01)
    assert torch.equal(b.denormalize(b.train.tensors[0][0]), images01(b)[0])  # works on a single (C, H, W) image too
    assert images01(b).min() >= 0 and images01(b).max() <= 1


def test_masks_cover_one_colour_region() -> None:
    """Inside the mask (away from its edge) pixels are the shape's colour: spread only from noise."""
    b = load_dataset("shapes", input_size=32, train_size=64, test_size=8, seed=2)
    x, masks = images01(b), b.train_masks
    inner = -F.max_pool2d(-masks[:, None].float(), 3, 1, 1)[:, 0] > 0.5  # eroded by one pixel
    assert inner.flatten(1).sum(1).min() >= 4, "every image shows its shape"
    for img, m, mi in zip(x, masks, inner):
        inside = img[:, mi]  # (3, P)
        colour = inside.median(1).values[:, None]
        assert (inside - colour).abs().mean() < 0.1  # noise std is at most 0.08
        outside = img[:, ~m]
        assert (outside - colour).norm(dim=0).mean() > 0.3  # the background contrasts with the shape


def test_make_shapes_masks_match_recorded_foreground() -> None:
    s = make_shapes(48, 32, seed=3)
    assert s.images.shape == (48, 3, 32, 32) and s.fg.shape == (48, 3)
    for img, m, fg in zip(s.images, s.masks, s.fg):
        assert (img[:, m] - fg[:, None]).abs().mean() < 0.12


def _lens(big: float, small: float, d: float) -> float:
    """Area where two disks (radii ``big``, ``small``, centres ``d`` apart) overlap."""
    a = small**2 * math.acos((d * d + small**2 - big**2) / (2 * d * small))
    b = big**2 * math.acos((d * d + big**2 - small**2) / (2 * d * big))
    return a + b - 0.5 * math.sqrt((-d + small + big) * (d + small - big) * (d - small + big) * (d + small + big))


SHAPE_AREAS = {  # in the shape's unit frame, from the plain formulas
    "circle": math.pi * 0.9**2,
    "ring": math.pi * (0.95**2 - 0.45**2),
    "square": 1.44**2,
    "frame": 1.64**2 - 0.84**2,
    "triangle": math.sqrt(3) / 4 * (2 * math.sqrt(3) * 0.55) ** 2,  # inradius 0.55
    "cross": 2 * 1.9 * 0.6 - 0.6**2,
    "star": 10 * 0.5 * 0.45 * math.sin(math.pi / 5),  # ten (origin, tip, inner corner) triangles
    "crescent": math.pi * 0.9**2 - _lens(0.9, 0.75, 0.45),
}


@pytest.mark.parametrize("name", SHAPE_CLASSES)
def test_shape_sdf_encloses_the_right_area(name: str) -> None:
    grid = (np.arange(1200) + 0.5) / 400 - 1.5  # pixel centres over [-1.5, 1.5]
    u, v = np.meshgrid(grid, grid)
    sdf = _SDF[name](u, v)
    assert sdf[np.hypot(u, v) > 1.2].min() > 0, "the shape fits in a disk of radius 1.2"
    assert (sdf < 0).sum() / 400**2 == pytest.approx(SHAPE_AREAS[name], rel=0.01)


def test_rendered_masks_have_the_shapes_area() -> None:
    n, size = 64, 64
    params = _draw_params(n, np.random.default_rng(7))  # make_shapes draws these first from its seed
    s = make_shapes(n, size, seed=7)
    assert torch.equal(s.labels, torch.from_numpy(params["labels"]).long())
    expected = np.array([SHAPE_AREAS[SHAPE_CLASSES[k]] for k in params["labels"]]) * (params["r"] * size) ** 2
    ratio = s.masks.flatten(1).sum(1).numpy() / expected
    assert ratio.min() > 0.7 and ratio.max() < 1.1  # < 1 only where a shape leaves the frame
    assert np.median(ratio) == pytest.approx(1.0, abs=0.05)


def test_shapes_scene_does_not_depend_on_resolution() -> None:
    small, big = make_shapes(24, 16, seed=4), make_shapes(24, 64, seed=4)
    assert torch.equal(small.labels, big.labels)
    pooled = F.avg_pool2d(big.masks[:, None].float(), 4)[:, 0] > 0.5
    inter = (pooled & small.masks).flatten(1).sum(1)
    union = (pooled | small.masks).flatten(1).sum(1)
    assert (inter / union).min() > 0.6


def test_make_shapes_is_fast() -> None:
    start = time.perf_counter()
    make_shapes(3000, 32, seed=0)
    assert time.perf_counter() - start < 5.0  # about 0.15 s on an idle 2-core machine


# -- digits ----------------------------------------------------------------------------------


def test_digits_split_is_stratified_and_seeded() -> None:
    b = load_dataset("digits", input_size=16)
    assert b.train.tensors[0].shape == (1438, 1, 16, 16) and len(b.test) == 359  # 1,797 images, 20% per class
    assert b.classes == [str(d) for d in range(10)] and b.channels == 1
    test_counts = torch.bincount(b.test.tensors[1], minlength=10)
    assert int(test_counts.min()) >= 35 and int(test_counts.max()) <= 37
    assert b.train_masks is None and b.test_masks is None
    again, other = load_dataset("digits", input_size=16), load_dataset("digits", input_size=16, seed=1)
    assert torch.equal(b.test.tensors[0], again.test.tensors[0])
    assert not torch.equal(b.test.tensors[1], other.test.tensors[1])


def test_digits_subsets_are_capped_and_balanced() -> None:
    b = load_dataset("digits", input_size=8, train_size=50, test_size=20)
    assert len(b.train) == 50 and len(b.test) == 20
    assert torch.bincount(b.train.tensors[1], minlength=10).tolist() == [5] * 10
    assert len(load_dataset("digits", input_size=8, test_size=10_000).test) == 359


# -- torchvision datasets from files on disk ----------------------------------------------------


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_style_files_load_offline(tmp_path: Path, name: str, folder: str) -> None:
    write_mnist(tmp_path, folder)
    b = load_dataset(name, root=tmp_path, input_size=16, train_size=40, test_size=20, download=False)
    x, y = b.train.tensors
    assert x.shape == (40, 1, 16, 16) and len(b.test) == 20 and b.channels == 1
    assert torch.bincount(y, minlength=10).tolist() == [4] * 10
    for split in ("train", "test"):
        x01, labels = images01(b, split), getattr(b, split).tensors[1]
        torch.testing.assert_close(x01.mean((1, 2, 3)), torch.tensor(level(labels.numpy()) / 255, dtype=torch.float32))
    assert b.classes[0] == ("0" if name == "mnist" else "T-shirt/top")
    assert available_datasets(tmp_path)[name] is True


def test_mnist_gz_files_are_unpacked(tmp_path: Path) -> None:
    raw = write_mnist(tmp_path, compress=True)
    assert not (raw / "train-images-idx3-ubyte").exists()
    assert available_datasets(tmp_path)["mnist"] is True
    b = load_dataset("mnist", root=tmp_path, train_size=10, test_size=10, download=False)
    assert b.train.tensors[0].shape == (10, 1, 32, 32)


def test_cifar10_batches_load_offline(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    b = load_dataset("cifar10", root=tmp_path, train_size=50, test_size=30, download=False)
    assert b.classes == CIFAR_NAMES and b.channels == 3
    x01, y = images01(b), b.train.tensors[1]
    assert x01.shape == (50, 3, 32, 32) and len(b.test) == 30
    assert torch.bincount(y, minlength=10).tolist() == [5] * 10
    torch.testing.assert_close(x01[:, 0, 1:].mean((1, 2)), torch.tensor(level(y.numpy()) / 255, dtype=torch.float32))
    torch.testing.assert_close(x01[:, 0, 0], torch.ones(50, 32))  # top row of the red plane, not a column
    torch.testing.assert_close(x01[:, 1:].mean((0, 2, 3)), torch.tensor([100 / 255, 200 / 255]))


def test_cifar10_tarball_is_unpacked(tmp_path: Path) -> None:
    write_cifar(tmp_path, as_tarball=True)
    assert available_datasets(tmp_path)["cifar10"] is True
    b = load_dataset("cifar10", root=tmp_path, input_size=16, train_size=20, test_size=10, download=False)
    assert b.test.tensors[0].shape == (10, 3, 16, 16)


def test_cifar10_reader_runs_no_code_from_pickles(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": Payload(), "labels": []}, protocol=2))
    with pytest.raises(DatasetUnavailable, match="unreadable"):
        load_dataset("cifar10", root=tmp_path, download=False)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_files_say_where_to_put_them(tmp_path: Path, name: str) -> None:
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset(name, root=tmp_path, download=False)
    assert time.perf_counter() - start < 1.0
    msg = str(err.value)
    src = datafiles.SOURCES[name]
    assert str(tmp_path / src.folder) in msg and "download=True" in msg
    assert (src.archive if name == "cifar10" else src.files[0]) in msg
    assert "Traceback" not in msg
    assert isinstance(available_datasets(tmp_path)[name], str)


def test_partial_files_are_named(tmp_path: Path) -> None:
    raw = write_mnist(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetUnavailable, match=r"missing t10k-labels-idx1-ubyte\)"):
        load_dataset("mnist", root=tmp_path, download=False)


def test_offline_download_fails_fast_with_instructions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datafiles, "reachable", lambda host, port: False)
    for download in (None, True):
        with pytest.raises(DatasetUnavailable, match=r"Cannot reach .* \(offline\?\)\. MNIST was not found in"):
            load_dataset("mnist", root=tmp_path, download=download)


def test_failed_download_becomes_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        url = "https://example.invalid/cifar.tar.gz"

        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("File not found or corrupted.\nmore detail")

    monkeypatch.setattr(datafiles, "reachable", lambda host, port: True)
    monkeypatch.setattr(datafiles, "_torchvision_class", lambda key: Broken)
    with pytest.raises(DatasetUnavailable, match=r"Downloading CIFAR-10 failed: File not found or corrupted\. CIFAR-10 was"):
        load_dataset("cifar10", root=tmp_path)


def test_reachable_is_false_for_a_closed_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        start = time.perf_counter()
        assert datafiles.reachable("127.0.0.1", port, timeout=1.0) is False
    assert time.perf_counter() - start < 2.0


def _debian_layout(folder: Path) -> Path:
    """The four gzipped IDX files side by side, as Debian's dataset-fashion-mnist installs them."""
    raw = write_mnist(folder / "staging", "FashionMNIST", compress=True)
    folder.mkdir(parents=True, exist_ok=True)
    for gz in raw.glob("*.gz"):
        gz.rename(folder / gz.name)
    return folder


def test_fashion_mnist_is_found_where_the_debian_package_installs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = _debian_layout(tmp_path / "usr-share-datasets" / "fashion-mnist")
    monkeypatch.setitem(datafiles.SYSTEM_FOLDERS, "fashion-mnist", (tmp_path / "elsewhere", system))
    monkeypatch.setenv("RESVIZ_DATA", str(tmp_path / "empty-data-root"))
    assert available_datasets()["fashion-mnist"] is True
    b = load_dataset("fashion-mnist", train_size=20, test_size=10, download=False)
    assert len(b.train) == 20 and b.classes[0] == "T-shirt/top" and any(str(system) in n for n in b.notes)
    assert not list(system.glob("*-ubyte"))  # read in place: a system folder is never written to
    # an explicit root means that folder only: the system copy is not used behind its back
    with pytest.raises(DatasetUnavailable, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=tmp_path / "empty-data-root", download=False)


def test_a_corrupt_system_copy_is_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = _debian_layout(tmp_path / "fashion-mnist")
    (system / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    monkeypatch.setitem(datafiles.SYSTEM_FOLDERS, "fashion-mnist", (system,))
    monkeypatch.setenv("RESVIZ_DATA", str(tmp_path / "empty"))
    with pytest.raises(DatasetUnavailable, match="unreadable"):
        load_dataset("fashion-mnist", train_size=10, test_size=10, download=False)


def test_default_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_mnist(tmp_path)
    monkeypatch.setenv("RESVIZ_DATA", str(tmp_path))
    assert datafiles.default_root() == tmp_path
    assert len(load_dataset("mnist", train_size=10, test_size=10, download=False).train) == 10


# -- image folders ---------------------------------------------------------------------------


def test_image_folder_split_classes_and_preprocess(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"ants": 10, "bees": 10, "cats": 5})
    b = load_dataset(f"folder:{tmp_path}", input_size=12)
    assert b.classes == ["ants", "bees", "cats"] and b.channels == 3
    assert (len(b.train), len(b.test)) == (20, 5)  # 20% of each class
    assert torch.bincount(b.test.tensors[1]).tolist() == [2, 2, 1]
    assert b.name == f"folder:{tmp_path.resolve()}"
    again = load_dataset("imagefolder", root=tmp_path, input_size=12)
    assert torch.equal(b.train.tensors[0], again.train.tensors[0])
    with Image.open(tmp_path / "bees" / "3.png") as img:
        x = b.preprocess(img)
    assert x.shape == (1, 3, 12, 12)
    pool = torch.cat([b.train.tensors[0], b.test.tensors[0]])
    assert (pool - x).flatten(1).abs().amax(1).min() < 1e-5  # the same resize and normalisation


def test_image_folder_skips_corrupt_images_and_keeps_grey(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"a": 6, "b": 6}, mode="L")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "empty").mkdir()
    b = load_dataset("folder", root=tmp_path, input_size=8)
    assert b.channels == 1 and b.train.tensors[0].shape[1:] == (1, 8, 8)
    assert len(b.train) + len(b.test) == 12
    assert any("Skipped 1 unreadable image: broken.png" in n for n in b.notes)
    assert any("empty" in n for n in b.notes)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"a": 3, "b": 3}, mode="L")
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(tmp_path / "a" / "deep.png")  # 50% grey
    b = load_dataset(f"folder:{tmp_path}", input_size=8)
    assert b.channels == 1
    pool = torch.cat([images01(b), images01(b, "test")])
    assert ((pool - 128 / 255).abs().flatten(1).amax(1) < 1e-5).sum() == 1


def test_image_folder_applies_exif_orientation(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"a": 4, "b": 4})
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:, 8:] = 255  # white on the right as stored ...
    exif = Image.Exif()
    exif[0x0112] = 3  # ... but the file says "rotate 180 degrees to view"
    Image.fromarray(arr).save(tmp_path / "a" / "turned.png", exif=exif)
    b = load_dataset(f"folder:{tmp_path}", input_size=16)
    pool = torch.cat([images01(b), images01(b, "test")])
    left, right = pool[..., :7].mean((1, 2, 3)), pool[..., 9:].mean((1, 2, 3))
    assert bool(((left > 0.99) & (right < 0.01)).any())


def test_image_folder_uses_train_and_test_subfolders(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", {"x": 4, "y": 4})
    write_image_folder(tmp_path / "test", {"x": 2, "y": 3})
    b = load_dataset(f"folder:{tmp_path}", input_size=8, train_size=6)
    assert (len(b.train), len(b.test)) == (6, 5)
    assert torch.bincount(b.train.tensors[1]).tolist() == [3, 3]


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "no class sub-folders"),
        ({"a": 0, "b": 0}, "hold no images"),
        ({"only": 3}, "one class only"),
    ],
)
def test_image_folder_problems_are_explained(tmp_path: Path, layout: dict[str, int], message: str) -> None:
    write_image_folder(tmp_path, layout)
    with pytest.raises(DatasetUnavailable, match=message):
        load_dataset(f"folder:{tmp_path}")


def test_missing_image_folder_is_explained(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(DatasetUnavailable, match="needs a folder"):
        load_dataset("imagefolder")


# -- API -------------------------------------------------------------------------------------


def test_info_is_json_and_describes_the_bundle() -> None:
    b = small_shapes()
    info = json.loads(json.dumps(b.info()))
    assert info == {
        "name": "shapes",
        "classes": list(SHAPE_CLASSES),
        "mean": list(b.mean),
        "std": list(b.std),
        "channels": 3,
        "input_size": 16,
    }


def test_preprocess_reproduces_a_dataset_image() -> None:
    b = small_shapes()
    x = b.train.tensors[0][:1]
    arr = (b.denormalize(x)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    back = b.preprocess(Image.fromarray(arr))
    assert back.shape == x.shape
    assert (b.denormalize(back) - b.denormalize(x)).abs().max() <= 0.5 / 255 + 1e-6


def test_available_datasets_lists_every_dataset(tmp_path: Path) -> None:
    avail = available_datasets(tmp_path)
    assert set(avail) == set(DATASETS)
    assert avail["shapes"] is True and avail["digits"] is True
    assert all(v is True or (isinstance(v, str) and v) for v in avail.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "imagenet"}, "Unknown dataset"),
        ({"input_size": 4}, "input_size"),
        ({"train_size": 0}, "train_size"),
        ({"test_size": -3}, "test_size"),
        ({"input_size": 512, "train_size": 3000}, "GiB of memory"),
    ],
)
def test_bad_arguments_are_explained(kwargs: dict, message: str) -> None:
    with pytest.raises(DatasetUnavailable, match=message):
        load_dataset(**kwargs)
