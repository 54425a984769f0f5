"""Captum adapters: shapes, oracles, mode restoration, no leftover hooks, and the scoring helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from resviz.analysis.attribution import (
    METHODS,
    attribute,
    deletion_curve,
    deletion_score,
    normalize_heatmap,
    pointing_game,
)
from resviz.config import NetConfig
from resviz.nn.models import build_net
from resviz.nn.scoped import eval_mode

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return build_net(NetConfig(depth=8, width=8, input_size=16, num_classes=3))  # 3 blocks, 16x16


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def linear_net(c: int = 3, hw: int = 16, k: int = 2, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * hw * hw, k))


def hooks_left(net: nn.Module) -> int:
    n = 0
    for m in net.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            n += len(getattr(m, name, {}))
    return n


FAST = {"integrated_gradients": {"n_steps": 8}, "occlusion": {"window": 4}}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_shape_range_and_cleanup(net, x, method):
    net.train()
    net.blocks[1].eval()  # a mixed mode must come back exactly
    result = attribute(net, x, method, **FAST.get(method, {}))
    assert result.heatmap.shape == (16, 16)
    assert torch.isfinite(result.heatmap).all() and torch.isfinite(result.raw).all()
    assert result.heatmap.min() >= 0.0 and result.heatmap.max() <= 1.0
    assert result.heatmap.max() == 1.0  # a real net gives a non-flat map
    assert result.method == method
    with torch.no_grad():
        assert result.target == int(net.eval()(x).argmax())  # default: the predicted class
    net.train()
    net.blocks[1].eval()
    attribute(net, x, method, target=2, **FAST.get(method, {}))
    assert net.training and net.blocks[0].training and not net.blocks[1].training
    assert hooks_left(net) == 0
    assert all(p.grad is None for p in net.parameters())
    net.train()


def test_integrated_gradients_completeness(net, x):
    result = attribute(net, x, "integrated_gradients", target=1, n_steps=128, internal_batch_size=32)
    with torch.no_grad(), eval_mode(net):
        gap = (net(x)[0, 1] - net(torch.zeros_like(x))[0, 1]).item()
    total = result.raw.sum().item()
    assert abs(gap) > 1e-3  # otherwise the check says nothing
    assert total == pytest.approx(gap, rel=0.03, abs=1e-3)
    assert result.delta == pytest.approx(total - gap, abs=1e-4)
    assert result.raw.shape == (3, 16, 16)


def test_integrated_gradients_exact_on_linear_model():
    model, xs = linear_net(), torch.randn(1, 3, 16, 16)
    result = attribute(model, xs, "integrated_gradients", target=0, n_steps=4)
    expected = (model[1].weight[0].reshape(3, 16, 16) * xs[0]).detach()  # w * (x - 0)
    torch.testing.assert_close(result.raw, expected, atol=1e-5, rtol=1e-4)


def test_saliency_matches_autograd(net, x):
    xg = x.clone().requires_grad_(True)
    with eval_mode(net):
        net(xg)[0, 2].backward()
    net.zero_grad(set_to_none=True)
    result = attribute(net, x, "saliency", target=2)
    torch.testing.assert_close(result.raw, xg.grad[0].abs(), atol=1e-6, rtol=1e-5)
    expected_map = xg.grad[0].abs().amax(0)
    torch.testing.assert_close(result.heatmap, expected_map / expected_map.max(), atol=1e-6, rtol=1e-5)


def test_gradcam_matches_hand_computation(net, x):
    acts = {}

    def keep(_m, _i, out):
        out.retain_grad()
        acts["a"] = out

    with eval_mode(net):
        handle = net.blocks[1].register_forward_hook(keep)
        try:
            net(x)[0, 0].backward()
        finally:
            handle.remove()
    net.zero_grad(set_to_none=True)
    a = acts["a"]  # (1, 16, 8, 8): block 1 is the first of stage 2
    weights = a.grad.mean(dim=(2, 3), keepdim=True)
    expected = torch.relu((weights * a).sum(1))[0].detach()
    result = attribute(net, x, "gradcam", target=0, block=1)
    assert result.raw.shape == (1, 8, 8)
    torch.testing.assert_close(result.raw[0], expected, atol=1e-6, rtol=1e-5)
    assert attribute(net, x, "gradcam", target=0, block=-2).raw.allclose(result.raw)


def test_gradcam_errors(net, x):
    with pytest.raises(ValueError, match="out of range"):
        attribute(net, x, "gradcam", block=3)
    with pytest.raises(ValueError, match="merge module"):
        attribute(linear_net(), x, "gradcam")


def test_occlusion_matches_linear_model():
    model, xs = linear_net(seed=3), torch.randn(1, 3, 16, 16)
    result = attribute(model, xs, "occlusion", target=1, window=4, stride=4, perturbations_per_eval=7)
    contrib = (model[1].weight[1].reshape(3, 16, 16) * xs[0]).detach().sum(0)  # (16, 16)
    per_window = contrib.reshape(4, 4, 4, 4).sum(dim=(1, 3))  # (4, 4) window sums
    expected = per_window.repeat_interleave(4, 0).repeat_interleave(4, 1)  # f(x) - f(x occluded)
    torch.testing.assert_close(result.raw.sum(0) / 3, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.raw[0], result.raw[2])


def test_hooks_removed_and_mode_restored_when_forward_raises(net, x):
    class BoomError(RuntimeError):
        pass

    def explode(_m, _i, _o):
        raise BoomError("forward failed")

    net.train()
    handle = net.fc.register_forward_hook(explode)
    try:
        with pytest.raises(BoomError):
            attribute(net, x, "gradcam", target=0, block=0)
    finally:
        handle.remove()
    assert hooks_left(net) == 0 and net.training and all(m.training for m in net.modules())


def test_inputs_and_options_validation(net, x):
    assert attribute(net, x[0], "saliency").heatmap.shape == (16, 16)  # (C, H, W) is fine
    with torch.inference_mode():
        frozen = x.clone()
    with torch.no_grad():  # the app may call it inside no_grad
        assert attribute(net, frozen, "gradcam").heatmap.shape == (16, 16)
    with pytest.raises(ValueError, match="one image"):
        attribute(net, torch.zeros(2, 3, 16, 16), "saliency")
    with pytest.raises(ValueError, match="unknown attribution method"):
        attribute(net, x, "lime")
    with pytest.raises(ValueError, match="out of range"):
        attribute(net, x, "saliency", target=3)
    with pytest.raises(TypeError):
        attribute(net, x, "saliency", n_steps=3)
    assert hooks_left(net) == 0


def test_normalize_heatmap_signs():
    v = torch.tensor([[-2.0, 1.0], [float("nan"), 0.5]])
    torch.testing.assert_close(normalize_heatmap(v, "absolute"), torch.tensor([[1.0, 0.5], [0.0, 0.25]]))
    torch.testing.assert_close(normalize_heatmap(v, "positive"), torch.tensor([[0.0, 1.0], [0.0, 0.5]]))
    torch.testing.assert_close(normalize_heatmap(v, "negative"), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert normalize_heatmap(torch.zeros(3, 3)).sum() == 0
    with pytest.raises(ValueError):
        normalize_heatmap(v, "both")


def test_pointing_game():
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    heat = np.zeros((8, 8))
    heat[3, 3] = 1.0
    assert pointing_game(heat, mask)
    heat2 = np.zeros((8, 8))
    heat2[6, 6] = 1.0
    assert not pointing_game(heat2, mask)
    assert not pointing_game(heat2, mask, tolerance=1)
    assert pointing_game(heat2, mask, tolerance=3)
    assert not pointing_game(np.zeros((8, 8)), mask)  # a flat map points nowhere
    nan_heat = np.full((8, 8), np.nan)
    nan_heat[2, 2] = 0.1
    assert pointing_game(torch.from_numpy(nan_heat), torch.from_numpy(mask))
    with pytest.raises(ValueError, match="same 2-D shape"):
        pointing_game(heat, mask[:4])


def test_deletion_prefers_the_pixels_the_net_uses():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
        w = torch.zeros(16, 16)
        w[:4, :4] = 1.0  # class 0 looks only at the top-left corner
        model[1].weight[0] = w.reshape(-1)
    xs = torch.ones(1, 1, 16, 16)
    good, bad = w.clone(), 1.0 - w
    fractions, probs = deletion_curve(model, xs, good, 0, steps=8)
    assert len(fractions) == len(probs) == 9 and fractions[0] == 0 and fractions[-1] == 1
    assert probs[0] == pytest.approx(torch.sigmoid(torch.tensor(16.0)).item(), abs=1e-6)
    assert probs[-1] == pytest.approx(0.5, abs=1e-6)
    good_score, bad_score = deletion_score(model, xs, good, 0, steps=8), deletion_score(model, xs, bad, 0, steps=8)
    assert 0 <= good_score < bad_score <= 1
    assert good_score < 0.6 and bad_score > 0.9
    with pytest.raises(ValueError, match="pixels"):
        deletion_curve(model, xs, np.zeros((4, 4)), 0)


def test_deletion_on_real_net_restores_mode(net, x):
    net.train()
    heat = attribute(net, x, "saliency").heatmap
    score = deletion_score(net, x, heat, 0, steps=4)
    assert 0.0 <= score <= 1.0 and net.training
