"""Any model in the app: an external architecture, its residualized form, its skips-off twin, its size.

:func:`prepare` builds a model a spec names (:mod:`resviz.external`: torchvision, timm, an allowed
Python file), optionally loads checked weights, and residualizes it (:mod:`resviz.nn.discovery`), so
the Inspect page addresses its merges like a ResViz net's. :func:`twins` gives the residual model and
its plain twin (every discovered skip off) with identical weights; :func:`init_comparison` measures
both at initialisation; :func:`count_macs` counts any model's multiply-accumulates. Small timm
:data:`PRESETS` configured for the built-in data are what the Train page trains next to their twins.
Every function returns plain data or modules; nothing here imports streamlit.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from resviz import external
from resviz.analysis.probes import gradient_norms_by_layer, signal_prop
from resviz.data.preprocess import Normalization
from resviz.external import External, SourceError
from resviz.nn.discovery import MergeInfo, Residualized, ResidualMap, TraceError, residualize
from resviz.nn.scoped import eval_mode, net_lock
from resviz.zoo import ModelInfo

__all__ = [
    "PRESETS", "Prepared", "Preset", "SourceError", "TraceError", "build_preset", "count_macs", "count_params",
    "init_comparison", "load_weights", "measure_shape", "merge_channels", "merge_groups", "merge_label", "merge_rows",
    "original_state_dict", "prepare", "residualize_any", "train_nets", "twins", "twins_of",
]

MAC_BUDGET = 8e8  # forward multiply-accumulates one init measurement may spend per net (as resviz.analysis.initstats)
MAX_BATCH, MIN_BATCH = 16, 2
GROUP_CHUNK, GROUP_MAX = 12, 16  # a run of more than GROUP_MAX same-shape merges is shown in chunks of GROUP_CHUNK


@dataclass(frozen=True, eq=False)
class Prepared:
    """An external model ready for the app: the build, its residualized form (eval mode) and how to feed it."""

    external: External
    net: Residualized  # calls external.model's own modules (read-only); its merges are the discovered ones
    info: ModelInfo

    @property
    def residual_map(self) -> ResidualMap:
        return self.net.residual_map


def first_conv_channels(model: nn.Module, default: int = 3) -> int:
    """Input channels the model expects: those of its first convolution (``default`` when it has none)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)), None)
    return int(conv.in_channels) if conv is not None else default


def _imagenet_classes() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _model_info(ext: External, num_outputs: int, channels: int, input_size: int) -> ModelInfo:
    imagenet = num_outputs == 1000 and ext.spec.source in ("torchvision", "timm")
    classes = _imagenet_classes() if imagenet else tuple(f"class {i}" for i in range(num_outputs))
    return ModelInfo(name=f"{ext.spec} ({ext.weights})", source="any", dataset="imagenet" if imagenet else "unknown",
                     classes=classes, norm=_norm(ext, channels), channels=channels,
                     input_size=input_size, resize_size=round(input_size / 0.875) if imagenet else None,
                     extra={"spec": str(ext.spec), "weights": ext.weights, "note": ext.note, "params": ext.num_params})


def _norm(ext: External, channels: int) -> Normalization:
    """The architecture's normalisation; for another channel count, the average of its channels for each."""
    if len(ext.mean) == channels:
        return Normalization(ext.mean, ext.std)
    return Normalization.of(float(np.mean(ext.mean)), float(np.mean(ext.std)), channels)


