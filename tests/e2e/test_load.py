"""Reliability in a real browser: closed tabs, dropped connections, many users at once, double clicks, divergence.

The sidebar shows how many training worker threads the server process is running ("Training on this
server: N of CAP runs"); it is read from a fresh page, so every check sees the server's real state.
The test server runs with ``server.disconnectedSessionTTL`` = SESSION_TTL_S and a cap of JOB_CAP jobs.
"""

from __future__ import annotations

import math
import re
import time

import pytest
from e2ehelpers import (
    JOB_CAP,
    SESSION_TTL_S,
    TINY,
    TINY_RUN,
    assert_no_exception,
    error_texts,
    http_get,
    open_page,
    page_url,
    plot_data,
    poll,
    screenshot,
    sidebar_text,
    slots,
    wait_idle,
)

pytestmark = pytest.mark.browser

LONG = {**TINY, "bs": "16", "nt": "1000", "ep": "50"}  # 3,100 steps: minutes, unless stopped
GRACE = SESSION_TTL_S + 20  # a closed session's job must be gone by then (TTL, one step, a busy machine)
REFUSED = "already going on this server"


def _load(server, page) -> tuple[int, int]:
    """(worker threads training, cap) as a freshly loaded page reports them."""
    open_page(page, page_url(server.url, "train"), "h1")
    found = slots(page)
    assert found is not None, sidebar_text(page)
    return found


def _wait_workers(server, page, want: int, timeout: float) -> float:
    """Reload until the server runs ``want`` training threads; returns the seconds it took."""
    t0 = time.monotonic()
    poll(lambda: _load(server, page)[0] == want, timeout, every=1.0, what=f"{want} training threads on the server")
    return time.monotonic() - t0


@pytest.fixture
def observer(server, new_context):
    """A separate tab that only watches the server's load; the test starts with nothing training."""
    page = new_context().new_page()
    _wait_workers(server, page, 0, GRACE + 30)
    return page


def _start(page) -> None:
    page.get_by_role("button", name="Start").click()


def _step(page) -> int:
    """The step of this session's run from the sidebar's progress line (0 when none)."""
    m = re.search(r"Training ResNet-\d+: step (\d+)/", sidebar_text(page))
    return int(m.group(1)) if m else 0


def _run_labels(page) -> list[str]:
    """The runs this session lists in the Train page's run picker."""
    box = page.get_by_role("combobox", name="Show run", exact=True)
    if box.count() == 0:
        return []
    box.focus()
    page.keyboard.press("ArrowDown")
    labels = page.get_by_role("option").all_inner_texts()
    page.keyboard.press("Escape")
    box.blur()
    return labels


def test_closed_tab_stops_its_job_within_the_session_ttl(server, new_context, observer) -> None:
    ctx = new_context()
    tab = ctx.new_page()
    open_page(tab, page_url(server.url, "train", LONG), "h1")
    _start(tab)
    poll(lambda: _step(tab) > 0, 90, what="training to start")
    assert _load(server, observer) == (1, JOB_CAP)
    ctx.close()
    took = _wait_workers(server, observer, 0, GRACE)
    assert took < GRACE
    assert server.healthy()


def test_dropped_connection_resumes_the_same_job(server, proxy, new_context, observer) -> None:
    """A network blip: the websocket drops and the browser reconnects to its session within the TTL."""
    tab = new_context().new_page()
    open_page(tab, page_url(proxy.url, "train", LONG), "h1")
    _start(tab)
    before = poll(lambda: _step(tab) > 5 and _step(tab), 90, what="a few training steps")
    labels = _run_labels(tab)
    assert len(labels) == 1 and "running" in labels[0], labels
    proxy.cut()
    poll(lambda: _step(tab) > before, 60, what="training to go on after the reconnect")
    after = poll(lambda: _run_labels(tab), 30, what="the run list after the reconnect")
    assert len(after) == 1 and after[0].split(" (")[0] == labels[0].split(" (")[0], (labels, after)
    assert _load(server, observer)[0] == 1  # the same job, no second one
    screenshot(tab, "reconnected")
    tab.get_by_role("button", name="Stop").click()
    _wait_workers(server, observer, 0, 60)


