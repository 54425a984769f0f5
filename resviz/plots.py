"""Pure figure builders: plain data (lists, numpy arrays, dicts) in, ``plotly.graph_objects.Figure`` out.

They never touch a model. Every builder draws NaN/Inf (and, on log axes, non-positive values) as gaps
instead of failing, never raises on empty data, and passes plain lists to plotly so the serialised
figure holds ``null`` where a value is missing. Residual nets are always blue, plain nets vermillion;
every figure uses the one template of :mod:`resviz.theme`. :func:`figure_to_csv` gives any figure's data
as CSV (the app's "CSV" button under every chart).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from resviz.theme import (  # noqa: F401 - re-exported: the figure builders' colours and template
    OFF_COLOR,
    PALETTE,
    PLAIN_COLOR,
    PROJECTION_COLOR,
    RESIDUAL_COLOR,
    SEQUENTIAL,
    SEQUENTIAL_ALT,
    TEMPLATE,
    TEXT_COLOR,
    log_axis,
    use_theme,
)

DECORATION = {"csv": False}  # trace ``meta`` of lines that only draw (a data path): left out of the CSV
# transparent where unimportant, so the picture shows through; opaque red where important
HEAT_SCALE = [[0.0, "rgba(255,255,0,0)"], [0.4, "rgba(255,200,0,0.35)"], [0.7, "rgba(255,110,0,0.7)"], [1.0, "rgba(200,0,0,0.95)"]]


def net_color(name: str, index: int = 0) -> str:
    """The colour of a net by name: "plain..." is vermillion, "res..." blue, others from the palette."""
    low = str(name).lower()
    if "plain" in low:
        return PLAIN_COLOR
    if "res" in low:
        return RESIDUAL_COLOR
    return PALETTE[index % len(PALETTE)]


# -- cleaning ------------------------------------------------------------------------------------
def _arr(values: Any) -> np.ndarray:
    """A float array with every non-finite or non-numeric entry as NaN (empty for None).

    float32 input becomes the float64 nearest to each value's shortest float32 decimal (0.1 stays
    "0.1", not 0.10000000149011612): the same float32 numbers, at about half the JSON size per chart.
    """
    if values is None:
        return np.zeros(0)
    if isinstance(values, np.ndarray) and values.dtype == np.float32:
        values = values.astype(str).astype(np.float64)  # numpy prints float32 in its shortest form
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        a = np.asarray([_num(v) for v in np.ravel(np.asarray(values, dtype=object))], dtype=np.float64)
    return np.where(np.isfinite(a), a, np.nan)


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _clean(values: Any, *, positive: bool = False) -> list[float | None]:
    """Flat list with None for gaps (and for values <= 0 when ``positive``, i.e. on a log axis)."""
    a = _arr(values).ravel()
    bad = np.isnan(a) | ((a <= 0) if positive else False)
    return [None if b else float(v) for v, b in zip(a, bad)]


def _grid(values: Any, *, log: bool = False, decimals: int = 6) -> list[list[float | None]]:
    """2-D nested list with None for gaps; ``log`` takes log10 (non-positive -> gap), rounded to ``decimals``."""
    a = _arr(values)
    if a.ndim != 2 or a.size == 0:
        return []
    if log:  # colours only: a few decimals of a decade are far below what a colour scale shows
        a = np.where(a > 0, np.log10(np.where(a > 0, a, 1.0)).round(decimals), np.nan)
    return [[None if math.isnan(v) else float(v) for v in row] for row in a]


def _xy(x: Any, y: Any, *, positive: bool = False) -> tuple[list, list]:
    ys = _clean(y, positive=positive)
    xs = list(range(1, len(ys) + 1)) if x is None else _clean(x)
    n = min(len(xs), len(ys))
    return xs[:n], ys[:n]


def _base(title: str, **layout: Any) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, template=TEMPLATE, hovermode="closest", **layout)
    return fig


def _no_data(fig: go.Figure, message: str = "no data yet") -> go.Figure:
    fig.add_annotation(text=message, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False, font={"size": 16})
    return fig


def _has_data(fig: go.Figure) -> bool:
    for tr in fig.data:
        for key in ("y", "z"):
            vals = getattr(tr, key, None)
            if vals is not None and any(v is not None for v in np.ravel(np.asarray(vals, dtype=object))):
                return True
    return False


def _finish(fig: go.Figure, message: str = "no data yet") -> go.Figure:
    return fig if _has_data(fig) else _no_data(fig, message)


# -- architecture --------------------------------------------------------------------------------
ARCH_MAX_BOXES = 20  # more blocks than this and each stage collapses into one box of per-block cells
ARCH_MAX_LABELS = 10  # block labels at most: at 450 px wide, 45 px apart (they never overlap)


def _block_hover(i: int, b: Mapping[str, Any]) -> str:
    return (f"{b.get('name', f'block {i}')}<br>stage {b.get('stage', '?')}: {b.get('cin', '?')} -> {b.get('cout', '?')} "
            f"channels, stride {b.get('stride', 1)}<br>skip {'on' if b.get('skip', True) else 'off'}"
            f"{' (projection)' if b.get('projection') else ''}{'<br>REMOVED' if b.get('removed') else ''}")


def _skip_color(b: Mapping[str, Any]) -> str:
    return (PROJECTION_COLOR if b.get("projection") else RESIDUAL_COLOR) if b.get("skip", True) else OFF_COLOR


def _block_shapes(i: int, b: Mapping[str, Any]) -> list[dict]:
    removed, skip = bool(b.get("removed")), bool(b.get("skip", True))
    box = {"type": "rect", "x0": i - 0.35, "x1": i + 0.35, "y0": 0, "y1": 1, "layer": "below",
           "fillcolor": "#EEEEEE" if removed else "#DCEBF5",
           "line": {"color": OFF_COLOR if removed else RESIDUAL_COLOR, "dash": "dot" if removed else "solid"}}
    # a cubic arc that leaves and re-enters the data path vertically, clearing the box
    arc = {"type": "path", "path": f"M {i - 0.45},0.5 C {i - 0.45},1.6 {i + 0.45},1.6 {i + 0.45},0.5",
           "line": {"color": _skip_color(b), "width": 2.5 if skip else 1.5, "dash": "solid" if skip else "dash"}}
    return [box, arc]


def _stages(blocks: Sequence[Mapping[str, Any]]) -> dict[Any, list[int]]:
    stages: dict[Any, list[int]] = {}
    for i, b in enumerate(blocks):
        stages.setdefault(b.get("stage", 0), []).append(i)
    return stages


def _arch_legend(fig: go.Figure, removed: bool) -> None:
    kinds = [("skip on", RESIDUAL_COLOR, "solid"), ("projection shortcut", PROJECTION_COLOR, "solid"),
             ("skip off", OFF_COLOR, "dash")]
    for name, color, dash in kinds:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=name, line={"color": color, "dash": dash}))
    if removed:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="block removed",
                                 marker={"symbol": "square-open", "size": 11, "color": OFF_COLOR}))


def _arch_boxes(fig: go.Figure, blocks: Sequence[Mapping[str, Any]]) -> None:
    """One box and skip arc per block; at most ARCH_MAX_LABELS block numbers, evenly spaced."""
    n = len(blocks)
    path_x = [v for i in range(n + 1) for v in (i - 1 + 0.35 if i else -0.7, i - 0.35 if i < n else n - 0.3, None)]
    fig.add_trace(go.Scatter(x=path_x, y=[0.5, 0.5, None] * (n + 1), mode="lines", line={"color": "#555555"},
                             hoverinfo="skip", showlegend=False, meta=DECORATION))
    step = math.ceil(n / ARCH_MAX_LABELS)
    labels = [(str(i) + (" ✕" if b.get("removed") else "")) if i % step == 0 else "" for i, b in enumerate(blocks)]
    fig.add_trace(go.Scatter(x=list(range(n)), y=[0.5] * n, mode="markers+text", text=labels, name="blocks",
                             hovertext=[_block_hover(i, b) for i, b in enumerate(blocks)], hoverinfo="text",
                             textfont={"size": 11, "color": TEXT_COLOR}, marker={"size": 18, "color": "rgba(0,0,0,0)"},
                             showlegend=False))
    fig.update_layout(shapes=[s for i, b in enumerate(blocks) for s in _block_shapes(i, b)])
    for stage, idx in _stages(blocks).items():
        text = f"stage {stage}" if len(idx) / n >= 0.15 else str(stage)  # a narrow stage gets its number only
        fig.add_annotation(x=sum(idx) / len(idx), y=-0.45, text=text, showarrow=False)
    fig.update_xaxes(range=[-1, n])


def _arch_stages(fig: go.Figure, blocks: Sequence[Mapping[str, Any]]) -> None:
    """Each stage one box of equal width, its blocks small cells inside coloured by their skip."""
    stages = list(_stages(blocks).items())
    shapes, xs, hover = [], [], []
    for s, (stage, idx) in enumerate(stages):
        shapes.append({"type": "rect", "x0": s - 0.42, "x1": s + 0.42, "y0": 0, "y1": 1, "layer": "below",
                       "fillcolor": "#F3F7FB", "line": {"color": RESIDUAL_COLOR}})
        width = 0.76 / len(idx)
        for j, i in enumerate(idx):
            b = blocks[i]
            x = s - 0.38 + (j + 0.5) * width
            removed = bool(b.get("removed"))
            shapes.append({"type": "rect", "x0": x - 0.42 * width, "x1": x + 0.42 * width, "y0": 0.3, "y1": 0.7,
                           "fillcolor": "white" if removed else _skip_color(b),
                           "line": {"color": OFF_COLOR if removed else _skip_color(b), "width": 1}})
            xs.append(x)
            hover.append(_block_hover(i, b))
        b0, b1 = blocks[idx[0]], blocks[idx[-1]]
        fig.add_annotation(x=s, y=1.02, yanchor="bottom", showarrow=False,
                           text=f"stage {stage}: {len(idx)} blocks<br>{b0.get('cin', '?')} -> {b1.get('cout', '?')} ch")
    last = len(stages)
    path = [v for s in range(last + 1) for v in (s - 0.58 if s else -0.75, s - 0.42 if s < last else s - 0.25, None)]
    fig.add_trace(go.Scatter(x=path, y=[0.5, 0.5, None] * (last + 1), mode="lines", line={"color": "#555555"},
                             hoverinfo="skip", showlegend=False, meta=DECORATION))
    fig.add_trace(go.Scatter(x=xs, y=[0.5] * len(xs), mode="markers", marker={"size": 10, "color": "rgba(0,0,0,0)"},
                             name="blocks", hovertext=hover, hoverinfo="text", showlegend=False))
    fig.update_layout(shapes=shapes)
    fig.update_xaxes(range=[-0.8, len(stages) - 0.2])


def architecture_figure(blocks: Sequence[Mapping[str, Any]], *, title: str = "Architecture") -> go.Figure:
    """The net's blocks left to right, readable from 8 to 150+ layers.

    Up to ``ARCH_MAX_BOXES`` blocks: a box per block with a skip arc over it (solid when on, grey dashed
    when off), numbered at most ``ARCH_MAX_LABELS`` times. More blocks: each stage collapses into one box
    of equal width (so a stage of three blocks stays as legible as one of thirty-six) holding a cell per
    block, coloured by its skip. Hovering a block names it either way. Each block dict: ``name, stage,
    cin, cout, stride, skip, projection, removed``.
    """
    # the legend goes under the strip: beside it, it would take a third of a narrow column's width
    fig = _base(title, showlegend=True, height=280, margin={"t": 56, "b": 16, "l": 16, "r": 16},
                legend={"orientation": "h", "x": 0, "xanchor": "left", "y": 0, "yanchor": "top"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, range=[-0.8, 1.8])
    if not blocks:
        return _no_data(fig, "no blocks")
    (_arch_boxes if len(blocks) <= ARCH_MAX_BOXES else _arch_stages)(fig, blocks)
    _arch_legend(fig, any(b.get("removed") for b in blocks))
    return fig


# -- signal and gradients ------------------------------------------------------------------------
def _net_pair(res: Any, plain: Any) -> list[tuple[str, Any]]:
    return [(name, data) for name, data in (("residual", res), ("plain", plain)) if data is not None]


def signal_prop_figure(res_stats: Mapping[str, Any] | None, plain_stats: Mapping[str, Any] | None) -> go.Figure:
    """Signal propagation (Brock et al. 2021): per block depth, both nets, one panel per statistic, log y.

    Each stats dict: ``mean_sq`` (average channel squared mean) and ``var`` (average channel variance),
    one value per block; optional ``branch_var`` (residual-branch variance, adds a third panel) and
    ``depth`` (x values). The panels are stacked and share the depth axis, so their titles never meet
    however narrow the chart; each log axis spans whole decades (see :func:`resviz.theme.log_axis`).
    """
    pairs = _net_pair(res_stats, plain_stats)
    panels = [("mean_sq", "squared channel mean"), ("var", "channel variance")]
    if any(s.get("branch_var") is not None for _, s in pairs):
        panels.append(("branch_var", "residual-branch variance"))
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=[t for _, t in panels])
    fig.update_layout(title="Signal propagation through depth", template=TEMPLATE, height=170 * len(panels) + 110)
    for row, (key, label) in enumerate(panels, start=1):
        values = []
        for name, stats in pairs:
            x, y = _xy(stats.get("depth"), stats.get(key), positive=True)
            values += [v for v in y if v is not None]
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name, legendgroup=name, showlegend=row == 1,
                                     line={"color": net_color(name)}, marker={"size": 5}, meta={"panel": label},
                                     hovertemplate=f"{name}<br>block %{{x}}: %{{y:.4g}}<extra>{label}</extra>"),
                          row=row, col=1)
        fig.update_yaxes(log_axis(values), row=row, col=1)
    fig.update_xaxes(title_text="block (input → output)", row=len(panels), col=1)
    return _finish(fig)


def grad_norm_figure(res_norms: Sequence[float] | Mapping[str, float] | None,
                     plain_norms: Sequence[float] | Mapping[str, float] | None) -> go.Figure:
    """Gradient norm per block/layer for both nets, log y; a mapping's keys become the x labels."""
    fig = _base("Gradient norm by depth, residual vs plain", xaxis_title="block (input → output)",
                yaxis_title="gradient norm (L2)")
    values = []
    for name, norms in _net_pair(res_norms, plain_norms):
        labels = list(norms.keys()) if isinstance(norms, Mapping) else None
        ys = _clean(list(norms.values()) if labels is not None else norms, positive=True)
        xs = labels if labels is not None else list(range(1, len(ys) + 1))
        values += [v for v in ys if v is not None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name, line={"color": net_color(name)},
                                 marker={"size": 5}, hovertemplate=f"{name}<br>%{{x}}: %{{y:.3g}}<extra></extra>"))
    fig.update_yaxes(log_axis(values))
    return _finish(fig)


