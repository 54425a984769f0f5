"""Inspect page: one image through one net: predictions, F(x) and S(x) per block, attributions, lesions."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import streamlit as st
import torch
from torch import nn

from app_pages import pickers, state
from app_pages.charts import show_chart
from resviz import ResNet, anymodel, plots, zoo
from resviz.analysis.inspection import (
    CHANNEL_ORDERS,
    Heatmap,
    Inspection,
    Lesion,
    compare,
    explain,
    inspect_image,
    predict,
    removal_effects,
    top_k,
)
from resviz.nn.merge import merges
from resviz.zoo import ModelInfo

METHODS = {"gradcam": "Grad-CAM", "saliency": "Saliency", "integrated_gradients": "Integrated Gradients", "occlusion": "Occlusion"}
COSTLY = ("integrated_gradients", "occlusion")  # many forward passes: computed only when asked
TOP_K = 5
TABS = ("Branch vs shortcut", "Attribution", "Remove one block")
_RESULTS = "i_results"  # session store of costly results (attributions, lesion sweeps)


# -- cached computations ---------------------------------------------------------------------
@st.cache_data(max_entries=64, show_spinner=False)
def _inspect(model_key: str, image_key: str, skips: tuple | None, removed: tuple, view: tuple, _net: nn.Module,
             _x: torch.Tensor, _classes: tuple[str, ...]) -> Inspection:
    block, channels, order, start = view
    return inspect_image(_net, _x, classes=_classes, lesion=Lesion(skips=skips, removed=removed), k=TOP_K, block=block,
                         channels=channels, channel_order=order, channel_start=start)


# -- lesion and view controls -------------------------------------------------------------------
def _block_label(net: nn.Module, i: int) -> str:
    if isinstance(net, ResNet):
        return f"block {i} (stage {net.stage_of[i] + 1}, {net.blocks[i].cout} ch)"
    rmap = getattr(net, "residual_map", None)
    return anymodel.merge_label(rmap[i]) if rmap is not None else f"block {i}"


def _channels(net: nn.Module, i: int) -> int:
    """Channels of block ``i``'s maps."""
    if isinstance(net, ResNet):
        return net.blocks[i].cout
    rmap = getattr(net, "residual_map", None)
    return anymodel.merge_channels(rmap[i]) if rmap is not None else 1


def _tag(model_key: str) -> str:
    return hashlib.sha1(model_key.encode()).hexdigest()[:10]


def grouped_lesion_widgets(net: nn.Module, model_key: str) -> Lesion:
    """Skip and remove switches for a discovered model, one row per group of merges (a stage or one
    resolution): an all-off switch and two multiselects each, so 50 merges stay a few rows."""
    rmap, tag = net.residual_map, _tag(model_key)
    groups = anymodel.merge_groups(rmap)
    label = lambda i: anymodel.merge_label(rmap[i])  # noqa: E731
    st.caption(f"{len(rmap)} skip connections in {len(groups)} groups (consecutive merges of one shape). Skip off: "
               "y = F(x) from there on; removed: y = S(x). Nothing is retrained.")
    off, removed = set(), set()
    box = st.container(height=420) if len(groups) > 6 else st.container()
    for g, (name, idx) in enumerate(groups):
        c0, c1, c2 = box.columns([2, 4, 4], vertical_alignment="bottom")
        short = name.split(" (")[0]
        all_off = c0.checkbox(f"All off ({short})", key=f"i_gall_{tag}_{g}", help=f"Every skip of {name} off")
        picked = c1.multiselect(f"Skip connection off: {name}", idx, format_func=label, key=f"i_goff_{tag}_{g}",
                                disabled=all_off)
        gone = c2.multiselect(f"Block removed: {name}", idx, format_func=label, key=f"i_grm_{tag}_{g}")
        off |= set(idx) if all_off else set(picked)
        removed |= set(gone)
    return Lesion(skips=tuple(i not in off for i in range(len(rmap))), removed=tuple(sorted(removed)))


