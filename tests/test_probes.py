"""Instruments: values against hand computations, no hook survives, and they only observe."""

from __future__ import annotations

import copy
import math
from contextlib import ExitStack

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resviz import BlockConfig, NetConfig, build_net, from_torchvision
from resviz.analysis.probes import (
    Activations,
    BranchMagnitudes,
    GradientFlow,
    LiveProbes,
    SignalProp,
    gradient_norms_by_layer,
    signal_prop,
)

VARIANTS = {
    "basic-post-batch-B": dict(kind="basic", order="post", norm="batch", shortcut="B"),
    "basic-pre-none-A": dict(kind="basic", order="pre", norm="none", shortcut="A"),
    "bottleneck-post-none-A": dict(kind="bottleneck", order="post", norm="none", shortcut="A"),
    "bottleneck-pre-batch-B": dict(kind="bottleneck", order="pre", norm="batch", shortcut="B"),
    "basic-bn_after_add-group-C-scaled": dict(
        order="bn_after_add", norm="group", shortcut="C", scaling="learnable", alpha_init=0.5
    ),
}
PROBES = {
    "activations": lambda net: Activations(net, max_channels=4),
    "branch": BranchMagnitudes,
    "grad": lambda net: GradientFlow(net, keep_grads=True),
    "signal": SignalProp,
    "live": LiveProbes,
}
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """Tiny nets run faster on one thread, and the box is shared with other test runs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_net(seed: int = 0, **block: object) -> nn.Module:
    torch.manual_seed(seed)
    bc = BlockConfig(**block)
    depth = 11 if bc.kind == "bottleneck" else 14
    return build_net(NetConfig(depth=depth, width=8, input_size=16, num_classes=4, block=bc))


def batch(n: int = 4, size: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g)


def prefix(net: nn.Module, x: torch.Tensor, i: int) -> torch.Tensor:
    h = net.stem(x)
    for blk in net.blocks[:i]:
        h = blk(h)
    return h


def tail(net: nn.Module, h: torch.Tensor, i: int) -> torch.Tensor:
    for blk in net.blocks[i + 1 :]:
        h = blk(h)
    return net.fc(torch.flatten(net.pool(net.head(h)), 1))


def manual_parts(net: nn.Module, x: torch.Tensor) -> list[dict[str, torch.Tensor | None]]:
    """F(x), S(x), sum and output of every block, computed without hooks."""
    parts, h = [], net.stem(x)
    for blk in net.blocks:
        f = None if blk.removed else blk.branch(h)
        s = blk.shortcut(h) if (blk.skip or blk.removed) else None
        total = f if s is None else (s if f is None else f + s)
        h = blk.post(total)
        parts.append(dict(f=f, s=s, sum=total, out=h))
    return parts


def assert_no_module_hooks(net: nn.Module) -> None:
    for name, m in net.named_modules():
        for attr in HOOK_DICTS:
            assert not getattr(m, attr), f"{name or 'net'}.{attr} still holds {dict(getattr(m, attr))}"


def snapshot(probe: object) -> object:
    if isinstance(probe, LiveProbes):
        return {k: v.copy() for k, v in probe.drain().items()}
    if isinstance(probe, GradientFlow):
        return [{k: v.clone() for k, v in d.items()} for d in probe.last_grads], probe.result()
    return probe.result()


def assert_same(a: object, b: object) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


# -- hooks never survive ------------------------------------------------------------------------
@pytest.mark.parametrize("probe_name", PROBES)
@pytest.mark.parametrize("variant", ["basic-post-batch-B", "bottleneck-pre-batch-B"])
def test_no_hook_survives_an_exception(probe_name: str, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    net = make_net(**VARIANTS[variant])
    x, y = batch()
    tapped: list[torch.Tensor] = []
    register = torch.Tensor.register_hook

    def spy(self: torch.Tensor, hook: object) -> object:
        tapped.append(self)
        return register(self, hook)

    monkeypatch.setattr(torch.Tensor, "register_hook", spy)
    probe = PROBES[probe_name](net)
    with pytest.raises(RuntimeError, match="boom"), probe:
        loss = F.cross_entropy(net(x), y)
        loss.backward(retain_graph=True)
        if hasattr(probe, "record"):
            probe.record()
        raise RuntimeError("boom")
    assert_no_module_hooks(net)
    assert all(not t._backward_hooks for t in tapped), "a tensor hook survived the probe"
    assert (len(tapped) > 0) == (probe_name in ("grad", "live"))
    before = snapshot(probe)
    if isinstance(probe, LiveProbes):  # drain() emptied it: nothing new may appear
        before = {k: v[:0] for k, v in before.items()}
    loss.backward(retain_graph=True)  # the retained graph still holds the tapped views
    F.cross_entropy(net(x), y).backward()
    if hasattr(probe, "record"):
        probe.record()  # detached: a no-op
    assert_same(snapshot(probe), before)


def test_hooks_removed_on_normal_exit_and_reentry_refused() -> None:
    net = make_net(**VARIANTS["basic-post-batch-B"])
    x, _ = batch()
    probe = BranchMagnitudes(net)
    with probe:
        with pytest.raises(RuntimeError, match="already attached"), probe:
            pass
        net(x)
    assert_no_module_hooks(net)
    assert probe.result()["f_norm"].shape == (1, len(net.blocks))


# -- observe only -------------------------------------------------------------------------------
def run_steps(net: nn.Module, probes: list, steps: int = 2, fast: bool = False) -> list[torch.Tensor]:
    """Two SGD steps (``fast``: channels-last input, bf16 autocast); returns every output and gradient."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    seen = []
    with ExitStack() as stack:
        for p in probes:
            stack.enter_context(p)
        for step in range(steps):
            x, y = batch(seed=10 + step)
            x = x.contiguous(memory_format=torch.channels_last) if fast else x
            torch.manual_seed(100 + step)  # stochastic depth draws the same masks in both runs
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
                out = net(x)
            F.cross_entropy(out.float(), y).backward()
            for p in probes:
                if hasattr(p, "record"):
                    p.record()
            seen += [out.detach().clone()] + [p.grad.clone() for p in net.parameters()]
            opt.step()
            opt.zero_grad()
    return seen + [t.detach().clone() for t in net.state_dict().values()]


