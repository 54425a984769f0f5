"""ResViz: see why residual networks work.

The library never imports streamlit; everything the app shows is computed here. What a script usually
needs is importable from here: configs, nets and their plain twins, data, training, checkpoints,
probes and the per-image inspection.
"""

from resviz.analysis.inspection import Inspection, Lesion, explain, inspect_image
from resviz.analysis.probes import Activations, BranchMagnitudes, GradientFlow, LiveProbes, SignalProp
from resviz.analysis.watch import MergeReading, Watch, WatchRecord, watch
from resviz.config import BlockConfig, NetConfig, TrainConfig
from resviz.data.datasets import DatasetBundle, DatasetUnavailable, load_dataset
from resviz.data.preprocess import Normalization
from resviz.nn.blocks import ResidualBlock
from resviz.nn.discovery import MergeInfo, ResidualMap, TraceError, discover, residualize
from resviz.nn.merge import Merge, junctions, merges
from resviz.nn.models import ResNet, build_net, count_macs, count_params, from_torchvision, plain_twin
from resviz.storage.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from resviz.train import FitResult, Trainer, evaluate, fit
from resviz.version import __version__

__all__ = [
    "Activations",
    "BlockConfig",
    "BranchMagnitudes",
    "CheckpointError",
    "DatasetBundle",
    "DatasetUnavailable",
    "FitResult",
    "GradientFlow",
    "Inspection",
    "Lesion",
    "LiveProbes",
    "Merge",
    "MergeInfo",
    "MergeReading",
    "NetConfig",
    "Normalization",
    "ResNet",
    "ResidualBlock",
    "ResidualMap",
    "SignalProp",
    "TraceError",
    "TrainConfig",
    "Trainer",
    "Watch",
    "WatchRecord",
    "build_net",
    "count_macs",
    "count_params",
    "discover",
    "evaluate",
    "explain",
    "fit",
    "from_torchvision",
    "inspect_image",
    "junctions",
    "load_checkpoint",
    "load_dataset",
    "merges",
    "plain_twin",
    "residualize",
    "save_checkpoint",
    "watch",
    "__version__",
]
