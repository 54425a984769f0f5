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
from resviz.storage.rundirs import CONFIG, METRICS, SUMMARY, MetricsLog, RunData, write_json
from resviz.train import distributed
from resviz.train.records import StepRecord, curves, history_of, plot_table
from resviz.train.trainer import Trainer, build_nets


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


def step_records(run: RunData) -> list[StepRecord]:
    """The training steps of a loaded run directory (``metrics.jsonl`` of this or an earlier version)."""
    return [StepRecord.from_json(line) for line in run.metrics if "step" in line]


def train_to_dir(spec: RunSpec, out: str | Path, *, progress: Callable[[StepRecord], None] | None = None) -> dict[str, Any]:
    """Train ``spec`` and write the run directory; returns the summary (also ``summary.json``).

    Args:
        spec: what to train.
        out: the run directory (created; rank 0 only).
        progress: called with each step's record (on every rank).
    """
    out, info = Path(out), distributed.current()
    data = load_dataset(spec.dataset, input_size=spec.net.input_size, train_size=spec.train_size,
                        test_size=spec.test_size, seed=spec.train.seed)
    net_cfg = replace(spec.net, num_classes=data.num_classes, in_channels=data.channels)
    nets = build_nets(net_cfg, twin=spec.twin, seed=spec.train.seed)
    make = distributed.DistributedTrainer if info.enabled else Trainer
    trainer = make(nets, data, spec.train, probes=False)
    records: list[StepRecord] = []
    log = MetricsLog(out / METRICS) if info.is_main else None
    try:
        if log is not None:
            write_json(out / CONFIG, {"kind": "train", **replace(spec, net=net_cfg).to_dict(), "world_size": info.world_size})
        for rec in trainer.steps():
            records.append(rec)
            if log is not None:
                log.write(rec.to_json())
            if progress is not None:
                progress(rec)
    finally:
        if log is not None:
            log.close()
    last = next((r for r in reversed(records) if r.nets), None)
    summary = {"status": str(trainer.status), "message": trainer.message, "steps": trainer.step,
               "world_size": info.world_size,
               "final": {name: m.as_dict() for name, m in last.nets.items()} if last is not None else {}}
    if info.is_main:
        _save_outputs(out, trainer, data, records, summary)
    return summary


def _save_outputs(out: Path, trainer: Trainer, data: Any, records: list[StepRecord], summary: dict[str, Any]) -> None:
    for name, net in trainer.nets.items():
        net = distributed.unwrap(net).cpu().eval()
        save_checkpoint(net, out / name, dataset=data, metrics={"role": name, **summary["final"].get(name, {})})
    write_json(out / SUMMARY, summary)
    table = plot_table(curves(history_of(records)))
    plots.training_curves_figure(table).write_html(out / "training_curves.html", include_plotlyjs="directory")
