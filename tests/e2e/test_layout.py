"""Every page at 1280x900 and 1920x1080: nothing cut off, quick once warm, a full-page screenshot of each.

One browser context per size walks every page and tour step (the session's one server and browser).
At each stop it checks that no metric value, label or delta, select box value, tab, widget label or
equation is wider than its box (``scrollWidth > clientWidth + 1``: the text is clipped or ends in an
ellipsis), and saves a full-page screenshot as ``artifacts/screenshots/layout-<page>-<W>x<H>.png``.
The second size runs on warm caches, so there every page must render within ``WARM_S`` seconds.
"""

from __future__ import annotations

import time

import pytest
from e2ehelpers import (
    PLOT,
    SCREENSHOTS,
    TINY_RUN,
    WAIT_MS,
    assert_no_exception,
    choose,
    error_texts,
    page_url,
    poll,
    wait_idle,
)

pytestmark = pytest.mark.browser

SIZES = ((1280, 900), (1920, 1080))
WARM_S = 3.0
# (name, URL path and query, charts the page draws): the Design page at the default ResNet-32 and at
# ResNet-110 (54 blocks, its architecture collapsed into stages), the Inspect page on the shipped
# ResNet-32, and every tour step.
PAGES = [("design", "design", {}, 3), ("design-110", "design", {"d": "110"}, 3), ("train", "train", {}, 0),
         ("inspect", "inspect", {}, 5), ("experiments", "experiments", {}, 0),
         *[(f"tour-{k}", "", {"step": str(k)}, 1 if k < 6 else 0) for k in range(1, 7)]]
# Text that must fit its box, and how to name an offender in the failure message.
OVERFLOW_JS = """() => {
  const sel = ['[data-testid=stMetricValue] *', '[data-testid=stMetricLabel] *', '[data-testid=stMetricDelta] *',
               '[data-testid=stSelectbox] input', '[role=tab]', '[role=tab] *', '[data-testid=stWidgetLabel] p',
               '[data-testid=stCheckbox] p', '.katex-display', '[data-testid=stButtonGroup] button p'].join(', ');
  return Array.from(document.querySelectorAll(sel))
    .filter(e => !e.closest('[data-stale="true"]') && e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1)
    .map(e => {
      const box = e.closest('[data-testid^="st"]');
      return `${box ? box.getAttribute('data-testid') : e.tagName}: ${(e.value || e.innerText || '').slice(0, 60)}`
        + ` (${e.scrollWidth} > ${e.clientWidth} px)`;
    });
}"""
MAIN_HEIGHT_JS = "() => Math.max(...Array.from(document.querySelectorAll('[data-testid=stMain]')).map(e => e.scrollHeight), 0)"


def _render(page, url: str, charts: int, timeout_ms: int) -> float:
    """Open ``url`` and wait until its title, its charts and the end of its script run are there; seconds taken."""
    t0 = time.monotonic()
    page.goto(url)
    page.wait_for_selector("h1", timeout=timeout_ms)
    if charts:
        poll(lambda: page.locator(PLOT).count() >= charts, timeout_ms / 1000, every=0.1, what=f"{charts} charts")
    wait_idle(page, timeout_ms / 1000)
    return time.monotonic() - t0


def _full_screenshot(page, name: str) -> None:
    """The whole page: Streamlit scrolls inside its main block, so the window grows to that block's height."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": max(size["height"], page.evaluate(MAIN_HEIGHT_JS))})
    page.wait_for_timeout(400)  # the charts re-lay themselves out
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
    page.set_viewport_size(size)


def _check(page, name: str) -> list[str]:
    assert_no_exception(page)
    assert error_texts(page) == [], name
    page.wait_for_timeout(300)  # fonts and charts settle before widths are read
    return [f"{name}: {o}" for o in page.evaluate(OVERFLOW_JS)]


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_every_page_fits_its_boxes_and_renders_quickly(server, browser, width: int, height: int) -> None:
    ctx = browser.new_context(viewport={"width": width, "height": height})
    ctx.set_default_timeout(WAIT_MS)
    page = ctx.new_page()
    overflow, slow = [], []
    try:
        for name, path, params, charts in PAGES:
            url = page_url(server.url, path, params)
            seconds = _render(page, url, charts, WAIT_MS)
            if width == SIZES[-1][0] and seconds > WARM_S:  # warm: the first size filled the caches
                seconds = min(seconds, _render(page, url, charts, WAIT_MS))  # once more, in case of a load spike
                if seconds > WARM_S:
                    slow.append(f"{name}: {seconds:.1f} s")
            overflow += _check(page, name)
            _full_screenshot(page, f"layout-{name}-{width}x{height}")
    finally:
        ctx.close()
    assert not overflow, overflow
    assert not slow, f"pages slower than {WARM_S} s once warm: {slow}"


def test_modified_net_metrics_and_a_run_fit_at_1280(server, browser) -> None:
    """The two states the page walk does not reach: Inspect with a lesion (its comparison metrics) and
    the Train page with a finished run (accuracy metrics, live charts)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(WAIT_MS)
    page = ctx.new_page()
    try:
        _render(page, page_url(server.url, "inspect"), 5, WAIT_MS)
        choose(page, "Skip connection off (plain block)", "block 0 (stage 1, 16 ch)")
        poll(lambda: page.locator('[data-testid="stMetric"]').count() == 3, 90, what="the comparison metrics")
        wait_idle(page)
        problems = _check(page, "inspect-lesion")
        _full_screenshot(page, "layout-inspect-lesion-1280x900")
        chart = page.locator(PLOT).first
        chart.hover()
        assert page.locator('.modebar-btn[data-title^="Download plot"]').first.is_visible()

        _render(page, page_url(server.url, "train", {**TINY_RUN, "ep": "1"}), 0, WAIT_MS)
        page.get_by_role("button", name="Start").click()
        poll(lambda: "Training finished" in page.inner_text("body"), 180, what="the run to finish")
        poll(lambda: page.locator(PLOT).count() >= 4, 60, what="the run's charts")
        wait_idle(page)
        problems += _check(page, "train-run")
        _full_screenshot(page, "layout-train-run-1280x900")
        assert page.get_by_role("button", name="CSV").count() >= 4
    finally:
        ctx.close()
    assert not problems, problems
