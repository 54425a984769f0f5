"""Loss landscape (Li, Xu, Taylor, Studer, Goldstein 2018): skip connections smooth the loss surface.

Around a trained residual net and its trained plain twin, the training loss is evaluated on a 2-D
slice ``theta* + a * d1 + b * d2`` along two random *filter-normalised* directions (each filter of
d scaled to the norm of the matching filter of theta*; norm and bias parameters get no direction,
as in the paper), and on the 1-D line from the initial weights to the trained ones
(``theta0 + t * (theta* - theta0)``, Goodfellow et al. 2015). Both nets use the same random draws.
Losses are means over a fixed batch of training images with the nets in eval mode.

Convexity is measured two ways. Li et al.'s own (their Fig. 8): at points of the slice, the extreme
eigenvalues of the *full* Hessian of the loss with respect to the weights (Lanczos on Hessian-vector
products, :mod:`resviz.analysis.curvature`), mapped as ``|lambda_min / lambda_max|`` on a coarser
sub-grid of the slice, since each point costs ``curvature_iters`` double backward passes. And the
curvature of the 2-D slice itself (finite differences of the plotted surface), which is free but only
sees the two drawn directions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from torch import nn

from resviz.analysis.curvature import hessian_extremes, nonconvexity_ratio
from resviz.experiments.common import MEDIUM_TRAINING, ZOO, Progress, TrainedStudyConfig, as_progress, check, timer
from resviz.experiments.figures import lines
from resviz.experiments.twins import reference_twins
from resviz.nn.scoped import perturbed, preserved
from resviz.plots import curvature_maps_figure, loss_contours_figure, loss_landscape_figure
from resviz.train.trainer import build_nets

T = TypeVar("T")
NAME = "landscape"
TITLE = "Loss landscape: filter-normalised slices, residual vs plain"
PAPER = "Li, Xu, Taylor, Studer, Goldstein. Visualizing the Loss Landscape of Neural Nets. NeurIPS 2018, Figs. 5 and 7"
PAPER_NOTES = [  # CIFAR-10, Figs. 5 and 7: qualitative
    {"net": "ResNet-56", "finding": "smooth, nearly convex bowl around the minimiser"},
    {"net": "ResNet-56 without skips", "finding": "chaotic, strongly non-convex surface; sharper minimiser"},
    {"net": "depth", "finding": "without skips the surface turns chaotic as depth grows (20 -> 56 -> 110)"},
]


@dataclass(frozen=True, kw_only=True)
class LandscapeConfig(TrainedStudyConfig):
    depth: int = 32  # the trained reference pair (shared with the lesion study and the degradation sweep)
    grid: int = 13  # points per axis of the 2-D slice
    span: float = 1.0  # the slice covers [-span, span]^2 in direction units
    line_points: int = 21  # points on the init -> trained line, t in [-0.25, 1.25]
    eval_size: int = 256  # training images per loss evaluation
    curvature_grid: int = 3  # points per axis of the full-Hessian map (a sub-grid of the slice; 0: none)
    curvature_iters: int = 10  # Lanczos steps (Hessian-vector products) per point of that map
    curvature_size: int = 128  # training images in each Hessian-vector product

    PRESETS = {"small": {}, "medium": {**MEDIUM_TRAINING, "depth": 56, "grid": 25, "line_points": 41, "eval_size": 1000,
                                       "curvature_grid": 5, "curvature_iters": 16},
               "zoo": {**ZOO, "depth": 56, "curvature_grid": 5, "curvature_iters": 16}}


def filter_normalised_direction(net: nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """A random direction with each filter scaled to the norm of the net's filter; zero for 1-D parameters."""
    out = []
    for p in net.parameters():
        if p.ndim <= 1:
            out.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        pf, df = p.detach().flatten(1), d.flatten(1)  # one row per filter (output channel)
        scale = pf.norm(dim=1, keepdim=True) / (df.norm(dim=1, keepdim=True) + 1e-10)
        out.append((df * scale).view_as(p))
    return out


@torch.no_grad()
def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = F.cross_entropy(net(x), y).item()
    return loss if np.isfinite(loss) else float("nan")


