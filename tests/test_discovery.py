"""Residual-merge discovery and the residualized model, on torchvision, timm and ResViz nets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from resviz import NetConfig, build_net
from resviz.nn.discovery import GraphBlock, TraceError, discover, residualize

timm = pytest.importorskip("timm")

# (source, name, input size, merges, identity shortcuts): the counts the architectures define
CASES = [
    ("torchvision", "resnet18", 64, 8, 5),
    ("torchvision", "resnext50_32x4d", 64, 16, 12),
    ("torchvision", "mobilenet_v2", 64, 10, 10),
    ("torchvision", "convnext_tiny", 64, 18, 18),
    ("torchvision", "vit_b_16", 224, 24, 24),
    ("torchvision", "alexnet", 64, 0, 0),
    ("timm", "resnet18", 64, 8, 5),
    ("timm", "convnext_tiny", 64, 18, 18),
    ("timm", "vit_tiny_patch16_224", 224, 24, 24),
    ("timm", "efficientnet_b0", 64, 9, 9),
]


def make(source: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name) if source == "torchvision" else timm.create_model(name)
    return model.eval()


@pytest.mark.parametrize(("source", "name", "size", "merges", "identity"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_counts(source: str, name: str, size: int, merges: int, identity: int) -> None:
    rmap = discover(make(source, name), torch.randn(1, 3, size, size))
    assert len(rmap) == merges
    assert rmap.counts() == {"identity": identity, "projection": merges - identity}
    assert [m.index for m in rmap] == list(range(merges))
    assert len({m.name for m in rmap}) == merges  # every merge has its own name
    for m in rmap:
        assert m.branch, f"{m.name} has no module on its residual branch"
        assert (m.shortcut == "identity") == (not m.shortcut_modules) or m.shortcut == "identity"


def test_resnet18_merges_name_their_parts() -> None:
    rmap = discover(make("torchvision", "resnet18"), torch.randn(1, 3, 64, 64))
    first, down = rmap[0], rmap[2]
    assert first.name == "layer1.0.merge" and first.owner == "layer1.0" and first.shortcut == "identity"
    assert first.branch == ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu", "layer1.0.conv2", "layer1.0.bn2")
    assert down.owner == "layer2.0" and down.shortcut == "projection"
    assert down.shortcut_modules == ("layer2.0.downsample",)
    assert first.shape == (1, 64, 16, 16)


class NotResidual(nn.Module):
    """Additions that are not residual: a bias, a positional embedding, two unrelated inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 4, 8, 8))
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        x = x + self.pos  # positional embedding
        x = self.conv(x) + 1.0  # a constant
        return x + other  # an unrelated input


class TwoResiduals(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.drop = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Dropout(0.1)
        self.proj = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x) + torch.relu(self.a(x))  # identity through dropout, branch second
        return self.b(x) + self.proj(x)


def test_non_residual_additions_are_not_merges() -> None:
    x = torch.randn(1, 4, 8, 8)
    assert len(discover(NotResidual(), (x, x.clone()))) == 0


def test_shortcut_through_dropout_is_identity_and_operand_order_is_found() -> None:
    rmap = discover(TwoResiduals(), torch.randn(1, 4, 8, 8))
    assert [m.shortcut for m in rmap] == ["identity", "projection"]
    assert rmap[0].branch_operand == 1 and rmap[0].branch == ("a",)
    assert rmap[1].shortcut_modules in (("proj",), ("b",))


@pytest.mark.parametrize(("source", "name", "size"), [("torchvision", "resnet18", 64), ("torchvision", "mobilenet_v2", 64),
                                                      ("timm", "vit_tiny_patch16_224", 224), ("timm", "efficientnet_b0", 64)])
