"""Training: the Trainer (an iterator of step records), its loops, headless runs and DDP helpers."""

from resviz.train.trainer import FitResult, Trainer, build_nets, evaluate, fit, resolve_device

__all__ = ["FitResult", "Trainer", "build_nets", "evaluate", "fit", "resolve_device"]
