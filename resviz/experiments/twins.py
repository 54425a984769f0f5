"""Trained residual/plain twins for the studies: brief lockstep training, an in-process cache, shipped pairs.

Trained twins are kept in a small in-process cache: studies that need the same pair (the degradation
sweep's depths are the lesion, landscape, responses and faithfulness studies' nets) train it once per
process, and a run gives the same result whether the pair came from the cache or not.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from resviz.config import NetConfig
from resviz.data.datasets import DatasetBundle
from resviz.experiments.common import Progress, Schedule
from resviz.train.records import HistoryRecorder, StepRecord, curves
from resviz.train.trainer import Trainer, build_nets


@dataclass
class Twins:
    """A trained residual net and its plain twin, with their training-loss curves."""

    nets: dict[str, nn.Module]  # "residual", "plain"; eval mode, on the CPU
    curves: dict[str, list[float]]  # training loss, one point per step
    status: str  # "finished", "diverged" or "pretrained"
    message: str = ""
    source: str = "trained"  # "trained (N steps)" or "pretrained: <names>"
    logs: dict[str, dict[str, list[float]]] | None = None  # shipped pairs: each net's training log from the manifest
    accuracy: dict[str, float] | None = None  # shipped pairs: each net's test accuracy from the manifest
    shipped: tuple[str, ...] = ()  # shipped pairs: the checkpoint names, residual first; none when trained here


_CACHE: OrderedDict[str, tuple[dict, dict, str, str, str]] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 8  # the degradation sweep's five depths plus the other studies' pairs


def clear_cache() -> None:
    """Forget every trained pair kept in this process."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _cache_key(net_cfg: NetConfig, data: DatasetBundle, sched: Schedule, seed: int, device: str) -> str:
    x = data.train.tensors[0]
    return f"{net_cfg.to_json()}|{data.name}|{tuple(x.shape)}|{len(data.test)}|{float(x[:8].sum()):.6g}|{sched}|{seed}|{device}"


def train_twins(net_cfg: NetConfig, data: DatasetBundle, sched: Schedule, *, seed: int, device: str = "cpu",
                progress: Progress | None = None) -> Twins:
    """Train ``net_cfg``'s residual net and its plain twin in lockstep (same init, same batches)."""
    progress = progress or Progress()
    key = _cache_key(net_cfg, data, sched, seed, device)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
    if hit is not None:
        progress(1.0, f"ResNet-{net_cfg.depth} twins already trained")
        return _rebuild(net_cfg, *hit)
    trainer = Trainer(build_nets(net_cfg, seed=seed), data, sched.train_config(seed, device), probes=False)
    losses = _loss_curves(trainer, lambda rec: progress(
        rec.step / trainer.total_steps, f"ResNet-{net_cfg.depth} vs plain-{net_cfg.depth}: step {rec.step}"))
    loss_curves = {"residual": losses.get("residual", []), "plain": losses.get("plain", [])}
    nets = {k: n.cpu().eval() for k, n in trainer.nets.items()}
    states = {k: {n: t.detach().clone() for n, t in net.state_dict().items()} for k, net in nets.items()}
    source = f"trained ({trainer.step} steps)"
    with _CACHE_LOCK:
        _CACHE[key] = (states, loss_curves, str(trainer.status), trainer.message, source)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return Twins(nets=nets, curves=loss_curves, status=str(trainer.status), message=trainer.message, source=source)


def _loss_curves(trainer: Trainer, report: Callable[[StepRecord], None]) -> dict[str, list[float]]:
    """Train to the end, calling ``report`` after each step; each net's training loss, one point per step."""
    history = HistoryRecorder(cap=None)
    for rec in trainer.steps():
        history.add(rec)
        report(rec)
    return {c.net: c.values.astype(float).tolist() for c in curves(history.history()) if c.metric == "loss"}


def train_one(net: nn.Module, data: DatasetBundle, sched: Schedule, *, seed: int, device: str = "cpu",
              progress: Progress | None = None, label: str = "net") -> tuple[list[float], str, str]:
    """Train one net in place (no twin, no cache); returns its loss per step, the status and any message."""
    progress = progress or Progress()
    trainer = Trainer({label: net}, data, sched.train_config(seed, device), probes=False)
    losses = _loss_curves(trainer, lambda rec: progress(rec.step / trainer.total_steps, f"{label}: step {rec.step}"))
    net.cpu().eval()
    return losses.get(label, []), str(trainer.status), trainer.message


