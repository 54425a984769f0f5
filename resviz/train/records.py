"""Typed records of training: one step, a bounded history, a job's snapshot, and curves built from them.

Every value is a Python scalar, a str, a numpy array or one of these frozen dataclasses; never a
tensor, never a ``"<net>/<metric>"`` key. :func:`curves` is the one way a history becomes plottable
series (the app, the CLI, headless runs and the studies use it); a curve's label is built from its
fields and never parsed back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

import numpy as np

TRAIN_METRICS = ("loss", "acc", "grad_norm", "param_norm")  # every step of every net
TEST_METRICS = ("test_loss", "test_acc")  # evaluation points only
METRICS = TRAIN_METRICS + TEST_METRICS


class Status(StrEnum):
    """Where a training step, a trainer or a job stands; str-valued, so ``status == "running"`` holds."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    FINISHED = "finished"
    DIVERGED = "diverged"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        """Pending, running or paused: the job still holds a place in the registry."""
        return self in (Status.PENDING, Status.RUNNING, Status.PAUSED)


@dataclass(frozen=True, slots=True)
class NetMetrics:
    """One net's numbers at one step; ``test_*`` only at evaluation points (a non-finite test loss is None)."""

    loss: float
    acc: float  # fraction of the batch classified correctly
    grad_norm: float
    param_norm: float
    test_loss: float | None = None
    test_acc: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The metrics that are present, by name (the JSON form)."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NetMetrics:
        """From :meth:`as_dict` output; a JSON ``null`` train metric (a NaN written strictly) reads as NaN."""
        train = {k: math.nan if d.get(k) is None else float(d[k]) for k in TRAIN_METRICS}
        test = {k: None if d.get(k) is None else float(d[k]) for k in TEST_METRICS}
        return cls(**train, **test)


