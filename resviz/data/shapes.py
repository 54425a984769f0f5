"""The procedural ``shapes`` dataset: seeded, offline, any resolution, with exact object masks.

Each image holds one large shape (its label) drawn over a two-colour gradient background that is
littered with thin strokes and small dots, plus per-image Gaussian noise. The shape has a random
position, size, rotation and colour; its colour is always far from the background's, but colour
never predicts the class, so a net has to learn outlines: corners vs curves, holes, arms, points.

Shapes are rendered from signed distance functions (SDFs) in the shape's own frame, where the shape
fits in a disk of radius about 1. ``alpha = clamp(0.5 - sdf_in_pixels, 0, 1)`` antialiases every edge at every
resolution and the ground-truth mask is exactly ``sdf < 0``. All random parameters are drawn in
resolution-free units before any pixel is touched, so one seed gives the same scenes at 16 or 64 px;
only the pixel noise depends on the resolution.

Difficulty: shallow plain and residual nets both learn it; deep plain nets stay near chance where
residual nets of the same depth learn it (docs/experiments.md, section 1, has the measured errors).
Most remaining errors are corners vs curves: circle/square, ring/frame, cross/star.

Rendering uses numpy on one core on purpose: with torch's intra-op threads, the ~100 small
elementwise ops per chunk stalled on thread barriers whenever other processes shared the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

SHAPE_CLASSES = ("circle", "ring", "square", "frame", "triangle", "cross", "star", "crescent")

N_STROKES = 3  # distractor line segments per image, each present with P_STROKE
N_DOTS = 3  # distractor dots per image, each present with P_DOT
P_STROKE, P_DOT = 0.6, 0.5
RADIUS = (0.3, 0.45)  # shape radius as a fraction of the side; (0.2, 0.36) left 16 px nets at 68% instead of 91%
MIN_CONTRAST = 0.5  # least RGB distance between the shape colour and the background's middle colour
GRADIENT = 0.15  # per-channel half-range of the background gradient: keeps contrast >= 0.5 - 0.13
NOISE = (0.02, 0.08)  # per-image std of the pixel noise
_CHUNK_PIXELS = 1 << 16  # pixels per render chunk: L2-sized chunks (6,000 at 32 px: 0.45 s vs 0.57 s at 1 << 19)

Array = np.ndarray


@dataclass(frozen=True)
class ShapesArrays:
    """Rendered images with everything needed to check them."""

    images: torch.Tensor  # (N, 3, S, S) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64 index into SHAPE_CLASSES
    masks: torch.Tensor  # (N, S, S) bool, True on the labelled shape
    fg: torch.Tensor  # (N, 3) float32 colour of the labelled shape


def _box(u: Array, v: Array, a: float, b: float) -> Array:
    # Chebyshev box distance: exact inside and along the edges, which is all antialiasing needs.
    return np.maximum(np.abs(u) - a, np.abs(v) - b)


def _triangle(u: Array, v: Array) -> Array:
    normals = [math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]  # apex points to -v
    return np.max([u * math.cos(a) + v * math.sin(a) for a in normals], axis=0) - 0.55


def _star(u: Array, v: Array) -> Array:
    # Fold the angle into one half-spike [0, pi/5]; the edge runs from tip A to inner corner B.
    sector = math.pi / 5
    phi = np.abs((np.arctan2(v, u) + sector) % (2 * sector) - sector)
    rho = np.hypot(u, v)
    qx, qy = rho * np.cos(phi), rho * np.sin(phi)
    ax, bx, by = 1.0, 0.45 * math.cos(sector), 0.45 * math.sin(sector)
    ex, ey = bx - ax, by
    return (ey * (qx - ax) - ex * qy) / math.hypot(ex, ey)  # negative on the origin's side


_SDF: dict[str, Callable[[Array, Array], Array]] = {
    "circle": lambda u, v: np.hypot(u, v) - 0.9,
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 0.7) - 0.25,
    "square": lambda u, v: _box(u, v, 0.72, 0.72),
    "frame": lambda u, v: np.abs(_box(u, v, 0.62, 0.62)) - 0.2,
    "triangle": _triangle,
    "cross": lambda u, v: np.minimum(_box(u, v, 0.95, 0.3), _box(u, v, 0.3, 0.95)),
    "star": _star,
    "crescent": lambda u, v: np.maximum(np.hypot(u, v) - 0.9, 0.75 - np.hypot(u - 0.45, v)),
}


def _uniform(g: np.random.Generator, lo: float, hi: float, *shape: int) -> Array:
    return g.uniform(lo, hi, shape).astype(np.float32)


def _foreground(g: np.random.Generator, mid: Array) -> Array:
    """Random colours at least MIN_CONTRAST from ``mid`` (N, 3): first of 16 tries, else the far corner."""
    cand = g.random((len(mid), 16, 3), dtype=np.float32)
    ok = np.linalg.norm(cand - mid[:, None], axis=2) >= MIN_CONTRAST
    pick = cand[np.arange(len(mid)), ok.argmax(1)]
    corner = (mid < 0.5).astype(np.float32)  # at least 0.5 * sqrt(3) away
    return np.where(ok.any(1, keepdims=True), pick, corner)


def _draw_params(n: int, g: np.random.Generator) -> dict[str, Array]:
    """Every random choice for ``n`` scenes, in resolution-free units, in a fixed order."""
    p: dict[str, Array] = {"labels": g.permutation(np.arange(n) % len(SHAPE_CLASSES))}
    p["r"] = _uniform(g, *RADIUS, n)
    p["cx"] = p["r"] * 0.8 + _uniform(g, 0, 1, n) * (1 - 1.6 * p["r"])  # at most 20% leaves the frame
    p["cy"] = p["r"] * 0.8 + _uniform(g, 0, 1, n) * (1 - 1.6 * p["r"])
    p["theta"] = _uniform(g, 0, 2 * math.pi, n)
    p["bg_mid"] = _uniform(g, 0, 1, n, 3)
    p["bg_delta"] = _uniform(g, -GRADIENT, GRADIENT, n, 3)
    p["bg_angle"] = _uniform(g, 0, 2 * math.pi, n)
    p["fg"] = _foreground(g, p["bg_mid"])
    m = N_STROKES
    p["seg_a"] = _uniform(g, 0, 1, n, m, 2)
    angle, length = _uniform(g, 0, 2 * math.pi, n, m), _uniform(g, 0.25, 0.7, n, m)
    p["seg_b"] = p["seg_a"] + length[..., None] * np.stack([np.cos(angle), np.sin(angle)], -1)
    p["seg_w"] = _uniform(g, 0.02, 0.045, n, m)  # stroke width, fraction of the side
    p["seg_on"] = g.random((n, m)) < P_STROKE
    p["seg_rgb"] = _uniform(g, 0, 1, n, m, 3)
    p["dot_c"] = _uniform(g, 0, 1, n, N_DOTS, 2)
    p["dot_r"] = _uniform(g, 0.025, 0.06, n, N_DOTS)
    p["dot_on"] = g.random((n, N_DOTS)) < P_DOT
    p["dot_rgb"] = _uniform(g, 0, 1, n, N_DOTS, 3)
    p["noise"] = _uniform(g, *NOISE, n)
    return p


def _over(img: Array, alpha: Array, rgb: Array) -> None:
    """Composite colour ``rgb`` (B, 3) with coverage ``alpha`` (B, S, S) over ``img`` (B, 3, S, S), in place."""
    diff = np.subtract(rgb[:, :, None, None], img)
    diff *= alpha[:, None]
    img += diff


def _segment_dist(x: Array, y: Array, a: Array, b: Array) -> Array:
    """Distance from pixel centres to segments a-b (B, 2), (B, S, S), in units of the side."""
    ax, ay, dx, dy = (t[:, None, None] for t in (a[:, 0], a[:, 1], b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]))
    h = np.clip(((x - ax) * dx + (y - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-12), 0, 1)
    return np.hypot(x - ax - h * dx, y - ay - h * dy)


def _shape_sdf(p: dict[str, Array], x: Array, y: Array) -> Array:
    """Signed distance (B, S, S) to each scene's labelled shape, in units of the side."""
    r, cx, cy, th = (p[k][:, None, None] for k in ("r", "cx", "cy", "theta"))
    dx, dy = (x - cx) / r, (y - cy) / r
    u = dx * np.cos(th) + dy * np.sin(th)  # rotate the pixel into the shape's frame
    v = -dx * np.sin(th) + dy * np.cos(th)
    sdf = np.empty_like(u)
    for k, name in enumerate(SHAPE_CLASSES):
        sel = p["labels"] == k
        if sel.any():
            sdf[sel] = _SDF[name](u[sel], v[sel])
    return sdf * r


