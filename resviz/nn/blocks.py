"""Residual blocks with named, hookable parts.

Every block computes ``y = post(F(x) + S(x))``: ``branch`` is the residual branch F, ``shortcut`` is S
(identity or a projection), ``merge`` adds them and ``post`` is whatever the chosen order applies after
the addition. Each activation is its own module and nothing is computed in place, so hooks and Captum
see every intermediate tensor.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F  # the functional API; F(x) in the docs is the branch
from torch import nn

from resviz.config import BlockConfig
from resviz.nn.merge import Merge


def make_act(name: str) -> nn.Module:
    """A fresh activation module by name (never in-place)."""
    table = {
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "elu": nn.ELU,
        "leaky_relu": lambda: nn.LeakyReLU(0.1),
        "tanh": nn.Tanh,
        "identity": nn.Identity,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(table)}")
    return table[name]()


def make_norm(name: str, channels: int, groups: int = 8) -> nn.Module:
    """A normalisation layer by name; GroupNorm's group count is reduced until it divides channels."""
    if name == "batch":
        return nn.BatchNorm2d(channels)
    if name == "group":
        g = min(groups, channels)
        while channels % g:
            g -= 1
        return nn.GroupNorm(g, channels)
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {name!r}; choose one of batch, group, none")


def conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class StridedConv1x1(nn.Conv2d):
    """A 1x1 convolution with a stride, computed as the subsampling it is followed by a stride-1 1x1 convolution.

    The same function and parameters as ``nn.Conv2d(cin, cout, 1, stride=s)`` (a 1x1 kernel with stride s reads
    only the positions 0, s, 2s, ...). It exists because oneDNN's weight-gradient kernel for the strided form
    corrupts the heap on some x86 CPUs (seen with torch 2.14.1 on AMD EPYC Zen 3 for 2 to 7 input channels in
    channels-last: the process aborts in ``mkldnn_convolution_backward_weights``); the stride-1 kernel is sound.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        return F.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias)


STRIDED_1X1_SAFE_CHANNELS = 8  # from this many input channels up oneDNN's strided kernel was sound (up to 64 tried)


def conv1x1(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """A 1x1 convolution; strided with few input channels, the subsampling form (same numbers up to rounding)."""
    if stride == 1 or cin >= STRIDED_1X1_SAFE_CHANNELS:  # torch's own layer wherever it is sound: its exact rounding
        return nn.Conv2d(cin, cout, 1, stride=stride, bias=bias)
    return StridedConv1x1(cin, cout, 1, stride=stride, bias=bias)


class ShortcutA(nn.Module):
    """Option A (He et al. 2016): subsample spatially and zero-pad the new channels. No parameters."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]  # (B, Cin, H/s, W/s)
        if self.cout > self.cin:
            x = F.pad(x, (0, 0, 0, 0, 0, self.cout - self.cin))  # zero channels appended
        return x


