"""Attribution faithfulness: deletion, insertion and the pointing game, skips on vs off.

For each Captum method of :mod:`resviz.analysis.attribution` (and a random map as the floor), heatmaps of the
true class are scored on test images of ``shapes``, whose object masks are exact:

* deletion (Petsiuk et al. 2018): area under the class probability as the most important pixels are
  set to the dataset mean first; lower is better.
* insertion: area under the probability as those pixels are pasted onto a mean image first; higher
  is better.
* pointing game (Zhang et al. 2016): the map's peak falls on the object (mask grown by ``tolerance``).
* mask energy: the share of the map's mass that lies on the object.

"Skips on vs off" compares the trained residual net with its trained plain twin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from torch import nn

from resviz.analysis.attribution import METHODS, attribute, deletion_score, pointing_game
from resviz.experiments.common import MEDIUM_TRAINING, ZOO, Progress, TrainedStudyConfig, as_progress, check, timer
from resviz.experiments.figures import grouped_bars
from resviz.experiments.twins import reference_twins
from resviz.nn.scoped import eval_mode

NAME = "faithfulness"
TITLE = "Attribution faithfulness: deletion, insertion, pointing game"
PAPER = ("Petsiuk, Das, Saenko. RISE. BMVC 2018 (deletion/insertion); Zhang et al. Top-down Neural Attention by "
         "Excitation Backprop. ECCV 2016 (pointing game)")
PAPER_ROWS = [  # Petsiuk et al. 2018, ResNet-50 on ImageNet: other data and resolution, for scale only (approximate)
    {"method": "gradcam", "deletion": 0.123, "insertion": 0.677},
    {"method": "RISE", "deletion": 0.108, "insertion": 0.727},
]


@dataclass(frozen=True, kw_only=True)
class FaithfulnessConfig(TrainedStudyConfig):
    depth: int = 20  # both twins train well at 20 layers, so their maps compare fairly
    images: int = 24  # test images scored per net and method
    methods: tuple[str, ...] = (*METHODS, "random")
    curve_steps: int = 16  # points of the deletion/insertion curves
    tolerance: int = 1  # pointing-game mask growth in pixels (the paper's 15 px at 224 px is about 1 px at 16 px)

    PRESETS = {"small": {}, "medium": {**MEDIUM_TRAINING, "depth": 32, "images": 100, "tolerance": 2},
               "zoo": {**ZOO, "depth": 20, "images": 48, "tolerance": 2}}

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [m for m in self.methods if m not in (*METHODS, "random")]
        if bad:
            raise ValueError(f"unknown attribution method(s) {bad}; choose from {[*METHODS, 'random']}")


@torch.no_grad()
def insertion_score(net: nn.Module, x: torch.Tensor, heatmap: torch.Tensor, target: int, *, steps: int = 16,
                    baseline: float = 0.0) -> float:
    """Area under the target probability as the most important pixels are inserted into a ``baseline`` image."""
    x = x[None] if x.dim() == 3 else x
    h, w = x.shape[-2:]
    order = torch.argsort(torch.nan_to_num(heatmap.float(), nan=-1.0).reshape(-1), descending=True, stable=True)
    rank = torch.empty(h * w, dtype=torch.long)
    rank[order] = torch.arange(h * w)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = torch.from_numpy(np.rint(fractions * h * w).astype(np.int64))
    keep = (rank[None] < counts[:, None]).reshape(-1, 1, h, w).to(x.dtype)  # (S+1, 1, H, W)
    with eval_mode(net):
        probs = net(x * keep + baseline * (1 - keep)).softmax(1)[:, target].float().numpy()
    return float(np.sum((probs[1:] + probs[:-1]) / 2 * np.diff(fractions)))


def _heatmap(net: nn.Module, x: torch.Tensor, method: str, target: int, g: torch.Generator) -> torch.Tensor:
    if method == "random":
        return torch.rand(x.shape[-2:], generator=g)
    return attribute(net, x, method, target=target).heatmap


def score(net: nn.Module, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, method: str, cfg: FaithfulnessConfig,
          progress: Progress) -> dict[str, float]:
    """Mean deletion, insertion, pointing accuracy and mask energy of ``method`` over the images."""
    g = torch.Generator().manual_seed(cfg.seed)
    vals: dict[str, list[float]] = {"deletion": [], "insertion": [], "pointing": [], "energy": []}
    for i in range(len(y)):
        target = int(y[i])
        heat = _heatmap(net, x[i], method, target, g)
        vals["deletion"].append(deletion_score(net, x[i], heat, target, steps=cfg.curve_steps))
        vals["insertion"].append(insertion_score(net, x[i], heat, target, steps=cfg.curve_steps))
        vals["pointing"].append(float(pointing_game(heat, masks[i], tolerance=cfg.tolerance)))
        total = float(heat.sum())
        vals["energy"].append(float(heat[masks[i]].sum()) / total if total > 0 else 0.0)
        progress((i + 1) / len(y), f"{method}: image {i + 1}/{len(y)}")
    return {k: float(np.mean(v)) for k, v in vals.items()}


def run(cfg: FaithfulnessConfig, progress: Any = None) -> dict[str, Any]:
    """Score every method on the residual net and its plain twin; one row per (net, method)."""
    progress, elapsed = as_progress(progress), timer()
    data = cfg.data()
    net_cfg = cfg.net(cfg.depth, data.num_classes)
    train_part, score_part = progress.spans([0.6, 0.4])
    twins = reference_twins(net_cfg, data, cfg.schedule(), seed=cfg.seed,
                            source=cfg.source, device=cfg.device, progress=train_part)
    x, y = data.test.tensors[0][: cfg.images], data.test.tensors[1][: cfg.images]
    masks = data.test_masks[: cfg.images]
    rows = []
    parts = iter(score_part.spans([1.0] * (2 * len(cfg.methods))))
    for name in ("residual", "plain"):
        net = twins.nets[name]
        with torch.no_grad(), eval_mode(net):
            acc = float((net(x).argmax(1) == y).float().mean())
        for method in cfg.methods:
            rows.append({"net": name, "method": method, "accuracy": acc, **score(net, x, y, masks, method, cfg, next(parts))})
    progress(1.0, "done")
    return {"study": NAME, "title": TITLE, "paper": PAPER, "config": cfg.to_dict(), "rows": rows,
            "checks": _checks(rows), "paper_rows": PAPER_ROWS, "source": twins.source,
            "shipped": list(twins.shipped), "time_s": elapsed()}


def _checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in ("residual", "plain"):
        by = {r["method"]: r for r in rows if r["net"] == name}
        if "random" not in by:
            continue
        real = [m for m in by if m != "random"]
        beat = [m for m in real if by[m]["insertion"] - by[m]["deletion"] > by["random"]["insertion"] - by["random"]["deletion"]]
        point = [m for m in real if by[m]["pointing"] > by["random"]["pointing"]]
        out.append(check(f"{name} net: every method ranks pixels better than a random map (insertion - deletion)",
                         len(beat) == len(real), f"better than random: {', '.join(beat) or 'none'}"))
        out.append(check(f"{name} net: every method points at the object more often than a random map",
                         len(point) == len(real), ", ".join(f"{m} {by[m]['pointing']:.0%}" for m in by)))
    return out


def figures(result: dict[str, Any]) -> dict[str, go.Figure]:
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = {}
    for key, label in (("deletion", "deletion AUC (lower is better)"), ("insertion", "insertion AUC (higher is better)"),
                       ("pointing", "pointing-game accuracy"), ("energy", "share of the map on the object")):
        series = {n: [next((r[key] for r in rows if r["net"] == n and r["method"] == m), None) for m in methods]
                  for n in ("residual", "plain")}
        out[key] = grouped_bars(methods, series, title=label, yaxis=label, percent=key in ("pointing", "energy"))
    return out