def _render(p: dict[str, Array], size: int, g: np.random.Generator) -> tuple[Array, Array]:
    """Images (B, 3, S, S) in [0, 1] and masks (B, S, S) for one chunk of scene parameters."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = coords[None, :, None], coords[None, None, :]  # (1, S, 1) rows, (1, 1, S) columns
    ang = p["bg_angle"][:, None, None]
    t = ((x - 0.5) * np.cos(ang) + (y - 0.5) * np.sin(ang)) / math.sqrt(2)  # in [-0.5, 0.5]
    img = p["bg_mid"][:, :, None, None] + t[:, None] * p["bg_delta"][:, :, None, None]
    for j in range(N_STROKES):
        d = _segment_dist(x, y, p["seg_a"][:, j], p["seg_b"][:, j]) * size
        alpha = np.clip(p["seg_w"][:, j, None, None] * size / 2 + 0.5 - d, 0, 1) * p["seg_on"][:, j, None, None]
        _over(img, alpha, p["seg_rgb"][:, j])
    for j in range(N_DOTS):
        c = p["dot_c"][:, j, :, None, None]
        d = (np.hypot(x - c[:, 0], y - c[:, 1]) - p["dot_r"][:, j, None, None]) * size
        _over(img, np.clip(0.5 - d, 0, 1) * p["dot_on"][:, j, None, None], p["dot_rgb"][:, j])
    sdf = _shape_sdf(p, x, y) * size  # in pixels
    _over(img, np.clip(0.5 - sdf, 0, 1), p["fg"])
    img += p["noise"][:, None, None, None] * g.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 1, out=img), sdf < 0


def make_shapes(n: int, size: int = 32, seed: int = 0) -> ShapesArrays:
    """Render ``n`` seeded scenes at ``size`` x ``size``; classes are balanced to within one image.

    Args:
        n: number of images.
        size: side in pixels.
        seed: the same seed always gives identical tensors (numpy's PCG64 stream).
    """
    g = np.random.default_rng(seed)
    p = _draw_params(n, g)
    chunk = max(1, _CHUNK_PIXELS // (size * size))
    images = np.empty((n, 3, size, size), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=bool)
    for s in range(0, n, chunk):
        images[s : s + chunk], masks[s : s + chunk] = _render({k: v[s : s + chunk] for k, v in p.items()}, size, g)
    return ShapesArrays(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(p["labels"]).long(),
        masks=torch.from_numpy(masks),
        fg=torch.from_numpy(p["fg"]),
    )