def _rebuild(net_cfg: NetConfig, states: dict, curves: dict, status: str, message: str, source: str) -> Twins:
    with torch.random.fork_rng(devices=[]):  # building must not move the caller's global RNG
        nets = build_nets(net_cfg, seed=0)
    for name, net in nets.items():
        net.load_state_dict(states[name])
        net.eval()
    return Twins(nets=nets, curves={k: list(v) for k, v in curves.items()}, status=status, message=message, source=source)


def _shipped_on_shapes(input_size: int) -> list[tuple[Any, NetConfig]]:
    """The shipped nets (``pretrained/manifest.json``) trained on shapes at ``input_size`` px, with their configs."""
    from resviz.storage.checkpoints import CheckpointError, read_meta
    from resviz.zoo import shipped_models

    try:
        models = shipped_models()
    except CheckpointError:
        return []
    out = []
    for m in models:
        try:
            meta = read_meta(m.path)
            cfg = NetConfig.from_dict(meta["net"])
        except (CheckpointError, ValueError, KeyError):
            continue
        ds = meta.get("dataset") or {}
        if ds.get("name") == "shapes" and ds.get("input_size") == input_size:
            out.append((m, cfg))
    return out


def pretrained_twins(net_cfg: NetConfig, input_size: int) -> Twins | None:
    """A shipped residual/plain pair (``pretrained/manifest.json``) with exactly this architecture, if any."""
    from resviz.storage.checkpoints import load_checkpoint

    found: dict[str, tuple[str, Any]] = {}  # role -> (name, ShippedModel)
    for m, cfg in _shipped_on_shapes(input_size):
        if cfg.residual_twin() != net_cfg.residual_twin():
            continue
        role = "plain" if cfg.is_plain else "residual" if all(cfg.skip_flags) else None
        if role is not None:
            found.setdefault(role, (m.name, m))
    if "residual" not in found or "plain" not in found:
        return None
    nets = {k: load_checkpoint(found[k][1].path)[0].eval() for k in ("residual", "plain")}
    shipped = tuple(found[k][0] for k in ("residual", "plain"))
    logs = {k: {n: list(v) for n, v in found[k][1].log.items()} for k in found if found[k][1].log}
    accuracy = {k: found[k][1].accuracy for k in found if found[k][1].accuracy is not None}
    return Twins(nets=nets, curves={}, status="pretrained", source=f"pretrained: {', '.join(shipped)}",
                 logs=logs or None, accuracy=accuracy or None, shipped=shipped)


def pretrained_net(net_cfg: NetConfig, input_size: int) -> tuple[nn.Module, Any] | None:
    """A shipped net of exactly this architecture (skips included) on shapes at ``input_size`` px, in eval mode,
    with its manifest entry (a :class:`resviz.zoo.ShippedModel`), if there is one (the manifest's first, if several)."""
    from resviz.storage.checkpoints import load_checkpoint

    for m, cfg in _shipped_on_shapes(input_size):
        if cfg == net_cfg:
            return load_checkpoint(m.path)[0].eval(), m
    return None


def reference_twins(net_cfg: NetConfig, data: DatasetBundle, sched: Schedule, *, seed: int, source: str, device: str,
                    progress: Progress | None = None) -> Twins:
    """The trained pair a study inspects: shipped checkpoints when ``source`` allows and they match, else trained."""
    if source not in ("auto", "train", "pretrained"):
        raise ValueError(f"source must be 'auto', 'train' or 'pretrained', got {source!r}")
    if source != "train":
        twins = pretrained_twins(net_cfg, data.input_size)
        if twins is not None:
            return twins
        if source == "pretrained":
            raise ValueError(f"no shipped residual/plain pair matches ResNet-{net_cfg.depth} width {net_cfg.width} "
                             f"at {data.input_size}px; run `python -m resviz pretrained` or use source 'train'")
    return train_twins(net_cfg, data, sched, seed=seed, device=device, progress=progress)