def smooth(values: Sequence[float | None], weight: float) -> list[float | None]:
    """TensorBoard's smoothing: a debiased exponential moving average; gaps stay gaps and are skipped."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        if v is None:
            out.append(None)
            continue
        last, norm = weight * last + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(last / norm)
    return out


def training_curves_figure(history: Mapping[str, Mapping[str, Any]], *, smoothing: float = 0.0) -> go.Figure:
    """Train (solid) and test (dashed) loss and accuracy of each net, overlaid in two panels.

    ``history[net] = {step, loss, acc, test_step, test_loss, test_acc}`` (lists); a ``<key>_step`` entry
    (e.g. ``test_loss_step``) gives that series its own steps. With ``smoothing`` in (0, 1) the per-batch
    train curves are smoothed as TensorBoard does, with the raw curve drawn faint behind.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    fig.update_layout(title="Training curves", template=TEMPLATE, hovermode="x unified")
    for i, (name, h) in enumerate((history or {}).items()):
        color = net_color(name, i)
        for col, key in ((1, "loss"), (2, "acc")):
            for split, xk, yk, dash in (("train", "step", key, "solid"), ("test", "test_step", f"test_{key}", "dash")):
                x, y = _xy(h.get(f"{yk}_step", h.get(xk)), h.get(yk))
                if split == "train" and 0 < smoothing < 1:
                    fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{name} {split} (raw)", legendgroup=name,
                                             showlegend=False, hoverinfo="skip", opacity=0.25,
                                             line={"color": color, "width": 1}), row=1, col=col)
                    y = smooth(y, smoothing)
                fig.add_trace(go.Scatter(x=x, y=y, mode="lines" if split == "train" else "lines+markers",
                                         name=f"{name} {split}", legendgroup=name, showlegend=col == 1,
                                         line={"color": color, "dash": dash}), row=1, col=col)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="cross-entropy loss", row=1, col=1)
    fig.update_yaxes(title_text="accuracy", tickformat=".0%", row=1, col=2)
    return _finish(fig)


