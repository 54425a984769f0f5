"""The one look of every ResViz chart: colours, fonts, margins and axis rules, as a Plotly template.

Every figure builder (``resviz.plots``, ``resviz.experiments.figures``) sets ``template=TEMPLATE``
itself, so a figure looks the same in the app, in a notebook and in the docs' PNGs. The template is
also registered under the name ``"resviz"``; :func:`use_theme` makes it Plotly's default for figures
built elsewhere, and only the entry points call it (it is a process-wide setting). The rules are
written out in ``docs/design.md``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

# Okabe-Ito: the pair stays distinct under the common colour-vision deficiencies and in greyscale.
RESIDUAL_COLOR = "#0072B2"  # blue: a net with its skip connections
PLAIN_COLOR = "#D55E00"  # vermillion: its plain twin, skips off
OFF_COLOR = "#9E9E9E"  # grey: switched off, removed, or "the other" in a comparison (intact net, shortcut)
PROJECTION_COLOR = "#009E73"  # bluish green: a projection shortcut
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")  # yellow last: faint on white
SEQUENTIAL = "Viridis"  # per-block and per-layer quantities (perceptually uniform, colour-blind safe)
SEQUENTIAL_ALT = "Cividis"  # a second sequential scale, for a second kind of quantity on the same page

FONT_FAMILY = '"Source Sans", "Source Sans Pro", "Source Sans 3", "Helvetica Neue", Arial, sans-serif'  # Streamlit's font
FONT_SIZE = 13  # ticks, hover, annotations
TITLE_SIZE = 16  # the chart's title: the question it answers
SMALL_SIZE = 12  # legends, colour bars, subplot titles
TEXT_COLOR = "#31333F"  # Streamlit's text colour
MUTED_COLOR = "#5F6170"  # axis titles and tick labels
MARGIN = {"l": 64, "r": 24, "t": 72, "b": 56}  # room for the title above and the axis titles around

_GRID = "#E8ECF2"
_AXIS = {"gridcolor": _GRID, "zerolinecolor": _GRID, "linecolor": "#B8BCC6", "showline": True, "ticks": "outside",
         "tickcolor": "#B8BCC6", "ticklen": 4, "automargin": True, "title": {"standoff": 8, "font": {"color": MUTED_COLOR}},
         "tickfont": {"color": MUTED_COLOR}}
# A small template built once: the named "plotly_white" template costs ~50 ms per figure to validate,
# which the live Train view would pay several times a second; this one costs a few milliseconds.
TEMPLATE = go.layout.Template(
    layout={
        "font": {"family": FONT_FAMILY, "size": FONT_SIZE, "color": TEXT_COLOR},
        "title": {"font": {"size": TITLE_SIZE}, "x": 0, "xref": "paper", "xanchor": "left"},
        "colorway": list(PALETTE),
        "colorscale": {"sequential": SEQUENTIAL},
        "plot_bgcolor": "white",
        "paper_bgcolor": "white",
        "margin": MARGIN,
        # outside the plot area, on the right: a legend never covers data
        "legend": {"font": {"size": SMALL_SIZE}, "x": 1.02, "xanchor": "left", "y": 1, "yanchor": "top",
                   "bgcolor": "rgba(255,255,255,0)", "tracegroupgap": 4},
        "hoverlabel": {"font": {"family": FONT_FAMILY, "size": SMALL_SIZE}},
        "xaxis": _AXIS,
        "yaxis": _AXIS,
        "coloraxis": {"colorbar": {"thickness": 14, "tickfont": {"size": SMALL_SIZE}}},
        "annotationdefaults": {"font": {"size": SMALL_SIZE, "color": MUTED_COLOR}},
    }
)
pio.templates["resviz"] = TEMPLATE


def use_theme() -> None:
    """Make the ResViz template Plotly's default (process-wide: for the app, the CLI and the docs build)."""
    pio.templates.default = "resviz"


def _decade_label(k: int, powers: bool) -> str:
    return f"10<sup>{k}</sup>" if powers else f"{10.0 ** k:,.{max(0, -k)}f}"


def log_axis(values: Any) -> dict[str, Any]:
    """Settings of a log axis for ``values``: whole decades, at least two of them, one label per decade.

    Data that hardly varies (a variance of 0.99998 to 0.99999) then sits on a flat line near 1 on an
    axis labelled 0.1, 1, 10, instead of filling an axis labelled 0.999980 to 0.999985. Labels are
    plain numbers (0.01 ... 10,000) when every one of them is, powers of ten otherwise: one style an axis.
    """
    a = np.asarray(values, dtype=np.float64).ravel() if values is not None else np.zeros(0)
    a = a[np.isfinite(a) & (a > 0)]
    axis: dict[str, Any] = {"type": "log", "minor": {"showgrid": False}}
    if not a.size:
        return axis
    lo, hi = math.log10(float(a.min())), math.log10(float(a.max()))
    if hi - lo < 2:  # centre the data in a two-decade window
        mid = (lo + hi) / 2
        lo, hi = mid - 1, mid + 1
    else:
        pad = 0.05 * (hi - lo)
        lo, hi = lo - pad, hi + pad
    step = max(1, math.ceil((math.floor(hi) - math.ceil(lo)) / 6))  # at most about six labels
    ticks = list(range(math.ceil(lo / step) * step, math.floor(hi) + 1, step))  # multiples of the step: 10^-5, 1, 10^5
    powers = any(k < -2 or k > 4 for k in ticks)
    return axis | {"range": [lo, hi], "tickmode": "array", "tickvals": [10.0 ** k for k in ticks],
                   "ticktext": [_decade_label(k, powers) for k in ticks]}
