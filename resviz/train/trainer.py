"""Training as an iterator of step records.

:class:`Trainer` trains one net, or a residual net and its plain twin in lockstep (same batches in
the same order, one optimizer each), and yields one :class:`~resviz.train.records.StepRecord` per
optimisation step. The app, the CLI, :func:`fit` and the tests all drive it the same way:
``for rec in trainer.steps(): ...``.

``rec.probes`` holds :meth:`resviz.analysis.probes.LiveProbes.drain` readings of that one step as float32 numpy
arrays: ``f_norm``, ``s_norm``, ``ratio``, ``cosine``, ``mean_sq``, ``var``, ``branch_var``,
``grad_branch``, ``grad_shortcut``, ``grad_total``, ``grad_block`` are ``(B,)`` (one per block; NaN
where a block has no such part, e.g. no shortcut in a plain net) and ``grad_params`` is ``(P,)`` with
columns named by ``trainer.param_names[net]``.

Evaluation happens every ``cfg.eval_every`` steps (0: at the end of each epoch) and always at the
last step. A step whose loss, gradients or updated weights are not finite ends training at once: every
net gets back the weights (and norm statistics) it had before that step, and the record carries
status diverged, the names in ``diverged`` and a message, but no metrics of the failed step.

The Trainer changes no process-wide setting: batches, augmentation and stochastic depth draw from
its own ``torch.Generator``s seeded from ``cfg.seed``, and thread counts, the allocator and cuDNN's
autotuner are left to the entry point (:func:`resviz.runtime.tune`).

Speed (``bench/bench.py`` measures it; ``tests/test_perf_equivalence.py`` checks that none of it
changes a number): the instruments are attached only for the steps they record, so the other steps
run the bare net without a single hook; the optimizer uses PyTorch's ``foreach`` kernels (bitwise the
same updates as the per-parameter loop); the divergence guard's copy of the weights is one
``_foreach_copy_``. The loops live in :mod:`resviz.train.loops` and :mod:`resviz.train.cuda_graphs`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from resviz.analysis.probes import LiveProbes
from resviz.config import NetConfig, TrainConfig
from resviz.nn.models import build_net, plain_twin
from resviz.train.cuda_graphs import GraphLoop, unsupported_reason
from resviz.train.loops import EagerLoop, Loop, Parallel
from resviz.train.records import Status, StepRecord
from resviz.train.state import (
    NetState,
    RecordBook,
    StepContext,
    augment_batch,
    batch_indices,
    evaluate,
    lr_at,
    make_optimizer,
    recalibrate_norms,
    tensors,
)

__all__ = ["FitResult", "Trainer", "augment_batch", "build_nets", "evaluate", "fit", "lr_at", "make_optimizer",
           "recalibrate_norms", "resolve_device"]


def resolve_device(name: str = "auto") -> torch.device:
    """The device to train on: ``"auto"`` picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available; use 'auto' or 'cpu'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' was requested but Metal is not available; use 'auto' or 'cpu'")
    return dev


