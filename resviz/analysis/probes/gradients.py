"""Gradient flow: per-parameter and per-block gradient norms and the shortcut/branch split at block inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from resviz.analysis.probes.base import Probe, Tensor
from resviz.analysis.probes.forward import norm_f32


class GradientFlow(Probe):
    """Gradient norms per recorded step: per parameter tensor, per block, and split at each block input.

    Call :meth:`record` after each ``loss.backward()`` you want logged: it reads every parameter's
    ``.grad`` and closes one row ("step"). Rows hold:

    * ``grad_params`` ``(steps, P)``: L2 norm of each parameter's gradient; column j is
      ``param_names[j]`` (the trainable parameters of ``net.named_parameters()``); 0 when ``.grad`` is None.
    * ``grad_block`` ``(steps, B)``: L2 norm over all parameters of the block.
    * ``grad_branch`` / ``grad_shortcut`` / ``grad_total`` ``(steps, B)``: at each block input x,
      dL/dx splits exactly into the part that flowed back through the residual branch F and the part
      that came through the shortcut S; ``grad_total`` is the norm of their sum (all of dL/dx).

    The split comes from forward pre-hooks on each merge's block, ``block.branch`` and ``block.shortcut`` that
    pass on ``x.view_as(x)``: same values, but a separate autograd node, so a tensor hook on it sees
    only the gradient of its own path. Norms are whole-tensor L2 norms over the batch (they scale with
    the loss's reduction). A path that was not used in the last backward (the shortcut of a plain
    block, the branch of a removed block) reads 0. Forwards under ``torch.no_grad`` are ignored. If
    several backwards run before :meth:`record`, the split shows the last one while ``grad_params``
    shows the accumulated ``.grad``.

    Args:
        net: a net with merge modules (a ResViz net, a single block).
        keep_grads: also keep the last backward's gradient tensors per block in ``last_grads``
            (``last_grads[i]["grad_branch"]`` etc.; memory heavy, meant for inspection and tests).
    """

    KEYS = ("grad_branch", "grad_shortcut", "grad_total")

    def __init__(self, net: nn.Module, keep_grads: bool = False) -> None:
        super().__init__(net)
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        owner = {id(p): i for i, j in enumerate(self.blocks) for p in j.parameters()}
        # (B, P) membership matrix: block squared norms are one small matmul (deterministic, no sync).
        self._member = torch.zeros(len(self.blocks), len(self.params))
        for j, p in enumerate(self.params):
            if id(p) in owner:
                self._member[owner[id(p)], j] = 1.0
        self._member_host = self._member
        self.keep_grads = keep_grads
        self.last_grads: list[dict[str, Tensor]] = [{} for _ in self.blocks]
        self._pending = self._no_pending()
        self._rows: list[Tensor] = []  # each (4 * B + P,): branch, shortcut, total, block, params

    def _no_pending(self) -> list[list[Tensor | None]]:
        return [[None] * len(self.blocks) for _ in self.KEYS]

    def _attach(self) -> None:
        for i, j in enumerate(self.blocks):
            self._handles.append(j.input_module.register_forward_pre_hook(self._tap(i, 2)))
            for slot, path in ((0, j.branch), (1, j.shortcut)):  # a block without named paths: no split
                if path is not None:
                    self._handles.append(path.register_forward_pre_hook(self._tap(i, slot)))

    def _tap(self, i: int, slot: int) -> Callable[[nn.Module, tuple], tuple | None]:
        def pre_hook(_m: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if not (self._on and torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad):
                return None
            if i == 0 and slot == 2:
                self._prune()
            xv = x.view_as(x)  # a new autograd node: its gradient is this path's share only
            self._handles.append(xv.register_hook(self._grad_hook(i, slot)))
            return (xv, *args[1:])

        return pre_hook

    def _grad_hook(self, i: int, slot: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if self._active:
                # float32 accumulation straight from a bf16 gradient: no float32 copy of it
                self._pending[slot][i] = norm_f32(grad.detach())
                if self.keep_grads:
                    self.last_grads[i][self.KEYS[slot]] = grad.detach().clone()

        return hook

    @torch.no_grad()
    def record(self, grads: Sequence[Tensor | None] | None = None) -> None:
        """Close one step: read the parameters' gradients and the last backward's input-gradient split.

        Args:
            grads: gradients aligned with ``params`` (e.g. from ``torch.autograd.grad``); default:
                each parameter's ``.grad``.

        Does nothing while ``enabled`` is False or the probe is not attached.
        """
        if not self._on:
            return
        grads = [p.grad for p in self.params] if grads is None else list(grads)
        dev = self.params[0].device if self.params else torch.device("cpu")
        zero = torch.zeros((), device=dev)
        # All norms in one multi-tensor call (a few kernels on a GPU, not one per tensor); no host sync.
        present = [g.detach().float() for g in grads if g is not None]
        got = iter(torch._foreach_norm(present) if present else [])
        norms = [zero if g is None else next(got) for g in grads]
        norms = torch.stack(norms) if norms else torch.zeros(0, device=dev)
        self.to(dev)
        blocks = (self._member @ norms.square()).sqrt()  # (B,)
        split = [torch.stack([zero if v is None else v.to(dev) for v in row]) for row in self._pending]
        self._rows.append(torch.cat([*split, blocks, norms]))
        self._pending = self._no_pending()
        self._prune()

    def to(self, device: torch.device) -> GradientFlow:
        """Keep the block-membership matrix on ``device`` (done by :meth:`record`; call it before a CUDA
        graph capture, where a host-to-device copy is not allowed)."""
        d, have = torch.device(device), self._member.device
        if have.type != d.type or (d.index is not None and have.index != d.index):
            self._member = self._member_host.to(d, non_blocking=True)  # its source stays alive: no host sync needed
        return self

    def _collect(self, clear: bool) -> dict[str, Tensor]:
        n, p = len(self.blocks), len(self.params)
        data = torch.stack(self._rows) if self._rows else torch.empty(0, 4 * n + p)
        if clear:
            self._rows = []
        out = {k: data[:, j * n : (j + 1) * n] for j, k in enumerate((*self.KEYS, "grad_block"))}
        out["grad_params"] = data[:, 4 * n :]
        return out

    def reset(self) -> None:
        super().reset()
        self._pending = self._no_pending()
        self.last_grads = [{} for _ in self.blocks]
