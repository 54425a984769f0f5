"""Blocks and networks: every variant builds and trains; oracles against a hand-written block and torchvision."""

import contextlib
import itertools
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from resviz import BlockConfig, NetConfig, build_net, count_macs, count_params, from_torchvision, plain_twin
from resviz.config import ACTIVATIONS, KINDS, NORMS, ORDERS, SHORTCUTS
from resviz.nn.blocks import ResidualBlock, ShortcutA, StridedConv1x1, conv1x1


def tiny(kind="basic", **block) -> NetConfig:
    return NetConfig(depth=11 if kind == "bottleneck" else 8, width=8, input_size=16, block=BlockConfig(kind=kind, **block))


def _valid(**block):
    try:
        return tiny(**block)
    except ValueError:
        return None


VARIANTS = [
    cfg
    for kind, order, norm, shortcut in itertools.product(KINDS, ORDERS, NORMS, SHORTCUTS)
    if (cfg := _valid(kind=kind, order=order, norm=norm, shortcut=shortcut)) is not None
]


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: f"{c.block.kind}-{c.block.order}-{c.block.norm}-{c.block.shortcut}")
def test_every_variant_builds_and_every_parameter_gets_a_gradient(cfg):
    torch.manual_seed(0)
    net = build_net(cfg)
    x = torch.randn(4, 3, 16, 16)
    y = net(x)
    assert y.shape == (4, 10)
    nn.functional.cross_entropy(y, torch.arange(4)).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert len(net.blocks) == cfg.num_blocks


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("scaling", ["none", "fixed", "learnable"])
def test_activations_and_scalings_train(act, scaling):
    net = build_net(tiny(act=act, scaling=scaling, alpha=0.3, stochastic_depth=0.2))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x, t = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), t)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    if scaling == "learnable":
        assert all(b.branch.scale.alpha.requires_grad for b in net.blocks)


def test_each_activation_is_its_own_module_and_nothing_is_in_place():
    net = build_net(NetConfig(depth=20))
    acts = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    assert len(acts) == len({id(m) for m in acts}) == 1 + 2 * 9  # stem + two per block
    assert not any(getattr(m, "inplace", False) for m in net.modules())


class ClassicBlock(nn.Module):
    """Independent reference: conv3x3(stride)-BN-ReLU-conv3x3-BN + (identity | 1x1 conv(stride)+BN), add, ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        return torch.relu(out + (x if self.proj is None else self.proj(x)))


@pytest.mark.parametrize("cin, cout, stride", [(8, 8, 1), (8, 8, 2), (8, 16, 1), (8, 16, 2)])
@pytest.mark.parametrize("train_mode", [False, True])
def test_default_basic_block_matches_hand_written_classic_block(cin, cout, stride, train_mode):
    torch.manual_seed(0)
    ref = ClassicBlock(cin, cout, stride)
    for m in ref.modules():  # non-trivial BN statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    blk = ResidualBlock(BlockConfig(), cin, cout, stride)
    pairs = [("branch.conv1", ref.c1), ("branch.norm1", ref.b1), ("branch.conv2", ref.c2), ("branch.norm2", ref.b2)]
    if ref.proj is not None:
        pairs += [("shortcut.conv", ref.proj[0]), ("shortcut.norm", ref.proj[1])]
    else:
        assert isinstance(blk.shortcut, nn.Identity)
    mods = dict(blk.named_modules())
    for name, src in pairs:
        mods[name].load_state_dict(src.state_dict())
    ref.train(train_mode)
    blk.train(train_mode)
    x = torch.randn(3, cin, 12, 12)
    torch.testing.assert_close(blk(x), ref(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("cin, size", [(2, 16), (4, 15), (7, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_strided_1x1_conv_equals_torchs_strided_conv_with_its_gradients(cin, size, channels_last):
    """The projection's strided 1x1 conv (subsample, then stride 1) computes nn.Conv2d(stride=2)'s output and gradients;
    its weight gradient at 4 input channels in channels-last is the case that corrupted the heap in oneDNN's strided kernel."""
    torch.manual_seed(0)
    ours, ref = conv1x1(cin, 2 * cin, stride=2), nn.Conv2d(cin, 2 * cin, 1, stride=2, bias=False)
    assert isinstance(ours, StridedConv1x1) and type(conv1x1(cin, cin)) is nn.Conv2d
    assert type(conv1x1(16, 32, stride=2)) is nn.Conv2d  # wide enough for torch's own strided kernel
    ref.load_state_dict(ours.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(8, cin, size, size).contiguous(memory_format=fmt)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = ours.to(memory_format=fmt)(xa)
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # the reference on torch's own kernels (mkldnn.flags() also warns about TF32)
    try:
        yb = ref(xb)
        (yb * yb.detach().sin()).sum().backward()
    finally:
        torch.backends.mkldnn.enabled = was
    (ya * ya.detach().sin()).sum().backward()
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_from_torchvision_matches_torchvision_logits(arch):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None).eval()
    for m in tv.modules():  # random BN statistics so the test does not pass by identity BN
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.8, 1.2)
            m.weight.data.uniform_(0.8, 1.2)
            m.bias.data.uniform_(-0.1, 0.1)
    net = from_torchvision(tv).eval()
    assert len(net.blocks) == (8 if arch == "resnet18" else 16)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(net(x), tv(x), atol=1e-5, rtol=0)
    assert count_params(net) == count_params(tv)


