"""What every training loop shares: per-net state, autocast, the schedule, batches and record building.

:class:`StepContext` is the one object a loop (:mod:`resviz.train.loops`, :mod:`resviz.train.cuda_graphs`)
receives: the nets' :class:`NetState`, their instruments, the training tensors and generators, the
step counter and the :class:`RecordBook` that turns synced numbers into a
:class:`~resviz.train.records.StepRecord`. Nothing here imports a loop or the Trainer.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from resviz.analysis.probes import LiveProbes
from resviz.config import TrainConfig
from resviz.train.records import TRAIN_METRICS, NetMetrics, Status, StepRecord

Readings = dict[str, dict[str, np.ndarray]]  # net -> reading key -> (B,) or (P,) float32


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
    """SGD (Nesterov) or AdamW; weight decay only on conv/linear weights, not on norms, biases or scales, unless
    ``cfg.decay_all`` (He et al.'s recipe: every parameter decays)."""
    params = [p for p in net.parameters() if p.requires_grad]
    decays = [cfg.decay_all or p.ndim > 1 for p in params]
    decay = [p for p, d in zip(params, decays, strict=True) if d]
    no_decay = [p for p, d in zip(params, decays, strict=True) if not d]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach: one multi-tensor kernel per update term instead of one per parameter; the same numbers
    # as the loop bitwise (fused=True would be faster still but rounds differently).
    foreach = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay) or None
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), foreach=foreach)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, foreach=foreach)


