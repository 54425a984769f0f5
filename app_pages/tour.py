"""The guided tour, the landing page: why residual networks work, in six short steps.

Each step says what to look at, shows one picture measured from a real model (the shipped ResNet-32
and its plain twin, the study zoo's ResNet-56 pair, nets at initialisation, or the studies' stored
results) and offers one control. The step lives in the URL (``?step=3``), so every step has its own link.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import streamlit as st
import torch

from app_pages import state
from app_pages.charts import show_chart
from resviz import plots, zoo
from resviz.analysis.inspection import Lesion, inspect_image
from resviz.experiments.runner import study_figures
from resviz.experiments.stored import command, load_stored
from resviz.experiments.tour import DELETION_TWINS, TWINS, gradient_norms_at_init, lesion_curve, stored_result

STEPS = ("The block", "Degradation", "Why: gradients", "Ensembles", "Loss landscapes", "Your turn")
LESION_IMAGES = 256  # test images per accuracy in the deletion step: about a second for all k on a laptop CPU


@st.cache_resource(show_spinner=False)
def _twins(names: tuple[str, str] = TWINS) -> dict[str, tuple]:
    """A shipped residual net and its plain twin with their infos, loaded once per server (read-only); empty when
    either is missing."""
    by_name = {m.name: m for m in zoo.shipped_models()}
    if not all(n in by_name for n in names):
        return {}
    return {("residual" if "resnet" in n else "plain"): zoo.load_shipped(by_name[n]) for n in names}


@st.cache_data(show_spinner=False)
def _samples(names: tuple[str, str] = TWINS) -> tuple[np.ndarray, np.ndarray]:
    _net, info = _twins(names)["residual"]
    data = zoo.dataset_samples(info, LESION_IMAGES)
    x, y = data.tensors
    return x[:LESION_IMAGES].numpy(), y[:LESION_IMAGES].numpy()


def _deletion_pair() -> tuple[str, str]:
    """The zoo's converged ResNet-56 pair when it is shipped, else the ResNet-32 pair."""
    return DELETION_TWINS if _twins(DELETION_TWINS) else TWINS


@st.cache_data(show_spinner=False)
def _deletions(max_k: int, names: tuple[str, str]) -> tuple[tuple[int, ...], dict[str, tuple[float, ...]]]:
    x, y = (torch.from_numpy(a) for a in _samples(names))
    nets = {name: net for name, (net, _info) in _twins(names).items()}
    curve = lesion_curve(nets, x, y, tuple(range(max_k + 1)))
    return curve.ks, curve.accuracy


@st.cache_data(show_spinner=False)
def _init_grads(depth: int) -> dict[str, np.ndarray]:
    return gradient_norms_at_init(depth)


