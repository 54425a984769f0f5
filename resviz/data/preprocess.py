"""One preprocessing path from a picture to a net's input, shared by datasets, uploads and model infos.

A picture becomes an input in four steps, the same for a dataset file and an upload:

1. :func:`to_unit`: any PIL mode to ``(C, h, w)`` floats in [0, 1] (16-bit and float grey scaled by
   :func:`high_depth_to_l`, transparency composited over white, grey as ITU-R 601 luma);
2. the centre square is cropped (``mode="crop"``) or the whole picture kept (``mode="resize"``);
3. :func:`resize`: bilinear, antialiased when shrinking (torch's ``interpolate``);
4. :class:`Normalization`: per-channel ``(x - mean) / std``.

:func:`image_to_input` runs all four; tensors already in [0, 1] (dataset files) go through
:func:`resize` and :meth:`Normalization.normalize` directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and standard deviation of a net's inputs, in [0, 1] pixel units.

    Raises:
        ValueError: empty, of different lengths, or a std that is not > 0.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        mean = tuple(float(v) for v in np.ravel(self.mean))
        std = tuple(float(v) for v in np.ravel(self.std))
        if not mean or len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
        if not all(s > 0 for s in std):
            raise ValueError("std values must be > 0")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def of(cls, mean: Sequence[float] | float, std: Sequence[float] | float, channels: int) -> Normalization:
        """A normalisation for ``channels`` channels; a single value is used for every channel."""
        values = []
        for name, v in (("mean", mean), ("std", std)):
            arr = np.asarray(v, dtype=np.float64).reshape(-1)
            if arr.size == 1:
                arr = np.repeat(arr, channels)
            if arr.size != channels:
                raise ValueError(f"{name} has {arr.size} values but the input has {channels} channels")
            values.append(tuple(arr.tolist()))
        return cls(*values)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 3 or x.shape[-3] != self.channels:
            raise ValueError(f"expected (C, H, W) or (N, C, H, W) with C = {self.channels}, got {tuple(x.shape)}")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return mean, torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], ``(C, H, W)`` or ``(N, C, H, W)``, in the net's input units."""
        mean, std = self._stats(x01)
        return (x01 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`normalize`; values clamped to [0, 1] (NaN becomes 0)."""
        mean, std = self._stats(x)
        return torch.nan_to_num(x * std + mean).clamp(0, 1)

    def picture(self, x: torch.Tensor) -> np.ndarray:
        """One input, ``(1, C, H, W)`` or ``(C, H, W)``, as an ``(H, W, 3)`` float32 picture in [0, 1] for display."""
        t = x.detach().float().cpu()
        t = self.denormalize(t[0] if t.dim() == 4 else t)
        t = t.expand(3, -1, -1) if t.shape[0] == 1 else t
        return np.ascontiguousarray(t.permute(1, 2, 0).numpy())


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize ``(N, C, h, w)`` floats in [0, 1] to ``size`` (a side or ``(H, W)``): bilinear, antialiased."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)


def high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float grey -> 8-bit "L", scaled (a plain convert would clip to white)."""
    arr = np.asarray(img).astype(np.float64)
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        arr = arr / 257.0  # the full 16-bit range maps onto 0..255
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        arr = arr * 255.0
    elif lo < 0 or hi > 255:
        arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0  # unknown range: stretch to fit
    arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def is_high_depth(img: Image.Image) -> bool:
    return img.mode in ("I", "F") or img.mode.startswith("I;16")


def to_unit(img: Image.Image, channels: int) -> torch.Tensor:
    """A PIL image of any mode as ``(C, h, w)`` float32 in [0, 1]: 1 channel (luma grey) or 3 (RGB)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if is_high_depth(img):
        img = high_depth_to_l(img)
    if "A" in img.getbands() or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, (*WHITE, 255)), img.convert("RGBA"))
    arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    x = torch.from_numpy(arr.copy())
    return (x[None] if x.ndim == 2 else x.permute(2, 0, 1)).float().div_(255)  # (C, h, w)


def center_square(img: Image.Image) -> Image.Image:
    """The largest centred square of ``img``."""
    w, h = img.size
    side = min(w, h)
    if w == h:
        return img
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def image_to_unit(img: Image.Image, size: int, channels: int, *, mode: str = "crop") -> torch.Tensor:
    """``(C, size, size)`` floats in [0, 1]: centre square (``"crop"``) or the whole picture squashed (``"resize"``).

    Big pictures are box-reduced to about twice ``size`` first, so a photo does not cost a
    full-resolution resize; the antialiased resize then does the rest.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if mode not in ("crop", "resize"):
        raise ValueError(f"mode must be 'crop' or 'resize', got {mode!r}")
    if mode == "crop":
        img = center_square(img)
    if is_high_depth(img):
        img = high_depth_to_l(img)  # before reducing: PIL cannot box-reduce 16-bit images
    side = min(img.size)
    if side >= 4 * size:
        img = img.reduce(side // (2 * size))
    return resize(to_unit(img, channels)[None], size)[0]


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centred ``size`` x ``size`` window of ``(..., H, W)``."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def image_to_input(
    img: Image.Image, norm: Normalization, size: int, *, resize_size: int | None = None, mode: str = "crop"
) -> torch.Tensor:
    """The normalised ``(1, C, size, size)`` float32 input for a net fed with ``norm`` (C = ``norm.channels``).

    ``resize_size`` (ImageNet style): resize to that side first, then center-crop ``size``.
    """
    if resize_size and resize_size > size:
        x = center_crop(image_to_unit(img, resize_size, norm.channels, mode=mode), size)
    else:
        x = image_to_unit(img, size, norm.channels, mode=mode)
    return norm.normalize(x.contiguous())[None]