@torch.no_grad()
def on_slice(net: nn.Module, dirs: tuple[list[torch.Tensor], list[torch.Tensor]], coords: np.ndarray,
             measure: Callable[[], T], progress: Progress, what: str) -> list[list[T]]:
    """``measure()`` with the net's weights at theta* + a d1 + b d2, for every (a, b) of ``coords`` x ``coords`` (rows: b,
    columns: a), in eval mode; the weights come back after."""
    net.eval()
    params = list(net.parameters())
    z = []
    with perturbed(net) as base:
        for i, b in enumerate(coords):
            row = []
            for a in coords:
                for p, p0, d1, d2 in zip(params, base, *dirs, strict=True):
                    p.copy_(p0 + float(a) * d1 + float(b) * d2)
                row.append(measure())
            z.append(row)
            progress((i + 1) / len(coords), f"{what} row {i + 1}/{len(coords)}")
    return z


def surface(net: nn.Module, dirs: tuple[list[torch.Tensor], list[torch.Tensor]], coords: np.ndarray, x: torch.Tensor,
            y: torch.Tensor, progress: Progress) -> list[list[float]]:
    """Loss at theta* + a d1 + b d2 for every (a, b) of ``coords`` x ``coords`` (rows: b, columns: a)."""
    return on_slice(net, dirs, coords, lambda: _loss(net, x, y), progress, "slice")


@torch.no_grad()
def interpolation(net: nn.Module, init: nn.Module, ts: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Loss along theta0 + t (theta* - theta0); buffers (norm statistics) are interpolated too."""
    net.eval()
    state, start = net.state_dict(), init.state_dict()
    out = []
    with perturbed(net), preserved(net):  # parameters and buffers come back after
        saved = {k: v.clone() for k, v in state.items()}
        for t in ts:
            for k, v in state.items():
                if v.is_floating_point():
                    v.copy_(start[k] + float(t) * (saved[k] - start[k]))
                    if k.endswith("running_var"):
                        v.clamp_(min=0.0)  # extrapolating past the initialisation must not make a variance negative
            out.append(_loss(net, x, y))
    return out


def curvature_indices(grid: int, points: int) -> list[int]:
    """Indices into the slice's ``grid`` coordinates of an evenly spread sub-grid of ``points`` per axis (the centre
    among them when both are odd); none when ``points`` is 0."""
    if points <= 0:
        return []
    return sorted({int(round(i)) for i in np.linspace(0, grid - 1, min(points, grid))})


def curvature_map(net: nn.Module, dirs: tuple[list[torch.Tensor], list[torch.Tensor]], coords: np.ndarray,
                  x: torch.Tensor, y: torch.Tensor, *, iters: int, seed: int, progress: Progress) -> dict[str, Any]:
    """The full Hessian's extreme eigenvalues at theta* + a d1 + b d2 for every (a, b) of ``coords`` x ``coords``
    (rows: b, columns: a), and Li et al.'s ratio |lambda_min / lambda_max| there."""
    extremes = on_slice(net, dirs, coords, lambda: hessian_extremes(net, x, y, iters=iters, seed=seed), progress, "curvature")
    return {"lambda_min": [[lo for lo, _ in row] for row in extremes], "lambda_max": [[hi for _, hi in row] for row in extremes],
            "ratio": [[nonconvexity_ratio(lo, hi) for lo, hi in row] for row in extremes]}


def nonconvexity(z: list[list[float]]) -> float:
    """Mean |lambda_min / lambda_max| of the 2-D slice's own finite-difference Hessian where lambda_min < 0 (else 0).

    The same ratio Li et al. map (their Fig. 8), but of the two drawn directions' 2x2 curvature, not of the full
    Hessian (see :func:`curvature_map`); 0 everywhere means the slice is locally convex.
    """
    a = np.asarray(z, dtype=float)
    if a.shape[0] < 3 or a.shape[1] < 3:
        return float("nan")
    fxx = a[1:-1, 2:] - 2 * a[1:-1, 1:-1] + a[1:-1, :-2]
    fyy = a[2:, 1:-1] - 2 * a[1:-1, 1:-1] + a[:-2, 1:-1]
    fxy = (a[2:, 2:] - a[2:, :-2] - a[:-2, 2:] + a[:-2, :-2]) / 4
    mean, root = (fxx + fyy) / 2, np.sqrt(((fxx - fyy) / 2) ** 2 + fxy**2)
    lo, hi = mean - root, mean + root
    ratio = np.where((lo < 0) & (np.abs(hi) > 1e-12), np.abs(lo / np.where(np.abs(hi) > 1e-12, hi, 1.0)), 0.0)
    return float(np.nanmean(np.minimum(ratio, 1.0)))


