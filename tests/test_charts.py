"""Every chart the app draws goes through app_pages.charts.show_chart: the ResViz template, PNG and CSV."""

from __future__ import annotations

import json

import pytest
from apphelpers import ROOT, TINY, app, ok


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))


def _charts_and_csv(at) -> tuple[list, list[str]]:
    return at.get("plotly_chart"), [b.key for b in at.get("download_button") if b.label == "CSV"]


@pytest.mark.parametrize(("params", "page", "drawings"), [(TINY, None, 0), ({"step": "1"}, None, 1), ({"step": "2"}, None, 0),
                                                          ({"step": "4"}, None, 0), ({}, "inspect", 0)])
def test_every_chart_has_the_theme_a_png_name_and_a_csv_button(params, page, drawings) -> None:
    at = ok(app(params, page=page))
    charts, csv_keys = _charts_and_csv(at)
    assert charts
    names = []
    for chart in charts:
        assert chart.proto.theme == ""  # Streamlit's chart theme off: the figure's own template is drawn
        spec, config = json.loads(chart.proto.spec), json.loads(chart.proto.config)
        assert spec["layout"]["template"]["layout"]["font"]["family"].startswith('"Source Sans"')
        assert config.get("displayModeBar", True) is not False  # the mode bar, with its PNG button, is there
        names.append(config["toImageButtonOptions"]["filename"])
        assert config["toImageButtonOptions"]["format"] == "png"
    assert all(n.startswith("resviz-") for n in names)
    assert len(csv_keys) == len(charts) - drawings  # a CSV button under every chart that holds data


def test_file_names_come_from_titles_and_keys() -> None:
    from app_pages.charts import file_stem

    assert file_stem("Gradient norm by depth, residual vs plain") == "resviz-gradient-norm-by-depth-residual-vs-plain"
    assert file_stem("||F(x)|| / ||S(x)||") == "resviz-f-x-s-x"
    assert file_stem("") == "resviz-chart"