def test_residualized_is_bit_identical(source: str, name: str, size: int) -> None:
    model = make(source, name)
    x = torch.randn(2, 3, size, size)
    res = residualize(model, x[:1])
    assert set(res.state_dict()) == set(model.state_dict())
    y0, y1 = model(x), res(x)
    assert torch.equal(y0, y1)
    g0 = torch.autograd.grad(y0.square().sum(), list(model.parameters()))
    g1 = torch.autograd.grad(y1.square().sum(), list(res.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert all(isinstance(b, GraphBlock) for b in res.merge_blocks) and len(res.merge_blocks) == len(res.residual_map)


def test_residualize_leaves_the_original_alone_and_keeps_train_mode() -> None:
    model = make("torchvision", "resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = residualize(model, torch.randn(1, 3, 64, 64))
    assert res.training and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    res(torch.randn(2, 3, 64, 64))  # training mode updates the copy's running statistics only
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(res.state_dict()["bn1.running_mean"], before["bn1.running_mean"])


def test_basic_block_semantics_against_hand_written_forward() -> None:
    model = make("torchvision", "resnet18")
    blk = model.layer1[0]
    x = torch.relu(torch.randn(2, 64, 16, 16))  # a block's input comes out of a ReLU
    sub = residualize(blk, x[:1])
    sub.set_skips(False)
    plain = torch.relu(blk.bn2(blk.conv2(torch.relu(blk.bn1(blk.conv1(x))))))
    assert torch.equal(sub(x), plain)
    sub.set_skips(True)
    sub.set_removed([0])
    assert torch.equal(sub(x), x)  # a removed block is its shortcut (relu of a non-negative x is x)
    sub.set_removed([])
    assert torch.equal(sub(x), blk(x))


def test_set_skips_and_removed_change_the_output_and_restore() -> None:
    model = make("torchvision", "resnet18")  # (timm zero-initialises each branch's last norm: removal would not show)
    x = torch.randn(2, 3, 64, 64)
    res = residualize(model, x[:1])
    ref = res(x)
    res.set_skips(False)
    assert res.skips == (False,) * 8 and not torch.equal(res(x), ref)
    res.set_skips([True] * 8)
    res.set_removed([1, 4])
    assert [b.merge.removed for b in res.blocks] == [i in (1, 4) for i in range(8)]
    assert not torch.equal(res(x), ref)
    res.set_removed([])
    res.set_scale(0.5)
    assert not torch.equal(res(x), ref)
    res.set_scale(1.0)
    assert torch.equal(res(x), ref)
    with pytest.raises(ValueError, match="expected 8"):
        res.set_skips([True])
    with pytest.raises(ValueError, match="out of range"):
        res.set_removed([8])


def test_resviz_nets_are_the_special_case() -> None:
    net = build_net(NetConfig(depth=20, width=8, input_size=16)).eval()
    rmap = discover(net, torch.randn(1, 3, 16, 16))
    assert [m.name for m in rmap] == [f"blocks.{i}.merge" for i in range(len(net.blocks))]
    kinds = ["identity" if isinstance(b.shortcut, nn.Identity) else "projection" for b in net.blocks]
    assert [m.shortcut for m in rmap] == kinds
    res = residualize(net, torch.randn(1, 3, 16, 16))
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(res(x), net(x))
    res.set_skips([False] * len(net.blocks))
    net.set_skips(False)
    assert torch.allclose(res(x), net(x), atol=1e-6)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return x


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.conv = Untraceable(), nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.inner(x))


def test_untraceable_submodule_is_kept_whole_and_reported() -> None:
    rmap = discover(Wrapper(), torch.randn(1, 3, 8, 8))
    assert rmap.opaque == ("inner",) and len(rmap) == 1 and rmap[0].branch == ("inner", "conv")


def test_untraceable_model_names_the_module_and_construct() -> None:
    with pytest.raises(TraceError, match=r"Untraceable\.forward .*control flow"):
        discover(Untraceable(), torch.randn(1, 3, 8, 8))


# -- every instrument on a residualized model -------------------------------------------------------
from resviz.analysis.attribution import attribute  # noqa: E402
from resviz.analysis.inspection import Lesion, inspect_image, lesioned, predict, removal_effects  # noqa: E402
from resviz.analysis.probes import Activations, BranchMagnitudes, GradientFlow, LiveProbes, SignalProp  # noqa: E402
from resviz.nn.merge import junctions, merges  # noqa: E402


@pytest.fixture(scope="module")
def tv_resnet18() -> nn.Module:
    return residualize(make("torchvision", "resnet18"), torch.randn(1, 3, 64, 64))


def test_junctions_of_a_residualized_model_hook_its_input_and_paths(tv_resnet18: nn.Module) -> None:
    js = junctions(tv_resnet18)
    assert len(js) == len(merges(tv_resnet18)) == 8
    assert all(j.block is b and j.entry is b.entry and j.branch is b.branch_in for j, b in zip(js, tv_resnet18.blocks))
    names = {id(p): n for n, p in tv_resnet18.named_parameters()}
    assert {names[id(p)] for p in js[2].parameters()} >= {"layer2.0.conv1.weight", "layer2.0.downsample.0.weight"}


def test_branch_magnitudes_and_activations_measure_f_and_s(tv_resnet18: nn.Module) -> None:
    model, x = tv_resnet18, torch.randn(2, 3, 64, 64)
    orig = make("torchvision", "resnet18")
    taken = {}
    # clones: torchvision's ``out += identity`` and in-place ReLU overwrite bn2's output after the hook
    hooks = [orig.layer1[0].bn2.register_forward_hook(lambda m, i, o: taken.update(f=o.clone())),
             orig.maxpool.register_forward_hook(lambda m, i, o: taken.update(s=o.clone()))]
    with torch.no_grad():
        orig(x)
    for h in hooks:
        h.remove()
    with torch.no_grad(), BranchMagnitudes(model) as probe, Activations(model, blocks=[0]) as acts:
        model(x)
    res = probe.result()
    torch.testing.assert_close(res["f_norm"][0, 0], taken["f"].flatten(1).norm(dim=1).mean())
    torch.testing.assert_close(res["s_norm"][0, 0], taken["s"].flatten(1).norm(dim=1).mean())
    maps = acts.result()
    assert maps is not None


def test_gradient_flow_splits_by_path_and_signal_prop_reads_every_block(tv_resnet18: nn.Module) -> None:
    model, x, y = tv_resnet18, torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    with GradientFlow(model) as flow:
        nn.functional.cross_entropy(model(x), y).backward()
        flow.record()
    g = flow.result()
    assert g["grad_total"].shape == (1, 8) and (g["grad_branch"] > 0).all() and (g["grad_shortcut"] > 0).all()
    assert (g["grad_block"] > 0).all()
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), SignalProp(model) as sig:
        model(x)
    assert all(v.shape[-1] == 8 for v in sig.result().values())
    with torch.no_grad(), LiveProbes(model) as live:
        model(x)
    assert live.drain()["ratio"].shape == (1, 8)


def test_lesions_inspection_and_gradcam_on_a_residualized_model(tv_resnet18: nn.Module) -> None:
    model, x = tv_resnet18, torch.randn(3, 64, 64)
    intact = predict(model, x)
    with lesioned(model, Lesion(skips=(False,) * 8)):
        assert not np.allclose(predict(model, x), intact)
    np.testing.assert_array_equal(predict(model, x), intact)
    result = inspect_image(model, x, block=1, channels=4)
    assert result.f_norm.shape == (8,) and result.maps.sum.shape == (4, 16, 16)
    # the sum as the merge made it, not as torchvision's in-place ReLU left it afterwards
    np.testing.assert_allclose(result.maps.sum, result.maps.f + result.maps.s, rtol=1e-6, atol=1e-6)
    assert (result.maps.sum < 0).any()
    assert removal_effects(model, x).shape == (8,)
    assert attribute(model, x, "gradcam", block=7).heatmap.shape == (64, 64)


# -- layouts: token models show their maps on the patch grid ----------------------------------------
from resviz.analysis.attribution import _grid_gradcam  # noqa: E402
from resviz.nn.layout import decide, to_maps, token_grid  # noqa: E402


@pytest.mark.parametrize(("shape", "inp", "layout", "grid"), [
    ((1, 64, 16, 16), (1, 3, 64, 64), "nchw", (16, 16)),
    ((1, 16, 16, 96), (1, 3, 64, 64), "nhwc", (16, 16)),
    ((1, 2, 2, 768), (1, 3, 64, 64), "nhwc", (2, 2)),
    ((1, 16, 16, 16), (1, 3, 64, 64), "nchw", (16, 16)),  # a cube reads channels first
    ((1, 197, 192), (1, 3, 224, 224), "tokens", (14, 14)),
    ((1, 198, 192), (1, 3, 224, 224), "tokens", (14, 14)),  # class + distillation token
    ((1, 32, 64), (1, 3, 32, 64), "tokens", (4, 8)),  # a wide image: the grid keeps its aspect
    ((1, 10), (1, 3, 8, 8), "vector", (1, 1)),
    ((1, 4, 100), (1, 4, 100), "other", None),  # a 1-D signal
])
def test_layout_rule(shape: tuple, inp: tuple, layout: str, grid: tuple | None) -> None:
    assert decide(shape, inp) == (layout, grid)


def test_to_maps_drops_leading_tokens_and_moves_channels_first() -> None:
    t = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    maps = to_maps(t, "tokens", token_grid(17, (32, 32)))
    assert maps.shape == (2, 3, 4, 4) and torch.equal(maps[1, 2, 3, 1], t[1, 1 + 3 * 4 + 1, 2])
    hwc = torch.randn(2, 4, 4, 5)
    assert torch.equal(to_maps(hwc, "nhwc"), hwc.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="no"):
        to_maps(torch.randn(1, 4, 100), "other")


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10).eval()


