"""Inspect one image: predictions, per-block feature maps and branch magnitudes, lesions, attributions.

Everything here returns plain data (numpy arrays, floats, tuples) so the app can cache and plot it.
Lesions (skip connections turned off, residual branches removed) are applied to the net's run-time
flags inside :func:`resviz.nn.scoped.lesioned`, which holds a per-net lock and restores every flag and
module mode on exit: a net shared between app sessions is never left modified, and two sessions never
interleave. Nets are addressed through their merges (:mod:`resviz.nn.merge`), so any model whose blocks
route F(x) + S(x) through a merge module can be inspected; block ``i`` is the i-th merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from resviz.analysis.attribution import attribute
from resviz.analysis.probes import Activations, BranchMagnitudes
from resviz.nn.merge import merges
from resviz.nn.scoped import INTACT, Lesion, lesioned, net_lock

__all__ = [
    "CHANNEL_ORDERS", "INTACT", "BlockMaps", "Comparison", "Heatmap", "Inspection", "Lesion", "Prediction", "compare",
    "explain", "inspect_image", "label_of", "lesioned", "net_lock", "nonfinite_problem", "pick_channels", "predict",
    "removal_effects", "top_k",
]

CHANNEL_ORDERS = ("index", "strongest")


@dataclass(frozen=True)
class Prediction:
    """One class with its softmax probability."""

    index: int
    label: str
    prob: float


@dataclass(frozen=True)
class BlockMaps:
    """Feature maps of one image at one block's merge point, for a subset of its channels."""

    block: int
    channels: tuple[int, ...]  # which of the block's channels the maps hold, in display order
    total_channels: int
    f: np.ndarray | None  # (c, H, W) F(x); None when the block is removed
    s: np.ndarray | None  # (c, H, W) S(x); None when the skip connection is off
    sum: np.ndarray  # (c, H, W) F(x) + S(x), what the block's ``post`` receives


@dataclass(frozen=True)
class Inspection:
    """What one forward pass of one image shows."""

    probs: np.ndarray  # (K,) softmax probabilities
    top: tuple[Prediction, ...]  # the k most probable classes, best first
    f_norm: np.ndarray  # (B,) ||F(x)|| per block (0 for a removed block)
    s_norm: np.ndarray  # (B,) ||S(x)|| per block (0 when the skip is off)
    maps: BlockMaps | None  # feature maps of the requested block
    problem: str = ""  # where NaN/Inf entered this pass, in user-facing words; "" when every number is finite


def label_of(classes: Sequence[str] | None, i: int) -> str:
    return str(classes[i]) if classes is not None and 0 <= i < len(classes) else f"class {i}"


def top_k(probs: np.ndarray, classes: Sequence[str] | None, k: int = 5) -> tuple[Prediction, ...]:
    """The ``k`` most probable classes (ties broken by class index)."""
    order = np.argsort(-probs, kind="stable")[: max(1, k)]
    return tuple(Prediction(int(i), label_of(classes, int(i)), float(probs[i])) for i in order)


def pick_channels(sum_map: torch.Tensor, count: int, order: str = "index", start: int = 0) -> tuple[int, ...]:
    """Channels to show from a ``(C, H, W)`` map: ``count`` of them from ``start``, or the strongest.

    ``order="strongest"`` ranks channels by mean |F(x) + S(x)| and ignores ``start``.
    """
    if order not in CHANNEL_ORDERS:
        raise ValueError(f"order must be one of {', '.join(CHANNEL_ORDERS)}, got {order!r}")
    c = sum_map.shape[0]
    count = max(1, min(int(count), c))
    if order == "strongest":
        energy = sum_map.abs().flatten(1).mean(1)
        return tuple(int(i) for i in torch.argsort(energy, descending=True, stable=True)[:count])
    start = max(0, min(int(start), c - count))
    return tuple(range(start, start + count))


