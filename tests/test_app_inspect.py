"""The Inspect page under ``streamlit.testing``: default model, samples, lesions, bad uploads, model sources."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from apphelpers import ROOT, app
from streamlit.testing.v1 import AppTest

from resviz import NetConfig, build_net, zoo
from resviz.storage.checkpoints import save_checkpoint


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # app.py imports app_pages


def _page() -> AppTest:
    """The Inspect page through the app's router and frame, with the default configuration."""
    at = app(page="inspect")
    assert not at.exception, at.exception
    return at


def _charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def _top(at: AppTest) -> list[tuple[str, float]]:
    df = at.dataframe[0].value
    return list(zip(df["class"], df["probability"], strict=True))


def _titles(at: AppTest) -> list[str]:
    """Titles of the plotly charts on the page."""
    titles = []
    for chart in at.get("plotly_chart"):
        title = json.loads(chart.proto.spec).get("layout", {}).get("title", {})
        titles.append(title.get("text", "") if isinstance(title, dict) else str(title))
    return titles


def _run(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at


def test_default_model_shows_maps_and_predictions():
    at = _page()
    assert not at.error, [e.value for e in at.error]
    shipped = zoo.shipped_models()
    expected = "pretrained" if shipped else "untrained"  # the real shipped checkpoint once it exists
    assert at.radio(key="i_source").value == expected
    if shipped:  # a residual net on the session's dataset comes first
        from app_pages.state import DEFAULT_DATASET

        fits = [m for m in shipped if m.dataset == DEFAULT_DATASET and m.kind != "plain"]
        first = min(fits, key=lambda m: (m.path.stat().st_size, m.name)) if fits else shipped[0]  # the smallest
        assert any(first.name in c.value for c in at.caption)
    assert _charts(at) == 5  # top-k, F(x), S(x), F(x)+S(x) grids, magnitudes (the open tab)
    assert len(_top(at)) == 5
    # pick a test image by class: its caption names the class and the maps are drawn
    at.radio(key="i_pick_by").set_value("by class")
    _run(at)
    cls = at.selectbox[[s.label for s in at.selectbox].index("Class")]
    cls.set_value(1)
    _run(at)
    assert any("true class" in c.value for c in at.caption)
    assert _charts(at) >= 5 and len(_top(at)) == 5


def test_skip_off_changes_predictions_and_restores():
    at = _page()
    before = _top(at)
    skip = next(m for m in at.multiselect if m.label.startswith("Skip connection off"))
    n = len(skip.options)
    skip.set_value(list(range(n)))
    _run(at)
    after = _top(at)
    assert after != before
    assert "intact" in at.dataframe[0].value.columns
    assert [m.label for m in at.metric][0] == "Top-1"
    assert any("Modified net: skip off" in c.value for c in at.caption)
    skip = next(m for m in at.multiselect if m.label.startswith("Skip connection off"))
    skip.set_value([])
    _run(at)
    assert _top(at) == before  # the shared cached net was not left modified


def test_remove_block_and_sweep():
    at = _page()
    before = _top(at)
    assert at.selectbox(key="i_block").value == 0
    removed = next(m for m in at.multiselect if m.label.startswith("Block removed"))
    removed.set_value([0])
    _run(at)
    assert any("Modified net: removed: 0" in c.value for c in at.caption)
    assert "intact" in at.dataframe[0].value.columns and len(at.metric) == 3
    assert any("F(x) is not computed" in i.value for i in at.info)  # the shown block is the removed one
    assert not any("one more block removed" in t for t in _titles(at))
    at.session_state["i_tab"] = "Remove one block"  # AppTest cannot click tabs; they are keyed
    _run(at)
    at.button(key="i_sweep_go").click()
    _run(at)
    assert any("one more block removed" in t for t in _titles(at))
    next(m for m in at.multiselect if m.label.startswith("Block removed")).set_value([])
    _run(at)
    assert _top(at) == before and not at.metric


def test_attribution_tab():
    at = _page()
    at.session_state["i_tab"] = "Attribution"
    _run(at)
    assert any(t.startswith("Grad-CAM for") for t in _titles(at))  # cheap: shown at once
    at.selectbox(key="i_method").set_value("integrated_gradients")
    _run(at)
    assert not any(t.startswith("Integrated Gradients") for t in _titles(at))  # costly: waits for the button
    at.button(key="i_attr_go").click()
    _run(at)
    assert any(t.startswith("Integrated Gradients for") for t in _titles(at))
    assert any("completeness error" in c.value for c in at.caption)


def test_corrupt_image_upload_shows_error():
    at = _page()
    at.radio(key="i_image_source").set_value("Upload")
    at.run()
    at.file_uploader(key="i_image").set_value(("photo.png", b"\x89PNG\r\n\x1a\n garbage", "image/png"))
    at.run()
    assert not at.exception
    assert any("photo.png cannot be used" in e.value for e in at.error)
    at.radio(key="i_image_source").set_value("Built-in picture")
    _run(at)
    assert len(_top(at)) == 5


def _png(name: str, size: int, fmt: str = "PNG") -> bytes:
    import io

    from resviz.data.images import sample_image

    buf = io.BytesIO()
    sample_image(name, size).save(buf, format=fmt)
    return buf.getvalue()


def test_good_image_upload_and_camera():
    at = _page()
    at.radio(key="i_image_source").set_value("Upload")
    at.run()
    at.file_uploader(key="i_image").set_value(("star.png", _png("star", 48), "image/png"))
    _run(at)
    assert len(_top(at)) == 5 and any("star.png" in c.value for c in at.caption)
    at.radio(key="i_image_source").set_value("Camera")
    _run(at)
    assert not at.camera_input  # off until asked for
    at.toggle(key="i_camera_on").set_value(True)
    _run(at)
    at.camera_input(key="i_camera").set_value(("shot.jpg", _png("circle", 64, "JPEG"), "image/jpeg"))
    _run(at)
    assert len(_top(at)) == 5 and any("camera picture" in c.value for c in at.caption)


def test_torchvision_with_cached_weights(monkeypatch, tmp_path):
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = zoo.weights_file("resnet18", "IMAGENET1K_V1", tmp_path / "hub")
    path.parent.mkdir(parents=True)
    torch.save(resnet18().state_dict(), path)  # random weights in the real file name: no download needed
    at = _page()
    at.radio(key="i_source").set_value("torchvision")
    at.run()
    assert any("Test images" in i.value or "No test images" in i.value for i in at.info)  # none for ImageNet
    at.radio(key="i_image_source").set_value("Built-in picture")
    _run(at)
    assert any("torchvision resnet18" in c.value and "69.8%" in c.value for c in at.caption)
    assert any("224x224" in c.value for c in at.caption)
    from torchvision.models import ResNet18_Weights

    assert {c for c, _ in _top(at)} <= set(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def test_checkpoint_upload(tmp_path):
    info = {"name": "digits", "classes": ["a", "b", "c"], "mean": [0.5], "std": [0.25], "channels": 1, "input_size": 16}
    net = build_net(NetConfig(depth=8, width=4, num_classes=3, in_channels=1, input_size=16))
    w = save_checkpoint(net, tmp_path / "tiny", dataset=info, metrics={"test_acc": 0.5})
    at = _page()
    at.radio(key="i_source").set_value("upload")
    at.run()
    at.file_uploader(key="i_ckpt").set_value([("tiny.safetensors", w.read_bytes(), "application/octet-stream"),
                                               ("tiny.json", w.with_suffix(".json").read_bytes(), "application/json")])
    at.run()
    at.radio(key="i_image_source").set_value("Built-in picture")
    _run(at)
    assert any("tiny" in c.value and "50.0%" in c.value for c in at.caption)
    assert {c for c, _ in _top(at)} == {"a", "b", "c"}
    broken = ("broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{", "application/octet-stream")
    at.file_uploader(key="i_ckpt").set_value(broken)
    at.run()
    assert not at.exception
    assert any("cannot be used" in e.value for e in at.error)


def test_torchvision_without_weights_says_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    at = _page()
    at.radio(key="i_source").set_value("torchvision")
    at.run()
    assert not at.exception and not at.error
    assert any("ResNet18_Weights.IMAGENET1K_V1" in c.value for c in at.code)


def test_trained_model_from_session():
    from app_pages.state import TRAINED, TrainedModel

    torch.manual_seed(0)
    net = build_net(NetConfig(depth=8, width=4, num_classes=2, input_size=16)).eval()
    info = {"dataset": "shapes", "classes": ["yes", "no"], "mean": [0.5] * 3, "std": [0.25] * 3, "channels": 3,
            "input_size": 16, "final": {"nets": {"residual": {"test_acc": 0.75}}}, "role": "residual"}
    at = _page()
    at.session_state[TRAINED] = {"run 1": TrainedModel(net, info)}
    at.radio(key="i_source").set_value("trained")
    at.radio(key="i_image_source").set_value("Built-in picture")
    _run(at)
    assert any("run 1" in c.value and "75.0%" in c.value for c in at.caption)
    assert {c for c, _ in _top(at)} == {"yes", "no"}



def test_unavailable_dataset_is_an_error_message(monkeypatch, tmp_path):
    from app_pages.state import DATASET

    monkeypatch.setenv("RESVIZ_DATA", str(tmp_path))  # an empty data folder: CIFAR-10 is missing
    at = _page()
    at.session_state[DATASET] = "cifar10"
    at.radio(key="i_source").set_value("untrained")
    at.run()
    assert not at.exception
    assert any("This model cannot be used" in e.value and "cifar" in e.value.lower() for e in at.error)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
