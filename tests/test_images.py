"""Safe decoding of untrusted uploads, preprocessing and sample pictures."""

from __future__ import annotations

import io
import resource
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from resviz.data.images import (
    SAMPLE_IMAGES,
    ImageError,
    LoadedImage,
    denormalize,
    fit_image,
    load_image,
    sample_image,
    sample_images,
    sniff_unsupported,
    to_model_input,
)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def pixel(loaded: LoadedImage, xy: tuple[int, int]) -> tuple[int, int, int]:
    return loaded.image.getpixel(xy)


def close(a, b, tol: int = 6) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(w: int, h: int, rows: int | None = None) -> bytes:
    """A grey 8-bit PNG of w x h zeros whose IDAT holds ``rows`` rows (all of them when None).

    The data is zlib-streamed a few rows at a time, so even a 10000x10000 'bomb' costs little memory.
    """
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    comp, row, parts = zlib.compressobj(9), b"\x00" * (w + 1), []
    n = h if rows is None else rows
    for start in range(0, n, 256):
        parts.append(comp.compress(row * min(256, n - start)))
    parts.append(comp.flush())
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


# -- formats -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_allowed_formats_decode_to_rgb(fmt):
    img = Image.new("RGB", (12, 10), (200, 30, 40))
    out = load_image(encode(img, fmt))
    assert out.image.mode == "RGB" and out.image.size == (12, 10)
    assert close(pixel(out, (5, 5)), (200, 30, 40), tol=12)
    assert out.format in (fmt, "MPO")


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, "HEIC"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
        (b'  <svg width="10" height="10"><rect width="10" height="10"/></svg>', "SVG"),
        (encode(Image.new("RGB", (8, 8)), "TIFF"), "TIFF"),
        (encode(Image.new("RGB", (8, 8)), "AVIF"), "AVIF"),
        (b"%PDF-1.7\n%...", "PDF"),
    ],
)
def test_unsupported_formats_are_named(data, name):
    with pytest.raises(ImageError, match=f"unsupported format {name}; use PNG, JPEG or WebP"):
        load_image(data)
    assert sniff_unsupported(data) == name


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "PCX", "ICNS"])
def test_other_pillow_formats_are_not_decoded(fmt):
    data = encode(Image.new("RGB", (16, 16), (1, 2, 3)), fmt)
    with pytest.raises(ImageError, match="not an image in a supported format"):
        load_image(data)


def test_non_image_renamed_png(tmp_path):
    path = tmp_path / "holiday.png"
    path.write_bytes(b"this is a text file, not a picture\n" * 20)
    with pytest.raises(ImageError, match="not an image in a supported format"):
        load_image(path)
    with pytest.raises(ImageError, match="could not read"):
        load_image(tmp_path / "missing.png")


def test_empty_and_oversized_files(tmp_path):
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match="larger than"):
        load_image(encode(Image.new("RGB", (64, 64)), "BMP"), max_bytes=1024)


