"""Degradation (He et al. 2016, Fig. 6): deeper plain nets train worse; residual nets do not.

Residual nets and their plain twins at several CIFAR-style depths train on the same ``shapes`` data
with the same seed, initialisation (twins share weights at step 0), batches and step budget. The
deciding number is the *training* error: a deeper plain net can represent everything a shallower one
can (extra layers could be identities), so a higher training error is an optimisation failure, not
overfitting. Depths are independent, so under ``torchrun`` they are spread over the processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go

from resviz.experiments.common import (
    MEDIUM_TRAINING,
    ZOO,
    ZOO_DEPTHS,
    Progress,
    TrainedStudyConfig,
    as_progress,
    check,
    error,
    smooth_curve,
    timer,
)
from resviz.experiments.figures import curve_panels, lines
from resviz.experiments.twins import reference_twins
from resviz.train import distributed

NAME = "degradation"
TITLE = "Degradation: plain vs residual at growing depth"
PAPER = "He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016, Fig. 6 and Table 6"
# CIFAR-10 test error (%). Residual: Table 6. Plain: read off Fig. 6 (left), approximate.
PAPER_RESIDUAL = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}
PAPER_PLAIN = {20: 9.5, 32: 10.0, 44: 12.0, 56: 13.5}
TOLERANCE = 0.03  # "not worse": within 3 points of training error


@dataclass(frozen=True, kw_only=True)
class DegradationConfig(TrainedStudyConfig):
    depths: tuple[int, ...] = (8, 14, 20, 32, 56)  # CIFAR-style 6n+2 depths
    train_eval: int = 1000  # training images used to measure training error
    reference_depth: int = 20  # the paper compares every depth with 20 layers (the shallowest when 20 is absent)

    PRESETS = {
        "small": {},
        "medium": {**MEDIUM_TRAINING, "depths": (8, 14, 20, 32, 44, 56)},
        "zoo": {**ZOO, "depths": ZOO_DEPTHS},  # the converged nets' training logs: nothing is trained or evaluated
    }


def _from_logs(cfg: DegradationConfig, depth: int) -> dict[str, Any] | None:
    """A shipped pair's errors and curves from its training logs (``pretrained/manifest.json``), if it has logs."""
    from resviz.experiments.twins import pretrained_twins

    net = cfg.net(depth, 8)  # shapes has 8 classes
    twins = pretrained_twins(net, cfg.input_size) if cfg.source != "train" else None
    if twins is None or not twins.logs or set(twins.logs) != {"residual", "plain"}:
        if cfg.source == "pretrained":
            raise ValueError(f"no shipped ResNet-{depth}/plain-{depth} pair with training logs at {cfg.input_size}px; "
                             "run `python pretrained/make_pretrained.py` or use another budget")
        return None
    out: dict[str, Any] = {"depth": depth}
    for name, log in twins.logs.items():
        out[f"{name}_train_err"] = float(log["train_error"][-1])  # the last evaluation interval's batches
        out[f"{name}_test_err"] = float(log["test_error"][-1])
        out[f"{name}_final_loss"] = float(log["train_loss"][-1])
        out[f"{name}_curve"] = (list(log["epoch"]), [float(v) for v in log["train_error"]])
        out[f"{name}_test_curve"] = (list(log["epoch"]), [float(v) for v in log["test_error"]])
    out["status"], out["shipped"] = twins.source, list(twins.shipped)
    return out


