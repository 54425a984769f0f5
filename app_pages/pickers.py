"""Choosing what to inspect: a net (shipped, trained here, uploaded, torchvision, untrained, any architecture)
and an image.

Widgets and glue only: loading, decoding and preprocessing happen in :mod:`resviz.zoo` and
:mod:`resviz.data.images`. Loaded nets are shared between sessions through ``st.cache_resource`` and must be
treated as read-only (the Inspect page applies its lesions inside :func:`resviz.analysis.inspection.lesioned`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import streamlit as st
import torch
from torch import nn

from app_pages import anymodels, state
from resviz import ResNet, zoo
from resviz.data.images import ImageError, load_image, sample_images
from resviz.zoo import ModelInfo

SOURCES = {
    "pretrained": "Shipped checkpoint",
    "trained": "Trained in this session",
    "upload": "Upload a checkpoint",
    "torchvision": "torchvision ImageNet ResNet",
    "untrained": "Design-page net, untrained",
    "any": "Any architecture",
}
IMAGE_SOURCES = ("Test image", "Built-in picture", "Upload", "Camera")
Model = tuple[str, nn.Module, ModelInfo]  # (cache key, net: a ResViz net or a residualized model, info)
Picked = tuple[torch.Tensor, str]  # ((1, C, H, W) model input, caption)


# -- cached resources -----------------------------------------------------------------------------
@st.cache_resource(max_entries=8, show_spinner="Loading the checkpoint...")
def _shipped(path: str, mtime: float) -> tuple[ResNet, ModelInfo]:
    entry = next(m for m in zoo.shipped_models() if str(m.path) == path)
    return zoo.load_shipped(entry)


@st.cache_resource(max_entries=2, show_spinner="Loading ImageNet weights...")
def _torchvision(arch: str, weights_path: str) -> tuple[ResNet, ModelInfo]:
    return zoo.load_torchvision(arch)


@st.cache_resource(max_entries=4, show_spinner="Reading the checkpoint...")
def _uploaded(digest: str, _files: tuple[tuple[str, bytes], ...]) -> tuple[ResNet, ModelInfo]:
    return zoo.load_upload(_files)


@st.cache_resource(max_entries=4, show_spinner="Building the net...")
def _untrained(cfg_json: str, dataset: str) -> tuple[ResNet, ModelInfo]:
    from resviz import NetConfig

    return zoo.untrained(NetConfig.from_json(cfg_json), dataset)


@st.cache_resource(max_entries=8, show_spinner="Loading test images...")
def _samples(key: str, _info: ModelInfo) -> Any:
    return zoo.dataset_samples(_info)


# -- model choice ---------------------------------------------------------------------------------
def _shipped_list() -> list[zoo.ShippedModel]:
    try:
        return zoo.shipped_models()
    except ValueError as e:  # a damaged manifest should not hide the other sources
        st.warning(str(e))
        return []


def _pick_shipped() -> Model | None:
    models = _shipped_list()
    if not models:
        st.info("No shipped checkpoints yet: run `python pretrained/make_pretrained.py`, or pick another source.")
        return None
    first = zoo.first_choice(models, st.session_state.get(state.DATASET))
    m = st.selectbox("Checkpoint", models, index=first, format_func=_shipped_label, key="i_shipped")
    net, info = _shipped(str(m.path), m.path.stat().st_mtime)
    return f"pretrained:{m.path}:{m.path.stat().st_mtime}", net, info


def _shipped_label(m: zoo.ShippedModel) -> str:
    acc = f", test accuracy {m.accuracy:.1%}" if m.accuracy is not None else ""
    return f"{m.name} ({m.dataset}{acc})"


def _pick_trained() -> Model | None:
    models = state.trained_models()
    if not models:
        st.info("No nets trained in this session yet: train one on the Train page.")
        return None
    names = list(models)
    chosen = state.selected_model()
    index = names.index(chosen[0]) if chosen else len(names) - 1
    name = st.selectbox("Trained net", names, index=index, key="i_trained")
    st.session_state[state.SELECTED] = name
    net, raw = models[name]
    return f"trained:{name}:{id(net)}", net, zoo.info_from_dict(raw, name=name, source="trained")


def _pick_upload() -> Model | None:
    files = st.file_uploader("Checkpoint: .safetensors + .json, or a .pt/.pth state dict + .json",
                             type=["safetensors", "json", "pt", "pth"], accept_multiple_files=True, key="i_ckpt")
    if not files:
        return None
    blobs = tuple((f.name, f.getvalue()) for f in files)
    digest = hashlib.sha256(b"".join(n.encode() + b"\0" + d for n, d in blobs)).hexdigest()
    net, info = _uploaded(digest, blobs)
    return f"upload:{digest}", net, info


def _pick_torchvision() -> Model | None:
    arch = st.selectbox("Architecture", list(zoo.TORCHVISION_ARCHS), key="i_tv_arch")
    found = zoo.find_torchvision_weights(arch)
    if found is None:
        st.info(f"The ImageNet weights of {arch} are not on this machine and are never downloaded by the app. "
                "Run this once while online, then reload:")
        st.code(zoo.download_command(arch), language="bash")
        return None
    net, info = _torchvision(arch, str(found[1]))
    return f"torchvision:{arch}:{found[1]}", net, info


def _pick_untrained() -> Model:
    cfg, dataset = state.net_config(), st.session_state.get(state.DATASET, "shapes")
    net, info = _untrained(cfg.to_json(), dataset)
    return f"untrained:{cfg.to_json()}:{dataset}", net, info


def _pick_any() -> Model | None:
    picked = anymodels.pick("i")
    if picked is None:
        return None
    key, p = picked
    return key, p.net, p.info


def choose_model() -> Model | None:
    """The source radio plus that source's picker."""
    just_trained = state.selected_model() is not None and st.session_state.get(state.SELECTED) is not None
    default = "trained" if just_trained else ("pretrained" if _shipped_list() else "untrained")
    state.widget_default("i_source", default)
    source = st.radio("Model", list(SOURCES), format_func=SOURCES.get, key="i_source", horizontal=True)
    pick = {"pretrained": _pick_shipped, "trained": _pick_trained, "upload": _pick_upload,
            "torchvision": _pick_torchvision, "untrained": _pick_untrained, "any": _pick_any}[source]
    try:
        model = pick()
    except ValueError as e:  # CheckpointError, DatasetUnavailable, ModelUnavailableError, SourceError, TraceError
        st.error(f"This model cannot be used: {e}")
        return None
    if model is not None:
        info = model[2]
        acc = f" · test accuracy {info.accuracy:.1%}" if info.accuracy is not None else ""
        st.caption(f"**{info.name}** · {info.dataset} · {len(info.classes)} classes · {info.input_size}px input{acc}")
    return model


