"""Fixtures for the real-browser tests: one `streamlit run` server per test session, Chromium, fresh contexts.

Skipped (with the reason) when Debian's Chromium is not installed; `make test` installs it through
scripts/ensure_chromium.sh. The server gets a short disconnected-session TTL so that tests about
closed tabs finish in seconds, and its own empty runs folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
from e2ehelpers import CHROMIUM, CHROMIUM_ARGS, JOB_CAP, SESSION_TTL_S, Proxy, Server


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium, or `make test`)")
    pytest.importorskip("playwright.sync_api", reason="browser tests need the playwright package (requirements-dev.txt)")
    return CHROMIUM


@pytest.fixture(scope="session")
def server(chromium_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("e2e-server")
    env = {"RESVIZ_MAX_JOBS": str(JOB_CAP), "RESVIZ_RUNS": str(tmp / "runs"), "PYTHONUNBUFFERED": "1"}
    srv = Server(env, {"server.disconnectedSessionTTL": str(SESSION_TTL_S)}, tmp / "streamlit.log")
    try:
        srv.wait_healthy(60)
        yield srv
    finally:
        srv.stop()
        assert srv.proc.poll() is not None and not srv.group_alive(), "the streamlit server left processes behind"


@pytest.fixture(scope="session")
def browser(chromium_path: str) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def new_context(browser) -> Iterator:
    """Factory of fresh browser contexts (separate cookies and Streamlit sessions), closed after the test."""
    made = []

    def make():
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        ctx.set_default_timeout(90_000)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        with contextlib.suppress(Exception):  # already closed by the test
            ctx.close()


@pytest.fixture
def page(new_context):
    return new_context().new_page()


@pytest.fixture
def proxy(server: Server) -> Iterator[Proxy]:
    p = Proxy(server.port)
    yield p
    p.close()