def _as_batch(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x[None] if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (C, H, W) or (1, C, H, W), got {tuple(x.shape)}")
    p = next(net.parameters(), None)
    return x.detach().to(device=p.device if p is not None else x.device, dtype=torch.float32)


def _block_maps(taps: dict[str, torch.Tensor | None], block: int, channels: int, order: str, start: int) -> BlockMaps:
    total = taps["sum"][0]  # (C, H, W)
    chosen = pick_channels(total, channels, order, start)
    idx = torch.tensor(chosen, dtype=torch.long)

    def take(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else t[0].index_select(0, idx).numpy().copy()

    return BlockMaps(block, chosen, int(total.shape[0]), take(taps["f"]), take(taps["s"]), take(taps["sum"]))


def inspect_image(
    net: nn.Module, x: torch.Tensor, *, classes: Sequence[str] | None = None, lesion: Lesion = INTACT, k: int = 5,
    block: int | None = 0, channels: int = 16, channel_order: str = "index", channel_start: int = 0,
) -> Inspection:
    """Run one image through ``net`` (with ``lesion`` applied) and record what the Inspect page shows.

    One forward pass: branch magnitudes at every block, feature maps only at ``block`` (``None``: none),
    so the cost stays close to a plain forward even for ImageNet nets.

    Args:
        net: a net with merge modules (a ResViz net); its flags and modes are restored afterwards.
        x: one normalised image, (C, H, W) or (1, C, H, W).
        classes: class names (index -> name); missing names become "class i".
        lesion: skip/removed flags to apply for this pass.
        k: number of top predictions.
        block: block whose F(x), S(x) and sum maps are kept.
        channels: how many channels of those maps to keep.
        channel_order: "index" (``channels`` from ``channel_start``) or "strongest" (largest mean |sum|).
        channel_start: first channel for ``channel_order="index"``.
    """
    x = _as_batch(net, x)
    n = len(merges(net))
    if block is not None and not 0 <= block < n:
        raise ValueError(f"block {block} is out of range: the net has {n} blocks")
    with ExitStack() as stack:
        stack.enter_context(lesioned(net, lesion))
        stack.enter_context(torch.no_grad())
        mags = stack.enter_context(BranchMagnitudes(net))
        acts = stack.enter_context(Activations(net, blocks=[block])) if block is not None else None
        probs = net(x).float().softmax(1)[0].cpu().numpy()  # (K,)
        m = mags.result()
        maps = _block_maps(acts.result()[0], block, channels, channel_order, channel_start) if acts else None
        f_norm, s_norm = m["f_norm"][-1].numpy(), m["s_norm"][-1].numpy()
        problem = nonfinite_problem(net, x, f_norm, s_norm, probs)
    return Inspection(probs, top_k(probs, classes, k), f_norm, s_norm, maps, problem)


def nonfinite_problem(net: nn.Module, x: torch.Tensor, f_norm: np.ndarray, s_norm: np.ndarray, probs: np.ndarray) -> str:
    """Where NaN/Inf entered one forward pass, in user-facing words ("" when all of it is finite).

    The weights are searched only when a symptom shows (a non-finite norm or probability), so a clean
    pass costs nothing extra; the first cause found is named: the input, the weights, or an overflow.
    """
    bad_in = int((~torch.isfinite(x)).sum())
    if bad_in:
        return (f"the input image holds {bad_in} NaN/Inf value{'s' if bad_in != 1 else ''}, so the predictions and maps "
                "computed from it are meaningless")
    blocks = np.flatnonzero(~(np.isfinite(f_norm) & np.isfinite(s_norm)))
    if not len(blocks) and np.isfinite(probs).all():
        return ""
    named = (*net.named_parameters(), *net.named_buffers())
    tensors = [n for n, t in named if t.is_floating_point() and not torch.isfinite(t).all()]
    if tensors:
        more = f" and {len(tensors) - 3} more" if len(tensors) > 3 else ""
        return f"the net's weights hold NaN/Inf values ({', '.join(tensors[:3])}{more}), so its outputs are meaningless"
    where = f"from block {int(blocks[0])} on" if len(blocks) else "in the classifier"
    return f"the activations overflow to NaN/Inf {where}: the weights or the input are too large for float32"


def predict(net: nn.Module, x: torch.Tensor, lesion: Lesion = INTACT) -> np.ndarray:
    """Softmax probabilities ``(N, K)`` of a batch (or ``(K,)`` of one image) under ``lesion``."""
    single = x.dim() == 3
    p = next(net.parameters(), None)
    xb = (x[None] if single else x).to(device=p.device if p is not None else x.device, dtype=torch.float32)
    with lesioned(net, lesion), torch.no_grad():
        probs = net(xb).float().softmax(1).cpu().numpy()
    return probs[0] if single else probs


@dataclass(frozen=True)
class Comparison:
    """How a lesioned net's prediction for one image differs from the intact net's."""

    kl: float  # KL(intact || lesioned) in nats
    top1_agree: bool  # both pick the same class
    topk_overlap: float  # fraction of the intact top-k that stays in the lesioned top-k
    delta_conf: float  # lesioned minus intact probability of the intact top-1 class
    rows: tuple[tuple[int, str, float, float], ...]  # (class, label, p_intact, p_lesioned) over both top-k


def compare(intact: np.ndarray, lesioned_probs: np.ndarray, classes: Sequence[str] | None = None, k: int = 5) -> Comparison:
    """Compare two probability vectors of the same image (intact vs lesioned net)."""
    p, q = np.asarray(intact, np.float64), np.asarray(lesioned_probs, np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"expected two (K,) probability vectors, got {p.shape} and {q.shape}")
    eps = 1e-12
    kl = float(np.sum(p * (np.log(p + eps) - np.log(q + eps))))
    tp, tq = [t.index for t in top_k(p, None, k)], [t.index for t in top_k(q, None, k)]
    union = tp + [i for i in tq if i not in tp]
    rows = tuple((i, label_of(classes, i), float(p[i]), float(q[i])) for i in union)
    overlap = len(set(tp) & set(tq)) / len(tp)
    return Comparison(max(kl, 0.0), tp[0] == tq[0], overlap, float(q[tp[0]] - p[tp[0]]), rows)


def removal_effects(net: nn.Module, x: torch.Tensor, lesion: Lesion = INTACT, target: int | None = None) -> np.ndarray:
    """Probability of ``target`` (default: the predicted class) when each block alone is also removed.

    Veit et al. (2016) found that residual nets barely notice losing one block while plain nets
    collapse; entry ``i`` is the target probability with block ``i`` removed on top of ``lesion``.
    """
    x = _as_batch(net, x)
    base = predict(net, x[0], lesion)
    target = int(np.argmax(base)) if target is None else int(target)
    out = np.empty(len(merges(net)), np.float32)
    for i in range(len(out)):
        extra = Lesion(skips=lesion.skips, removed=(*lesion.removed, i))
        out[i] = predict(net, x[0], extra)[target]
    return out


@dataclass(frozen=True)
class Heatmap:
    """An attribution map for overlaying on the image."""

    method: str
    target: int
    heatmap: np.ndarray  # (H, W) in [0, 1] at input resolution
    delta: float | None  # Integrated Gradients' completeness error


def explain(
    net: nn.Module, x: torch.Tensor, method: str, *, lesion: Lesion = INTACT, target: int | None = None,
    block: int | None = None, **opts: object,
) -> Heatmap:
    """Captum attribution of one image under ``lesion`` (see :func:`resviz.analysis.attribution.attribute`)."""
    with lesioned(net, lesion):
        a = attribute(net, x, method, target=target, block=block, **opts)
    return Heatmap(a.method, a.target, a.heatmap.cpu().numpy(), a.delta)