def _log_colorbar(z: list[list[float | None]], title: str) -> dict:
    """Colour-bar ticks for log10 colours: one per decade, or at 1, 2 and 5 times a power of ten when the
    data span less than two decades (so a narrow range still gets labelled ticks)."""
    vals = [v for row in z for v in row if v is not None]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    ticks = [float(t) for t in range(math.floor(lo), math.ceil(hi) + 1)]
    text = [f"10<sup>{int(t)}</sup>" for t in ticks]
    if sum(lo <= t <= hi for t in ticks) < 2:
        ticks = [math.log10(m) + k for k in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in (1, 2, 5)]
        ticks = [t for t in ticks if lo - 1e-9 <= t <= hi + 1e-9] or [lo]
        text = [f"{10 ** t:.3g}" for t in ticks]
    return {"title": title, "tickvals": ticks, "ticktext": text, "thickness": 14}


def grad_flow_heatmap(steps: Sequence[float], layer_names: Sequence[str], norms: Any) -> go.Figure:
    """Gradient norm of each layer (rows) over training steps (columns), log colour scale (zeros are gaps)."""
    fig = _base("Gradient flow", xaxis_title="step", yaxis_title="layer")
    raw = _grid(norms)
    z = _grid(norms, log=True)
    if z:
        fig.add_trace(go.Heatmap(x=_clean(steps)[: len(z[0])] or None, y=list(layer_names)[: len(z)] or None, z=z,
                                 customdata=raw, colorscale="Viridis", colorbar=_log_colorbar(z, "grad norm"),
                                 hovertemplate="step %{x}<br>%{y}<br>norm %{customdata:.3g}<extra></extra>"))
    return _finish(fig)


