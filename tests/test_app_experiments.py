"""Experiments page: loads, opens a CLI run directory, runs a study in the background and stops it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from apphelpers import ROOT, TINY, app, kinds, ok

from resviz.experiments import STUDIES, stored
from resviz.experiments.runner import run_study

PAGE = "experiments"


def shown_figures(result: dict) -> dict:
    from app_pages.experiments import shown_figures as shown

    return shown(result)


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))


def test_page_opens_a_run_directory_written_by_the_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = {"depths": (8, 14), "pairs": 1, "points": 8, "max_lag": 3, "width": 4}
    result = run_study("shattered", overrides=overrides, out=tmp_path / "shattered-run", save_figures=False)
    monkeypatch.setenv("RESVIZ_RUNS", str(tmp_path))
    monkeypatch.setenv("RESVIZ_PRETRAINED", str(tmp_path / "no-zoo"))  # no stored zoo results: only the run's charts
    at = ok(app(TINY, PAGE))
    assert any("No stored result on the converged zoo" in i.value for i in at.info)
    assert at.selectbox(key="x_run").value.name == "shattered-run"
    charts = at.get("plotly_chart")
    assert len(charts) == 2  # correlation by depth and by lag
    shown = [m.value for m in at.success] + [m.value for m in at.warning]
    assert all(any(c["claim"] in text for text in shown) for c in result["checks"])


def test_run_button_starts_a_study_that_stop_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESVIZ_RUNS", str(tmp_path))
    at = ok(app(TINY, PAGE))
    at.selectbox(key="x_study").set_value("shattered").run()
    at.button(key="x_run_button").click().run()
    ok(at)
    assert at.button(key="x_stop") is not None and at.selectbox(key="x_study").disabled
    running = kinds(at.main)
    at.button(key="x_stop").click().run()
    deadline = time.monotonic() + 60
    while not any("stopped" in w.value for w in at.warning):
        assert time.monotonic() < deadline, "the study did not stop"
        time.sleep(0.5)
        at.run()
    ok(at)
    # the live fragment and the blocks around it keep their places once the study has ended (a late
    # refresh of the fragment must find a block, not an element: that would crash the browser's page)
    assert kinds(at.main) == running



@pytest.mark.parametrize("name", list(STUDIES))
def test_every_study_opens_with_its_stored_zoo_result_at_once(name: str) -> None:
    result = stored.load_stored(name)
    assert result is not None, f"pretrained/studies/{name}.json is missing: python pretrained/make_pretrained.py --studies"
    at = ok(app(TINY, PAGE))
    at.selectbox(key="x_study").set_value(name)
    t0 = time.perf_counter()
    ok(at.run())
    assert time.perf_counter() - t0 < 3.0  # AppTest runs the script synchronously: this is the whole rerun
    assert any(h.value == "On the converged zoo" for h in at.subheader)
    assert len(at.get("plotly_chart")) == len(shown_figures(result))
    shown = [m.value for m in at.success] + [m.value for m in at.warning]
    assert all(any(c["claim"] in text for text in shown) for c in result["checks"])
    assert any(stored.command(name) in c.value for c in at.caption)


def test_study_tables_name_their_columns_and_put_what_a_row_is_first() -> None:
    at = ok(app(TINY, PAGE))
    at.selectbox(key="x_study").set_value("degradation")
    ok(at.run())
    ours = at.dataframe[0].proto
    config = json.loads(ours.columns)
    assert list(ours.column_order)[:3] == ["depth", "residual_train_err", "plain_train_err"]
    assert list(ours.column_order)[-1] == "status"  # the nets' names after the numbers
    assert config["residual_train_err"] == {"label": "ResNet train error", "type_config": {"type": "number", "format": "percent"}}
    assert config["residual_final_loss"]["type_config"]["format"] == "%.4g"
    assert "_" not in "".join(c["label"] for c in config.values() if "label" in c)  # no field name shown raw
    at.selectbox(key="x_study").set_value("responses")
    ok(at.run())
    assert list(at.dataframe[0].proto.column_order)[0] == "net"
    nets = at.dataframe[0].value["net"].tolist()  # named as the checks and figures name them
    assert "ResNet-20" in nets and "plain-20" in nets and not any(n.startswith("residual") for n in nets)
    findings = [m.value for m in at.markdown if m.value.startswith("- ")]  # the paper's findings in words: a list
    assert any("ResNets have generally smaller responses" in f for f in findings)


def test_a_findings_row_reads_as_a_sentence_with_its_subject_first() -> None:
    from app_pages.experiments import _finding

    row = {"plain": "error jumps to chance", "experiment": "delete one block", "residual": "error stays low"}
    assert _finding(row) == "**delete one block** — ResNet: error stays low — plain: error jumps to chance"
    assert _finding({"experiment": "swap blocks", "plain": "-", "residual": "error grows smoothly"}) == (
        "**swap blocks** — ResNet: error grows smoothly")  # a dash stands for nothing said
