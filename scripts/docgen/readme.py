"""The README's generated blocks: performance tables from saved ``bench/bench.py --json`` outputs, and
the shipped checkpoints' accuracy from ``pretrained/manifest.json``.

The README marks each generated block with ``<!-- bench:<name> -->`` and ``<!-- /bench:<name> -->``;
everything between the marks is rewritten from ``bench/results/<name>.json``. A block whose saved
output does not exist is left as it is. ``<!-- pretrained -->`` ... ``<!-- /pretrained -->`` holds the
manifest's table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from bench.timing import Row, load_results, markdown_table
from scripts.docgen.results import ROOT

BENCH_RESULTS = ROOT / "bench" / "results"
MANIFEST = ROOT / "pretrained" / "manifest.json"


def block(name: str, header: dict[str, Any], rows: list[Row]) -> str:
    """The generated text of one saved run: where and how it was measured, then its table."""
    machine = "; ".join(line.rstrip(".") for line in header["machine"])
    command = header.get("command") or " ".join(
        ["python bench/bench.py", *(["--quick"] if header.get("quick") else []), "--sections", ",".join(header["sections"])])
    notes = [f"Measured by `{command}` ({header['wall_s']} s): {machine}; load average (1/5/15 min) "
             f"{header['load_start']} at the start and {header['load_end']} at the end.", "", markdown_table(rows)]
    unmet = [r.what for r in rows if r.met is False]
    if unmet:
        notes += ["", "Targets not met in this run: " + "; ".join(unmet) + "."]
    return "\n".join(notes)


def marks(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- {name} -->\n)(.*?)(<!-- /{name} -->)", re.S)


def pretrained_table(manifest: dict[str, Any]) -> str:
    """One row per shipped checkpoint: name, what it is, its recorded test accuracy."""
    def trained(c: dict[str, Any]) -> str:
        if c.get("train_time_s") is None:
            return "-"
        where = c.get("trained_on") or c.get("train", {}).get("device", "cpu")
        return f"{c['train_time_s'] / 60:.1f} min on {where}" + (f", {c['threads']} thread" if c.get("threads") else "")

    rows = [f"| `{c['name']}` | {c['description']} | {c['test_acc']:.1%} | {trained(c)} |" for c in manifest["checkpoints"]]
    return "\n".join(["| checkpoint | what | test accuracy | training |", "|---|---|---|---|", *rows])


def _replace(readme: str, name: str, text: str) -> str:
    return marks(name).sub(lambda m: m.group(1) + text + "\n" + m.group(3), readme)


def render(readme: str, folder: Path = BENCH_RESULTS, manifest: Path = MANIFEST) -> str:
    """``readme`` with every marked block whose saved output exists rewritten from it."""
    for name in re.findall(r"<!-- bench:([a-z0-9_-]+) -->", readme):
        path = folder / f"{name}.json"
        if path.is_file():
            readme = _replace(readme, f"bench:{name}", block(name, *load_results(path)))
    if "<!-- pretrained -->" in readme and manifest.is_file():
        readme = _replace(readme, "pretrained", pretrained_table(json.loads(manifest.read_text(encoding="utf-8"))))
    return readme
