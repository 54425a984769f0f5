"""Captum adapters behind one call shape, plus simple scores for judging a heatmap.

``attribute(net, x, method, target=..., block=...)`` runs Integrated Gradients, Saliency, Grad-CAM or
Occlusion on one image and returns an :class:`Attribution` whose ``heatmap`` is a 2-D map at the input
resolution. The net is switched to eval mode for the call and every module's mode is restored after;
Captum registers its hooks in ``try``/``finally``, so none survive, even when the forward pass raises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion, Saliency
from torch import nn

from resviz.nn.layout import layout_of, to_maps
from resviz.nn.merge import junctions
from resviz.nn.scoped import eval_mode

METHODS = ("integrated_gradients", "saliency", "gradcam", "occlusion")
SIGNS = ("absolute", "positive", "negative")
TOKEN_TRIES = 4  # default Grad-CAM of a token model: how many final blocks to try for a non-zero map
IG_INTERNAL_BATCH = 16  # IG steps evaluated per forward pass: bounds memory for big nets and images
_DEFAULT_SIGN = {"integrated_gradients": "absolute", "saliency": "absolute", "gradcam": "positive", "occlusion": "positive"}


@dataclass(frozen=True)
class Attribution:
    """One attribution of one image."""

    method: str  # one of METHODS
    target: int  # the explained class
    raw: torch.Tensor  # (C, H, W) input attribution; Grad-CAM: (1, h, w) at the block's resolution
    heatmap: torch.Tensor  # (H, W) at input resolution, in [0, 1] (divided by its maximum)
    delta: float | None = None  # IG only: sum(raw) - (f(x) - f(baseline)), the completeness error


def _as_batch(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A detached (1, C, H, W) float copy of ``x`` on the net's device."""
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image of shape (C, H, W) or (1, C, H, W), got {tuple(x.shape)}")
    param = next(net.parameters(), None)
    device = param.device if param is not None else x.device
    return x.detach().to(device=device, dtype=torch.float32).clone()


def _check_target(net: nn.Module, x: torch.Tensor, target: int | None) -> int:
    with torch.no_grad():
        logits = net(x)  # (1, K)
    if target is None:
        return int(logits.argmax(1).item())
    if not 0 <= int(target) < logits.shape[1]:
        raise ValueError(f"target {target} is out of range: the net has {logits.shape[1]} classes")
    return int(target)


# -- methods: each returns (raw attribution, heatmap before normalisation, IG delta) --------------
Result = tuple[torch.Tensor, torch.Tensor, float | None]


def _integrated_gradients(
    net: nn.Module, x: torch.Tensor, target: int, block: int | None, *, n_steps: int = 50,
    baseline: torch.Tensor | float = 0.0, internal_batch_size: int | None = None, method: str = "gausslegendre",
) -> Result:
    """Integrated Gradients from ``baseline`` (0 = the dataset mean in normalised units)."""
    attr, delta = IntegratedGradients(net).attribute(
        x, baselines=baseline, target=target, n_steps=n_steps, method=method,
        internal_batch_size=internal_batch_size or min(n_steps, IG_INTERNAL_BATCH), return_convergence_delta=True,
    )
    return attr[0], attr[0].sum(0), float(delta.item())


def _saliency(net: nn.Module, x: torch.Tensor, target: int, block: int | None) -> Result:
    """|d logit / d x|; the map takes each pixel's largest channel (Simonyan et al. 2014)."""
    attr = Saliency(net).attribute(x.requires_grad_(), target=target, abs=True)[0]  # (C, H, W)
    return attr, attr.amax(0), None


