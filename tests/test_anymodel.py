"""resviz.anymodel: external models prepared for the app, their twins, init statistics, sizes, presets."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from resviz import anymodel, plots
from resviz.anymodel import SourceError, TraceError
from resviz.nn.discovery import MergeInfo, ResidualMap

timm = pytest.importorskip("timm")

RESIDUAL_FILE = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.norm(self.conv(x)))


def build_model(num_classes=5):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(8), Block(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow
            return self.conv(x).flatten(1)
        return x.flatten(1)


def make_branchy():
    return Branchy()
'''


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text(RESIDUAL_FILE)
    monkeypatch.setenv("RESVIZ_MODEL_DIRS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached weights anywhere
    return tmp_path


def test_torchvision_resnet18_random_weights_is_residualized_and_identical(model_dir) -> None:
    p = anymodel.prepare("torchvision:resnet18", input_size=64)
    assert "random weights" in p.external.note and p.external.weights == "random initialisation"
    assert len(p.residual_map) == 8 and p.residual_map.counts() == {"identity": 5, "projection": 3}
    assert p.info.dataset == "imagenet" and len(p.info.classes) == 1000 and p.info.classes[0] == "tench"
    assert p.info.input_size == 64 and p.info.channels == 3 and p.info.resize_size == 73
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(p.net(x), p.external.model(x))


def test_alexnet_has_no_merges_but_runs(model_dir) -> None:
    p = anymodel.prepare("torchvision:alexnet", input_size=64)
    assert len(p.residual_map) == 0
    with torch.no_grad():
        assert p.net(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match="no skip connections found"):
        anymodel.twins(p.external.model, torch.randn(1, 3, 64, 64))


def test_allowed_file_is_built_and_its_merges_found(model_dir) -> None:
    p = anymodel.prepare(f"file:{model_dir / 'mine.py'}:build_model", input_size=16)
    assert len(p.residual_map) == 2 and p.residual_map.counts()["identity"] == 2
    assert p.info.classes == tuple(f"class {i}" for i in range(5)) and p.info.dataset == "unknown"


def test_refusals_are_messages(model_dir, tmp_path) -> None:
    with pytest.raises(SourceError, match="more than this server allows"):
        anymodel.prepare("torchvision:resnet18", max_params=1000)
    with pytest.raises(TraceError, match=r"Branchy\.forward.*control flow"):
        anymodel.prepare(f"file:{model_dir / 'mine.py'}:make_branchy", input_size=8)
    outside = tmp_path.parent / "elsewhere.py"
    with pytest.raises(SourceError, match="not in a folder"):
        anymodel.prepare(f"file:{outside}:build_model")
    with pytest.raises(SourceError, match="fails on a 3x8x8 image"):
        anymodel.prepare("timm:vit_tiny_patch16_224", input_size=8)


def test_uploaded_weights_are_checked_key_by_key(model_dir) -> None:
    from safetensors.torch import save

    spec = f"file:{model_dir / 'mine.py'}:build_model"
    torch.manual_seed(3)
    good = {k: torch.randn_like(v) if v.is_floating_point() else v
            for k, v in anymodel.prepare(spec, input_size=16).external.model.state_dict().items()}
    state = anymodel.load_weights(save(good), "w.safetensors")
    p = anymodel.prepare(spec, input_size=16, state=state)
    assert p.external.weights == "uploaded weights"
    assert torch.equal(p.net.state_dict()["5.weight"], good["5.weight"])
    buf = io.BytesIO()
    torch.save({"state_dict": good}, buf)
    assert set(anymodel.load_weights(buf.getvalue(), "w.pt")) == set(good)
    bad = {k: v for k, v in good.items() if not k.startswith("5.")}
    with pytest.raises(SourceError, match="do not fit.*2 missing"):
        anymodel.prepare(spec, input_size=16, state=bad)
    with pytest.raises(SourceError, match="cannot be read"):
        anymodel.load_weights(b"not weights", "w.safetensors")
    with pytest.raises(SourceError, match="upload weights as"):
        anymodel.load_weights(b"", "w.py")


def _resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()  # (timm's zero-initialises each branch's last norm)


def test_twins_share_weights_and_differ_only_in_skips() -> None:
    model = _resnet18()
    x = torch.randn(2, 3, 32, 32)
    t = anymodel.twins(model, x[:1])
    assert t["plain"].skips == (False,) * 8 and t["residual"].skips == (True,) * 8
    sd_r, sd_p = t["residual"].state_dict(), t["plain"].state_dict()
    assert all(torch.equal(sd_r[k], sd_p[k]) for k in sd_r)
    from resviz.nn.merge import junctions

    for twin in t.values():  # each twin's blocks own its own parameters, not the other's or the model's
        own = {id(p) for p in twin.parameters()}
        assert all(id(p) in own for j in junctions(twin) for p in j.parameters())
    with torch.no_grad():
        assert torch.equal(t["residual"](x), model(x)) and not torch.equal(t["plain"](x), model(x))
        t["plain"].set_skips(True)
        assert torch.equal(t["plain"](x), model(x))


def test_init_comparison_measures_every_merge_of_both() -> None:
    model = _resnet18()
    net = anymodel.residualize_any(model, torch.zeros(1, 3, 32, 32)).eval()
    net.set_skips([True, False] * 4)  # another session's lesion: the copies start untouched
    stats = anymodel.init_comparison(net, (3, 32, 32), 4)
    assert net.skips == (True, False) * 4
    assert stats["meta"]["batch_size"] == anymodel.MAX_BATCH
    for name in ("residual", "plain"):
        for key in ("mean_sq", "var", "grad_block", "grad_total"):
            assert stats[name][key].shape == (8,), (name, key)
        assert np.isfinite(stats[name]["grad_block"]).all() and (stats[name]["grad_block"] > 0).all()
    assert not np.allclose(stats["residual"]["var"], stats["plain"]["var"])
    assert not model.training and not net.training  # neither was touched


def test_costly_models_are_measured_at_a_smaller_input_when_they_accept_one() -> None:
    net = anymodel.residualize_any(_resnet18(), torch.zeros(1, 3, 224, 224))
    macs = anymodel.count_macs(net, (3, 224, 224))
    assert anymodel.measure_shape(net, (3, 224, 224), macs) == ((3, 96, 96), anymodel.count_macs(net, (3, 96, 96)))
    assert anymodel.measure_shape(net, (3, 32, 32), 10**6) == ((3, 32, 32), 10**6)
    vit = anymodel.residualize_any(timm.create_model("vit_tiny_patch16_224"), torch.zeros(1, 3, 224, 224))
    assert anymodel.measure_shape(vit, (3, 224, 224), 10**10) == ((3, 224, 224), 10**10)  # its patch grid is fixed


def test_count_macs_matches_hand_count() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    assert anymodel.count_macs(model, (3, 16, 16)) == 16 * 16 * 8 * 3 * 9 + 8 * 16 * 16 * 10
    assert anymodel.count_params(model) == 8 * 27 + 8 + 2048 * 10 + 10


def _info(i: int, shape: tuple[int, ...], shortcut: str = "identity") -> MergeInfo:
    return MergeInfo(index=i, name=f"m{i}", owner="", fork="x", branch=("a",), shortcut_modules=(), shortcut=shortcut,
                     shape=shape)


def test_merge_groups_follow_shapes_and_split_long_runs() -> None:
    rmap = ResidualMap(tuple(_info(i, (1, 64 if i < 2 else 128, 8, 8)) for i in range(4)))
    assert anymodel.merge_groups(rmap) == [("group 1 (8x8, 64 ch)", [0, 1]), ("group 2 (8x8, 128 ch)", [2, 3])]
    tokens = ResidualMap(tuple(_info(i, (1, 197, 192)) for i in range(24)))
    groups = anymodel.merge_groups(tokens)
    assert [g[1] for g in groups] == [list(range(12)), list(range(12, 24))]
    assert [g[0] for g in groups] == ["group 1 (197 tokens x 192, merges 0-11)", "group 2 (197 tokens x 192, merges 12-23)"]
    assert anymodel.merge_channels(tokens[0]) == 192 and anymodel.merge_channels(rmap[2]) == 128
    rows = anymodel.merge_rows(rmap, skips=(True, False, True, True), removed=(3,))
    assert [r["skip"] for r in rows] == [True, False, True, True] and [r["removed"] for r in rows] == [False] * 3 + [True]


def test_merge_strip_draws_one_cell_per_merge_and_says_when_there_are_none() -> None:
    rows = anymodel.merge_rows(ResidualMap(tuple(_info(i, (1, 8, 4, 4), "projection" if i == 2 else "identity")
                                                 for i in range(60))), skips=[i != 5 for i in range(60)])
    fig = plots.merge_strip(rows)
    heat = fig.data[0]
    assert list(heat.x) == list(range(60)) and heat.z[0][2] == 1 and heat.z[0][5] == 2 and heat.z[0][0] == 0
    assert "m5" in heat.customdata[0][5]
    empty = plots.merge_strip([])
    assert any("no skip connections found" in a.text for a in empty.layout.annotations)


@pytest.mark.parametrize(("key", "merges"), [("tiny-vit", 8), ("small-convnext", 5)])
def test_presets_train_next_to_their_twins(key: str, merges: int) -> None:
    nets = anymodel.train_nets(key, num_classes=6, channels=1, seed=0)
    assert set(nets) == {"residual", "plain"} and all(n.training for n in nets.values())
    assert len(nets["residual"].residual_map) == merges and nets["plain"].skips == (False,) * merges
    x = torch.randn(2, 1, 32, 32)
    out = nets["residual"](x)
    assert out.shape == (2, 6)
    out.sum().backward()
    assert all(p.grad is not None for p in nets["residual"].parameters() if p.requires_grad)
    original = anymodel.build_preset(key, num_classes=6, channels=1, seed=0)
    names = anymodel.original_state_dict(nets["plain"])  # timm's ViT keeps "blocks" at the top: rooted
    assert nets["plain"].rooted == (key == "tiny-vit") and list(names) == list(original.state_dict())
    assert all(torch.equal(names[k], v) for k, v in original.state_dict().items())
    again = anymodel.train_nets(key, num_classes=6, channels=1, seed=0, twin=False)
    assert set(again) == {"residual"}
    assert all(torch.equal(a, b) for a, b in zip(again["residual"].state_dict().values(),
                                                  nets["plain"].state_dict().values()))
