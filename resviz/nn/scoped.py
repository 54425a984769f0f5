"""Temporary changes to a net: every context manager here restores the exact previous state on exit.

"Exact" means what was there before, not a default: a mixed train/eval mode comes back mixed, skip
flags and removed branches that were already off stay off, a block order that was already permuted
stays permuted. Restoring runs in ``finally``, so it also happens when the body raises.

* :func:`eval_mode`: eval mode for the duration; every module's own mode back after.
* :func:`lesioned`: a per-net lock, eval mode and a :class:`Lesion` (skip flags, removed branches).
* :func:`removed`: the residual branches of the given blocks removed.
* :func:`reordered`: the blocks of ``net.blocks`` run in another order.
* :func:`perturbed`: the parameters may be overwritten; their values come back.
* :func:`preserved`: buffers (e.g. BatchNorm running statistics) and the RNG state come back.

Flags are addressed through the net's merges (:mod:`resviz.nn.merge`), so any model whose blocks
route their sum through a :class:`~resviz.nn.merge.Merge` can be lesioned.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from resviz.nn.merge import Merge, merges, set_removed, skips, walk

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def net_lock(net: nn.Module) -> threading.RLock:
    """The lock that serialises every lesioned use of ``net`` (one per net object, created on first use)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(net)
        if lock is None:
            lock = _LOCKS[net] = threading.RLock()
        return lock


@dataclass(frozen=True, kw_only=True)
class Lesion:
    """Run-time changes to a net, applied at inference without retraining.

    ``skips``: one skip flag per block, or ``None`` to keep the net's own; ``removed``: indices of the
    blocks whose residual branch F is dropped (``y = post(S(x))``).
    """

    skips: tuple[bool, ...] | None = None
    removed: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.skips is not None:
            object.__setattr__(self, "skips", tuple(bool(s) for s in self.skips))
        object.__setattr__(self, "removed", tuple(sorted({int(i) for i in self.removed})))

    def is_intact(self, net: nn.Module) -> bool:
        """Whether this lesion leaves ``net`` as it is."""
        return not self.removed and (self.skips is None or self.skips == skips(net))

    def describe(self, net: nn.Module) -> str:
        """A short human-readable summary, e.g. "skip off: 2, 5; removed: 7"."""
        parts = []
        if self.skips is not None:
            own = skips(net)
            changed = [i for i, (a, b) in enumerate(zip(self.skips, own)) if a != b]
            off = [i for i in changed if not self.skips[i]]
            on = [i for i in changed if self.skips[i]]
            parts += [f"skip off: {', '.join(map(str, off))}"] if off else []
            parts += [f"skip on: {', '.join(map(str, on))}"] if on else []
        if self.removed:
            parts.append(f"removed: {', '.join(map(str, self.removed))}")
        return "; ".join(parts) or "intact"


INTACT = Lesion()


@contextmanager
def _flags_kept(net: nn.Module) -> Iterator[list[Merge]]:
    """Yield the net's merges; put every merge's skip and removed flag back on exit."""
    ms = merges(net)
    saved = [(m.skip, m.removed) for m in ms]
    try:
        yield ms
    finally:
        for m, (s, r) in zip(ms, saved, strict=True):
            m.skip, m.removed = s, r


@contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """Put ``net`` in eval mode; restore every module's own mode on exit."""
    modes = [(m, m.training) for m, _ in walk(net)]
    try:
        if any(training for _, training in modes):  # (setting every module's flag costs a walk)
            net.eval()
        yield net
    finally:
        for m, training in modes:
            if m.training != training:
                m.training = training


@contextmanager
def lesioned(net: nn.Module, lesion: Lesion = INTACT) -> Iterator[nn.Module]:
    """Hold ``net``'s lock, switch to eval mode and apply ``lesion``; restore flags and modes on exit.

    A net shared between threads (app sessions) is never left modified, and two lesioned uses of
    the same net never interleave.
    """
    with ExitStack() as stack:
        stack.enter_context(net_lock(net))
        stack.enter_context(eval_mode(net))
        ms = stack.enter_context(_flags_kept(net))
        _apply(ms, lesion)
        yield net


def _apply(ms: list[Merge], lesion: Lesion) -> None:
    """Set the flags of the merges ``ms`` (a net's, in order) to ``lesion``: the checks of
    :func:`resviz.nn.merge.set_skips` and ``set_removed`` on a list walked once."""
    if lesion.skips is not None and len(lesion.skips) != len(ms):
        raise ValueError(f"expected {len(ms)} skip flags, got {len(lesion.skips)}")
    bad = [i for i in lesion.removed if not 0 <= i < len(ms)]
    if bad:
        raise ValueError(f"block indices out of range 0..{len(ms) - 1}: {bad}")
    for i, m in enumerate(ms):
        if lesion.skips is not None:
            m.skip = lesion.skips[i]
        m.removed = i in lesion.removed


@contextmanager
def removed(net: nn.Module, blocks: Sequence[int]) -> Iterator[nn.Module]:
    """Remove exactly the residual branches of ``blocks`` (indices into the merges) for the duration."""
    with _flags_kept(net):
        set_removed(net, blocks)
        yield net


@contextmanager
def reordered(net: nn.Module, order: Sequence[int]) -> Iterator[nn.Module]:
    """Run the blocks of ``net.blocks`` (an ``nn.ModuleList``) in ``order``, a permutation of their indices."""
    original = net.blocks
    if sorted(order) != list(range(len(original))):
        raise ValueError(f"order must be a permutation of 0..{len(original) - 1}, got {list(order)}")
    try:
        net.blocks = nn.ModuleList([original[i] for i in order])
        yield net
    finally:
        net.blocks = original


@contextmanager
def perturbed(net: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Yield copies of the parameter values; the body may overwrite the parameters, which come back after."""
    params = list(net.parameters())
    saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


@contextmanager
def preserved(net: nn.Module) -> Iterator[None]:
    """Restore ``net``'s buffers (e.g. BatchNorm running stats) and the RNG state on exit."""
    buffers = list(net.buffers())
    saved = [b.detach().clone() for b in buffers]
    p = next(net.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    devices, kind = ([dev], dev.type) if dev.type != "cpu" else ([], "cuda")  # no devices: the type is unused
    with torch.random.fork_rng(devices=devices, device_type=kind):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, s in zip(buffers, saved, strict=True):
                    b.copy_(s)
