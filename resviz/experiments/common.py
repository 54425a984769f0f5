"""What every study shares: configs with a seed and a budget, progress reporting, data, small helpers.

Studies train small nets on the built-in ``shapes`` data for a fixed number of steps (never for a
fixed time), so a seed and a budget always give the same numbers (see :mod:`.twins` for training).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any, ClassVar, TypeVar

import numpy as np
from torch import nn

from resviz.config import ORDERS, NetConfig, TrainConfig
from resviz.data.datasets import DatasetBundle, load_dataset
from resviz.train.trainer import evaluate

BUDGETS = ("zoo", "small", "medium")  # "zoo": the converged nets shipped in pretrained/, nothing trained
ProgressFn = Callable[[float, str], None]
C = TypeVar("C", bound="StudyConfig")


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """Fields every study config has; each study adds its own and a preset per budget."""

    seed: int = 0  # seeds data, initialisation, batch order and every random draw of the study
    budget: str = "small"  # "small" (the budget docs/experiments.md reports, with each study's time) or "medium"
    device: str = "cpu"  # "cpu" keeps results identical everywhere; "auto" uses a GPU when there is one

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}  # per subclass: overrides of the defaults per budget

    @classmethod
    def preset(cls: type[C], budget: str = "small", seed: int = 0, **overrides: Any) -> C:
        """The study's configuration for a budget, with any field overridden."""
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
        values = {**cls.PRESETS.get(budget, {}), **overrides}
        return cls(seed=seed, budget=budget, **values)

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """Rebuild from :meth:`to_dict` output (lists become tuples again)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The study zoo (pretrained/make_pretrained.py): CIFAR-style nets of width 16 in the original ("post") order,
# trained to convergence on shapes at 16 px (20,000 training images of data seed 1). Studies on the zoo load
# them instead of training; their results are stored in pretrained/studies/ (see resviz.experiments.stored).
ZOO: dict[str, Any] = {"width": 16, "input_size": 16, "train_size": 20000, "test_size": 1000, "data_seed": 1,
                       "order": "post", "source": "pretrained"}
ZOO_DEPTHS = (20, 56, 110)

# The training budget every study that trains shares: in one process, each net is then trained once
# (the degradation study's depth-32 twins are the lesion and landscape studies' reference pair).
MEDIUM_TRAINING: dict[str, Any] = {"width": 16, "input_size": 24, "train_size": 5000, "steps": 1500, "batch_size": 128}


@dataclass(frozen=True, kw_only=True)
class TrainingBudget(StudyConfig):
    """A study that trains on ``shapes``: data size and schedule (small-budget defaults)."""

    width: int = 8  # channels of the first stage
    input_size: int = 16  # image side in pixels
    train_size: int = 4000
    test_size: int = 1000
    steps: int = 300  # optimisation steps per net
    batch_size: int = 128
    lr: float = 0.1  # peak of the one-cycle schedule (SGD, Nesterov momentum 0.9, weight decay 5e-4)
    data_seed: int | None = None  # seeds the data alone (None: ``seed``); the zoo's nets were trained on seed 1

    def data(self) -> DatasetBundle:
        return shapes(self.input_size, self.train_size, self.test_size, self.seed if self.data_seed is None else self.data_seed)

    def schedule(self) -> Schedule:
        return Schedule(steps=self.steps, batch_size=self.batch_size, lr=self.lr)


@dataclass(frozen=True, kw_only=True)
class TrainedStudyConfig(TrainingBudget):
    """A study of residual/plain twins: the shared budget plus the block order of every net."""

    # Pre-activation blocks (He et al. 2016b) let ResNet-56 converge in a CPU budget; the original "post"
    # order needs several times more steps at 56 layers (30-40% training error after 300 steps here).
    order: str = "pre"
    # "auto": shipped checkpoints (pretrained/) of exactly this architecture when there are, else train;
    # "train": always train; "pretrained": shipped checkpoints or an error (the zoo budget)
    source: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.source not in ("auto", "train", "pretrained"):
            raise ValueError(f"source must be 'auto', 'train' or 'pretrained', got {self.source!r}")

    def net(self, depth: int, num_classes: int) -> NetConfig:
        """The residual net of this budget at ``depth`` (its plain twin has the same layers, no skips)."""
        return net_config(depth, self.width, self.input_size, num_classes, order=self.order)


class Progress:
    """A progress callback ``fn(fraction, message)`` mapped onto a sub-range of the whole study."""

    def __init__(self, fn: ProgressFn | None = None, lo: float = 0.0, hi: float = 1.0) -> None:
        self.fn, self.lo, self.hi = fn, lo, hi

    def __call__(self, fraction: float, message: str = "") -> None:
        if self.fn is not None:
            self.fn(self.lo + (self.hi - self.lo) * min(max(float(fraction), 0.0), 1.0), message)

    def span(self, lo: float, hi: float) -> Progress:
        """A child whose 0..1 covers ``lo..hi`` of this one."""
        width = self.hi - self.lo
        return Progress(self.fn, self.lo + width * lo, self.lo + width * hi)

    def spans(self, weights: list[float]) -> list[Progress]:
        """Consecutive children with widths proportional to ``weights``."""
        total, edges = sum(weights) or 1.0, np.cumsum([0.0, *weights])
        return [self.span(edges[i] / total, edges[i + 1] / total) for i in range(len(weights))]


NET_LABELS = {"residual": "ResNet", "plain": "plain"}  # how a study's net kinds are named on screen and in the docs


def net_label(name: str) -> str:
    """A study row's net as people name it: ``residual-20`` -> ``ResNet-20``, ``residual`` -> ``ResNet``; others
    (``plain-20``) as they are."""
    kind, dash, depth = name.partition("-")
    return NET_LABELS.get(kind, kind) + dash + depth


def as_progress(progress: ProgressFn | Progress | None) -> Progress:
    return progress if isinstance(progress, Progress) else Progress(progress)


# -- data -----------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def shapes(input_size: int, train_size: int, test_size: int, seed: int) -> DatasetBundle:
    """The built-in ``shapes`` data (cached: studies share it and never modify it)."""
    return load_dataset("shapes", input_size=input_size, train_size=train_size, test_size=test_size, seed=seed)


def error(net: nn.Module, split: Any) -> float:
    """Classification error (1 - accuracy) in eval mode."""
    return 1.0 - evaluate(net, split, batch_size=500)[1]


# -- brief training of residual/plain twins -------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Schedule:
    """How long and how a twin pair is trained: SGD with Nesterov momentum, one-cycle learning rate."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 0.05
    weight_decay: float = 5e-4

    def train_config(self, seed: int, device: str) -> TrainConfig:
        return TrainConfig(lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size, epochs=1e6,
                           max_steps=self.steps, seed=seed, device=device, probe_every=0, eval_every=10**9,
                           channels_last=False)