def ratio_figure(steps: Sequence[float], ratios: Any, *, block_names: Sequence[str] | None = None) -> go.Figure:
    """||F(x)|| / ||S(x)|| of every block (rows, input at the top) over training steps (columns).

    A heatmap on a log colour scale stays readable at 15 blocks and at 54, where one line per block
    would not; the hover shows the block, the step and the ratio itself.
    """
    fig = _base("Residual branch vs shortcut, per block: ||F(x)|| / ||S(x)||", xaxis_title="step", yaxis_title="block")
    a = _arr(ratios)
    a = a.reshape(len(a), -1) if a.ndim == 1 and a.size else a
    if a.ndim == 2 and a.size:
        n = a.shape[1]
        names = [block_names[j] if block_names is not None and j < len(block_names) else f"block {j}" for j in range(n)]
        z = _grid(a.T, log=True, decimals=3)  # 0.2% steps of the ratio: colours cannot show finer ones
        fig.add_trace(go.Heatmap(x=_clean(steps)[: a.shape[0]] or None, y=names, z=z, customdata=_grid(a.T),
                                 colorscale="Cividis", colorbar=_log_colorbar(z, "ratio"),
                                 hovertemplate="step %{x}<br>%{y}<br>||F|| / ||S|| = %{customdata:.3g}<extra></extra>"))
        fig.update_yaxes(autorange="reversed")
    return _finish(fig)


# -- inspection ----------------------------------------------------------------------------------
def _tile(m: np.ndarray) -> np.ndarray:
    """One map scaled to [0, 1] by its own range (a constant map is mid-grey); NaN stays NaN."""
    finite = m[np.isfinite(m)]
    if not finite.size:
        return m
    lo, hi = float(finite.min()), float(finite.max())
    return (m - lo) / (hi - lo) if hi > lo else np.where(np.isfinite(m), 0.5, np.nan)