def assert_observes_only(net: nn.Module, make_probes: object, fast: bool = False) -> None:
    ref_net, probed_net = copy.deepcopy(net), copy.deepcopy(net)
    reference = run_steps(ref_net, [], fast=fast)
    probes = make_probes(probed_net)
    probed = run_steps(probed_net, probes, fast=fast)
    assert len(reference) == len(probed)
    for a, b in zip(reference, probed):
        assert torch.equal(a, b)
    assert probed_net.training is True
    assert all(m.training for m in probed_net.modules())


@pytest.mark.parametrize("variant", list(VARIANTS) + ["stochastic-depth", "channels_last-bf16"])
def test_all_probes_together_observe_only(variant: str) -> None:
    block = VARIANTS.get(variant, dict(stochastic_depth=0.5) if variant == "stochastic-depth" else {})
    net = make_net(**block)
    def make(n: nn.Module) -> list:
        return [LiveProbes(n), Activations(n), GradientFlow(n, keep_grads=True)]

    assert_observes_only(net, make, fast=variant == "channels_last-bf16")


@pytest.mark.parametrize("probe_name", PROBES)
def test_each_probe_observes_only(probe_name: str) -> None:
    net = make_net(**VARIANTS["bottleneck-post-none-A"])
    net.set_skips([True, False, True])
    assert_observes_only(net, lambda n: [PROBES[probe_name](n)])