def test_vit_merges_are_tokens_and_show_on_the_patch_grid() -> None:
    model, x = tiny_vit(), torch.randn(3, 32, 32)
    res = residualize(model, x[None])
    assert len(res.residual_map) == 24 and {(m.layout, m.grid) for m in res.residual_map} == {("tokens", (4, 4))}
    taken = {}
    h = res.merge_blocks[5].register_forward_hook(lambda m, i, o: taken.update(y=o.detach()))
    result = inspect_image(res, x, block=5, channels=4)
    h.remove()
    assert result.maps.sum.shape == (4, 4, 4) and result.maps.f.shape == (4, 4, 4)
    by_hand = taken["y"][0, 1:].reshape(4, 4, -1).permute(2, 0, 1)[:4]  # patch tokens on the grid, class token dropped
    np.testing.assert_array_equal(result.maps.sum, by_hand.numpy())
    cam = attribute(res, x, "gradcam", block=21)  # block 10's MLP merge: its patch tokens reach the class token
    assert cam.raw.shape == (1, 4, 4) and cam.heatmap.shape == (32, 32) and cam.heatmap.max() == 1.0
    assert not attribute(res, x, "gradcam", block=23).raw.any()  # the last block's patch tokens never reach the head
    torch.testing.assert_close(attribute(res, x, "gradcam").raw, cam.raw)  # so the default steps back to block 21
    with torch.no_grad(), SignalProp(res) as sig:
        res(x[None].repeat(2, 1, 1, 1))
    assert all(torch.isfinite(v).all() and v.shape == (1, 24) for v in sig.result().values())


