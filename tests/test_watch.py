"""resviz.watch in a user's own training loop: bit-identical training, typed records, clean exit, TensorBoard."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resviz
from resviz.analysis.watch import MergeReading, WatchRecord


class Block(nn.Module):
    """A user's residual block, written the torchvision way (``out + identity`` in the forward)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8, 8), Block(8, 16, 2), Block(16, 16))
        self.drop, self.fc = nn.Dropout(0.2), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.blocks(torch.relu(self.stem(x))).mean((2, 3))))


def data(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def train(model: nn.Module, batches: list, w: resviz.Watch | None = None) -> list[tuple[torch.Tensor, list]]:
    """The user's loop: SGD with momentum; returns each step's loss and gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
        if w is not None:
            w.step()
    return out


def test_watched_training_is_bit_identical_and_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    model = Net().train()
    twin = copy.deepcopy(model)
    keys, forward_before, example = set(model.state_dict()), model.forward, torch.randn(1, 3, 16, 16)
    torch.manual_seed(1)  # dropout draws the same masks in both runs
    with resviz.watch(model, example, every=2) as w:
        watched = train(model, data(), w)
    torch.manual_seed(1)
    plain = train(twin, data())
    for (l0, g0), (l1, g1) in zip(watched, plain, strict=True):
        assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    assert "forward" not in model.__dict__ and model.forward == forward_before and hooks(model) == 0
    assert set(model.state_dict()) == keys and not any("merge" in n for n, _ in model.named_modules())
    assert [r.step for r in w.records] == [0, 2] and w.steps == 4
    rec = w.records[0]
    assert isinstance(rec, WatchRecord) and all(isinstance(m, MergeReading) for m in rec.merges)
    assert [m.shortcut for m in rec.merges] == ["identity", "projection", "identity"]
    assert [m.name for m in rec.merges] == ["blocks.0.merge", "blocks.1.merge", "blocks.2.merge"]
    with pytest.raises(AttributeError):
        rec.step = 3  # frozen


def test_readings_match_the_unwatched_model_measured_by_hand() -> None:
    torch.manual_seed(0)
    model = Net().train()
    twin = copy.deepcopy(model)
    x, y = data(1)[0]
    taken: dict[str, torch.Tensor] = {}
    twin.blocks[0].bn2.register_forward_hook(lambda m, i, o: taken.update(f=o.detach()))  # returns None: output kept
    twin.blocks[0].register_forward_pre_hook(lambda m, a: (a[0].retain_grad(), taken.update(x=a[0]))[1])
    torch.manual_seed(1)
    F.cross_entropy(twin(x), y).backward()
    torch.manual_seed(1)
    with resviz.watch(model, x[:1]) as w:
        F.cross_entropy(model(x), y).backward()
        rec = w.step()
    first = rec.merges[0]
    f_norm = taken["f"].flatten(1).norm(dim=1).mean().item()
    s_norm = taken["x"].detach().flatten(1).norm(dim=1).mean().item()
    assert first.f_norm == pytest.approx(f_norm, rel=1e-5) and first.s_norm == pytest.approx(s_norm, rel=1e-5)
    assert first.ratio == pytest.approx(f_norm / s_norm, rel=1e-5)
    assert first.grad_total == pytest.approx(taken["x"].grad.norm().item(), rel=1e-5)
    assert first.grad_branch > 0 and first.grad_shortcut > 0
    assert all(math.isfinite(getattr(m, k)) for m in rec.merges for k in ("var", "mean_sq", "branch_var", "grad_block"))


def test_eval_forwards_run_unwatched_and_only_recorded_steps_measure() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    with resviz.watch(model, x[:1], every=3) as w:
        assert not model.training  # entering traces in training mode and restores the mode
        with torch.no_grad():
            assert torch.equal(model(x), ref)
        model.train()
        assert w.step() is not None  # step 0: recorded, but it saw no training forward: NaN readings
        assert math.isnan(w.records[0].merges[0].f_norm)
        model(x)
        assert w.step() is None and len(w.records) == 1  # step 1 is not recorded


def test_hooks_detach_also_when_the_body_raises() -> None:
    model = Net().train()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(RuntimeError, match="boom"), resviz.watch(model, x[:1]) as w:
        F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
        assert hooks(w.graph) > 0 and "forward" in model.__dict__
        raise RuntimeError("boom")
    assert hooks(model) == 0 and hooks(w.graph) == 0 and "forward" not in model.__dict__
    with pytest.raises(RuntimeError, match="outside"):
        w.step()
    with resviz.watch(model, x[:1]) as again:  # the same model can be watched again
        F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
        assert again.step().merges[0].grad_total > 0
    assert hooks(model) == 0 and hooks(again.graph) == 0


def test_a_model_without_skip_connections_is_refused_and_untouched() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ValueError, match="no skip connections found"), resviz.watch(plain, torch.randn(1, 3, 8, 8)):
        pass
    assert "forward" not in plain.__dict__ and hooks(plain) == 0
    with pytest.raises(ValueError, match="every"):
        resviz.watch(Net(), torch.randn(1, 3, 16, 16), every=0)


def test_tensorboard_event_file_holds_every_merge_scalar(tmp_path) -> None:
    tb = pytest.importorskip("torch.utils.tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = Net().train()
    writer = tb.SummaryWriter(str(tmp_path))
    with resviz.watch(model, torch.randn(1, 3, 16, 16), every=2, writer=writer, histograms=True) as w:
        train(model, data(3), w)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    names = [m.name for m in w.records[0].merges]
    wanted = {f"resviz/{k}/{n}" for k in ("ratio", "grad_branch", "grad_shortcut", "var") for n in names}
    assert wanted <= set(acc.Tags()["scalars"])
    assert "resviz/ratio" in acc.Tags()["histograms"]
    for i, name in enumerate(names):
        events = acc.Scalars(f"resviz/ratio/{name}")
        assert [e.step for e in events] == [0, 2]
        assert [e.value for e in events] == pytest.approx([r.merges[i].ratio for r in w.records], rel=1e-6)


def test_torchvision_resnet18_trains_bit_identically_under_watch() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()  # in-place ReLUs, ``out += identity``
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    with resviz.watch(model, batches[0][0][:1]) as w:
        watched = train(model, batches, w)
    plain = train(twin, batches)
    for (l0, g0), (l1, g1) in zip(watched, plain, strict=True):
        assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert [r.step for r in w.records] == [0, 1] and len(w.records[0].merges) == 8
    assert [m.shortcut for m in w.records[0].merges].count("projection") == 3
    assert all(math.isfinite(v) and v > 0 for r in w.records for v in r.values("grad_shortcut"))
