"""ResViz: see why residual networks work.

The library never imports streamlit; everything the app shows is computed here.
"""

from .blocks import ResidualBlock
from .config import BlockConfig, NetConfig, TrainConfig
from .data import DatasetBundle, DatasetUnavailable, load_dataset
from .models import ResNet, build_net, count_macs, count_params, from_torchvision, plain_twin
from .probes import Activations, BranchMagnitudes, GradientFlow, LiveProbes, SignalProp

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
