"""The Train page's pure parts: the run settings it derives and the live charts it sends.

Kept apart from the widgets of ``app_pages/train.py`` so the benchmark and
the tests use exactly what the page does; nothing here calls Streamlit. Every refresh of an active
run ships these figures to the browser, so each series is thinned to at most ``LIVE_POINTS`` points,
which bounds the chart JSON of a refresh however long the run (history capped at 500 points per series
by ``resviz.jobs``); ``python bench/bench.py --sections app`` measures that payload.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import plotly.graph_objects as go

from app_pages import jobs
from resviz import TrainConfig, plots
from resviz.train.records import JobSnapshot, Points

LIVE_POINTS = 240  # points per series in the live charts; a chart is a few hundred pixels wide


def eval_every(n_train: int, cfg: TrainConfig) -> int:
    """About 20 test evaluations per run, so the test curves fill in while the run goes on."""
    steps = cfg.epochs * max(1, n_train // min(cfg.batch_size, n_train))
    return max(5, round(steps / 20))


def thin(steps: np.ndarray, values: np.ndarray, points: int = LIVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``points`` rows of ``(steps, values)``, evenly spread over the rows, first and last kept.

    The job history is already denser towards the newest steps; thinning by row keeps that shape.
    """
    thinned = Points(steps, values).thinned(points)
    return thinned.steps, thinned.values


def probe_version(snap: JobSnapshot, net: str, key: str) -> tuple:
    """What identifies a probe chart's data: the run and the newest probed step (lengths repeat once capped)."""
    readings = snap.history.probe(net, key)
    return snap.id, int(readings.steps[-1]) if readings is not None and len(readings) else -1


def curves_figure(snap: JobSnapshot, points: int = LIVE_POINTS) -> go.Figure:
    """Train and test loss and accuracy of every net in the run."""
    return plots.training_curves_figure(jobs.curves(replace(snap, history=snap.history.thinned(points))))


def flow_figure(snap: JobSnapshot, name: str, points: int = LIVE_POINTS) -> go.Figure | None:
    """Gradient norm per block over training for net ``name`` (None before the first probed step)."""
    readings = snap.history.probe(name, "grad_block")
    if readings is None:
        return None
    steps, values = thin(readings.steps, readings.values, points)
    fig = plots.grad_flow_heatmap(steps, [f"b{i}" for i in range(values.shape[1])], values.T)
    return fig.update_layout(title=f"Gradient flow per block: {name}")


def ratio_figure(snap: JobSnapshot, points: int = LIVE_POINTS) -> go.Figure | None:
    """||F(x)|| / ||S(x)|| per block of the residual net over training (None before the first probed step)."""
    readings = snap.history.probe("residual", "ratio")
    if readings is None:
        return None
    steps, ratios = thin(readings.steps, readings.values, points)
    return plots.ratio_figure(steps, ratios, block_names=[f"b{i}" for i in range(ratios.shape[1])])


def live_figures(snap: JobSnapshot, points: int = LIVE_POINTS) -> dict[str, go.Figure]:
    """Every chart one refresh of the live view sends, by name (the bench measures their size)."""
    figs = {"curves": curves_figure(snap, points)}
    for name in snap.names:
        fig = flow_figure(snap, name, points)
        if fig is not None:
            figs[f"flow_{name}"] = fig
    ratio = ratio_figure(snap, points)
    if ratio is not None:
        figs["ratio"] = ratio
    return figs
