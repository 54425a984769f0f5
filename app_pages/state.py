"""The app's bottom layer: per-session state, the URL that mirrors it, the error guard, the machine's devices.

Every other module of ``app_pages`` and ``app.py`` may import this one; it imports nothing from them.

Session-state keys (initialised once per browser session by :func:`init_state`):

``net_config``       :class:`resviz.NetConfig` being designed (the Design page edits it, Train uses it).
``train_config``     :class:`resviz.TrainConfig` of the next run (the Train page edits it).
``dataset_name``     name of the dataset for the next run (``resviz.data.datasets.available_datasets()``).
``data_folder``      path of a folder of user images, used when ``dataset_name == "imagefolder"``.
``train_twin``       bool: train the plain twin alongside (default True).
``train_size``       number of training images to load.
``trained_models``   ``dict[str, TrainedModel]``: finished (or stopped) runs of this session, newest last.
                     ``TrainedModel`` is a named tuple ``(net, info)``: ``net`` is the trained
                     :class:`resviz.ResNet` in eval mode on the CPU; ``info`` is a plain dict with
                     ``dataset``, ``classes``, ``channels``, ``input_size``, ``mean``, ``std``,
                     ``net_config`` (dict), ``train_config`` (dict), ``final`` (last metrics dict),
                     ``role`` ("residual" or "plain") and ``job_id``.
``selected_model``   key into ``trained_models`` of the net the user picked for inspection (or None).
``session_id``       random id that ties this session's jobs in the shared registry to the session.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, NamedTuple

import streamlit as st

from resviz import NetConfig, TrainConfig
from resviz.urlconfig import BLOCK_KEYS, NET_KEYS, SKIPS_KEY, decode_net, decode_train, encode_net, encode_train

log = logging.getLogger("resviz.app")

NET_CFG = "net_config"
TRAIN_CFG = "train_config"
DATASET = "dataset_name"
DATA_FOLDER = "data_folder"
TRAINED = "trained_models"
SELECTED = "selected_model"
SESSION_ID = "session_id"
TWIN = "train_twin"
TRAIN_SIZE = "train_size"
_URL_WARNING = "_url_warning"

# Defaults a first-time user gets: ResNet-56 (width 8) and its plain twin on scikit-learn's handwritten
# digits at 12x12, 4 epochs of batch 64 (88 steps): the residual net ends above 90% test accuracy while the
# plain twin, the same 56 layers without skips, stays far behind. What it reaches and how long it takes on 2
# CPU cores are measured by bench/bench.py (section 5, saved in bench/results/ and published in the README's
# Performance table).
DEFAULT_NET = NetConfig(style="cifar", depth=56, width=8, num_classes=10, in_channels=1, input_size=12)
DEFAULT_TRAIN = TrainConfig(
    optimizer="sgd", lr=0.1, weight_decay=5e-4, schedule="onecycle", epochs=4.0, batch_size=64, seed=0, probe_every=5
)
DEFAULT_DATASET = "digits"
DEFAULT_TRAIN_SIZE = 5000
DATASET_KEY, TWIN_KEY, SIZE_KEY = "ds", "tw", "nt"  # URL keys of the dataset name, twin flag, train size


class TrainedModel(NamedTuple):
    """A trained net and what is needed to feed it (see the module docstring for ``info``)."""

    net: Any  # resviz.ResNet; typed loosely so this module needs no torch import
    info: dict[str, Any]


def init_state() -> None:
    """Initialise this session's state once; the first run also reads the configuration from the URL."""
    ss = st.session_state
    if SESSION_ID in ss:
        return
    ss[SESSION_ID] = uuid.uuid4().hex
    ss[TRAINED] = {}
    ss[SELECTED] = None
    ss[DATA_FOLDER] = ""
    params = st.query_params.to_dict()
    net, train, dataset, problems = config_from_url(params)
    ss[NET_CFG], ss[TRAIN_CFG], ss[DATASET] = net, train, dataset
    ss[TWIN] = params.get(TWIN_KEY, "1") != "0"
    size = str(params.get(SIZE_KEY, DEFAULT_TRAIN_SIZE))
    ss[TRAIN_SIZE] = int(size) if size.isdigit() and 100 <= int(size) <= 60_000 else DEFAULT_TRAIN_SIZE
    if str(ss[TRAIN_SIZE]) != size:
        problems = "; ".join(filter(None, [problems, f"URL parameter '{SIZE_KEY}' must be a number of images, 100 to 60000"]))
    if problems:
        ss[_URL_WARNING] = problems


def config_from_url(params: dict[str, str]) -> tuple[NetConfig, TrainConfig, str, str]:
    """Configs from query parameters; a bad part falls back to the defaults and is described in the message."""
    problems = []
    try:
        net = decode_net(params, DEFAULT_NET)
    except ValueError as e:
        net, problems = DEFAULT_NET, [str(e)]
    try:
        train = decode_train(params, DEFAULT_TRAIN)
    except ValueError as e:
        train = DEFAULT_TRAIN
        problems.append(str(e))
    dataset = str(params.get(DATASET_KEY, DEFAULT_DATASET))
    if not dataset.replace("_", "").isalnum() or len(dataset) > 40:
        dataset = DEFAULT_DATASET
        problems.append("URL parameter 'ds' is not a dataset name")
    return net, train, dataset, "; ".join(problems)