def lesion_widgets(net: nn.Module, model_key: str) -> Lesion:
    """Per-block skip and remove switches, applied at inference; keys are per model."""
    if not isinstance(net, ResNet):
        return grouped_lesion_widgets(net, model_key)
    tag = _tag(model_key)
    n, label = len(net.blocks), (lambda i: _block_label(net, i))
    skip_key, removed_key = f"i_skip_off_{tag}", f"i_removed_{tag}"
    state.widget_default(skip_key, [i for i, s in enumerate(net.skips) if not s])
    c1, c2 = st.columns(2)
    off = c1.multiselect("Skip connection off (plain block)", range(n), format_func=label, key=skip_key,
                         help="y = post(F(x)): the block loses its shortcut. Nothing is retrained.")
    removed = c2.multiselect("Block removed (branch F dropped)", range(n), format_func=label, key=removed_key,
                             help="y = post(S(x)): the block passes its input through its shortcut only.")
    return Lesion(skips=tuple(i not in off for i in range(n)), removed=tuple(removed))


def view_widgets(net: nn.Module) -> tuple[int, int, str, int]:
    """(block, channel count, channel order, first channel) of the feature maps to show."""
    c1, c2, c3, c4 = st.columns([3, 2, 2, 2])
    n = len(merges(net))
    block = c1.selectbox("Block", range(n), format_func=lambda i: _block_label(net, i), key="i_block")
    block = min(int(block), n - 1)
    total = _channels(net, block)
    order = c2.radio("Channels", CHANNEL_ORDERS, format_func={"index": "by index", "strongest": "strongest"}.get,
                     key="i_order", horizontal=True)
    count = c3.slider("How many", 1, min(32, total), min(8, total), key=f"i_count_{total}")
    start = c4.number_input("First channel", 0, total - 1, 0, key=f"i_start_{total}", disabled=order != "index")
    return block, int(count), order, int(start)


# -- display --------------------------------------------------------------------------------------
def show_predictions(info: ModelInfo, intact: Inspection, shown: Inspection, lesioned: bool) -> None:
    """Top-k of the (possibly lesioned) net, beside the intact net's when a lesion is on."""
    if not lesioned:
        show_chart(plots.topk_bars(info.classes, shown.probs, k=TOP_K), "i_topk")
        st.dataframe({"class": [p.label for p in shown.top], "probability": [round(p.prob, 4) for p in shown.top]},
                     hide_index=True, key="i_topk_table")
        return
    c = compare(intact.probs, shown.probs, info.classes, k=TOP_K)
    show_chart(plots.topk_bars(info.classes, shown.probs, intact.probs, k=TOP_K, names=("modified", "intact")), "i_topk")
    m1, m2 = st.columns(2)  # two to a row: in half the page, three cut their labels and values off
    m3, _ = st.columns(2)
    m1.metric("Top-1", shown.top[0].label, "same as intact" if c.top1_agree else f"intact: {intact.top[0].label}",
              delta_color="off" if c.top1_agree else "inverse")
    m2.metric(f"p({intact.top[0].label})", f"{shown.probs[intact.top[0].index]:.1%}", f"{c.delta_conf:+.1%}")
    m3.metric("KL divergence, nats", f"{c.kl:.3f}", f"top-{TOP_K} overlap {c.topk_overlap:.0%}", delta_color="off",
              help="KL(intact || modified): how far the modified net's class probabilities moved from the intact net's.")
    st.dataframe({"class": [r[1] for r in c.rows], "probability": [round(r[3], 4) for r in c.rows],
                  "intact": [round(r[2], 4) for r in c.rows]}, hide_index=True, key="i_topk_table")


def _grid(maps: np.ndarray | None, channels: tuple[int, ...], title: str, missing: str, key: str) -> None:
    if maps is None:
        st.info(missing)
        return
    fig = plots.feature_grid(maps, title=title, max_maps=len(channels), channels=channels)
    show_chart(fig, key)


def show_maps(shown: Inspection) -> None:
    m = shown.maps
    if m is None or m.sum.ndim != 3:
        st.info("This merge's maps are not images (channels x height x width): see the magnitudes below.")
        return
    st.caption(f"Block {m.block}: {len(m.channels)} of {m.total_channels} channels, each with its own grey scale.")
    c1, c2, c3 = st.columns(3)
    with c1:
        _grid(m.f, m.channels, "F(x), residual branch", "The block is removed: F(x) is not computed.", "i_map_f")
    with c2:
        _grid(m.s, m.channels, "S(x), shortcut", "The skip connection is off: S(x) is absent.", "i_map_s")
    with c3:
        _grid(m.sum, m.channels, "F(x) + S(x)", "", "i_map_sum")