def _one_depth(cfg: DegradationConfig, depth: int, progress: Progress) -> dict[str, Any]:
    if cfg.source != "train" and (logged := _from_logs(cfg, depth)) is not None:
        progress(1.0, f"ResNet-{depth} vs plain-{depth}: training logs")
        return logged
    data = cfg.data()
    twins = reference_twins(cfg.net(depth, data.num_classes), data, cfg.schedule(), seed=cfg.seed, source="train",
                            device=cfg.device, progress=progress)
    train_split = (data.train.tensors[0][: cfg.train_eval], data.train.tensors[1][: cfg.train_eval])
    err = {(n, split): error(net, train_split if split == "train" else data.test)
           for n, net in twins.nets.items() for split in ("train", "test")}
    out: dict[str, Any] = {"depth": depth}
    out.update({f"{n}_{split}_err": err[n, split] for split in ("train", "test") for n in ("residual", "plain")})
    for name in ("residual", "plain"):
        out[f"{name}_final_loss"] = float(np.mean(twins.curves[name][-max(1, cfg.steps // 10):]))
        out[f"{name}_curve"] = smooth_curve(twins.curves[name], 60)
    out["status"] = twins.status + (f": {twins.message}" if twins.message else "")
    return out


def _checks(rows: list[dict[str, Any]], reference: int) -> list[dict[str, Any]]:
    shallow, deep = next((r for r in rows if r["depth"] == reference), rows[0]), rows[-1]
    d0, d1 = shallow["depth"], deep["depth"]
    deep_rows = [r for r in rows if r["depth"] >= 20] or rows[-1:]
    rho = _spearman([r["depth"] for r in rows], [r["plain_train_err"] for r in rows])
    return [
        check(f"plain-{d1} reaches a higher training error than plain-{d0}",
              deep["plain_train_err"] > shallow["plain_train_err"],
              f"{deep['plain_train_err']:.1%} vs {shallow['plain_train_err']:.1%}; rank correlation of depth and "
              f"plain training error {rho:+.2f}"),
        check(f"ResNet-{d1} trains no worse than ResNet-{d0} (within {TOLERANCE:.0%})",
              deep["residual_train_err"] <= shallow["residual_train_err"] + TOLERANCE,
              f"{deep['residual_train_err']:.1%} vs {shallow['residual_train_err']:.1%}"),
        # "no worse" rather than "better" at every depth: where both nets fit the training set (ResNet-20 and plain-20
        # on the zoo, like He et al.'s 8.75% vs 9.5% test error at depth 20) their errors tie
        check(f"the residual net trains no worse than its plain twin at every depth from 20 on, and better at depth {d1}",
              all(r["residual_train_err"] <= r["plain_train_err"] for r in deep_rows)
              and deep["residual_train_err"] < deep["plain_train_err"],
              ", ".join(f"{r['depth']}: {r['residual_train_err']:.1%} vs {r['plain_train_err']:.1%}" for r in deep_rows)),
    ]


def _spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if len(x) < 2 or np.std(rx) == 0 or np.std(ry) == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def run(cfg: DegradationConfig, progress: Any = None) -> dict[str, Any]:
    """Train every depth's twins; rows hold training/test error of both nets beside the paper's numbers."""
    if len(cfg.depths) < 2:
        raise ValueError("the degradation study needs at least two depths")
    progress, elapsed = as_progress(progress), timer()
    depths = sorted(cfg.depths)
    info = distributed.current()
    mine = [d for i, d in enumerate(depths) if i % info.world_size == info.rank]
    parts = dict(zip(mine, progress.spans([float(d) for d in mine]), strict=True))
    results = distributed.sweep(depths, lambda d: _one_depth(cfg, d, parts[d]))
    rows, curves, test_curves, shipped = [], {}, {}, []
    for r in results:
        curves[r["depth"]] = {k: r.pop(f"{k}_curve") for k in ("plain", "residual")}
        if "residual_test_curve" in r:
            test_curves[r["depth"]] = {k: r.pop(f"{k}_test_curve") for k in ("plain", "residual")}
        status = r.pop("status")
        shipped += r.pop("shipped", [])
        rows.append({**r, "paper_residual_test_err": _pct(PAPER_RESIDUAL.get(r["depth"])),
                     "paper_plain_test_err": _pct(PAPER_PLAIN.get(r["depth"])), "status": status})
    progress(1.0, "done")
    logged = bool(test_curves)
    checks, effects = _checks(rows, cfg.reference_depth), effect_checks(rows, cfg.test_size)
    out = {"study": NAME, "title": TITLE, "paper": PAPER, "config": cfg.to_dict(), "rows": rows,
           "curves": {str(d): c for d, c in curves.items()}, "checks": checks + effects if cfg.budget == "zoo" else checks,
           "effects": effects,
           "paper_rows": [{"depth": d, "plain_test_err": _pct(PAPER_PLAIN.get(d)), "residual_test_err": _pct(e)}
                          for d, e in PAPER_RESIDUAL.items()],
           "source": "; ".join(r["status"] for r in rows) if logged else f"trained ({cfg.steps} steps each)",
           "shipped": shipped, "time_s": elapsed()}
    if logged:
        out["test_curves"] = {str(d): c for d, c in test_curves.items()}
        out["curve_x"] = "epoch"
    return out


def _noise(err: float, n: int) -> float:
    """The standard error of an error rate measured on ``n`` images."""
    return float(np.sqrt(max(err * (1 - err), 1e-4) / max(n, 1)))


def effect_checks(rows: list[dict[str, Any]], test_size: int) -> list[dict[str, Any]]:
    """He et al.'s Fig. 6 as effect sizes: plain training error rises at every depth step, ResNet test error does not."""
    rows = sorted(rows, key=lambda r: r["depth"])
    plain = [r["plain_train_err"] for r in rows]
    res = [r["residual_test_err"] for r in rows]
    # "within noise": two standard errors of the difference of two error rates on test_size images each
    tol = [2 * np.hypot(_noise(a, test_size), _noise(b, test_size)) for a, b in zip(res, res[1:], strict=False)]
    return [
        check("plain training error grows with every step in depth (He et al. Fig. 6: plain-56 > plain-20)",
              all(b > a for a, b in zip(plain, plain[1:], strict=False)),
              ", ".join(f"plain-{r['depth']}: {e:.1%}" for r, e in zip(rows, plain, strict=True))),
        check("ResNet test error does not grow with depth, within noise (He et al. Table 6: 110 <= 56 <= 20)",
              all(b <= a + t for a, b, t in zip(res, res[1:], tol, strict=False)),
              ", ".join(f"ResNet-{r['depth']}: {e:.1%}" for r, e in zip(rows, res, strict=True))
              + f" (noise: two standard errors on {test_size} test images, about {max(tol, default=0):.1%})"),
    ]


def _pct(v: float | None) -> float | None:
    return None if v is None else v / 100


def figures(result: dict[str, Any]) -> dict[str, go.Figure]:
    rows = result["rows"]
    depths = [r["depth"] for r in rows]
    err = lines(depths, {"plain (train)": [r["plain_train_err"] for r in rows],
                         "residual (train)": [r["residual_train_err"] for r in rows],
                         "plain (paper, CIFAR-10 test)": [r["paper_plain_test_err"] for r in rows],
                         "residual (paper, CIFAR-10 test)": [r["paper_residual_test_err"] for r in rows]},
                title="Training error by depth (ours on shapes) and the paper's CIFAR-10 test error",
                xaxis="depth (layers)", yaxis="error", percent=True)
    curves = result["curves"]  # keyed by depth as text; JSON files sort keys as text, so order by the rows
    panels = {name: {f"{d} layers": tuple(curves[str(d)][name]) for d in depths} for name in ("plain", "residual")}
    if "test_curves" not in result:
        training = curve_panels(panels, title="Training loss (darker = deeper), as in He et al. Fig. 6", xaxis="step",
                                yaxis="training loss (smoothed)")
        return {"error_by_depth": err, "training_curves": training}
    training = curve_panels(panels, title="Training error (darker = deeper), as in He et al. Fig. 6",
                            xaxis=result.get("curve_x", "epoch"), yaxis="training error", percent=True)
    tests = {name: {f"{d} layers": tuple(result["test_curves"][str(d)][name]) for d in depths} for name in ("plain", "residual")}
    testing = curve_panels(tests, title="Test error (darker = deeper)", xaxis=result.get("curve_x", "epoch"),
                           yaxis="test error", percent=True)
    return {"error_by_depth": err, "training_curves": training, "test_curves": testing}
