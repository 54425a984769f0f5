"""The stored study runs behind docs/experiments.md, and the command that runs them again.

Each run is a fresh ``python -m resviz study`` process (so a study's CPU time includes the training it
needs, as it would for a user), with one torch thread and no HTML figures.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
CPU_FILE = RESULTS / "cpu.json"
ZOO_RESULTS = ROOT / "pretrained" / "studies"
SHIPPED = {"depth": 32, "width": 16, "input_size": 32, "order": "post", "source": "pretrained"}


@dataclass(frozen=True)
class StoredRun:
    """One study run the docs are drawn from: ``docs/results/<key>/result.json``."""

    key: str
    study: str
    budget: str = "small"
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    file: Path | None = None  # the zoo's results live beside its checkpoints, not in docs/results

    @property
    def path(self) -> Path:
        return self.file or RESULTS / self.key / "result.json"

    def command(self, out: Path) -> list[str]:
        """The CLI call that produces this run's result in ``out``."""
        sets = [a for k, v in self.overrides.items() for a in ("--set", f"{k}={v}")]
        return [sys.executable, "-m", "resviz", "--threads", "1", "--quiet", "study", self.study, "--budget",
                self.budget, "--seed", str(self.seed), "--no-figures", *sets, "--out", str(out)]


STUDY_NAMES = ("degradation", "lesion", "responses", "signal", "landscape", "shattered", "faithfulness")
RUNS: dict[str, StoredRun] = {
    **{name: StoredRun(name, name) for name in STUDY_NAMES},
    "lesion-shipped": StoredRun("lesion-shipped", "lesion", overrides=SHIPPED),
    "landscape-shipped": StoredRun("landscape-shipped", "landscape", overrides=SHIPPED),
    # on the converged zoo (budget "zoo"): stored by `python pretrained/make_pretrained.py --studies`
    **{f"{name}-zoo": StoredRun(f"{name}-zoo", name, budget="zoo", file=ZOO_RESULTS / f"{name}.json") for name in STUDY_NAMES},
}


def load(key: str) -> dict[str, Any]:
    """The stored result of run ``key``."""
    return json.loads(RUNS[key].path.read_text(encoding="utf-8"))


def load_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each stored run's process."""
    return json.loads(CPU_FILE.read_text(encoding="utf-8")) if CPU_FILE.is_file() else {}


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def refresh(keys: list[str] | None = None) -> None:
    """Run the studies ``keys`` (all by default) again and store their results and CPU times."""
    for key in keys or list(RUNS):
        run = RUNS[key]
        with tempfile.TemporaryDirectory() as tmp:
            before, t0 = _child_cpu(), time.perf_counter()
            subprocess.run(run.command(Path(tmp) / "run"), check=True, cwd=ROOT)
            used = round(_child_cpu() - before, 1)
            run.path.parent.mkdir(parents=True, exist_ok=True)
            if run.budget == "zoo":  # beside the zoo's checkpoints, with the command that recomputes it
                from resviz.experiments.stored import store

                store(json.loads((Path(tmp) / "run" / "result.json").read_text(encoding="utf-8")), run.path.parents[1])
            else:
                shutil.copyfile(Path(tmp) / "run" / "result.json", run.path)
        print(f"{key}: {used:.0f} s CPU, {time.perf_counter() - t0:.0f} s wall", flush=True)
        cpu = {**load_cpu(), key: used}  # read again: another refresh may have stored its runs meanwhile
        CPU_FILE.write_text(json.dumps(dict(sorted(cpu.items())), indent=2) + "\n", encoding="utf-8")