def show_magnitudes(ctx: dict[str, Any], shown: Inspection) -> None:
    labels = [f"{i}" for i in range(len(shown.f_norm))]
    show_chart(plots.magnitude_bars(shown.f_norm, shown.s_norm, labels=labels), "i_mags")
    ratio, intact = _median_ratio(shown), ctx.get("intact")
    if np.isfinite(ratio):
        st.caption(f"Median ||F(x)|| / ||S(x)||: {ratio:.2f}. Below 1, a block makes a small correction "
                   "to what the shortcut carries; a plain block has no shortcut (S = 0).")
    if intact is not None and intact is not shown and np.isfinite(_median_ratio(intact)):
        st.caption(f"Intact model: median ||F(x)|| / ||S(x)|| {_median_ratio(intact):.2f}.")


def _median_ratio(insp: Inspection) -> float:
    ratio = np.divide(insp.f_norm, insp.s_norm, out=np.full_like(insp.f_norm, np.nan), where=insp.s_norm > 0)
    return float(np.nanmedian(ratio)) if np.isfinite(ratio).any() else float("nan")


def _results() -> dict[tuple, Any]:
    return st.session_state.setdefault(_RESULTS, {})


def _remember(key: tuple, value: Any, keep: int = 16) -> None:
    """Keep a costly result for this session (the newest ``keep`` of them)."""
    store = _results()
    store.pop(key, None)
    store[key] = value
    while len(store) > keep:
        store.pop(next(iter(store)))


@st.cache_data(max_entries=32, show_spinner="Computing the attribution...")
def _explain(model_key: str, image_key: str, skips: tuple | None, removed: tuple, method: str, target: int,
             block: int | None, _net: nn.Module, _x: torch.Tensor) -> Heatmap:
    return explain(_net, _x, method, lesion=Lesion(skips=skips, removed=removed), target=target, block=block)


def show_attribution(ctx: dict[str, Any], shown: Inspection) -> None:
    """Captum maps over the image; cheap methods at once, costly ones when asked (then kept)."""
    net, info, lesion = ctx["net"], ctx["info"], ctx["lesion"]
    c1, c2, c3 = st.columns(3)
    n = len(merges(net))
    methods = [m for m in METHODS if n or m != "gradcam"]  # Grad-CAM looks at a merge
    if st.session_state.get("i_method") not in (None, *methods):
        del st.session_state["i_method"]
    method = c1.selectbox("Method", methods, format_func=METHODS.get, key="i_method")
    targets = [p.index for p in shown.top]
    target = c2.selectbox("Explain class", targets, format_func=lambda i: info.classes[i], key="i_target")
    block = c3.selectbox("Grad-CAM block", range(n), index=max(0, n - 1), format_func=lambda i: _block_label(net, i),
                         key="i_cam_block", disabled=method != "gradcam") if n else None
    target = target if target in targets else targets[0]
    args = (ctx["model_key"], ctx["image_key"], lesion.skips, lesion.removed, method, int(target),
            None if block is None else int(block))
    store = _results()
    asked = method not in COSTLY or args in store
    if not asked and not st.button(f"Compute {METHODS[method]}", key="i_attr_go", help="Many forward passes: may take a while."):
        return
    _remember(args, _explain(*args, net, ctx["x"]))
    _show_heatmap(store[args], ctx["picture"], info)


def _show_heatmap(h: Heatmap, picture: np.ndarray, info: ModelInfo) -> None:
    title = f"{METHODS[h.method]} for {info.classes[h.target]}"
    show_chart(plots.attribution_overlay(picture, h.heatmap, title=title), "i_attr")
    if h.delta is not None:
        st.caption(f"Integrated Gradients completeness error: {h.delta:.2e} (near 0 means the path integral converged).")


def show_removal_sweep(ctx: dict[str, Any], shown: Inspection) -> None:
    """Remove each block in turn (on top of the current lesion) and plot the top class's probability."""
    net, lesion, top = ctx["net"], ctx["lesion"], shown.top[0]
    st.caption("Veit et al. (2016): a residual net barely notices losing one block, a plain net falls apart. "
               f"Each bar is p({top.label}) with that block also removed.")
    args = ("sweep", ctx["model_key"], ctx["image_key"], lesion.skips, lesion.removed)
    store = _results()
    n = len(merges(net))
    if args not in store:
        if not st.button(f"Remove each of the {n} blocks in turn", key="i_sweep_go"):
            return
        _remember(args, removal_effects(net, ctx["x"], lesion, target=top.index))
    labels = [str(i) for i in range(n)]
    fig = plots.lesion_figure(labels, {f"p({top.label})": store[args]}, intact={"current net": top.prob})
    fig.update_layout(title=f"p({top.label}) with one more block removed", yaxis_title="probability")
    show_chart(fig, "i_sweep")


