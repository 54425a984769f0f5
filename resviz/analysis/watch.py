"""Watch the residual connections of any model inside the user's own training loop.

::

    with resviz.watch(model, x[:1], every=50, writer=SummaryWriter("runs/a")) as w:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            w.step()                       # after backward (and step), before the next zero_grad

On entry :func:`resviz.nn.discovery.residualize` with ``copy=False`` builds a graph that calls the
model's own modules (same parameters, same buffers, so the user's optimizer trains what runs), and
``model.forward`` is pointed at that graph for the duration. Its merges route F(x) and S(x)
separately, so the live instruments (branch magnitudes, gradient flow with its split by path, signal
propagation) see every residual connection. Outputs and
gradients are bit-identical to the unwatched model's. On exit, also when the body raises, every hook
is removed and ``model.forward`` is what it was.

Steps are counted by :meth:`Watch.step`, which the loop calls once per optimizer step after
``loss.backward()``: the steps ``0, every, 2 * every, ...`` are recorded. Only their training-mode
forwards are measured (forwards in eval mode, e.g. validation, and calls with keyword arguments run
the model's own forward unwatched), their readings averaged over those forwards; the gradient split
is that of the step's last backward. The graph is traced in training mode (a traced forward keeps the
train/eval branches it took), so it runs only while the model is in training mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
from torch import nn

from resviz.analysis.probes.live import LiveProbes
from resviz.nn.discovery import Residualized, residualize
from resviz.nn.scoped import preserved

FORWARD_KEYS = ("f_norm", "s_norm", "ratio", "cosine", "mean_sq", "var", "branch_var")
GRAD_KEYS = ("grad_branch", "grad_shortcut", "grad_total", "grad_block")
SCALARS = FORWARD_KEYS + GRAD_KEYS  # the fields of a MergeReading written to TensorBoard


@dataclass(frozen=True)
class MergeReading:
    """One residual merge at one recorded step (NaN where the step gave no reading).

    ``f_norm``/``s_norm``: per-sample L2 norms of F(x) and S(x), batch mean; ``ratio`` = f_norm / s_norm;
    ``cosine`` between F(x) and S(x). ``grad_branch``/``grad_shortcut``/``grad_total``: the norm of
    dL/dx at the block input through F, through S, and in all; ``grad_block``: the norm of the gradient
    of the block's parameters. ``mean_sq``, ``var``: signal statistics of the block output; ``branch_var``:
    the average channel variance of F(x) (see :class:`resviz.analysis.probes.SignalProp`).
    """

    index: int
    name: str
    shortcut: str  # "identity" or "projection"
    f_norm: float
    s_norm: float
    ratio: float
    cosine: float
    grad_branch: float
    grad_shortcut: float
    grad_total: float
    grad_block: float
    mean_sq: float
    var: float
    branch_var: float


@dataclass(frozen=True)
class WatchRecord:
    """Every merge's reading at one recorded step (``step`` counts :meth:`Watch.step` calls from 0)."""

    step: int
    merges: tuple[MergeReading, ...]

    def values(self, key: str) -> np.ndarray:
        """One field across the merges, in merge order: ``(B,)``."""
        return np.array([getattr(m, key) for m in self.merges], dtype=np.float64)


def _mean(rows: np.ndarray, i: int) -> float:
    """Mean over the recorded calls of column ``i``, ignoring NaN (NaN when nothing was recorded)."""
    col = rows[:, i] if rows.size else np.empty(0)
    col = col[np.isfinite(col)]
    return float(col.mean()) if col.size else math.nan


