"""Forward instruments: branch magnitudes, signal propagation and raw activations."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from resviz.analysis.probes.base import Probe, Rows, Tensor
from resviz.nn.layout import channels_first, layout_of, to_maps

F32 = torch.float32
LOW = (torch.bfloat16, torch.float16)  # autocast dtypes: reduced with float32 accumulation, never copied to float32


def norm_f32(x: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """L2 norm as float32: low-precision tensors are read as they are, with float32 accumulation."""
    if x.dtype in LOW:
        return torch.linalg.vector_norm(x, dim=dim, dtype=F32)
    return torch.linalg.vector_norm(x.float(), dim=dim)


def _per_sample(x: Tensor, channels_last: bool) -> Tensor:
    """``x`` as one row per sample, (N, D), in NHWC element order when ``channels_last``; dtype kept.

    Flattening a channels-last map in NCHW order copies it; reading it in its own memory order is a
    view. A per-sample norm or dot product does not depend on the order as long as both operands use
    the same one (``channels_last`` is decided once per block, from F(x)).
    """
    x = x.detach()
    if channels_last and x.dim() == 4:
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view of the same memory for channels-last maps
    return x.reshape(x.shape[0], -1)


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _stats(x: Tensor, channels_last: bool) -> tuple[Tensor, Tensor]:
    """Per-sample rows (input dtype) and their float32 L2 norms: (N, D), (N,).

    ``dtype=float32`` makes the reduction accumulate in float32 while it reads a bf16/fp16 map (under
    CUDA autocast) directly, instead of first writing a float32 copy twice its size.
    """
    flat = _per_sample(x, channels_last)
    return flat, norm_f32(flat, 1)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row dot products in float32: (N,). Low-precision rows are multiplied in their own dtype (each
    product rounded once, unbiased) and summed in float32; float32 rows use ``vecdot`` as before."""
    if a.dtype in LOW and b.dtype in LOW:
        return (a * b).sum(1, dtype=F32)
    return torch.linalg.vecdot(a.float(), b.float())


def channel_var_mean(x: Tensor) -> tuple[Tensor, Tensor]:
    """Population variance and mean of each channel of an ``(N, C, H, W)`` map over N, H, W: (C,), (C,).

    float32 maps: two passes (mean, then mean squared deviation) instead of ``torch.var_mean(dim=(0, 2,
    3))``, whose CPU kernel is much slower on these shapes in either memory layout (bench/bench.py's
    instrument rows show the cost); agrees with it to float32 rounding. bf16/fp16 maps (CUDA autocast):
    one read each for the sum and the sum of squares, accumulated in float32, then var = E[x^2] - E[x]^2
    (clamped at 0) -- the two-pass version would first write a float32 copy and two float32 temporaries,
    five times the memory traffic.
    """
    x = x.detach()
    dims = (0, *range(2, x.dim()))
    if x.dtype not in LOW:
        x = x.float()
        mean = x.mean(dims, keepdim=True)  # (1, C, 1, 1)
        var = (x - mean).square().mean(dims)
        return var, mean.flatten()
    count = x.numel() // x.shape[1]
    mean = x.sum(dims, dtype=F32) / count
    mean_sq = norm_f32(x, dims).square() / count
    return (mean_sq - mean.square()).clamp_min(0.0), mean


