"""Residual blocks and the nets built from them (config -> module), plus the block's equation."""

from resviz.nn.blocks import ResidualBlock
from resviz.nn.models import ResNet, build_net, count_macs, count_params, from_torchvision, plain_twin

__all__ = ["ResNet", "ResidualBlock", "build_net", "count_macs", "count_params", "from_torchvision", "plain_twin"]
