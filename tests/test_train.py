"""Trainer: record format, lockstep twins, determinism, divergence handling, schedules, evaluation."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datafixtures import channel_problem
from torch.utils.data import TensorDataset

from resviz import NetConfig, TrainConfig, build_net
from resviz.train.records import NetMetrics, Status, StepRecord
from resviz.train.trainer import (
    Trainer,
    augment_batch,
    build_nets,
    evaluate,
    fit,
    lr_at,
    make_optimizer,
    recalibrate_norms,
    resolve_device,
)

NET = NetConfig(depth=8, width=8, input_size=16, num_classes=3)


def _data(n_train: int = 96, n_test: int = 48, seed: int = 0) -> SimpleNamespace:
    """A learnable 3-class problem: the class sets which channel is brighter."""
    return channel_problem(n_train, n_test, seed)


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=32, lr=0.05, probe_every=0, device="cpu")
    return TrainConfig(**{**base, **kw})


def _finite(obj) -> bool:
    if isinstance(obj, StepRecord):
        return _finite(obj.to_json())
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def test_records_have_the_documented_format():
    data = _data()
    cfg = _cfg(probe_every=2, eval_every=3)
    trainer = Trainer(build_nets(NET), data, cfg)
    recs = list(trainer.steps())
    assert trainer.total_steps == 6 == len(recs) and trainer.steps_per_epoch == 3
    assert all(isinstance(r, StepRecord) for r in recs)
    assert [r.step for r in recs] == list(range(1, 7)) and recs[-1].epoch == 2.0
    assert [r.status for r in recs] == ["running"] * 5 + ["finished"] and trainer.status == "finished"
    assert recs[-1].status is Status.FINISHED
    for r in recs:
        assert set(r.nets) == {"residual", "plain"} and _finite(r)
        assert isinstance(r.nets["plain"], NetMetrics)
        assert {"loss", "acc", "grad_norm", "param_norm"} <= set(r.nets["plain"].as_dict())
        assert r.images_per_s > 0 and r.time_s > 0 and r.lr > 0
    assert [r.step for r in recs if r.nets["residual"].test_acc is not None] == [3, 6]
    probed = [r for r in recs if r.probes]
    assert [r.step for r in probed] == [2, 4, 6]
    readings = probed[0].probes["residual"]
    assert readings["grad_block"].shape == (NET.num_blocks,) and readings["grad_block"].dtype == np.float32
    assert readings["grad_params"].shape == (len(trainer.param_names["residual"]),)
    assert np.isnan(probed[0].probes["plain"]["ratio"]).all()  # no shortcut in the plain twin


def test_twins_see_identical_batches_and_start_identical():
    nets = build_nets(NET)
    assert all(torch.equal(a, b) for a, b in zip(nets["residual"].state_dict().values(), nets["plain"].state_dict().values()))
    assert nets["plain"].skips == (False,) * NET.num_blocks and nets["residual"].skips == (True,) * NET.num_blocks
    seen = {"residual": [], "plain": []}
    for name, net in nets.items():
        net.register_forward_pre_hook(lambda m, a, name=name: seen[name].append(a[0].detach().clone()))
    list(Trainer(nets, _data(), _cfg(augment=True)).steps())
    assert len(seen["plain"]) == len(seen["residual"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(seen["residual"], seen["plain"]))


def test_same_seed_gives_identical_curves_and_other_seed_differs():
    data = _data()

    def curve(seed: int) -> list[float]:
        cfg = _cfg(seed=seed, augment=True)
        net_cfg = NetConfig(depth=8, width=8, input_size=16, num_classes=3, block=NET.block.__class__(stochastic_depth=0.3))
        return [r.nets[k].loss for r in fit(net_cfg, data, cfg).history for k in ("residual", "plain")]

    a, b, c = curve(1), curve(1), curve(2)
    assert a == b and a != c


def test_training_learns_the_toy_problem():
    res = fit(NET, _data(192, 96), _cfg(epochs=6, lr=0.1, schedule="onecycle"), twin=False)
    assert res.status == "finished" and list(res.nets) == ["residual"]
    assert res.final.nets["residual"].test_acc > 0.8


def test_divergence_stops_within_the_step_and_restores_last_good_weights():
    data, cfg = _data(), _cfg(lr=1e6, schedule="constant", epochs=20)
    trainer = Trainer(build_nets(NET), data, cfg)
    last_good, recs = None, []
    for rec in trainer.steps():
        recs.append(rec)
        if rec.status == "running":
            last_good = {n: {k: v.clone() for k, v in net.state_dict().items()} for n, net in trainer.nets.items()}
    final = recs[-1]
    assert trainer.status == final.status == "diverged" and final.step < trainer.total_steps
    assert final.nets == {} and final.diverged and "lower learning rate" in final.message
    assert all(_finite(r) for r in recs)
    for name, net in trainer.nets.items():
        for k, v in net.state_dict().items():
            assert torch.equal(v, last_good[name][k]), k
            assert torch.isfinite(v.float()).all()


def test_lr_schedules():
    total = 100
    const = [lr_at(s, total, _cfg(schedule="constant", lr=0.2)) for s in range(total)]
    cos = [lr_at(s, total, _cfg(schedule="cosine", lr=0.2)) for s in range(total)]
    one = [lr_at(s, total, _cfg(schedule="onecycle", lr=0.2)) for s in range(total)]
    assert const == [0.2] * total
    assert cos[0] == pytest.approx(0.2) and all(a >= b for a, b in zip(cos, cos[1:])) and cos[-1] < 0.001
    peak = int(np.argmax(one))
    assert one[0] == pytest.approx(0.02) and peak == 25 and one[peak] == pytest.approx(0.2) and one[-1] < 0.001


def test_weight_decay_skips_norms_and_biases():
    net = build_net(NET)
    for kind in ("sgd", "adamw"):
        opt = make_optimizer(net, _cfg(optimizer=kind, weight_decay=0.01))
        decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        for name, p in net.named_parameters():
            assert (id(p) in decayed) == (p.ndim > 1), name
        every = make_optimizer(net, _cfg(optimizer=kind, weight_decay=0.01, decay_all=True))  # He et al.'s recipe
        assert [len(g["params"]) for g in every.param_groups if g["weight_decay"] > 0] == [len(list(net.parameters()))]
    assert make_optimizer(net, _cfg(momentum=0.0)).param_groups[0]["nesterov"] is False


def test_evaluate_matches_a_direct_computation_and_restores_mode():
    data = _data()
    net = build_net(NET).train()
    loss, acc = evaluate(net, data.test, batch_size=7)
    assert net.training
    net.eval()
    x, y = data.test.tensors
    with torch.no_grad():
        logits = net(x)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())


def test_recalibrated_norms_normalise_the_images_as_their_affine_parameters_say():
    from resviz import BlockConfig

    data = _data(n_train=192)
    net = build_net(NetConfig(depth=8, width=8, input_size=16, num_classes=3, block=BlockConfig(stochastic_depth=0.5)))
    fit({"residual": net}, data, _cfg(epochs=1, augment=True))  # running statistics: moving averages, augmented batches
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:  # far from what the images give, so that the test fails if nothing is re-estimated
            m.running_mean.fill_(3.0)
            m.running_var.fill_(9.0)
            m.weight.uniform_(0.5, 2.0)
            m.bias.uniform_(-1.0, 1.0)
            m.momentum = 0.3
    weights = {k: v.clone() for k, v in net.named_parameters()}
    net.train()
    x = data.train.tensors[0]
    assert recalibrate_norms(net, x, batch_size=50) == len(norms)  # 4 batches, the last one short
    assert net.training and all(m.momentum == 0.3 and m.training for m in norms)
    assert all(torch.equal(v, weights[k]) for k, v in net.named_parameters())

    def eval_outputs() -> dict:
        outs = {}
        hooks = [m.register_forward_hook(lambda m, i, o: outs.__setitem__(m, o.transpose(0, 1).flatten(1)))
                 for m in norms]
        net.eval()
        with torch.no_grad():
            first = net(x)
            torch.testing.assert_close(net(x), first)  # stochastic depth stays off in eval mode
        for h in hooks:
            h.remove()
        assert len(outs) == len(norms)
        return outs  # in the order the forward pass ran the norms

    # eval mode on the same images: per-channel mean ~ beta, std ~ |gamma|. Not exactly: the statistics are averages
    # of the batches' statistics, and each norm's were taken while the norms before it used batch statistics (as in
    # precise BN), so its inputs in eval mode differ a little from those it was estimated on
    for m, o in eval_outputs().items():
        torch.testing.assert_close(o.mean(1), m.bias, atol=0.1, rtol=0)  # before: off by |gamma| >= 0.5
        torch.testing.assert_close(o.var(1, unbiased=False).sqrt(), m.weight.abs(), atol=0.1, rtol=0.1)
    recalibrate_norms(net, x, batch_size=len(x))  # one batch: the first norm's statistics are those of its inputs
    m, o = next(iter(eval_outputs().items()))
    torch.testing.assert_close(o.mean(1), m.bias, atol=1e-4, rtol=0)
    n = o.shape[1]  # the running variance is the unbiased one
    torch.testing.assert_close(o.var(1, unbiased=False).sqrt(), m.weight.abs() * ((n - 1) / n) ** 0.5, atol=1e-4, rtol=1e-3)
    assert recalibrate_norms(torch.nn.Linear(3, 2), x) == 0  # nothing to recalibrate


def test_augment_is_a_seeded_crop_and_flip():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    a = augment_batch(x, torch.Generator().manual_seed(0), 0)
    assert all(torch.equal(a[i], x[i]) or torch.equal(a[i], x[i].flip(-1)) for i in range(2))
    b = augment_batch(x, torch.Generator().manual_seed(3), 2)
    assert b.shape == x.shape and torch.equal(b, augment_batch(x, torch.Generator().manual_seed(3), 2))
    # every output row is a (possibly shifted, flipped, zero-padded) row of the input image
    rows = {tuple(r.tolist()) for r in x.reshape(-1, 6)}
    for r in b.reshape(-1, 6):
        vals = [v for v in r.tolist() if v != 0]
        assert not vals or any(set(vals) <= set(row) for row in rows)


def test_resolve_device_and_config_checks():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="momentum"):
        TrainConfig(momentum=1.0)
    with pytest.raises(ValueError, match="empty"):
        empty = TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long))
        Trainer(build_net(NET), SimpleNamespace(train=empty, test=empty), _cfg())


def test_max_steps_and_small_datasets():
    t = Trainer(build_net(NET), _data(20, 8), _cfg(batch_size=64, max_steps=3, epochs=10))
    assert t.batch_size == 20 and t.steps_per_epoch == 1 and t.total_steps == 3
    recs = list(t.steps())
    assert len(recs) == 3 and list(recs[0].nets) == ["net"]


def test_closing_the_generator_marks_stopped_and_removes_hooks():
    nets = build_nets(NET)
    trainer = Trainer(nets, _data(), _cfg(probe_every=1))
    steps = trainer.steps()
    next(steps)
    steps.close()
    assert trainer.status == "stopped"
    for net in nets.values():
        assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in net.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_training_runs_and_is_finite():
    res = fit(NET, _data(), _cfg(device="cuda", probe_every=2))
    assert res.status == "finished" and all(_finite(r) for r in res.history)
    assert next(res.nets["residual"].parameters()).device.type == "cuda"


def test_training_leaves_the_global_rng_alone_and_stochastic_depth_is_seeded():
    """Stochastic depth draws from the Trainer's own generator: the same masks for the same seed, whatever
    the global RNG holds, and the global RNG is where it was."""
    data = _data()
    net_cfg = NetConfig(depth=8, width=8, input_size=16, num_classes=3, block=NET.block.__class__(stochastic_depth=0.5))
    runs = []
    for global_seed in (0, 123):
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        runs.append([r.nets["residual"].loss for r in fit(net_cfg, data, _cfg(seed=4)).history])
        assert torch.equal(torch.random.get_rng_state(), before)
    assert runs[0] == runs[1]
    nets = build_nets(net_cfg, seed=4)
    assert all(getattr(m, "drop_generator", None) is None for n in nets.values() for m in n.modules())


def test_fit_result_final_is_the_last_evaluated_record():
    res = fit(NET, _data(), _cfg(eval_every=4, epochs=2))  # steps 1..6, evaluated at 4 and 6
    assert res.final is res.history[-1] and res.final.evaluated
    short = fit(NET, _data(), _cfg(eval_every=4, epochs=2, max_steps=3))  # evaluated at its last step only
    assert short.final.step == 3


def test_curves_are_built_from_record_fields_and_keep_each_series_on_its_own_steps():
    from resviz.train.records import curves, history_of, plot_table

    def rec(step: int, **test) -> StepRecord:
        m = NetMetrics(loss=1.0 / step, acc=0.5, grad_norm=1.0, param_norm=2.0, **test)
        return StepRecord(step=step, total_steps=3, epoch=step / 3, lr=0.1, images_per_s=10.0, time_s=step,
                          status=Status.RUNNING, nets={"residual": m})

    recs = [rec(1, test_acc=0.4), rec(2), rec(3, test_loss=0.7, test_acc=0.6)]  # step 1: test loss not finite
    found = {(c.net, c.metric): c for c in curves(history_of(recs))}
    assert found["residual", "loss"].steps.tolist() == [1, 2, 3] and found["residual", "loss"].label == "residual/loss"
    assert found["residual", "test_loss"].steps.tolist() == [3] and found["", "lr"].label == "lr"
    table = plot_table(found.values(), {"residual": "with skips"})
    assert set(table) == {"with skips"} and table["with skips"]["test_step"].tolist() == [1, 3]
    assert table["with skips"]["test_loss_step"].tolist() == [3]
    assert table["with skips"]["test_loss"].tolist() == pytest.approx([0.7])


def test_training_modules_import_one_way():
    """trainer -> loops (eager, cuda_graphs) -> state -> records; nothing below imports what is above it."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "resviz" / "train"
    above = {"state": {"trainer", "loops", "cuda_graphs", "distributed"}, "loops": {"trainer", "cuda_graphs"},
             "cuda_graphs": {"trainer"}, "records": {"trainer", "loops", "cuda_graphs", "state"}}
    for name, forbidden in above.items():
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {n.module.rsplit(".", 1)[-1] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & forbidden, (name, imported & forbidden)
        private = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("resviz")
                   for a in n.names if a.name.startswith("_")]
        assert not private, (name, private)
