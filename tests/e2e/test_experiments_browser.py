"""Real browser: every study of the Experiments page shows its stored result on the converged zoo within 3 s."""

from __future__ import annotations

import time

import pytest
from e2ehelpers import PLOT, assert_no_exception, error_texts, open_page, page_url, poll, screenshot, wait_idle

from app_pages.experiments import shown_figures
from resviz.experiments import STUDIES, stored

pytestmark = pytest.mark.browser
LIMIT_S = 3.0


def _choose(page, title: str) -> None:
    """Pick ``title`` in the Study select box as a person does: open it, click the option."""
    page.locator('[data-testid="stSelectbox"]').filter(has_text="Study").first.click()
    page.get_by_role("option", name=title, exact=True).click()


def test_every_study_shows_its_zoo_result_within_3_s(server, page) -> None:
    open_page(page, page_url(server.url, "experiments"), "h1")
    times = {}
    for name, study in STUDIES.items():
        result = stored.load_stored(name)
        assert result is not None, name
        charts = len(shown_figures(result))
        t0 = time.perf_counter()
        if name != next(iter(STUDIES)):
            _choose(page, study.title)
        cmd = stored.command(name)
        poll(lambda c=charts, cmd=cmd: page.get_by_text("On the converged zoo").count() == 1
             and page.locator(PLOT).count() >= c and cmd in page.inner_text("body"), 30, every=0.1,
             what=f"{name}'s stored result")
        times[name] = time.perf_counter() - t0
        wait_idle(page)
        screenshot(page, f"experiments-zoo-{name}")
        assert_no_exception(page)
        assert error_texts(page) == []
    slow = {k: round(v, 2) for k, v in times.items() if v > LIMIT_S}
    assert not slow, f"studies slower than {LIMIT_S} s to show their stored result: {slow}"
