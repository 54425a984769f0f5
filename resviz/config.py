"""Typed, frozen configuration for residual blocks, networks and training.

Configs are plain data: they round-trip through ``asdict``/JSON so a checkpoint, a URL or a CLI
flag can carry them, and they validate themselves on construction so a bad value fails early with a
message that says what is allowed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

KINDS = ("basic", "bottleneck")
# He et al. 2016b, Table 2: (a) post, (b) bn_after_add, (c) relu_before_add,
# (d) relu_only_pre, (e) pre (full pre-activation).
ORDERS = ("post", "bn_after_add", "relu_before_add", "relu_only_pre", "pre")
PRE_ORDERS = ("relu_only_pre", "pre")
NORMS = ("batch", "group", "none")
ACTIVATIONS = ("relu", "gelu", "silu", "elu", "leaky_relu", "tanh", "identity")
# A: subsample + zero-pad channels; B: project only when the shape changes; C: always project.
SHORTCUTS = ("A", "B", "C")
SCALINGS = ("none", "fixed", "learnable")
STYLES = ("cifar", "imagenet")
IMAGENET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """How every residual block of a net is built: y = post(F(x) + S(x))."""

    kind: str = "basic"  # "basic" (3x3, 3x3) or "bottleneck" (1x1, 3x3, 1x1, expansion 4)
    order: str = "post"  # where norm/activation sit relative to the addition (see ORDERS)
    norm: str = "batch"  # "batch", "group" or "none"
    groups: int = 8  # GroupNorm groups (reduced to a divisor of the channel count when needed)
    act: str = "relu"  # activation name; each use is its own module
    shortcut: str = "B"  # S(x) when the shape changes: "A", "B" or "C" (always project)
    scaling: str = "none"  # residual scaling of F(x): "none", "fixed" (alpha) or "learnable"
    alpha: float = 1.0  # fixed multiplier of F(x) when scaling == "fixed"
    alpha_init: float = 0.0  # initial learnable multiplier (ReZero/SkipInit) when scaling == "learnable"
    zero_init_last: bool = False  # zero the last norm (or conv) of F so every block starts as S(x)
    stochastic_depth: float = 0.0  # drop probability of the last block; earlier blocks scale linearly

    def __post_init__(self) -> None:
        _choice("kind", self.kind, KINDS)
        _choice("order", self.order, ORDERS)
        _choice("norm", self.norm, NORMS)
        _choice("act", self.act, ACTIVATIONS)
        _choice("shortcut", self.shortcut, SHORTCUTS)
        _choice("scaling", self.scaling, SCALINGS)
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")
        if not 0.0 <= self.stochastic_depth < 1.0:
            raise ValueError(f"stochastic_depth must be in [0, 1), got {self.stochastic_depth}")
        if self.order == "bn_after_add" and self.norm == "none":
            raise ValueError("order='bn_after_add' needs a norm after the addition; pick norm 'batch' or 'group'")

    @property
    def expansion(self) -> int:
        return 4 if self.kind == "bottleneck" else 1


@dataclass(frozen=True, kw_only=True)
class NetConfig:
    """A whole residual net: stem, stages of blocks, pooled linear head."""

    style: str = "cifar"  # "cifar" (6n+2 / 9n+2 layers, 3 stages) or "imagenet" (18/34/50/101/152)
    depth: int = 20  # number of weighted layers, as in the papers' names (ResNet-20, ResNet-50)
    width: int = 16  # channels of the first stage; later stages double it
    num_classes: int = 10
    in_channels: int = 3
    input_size: int = 32  # square input side in pixels
    block: BlockConfig = field(default_factory=BlockConfig)
    skips: tuple[bool, ...] = ()  # per-block skip flags at build time; () means all on

    def __post_init__(self) -> None:
        if isinstance(self.block, dict):  # built from JSON
            object.__setattr__(self, "block", BlockConfig(**self.block))
        object.__setattr__(self, "skips", tuple(bool(s) for s in self.skips))
        _choice("style", self.style, STYLES)
        for name in ("width", "num_classes", "in_channels", "input_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self._check_depth()
        if self.skips and len(self.skips) != self.num_blocks:
            raise ValueError(f"skips has {len(self.skips)} flags but the net has {self.num_blocks} blocks")
        stride = self.total_stride
        if self.input_size < stride or self.input_size % stride:
            raise ValueError(
                f"input_size={self.input_size} cannot take this net's total stride {stride}: "
                f"use a multiple of {stride} (e.g. {max(stride, self.input_size // stride * stride)})"
            )

    def _check_depth(self) -> None:
        if self.style == "imagenet":
            if self.depth not in IMAGENET_STAGES:
                raise ValueError(f"imagenet-style depth must be one of {sorted(IMAGENET_STAGES)}, got {self.depth}")
            if IMAGENET_STAGES[self.depth][0] != self.block.kind:
                raise ValueError(f"ResNet-{self.depth} uses {IMAGENET_STAGES[self.depth][0]} blocks, not {self.block.kind}")
            return
        per = 9 if self.block.kind == "bottleneck" else 6
        if self.depth < per + 2 or (self.depth - 2) % per:
            raise ValueError(
                f"cifar-style {self.block.kind} depth must be {per}n+2 with n >= 1 "
                f"(e.g. {per + 2}, {2 * per + 2}, {3 * per + 2}), got {self.depth}"
            )

    @property
    def stage_blocks(self) -> tuple[int, ...]:
        if self.style == "imagenet":
            return IMAGENET_STAGES[self.depth][1]
        n = (self.depth - 2) // (9 if self.block.kind == "bottleneck" else 6)
        return (n, n, n)

    @property
    def stage_widths(self) -> tuple[int, ...]:
        return tuple(self.width * 2**i for i in range(len(self.stage_blocks)))

    @property
    def num_blocks(self) -> int:
        return sum(self.stage_blocks)

    @property
    def total_stride(self) -> int:
        stem = 4 if self.style == "imagenet" else 1  # 7x7/2 conv + 3x3/2 max-pool
        return stem * 2 ** (len(self.stage_blocks) - 1)

    @property
    def skip_flags(self) -> tuple[bool, ...]:
        return self.skips or (True,) * self.num_blocks

    @property
    def is_plain(self) -> bool:
        return not any(self.skip_flags)

    def plain_twin(self) -> NetConfig:
        """The same net with every skip connection off (He et al.'s plain baseline)."""
        return replace(self, skips=(False,) * self.num_blocks)

    def residual_twin(self) -> NetConfig:
        return replace(self, skips=())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skips"] = list(self.skips)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetConfig:
        return _from_dict(cls, d)

    @classmethod
    def from_json(cls, text: str) -> NetConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(d)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings for one run."""

    optimizer: str = "sgd"  # "sgd" (momentum 0.9, nesterov) or "adamw"
    lr: float = 0.1
    weight_decay: float = 5e-4
    decay_all: bool = False  # weight decay on every parameter (He et al. 2016), not only on conv/linear weights
    schedule: str = "onecycle"  # "cosine", "onecycle" or "constant"
    epochs: float = 3.0  # may be fractional
    batch_size: int = 128
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "auto"  # "auto" picks cuda, then mps, then cpu
    channels_last: bool = True
    probe_every: int = 10  # steps between instrument readings (0 turns instruments off)
    eval_every: int = 0  # steps between test evaluations (0: once per epoch)
    max_steps: int = 0  # stop after this many steps (0: no cap)
    momentum: float = 0.9  # SGD (Nesterov) momentum; AdamW uses it as beta1
    augment: bool = False  # random crop (padding input_size // 8) + horizontal flip of each training batch

    def __post_init__(self) -> None:
        _choice("optimizer", self.optimizer, ("sgd", "adamw"))
        _choice("schedule", self.schedule, ("cosine", "onecycle", "constant"))
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        for name in ("probe_every", "eval_every", "max_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, d)


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    d = dict(d)
    if cls is NetConfig and isinstance(d.get("block"), dict):
        d["block"] = _from_dict(BlockConfig, d["block"])
    if "skips" in d:
        d["skips"] = tuple(d["skips"])
    try:
        return cls(**d)
    except TypeError as e:
        raise ValueError(f"bad {cls.__name__}: {e}") from None