def test_from_torchvision_rejects_other_models():
    with pytest.raises(TypeError, match="torchvision ResNet"):
        from_torchvision(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ResNeXt"):
        from_torchvision(torchvision.models.resnext50_32x4d())


@pytest.mark.parametrize("depth, millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_cifar_parameter_counts_match_he_et_al_table_6(depth, millions):
    net = build_net(NetConfig(depth=depth, block=BlockConfig(shortcut="A")))
    assert round(count_params(net) / 1e6, 2 if depth < 110 else 1) == millions


def test_imagenet_resnet_parameter_counts_and_macs():
    net = build_net(NetConfig(style="imagenet", depth=50, width=64, num_classes=1000, input_size=224,
                              block=BlockConfig(kind="bottleneck")))
    assert count_params(net) == count_params(torchvision.models.resnet50())
    assert count_macs(net, (3, 224, 224)) == pytest.approx(4.09e9, rel=0.02)  # the well-known 4.1 GMACs
    r20 = build_net(NetConfig(depth=20, block=BlockConfig(shortcut="A")))
    assert count_macs(r20, (3, 32, 32)) == pytest.approx(40.55e6, rel=0.01)


def test_skip_flags_flip_without_rebuild_and_plain_twin_has_same_layers():
    torch.manual_seed(0)
    net = build_net(tiny()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y_res = net(x)
        net.set_skips(False)
        y_plain = net(x)
        net.set_skips([True, True, True])
        y_back = net(x)
    assert not torch.allclose(y_res, y_plain)
    torch.testing.assert_close(y_back, y_res, atol=0, rtol=0)
    twin = plain_twin(net)
    assert twin.skips == (False,) * 3
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in net.named_parameters()]
    with pytest.raises(ValueError, match="expected 3 skip flags"):
        net.set_skips([True])


def test_plain_block_output_is_post_of_branch_only():
    blk = ResidualBlock(BlockConfig(), 8, 8, 1, skip=False).eval()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(blk(x), torch.relu(blk.branch(x)))


def test_removed_block_passes_the_shortcut_only():
    net = build_net(tiny()).eval()
    x = torch.randn(2, 8, 16, 16)
    blk = net.blocks[0]
    net.set_removed([0])
    torch.testing.assert_close(blk(x), torch.relu(x))
    net.set_removed([])
    assert not blk.removed
    with pytest.raises(ValueError, match="out of range"):
        net.set_removed([7])


def test_option_a_shortcut_subsamples_and_zero_pads():
    s = ShortcutA(2, 4, 2)
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    y = s(x)
    assert y.shape == (1, 4, 2, 2)
    torch.testing.assert_close(y[:, :2], x[:, :, ::2, ::2])
    assert y[:, 2:].abs().sum() == 0
    assert not list(s.parameters())


def test_shortcut_c_always_projects_and_b_only_when_shape_changes():
    b = build_net(tiny(shortcut="B"))
    c = build_net(tiny(shortcut="C"))
    assert [blk.has_projection for blk in b.blocks] == [False, True, True]
    assert all(blk.has_projection for blk in c.blocks)


def test_zero_init_last_makes_every_block_start_as_its_shortcut():
    net = build_net(tiny(zero_init_last=True)).eval()
    for blk in net.blocks:
        x = torch.randn(2, blk.cin, 8, 8)
        assert blk.branch(x).abs().max() == 0


def _valid_blocks(**fixed: object) -> list[BlockConfig]:
    configs = []
    for kind, norm, order in itertools.product(KINDS, NORMS, ORDERS):
        with contextlib.suppress(ValueError):  # an invalid combination, e.g. BN after the addition without a norm
            configs.append(BlockConfig(kind=kind, norm=norm, order=order, **fixed))
    return configs


@pytest.mark.parametrize("cfg", _valid_blocks(zero_init_last=True), ids=lambda c: f"{c.kind}-{c.norm}-{c.order}")
def test_each_block_zero_inits_its_own_last_layer(cfg: BlockConfig):
    """The layer a block names is F's last layer with a weight, and zeroing it makes F(x) = 0."""
    blk = ResidualBlock(cfg, 8, 8).eval()
    weighted = [name for name, m in blk.branch.named_children() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm))]
    assert blk.last_layer == weighted[-1]
    assert not getattr(blk.branch, blk.last_layer).weight.any()
    assert blk.branch(torch.randn(2, 8, 8, 8)).abs().max() == 0


def test_rezero_starts_as_identity_and_fixed_alpha_scales_branch():
    net = build_net(tiny(scaling="learnable")).eval()
    assert all(b.branch.scale.alpha.item() == 0.0 for b in net.blocks)
    half = ResidualBlock(BlockConfig(scaling="fixed", alpha=0.5), 8, 8).eval()
    x = torch.randn(1, 8, 4, 4)
    full = nn.Sequential(*list(half.branch)[:-1])
    torch.testing.assert_close(half.branch(x), 0.5 * full(x))


def test_stochastic_depth_is_linear_in_depth_and_off_in_eval():
    net = build_net(NetConfig(depth=20, block=BlockConfig(stochastic_depth=0.5)))
    probs = [b.drop_prob for b in net.blocks]
    assert probs[-1] == pytest.approx(0.5) and probs[0] == pytest.approx(0.5 / 9)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net(x), net(x))


def test_library_never_imports_streamlit():
    code = "import sys, resviz, resviz.nn.models, resviz.nn.blocks; import pkgutil, importlib\n" \
           "[importlib.import_module('resviz.' + m.name) for m in pkgutil.iter_modules(resviz.__path__)]\n" \
           "assert 'streamlit' not in sys.modules, 'resviz imported streamlit'"
    subprocess.run([sys.executable, "-c", code], check=True)
