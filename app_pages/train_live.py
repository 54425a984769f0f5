"""The Train page's pure parts: the run settings it derives and the live charts it sends.

Kept apart from ``app_pages/train.py`` (which renders the page when imported) so the benchmark and
the tests use exactly what the page does; nothing here calls Streamlit. Every refresh of an active
run ships these figures to the browser, so each series is thinned to at most ``LIVE_POINTS`` points,
which bounds the chart JSON of a refresh however long the run (history capped at 500 points per series
by ``resviz.jobs``); ``python bench/bench.py --sections app`` measures that payload.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

from app_pages import jobs as runs
from resviz import TrainConfig, plots

LIVE_POINTS = 240  # points per series in the live charts; a chart is a few hundred pixels wide


def eval_every(n_train: int, cfg: TrainConfig) -> int:
    """About 20 test evaluations per run, so the test curves fill in while the run goes on."""
    steps = cfg.epochs * max(1, n_train // min(cfg.batch_size, n_train))
    return max(5, round(steps / 20))


def thin(steps: np.ndarray, values: np.ndarray, points: int = LIVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``points`` rows of ``(steps, values)``, evenly spread over the rows, first and last kept.

    The job history is already denser towards the newest steps; thinning by row keeps that shape.
    """
    n = len(steps)
    if n <= points:
        return steps, values
    idx = np.unique(np.linspace(0, n - 1, points).round().astype(np.int64))
    return steps[idx], values[idx]


def _thin_history(snap: dict[str, Any], points: int) -> dict[str, Any]:
    return {**snap, "history": {k: thin(s, v, points) for k, (s, v) in snap["history"].items()}}


def probe_version(snap: dict[str, Any], key: str) -> tuple:
    """What identifies a probe chart's data: the run and the newest probed step (lengths repeat once capped)."""
    steps = snap["probes"].get(key, (np.zeros(0, np.int64), None))[0]
    return snap["id"], int(steps[-1]) if len(steps) else -1


def curves_figure(snap: dict[str, Any], points: int = LIVE_POINTS) -> go.Figure:
    """Train and test loss and accuracy of every net in the run."""
    return plots.training_curves_figure(runs.curves(_thin_history(snap, points)))


def flow_figure(snap: dict[str, Any], name: str, points: int = LIVE_POINTS) -> go.Figure | None:
    """Gradient norm per block over training for net ``name`` (None before the first probed step)."""
    steps, values = snap["probes"].get(f"{name}/grad_block", (None, None))
    if steps is None:
        return None
    steps, values = thin(steps, values, points)
    fig = plots.grad_flow_heatmap(steps, [f"b{i}" for i in range(values.shape[1])], values.T)
    return fig.update_layout(title=f"Gradient flow per block: {name}")


def ratio_figure(snap: dict[str, Any], points: int = LIVE_POINTS) -> go.Figure | None:
    """||F(x)|| / ||S(x)|| per block of the residual net over training (None before the first probed step)."""
    steps, ratios = snap["probes"].get("residual/ratio", (None, None))
    if steps is None:
        return None
    steps, ratios = thin(steps, ratios, points)
    return plots.ratio_figure(steps, ratios, block_names=[f"b{i}" for i in range(ratios.shape[1])])


def live_figures(snap: dict[str, Any], points: int = LIVE_POINTS) -> dict[str, go.Figure]:
    """Every chart one refresh of the live view sends, by name (the bench measures their size)."""
    figs = {"curves": curves_figure(snap, points)}
    for name in snap["names"]:
        fig = flow_figure(snap, name, points)
        if fig is not None:
            figs[f"flow_{name}"] = fig
    ratio = ratio_figure(snap, points)
    if ratio is not None:
        figs["ratio"] = ratio
    return figs