def feature_grid(maps: Any, title: str = "Feature maps", max_maps: int = 16, *,
                 channels: Sequence[int] | None = None) -> go.Figure:
    """The first ``max_maps`` channels of a (C, H, W) activation as one mosaic, each map on its own grey scale.

    One heatmap (tiles separated by a gap) instead of a subplot per channel: a browser lays it out in a
    fraction of the time. The hover shows the channel and the map's own value; ``channels`` gives the
    channel numbers to write (default 0, 1, ...).
    """
    a = _arr(maps)
    count = min(a.shape[0], max_maps) if a.ndim == 3 else 0
    if count == 0:
        return _no_data(_base(title))
    h, w = a.shape[1:]
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    names = list(channels)[:count] if channels is not None else list(range(count))
    names += list(range(len(names), count))
    z = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
    raw = np.full_like(z, np.nan)
    ch = np.full(z.shape + (3,), -1)  # channel, pixel x, pixel y
    fig = _base(title, height=int(70 + 290 * rows / cols + 20), margin={"t": 60, "b": 10, "l": 10, "r": 10},
                xaxis={"visible": False}, yaxis={"visible": False, "autorange": "reversed", "scaleanchor": "x"})
    for c in range(count):
        r0, c0 = (c // cols) * (h + 1), (c % cols) * (w + 1)
        z[r0:r0 + h, c0:c0 + w] = _tile(a[c])
        raw[r0:r0 + h, c0:c0 + w] = a[c]
        ch[r0:r0 + h, c0:c0 + w] = np.stack(np.broadcast_arrays(names[c], *np.meshgrid(range(w), range(h))), axis=-1)
        fig.add_annotation(x=c0 + (w - 1) / 2, y=r0 - 0.5, yanchor="bottom", text=f"ch {names[c]}", showarrow=False)
    # float32 arrays, not nested lists: plotly validates a list cell by cell (half a second for a 16-map mosaic, on
    # every page run) and sends an array as one typed buffer, in which plotly.js draws NaN as a gap
    custom = np.concatenate([raw[..., None], ch], axis=-1).astype(np.float32)
    fig.add_trace(go.Heatmap(z=z.round(3).astype(np.float32), customdata=custom, colorscale="Gray", showscale=False, name=title,
                             hoverongaps=False, hovertemplate="ch %{customdata[1]} (%{customdata[2]}, %{customdata[3]}): "
                                                              "%{customdata[0]:.3g}<extra></extra>"))
    return fig


def magnitude_bars(norm_f: Sequence[float], norm_s: Sequence[float], *, labels: Sequence[str] | None = None) -> go.Figure:
    """||F(x)|| (residual branch) beside ||S(x)|| (shortcut) for every block."""
    fig = _base("Branch vs shortcut magnitude per block", xaxis_title="block", yaxis_title="L2 norm of the map",
                barmode="group")
    for name, vals, color in (("||F(x)|| branch", norm_f, RESIDUAL_COLOR), ("||S(x)|| shortcut", norm_s, OFF_COLOR)):
        ys = _clean(vals)
        xs = list(labels)[: len(ys)] if labels is not None else [f"block {i}" for i in range(len(ys))]
        fig.add_trace(go.Bar(x=xs, y=ys[: len(xs)], name=name, marker_color=color))
    return _finish(fig)


def topk_bars(class_names: Sequence[str], probs: Sequence[float], compare_probs: Sequence[float] | None = None, *,
              k: int = 5, names: tuple[str, str] = ("this net", "intact net")) -> go.Figure:
    """The top-k classes by ``probs``, optionally beside ``compare_probs`` (e.g. the intact net)."""
    fig = _base(f"Top-{k} predictions", xaxis_title="probability", xaxis_tickformat=".0%", barmode="group",
                yaxis={"autorange": "reversed"})
    p = _clean(probs)
    order = sorted((i for i, v in enumerate(p) if v is not None), key=lambda i: -p[i])[:k]
    labels = [str(class_names[i]) if i < len(class_names) else f"class {i}" for i in order]
    fig.add_trace(go.Bar(y=labels, x=[p[i] for i in order], orientation="h", name=names[0], marker_color=RESIDUAL_COLOR))
    if compare_probs is not None:
        q = _clean(compare_probs)
        fig.add_trace(go.Bar(y=labels, x=[q[i] if i < len(q) else None for i in order], orientation="h", name=names[1],
                             marker_color=OFF_COLOR))
    return _finish(fig)


def attribution_overlay(image: Any, heatmap: Any, *, opacity: float = 0.5, title: str = "Attribution") -> go.Figure:
    """A (H, W) heatmap drawn over an (H, W, 3) image in [0, 1]; a coarser heatmap is stretched to fit."""
    fig = _base(title, xaxis={"visible": False}, yaxis={"visible": False, "autorange": "reversed", "scaleanchor": "x"})
    img = np.nan_to_num(_arr(image), nan=0.0)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim == 3 and img.size:
        fig.add_trace(go.Image(z=(np.clip(img[..., :3], 0, 1) * 255).round().astype(np.uint8), hoverinfo="skip"))
    z = _grid(heatmap)
    if z:
        h, w = (img.shape[0], img.shape[1]) if img.ndim == 3 and img.size else (len(z), len(z[0]))
        dy, dx = h / len(z), w / len(z[0])
        fig.add_trace(go.Heatmap(z=z, x0=dx / 2 - 0.5, dx=dx, y0=dy / 2 - 0.5, dy=dy, colorscale=HEAT_SCALE,
                                 opacity=opacity, zmin=0.0, colorbar={"title": "importance"},
                                 hovertemplate="(%{x:.0f}, %{y:.0f}): %{z:.2f}<extra></extra>"))
    return fig if fig.data else _no_data(fig)


def lesion_figure(labels: Sequence[str], accuracy: Mapping[str, Sequence[float]], *,
                  intact: Mapping[str, float] | None = None, chance: float | None = None) -> go.Figure:
    """Accuracy after removing each block (bars per net) against the intact accuracy (dashed lines) and, if
    given, chance (dotted); each line's value is in the legend."""
    fig = _base("Lesion study: accuracy with one block removed", xaxis_title="removed block", yaxis_title="accuracy",
                yaxis_tickformat=".0%", barmode="group")
    for i, (name, acc) in enumerate((accuracy or {}).items()):
        ys = _clean(acc)
        xs = list(labels)[: len(ys)] + [f"block {j}" for j in range(len(labels), len(ys))]
        fig.add_trace(go.Bar(x=xs, y=ys, name=name, marker_color=net_color(name, i)))
    intact = dict(intact or {})
    order = [n for n in (accuracy or {}) if n in intact] + [n for n in intact if n not in (accuracy or {})]  # as the bars
    levels = [(f"{name} intact", _num(intact[name]), {"color": net_color(name, i), "dash": "dash"})
              for i, name in enumerate(order)]
    if chance is not None:
        levels.append(("chance", _num(chance), {"color": OFF_COLOR, "dash": "dot"}))
    for label, v, line in levels:
        if not math.isnan(v):  # the line across the bars, its value in the legend (a label on the line hides bars)
            fig.add_hline(y=v, line=line)
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=line, name=f"{label}: {v:.1%}",
                                     hoverinfo="skip"))
    return _finish(fig)


