"""Figure builders for the studies: plain data in, ``plotly.graph_objects.Figure`` out.

They follow :mod:`resviz.plots`: no model is touched, residual nets are blue, plain nets vermillion,
missing values are gaps. A series whose label contains "paper" is drawn dashed with open markers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from resviz.plots import PALETTE, TEMPLATE, net_color


def _color(label: str, index: int) -> str:
    low = label.lower()
    if "plain" in low or "res" in low:
        return net_color(label)
    return PALETTE[(index + 2) % len(PALETTE)]


def _values(values: Sequence[Any]) -> list[float | None]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            out.append(None)
            continue
        out.append(f if f == f and abs(f) != float("inf") else None)
    return out


def _style(label: str, index: int) -> dict[str, Any]:
    paper = "paper" in label.lower()
    return {"line": {"color": _color(label, index), "dash": "dash" if paper else "solid"},
            "marker": {"symbol": "circle-open" if paper else "circle", "size": 8}}


def lines(x: Sequence[Any], series: Mapping[str, Sequence[Any]], *, title: str, xaxis: str, yaxis: str,
          log_y: bool = False, percent: bool = False) -> go.Figure:
    """One line per series over shared ``x`` (depths, block indices, k removed blocks, ...)."""
    fig = go.Figure()
    fig.update_layout(title=title, template=TEMPLATE, xaxis_title=xaxis, yaxis_title=yaxis, hovermode="x unified")
    shown: list[float] = []
    for i, (label, ys) in enumerate(series.items()):
        vals = _values(ys)
        if log_y:
            vals = [v if v is not None and v > 0 else None for v in vals]
            shown += [v for v in vals if v is not None]
        fig.add_trace(go.Scatter(x=list(x)[: len(vals)], y=vals, mode="lines+markers", name=label, connectgaps=False,
                                 **_style(label, i)))
    if log_y:
        fig.update_yaxes(type="log")
        if shown and max(shown) > 1e6 * min(shown):  # many decades: 10^10 beside 10^35, not "10B"
            fig.update_yaxes(exponentformat="power")
    if percent:
        fig.update_yaxes(tickformat=".0%")
    return fig


def curve_panels(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]], *, title: str,
                 xaxis: str, yaxis: str, log_y: bool = False, percent: bool = False) -> go.Figure:
    """Side-by-side panels (e.g. plain | residual), one curve per label (e.g. depth), darker = later label."""
    names = list(panels)
    fig = make_subplots(rows=1, cols=max(1, len(names)), subplot_titles=names, shared_yaxes=True)
    fig.update_layout(title=title, template=TEMPLATE)
    for col, name in enumerate(names, start=1):
        curves = panels[name]
        base = net_color(name).lstrip("#")
        rgb = tuple(int(base[k : k + 2], 16) for k in (0, 2, 4))
        for j, (label, (xs, ys)) in enumerate(curves.items()):
            shade = 0.3 + 0.7 * (j + 1) / max(1, len(curves))
            fig.add_trace(go.Scatter(x=list(xs), y=_values(ys), mode="lines", name=f"{name} {label}",
                                     line={"color": f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{shade:.2f})"}), row=1, col=col)
    fig.update_xaxes(title_text=xaxis)
    fig.update_yaxes(title_text=yaxis, row=1, col=1)
    if log_y:
        fig.update_yaxes(type="log")
    if percent:
        fig.update_yaxes(tickformat=".0%")
    return fig


def grouped_bars(categories: Sequence[str], series: Mapping[str, Sequence[Any]], *, title: str, yaxis: str,
                 percent: bool = False) -> go.Figure:
    """Bars per category, one colour per series (residual blue, plain vermillion, others from the palette)."""
    fig = go.Figure()
    fig.update_layout(title=title, template=TEMPLATE, barmode="group", yaxis_title=yaxis)
    for i, (label, ys) in enumerate(series.items()):
        fig.add_trace(go.Bar(x=list(categories), y=_values(ys), name=label, marker_color=_color(label, i)))
    if percent:
        fig.update_yaxes(tickformat=".0%")
    return fig