def prepare(spec: str, *, input_size: int | None = None, max_params: int = external.MAX_PARAMS,
            cached_weights: bool = True, state: Mapping[str, torch.Tensor] | None = None,
            allowed: list[Any] | None = None) -> Prepared:
    """Build ``spec``, load ``state`` (checked key by key) when given, and residualize it.

    ``input_size`` overrides the architecture's own square input side (for Python files, whose
    expected size is unknown). The outputs name ImageNet's classes when a torchvision or timm model
    has 1000 of them.

    Raises:
        SourceError: unknown name, a file outside the allowed folders, too many parameters, weights
            that do not fit, or a model that fails on an input of that size.
        TraceError: the model cannot be traced (names the module and the construct).
    """
    ext = external.build(spec, allowed=allowed, max_params=max_params, cached_weights=cached_weights and state is None)
    if state is not None:
        external.load_state_checked(ext.model, state)
        ext = External(ext.model, ext.spec, ext.num_params, "uploaded weights", "", ext.input_size, ext.mean, ext.std)
    size = int(input_size or ext.input_size)
    channels = first_conv_channels(ext.model)
    x = torch.zeros(1, channels, size, size)
    try:
        with torch.no_grad():
            out = ext.model(x)
    except Exception as e:  # a wrong input size or channel count: the model's own words
        raise SourceError(f"{ext.spec} fails on a {channels}x{size}x{size} image: {type(e).__name__}: "
                          f"{str(e).strip()[:300]}") from e
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise SourceError(f"{ext.spec} is not a classifier: it returns {type(out).__name__}"
                          f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}, not (batch, classes) logits")
    net = residualize_any(ext.model, x, copy=False).eval()  # one set of weights in memory
    return Prepared(ext, net, _model_info(ext, int(out.shape[1]), channels, size))


def load_weights(data: bytes, filename: str) -> dict[str, torch.Tensor]:
    """A state dict from uploaded bytes: ``.safetensors``, or a ``.pt``/``.pth`` loaded with ``weights_only``.

    Raises:
        SourceError: another kind of file, damaged data, or something that is not a state dict.
    """
    name = filename.lower()
    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load

            state = load(data)
        elif name.endswith((".pt", ".pth")):
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        else:
            raise SourceError(f"{filename}: upload weights as .safetensors or a .pt/.pth state dict")
    except SourceError:
        raise
    except Exception as e:  # unreadable bytes in any format mean the same to the user
        raise SourceError(f"{filename} cannot be read as weights: {type(e).__name__}: {str(e)[:200]}") from e
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"{filename} holds no state dict (a mapping of parameter names to tensors)")
    return dict(state)


# -- residualizing any model ---------------------------------------------------------------------
# Attributes of a residualized model that a top-level submodule of the same name would shadow in the
# traced code (timm's ViT and EfficientNet keep their blocks in ``model.blocks``).
_RESERVED = frozenset({"blocks", "skips", "residual_map", "set_skips", "set_removed", "set_scale"})
ROOT_PREFIX = "model."


class Rooted(nn.Module):
    """``model`` one level down (as ``self.model``), so none of its names collides with the residualized
    model's own attributes; its state-dict keys gain :data:`ROOT_PREFIX`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def residualize_any(model: nn.Module, example_input: torch.Tensor, *, copy: bool = True) -> Residualized:
    """:func:`resviz.nn.discovery.residualize`, through :class:`Rooted` when a top-level name of ``model``
    would shadow an attribute of the result (``rooted`` on the result says so)."""
    rooted = bool(_RESERVED & set(dict(model.named_children())))
    out = residualize(Rooted(model) if rooted else model, example_input, copy=copy)
    out.rooted = rooted
    return out


def original_state_dict(net: Residualized) -> dict[str, torch.Tensor]:
    """``net``'s weights under the original architecture's names (loadable into the model it came from)."""
    state = net.state_dict()
    if getattr(net, "rooted", False):
        state = {k.removeprefix(ROOT_PREFIX): v for k, v in state.items()}
    return state


# -- merges for display ---------------------------------------------------------------------------
def merge_channels(m: MergeInfo) -> int:
    """Channels of a merge's maps: dim 1 of an image map ``(N, C, H, W)``, the last of tokens ``(N, T, D)``."""
    if len(m.shape) == 3:
        return int(m.shape[-1])
    return int(m.shape[1]) if len(m.shape) >= 2 else 1


def _where(m: MergeInfo) -> str:
    s = m.shape
    if len(s) == 4:
        return f"{s[2]}x{s[3]}, {s[1]} ch"
    if len(s) == 3:
        return f"{s[1]} tokens x {s[2]}"
    return "x".join(map(str, s[1:])) or "scalar"


def merge_label(m: MergeInfo) -> str:
    """A short label: ``"3 · layer2.0.merge (projection)"``."""
    return f"{m.index} · {m.name}{' (projection)' if m.shortcut == 'projection' else ''}"


