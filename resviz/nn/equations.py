"""LaTeX for a block's equation, read off the modules a real block is built from.

The formula is derived from an actual :class:`ResidualBlock` (its ``branch``, ``shortcut`` and
``post``), so what the page shows is what the model computes, for every order, norm and scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from resviz.config import BlockConfig
from resviz.nn.blocks import ResidualBlock, Scale

_ACTS = {
    "relu": r"\mathrm{ReLU}", "gelu": r"\mathrm{GELU}", "silu": r"\mathrm{SiLU}", "elu": r"\mathrm{ELU}",
    "leaky_relu": r"\mathrm{LReLU}", "tanh": r"\tanh", "identity": "",
}
_NORMS = {"batch": r"\mathrm{BN}", "group": r"\mathrm{GN}", "none": ""}


@dataclass(frozen=True)
class BlockEquation:
    """LaTeX strings describing one block ``y = post(F(x) + S(x))``."""

    block: str  # y in terms of F and S
    branch: str  # F(x) written out
    shortcut: str  # S(x): identity, zero-padding or projection
    plain: str  # the same block with its skip connection off
    legend: str  # what the symbols mean (plain text)


def _wrap(op: str, inner: str) -> str:
    return rf"{op}\!\left({inner}\right)" if op else inner


def _apply(name: str, mod: nn.Module, inner: str, cfg: BlockConfig) -> str:
    """Wrap ``inner`` in the operation that module ``name`` performs."""
    if isinstance(mod, nn.Identity):
        return inner
    if name.startswith("conv"):
        return rf"W_{{{name[4:]}}}\, {inner}"
    if name.startswith("norm"):
        return _wrap(_NORMS[cfg.norm], inner)
    if name.startswith("act"):
        return _wrap(_ACTS[cfg.act], inner)
    if isinstance(mod, Scale):
        return rf"\alpha\, {inner}"
    raise ValueError(f"no equation for branch module {name!r}")


def _branch(blk: ResidualBlock) -> str:
    expr = "x"
    for name, mod in blk.branch.named_children():
        expr = _apply(name, mod, expr, blk.cfg)
    return expr


def _post(blk: ResidualBlock, inner: str) -> str:
    post, cfg = blk.post, blk.cfg
    if isinstance(post, nn.Identity):
        return inner
    if isinstance(post, nn.Sequential):  # norm then act (bn_after_add)
        return _wrap(_ACTS[cfg.act], _wrap(_NORMS[cfg.norm], inner))
    return _wrap(_ACTS[cfg.act], inner)


def _shortcut(cfg: BlockConfig) -> str:
    norm = _NORMS[cfg.norm]
    proj = _wrap(norm, r"W_s\, x")
    if cfg.shortcut == "C":
        return rf"S(x) = {proj}"
    if cfg.shortcut == "B":
        return rf"S(x) = x \text{{ (same shape)}},\quad S(x) = {proj} \text{{ (shape changes)}}"
    return r"S(x) = x \text{ (same shape)},\quad S(x) = \mathrm{pad}_0(x_{::2,::2}) \text{ (shape changes)}"


def _legend(cfg: BlockConfig) -> str:
    convs = "W_1: 1x1, W_2: 3x3, W_3: 1x1 convolutions" if cfg.kind == "bottleneck" else "W_1, W_2: 3x3 convolutions"
    parts = [convs, "W_s: 1x1 projection" if cfg.shortcut != "A" else "option A pads new channels with zeros"]
    if cfg.norm != "none":
        parts.append(f"{'BN: batch norm' if cfg.norm == 'batch' else 'GN: group norm'}")
    if cfg.scaling == "fixed":
        parts.append(f"alpha = {cfg.alpha:g} (fixed)")
    elif cfg.scaling == "learnable":
        parts.append(f"alpha learned, starting at {cfg.alpha_init:g}")
    if cfg.stochastic_depth > 0:
        parts.append("in training F is dropped per sample with probability p_l (survivors scaled by 1/(1-p_l))")
    return "; ".join(parts)


def block_equation(cfg: BlockConfig) -> BlockEquation:
    """The equations of a block built from ``cfg`` (a stride-1 block with matching widths)."""
    width = 16 * cfg.expansion  # any width: only the module order matters
    blk = ResidualBlock(cfg, width, width // cfg.expansion)
    return BlockEquation(
        block=rf"y = {_post(blk, 'F(x) + S(x)')}",
        branch=rf"F(x) = {_branch(blk)}",
        shortcut=_shortcut(cfg),
        plain=rf"y = {_post(blk, 'F(x)')}",
        legend=_legend(cfg),
    )

