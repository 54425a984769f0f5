"""Where the channels are in a merge's tensor, and that tensor as (B, C, h, w) maps.

CNNs merge ``(B, C, H, W)`` maps; vision transformers merge ``(B, N, C)`` token sequences (a class or
distillation token first, then one token per patch) and Swin merges ``(B, H, W, C)`` maps. The layout
of a merge is decided once, at discovery, from the merge's shape and the model's input shape:

* ``"vector"``: a 2-D ``(B, C)`` tensor (an MLP's residual); as maps it is ``(B, C, 1, 1)``.
* ``"tokens"``: a 3-D ``(B, N, C)`` tensor of a model whose input is an image ``(B, Cin, H0, W0)``.
  The patch grid ``(gh, gw)`` is the largest one with ``gh * gw <= N`` tokens, at most ``MAX_EXTRA``
  fewer than ``N``, and the input's aspect ratio (``gh * W0 == gw * H0``); the ``N - gh * gw`` leading
  tokens (class, distillation, register tokens) are not on the grid and are dropped from the maps.
* ``"nhwc"``: a 4-D ``(B, a, b, c)`` tensor whose ``(a, b)`` is the input's grid downsampled by one
  integer factor while ``(b, c)`` is not; ``"nchw"`` otherwise (also when both fit: a cube is read as
  channels first, as CNNs are).
* ``"other"``: anything else (a 1-D signal, a 5-D volume): no maps.
"""

from __future__ import annotations

import torch
from torch import nn

LAYOUTS = ("nchw", "nhwc", "tokens", "vector", "other")
MAX_EXTRA = 16  # leading tokens a token model may carry before its patches (class, distillation, registers)


def _downsampled(h: int, w: int, grid: tuple[int, ...]) -> bool:
    """Whether (h, w) is the input grid divided by one integer factor (rounding up, as strided convs do)."""
    if h < 1 or w < 1:
        return False
    gh, gw = grid
    return any(-(-gh // f) == h and -(-gw // f) == w for f in {max(1, gh // h), -(-gh // h)})


def token_grid(n: int, input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The patch grid ``(gh, gw)`` of ``n`` tokens for an input of spatial size ``input_hw`` (see the module doc)."""
    h0, w0 = input_hw
    for extra in range(min(n, MAX_EXTRA + 1)):
        cells = n - extra
        for gh in range(1, int(cells**0.5 * max(1.0, (h0 / w0) ** 0.5)) + 2):
            if cells % gh == 0 and gh * w0 == (cells // gh) * h0:
                return gh, cells // gh
    return None


def decide(shape: tuple[int, ...], input_shape: tuple[int, ...] | None) -> tuple[str, tuple[int, int] | None]:
    """``(layout, grid)`` of a merge of ``shape`` in a model fed ``input_shape``; ``grid`` is the maps' (h, w)."""
    image = input_shape is not None and len(input_shape) == 4
    if len(shape) == 2:
        return "vector", (1, 1)
    if len(shape) == 3 and image:
        grid = token_grid(shape[1], tuple(input_shape[2:]))
        return ("tokens", grid) if grid is not None else ("other", None)
    if len(shape) == 4:
        _, a, b, c = shape
        if image and _downsampled(a, b, input_shape[2:]) and not _downsampled(b, c, input_shape[2:]):
            return "nhwc", (a, b)
        return "nchw", (b, c)
    return "other", None


def to_maps(x: torch.Tensor, layout: str, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """A merge tensor of ``layout`` as ``(B, C, h, w)`` maps on its grid (a view where possible).

    ``tokens``: the leading ``N - gh * gw`` tokens are dropped. ``nchw`` tensors are returned as they are.

    Raises:
        ValueError: the layout has no maps (``"other"``) or the tensor does not fit the grid.
    """
    if layout == "nchw":
        return x
    if layout == "nhwc":
        return x.permute(0, 3, 1, 2)
    if layout == "vector":
        return x.reshape(*x.shape, 1, 1)
    if layout == "tokens" and grid is not None and x.dim() == 3 and x.shape[1] >= grid[0] * grid[1]:
        cells = grid[0] * grid[1]
        return x[:, x.shape[1] - cells:].reshape(x.shape[0], *grid, x.shape[2]).permute(0, 3, 1, 2)
    raise ValueError(f"a {layout!r} tensor of shape {tuple(x.shape)} has no (B, C, h, w) maps"
                     + (f" on a {grid[0]}x{grid[1]} grid" if grid else ""))


def channels_first(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` as a view with channels on dim 1 and every token or position after it (for per-channel statistics)."""
    if layout == "nhwc":
        return x.permute(0, 3, 1, 2)
    if layout == "tokens":
        return x.transpose(1, 2)  # (B, C, N): class tokens count as positions too
    return x


def layout_of(block: nn.Module) -> tuple[str, tuple[int, int] | None]:
    """``(layout, grid)`` of a junction's block: what discovery recorded, else ``("nchw", None)`` (ResViz's blocks)."""
    info = getattr(block, "info", None)
    return getattr(info, "layout", "nchw"), getattr(info, "grid", None)
