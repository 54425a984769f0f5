"""Layer responses (He et al. 2016, Fig. 7): residual functions are closer to zero than plain layers.

For trained residual and plain nets at several depths, the response of every 3x3 layer of every
block's branch is measured on test images in eval mode: the output of the norm that follows the conv
(before the activation or the addition), or the conv's own output when no norm follows it inside the
branch (the last conv of a pre-activation block, whose output is F(x) itself, just before ``+ S(x)``).
Its standard deviation is the per-channel standard deviation over images and positions, averaged
over channels.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from torch import nn

from resviz.experiments.common import (
    MEDIUM_TRAINING,
    ZOO,
    ZOO_DEPTHS,
    Progress,
    TrainedStudyConfig,
    as_progress,
    check,
    net_label,
    timer,
)
from resviz.experiments.figures import lines
from resviz.experiments.twins import reference_twins
from resviz.nn.blocks import Scale
from resviz.nn.merge import junctions
from resviz.nn.scoped import eval_mode

NAME = "responses"
TITLE = "Layer responses: std of each residual branch"
PAPER = "He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016, Fig. 7"
PAPER_NOTES = [  # CIFAR-10, Fig. 7: qualitative
    {"finding": "ResNets have generally smaller responses than their plain counterparts"},
    {"finding": "the deeper ResNet has smaller responses (ResNet-110 < ResNet-56 < ResNet-20)"},
]


@dataclass(frozen=True, kw_only=True)
class ResponsesConfig(TrainedStudyConfig):
    depths: tuple[int, ...] = (20, 56)
    eval_size: int = 500

    PRESETS = {"small": {}, "medium": {**MEDIUM_TRAINING, "depths": (20, 56, 110)}, "zoo": {**ZOO, "depths": ZOO_DEPTHS}}


def _taps(block: nn.Module) -> list[nn.Module]:
    """Modules whose outputs are the block's layer responses: each conv's following norm (or the conv)."""
    mods = list(block.branch)
    taps = []
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            taps.append(nxt if isinstance(nxt, (nn.BatchNorm2d, nn.GroupNorm)) else m)
    if isinstance(mods[-1], Scale):  # a residual scale ends F
        taps[-1] = mods[-1]
    return taps


@torch.no_grad()
def layer_stds(net: nn.Module, x: torch.Tensor) -> list[list[float]]:
    """Per block, the std of each layer response of its branch (channel-averaged), in eval mode."""
    blocks = [j.block for j in junctions(net)]
    stds: list[list[float]] = [[] for _ in blocks]

    def hook(i: int) -> Callable[..., None]:
        def record(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            var = torch.var(out.float(), dim=(0, 2, 3), correction=0)  # (C,)
            stds[i].append(float(var.mean().sqrt()))

        return record

    with ExitStack() as stack:
        stack.enter_context(eval_mode(net))
        for i, blk in enumerate(blocks):
            for m in _taps(blk):
                stack.callback(m.register_forward_hook(hook(i)).remove)
        net(x)
    return stds


def branch_scales(net: nn.Module) -> list[float]:
    """Per block, the RMS scale (|gamma|) of the norm whose output is F(x); NaN where F(x) ends in no affine norm.

    In eval mode a norm's output std is about its scale, so this is what the std of F(x) is made of.
    """
    out = []
    for j in junctions(net):
        tap = _taps(j.block)[-1]
        w = getattr(tap, "weight", None)
        out.append(float(w.detach().float().pow(2).mean().sqrt()) if isinstance(tap, (nn.BatchNorm2d, nn.GroupNorm))
                   and w is not None else float("nan"))
    return out


def _measure(cfg: ResponsesConfig, depth: int, progress: Progress) -> dict[str, Any]:
    data = cfg.data()
    twins = reference_twins(cfg.net(depth, data.num_classes), data, cfg.schedule(), seed=cfg.seed, source=cfg.source,
                            device=cfg.device, progress=progress)
    x = data.test.tensors[0][: cfg.eval_size]
    out: dict[str, Any] = {"depth": depth, "status": twins.status, "source": twins.source, "shipped": list(twins.shipped)}
    for name, net in twins.nets.items():
        per_block = layer_stds(net, x)
        out[f"{name}_layers"] = [s for block in per_block for s in block]
        out[f"{name}_branch"] = [block[-1] for block in per_block]  # F(x) just before the addition
        out[f"{name}_scale"] = branch_scales(net)
    return out


def run(cfg: ResponsesConfig, progress: Any = None) -> dict[str, Any]:
    """Per depth and net: the std of every block's F(x) (the rows and checks) and of every layer response."""
    progress, elapsed = as_progress(progress), timer()
    depths = sorted(cfg.depths)
    measured = [_measure(cfg, d, p) for d, p in zip(depths, progress.spans([float(d) for d in depths]), strict=True)]
    rows = []
    for m in measured:
        for name in ("residual", "plain"):
            branch, layers = np.asarray(m[f"{name}_branch"]), np.asarray(m[f"{name}_layers"])
            rows.append({"net": f"{name}-{m['depth']}", "depth": m["depth"], "blocks": len(branch),
                         "mean_branch_std": float(branch.mean()), "median_branch_std": float(np.median(branch)),
                         "max_branch_std": float(branch.max()), "mean_layer_std": float(layers.mean()),
                         "mean_branch_scale": float(np.mean(m[f"{name}_scale"]))})
    progress(1.0, "done")
    sources = sorted({m["source"] for m in measured})
    source = "; ".join(sources) if all(s.startswith("pretrained") for s in sources) else f"trained ({cfg.steps} steps each)"
    checks, effects = _checks(rows), effect_checks(rows)
    series = {f"{name}-{m['depth']}": m[f"{name}_layers"] for m in measured for name in ("residual", "plain")}
    return {"study": NAME, "title": TITLE, "paper": PAPER, "config": cfg.to_dict(), "rows": rows, "layers": series,
            "branch": {f"{n}-{m['depth']}": m[f"{n}_branch"] for m in measured for n in ("residual", "plain")},
            "checks": checks + effects if cfg.budget == "zoo" else checks, "effects": effects, "paper_rows": PAPER_NOTES,
            "source": source, "shipped": [n for m in measured for n in m["shipped"]], "time_s": elapsed()}


