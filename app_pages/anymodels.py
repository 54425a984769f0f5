"""Choosing any architecture: torchvision and timm models by name, Python files the server operator allows.

Widgets and glue only; building, checking and residualizing happen in :mod:`resviz.anymodel` and
:mod:`resviz.external`. Python files come only from the folders in ``$RESVIZ_MODEL_DIRS`` (never from
the browser); uploaded weights are a state dict checked key by key. Built models are shared between
sessions through ``st.cache_resource`` and must be treated as read-only: lesions go through
:func:`resviz.nn.scoped.lesioned`, which locks the net and restores it.
"""

from __future__ import annotations

import hashlib
import os

import streamlit as st

from resviz import anymodel, external
from resviz.anymodel import Prepared

KINDS = {"torchvision": "torchvision", "timm": "timm", "file": "Python file on this server"}
TIMM_CHOICES = ("resnet18", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002",
                "vit_tiny_patch16_224", "deit_tiny_patch16_224", "levit_128s")
OTHER = "another timm model..."
FILE_SIZES = (16, 32, 64, 96, 128, 224)
MAX_PARAMS_ENV = "RESVIZ_MAX_PARAMS"


def max_params() -> int:
    """The largest model this server builds: ``$RESVIZ_MAX_PARAMS`` (default :data:`resviz.external.MAX_PARAMS`)."""
    try:
        return max(1, int(os.environ.get(MAX_PARAMS_ENV, external.MAX_PARAMS)))
    except ValueError:
        return external.MAX_PARAMS


@st.cache_resource(show_spinner=False)
def _torchvision_names() -> list[str]:
    return external.torchvision_names()


@st.cache_resource(max_entries=4, show_spinner="Building and tracing the model...")
def prepared(spec: str, input_size: int | None, cached_weights: bool, limit: int, weights: str,
             _state: dict | None = None) -> Prepared:
    """The residualized model ``spec`` names (``weights``: digest of ``_state``, "" for none); shared, read-only."""
    return anymodel.prepare(spec, input_size=input_size, max_params=limit, cached_weights=cached_weights, state=_state)


def _timm_name(prefix: str) -> str | None:
    import timm

    pick = st.selectbox("timm model", [*TIMM_CHOICES, OTHER], key=f"{prefix}_any_timm")
    if pick != OTHER:
        return pick
    name = st.text_input("timm model name", key=f"{prefix}_any_timm_name", placeholder="e.g. resnet26d").strip()
    if not name:
        return None
    if not timm.is_model(name):
        st.error(f"timm has no model {name!r}; `timm.list_models('*part*')` lists the names.")
        return None
    return name


def choose_architecture(prefix: str) -> tuple[str, int | None] | None:
    """Source radio plus the source's picker: ``(spec, input size or None for the architecture's own)``."""
    kind = st.radio("Architecture from", list(KINDS), format_func=KINDS.get, key=f"{prefix}_any_kind", horizontal=True)
    if kind == "torchvision":
        names = _torchvision_names()
        state_key = f"{prefix}_any_tv"
        if st.session_state.get(state_key) not in names:
            st.session_state[state_key] = "resnet18" if "resnet18" in names else names[0]
        return f"torchvision:{st.selectbox('torchvision model', names, key=state_key)}", None
    if kind == "timm":
        name = _timm_name(prefix)
        return (f"timm:{name}", None) if name else None
    files = external.model_files()
    if not files:
        st.info(f"No Python model files are allowed on this server. Whoever starts it can list folders in "
                f"`{external.MODEL_DIRS_ENV}` (separated by `{os.pathsep}`); their .py files' `build*`/`make*`/`*model` "
                "functions appear here. Code is never uploaded through the browser.")
        return None
    spec = st.selectbox("Model file and function", [str(s) for s in files], key=f"{prefix}_any_file",
                        format_func=lambda s: s.removeprefix("file:"))
    size = st.select_slider("Input size", FILE_SIZES, value=32, key=f"{prefix}_any_size",
                            help="The square image side the model is fed (its first layer fixes the channels).")
    return spec, int(size)


def _weights_upload(prefix: str) -> tuple[str, dict | None]:
    """Optional uploaded weights: (digest, state dict); ("", None) when none."""
    f = st.file_uploader("Weights for this architecture (optional): .safetensors or a .pt/.pth state dict",
                         type=["safetensors", "pt", "pth"], key=f"{prefix}_any_weights")
    if f is None:
        return "", None
    data = f.getvalue()
    return hashlib.sha256(data).hexdigest(), anymodel.load_weights(data, f.name)


def pick(prefix: str, *, cached_weights: bool = True, upload: bool = True) -> tuple[str, Prepared] | None:
    """Pick and build a model: ``(cache key, prepared)``; SourceError and TraceError propagate (ValueErrors)."""
    chosen = choose_architecture(prefix)
    if chosen is None:
        return None
    spec, size = chosen
    digest, state = _weights_upload(prefix) if upload else ("", None)
    p = prepared(spec, size, cached_weights, max_params(), digest, state)
    key = f"any:{spec}:{size}:{cached_weights}:{digest}"
    if p.external.note:
        st.info(f"{p.external.note}. Weights are never downloaded by the app.")
    rmap = p.residual_map
    if not len(rmap):
        st.warning("No skip connections found: this model has no residual merge. It can still be inspected as it is.")
    else:
        c = rmap.counts()
        st.caption(f"{len(rmap)} skip connections found: {c['identity']} identity, {c['projection']} projection"
                   + (f"; kept whole (not traced into): {', '.join(rmap.opaque)}" if rmap.opaque else ""))
    return key, p
