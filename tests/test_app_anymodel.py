"""Any architecture in the app under ``streamlit.testing``: Inspect, Design and Train through the real router."""

from __future__ import annotations

import json

import pytest
from apphelpers import ROOT, app, metric, ok, poll
from streamlit.testing.v1 import AppTest
from test_anymodel import RESIDUAL_FILE

pytestmark = pytest.mark.slow  # each builds and traces a real model


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))  # app.py imports app_pages
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached weights: random initialisation
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.py").write_text(RESIDUAL_FILE)
    monkeypatch.setenv("RESVIZ_MODEL_DIRS", str(tmp_path / "models"))
    from app_pages import anymodels, jobs

    anymodels.prepared.clear()
    jobs.registry.clear()
    yield
    jobs.registry.clear()


def _run(at: AppTest) -> AppTest:
    at.run()
    return ok(at)


def _inspect_any(kind: str = "torchvision") -> AppTest:
    """The Inspect page on the "Any architecture" source, fed a built-in picture."""
    at = app(page="inspect")
    at.radio(key="i_source").set_value("any")
    at.radio(key="i_image_source").set_value("Built-in picture")
    at.run()
    assert not at.exception, at.exception
    if kind != "torchvision":
        at.radio(key="i_any_kind").set_value(kind)
        at.run()
    assert not at.exception, at.exception
    return at


def _top(at: AppTest) -> list[tuple[str, float]]:
    df = at.dataframe[0].value
    return list(zip(df["class"], df["probability"], strict=True))


def _group_skip(at: AppTest, group: int):
    return next(m for m in at.multiselect if m.label.startswith(f"Skip connection off: group {group} "))


def _all_off(at: AppTest, group: int):
    return next(c for c in at.checkbox if c.label == f"All off (group {group})")


def test_torchvision_resnet18_random_weights_and_a_skip_off() -> None:
    at = ok(_inspect_any())
    assert at.selectbox(key="i_any_tv").value == "resnet18"
    assert any("no pretrained weights for resnet18" in i.value for i in at.info)
    assert any("8 skip connections found: 5 identity, 3 projection" in c.value for c in at.caption)
    before = _top(at)
    assert len(before) == 5 and all(isinstance(c, str) for c, _ in before)
    groups = [m for m in at.multiselect if m.label.startswith("Skip connection off: ")]
    assert len(groups) == 4 and groups[0].label == "Skip connection off: group 1 (56x56, 64 ch)"
    _group_skip(at, 2).set_value([2])
    _run(at)
    assert "intact" in at.dataframe[0].value.columns
    assert any("Modified net: skip off: 2" in c.value for c in at.caption)
    assert _top(at) != before
    _group_skip(at, 2).set_value([])
    _all_off(at, 4).check()
    _run(at)
    assert any("Modified net: skip off: 6, 7" in c.value for c in at.caption)
    next(m for m in at.multiselect if m.label.startswith("Block removed: group 1 ")).set_value([0])
    _run(at)
    assert any("removed: 0" in c.value for c in at.caption)
    assert any(json.loads(ch.proto.spec)["data"][0]["type"] == "heatmap" for ch in at.get("plotly_chart"))
    _all_off(at, 4).uncheck()
    next(m for m in at.multiselect if m.label.startswith("Block removed: group 1 ")).set_value([])
    _run(at)
    assert _top(at) == before  # the shared cached model was left as it was
    at.session_state["i_tab"] = "Attribution"
    _run(at)
    assert any(json.loads(c.proto.spec)["layout"]["title"]["text"].startswith("Grad-CAM for") for c in at.get("plotly_chart"))


def test_alexnet_has_no_skips_and_is_still_inspectable() -> None:
    at = _inspect_any()
    at.selectbox(key="i_any_tv").set_value("alexnet")
    _run(at)
    assert any("No skip connections found" in w.value for w in at.warning)
    assert not [m for m in at.multiselect if m.label.startswith("Skip connection off")]
    assert len(_top(at)) == 5
    assert "gradcam" not in at.selectbox(key="i_method").options