# -- values -------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_branch_magnitudes_match_hand_computation(variant: str) -> None:
    net = make_net(**VARIANTS[variant]).eval()
    x, _ = batch()
    with BranchMagnitudes(net) as probe, torch.no_grad():
        net(x)
        net(x[:2])
        parts = manual_parts(net, x[:2])
    res = probe.result()
    assert all(v.shape == (2, len(net.blocks)) and v.dtype == torch.float32 for v in res.values())
    for i, p in enumerate(parts):
        f, s = p["f"].flatten(1), p["s"].flatten(1)
        fn, sn = f.norm(dim=1), s.norm(dim=1)
        cos = torch.stack([torch.dot(a, b) / (a.norm() * b.norm()) for a, b in zip(f, s)])
        torch.testing.assert_close(res["f_norm"][1, i], fn.mean())
        torch.testing.assert_close(res["s_norm"][1, i], sn.mean())
        torch.testing.assert_close(res["ratio"][1, i], fn.mean() / sn.mean())
        torch.testing.assert_close(res["cosine"][1, i], cos.mean())


def test_branch_magnitudes_absent_paths_and_drain() -> None:
    net = make_net(**VARIANTS["basic-post-batch-B"]).eval()
    net.set_skips([False] + [True] * (len(net.blocks) - 1))
    net.set_removed([1])
    x, _ = batch()
    with BranchMagnitudes(net) as probe, torch.no_grad():
        net(x)
        res = probe.drain()
        assert probe.drain()["f_norm"].shape == (0, len(net.blocks))
    assert res["s_norm"][0, 0] == 0 and math.isnan(res["ratio"][0, 0]) and math.isnan(res["cosine"][0, 0])
    assert res["f_norm"][0, 1] == 0 and res["ratio"][0, 1] == 0 and math.isnan(res["cosine"][0, 1])
    assert res["f_norm"][0, 1] == 0 and res["s_norm"][0, 1] > 0
    assert torch.isfinite(res["cosine"][0, 2:]).all()


def channel_stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average channel squared mean and variance, written out the long way."""
    per_channel = t.detach().transpose(0, 1).reshape(t.shape[1], -1).double()  # (C, N*H*W)
    means = per_channel.sum(1) / per_channel.shape[1]
    variances = ((per_channel - means[:, None]) ** 2).sum(1) / per_channel.shape[1]
    return (means**2).mean().float(), variances.mean().float()


@pytest.mark.parametrize("variant", VARIANTS)
def test_signal_prop_matches_hand_computation(variant: str) -> None:
    net = make_net(**VARIANTS[variant])
    net.set_removed([1])
    x, _ = batch()
    with SignalProp(net) as probe, torch.no_grad():
        net(x)
        parts = manual_parts(net, x)
    res = probe.result()
    for i, p in enumerate(parts):
        mean_sq, var = channel_stats(p["out"])
        torch.testing.assert_close(res["mean_sq"][0, i], mean_sq)
        torch.testing.assert_close(res["var"][0, i], var)
        if p["f"] is None:
            assert math.isnan(res["branch_var"][0, i])
        else:
            torch.testing.assert_close(res["branch_var"][0, i], channel_stats(p["f"])[1])
    one_shot = signal_prop(net, x)
    for k in SignalProp.KEYS:
        assert one_shot[k].shape == (len(net.blocks),)
        torch.testing.assert_close(one_shot[k], res[k][0], equal_nan=True)


def independent_split(net: nn.Module, x: torch.Tensor, y: torch.Tensor, i: int) -> tuple:
    """dL/dx at block i's input through the branch, through the shortcut, and in total (plain autograd)."""
    blk = net.blocks[i]
    h = prefix(net, x, i).detach()
    a, b, c = (h.clone().requires_grad_() for _ in range(3))
    s = blk.shortcut(b) if blk.skip else None
    loss = F.cross_entropy(tail(net, blk.post(blk.merge(blk.branch(a), s)), i), y)
    ga, gb = torch.autograd.grad(loss, [a, b], allow_unused=True)
    (gc,) = torch.autograd.grad(F.cross_entropy(tail(net, blk(c), i), y), [c])
    return ga, (torch.zeros_like(gc) if gb is None else gb), gc


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_split_matches_autograd(variant: str) -> None:
    net = make_net(**VARIANTS[variant])
    net.set_skips([i != 1 for i in range(len(net.blocks))])  # block 1 is plain
    x, y = batch()
    with GradientFlow(net, keep_grads=True) as probe:
        F.cross_entropy(net(x), y).backward()
        probe.record()
    res = probe.result()
    for i in range(len(net.blocks)):
        ga, gb, gc = independent_split(net, x, y, i)
        torch.testing.assert_close(ga + gb, gc)
        kept = probe.last_grads[i]
        torch.testing.assert_close(kept["grad_branch"], ga)
        torch.testing.assert_close(kept["grad_total"], gc)
        torch.testing.assert_close(kept["grad_branch"] + kept.get("grad_shortcut", 0), kept["grad_total"])
        torch.testing.assert_close(res["grad_branch"][0, i], ga.norm())
        torch.testing.assert_close(res["grad_shortcut"][0, i], gb.norm())
        torch.testing.assert_close(res["grad_total"][0, i], gc.norm())
    assert "grad_shortcut" not in probe.last_grads[1] and res["grad_shortcut"][0, 1] == 0
    grads = {n: torch.zeros(()) if p.grad is None else p.grad for n, p in net.named_parameters()}
    for j, name in enumerate(probe.param_names):
        torch.testing.assert_close(res["grad_params"][0, j], grads[name].norm())
    for i, blk in enumerate(net.blocks):
        expected = torch.stack([p.grad.norm() ** 2 for p in blk.parameters() if p.grad is not None]).sum().sqrt()
        torch.testing.assert_close(res["grad_block"][0, i], expected)


