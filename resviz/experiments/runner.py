"""Run a study by name, save it as a run directory, or run it in a background thread for the app.

:func:`run_study` is the one entry point of the CLI and the Experiments page: it builds the config
from a budget and a seed, runs the study and returns its result as plain JSON data, exactly what
``result.json`` holds. :class:`StudyJob` runs it in a daemon thread (it never touches streamlit); it is
a :class:`resviz.jobs.Job`, submitted to the same registry as training runs, and
:meth:`StudyJob.snapshot` is the thread-safe view the page polls.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

from resviz import runtime
from resviz.experiments import get_study
from resviz.experiments.common import ProgressFn
from resviz.storage.rundirs import CONFIG, METRICS, RESULT, MetricsLog, to_jsonable, write_json
from resviz.train import distributed
from resviz.train.records import Status

WORKER_PREFIX = "resviz-job-study-"  # counted by resviz.jobs.live_workers with the training workers


class StudyCancelledError(Exception):
    """Raised inside a study (through its progress callback) when its job is stopped."""


def run_study(name: str, budget: str = "small", seed: int = 0, *, out: str | Path | None = None,
              progress: ProgressFn | None = None, overrides: dict[str, Any] | None = None,
              save_figures: bool = True) -> dict[str, Any]:
    """Run study ``name`` and return its result as plain JSON data (also written to ``out`` when given).

    Under torchrun every rank computes its share; only rank 0 writes ``out``.
    """
    study = get_study(name)
    cfg = study.make_config(budget, seed, **(overrides or {}))
    log = MetricsLog(Path(out) / METRICS) if out is not None and distributed.is_main() else None
    try:
        if log is not None:
            write_json(Path(out) / CONFIG, {"kind": "study", "study": name, "config": cfg.to_dict()})
        result = to_jsonable(study.module.run(cfg, _logging(progress, log)))
    finally:
        if log is not None:
            log.close()
    if out is not None and distributed.is_main():
        save_result(out, result, figures=save_figures)
    return result


def _logging(progress: ProgressFn | None, log: MetricsLog | None, every: float = 0.01) -> ProgressFn:
    """A progress callback that also appends a record to ``metrics.jsonl`` every 1% of progress."""
    last = [-1.0]
    t0 = time.perf_counter()

    def report(fraction: float, message: str) -> None:
        if log is not None and (fraction - last[0] >= every or fraction >= 1.0):
            last[0] = fraction
            log.write({"fraction": round(fraction, 4), "message": message, "time_s": round(time.perf_counter() - t0, 2)})
        if progress is not None:
            progress(fraction, message)

    return report


def save_result(out: str | Path, result: dict[str, Any], *, figures: bool = True) -> Path:
    """Write ``result.json`` and, when ``figures``, one HTML page per figure (plotly.js saved once beside them)."""
    out = Path(out)
    write_json(out / RESULT, result)
    if figures:
        for key, fig in study_figures(result).items():
            fig.write_html(out / f"{key}.html", include_plotlyjs="directory", full_html=True)
    return out


def study_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of a saved or fresh result, built by its study's module."""
    return get_study(result["study"]).module.figures(result)


class StudyJob:
    """One study in a worker thread, for the app: poll :meth:`snapshot`, stop with :meth:`stop`.

    Args:
        name, budget, seed, overrides: as for :func:`run_study`.
        out: run directory to save into (None: keep the result in memory only).
        num_threads: torch intra-op threads, set by the worker through :func:`resviz.runtime.tune` (1 keeps a
            2-core server responsive; None leaves torch's setting).
    """

    def __init__(self, name: str, budget: str = "small", seed: int = 0, *, out: str | Path | None = None,
                 overrides: dict[str, Any] | None = None, num_threads: int | None = 1) -> None:
        get_study(name)  # fail now, not in the thread, for an unknown name
        self.id, self.name, self.budget, self.seed = uuid.uuid4().hex[:12], name, budget, seed
        self.out, self.overrides, self.num_threads = out, dict(overrides or {}), num_threads
        self._lock, self._cancel = threading.Lock(), threading.Event()
        self._state: dict[str, Any] = {"status": Status.PENDING, "progress": 0.0, "message": "", "error": "", "result": None,
                                       "started": None, "ended": None}
        self._thread: threading.Thread | None = None

    def start(self) -> StudyJob:
        with self._lock:
            if self._thread is None and self._state["status"] == Status.PENDING:
                self._state.update(status=Status.RUNNING, started=time.time())
                self._thread = threading.Thread(target=self._run, name=f"{WORKER_PREFIX}{self.id}", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the study to stop at its next progress report (a study never started stops at once)."""
        with self._lock:
            self._cancel.set()
            if self._thread is None and self._state["status"] == Status.PENDING:
                self._state.update(status=Status.STOPPED, ended=time.time())

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker; True when it has ended (or never started)."""
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        return t is None or not t.is_alive()

    @property
    def status(self) -> Status:
        with self._lock:
            return self._state["status"]

    @property
    def active(self) -> bool:
        return self.status.active

    def snapshot(self) -> dict[str, Any]:
        """``status`` (a :class:`Status`: pending, running, finished, stopped or failed), ``progress`` 0..1,
        ``message``, ``error``, ``result`` (plain JSON data, as :func:`run_study` returns)."""
        with self._lock:
            return dict(self._state, id=self.id, name=self.name, budget=self.budget, seed=self.seed)

    def _progress(self, fraction: float, message: str) -> None:
        if self._cancel.is_set():
            raise StudyCancelledError
        with self._lock:
            self._state.update(progress=fraction, message=message)

    def _run(self) -> None:
        try:
            if self.num_threads:
                runtime.tune(threads=self.num_threads)  # this worker's explicit setting (see num_threads)
            result = run_study(self.name, self.budget, self.seed, out=self.out, progress=self._progress,
                               overrides=self.overrides)
            self._end(Status.FINISHED, result=result, progress=1.0)
        except StudyCancelledError:
            self._end(Status.STOPPED)
        except BaseException as e:  # the worker must never die silently: the page shows the reason
            self._end(Status.FAILED, error=f"{type(e).__name__}: {str(e)[:500]}")

    def _end(self, status: Status, **values: Any) -> None:
        with self._lock:
            self._state.update(status=status, ended=time.time(), **values)