def autocast(device: torch.device, *, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA only; CPU runs in float32 (CPU bf16 is slow and changes results).

    ``cache=False`` for code captured in a CUDA graph (autocast's weight-cast cache must not outlive it).
    """
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


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


def tensors(dataset: TensorDataset | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, labels) tensors of a TensorDataset or a pair."""
    x, y = dataset.tensors if isinstance(dataset, TensorDataset) else dataset
    return x, y


@torch.inference_mode()
def evaluate(
    net: nn.Module, dataset: TensorDataset | tuple[torch.Tensor, torch.Tensor], batch_size: int = 512,
    *, device: torch.device | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``net`` on ``dataset`` in eval mode (mode restored after)."""
    x, y = tensors(dataset)
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
            with autocast(device):
                logits = net(xb)
            loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
    finally:
        net.train(was_training)
    return loss_sum.item() / len(y), correct.item() / len(y)


@torch.no_grad()
def recalibrate_norms(net: nn.Module, images: torch.Tensor, batch_size: int = 500) -> int:
    """Re-estimate every BatchNorm's running statistics on ``images`` with the net's current weights (precise BN).

    During training the running mean and variance are a moving average over batches seen by earlier weights,
    augmented ones at that; here each norm's statistics are reset and averaged evenly over ``images`` (passed
    through the net in order, un-augmented), so that eval mode normalises the images the net is evaluated on
    as the norms intend. Only the norms run in train mode (dropout and stochastic depth stay off); the weights,
    each norm's momentum and the net's mode are left as they were. Returns the number of norms recalibrated.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or len(images) == 0:
        return 0
    device = next(net.parameters()).device
    was_training, momenta = net.training, [m.momentum for m in norms]
    net.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch counts the same
        m.train()
    try:
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device)
            net(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)
    finally:
        for m, mom in zip(norms, momenta, strict=True):
            m.momentum = mom
        net.train(was_training)
    return len(norms)


def batch_indices(n: int, batch_size: int, total_steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The sample indices of each of ``total_steps`` batches: a fresh permutation per epoch, the last
    incomplete batch of an epoch dropped."""
    per_epoch, step = n // batch_size, 0
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(per_epoch):
            if step >= total_steps:
                return
            step += 1
            yield perm[i * batch_size : (i + 1) * batch_size]


class NetState:
    """One net's training state: optimizer and a copy of its tensors from before the current step.

    ``module`` is what the forward pass runs: the net itself, or a wrapper around it (DDP).
    """

    def __init__(self, net: nn.Module, cfg: TrainConfig) -> None:
        self.net, self.module, self.opt = net, net, make_optimizer(net, cfg)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.state = list(net.parameters()) + list(net.buffers())
        self.backup = [t.detach().clone() for t in self.state]

    @torch.no_grad()
    def save(self, into: list[torch.Tensor] | None = None) -> None:
        """Copy the state into ``backup`` (or into ``into``, a list shaped like it), in one call."""
        torch._foreach_copy_(self.backup if into is None else into, self.state)

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

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


class RecordBook:
    """Turns each step's synced numbers into a :class:`StepRecord`; keeps the clock, the status and the
    divergence guard's verdict. Evaluates the nets on the test split at evaluation points."""

    def __init__(self, cfg: TrainConfig, total_steps: int, steps_per_epoch: int, test: TensorDataset,
                 eval_batch: int) -> None:
        self.cfg, self.total_steps, self.steps_per_epoch = cfg, total_steps, steps_per_epoch
        self.test, self.eval_batch = test, eval_batch
        self.status, self.message = Status.PENDING, ""
        self.time_s, self.images_per_s = 0.0, 0.0

    def eval_due(self, step: int) -> bool:
        every = self.cfg.eval_every or self.steps_per_epoch
        return step >= self.total_steps or step % every == 0

    def record(self, states: dict[str, NetState], step: int, lr: float, flat: list[float], batch: int, dt: float,
               probes: Callable[[], Readings], *, probed: bool, restored_from: int | None = None) -> StepRecord:
        """The record of ``step`` from its synced ``flat`` values (4 per net); ``probes()`` gives its readings.

        A non-finite value ends the run: every net gets back its saved tensors, which are those from
        before ``restored_from`` (default: before this step).
        """
        bad = tuple(name for k, name in enumerate(states) if not all(math.isfinite(v) for v in flat[4 * k : 4 * k + 4]))
        if bad:
            return self._diverged(states, step, lr, bad, flat, restored_from or step)
        values = {name: dict(zip(TRAIN_METRICS, flat[4 * k : 4 * k + 4])) for k, name in enumerate(states)}
        for m in values.values():
            m["acc"] /= batch  # correct count -> fraction
        self._tick(dt, batch)
        readings = probes() if probed else {}
        if self.eval_due(step):
            self._evaluate(states, values)
        self.status = Status.FINISHED if step >= self.total_steps else Status.RUNNING
        return StepRecord(step=step, total_steps=self.total_steps, epoch=step / self.steps_per_epoch, lr=lr,
                          images_per_s=self.images_per_s, time_s=self.time_s, status=self.status,
                          nets={name: NetMetrics(**m) for name, m in values.items()}, probes=readings)

    def _tick(self, dt: float, batch: int) -> None:
        self.time_s += dt
        rate = batch / max(dt, 1e-9)
        self.images_per_s = rate if self.images_per_s == 0.0 else 0.9 * self.images_per_s + 0.1 * rate

    def _evaluate(self, states: dict[str, NetState], values: dict[str, dict[str, float]]) -> None:
        t0 = time.perf_counter()
        for name, st in states.items():  # no instrument is attached between steps
            loss, acc = evaluate(st.net, self.test, self.eval_batch)
            if math.isfinite(loss):  # a non-finite test loss is left out rather than reported
                values[name]["test_loss"] = loss
            values[name]["test_acc"] = acc
        self.time_s += time.perf_counter() - t0

    def _diverged(self, states: dict[str, NetState], step: int, lr: float, bad: tuple[str, ...], flat: list[float],
                  restored_from: int) -> StepRecord:
        for st in states.values():
            st.restore()  # every net goes back to its saved state, keeping them in lockstep
        loss = flat[4 * list(states).index(bad[0])]
        self.status = Status.DIVERGED
        since = "this step" if restored_from == step else f"step {restored_from}, the last checked state"
        self.message = (
            f"training diverged at step {step} (lr {lr:.3g}): {', '.join(bad)} got a non-finite "
            f"{'loss' if not math.isfinite(loss) else 'gradient or weight'}. Stopped and restored the weights from "
            f"before {since}; try a lower learning rate."
        )
        return StepRecord(step=step, total_steps=self.total_steps, epoch=step / self.steps_per_epoch, lr=lr,
                          images_per_s=self.images_per_s, time_s=self.time_s, status=Status.DIVERGED,
                          diverged=bad, message=self.message)


@dataclass(eq=False)
class StepContext:
    """Everything a loop needs to take steps; the loop advances ``step`` and reports through ``book``."""

    cfg: TrainConfig
    device: torch.device
    states: dict[str, NetState]
    probes: dict[str, LiveProbes]  # empty when the instruments are off
    book: RecordBook
    x: torch.Tensor  # the training split (on the device when it is small)
    y: torch.Tensor
    batch_size: int
    aug_gen: torch.Generator
    generators: tuple[torch.Generator, ...] = ()  # on the device, drawn from inside the step (stochastic depth)
    step: int = 0  # steps completed
    param_names: dict[str, list[str]] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.book.total_steps

    def lr(self) -> float:
        """The learning rate of the step being taken."""
        return lr_at(self.step, self.book.total_steps, self.cfg)

    def probe_due(self) -> bool:
        """Whether the step being taken (``step + 1``) is one the instruments record."""
        return bool(self.probes) and (self.step + 1) % self.cfg.probe_every == 0

    def drain_probes(self) -> Readings:
        """The probed step's readings per net: ``{name: {key: (B,) or (P,) float32}}`` (one host sync each)."""
        return {name: {k: v[-1].copy() for k, v in p.drain().items() if len(v)} for name, p in self.probes.items()}

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (augmented) batch of sample indices ``idx`` on the device."""
        idx = idx.to(self.x.device, non_blocking=True)
        xb = self.x.index_select(0, idx).to(self.device, non_blocking=True)  # a third cheaper than x[idx] on CPU
        yb = self.y.index_select(0, idx).to(self.device, non_blocking=True)
        if self.cfg.augment:
            xb = augment_batch(xb, self.aug_gen, max(1, xb.shape[-1] // 8))
        if self.cfg.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, yb

    def record(self, step: int, lr: float, flat: list[float], batch: int, dt: float, probes: Callable[[], Readings],
               *, restored_from: int | None = None) -> StepRecord:
        """:meth:`RecordBook.record` for this context's nets (readings only on probe steps)."""
        probed = bool(self.probes) and step % self.cfg.probe_every == 0
        return self.book.record(self.states, step, lr, flat, batch, dt, probes, probed=probed, restored_from=restored_from)
