"""Training jobs for the app: a worker thread per run, a bounded history, a process-wide registry.

:class:`TrainingJob` drives a :class:`~resviz.train.trainer.Trainer` in a daemon thread with pause, resume and
stop; the UI polls :meth:`TrainingJob.snapshot`, a small thread-safe copy made of numbers, strings and
numpy arrays. :class:`JobRegistry` caps how many jobs train at once and keeps one active job per
browser session. Nothing here imports streamlit.

Snapshot format::

    {"id", "status", "error", "created", "started", "ended", "step", "total_steps", "epoch",
     "progress" (0..1), "eta_s" (None until known), "images_per_s", "time_s", "names" (net names),
     "net_cfg", "train_cfg" (dicts), "latest" ({"residual/loss": 0.4, ...}: newest value of each metric),
     "history" ({"residual/loss": (steps int64 (n,), values float32 (n,)), ...}),
     "probes" ({"residual/grad_block": (steps (n,), values (n, B)), ...}), "param_names"}

History keys are ``"<net>/<metric>"`` (``loss``, ``acc``, ``grad_norm``, ``param_norm``, ``test_loss``,
``test_acc``) plus ``"lr"`` and ``"images_per_s"``; every series keeps at most ``history_points``
points, dense for the newest steps and thinned for older ones.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from resviz.config import NetConfig, TrainConfig
from resviz.train.trainer import Trainer, build_nets

ACTIVE = ("pending", "running", "paused")
WORKER_PREFIX = "resviz-job-"  # name prefix of every training worker thread
STATUSES = (*ACTIVE, "stopped", "finished", "diverged", "failed")


class Series:
    """A bounded series of (step, value) points; when full, the older half is thinned by 2.

    Repeated thinning leaves point density growing geometrically towards the newest steps, so a
    long run keeps its overall shape and its recent detail in at most ``cap`` points.
    """

    def __init__(self, cap: int = 500, shape: tuple[int, ...] = ()) -> None:
        self.cap, self.shape, self.n = max(cap, 4), tuple(shape), 0
        self.steps = np.empty(self.cap, np.int64)
        self.values = np.empty((self.cap, *self.shape), np.float32)

    def append(self, step: int, value: Any) -> None:
        value = np.asarray(value, np.float32)
        if value.shape != self.shape:
            raise ValueError(f"series holds shape {self.shape}, got {value.shape}")
        if self.n == self.cap:
            half = self.n // 2
            keep = np.r_[np.arange(0, half, 2), np.arange(half, self.n)]
            self.n = len(keep)
            self.steps[: self.n], self.values[: self.n] = self.steps[keep], self.values[keep]
        self.steps[self.n], self.values[self.n] = step, value
        self.n += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the stored steps and values."""
        return self.steps[: self.n].copy(), self.values[: self.n].copy()