def chain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of He et al. Fig. 7's ordering, smallest expected response first: the ResNets deepest first, then the
    shallowest plain net."""
    by = {r["net"]: r for r in rows}
    depths = sorted({r["depth"] for r in rows})
    return [by[f"residual-{d}"] for d in reversed(depths)] + [by[f"plain-{depths[0]}"]]


def effect_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """He et al. Fig. 7's ordering in full: every deeper ResNet's F(x) is smaller, and the shallowest plain net's largest."""
    ordered = chain(rows)
    values = [r["mean_branch_std"] for r in ordered]
    names = [net_label(r["net"]) for r in ordered]
    return [check(" < ".join(f"std F(x) {n}" for n in names) + " (He et al. Fig. 7: ResNet-110 < ResNet-56 < ResNet-20 < plain-20)",
                  all(a < b for a, b in zip(values, values[1:], strict=False)),
                  ", ".join(f"{n}: {v:.3f}" for n, v in zip(names, values, strict=True)))]


def _checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["net"]: r["mean_branch_std"] for r in rows}
    depths = sorted({r["depth"] for r in rows})
    pairs = ", ".join(f"{d}: {by[f'residual-{d}']:.3f} vs {by[f'plain-{d}']:.3f}" for d in depths)
    res = [by[f"residual-{d}"] for d in depths]
    return [
        check("residual branches respond more weakly than the plain twins' blocks at every depth",
              all(by[f"residual-{d}"] < by[f"plain-{d}"] for d in depths), f"mean std of F(x) (residual vs plain) {pairs}"),
        check(f"the deeper ResNet's branches respond more weakly (ResNet-{depths[-1]} < ResNet-{depths[0]})",
              res[-1] < res[0], ", ".join(f"ResNet-{d}: {v:.3f}" for d, v in zip(depths, res, strict=True))),
    ]


SPREAD_FOR_LOG = 20.0  # a log y-axis when the largest std is this many times the smallest
DASHES = ("solid", "dot", "dash", "dashdot", "longdash")  # by depth, shallowest first: each depth pair reads apart


def _dashed(fig: go.Figure, dash: dict[str, str]) -> go.Figure:
    for tr in fig.data:
        tr.line.dash = dash.get(tr.name, tr.line.dash)
    return fig


def figures(result: dict[str, Any]) -> dict[str, go.Figure]:
    rows = result["rows"]  # row order: JSON files sort the keys of "branch" and "layers"
    depths = sorted({r["depth"] for r in rows})
    label = {r["net"]: net_label(r["net"]) for r in rows}  # named as in the checks
    dash = {label[r["net"]]: DASHES[depths.index(r["depth"]) % len(DASHES)] for r in rows}
    out = {}
    for key, what, unit in (("branch", "each block's F(x), just before the addition", "block"),
                            ("layers", "each layer response", "layer")):
        series = {label[n]: result[key][n] for n in label}
        ranked = {k: sorted(v, reverse=True) for k, v in series.items()}
        x = list(range(1, max((len(v) for v in series.values()), default=0) + 1))
        finite = [v for vs in series.values() for v in vs if v is not None and np.isfinite(v) and v > 0]
        log = bool(finite) and max(finite) > SPREAD_FOR_LOG * min(finite)  # an untrainable plain net's huge responses
        axis = "std (log scale)" if log else "std"
        out[f"{key}_std"] = _dashed(lines(x, series, title=f"Std of {what} (He et al. Fig. 7, top)",
                                          xaxis=f"{unit} index (input to output)", yaxis=axis, log_y=log), dash)
        out[f"{key}_std_sorted"] = _dashed(lines(x, ranked, title=f"Std of {what}, sorted (He et al. Fig. 7, bottom)",
                                                 xaxis="rank", yaxis=axis, log_y=log), dash)
    return out
