"""The speed-ups change no result: each fast path against the plain one it replaced.

Instruments attached only on probed steps, ``foreach`` optimizers, channels-last, the lockstep twin,
the two-pass channel statistics and layout-aware branch norms, and the allocator setting.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest
import torch
from datafixtures import channel_problem

from resviz import BlockConfig, NetConfig, TrainConfig, build_net
from resviz.analysis.probes import BranchMagnitudes, SignalProp
from resviz.analysis.probes.forward import channel_var_mean
from resviz.runtime import keep_freed_memory, tune
from resviz.train.records import StepRecord
from resviz.train.trainer import Trainer, build_nets, make_optimizer

NET = NetConfig(depth=8, width=8, input_size=16, num_classes=3)
NET_A = NetConfig(depth=8, width=8, input_size=16, num_classes=3, block=BlockConfig(shortcut="A"))
KEYS = ("loss", "acc", "grad_norm", "param_norm")


def _data(n: int = 96, seed: int = 0) -> SimpleNamespace:
    return channel_problem(n, 32, seed)


def _cfg(**kw: object) -> TrainConfig:
    return TrainConfig(**{"epochs": 2.0, "batch_size": 32, "lr": 0.05, "probe_every": 0, "device": "cpu", **kw})


def _curve(records: list[StepRecord]) -> list[tuple]:
    return [(r.step, *((name, *(getattr(m, k) for k in KEYS)) for name, m in sorted(r.nets.items()))) for r in records]


def _params(nets: dict) -> dict[str, torch.Tensor]:
    return {name: torch.cat([p.detach().flatten() for p in net.parameters()]) for name, net in nets.items()}


def test_instruments_leave_the_loss_curve_bitwise_unchanged() -> None:
    data = _data()
    probed = Trainer(build_nets(NET), data, _cfg(probe_every=2))
    bare = Trainer(build_nets(NET), data, _cfg(), probes=False)
    with_probes, without = list(probed.steps()), list(bare.steps())
    assert sum(bool(r.probes) for r in with_probes) == 3 and not any(r.probes for r in without)
    assert _curve(with_probes) == _curve(without)  # exact equality, every step, every metric
    for name, p in _params(probed.nets).items():
        assert torch.equal(p, _params(bare.nets)[name])


def test_hooks_exist_only_during_the_probed_steps() -> None:
    nets = build_nets(NET)
    seen: list[int] = []  # instrument hooks on block 0's merge at each training forward

    def count_hooks(module: torch.nn.Module, _args: tuple) -> None:
        if module.training:
            seen.append(len(module.merge._forward_hooks) + len(module.branch._forward_pre_hooks))

    own = nets["residual"].blocks[0].register_forward_pre_hook(count_hooks)
    try:
        for rec in Trainer(nets, _data(), _cfg(probe_every=3)).steps():
            for net in nets.values():  # between steps no instrument hook is left anywhere
                assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules() if m is not net.blocks[0])
            assert bool(rec.probes) == (rec.step % 3 == 0)
    finally:
        own.remove()
    assert [n > 0 for n in seen] == [(i + 1) % 3 == 0 for i in range(6)]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_foreach_optimizer_matches_the_per_parameter_loop(optimizer: str) -> None:
    cfg = _cfg(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-3)
    torch.manual_seed(0)
    fast_net = build_net(NET)
    slow_net = build_net(NET)
    slow_net.load_state_dict(fast_net.state_dict())
    fast = make_optimizer(fast_net, cfg)
    slow = make_optimizer(slow_net, cfg)
    assert all(g["foreach"] for g in fast.param_groups)
    for g in slow.param_groups:
        g["foreach"] = False
    x, y = _data().train.tensors
    for i in range(5):
        for net, opt in ((fast_net, fast), (slow_net, slow)):
            loss = torch.nn.functional.cross_entropy(net(x[i * 16 : (i + 1) * 16]), y[i * 16 : (i + 1) * 16])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for a, b in zip(fast_net.parameters(), slow_net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_channels_last_and_nchw_train_alike() -> None:
    data = _data()
    cl = list(Trainer(build_nets(NET), data, _cfg(channels_last=True), probes=False).steps())
    nchw = list(Trainer(build_nets(NET), data, _cfg(channels_last=False), probes=False).steps())
    for a, b in zip(cl, nchw, strict=True):  # different conv kernels: equal up to float rounding
        for name in a.nets:
            assert a.nets[name].loss == pytest.approx(b.nets[name].loss, rel=1e-4, abs=1e-5)


def test_lockstep_twin_equals_training_each_net_alone() -> None:
    data = _data()
    twin = Trainer(build_nets(NET), data, _cfg(probe_every=2))
    together = list(twin.steps())
    alone = build_nets(NET)  # the same seeded initial weights
    solo = {name: list(Trainer({name: net}, data, _cfg(probe_every=2)).steps()) for name, net in alone.items()}
    for k, rec in enumerate(together):
        for name, metrics in rec.nets.items():
            assert {key: getattr(metrics, key) for key in KEYS} == {key: getattr(solo[name][k].nets[name], key) for key in KEYS}
    for name, p in _params(twin.nets).items():
        assert torch.equal(p, _params(alone)[name])


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_two_pass_channel_statistics_match_var_mean(fmt: torch.memory_format) -> None:
    x = (torch.randn(16, 8, 12, 12) * 3.0 + 5.0).contiguous(memory_format=fmt)
    var, mean = channel_var_mean(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_maps_are_measured_without_float_copies_to_the_same_numbers(dtype: torch.dtype) -> None:
    """bf16/fp16 maps (CUDA autocast) are reduced with float32 accumulation straight from their own
    dtype: the readings match those of the same maps upcast to float32 first."""
    torch.manual_seed(0)
    x = (torch.randn(16, 8, 12, 12) * 3.0 + 5.0).to(dtype).contiguous(memory_format=torch.channels_last)
    var, mean = channel_var_mean(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert var.dtype == mean.dtype == torch.float32
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    f = torch.randn(16, 8, 12, 12).to(dtype).contiguous(memory_format=torch.channels_last)
    s = (torch.randn(16, 8, 12, 12) * 4.0 + f.float()).to(dtype).contiguous(memory_format=torch.channels_last)
    low = BranchMagnitudes._measure(f, s)
    ref = BranchMagnitudes._measure(f.float(), s.float())
    for name, a, b in zip(BranchMagnitudes.KEYS, low, ref):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("cfg", [NET, NET_A], ids=["projection-B", "zero-pad-A"])
def test_instrument_readings_do_not_depend_on_memory_layout(cfg: NetConfig) -> None:
    """Channels-last maps are read in their own order (no copy); the numbers match the NCHW ones."""
    torch.manual_seed(0)
    net = build_net(cfg).eval()
    x = torch.randn(8, 3, 16, 16)
    readings = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        net = net.to(memory_format=fmt)
        with torch.no_grad(), BranchMagnitudes(net) as mags, SignalProp(net) as sig:
            net(x.contiguous(memory_format=fmt))
        readings.append({**mags.result(), **sig.result()})
    for key, ref in readings[0].items():
        torch.testing.assert_close(readings[1][key], ref, rtol=1e-5, atol=1e-6, equal_nan=True, msg=key)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_keep_freed_memory_applies_once_and_changes_no_result() -> None:
    data = _data()
    before = _curve(list(Trainer(build_nets(NET), data, _cfg(), probes=False).steps()))
    assert keep_freed_memory() is keep_freed_memory()  # idempotent; True with glibc
    assert tune(keep_freed_memory=True).keep_freed_memory is keep_freed_memory()
    after = _curve(list(Trainer(build_nets(NET), data, _cfg(), probes=False).steps()))
    assert before == after
    assert all(math.isfinite(v) for rec in after for part in rec[1:] for v in part[1:])


def test_divergence_guard_restores_every_tensor_with_foreach_copy() -> None:
    """The guard's single ``_foreach_copy_`` backup covers parameters and buffers of every dtype."""
    data = _data()
    data.train.tensors[0][:] = math.nan  # the first step's loss is NaN; its forward already moved the BN statistics
    nets = build_nets(NET)
    start = {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in nets.items()}
    recs = list(Trainer(nets, data, _cfg(), probes=False).steps())
    assert [r.status for r in recs] == ["diverged"]
    for name, net in nets.items():
        for k, v in net.state_dict().items():
            assert torch.equal(v, start[name][k]), (name, k)


def test_the_trainer_changes_no_process_wide_setting() -> None:
    """Threads, cuDNN's autotuner and the global RNG are the entry point's (resviz.runtime.tune), not the Trainer's."""
    threads, bench = torch.get_num_threads(), torch.backends.cudnn.benchmark
    rng = torch.random.get_rng_state()
    list(Trainer(build_nets(NET), _data(), _cfg(augment=True), probes=False).steps())
    assert torch.get_num_threads() == threads and torch.backends.cudnn.benchmark == bench
    assert torch.equal(torch.random.get_rng_state(), rng)
    applied = tune(threads=threads, cudnn_benchmark=bench)
    assert applied.threads == threads and applied.cudnn_benchmark == bench and applied.keep_freed_memory is None
    assert tune() == type(applied)()  # nothing asked, nothing applied
