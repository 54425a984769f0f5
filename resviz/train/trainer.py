"""Training as an iterator of step metrics.

:class:`Trainer` trains one net, or a residual net and its plain twin in lockstep (same batches in
the same order, one optimizer each), and yields one plain dict per optimisation step. The app, the
CLI, :func:`fit` and the tests all drive it the same way: ``for rec in trainer.steps(): ...``.

Record format (every value is a Python scalar, a str, or a dict of numpy arrays; never a tensor)::

    {
        "step": 12,               # optimisation steps completed (1-based)
        "total_steps": 300,
        "epoch": 0.48,            # step / steps_per_epoch
        "lr": 0.083,              # learning rate used for this step
        "images_per_s": 950.0,    # training batch images per second (EMA; all nets' time included)
        "time_s": 3.1,            # active seconds so far (training + evaluation; pauses excluded)
        "status": "running",      # "running"; the last record says "finished" or "diverged"
        "nets": {"residual": {"loss": 1.9, "acc": 0.31, "grad_norm": 2.4, "param_norm": 31.0,
                              "test_loss": 1.8, "test_acc": 0.35},  # test_* only at eval points
                 "plain": {...}},
        "probes": {"residual": {"grad_block": array (B,), ...}, "plain": {...}},  # every probe_every steps
        "diverged": ["plain"],    # only on the last record of a diverged run, with:
        "message": "...",         # what happened and what to try
    }

``probes`` holds :meth:`resviz.analysis.probes.LiveProbes.drain` readings of that one step as float32 numpy
arrays: ``f_norm``, ``s_norm``, ``ratio``, ``cosine``, ``mean_sq``, ``var``, ``branch_var``,
``grad_branch``, ``grad_shortcut``, ``grad_total``, ``grad_block`` are ``(B,)`` (one per block; NaN
where a block has no such part, e.g. no shortcut in a plain net) and ``grad_params`` is ``(P,)`` with
columns named by ``trainer.param_names[net]``.

Evaluation happens every ``cfg.eval_every`` steps (0: at the end of each epoch) and always at the
last step. A step whose loss, gradients or updated weights are not finite ends training at once: every
net gets back the weights (and norm statistics) it had before that step, and the record carries
``status="diverged"``, the names in ``"diverged"`` and a message, but no metrics of the failed step.
There is one host sync per step (the stacked loss/accuracy/norm values of all nets).

Speed (measured by ``bench/bench.py``; ``tests/test_perf_equivalence.py`` checks that none of it
changes a number): the instruments are attached only for the steps they record, so the other steps
run the bare net without a single hook; the optimizer uses PyTorch's ``foreach`` kernels (bitwise the
same updates as the per-parameter loop, about a quarter less optimizer time on CPU); the divergence
guard's copy of the weights is one ``_foreach_copy_``; on CPU, glibc is asked to keep freed memory
for the next step (:func:`resviz.runtime.keep_freed_memory`) instead of faulting it in again.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from resviz.analysis.probes import LiveProbes
from resviz.config import NetConfig, TrainConfig
from resviz.nn.models import build_net, plain_twin
from resviz.runtime import keep_freed_memory


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


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based ``step`` out of ``total`` for the configured schedule."""
    t = min(max(step / max(total, 1), 0.0), 1.0)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    warm = 0.25  # one-cycle: linear warm-up from lr/10 over the first quarter, then cosine to 0
    if t < warm:
        return cfg.lr * (0.1 + 0.9 * t / warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (t - warm) / (1.0 - warm)))


