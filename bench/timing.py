"""Timing helpers for the benchmark: interleaved rounds, paired ratios, medians, one result table.

A shared, loaded machine makes single timings unreliable, so every comparison here is made in the
same run: the candidate and its baseline take turns in short rounds (the order rotates from round to
round). Two ratios come out of that: the ratio of the best rounds (the rounds the machine's other
load disturbed least, as ``timeit`` recommends) and the median of the per-round ratios.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def interleaved(steppers: dict[str, Callable[[], object]], rounds: int, steps: int,
                sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each stepper in each round; the order of the steppers rotates per round."""
    names = list(steppers)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = time.perf_counter()
            remote = getattr(steppers[name], "run_steps", None)
            if remote is not None:  # runs in another process and times itself (no round trip per step)
                elapsed = remote(steps)
            else:
                for _ in range(steps):
                    steppers[name]()
            sync()
            times[name].append((elapsed if remote is not None else time.perf_counter() - t0) / steps)
    return times


def paired(base: Callable[[], object], fn: Callable[[], object], reps: int) -> tuple[float, float, float, float]:
    """Time ``base`` and ``fn`` alternately: (best seconds of base, of fn, their ratio fn/base, median of
    the per-rep ratios)."""
    base(), fn()  # warm-up
    tb, tf = [], []
    for i in range(reps):
        for f, out in ((base, tb), (fn, tf)) if i % 2 == 0 else ((fn, tf), (base, tb)):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return min(tb), min(tf), min(tf) / min(tb), median_ratio(tf, tb)


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[r] / den[r]."""
    return statistics.median(n / d for n, d in zip(num, den))


def best_ratio(num: list[float], den: list[float]) -> float:
    """min(num) / min(den): the ratio of the least disturbed rounds."""
    return min(num) / min(den)


@dataclass
class Row:
    """One line of the result table."""

    section: str
    what: str
    result: str
    baseline: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    median: float | None = None  # the median of the per-round ratios, shown beside the best-round ratio
    data: dict[str, Any] = field(default_factory=dict)  # the row's measured values, for readers of the saved JSON

    def cells(self) -> list[str]:
        ratio = f"{self.ratio:.2f}x" if self.ratio is not None else ""
        if self.median is not None:
            ratio += f" (median {self.median:.2f}x)"
        met = {True: "yes", False: "**no**", None: ""}[self.met]
        return [c.replace("|", "\\|") for c in (self.section, self.what, self.result, self.baseline, ratio, self.target, met)]


def markdown_table(rows: list[Row]) -> str:
    head = ["#", "measurement", "result", "baseline (same run)", "ratio", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def save_results(path: str | Path, header: dict[str, Any], rows: list[Row]) -> Path:
    """Write a run's header (machine, load, date, options) and rows as JSON: what ``make docs`` publishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = _finite({**header, "rows": [asdict(r) for r in rows]})
    path.write_text(json.dumps(saved, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _finite(v: Any) -> Any:
    """Strict JSON values: NaN and infinities (a failed or unmeasured row) become None."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


def load_results(path: str | Path) -> tuple[dict[str, Any], list[Row]]:
    """The header and rows of a file written by :func:`save_results`."""
    saved = json.loads(Path(path).read_text(encoding="utf-8"))
    return {k: v for k, v in saved.items() if k != "rows"}, [Row(**r) for r in saved["rows"]]
