"""Inspecting one image: lesions apply and are undone, maps and magnitudes match the net, comparisons."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from resviz import NetConfig, build_net, plain_twin
from resviz.analysis.inspection import (
    INTACT,
    Lesion,
    compare,
    explain,
    inspect_image,
    lesioned,
    pick_channels,
    predict,
    removal_effects,
    top_k,
)

CLASSES = ("circle", "ring", "square", "frame")


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    n = build_net(NetConfig(style="cifar", depth=20, width=8, num_classes=4, input_size=16)).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics so lesions change the output visibly
        for m in n.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return n


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))


def _state(net: torch.nn.Module) -> tuple:
    return net.skips, tuple(b.removed for b in net.blocks), tuple(m.training for m in net.modules())


def test_intact_lesion_equals_plain_forward(net, x):
    with torch.no_grad():
        ref = net(x[None]).softmax(1)[0].numpy()
    np.testing.assert_allclose(predict(net, x), ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(predict(net, x, Lesion(skips=net.skips, removed=())), ref, rtol=1e-6, atol=1e-7)
    assert INTACT.is_intact(net) and Lesion(skips=net.skips).is_intact(net)


@pytest.mark.parametrize("lesion", [Lesion(skips=(True,) * 4 + (False,) * 5), Lesion(removed=(3,)), Lesion(removed=(0, 8))])
def test_lesions_change_predictions_and_are_undone(net, x, lesion):
    before = _state(net)
    intact = predict(net, x)
    changed = predict(net, x, lesion)
    assert not np.allclose(intact, changed, atol=1e-5)
    assert _state(net) == before
    np.testing.assert_allclose(predict(net, x), intact, rtol=1e-6)
    assert not lesion.is_intact(net)


def test_flags_and_modes_restored_after_an_exception(net):
    net.train()
    before = _state(net)
    with pytest.raises(RuntimeError, match="boom"), lesioned(net, Lesion(skips=(False,) * 9, removed=(1, 2))):
        assert not any(net.skips) and net.blocks[1].removed and not net.training
        raise RuntimeError("boom")
    assert _state(net) == before
    net.eval()


def test_lesion_on_plain_net_can_turn_skips_on(net, x):
    plain = plain_twin(net)
    plain.load_state_dict(net.state_dict())
    plain.eval()
    np.testing.assert_allclose(predict(plain, x, Lesion(skips=(True,) * 9)), predict(net, x), rtol=1e-5, atol=1e-7)
    assert plain.skips == (False,) * 9
    assert Lesion(skips=(True,) * 9).describe(plain) == "skip on: 0, 1, 2, 3, 4, 5, 6, 7, 8"
    assert Lesion(skips=(True,) * 8 + (False,), removed=(2, 2)).describe(net) == "skip off: 8; removed: 2"


def test_inspect_maps_and_magnitudes(net, x):
    r = inspect_image(net, x, classes=CLASSES, block=4, channels=5, channel_start=3, k=3)
    assert len(r.top) == 3 and r.top[0].prob >= r.top[1].prob >= r.top[2].prob
    assert r.top[0].label == CLASSES[r.top[0].index]
    np.testing.assert_allclose(r.probs, predict(net, x), rtol=1e-6)
    assert r.f_norm.shape == r.s_norm.shape == (9,) and np.all(r.f_norm > 0) and np.all(r.s_norm > 0)
    m = r.maps
    assert m.block == 4 and m.channels == (3, 4, 5, 6, 7) and m.total_channels == 16
    assert m.f.shape == m.s.shape == m.sum.shape == (5, 8, 8)
    np.testing.assert_allclose(m.f + m.s, m.sum, rtol=1e-5, atol=1e-6)
    # the norms are those of the whole F(x) and S(x) at that block
    full = inspect_image(net, x, block=4, channels=16)
    assert np.linalg.norm(full.maps.f) == pytest.approx(r.f_norm[4], rel=1e-4)
    assert np.linalg.norm(full.maps.s) == pytest.approx(r.s_norm[4], rel=1e-4)


def test_inspect_under_lesion(net, x):
    r = inspect_image(net, x, lesion=Lesion(skips=(True,) * 4 + (False,) + (True,) * 4, removed=(6,)), block=4)
    assert r.maps.s is None and r.maps.f is not None and r.s_norm[4] == 0
    assert r.f_norm[6] == 0 and r.s_norm[6] > 0
    r6 = inspect_image(net, x, lesion=Lesion(removed=(6,)), block=6)
    assert r6.maps.f is None
    np.testing.assert_allclose(r6.maps.s, r6.maps.sum)
    assert inspect_image(net, x, block=None).maps is None
    with pytest.raises(ValueError, match="out of range"):
        inspect_image(net, x, block=9)


def test_pick_channels():
    t = torch.zeros(6, 2, 2)
    t[4] = 3.0
    t[1] = -2.0
    assert pick_channels(t, 2, "strongest") == (4, 1)
    assert pick_channels(t, 4, "index", start=5) == (2, 3, 4, 5)  # clamped to the last full window
    assert pick_channels(t, 50) == tuple(range(6))
    with pytest.raises(ValueError):
        pick_channels(t, 2, "random")


def test_top_k_and_compare():
    p = np.array([0.1, 0.6, 0.3])
    assert [t.index for t in top_k(p, None, 2)] == [1, 2] and top_k(p, ("a",), 3)[0].label == "class 1"
    same = compare(p, p, CLASSES, k=2)
    assert same.kl == pytest.approx(0.0, abs=1e-9) and same.top1_agree and same.topk_overlap == 1 and same.delta_conf == 0
    q = np.array([0.7, 0.2, 0.1])
    c = compare(p, q, None, k=2)
    assert c.kl == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-6)
    assert not c.top1_agree and c.topk_overlap == 0.5 and c.delta_conf == pytest.approx(-0.4)
    assert [r[0] for r in c.rows] == [1, 2, 0] and c.rows[2][2:] == (0.1, 0.7)
    with pytest.raises(ValueError):
        compare(p, q[:2])


def test_removal_effects_match_single_removals(net, x):
    effects = removal_effects(net, x)
    target = int(np.argmax(predict(net, x)))
    assert effects.shape == (9,)
    for i in (0, 5):
        assert effects[i] == pytest.approx(predict(net, x, Lesion(removed=(i,)))[target], rel=1e-5)


@pytest.mark.parametrize("method", ["saliency", "gradcam"])
def test_explain_under_lesion_restores_net(net, x, method):
    before = _state(net)
    h = explain(net, x, method, lesion=Lesion(removed=(2,)), block=5)
    assert h.heatmap.shape == (16, 16) and h.heatmap.min() >= 0 and h.heatmap.max() <= 1
    assert h.target == int(np.argmax(predict(net, x, Lesion(removed=(2,)))))
    assert _state(net) == before


def test_concurrent_lesions_do_not_interfere(net, x):
    lesions = [INTACT, Lesion(skips=(False,) * 9), Lesion(removed=(1, 3, 5)), Lesion(removed=(8,))]
    expected = [predict(net, x, les) for les in lesions]
    errors: list[str] = []

    def worker(j: int) -> None:
        for _ in range(15):
            got = predict(net, x, lesions[j])
            if not np.allclose(got, expected[j], rtol=1e-5, atol=1e-7):
                errors.append(f"lesion {j} gave {got}")

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(len(lesions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert net.skips == (True,) * 9 and not any(b.removed for b in net.blocks)
