"""Shared helpers for the AppTest suites: every page runs through the real router and frame of ``app.py``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
TIMEOUT = 120
# A net small enough that every page renders in about a second: ResNet-8, width 4, 16x16 inputs.
TINY = {"d": "8", "w": "4", "r": "16"}


def app(params: dict[str, str] | None = None, page: str | None = None) -> AppTest:
    """The whole app (router, sidebar, URL state) run once, optionally on another page (its URL path)."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update(params or {})
    at.run()
    if page is not None:
        goto(at, page).run()
    return at


def goto(at: AppTest, url_path: str) -> AppTest:
    """Open the page registered under ``url_path`` ("" is the default page) on the next run.

    ``AppTest.switch_page`` finds pages by file only; a page that is a function is known to
    ``st.navigation`` by the hash of its URL path, which is what a browser's page change sends.
    """
    hashes = {info.get("url_pathname"): h for h, info in at._registered_pages.items()}
    if url_path not in hashes:
        raise ValueError(f"no page at {url_path!r}; the navigation has {sorted(map(str, hashes))}")
    at._page_hash = hashes[url_path]
    return at


def navigation(at: AppTest) -> list[tuple[str, str]]:
    """(URL path, title) of every page the last run's ``st.navigation`` registered, in menu order."""
    return [(info["url_pathname"], info["page_name"]) for info in at._registered_pages.values()]


def ok(at: AppTest) -> AppTest:
    """Assert the last run raised nothing and showed no error."""
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def poll(at: AppTest, done: Callable[[AppTest], bool], timeout: float = 90.0, every: float = 0.5) -> AppTest:
    """Rerun the script until ``done(at)`` (AppTest runs synchronously, so live regions need polling)."""
    deadline = time.monotonic() + timeout
    while True:
        at.run()
        assert not at.exception, at.exception
        if done(at):
            return at
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; progress: {[p.proto.text for p in at.get('progress')]}")
        time.sleep(every)


def kinds(node: object) -> list[str]:
    """Block or element at each index of a node's children: where a late refresh of a live fragment
    writes, a block must stay a block (an element there crashes the browser's page)."""
    from streamlit.testing.v1.element_tree import Block

    children = node.children  # type: ignore[attr-defined]
    return ["block" if isinstance(children[i], Block) else "element" for i in sorted(children)]