def loss_landscape_figure(surface: Any, *, alphas: Sequence[float] | None = None, betas: Sequence[float] | None = None,
                          log: bool = True, title: str = "Loss landscape") -> go.Figure:
    """A 2-D loss slice (rows: beta, columns: alpha) as a 3-D surface and a contour map; log10 by default."""
    fig = make_subplots(rows=1, cols=2, specs=[[{"type": "surface"}, {"type": "xy"}]], subplot_titles=("surface", "contour"))
    fig.update_layout(title=title, template=TEMPLATE)
    z = _grid(surface, log=log)
    if not z:
        return _no_data(fig)
    x = _clean(alphas)[: len(z[0])] if alphas is not None else None
    y = _clean(betas)[: len(z)] if betas is not None else None
    label = "log10 loss" if log else "loss"
    fig.add_trace(go.Surface(z=z, x=x, y=y, colorscale="Viridis", showscale=False, name=label), row=1, col=1)
    fig.add_trace(go.Contour(z=z, x=x, y=y, colorscale="Viridis", colorbar={"title": label}, name=label), row=1, col=2)
    fig.update_xaxes(title_text="alpha", row=1, col=2)
    fig.update_yaxes(title_text="beta", row=1, col=2)
    return _finish(fig)


def _side_by_side(names: Sequence[str], title: str) -> go.Figure:
    """One panel per net in a row, each titled in its net's colour; the panels' traces share one colour axis."""
    fig = make_subplots(rows=1, cols=max(1, len(names)), subplot_titles=list(names) or None, horizontal_spacing=0.08)
    fig.update_layout(title=title, template=TEMPLATE, height=430)
    for col in range(1, len(names) + 1):
        fig.update_xaxes(title_text="alpha", row=1, col=col)
        fig.update_yaxes(title_text="beta" if col == 1 else None, scaleanchor=f"x{col if col > 1 else ''}", row=1, col=col)
    for ann, name in zip(fig.layout.annotations, names):
        ann.font = {"color": net_color(name), "size": 14}
    return fig


def _hover(name: str, label: str) -> str:
    return f"{name}<br>alpha %{{x:.2f}}, beta %{{y:.2f}}: {label} %{{z:.3f}}<extra></extra>"


def loss_contours_figure(surfaces: Mapping[str, Any], *, alphas: Sequence[float] | None = None,
                         betas: Sequence[float] | None = None, log: bool = True,
                         title: str = "Loss landscapes, seen from above") -> go.Figure:
    """2-D loss slices of several nets side by side as contour maps on one shared colour scale (log10 by
    default), so the residual net's smooth bowl and the plain net's rough surface compare at a glance.

    A flat picture draws in a fraction of the time a 3-D surface takes in the browser.
    """
    names = [n for n in surfaces if _grid(surfaces[n])]
    fig = _side_by_side(names, title)
    grids = {n: _grid(surfaces[n], log=log) for n in names}
    vals = [v for z in grids.values() for row in z for v in row if v is not None]
    if not vals:
        return _no_data(fig)
    label = "log10 loss" if log else "loss"
    fig.update_layout(coloraxis={"colorscale": SEQUENTIAL, "cmin": min(vals), "cmax": max(vals),
                                 "colorbar": {"title": label, "thickness": 14}})
    for col, name in enumerate(names, start=1):
        z = grids[name]
        x = _clean(alphas)[: len(z[0])] if alphas is not None else None
        y = _clean(betas)[: len(z)] if betas is not None else None
        fig.add_trace(go.Contour(z=z, x=x, y=y, coloraxis="coloraxis", name=name, ncontours=16,
                                 hovertemplate=_hover(name, label)), row=1, col=col)
    return fig


def curvature_maps_figure(maps: Mapping[str, Any], *, alphas: Sequence[float] | None = None,
                          title: str = "Non-convexity |λmin/λmax| of the full Hessian (0: convex)") -> go.Figure:
    """Li et al.'s Fig. 8 for several nets side by side: ``|lambda_min / lambda_max|`` at each measured point of a
    loss slice (rows: beta, columns: alpha) as heatmap cells on one fixed 0..1 scale, each cell labelled with its
    value. Cells, not contours: the map is measured on a coarse grid and is not interpolated between its points."""
    names = [n for n in maps if _grid(maps[n])]
    fig = _side_by_side(names, title)
    if not names:
        return _no_data(fig)
    label = "|λmin/λmax|"
    fig.update_layout(coloraxis={"colorscale": SEQUENTIAL_ALT, "cmin": 0.0, "cmax": 1.0,
                                 "colorbar": {"title": label, "thickness": 14}})
    for col, name in enumerate(names, start=1):
        z = _grid(maps[name])
        ticks = _clean(alphas)[: len(z[0])] if alphas is not None else None
        text = [["" if v is None else f"{v:.2f}" for v in row] for row in z]
        fig.add_trace(go.Heatmap(z=z, x=ticks, y=ticks, coloraxis="coloraxis", name=name, text=text,
                                 texttemplate="%{text}", xgap=1, ygap=1, hovertemplate=_hover(name, label)), row=1, col=col)
    return fig