def test_grid_gradcam_is_captums_gradcam_on_channels_first_maps(tv_resnet18: nn.Module) -> None:
    from captum.attr import LayerGradCam

    x, block = torch.randn(1, 3, 64, 64), tv_resnet18.blocks[6]
    ours = _grid_gradcam(tv_resnet18.eval(), x, 3, block, ("nchw", None), relu=True)
    theirs = LayerGradCam(tv_resnet18, block).attribute(x, target=3, relu_attributions=True)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.slow
def test_swin_merges_are_channels_last_maps() -> None:
    torch.manual_seed(0)
    model, x = torchvision.models.swin_t().eval(), torch.randn(3, 64, 64)
    res = residualize(model, x[None])
    assert len(res.residual_map) == 24 and {m.layout for m in res.residual_map} == {"nhwc"}
    assert res.residual_map[0].grid == (16, 16) and res.residual_map[-1].grid == (2, 2)
    assert torch.equal(res(x[None]), model(x[None]))
    result = inspect_image(res, x, block=4, channels=8)  # stage 2 (merges 4-7): 8x8 maps of 192 channels
    assert result.maps.sum.shape == (8, 8, 8) and result.maps.total_channels == 192
    assert attribute(res, x, "gradcam", block=20).heatmap.shape == (64, 64)


class DataDependentShape(nn.Module):
    """Traceable, but its shapes depend on values: fake tensors cannot run it, a real forward can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.conv(x)
        picked = torch.nonzero(y.flatten(1) > 0)  # (K, 2): K depends on the values
        return y.mean() + picked.float().mean()


def test_shapes_fall_back_to_a_real_forward() -> None:
    rmap = discover(DataDependentShape(), torch.randn(1, 3, 8, 8))
    assert len(rmap) == 1 and rmap[0].shape == (1, 3, 8, 8) and rmap[0].shortcut == "identity"


def test_a_copy_of_a_residualized_model_is_one_too() -> None:
    import copy

    res = residualize(tiny_vit(), torch.randn(1, 3, 32, 32))
    twin = copy.deepcopy(res)
    x = torch.randn(2, 3, 32, 32)
    assert twin.residual_map == res.residual_map and torch.equal(twin(x), res(x))
    twin.set_skips(False)
    assert res.skips == (True,) * 24 and twin.skips == (False,) * 24
    assert not torch.equal(twin(x), res(x))
    assert all(p is not q for p, q in zip(twin.parameters(), res.parameters()))