def flatten_record(rec: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of a trainer record as ``{"<net>/<metric>": value, "lr": ..., ...}``."""
    out = {k: float(rec[k]) for k in ("lr", "images_per_s") if k in rec}
    for name, metrics in rec.get("nets", {}).items():
        out.update({f"{name}/{k}": float(v) for k, v in metrics.items()})
    return out


class TrainingJob:
    """One training run in a worker thread: a residual net (and its plain twin) on one dataset.

    Args:
        net_cfg: the net to train (its plain twin too when ``twin``).
        data: a ``DatasetBundle`` (anything with ``train``/``test`` TensorDatasets).
        train_cfg: optimisation settings.
        twin: also train the plain twin in lockstep.
        num_threads: torch intra-op threads for the worker. None: one less than the usable cores (at
            least 1), so a web server on the same box keeps a core; 0: leave torch's setting. PyTorch
            applies it to the worker thread and to threads started later, not to running ones.
        nets: train these nets instead of building them from ``net_cfg``.
        history_points: the most points kept per history series.
    """

    def __init__(
        self, net_cfg: NetConfig, data: Any, train_cfg: TrainConfig, *, twin: bool = True, num_threads: int | None = None,
        nets: dict[str, nn.Module] | None = None, history_points: int = 500,
    ) -> None:
        self.id, self.created = uuid.uuid4().hex[:12], time.time()
        self.net_cfg, self.data, self.train_cfg, self.twin = net_cfg, data, train_cfg, twin
        self.num_threads, self.history_points = num_threads, history_points
        self.nets: dict[str, nn.Module] = dict(nets) if nets else {}
        self._lock = threading.Lock()
        self._stop, self._go = threading.Event(), threading.Event()
        self._go.set()
        self._thread: threading.Thread | None = None
        self._status, self._error = "pending", ""
        self._started = self._ended = None
        self._last: dict[str, Any] = {}
        self._latest: dict[str, float] = {}  # the newest value of every metric (test_* from the last evaluation)
        self._total = 0
        self._history: dict[str, Series] = {}
        self._probes: dict[str, Series] = {}
        self._param_names: dict[str, list[str]] = {}
        self._engine = ""  # how the GPU runs the steps ("" on CPU), see engine_text()

    # -- control ------------------------------------------------------------------------------
    def start(self) -> TrainingJob:
        """Start the worker (a second call does nothing)."""
        with self._lock:
            if self._thread is not None or self._status != "pending":
                return self
            self._status, self._started = "running", time.time()
            self._thread = threading.Thread(target=self._run, name=f"{WORKER_PREFIX}{self.id}", daemon=True)
            self._thread.start()
        return self

    def pause(self) -> None:
        """Pause after the current step (no effect unless running)."""
        with self._lock:
            if self._status == "running":
                self._go.clear()
                self._status = "paused"

    def resume(self) -> None:
        with self._lock:
            if self._status == "paused":
                self._status = "running"
                self._go.set()

    def stop(self, wait: bool = False, timeout: float | None = 10.0) -> None:
        """Ask the worker to stop after the current step (idempotent); ``wait`` joins the thread."""
        with self._lock:
            self._stop.set()
            self._go.set()
            if self._status == "pending":  # never started: nothing to wait for
                self._status, self._ended = "stopped", time.time()
        if wait:
            self.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker; True when it has ended (or never started)."""
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        return t is None or not t.is_alive()

    # -- state --------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        with self._lock:
            return self._status

    @property
    def error(self) -> str:
        with self._lock:
            return self._error

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def alive(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def snapshot(self) -> dict[str, Any]:
        """A thread-safe copy of everything the UI shows (see the module docstring)."""
        with self._lock:
            last, total = self._last, self._total
            step, time_s = last.get("step", 0), last.get("time_s", 0.0)
            eta = time_s / step * (total - step) if step and total else None
            return {
                "id": self.id, "status": self._status, "error": self._error, "created": self.created,
                "started": self._started, "ended": self._ended, "step": step, "total_steps": total,
                "epoch": last.get("epoch", 0.0), "progress": step / total if total else 0.0,
                "eta_s": None if self._status not in ACTIVE else eta, "images_per_s": last.get("images_per_s", 0.0),
                "time_s": time_s, "names": list(self.nets), "net_cfg": self.net_cfg.to_dict(),
                "train_cfg": self.train_cfg.to_dict(), "latest": dict(self._latest),
                "history": {k: s.arrays() for k, s in self._history.items()},
                "probes": {k: s.arrays() for k, s in self._probes.items()},
                "param_names": {k: list(v) for k, v in self._param_names.items()},
                "engine": self._engine,
            }

    # -- worker -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            threads = default_threads() if self.num_threads is None else self.num_threads
            if threads:
                torch.set_num_threads(threads)
            nets = self.nets or build_nets(self.net_cfg, twin=self.twin, seed=self.train_cfg.seed)
            trainer = Trainer(nets, self.data, self.train_cfg)
            with self._lock:
                self.nets, self._total = trainer.nets, trainer.total_steps
            self._drive(trainer)
        except BaseException as e:  # the worker must never die silently: the UI shows the reason
            self._finish("failed", _describe(e))

    def _drive(self, trainer: Trainer) -> None:
        steps = trainer.steps()
        try:
            for rec in steps:
                self._ingest(rec, trainer)
                if not self._wait_if_paused():
                    break
        finally:
            steps.close()  # removes the instruments' hooks when stopped early
        if trainer.status in ("finished", "diverged"):
            self._finish(trainer.status, trainer.message)
        else:
            self._finish("stopped", "")

    def _wait_if_paused(self) -> bool:
        """Block while paused; False when a stop was requested."""
        self._go.wait()  # stop() sets it too, so a paused job still stops at once
        return not self._stop.is_set()

    def _ingest(self, rec: dict[str, Any], trainer: Trainer) -> None:
        with self._lock:
            self._last = rec
            self._param_names = trainer.param_names
            self._engine = engine_text(trainer)
            if rec["status"] == "diverged":  # the failed step's numbers are not part of the curves
                return
            for key, value in flatten_record(rec).items():
                self._latest[key] = value
                self._series(self._history, key, ()).append(rec["step"], value)
            for name, readings in rec.get("probes", {}).items():
                for key, arr in readings.items():
                    self._series(self._probes, f"{name}/{key}", arr.shape).append(rec["step"], arr)

    def _series(self, store: dict[str, Series], key: str, shape: tuple[int, ...]) -> Series:
        if key not in store:
            store[key] = Series(self.history_points, shape)
        return store[key]

    def _finish(self, status: str, error: str) -> None:
        with self._lock:
            self._status, self._error, self._ended = status, error, time.time()
            self._go.set()


def engine_text(trainer: Trainer) -> str:
    """How a GPU run executes its steps, for the progress line: "CUDA graphs", or the eager loop and
    why; "" on a CPU, where there is only one way."""
    if trainer.device.type == "cpu":
        return ""
    if trainer.graph_mode == "cuda":
        return "CUDA graphs"
    return f"eager loop ({trainer.graph_note})" if trainer.graph_note else "eager loop"


def live_workers() -> int:
    """Training worker threads alive in this process, in any registry (a stopped job's until it has ended)."""
    return sum(t.name.startswith(WORKER_PREFIX) and t.is_alive() for t in threading.enumerate())


def default_threads() -> int:
    """Usable cores minus one (at least 1): on a small box the web server keeps a core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, cores - 1)


def _describe(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if "out of memory" in text.lower():
        return f"out of memory: {text[:300]} (try a smaller batch size, width or depth)"
    return f"{type(e).__name__}: {text[:500]}"


class JobLimitError(RuntimeError):
    """Too many jobs are training at once; the message says so in user-facing words."""


class JobRegistry:
    """Process-wide bookkeeping of jobs: at most ``cap`` active jobs, one active job per session.

    Finished jobs stay listed (at most ``keep`` per session) so they can be reopened and compared.
    """

    def __init__(self, cap: int = 2, keep: int = 10) -> None:
        self.cap, self.keep = cap, keep
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, list[TrainingJob]] = OrderedDict()
        self._releases: dict[str, threading.Timer] = {}  # sessions whose jobs stop when the timer fires

    def submit(self, session_id: str, job: TrainingJob) -> TrainingJob:
        """Start ``job`` for the session, or return the session's already active job (double click).

        Raises:
            JobLimitError: when ``cap`` jobs are already active.
        """
        with self._lock:
            jobs = self._jobs.setdefault(session_id, [])
            current = next((j for j in reversed(jobs) if j.active), None)
            if current is not None:
                return current
            if self._active_locked() >= self.cap:
                raise JobLimitError(
                    f"{self.cap} training run{'s are' if self.cap != 1 else ' is'} already going on this server; "
                    "wait for one to finish or stop yours, then try again"
                )
            jobs.append(job)
            self._trim(jobs)
            job.start()
            return job

    def _active_locked(self) -> int:
        return sum(j.active for j in itertools.chain.from_iterable(self._jobs.values()))

    def _trim(self, jobs: list[TrainingJob]) -> None:
        while len(jobs) > self.keep:
            old = next((j for j in jobs if not j.active), None)
            if old is None:
                return
            jobs.remove(old)

    def active_count(self) -> int:
        with self._lock:
            return self._active_locked()

    def get(self, session_id: str) -> TrainingJob | None:
        """The session's active job, else its newest job, else None."""
        jobs = self.jobs_for(session_id)
        return next((j for j in reversed(jobs) if j.active), jobs[-1] if jobs else None)

    def find(self, session_id: str, job_id: str) -> TrainingJob | None:
        return next((j for j in self.jobs_for(session_id) if j.id == job_id), None)

    def jobs_for(self, session_id: str) -> list[TrainingJob]:
        """The session's jobs, oldest first."""
        with self._lock:
            return list(self._jobs.get(session_id, []))

    def stop_session(self, session_id: str, *, forget: bool = True, timeout: float = 10.0) -> None:
        """Stop the session's jobs and wait for their threads (the app calls this when a session ends)."""
        with self._lock:
            jobs = self._jobs.pop(session_id, []) if forget else list(self._jobs.get(session_id, []))
        for j in jobs:
            j.stop()
        deadline = time.monotonic() + timeout
        for j in jobs:
            j.join(max(0.0, deadline - time.monotonic()))

    def release(self, session_id: str, grace: float = 0.0) -> None:
        """Stop the session's jobs after ``grace`` seconds unless :meth:`reclaim` comes first.

        A browser whose connection drops reconnects to the same session within the server's session
        timeout; its training should survive that, while a closed tab's training should not outlive it.
        """
        with self._lock:
            has_jobs = bool(self._jobs.get(session_id))
        if grace <= 0 or not has_jobs:  # most sessions never train: they need no timer thread
            self.reclaim(session_id)
            self.stop_session(session_id)
            return
        timer = threading.Timer(grace, self._release_due, args=(session_id,))
        timer.name, timer.daemon = f"resviz-release-{session_id[:12]}", True
        with self._lock:
            old = self._releases.pop(session_id, None)
            self._releases[session_id] = timer
        if old is not None:
            old.cancel()
        timer.start()

    def reclaim(self, session_id: str) -> bool:
        """Cancel a pending :meth:`release` (the session is back); True if one was pending."""
        with self._lock:
            timer = self._releases.pop(session_id, None)
        if timer is not None:
            timer.cancel()
        return timer is not None

    def pending_releases(self) -> list[str]:
        """Sessions whose jobs are due to stop."""
        with self._lock:
            return list(self._releases)

    def _release_due(self, session_id: str) -> None:
        with self._lock:
            timer = self._releases.get(session_id)
            if timer is None or timer is not threading.current_thread():
                return  # reclaimed, or released again with a new timer
            del self._releases[session_id]
        self.stop_session(session_id)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every job and wait for the workers."""
        with self._lock:
            sessions = list(self._jobs)
            timers, self._releases = list(self._releases.values()), {}
        for timer in timers:
            timer.cancel()
        for sid in sessions:
            self.stop_session(sid, timeout=timeout)


_DEFAULT: JobRegistry | None = None
_DEFAULT_LOCK = threading.Lock()


def default_registry(cap: int = 2) -> JobRegistry:
    """The process-wide registry (created on first use with ``cap``)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = JobRegistry(cap=cap)
        return _DEFAULT