def test_gradient_flow_ignores_no_grad_and_disabled_steps() -> None:
    net = make_net(**VARIANTS["basic-post-batch-B"])
    x, y = batch()
    with GradientFlow(net) as probe:
        n_module_hooks = len(probe._handles)
        with torch.no_grad():
            out = net(x)
        assert len(probe._handles) == n_module_hooks and not out.requires_grad
        with probe.paused():
            F.cross_entropy(net(x), y).backward()
            probe.record()
        assert probe.result()["grad_total"].shape == (0, len(net.blocks))
        for _ in range(3):  # handles of finished graphs are pruned, so the list stays short
            net.zero_grad()
            F.cross_entropy(net(x), y).backward()
            probe.record()
        assert len(probe._handles) == n_module_hooks
    res = probe.result()
    assert res["grad_params"].shape == (3, len(probe.param_names))
    assert (res["grad_total"] > 0).all() and torch.isfinite(res["grad_block"]).all()


# -- live probes and one-shot helpers ------------------------------------------------------------
def test_live_probes_rows_line_up_and_drain_once() -> None:
    net = make_net(**VARIANTS["basic-pre-none-A"])
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    n = len(net.blocks)
    with LiveProbes(net) as probes:
        for step in range(5):
            probes.enabled = step % 2 == 0
            x, y = batch(seed=step)
            F.cross_entropy(net(x), y).backward()
            probes.record()
            opt.step()
            opt.zero_grad()
            with probes.paused(), torch.no_grad():
                net(x)  # an evaluation forward: not recorded
        readings = probes.drain()
        assert all(v.shape[0] == 0 for v in probes.drain().values())
    assert probes.enabled is True
    expected = {"f_norm", "s_norm", "ratio", "cosine", "mean_sq", "var", "branch_var"}
    expected |= {"grad_branch", "grad_shortcut", "grad_total", "grad_block", "grad_params"}
    assert set(readings) == expected
    for k, v in readings.items():
        assert isinstance(v, np.ndarray) and v.dtype == np.float32
        assert v.shape == ((3, len(probes.param_names)) if k == "grad_params" else (3, n))
    assert np.isfinite(readings["grad_total"]).all() and np.isfinite(readings["var"]).all()


