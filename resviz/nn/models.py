"""Build residual nets from a :class:`NetConfig`, convert torchvision ResNets, count params and MACs."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

from resviz.config import IMAGENET_STAGES, PRE_ORDERS, BlockConfig, NetConfig
from resviz.nn import merge
from resviz.nn.blocks import ResidualBlock, make_act, make_norm


class ResNet(nn.Module):
    """Stem -> residual blocks -> (final norm-act for pre-activation) -> global pool -> linear.

    ``blocks`` lists every :class:`ResidualBlock` in order; ``stage_of[i]`` is block i's stage.
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        b = cfg.block
        if cfg.style == "imagenet":
            conv = nn.Conv2d(cfg.in_channels, cfg.width, 7, stride=2, padding=3, bias=False)
            self.stem = nn.Sequential(
                OrderedDict(conv=conv, norm=make_norm(b.norm, cfg.width, b.groups), act=make_act(b.act), pool=nn.MaxPool2d(3, 2, 1))
            )
        else:
            conv = nn.Conv2d(cfg.in_channels, cfg.width, 3, padding=1, bias=False)
            self.stem = nn.Sequential(OrderedDict(conv=conv, norm=make_norm(b.norm, cfg.width, b.groups), act=make_act(b.act)))
        blocks, self.stage_of = [], []
        cin, skips, n = cfg.width, cfg.skip_flags, cfg.num_blocks
        for stage, (count, planes) in enumerate(zip(cfg.stage_blocks, cfg.stage_widths, strict=True)):
            for j in range(count):
                i = len(blocks)
                stride = 2 if (stage > 0 and j == 0) else 1
                drop = b.stochastic_depth * (i + 1) / n  # linear decay rule (Huang et al. 2016)
                blocks.append(ResidualBlock(b, cin, planes, stride, drop_prob=drop, skip=skips[i]))
                self.stage_of.append(stage)
                cin = planes * b.expansion
        self.blocks = nn.ModuleList(blocks)
        self.num_features = cin
        if b.order in PRE_ORDERS:  # pre-activation nets end with the norm-act the last block left out
            self.head = nn.Sequential(OrderedDict(norm=make_norm(b.norm, cin, b.groups), act=make_act(b.act)))
        else:
            self.head = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            if blk.cfg.zero_init_last:
                blk.zero_init_last()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, width, H', W')
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)  # (B, C, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)  # (B, C)
        return self.fc(x)  # (B, num_classes)

    # -- skip and lesion controls (the flags live on the blocks' merges: resviz.nn.merge) ----
    def set_skips(self, flags: bool | Iterable[bool]) -> None:
        """Turn skip connections on/off: one flag for all blocks or one per block."""
        merge.set_skips(self, flags)

    def set_removed(self, removed: Iterable[int]) -> None:
        """Remove the residual branch of the given block indices at inference (others restored)."""
        merge.set_removed(self, removed)

    @property
    def skips(self) -> tuple[bool, ...]:
        return merge.skips(self)


def build_net(cfg: NetConfig) -> ResNet:
    """Build the residual net (or plain net, if its skips are off) that ``cfg`` describes."""
    if not isinstance(cfg, NetConfig):
        raise TypeError(f"build_net expects a NetConfig, got {type(cfg).__name__}")
    return ResNet(cfg)


def plain_twin(net: ResNet, *, same_weights: bool = False) -> ResNet:
    """A net with the same layers as ``net`` and every skip connection off (He et al.'s plain baseline).

    Freshly initialised, or with ``same_weights`` a copy of ``net``'s weights, so that the pair differs
    only in its skip connections (how the app and the studies pair a net with its twin).
    """
    twin = build_net(net.cfg.plain_twin())
    if same_weights:
        twin.load_state_dict(net.state_dict())
    return twin


def count_params(net: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(net: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass for a single input of shape (C, H, W)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() * m.in_features

    handles = []
    try:
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                handles.append(m.register_forward_hook(conv_hook))
            elif isinstance(m, nn.Linear):
                handles.append(m.register_forward_hook(linear_hook))
        was_training = net.training
        net.eval()
        try:
            p = next(net.parameters())
            net(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
        finally:
            net.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return total


# -- torchvision ---------------------------------------------------------------------------------
_TV_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")


def _tv_key(key: str, offsets: list[int]) -> str:
    """Map a torchvision ResNet state-dict key to the ResViz key."""
    if key.startswith(("conv1.", "bn1.")):
        return ("stem.conv." if key.startswith("conv1.") else "stem.norm.") + key.split(".", 1)[1]
    if key.startswith("fc."):
        return key
    m = _TV_BLOCK.match(key)
    if not m:
        raise KeyError(key)
    stage, idx, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
    i = offsets[stage] + idx
    rest = re.sub(r"^bn(\d)\.", r"norm\1.", rest)
    rest = re.sub(r"^downsample\.0\.", "conv.", rest)
    rest = re.sub(r"^downsample\.1\.", "norm.", rest)
    prefix = "shortcut." if rest.startswith(("conv.", "norm.")) else "branch."
    return f"blocks.{i}.{prefix}{rest}"


def from_torchvision(model: nn.Module) -> ResNet:
    """Convert a torchvision ResNet (BasicBlock or Bottleneck) into a ResViz net with the same weights.

    The result computes the same function (eval mode) and exposes ``blocks``, skip flags and taps.
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.models.resnet import ResNet as TVResNet

    if not isinstance(model, TVResNet):
        raise TypeError(f"from_torchvision expects a torchvision ResNet, got {type(model).__name__}")
    counts = tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5))
    first = model.layer1[0]
    kind = "bottleneck" if isinstance(first, Bottleneck) else "basic"
    if not isinstance(first, (BasicBlock, Bottleneck)):
        raise TypeError(f"unsupported block type {type(first).__name__}")
    if kind == "bottleneck" and (first.conv2.groups != 1 or first.conv1.out_channels * 4 != first.conv3.out_channels):
        raise ValueError("grouped or wide bottlenecks (ResNeXt, Wide ResNet) are not supported")
    depth = next((d for d, (k, c) in IMAGENET_STAGES.items() if k == kind and c == counts), None)
    if depth is None:
        raise ValueError(f"no ResViz depth matches {kind} blocks {counts}")
    cfg = NetConfig(
        style="imagenet", depth=depth, width=model.conv1.out_channels, num_classes=model.fc.out_features,
        in_channels=model.conv1.in_channels, input_size=224, block=BlockConfig(kind=kind, shortcut="B"),
    )
    net = build_net(cfg)
    offsets = [sum(counts[:s]) for s in range(4)]
    sd = {_tv_key(k, offsets): v for k, v in model.state_dict().items()}
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"weight mapping failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return net.train(model.training)