@st.cache_resource(show_spinner=False)
def _stored_figures(name: str, study: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A study's stored result and its figures, read and built once per server (shared, read-only): its result on
    the converged zoo (``pretrained/studies/``) when there is one, else the docs' stored run ``name``."""
    result = load_stored(study) or stored_result(name)
    return None if result is None else (result, study_figures(result))


def _stored_or_note(name: str, study: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    found = _stored_figures(name, study)
    if found is None:
        st.info(f"The stored {study} results are not here; `python pretrained/make_pretrained.py --studies {study}` "
                "makes them.")
    return found


def _where(result: dict[str, Any]) -> str:
    """Where a stored result's nets came from, for a caption."""
    if result["config"].get("budget") == "zoo":
        return f"the converged zoo ({result.get('source', 'pretrained')}); `{command(result['study'])}` recomputes it"
    cfg = result["config"]
    return f"`python -m resviz study {result['study']}`, {cfg.get('budget')} budget, seed {cfg.get('seed')}"


def _step_block() -> None:
    st.markdown("A residual block adds its input back: **y = act(F(x) + S(x))**. F, the *residual* branch, "
                "only has to learn a change to x; S is the identity (or a projection when the shape changes). "
                "Switch the shortcut off and the same block becomes a plain layer, y = act(F(x)).")
    skip = st.toggle("Shortcut on", value=True, key="tour_skip")
    net, info = _twins()["residual"]
    x, _y = _samples()
    n_blocks = len(net.blocks)
    lesion = Lesion(skips=(True,) * n_blocks if skip else tuple(i != 3 for i in range(n_blocks)))
    result = inspect_image(net, torch.from_numpy(x[0]), classes=info.classes, lesion=lesion, block=None)
    norms = {"F": float(result.f_norm[3]), "S": float(result.s_norm[3]) if skip else float("nan")}
    show_chart(plots.block_diagram_figure(skip, norms=norms), "tour_block", csv=False)  # a drawing
    label, prob = result.top[0].label, result.top[0].prob
    st.caption(f"Measured on block 4 of the shipped ResNet-32 for one test image: the net says **{label}** "
               f"({prob:.0%}) with this shortcut {'on' if skip else 'off'}.")


def _step_degradation() -> None:
    st.markdown("He et al. (2016) found that a deeper *plain* net trains **worse** than a shallower one, although it "
                "could copy it and add identity layers. With skip connections, deeper nets train as well or better. "
                "Darker lines are deeper nets.")
    found = _stored_or_note("degradation", "degradation")
    if found is None:
        return
    result, figs = found
    which = st.segmented_control("Show", ["training curves", "error by depth"], default="training curves", key="tour_deg")
    show_chart(figs["training_curves" if which != "error by depth" else "error_by_depth"], "tour_deg_fig")
    st.caption(f"Stored result: {_where(result)}.")


def _step_gradients() -> None:
    st.markdown("Why: at initialisation the gradient that reaches the early blocks of a deep plain net is "
                "out of scale: with batch norm after each convolution it grows with every layer it passes back "
                "through (other designs make it vanish). The shortcuts of a residual net keep it within a small "
                "factor from end to end. Pick a depth and compare the two lines at the input end.")
    depth = st.select_slider("Depth", [8, 20, 32, 56, 110], value=56, key="tour_depth")
    grads = _init_grads(int(depth))
    show_chart(plots.grad_norm_figure(grads["residual"], grads["plain"]), "tour_grad_fig")
    st.caption("Measured now on freshly initialised nets (width 8, 16x16 random inputs, same weights for both).")


def _step_ensembles() -> None:
    names = _deletion_pair()
    depth = _twins(names)["residual"][0].cfg.depth
    st.markdown(f"Veit et al. (2016): a residual net behaves like an ensemble of many shorter paths, so it "
                f"survives losing blocks: the trained ResNet-{depth} loses accuracy step by step as blocks go. Its "
                "plain twin, trained on the same batches, has one path only: it drops to about chance (12.5%) at the "
                "first deletion.")
    k = st.slider("Blocks deleted at random", 1, 6, 3, key="tour_k")
    ks, acc = _deletions(6, names)
    named = {f"ResNet-{depth}": acc["residual"], f"plain-{depth}": acc["plain"]}
    show_chart(plots.deletion_curve_figure(ks[: k + 1], {n: a[: k + 1] for n, a in named.items()}, chance=1 / 8),
               "tour_del_fig")
    st.caption(f"Shipped ResNet-{depth} and plain-{depth} on {LESION_IMAGES} `shapes` test images; the same random "
               f"blocks for both nets, mean of 3 draws per k. One block deleted: ResNet-{depth} "
               f"{acc['residual'][1]:.0%} (intact {acc['residual'][0]:.0%}), plain-{depth} {acc['plain'][1]:.0%} "
               f"(intact {acc['plain'][0]:.0%}).")


LANDSCAPE_VIEWS = ("both, from above", "3-D: residual", "3-D: plain")


def _step_landscape() -> None:
    st.markdown("Li et al. (2018): around the trained weights, the loss of a residual net is a smooth bowl; "
                "the plain net's is rough and chaotic, which is what makes it hard to train. Both maps share "
                "one colour scale: compare the shapes of the basins and how low they go.")
    found = _stored_or_note("landscape-shipped", "landscape")
    if found is None:
        return
    result, figs = found
    view = st.segmented_control("View", LANDSCAPE_VIEWS, default=LANDSCAPE_VIEWS[0], key="tour_land") or LANDSCAPE_VIEWS[0]
    fig = figs["contours"] if view == LANDSCAPE_VIEWS[0] else figs[f"surface_{view.removeprefix('3-D: ')}"]
    show_chart(fig, "tour_land_fig")
    rows = {r.get("net"): r for r in result.get("rows", [])}
    measured = ""
    if {"residual", "plain"} <= rows.keys() and all("center_loss" in rows[n] for n in ("residual", "plain")):
        res, plain = rows["residual"], rows["plain"]
        measured = (f" At the trained weights the loss is {res['center_loss']:.3g} (residual) and {plain['center_loss']:.3g} "
                    f"(plain); non-convexity of the slice {res['nonconvexity']:.2f} vs {plain['nonconvexity']:.2f}")
        hessian = all("hessian_nonconvexity" in r for r in (res, plain))
        if hessian:
            measured += (f", of the full Hessian (Li et al.'s measure) {res['hessian_nonconvexity']:.2f} vs "
                         f"{plain['hessian_nonconvexity']:.2f}")
        measured += " (0: convex)."
        if hessian and res["hessian_nonconvexity"] >= plain["hessian_nonconvexity"]:
            measured += " By that measure this ResNet's slice is the less convex one, unlike the paper's"
            if all("center_lambda_max" in r for r in (res, plain)) and res["center_lambda_max"] < plain["center_lambda_max"]:
                measured += (f", though its minimum is the flatter one (largest curvature {res['center_lambda_max']:.3g} vs "
                             f"{plain['center_lambda_max']:.3g})")
            measured += "; the Experiments page maps both."
    st.caption(f"Stored result of the landscape study on {_where(result)}: the training loss on a plane through the "
               f"trained weights along two random, filter-normalised directions.{measured}")


def _step_your_turn() -> None:
    query = state.query_string()
    link = f"?{query}" if query else ""
    st.markdown("Now try it yourself, with the settings you have:\n\n"
                f"- [Design]({'design' + link}) a residual net and compare it with its plain twin at initialisation\n"
                f"- [Train]({'train' + link}) a ResNet beside its plain twin, live\n"
                f"- [Inspect]({'inspect' + link}) every block of the shipped ResNet-32 (or any model) on an image\n"
                "- [Experiments](experiments): the papers' studies, with their stored results")


RENDERERS: tuple[Callable[[], None], ...] = (_step_block, _step_degradation, _step_gradients, _step_ensembles,
                                             _step_landscape, _step_your_turn)


def _current_step() -> int:
    try:
        return min(max(int(st.query_params.get("step", 1)), 1), len(STEPS))
    except ValueError:
        return 1


def render() -> None:
    st.title("Why residual networks work")
    step = _current_step()
    labels = [f"{i}. {name}" for i, name in enumerate(STEPS, start=1)]
    chosen = st.segmented_control("Step", labels, default=labels[step - 1], key=f"tour_nav_{step}",
                                  label_visibility="collapsed")
    if chosen and labels.index(chosen) + 1 != step:
        st.query_params["step"] = str(labels.index(chosen) + 1)
        st.rerun()
    st.subheader(labels[step - 1])
    if not _twins():
        st.warning("The shipped nets in pretrained/ are missing; the steps that use them cannot run.")
        return
    RENDERERS[step - 1]()
    prev, nxt = st.columns(2)
    if step > 1 and prev.button("Previous", key="tour_prev"):
        st.query_params["step"] = str(step - 1)
        st.rerun()
    if step < len(STEPS) and nxt.button("Next", key="tour_next", type="primary"):
        st.query_params["step"] = str(step + 1)
        st.rerun()