@dataclass(frozen=True)
class StepRecord:
    """What :meth:`resviz.train.trainer.Trainer.steps` yields after each optimisation step.

    ``probes`` holds the probed step's :class:`resviz.analysis.probes.LiveProbes` readings per net as
    float32 arrays (empty on other steps). The last record of a diverged run has ``status`` diverged,
    the names in ``diverged``, a ``message`` and no ``nets``.
    """

    step: int  # optimisation steps completed (1-based)
    total_steps: int
    epoch: float  # step / steps_per_epoch
    lr: float  # learning rate used for this step
    images_per_s: float  # training images per second (EMA; every net's time included)
    time_s: float  # active seconds so far (training and evaluation; pauses excluded)
    status: Status
    nets: Mapping[str, NetMetrics] = field(default_factory=dict)
    probes: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)
    diverged: tuple[str, ...] = ()
    message: str = ""

    @property
    def evaluated(self) -> bool:
        """Whether every net has test metrics at this step."""
        return bool(self.nets) and all(m.test_acc is not None for m in self.nets.values())

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` line: scalars only (instrument readings are left out)."""
        out: dict[str, Any] = {"step": self.step, "total_steps": self.total_steps, "epoch": self.epoch, "lr": self.lr,
                               "images_per_s": self.images_per_s, "time_s": self.time_s, "status": str(self.status)}
        if self.message:
            out["message"] = self.message
        if self.diverged:
            out["diverged"] = list(self.diverged)
        out["nets"] = {name: m.as_dict() for name, m in self.nets.items()}
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StepRecord:
        """From a ``metrics.jsonl`` line, as written now or by earlier versions (absent keys take defaults)."""
        nets = {name: NetMetrics.from_dict(m) for name, m in (d.get("nets") or {}).items()}
        return cls(step=int(d["step"]), total_steps=int(d.get("total_steps", d["step"])),
                   epoch=float(d.get("epoch") or 0.0), lr=float(d.get("lr") or 0.0),
                   images_per_s=float(d.get("images_per_s") or 0.0), time_s=float(d.get("time_s") or 0.0),
                   status=Status(d.get("status", Status.RUNNING)), nets=nets,
                   diverged=tuple(d.get("diverged") or ()), message=str(d.get("message") or ""))


class Series:
    """A bounded series of (step, value) points; when full, the older half is thinned by 2.

    Repeated thinning leaves point density growing geometrically towards the newest steps, so a
    long run keeps its overall shape and its recent detail in at most ``cap`` points. ``cap=None``
    keeps every point.
    """

    def __init__(self, cap: int | None = 500, shape: tuple[int, ...] = ()) -> None:
        self.cap, self.shape, self.n = None if cap is None else max(cap, 4), tuple(shape), 0
        size = 64 if self.cap is None else self.cap
        self.steps = np.empty(size, np.int64)
        self.values = np.empty((size, *self.shape), np.float32)

    def append(self, step: int, value: Any) -> None:
        value = np.asarray(value, np.float32)
        if value.shape != self.shape:
            raise ValueError(f"series holds shape {self.shape}, got {value.shape}")
        if self.n == len(self.steps):
            if self.cap is None:  # unbounded: grow
                self.steps = np.resize(self.steps, 2 * self.n)
                self.values = np.concatenate([self.values, np.empty_like(self.values)])
            else:
                half = self.n // 2
                keep = np.r_[np.arange(0, half, 2), np.arange(half, self.n)]
                self.n = len(keep)
                self.steps[: self.n], self.values[: self.n] = self.steps[keep], self.values[keep]
        self.steps[self.n], self.values[self.n] = step, value
        self.n += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the stored steps and values."""
        return self.steps[: self.n].copy(), self.values[: self.n].copy()

    def points(self) -> Points:
        return Points(*self.arrays())


@dataclass(frozen=True)
class Points:
    """A copy of one series: ``steps`` int64 ``(n,)``, ``values`` float32 ``(n,)`` or ``(n, B)``."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)

    def thinned(self, points: int) -> Points:
        """At most ``points`` rows, evenly spread over the rows, first and last kept."""
        n = len(self.steps)
        if n <= points:
            return self
        idx = np.unique(np.linspace(0, n - 1, points).round().astype(np.int64))
        return Points(self.steps[idx], self.values[idx])


@dataclass(frozen=True)
class History:
    """The recorded series of a run: per net and metric, learning rate, speed, and per net instrument readings."""

    nets: Mapping[str, Mapping[str, Points]] = field(default_factory=dict)  # net -> metric -> points
    lr: Points | None = None
    images_per_s: Points | None = None
    probes: Mapping[str, Mapping[str, Points]] = field(default_factory=dict)  # net -> reading -> (n, B) points

    def probe(self, net: str, key: str) -> Points | None:
        """The readings ``key`` of ``net`` (None before its first probed step)."""
        return self.probes.get(net, {}).get(key)

    def thinned(self, points: int) -> History:
        """The same history with every series thinned to at most ``points`` rows."""
        return History(nets={n: {k: p.thinned(points) for k, p in ms.items()} for n, ms in self.nets.items()},
                       lr=None if self.lr is None else self.lr.thinned(points),
                       images_per_s=None if self.images_per_s is None else self.images_per_s.thinned(points),
                       probes={n: {k: p.thinned(points) for k, p in rs.items()} for n, rs in self.probes.items()})


class HistoryRecorder:
    """Builds a :class:`History` from step records, each series capped at ``cap`` points (None: all).

    Records without metrics (the last record of a diverged run) add nothing. :attr:`latest` holds each
    net's newest metrics, the test metrics from its last evaluation.
    """

    def __init__(self, cap: int | None = 500) -> None:
        self.cap = cap
        self._nets: dict[str, dict[str, Series]] = {}
        self._probes: dict[str, dict[str, Series]] = {}
        self._lr, self._ips = Series(cap), Series(cap)
        self.latest: dict[str, NetMetrics] = {}

    def add(self, rec: StepRecord) -> None:
        if not rec.nets:
            return
        self._lr.append(rec.step, rec.lr)
        self._ips.append(rec.step, rec.images_per_s)
        for name, m in rec.nets.items():
            series = self._nets.setdefault(name, {})
            for key, value in m.as_dict().items():
                if key not in series:
                    series[key] = Series(self.cap)
                series[key].append(rec.step, value)
            old = self.latest.get(name)
            if old is not None:
                m = replace(m, test_loss=old.test_loss if m.test_loss is None else m.test_loss,
                            test_acc=old.test_acc if m.test_acc is None else m.test_acc)
            self.latest[name] = m
        for name, readings in rec.probes.items():
            series = self._probes.setdefault(name, {})
            for key, arr in readings.items():
                if key not in series:
                    series[key] = Series(self.cap, arr.shape)
                series[key].append(rec.step, arr)

    def history(self) -> History:
        """A copy of everything recorded so far."""
        return History(nets={n: {k: s.points() for k, s in ms.items()} for n, ms in self._nets.items()},
                       lr=self._lr.points() if self._lr.n else None,
                       images_per_s=self._ips.points() if self._ips.n else None,
                       probes={n: {k: s.points() for k, s in rs.items()} for n, rs in self._probes.items()})


def history_of(records: Iterable[StepRecord], cap: int | None = None) -> History:
    """The history of ``records`` (every point by default)."""
    rec = HistoryRecorder(cap)
    for r in records:
        rec.add(r)
    return rec.history()


@dataclass(frozen=True)
class Curve:
    """One scalar series of a run: ``metric`` of ``net`` (``net`` is "" for run-wide series: lr, images_per_s)."""

    net: str
    metric: str
    steps: np.ndarray
    values: np.ndarray

    @property
    def label(self) -> str:
        """``"<net>/<metric>"`` (or the metric alone for a run-wide series), e.g. a CSV column name."""
        return f"{self.net}/{self.metric}" if self.net else self.metric


def curves(history: History) -> list[Curve]:
    """Every scalar series of ``history``: each net's metrics in :data:`METRICS` order, then lr and images_per_s."""
    out = [Curve(net, key, p.steps, p.values) for net, series in history.nets.items()
           for key in METRICS if (p := series.get(key)) is not None]
    for key in ("lr", "images_per_s"):
        p = getattr(history, key)
        if p is not None:
            out.append(Curve("", key, p.steps, p.values))
    return out


def plot_table(items: Iterable[Curve], names: Mapping[str, str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Curves in the shape :func:`resviz.plots.training_curves_figure` takes: ``{net: {step, loss, acc,
    test_step, test_acc, test_loss_step, test_loss}}``; ``names`` renames nets (nets missing from it are left out)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for c in items:
        if not c.net or (names is not None and c.net not in names):
            continue
        table = out.setdefault(names[c.net] if names is not None else c.net, {})
        if c.metric in ("loss", "acc"):
            table["step"], table[c.metric] = c.steps, c.values
        elif c.metric in TEST_METRICS:
            table[c.metric] = (c.steps, c.values)  # split into steps and values below
    for table in out.values():
        if "test_acc" in table:
            table["test_step"], table["test_acc"] = table["test_acc"]
        if "test_loss" in table:  # its own steps: a non-finite test loss was left out at its evaluation
            table["test_loss_step"], table["test_loss"] = table["test_loss"]
    return out


@dataclass(frozen=True)
class JobSnapshot:
    """A thread-safe copy of everything the app shows about one training job."""

    id: str
    status: Status
    error: str
    created: float
    started: float | None
    ended: float | None
    step: int
    total_steps: int
    epoch: float
    progress: float  # 0..1
    eta_s: float | None  # None until known and once the job has ended
    images_per_s: float
    time_s: float
    names: tuple[str, ...]  # the nets, in training order
    net_cfg: dict[str, Any]
    train_cfg: dict[str, Any]
    latest: Mapping[str, NetMetrics]  # each net's newest metrics (test metrics from the last evaluation)
    history: History
    param_names: Mapping[str, tuple[str, ...]]  # columns of each net's "grad_params" readings
    engine: str = ""  # how a GPU runs the steps ("" on a CPU)
