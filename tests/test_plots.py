"""Figure builders: trace counts and contents, NaN/Inf as gaps, empty inputs, JSON that renders."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import plotly.graph_objects as go
import pytest

from resviz import plots
from resviz.plots import PLAIN_COLOR, RESIDUAL_COLOR

NAN, INF = float("nan"), float("inf")


def _walk(node, path="") -> None:
    if isinstance(node, float):
        assert math.isfinite(node), f"non-finite number at {path}"  # NaN is not JSON
    elif isinstance(node, dict):
        if "bdata" in node and str(node.get("dtype", "")).startswith("f"):  # a typed array: NaN is a gap, never infinite
            arr = np.frombuffer(base64.b64decode(node["bdata"]), dtype=node["dtype"])
            assert not np.isinf(arr).any(), f"infinite value in the typed array at {path}"
        for k, v in node.items():
            _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _walk(v, f"{path}[{i}]")


def renders(fig: go.Figure) -> dict:
    """The figure is a go.Figure whose JSON parses and holds no NaN/Inf as a number (a typed array may mark a gap with
    NaN, which plotly.js draws as one)."""
    assert isinstance(fig, go.Figure)
    text = fig.to_json()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    _walk(data)
    return data


def has_no_data_note(fig: go.Figure) -> bool:
    return any("no data" in (a.text or "") or "no blocks" in (a.text or "") for a in fig.layout.annotations)


BLOCKS = [
    {"name": "b0", "stage": 1, "cin": 8, "cout": 8, "stride": 1, "skip": True, "projection": False, "removed": False},
    {"name": "b1", "stage": 2, "cin": 8, "cout": 16, "stride": 2, "skip": True, "projection": True, "removed": False},
    {"name": "b2", "stage": 2, "cin": 16, "cout": 16, "stride": 1, "skip": False, "projection": False, "removed": True},
]


def test_net_colors():
    assert plots.net_color("residual") == RESIDUAL_COLOR and plots.net_color("ResNet-20") == RESIDUAL_COLOR
    assert plots.net_color("plain-20") == PLAIN_COLOR
    assert plots.net_color("other", 2) == plots.PALETTE[2]


def test_architecture_figure():
    fig = plots.architecture_figure(BLOCKS)
    renders(fig)
    assert len(fig.layout.shapes) == 2 * len(BLOCKS)  # a box and a skip arc per block
    arcs = [s for s in fig.layout.shapes if s.type == "path"]
    assert [a.line.dash for a in arcs] == ["solid", "solid", "dash"]
    assert arcs[1].line.color == plots.PROJECTION_COLOR and arcs[2].line.color == plots.OFF_COLOR
    boxes = [s for s in fig.layout.shapes if s.type == "rect"]
    assert boxes[2].line.dash == "dot"  # removed block
    hover = fig.data[1].hovertext
    assert "8 -> 16" in hover[1] and "skip off" in hover[2] and "REMOVED" in hover[2]
    stage_notes = sorted(a.text for a in fig.layout.annotations)
    assert stage_notes == ["stage 1", "stage 2"]
    assert {t.name for t in fig.data if t.showlegend is not False} == {"skip on", "skip off", "projection shortcut",
                                                                       "block removed"}
    empty = plots.architecture_figure([])
    renders(empty)
    assert has_no_data_note(empty) and not empty.data


def _blocks(stage_sizes: list[int], off: tuple[int, ...] = ()) -> list[dict]:
    stages = [s for s, k in enumerate(stage_sizes, start=1) for _ in range(k)]
    return [{"name": f"b{i}", "stage": s, "cin": 16 * s, "cout": 16 * s, "stride": 1, "skip": i not in off,
             "projection": False, "removed": False} for i, s in enumerate(stages)]


def _labels(fig: go.Figure) -> list[tuple[float, str]]:
    """(x as a fraction of the axis, text) of every block and stage label the figure writes."""
    lo, hi = fig.layout.xaxis.range
    out = [((a.x - lo) / (hi - lo), a.text) for a in fig.layout.annotations]
    for tr in fig.data:
        if tr.mode and "text" in tr.mode:
            out += [((x - lo) / (hi - lo), t) for x, t in zip(tr.x, tr.text) if t]
    return out


@pytest.mark.parametrize("stage_sizes", [[1, 1, 1], [5, 5, 5], [9, 9, 9], [3, 4, 6, 3], [18, 18, 18], [3, 8, 36, 3],
                                         [60, 60, 60]])
def test_architecture_labels_never_overlap_from_8_to_500_layers(stage_sizes):
    blocks = _blocks(stage_sizes, off=(1,))
    fig = plots.architecture_figure(blocks)
    renders(fig)
    hover = next(t for t in fig.data if t.name == "blocks").hovertext
    assert len(hover) == len(blocks) and "skip off" in hover[1]  # every block is still there to hover
    labels = _labels(fig)
    for row in (sorted((x, t) for x, t in labels if "stage" in t or t.isdigit() and len(blocks) > 30),
                sorted((x, t) for x, t in labels if "stage" not in t)):
        # at 500 px wide a label of up to 12 characters needs 1/12 of the width; two-line stage labels 1/5
        gaps = [b[0] - a[0] for a, b in zip(row, row[1:])]
        need = 1 / 5 if len(blocks) > plots.ARCH_MAX_BOXES else 1 / (plots.ARCH_MAX_LABELS + 1)
        assert all(g >= need * 0.99 for g in gaps), (stage_sizes, row)
    if len(blocks) > plots.ARCH_MAX_BOXES:  # stages collapsed: one box each, equal widths
        boxes = [s for s in fig.layout.shapes if s.type == "rect" and s.y0 == 0]
        assert len(boxes) == len(stage_sizes) and len({round(b.x1 - b.x0, 6) for b in boxes}) == 1
        cells = [s for s in fig.layout.shapes if s.type == "rect" and s.y0 > 0]
        assert len(cells) == len(blocks) and cells[1].fillcolor == plots.OFF_COLOR


def test_signal_prop_figure():
    res = {"mean_sq": [1.0, 1.1, 1.2, 1.3], "var": [1.0, 2.0, 3.0, 4.0]}
    plain = {"mean_sq": [1.0, 0.1, NAN, 0.0], "var": [1.0, INF, 0.01, -1.0]}
    fig = plots.signal_prop_figure(res, plain)
    renders(fig)
    assert len(fig.data) == 4
    plain_var = [t for t in fig.data if t.name == "plain" and t.xaxis == "x2"][0]
    assert list(plain_var.y) == [1.0, None, 0.01, None]  # Inf and a non-positive value on log axis -> gaps
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    assert {t.line.color for t in fig.data if t.name == "residual"} == {RESIDUAL_COLOR}
    assert len(plots.signal_prop_figure(res, None).data) == 2
    three = plots.signal_prop_figure(res | {"branch_var": np.array([0.5, 0.4, 0.3, 0.2])}, plain)
    renders(three)
    assert len(three.data) == 6 and three.layout.yaxis3.type == "log"
    assert [t.name for t in three.data if t.xaxis == "x3"] == ["residual", "plain"]
    titles = [a for a in three.layout.annotations]  # the panels are stacked: their titles never share a line
    assert len({round(a.y, 3) for a in titles}) == 3
    for empty in (plots.signal_prop_figure(None, None), plots.signal_prop_figure({}, {"mean_sq": []})):
        renders(empty)
        assert has_no_data_note(empty)


def test_a_flat_statistic_gets_a_two_decade_log_axis_not_a_0_99998_one():
    flat = {"mean_sq": [1.0, 1.0], "var": [0.99998, 0.99999], "branch_var": [0.999981, 0.999985]}
    fig = plots.signal_prop_figure(flat, {"mean_sq": [0.01, 100.0], "var": [1.0, 1.0]})
    lo, hi = fig.layout.yaxis3.range
    assert hi - lo == pytest.approx(2.0) and lo < 0 < hi  # 0.1 .. 10, labelled per decade
    assert list(fig.layout.yaxis3.ticktext) == ["0.1", "1"]  # the two-decade window around 0.99998
    lo, hi = fig.layout.yaxis.range
    assert lo <= -2 and hi >= 2  # the data's own four decades, padded
    assert list(fig.layout.yaxis.ticktext) == ["0.01", "0.1", "1", "10", "100"]
    assert plots.log_axis([]) == {"type": "log", "minor": {"showgrid": False}}
    wide = plots.log_axis([1e-12, 1e12])
    assert len(wide["ticktext"]) <= 7 and wide["ticktext"][:2] == ["10<sup>-10</sup>", "10<sup>-5</sup>"]  # one style: all powers
    assert plots.log_axis([0.5, 2e4])["ticktext"][-1] == "10,000"


def test_grad_norm_figure():
    fig = plots.grad_norm_figure([1e-3, 1e-2, NAN], {"stem": 0.5, "block 0": INF, "fc": 2.0})
    renders(fig)
    assert len(fig.data) == 2 and fig.layout.yaxis.type == "log"
    assert list(fig.data[0].y) == [1e-3, 1e-2, None]
    assert list(fig.data[1].x) == ["stem", "block 0", "fc"] and list(fig.data[1].y) == [0.5, None, 2.0]
    assert fig.data[1].line.color == PLAIN_COLOR
    assert has_no_data_note(plots.grad_norm_figure([], None))


def test_training_curves_figure():
    hist = {
        "residual": {"step": [0, 1, 2], "loss": [2.3, NAN, 1.5], "acc": [0.1, 0.2, 0.4],
                     "test_step": [2], "test_loss": [1.6], "test_acc": [0.35]},
        "plain": {"step": [0, 1, 2], "loss": [2.3, 2.2, INF], "acc": [0.1, 0.1, 0.15]},
    }
    fig = plots.training_curves_figure(hist)
    renders(fig)
    assert len(fig.data) == 8  # 2 nets x (loss, acc) x (train, test)
    res_loss = [t for t in fig.data if t.name == "residual train" and t.xaxis == "x"][0]
    assert list(res_loss.y) == [2.3, None, 1.5]
    assert {t.line.color for t in fig.data if t.name.startswith("plain")} == {PLAIN_COLOR}
    assert {t.line.dash for t in fig.data if "test" in t.name} == {"dash"}
    smoothed = plots.training_curves_figure(hist, smoothing=0.6)
    assert len(smoothed.data) == 12  # each train curve gets its raw copy, faint, behind it
    raw = [t for t in smoothed.data if t.name == "residual train (raw)" and t.xaxis == "x"][0]
    assert list(raw.y) == [2.3, None, 1.5] and raw.opacity == 0.25
    sm = [t for t in smoothed.data if t.name == "residual train" and t.xaxis == "x"][0]
    assert sm.y[0] == pytest.approx(2.3) and sm.y[1] is None and 1.5 < sm.y[2] < 2.3  # debiased EMA
    for empty in (plots.training_curves_figure({}), plots.training_curves_figure({"residual": {}})):
        renders(empty)
        assert has_no_data_note(empty)


def test_grad_flow_heatmap():
    norms = np.array([[1.0, 10.0, NAN], [0.01, 0.0, 100.0]])
    fig = plots.grad_flow_heatmap([0, 10, 20], ["stem", "fc"], norms)
    renders(fig)
    (hm,) = fig.data
    assert list(hm.z[0][:2]) == [0.0, 1.0] and hm.z[0][2] is None and hm.z[1][1] is None  # log10; 0 -> gap
    assert hm.customdata[1][2] == 100.0
    assert list(hm.colorbar.ticktext) == [f"10<sup>{k}</sup>" for k in range(-2, 3)]
    narrow = plots.grad_flow_heatmap([0, 1], ["b0"], np.array([[0.3, 0.9]]))  # within one decade
    assert list(narrow.data[0].colorbar.ticktext) == ["0.5"]  # 10^0 is outside: 1-2-5 ticks instead
    assert list(plots.grad_flow_heatmap([0, 1], ["b0"], np.array([[0.15, 0.9]])).data[0].colorbar.ticktext) == ["0.2", "0.5"]
    empty = plots.grad_flow_heatmap([], [], [])
    renders(empty)
    assert has_no_data_note(empty) and not empty.data


def test_ratio_figure():
    ratios = np.array([[0.1, 1.0], [0.2, NAN], [0.3, 2.0]])
    fig = plots.ratio_figure([0, 1, 2], ratios, block_names=["b0", "b1"])
    renders(fig)
    (hm,) = fig.data  # one heatmap however many blocks: rows are blocks, columns steps
    assert list(hm.y) == ["b0", "b1"] and list(hm.x) == [0, 1, 2]
    assert list(hm.customdata[1]) == [1.0, None, 2.0]  # the ratio itself, for the hover
    assert hm.z[1][0] == 0.0 and hm.z[1][1] is None and abs(hm.z[1][2] - math.log10(2.0)) < 1e-3  # log10 colours
    wide = plots.ratio_figure(list(range(10)), np.ones((10, 54)))
    assert len(wide.data) == 1 and len(wide.data[0].y) == 54
    assert has_no_data_note(plots.ratio_figure([], np.zeros((0, 3))))
    renders(plots.ratio_figure([], []))


def test_feature_grid():
    maps = np.random.default_rng(0).normal(size=(20, 4, 4))
    maps[0, 0, 0] = NAN
    fig = plots.feature_grid(maps, "block 1", max_maps=6, channels=[3, 5, 7, 9, 11, 13])
    renders(fig)
    (hm,) = fig.data  # one mosaic: 3 x 2 tiles of 4 x 4 with a one-pixel gap
    assert fig.layout.title.text == "block 1" and np.asarray(hm.z, dtype=float).shape == (9, 14)
    assert [a.text for a in fig.layout.annotations] == [f"ch {c}" for c in (3, 5, 7, 9, 11, 13)]
    assert np.isnan(hm.z[0][0]) and np.isnan(hm.z[0][4])  # the NaN and the gap between tiles
    tile = np.asarray(hm.z, dtype=float)[0:4, 5:9]  # channel 5: its own grey scale, 0 to 1
    assert np.nanmin(tile) == 0.0 and np.nanmax(tile) == 1.0
    assert list(hm.customdata[2][6]) == [pytest.approx(maps[1, 2, 1]), 5, 1, 2]  # value, channel, pixel x, pixel y
    assert isinstance(hm.z, np.ndarray) and isinstance(hm.customdata, np.ndarray)  # one typed buffer each, not lists
    rows = _rows(plots.figure_to_csv(fig))
    assert len(rows) == 6 * 16 - 1  # every pixel with a value, none of the gaps
    assert [float(r["z"]) for r in rows if r["text"] == "5 1 2"] == [pytest.approx(maps[1, 2, 1])]  # channel, x, y
    assert len(plots.feature_grid(maps[:3]).layout.annotations) == 3
    for empty in (plots.feature_grid(np.zeros((0, 4, 4))), plots.feature_grid([])):
        renders(empty)
        assert has_no_data_note(empty)


def test_magnitude_bars():
    fig = plots.magnitude_bars([1.0, NAN, 3.0], [2.0, 2.0, INF], labels=["a", "b", "c"])
    renders(fig)
    assert [t.type for t in fig.data] == ["bar", "bar"]
    assert list(fig.data[0].y) == [1.0, None, 3.0] and list(fig.data[1].x) == ["a", "b", "c"]
    assert has_no_data_note(plots.magnitude_bars([], []))


def test_topk_bars():
    names = ["cat", "dog", "ship", "frog"]
    fig = plots.topk_bars(names, [0.1, 0.6, NAN, 0.3], compare_probs=[0.5, 0.2, 0.2, 0.1], k=2)
    renders(fig)
    assert len(fig.data) == 2
    assert list(fig.data[0].y) == ["dog", "frog"] and list(fig.data[0].x) == [0.6, 0.3]
    assert list(fig.data[1].x) == [0.2, 0.1]  # the intact net's probability for the same classes
    assert len(plots.topk_bars(names, [0.25] * 4).data) == 1
    assert has_no_data_note(plots.topk_bars([], []))


def test_attribution_overlay():
    image = np.random.default_rng(1).random((8, 8, 3))
    image[0, 0, 0] = NAN
    heat = np.zeros((4, 4))
    heat[1, 1], heat[3, 3] = 1.0, INF
    fig = plots.attribution_overlay(image, heat, opacity=0.4)
    data = renders(fig)
    assert [t.type for t in fig.data] == ["image", "heatmap"]
    assert fig.data[1].dx == 2.0 and fig.data[1].opacity == 0.4  # a 4x4 map stretched over 8x8 pixels
    assert fig.data[1].z[3][3] is None
    assert np.asarray(fig.data[0].z).shape == (8, 8, 3) and data["data"][0]["type"] == "image"
    assert len(plots.attribution_overlay(image[..., 0], np.ones((8, 8))).data) == 2  # grey image
    assert len(plots.attribution_overlay(None, heat).data) == 1
    assert has_no_data_note(plots.attribution_overlay(None, []))


def test_lesion_figure():
    fig = plots.lesion_figure(["b0", "b1", "b2"], {"residual": [0.8, 0.85, NAN], "plain": [0.1, 0.12, 0.1]},
                              intact={"residual": 0.9, "plain": NAN})
    renders(fig)
    assert [t.name for t in fig.data] == ["residual", "plain", "residual intact: 90.0%"]  # the line's value in the legend
    assert list(fig.data[0].y) == [0.8, 0.85, None]
    assert len(fig.layout.shapes) == 1 and not fig.layout.annotations  # the NaN intact line is not drawn; no label on it
    assert has_no_data_note(plots.lesion_figure([], {}))
    with_chance = plots.lesion_figure(["b0"], {"plain": [0.1]}, intact={"plain": 0.5}, chance=0.125)
    assert [t.name for t in with_chance.data] == ["plain", "plain intact: 50.0%", "chance: 12.5%"]
    assert [s.y0 for s in with_chance.layout.shapes] == [0.5, 0.125]


def test_loss_landscape_figure():
    surface = np.array([[1.0, 2.0, 4.0], [0.5, NAN, 8.0]])
    fig = plots.loss_landscape_figure(surface, alphas=[-1, 0, 1], betas=[-1, 1])
    renders(fig)
    assert [t.type for t in fig.data] == ["surface", "contour"]
    assert fig.data[0].z[1][1] is None and fig.data[0].z[0][1] == pytest.approx(math.log10(2))
    lin = plots.loss_landscape_figure(surface, log=False)
    assert lin.data[1].z[1][2] == 8.0
    for empty in (plots.loss_landscape_figure([]), plots.loss_landscape_figure(np.full((2, 2), NAN))):
        renders(empty)
        assert has_no_data_note(empty)


def test_curvature_maps_figure():
    maps = {"residual": [[0.0, 0.5], [NAN, 1.0]], "plain": [[0.2, 0.1], [0.3, 0.4]]}
    fig = plots.curvature_maps_figure(maps, alphas=[-1, 1])
    renders(fig)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"] and [t.name for t in fig.data] == ["residual", "plain"]
    assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax == 1  # one fixed scale: 0 convex, 1 non-convex
    assert fig.data[0].z[1][0] is None and fig.data[0].text[1][0] == "" and fig.data[0].text[0][1] == "0.50"
    assert list(fig.data[1].x) == [-1, 1]
    for empty in (plots.curvature_maps_figure({}), plots.curvature_maps_figure({"plain": []})):
        renders(empty)
        assert has_no_data_note(empty)


def test_every_builder_uses_the_one_theme():
    import plotly.io as pio

    assert pio.templates["resviz"] == plots.TEMPLATE
    figs = [plots.architecture_figure(BLOCKS), plots.signal_prop_figure({"mean_sq": [1.0], "var": [1.0]}, None),
            plots.grad_norm_figure([1.0], [2.0]), plots.training_curves_figure({"residual": {"step": [0], "loss": [1.0]}}),
            plots.ratio_figure([0], [[1.0]]), plots.magnitude_bars([1.0], [2.0]), plots.topk_bars(["a"], [1.0]),
            plots.lesion_figure(["b0"], {"residual": [0.5]}), plots.loss_landscape_figure([[1.0, 2.0], [3.0, 4.0]]),
            plots.curvature_maps_figure({"plain": [[0.1]]}),
            plots.block_diagram_figure(), plots.deletion_curve_figure([0], {"plain": [0.5]}), plots.merge_strip([]),
            plots.feature_grid(np.ones((1, 2, 2))), plots.attribution_overlay(np.ones((2, 2, 3)), np.ones((2, 2)))]
    for fig in figs:
        assert fig.layout.template.layout.font.family == plots.TEMPLATE.layout.font.family, fig.layout.title.text
        assert fig.layout.template.layout.legend.x > 1  # legends sit outside the plot area
    res, plain = plots.grad_norm_figure([1.0], [2.0]).data
    assert res.line.color == "#0072B2" and plain.line.color == "#D55E00"  # Okabe-Ito blue and vermillion


def _rows(text: str) -> list[dict]:
    import csv
    import io

    return list(csv.DictReader(io.StringIO(text)))


def test_figure_to_csv_has_every_point_of_every_trace():
    fig = plots.training_curves_figure({"residual": {"step": [0, 1], "loss": [2.0, NAN], "acc": [0.1, 0.2]},
                                        "plain": {"step": [0, 1], "loss": [2.1, 2.0], "acc": [0.1, 0.1]}})
    rows = _rows(plots.figure_to_csv(fig))
    assert list(rows[0]) == list(plots.CSV_COLUMNS)
    res_loss = [r for r in rows if r["trace"] == "residual train" and r["y"] != "" and float(r["y"]) > 1]
    assert [(r["x"], r["y"]) for r in res_loss] == [("0", "2")]
    gap = [r for r in rows if r["trace"] == "residual train" and r["x"] == "1"]
    assert sorted(r["y"] for r in gap) == ["", "0.2"]  # the NaN loss is an empty cell, the accuracy is there
    assert len(rows) == 8  # 2 nets x 2 panels x 2 steps (no test points, no legend-only rows)


def test_figure_to_csv_writes_the_measured_value_of_a_log_coloured_heatmap():
    fig = plots.ratio_figure([0, 10], np.array([[0.1, 1.0], [0.2, 30.0]]), block_names=["b0", "b1"])
    rows = _rows(plots.figure_to_csv(fig))
    cells = {(r["x"], r["y"]): float(r["z"]) for r in rows}
    assert cells == {("0", "b0"): 0.1, ("10", "b0"): 0.2, ("0", "b1"): 1.0, ("10", "b1"): 30.0}


def test_figure_to_csv_panels_and_what_it_leaves_out():
    sig = plots.signal_prop_figure({"mean_sq": [1.0, 2.0], "var": [3.0, 4.0]}, None)
    panels = {r["panel"] for r in _rows(plots.figure_to_csv(sig))}
    assert panels == {"squared channel mean", "channel variance"}
    arch = _rows(plots.figure_to_csv(plots.architecture_figure(BLOCKS)))
    assert len(arch) == len(BLOCKS) and "REMOVED" in arch[2]["text"]  # one row per block, not the drawn path
    overlay = _rows(plots.figure_to_csv(plots.attribution_overlay(np.ones((4, 4, 3)), np.eye(2))))
    assert len(overlay) == 4 and {r["trace"] for r in overlay} == {"trace 1"}  # the heatmap, not the image's pixels
    assert plots.figure_to_csv(go.Figure()) == ",".join(plots.CSV_COLUMNS) + "\n"


def test_loss_contours_share_one_colour_scale():
    res, plain = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[10.0, NAN], [100.0, 1000.0]])
    fig = plots.loss_contours_figure({"residual": res, "plain": plain}, alphas=[-1, 1], betas=[-1, 1])
    renders(fig)
    assert [t.type for t in fig.data] == ["contour", "contour"] and {t.coloraxis for t in fig.data} == {"coloraxis"}
    assert fig.layout.coloraxis.cmin == 0.0 and fig.layout.coloraxis.cmax == 3.0  # log10 over both nets
    assert [a.text for a in fig.layout.annotations] == ["residual", "plain"]
    assert fig.layout.annotations[1].font.color == PLAIN_COLOR
    assert has_no_data_note(plots.loss_contours_figure({"residual": []}))