class Trainer:
    """Trains nets in lockstep on the same batches and yields one :class:`StepRecord` per step.

    Args:
        nets: one net, or a dict name -> net (e.g. ``{"residual": ..., "plain": ...}``).
        data: a ``DatasetBundle`` (or anything with ``train``/``test`` TensorDatasets).
        cfg: optimisation settings.
        probes: record ``resviz.analysis.probes.LiveProbes`` readings every ``cfg.probe_every`` steps (when > 0).
            Their hooks are attached for the recorded steps only and removed right after them.
        graphs: ``"auto"`` (default) captures each net's step in a CUDA graph when training SGD on a
            GPU (see :mod:`resviz.train.cuda_graphs`; ``graph_mode`` says what ran and ``graph_note`` why not);
            ``"off"`` never; ``"static"`` runs the graph loop's step without capture, on any device.
        parallel: a data-parallel wrapper the eager loop runs with (:class:`resviz.train.distributed.DataParallel`).
    """

    def __init__(self, nets: dict[str, nn.Module] | nn.Module, data: Any, cfg: TrainConfig, *, probes: bool = True,
                 graphs: str = "auto", parallel: Parallel | None = None) -> None:
        if graphs not in ("auto", "off", "static"):
            raise ValueError(f"graphs must be 'auto', 'off' or 'static', got {graphs!r}")
        self.nets = dict(nets) if isinstance(nets, dict) else {"net": nets}
        if not self.nets:
            raise ValueError("Trainer needs at least one net")
        self.data, self.cfg, self.use_probes = data, cfg, probes and cfg.probe_every > 0
        self.graphs, self.parallel = graphs, parallel
        self.device = resolve_device(cfg.device)
        n = len(tensors(data.train)[1])
        if n == 0:
            raise ValueError("the training split is empty")
        self.batch_size = min(cfg.batch_size, n)
        self.steps_per_epoch = n // self.batch_size  # the last incomplete batch is dropped
        total = math.ceil(cfg.epochs * self.steps_per_epoch)
        self.total_steps = max(1, min(total, cfg.max_steps) if cfg.max_steps else total)
        self.param_names: dict[str, list[str]] = {}  # columns of the "grad_params" probe reading, per net
        self._book = RecordBook(cfg, self.total_steps, self.steps_per_epoch, data.test, max(self.batch_size, 256))
        self._ctx: StepContext | None = None
        self._loop: Loop | None = None

    @property
    def status(self) -> Status:
        """pending, running, then finished, diverged or stopped (the generator was closed early)."""
        return self._book.status

    @property
    def message(self) -> str:
        """What happened, when training diverged ("" otherwise)."""
        return self._book.message

    @property
    def step(self) -> int:
        """Optimisation steps completed."""
        return self._ctx.step if self._ctx is not None else 0

    @property
    def graph_mode(self) -> str:
        """How the steps run: "off" (eager), "cuda" (captured graphs) or "static"."""
        return self._loop.mode if self._loop is not None else "off"

    @property
    def graph_note(self) -> str:
        """Why the graph loop is not running ("" if nothing to say)."""
        return self._loop.note if self._loop is not None else ""

    def batch_indices(self) -> Iterator[torch.Tensor]:
        """The sample indices of each step's batch, in the order :meth:`steps` draws them (a fresh draw)."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        return batch_indices(len(tensors(self.data.train)[1]), self.batch_size, self.total_steps, gen)

    def steps(self) -> Iterator[StepRecord]:
        """Train, yielding a record per step; closing the generator early sets status "stopped"."""
        if self.status != Status.PENDING:
            raise RuntimeError("a Trainer runs once; make a new one to train again")
        ctx = self._ctx = self._prepare()
        self._book.status = Status.RUNNING
        self._loop = self._pick_loop(ctx)
        try:
            yield from self._loop.steps(ctx, self.batch_indices())
        finally:
            if self._book.status == Status.RUNNING:
                self._book.status = Status.STOPPED
            _set_drop_generator(self.nets, None)

    # -- internals ----------------------------------------------------------------------------
    def _prepare(self) -> StepContext:
        """Move the data and nets to the device; one optimizer, instruments and generators for the run."""
        x, y = tensors(self.data.train)
        small = x.numel() * x.element_size() < 512 * 2**20
        if small:
            x, y = x.to(self.device), y.to(self.device)
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        for net in self.nets.values():
            net.to(self.device, memory_format=fmt).train()
        # stochastic depth: one generator on the device for every net, in training order
        drop = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        drawn = _set_drop_generator(self.nets, drop)
        states = {name: NetState(net, self.cfg) for name, net in self.nets.items()}
        probes = {name: LiveProbes(net) for name, net in self.nets.items()} if self.use_probes else {}
        self.param_names = {name: p.param_names for name, p in probes.items()}
        return StepContext(cfg=self.cfg, device=self.device, states=states, probes=probes, book=self._book, x=x, y=y,
                           batch_size=self.batch_size, aug_gen=torch.Generator().manual_seed(self.cfg.seed + 1),
                           generators=(drop,) if drawn and self.device.type == "cuda" else (),
                           param_names=self.param_names)

    def _pick_loop(self, ctx: StepContext) -> Loop:
        """The graph loop when ``graphs`` asks for one and it can run here, else the eager loop."""
        if self.graphs == "off":
            return EagerLoop(self.parallel)
        why = unsupported_reason(ctx, self.graphs, self.parallel)
        if why:
            return EagerLoop(self.parallel, note=why)
        return GraphLoop(capture=self.graphs == "auto")


def _set_drop_generator(nets: dict[str, nn.Module], gen: torch.Generator | None) -> bool:
    """Point every stochastic-depth block of ``nets`` at ``gen``; True if any block draws masks."""
    found = False
    for net in nets.values():
        for m in net.modules():
            if hasattr(m, "drop_generator"):
                m.drop_generator = gen
                found = found or getattr(m, "drop_prob", 0.0) > 0
    return found


def build_nets(net_cfg: NetConfig, *, twin: bool = True, seed: int = 0) -> dict[str, nn.Module]:
    """Build ``{"residual": net}`` (or ``{"plain": net}``), plus its plain twin with identical initial weights.

    With ``twin``, a plain ``net_cfg`` is paired with its all-skips residual twin.
    """
    with torch.random.fork_rng(devices=[]):  # seeded initial weights; the caller's global RNG is left as it was
        torch.manual_seed(seed)
        net = build_net(net_cfg.residual_twin() if twin and net_cfg.is_plain else net_cfg)
        if not twin:
            return {"plain" if net_cfg.is_plain else "residual": net}
        plain = plain_twin(net, same_weights=True)  # same start: only the skip connections differ
    return {"residual": net, "plain": plain}


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained nets, every record, and how the run ended."""

    nets: dict[str, nn.Module]
    history: list[StepRecord] = field(default_factory=list)
    status: Status = Status.PENDING
    message: str = ""

    @property
    def final(self) -> StepRecord | None:
        """The last record that has test metrics for every net (None if none)."""
        return next((rec for rec in reversed(self.history) if rec.evaluated), None)


def fit(net: NetConfig | nn.Module | dict[str, nn.Module], data: Any, cfg: TrainConfig, *, twin: bool = True,
        probes: bool = False) -> FitResult:
    """Train to completion (a config is built seeded from ``cfg.seed``, with its plain twin if ``twin``)."""
    nets = build_nets(net, twin=twin, seed=cfg.seed) if isinstance(net, NetConfig) else net
    trainer = Trainer(nets, data, cfg, probes=probes)
    history = list(trainer.steps())
    return FitResult(nets=trainer.nets, history=history, status=trainer.status, message=trainer.message)
