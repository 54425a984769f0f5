"""The figures of docs/experiments.md: which stored run and figure each image is, and their PNG export.

An image ``img/experiments/<prefix><figure>.png`` is figure ``<figure>`` of the stored run whose prefix
matches (``degradation_``, or ``shipped_lesion_`` for the run ``lesion-shipped``), built by the study's
own ``figures(result)``. PNGs are written by Plotly's static export (``kaleido``), which drives the
system's Chromium: ``$BROWSER_PATH`` when set, else ``chromium`` on the ``PATH`` (Debian's
``/usr/bin/chromium``); kaleido never downloads a browser here.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from resviz.experiments.runner import study_figures
from scripts.docgen.results import RUNS

IMAGE = re.compile(r"\(img/experiments/([a-z0-9_]+)\.png\)")
WIDTH, HEIGHT, SURFACE_HEIGHT = 900, 480, 520


@dataclass(frozen=True)
class FigureRef:
    """One image of the page: ``file`` is figure ``figure`` of stored run ``run``."""

    file: str
    run: str
    figure: str


def prefix(run: str) -> str:
    """The file-name prefix of a stored run's figures (``lesion-shipped`` -> ``shipped_lesion_``)."""
    study, _, variant = run.partition("-")
    return f"{variant}_{study}_" if variant else f"{study}_"


def references(markdown: str) -> list[FigureRef]:
    """Every image the page shows, resolved to its run and figure (ValueError for an unknown image)."""
    out = []
    runs = sorted(RUNS, key=lambda k: -len(prefix(k)))
    for name in dict.fromkeys(IMAGE.findall(markdown)):
        run = next((k for k in runs if name.startswith(prefix(k))), None)
        if run is None:
            raise ValueError(f"img/experiments/{name}.png belongs to no stored run ({', '.join(RUNS)})")
        out.append(FigureRef(f"{name}.png", run, name[len(prefix(run)):]))
    return out


def build(refs: list[FigureRef], results: Mapping[str, dict[str, Any]]) -> dict[str, go.Figure]:
    """The figure behind every reference, keyed by file name (KeyError when a study has no such figure)."""
    built: dict[str, dict[str, go.Figure]] = {}
    out = {}
    for ref in refs:
        if ref.run not in built:
            built[ref.run] = study_figures(results[ref.run])
        if ref.figure not in built[ref.run]:
            raise KeyError(f"{ref.file}: study {results[ref.run]['study']!r} has no figure {ref.figure!r} "
                           f"(it has {', '.join(built[ref.run])})")
        out[ref.file] = built[ref.run][ref.figure]
    return out


def browser() -> str:
    """The Chromium kaleido drives: ``$BROWSER_PATH``, else ``chromium`` on the PATH."""
    path = os.environ.get("BROWSER_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("no Chromium found: install Debian's chromium (apt-get install chromium) or set BROWSER_PATH")
    return path


def write_png(figures: Mapping[str, go.Figure], folder: Path) -> list[Path]:
    """Export every figure as ``folder/<file>`` (900 px wide; 3-D surfaces a little taller), one browser for all."""
    try:
        import kaleido
    except ImportError as e:
        raise RuntimeError("the figures need kaleido (requirements-dev.txt); --no-figures writes the markdown only") from e
    folder.mkdir(parents=True, exist_ok=True)
    specs = [{"fig": fig, "path": str(folder / name),
              "opts": {"format": "png", "width": WIDTH,
                       "height": SURFACE_HEIGHT if any(t.type == "surface" for t in fig.data) else HEIGHT}}
             for name, fig in figures.items()]

    async def export() -> None:
        async with kaleido.Kaleido(path=browser(), mathjax=False, n=1) as k:  # no MathJax: it would come from a CDN
            await k.write_fig_from_object(specs, cancel_on_error=True)

    _run_coroutine(export)
    return [folder / name for name in figures]


def _run_coroutine(make: Any) -> None:
    """``asyncio.run(make())``, in a thread of its own when this thread already runs an event loop (a
    notebook, or a test session whose browser driver holds one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(make())
        return
    errors: list[BaseException] = []

    def work() -> None:
        try:
            asyncio.run(make())
        except BaseException as e:  # handed back to the caller's thread
            errors.append(e)

    worker = threading.Thread(target=work, name="resviz-docgen-export")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
