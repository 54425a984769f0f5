"""Design page, "any architecture" mode: the skip connections discovery finds in a model, its size, and
how it and its skips-off twin look at initialisation."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st
from torch import nn

from app_pages import anymodels
from app_pages.charts import show_chart
from resviz import anymodel, plots
from resviz.anymodel import Prepared
from resviz.nn.discovery import Residualized


@st.cache_data(max_entries=16, show_spinner="Counting multiply-accumulates...")
def _macs(key: str, shape: tuple[int, int, int], _model: nn.Module) -> int:
    return anymodel.count_macs(_model, shape)


@st.cache_data(max_entries=8, show_spinner="Measuring the model and its skips-off twin at initialisation...")
def _init(key: str, shape: tuple[int, int, int], classes: int, macs: int, _net: Residualized) -> dict[str, Any]:
    return anymodel.init_comparison(_net, shape, classes, macs=macs)


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def _summary(p: Prepared, macs: int) -> None:
    c = p.residual_map.counts()
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Parameters", f"{p.external.num_params:,}")
    c2.metric("MACs / image", _si(macs), help="Multiply-accumulates: convolutions, matrix products and attention, "
              f"for one {p.info.channels}x{p.info.input_size}x{p.info.input_size} input (PyTorch's FLOP counter / 2).")
    c3.metric("Skip connections", len(p.residual_map))
    c4.metric("Identity / projection", f"{c['identity']} / {c['projection']}")


def _merge_table(p: Prepared) -> None:
    rows = anymodel.merge_rows(p.residual_map)
    groups = anymodel.merge_groups(p.residual_map)
    st.caption(f"{len(groups)} groups of consecutive merges with one map shape (a stage, or one resolution), "
               "numbered above the strip; hover a cell for its merge.")
    with st.expander(f"Every merge ({len(rows)})"):
        by_index = {m.index: m for m in p.residual_map}
        st.dataframe({"merge": [r["index"] for r in rows], "name": [r["name"] for r in rows],
                      "group": [r["group"] for r in rows], "shortcut": [r["shortcut"] for r in rows],
                      "shape": [r["shape"] for r in rows],
                      "branch F": [", ".join(by_index[r["index"]].branch) for r in rows],
                      "shortcut S": [", ".join(by_index[r["index"]].shortcut_modules) or "x" for r in rows]},
                     hide_index=True, key="d_any_table")


def _spread_text(values: np.ndarray) -> str:
    s = anymodel.spread(values)
    return "no merge gets any gradient" if not np.isfinite(s) else f"gradient norms across merges span a factor of {s:,.3g}"


def _init_section(key: str, p: Prepared, macs: int) -> None:
    st.subheader("At initialisation")
    st.caption("One random batch through the model and its twin with every discovered skip off (same weights), "
               "in train mode, before any training. Without its skips a deep model's signal and gradients drift "
               "geometrically with depth.")
    shape = (p.info.channels, p.info.input_size, p.info.input_size)
    stats = _init(key, shape, len(p.info.classes), macs, p.net)
    res, plain = stats["residual"], stats["plain"]
    show_chart(plots.grad_norm_figure(res["grad_block"], plain["grad_block"]), "d_any_grad")
    st.caption(f"Twin with skips off: {_spread_text(plain['grad_block'])}. With skips: {_spread_text(res['grad_block'])}. "
               f"Batch of {stats['meta']['batch_size']} at {stats['meta']['input_size']}x{stats['meta']['input_size']}"
               + (" (a smaller input, to keep the page quick)." if stats["meta"]["input_size"] != p.info.input_size else "."))
    show_chart(plots.signal_prop_figure(res, plain), "d_any_signal")


def render() -> None:
    """The mode's body: pick an architecture, then its merges, size and init-time comparison."""
    st.caption("Point ResViz at any torchvision or timm classifier, or a Python file this server allows: it traces "
               "the model and finds every residual merge y = F(x) + S(x). Random initial weights.")
    try:
        picked = anymodels.pick("d", cached_weights=False, upload=False)
    except ValueError as e:  # SourceError, TraceError: messages for the user
        st.error(f"This model cannot be used: {e}")
        return
    if picked is None:
        return
    key, p = picked
    macs = _macs(key, (p.info.channels, p.info.input_size, p.info.input_size), p.external.model)
    _summary(p, macs)
    show_chart(plots.merge_strip(anymodel.merge_rows(p.residual_map)), "d_any_strip")
    if not len(p.residual_map):
        return
    _merge_table(p)
    _init_section(key, p, macs)