class BranchMagnitudes(Probe):
    """How big the residual branch is next to the shortcut, per block and per forward call.

    ``f_norm`` / ``s_norm``: L2 norm of F(x) / S(x) per sample, averaged over the batch.
    ``ratio = f_norm / s_norm`` (ratio of the batch averages). ``cosine``: cosine between F(x) and S(x)
    per sample (0 when either is exactly zero), averaged over the batch. When S is absent (skip off),
    ``s_norm`` is 0 and ``ratio``/``cosine`` are NaN; when F is absent (removed block), ``f_norm`` and
    ``ratio`` are 0 and ``cosine`` is NaN.
    """

    KEYS = ("f_norm", "s_norm", "ratio", "cosine")

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self._rows = Rows(self.KEYS, len(self.blocks))

    def _attach(self) -> None:
        for i, j in enumerate(self.blocks):
            self._handles.append(j.merge.register_forward_hook(self._hook(i)))

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, inputs: tuple, _out: Tensor) -> None:
            if self._on:
                for slot, value in enumerate(self._measure(*inputs)):
                    self._rows.put(slot, i, value)

        return hook

    @staticmethod
    def _measure(f: Tensor | None, s: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ref = f if f is not None else s
        zero = torch.zeros((), device=ref.device)
        nan = torch.full((), math.nan, device=ref.device)
        cl = _is_channels_last(ref)
        ff, fn = _stats(f, cl) if f is not None else (None, None)
        ss, sn = _stats(s, cl) if s is not None else (None, None)
        f_norm = fn.mean() if fn is not None else zero
        s_norm = sn.mean() if sn is not None else zero
        if ff is None or ss is None:
            return f_norm, s_norm, (zero if ss is not None else nan), nan
        cos = _row_dot(ff, ss) / (fn * sn).clamp_min(torch.finfo(F32).tiny)
        return f_norm, s_norm, f_norm / s_norm, cos.mean()

    def _collect(self, clear: bool) -> dict[str, Tensor]:
        return self._rows.take(clear)


class SignalProp(Probe):
    """Signal-propagation statistics per block (Brock et al. 2021, "Characterizing signal propagation").

    Per forward call, at each block output y: ``mean_sq`` = mean over channels of (mean over N,H,W of y)^2,
    ``var`` = mean over channels of the variance over N,H,W of y; ``branch_var`` = the same average
    channel variance of F(x) at the merge (NaN for a removed block). Variances are population variances
    (divide by N*H*W). Channels are where the block's layout puts them (:mod:`resviz.nn.layout`): the
    last dimension of a token model's (B, N, C) or a Swin block's (B, H, W, C), every token a position.
    """

    KEYS = ("mean_sq", "var", "branch_var")

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self._rows = Rows(self.KEYS, len(self.blocks))

    def _attach(self) -> None:
        for i, j in enumerate(self.blocks):
            layout = layout_of(j.block)[0]
            self._handles.append(j.block.register_forward_hook(self._out_hook(i, layout)))
            self._handles.append(j.merge.register_forward_hook(self._merge_hook(i, layout)))

    def _out_hook(self, i: int, layout: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _inputs: tuple, out: Tensor) -> None:
            if self._on:
                var, mean = channel_var_mean(channels_first(out, layout))
                self._rows.put(0, i, mean.square().mean())
                self._rows.put(1, i, var.mean())

        return hook

    def _merge_hook(self, i: int, layout: str) -> Callable[..., None]:
        def hook(_m: nn.Module, inputs: tuple, _out: Tensor) -> None:
            f = inputs[0]
            if self._on and f is not None:
                self._rows.put(2, i, channel_var_mean(channels_first(f, layout))[0].mean())

        return hook

    def _collect(self, clear: bool) -> dict[str, Tensor]:
        return self._rows.take(clear)


class Activations(Probe):
    """Detached feature maps per block: F(x), S(x), their sum and the block output.

    Args:
        net: a net with merge modules (a ResViz net, a single block).
        max_channels: keep only the first ``max_channels`` channels of each map (copied, so the rest
            of the activation is not kept alive).
        blocks: indices of the blocks to tap (default all); ``.indices`` lists them.

    Every forward call is kept; ``result()`` concatenates the calls along the batch dimension. Maps are
    ``(N, C, h, w)`` whatever the block's layout (:func:`resviz.nn.layout.to_maps`): a token model's
    (B, N, C) tokens are shown on the patch grid (class tokens dropped), a Swin block's (B, H, W, C)
    maps channels first, a (B, C) vector as 1x1 maps.
    """

    def __init__(self, net: nn.Module, max_channels: int | None = None, blocks: Sequence[int] | None = None) -> None:
        super().__init__(net)
        n = len(self.blocks)
        self.indices = list(range(n)) if blocks is None else [int(i) for i in blocks]
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"block indices out of range 0..{n - 1}: {bad}")
        if max_channels is not None and max_channels < 1:
            raise ValueError(f"max_channels must be >= 1, got {max_channels}")
        self.max_channels = max_channels
        self._layouts = [layout_of(self.blocks[i].block) for i in self.indices]
        # A traced model's merge output may be overwritten later by an in-place op (torchvision's
        # ReLU(inplace=True) after ``out += identity``): its maps are copied. ResViz's blocks need no copy.
        self._copy = [getattr(self.blocks[i].block, "info", None) is not None for i in self.indices]
        self._store: list[dict[str, list[Tensor | None]]] = [self._empty() for _ in self.indices]

    @staticmethod
    def _empty() -> dict[str, list[Tensor | None]]:
        return {"f": [], "s": [], "sum": [], "out": []}

    def _keep(self, t: Tensor | None, layout: tuple[str, tuple[int, int] | None], copy: bool) -> Tensor | None:
        if t is None:
            return None
        t = t.detach() if layout[0] == "other" else to_maps(t.detach(), *layout)  # "other": kept as it is
        if self.max_channels is not None:
            return t[:, : self.max_channels].clone()
        return t.clone() if copy else t

    def _attach(self) -> None:
        for k, i in enumerate(self.indices):
            merge_hook, out_hook = self._hooks(self._store[k], self._layouts[k], self._copy[k])
            self._handles.append(self.blocks[i].merge.register_forward_hook(merge_hook))
            self._handles.append(self.blocks[i].block.register_forward_hook(out_hook))

    def _hooks(self, store: dict[str, list[Tensor | None]], layout: tuple[str, tuple[int, int] | None],
               copy: bool) -> tuple[Callable[..., None], Callable[..., None]]:
        def merge_hook(_m: nn.Module, inputs: tuple, out: Tensor) -> None:
            if self._on:
                store["f"].append(self._keep(inputs[0], layout, copy))
                store["s"].append(self._keep(inputs[1], layout, copy))
                store["sum"].append(self._keep(out, layout, copy))

        def out_hook(_m: nn.Module, _inputs: tuple, out: Tensor) -> None:
            if self._on:
                store["out"].append(self._keep(out, layout, copy))

        return merge_hook, out_hook

    def result(self) -> list[dict[str, Tensor | None]]:  # type: ignore[override]
        """One dict per tapped block; a map is ``None`` if it was absent in any recorded call."""
        return [
            {k: None if not v or any(t is None for t in v) else torch.cat(v).cpu() for k, v in store.items()}
            for store in self._store
        ]

    def drain(self) -> list[dict[str, Tensor | None]]:  # type: ignore[override]
        res = self.result()
        self.reset()
        return res

    def reset(self) -> None:
        for store in self._store:
            for values in store.values():
                values.clear()  # in place: the hooks hold these lists