def test_reload_is_a_new_session_and_leaves_no_duplicate_job(server, new_context, observer) -> None:
    """Streamlit ties a session to one page load: a reload starts a new session with no run in it."""
    tab = new_context().new_page()
    open_page(tab, page_url(server.url, "train", LONG), "h1")
    _start(tab)
    poll(lambda: _step(tab) > 0, 90, what="training to start")
    open_page(tab, page_url(server.url, "train", LONG), "h1")  # reload
    assert _run_labels(tab) == [] and _step(tab) == 0
    assert _load(server, observer)[0] <= 1  # the old session's job, until its TTL ends it
    _wait_workers(server, observer, 0, GRACE)


def test_eight_users_pressing_start_at_once_respect_the_cap(server, new_context, observer) -> None:
    tabs = [new_context().new_page() for _ in range(8)]
    for tab in tabs:  # all eight sessions start their first script run at about the same time
        tab.goto(page_url(server.url, "train", LONG))
    for tab in tabs:
        tab.wait_for_selector("h1")
        wait_idle(tab)
    for tab in tabs:
        _start(tab)

    def outcome(tab) -> str:
        if any(REFUSED in e for e in error_texts(tab)):
            return "refused"
        return "running" if _step(tab) > 0 else ""

    results = [poll(lambda t=tab: outcome(t), 120, what="Start to be answered") for tab in tabs]
    assert results.count("running") == JOB_CAP and results.count("refused") == 8 - JOB_CAP, results
    msg = next(e for t, r in zip(tabs, results) if r == "refused" for e in error_texts(t))
    assert "wait for one to finish" in msg
    screenshot(tabs[results.index("refused")], "load-refused")
    status, body = http_get(f"{server.url}/_stcore/health", timeout=10)
    assert (status, body.strip()) == (200, b"ok")
    assert _load(server, observer) == (JOB_CAP, JOB_CAP)
    for tab in tabs:  # every page still answers: a rerun renders without an exception
        assert_no_exception(tab)
        assert tab.locator("h1").first.inner_text().startswith("Train")
    for tab in tabs:
        tab.context.close()
    _wait_workers(server, observer, 0, GRACE + 10)


def test_double_clicked_start_and_stop_make_one_job_and_stop_it(server, new_context, observer) -> None:
    tab = new_context().new_page()
    open_page(tab, page_url(server.url, "train", LONG), "h1")
    tab.get_by_role("button", name="Start").dblclick()
    poll(lambda: _step(tab) > 0, 90, what="training to start")
    assert len(_run_labels(tab)) == 1
    assert _load(server, observer)[0] == 1
    tab.get_by_role("button", name="Stop").dblclick()
    poll(lambda: "Training was stopped" in tab.inner_text("body"), 60, what="the stopped message")
    poll(lambda: tab.get_by_role("button", name="Start").is_enabled(), 60, what="Start to be enabled again")
    labels = _run_labels(tab)
    assert len(labels) == 1 and "stopped" in labels[0], labels
    assert _load(server, observer)[0] == 0
    assert_no_exception(tab)


def test_diverging_learning_rate_is_reported_and_charts_stay_finite(server, page) -> None:
    # Linear blocks (identity activation) at lr 2 with a constant schedule blow up within a few dozen steps.
    open_page(page, page_url(server.url, "train", {**TINY_RUN, "ep": "5", "a": "identity", "lr": "2", "sch": "constant"}), "h1")
    _start(page)
    poll(lambda: any("diverged" in e for e in error_texts(page)), 90, what="the divergence message")
    msg = next(e for e in error_texts(page) if "diverged" in e)
    assert "lower learning rate" in msg
    poll(lambda: any(c["title"] == "Training curves" for c in plot_data(page)), 60, what="the training curves")
    wait_idle(page)  # the run has ended: the page redraws once more, then stays still
    screenshot(page, "diverged")
    charts = plot_data(page)
    for chart in charts:
        for trace in chart["traces"]:
            values = [v for v in trace["y"] if isinstance(v, (int, float))]
            assert all(math.isfinite(v) for v in values), (chart["title"], trace["name"])
            if chart["title"] == "Training curves" and trace["name"].endswith("train"):
                assert None not in trace["y"] and values, trace["name"]
    assert_no_exception(page)