def merge_groups(rmap: ResidualMap) -> list[tuple[str, list[int]]]:
    """Merges grouped for controls and diagrams: runs of consecutive merges with the same map shape
    (a stage, or one resolution), a long run split into chunks; ``(label, merge indices)`` in order."""
    runs: list[tuple[str, list[int]]] = []
    for m in rmap:
        where = _where(m)
        if runs and runs[-1][0] == where:
            runs[-1][1].append(m.index)
        else:
            runs.append((where, [m.index]))
    out: list[tuple[str, list[int]]] = []
    for where, idx in runs:
        chunks = [idx] if len(idx) <= GROUP_MAX else [idx[i : i + GROUP_CHUNK] for i in range(0, len(idx), GROUP_CHUNK)]
        for c in chunks:
            part = f", merges {c[0]}-{c[-1]}" if len(chunks) > 1 else ""
            out.append((f"group {len(out) + 1} ({where}{part})", c))
    return out


def merge_rows(rmap: ResidualMap, skips: Sequence[bool] | None = None, removed: Sequence[int] = ()) -> list[dict[str, Any]]:
    """One plain dict per merge for :func:`resviz.plots.merge_strip`: index, name, group, shortcut, shape,
    branch (module count), skip, removed."""
    group_of = {i: label for label, idx in merge_groups(rmap) for i in idx}
    return [{"index": m.index, "name": m.name, "group": group_of[m.index], "shortcut": m.shortcut,
             "shape": "x".join(map(str, m.shape[1:])), "branch": len(m.branch),
             "skip": True if skips is None else bool(skips[m.index]), "removed": m.index in removed} for m in rmap]


