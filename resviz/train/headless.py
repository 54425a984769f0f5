"""Headless training into a run directory (``python -m resviz train``), alone or under torchrun.

The run directory gets ``config.json`` (what was run), ``metrics.jsonl`` (one flushed line per step),
a checkpoint per net (``residual``/``plain`` ``.safetensors`` + ``.json``), ``summary.json`` and
``training_curves.html``. Under torchrun (see :mod:`resviz.train.distributed`) every rank trains its slice of
each global batch and only rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from resviz import plots
from resviz.config import NetConfig, TrainConfig
from resviz.data.datasets import load_dataset
from resviz.storage.checkpoints import save_checkpoint
from resviz.storage.rundirs import CONFIG, METRICS, SUMMARY, MetricsLog, write_json
from resviz.train import distributed
from resviz.train.trainer import Trainer, build_nets

METRIC_KEYS = ("loss", "acc", "grad_norm", "param_norm", "test_loss", "test_acc")


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Everything a headless training run needs; round-trips through JSON (see :meth:`to_dict`)."""

    net: NetConfig
    train: TrainConfig
    dataset: str = "shapes"  # a resviz.data.datasets dataset name
    train_size: int | None = None  # None: the dataset's default
    test_size: int | None = None
    twin: bool = True  # also train the plain twin in lockstep

    def to_dict(self) -> dict[str, Any]:
        return {"net": self.net.to_dict(), "train": self.train.to_dict(),
                "data": {"name": self.dataset, "train_size": self.train_size, "test_size": self.test_size},
                "twin": self.twin}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        """From ``{"net": {...}, "train": {...}, "data": {"name", "train_size", "test_size"}, "twin": bool}``."""
        unknown = sorted(set(d) - {"net", "train", "data", "twin", "kind", "world_size"})
        if unknown:
            raise ValueError(f"unknown run config section(s): {', '.join(unknown)}")
        data = dict(d.get("data") or {})
        bad = sorted(set(data) - {"name", "train_size", "test_size"})
        if bad:
            raise ValueError(f"unknown data field(s): {', '.join(bad)}")
        return cls(net=NetConfig.from_dict(d.get("net") or {}), train=TrainConfig.from_dict(d.get("train") or {}),
                   dataset=str(data.get("name") or "shapes"), train_size=data.get("train_size"),
                   test_size=data.get("test_size"), twin=bool(d.get("twin", True)))


def flat_record(rec: dict[str, Any]) -> dict[str, Any]:
    """The JSON line of one trainer record: scalars only (instrument readings are left out)."""
    out = {k: rec[k] for k in ("step", "total_steps", "epoch", "lr", "images_per_s", "time_s", "status", "message") if k in rec}
    out["nets"] = {name: {k: m[k] for k in METRIC_KEYS if k in m} for name, m in rec.get("nets", {}).items()}
    return out


def _history(records: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per net: train and test curves in the form :func:`resviz.plots.training_curves_figure` takes."""
    hist: dict[str, dict[str, list[float]]] = {}
    for rec in records:
        for name, m in rec.get("nets", {}).items():
            h = hist.setdefault(name, {k: [] for k in ("step", "loss", "acc", "test_step", "test_loss", "test_acc")})
            h["step"].append(rec["step"])
            h["loss"].append(m.get("loss"))
            h["acc"].append(m.get("acc"))
            if "test_acc" in m:
                h["test_step"].append(rec["step"])
                h["test_loss"].append(m.get("test_loss"))
                h["test_acc"].append(m["test_acc"])
    return hist


def train_to_dir(spec: RunSpec, out: str | Path, *, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``spec`` and write the run directory; returns the summary (also ``summary.json``).

    Args:
        spec: what to train.
        out: the run directory (created; rank 0 only).
        progress: called with each step's flat record (on every rank).
    """
    out, info = Path(out), distributed.current()
    data = load_dataset(spec.dataset, input_size=spec.net.input_size, train_size=spec.train_size,
                        test_size=spec.test_size, seed=spec.train.seed)
    net_cfg = replace(spec.net, num_classes=data.num_classes, in_channels=data.channels)
    nets = build_nets(net_cfg, twin=spec.twin, seed=spec.train.seed)
    make = distributed.DistributedTrainer if info.enabled else Trainer
    trainer = make(nets, data, spec.train, probes=False)
    records: list[dict[str, Any]] = []
    log = MetricsLog(out / METRICS) if info.is_main else None
    try:
        if log is not None:
            write_json(out / CONFIG, {"kind": "train", **replace(spec, net=net_cfg).to_dict(), "world_size": info.world_size})
        for rec in trainer.steps():
            flat = flat_record(rec)
            records.append(flat)
            if log is not None:
                log.write(flat)
            if progress is not None:
                progress(flat)
    finally:
        if log is not None:
            log.close()
    summary = {"status": trainer.status, "message": trainer.message, "steps": trainer.step,
               "world_size": info.world_size, "final": next((r["nets"] for r in reversed(records) if r.get("nets")), {})}
    if info.is_main:
        _save_outputs(out, trainer, data, records, summary)
    return summary


def _save_outputs(out: Path, trainer: Trainer, data: Any, records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    for name, net in trainer.nets.items():
        net = distributed.unwrap(net).cpu().eval()
        save_checkpoint(net, out / name, dataset=data, metrics={"role": name, **summary["final"].get(name, {})})
    write_json(out / SUMMARY, summary)
    plots.training_curves_figure(_history(records)).write_html(out / "training_curves.html", include_plotlyjs="directory")
