"""The layout's promises: no import cycle anywhere in resviz/ or app_pages/, and packages import one way."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each package may import only packages after it in this order (see docs/architecture.md).
LAYERS = ["cli", "launch", "experiments", "jobs", "anymodel", "external", "zoo", "train", "analysis", "storage", "nn",
          "data", "plots", "theme", "urlconfig", "config", "runtime", "version"]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(top: str) -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in its code, lazy imports included)."""
    modules = {_module(p): p for p in (ROOT / top).rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> list[str] | None:
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*path, n, m]
            if m not in state and (found := visit(m, [*path, n])):
                return found
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n, [])):
            return found
    return None


def test_no_import_cycle_in_the_library_or_the_app() -> None:
    for top in ("resviz", "app_pages"):
        graph = _imports(top)
        # a package's __init__ re-exporting its own modules is not a cycle of the design
        flat = {n: {m for m in ms if not n.startswith(m + ".") and not (m.count(".") < n.count(".") and n.startswith(m))}
                for n, ms in graph.items()}
        assert _cycle(flat) is None, f"import cycle: {' -> '.join(_cycle(flat))}"


def test_packages_import_one_way() -> None:
    graph = _imports("resviz")
    rank = {name: i for i, name in enumerate(LAYERS)}
    wrong = []
    for mod, targets in graph.items():
        src = mod.split(".")[1] if "." in mod else None
        for t in targets:
            dst = t.split(".")[1] if "." in t else None
            if src in rank and dst in rank and src != dst and rank[dst] < rank[src]:
                wrong.append(f"{mod} -> {t}")
    assert not wrong, wrong
