"""Design page: configure a residual block and net, see its architecture, equation and init statistics."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import streamlit as st

from app_pages import design_any, state
from app_pages.charts import show_chart
from app_pages.help_text import HELP, ORDER_LABELS, SCALING_LABELS, SHORTCUT_LABELS
from resviz import BlockConfig, NetConfig, plots
from resviz.analysis.initstats import describe_blocks, init_comparison, summarize
from resviz.config import ACTIVATIONS, IMAGENET_STAGES, NORMS, STYLES
from resviz.nn.equations import block_equation

INPUT_SIZES = (8, 16, 24, 32, 48, 64, 96, 128, 160, 224)
WIDTHS = (4, 8, 12, 16, 24, 32, 48, 64)
MAX_N = 18  # CIFAR depths up to 6*18+2 = 110 (basic) and 9*18+2 = 164 (bottleneck)


# -- cached computations (keyed by the config's JSON) ------------------------------------------
@st.cache_data(max_entries=128, show_spinner=False)
def _summary(cfg_json: str) -> dict[str, int]:
    s = summarize(NetConfig.from_json(cfg_json))
    return {"params": s.params, "macs": s.macs, "blocks": s.blocks}


@st.cache_data(max_entries=128, show_spinner=False)
def _blocks(cfg_json: str) -> list[dict]:
    return describe_blocks(NetConfig.from_json(cfg_json))


@st.cache_data(max_entries=32, show_spinner="Measuring both nets at initialisation...")
def _init_stats(cfg_json: str) -> dict:
    return init_comparison(NetConfig.from_json(cfg_json))


def depth_options(style: str, kind: str, current: int) -> list[int]:
    """Depths the slider offers for this style and block kind (plus a deeper valid one from a link)."""
    if style == "imagenet":
        return [d for d, (k, _) in IMAGENET_STAGES.items() if k == kind]
    per = 9 if kind == "bottleneck" else 6
    opts = [per * n + 2 for n in range(1, MAX_N + 1)]
    if current > opts[-1] and (current - 2) % per == 0:
        opts.append(current)
    return opts


# -- widgets ------------------------------------------------------------------------------------
def _seed_widgets(cfg: NetConfig) -> None:
    b = cfg.block
    for key, value in {
        "d_style": cfg.style, "d_kind": b.kind, "d_order": b.order, "d_norm": b.norm, "d_groups": b.groups,
        "d_act": b.act, "d_shortcut": b.shortcut, "d_scaling": b.scaling, "d_alpha": b.alpha,
        "d_alpha_init": b.alpha_init, "d_zero_init": b.zero_init_last, "d_sd": b.stochastic_depth,
        "d_depth": cfg.depth, "d_width": cfg.width, "d_input": cfg.input_size, "d_classes": cfg.num_classes,
        "d_channels": cfg.in_channels, "d_skips_off": [i for i, s in enumerate(cfg.skip_flags) if not s],
    }.items():
        state.widget_default(key, value)


def _block_widgets() -> BlockConfig:
    """Widgets for every block option; raises ValueError for an invalid combination.

    The two selects whose options are phrases (order, shortcut) get a row each, so their text fits at
    1280 px; the short ones sit three to a row, their inputs aligned however their labels wrap.
    """
    c1, c2, c3 = st.columns(3, vertical_alignment="bottom")
    kind = c1.selectbox("Block", ("basic", "bottleneck"), key="d_kind", help=HELP["kind"])
    norm = c2.selectbox("Norm", NORMS, key="d_norm", help=HELP["norm"])
    act = c3.selectbox("Activation", ACTIVATIONS, key="d_act", help=HELP["act"])
    order = st.selectbox("Order", list(ORDER_LABELS), format_func=ORDER_LABELS.get, key="d_order", help=HELP["order"])
    shortcut = st.selectbox("Shortcut", list(SHORTCUT_LABELS), format_func=SHORTCUT_LABELS.get, key="d_shortcut",
                            help=HELP["shortcut"])
    c1, c2, c3 = st.columns(3, vertical_alignment="bottom")
    scaling = c1.selectbox("Residual scaling", list(SCALING_LABELS), format_func=SCALING_LABELS.get, key="d_scaling",
                           help=HELP["scaling"])
    if scaling == "learnable":
        alpha_init = c2.number_input("alpha at init", -2.0, 2.0, step=0.05, key="d_alpha_init", help=HELP["alpha_init"])
        alpha = st.session_state["d_alpha"]
    else:
        alpha = c2.number_input("alpha", 0.0, 2.0, step=0.05, key="d_alpha", help=HELP["alpha"], disabled=scaling == "none")
        alpha_init = st.session_state["d_alpha_init"]
    groups = c3.number_input("GroupNorm groups", 1, 64, key="d_groups", help=HELP["groups"], disabled=norm != "group")
    sd = st.slider("Stochastic depth", 0.0, 0.9, step=0.05, key="d_sd", help=HELP["stochastic_depth"])
    zero = st.checkbox("Zero-init the last norm of each branch", key="d_zero_init", help=HELP["zero_init_last"])
    return BlockConfig(kind=kind, order=order, norm=norm, groups=int(groups), act=act, shortcut=shortcut, scaling=scaling,
                       alpha=float(alpha), alpha_init=float(alpha_init), zero_init_last=zero, stochastic_depth=float(sd))


def _net_widgets(block: BlockConfig) -> NetConfig:
    """Widgets for the network options; raises ValueError for an invalid combination."""
    c1, c2, c3 = st.columns(3)
    style = c1.selectbox("Style", STYLES, key="d_style", help=HELP["style"])
    opts = depth_options(style, block.kind, st.session_state["d_depth"])
    if st.session_state["d_depth"] not in opts:
        st.session_state["d_depth"] = min(opts, key=lambda d: abs(d - st.session_state["d_depth"]))
    depth = st.select_slider("Depth (layers)", opts, key="d_depth", help=HELP["depth"])
    width = c2.select_slider("Width", state.options_with(WIDTHS, st.session_state["d_width"]), key="d_width", help=HELP["width"])
    size = c3.select_slider("Input size", state.options_with(INPUT_SIZES, st.session_state["d_input"]), key="d_input",
                            help=HELP["input_size"])
    classes = c1.number_input("Classes", 2, 1000, key="d_classes", help=HELP["num_classes"])
    channels = c2.selectbox("Input channels", (1, 3), key="d_channels", help=HELP["in_channels"])
    return NetConfig(style=style, depth=int(depth), width=int(width), num_classes=int(classes), in_channels=int(channels),
                     input_size=int(size), block=block)


def _skip_widget(cfg: NetConfig) -> NetConfig:
    """Per-block skip toggles: the blocks listed have their skip connection off."""
    labels = [f"{i} (stage {s + 1})" for i, s in enumerate(_stage_of(cfg))]
    valid = [i for i in st.session_state.get("d_skips_off", []) if i < cfg.num_blocks]
    st.session_state["d_skips_off"] = valid
    off = st.multiselect("Blocks with the skip connection off", range(cfg.num_blocks), format_func=labels.__getitem__,
                         key="d_skips_off", help=HELP["skips_off"])
    return replace(cfg, skips=tuple(i not in off for i in range(cfg.num_blocks)) if off else ())


def _stage_of(cfg: NetConfig) -> list[int]:
    return [s for s, n in enumerate(cfg.stage_blocks) for _ in range(n)]


# -- outputs ------------------------------------------------------------------------------------
def _show_summary(cfg: NetConfig) -> None:
    """Four numbers, two to a row: at 1280 px a row of four cuts them off."""
    s = _summary(cfg.to_json())
    c1, c2 = st.columns(2)
    c1.metric("Parameters", f"{s['params']:,}")
    c2.metric("MACs / image", _si(s["macs"]), help=f"Multiply-accumulates for one {cfg.in_channels}x{cfg.input_size}x"
              f"{cfg.input_size} image (a forward pass).")
    c1.metric("Residual blocks", s["blocks"])
    c2.metric("Skips on", f"{sum(cfg.skip_flags)} / {cfg.num_blocks}")


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def _show_equation(block: BlockConfig) -> None:
    eq = block_equation(block)
    st.latex(eq.block)
    st.latex(eq.branch)
    for case in eq.shortcut.split(r",\quad"):  # one line per case: side by side they run out of a column
        st.latex(case)
    st.caption(f"With the skip connection off the block is plain: ${eq.plain}$. {eq.legend}.")


def _show_gradients(stats: dict) -> None:
    """The key result, beside the settings: how the gradient reaches each block, residual vs plain."""
    res, plain = stats["residual"], stats["plain"]
    show_chart(plots.grad_norm_figure(res["grad_block"], plain["grad_block"]), "d_grad_fig")
    st.caption(f"At initialisation, one random batch. Plain twin: {_spread(plain['grad_block'])}. "
               f"Residual net: {_spread(res['grad_block'])}.")


def _show_init(cfg: NetConfig, stats: dict) -> None:
    st.subheader("Signal at initialisation")
    st.caption("One random batch through this net and its plain twin (same weights, skips off), before any training. "
               "Deep plain nets' signal and gradients grow or shrink geometrically with depth; the skips keep them in range.")
    show_chart(plots.signal_prop_figure(stats["residual"], stats["plain"]), "d_signal_fig")


def _spread(values: np.ndarray) -> str:
    """How unevenly the gradient is spread over the blocks, in words."""
    live = values[np.isfinite(values) & (values > 0)]
    dead = len(values) - len(live)
    if not len(live):
        return "no block gets any gradient"
    text = f"gradient norms across blocks span a factor of {live.max() / live.min():,.3g}"
    return text + (f"; {dead} of {len(values)} blocks get none" if dead else "")


MODES = {"resviz": "ResViz net", "any": "Any architecture"}


def render() -> None:
    st.title("Design a residual network")
    mode = st.radio("Design", list(MODES), format_func=MODES.get, key="d_mode", horizontal=True,
                    label_visibility="collapsed")
    if mode == "any":
        design_any.render()
        return
    _seed_widgets(state.net_config())
    left, right = st.columns([5, 6], gap="large")
    with left:
        try:
            block = _block_widgets()
            cfg = _skip_widget(_net_widgets(block))
        except ValueError as e:
            st.error(f"This combination does not work: {e}")
            return
        state.set_net_config(cfg)
    with right:
        _show_summary(cfg)
        stats = _init_stats(cfg.to_json())
        _show_gradients(stats)
    st.subheader("The block and the net")
    eq, arch = st.columns([5, 6], gap="large")
    with eq:
        _show_equation(cfg.block)
    with arch:
        show_chart(plots.architecture_figure(_blocks(cfg.to_json())), "d_arch_fig")
    _show_init(cfg, stats)
