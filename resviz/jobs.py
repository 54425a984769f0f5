"""Background jobs for the app: training runs and studies behind one protocol, status vocabulary and registry.

A :class:`Job` runs in a daemon thread; the UI polls its ``snapshot()``, a thread-safe copy.
:class:`TrainingJob` drives a :class:`~resviz.train.trainer.Trainer` with pause, resume and stop and
snapshots into a :class:`~resviz.train.records.JobSnapshot` (every series keeps at most
``history_points`` points, dense for the newest steps and thinned for older ones);
:class:`resviz.experiments.runner.StudyJob` runs a study. :class:`JobRegistry` caps how many jobs of
any kind run at once and keeps one active job of each kind per browser session. Nothing here imports
streamlit, and nothing here changes a process-wide setting except the explicit thread count a
job is given (``num_threads``, applied by :func:`resviz.runtime.tune` in the job's own worker).
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Protocol, TypeVar, runtime_checkable

from torch import nn

from resviz import runtime
from resviz.config import NetConfig, TrainConfig
from resviz.train.records import HistoryRecorder, JobSnapshot, Status, StepRecord
from resviz.train.trainer import Trainer, build_nets

__all__ = ["Job", "JobLimitError", "JobRegistry", "Status", "TrainingJob", "engine_text", "live_workers"]

ACTIVE = (Status.PENDING, Status.RUNNING, Status.PAUSED)  # a job in one of these holds a place under the cap
WORKER_PREFIX = "resviz-job-"  # name prefix of every job's worker thread (studies: "resviz-job-study-")


J = TypeVar("J", bound="Job")


@runtime_checkable
class Job(Protocol):
    """What the registry and the app need of a background job (training run or study)."""

    id: str

    @property
    def status(self) -> Status: ...

    @property
    def active(self) -> bool:
        """Pending, running or paused."""
        ...

    def start(self) -> Job: ...

    def stop(self) -> None:
        """Ask the job to stop soon (idempotent; does not wait)."""
        ...

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker; True when it has ended (or never started)."""
        ...

    def snapshot(self) -> Any:
        """A thread-safe copy of what the UI shows."""
        ...


