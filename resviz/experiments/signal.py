"""Signal propagation (Brock, De, Smith 2021): per-block statistics at initialisation and after training.

Signal propagation plots (SPPs) follow a batch through the net and show, at every block output, the
average squared channel mean and the average channel variance (:class:`resviz.analysis.probes.SignalProp`).
Variants: post- vs pre-activation, with BatchNorm or without normalisation, plus an unnormalised
pre-activation net with SkipInit (a learnable branch scale starting at 0). Statistics are taken in
train mode (batch statistics) on the same batch of test images, at initialisation and after a short
training run of each variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from resviz.analysis.probes import signal_prop
from resviz.experiments.common import MEDIUM_TRAINING, TrainingBudget, as_progress, check, net_config, smooth_curve, timer
from resviz.experiments.figures import lines
from resviz.experiments.twins import train_one
from resviz.train.trainer import build_nets

NAME = "signal"
TITLE = "Signal propagation at init and after training"
PAPER = "Brock, De, Smith. Characterizing Signal Propagation to Close the Performance Gap in Unnormalized ResNets. ICLR 2021"
VARIANTS = {  # label -> block settings
    "post, BN": {"order": "post", "norm": "batch"},
    "pre, BN": {"order": "pre", "norm": "batch"},
    "post, no norm": {"order": "post", "norm": "none"},
    "pre, no norm": {"order": "pre", "norm": "none"},
    "pre, no norm, SkipInit": {"order": "pre", "norm": "none", "scaling": "learnable", "alpha_init": 0.0},
}
PAPER_NOTES = [  # Fig. 1-2 (ResNet-600 at init, Gaussian inputs); qualitative
    {"variant": "pre-activation with BN", "finding": "variance grows linearly through each stage, reset at transition blocks"},
    {"variant": "unnormalised, He init", "finding": "variance grows exponentially with depth (explodes)"},
    {"variant": "scaled residual branches (SkipInit, NF-ResNets)", "finding": "variance stays controlled without normalisation"},
]


@dataclass(frozen=True, kw_only=True)
class SignalConfig(TrainingBudget):
    depth: int = 32
    steps: int = 150  # a short run per variant: enough to see which variants train
    batch: int = 128  # test images the statistics are taken on
    variants: tuple[str, ...] = tuple(VARIANTS)

    # zoo: the small budget's runs; this study compares normalisations at initialisation and after a short run, which
    # no shipped net could stand for
    PRESETS = {"small": {}, "medium": {**MEDIUM_TRAINING, "depth": 56, "steps": 600}, "zoo": {}}

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown signal-propagation variant(s) {bad}; choose from {list(VARIANTS)}")


def _stats(net: torch.nn.Module, x: torch.Tensor) -> dict[str, list[float]]:
    net.train()  # batch statistics, as at the start of training; signal_prop restores the buffers
    s = signal_prop(net, x)
    return {k: [float(v) for v in s[k]] for k in ("mean_sq", "var", "branch_var")}


def _growth(var: list[float]) -> float:
    """Last block's variance over the first block's."""
    v = np.asarray(var, dtype=float)
    return float(v[-1] / v[0]) if len(v) and v[0] > 0 and np.isfinite(v[-1]) else float("inf")


def run(cfg: SignalConfig, progress: Any = None) -> dict[str, Any]:
    """SPPs of each variant at init and after ``steps`` of training."""
    progress, elapsed = as_progress(progress), timer()
    data, sched = cfg.data(), cfg.schedule()
    x = data.test.tensors[0][: cfg.batch]
    rows, spp, curves, stage_of = [], {}, {}, []
    for label, part in zip(cfg.variants, progress.spans([1.0] * len(cfg.variants)), strict=True):
        net = build_nets(net_config(cfg.depth, cfg.width, cfg.input_size, data.num_classes, **VARIANTS[label]),
                         twin=False, seed=cfg.seed)["residual"]
        stage_of = list(net.stage_of)
        init = _stats(net, x)
        curve, status, _ = train_one(net, data, sched, seed=cfg.seed, device=cfg.device, progress=part, label=label)
        trained = _stats(net, x)
        spp[label] = {"init": init, "trained": trained}
        curves[label] = smooth_curve(curve, 60)
        tail = [v for v in curve[-max(1, len(curve) // 10):] if np.isfinite(v)]
        rows.append({"variant": label, "init_var_first": init["var"][0], "init_var_last": init["var"][-1],
                     "init_growth": _growth(init["var"]), "init_mean_sq_last": init["mean_sq"][-1],
                     "trained_growth": _growth(trained["var"]), "final_loss": float(np.mean(tail)) if tail else None,
                     "status": status, "steps": len(curve)})
    progress(1.0, "done")
    return {"study": NAME, "title": TITLE, "paper": PAPER, "config": cfg.to_dict(), "rows": rows, "spp": spp,
            "stage_of": stage_of, "curves": curves, "checks": _checks(rows, spp, stage_of), "paper_rows": PAPER_NOTES,
            "source": f"trained ({cfg.steps} steps each)", "time_s": elapsed()}


def _checks(rows: list[dict[str, Any]], spp: dict[str, Any], stage_of: list[int]) -> list[dict[str, Any]]:
    by = {r["variant"]: r for r in rows}
    out = []
    if "pre, BN" in spp:
        var = spp["pre, BN"]["init"]["var"]
        first = [i for i, s in enumerate(stage_of) if s == 0]
        grows = var[first[-1]] > var[first[0]] * 1.5
        resets = len(first) < len(var) and var[first[-1] + 1] < var[first[-1]]
        out.append(check("pre-activation + BN: variance grows through a stage and resets at the transition",
                         grows and resets, f"stage 1: {var[first[0]]:.3g} -> {var[first[-1]]:.3g}, next block "
                         f"{var[first[-1] + 1] if len(first) < len(var) else float('nan'):.3g}"))
    if "pre, no norm" in by and "pre, BN" in by:
        a, b = by["pre, no norm"]["init_growth"], by["pre, BN"]["init_growth"]
        out.append(check("without normalisation the variance explodes with depth (far faster than with BN)",
                         a > 10 * b, f"last/first block variance: {a:.3g} (no norm) vs {b:.3g} (BN)"))
    if "pre, no norm, SkipInit" in by and "pre, no norm" in by:
        a, b = by["pre, no norm, SkipInit"]["init_growth"], by["pre, no norm"]["init_growth"]
        out.append(check("SkipInit keeps an unnormalised net's variance flat at init", a < 2 and a < b,
                         f"last/first block variance: {a:.3g} (SkipInit) vs {b:.3g} (plain He init)"))
    trained = {k: r["final_loss"] for k, r in by.items() if r["final_loss"] is not None and r["status"] == "finished"}
    if "pre, BN" in by and "pre, no norm" in by:
        bn, nn_ = by["pre, BN"], by["pre, no norm"]
        ok = nn_["status"] != "finished" or (bn["final_loss"] is not None and bn["final_loss"] < nn_["final_loss"])
        out.append(check("the unnormalised net without SkipInit trains worse than with BN (or diverges)", ok,
                         ", ".join(f"{k}: {v:.3f}" for k, v in trained.items())
                         + "".join(f"; {k} {r['status']}" for k, r in by.items() if r["status"] != "finished")))
    return out


def figures(result: dict[str, Any]) -> dict[str, go.Figure]:
    spp, variants = result["spp"], [r["variant"] for r in result["rows"]]  # row order, not the JSON key order
    n = len(result["stage_of"])
    out = {}
    for when in ("init", "trained"):
        for key, label in (("var", "average channel variance"), ("mean_sq", "average squared channel mean")):
            fig = lines(list(range(1, n + 1)), {v: spp[v][when][key] for v in variants}, log_y=True,
                        title=f"{label} at each block output ({'initialisation' if when == 'init' else 'after training'})",
                        xaxis="block", yaxis=label)
            out[f"{key}_{when}"] = fig
    return out
