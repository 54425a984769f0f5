"""The README's performance tables, drawn from saved ``bench/bench.py --json`` outputs.

The README marks each generated block with ``<!-- bench:<name> -->`` and ``<!-- /bench:<name> -->``;
everything between the marks is rewritten from ``bench/results/<name>.json``. A block whose saved
output does not exist is left as it is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench.timing import Row, load_results, markdown_table
from scripts.docgen.results import ROOT

BENCH_RESULTS = ROOT / "bench" / "results"


def block(name: str, header: dict[str, Any], rows: list[Row]) -> str:
    """The generated text of one saved run: where and how it was measured, then its table."""
    machine = "; ".join(line.rstrip(".") for line in header["machine"])
    command = "python bench/bench.py" + (" --quick" if header.get("quick") else "")
    sections = header.get("sections") or []
    if sections:
        command += f" --sections {','.join(sections)}"
    notes = [f"Measured by `{command}` ({header['wall_s']} s): {machine}; load average (1/5/15 min) "
             f"{header['load_start']} at the start and {header['load_end']} at the end.", "", markdown_table(rows)]
    unmet = [r.what for r in rows if r.met is False]
    if unmet:
        notes += ["", "Targets not met in this run: " + "; ".join(unmet) + "."]
    return "\n".join(notes)


def marks(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- bench:{name} -->\n)(.*?)(<!-- /bench:{name} -->)", re.S)


def render(readme: str, folder: Path = BENCH_RESULTS) -> str:
    """``readme`` with every marked block whose saved output exists rewritten from it."""
    for name in re.findall(r"<!-- bench:([a-z0-9_-]+) -->", readme):
        path = folder / f"{name}.json"
        if path.is_file():
            header, rows = load_results(path)
            text = block(name, header, rows)
            readme = marks(name).sub(lambda m, t=text: m.group(1) + t + "\n" + m.group(3), readme)
    return readme
