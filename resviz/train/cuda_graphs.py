"""CUDA-graph training: each net's step captured once and replayed, synced once per logging interval.

A small net's training step on a GPU is a few hundred short kernels, and launching them from Python
costs more than running them: ResNet-20 at 32x32, batch 512, bf16 trains about twice as fast when its
step is replayed from a CUDA graph as when it is launched op by op (``bench/bench.py --sections gpu``).
:class:`GraphLoop` is the :class:`~resviz.train.trainer.Trainer`'s loop for that case:

* The batch, the labels and the learning rate live in static device buffers; each step copies the
  next batch into them (indices and augmentation as in the eager loop) and replays one graph per net.
* Each net has two graphs: a bare step, and a step with every live instrument attached (branch
  magnitudes, gradient flow, signal statistics). The hooks run once, while the probed step is captured;
  replays run their kernels, which write the readings into the graph's output buffers, and the loop
  copies those into a preallocated buffer. Steps that record nothing run the bare graph.
* The optimizer update is captured too, with the learning rate read from its device buffer (PyTorch's
  SGD reads a Python float, which a capture would freeze): :func:`sgd_step` computes the same update.
* Metrics stay on the device until the end of the logging interval (intervals end at multiples of
  ``probe_every``, or of ``MAX_INTERVAL`` when that is smaller or the instruments are off; also at
  evaluation points and at the last step): then one host copy brings back every
  step's loss, accuracy and norms and the probed step's readings, and the records of the interval are
  yielded together. The divergence guard therefore checks once per interval: if a step went non-finite,
  the nets get back the weights they had at the start of the interval, and the record says so.

The first ``WARMUP`` steps run eagerly on a side stream (they create cuDNN/cuBLAS handles and the
momentum buffers, as a capture requires), then the graphs are captured. What cannot be captured falls
back to the eager loop with a note in ``trainer.graph_note`` (AdamW, too few steps, a failed capture).

``capture=False`` ("static" mode) runs the very same step function eagerly, on any device: the CPU
tests use it to check the loop's bookkeeping, :func:`sgd_step` and the deferred divergence guard
against the eager Trainer.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from resviz.train.trainer import Trainer, _autocast, _Run, lr_at

WARMUP = 3  # eager steps before capture (PyTorch's guidance for whole-network capture)
MAX_INTERVAL = 10  # steps between host syncs when the instruments are off or record less often


def unsupported_reason(trainer: Trainer) -> str:
    """Why ``trainer`` cannot use the graph loop ("" when it can)."""
    if not trainer.supports_graphs:
        return f"{type(trainer).__name__} runs the eager loop"
    if trainer.cfg.optimizer != "sgd":
        return f"the graph loop captures SGD only; {trainer.cfg.optimizer} runs the eager loop"
    if trainer.graphs == "auto":
        if trainer.device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        if trainer.total_steps <= WARMUP + 2:
            return "too few steps to be worth a capture"
    return ""


@torch.no_grad()
def sgd_step(opt: torch.optim.Optimizer, lr: torch.Tensor) -> None:
    """One step of ``opt`` (a ``torch.optim.SGD``) with the learning rate read from the 0-d tensor ``lr``.

    The same update as ``opt.step()`` for weight decay, momentum (dampening 0) and Nesterov, written with
    out-of-place multi-tensor ops so nothing calls ``.item()``: it can be captured in a CUDA graph. Needs
    the momentum buffers to exist (one eager ``opt.step()`` creates them). Agrees with ``opt.step()`` to
    float32 rounding (``p - fl(lr * d)`` instead of a fused ``p + (-lr) * d``).
    """
    for group in opt.param_groups:
        if group.get("dampening", 0.0) or group.get("maximize", False):
            raise ValueError("sgd_step supports dampening=0 and maximize=False only")
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        d = [p.grad for p in params]
        if group["weight_decay"]:
            d = torch._foreach_add(d, params, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum:
            bufs = [opt.state[p].get("momentum_buffer") for p in params]
            if any(b is None for b in bufs):
                raise ValueError("sgd_step needs the momentum buffers: take one eager opt.step() first")
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, d)
            d = torch._foreach_add(d, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_sub_(params, torch._foreach_mul(d, lr))


class _NetStep:
    """One net's step (bare or instrumented) on the loop's static buffers; captured or run eagerly.

    ``run()`` returns ``(metrics, readings)``: metrics ``(4,)`` = loss, correct count, gradient norm,
    weight norm; readings the flat instrument readings (``None`` for the bare step).
    """

    def __init__(self, trainer: Trainer, run: _Run, probe: Any, statics: tuple[torch.Tensor, ...], capture: bool) -> None:
        self.trainer, self.run_, self.probe, self.capture = trainer, run, probe, capture
        self.xs, self.ys, self.lr = statics
        self.layout: list[tuple[str, tuple[int, ...]]] = []
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: tuple[torch.Tensor, torch.Tensor | None] | None = None
        if capture:
            run.opt.zero_grad(set_to_none=True)  # the capture allocates the static gradients
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._body()

    def _body(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        t, run = self.trainer, self.run_
        if not self.capture:
            run.opt.zero_grad(set_to_none=True)
        readings = None
        with self.probe if self.probe is not None else contextlib.nullcontext():
            with _autocast(t.device, cache=not self.capture):
                logits = run.net(self.xs)  # (B, num_classes)
            loss = F.cross_entropy(logits.float(), self.ys, label_smoothing=t.cfg.label_smoothing)
            loss.backward()
            if self.probe is not None:
                self.probe.record()
                taken = self.probe.take()  # {key: (1, B) or (1, P)}, on the device
                self.layout = [(k, tuple(v.shape)) for k, v in taken.items()]
                readings = torch.cat([v.reshape(-1).float() for v in taken.values()])
        metrics = run.update_and_measure(loss, logits, self.ys, lambda: sgd_step(run.opt, self.lr))
        return torch.stack(metrics), readings

    def run(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.out = self._body()
        assert self.out is not None
        return self.out

    def unpack(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """This step's readings from their flat host copy: ``{key: (B,) or (P,) float32}`` (last row)."""
        out, start = {}, 0
        for key, shape in self.layout:
            n = int(np.prod(shape))
            out[key] = flat[start : start + n].reshape(shape)[-1].astype(np.float32, copy=True)
            start += n
        return out


