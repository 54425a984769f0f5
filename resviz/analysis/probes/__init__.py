"""Instruments: context managers that watch a residual net without changing it.

Each instrument attaches hooks on ``__enter__`` and removes every one of them on ``__exit__``, also when
the body raises. They only observe: mode, outputs, gradients, buffers and the optimizer are untouched.
Per-step readings stay on the device as detached tensors (no host sync per step); ``result()`` copies
them to the CPU in one transfer, ``drain()`` does the same and clears them, ``reset()`` just clears.
Set ``probe.enabled = False`` (or use ``with probe.paused():``) to skip steps cheaply.

Instruments address a net through its merges (:mod:`resviz.nn.merge`): any module holding merge
modules can be probed, and block ``i`` is the i-th merge.

Result formats (CPU float32 tensors; ``B`` = number of blocks, one column per merge, in forward order):

* ``Activations.result()``: list (one per tapped block, see ``.indices``) of dicts with ``"f"`` (F(x)),
  ``"s"`` (S(x)), ``"sum"`` (F(x) + S(x)) and ``"out"`` (block output), each ``(N, C, H, W)`` with the
  calls concatenated along N; ``"f"``/``"s"`` are ``None`` when absent (removed block / skip off).
* ``BranchMagnitudes.result()``: ``f_norm``, ``s_norm``, ``ratio``, ``cosine``: ``(calls, B)``.
* ``SignalProp.result()``: ``mean_sq``, ``var``, ``branch_var``: ``(calls, B)``.
* ``GradientFlow.result()``: ``grad_branch``, ``grad_shortcut``, ``grad_total``, ``grad_block``:
  ``(steps, B)``; ``grad_params``: ``(steps, P)``, column j is ``GradientFlow.param_names[j]``.
* ``LiveProbes.drain()``: the union of the last three dicts as float32 numpy arrays.

One row per net forward ("calls") or per ``GradientFlow.record()`` ("steps"); NaN marks a block that
was not seen in that call.
"""

from resviz.analysis.probes.base import Probe, blocks_of, to_cpu, to_numpy
from resviz.analysis.probes.forward import Activations, BranchMagnitudes, SignalProp
from resviz.analysis.probes.gradients import GradientFlow
from resviz.analysis.probes.live import LiveProbes, gradient_norms_by_layer, signal_prop

__all__ = [
    "Activations",
    "BranchMagnitudes",
    "GradientFlow",
    "LiveProbes",
    "Probe",
    "SignalProp",
    "blocks_of",
    "gradient_norms_by_layer",
    "signal_prop",
    "to_cpu",
    "to_numpy",
]