def _gradcam(
    net: nn.Module, x: torch.Tensor, target: int, block: int | None, *, relu: bool = True,
    interpolate_mode: str = "bilinear",
) -> Result:
    """Grad-CAM at the output of block ``block`` (default: the last one), upsampled to the input.

    Blocks are the parents of the net's merge modules, in :func:`resviz.nn.merge.junctions` order. A
    block whose output is not (B, C, H, W) (a token model's (B, N, C), a Swin block's (B, H, W, C)) is
    explained on its maps (:func:`resviz.nn.layout.to_maps`: the patch grid, class tokens dropped). In
    a ViT whose head reads the class token, the last blocks' patch tokens have no gradient: by default
    (``block=None``) a token model's Grad-CAM is taken at the last of its final ``TOKEN_TRIES`` blocks
    whose map is not all zero.
    """
    try:
        blocks = [j.block for j in junctions(net)]
    except ValueError as e:
        raise ValueError(f"gradcam needs a net with residual blocks (merge modules): {e}") from None
    index = len(blocks) - 1 if block is None else block
    if not -len(blocks) <= index < len(blocks):
        raise ValueError(f"block {block} is out of range: the net has {len(blocks)} blocks")
    layout = layout_of(blocks[index])
    if layout[0] == "nchw":
        cam = LayerGradCam(net, blocks[index]).attribute(x, target=target, relu_attributions=relu)  # (1, 1, h, w)
    else:
        cam = _grid_gradcam(net, x, target, blocks[index], layout, relu)
        while block is None and not cam.any() and index > max(0, len(blocks) - TOKEN_TRIES):
            index -= 1  # a class-token head: the last blocks' patch tokens never reach the logits
            cam = _grid_gradcam(net, x, target, blocks[index], layout_of(blocks[index]), relu)
    up = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode)  # (1, 1, H, W)
    return cam[0], up[0, 0], None


def _grid_gradcam(net: nn.Module, x: torch.Tensor, target: int, layer: nn.Module,
                  layout: tuple[str, tuple[int, int] | None], relu: bool) -> torch.Tensor:
    """Grad-CAM (as Captum's ``LayerGradCam`` computes it) on the maps of a layer of another layout: (1, 1, h, w).

    Weights: the gradient of the target logit averaged over the map's positions, per channel; the cam
    is the weighted sum of the layer's maps over channels.
    """
    seen: list[torch.Tensor] = []

    def keep(_m: nn.Module, _i: tuple, out: torch.Tensor) -> torch.Tensor:
        seen.append(out)
        return out.clone()  # the model goes on with a copy: its in-place ops (ReLU(inplace=True)) leave ``out`` alone

    handle = layer.register_forward_hook(keep)
    try:
        logits = net(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[0, target], seen[-1])
    acts, grads = to_maps(seen[-1].detach(), *layout), to_maps(grad, *layout)  # (1, C, h, w)
    cam = (grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1, keepdim=True)
    return cam.relu() if relu else cam


