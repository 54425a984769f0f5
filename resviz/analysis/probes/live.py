"""All live instruments at once for a trainer, and one-shot measurements for the Design page."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resviz.analysis.probes.base import Probe, Tensor, to_numpy
from resviz.analysis.probes.forward import BranchMagnitudes, SignalProp
from resviz.analysis.probes.gradients import GradientFlow
from resviz.nn.scoped import preserved


class LiveProbes:
    """BranchMagnitudes + GradientFlow + SignalProp behind one ``with`` and one :meth:`drain`.

    Trainer pattern::

        with LiveProbes(net) as probes:
            for step, (x, y) in enumerate(loader):
                probes.enabled = step % probe_every == 0  # skipped steps cost nothing
                loss = loss_fn(net(x), y)
                loss.backward()
                probes.record()  # no-op while disabled
                opt.step(); opt.zero_grad()
                if time_to_log:
                    readings = probes.drain()  # one host sync

    Keep evaluation forwards out of the readings with ``with probes.paused():``. Each probed training
    step then gives one row in every array, so rows line up across keys.
    """

    def __init__(self, net: nn.Module) -> None:
        self.branch = BranchMagnitudes(net)
        self.grad = GradientFlow(net)
        self.signal = SignalProp(net)
        self.probes: tuple[Probe, ...] = (self.branch, self.grad, self.signal)
        self._stack: ExitStack | None = None

    def __enter__(self) -> LiveProbes:
        with ExitStack() as stack:
            for p in self.probes:
                stack.enter_context(p)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @property
    def enabled(self) -> bool:
        return self.branch.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        for p in self.probes:
            p.enabled = bool(value)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Temporarily stop recording (e.g. around evaluation forwards)."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    @property
    def param_names(self) -> list[str]:
        """Column names of ``grad_params``."""
        return self.grad.param_names

    def record(self) -> None:
        """Call after ``loss.backward()``: closes the gradient row of this step."""
        self.grad.record()

    def drain(self) -> dict[str, np.ndarray]:
        """All readings since the last drain as float32 arrays (one host sync), then clear them.

        Keys: ``f_norm``, ``s_norm``, ``ratio``, ``cosine``, ``mean_sq``, ``var``, ``branch_var``
        ``(calls, B)``; ``grad_branch``, ``grad_shortcut``, ``grad_total``, ``grad_block`` ``(steps, B)``;
        ``grad_params`` ``(steps, P)``, columns named by :attr:`param_names`.
        """
        return to_numpy(self.take())

    def take(self) -> dict[str, Tensor]:
        """Like :meth:`drain`, but the readings stay on the device (no host sync; safe in a CUDA graph)."""
        out: dict[str, Tensor] = {}
        for p in self.probes:
            out.update(p._collect(clear=True))
        return out

    def reset(self) -> None:
        for p in self.probes:
            p.reset()


def gradient_norms_by_layer(
    net: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
) -> dict[str, Tensor]:
    """Gradient norms of one forward + backward on ``(x, y)``, in the net's current mode.

    Nothing about ``net`` changes: gradients come from ``torch.autograd.grad`` (``.grad`` untouched),
    and buffers and the RNG state are restored.

    Returns:
        CPU float32 tensors: ``grad_branch``, ``grad_shortcut``, ``grad_total``, ``grad_block`` ``(B,)``,
        ``grad_params`` ``(P,)`` (trainable parameters in ``named_parameters()`` order) and ``loss`` ``()``.
    """
    loss_fn = loss_fn or F.cross_entropy
    with preserved(net), torch.enable_grad(), GradientFlow(net) as flow:
        loss = loss_fn(net(x), y)
        grads = torch.autograd.grad(loss, flow.params, allow_unused=True) if flow.params else ()
        flow.record(grads)
    out = {k: v[0] for k, v in flow.result().items()}
    out["loss"] = loss.detach().float().cpu()
    return out


def signal_prop(net: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Signal-propagation statistics of one forward pass (no grad, current mode, buffers restored).

    Returns:
        CPU float32 tensors ``mean_sq``, ``var``, ``branch_var``, each ``(B,)`` (see :class:`SignalProp`).
    """
    with preserved(net), torch.no_grad(), SignalProp(net) as probe:
        net(x)
    return {k: v[0] for k, v in probe.result().items()}