def test_activations_match_blocks_and_cap_channels() -> None:
    net = make_net(**VARIANTS["bottleneck-post-none-A"]).eval()
    net.set_skips([True, False, True])
    x, _ = batch()
    with Activations(net, max_channels=5, blocks=[1, 2]) as probe, torch.no_grad():
        net(x[:3])
        net(x[3:])
        parts = manual_parts(net, x)
    res = probe.drain()
    assert probe.indices == [1, 2] and len(res) == 2
    assert res[0]["s"] is None and res[1]["s"] is not None
    for got, want in zip(res, parts[1:]):
        for k in ("f", "s", "sum", "out"):
            if want[k] is not None and k != "s" or got[k] is not None:
                assert got[k].shape == (4, 5, *want[k].shape[2:])
                torch.testing.assert_close(got[k], want[k][:, :5])
                assert got[k].untyped_storage().nbytes() == got[k].numel() * 4  # a copy, not a view
    assert probe.result()[0]["out"] is None  # drained
    with pytest.raises(ValueError, match="out of range"):
        Activations(net, blocks=[7])


def test_gradient_norms_by_layer_changes_nothing() -> None:
    net = make_net(**VARIANTS["basic-post-batch-B"])
    x, y = batch()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    res = gradient_norms_by_layer(net, x, y)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and net.training
    ref = copy.deepcopy(net)
    loss = F.cross_entropy(ref(x), y)
    loss.backward()
    torch.testing.assert_close(res["loss"], loss.detach())
    for i, blk in enumerate(ref.blocks):
        expected = torch.stack([p.grad.norm() ** 2 for p in blk.parameters()]).sum().sqrt()
        torch.testing.assert_close(res["grad_block"][i], expected)
    assert res["grad_params"].shape == (sum(1 for _ in net.parameters()),)
    plain = gradient_norms_by_layer(build_net(net.cfg.plain_twin()), x, y)
    assert (plain["grad_shortcut"] == 0).all() and (res["grad_shortcut"] > 0).all()


def test_torchvision_resnet18() -> None:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = from_torchvision(resnet18(num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([1, 7])
    ref_net, probed_net = copy.deepcopy(net), copy.deepcopy(net)
    F.cross_entropy(ref_out := ref_net(x), y).backward()
    with LiveProbes(probed_net) as live, Activations(probed_net, max_channels=4, blocks=[0, 7]) as acts:
        F.cross_entropy(out := probed_net(x), y).backward()
        live.record()
    assert torch.equal(out, ref_out)
    for p, q in zip(ref_net.parameters(), probed_net.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert_no_module_hooks(probed_net)
    readings = live.drain()
    assert readings["f_norm"].shape == (1, 8) and readings["grad_total"].shape == (1, 8)
    assert np.isfinite(readings["grad_branch"]).all() and (readings["grad_shortcut"] > 0).all()
    kept = acts.result()
    assert kept[1]["out"].shape == (2, 4, 2, 2)
    assert not any(t.requires_grad for d in kept for t in d.values() if t is not None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_live_probes_never_sync_per_step_on_cuda() -> None:
    net = make_net(**VARIANTS["basic-post-batch-B"]).cuda()
    x, y = (t.cuda() for t in batch())
    with LiveProbes(net) as probes:
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the steps raises
        try:
            for _ in range(3):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = net(x.contiguous(memory_format=torch.channels_last))
                F.cross_entropy(out.float(), y).backward()
                probes.record()
                net.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        readings = probes.drain()
    assert readings["grad_total"].shape == (3, len(net.blocks)) and np.isfinite(readings["var"]).all()
