"""Shattered gradients (Balduzzi et al. 2017): skip connections keep gradients correlated as depth grows.

At initialisation, the gradient of one logit with respect to the input is taken at ``points`` inputs
spaced evenly on a straight line from one test image towards another (``span`` of the way). In a deep plain net neighbouring inputs
get nearly unrelated gradients (white noise); in a residual net they stay correlated. Each input
runs alone (batch of one, train mode, so BatchNorm normalises over that image's positions only and
inputs never mix); norm statistics and the RNG are restored afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from torch import nn

from resviz.experiments.common import Progress, StudyConfig, as_progress, check, net_config, shapes, timer
from resviz.experiments.figures import lines
from resviz.nn.scoped import preserved
from resviz.train.trainer import build_nets

NAME = "shattered"
TITLE = "Shattered gradients: input-gradient correlation vs depth"
PAPER = "Balduzzi, Frean, Leary, Lewis, Ma, McWilliams. The Shattered Gradients Problem. ICML 2017"
PAPER_NOTES = [  # Sections 3-4 (fully connected nets on a 1-D input); analytic rates
    {"net": "feedforward (plain), ReLU", "finding": "gradient correlation between nearby inputs decays like 2^-L"},
    {"net": "residual with BatchNorm", "finding": "decays only like 1/sqrt(L): gradients stay far more coherent"},
]


@dataclass(frozen=True, kw_only=True)
class ShatteredConfig(StudyConfig):
    depths: tuple[int, ...] = (8, 20, 56, 110)
    width: int = 8
    input_size: int = 16
    pairs: int = 3  # image pairs (lines) averaged over
    points: int = 48  # inputs per line
    span: float = 0.25  # the line covers this fraction of the way from one image to the other
    max_lag: int = 8

    # zoo: the zoo's architecture (width 16, 16 px) at initialisation, where Balduzzi et al. measure
    PRESETS = {"small": {}, "medium": {"depths": (8, 20, 56, 110, 218), "pairs": 8, "points": 96, "width": 16},
               "zoo": {"depths": (8, 20, 56, 110), "width": 16, "input_size": 16}}


def input_gradients(net: nn.Module, xs: torch.Tensor, target: int) -> torch.Tensor:
    """d logit[target] / d x for each input alone (batch of one, train mode); (T, C*H*W)."""
    grads = []
    with preserved(net):
        net.train()
        for x in xs:
            xi = x[None].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(net(xi)[0, target], xi)
            grads.append(g.flatten())
    return torch.stack(grads)


def lag_correlation(grads: torch.Tensor, max_lag: int) -> list[float]:
    """Mean Pearson correlation between gradients ``k`` steps apart on the line, k = 1..max_lag."""
    g = grads.double()
    g = g - g.mean(dim=1, keepdim=True)
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return [float((g[:-k] * g[k:]).sum(dim=1).mean()) for k in range(1, min(max_lag, len(g) - 1) + 1)]


def _depth(cfg: ShatteredConfig, depth: int, classes: int, lines_x: list[torch.Tensor], targets: list[int],
           progress: Progress) -> dict[str, list[float]]:
    nets = build_nets(net_config(depth, cfg.width, cfg.input_size, classes), seed=cfg.seed)
    out = {}
    for j, (name, net) in enumerate(nets.items()):
        curves = [lag_correlation(input_gradients(net, xs, t), cfg.max_lag) for xs, t in zip(lines_x, targets, strict=True)]
        out[name] = np.mean(curves, axis=0).tolist()
        progress((j + 1) / len(nets), f"depth {depth}: {name}")
    return out


def run(cfg: ShatteredConfig, progress: Any = None) -> dict[str, Any]:
    """Gradient correlation along lines between test images, per depth, residual vs plain, at init."""
    if len(cfg.depths) < 2:
        raise ValueError("the shattered-gradients study needs at least two depths")
    progress, elapsed = as_progress(progress), timer()
    data = shapes(cfg.input_size, 256, 2 * cfg.pairs, cfg.seed)
    x, y = data.test.tensors
    t = torch.linspace(0, cfg.span, cfg.points).view(-1, 1, 1, 1)
    lines_x = [x[2 * i] + t * (x[2 * i + 1] - x[2 * i]) for i in range(cfg.pairs)]  # (T, C, H, W) each
    targets = [int(y[2 * i]) for i in range(cfg.pairs)]
    depths = sorted(cfg.depths)
    with torch.random.fork_rng(devices=[]):
        spans = progress.spans([float(d) for d in depths])
        measured = [_depth(cfg, d, data.num_classes, lines_x, targets, p) for d, p in zip(depths, spans, strict=True)]
    rows = [{"depth": d, "residual_lag1": m["residual"][0], "plain_lag1": m["plain"][0],
             "residual_lag4": m["residual"][min(3, len(m["residual"]) - 1)], "plain_lag4": m["plain"][min(3, len(m["plain"]) - 1)]}
            for d, m in zip(depths, measured, strict=True)]
    progress(1.0, "done")
    return {"study": NAME, "title": TITLE, "paper": PAPER, "config": cfg.to_dict(), "rows": rows,
            "lags": {str(d): m for d, m in zip(depths, measured, strict=True)}, "checks": _checks(rows),
            "paper_rows": PAPER_NOTES, "source": "initialisation (no training)", "shipped": [], "time_s": elapsed()}


def _white(rows: list[dict[str, Any]], key: str, level: float = 0.1) -> int | None:
    """The first depth whose lag-1 correlation is below ``level`` (gradients look like white noise)."""
    return next((r["depth"] for r in rows if abs(r[key]) < level), None)


def _checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    a, b = rows[0], rows[-1]
    white = {k: _white(rows, f"{k}_lag1") for k in ("residual", "plain")}
    later = white["plain"] is not None and (white["residual"] is None or white["residual"] > white["plain"])
    return [
        check(f"plain nets' gradients decorrelate with depth (plain-{b['depth']} < plain-{a['depth']})",
              b["plain_lag1"] < a["plain_lag1"], f"lag-1 correlation {a['plain_lag1']:.3f} -> {b['plain_lag1']:.3f}"),
        check("the residual net's gradients stay more correlated than the plain net's at every depth",
              all(r["residual_lag1"] > r["plain_lag1"] for r in rows),
              ", ".join(f"{r['depth']}: {r['residual_lag1']:.3f} vs {r['plain_lag1']:.3f}" for r in rows)),
        check("plain gradients turn to white noise (|correlation| < 0.1) at a smaller depth than residual ones", later,
              f"first depth below 0.1: plain {white['plain'] or 'none'}, residual {white['residual'] or 'none'}"),
    ]


def figures(result: dict[str, Any]) -> dict[str, go.Figure]:
    rows = result["rows"]
    depth = lines([r["depth"] for r in rows], {"residual": [r["residual_lag1"] for r in rows],
                                               "plain": [r["plain_lag1"] for r in rows]},
                  title="Correlation of input gradients at neighbouring inputs", xaxis="depth (layers)",
                  yaxis="lag-1 gradient correlation")
    lag = lines(list(range(1, 1 + max(len(v["residual"]) for v in result["lags"].values()))),
                {f"{n}-{r['depth']}": result["lags"][str(r["depth"])][n] for r in result["rows"] for n in ("residual", "plain")},
                title="Gradient correlation by distance along the line", xaxis="steps apart", yaxis="correlation")
    return {"correlation_by_depth": depth, "correlation_by_lag": lag}
