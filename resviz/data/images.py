"""Safe decoding of untrusted image uploads, their way into a net's input, and built-in sample pictures.

Uploads are treated as hostile: only a few decoders are allowed (``Image.open(..., formats=...)``),
the declared pixel count is checked right after the header is parsed and *before* any pixel data is
decoded, and every failure surfaces as :class:`ImageError` whose message can be shown to the user.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from resviz.data.preprocess import WHITE, Normalization, high_depth_to_l, image_to_input, is_high_depth

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
DEFAULT_MAX_PIXELS = 40_000_000  # a 48 MP phone photo must be downscaled; 40 MP RGBA is 160 MB decoded
DEFAULT_MAX_BYTES = 25 * 2**20
_USE = "use PNG, JPEG or WebP"
# Anything a damaged file can make a decoder raise; all of them become ImageError.
_DECODE_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError, struct.error, zlib.error,
    OverflowError, MemoryError, Image.DecompressionBombError, Image.DecompressionBombWarning,
)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(ValueError):
    """An upload that cannot be used; ``str(err)`` is a message for the user."""


@dataclass(frozen=True)
class LoadedImage:
    """A decoded upload: an upright 8-bit RGB image plus what was done to get it."""

    image: Image.Image  # mode "RGB", EXIF orientation applied, transparency composited
    format: str  # the decoder that read it, e.g. "PNG", "JPEG", "MPO"
    original_mode: str  # PIL mode before conversion, e.g. "CMYK", "I;16", "P"
    original_size: tuple[int, int]  # (width, height) as stored, before rotation
    notes: tuple[str, ...] = ()  # user-facing remarks (first frame only, rotated, ...)


# -- sniffing ------------------------------------------------------------------------------------
_SIGNATURES = (
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"%PDF", "PDF"), (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"), (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"qoif", "QOI"), (b"\x00\x00\x01\x00", "ICO"),
    (b"PK\x03\x04", "ZIP"), (b"\x1f\x8b", "GZIP"), (b"%!PS", "PostScript"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


def sniff_unsupported(data: bytes) -> str | None:
    """Name a recognisably unsupported format (HEIC, AVIF, SVG, TIFF, ...) from the leading bytes."""
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        return "HEIC" if brand in _HEIF_BRANDS else "MP4/MOV"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    head = data[:2048].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<svg", b"<!doctype svg")) or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    if head.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    return None


# -- decoding ------------------------------------------------------------------------------------
def _read_source(source: bytes | str | os.PathLike | BinaryIO, max_bytes: int) -> bytes:
    """The raw bytes of ``source``, at most ``max_bytes`` of them."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as fh:
                data = fh.read(max_bytes + 1)
        except OSError as e:
            raise ImageError(f"could not read {os.fspath(source)!r}: {e.strerror or e}") from e
    elif hasattr(source, "read"):
        if getattr(source, "seekable", lambda: False)():
            source.seek(0)
        data = source.read(max_bytes + 1)
    else:
        raise TypeError(f"load_image expects bytes, a path or a binary file, got {type(source).__name__}")
    if len(data) > max_bytes:
        raise ImageError(f"the file is larger than {max_bytes / 2**20:.0f} MB; please upload a smaller image")
    return data