class Scale(nn.Module):
    """Multiplies F(x) by a fixed or learnable scalar alpha (ReZero / SkipInit when learnable at 0)."""

    def __init__(self, alpha: float, learnable: bool) -> None:
        super().__init__()
        if learnable:
            self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        else:
            self.register_buffer("alpha", torch.tensor(float(alpha)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha


class Add(Merge):
    """The merge point: a named module so hooks see F(x), S(x) (its inputs) and their sum (its output).

    ``s`` is ``None`` when the skip connection is off; ``f`` is ``None`` when the block is removed. The
    block's ``skip`` and ``removed`` flags live here (see :mod:`resviz.nn.merge`).
    """

    def forward(self, f: torch.Tensor | None, s: torch.Tensor | None) -> torch.Tensor:
        if s is None:
            return f
        if f is None:
            return s
        return f + s


def _drop_path(x: torch.Tensor, p: float, training: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): drop the whole branch per sample, rescale survivors.

    The masks come from ``generator`` (on ``x``'s device; None: torch's global generator).
    """
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype, generator=generator) >= p
    return x * keep / (1.0 - p)


class ResidualBlock(nn.Module):
    """One residual block ``y = post(F(x) + S(x))`` with a run-time ``skip`` flag.

    Args:
        cfg: block settings.
        cin: input channels.
        planes: width of the block (output channels are ``planes * cfg.expansion``).
        stride: spatial stride of the block (applied in its 3x3 conv and its shortcut).
        drop_prob: stochastic-depth probability of this block.
        skip: whether the skip connection is on at build time.
    """

    def __init__(
        self, cfg: BlockConfig, cin: int, planes: int, stride: int = 1, drop_prob: float = 0.0, skip: bool = True
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.cin, self.cout, self.stride = cin, planes * cfg.expansion, stride
        self.drop_prob = drop_prob
        self.drop_generator: torch.Generator | None = None  # where stochastic depth draws (the Trainer sets one)
        self.branch = self._make_branch(cin, planes, stride)
        self.shortcut = self._make_shortcut(cin, self.cout, stride)
        self.merge = Add(skip)  # holds the run-time flags ``skip`` and ``removed``
        self.post = self._make_post(self.cout)
        if cfg.zero_init_last:
            self.zero_init_last()

    # -- construction -------------------------------------------------------------------------
    def _layer_specs(self, cin: int, planes: int, stride: int) -> list[tuple[int, int, int, int]]:
        """(kernel, cin, cout, stride) of each conv in F."""
        if self.cfg.kind == "basic":
            return [(3, cin, planes, stride), (3, planes, planes, 1)]
        return [(1, cin, planes, 1), (3, planes, planes, stride), (1, planes, planes * 4, 1)]

    def _make_branch(self, cin: int, planes: int, stride: int) -> nn.Sequential:
        c, order = self.cfg, self.cfg.order
        layers: list[tuple[str, nn.Module]] = []
        specs = self._layer_specs(cin, planes, stride)
        for i, (k, ci, co, s) in enumerate(specs, start=1):
            conv = conv3x3(ci, co, s) if k == 3 else conv1x1(ci, co, s)
            last = i == len(specs)
            if order == "pre":  # (e) BN-act-conv
                layers += [(f"norm{i}", make_norm(c.norm, ci, c.groups)), (f"act{i}", make_act(c.act)), (f"conv{i}", conv)]
            elif order == "relu_only_pre":  # (d) act-conv-BN
                layers += [(f"act{i}", make_act(c.act)), (f"conv{i}", conv), (f"norm{i}", make_norm(c.norm, co, c.groups))]
            else:  # (a) post, (b) bn_after_add, (c) relu_before_add: conv-BN-act, last differs
                layers.append((f"conv{i}", conv))
                if not (last and order == "bn_after_add"):
                    layers.append((f"norm{i}", make_norm(c.norm, co, c.groups)))
                if not last or order == "relu_before_add":
                    layers.append((f"act{i}", make_act(c.act)))
        if c.scaling != "none":
            learnable = c.scaling == "learnable"
            layers.append(("scale", Scale(c.alpha_init if learnable else c.alpha, learnable)))
        # the last norm of F, or its last conv when no norm follows it
        self.last_layer = [n for n, m in layers if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm))][-1]
        return nn.Sequential(OrderedDict(layers))

    def _make_shortcut(self, cin: int, cout: int, stride: int) -> nn.Module:
        changes = stride != 1 or cin != cout
        if self.cfg.shortcut == "C" or (changes and self.cfg.shortcut == "B"):
            return nn.Sequential(OrderedDict(conv=conv1x1(cin, cout, stride), norm=make_norm(self.cfg.norm, cout, self.cfg.groups)))
        if changes:
            if cout < cin:
                raise ValueError("shortcut option A can only add channels; use 'B' or 'C'")
            return ShortcutA(cin, cout, stride)
        return nn.Identity()

    def _make_post(self, cout: int) -> nn.Module:
        order, c = self.cfg.order, self.cfg
        if order == "post":
            return make_act(c.act)
        if order == "bn_after_add":
            return nn.Sequential(OrderedDict(norm=make_norm(c.norm, cout, c.groups), act=make_act(c.act)))
        return nn.Identity()  # relu_before_add and the pre-activation orders add last

    def zero_init_last(self) -> None:
        """Zero the weight of ``self.last_layer``: F's last norm, or its last conv when no norm follows it."""
        nn.init.zeros_(getattr(self.branch, self.last_layer).weight)  # a BatchNorm/GroupNorm scale or a conv kernel

    # -- run-time flags (kept on the merge, where instruments and lesions address them) ---------
    @property
    def skip(self) -> bool:
        """Whether the skip connection is on; flip at any time (False makes this a plain block)."""
        return self.merge.skip

    @skip.setter
    def skip(self, value: bool) -> None:
        self.merge.skip = bool(value)

    @property
    def removed(self) -> bool:
        """Inference lesion: True drops F entirely, ``y = post(S(x))``."""
        return self.merge.removed

    @removed.setter
    def removed(self, value: bool) -> None:
        self.merge.removed = bool(value)

    @property
    def has_projection(self) -> bool:
        return not isinstance(self.shortcut, nn.Identity)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, Cin, H, W)
        s = self.shortcut(x) if (self.skip or self.removed) else None  # (B, Cout, H/s, W/s)
        f = None
        if not self.removed:
            f = _drop_path(self.branch(x), self.drop_prob, self.training, self.drop_generator)  # (B, Cout, H/s, W/s)
        return self.post(self.merge(f, s))

    def extra_repr(self) -> str:
        return f"skip={self.skip}, removed={self.removed}, drop_prob={self.drop_prob:.3f}"
