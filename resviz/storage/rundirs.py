"""Run directories: what ``python -m resviz`` writes and what the app opens again.

A run directory holds::

    config.json       what was run: {"kind": "train" | "study", ...}
    metrics.jsonl     one JSON object per line, flushed after each line (training steps, study progress)
    result.json       a study's result (plain data; see resviz.experiments)
    summary.json      a training run's final metrics
    <name>.safetensors + <name>.json   checkpoints (resviz.storage.checkpoints)
    *.html            figures (self-contained Plotly pages)

:func:`load_run` reads whatever of this is present and never fails on a half-written last line of
``metrics.jsonl`` (a run that is still going, or one that was killed): the earlier lines are returned.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

CONFIG, METRICS, RESULT, SUMMARY = "config.json", "metrics.jsonl", "result.json", "summary.json"


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values from dataclasses, numpy/torch scalars and arrays, tuples and paths.

    Non-finite floats become ``None`` so the output is strict JSON.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON text of ``obj`` (see :func:`to_jsonable`)."""
    return json.dumps(to_jsonable(obj), allow_nan=False, **kw)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a run directory is meant to be read
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(dumps(obj, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line, flushed (and fsynced) per line."""

    def __init__(self, path: str | os.PathLike, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._fh: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            raise ValueError(f"{self.path} is closed")
        self._fh.write(dumps(record, sort_keys=True) + "\n")
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of a JSON-lines file and notes about lines that were skipped.

    A last line without its newline that does not parse is a write in progress (or cut off by a
    kill): it is skipped quietly. Any other line that does not parse to an object is skipped with a note.
    """
    text = Path(path).read_text("utf-8", errors="replace")
    lines = text.split("\n")
    records, notes = [], []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines):  # no newline after it: half-written
                notes.append(f"{Path(path).name}: the last line is incomplete (run still writing or cut off); skipped")
            else:
                notes.append(f"{Path(path).name}: line {i} is not valid JSON; skipped")
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            notes.append(f"{Path(path).name}: line {i} is not a JSON object; skipped")
    return records, notes


@dataclass
class RunData:
    """Everything found in a run directory."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None  # a study's result
    summary: dict[str, Any] | None = None  # a training run's final metrics
    checkpoints: list[Path] = field(default_factory=list)  # the .safetensors files
    figures: list[Path] = field(default_factory=list)  # the .html files
    notes: list[str] = field(default_factory=list)  # what could not be read, in user-facing words

    @property
    def kind(self) -> str:
        """``"study"``, ``"train"`` or ``"unknown"``."""
        return str(self.config.get("kind") or ("study" if self.result is not None else "unknown"))


def _read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        notes.append(f"{path.name} could not be read ({str(e)[:120]})")
        return None
    if not isinstance(obj, dict):
        notes.append(f"{path.name} is not a JSON object")
        return None
    return obj


def load_run(path: str | os.PathLike) -> RunData:
    """Read a run directory written by ``python -m resviz`` (training or a study).

    Raises:
        FileNotFoundError: ``path`` is not a directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no run directory at {root}")
    run = RunData(path=root)
    run.config = _read_json(root / CONFIG, run.notes) or {}
    run.result = _read_json(root / RESULT, run.notes)
    run.summary = _read_json(root / SUMMARY, run.notes)
    if (root / METRICS).is_file():
        run.metrics, notes = read_jsonl(root / METRICS)
        run.notes += notes
    run.checkpoints = sorted(root.glob("*.safetensors"))
    run.figures = sorted(root.glob("*.html"))
    return run


def list_runs(root: str | os.PathLike) -> list[Path]:
    """Run directories directly under ``root`` (those with a config.json or result.json), newest first."""
    base = Path(root)
    if not base.is_dir():
        return []
    found = [p for p in base.iterdir() if p.is_dir() and ((p / CONFIG).is_file() or (p / RESULT).is_file())]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