def smooth_curve(values: list[float], points: int = 100) -> tuple[list[int], list[float]]:
    """At most ``points`` (step, running mean) pairs of a per-step curve, smoothed over a window."""
    if not values:
        return [], []
    a = np.asarray(values, dtype=np.float64)
    w = max(1, len(a) // points)
    kernel = np.ones(w) / w
    smooth = np.convolve(np.where(np.isfinite(a), a, np.nan), kernel, mode="valid")
    steps = np.arange(w, len(a) + 1)
    idx = np.unique(np.linspace(0, len(smooth) - 1, min(points, len(smooth))).round().astype(int))
    return steps[idx].tolist(), [float(v) if math.isfinite(v) else None for v in smooth[idx]]


def timer() -> Callable[[], float]:
    """A stopwatch: call the returned function for the seconds elapsed."""
    t0 = time.perf_counter()
    return lambda: round(time.perf_counter() - t0, 2)


def check(claim: str, holds: bool, detail: str) -> dict[str, Any]:
    """One reproduced (or not) ordering, as plain data."""
    return {"claim": claim, "holds": bool(holds), "detail": detail}


def net_config(depth: int, width: int, input_size: int, num_classes: int, **block: Any) -> NetConfig:
    """A CIFAR-style net for the study data (basic blocks, shortcut option B unless given)."""
    from resviz.config import BlockConfig

    return NetConfig(style="cifar", depth=depth, width=width, input_size=input_size, num_classes=num_classes,
                     block=BlockConfig(**block))

