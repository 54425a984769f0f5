"""Shared machinery of the instruments: hook bookkeeping, per-call rows, one-transfer copies to the CPU."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Self

import numpy as np
import torch
from torch import nn

from resviz.nn.merge import Junction, junctions

Tensor = torch.Tensor


def blocks_of(net: nn.Module) -> list[Junction]:
    """Where instruments hook ``net``: one :class:`~resviz.nn.merge.Junction` per merge, in forward order.

    ``net`` is any module holding merge modules (a ResViz net, a single block, an adapted model).

    Raises:
        ValueError: ``net`` has no merge module.
    """
    return junctions(net)


def to_cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Move a dict of tensors to the CPU as float32 with a single device-to-host copy."""
    full = [t.detach().reshape(-1).float() for t in tensors.values() if t.numel()]
    flat = torch.cat(full).cpu() if full else torch.empty(0)
    out, start = {}, 0
    for k, t in tensors.items():  # empty ones may sit on another device: rebuild them on the CPU
        out[k] = flat[start : start + t.numel()].reshape(t.shape)
        start += t.numel()
    return out


class Probe:
    """Base instrument: hook bookkeeping, enable flag and the result/drain/reset protocol."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.blocks = blocks_of(net)  # one Junction per block: .merge, .block, .branch, .shortcut
        self.enabled = True  # False: hooks return at once (cheap way to skip a step)
        self._active = False
        self._handles: list[Any] = []

    def __enter__(self) -> Self:
        if self._active:
            raise RuntimeError(f"{type(self).__name__} is already attached")
        self._active = True
        try:
            self._attach()
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._detach()

    def _attach(self) -> None:
        raise NotImplementedError

    def _detach(self) -> None:
        self._active = False
        while self._handles:
            self._handles.pop().remove()

    def _prune(self) -> None:
        """Drop handles of tensor hooks whose autograd graph is gone (keeps the list short)."""
        self._handles = [h for h in self._handles if h.hooks_dict_ref() is not None]

    @property
    def _on(self) -> bool:
        return self._active and self.enabled

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Temporarily stop recording (e.g. around evaluation forwards)."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    def _collect(self, clear: bool) -> dict[str, Tensor]:
        """Readings as device tensors; ``clear`` empties the store."""
        raise NotImplementedError

    def result(self) -> dict[str, Tensor]:
        """All readings so far as CPU float32 tensors (see the module docstring)."""
        return to_cpu(self._collect(clear=False))

    def drain(self) -> dict[str, Tensor]:
        """Like :meth:`result`, then clear the readings (read once per logging interval)."""
        return to_cpu(self._collect(clear=True))

    def reset(self) -> None:
        """Forget all readings."""
        self._collect(clear=True)


class Rows:
    """Per-call rows of 0-d device tensors, one slot per statistic and one column per block.

    A new row starts when a (slot, block) cell that is already filled is written again, so rows follow
    forward (or backward) passes without hooking the net itself.
    """

    def __init__(self, keys: Sequence[str], n_blocks: int) -> None:
        self.keys, self.n = tuple(keys), n_blocks
        self.rows: list[Tensor] = []  # each (slots, blocks)
        self.cur = self._empty()

    def _empty(self) -> list[list[Tensor | None]]:
        return [[None] * self.n for _ in self.keys]

    def put(self, slot: int, block: int, value: Tensor) -> None:
        if self.cur[slot][block] is not None:
            self.flush()
        self.cur[slot][block] = value

    def flush(self) -> None:
        seen = [v for row in self.cur for v in row if v is not None]
        if seen:
            nan = torch.full((), math.nan, device=seen[0].device)
            self.rows.append(torch.stack([torch.stack([nan if v is None else v for v in row]) for row in self.cur]))
        self.cur = self._empty()

    def take(self, clear: bool) -> dict[str, Tensor]:
        self.flush()
        data = torch.stack(self.rows) if self.rows else torch.empty(0, len(self.keys), self.n)
        if clear:
            self.rows = []
        return {k: data[:, j] for j, k in enumerate(self.keys)}  # each (calls, blocks)


def to_numpy(tensors: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """A dict of device tensors as float32 numpy arrays, with a single device-to-host copy."""
    return {k: v.numpy() for k, v in to_cpu(tensors).items()}
