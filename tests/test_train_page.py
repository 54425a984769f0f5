"""The Train page's live charts: thinned series, a bounded payload per refresh, compact float32 JSON."""

from __future__ import annotations

import numpy as np
import plotly.io as pio
import plotly.tools

from app_pages import train as train_page
from resviz import TrainConfig, plots
from resviz.train.records import History, JobSnapshot, Points, Series, Status

BLOCKS = 15  # ResNet-32


NETS = ("residual", "plain")


def _snapshot(steps: int, seed: int = 0, *, probes: bool = True) -> JobSnapshot:
    """A twin run's snapshot after ``steps`` steps, with the job's own capped series."""
    rng = np.random.default_rng(seed)
    hist = {n: {m: Series(500) for m in ("loss", "acc", "test_loss", "test_acc")} for n in NETS}
    readings = {n: {k: Series(500, (BLOCKS,)) for k in ("grad_block", "ratio")} for n in NETS} if probes else {}
    for step in range(1, steps + 1):
        for series in hist.values():
            for key, s in series.items():
                if "test_" not in key or step % 300 == 0:
                    s.append(step, rng.lognormal())
        if step % 5 == 0:
            for series in readings.values():
                for s in series.values():
                    s.append(step, rng.lognormal(-2.0, 1.5, BLOCKS))
    history = History(nets={n: {k: s.points() for k, s in ms.items()} for n, ms in hist.items()},
                      probes={n: {k: s.points() for k, s in rs.items()} for n, rs in readings.items()})
    return JobSnapshot(id="run", status=Status.RUNNING, error="", created=0.0, started=0.0, ended=None, step=steps,
                       total_steps=steps, epoch=1.0, progress=1.0, eta_s=None, images_per_s=0.0, time_s=0.0, names=NETS,
                       net_cfg={}, train_cfg={}, latest={}, history=history, param_names={})


def _sent_kb(fig) -> float:
    """Size of the JSON ``st.plotly_chart`` sends for ``fig``."""
    return len(pio.to_json(plotly.tools.return_figure_from_figure_or_data(fig, validate_figure=True), validate=False)) / 1e3


def test_thin_keeps_the_ends_and_at_most_the_requested_points() -> None:
    steps = np.arange(1, 501)
    values = np.arange(500.0)[:, None] * np.ones(3)
    thinned = Points(steps, values).thinned(100)
    s, v = thinned.steps, thinned.values
    assert len(s) <= 100 and s[0] == 1 and s[-1] == 500 and v.shape == (len(s), 3)
    assert np.all(np.diff(s) > 0) and np.array_equal(v[:, 0], s - 1.0)
    short = Points(steps[:50], values[:50]).thinned(100).steps
    assert np.array_equal(short, steps[:50])  # nothing to thin


def test_a_long_run_costs_at_most_300_kb_per_refresh() -> None:
    snap = _snapshot(6000)  # 10 minutes at 10 steps/s; every series at its cap
    figs = train_page.live_figures(snap)
    assert set(figs) == {"curves", "flow_residual", "flow_plain", "ratio"}
    assert sum(_sent_kb(f) for f in figs.values()) <= 300
    assert all(len(t.x) <= train_page.LIVE_POINTS for t in figs["ratio"].data)
    newest = snap.history.probe("residual", "ratio").steps[-1]
    assert figs["ratio"].data[0].x[-1] == newest  # the newest reading is always drawn


def test_probe_charts_are_rebuilt_when_a_new_reading_arrives_even_at_the_cap() -> None:
    a, b = _snapshot(3000), _snapshot(3005)
    assert train_page.probe_version(a, "residual", "grad_block") != train_page.probe_version(b, "residual", "grad_block")
    empty = _snapshot(3, probes=False)
    assert train_page.probe_version(empty, "residual", "grad_block") == ("run", -1)


def test_eval_every_gives_about_20_evaluations() -> None:
    cfg = TrainConfig(epochs=3.0, batch_size=64)
    assert train_page.eval_every(5000, cfg) == round(3 * 78 / 20)
    assert train_page.eval_every(100, TrainConfig(epochs=1.0, batch_size=64)) == 5


def test_float32_values_are_sent_in_their_shortest_form_and_unchanged() -> None:
    values = np.random.default_rng(1).lognormal(-2.0, 2.0, 400).astype(np.float32)
    values[7] = np.nan
    fig = plots.ratio_figure(np.arange(400), values[:, None])
    sent = np.array([np.nan if v is None else v for v in fig.data[0].customdata[0]], dtype=np.float64)
    kept = np.isfinite(values)
    assert np.array_equal(sent[kept].astype(np.float32), values[kept]) and np.isnan(sent[7])
    wide = plots.ratio_figure(np.arange(400), values.astype(np.float64)[:, None])  # every float32 digit spelled out
    data_kb = lambda f: len(pio.to_json({"data": [t.to_plotly_json() for t in f.data]}, validate=False)) / 1e3  # noqa: E731
    assert data_kb(fig) < 0.75 * data_kb(wide)  # the traces; the layout and its template are the same for both