class Watch:
    """The context manager :func:`watch` returns; see the module docstring for the contract."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor | tuple, every: int = 1,
                 writer: Any = None, *, histograms: bool = False, prefix: str = "resviz") -> None:
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.model, self.example_input, self.every = model, example_input, int(every)
        self.writer, self.histograms, self.prefix = writer, histograms, prefix
        self.records: list[WatchRecord] = []
        self.graph: Residualized | None = None
        self._probes: LiveProbes | None = None
        self._step = 0
        self._had_forward = False
        self._forward: Callable[..., Any] | None = None

    @property
    def steps(self) -> int:
        """How many times :meth:`step` has been called."""
        return self._step

    def __enter__(self) -> Self:
        if self._probes is not None:
            raise RuntimeError("this watch is already active")
        self.graph = self._trace()
        if not len(self.graph.residual_map):
            raise ValueError(f"no skip connections found in {type(self.model).__name__}: nothing to watch")
        probes = LiveProbes(self.graph)
        probes.__enter__()
        self._probes = probes
        self._had_forward = "forward" in self.model.__dict__
        self._forward = self.model.__dict__.get("forward")
        own = self._forward or type(self.model).forward.__get__(self.model)
        self.model.forward = self._watched(own)
        self._arm()
        return self

    def _trace(self) -> Residualized:
        """The model residualized in training mode (modes, buffers and RNG restored)."""
        with preserved(self.model):
            modes = {m: m.training for m in self.model.modules()}
            try:
                self.model.train()
                return residualize(self.model, self.example_input, copy=False)
            finally:
                for m, t in modes.items():
                    m.training = t

    def _watched(self, own: Callable[..., Any]) -> Callable[..., Any]:
        graph, model = self.graph, self.model

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not model.training or kwargs:
                return own(*args, **kwargs)  # eval forwards (and keyword calls) run unwatched
            return graph(*args)

        return forward

    def __exit__(self, *exc: object) -> None:
        try:
            if self._had_forward:
                self.model.forward = self._forward
            else:
                self.model.__dict__.pop("forward", None)
        finally:
            probes, self._probes = self._probes, None
            if probes is not None:
                probes.__exit__(*exc)
            if self.writer is not None:
                self.writer.flush()

    def _arm(self) -> None:
        assert self._probes is not None
        self._probes.reset()
        self._probes.enabled = self._step % self.every == 0

    def step(self) -> WatchRecord | None:
        """Close one training step (call after ``loss.backward()``); returns its record when it is recorded.

        Raises:
            RuntimeError: outside the ``with`` block.
        """
        if self._probes is None:
            raise RuntimeError("Watch.step() called outside its with-block")
        record = None
        if self._probes.enabled:
            self._probes.record()
            record = self._read(self._probes.drain())
            self.records.append(record)
            if self.writer is not None:
                self._write(record)
        self._step += 1
        self._arm()
        return record

    def _read(self, readings: dict[str, np.ndarray]) -> WatchRecord:
        merges = []
        for i, info in enumerate(self.graph.residual_map):
            values = {k: _mean(readings[k], i) for k in FORWARD_KEYS}
            grads = readings["grad_total"]
            values.update({k: float(readings[k][-1, i]) if len(grads) else math.nan for k in GRAD_KEYS})
            merges.append(MergeReading(index=i, name=info.name, shortcut=info.shortcut, **values))
        return WatchRecord(self._step, tuple(merges))

    def _write(self, record: WatchRecord) -> None:
        """Scalars ``<prefix>/<field>/<merge name>`` (and one histogram per field across the merges)."""
        for m in record.merges:
            for key in SCALARS:
                value = getattr(m, key)
                if math.isfinite(value):
                    self.writer.add_scalar(f"{self.prefix}/{key}/{m.name}", value, record.step)
        if self.histograms:
            for key in SCALARS:
                values = record.values(key)
                values = values[np.isfinite(values)]
                if values.size:
                    self.writer.add_histogram(f"{self.prefix}/{key}", values, record.step)


def watch(model: nn.Module, example_input: torch.Tensor | tuple, every: int = 1, writer: Any = None, *,
          histograms: bool = False, prefix: str = "resviz") -> Watch:
    """Record every residual merge of ``model`` every ``every`` steps of the caller's training loop.

    Args:
        model: any traceable model (its own modules and parameters keep training; nothing is copied).
        example_input: one input batch like the loop's (its shapes find the merges; a batch of one is enough).
        every: record the steps ``0, every, 2 * every, ...`` (steps are counted by :meth:`Watch.step`).
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with ``add_scalar``,
            ``add_histogram`` and ``flush``): each record is also written as scalars
            ``<prefix>/<field>/<merge name>`` at the record's step.
        histograms: also write one histogram per field across the merges at each recorded step.
        prefix: the first part of every TensorBoard tag.

    Returns:
        A :class:`Watch`; use it as a context manager. ``w.records`` holds the :class:`WatchRecord` s.

    Raises:
        resviz.nn.discovery.TraceError: on entry, when the model cannot be traced.
        ValueError: on entry, when the model has no residual merge.
    """
    return Watch(model, example_input, every, writer, histograms=histograms, prefix=prefix)
