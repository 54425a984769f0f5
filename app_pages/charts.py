"""Every chart of the app goes through :func:`show_chart`: the ResViz theme, a PNG download, a CSV download.

Streamlit's own chart theme is switched off (``theme=None``) so the figure's ResViz template is what
the browser draws, the same as in the docs' PNGs. Plotly's mode bar stays on (it appears over a chart
on hover); its camera button saves the chart as a PNG named after it. The CSV button under the chart
writes the figure's traces (:func:`resviz.plots.figure_to_csv`), computed only when it is clicked.
"""

from __future__ import annotations

import re
from typing import Any

import plotly.graph_objects as go
import streamlit as st

from resviz import plots, theme

# Selection tools draw boxes that do nothing here; the rest (zoom, pan, reset, PNG) stays.
REMOVED_BUTTONS = ["select2d", "lasso2d"]


def use_theme() -> None:
    """Make the ResViz template Plotly's default for this process (every builder sets it anyway)."""
    theme.use_theme()


def file_stem(name: str) -> str:
    """A file name from a chart's key or title: lower case, words joined by hyphens."""
    stem = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"resviz-{stem or 'chart'}"[:80]


def chart_config(filename: str) -> dict[str, Any]:
    """Plotly's config for one chart: the mode bar with its PNG button, saving ``<filename>.png`` at 2x."""
    return {"displaylogo": False, "modeBarButtonsToRemove": REMOVED_BUTTONS,
            "toImageButtonOptions": {"format": "png", "filename": filename, "scale": 2}}


def show_chart(fig: go.Figure, key: str, *, where: Any = None, name: str | None = None, csv: bool = True) -> None:
    """Draw ``fig`` in ``where`` (the page by default) with its PNG and CSV downloads.

    ``key`` is the chart's widget key (the CSV button's is ``<key>_csv``); ``name`` names the files
    (default: the chart's title, else its key). ``csv=False`` for a drawing whose figure holds no data.
    """
    where = st if where is None else where
    title = fig.layout.title.text if fig.layout.title and fig.layout.title.text else ""
    filename = file_stem(name or re.sub(r"<[^>]+>", " ", title) or key)
    where.plotly_chart(fig, key=key, theme=None, config=chart_config(filename))
    if csv:
        where.download_button("CSV", lambda: plots.figure_to_csv(fig), f"{filename}.csv", "text/csv", key=f"{key}_csv",
                              on_click="ignore", type="tertiary", icon=":material/download:",
                              help="The chart's data, one row per point. The camera icon over the chart saves it as PNG.")