def test_truncated_jpeg_and_png():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for fmt in ("JPEG", "PNG"):
        data = encode(img, fmt)
        with pytest.raises(ImageError, match="damaged or truncated"):
            load_image(data[: len(data) // 2])


def test_file_object_and_path(tmp_path):
    data = encode(Image.new("RGB", (4, 4), (0, 255, 0)), "PNG")
    buf = io.BytesIO(data)
    buf.read()  # an uploaded file whose cursor sits at the end
    assert pixel(load_image(buf), (0, 0)) == (0, 255, 0)
    (tmp_path / "a.png").write_bytes(data)
    assert pixel(load_image(str(tmp_path / "a.png")), (3, 3)) == (0, 255, 0)
    with pytest.raises(TypeError):
        load_image(12345)


# -- decompression bombs -------------------------------------------------------------------------
def test_header_over_limit_is_refused_before_decoding(monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    data = encode(Image.new("RGB", (200, 100)), "PNG")
    with pytest.raises(ImageError, match=r"200x100 pixels .* limit is 0\.01 megapixels"):
        load_image(data, max_pixels=10_000)


@pytest.mark.parametrize(("w", "h", "rows"), [(30000, 30000, 4), (10000, 10000, None), (7000, 7000, None)])
def test_bomb_png_is_refused_with_flat_memory(w, h, rows):
    data = png_declaring(w, h, rows)  # 10000x10000: a real, complete bomb of about 100 kB
    assert len(data) < 200_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(ImageError, match="pixels"):
        load_image(data)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 50, f"peak memory grew by {grown_mib:.0f} MiB"


def test_bomb_png_within_custom_limit_decodes():
    out = load_image(png_declaring(300, 200), max_pixels=60_000)
    assert out.image.size == (300, 200) and pixel(out, (10, 10)) == (0, 0, 0)


def test_gif_declaring_huge_screen_is_refused():
    data = bytearray(encode(Image.new("P", (4, 4)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen size in the header
    with pytest.raises(ImageError, match="pixels"):
        load_image(bytes(data))


# -- colour modes --------------------------------------------------------------------------------
def test_cmyk_jpeg():
    img = Image.new("CMYK", (16, 8), (255, 0, 0, 0))  # pure cyan
    img.paste((0, 0, 0, 255), (8, 0, 16, 8))  # pure black on the right
    out = load_image(encode(img, "JPEG", quality=95))
    assert out.original_mode == "CMYK" and any("CMYK" in n for n in out.notes)
    assert close(pixel(out, (2, 4)), (0, 255, 255), tol=12)
    assert close(pixel(out, (13, 4)), (0, 0, 0), tol=12)


def test_palette_png_with_transparency():
    img = Image.new("P", (8, 4), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # index 0 red, 1 blue
    img.paste(1, (4, 0, 8, 4))
    out = load_image(encode(img, "PNG", transparency=0), background=(255, 255, 255))
    assert pixel(out, (1, 1)) == (255, 255, 255)  # transparent red -> background
    assert pixel(out, (6, 1)) == (0, 0, 255)
    assert any("transparent" in n for n in out.notes)


def test_rgba_and_la_composite_over_background():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 255, 0, 128)])
    out = load_image(encode(rgba, "PNG"))
    assert pixel(out, (0, 0)) == (255, 255, 255)
    assert pixel(out, (1, 0)) == (0, 0, 255)
    assert close(pixel(out, (2, 0)), (127, 255, 127), tol=2)
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 128), (200, 255)])
    out = load_image(encode(la, "PNG"), background=(0, 0, 0))
    assert pixel(out, (0, 0)) == (0, 0, 0)
    assert pixel(out, (1, 0)) == (200, 200, 200)
    out = load_image(encode(la, "PNG"))
    assert close(pixel(out, (0, 0)), (127, 127, 127), tol=2)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16)
    data = encode(Image.fromarray(arr), "PNG")
    out = load_image(data)
    assert out.original_mode.startswith("I")
    got = [pixel(out, (i, 0))[0] for i in range(4)]
    assert got == [0, 128, 255, 4]
    assert any("8 bits" in n for n in out.notes)


