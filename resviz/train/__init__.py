"""Training: the Trainer (an iterator of typed step records), its loops, headless runs and DDP helpers.

Imports run one way: ``trainer`` -> ``loops``/``cuda_graphs`` -> ``state`` -> ``records``.
"""

from resviz.train.records import Curve, History, JobSnapshot, NetMetrics, Status, StepRecord, curves
from resviz.train.trainer import FitResult, Trainer, build_nets, evaluate, fit, resolve_device

__all__ = ["Curve", "FitResult", "History", "JobSnapshot", "NetMetrics", "Status", "StepRecord", "Trainer",
           "build_nets", "curves", "evaluate", "fit", "resolve_device"]
