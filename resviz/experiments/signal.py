"""Signal propagation (Brock, De, Smith 2021): per-block statistics at initialisation and after training.

Signal propagation plots (SPPs) follow a batch through the net and show, at every block output, the
average squared channel mean and the average channel variance (:class:`resviz.analysis.probes.SignalProp`).
Variants: post- vs pre-activation, with BatchNorm or without normalisation, plus an unnormalised
pre-activation net with SkipInit (a learnable branch scale starting at 0). Statistics are taken in
train mode (batch statistics) on the same batch of test images, at initialisation and after a short
training run of each variant. On the zoo budget the trained nets are converged ResNet-32s shipped in the zoo, one per
variant, trained by ``pretrained/make_pretrained.py`` with one recipe, seed and data (only the block differs); their
statistics at initialisation come from the initial weights of that seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from resviz.analysis.probes import signal_prop
from resviz.config import NetConfig
from resviz.experiments.common import MEDIUM_TRAINING, ZOO, TrainingBudget, as_progress, check, net_config, smooth_curve, timer
from resviz.experiments.figures import lines
from resviz.experiments.twins import pretrained_net, train_one
from resviz.train.trainer import build_nets, evaluate

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
PAPER_NOTES = [  # Brock et al. Figs. 1-2 (ResNet-600 at init, Gaussian inputs), qualitative; the last row De and Smith 2020
    {"variant": "pre-activation with BN", "finding": "variance grows linearly through each stage, reset at transition blocks"},
    {"variant": "unnormalised, He init", "finding": "variance grows exponentially with depth (explodes)"},
    {"variant": "scaled residual branches (SkipInit, NF-ResNets)", "finding": "variance stays controlled without normalisation"},
    {"variant": "SkipInit, trained (De and Smith 2020)", "finding": "unnormalised ResNets train to about BN's accuracy"},
]


@dataclass(frozen=True, kw_only=True)
class SignalConfig(TrainingBudget):
    depth: int = 32
    steps: int = 150  # a short run per variant: enough to see which variants train
    batch: int = 128  # test images the statistics are taken on
    variants: tuple[str, ...] = tuple(VARIANTS)
    # "train": each variant is trained ``steps`` steps here; "pretrained": the shipped net of each variant (the zoo's,
    # converged) or an error, nothing trained
    source: str = "train"

    # zoo: a converged ResNet-32 in each variant (pretrained/make_pretrained.py's signal recipes: the zoo's recipe and data)
    PRESETS = {"small": {}, "medium": {**MEDIUM_TRAINING, "depth": 56, "steps": 600},
               "zoo": {k: v for k, v in ZOO.items() if k != "order"}}

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown signal-propagation variant(s) {bad}; choose from {list(VARIANTS)}")
        if self.source not in ("train", "pretrained"):
            raise ValueError(f"source must be 'train' or 'pretrained', got {self.source!r}")


def _stats(net: torch.nn.Module, x: torch.Tensor) -> dict[str, list[float]]:
    net.train()  # batch statistics, as at the start of training; signal_prop restores the buffers
    s = signal_prop(net, x)
    return {k: [float(v) for v in s[k]] for k in ("mean_sq", "var", "branch_var")}


def _growth(var: list[float]) -> float:
    """Last block's variance over the first block's."""
    v = np.asarray(var, dtype=float)
    return float(v[-1] / v[0]) if len(v) and v[0] > 0 and np.isfinite(v[-1]) else float("inf")


def _shipped(cfg: SignalConfig, label: str, net_cfg: NetConfig) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """The shipped net of variant ``label`` (or a clear error), the initial weights it was trained from, and its
    manifest entry."""
    found = pretrained_net(net_cfg, cfg.input_size)
    if found is None:
        raise ValueError(f"no shipped net is the {label!r} variant of ResNet-{cfg.depth} width {cfg.width} at "
                         f"{cfg.input_size}px; run `python pretrained/make_pretrained.py` or use the small budget")
    trained, model = found
    init = build_nets(net_cfg, twin=False, seed=model.seed if model.seed is not None else cfg.seed)["residual"]
    return init, trained, model


def run(cfg: SignalConfig, progress: Any = None) -> dict[str, Any]:
    """SPPs of each variant at init and after training: ``steps`` here, or the shipped converged net of each."""
    progress, elapsed = as_progress(progress), timer()
    data, sched = cfg.data(), cfg.schedule()
    x = data.test.tensors[0][: cfg.batch]
    rows, spp, curves, stage_of, shipped = [], {}, {}, [], []
    for label, part in zip(cfg.variants, progress.spans([1.0] * len(cfg.variants)), strict=True):
        net_cfg = net_config(cfg.depth, cfg.width, cfg.input_size, data.num_classes, **VARIANTS[label])
        if cfg.source == "pretrained":
            net, trained_net, model = _shipped(cfg, label, net_cfg)
            init = _stats(net, x)
            curve = [float(v) for v in (model.log or {}).get("train_loss", [])]
            status = "pretrained" if model.status == "finished" else model.status  # a shipped net that diverged
            tail, steps = curve[-1:], None  # the log's last reading: the mean loss since the evaluation before it
            shipped.append(model.name)
            part(1.0, f"{label}: {model.name}")
        else:
            net = trained_net = build_nets(net_cfg, twin=False, seed=cfg.seed)["residual"]
            init = _stats(net, x)  # before training, which happens in place
            curve, status, _ = train_one(net, data, sched, seed=cfg.seed, device=cfg.device, progress=part, label=label)
            tail, steps = [v for v in curve[-max(1, len(curve) // 10):] if np.isfinite(v)], len(curve)
        stage_of = list(net.stage_of)
        trained = _stats(trained_net, x)
        test_loss, test_acc = evaluate(trained_net, data.test, batch_size=500)
        spp[label] = {"init": init, "trained": trained}
        curves[label] = smooth_curve(curve, 60)
        rows.append({"variant": label, "init_var_first": init["var"][0], "init_var_last": init["var"][-1],
                     "init_growth": _growth(init["var"]), "init_mean_sq_last": init["mean_sq"][-1],
                     "trained_growth": _growth(trained["var"]), "final_loss": float(np.mean(tail)) if tail else None,
                     "test_acc": float(test_acc), "test_loss": float(test_loss), "status": status, "steps": steps})
    progress(1.0, "done")
    source = f"pretrained: {', '.join(shipped)}" if shipped else f"trained ({cfg.steps} steps each)"
    checks, effects = _checks(rows, spp, stage_of), effect_checks(rows)
    return {"study": NAME, "title": TITLE, "paper": PAPER, "config": cfg.to_dict(), "rows": rows, "spp": spp,
            "stage_of": stage_of, "curves": curves, "checks": checks + effects if cfg.budget == "zoo" else checks,
            "effects": effects, "paper_rows": PAPER_NOTES, "source": source,
            "shipped": shipped,  # the shipped net of each row, in row order (none when trained here)
            "time_s": elapsed()}


SKIPINIT_GAP = 0.03  # De and Smith (2020): SkipInit trains unnormalised ResNets to about BN's accuracy (within a point)


def effect_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """On converged nets: SkipInit lets a net without normalisation train about as well as one with BN."""
    by = {r["variant"]: r for r in rows}
    if not {"pre, BN", "pre, no norm, SkipInit"} <= set(by) or by["pre, BN"].get("test_acc") is None:
        return []
    bn, skip = by["pre, BN"]["test_acc"], by["pre, no norm, SkipInit"]["test_acc"]
    return [check(f"SkipInit trains the unnormalised net about as well as BN (De and Smith 2020: within about a point; "
                  f"here within {100 * SKIPINIT_GAP:.0f} points of test accuracy)", bn - skip <= SKIPINIT_GAP,
                  f"test accuracy {skip:.1%} (pre, no norm, SkipInit) vs {bn:.1%} (pre, BN)")]


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
    done = ("finished", "pretrained")  # trained here to the end, or a shipped net
    trained = {k: r["final_loss"] for k, r in by.items() if r["final_loss"] is not None and r["status"] in done}
    if "pre, BN" in by and "pre, no norm" in by:
        bn, nn_ = by["pre, BN"], by["pre, no norm"]
        ok = nn_["status"] not in done or (bn["final_loss"] is not None and bn["final_loss"] < nn_["final_loss"])
        out.append(check("the unnormalised net without SkipInit trains worse than with BN (or diverges)", ok,
                         ", ".join(f"{k}: {v:.3f}" for k, v in trained.items())
                         + "".join(f"; {k} {r['status']}" for k, r in by.items() if r["status"] not in done)))
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
