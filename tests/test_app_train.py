"""The Train page under ``streamlit.testing``: a real short run through the job registry, controls, limits."""

from __future__ import annotations

import json

import pytest
from apphelpers import ROOT, TINY, app, goto, kinds, metric, ok, poll
from streamlit.testing.v1 import AppTest

PAGE = "train"
# ResViz-8, width 4, 16x16 shapes: 500 images, batch 32, 2 epochs = 30 steps of both nets in a few seconds.
RUN = {**TINY, "bs": "32", "nt": "500", "ep": "2", "ds": "shapes"}


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch: pytest.MonkeyPatch):
    """Each test gets its own job registry; every job it started is stopped afterwards."""
    monkeypatch.syspath_prepend(str(ROOT))
    from app_pages import jobs

    jobs.registry.clear()  # releasing the cached registry shuts its jobs down
    yield
    jobs.registry.clear()


def _status(at: AppTest) -> str:
    texts = [p.proto.text for p in at.get("progress")]
    return texts[0].rsplit("· ", 1)[-1] if texts else ""


def test_page_renders_with_controls() -> None:
    at = ok(app(TINY, PAGE))
    buttons = {b.label: b for b in at.button}
    assert set(buttons) >= {"Start", "Pause", "Resume", "Stop"}
    assert not buttons["Start"].disabled and buttons["Pause"].disabled and buttons["Stop"].disabled
    assert at.toggle(key="t_twin").value is True  # the plain twin trains alongside by default
    from app_pages.state import DEFAULT_DATASET

    assert at.selectbox(key="t_dataset").value == DEFAULT_DATASET == "digits"  # the default demo's real data
    assert "auto" in at.selectbox(key="t_device").options[0]


def test_short_run_completes_and_hands_nets_to_inspect() -> None:
    at = ok(app(RUN, PAGE))
    at.button(key="t_start").click().run()
    ok(at)
    poll(at, lambda a: any("finished" in s.value for s in a.success))
    ok(at)
    assert _status(at) == "finished"
    assert metric(at, "residual test accuracy").endswith("%") and metric(at, "plain test accuracy").endswith("%")
    assert len(at.get("plotly_chart")) == 4  # curves, two gradient-flow heatmaps, branch/shortcut ratios
    labels = [b.label for b in at.get("download_button") if b.label != "CSV"]
    assert labels == ["Config (JSON)", "Metrics (CSV)", "Residual checkpoint", "Plain checkpoint"]
    assert sum(b.label == "CSV" for b in at.get("download_button")) == 4  # one under each chart
    models = at.session_state["trained_models"]
    assert sorted(m.info["role"] for m in models.values()) == ["plain", "residual"]
    net, info = next(iter(models.values()))
    assert not net.training and info["dataset"] == "shapes" and info["input_size"] == 16
    assert models[at.session_state["selected_model"]].info["role"] == "residual"  # Inspect opens on it
    goto(at, "").run()  # training results survive a page switch (to Design and back)
    goto(at, PAGE).run()
    ok(at)
    assert _status(at) == "finished"


def test_exports_are_real_files() -> None:
    from app_pages import jobs

    at = ok(app(RUN, PAGE))
    at.button(key="t_start").click().run()
    poll(at, lambda a: any("finished" in s.value for s in a.success))
    job = jobs.registry().jobs_for(at.session_state["session_id"])[-1]
    doc = json.loads(jobs.config_json(job))
    assert doc["net"]["depth"] == 8 and doc["train"]["batch_size"] == 32 and doc["twin"] is True
    csv = jobs.metrics_csv(job.snapshot()).splitlines()
    assert csv[0].startswith("step,") and "residual/test_acc" in csv[0] and len(csv) == 31
    from resviz.storage.checkpoints import load_checkpoint_bytes

    net, meta = load_checkpoint_bytes(jobs.checkpoint_bytes(job, "plain"), filename="plain.safetensors")
    assert net.cfg.is_plain and meta["dataset"]["name"] == "shapes"