def block_diagram_figure(skip: bool = True, *, norms: Mapping[str, float] | None = None) -> go.Figure:
    """The residual block y = act(F(x) + S(x)) drawn as boxes and arrows; the shortcut greys out when off.

    ``norms`` (optional) annotates the arrows with measured magnitudes, e.g. ``{"F": 3.1, "S": 5.0, "y": 5.9}``.
    """
    fig = _base("The residual block: y = act(F(x) + S(x))")
    boxes = {"x": (0.0, 0.5, "x"), "F": (1.6, 0.8, "F(x): conv-norm-act-conv-norm"), "add": (3.2, 0.5, "+"),
             "act": (4.2, 0.5, "act"), "y": (5.2, 0.5, "y")}
    s_color = RESIDUAL_COLOR if skip else OFF_COLOR
    for key, (x, y, text) in boxes.items():
        wide = 0.95 if key == "F" else 0.3
        fig.add_shape(type="rect", x0=x - wide, x1=x + wide, y0=y - 0.1, y1=y + 0.1, line={"color": "#444"},
                      fillcolor="#F3F6FA")
        fig.add_annotation(x=x, y=y, text=text, showarrow=False, font={"size": 14, "color": TEXT_COLOR})
    arrows = [((0.3, 0.55), (0.65, 0.8), "#444"), ((2.55, 0.8), (2.9, 0.55), "#444"), ((3.5, 0.5), (3.9, 0.5), "#444"),
              ((4.5, 0.5), (4.9, 0.5), "#444")]
    for (x0, y0), (x1, y1), color in arrows:
        fig.add_annotation(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y", showarrow=True,
                           arrowhead=2, arrowcolor=color, text="")
    fig.add_shape(type="path", path="M 0.3 0.45 Q 1.6 0.05 2.9 0.45", line={"color": s_color, "width": 3,
                  "dash": "solid" if skip else "dot"})
    label = "S(x) = x: the shortcut" if skip else "shortcut off: y = act(F(x)), a plain block"
    fig.add_annotation(x=1.6, y=0.12, text=label, showarrow=False, font={"color": s_color, "size": 13})
    for key, (x, y) in {"F": (1.6, 1.0), "S": (1.6, 0.0), "y": (5.2, 0.75)}.items():
        if norms and key in norms and not math.isnan(_num(norms[key])):
            fig.add_annotation(x=x, y=y, text=f"‖{key}‖ = {_num(norms[key]):.3g}", showarrow=False,
                               font={"size": 12, "color": TEXT_COLOR})
    fig.update_xaxes(visible=False, range=[-0.5, 5.7])
    fig.update_yaxes(visible=False, range=[-0.1, 1.1])
    return fig.update_layout(height=300, showlegend=False, margin={"l": 10, "r": 10, "t": 50, "b": 10})


def deletion_curve_figure(ks: Sequence[int], accuracy: Mapping[str, Sequence[float]], *, chance: float | None = None) -> go.Figure:
    """Accuracy after deleting k blocks at random, one line per net (the ensemble view of Veit et al.)."""
    fig = _base("Accuracy after deleting k blocks at random", xaxis_title="blocks deleted (k)", xaxis_dtick=1,
                yaxis_title="test accuracy",
                yaxis_tickformat=".0%")
    for i, (name, acc) in enumerate(accuracy.items()):
        fig.add_trace(go.Scatter(x=list(ks), y=_clean(acc), mode="lines+markers", name=name,
                                 line={"color": net_color(name, i)}))
    if chance is not None:
        fig.add_hline(y=chance, line={"color": OFF_COLOR, "dash": "dot"}, annotation_text="chance")
    return _finish(fig)
# -- any model: the discovered skip connections -------------------------------------------------
MERGE_KINDS = (("identity shortcut", RESIDUAL_COLOR), ("projection shortcut", PROJECTION_COLOR), ("skip off", OFF_COLOR),
               ("block removed", "#F2F2F2"))


def _merge_kind(r: Mapping[str, Any]) -> int:
    if r.get("removed"):
        return 3
    if not r.get("skip", True):
        return 2
    return 1 if r.get("shortcut") == "projection" else 0


