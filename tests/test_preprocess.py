"""One preprocessing path: dataset images and uploads become the same input tensor."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resviz import zoo
from resviz.data.datasets import load_dataset
from resviz.data.images import load_image
from resviz.data.preprocess import Normalization, image_to_input, image_to_unit, resize

TOL = 1 / 255


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, "PNG")
    return buf.getvalue()


def uploaded(data: bytes, info: zoo.ModelInfo) -> torch.Tensor:
    """What the Inspect page feeds the net for an uploaded file: safe decoding, then the zoo's input path."""
    return zoo.prepare_image(load_image(data), info)[0]


def test_normalization_is_one_validated_value() -> None:
    n = Normalization([0.5, 0.25, 0.1], (0.5, 0.25, 0.2))
    assert n.mean == (0.5, 0.25, 0.1) and n.channels == 3 and hash(n) == hash(Normalization((0.5, 0.25, 0.1), (0.5, 0.25, 0.2)))
    x01 = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(n.denormalize(n.normalize(x01)), x01)
    assert n.picture(n.normalize(x01[0])).shape == (4, 4, 3)
    assert Normalization.of(0.5, 0.2, 1).picture(torch.zeros(1, 1, 2, 2)).shape == (2, 2, 3)
    with pytest.raises(ValueError, match="> 0"):
        Normalization((0.0,), (0.0,))
    with pytest.raises(ValueError, match="one value per channel"):
        Normalization((0.0, 0.0), (1.0,))
    with pytest.raises(ValueError, match="C = 3"):
        n.normalize(torch.zeros(1, 4, 4))


def test_datasets_and_model_infos_share_the_normalization() -> None:
    b = load_dataset("shapes", input_size=16, train_size=32, test_size=4)
    info = zoo.info_from_dict(b.info(), name="m", source="trained")
    assert isinstance(b.norm, Normalization) and info.norm == b.norm
    assert (b.mean, b.std) == (info.mean, info.std) == (b.norm.mean, b.norm.std)


def test_a_test_split_image_saved_as_png_and_uploaded_gives_the_same_input() -> None:
    b = load_dataset("shapes", input_size=16, train_size=32, test_size=4, seed=1)
    info = zoo.info_from_dict(b.info(), name="m", source="trained")
    std = torch.tensor(b.std).view(-1, 1, 1)
    for x in b.test.tensors[0]:
        arr = (b.denormalize(x).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (H, W, 3) uint8
        up = uploaded(png(arr), info)
        assert up.shape == x.shape
        assert ((up - x).abs() * std).max() <= TOL  # within 1/255 in pixel units


def test_a_folder_image_and_its_upload_go_through_the_same_resize(tmp_path: Path) -> None:
    g = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            base = g.integers(0, 256, (10, 15, 3), dtype=np.uint8)  # a detailed 60x40 photo: resizing shows
            arr = np.kron(base, np.ones((4, 4, 1), np.uint8)) if i % 2 else g.integers(0, 256, (40, 60, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    b = load_dataset(f"folder:{tmp_path}", input_size=16, seed=0)
    info = zoo.info_from_dict(b.info(), name="m", source="trained")
    pool = torch.cat([b.train.tensors[0], b.test.tensors[0]])
    for file in sorted(tmp_path.glob("*/*.png")):
        up = uploaded(file.read_bytes(), info)
        assert (pool - up).flatten(1).abs().amax(1).min() <= 1e-5  # the upload equals one dataset image


def test_sixteen_bit_grey_is_scaled_the_same_way_on_both_paths(tmp_path: Path) -> None:
    arr = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    norm = Normalization((0.0,), (1.0,))
    direct = image_to_input(img, norm, 16)[0]
    via_upload = image_to_input(load_image(png(arr)).image.convert("L"), norm, 16)[0]
    assert direct.max() > 0.9 and direct.min() < 0.05  # scaled onto 0..1, not clipped to white
    assert (direct - via_upload).abs().max() <= TOL


def test_resize_and_crop_modes() -> None:
    x = torch.rand(2, 3, 8, 12)
    assert resize(x, 4).shape == (2, 3, 4, 4) and resize(x, (8, 12)) is x
    img = Image.new("RGB", (48, 16), (0, 0, 0))
    img.paste((255, 255, 255), (16, 0, 32, 16))
    assert image_to_unit(img, 16, 1).min() == 1.0  # the centre square
    assert image_to_unit(img, 16, 1, mode="resize")[0, 8, 1] < 0.05
    with pytest.raises(ValueError, match="mode"):
        image_to_unit(img, 16, 3, mode="stretch")
    big = image_to_input(img, Normalization((0.0,) * 3, (1.0,) * 3), 8, resize_size=12)
    assert big.shape == (1, 3, 8, 8)