def test_pause_resume_stop() -> None:
    at = ok(app({**RUN, "ep": "50"}, PAGE))
    at.button(key="t_start").click().run()
    poll(at, lambda a: _status(a) == "running")
    at.button(key="t_pause").click().run()
    poll(at, lambda a: _status(a) == "paused")
    assert at.button(key="t_resume").disabled is False
    at.button(key="t_resume").click().run()
    poll(at, lambda a: _status(a) == "running")
    at.button(key="t_stop").click().run()
    poll(at, lambda a: any("stopped" in w.value for w in a.warning))
    assert not at.button(key="t_start").disabled


def test_global_cap_and_session_release(monkeypatch: pytest.MonkeyPatch) -> None:
    from app_pages import jobs

    monkeypatch.setenv("RESVIZ_MAX_JOBS", "1")
    jobs.registry.clear()
    first = ok(app({**RUN, "ep": "50"}, PAGE))
    first.button(key="t_start").click().run()
    second = ok(app(RUN, PAGE))
    second.button(key="t_start").click().run()
    assert any("already going" in e.value for e in second.error)
    # what the session-scoped handle does when the first session ends
    sid = first.session_state["session_id"]
    job = jobs.registry().jobs_for(sid)[-1]
    jobs._release(jobs.SessionHandle(sid, jobs.registry()))
    assert job.status == "stopped" and not job.alive
    assert jobs.registry().jobs_for(sid) == []


def test_missing_folder_is_a_message() -> None:
    at = ok(app(TINY, PAGE))
    at.selectbox(key="t_dataset").set_value("imagefolder").run()
    at.text_input(key="t_folder").input("/nonexistent/images").run()
    at.button(key="t_start").click().run()
    assert not at.exception
    assert at.error and "nonexistent" in at.error[0].value



def test_training_goes_on_while_other_pages_are_shown() -> None:
    at = ok(app(RUN, PAGE))
    at.button(key="t_start").click().run()
    goto(at, "").run()  # the Design page
    ok(at)
    assert any("Training ResNet-8" in p.proto.text for p in at.sidebar.get("progress")) or at.session_state["trained_models"]
    poll(at, lambda a: len(a.session_state["trained_models"]) == 2)  # handed over by the shared frame
    assert not at.sidebar.get("progress")


def test_odd_values_from_a_link_are_kept_and_bad_ones_warned() -> None:
    at = ok(app({**TINY, "bs": "48", "nt": "777"}, PAGE))
    assert at.select_slider(key="t_bs").value == 48 and at.select_slider(key="t_n").value == 777
    bad = app({**TINY, "nt": "lots", "lr": "-1"})  # the warning shows on the first page opened
    assert not bad.exception
    assert any("'nt'" in w.value and "lr" in w.value for w in bad.warning)


def test_url_keys_do_not_collide() -> None:
    from app_pages import state
    from resviz import urlconfig

    keys = [*urlconfig.NET_KEYS, *urlconfig.BLOCK_KEYS, urlconfig.SKIPS_KEY, *urlconfig.TRAIN_KEYS,
            state.DATASET_KEY, state.TWIN_KEY, state.SIZE_KEY]
    assert len(keys) == len(set(keys))


def test_live_regions_keep_their_blocks_when_a_run_ends() -> None:
    """A refresh of a live region already on its way when the run ends must find a block where it writes.

    The sidebar's status fragment and the Train page's live fragment keep their place, and every part of
    the live fragment is its own block, in both states: were an element to take a block's place, a late
    refresh would crash the browser's page ("'setIn' cannot be called on an ElementNode").
    """
    from streamlit.testing.v1.element_tree import Block

    at = ok(app({**RUN, "ep": "30"}, PAGE))
    at.button(key="t_start").click().run()
    ok(at)
    assert _status(at) in ("pending", "running")
    side_running = kinds(at.sidebar)
    live = [i for i, c in sorted(at.main.children.items()) if isinstance(c, Block) and c.get("plotly_chart")]
    parts_running = kinds(at.main.children[live[-1]])
    at.button(key="t_stop").click().run()
    poll(at, lambda a: _status(a) == "stopped")
    ok(at)
    assert kinds(at.sidebar) == side_running and "block" in side_running
    assert kinds(at.main.children[live[-1]]) == parts_running == ["block"] * 4
