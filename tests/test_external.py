"""Models from outside ResViz: torchvision and timm by name, Python files from allowed folders only."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from resviz.external import SourceError, build, count_on_meta, load_state_checked, model_files, parse_spec

MODEL_FILE = textwrap.dedent("""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.body = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            x = self.conv(x)
            x = x + torch.relu(self.body(x))
            return self.fc(x.mean((2, 3)))

    def build_tiny(num_classes=10):
        return Tiny(num_classes)

    def make_broken():
        return 42

    def helper():
        return None
""")


def test_parse_spec() -> None:
    assert str(parse_spec("torchvision:resnet18")) == "torchvision:resnet18"
    assert parse_spec("file:/a/b.py:build").path == "/a/b.py"
    with pytest.raises(SourceError, match="cannot read"):
        parse_spec("resnet18")


def test_torchvision_and_timm_by_name_have_random_weights_with_a_note(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    ext = build("torchvision:resnet18")
    assert ext.num_params == sum(p.numel() for p in ext.model.parameters()) == 11_689_512
    assert not ext.model.training and ext.weights == "random initialisation" and "random weights" in ext.note
    tm = build("timm:resnet18", num_classes=3)
    assert tm.model(torch.randn(1, 3, 32, 32)).shape == (1, 3) and tm.input_size == 224


def test_unknown_names_and_oversized_models_are_refused_before_building() -> None:
    with pytest.raises(SourceError, match="no classification model"):
        build("torchvision:resnet_nope")
    with pytest.raises(SourceError, match="timm has no model"):
        build("timm:nope_net")
    with pytest.raises(SourceError, match=r"11\.7 M parameters, more than this server allows"):
        build("torchvision:resnet18", max_params=1_000_000)


def test_files_load_only_from_allowed_folders(tmp_path: Path, monkeypatch) -> None:
    allowed, other = tmp_path / "models", tmp_path / "elsewhere"
    allowed.mkdir(), other.mkdir()
    (allowed / "tiny.py").write_text(MODEL_FILE)
    (other / "tiny.py").write_text(MODEL_FILE)
    monkeypatch.setenv("RESVIZ_MODEL_DIRS", str(allowed))
    assert [s.name for s in model_files()] == ["build_tiny", "make_broken"]
    ext = build(f"file:{allowed / 'tiny.py'}:build_tiny", num_classes=4)
    assert ext.model(torch.randn(2, 3, 8, 8)).shape == (2, 4) and ext.note == ""
    with pytest.raises(SourceError, match="not in a folder model files may be loaded from"):
        build(f"file:{other / 'tiny.py'}:build_tiny")
    with pytest.raises(SourceError, match="not in a folder"):  # no escaping through ..
        build(f"file:{allowed / '..' / 'elsewhere' / 'tiny.py'}:build_tiny")
    with pytest.raises(SourceError, match="not a torch nn.Module"):
        build(f"file:{allowed / 'tiny.py'}:make_broken")
    with pytest.raises(SourceError, match="has no function"):
        build(f"file:{allowed / 'tiny.py'}:missing")


def test_no_allowed_folder_means_no_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("RESVIZ_MODEL_DIRS", raising=False)
    (tmp_path / "m.py").write_text(MODEL_FILE)
    with pytest.raises(SourceError, match="set RESVIZ_MODEL_DIRS"):
        build(f"file:{tmp_path / 'm.py'}:build_tiny")


def test_meta_count_allocates_no_weights() -> None:
    import torchvision

    assert count_on_meta(lambda: torchvision.models.resnet50()) == 25_557_032


def test_weights_are_checked_key_by_key() -> None:
    ext = build("torchvision:resnet18", cached_weights=False)
    state = ext.model.state_dict()
    bad = {k: v for k, v in state.items() if not k.startswith("fc.")}
    bad["layer1.0.conv1.weight"] = torch.zeros(1)
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(SourceError, match=r"2 missing .*fc\.weight.*1 unexpected .*extra\.weight.*1 with other shapes"):
        load_state_checked(ext.model, bad)
    load_state_checked(ext.model, state)
