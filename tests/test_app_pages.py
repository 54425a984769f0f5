"""Every page the navigation lists loads through the router without an exception or an error."""

from __future__ import annotations

import ast
import re

import pytest
from apphelpers import ROOT, TINY, app, navigation, ok

NAV_PAGES = ["", "design", "train", "inspect", "experiments"]  # the URL paths every shared link uses


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))


def test_navigation_lists_the_pages_in_order() -> None:
    titles = ["Why residual networks work", "Design", "Train", "Inspect", "Experiments"]
    assert navigation(app(TINY)) == list(zip(NAV_PAGES, titles, strict=True))


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


def _app_pages_imports() -> dict[str, set[str]]:
    """Which modules of ``app_pages`` each module of ``app_pages`` imports (at any depth of its code)."""
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "app_pages").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "app_pages":
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("app_pages."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("app_pages.")}
        graph[path.stem] = deps
    return graph


def test_app_pages_have_no_import_cycle_and_state_is_the_bottom_layer() -> None:
    graph = _app_pages_imports()
    assert graph["state"] == set(), "the session-state module imports nothing from app_pages"
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for dep in graph.get(name, ()):
                visit(dep, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())


def test_pages_render_only_when_called() -> None:
    """A page module defines ``render`` and draws nothing at import: the router owns the frame."""
    for name in ("design", "train", "inspection", "experiments"):
        tree = ast.parse((ROOT / "app_pages" / f"{name}.py").read_text())
        calls = [n for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)]
        assert calls == [], f"app_pages/{name}.py runs code at import"
        assert any(isinstance(n, ast.FunctionDef) and n.name == "render" for n in tree.body)
