"""What a configured net looks like before any training, next to its plain twin.

One call builds the residual net and its plain twin with identical initial weights, pushes one small
random batch through both (train mode, as the first optimisation step would) and returns, per block,
the signal-propagation statistics and the gradient norms. This is what makes the vanishing gradient
of a deep plain net visible before anyone trains anything. Results are plain numpy arrays so the app
can cache them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from resviz.analysis.probes import gradient_norms_by_layer, signal_prop
from resviz.config import NetConfig
from resviz.nn.models import ResNet, build_net, count_macs, count_params, plain_twin

# Forward multiply-accumulates one measurement may spend per net; the batch shrinks for big nets so
# the Design page stays interactive on a laptop CPU (ResNet-56 at 32x32, width 16 gets 6 images).
MAC_BUDGET = 8e8
MAX_BATCH, MIN_BATCH = 16, 4
PARAM_BUDGET = 2_000_000  # parameters per measured net (two are built, each with a full backward)


@dataclass(frozen=True)
class NetSummary:
    """Size of a net: trainable parameters and multiply-accumulates per image."""

    params: int
    macs: int
    blocks: int
    stages: tuple[int, ...]


def _shape_only(cfg: NetConfig) -> ResNet:
    """The net on the meta device: shapes without memory or initialisation cost (ResNet-152 in ms)."""
    with torch.device("meta"):
        return build_net(cfg)


@functools.lru_cache(maxsize=128)
def summarize(cfg: NetConfig) -> NetSummary:
    """Parameter and MAC counts of the net ``cfg`` describes."""
    net = _shape_only(cfg)
    macs = count_macs(net, (cfg.in_channels, cfg.input_size, cfg.input_size))
    return NetSummary(count_params(net), macs, cfg.num_blocks, cfg.stage_blocks)


def describe_blocks(cfg: NetConfig) -> list[dict[str, Any]]:
    """One dict per block for :func:`resviz.plots.architecture_figure`.

    Keys: ``name`` ("b<i>"), ``stage`` (1-based), ``cin``, ``cout``, ``stride``, ``skip``, ``projection``
    (the shortcut has weights), ``removed`` (always False for a fresh net).
    """
    net = _shape_only(cfg)
    return [
        {"name": f"b{i}", "stage": net.stage_of[i] + 1, "cin": blk.cin, "cout": blk.cout, "stride": blk.stride,
         "skip": blk.skip, "projection": any(True for _ in blk.shortcut.parameters()), "removed": blk.removed}
        for i, blk in enumerate(net.blocks)
    ]


def batch_size_for(macs: int) -> int:
    """How many images one measurement uses for a net of ``macs`` per image."""
    return int(min(MAX_BATCH, max(MIN_BATCH, MAC_BUDGET // max(macs, 1))))


def measure_config(cfg: NetConfig) -> tuple[NetConfig, int]:
    """The net actually measured and the batch size, within ``PARAM_BUDGET`` and ``MAC_BUDGET``.

    Small nets are measured as configured. A net with more than ``PARAM_BUDGET`` parameters is measured
    at a narrower width (a power of two that fits), and one whose ``MIN_BATCH`` images would still exceed
    the MAC budget at a smaller input (a multiple of its stride). Per-block statistics at
    initialisation depend on depth and block design far more than on width or resolution; the page
    says when either was reduced.
    """
    s = summarize(cfg)
    if s.params > PARAM_BUDGET and cfg.width > 4:  # parameters grow with the square of the width
        width = cfg.width * (PARAM_BUDGET / s.params) ** 0.5
        cfg = replace(cfg, width=max(4, 2 ** int(math.log2(width))))
        s = summarize(cfg)
    if s.macs * MIN_BATCH > MAC_BUDGET:
        stride = cfg.total_stride
        scale = (MAC_BUDGET / (MIN_BATCH * s.macs)) ** 0.5  # MACs grow with the square of the side
        cfg = replace(cfg, input_size=max(stride, int(cfg.input_size * scale) // stride * stride))
        s = summarize(cfg)
    return cfg, batch_size_for(s.macs)


def init_comparison(cfg: NetConfig, *, batch_size: int | None = None, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Signal propagation and gradient norms at initialisation for the net and its plain twin.

    Both nets get the same initial weights and the same random batch (standard-normal images, random
    labels), so the only difference is the skip connections.

    Returns:
        ``{"residual": stats, "plain": stats, "meta": {"batch_size", "input_size", "width"}}`` where ``stats``
        holds float arrays of shape ``(B,)``: ``mean_sq``, ``var``, ``branch_var`` (block outputs),
        ``grad_block`` (parameter-gradient norm per block), ``grad_total`` (norm of dL/dx at each block
        input), and ``loss`` (a 0-d array).
    """
    measured, auto_batch = measure_config(cfg)
    batch_size, size = batch_size or auto_batch, measured.input_size
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the process's RNG
        torch.manual_seed(seed)
        residual = build_net(measured.residual_twin() if measured.is_plain else measured)
    plain = plain_twin(residual, same_weights=True)  # identical weights: only the skips differ
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, cfg.in_channels, size, size, generator=gen)  # (N, C, H, W)
    y = torch.randint(0, cfg.num_classes, (batch_size,), generator=gen)
    out: dict[str, dict[str, Any]] = {"meta": {"batch_size": batch_size, "input_size": size, "width": measured.width}}
    for name, net in (("residual", residual), ("plain", plain)):
        stats = signal_prop(net, x)
        grads = gradient_norms_by_layer(net, x, y)
        keep = {k: grads[k] for k in ("grad_block", "grad_total", "loss")}
        out[name] = {k: v.numpy().astype(np.float64) for k, v in (stats | keep).items()}
    return out
