"""Residual blocks and the nets built from them (config -> module), their merges, and the block's equation."""

from resviz.nn.blocks import ResidualBlock
from resviz.nn.merge import Junction, Merge, junctions, merges
from resviz.nn.models import ResNet, build_net, count_macs, count_params, from_torchvision, plain_twin

__all__ = [
    "Junction", "Merge", "ResNet", "ResidualBlock", "build_net", "count_macs", "count_params", "from_torchvision",
    "junctions", "merges", "plain_twin",
]
