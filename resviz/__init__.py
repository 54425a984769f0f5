"""ResViz: see why residual networks work.

The library never imports streamlit; everything the app shows is computed here.
"""

from resviz.analysis.probes import Activations, BranchMagnitudes, GradientFlow, LiveProbes, SignalProp
from resviz.config import BlockConfig, NetConfig, TrainConfig
from resviz.data.datasets import DatasetBundle, DatasetUnavailable, load_dataset
from resviz.nn.blocks import ResidualBlock
from resviz.nn.models import ResNet, build_net, count_macs, count_params, from_torchvision, plain_twin

__all__ = [
    "Activations",
    "BranchMagnitudes",
    "DatasetBundle",
    "DatasetUnavailable",
    "GradientFlow",
    "LiveProbes",
    "SignalProp",
    "load_dataset",
    "BlockConfig",
    "NetConfig",
    "ResNet",
    "ResidualBlock",
    "TrainConfig",
    "build_net",
    "count_macs",
    "count_params",
    "from_torchvision",
    "plain_twin",
]
__version__ = "0.1.0"