class GraphLoop:
    """The Trainer's loop with captured steps and one host sync per logging interval (module docstring)."""

    def __init__(self, trainer: Trainer, runs: dict[str, _Run], *, capture: bool) -> None:
        self.t, self.runs, self.capture = trainer, runs, capture
        every = trainer.cfg.probe_every if trainer._probes else 0
        self.interval = min(every, MAX_INTERVAL) if every else MAX_INTERVAL

    # -- setup ------------------------------------------------------------------------------------
    def _warmup(self, batches: Iterator[torch.Tensor]) -> list[dict[str, Any]]:
        """The first steps, eager, on a side stream (their records are returned, not yielded, so the
        consumer never runs inside the stream context)."""
        t = self.t
        stream = torch.cuda.Stream(t.device) if self.capture else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            recs = list(itertools.islice(t._eager_steps(self.runs, batches), WARMUP))  # takes no batch beyond
        if stream is not None:
            torch.cuda.current_stream(t.device).wait_stream(stream)
        return recs

    def _build(self) -> None:
        t = self.t
        x, y = t._x, t._y
        fmt = torch.channels_last if t.cfg.channels_last and x.dim() == 4 else torch.contiguous_format
        # Shapes of a batch (augmentation keeps them); contents do not matter to a capture, which runs nothing.
        self.xs = torch.zeros((t.batch_size, *x.shape[1:]), dtype=x.dtype, device=t.device).contiguous(memory_format=fmt)
        self.ys = torch.zeros(t.batch_size, dtype=y.dtype, device=t.device)
        self.lr = torch.zeros((), device=t.device)
        statics = (self.xs, self.ys, self.lr)
        self.steps_: dict[str, dict[bool, _NetStep]] = {}
        for name, run in self.runs.items():
            probe = t._probes.get(name)
            if probe is not None:
                probe.grad.to(t.device)
            variants = {False: _NetStep(t, run, None, statics, self.capture)}
            if probe is not None:
                variants[True] = _NetStep(t, run, probe, statics, self.capture)
            self.steps_[name] = variants
        self.hist = torch.zeros(self.interval, 4 * len(self.runs), device=t.device)
        self.pbuf: dict[str, torch.Tensor] = {}  # each net's readings of the last probed step

    # -- the loop ---------------------------------------------------------------------------------
    def steps(self, batches: Iterator[torch.Tensor]) -> Iterator[dict[str, Any]]:
        t = self.t
        for rec in self._warmup(batches):  # in static mode too, so both modes keep the same books
            yield rec
            if rec["status"] != "running":
                return
        first = next(batches, None)
        if first is None:
            return
        try:
            self._build()
        except (RuntimeError, ValueError) as exc:  # capture refused: say why, train on eagerly
            if not self.capture:
                raise
            t.graph_note = f"CUDA graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); eager loop"
            for run in self.runs.values():
                run.opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(t.device)
            yield from t._eager_steps(self.runs, _chain(first, batches))
            return
        t.graph_mode = "cuda" if self.capture else "static"
        yield from self._run(first, batches)

    def _run(self, first: torch.Tensor, batches: Iterator[torch.Tensor]) -> Iterator[dict[str, Any]]:
        """Enqueue steps; at the end of an interval start its host copy, and turn it into records only
        after the next step is queued, so the GPU keeps working while the host reads and reports."""
        t = self.t
        # Two alternating backups: while interval k is checked, interval k+1 has already saved its start.
        backups = [{name: run.backup for name, run in self.runs.items()},
                   {name: [b.clone() for b in run.backup] for name, run in self.runs.items()}]
        pending: list[tuple[int, float, int]] = []  # (step, lr, batch size) of this interval
        inflight: _Interval | None = None  # the last interval, copied to the host but not yet reported
        slot, start, t0 = 0, 0, 0.0
        for idx in _chain(first, batches):
            if not pending:
                slot = 1 - slot
                for name, run in self.runs.items():
                    run.save(backups[slot][name])  # the state at this interval's start
                start, t0 = t.step + 1, time.perf_counter()
            lr = lr_at(t.step, t.total_steps, t.cfg)
            probed = t._probe_due()
            xb, yb = t._batch(idx)
            self.xs.copy_(xb, non_blocking=True)
            self.ys.copy_(yb, non_blocking=True)
            self.lr.fill_(lr)
            row = self.hist[len(pending)]
            for k, (name, variants) in enumerate(self.steps_.items()):
                metrics, readings = variants[probed].run()
                row[4 * k : 4 * k + 4].copy_(metrics)
                if probed and readings is not None:
                    if name not in self.pbuf:
                        self.pbuf[name] = torch.empty_like(readings)
                    self.pbuf[name].copy_(readings)
            t.step += 1
            pending.append((t.step, lr, len(yb)))
            if inflight is not None:  # this step is queued: report the last interval meanwhile
                yield from self._report(inflight, backups)
                inflight = None
                if t.status != "running":
                    return
            final = t._eval_due(t.step)  # an evaluation point, the last step included
            if t.step % self.interval == 0 or probed or final:
                inflight = self._copy(pending, probed, start, t0, slot)
                pending = []
                if final:  # evaluation needs this very state
                    yield from self._report(inflight, backups)
                    inflight = None
                    if t.status != "running":
                        return

    def _copy(self, pending: list[tuple[int, float, int]], probed: bool, start: int, t0: float, slot: int) -> _Interval:
        """Start the interval's one device-to-host copy (metrics of every step, readings of a probed last step)."""
        n = len(pending)
        names = list(self.pbuf) if probed else []
        flat = torch.cat([self.hist[:n].reshape(-1), *(self.pbuf[name] for name in names)])  # a new tensor
        event = None
        if flat.device.type == "cuda":
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = flat.cpu()
        return _Interval(list(pending), names, host, event, start, t0, slot)

    def _report(self, iv: _Interval, backups: list[dict[str, list[torch.Tensor]]]) -> Iterator[dict[str, Any]]:
        """Wait for an interval's copy (the one host sync of the interval) and yield its records."""
        t, n, width = self.t, len(iv.pending), 4 * len(self.runs)
        if iv.event is not None:
            iv.event.synchronize()
        host = iv.host.numpy()
        dt = (time.perf_counter() - iv.t0) / n
        vals, off = host[: n * width].reshape(n, width), n * width
        readings: dict[str, dict[str, np.ndarray]] = {}
        for name in iv.names:
            size = self.pbuf[name].numel()
            readings[name] = self.steps_[name][True].unpack(host[off : off + size])
            off += size
        for name, run in self.runs.items():
            run.backup = backups[iv.slot][name]  # what the divergence guard restores: this interval's start
        for j, (step, lr, batch) in enumerate(iv.pending):
            rec = t._record(self.runs, step, lr, vals[j].tolist(), batch, dt, lambda: readings, restored_from=iv.start)
            yield rec
            if rec["status"] != "running":
                return


@dataclass
class _Interval:
    """One logging interval on its way to the host."""

    pending: list[tuple[int, float, int]]
    names: list[str]  # nets whose readings follow the metrics in ``host``
    host: torch.Tensor
    event: torch.cuda.Event | None
    start: int  # its first step
    t0: float  # when it started (wall clock)
    slot: int  # its backup


def _chain(first: torch.Tensor, rest: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield first
    yield from rest