def _occlusion(
    net: nn.Module, x: torch.Tensor, target: int, block: int | None, *, window: int | None = None,
    stride: int | None = None, baseline: float = 0.0, perturbations_per_eval: int = 32,
) -> Result:
    """Drop in the target logit when a ``window``-sized square is set to ``baseline`` (all channels).

    Defaults: window = 1/8 of the shorter side, stride = half the window; ``perturbations_per_eval``
    occluded copies run in each forward pass.
    """
    c, h, w = x.shape[1:]
    window = window or max(1, min(h, w) // 8)
    stride = stride or max(1, window // 2)
    attr = Occlusion(net).attribute(
        x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride), baselines=baseline,
        target=target, perturbations_per_eval=perturbations_per_eval,
    )[0]
    return attr, attr.sum(0), None


_METHODS: dict[str, Callable[..., Result]] = {
    "integrated_gradients": _integrated_gradients, "saliency": _saliency, "gradcam": _gradcam, "occlusion": _occlusion,
}


def normalize_heatmap(values: torch.Tensor, sign: str = "absolute") -> torch.Tensor:
    """Keep the requested sign of a 2-D map and scale it into [0, 1] by its maximum.

    Non-finite values become 0; an all-zero map stays all zero.
    """
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {', '.join(SIGNS)}, got {sign!r}")
    v = torch.nan_to_num(values.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    v = v.abs() if sign == "absolute" else (v.clamp(min=0) if sign == "positive" else (-v).clamp(min=0))
    top = v.max() if v.numel() else torch.tensor(0.0)
    return v / top if top > 0 else torch.zeros_like(v)


def attribute(
    net: nn.Module, x: torch.Tensor, method: str, *, target: int | None = None, block: int | None = None,
    sign: str | None = None, **opts: object,
) -> Attribution:
    """Explain ``net``'s output for one image with a Captum method.

    Args:
        net: any classifier; ``gradcam`` also needs residual blocks (merge modules, see :mod:`resviz.nn.merge`).
        x: one normalised image, (C, H, W) or (1, C, H, W).
        method: "integrated_gradients", "saliency", "gradcam" or "occlusion".
        target: class to explain; defaults to the predicted class.
        block: Grad-CAM layer, a block index (the i-th merge's block; default: last); other methods ignore it.
        sign: which part of the map to show ("absolute", "positive", "negative"); a per-method default.
        **opts: method options: IG ``n_steps``, ``baseline``, ``internal_batch_size``, ``method``;
            Grad-CAM ``relu``, ``interpolate_mode``; Occlusion ``window``, ``stride``, ``baseline``,
            ``perturbations_per_eval``.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    x = _as_batch(net, x)
    with eval_mode(net), torch.enable_grad():
        target = _check_target(net, x, target)
        raw, flat, delta = _METHODS[method](net, x, target, block, **opts)
    heatmap = normalize_heatmap(flat, sign or _DEFAULT_SIGN[method])
    return Attribution(method=method, target=target, raw=raw.detach(), heatmap=heatmap, delta=delta)


# -- scoring -------------------------------------------------------------------------------------
def _np(a: torch.Tensor | np.ndarray) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def pointing_game(heatmap: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray, *, tolerance: int = 0) -> bool:
    """Whether the heatmap's peak falls on the object (Zhang et al. 2016).

    Args:
        heatmap: (H, W) scores; NaN counts as no evidence.
        mask: (H, W) bool, True on the object.
        tolerance: grow the mask by this many pixels first (the paper uses 15 px at 224 px).

    Returns:
        True when at least half of the maximal pixels lie in the (grown) mask; False for a flat map.
    """
    h, m = _np(heatmap).astype(np.float64), _np(mask).astype(bool)
    if h.shape != m.shape or h.ndim != 2:
        raise ValueError(f"heatmap {h.shape} and mask {m.shape} must be the same 2-D shape")
    h = np.where(np.isfinite(h), h, -np.inf)
    if not np.isfinite(h.max()) or h.max() == h.min():
        return False
    if tolerance > 0:
        t = torch.from_numpy(m.astype(np.float32))[None, None]
        m = F.max_pool2d(t, 2 * tolerance + 1, stride=1, padding=tolerance)[0, 0].numpy() > 0
    peaks = h == h.max()
    return bool(m[peaks].mean() >= 0.5)


def deletion_curve(
    net: nn.Module, x: torch.Tensor, heatmap: torch.Tensor | np.ndarray, target: int, *, steps: int = 16,
    baseline: float = 0.0, batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Target probability as the most important pixels are deleted first (Petsiuk et al. 2018).

    Returns:
        ``(fractions, probs)``, each of length ``steps + 1``: fraction of pixels set to ``baseline``
        (all channels) and the softmax probability of ``target`` then.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = _as_batch(net, x)
    h, w = x.shape[-2:]
    scores = torch.from_numpy(np.nan_to_num(_np(heatmap).astype(np.float32), nan=-np.inf)).reshape(-1)
    if scores.numel() != h * w:
        raise ValueError(f"heatmap has {scores.numel()} values but the image has {h}x{w} pixels")
    rank = torch.empty(h * w, dtype=torch.long)
    rank[torch.argsort(scores, descending=True, stable=True)] = torch.arange(h * w)  # 0 = most important
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = torch.from_numpy(np.rint(fractions * h * w).astype(np.int64))
    masks = (rank[None] < counts[:, None]).reshape(-1, 1, h, w).to(x.device, x.dtype)  # (S+1, 1, H, W)
    probs = []
    with eval_mode(net), torch.no_grad():
        for chunk in masks.split(batch_size):
            batch = x * (1 - chunk) + baseline * chunk  # (b, C, H, W)
            probs.append(net(batch).softmax(1)[:, target].float().cpu())
    return fractions, torch.cat(probs).numpy()


def deletion_score(
    net: nn.Module, x: torch.Tensor, heatmap: torch.Tensor | np.ndarray, target: int, *, steps: int = 16,
    baseline: float = 0.0,
) -> float:
    """Area under the deletion curve, in [0, 1]; lower means the heatmap found what the net relies on."""
    fractions, probs = deletion_curve(net, x, heatmap, target, steps=steps, baseline=baseline)
    return float(np.sum((probs[1:] + probs[:-1]) / 2 * np.diff(fractions)))