# -- page -----------------------------------------------------------------------------------------
def _show_image(ctx: dict[str, Any], caption: str) -> None:
    info = ctx["info"]
    st.image(ctx["picture"], width=min(320, max(160, 4 * info.input_size)))
    st.caption(f"{caption}, as the net sees it ({info.input_size}x{info.input_size}, after preprocessing)")


@st.cache_data(max_entries=32, show_spinner=False)
def _predict(model_key: str, image_key: str, _net: nn.Module, _x: torch.Tensor, _classes: tuple[str, ...]) -> Inspection:
    probs = predict(_net, _x[0] if _x.dim() == 4 else _x)  # (K,)
    return Inspection(probs, top_k(probs, _classes, TOP_K), np.zeros(0), np.zeros(0), None)


def render_without_merges(ctx: dict[str, Any], caption: str, right: Any) -> None:
    """A model with no residual merge: its predictions and the attributions that need no merge."""
    st.info("No skip connections found, so there is nothing to switch off or remove; this is the plain model as it is.")
    shown = _predict(ctx["model_key"], ctx["image_key"], ctx["net"], ctx["x"], ctx["info"].classes)
    with right:
        _show_image(ctx, caption)
        show_predictions(ctx["info"], shown, shown, False)
    ctx["lesion"] = Lesion()
    st.subheader("Attribution")
    with state.guard("Attribution"):
        show_attribution(ctx, shown)


def _show_strip(net: nn.Module, lesion: Lesion) -> None:
    """The discovered merges with the current switches, for a model that is not a ResViz net."""
    rows = anymodel.merge_rows(net.residual_map, lesion.skips, lesion.removed)
    show_chart(plots.merge_strip(rows), "i_strip")


def render() -> None:
    st.title("Inspect")
    st.caption("Run one image through a net and look inside every block: the residual branch F(x), the shortcut "
               "S(x) and their sum. Switch skips off or remove blocks to see what each part contributes.")
    left, right = st.columns([1, 1])
    with left:
        model = pickers.choose_model()
        picked = pickers.choose_image(model[2]) if model is not None else None
    if model is None or picked is None:
        return
    (model_key, net, info), (x, caption) = model, picked
    ctx = {"model_key": model_key, "net": net, "info": info, "x": x, "picture": zoo.as_picture(x, info),
           "image_key": hashlib.sha1(x.numpy().tobytes()).hexdigest()}
    if not merges(net):
        render_without_merges(ctx, caption, right)
        return
    st.subheader("Lesions")
    ctx["lesion"] = lesion = lesion_widgets(net, model_key)
    if not isinstance(net, ResNet):
        _show_strip(net, lesion)
    st.subheader("Feature maps")
    view = view_widgets(net)
    intact = _inspect(model_key, ctx["image_key"], None, (), view, net, x, info.classes)
    changed = not lesion.is_intact(net)
    shown = _inspect(model_key, ctx["image_key"], lesion.skips, lesion.removed, view, net, x, info.classes) if changed else intact
    ctx["intact"] = intact
    with right:
        _show_image(ctx, caption)
        if changed:
            st.caption(f"Modified net: {lesion.describe(net)}")
        for problem in dict.fromkeys(p for p in (shown.problem, intact.problem) if p):
            st.error(f"Not every number here is finite: {problem}.")
        show_predictions(info, intact, shown, changed)
    show_maps(shown)
    # Lazy tabs: only the open one runs, so attributions cost nothing until someone looks at them.
    sections = {TABS[0]: show_magnitudes, TABS[1]: show_attribution, TABS[2]: show_removal_sweep}
    for tab, (title, show) in zip(st.tabs(TABS, key="i_tab", on_change="rerun"), sections.items(), strict=True):
        if tab.open:
            with tab, state.guard(title):
                show(ctx, shown)