def make_optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; weight decay only on conv/linear weights, not on norms, biases or scales."""
    decay = [p for p in net.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach: one multi-tensor kernel per update term instead of one per parameter; the same numbers
    # as the loop bitwise (fused=True would be faster still but rounds differently).
    foreach = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay) or None
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), foreach=foreach)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, foreach=foreach)


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` pixels, then a random horizontal flip, per sample."""
    b, _, h, w = x.shape
    # non_blocking: on a GPU the copies of these small draws must not wait for the queued steps
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device, non_blocking=True)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device, non_blocking=True)
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    rows = off[0][:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = off[1][:, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = xp.permute(0, 2, 3, 1)[torch.arange(b, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)  # (B, C, H, W)


def _autocast(device: torch.device, *, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA only; CPU runs in float32 (CPU bf16 is slow and changes results).

    ``cache=False`` for code captured in a CUDA graph (autocast's weight-cast cache must not outlive it).
    """
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def _tensors(dataset: TensorDataset | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = dataset.tensors if isinstance(dataset, TensorDataset) else dataset
    return x, y


@torch.inference_mode()
def evaluate(
    net: nn.Module, dataset: TensorDataset | tuple[torch.Tensor, torch.Tensor], batch_size: int = 512,
    *, device: torch.device | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``net`` on ``dataset`` in eval mode (mode restored after)."""
    x, y = _tensors(dataset)
    if len(y) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = device or next(net.parameters()).device
    was_training = net.training
    net.eval()
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    try:
        for i in range(0, len(y), batch_size):
            xb = x[i : i + batch_size].to(device).contiguous(memory_format=torch.channels_last)
            yb = y[i : i + batch_size].to(device)
            with _autocast(device):
                logits = net(xb)
            loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
    finally:
        net.train(was_training)
    return loss_sum.item() / len(y), correct.item() / len(y)


class _Run:
    """One net's training state: optimizer and a copy of its tensors from before the current step."""

    def __init__(self, net: nn.Module, cfg: TrainConfig) -> None:
        self.net, self.opt = net, make_optimizer(net, cfg)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.state = list(net.parameters()) + list(net.buffers())
        self.backup = [t.detach().clone() for t in self.state]

    @torch.no_grad()
    def save(self, into: list[torch.Tensor] | None = None) -> None:
        """Copy the state into ``backup`` (or into ``into``, a list shaped like it), in one call."""
        torch._foreach_copy_(self.backup if into is None else into, self.state)

    def update_and_measure(self, loss: torch.Tensor, logits: torch.Tensor, yb: torch.Tensor,
                           update: Callable[[], None]) -> list[torch.Tensor]:
        """After ``loss.backward()``: the gradient norm, then ``update()``, then the weight norm and the
        correct count; device-side [loss, correct, grad_norm, param_norm] (no host sync)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        gnorm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
        update()
        pnorm = torch.nn.utils.get_total_norm([p.detach() for p in self.params])
        correct = (logits.argmax(1) == yb).sum().float()
        return [loss.detach().float(), correct, gnorm.float(), pnorm.float()]

    @torch.no_grad()
    def restore(self) -> None:
        torch._foreach_copy_(self.state, self.backup)


class Trainer:
    """Trains nets in lockstep on the same batches and yields one metrics record per step.

    Args:
        nets: one net, or a dict name -> net (e.g. ``{"residual": ..., "plain": ...}``).
        data: a ``DatasetBundle`` (or anything with ``train``/``test`` TensorDatasets).
        cfg: optimisation settings.
        probes: record ``resviz.analysis.probes.LiveProbes`` readings every ``cfg.probe_every`` steps (when > 0).
            Their hooks are attached for the recorded steps only and removed right after them.
        graphs: ``"auto"`` (default) captures each net's step in a CUDA graph when training SGD on a
            GPU (see :mod:`resviz.train.cuda_graphs`; ``graph_mode`` says what ran and ``graph_note`` why not);
            ``"off"`` never; ``"static"`` runs the graph loop's step without capture, on any device.
    """

    supports_graphs = True  # subclasses that wrap the nets (DistributedDataParallel) turn this off

    def __init__(self, nets: dict[str, nn.Module] | nn.Module, data: Any, cfg: TrainConfig, *, probes: bool = True,
                 graphs: str = "auto") -> None:
        if graphs not in ("auto", "off", "static"):
            raise ValueError(f"graphs must be 'auto', 'off' or 'static', got {graphs!r}")
        self.nets = dict(nets) if isinstance(nets, dict) else {"net": nets}
        if not self.nets:
            raise ValueError("Trainer needs at least one net")
        self.data, self.cfg, self.use_probes = data, cfg, probes and cfg.probe_every > 0
        self.device = resolve_device(cfg.device)
        n = len(_tensors(data.train)[1])
        if n == 0:
            raise ValueError("the training split is empty")
        self.batch_size = min(cfg.batch_size, n)
        self.steps_per_epoch = n // self.batch_size  # the last incomplete batch is dropped
        total = math.ceil(cfg.epochs * self.steps_per_epoch)
        self.total_steps = max(1, min(total, cfg.max_steps) if cfg.max_steps else total)
        self.status, self.message, self.step = "pending", "", 0
        self._probes: dict[str, LiveProbes] = {}
        self.param_names: dict[str, list[str]] = {}  # columns of the "grad_params" probe reading, per net
        self.graphs, self.graph_mode, self.graph_note = graphs, "off", ""

    def steps(self) -> Iterator[dict[str, Any]]:
        """Train, yielding a record per step; closing the generator early sets status "stopped"."""
        if self.status != "pending":
            raise RuntimeError("a Trainer runs once; make a new one to train again")
        torch.manual_seed(self.cfg.seed)  # stochastic depth draws from the global generator
        runs = self._prepare()
        self.status, self._time, self._ips = "running", 0.0, 0.0
        self._probes = self._make_probes()
        try:
            loop = self._graph_loop(runs)
            batches = self._batch_indices()
            yield from loop.steps(batches) if loop is not None else self._eager_steps(runs, batches)
        finally:
            if self.status == "running":
                self.status = "stopped"

    # -- internals ----------------------------------------------------------------------------
    def _prepare(self) -> dict[str, _Run]:
        x, y = _tensors(self.data.train)
        small = x.numel() * x.element_size() < 512 * 2**20
        self._x, self._y = (x.to(self.device), y.to(self.device)) if small else (x, y)
        if self.device.type == "cpu":
            keep_freed_memory()  # each step re-allocates the activations the last one freed
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms once
        self._gen = torch.Generator().manual_seed(self.cfg.seed)
        self._aug_gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        for net in self.nets.values():
            net.to(self.device, memory_format=fmt).train()
        return {name: _Run(net, self.cfg) for name, net in self.nets.items()}

    def _eager_steps(self, runs: dict[str, _Run], batches: Iterator[torch.Tensor]) -> Iterator[dict[str, Any]]:
        """One step and one record per batch, until a record ends the run."""
        for idx in batches:
            rec = self._step(runs, idx)
            yield rec
            if rec["status"] != "running":
                return

    def _graph_loop(self, runs: dict[str, _Run]) -> Any:
        """A :class:`resviz.train.cuda_graphs.GraphLoop` when ``graphs`` asks for one and it can run here, else None."""
        if self.graphs == "off":
            return None
        from resviz.train.cuda_graphs import GraphLoop, unsupported_reason

        why = unsupported_reason(self)
        if why:
            self.graph_note = why
            return None
        return GraphLoop(self, runs, capture=self.graphs == "auto")

    def _make_probes(self) -> dict[str, LiveProbes]:
        """One detached ``LiveProbes`` per net; :meth:`_forward_backward` attaches it for probed steps only."""
        if not self.use_probes:
            return {}
        probes = {name: LiveProbes(net) for name, net in self.nets.items()}
        self.param_names = {name: p.param_names for name, p in probes.items()}
        return probes

    def _probe_due(self) -> bool:
        """Whether the step being taken (``self.step + 1``) is one the instruments record."""
        return bool(self._probes) and (self.step + 1) % self.cfg.probe_every == 0

    def _drain_probes(self) -> dict[str, dict[str, np.ndarray]]:
        """The probed step's readings per net: ``{name: {key: (B,) or (P,) float32}}`` (one host sync each)."""
        return {name: {k: v[-1].copy() for k, v in p.drain().items() if len(v)} for name, p in self._probes.items()}

    def _batch_indices(self) -> Iterator[torch.Tensor]:
        bs = self.batch_size
        while True:
            perm = torch.randperm(len(self._y), generator=self._gen)
            for i in range(self.steps_per_epoch):
                if self.step >= self.total_steps:
                    return
                yield perm[i * bs : (i + 1) * bs]

    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self._x.device, non_blocking=True)
        xb = self._x.index_select(0, idx).to(self.device, non_blocking=True)  # a third cheaper than x[idx] on CPU
        yb = self._y.index_select(0, idx).to(self.device, non_blocking=True)
        if self.cfg.augment:
            xb = augment_batch(xb, self._aug_gen, max(1, xb.shape[-1] // 8))
        if self.cfg.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, yb

    def _forward_backward(self, name: str, run: _Run, xb: torch.Tensor, yb: torch.Tensor, lr: float) -> list[torch.Tensor]:
        """One optimisation step of one net; returns its device-side [loss, correct, grad_norm, param_norm]."""
        # Only the last step of each probe interval is recorded; the hooks exist for that step alone.
        probe = self._probes[name] if self._probe_due() else None
        run.save()
        for group in run.opt.param_groups:
            group["lr"] = lr
        with probe if probe is not None else contextlib.nullcontext():
            with _autocast(self.device):
                logits = run.net(xb)  # (B, num_classes)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=self.cfg.label_smoothing)
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            if probe is not None:
                probe.record()
        return run.update_and_measure(loss, logits, yb, run.opt.step)

    def _step(self, runs: dict[str, _Run], idx: torch.Tensor) -> dict[str, Any]:
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.total_steps, self.cfg)
        xb, yb = self._batch(idx)
        vals = [self._forward_backward(name, run, xb, yb, lr) for name, run in runs.items()]
        flat = torch.stack([v for vs in vals for v in vs]).tolist()  # the one host sync of this step
        self.step += 1
        return self._record(runs, self.step, lr, flat, len(yb), time.perf_counter() - t0, self._drain_probes)

    def _record(self, runs: dict[str, _Run], step: int, lr: float, flat: list[float], batch: int, dt: float,
                probes: Callable[[], dict[str, dict[str, np.ndarray]]], *, restored_from: int | None = None,
                ) -> dict[str, Any]:
        """The record of ``step`` from its synced ``flat`` values (4 per net); ``probes()`` gives its readings.

        A non-finite value ends the run: every net gets back its saved tensors, which are those from
        before ``restored_from`` (default: before this step).
        """
        rec = {"step": step, "total_steps": self.total_steps, "epoch": step / self.steps_per_epoch, "lr": lr}
        bad = [name for k, name in enumerate(runs) if not all(math.isfinite(v) for v in flat[4 * k : 4 * k + 4])]
        if bad:
            return self._diverged(runs, rec, bad, flat, restored_from or step)
        keys = ("loss", "acc", "grad_norm", "param_norm")
        rec["nets"] = {name: dict(zip(keys, flat[4 * k : 4 * k + 4])) for k, name in enumerate(runs)}
        for m in rec["nets"].values():
            m["acc"] /= batch  # correct count -> fraction
        self._tick(dt, batch)
        if self._probes and step % self.cfg.probe_every == 0:
            rec["probes"] = probes()
        if self._eval_due(step):
            self._evaluate(rec)
        self.status = "finished" if step >= self.total_steps else "running"
        return {**rec, "images_per_s": self._ips, "time_s": self._time, "status": self.status}

    def _tick(self, dt: float, batch: int) -> None:
        self._time += dt
        rate = batch / max(dt, 1e-9)
        self._ips = rate if self._ips == 0.0 else 0.9 * self._ips + 0.1 * rate

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.eval_every or self.steps_per_epoch
        return step >= self.total_steps or step % every == 0

    def _evaluate(self, rec: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        for name, net in self.nets.items():  # no instrument is attached between steps
            loss, acc = evaluate(net, self.data.test, max(self.batch_size, 256), device=self.device)
            if math.isfinite(loss):  # a non-finite test loss is left out rather than reported
                rec["nets"][name]["test_loss"] = loss
            rec["nets"][name]["test_acc"] = acc
        self._time += time.perf_counter() - t0

    def _diverged(self, runs: dict[str, _Run], rec: dict[str, Any], bad: list[str], flat: list[float],
                  restored_from: int) -> dict[str, Any]:
        for run in runs.values():
            run.restore()  # every net goes back to its saved state, keeping them in lockstep
        loss = flat[4 * list(runs).index(bad[0])]
        self.status, self.step = "diverged", rec["step"]
        since = "this step" if restored_from == rec["step"] else f"step {restored_from}, the last checked state"
        self.message = (
            f"training diverged at step {rec['step']} (lr {rec['lr']:.3g}): {', '.join(bad)} got a non-finite "
            f"{'loss' if not math.isfinite(loss) else 'gradient or weight'}. Stopped and restored the weights from "
            f"before {since}; try a lower learning rate."
        )
        return {**rec, "images_per_s": self._ips, "time_s": self._time, "status": "diverged",
                "message": self.message, "diverged": bad, "nets": {}}


def build_nets(net_cfg: NetConfig, *, twin: bool = True, seed: int = 0) -> dict[str, nn.Module]:
    """Build ``{"residual": net}`` (or ``{"plain": net}``), plus its plain twin with identical initial weights.

    With ``twin``, a plain ``net_cfg`` is paired with its all-skips residual twin.
    """
    torch.manual_seed(seed)
    net = build_net(net_cfg.residual_twin() if twin and net_cfg.is_plain else net_cfg)
    if not twin:
        return {"plain" if net_cfg.is_plain else "residual": net}
    return {"residual": net, "plain": plain_twin(net, same_weights=True)}  # same start: only the skips differ


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained nets, every record, and how the run ended."""

    nets: dict[str, nn.Module]
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = "pending"
    message: str = ""

    @property
    def final(self) -> dict[str, Any]:
        """The last record that has test metrics for every net ({} if none)."""
        for rec in reversed(self.history):
            if rec.get("nets") and all("test_acc" in m for m in rec["nets"].values()):
                return rec
        return {}


def fit(net: NetConfig | nn.Module | dict[str, nn.Module], data: Any, cfg: TrainConfig, *, twin: bool = True,
        probes: bool = False) -> FitResult:
    """Train to completion (a config is built seeded from ``cfg.seed``, with its plain twin if ``twin``)."""
    nets = build_nets(net, twin=twin, seed=cfg.seed) if isinstance(net, NetConfig) else net
    trainer = Trainer(nets, data, cfg, probes=probes)
    history = list(trainer.steps())
    return FitResult(nets=trainer.nets, history=history, status=trainer.status, message=trainer.message)
