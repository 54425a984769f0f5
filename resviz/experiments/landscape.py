"""Loss landscape (Li, Xu, Taylor, Studer, Goldstein 2018): skip connections smooth the loss surface.

Around a trained residual net and its trained plain twin, the training loss is evaluated on a 2-D
slice ``theta* + a * d1 + b * d2`` along two random *filter-normalised* directions (each filter of
d scaled to the norm of the matching filter of theta*; norm and bias parameters get no direction,
as in the paper), and on the 1-D line from the initial weights to the trained ones
(``theta0 + t * (theta* - theta0)``, Goodfellow et al. 2015). Both nets use the same random draws.
Losses are means over a fixed batch of training images with the nets in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from torch import nn

from resviz.experiments.common import MEDIUM_TRAINING, ZOO, Progress, TrainedStudyConfig, as_progress, check, timer
from resviz.experiments.figures import lines
from resviz.experiments.twins import reference_twins
from resviz.nn.scoped import perturbed, preserved
from resviz.plots import loss_contours_figure, loss_landscape_figure
from resviz.train.trainer import build_nets

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

    PRESETS = {"small": {}, "medium": {**MEDIUM_TRAINING, "depth": 56, "grid": 25, "line_points": 41, "eval_size": 1000},
               "zoo": {**ZOO, "depth": 56}}


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
def surface(net: nn.Module, dirs: tuple[list[torch.Tensor], list[torch.Tensor]], coords: np.ndarray, x: torch.Tensor,
            y: torch.Tensor, progress: Progress) -> list[list[float]]:
    """Loss at theta* + a d1 + b d2 for every (a, b) of ``coords`` x ``coords`` (rows: b, columns: a)."""
    net.eval()
    params = list(net.parameters())
    z = []
    with perturbed(net) as base:
        for i, b in enumerate(coords):
            row = []
            for a in coords:
                for p, p0, d1, d2 in zip(params, base, *dirs, strict=True):
                    p.copy_(p0 + float(a) * d1 + float(b) * d2)
                row.append(_loss(net, x, y))
            z.append(row)
            progress((i + 1) / len(coords), f"slice row {i + 1}/{len(coords)}")
    return z


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


def nonconvexity(z: list[list[float]]) -> float:
    """Mean |lambda_min / lambda_max| of the grid's finite-difference Hessian where lambda_min < 0 (else 0).

    Li et al. map this ratio over the slice (their Fig. 8); 0 everywhere means locally convex.
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
    out: dict[str, Any] = {"alphas": coords.tolist(), "ts": ts.tolist(), "surface": {}, "line": {}}
    rows = []
    for name, part in (("residual", res_part), ("plain", plain_part)):
        net = twins.nets[name]
        g = torch.Generator().manual_seed(cfg.seed)  # the same draws for both nets
        dirs = (filter_normalised_direction(net, g), filter_normalised_direction(net, g))
        out["surface"][name] = surface(net, dirs, coords, x, y, part.span(0.0, 0.85))
        out["line"][name] = interpolation(net, inits[name], ts, x, y)
        part(1.0, f"{name}: interpolation")
        rows.append(_row(name, out["surface"][name], coords, cfg.span))
    progress(1.0, "done")
    checks, effects = _checks(rows), effect_checks(rows, out["surface"]["residual"])
    return {"study": NAME, "title": TITLE, "paper": PAPER, "config": cfg.to_dict(), "rows": rows, **out,
            "checks": checks + effects if cfg.budget == "zoo" else checks, "effects": effects, "paper_rows": PAPER_NOTES,
            "source": twins.source, "time_s": elapsed()}


CONVEXITY_RATIO = 3.0  # Li et al. Fig. 8: the plain net's map is dominated by non-convexity, the ResNet's is nearly flat


def effect_checks(rows: list[dict[str, Any]], residual_surface: list[list[float]]) -> list[dict[str, Any]]:
    """Li et al.'s effect sizes: how much less convex the plain slice is, and the ResNet's minimum at its centre."""
    r, p = rows[0], rows[1]
    a = np.asarray(residual_surface, dtype=float)
    c = a.shape[0] // 2
    lowest = bool(np.nanmin(a) >= a[c, c])
    ratio = p["nonconvexity"] / r["nonconvexity"] if r["nonconvexity"] > 0 else float("inf")
    return [
        check(f"the plain net's slice is at least {CONVEXITY_RATIO:.0f}x less convex (Li et al. Fig. 8's "
              "|lambda_min/lambda_max|)", ratio >= CONVEXITY_RATIO,
              f"{p['nonconvexity']:.3f} (plain) vs {r['nonconvexity']:.3f} (residual): "
              + ("the residual slice is convex everywhere" if ratio == float("inf") else f"{ratio:.1f}x")),
        check("the trained ResNet sits at the lowest point of its slice", lowest,
              f"centre {a[c, c]:.4g}, lowest {np.nanmin(a):.4g}"),
    ]


def _row(name: str, z: list[list[float]], coords: np.ndarray, span: float) -> dict[str, Any]:
    a = np.asarray(z, dtype=float)
    c = len(coords) // 2
    rr = np.hypot(*np.meshgrid(coords, coords))
    near = rr <= span / 2 + 1e-9
    return {"net": name, "center_loss": float(a[c, c]), "mean_rise_r<=half": float(np.nanmean(a[near]) - a[c, c]),
            "max_loss": float(np.nanmax(a)), "nonconvexity": nonconvexity(z)}


def _checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    r, p = rows[0], rows[1]
    return [
        check("the plain net's loss climbs far higher across the slice", p["max_loss"] > r["max_loss"],
              f"highest loss on the slice: {r['max_loss']:.3g} (residual) vs {p['max_loss']:.3g} (plain); mean rise near "
              f"the centre {r['mean_rise_r<=half']:.2f} vs {p['mean_rise_r<=half']:.2f}"),
        check("the plain net's slice is less convex", p["nonconvexity"] > r["nonconvexity"],
              f"mean |lambda_min/lambda_max|: {r['nonconvexity']:.3f} (residual) vs {p['nonconvexity']:.3f} (plain)"),
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
    out["interpolation"] = lines(result["ts"], result["line"], log_y=True, xaxis="t (0: initialisation, 1: trained)",
                                 title="Training loss from the initial to the trained weights", yaxis="training loss")
    return out
