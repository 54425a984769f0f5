"""The seam through which instruments, lesions and inspection address a net: its merges.

A *merge* is the module where a residual block joins its two paths: it is called as ``merge(f, s)``
with ``f = F(x)`` (the residual branch) and ``s = S(x)`` (the shortcut), and returns what the block's
tail receives. Forward hooks on it see both inputs and their combination, whatever model it sits in.
Each merge carries the block's run-time flags:

* ``skip``: False turns the skip connection off; the block then passes ``s = None``.
* ``removed``: True drops the residual branch (an inference lesion); the block passes ``f = None``.

The module that owns a merge (its parent) is the *block*: its input is x and its output the block's
output y (a block that is not called with x, such as a merge inside a traced graph, says through
``junction_parts()`` which module receives x and which modules it owns). A block may name its paths
``branch`` (F) and ``shortcut`` (S); instruments that split the gradient at x between the two paths
use them. ResViz's :class:`~resviz.nn.blocks.ResidualBlock` honours all of this; any other model
plugs in through :func:`resviz.nn.discovery.residualize`, which routes each residual sum through a
:class:`~resviz.nn.discovery.GraphBlock`.

Merges are listed in registration order, which is the forward order of every net that registers its
blocks in the order it runs them (ResViz's nets, torchvision's and timm's ResNets).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


class Merge(nn.Module):
    """Base class of merge modules: ``forward(f, s)`` with the block's ``skip`` and ``removed`` flags.

    The owning block must honour the flags: pass ``s = None`` when ``skip`` is off and ``removed`` is
    not set, and ``f = None`` when ``removed`` is set (then S(x) is used even without the skip).
    """

    def __init__(self, skip: bool = True) -> None:
        super().__init__()
        self.skip = bool(skip)
        self.removed = False

    def forward(self, f: torch.Tensor | None, s: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"skip={self.skip}, removed={self.removed}"


@dataclass(frozen=True, eq=False)
class Junction:
    """One merge with the modules around it that instruments hook.

    ``entry`` receives the block's input x as its first argument (forward pre-hooks there see x) and
    ``block``'s output is y. For a ResViz block both are the block itself; a block that is not called
    with x (a merge inside a traced graph) names an ``entry`` module and the modules it ``owns``.
    """

    merge: Merge  # sees (F(x), S(x)) as its inputs
    block: nn.Module  # the merge's parent: its output is the block output y
    branch: nn.Module | None  # F, when the block names it ``branch`` (its first input is x)
    shortcut: nn.Module | None  # S, when the block names it ``shortcut`` (its first input is x)
    entry: nn.Module | None = None  # where x enters, when that is not ``block``
    owns: tuple[nn.Module, ...] | None = None  # the modules whose parameters are the block's, when not ``block``'s

    @property
    def input_module(self) -> nn.Module:
        """The module whose first input is x."""
        return self.block if self.entry is None else self.entry

    def parameters(self) -> list[nn.Parameter]:
        """The block's parameters (each once)."""
        mods = (self.block,) if self.owns is None else self.owns
        return list({id(p): p for m in mods for p in m.parameters()}.values())


def walk(model: nn.Module) -> list[tuple[nn.Module, nn.Module | None]]:
    """``(module, parent)`` for every module of ``model`` once, in ``model.modules()`` order.

    A plain walk of the ``_modules`` dicts: ``nn.Module.modules()`` builds a qualified name for every
    module, which made finding the merges cost more than a small net's forward pass.
    """
    out, seen = [], set()

    def visit(m: nn.Module, parent: nn.Module | None) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        out.append((m, parent))
        for child in m._modules.values():
            if child is not None:
                visit(child, m)

    visit(model, None)
    return out


def merges(model: nn.Module) -> list[Merge]:
    """Every :class:`Merge` inside ``model`` (``model`` itself included), in registration order."""
    return [m for m, _ in walk(model) if isinstance(m, Merge)]


def junctions(model: nn.Module) -> list[Junction]:
    """The merges of ``model`` with their blocks and paths, in the order of :func:`merges`.

    Raises:
        ValueError: ``model`` holds no merge, or a merge has no parent inside ``model``.
    """
    out = []
    for m, block in walk(model):
        if not isinstance(m, Merge):
            continue
        if block is None:
            raise ValueError(f"{type(m).__name__} has no parent block inside {type(model).__name__}")
        parts = block.junction_parts() if hasattr(block, "junction_parts") else {}
        branch = parts.get("branch", getattr(block, "branch", None))
        shortcut = parts.get("shortcut", getattr(block, "shortcut", None))
        out.append(Junction(m, block, branch if isinstance(branch, nn.Module) else None,
                            shortcut if isinstance(shortcut, nn.Module) else None,
                            entry=parts.get("entry"), owns=parts.get("owns")))
    if not out:
        raise ValueError(f"{type(model).__name__} has no merge module (no residual block) to address")
    return out


def skips(model: nn.Module) -> tuple[bool, ...]:
    """The skip flag of every merge."""
    return tuple(m.skip for m in merges(model))


def removed_blocks(model: nn.Module) -> tuple[int, ...]:
    """Indices (into :func:`merges`) of the blocks whose residual branch is removed."""
    return tuple(i for i, m in enumerate(merges(model)) if m.removed)


def set_skips(model: nn.Module, flags: bool | Iterable[bool]) -> None:
    """Turn skip connections on/off: one flag for all merges or one per merge."""
    ms = merges(model)
    flags = [flags] * len(ms) if isinstance(flags, bool) else list(flags)
    if len(flags) != len(ms):
        raise ValueError(f"expected {len(ms)} skip flags, got {len(flags)}")
    for m, f in zip(ms, flags, strict=True):
        m.skip = bool(f)


def set_removed(model: nn.Module, indices: Iterable[int]) -> None:
    """Remove the residual branch of exactly the given block indices (all others are restored)."""
    ms, chosen = merges(model), set(indices)
    bad = sorted(i for i in chosen if not 0 <= i < len(ms))
    if bad:
        raise ValueError(f"block indices out of range 0..{len(ms) - 1}: {bad}")
    for i, m in enumerate(ms):
        m.removed = i in chosen