def merge_strip(rows: Sequence[Mapping[str, Any]], *, title: str = "Skip connections found, in execution order") -> go.Figure:
    """A model's residual merges as one strip of cells (readable at hundreds of merges), coloured by kind.

    Each row: ``index, name, group, shortcut ("identity"/"projection"), shape, branch (module count), skip,
    removed``. Groups (a stage or one resolution) are separated by lines and numbered above the strip;
    hovering a cell names the merge.
    """
    fig = _base(title, height=250, xaxis_title="merge (execution order)", showlegend=True,
                legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.18, "yanchor": "bottom"},
                margin={"t": 90, "b": 50})
    fig.update_yaxes(visible=False)
    if not rows:
        return _no_data(fig, "no skip connections found")
    kinds = [_merge_kind(r) for r in rows]
    edges = np.linspace(0, 1, len(MERGE_KINDS) + 1)
    scale = [[float(e), c] for k, (_, c) in enumerate(MERGE_KINDS) for e in (edges[k], edges[k + 1])]
    hover = [f"merge {r.get('index', i)}: {r.get('name', '')}<br>{r.get('group', '')}<br>shape {r.get('shape', '?')}, "
             f"{r.get('shortcut', '?')} shortcut, {r.get('branch', '?')} modules on F<br>{MERGE_KINDS[k][0]}"
             for i, (r, k) in enumerate(zip(rows, kinds))]
    x = [int(r.get("index", i)) for i, r in enumerate(rows)]
    fig.add_trace(go.Heatmap(x=x, y=[""], z=[kinds], customdata=[hover], zmin=-0.5, zmax=len(MERGE_KINDS) - 0.5,
                             colorscale=scale, showscale=False, xgap=1, hovertemplate="%{customdata}<extra></extra>"))
    for name, color in MERGE_KINDS:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                 marker={"symbol": "square", "size": 12, "color": color, "line": {"color": "#999999", "width": 1}}))
    groups: dict[str, list[int]] = {}
    for xi, r in zip(x, rows):
        groups.setdefault(str(r.get("group", "")), []).append(xi)
    for k, idx in enumerate(groups.values(), start=1):
        if k > 1:
            fig.add_vline(x=idx[0] - 0.5, line={"color": "#333333", "width": 2})
        fig.add_annotation(x=(idx[0] + idx[-1]) / 2, y=1.0, yref="paper", yanchor="bottom", text=str(k), showarrow=False,
                           font={"size": 11})
    return fig


# -- data export ---------------------------------------------------------------------------------
CSV_COLUMNS = ("trace", "panel", "x", "y", "z", "text")


def _values(v: Any) -> list:
    if v is None:
        return []
    return list(np.asarray(v, dtype=object).tolist()) if not isinstance(v, (list, tuple)) else list(v)


def _cell(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return ""
        return int(v) if float(v).is_integer() and abs(v) < 1e15 else float(v)  # steps stay 10, not 10.0
    return "" if v is None else v


def _panel(fig: go.Figure, tr: Any) -> str:
    meta = tr.meta if isinstance(tr.meta, dict) else {}
    if "panel" in meta:
        return str(meta["panel"])
    ref = getattr(tr, "scene", None) or getattr(tr, "xaxis", None)
    return "" if ref in (None, "x", "scene") else str(ref)


def _grid_rows(tr: Any) -> list[tuple]:
    """(x, y, value, text) per cell of a heatmap, contour or surface that has a value.

    Where the colours are a transform of the measurement (a log scale, a per-map grey scale) the
    measurement is in ``customdata``: a grid of values, or of lists whose first entry is the value and
    whose others say what the cell is (the channel and pixel of a feature-map mosaic).
    """
    z = _arr(_values(tr.z))
    if z.ndim != 2 or not z.size:
        return []
    custom = np.asarray(_values(tr.customdata), dtype=object) if tr.customdata is not None else None
    values, notes = z, None
    if custom is not None and custom.shape[:2] == z.shape:
        values = _arr(custom[..., 0] if custom.ndim == 3 else custom)
        notes = custom[..., 1:] if custom.ndim == 3 else None
    xs, ys = _values(tr.x), _values(tr.y)
    x0, dx = (getattr(tr, "x0", None), getattr(tr, "dx", None)) if hasattr(tr, "x0") else (None, None)
    y0, dy = (getattr(tr, "y0", None), getattr(tr, "dy", None)) if hasattr(tr, "y0") else (None, None)
    out = []
    for r in range(z.shape[0]):
        for c in range(z.shape[1]):
            if math.isnan(values[r, c]):
                continue
            x = xs[c] if c < len(xs) else (x0 or 0) + c * (dx or 1)
            y = ys[r] if r < len(ys) else (y0 or 0) + r * (dy or 1)
            text = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in notes[r, c]) if notes is not None else ""
            out.append((x, y, float(values[r, c]), text))
    return out


def figure_to_csv(fig: go.Figure) -> str:
    """The data behind ``fig`` as CSV, one row per point (per cell for heatmaps, contours, surfaces).

    Columns: ``trace`` (its name), ``panel`` (the subplot it is drawn in), ``x``, ``y``, ``z`` (the value
    of a cell) and ``text`` (a point's hover text, e.g. which block it is). Missing values are empty
    cells; a grid's cells without a value are left out, as are images, legend-only entries and traces
    marked :data:`DECORATION`, which carry no data.
    """
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(CSV_COLUMNS)
    for k, tr in enumerate(fig.data):
        if tr.type == "image" or tr.meta == DECORATION:
            continue
        name, panel = tr.name or f"trace {k}", _panel(fig, tr)
        if tr.type in ("heatmap", "contour", "surface"):
            for x, y, v, text in _grid_rows(tr):
                out.writerow((name, panel, _cell(x), _cell(y), _cell(v), text))
            continue
        xs, ys = _values(getattr(tr, "x", None)), _values(getattr(tr, "y", None))
        texts = _values(getattr(tr, "hovertext", None)) or _values(getattr(tr, "text", None))
        n = max(len(xs), len(ys))
        if not any(v is not None for v in ys + xs):
            continue  # a legend entry
        for i in range(n):
            x = xs[i] if i < len(xs) else i
            y = ys[i] if i < len(ys) else ""
            text = str(texts[i]).replace("<br>", "; ") if i < len(texts) and isinstance(texts, list) else ""
            out.writerow((name, panel, _cell(x), _cell(y), "", text))
    return buf.getvalue()
