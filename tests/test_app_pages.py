"""Every page the navigation lists loads through the router without an exception or an error."""

from __future__ import annotations

import re

import pytest
from apphelpers import ROOT, TINY, app, ok

NAV_PAGES = [p for p in re.findall(r'"(app_pages/\w+\.py)"', (ROOT / "app.py").read_text()) if (ROOT / p).is_file()]


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))


def test_navigation_lists_the_core_pages() -> None:
    assert NAV_PAGES[:3] == ["app_pages/design.py", "app_pages/train.py", "app_pages/inspection.py"]


@pytest.mark.parametrize("page", NAV_PAGES)
def test_page_loads(page: str) -> None:
    at = ok(app(TINY, page))
    assert at.sidebar.caption, "the shared sidebar is drawn on every page"
    assert len(at.main.children) > 1


def test_resviz_never_imports_streamlit() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+streamlit", re.M)
    offenders = [p.name for p in (ROOT / "resviz").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_app_router_has_no_torch_logic() -> None:
    assert not re.search(r"^\s*(import|from)\s+(torch|resviz)", (ROOT / "app.py").read_text(), re.M)