# -- image choice ---------------------------------------------------------------------------------
def _pick_test_image(info: ModelInfo) -> Picked | None:
    try:
        data = _samples(f"{info.dataset}|{info.input_size}|{info.channels}|{info.mean}|{info.std}", info)
    except ValueError as e:  # DatasetUnavailable: its message says what is missing
        st.info(f"No test images for this model: {e}")
        return None
    xs, ys = data.tensors
    tag = hashlib.sha1(info.dataset.encode()).hexdigest()[:8]  # widget keys per dataset: ranges differ
    if st.radio("Pick", ("by index", "by class"), horizontal=True, key="i_pick_by") == "by index":
        i = int(st.number_input(f"Index (0-{len(ys) - 1})", 0, len(ys) - 1, 0, key=f"i_index_{tag}"))
    else:
        c = st.selectbox("Class", range(len(info.classes)), format_func=lambda j: info.classes[j], key=f"i_class_{tag}")
        idx = (ys == c).nonzero()[:, 0]
        if len(idx) == 0:
            st.info(f"The test split holds no image of class {info.classes[c]}.")
            return None
        i = int(idx[min(int(st.number_input("Which one", 0, len(idx) - 1, 0, key=f"i_nth_{tag}")), len(idx) - 1)])
    return xs[i : i + 1], f"test image {i}, true class: {info.classes[int(ys[i])]}"


def _pick_builtin(info: ModelInfo) -> Picked:
    pictures = sample_images(max(64, info.input_size))
    name = st.selectbox("Picture", list(pictures), key="i_builtin")
    return zoo.prepare_image(pictures[name], info), f"built-in picture: {name}"


def _pick_upload_image(info: ModelInfo) -> Picked | None:
    f = st.file_uploader("Image (PNG, JPEG or WebP)", type=["png", "jpg", "jpeg", "webp"], key="i_image")
    return None if f is None else image_from_bytes(f.getvalue(), f.name, info)


def _pick_camera(info: ModelInfo) -> Picked | None:
    if not st.toggle("Use the camera", key="i_camera_on"):
        return None
    shot = st.camera_input("Take a picture", key="i_camera")
    return None if shot is None else image_from_bytes(shot.getvalue(), "camera picture", info)


def image_from_bytes(data: bytes, name: str, info: ModelInfo) -> Picked | None:
    """Decode an untrusted upload for the model; an unusable file becomes an error message, not an exception."""
    try:
        loaded = load_image(data)
    except ImageError as e:
        st.error(f"{name} cannot be used: {e}")
        return None
    for note in loaded.notes:
        st.caption(note)
    return zoo.prepare_image(loaded, info), name


def choose_image(info: ModelInfo) -> Picked | None:
    source = st.radio("Image", IMAGE_SOURCES, horizontal=True, key="i_image_source")
    pick = dict(zip(IMAGE_SOURCES, (_pick_test_image, _pick_builtin, _pick_upload_image, _pick_camera)))[source]
    return pick(info)