def show_url_warning() -> None:
    """Show (once) why the link's configuration was not used."""
    msg = st.session_state.pop(_URL_WARNING, "")
    if msg:
        st.warning(f"The link's configuration was not used, defaults are shown instead: {msg}")


PAGE_KEYS = ("step",)  # URL parameters a page owns; sync_url keeps them


def has_design_link() -> bool:
    """Whether this session just opened a URL that carries a net configuration and no page place (a
    Design link shared before the tour was the landing page). True at most once per session."""
    if st.session_state.get("_landed"):
        return False
    st.session_state["_landed"] = True
    params = st.query_params.to_dict()
    net_keys = {*NET_KEYS, *BLOCK_KEYS, SKIPS_KEY}
    return not any(k in params for k in PAGE_KEYS) and any(k in params for k in net_keys)


def query_string() -> str:
    """The URL query of the session's configuration (for links that open another page with it)."""
    ss = st.session_state
    params = encode_net(ss[NET_CFG], DEFAULT_NET) | encode_train(ss[TRAIN_CFG], DEFAULT_TRAIN)
    return "&".join(f"{k}={v}" for k, v in params.items())


def sync_url() -> None:
    """Mirror the session's configuration into the URL so the address reproduces it."""
    ss = st.session_state
    params = encode_net(ss[NET_CFG], DEFAULT_NET) | encode_train(ss[TRAIN_CFG], DEFAULT_TRAIN)
    if ss[DATASET] != DEFAULT_DATASET:
        params[DATASET_KEY] = ss[DATASET]
    if not ss[TWIN]:
        params[TWIN_KEY] = "0"
    if ss[TRAIN_SIZE] != DEFAULT_TRAIN_SIZE:
        params[SIZE_KEY] = str(ss[TRAIN_SIZE])
    current = st.query_params.to_dict()
    params |= {k: v for k, v in current.items() if k in PAGE_KEYS}  # a page's own place (the tour's step)
    if current != params:
        st.query_params.from_dict(params)


def set_net_config(cfg: NetConfig) -> None:
    st.session_state[NET_CFG] = cfg


def set_train_config(cfg: TrainConfig, dataset: str, *, twin: bool, train_size: int, folder: str) -> None:
    """Store the Train page's settings (the URL follows at the end of the run)."""
    ss = st.session_state
    ss[TRAIN_CFG], ss[DATASET], ss[TWIN], ss[TRAIN_SIZE], ss[DATA_FOLDER] = cfg, dataset, twin, train_size, folder


def net_config() -> NetConfig:
    return st.session_state[NET_CFG]


def train_config() -> TrainConfig:
    return st.session_state[TRAIN_CFG]


def widget_default(key: str, value: Any) -> None:
    """Seed a widget's value from the stored config when the widget is (re)created.

    Streamlit drops a widget's state when its page is not shown, so the configs in session state are
    the source of truth and the widgets are re-seeded from them.
    """
    if key not in st.session_state:
        st.session_state[key] = value


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Turn any exception in the block into a short error message (logged with its traceback)."""
    try:
        yield
    except Exception as e:  # the point is that nothing escapes to the browser
        log.exception("%s failed", what)
        st.error(f"{what} failed: {type(e).__name__}: {str(e)[:300]}")


def trained_models() -> dict[str, TrainedModel]:
    return st.session_state.setdefault(TRAINED, {})


def add_trained_model(name: str, model: TrainedModel) -> None:
    """Make a trained net available to the Inspect page (and select it)."""
    trained_models()[name] = model
    st.session_state[SELECTED] = name


def selected_model() -> tuple[str, TrainedModel] | None:
    """The trained model picked for inspection, or the newest one, or None."""
    models = trained_models()
    name = st.session_state.get(SELECTED)
    if name not in models:
        name = next(reversed(models), None)
    return (name, models[name]) if name is not None else None


def max_jobs() -> int:
    """Global cap on concurrent training jobs: env ``RESVIZ_MAX_JOBS`` (default 2)."""
    try:
        return max(1, int(os.environ.get("RESVIZ_MAX_JOBS", "2")))
    except ValueError:
        return 2


def with_dataset_shape(cfg: NetConfig, classes: int, channels: int) -> NetConfig:
    """The net adapted to a dataset's number of classes and input channels."""
    return replace(cfg, num_classes=classes, in_channels=channels)


@st.cache_resource(show_spinner=False)
def devices() -> tuple[str, list[str]]:
    """The device training picks automatically and every device this machine offers."""
    from resviz.train import resolve_device

    auto = str(resolve_device("auto"))
    found = ["cpu"]
    for name in ("cuda", "mps"):
        try:
            resolve_device(name)
            found.insert(0, name)
        except (ValueError, RuntimeError):
            pass
    return auto, found


def options_with(options: tuple[int, ...], value: int) -> list[int]:
    """A slider's options plus the current value (which a link may have set to anything valid)."""
    return sorted(set(options) | {int(value)})
