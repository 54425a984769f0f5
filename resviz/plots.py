"""Pure figure builders: plain data (lists, numpy arrays, dicts) in, ``plotly.graph_objects.Figure`` out.

They never touch a model. Every builder draws NaN/Inf (and, on log axes, non-positive values) as gaps
instead of failing, never raises on empty data, and passes plain lists to plotly so the serialised
figure holds ``null`` where a value is missing. Residual nets are always blue, plain nets vermillion.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

RESIDUAL_COLOR = "#0072B2"  # Okabe-Ito blue: readable for the common colour-vision deficiencies
PLAIN_COLOR = "#D55E00"  # Okabe-Ito vermillion
OFF_COLOR = "#9E9E9E"
PROJECTION_COLOR = "#009E73"
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
# A small white template built once: the named "plotly_white" template costs ~50 ms per figure to
# validate, which the live Train view would pay several times a second; this one costs ~7 ms.
_GRID = "#EBF0F8"
TEMPLATE = go.layout.Template(
    layout={
        "plot_bgcolor": "white",
        "paper_bgcolor": "white",
        "xaxis": {"gridcolor": _GRID, "zerolinecolor": _GRID},
        "yaxis": {"gridcolor": _GRID, "zerolinecolor": _GRID},
    }
)
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
def _block_shapes(i: int, b: Mapping[str, Any]) -> list[dict]:
    removed, skip, proj = bool(b.get("removed")), bool(b.get("skip", True)), bool(b.get("projection"))
    box = {"type": "rect", "x0": i - 0.35, "x1": i + 0.35, "y0": 0, "y1": 1, "layer": "below",
           "fillcolor": "#EEEEEE" if removed else "#DCEBF5",
           "line": {"color": OFF_COLOR if removed else RESIDUAL_COLOR, "dash": "dot" if removed else "solid"}}
    color = (PROJECTION_COLOR if proj else RESIDUAL_COLOR) if skip else OFF_COLOR
    # a cubic arc that leaves and re-enters the data path vertically, clearing the box
    arc = {"type": "path", "path": f"M {i - 0.45},0.5 C {i - 0.45},1.6 {i + 0.45},1.6 {i + 0.45},0.5",
           "line": {"color": color, "width": 2.5 if skip else 1.5, "dash": "solid" if skip else "dash"}}
    return [box, arc]


def architecture_figure(blocks: Sequence[Mapping[str, Any]], *, title: str = "Architecture") -> go.Figure:
    """Blocks as boxes left to right with a skip arc over each (solid when on, grey dashed when off).

    Each block dict: ``name, stage, cin, cout, stride, skip, projection, removed``.
    """
    fig = _base(title, showlegend=True, height=300)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, range=[-0.8, 1.8])
    if not blocks:
        return _no_data(fig, "no blocks")
    n = len(blocks)
    path_x = [v for i in range(n + 1) for v in (i - 1 + 0.35 if i else -0.7, i - 0.35 if i < n else n - 0.3, None)]
    fig.add_trace(go.Scatter(x=path_x, y=[0.5, 0.5, None] * (n + 1), mode="lines", line={"color": "#555555"},
                             hoverinfo="skip", showlegend=False))
    hover = [
        f"{b.get('name', f'block {i}')}<br>stage {b.get('stage', '?')}: {b.get('cin', '?')} -> {b.get('cout', '?')} channels, "
        f"stride {b.get('stride', 1)}<br>skip {'on' if b.get('skip', True) else 'off'}"
        f"{' (projection)' if b.get('projection') else ''}{'<br>REMOVED' if b.get('removed') else ''}"
        for i, b in enumerate(blocks)
    ]
    labels = [str(b.get("name", i)) + (" ✕" if b.get("removed") else "") for i, b in enumerate(blocks)]
    fig.add_trace(go.Scatter(x=list(range(n)), y=[0.5] * n, mode="markers+text", text=labels, hovertext=hover,
                             hoverinfo="text", marker={"size": 40, "color": "rgba(0,0,0,0)"}, showlegend=False))
    for name, color, dash in (("skip on", RESIDUAL_COLOR, "solid"), ("projection shortcut", PROJECTION_COLOR, "solid"),
                              ("skip off", OFF_COLOR, "dash")):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=name, line={"color": color, "dash": dash}))
    fig.update_layout(shapes=[s for i, b in enumerate(blocks) for s in _block_shapes(i, b)])
    stages: dict[Any, list[int]] = {}
    for i, b in enumerate(blocks):
        stages.setdefault(b.get("stage", 0), []).append(i)
    for stage, idx in stages.items():
        fig.add_annotation(x=sum(idx) / len(idx), y=-0.45, text=f"stage {stage}", showarrow=False)
    return fig


# -- signal and gradients ------------------------------------------------------------------------
def _net_pair(res: Any, plain: Any) -> list[tuple[str, Any]]:
    return [(name, data) for name, data in (("residual", res), ("plain", plain)) if data is not None]


def signal_prop_figure(res_stats: Mapping[str, Any] | None, plain_stats: Mapping[str, Any] | None) -> go.Figure:
    """Signal propagation (Brock et al. 2021): per block depth, both nets, log y.

    Each stats dict: ``mean_sq`` (average channel squared mean) and ``var`` (average channel variance),
    one value per block; optional ``branch_var`` (residual-branch variance, adds a third panel) and
    ``depth`` (x values).
    """
    pairs = _net_pair(res_stats, plain_stats)
    panels = [("mean_sq", "average channel squared mean"), ("var", "average channel variance")]
    if any(s.get("branch_var") is not None for _, s in pairs):
        panels.append(("branch_var", "residual branch variance"))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for _, t in panels])
    fig.update_layout(title="Signal propagation", template=TEMPLATE)
    for name, stats in pairs:
        for col, (key, _) in enumerate(panels, start=1):
            x, y = _xy(stats.get("depth"), stats.get(key), positive=True)
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name, legendgroup=name, showlegend=col == 1,
                                     line={"color": net_color(name)}, hovertemplate=f"{name}<br>block %{{x}}: %{{y:.3g}}"),
                          row=1, col=col)
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="block depth")
    return _finish(fig)


def grad_norm_figure(res_norms: Sequence[float] | Mapping[str, float] | None,
                     plain_norms: Sequence[float] | Mapping[str, float] | None) -> go.Figure:
    """Gradient norm per block/layer for both nets, log y; a mapping's keys become the x labels."""
    fig = _base("Gradient norm by depth", xaxis_title="layer (input -> output)", yaxis_title="gradient norm", yaxis_type="log")
    for name, norms in _net_pair(res_norms, plain_norms):
        labels = list(norms.keys()) if isinstance(norms, Mapping) else None
        ys = _clean(list(norms.values()) if labels is not None else norms, positive=True)
        xs = labels if labels is not None else list(range(1, len(ys) + 1))
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name, line={"color": net_color(name)}))
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
    return _finish(fig)