def run(cfg: LandscapeConfig, progress: Any = None) -> dict[str, Any]:
    """2-D filter-normalised slices and 1-D init-to-trained lines of a trained residual/plain pair."""
    progress, elapsed = as_progress(progress), timer()
    data = cfg.data()
    net_cfg = cfg.net(cfg.depth, data.num_classes)
    train_part, res_part, plain_part = progress.spans([0.6, 0.2, 0.2])
    twins = reference_twins(net_cfg, data, cfg.schedule(), seed=cfg.seed,
                            source=cfg.source, device=cfg.device, progress=train_part)
    with torch.random.fork_rng(devices=[]):
        inits = build_nets(net_cfg, seed=cfg.seed)  # the seeded initialisation the pair was trained from
    x, y = data.train.tensors[0][: cfg.eval_size], data.train.tensors[1][: cfg.eval_size]
    coords, ts = np.linspace(-cfg.span, cfg.span, cfg.grid), np.linspace(-0.25, 1.25, cfg.line_points)
    picked = curvature_indices(cfg.grid, cfg.curvature_grid)
    sub = coords[picked]
    centre = picked.index(cfg.grid // 2) if cfg.grid // 2 in picked else None  # the slice's centre on the map
    xc, yc = x[: cfg.curvature_size], y[: cfg.curvature_size]
    out: dict[str, Any] = {"alphas": coords.tolist(), "ts": ts.tolist(), "surface": {}, "line": {},
                           "curvature_alphas": sub.tolist(), "curvature": {}}
    rows = []
    for name, part in (("residual", res_part), ("plain", plain_part)):
        net = twins.nets[name]
        g = torch.Generator().manual_seed(cfg.seed)  # the same draws for both nets
        dirs = (filter_normalised_direction(net, g), filter_normalised_direction(net, g))
        slice_part, curve_part = part.spans([1.0, 4.0 * len(sub) ** 2 * cfg.curvature_iters / max(1, cfg.grid) ** 2])
        out["surface"][name] = surface(net, dirs, coords, x, y, slice_part.span(0.0, 0.9))
        out["line"][name] = interpolation(net, inits[name], ts, x, y)
        slice_part(1.0, f"{name}: interpolation")
        if len(sub):
            out["curvature"][name] = curvature_map(net, dirs, sub, xc, yc, iters=cfg.curvature_iters, seed=cfg.seed,
                                                   progress=curve_part)
        curve_part(1.0, f"{name}: curvature")
        rows.append(_row(name, out["surface"][name], coords, cfg.span, out["curvature"].get(name), centre))
    progress(1.0, "done")
    checks, effects = _checks(rows), effect_checks(rows, out["surface"]["residual"])
    return {"study": NAME, "title": TITLE, "paper": PAPER, "config": cfg.to_dict(), "rows": rows, **out,
            "checks": checks + effects if cfg.budget == "zoo" else checks, "effects": effects, "paper_rows": PAPER_NOTES,
            "source": twins.source, "shipped": list(twins.shipped), "time_s": elapsed()}


CONVEXITY_RATIO = 3.0  # Li et al. Fig. 8: the plain net's map is dominated by non-convexity, the ResNet's is nearly flat


def convexity_measure(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The row field the convexity effect is judged on and its name: Li et al.'s full-Hessian ratio where the rows
    have it (a curvature map was measured), else the 2-D slice's own."""
    if all(np.isfinite(r.get("hessian_nonconvexity", float("nan"))) for r in rows):
        return "hessian_nonconvexity", "Li et al. Fig. 8's |lambda_min/lambda_max| of the full Hessian"
    return "nonconvexity", "|lambda_min/lambda_max| of the 2-D slice's curvature"


def effect_checks(rows: list[dict[str, Any]], residual_surface: list[list[float]]) -> list[dict[str, Any]]:
    """Li et al.'s effect sizes: how much less convex the plain slice is, and the ResNet's minimum at its centre."""
    r, p = rows[0], rows[1]
    a = np.asarray(residual_surface, dtype=float)
    c = a.shape[0] // 2
    lowest = bool(np.nanmin(a) >= a[c, c])
    key, measure = convexity_measure(rows)
    ratio = p[key] / r[key] if r[key] > 0 else float("inf")
    sharper = []
    if all("center_lambda_max" in x for x in rows):  # a curvature map was measured: its centre is the trained weights
        sharper = [check("the plain net's minimiser is sharper (Li et al.: a sharper minimiser without skips; the Hessian's "
                         "largest eigenvalue at the trained weights)", p["center_lambda_max"] > r["center_lambda_max"],
                         f"lambda_max {p['center_lambda_max']:.4g} (plain) vs {r['center_lambda_max']:.4g} (residual)")]
    return [
        check(f"the plain net's slice is at least {CONVEXITY_RATIO:.0f}x less convex ({measure})", ratio >= CONVEXITY_RATIO,
              f"{p[key]:.3f} (plain) vs {r[key]:.3f} (residual): "
              + ("the residual slice is convex everywhere" if ratio == float("inf") else f"{ratio:.2g}x")),
        check("the trained ResNet sits at the lowest point of its slice", lowest,
              f"centre {a[c, c]:.4g}, lowest {np.nanmin(a):.4g}"),
        *sharper,
    ]


def _row(name: str, z: list[list[float]], coords: np.ndarray, span: float, curvature: dict[str, Any] | None = None,
         curvature_centre: int | None = None) -> dict[str, Any]:
    a = np.asarray(z, dtype=float)
    c = len(coords) // 2
    rr = np.hypot(*np.meshgrid(coords, coords))
    near = rr <= span / 2 + 1e-9
    row = {"net": name, "center_loss": float(a[c, c]), "mean_rise_r<=half": float(np.nanmean(a[near]) - a[c, c]),
           "max_loss": float(np.nanmax(a)), "nonconvexity": nonconvexity(z)}
    if curvature:
        ratio = np.asarray(curvature["ratio"], dtype=float)
        row["hessian_nonconvexity"] = float(np.nanmean(ratio))
        if curvature_centre is not None:  # the map's point at the slice's centre: the trained weights
            k = curvature_centre
            row["center_lambda_max"] = float(np.asarray(curvature["lambda_max"], dtype=float)[k, k])
    return row


def _checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    r, p = rows[0], rows[1]
    return [
        check("the plain net's loss climbs far higher across the slice", p["max_loss"] > r["max_loss"],
              f"highest loss on the slice: {r['max_loss']:.3g} (residual) vs {p['max_loss']:.3g} (plain); mean rise near "
              f"the centre {r['mean_rise_r<=half']:.2f} vs {p['mean_rise_r<=half']:.2f}"),
        check("the plain net's slice is less convex (its own 2-D curvature)", p["nonconvexity"] > r["nonconvexity"],
              f"mean |lambda_min/lambda_max| of the slice: {r['nonconvexity']:.3f} (residual) vs {p['nonconvexity']:.3f} "
              "(plain)"),
    ]


def figures(result: dict[str, Any]) -> dict[str, go.Figure]:
    a = result["alphas"]
    out = {f"surface_{n}": loss_landscape_figure(result["surface"][n], alphas=a, betas=a,
                                                 title=f"Loss landscape of the {n} net (log10 training loss)")
           for n in ("residual", "plain")}
    # both slices seen from above on one colour scale: what the app opens with (a 3-D surface is slow to draw without a GPU)
    out["contours"] = loss_contours_figure({n: result["surface"][n] for n in ("residual", "plain") if n in result["surface"]},
                                           alphas=a, betas=a,
                                           title="Loss slices around the trained weights, seen from above (log10 training loss)")
    curv = {n: result["curvature"][n]["ratio"] for n in ("residual", "plain") if n in result.get("curvature", {})}
    if curv:
        sub = result["curvature_alphas"]
        out["curvature"] = curvature_maps_figure(
            curv, alphas=sub, title=f"Non-convexity |λmin/λmax| of the full Hessian, {len(sub)} x {len(sub)} points of "
                                    "the slices (Li et al. Fig. 8; 0: locally convex)")
    out["interpolation"] = lines(result["ts"], result["line"], log_y=True, xaxis="t (0: initialisation, 1: trained)",
                                 title="Training loss from the initial to the trained weights", yaxis="training loss")
    return out
