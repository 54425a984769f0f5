"""The merge seam: instruments, lesions and inspection work on any model whose blocks sum through a Merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from resviz import NetConfig, build_net
from resviz.analysis.attribution import attribute
from resviz.analysis.inspection import Lesion, inspect_image, lesioned, predict, removal_effects
from resviz.analysis.probes import BranchMagnitudes, GradientFlow, LiveProbes
from resviz.nn.blocks import Add
from resviz.nn.merge import junctions, merges, removed_blocks, set_removed, set_skips, skips

torch.set_num_threads(1)


class TinyBlock(nn.Module):
    """Not a ResViz block: its own layout, with the sum routed through a merge that holds the flags."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.shortcut = nn.Identity()
        self.merge = Add()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.merge
        s = self.shortcut(x) if (m.skip or m.removed) else None
        f = None if m.removed else self.branch(x)
        return self.act(m(f, s))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), TinyBlock(4), TinyBlock(4))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture
def model() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


def test_junctions_find_blocks_and_paths_of_any_model(model: Tiny) -> None:
    js = junctions(model)
    assert [j.block for j in js] == [model.features[1], model.features[2]]
    assert all(j.merge is j.block.merge and j.branch is j.block.branch and j.shortcut is j.block.shortcut for j in js)
    assert merges(model) == [j.merge for j in js]
    with pytest.raises(ValueError, match="no merge module"):
        junctions(nn.Linear(2, 2))


def test_flags_are_addressed_through_the_merges(model: Tiny) -> None:
    set_skips(model, [False, True])
    set_removed(model, [1])
    assert skips(model) == (False, True) and removed_blocks(model) == (1,)
    with pytest.raises(ValueError, match="expected 2"):
        set_skips(model, [True])
    net = build_net(NetConfig(depth=8, width=4, input_size=16, num_classes=3))
    net.set_skips([True, False, True])
    assert skips(net) == net.skips == (True, False, True) and [b.skip for b in net.blocks] == [True, False, True]
    assert merges(net) == [b.merge for b in net.blocks]


def test_instruments_measure_a_foreign_model(model: Tiny) -> None:
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), BranchMagnitudes(model) as probe:
        model(x)
    h = model.features[0](x)
    blk = model.features[1]
    fn = blk.branch(h).flatten(1).norm(dim=1).mean()
    sn = h.flatten(1).norm(dim=1).mean()
    res = probe.result()
    torch.testing.assert_close(res["f_norm"][0, 0], fn)
    torch.testing.assert_close(res["s_norm"][0, 0], sn)
    y = torch.tensor([0, 2])
    with GradientFlow(model) as flow:
        nn.functional.cross_entropy(model(x), y).backward()
        flow.record()
    g = flow.result()
    assert g["grad_total"].shape == (1, 2) and (g["grad_branch"] > 0).all() and (g["grad_shortcut"] > 0).all()
    with LiveProbes(model) as live:  # the trainer's entry point takes any such model too
        model(x)
    assert live.drain()["f_norm"].shape == (1, 2)


def test_lesions_and_inspection_work_on_a_foreign_model(model: Tiny) -> None:
    x = torch.randn(3, 8, 8)
    intact = predict(model, x)
    with lesioned(model, Lesion(skips=(False, False), removed=(0,))):
        assert skips(model) == (False, False) and removed_blocks(model) == (0,)
    assert skips(model) == (True, True) and removed_blocks(model) == ()
    np.testing.assert_allclose(predict(model, x), intact, rtol=1e-6)
    result = inspect_image(model, x, block=1, channels=2)
    assert result.f_norm.shape == (2,) and result.maps.sum.shape == (2, 8, 8)
    assert removal_effects(model, x).shape == (2,)
    heat = attribute(model, x, "gradcam", block=0)
    assert heat.heatmap.shape == (8, 8)