def _log_colorbar(z: list[list[float | None]], title: str) -> dict:
    vals = [v for row in z for v in row if v is not None]
    lo, hi = (math.floor(min(vals)), math.ceil(max(vals))) if vals else (0, 1)
    ticks = list(range(lo, hi + 1))
    return {"title": title, "tickvals": ticks, "ticktext": [f"1e{t}" for t in ticks]}


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
def feature_grid(maps: Any, title: str = "Feature maps", max_maps: int = 16) -> go.Figure:
    """A grid of the first ``max_maps`` channels of a (C, H, W) activation, each with its own scale."""
    a = _arr(maps)
    count = min(a.shape[0], max_maps) if a.ndim == 3 else 0
    if count == 0:
        return _no_data(_base(title))
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"ch {c}" for c in range(count)],
                        horizontal_spacing=0.02, vertical_spacing=0.06)
    for c in range(count):
        fig.add_trace(go.Heatmap(z=_grid(a[c]), colorscale="Gray", showscale=False,
                                 hovertemplate=f"ch {c}<br>(%{{x}}, %{{y}}): %{{z:.3g}}<extra></extra>"),
                      row=c // cols + 1, col=c % cols + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    for c in range(count):  # square pixels: each y axis keeps its own x axis's scale
        fig.update_yaxes(scaleanchor=f"x{c + 1 if c else ''}", row=c // cols + 1, col=c % cols + 1)
    fig.update_layout(title=title, template=TEMPLATE, height=160 * rows + 80)
    return fig


def magnitude_bars(norm_f: Sequence[float], norm_s: Sequence[float], *, labels: Sequence[str] | None = None) -> go.Figure:
    """||F(x)|| (residual branch) beside ||S(x)|| (shortcut) for every block."""
    fig = _base("Branch vs shortcut magnitude", xaxis_title="block", yaxis_title="L2 norm", barmode="group")
    for name, vals, color in (("||F(x)|| branch", norm_f, RESIDUAL_COLOR), ("||S(x)|| shortcut", norm_s, OFF_COLOR)):
        ys = _clean(vals)
        xs = list(labels)[: len(ys)] if labels is not None else [f"block {i}" for i in range(len(ys))]
        fig.add_trace(go.Bar(x=xs, y=ys[: len(xs)], name=name, marker_color=color))
    return _finish(fig)


def topk_bars(class_names: Sequence[str], probs: Sequence[float], compare_probs: Sequence[float] | None = None, *,
              k: int = 5, names: tuple[str, str] = ("this net", "intact net")) -> go.Figure:
    """The top-k classes by ``probs``, optionally beside ``compare_probs`` (e.g. the intact net)."""
    fig = _base(f"Top-{k} predictions", xaxis_title="probability", barmode="group", yaxis={"autorange": "reversed"})
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
                  intact: Mapping[str, float] | None = None) -> go.Figure:
    """Accuracy after removing each block (bars per net) against the intact accuracy (dashed lines)."""
    fig = _base("Lesion study: accuracy with one block removed", xaxis_title="removed block", yaxis_title="accuracy",
                barmode="group")
    for i, (name, acc) in enumerate((accuracy or {}).items()):
        ys = _clean(acc)
        xs = list(labels)[: len(ys)] + [f"block {j}" for j in range(len(labels), len(ys))]
        fig.add_trace(go.Bar(x=xs, y=ys, name=name, marker_color=net_color(name, i)))
    for i, (name, value) in enumerate((intact or {}).items()):
        if not math.isnan(_num(value)):
            fig.add_hline(y=_num(value), line={"color": net_color(name, i), "dash": "dash"}, annotation_text=f"{name} intact")
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
        fig.add_annotation(x=x, y=y, text=text, showarrow=False, font={"size": 14})
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
            fig.add_annotation(x=x, y=y, text=f"‖{key}‖ = {_num(norms[key]):.3g}", showarrow=False, font={"size": 12})
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