def test_grey_and_bilevel():
    out = load_image(encode(Image.new("L", (2, 2), 77), "PNG"))
    assert pixel(out, (0, 0)) == (77, 77, 77)
    out = load_image(encode(Image.new("1", (2, 2), 1), "BMP"))
    assert pixel(out, (1, 1)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    img.paste((0, 0, 255), (10, 0, 20, 10))  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.original_size == (20, 10) and out.image.size == (10, 20)
    assert close(pixel(out, (5, 2)), (255, 0, 0), tol=20)  # stored left edge is now the top
    assert close(pixel(out, (5, 17)), (0, 0, 255), tol=20)
    assert any("EXIF" in n for n in out.notes)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_first_frame_with_note(fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    out = load_image(data)
    assert close(pixel(out, (4, 4)), (255, 0, 0), tol=4)
    assert any("first frame" in n for n in out.notes)
    still = load_image(encode(frames[1], fmt))
    assert not any("first frame" in n for n in still.notes)


def test_tiny_and_large_allowed_images():
    assert pixel(load_image(encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG")), (0, 0)) == (9, 8, 7)
    big = load_image(encode(Image.new("RGB", (2400, 1600), (10, 120, 30)), "JPEG"))
    assert big.image.size == (2400, 1600) and close(pixel(big, (1200, 800)), (10, 120, 30))


# -- preprocessing -------------------------------------------------------------------------------
def test_to_model_input_normalises_rgb():
    img = Image.new("RGB", (40, 20), (255, 0, 51))
    x = to_model_input(img, mean=(0.5, 0.5, 0.2), std=(0.5, 0.25, 0.1), input_size=16, channels=3)
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 8, 8], torch.tensor([1.0, -2.0, 0.0]), atol=1e-5, rtol=0)


def test_to_model_input_crop_keeps_centre_and_greyscale():
    img = Image.new("RGB", (48, 16), (0, 0, 0))
    img.paste((255, 255, 255), (16, 0, 32, 16))  # white centre square, black sides
    x = to_model_input(img, 0.0, 1.0, 16, 1)
    assert x.shape == (1, 1, 16, 16)
    assert x[0, 0, 2:14, 2:14].min() > 0.95  # the crop dropped the black sides
    squashed = to_model_input(img, 0.0, 1.0, 16, 1, mode="resize")
    assert squashed[0, 0, 8, 1] < 0.05 and squashed[0, 0, 8, 8] > 0.95
    with pytest.raises(ValueError, match="channels"):
        to_model_input(img, 0.0, 1.0, 16, 2)
    with pytest.raises(ValueError, match="mean has 2 values"):
        to_model_input(img, (0.1, 0.2), 1.0, 16, 3)


def test_to_model_input_accepts_loaded_image_and_other_modes():
    loaded = load_image(encode(Image.new("RGB", (8, 8), (255, 255, 255)), "PNG"))
    assert to_model_input(loaded, 0.5, 0.5, 4, 3).allclose(torch.ones(1, 3, 4, 4))
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert to_model_input(rgba, 0.0, 1.0, 4, 3).min() > 0.99  # transparent -> white, not black


def test_denormalize_round_trip():
    img = sample_image("star", 16)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    back = denormalize(to_model_input(img, mean, std, 16, 3), mean, std)
    assert back.shape == (16, 16, 3)
    np.testing.assert_allclose(back, np.asarray(img) / 255.0, atol=1e-5)
    grey = denormalize(torch.zeros(1, 1, 4, 4), 0.5, 0.2)
    assert grey.shape == (4, 4, 3) and np.allclose(grey, 0.5)


def test_fit_image_sizes():
    assert fit_image(Image.new("RGB", (3, 100)), 8).size == (8, 8)
    with pytest.raises(ValueError):
        fit_image(Image.new("RGB", (3, 3)), 8, mode="stretch")


def test_sample_images():
    samples = sample_images(32)
    assert tuple(samples) == SAMPLE_IMAGES
    for name, img in samples.items():
        arr = np.asarray(img)
        assert img.mode == "RGB" and img.size == (32, 32), name
        assert arr.std() > 10, f"{name} is blank"
    assert not np.array_equal(np.asarray(samples["circle"]), np.asarray(samples["star"]))
    with pytest.raises(ValueError, match="unknown sample"):
        sample_image("unicorn")


# -- fuzz ----------------------------------------------------------------------------------------
def _seeds() -> list[bytes]:
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
    pal = img.convert("P")
    return [
        encode(img, "PNG"), encode(img, "JPEG"), encode(pal, "GIF"), encode(img, "WEBP"), encode(img, "BMP"),
        encode(pal, "PNG", transparency=3), encode(img.convert("CMYK"), "JPEG"),
    ]


SEEDS = _seeds()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


fuzz_inputs = st.one_of(st.binary(max_size=512), mutated())


def _survives(data: bytes) -> None:
    try:
        out = load_image(data, max_pixels=1_000_000)
    except ImageError as e:
        assert str(e)
    else:
        assert out.image.mode == "RGB"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_inputs)
def test_fuzz_only_image_error_escapes(data):
    _survives(data)


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_inputs)
def test_fuzz_only_image_error_escapes_long(data):
    _survives(data)
