"""Compact URL query parameters for :class:`NetConfig` and :class:`TrainConfig`.

A link should reproduce what someone sees, so the app mirrors its configuration into the query
string. Only fields that differ from a *base* config are written (the app passes its own defaults),
with short keys such as ``d=56&w=8&o=pre``. Decoding validates every value and raises ``ValueError``
with a message fit for a short warning; unknown keys are ignored so other features can add theirs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

from resviz.config import BlockConfig, NetConfig, TrainConfig

# url key -> field name. Block fields and net fields share one flat namespace.
NET_KEYS: dict[str, str] = {
    "st": "style", "d": "depth", "w": "width", "nc": "num_classes", "ic": "in_channels", "r": "input_size",
}
BLOCK_KEYS: dict[str, str] = {
    "k": "kind", "o": "order", "n": "norm", "g": "groups", "a": "act", "sc": "shortcut", "rs": "scaling",
    "al": "alpha", "ai": "alpha_init", "z": "zero_init_last", "sd": "stochastic_depth",
}
SKIPS_KEY = "off"  # blocks whose skip connection is off, e.g. "0-3,7"
# What a shared link may ask for: enough for every experiment the app offers, small enough that a
# crafted URL cannot make the server build a net that takes minutes or gigabytes.
LIMITS = {"depth": 218, "width": 128, "input_size": 256, "num_classes": 1000, "in_channels": 4, "groups": 64}
TRAIN_KEYS: dict[str, str] = {
    "opt": "optimizer", "lr": "lr", "wd": "weight_decay", "sch": "schedule", "ep": "epochs",
    "bs": "batch_size", "seed": "seed", "dev": "device",
}


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _parse(name: str, text: str, like: Any) -> Any:
    """Parse ``text`` as the type of the default value ``like``."""
    try:
        if isinstance(like, bool):
            if text not in ("0", "1", "true", "false"):
                raise ValueError
            return text in ("1", "true")
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            value = float(text)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError
            return value
    except ValueError:
        raise ValueError(f"URL parameter for {name!r} has a bad value {text!r}") from None
    return text


def format_indices(indices: list[int]) -> str:
    """Sorted block indices as compact ranges: [0, 1, 2, 5] -> "0-2,5"."""
    out, idx = [], sorted(set(indices))
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(out)


def parse_indices(text: str) -> list[int]:
    """Inverse of :func:`format_indices`; raises ``ValueError`` on malformed text."""
    result: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"URL parameter 'off' has a bad block range {part!r}")
        a, b = int(lo), int(hi or lo)
        if b < a or b - a > 10_000:
            raise ValueError(f"URL parameter 'off' has a bad block range {part!r}")
        result.extend(range(a, b + 1))
    return result


def check_limits(cfg: NetConfig) -> None:
    """Raise ``ValueError`` if ``cfg`` is bigger than the app allows (see ``LIMITS``)."""
    for name, cap in LIMITS.items():
        value = getattr(cfg.block if name == "groups" else cfg, name)
        if value > cap:
            raise ValueError(f"{name}={value} is above this app's limit of {cap}")


def encode_net(cfg: NetConfig, base: NetConfig | None = None) -> dict[str, str]:
    """Query parameters for the fields of ``cfg`` that differ from ``base``."""
    base = base or NetConfig()
    out = {k: _fmt(getattr(cfg, f)) for k, f in NET_KEYS.items() if getattr(cfg, f) != getattr(base, f)}
    out |= {k: _fmt(getattr(cfg.block, f)) for k, f in BLOCK_KEYS.items() if getattr(cfg.block, f) != getattr(base.block, f)}
    off = [i for i, s in enumerate(cfg.skip_flags) if not s]
    if off:
        out[SKIPS_KEY] = format_indices(off)
    return out


def decode_net(params: Mapping[str, str], base: NetConfig | None = None) -> NetConfig:
    """The config the query parameters describe, starting from ``base``; ``ValueError`` if invalid."""
    base = base or NetConfig()
    block_kw = {f: _parse(f, str(params[k]), getattr(base.block, f)) for k, f in BLOCK_KEYS.items() if k in params}
    net_kw = {f: _parse(f, str(params[k]), getattr(base, f)) for k, f in NET_KEYS.items() if k in params}
    block = BlockConfig(**(base.block.__dict__ | block_kw))
    cfg = NetConfig(**({f.name: getattr(base, f.name) for f in fields(NetConfig)} | net_kw | {"block": block, "skips": ()}))
    if params.get(SKIPS_KEY):
        off = set(parse_indices(str(params[SKIPS_KEY])))
        if max(off) >= cfg.num_blocks:
            raise ValueError(f"URL parameter 'off' names block {max(off)} but the net has {cfg.num_blocks} blocks")
        cfg = replace(cfg, skips=tuple(i not in off for i in range(cfg.num_blocks)))
    check_limits(cfg)
    return cfg


def encode_train(cfg: TrainConfig, base: TrainConfig | None = None) -> dict[str, str]:
    """Query parameters for the training fields of ``cfg`` that differ from ``base``."""
    base = base or TrainConfig()
    return {k: _fmt(getattr(cfg, f)) for k, f in TRAIN_KEYS.items() if getattr(cfg, f) != getattr(base, f)}


def decode_train(params: Mapping[str, str], base: TrainConfig | None = None) -> TrainConfig:
    """The training config the query parameters describe, starting from ``base``; ``ValueError`` if invalid."""
    base = base or TrainConfig()
    kw = {f: _parse(f, str(params[k]), getattr(base, f)) for k, f in TRAIN_KEYS.items() if k in params}
    return replace(base, **kw)
