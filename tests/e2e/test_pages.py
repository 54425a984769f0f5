"""Real browser against `streamlit run app.py`: every page renders, training goes live, Inspect reacts, links reproduce.

Screenshots of each step land in artifacts/screenshots/ (gitignored) for a look after a failure.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from e2ehelpers import (
    PLOT,
    TINY,
    TINY_RUN,
    UPLOAD,
    assert_no_exception,
    choose,
    error_texts,
    location,
    open_page,
    page_url,
    pick,
    plot_data,
    poll,
    screenshot,
    wait_idle,
)
from PIL import Image

pytestmark = pytest.mark.browser

# Widget values of the main area: aria-label -> what the widget shows (text, slider value, checked state, tags).
WIDGETS_JS = """() => {
  const out = {};
  for (const el of document.querySelectorAll('[data-testid="stMain"] input')) {
    const label = el.getAttribute('aria-label');
    if (!label) continue;
    let v = el.type === 'range' ? el.getAttribute('aria-valuetext') : el.type === 'checkbox' ? String(el.checked) : el.value;
    if (el.getAttribute('role') === 'combobox') {
      const tags = el.closest('[data-testid="stMultiSelectTagsContainer"]');
      if (tags) v = tags.innerText;
    }
    out[label] = v;
  }
  return out;
}"""


def _curves(page) -> dict | None:
    """The Train page's training-curves chart as {trace name: y values} (first trace of each name)."""
    for p in plot_data(page):
        if p["title"] == "Training curves":
            out: dict[str, list] = {}
            for t in p["traces"]:
                out.setdefault(t["name"], t["y"])
            return out
    return None


def _train_points(page) -> int:
    curves = _curves(page)
    return len(curves.get("residual train", [])) if curves else 0


def _topk(page) -> dict[str, list] | None:
    """Top-k chart: {trace name: [(class, probability)]}."""
    chart = next((p for p in plot_data(page) if p["title"].startswith("Top-")), None)
    if chart is None:
        return None
    return {t["name"]: list(zip(t["y"], t["x"], strict=True)) for t in chart["traces"]}


@pytest.mark.parametrize(
    ("path", "title", "charts"),
    [("", "Design a residual network", 3), ("train", "Train the residual net", 0), ("inspect", "Inspect", 3),
     ("experiments", "Experiments", 0)],
)
def test_page_renders_without_exception(server, page, path: str, title: str, charts: int) -> None:
    open_page(page, page_url(server.url, path, TINY), "h1")
    if charts:
        poll(lambda: page.locator(PLOT).count() >= charts, 90, what=f"{charts} charts")
    screenshot(page, f"page-{path or 'design'}")
    assert title in page.locator("h1").first.inner_text()
    assert_no_exception(page)
    assert error_texts(page) == []
    for chart in plot_data(page):  # every chart that drew has at least one trace
        assert chart["traces"], chart["title"]


def test_start_makes_the_loss_chart_grow_and_stop_ends_it(server, page) -> None:
    open_page(page, page_url(server.url, "train", {**TINY_RUN, "ep": "30"}), "h1")
    page.get_by_role("button", name="Start").click()
    first = poll(lambda: _train_points(page), 90, what="the first loss points")
    later = poll(lambda: (n := _train_points(page)) > first and n, 90, what="more loss points")
    assert later > first > 0
    screenshot(page, "train-live")
    names = ("residual train", "plain train")
    # the live region redraws the chart every interval: read it when it is there
    curves = poll(lambda: (c := _curves(page)) and all(n in c for n in names) and c, 10, what="the training curves")
    for name in names:
        assert all(v is not None and math.isfinite(v) for v in curves[name]), name
    page.get_by_role("button", name="Stop").click()
    poll(lambda: "Training was stopped" in page.inner_text("body"), 60, what="the stopped message")
    poll(lambda: page.get_by_role("button", name="Start").is_enabled(), 60, what="Start to be enabled again")
    assert_no_exception(page)


def test_inspect_upload_shows_maps_and_a_skip_lesion_changes_predictions(server, page, tmp_path) -> None:
    png = tmp_path / "stripes.png"
    stripes = np.zeros((48, 48, 3), np.uint8)
    stripes[:, ::6] = (250, 40, 40)
    stripes[::8] = (30, 200, 90)
    Image.fromarray(stripes).save(png)
    open_page(page, page_url(server.url, "inspect", TINY), "h1")
    pick(page, "Design-page net, untrained")
    wait_idle(page)
    pick(page, "Upload", then=UPLOAD)
    page.locator(UPLOAD).set_input_files(str(png))
    poll(lambda: "stripes.png" in page.inner_text("body") and _topk(page), 90, what="predictions for the upload")
    poll(lambda: sum("residual branch" in p["title"] for p in plot_data(page)), 60, what="the F(x) feature maps")
    wait_idle(page)
    titles = [p["title"] for p in plot_data(page)]
    assert any("F(x)" in t for t in titles) and any("S(x)" in t for t in titles), titles
    before = _topk(page)
    assert len(before) == 1, before  # no lesion: one set of bars
    screenshot(page, "inspect-upload")

    choose(page, "Skip connection off (plain block)", "block 0 (stage 1, 4 ch)")
    after = poll(lambda: (t := _topk(page)) and len(t) == 2 and t, 90, what="the modified vs intact bars")
    wait_idle(page)
    after = _topk(page)
    screenshot(page, "inspect-skip-off")
    assert_no_exception(page)
    intact = dict(next(iter(before.values())))
    modified = dict(after["modified"])
    assert dict(after["intact"]) == {k: intact[k] for k in dict(after["intact"])}  # the intact net is unchanged
    shared = set(intact) & set(modified)
    assert set(modified) != set(intact) or any(abs(modified[c] - intact[c]) > 1e-6 for c in shared), (intact, modified)
    assert "Modified net" in page.inner_text("body")


def test_link_of_a_configured_design_reproduces_it_in_a_new_context(server, new_context) -> None:
    a = new_context().new_page()
    open_page(a, page_url(server.url, "", {"d": "56", "w": "4"}), PLOT)
    choose(a, "Block", "bottleneck")
    wait_idle(a)
    choose(a, "Order", "(e) full pre-activation")
    poll(lambda: {"k=bottleneck", "o=pre"} <= set(location(a).split("?")[1].split("&")), 60, what="the URL to follow the widgets")
    wait_idle(a)
    link, want = location(a), a.evaluate(WIDGETS_JS)
    assert want["Block"] == "bottleneck" and "56" in want["Depth (layers)"], want
    screenshot(a, "design-configured")

    b = new_context().new_page()  # a new context is a new Streamlit session: only the URL carries the config
    open_page(b, link, PLOT)
    screenshot(b, "design-from-link")
    assert_no_exception(b)
    got = b.evaluate(WIDGETS_JS)
    assert got == want
    assert location(b) == link



@pytest.mark.parametrize("step", range(1, 6))
def test_tour_step_shows_its_picture(server, page, step: int) -> None:
    open_page(page, page_url(server.url, "", {"step": str(step)}), "h1")
    assert "Why residual networks work" in page.locator("h1").first.inner_text()
    poll(lambda: page.locator(PLOT).count() >= 1, 60, what="the step's picture")
    screenshot(page, f"tour-step-{step}")
    assert_no_exception(page)
    assert error_texts(page) == []
    assert all(chart["traces"] or step == 1 for chart in plot_data(page))  # step 1 is a drawing of shapes