class TrainingJob:
    """One training run in a worker thread: a residual net (and its plain twin) on one dataset.

    Args:
        net_cfg: the net to train (its plain twin too when ``twin``).
        data: a ``DatasetBundle`` (anything with ``train``/``test`` TensorDatasets).
        train_cfg: optimisation settings.
        twin: also train the plain twin in lockstep.
        num_threads: torch intra-op threads, set by the worker through :func:`resviz.runtime.tune` when it
            starts (PyTorch applies it to that thread and to threads started later, not to running ones).
            None leaves torch's setting; the app passes :func:`resviz.runtime.default_threads`.
        nets: train these nets instead of building them from ``net_cfg``.
        history_points: the most points kept per history series.
        model: with ``nets`` and no ``net_cfg``: what the nets are, as plain data (e.g. ``{"name": ...,
            "spec": ...}``); the snapshot's ``net_cfg`` is then this dict.
    """

    def __init__(
        self, net_cfg: NetConfig | None, data: Any, train_cfg: TrainConfig, *, twin: bool = True,
        num_threads: int | None = None, nets: dict[str, nn.Module] | None = None, history_points: int = 500,
        model: dict[str, Any] | None = None,
    ) -> None:
        if net_cfg is None and not nets:
            raise ValueError("a training job needs a net config or the nets to train")
        self.id, self.created = uuid.uuid4().hex[:12], time.time()
        self.net_cfg, self.data, self.train_cfg, self.twin = net_cfg, data, train_cfg, twin
        self.model = dict(model or {})
        self.num_threads, self.history_points = num_threads, history_points
        self.nets: dict[str, nn.Module] = dict(nets) if nets else {}
        self._lock = threading.Lock()
        self._stop, self._go = threading.Event(), threading.Event()
        self._go.set()
        self._thread: threading.Thread | None = None
        self._status, self._error = Status.PENDING, ""
        self._started: float | None = None
        self._ended: float | None = None
        self._last: StepRecord | None = None
        self._total = 0
        self._history = HistoryRecorder(history_points)
        self._param_names: dict[str, tuple[str, ...]] = {}
        self._engine = ""  # how the GPU runs the steps ("" on CPU), see engine_text()

    # -- control ------------------------------------------------------------------------------
    def start(self) -> TrainingJob:
        """Start the worker (a second call does nothing)."""
        with self._lock:
            if self._thread is not None or self._status != Status.PENDING:
                return self
            self._status, self._started = Status.RUNNING, time.time()
            self._thread = threading.Thread(target=self._run, name=f"{WORKER_PREFIX}{self.id}", daemon=True)
            self._thread.start()
        return self

    def pause(self) -> None:
        """Pause after the current step (no effect unless running)."""
        with self._lock:
            if self._status == Status.RUNNING:
                self._go.clear()
                self._status = Status.PAUSED

    def resume(self) -> None:
        with self._lock:
            if self._status == Status.PAUSED:
                self._status = Status.RUNNING
                self._go.set()

    def stop(self, wait: bool = False, timeout: float | None = 10.0) -> None:
        """Ask the worker to stop after the current step (idempotent); ``wait`` joins the thread."""
        with self._lock:
            self._stop.set()
            self._go.set()
            if self._status == Status.PENDING:  # never started: nothing to wait for
                self._status, self._ended = Status.STOPPED, time.time()
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
    def status(self) -> Status:
        with self._lock:
            return self._status

    @property
    def error(self) -> str:
        with self._lock:
            return self._error

    @property
    def active(self) -> bool:
        return self.status.active

    @property
    def alive(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def snapshot(self) -> JobSnapshot:
        """A thread-safe copy of everything the UI shows."""
        with self._lock:
            last, total = self._last, self._total
            step, time_s = (last.step, last.time_s) if last is not None else (0, 0.0)
            eta = time_s / step * (total - step) if step and total else None
            return JobSnapshot(
                id=self.id, status=self._status, error=self._error, created=self.created, started=self._started,
                ended=self._ended, step=step, total_steps=total, epoch=last.epoch if last is not None else 0.0,
                progress=step / total if total else 0.0, eta_s=eta if self._status.active else None,
                images_per_s=last.images_per_s if last is not None else 0.0, time_s=time_s, names=tuple(self.nets),
                net_cfg=self.net_cfg.to_dict() if self.net_cfg is not None else dict(self.model),
                train_cfg=self.train_cfg.to_dict(),
                latest=dict(self._history.latest), history=self._history.history(),
                param_names=dict(self._param_names), engine=self._engine,
            )

    # -- worker -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.num_threads:
                runtime.tune(threads=self.num_threads)  # this worker's explicit setting (see num_threads)
            nets = self.nets or build_nets(self.net_cfg, twin=self.twin, seed=self.train_cfg.seed)
            trainer = Trainer(nets, self.data, self.train_cfg)
            with self._lock:
                self.nets, self._total = trainer.nets, trainer.total_steps
            self._drive(trainer)
        except BaseException as e:  # the worker must never die silently: the UI shows the reason
            self._finish(Status.FAILED, _describe(e))

    def _drive(self, trainer: Trainer) -> None:
        steps = trainer.steps()
        try:
            for rec in steps:
                self._ingest(rec, trainer)
                if not self._wait_if_paused():
                    break
        finally:
            steps.close()  # removes the instruments' hooks when stopped early
        if trainer.status in (Status.FINISHED, Status.DIVERGED):
            self._finish(Status(trainer.status), trainer.message)
        else:
            self._finish(Status.STOPPED, "")

    def _wait_if_paused(self) -> bool:
        """Block while paused; False when a stop was requested."""
        self._go.wait()  # stop() sets it too, so a paused job still stops at once
        return not self._stop.is_set()

    def _ingest(self, rec: StepRecord, trainer: Trainer) -> None:
        with self._lock:
            self._last = rec
            self._param_names = {k: tuple(v) for k, v in trainer.param_names.items()}
            self._engine = engine_text(trainer)
            self._history.add(rec)  # the failed step of a diverged run has no metrics: the curves skip it

    def _finish(self, status: Status, error: str) -> None:
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
    """Job worker threads alive in this process, of any kind and registry (a stopped job's until it has ended)."""
    return sum(t.name.startswith(WORKER_PREFIX) and t.is_alive() for t in threading.enumerate())


def _describe(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if "out of memory" in text.lower():
        return f"out of memory: {text[:300]} (try a smaller batch size, width or depth)"
    return f"{type(e).__name__}: {text[:500]}"


class JobLimitError(RuntimeError):
    """Too many jobs are training at once; the message says so in user-facing words."""


class JobRegistry:
    """Process-wide bookkeeping of jobs of every kind: at most ``cap`` active jobs in all, one active
    job of each kind (class) per session.

    Finished jobs stay listed (at most ``keep`` per session) so they can be reopened and compared.
    """

    def __init__(self, cap: int = 2, keep: int = 10) -> None:
        self.cap, self.keep = cap, keep
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, list[Job]] = OrderedDict()
        self._releases: dict[str, threading.Timer] = {}  # sessions whose jobs stop when the timer fires

    def submit(self, session_id: str, job: J) -> J:
        """Start ``job`` for the session, or return the session's already active job of its kind (double click).

        Raises:
            JobLimitError: when ``cap`` jobs (of any kind) are already active.
        """
        with self._lock:
            jobs = self._jobs.setdefault(session_id, [])
            current = next((j for j in reversed(jobs) if j.active and type(j) is type(job)), None)
            if current is not None:
                return current  # type: ignore[return-value]
            if self._active_locked() >= self.cap:
                raise JobLimitError(
                    f"{self.cap} job{'s are' if self.cap != 1 else ' is'} (training runs and studies) already going "
                    "on this server; wait for one to finish or stop yours, then try again"
                )
            jobs.append(job)
            self._trim(jobs)
            job.start()
            return job

    def _active_locked(self) -> int:
        return sum(j.active for j in itertools.chain.from_iterable(self._jobs.values()))

    def _trim(self, jobs: list[Job]) -> None:
        while len(jobs) > self.keep:
            old = next((j for j in jobs if not j.active), None)
            if old is None:
                return
            jobs.remove(old)

    def active_count(self) -> int:
        """Active jobs of every kind and session."""
        with self._lock:
            return self._active_locked()

    def get(self, session_id: str, kind: type[J] | None = None) -> J | None:
        """The session's active job (of ``kind``, if given), else its newest such job, else None."""
        jobs = self.jobs_for(session_id, kind)
        return next((j for j in reversed(jobs) if j.active), jobs[-1] if jobs else None)

    def find(self, session_id: str, job_id: str) -> Job | None:
        return next((j for j in self.jobs_for(session_id) if j.id == job_id), None)

    def jobs_for(self, session_id: str, kind: type[J] | None = None) -> list[J]:
        """The session's jobs (of ``kind``, if given), oldest first."""
        with self._lock:
            jobs = list(self._jobs.get(session_id, []))
        return [j for j in jobs if kind is None or isinstance(j, kind)]  # type: ignore[misc]

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