# -- size -----------------------------------------------------------------------------------------
def count_params(model: nn.Module) -> int:
    """Trainable parameters (each shared tensor once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass of one ``(C, H, W)`` input, from PyTorch's FLOP counter
    (convolutions, matrix products and attention; half its FLOPs). Modes are restored."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu")
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops()) // 2


# -- twins and the init-time comparison -----------------------------------------------------------
def _copy(net: Residualized) -> Residualized:
    """An independent copy of ``net`` with every merge untouched (skips on, nothing removed, scale 1)."""
    with net_lock(net):  # a net shared between sessions may be lesioned right now: copy between lesions
        twin = copy.deepcopy(net)
    twin.residual_map, twin.rooted = net.residual_map, getattr(net, "rooted", False)
    twin.set_skips(True)
    twin.set_removed([])
    twin.set_scale(1.0)
    return twin


def twins_of(net: Residualized) -> dict[str, Residualized]:
    """``{"residual": r, "plain": p}``: two copies of a residualized model with identical weights, every
    discovered skip of ``p`` off; ``net`` is not changed (its lock is held while it is copied).

    Raises:
        ValueError: the model has no residual merge (nothing to switch off).
    """
    if not len(net.residual_map):
        raise ValueError("no skip connections found: the model has no plain twin")
    residual, plain = _copy(net), _copy(net)
    plain.set_skips(False)
    return {"residual": residual, "plain": plain}


def twins(model: nn.Module, example_input: torch.Tensor) -> dict[str, Residualized]:
    """:func:`twins_of` the residualized ``model`` (traced once); ``model`` is not changed.

    Raises:
        ValueError: the model has no residual merge; TraceError when it cannot be traced.
    """
    return twins_of(residualize_any(model, example_input, copy=False))


def measure_shape(net: nn.Module, input_shape: tuple[int, int, int], macs: int) -> tuple[tuple[int, int, int], int]:
    """The input an init measurement uses and its MACs: ``input_shape``, or a smaller square side (a
    multiple of 32) when even ``MIN_BATCH`` images would exceed ``MAC_BUDGET`` and the model accepts it
    (a ViT with a fixed patch grid does not). Per-merge statistics at init depend on depth and design far
    more than on resolution."""
    c, side = input_shape[0], input_shape[-1]
    if macs * MIN_BATCH <= MAC_BUDGET or side <= 32:
        return input_shape, macs
    smaller = max(32, int(side * (MAC_BUDGET / (MIN_BATCH * macs)) ** 0.5) // 32 * 32)
    try:
        return (c, smaller, smaller), count_macs(net, (c, smaller, smaller))
    except Exception:  # the architecture fixes its input size
        return input_shape, macs


def init_comparison(net: Residualized, input_shape: tuple[int, int, int], num_classes: int, *,
                    batch_size: int | None = None, seed: int = 0, macs: int | None = None) -> dict[str, dict[str, Any]]:
    """Signal propagation and gradient norms per merge at initialisation, for a residualized model and its twin.

    Both are copies of ``net`` (left unchanged) and get one standard-normal batch with random labels in
    train mode (as a first optimisation step would); costly models get a smaller batch and, where they
    accept it, a smaller input (:func:`measure_shape`). Same layout as
    :func:`resviz.analysis.initstats.init_comparison`: ``{"residual": stats, "plain": stats, "meta": ...}``
    with ``mean_sq``, ``var``, ``branch_var``, ``grad_block``, ``grad_total`` per merge and ``loss``.
    """
    macs = count_macs(net, input_shape) if macs is None else macs
    shape, macs = measure_shape(net, input_shape, macs)
    n = batch_size or int(min(MAX_BATCH, max(MIN_BATCH, MAC_BUDGET // max(macs, 1))))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen)  # (N, C, H, W)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    out: dict[str, dict[str, Any]] = {"meta": {"batch_size": n, "input_size": shape[-1], "macs": macs}}
    for name, twin in twins_of(net).items():
        twin.train()
        stats = signal_prop(twin, x)
        grads = gradient_norms_by_layer(twin, x, y)
        keep = {k: grads[k] for k in ("grad_block", "grad_total", "loss")}
        out[name] = {k: v.numpy().astype(np.float64) for k, v in (stats | keep).items()}
        del twin
    return out


# -- small models to train ------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """A small timm architecture configured for the built-in data (classes and channels come from the data)."""

    label: str
    timm_name: str
    kwargs: tuple[tuple[str, Any], ...]
    input_size: int  # the square side the data is loaded at
    about: str


PRESETS: dict[str, Preset] = {
    "tiny-vit": Preset(
        "tiny ViT (4 blocks, width 64, patch 4)", "vit_tiny_patch16_224",
        (("img_size", 32), ("patch_size", 4), ("embed_dim", 64), ("depth", 4), ("num_heads", 2)), 32,
        "timm's ViT at 32x32: 64 patch tokens and a class token, 8 residual merges (attention and MLP of each block)."),
    "small-convnext": Preset(
        "small ConvNeXt (depths 1-1-2-1, widths 16-128)", "convnext_atto",
        (("depths", (1, 1, 2, 1)), ("dims", (16, 32, 64, 128)), ("ls_init_value", None)), 32,
        "timm's ConvNeXt at 32x32 with 5 residual merges; layer scale off, so the skips-off twin is not "
        "silenced by a 1e-6 scale on every branch."),
}


def build_preset(key: str, *, num_classes: int, channels: int, seed: int = 0) -> nn.Module:
    """The preset ``key`` with seeded random weights for ``num_classes`` classes and ``channels`` input channels."""
    import timm

    p = PRESETS[key]

    def builder() -> nn.Module:
        return timm.create_model(p.timm_name, pretrained=False, num_classes=num_classes, in_chans=channels, **dict(p.kwargs))

    with torch.random.fork_rng(devices=[]):  # seeded weights; the process's RNG is left as it was
        torch.manual_seed(seed)
        return builder()


def train_nets(key: str, *, num_classes: int, channels: int, seed: int = 0, twin: bool = True) -> dict[str, nn.Module]:
    """The nets a run of preset ``key`` trains: ``{"residual"}``, plus its skips-off ``"plain"`` twin (same
    initial weights) when ``twin``."""
    model = build_preset(key, num_classes=num_classes, channels=channels, seed=seed)
    x = torch.zeros(1, channels, PRESETS[key].input_size, PRESETS[key].input_size)
    nets = twins(model, x) if twin else {"residual": residualize_any(model, x)}
    return {k: v.train() for k, v in nets.items()}


def spread(values: np.ndarray) -> float:
    """max/min of the positive, finite entries (NaN when none): how unevenly gradient reaches the merges."""
    live = values[np.isfinite(values) & (values > 0)]
    return float(live.max() / live.min()) if len(live) else math.nan
