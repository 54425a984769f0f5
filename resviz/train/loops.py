"""Training loops behind one small protocol: a loop takes batches in a :class:`~resviz.train.state.StepContext`.

:class:`EagerLoop` runs each step op by op and syncs the host once per step (the stacked loss,
accuracy and norms of all nets). A :class:`Parallel` wrapper (DDP, :mod:`resviz.train.distributed`)
plugs into it: it wraps each net for the forward pass, gives the rank its slice of each batch and
reduces the logged numbers. :class:`resviz.train.cuda_graphs.GraphLoop` is the other loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F

from resviz.train.records import Status, StepRecord
from resviz.train.state import NetState, StepContext, autocast


class Loop(Protocol):
    """A way of taking training steps; ``mode`` and ``note`` say what ran and why (for the app)."""

    mode: str  # "off" (eager), "cuda" (captured graphs) or "static" (the graph step without capture)
    note: str  # why a faster loop was not used ("" if nothing to say)

    def steps(self, ctx: StepContext, batches: Iterator[torch.Tensor]) -> Iterator[StepRecord]:
        """One record per batch taken, until a record's status is not running."""
        ...


class Parallel(Protocol):
    """Data parallelism as the eager loop sees it (see :class:`resviz.train.distributed.DataParallel`)."""

    supports_graphs: bool

    def wrap(self, state: NetState) -> None:
        """Make ``state.module`` the wrapped net (after the net moved to its device)."""
        ...

    def shard(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's part of the global batch."""
        ...

    def reduce(self, metrics: list[torch.Tensor]) -> list[torch.Tensor]:
        """[loss, correct, grad_norm, param_norm] of the local part -> of the global batch."""
        ...


class EagerLoop:
    """Steps run op by op; one host sync per step. ``parallel`` makes it data-parallel."""

    def __init__(self, parallel: Parallel | None = None, note: str = "") -> None:
        self.parallel, self.mode, self.note = parallel, "off", note
        self._wrapped = False

    def steps(self, ctx: StepContext, batches: Iterator[torch.Tensor]) -> Iterator[StepRecord]:
        if self.parallel is not None and not self._wrapped:
            for st in ctx.states.values():
                self.parallel.wrap(st)
            self._wrapped = True
        for idx in batches:
            rec = self.step(ctx, idx)
            yield rec
            if rec.status != Status.RUNNING:
                return

    def step(self, ctx: StepContext, idx: torch.Tensor) -> StepRecord:
        """One optimisation step of every net on the batch ``idx``, and its record."""
        t0 = time.perf_counter()
        lr = ctx.lr()
        xb, yb = ctx.batch(idx)
        if self.parallel is not None:
            xb, yb = self.parallel.shard(xb, yb)
        probed = ctx.probe_due()
        vals = [self._forward_backward(ctx, name, st, xb, yb, lr, probed) for name, st in ctx.states.items()]
        flat = torch.stack([v for vs in vals for v in vs]).tolist()  # the one host sync of this step
        ctx.step += 1
        return ctx.record(ctx.step, lr, flat, len(yb), time.perf_counter() - t0, ctx.drain_probes)

    def _forward_backward(self, ctx: StepContext, name: str, st: NetState, xb: torch.Tensor, yb: torch.Tensor,
                          lr: float, probed: bool) -> list[torch.Tensor]:
        """One optimisation step of one net; returns its device-side [loss, correct, grad_norm, param_norm]."""
        # Only the last step of each probe interval is recorded; the hooks exist for that step alone.
        probe = ctx.probes[name] if probed else None
        st.save()
        st.set_lr(lr)
        with probe if probe is not None else contextlib.nullcontext():
            with autocast(ctx.device):
                logits = st.module(xb)  # (B, num_classes)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=ctx.cfg.label_smoothing)
            st.opt.zero_grad(set_to_none=True)
            loss.backward()
            if probe is not None:
                probe.record()
        metrics = st.update_and_measure(loss, logits, yb, st.opt.step)
        return metrics if self.parallel is None else self.parallel.reduce(metrics)