def _megapixels(n: float) -> str:
    return f"{n / 1e6:.3g}"


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header with an allowed decoder and check the pixel budget; no pixel data is decoded."""
    try:
        img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"the image declares too many pixels; the limit is {_megapixels(max_pixels)} megapixels") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"this file is not an image in a supported format; {_USE}") from e
    except _DECODE_ERRORS as e:
        raise ImageError(f"the image header is damaged ({e.__class__.__name__}); try re-saving it") from e
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageError(
            f"the image is {w}x{h} pixels ({_megapixels(w * h)} megapixels); the limit is {_megapixels(max_pixels)} "
            "megapixels, please downscale it"
        )
    if w < 1 or h < 1:
        img.close()
        raise ImageError(f"the image has no pixels ({w}x{h})")
    return img


def _is_animated(img: Image.Image) -> bool:
    try:
        return bool(getattr(img, "is_animated", False))
    except _DECODE_ERRORS:  # a damaged second frame; the first may still be fine
        return False
    finally:
        with contextlib.suppress(*_DECODE_ERRORS):
            img.seek(0)


def _apply_orientation(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Rotate/flip as the EXIF Orientation tag says, so phone photos come out upright."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:
        return img, "the EXIF data is unreadable, so the orientation was not applied"
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    if method is None:
        return img, None
    return img.transpose(method), f"rotated upright using the EXIF orientation tag ({orientation})"


def load_image(
    source: bytes | str | os.PathLike | BinaryIO,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    background: tuple[int, int, int] = WHITE,
) -> LoadedImage:
    """Decode an untrusted upload into an upright 8-bit RGB image.

    Args:
        source: raw bytes, a file path, or a binary file object (e.g. an uploaded file).
        max_pixels: largest allowed width * height, checked before any pixel data is decoded.
        max_bytes: largest allowed file size.
        background: RGB colour that transparent pixels are composited over.

    Returns:
        The image and notes on what was done (first frame of an animation, EXIF rotation, ...).

    Raises:
        ImageError: with a user-facing message for every unusable input.
    """
    data = _read_source(source, max_bytes)
    if not data:
        raise ImageError("the file is empty")
    kind = sniff_unsupported(data)
    if kind:
        raise ImageError(f"unsupported format {kind}; {_USE}")
    # Bomb warnings become errors. catch_warnings is process-wide, not per thread; the one filter it adds
    # only makes decoding stricter.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(data, max_pixels)
        with img:
            fmt, mode, size = img.format or "?", img.mode, img.size
            notes = ["animated image: only the first frame is used"] if _is_animated(img) else []
            try:
                img.load()
                upright, note = _apply_orientation(img)
                rgb, more = _to_rgb(upright, background)
            except ImageError:
                raise
            except _DECODE_ERRORS as e:
                raise ImageError(f"the image data is damaged or truncated ({e.__class__.__name__}); try re-saving it") from e
    notes += [n for n in (note, *more) if n]
    return LoadedImage(image=rgb, format=fmt, original_mode=mode, original_size=size, notes=tuple(notes))


# -- colour conversion ---------------------------------------------------------------------------
def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> tuple[Image.Image, list[str]]:
    """Any PIL mode -> "RGB", compositing transparency over ``background``."""
    notes: list[str] = []
    if is_high_depth(img):
        return high_depth_to_l(img).convert("RGB"), [f"{img.mode} high-bit-depth image reduced to 8 bits"]
    if img.mode in _ALPHA_MODES or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append(f"transparent areas drawn on a background of RGB{tuple(background)}")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB"), notes
    if img.mode == "CMYK":
        notes.append("CMYK colours converted to RGB (approximate, colour profile ignored)")
    try:
        return img.convert("RGB"), notes
    except ValueError as e:
        raise ImageError(f"unsupported colour mode {img.mode}; {_USE}") from e


# -- preprocessing -------------------------------------------------------------------------------
def fit_image(img: Image.Image, input_size: int, *, mode: str = "crop") -> Image.Image:
    """Resize a PIL image to ``input_size`` square, for display (net inputs go through :mod:`resviz.data.preprocess`).

    ``mode="crop"`` scales the shorter side to ``input_size`` and center-crops the longer one (keeps the
    aspect ratio, like torchvision's ``Resize`` + ``CenterCrop``); ``mode="resize"`` squashes the whole
    picture into the square.
    """
    if input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    if mode == "resize":
        return img.resize((input_size, input_size), Image.Resampling.BILINEAR)
    if mode != "crop":
        raise ValueError(f"mode must be 'crop' or 'resize', got {mode!r}")
    w, h = img.size
    scale = input_size / min(w, h)
    nw, nh = max(input_size, round(w * scale)), max(input_size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)  # PIL filters over the whole footprint: antialiased
    left, top = (nw - input_size) // 2, (nh - input_size) // 2
    return img.crop((left, top, left + input_size, top + input_size))


def to_model_input(
    img: Image.Image | LoadedImage,
    mean: Sequence[float] | float,
    std: Sequence[float] | float,
    input_size: int,
    channels: int,
    *,
    mode: str = "crop",
) -> torch.Tensor:
    """Turn a picture into a normalised ``(1, C, H, W)`` float32 batch for a net (see :mod:`resviz.data.preprocess`).

    Args:
        img: a PIL image (any mode) or a :class:`LoadedImage`.
        mean: per-channel mean of the training data (in [0, 1] units); one value is broadcast.
        std: per-channel standard deviation; one value is broadcast.
        input_size: side of the square input.
        channels: 1 (converted to ITU-R 601 luma grey) or 3 (RGB).
        mode: "crop" (centre square) or "resize" (the whole picture squashed into the square).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if isinstance(img, LoadedImage):
        img = img.image
    return image_to_input(img, Normalization.of(mean, std, channels), input_size, mode=mode)


def denormalize(x: torch.Tensor, mean: Sequence[float] | float, std: Sequence[float] | float) -> np.ndarray:
    """Undo :func:`to_model_input`'s normalisation: ``(1, C, H, W)`` or ``(C, H, W)`` -> ``(H, W, 3)`` in [0, 1]."""
    c = x.shape[-3]
    return Normalization.of(mean, std, c).picture(x)


# -- built-in samples ----------------------------------------------------------------------------
SAMPLE_IMAGES = ("circle", "star", "digit", "stripes")
_SS = 4  # draw at 4x and downsample: smooth edges without an antialiasing renderer


def _draw_sample(name: str, draw: ImageDraw.ImageDraw, s: int) -> None:
    if name == "circle":
        draw.ellipse((s * 0.2, s * 0.2, s * 0.8, s * 0.8), fill=(220, 50, 40))
    elif name == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 0.42, 0.17) * s
        pts = [(s / 2 + r * np.cos(a), s / 2 - r * np.sin(a)) for r, a in zip(radii, angles)]
        draw.polygon(pts, fill=(250, 190, 20))
    elif name == "digit":  # a hand-drawn-looking "7"
        stroke = [(s * 0.25, s * 0.22), (s * 0.75, s * 0.22), (s * 0.42, s * 0.82)]
        draw.line(stroke, fill=(20, 20, 20), width=s // 9, joint="curve")
    elif name == "stripes":
        for i in range(0, 8, 2):
            draw.rectangle((0, s * i / 8, s, s * (i + 1) / 8), fill=(30, 90, 200))
    else:
        raise ValueError(f"unknown sample {name!r}; choose one of {', '.join(SAMPLE_IMAGES)}")


def sample_image(name: str, size: int = 64) -> Image.Image:
    """One procedurally drawn RGB picture (no files needed)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    big = Image.new("RGB", (size * _SS, size * _SS), (245, 245, 240))
    _draw_sample(name, ImageDraw.Draw(big), size * _SS)
    return big.resize((size, size), Image.Resampling.LANCZOS)


def sample_images(size: int = 64) -> dict[str, Image.Image]:
    """All built-in pictures by name, for the Inspect page."""
    return {name: sample_image(name, size) for name in SAMPLE_IMAGES}
