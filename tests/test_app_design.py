"""The Design page (through the whole app: router, sidebar and URL state) under ``streamlit.testing``."""

from __future__ import annotations

from dataclasses import replace

import pytest
from apphelpers import ROOT, TINY, app, metric, ok

from resviz.analysis.initstats import summarize


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))


def test_design_page_shows_everything() -> None:
    at = ok(app(page="design"))
    assert len(at.get("plotly_chart")) == 3  # architecture, signal propagation, gradient norms
    # the block, its branch, and the shortcut one case a line (side by side they ran out of the column)
    assert len(at.latex) == 4 and r"\mathrm{ReLU}" in at.latex[0].value
    assert at.latex[2].value.strip("$\n").startswith("S(x) = x") and "shape changes" in at.latex[3].value
    assert not any(r"\quad" in eq.value for eq in at.latex)
    from app_pages.state import DEFAULT_NET

    assert metric(at, "Parameters") == f"{summarize(DEFAULT_NET).params:,}"
    assert any("Device: **cpu**" in c.value for c in at.sidebar.caption)


def test_every_design_widget_explains_itself() -> None:
    at = ok(app(TINY))
    widgets = [*at.selectbox, *at.number_input, *at.slider, *at.select_slider, *at.checkbox, *at.multiselect]
    keyed = [w for w in widgets if (w.key or "").startswith("d_")]
    assert len(keyed) >= 16
    assert all(w.help for w in keyed), [w.key for w in keyed if not w.help]


def test_depth_changes_param_count_and_url() -> None:
    at = ok(app(TINY))
    small = metric(at, "Parameters")
    at.select_slider(key="d_depth").set_value(20).run()
    ok(at)
    big = metric(at, "Parameters")
    from app_pages.state import DEFAULT_NET

    expected = summarize(replace(DEFAULT_NET, depth=20, width=4, input_size=16)).params
    assert big == f"{expected:,}" and int(big.replace(",", "")) > int(small.replace(",", ""))
    assert metric(at, "Residual blocks") == "9"
    assert at.query_params["d"] == "20"


def test_invalid_combination_shows_error_not_traceback() -> None:
    at = ok(app(TINY))
    at.selectbox(key="d_order").set_value("bn_after_add").run()
    at.selectbox(key="d_norm").set_value("none").run()
    assert not at.exception
    assert any("bn_after_add" in e.value for e in at.error)
    at.selectbox(key="d_norm").set_value("batch").run()
    ok(at)


def test_bad_url_gives_warning_and_defaults() -> None:
    at = app({"d": "abc", "w": "8"})
    assert not at.exception and not at.error
    assert any("depth" in w.value for w in at.warning)
    from app_pages.state import DEFAULT_NET

    assert metric(at, "Parameters") == f"{summarize(DEFAULT_NET).params:,}"


def test_skip_toggles_and_equations() -> None:
    at = ok(app(TINY))
    at.multiselect(key="d_skips_off").set_value([0, 2]).run()
    ok(at)
    assert metric(at, "Skips on") == "1 / 3"
    assert at.query_params["off"] == "0,2"
    at.selectbox(key="d_order").set_value("pre").run()
    at.selectbox(key="d_scaling").set_value("fixed").run()
    ok(at)
    assert at.latex[0].value.strip("$\n") == "y = F(x) + S(x)"
    assert at.latex[1].value.strip("$\n").startswith(r"F(x) = \alpha\, W_{2}")


def test_link_reproduces_the_configuration() -> None:
    at = ok(app(TINY))
    at.selectbox(key="d_act").set_value("gelu").run()
    at.multiselect(key="d_skips_off").set_value([1]).run()
    params = dict(at.query_params)
    again = ok(app(params))
    assert again.selectbox(key="d_act").value == "gelu"
    assert again.multiselect(key="d_skips_off").value == [1]
    assert metric(again, "Parameters") == metric(at, "Parameters")


def test_page_errors_become_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    from app_pages import design

    def boom(_cfg: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(design, "block_equation", boom)  # the page's own name for resviz.nn.equations.block_equation
    at = app(TINY)
    assert not at.exception
    assert any("boom" in e.value for e in at.error)
