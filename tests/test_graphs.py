"""The graph loop (resviz.train.cuda_graphs): the same training as the eager Trainer, synced once per interval.

The CPU tests run the loop in "static" mode (the step function that CUDA captures, run eagerly); the
CUDA tests capture it for real and run only where a GPU is present.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datafixtures import channel_problem

from resviz import NetConfig, TrainConfig
from resviz.train.cuda_graphs import MAX_INTERVAL, WARMUP, sgd_step
from resviz.train.distributed import DataParallel, DistributedTrainer
from resviz.train.records import StepRecord
from resviz.train.trainer import Trainer, build_nets, make_optimizer

NET = NetConfig(depth=8, width=8, input_size=16, num_classes=3)
CUDA = torch.cuda.is_available()


def _data(n: int = 192, seed: int = 0) -> SimpleNamespace:
    return channel_problem(n, 64, seed)


def _cfg(**kw: object) -> TrainConfig:
    base = {"epochs": 3.0, "batch_size": 32, "lr": 0.05, "probe_every": 3, "eval_every": 5, "device": "cpu"}
    return TrainConfig(**{**base, **kw})


def _run(mode: str, cfg: TrainConfig, data: SimpleNamespace | None = None, twin: bool = True) -> tuple[Trainer, list[StepRecord]]:
    trainer = Trainer(build_nets(NET, twin=twin, seed=cfg.seed), data or _data(), cfg, graphs=mode)
    return trainer, list(trainer.steps())


def _assert_same_records(a: list[StepRecord], b: list[StepRecord], rtol: float, atol: float) -> None:
    assert [r.step for r in a] == [r.step for r in b]
    assert [r.status for r in a] == [r.status for r in b]
    for ra, rb in zip(a, b):
        assert ra.to_json().keys() == rb.to_json().keys() and bool(ra.probes) == bool(rb.probes), ra.step
        assert ra.lr == rb.lr and ra.nets.keys() == rb.nets.keys(), ra.step
        for name, metrics in ra.nets.items():
            m, other = metrics.as_dict(), rb.nets[name].as_dict()
            assert m.keys() == other.keys(), (ra.step, name)
            for key, v in m.items():
                assert math.isclose(v, other[key], rel_tol=rtol, abs_tol=atol), (ra.step, name, key)
        for name, readings in ra.probes.items():
            assert readings.keys() == rb.probes[name].keys()
            for key, v in readings.items():
                np.testing.assert_allclose(rb.probes[name][key], v, rtol=rtol, atol=atol, err_msg=f"{ra.step} {key}")


# -- sgd_step ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum,wd", [(0.9, 5e-4), (0.9, 0.0), (0.0, 5e-4), (0.5, 1e-2)])
def test_sgd_step_matches_torch_sgd(momentum: float, wd: float) -> None:
    ref, ours = build_nets(NET, twin=False, seed=0)["residual"], build_nets(NET, twin=False, seed=0)["residual"]
    cfg = _cfg(momentum=momentum, weight_decay=wd)
    opts = {id(n): make_optimizer(n, cfg) for n in (ref, ours)}
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    for step in range(5):
        lr = 0.1 / (step + 1)
        for net in (ref, ours):
            opt = opts[id(net)]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            for group in opt.param_groups:
                group["lr"] = lr
            if net is ref or step == 0:  # the first step creates the momentum buffers
                opt.step()
            else:
                sgd_step(opt, torch.tensor(lr))
        for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)


def test_sgd_step_needs_momentum_buffers() -> None:
    net = build_nets(NET, twin=False)["residual"]
    opt = make_optimizer(net, _cfg())
    torch.nn.functional.cross_entropy(net(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 0])).backward()
    with pytest.raises(ValueError, match="momentum buffers"):
        sgd_step(opt, torch.tensor(0.1))


# -- the loop, static mode (CPU) ----------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"probe_every": 0}, {"augment": True, "label_smoothing": 0.1, "eval_every": 0},
                                {"probe_every": 4, "channels_last": False, "schedule": "cosine"}])
def test_static_loop_gives_the_eager_trainers_records(kw: dict) -> None:
    cfg = _cfg(**kw)
    eager_t, eager = _run("off", cfg)
    static_t, static = _run("static", cfg)
    assert eager_t.graph_mode == "off" and static_t.graph_mode == "static"
    assert static[-1].status == "finished" and len(static) == static_t.total_steps
    # sgd_step rounds p - lr * d differently from torch's fused update (by one float32 ulp). Right after
    # the warm-up the records agree closely (a wrong batch, lr or step would not); later steps drift
    # apart as a few steps amplify the rounding, most in the plain twin.
    _assert_same_records(eager[: WARMUP + 2], static[: WARMUP + 2], rtol=1e-4, atol=1e-5)
    _assert_same_records(eager, static, rtol=2e-2, atol=2e-3)
    assert sum(bool(r.probes) for r in static) == (static_t.total_steps // cfg.probe_every if cfg.probe_every else 0)
    evaluated = [sum(r.nets["plain"].test_acc is not None for r in recs) for recs in (static, eager)]
    assert evaluated[0] == evaluated[1]
    for a, b in zip(eager_t.nets.values(), static_t.nets.values()):
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(vb, va, rtol=2e-2, atol=2e-3, msg=k)


def test_static_loop_syncs_once_per_interval() -> None:
    """Records of one interval are computed before the first of them is yielded (one host copy)."""
    cfg = _cfg(probe_every=0, eval_every=10**6, epochs=8.0)
    trainer = Trainer(build_nets(NET), _data(), cfg, graphs="static")
    steps = trainer.steps()
    assert [next(steps).step for _ in range(WARMUP)] == list(range(1, WARMUP + 1))  # eager warm-up steps
    assert trainer.step == WARMUP
    # Intervals end at multiples of MAX_INTERVAL; an interval is reported once the next step is queued.
    rec = next(steps)
    assert rec.step == WARMUP + 1 and trainer.step == MAX_INTERVAL + 1
    for step in range(WARMUP + 2, MAX_INTERVAL + 1):
        assert next(steps).step == step and trainer.step == MAX_INTERVAL + 1
    assert next(steps).step == MAX_INTERVAL + 1 and trainer.step == 2 * MAX_INTERVAL + 1
    steps.close()
    assert trainer.status == "stopped"


def _first_step_with(sample: int, cfg: TrainConfig, n: int) -> int:
    """The 1-based step whose batch first holds ``sample`` (the Trainer's own permutation)."""
    trainer = Trainer(build_nets(NET), _data(n), cfg, graphs="off")
    for step, idx in enumerate(trainer.batch_indices(), start=1):
        if sample in idx.tolist():
            return step
    raise AssertionError("sample never drawn")


def test_static_loop_divergence_restores_the_start_of_the_interval() -> None:
    cfg = _cfg(probe_every=4, eval_every=10**6, epochs=6.0, schedule="constant")
    n = 192
    # A NaN image makes the loss of the step that draws it NaN; pick one drawn inside an interval.
    sample, bad = next((i, s) for i in range(n) if (s := _first_step_with(i, cfg, n)) > WARMUP + 1 and (s - 1) % 4 != 0)
    data = _data(n)
    data.train.tensors[0][sample] = math.nan
    trainer, recs = _run("static", cfg, data)
    final = recs[-1]
    assert final.status == trainer.status == "diverged" and final.step == bad and final.nets == {}
    assert [r.step for r in recs] == list(range(1, bad + 1))
    assert all(all(math.isfinite(v) for m in r.nets.values() for v in m.as_dict().values()) for r in recs[:-1])
    start = max(WARMUP + 1, (bad - 1) // 4 * 4 + 1)  # intervals end at probe steps (multiples of 4)
    assert f"restored the weights from before step {start}, the last checked state" in final.message
    # the same run stopped just before that interval holds exactly the restored state
    ref, _ = _run("static", TrainConfig(**{**cfg.to_dict(), "max_steps": start - 1}), data)
    assert ref.step == start - 1
    for (name, net), other in zip(trainer.nets.items(), ref.nets.values()):
        for (k, v), w in zip(net.state_dict().items(), other.state_dict().values()):
            assert torch.equal(v, w), (name, k)


def test_graphs_fall_back_with_a_reason() -> None:
    trainer, recs = _run("auto", _cfg(epochs=1.0))
    assert trainer.graph_mode == "off" and "CUDA" in trainer.graph_note and recs[-1].status == "finished"
    trainer, _ = _run("static", _cfg(optimizer="adamw", epochs=1.0))
    assert trainer.graph_mode == "off" and "adamw" in trainer.graph_note
    assert DistributedTrainer.supports_graphs is False and DataParallel.supports_graphs is False
    with pytest.raises(ValueError, match="graphs"):
        Trainer(build_nets(NET), _data(), _cfg(), graphs="yes")


# -- CUDA ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_loop_matches_the_eager_loop() -> None:
    cfg = _cfg(device="cuda", epochs=4.0, augment=True)
    eager_t, eager = _run("off", cfg)
    graph_t, graph = _run("auto", cfg)
    assert graph_t.graph_mode == "cuda", graph_t.graph_note
    assert eager_t.graph_mode == "off"
    # bf16 kernels, identical in both loops; cuDNN's backward may sum in another order from run to run
    _assert_same_records(eager[: WARMUP + 8], graph[: WARMUP + 8], rtol=2e-2, atol=2e-2)
    a, b = eager[-1].nets["residual"], graph[-1].nets["residual"]
    assert abs(a.loss - b.loss) < 0.1 and abs(a.test_acc - b.test_acc) < 0.1


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_loop_divergence_and_adamw_fallback() -> None:
    cfg = _cfg(device="cuda", probe_every=4, eval_every=10**6, epochs=6.0)
    sample, bad = next((i, s) for i in range(192) if (s := _first_step_with(i, _cfg(probe_every=4, epochs=6.0), 192)) > WARMUP + 1)
    data = _data(192)
    data.train.tensors[0][sample] = math.nan
    trainer, recs = _run("auto", cfg, data)
    assert trainer.graph_mode == "cuda" and recs[-1].status == "diverged" and recs[-1].step == bad
    for net in trainer.nets.values():
        assert all(torch.isfinite(v.float()).all() for v in net.state_dict().values())
    trainer, recs = _run("auto", _cfg(device="cuda", optimizer="adamw", epochs=2.0))
    assert trainer.graph_mode == "off" and "adamw" in trainer.graph_note and recs[-1].status == "finished"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_loop_syncs_the_host_once_per_interval() -> None:
    import warnings

    cfg = _cfg(device="cuda", probe_every=5, eval_every=10**6, epochs=12.0)  # 72 steps
    trainer = Trainer(build_nets(NET), _data(), cfg)
    steps = trainer.steps()
    while next(steps).step < 5:  # warm-up, capture and the first interval
        pass
    assert trainer.graph_mode == "cuda", trainer.graph_note
    torch.cuda.set_sync_debug_mode("warn")  # every synchronizing call warns
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [next(steps) for _ in range(15)]  # steps 6..20: three intervals
    finally:
        torch.cuda.set_sync_debug_mode(0)
    steps.close()
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert [r.step for r in got] == list(range(6, 21)) and sum(bool(r.probes) for r in got) == 3
    assert len(syncs) <= 3, [str(w.message) for w in syncs]  # at most one per interval (an event wait may not count)