def test_allowed_python_file_and_uploaded_weights(tmp_path) -> None:
    from safetensors.torch import save

    at = _inspect_any("file")
    box = at.selectbox(key="i_any_file")
    assert box.value.endswith("mine.py:build_model")
    ok(at)
    assert any("2 skip connections found: 2 identity, 0 projection" in c.value for c in at.caption)
    assert {c for c, _ in _top(at)} == {f"class {i}" for i in range(5)}
    import torch

    at.file_uploader(key="i_any_weights").set_value(("w.safetensors", save({"0.weight": torch.zeros(8, 3, 3, 3)}),
                                                     "application/octet-stream"))
    at.run()
    assert not at.exception
    assert any("cannot be used" in e.value and "do not fit" in e.value for e in at.error)


def test_untraceable_file_and_oversized_model_are_messages(monkeypatch) -> None:
    at = _inspect_any("file")
    at.selectbox(key="i_any_file").set_value(next(o for o in at.selectbox(key="i_any_file").options
                                                  if o.endswith(":make_branchy")))
    at.run()
    assert not at.exception
    assert any("could not trace Branchy" in e.value and "control flow" in e.value for e in at.error)
    monkeypatch.setenv("RESVIZ_MAX_PARAMS", "1000000")
    at.radio(key="i_any_kind").set_value("torchvision")
    at.run()
    assert not at.exception
    assert any("more than this server allows" in e.value for e in at.error)


def test_design_any_architecture_mode() -> None:
    at = app(page="design")
    at.radio(key="d_mode").set_value("any")
    at.run()
    at.selectbox(key="d_any_tv").set_value("resnet18")
    _run(at)
    assert metric(at, "Skip connections") == "8" and metric(at, "Identity / projection") == "5 / 3"
    assert metric(at, "Parameters") == "11,689,512" and metric(at, "MACs / image").endswith("G")
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert titles == ["Skip connections found, in execution order", "Gradient norm by depth, residual vs plain",
                      "Signal propagation through depth"]
    assert any("Twin with skips off" in c.value for c in at.caption)
    at.selectbox(key="d_any_tv").set_value("alexnet")
    _run(at)
    assert metric(at, "Skip connections") == "0" and len(at.get("plotly_chart")) == 1


def test_train_a_discovered_model_next_to_its_twin() -> None:
    at = ok(app({"bs": "32", "nt": "500", "ep": "1", "opt": "adamw", "lr": "0.003", "ds": "shapes"}, "train"))
    at.radio(key="t_what").set_value("any")
    _run(at)
    at.selectbox(key="t_any_preset").set_value("small-convnext")
    _run(at)
    at.button(key="t_start").click().run()
    ok(at)
    poll(at, lambda a: any("finished" in s.value for s in a.success), timeout=180)
    ok(at)
    assert metric(at, "residual test accuracy").endswith("%") and metric(at, "plain test accuracy").endswith("%")
    assert len(at.get("plotly_chart")) == 4  # curves, two gradient-flow heatmaps, branch/shortcut ratios
    models = at.session_state["trained_models"]
    assert sorted(m.info["role"] for m in models.values()) == ["plain", "residual"]
    name = at.session_state["selected_model"]
    assert "small ConvNeXt" in name and models[name].info["net_config"]["preset"] == "small-convnext"
    from app_pages import jobs

    job = jobs.registry().jobs_for(at.session_state["session_id"])[-1]
    from safetensors.torch import load

    from resviz import anymodel

    state = load(jobs.checkpoint_bytes(job, "plain"))  # under the architecture's own names, loadable into it
    anymodel.build_preset("small-convnext", num_classes=8, channels=3).load_state_dict(state)
    assert json.loads(jobs.config_json(job))["net"]["timm"] == "convnext_atto"
    from apphelpers import goto

    goto(at, "inspect").run()  # the trained model opens on the Inspect page with its discovered merges
    at.radio(key="i_image_source").set_value("Built-in picture")
    _run(at)
    assert at.radio(key="i_source").value == "trained"
    assert len(_top(at)) == 5 and _group_skip(at, 1)
    _group_skip(at, 1).set_value([0])
    _run(at)
    assert "intact" in at.dataframe[0].value.columns


def test_a_job_needs_a_config_or_nets() -> None:
    from resviz import TrainConfig
    from resviz.jobs import TrainingJob

    with pytest.raises(ValueError, match="needs a net config or the nets"):
        TrainingJob(None, object(), TrainConfig())
