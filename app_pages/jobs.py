"""App-side helpers for jobs: the shared job registry, per-session cleanup, datasets, exports.

The registry lives in ``st.cache_resource`` (one per server process, capped by ``RESVIZ_MAX_JOBS``
across training runs and studies; the Experiments page submits its studies to it too). Creating it
is the app's start-up, where the process is tuned (:func:`resviz.runtime.tune`); each training job
gets ``WORKER_THREADS`` threads, one less than the usable cores.
Each browser session holds a session-scoped handle whose release stops that session's jobs once the
session can no longer come back (``server.disconnectedSessionTTL``), so a closed tab never leaves a
worker training and a dropped connection does not cost the run. Nothing here draws on the page.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from app_pages import state
from resviz import runtime
from resviz.data.datasets import DatasetBundle, load_dataset
from resviz.jobs import JobRegistry, TrainingJob, live_workers
from resviz.storage.checkpoints import save_checkpoint
from resviz.train.records import JobSnapshot, plot_table
from resviz.train.records import curves as record_curves

WORKER_THREADS = runtime.default_threads()  # torch threads of each training job: the web server keeps a core


@st.cache_resource(show_spinner=False, on_release=lambda reg: reg.shutdown())
def registry() -> JobRegistry:
    """The process-wide job registry (at most ``state.max_jobs()`` jobs of any kind at once).

    Made once per server process, before the first job: the process is tuned here for training
    (glibc keeps freed memory for the next step; cuDNN times its algorithms once for fixed shapes).
    """
    runtime.tune(keep_freed_memory=True, cudnn_benchmark=True)
    return JobRegistry(cap=state.max_jobs())


@dataclass(frozen=True)
class SessionHandle:
    """Ties a browser session to its jobs; releasing it (the session's connection ends) stops them.

    ``grace_s``: how long the jobs keep training after the connection ends. Streamlit releases
    session-scoped resources as soon as the websocket closes, which a network blip does too, and the
    browser then reconnects to the same session within ``server.disconnectedSessionTTL``; the next
    script run of that session reclaims its jobs. A closed tab never comes back, so its jobs stop then.
    """

    session_id: str
    registry: JobRegistry
    grace_s: float = 0.0


def _release(handle: SessionHandle) -> None:
    handle.registry.release(handle.session_id, handle.grace_s)


def session_grace_s() -> float:
    """Seconds a disconnected session can still come back: the server's ``disconnectedSessionTTL``."""
    try:
        return max(0.0, float(st.get_option("server.disconnectedSessionTTL")))
    except (RuntimeError, TypeError, ValueError):
        return 120.0


@st.cache_resource(scope="session", on_release=_release, show_spinner=False)
def _session_handle(session_id: str) -> SessionHandle:
    reg = registry()
    reg.reclaim(session_id)  # the session reconnected: its jobs go on
    return SessionHandle(session_id, reg, session_grace_s())


def session_id() -> str:
    """This session's id in the registry; also makes sure its jobs stop when the session ends."""
    sid = st.session_state[state.SESSION_ID]
    _session_handle(sid)
    return sid


def server_load() -> str:
    """How many training workers this server process runs, against the cap (shown in the sidebar)."""
    return f"Training on this server: {live_workers()} of {registry().cap} runs"


def session_jobs() -> list[TrainingJob]:
    """This session's training jobs, oldest first."""
    return registry().jobs_for(session_id(), TrainingJob)


def active_job() -> TrainingJob | None:
    return next((j for j in reversed(session_jobs()) if j.active), None)


@st.cache_resource(max_entries=3, show_spinner="Loading the dataset...")
def load_bundle(name: str, input_size: int, train_size: int | None, seed: int) -> DatasetBundle:
    """A dataset in memory, shared by every session that asks for the same one (read-only use)."""
    test_size = None if train_size is None else max(200, train_size // 5)
    return load_dataset(name, input_size=input_size, train_size=train_size, test_size=test_size, seed=seed, download=False)


# -- labels and exports ---------------------------------------------------------------------------
def net_name(job: TrainingJob) -> str:
    """What the job trains: "ResNet-32", or the name of a discovered model."""
    return f"ResNet-{job.net_cfg.depth}" if job.net_cfg is not None else str(job.model.get("name", "model"))


def net_dict(job: TrainingJob) -> dict:
    """The job's net as plain data: its NetConfig's dict, or what describes a discovered model."""
    return job.net_cfg.to_dict() if job.net_cfg is not None else dict(job.model)


def run_name(job: TrainingJob, number: int) -> str:
    """A short human name: "#2 ResNet-32 on shapes"."""
    return f"#{number} {net_name(job)} on {getattr(job.data, 'name', 'data')}"


def run_label(job: TrainingJob, number: int) -> str:
    """The name with its state: "#2 ResNet-32 on shapes (finished, 14:02)"."""
    when = time.strftime("%H:%M", time.localtime(job.created))
    return f"{run_name(job, number)} ({job.status}, {when})"


def curves(snap: JobSnapshot, names: Mapping[str, str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The snapshot's curves in the shape :func:`resviz.plots.training_curves_figure` takes, one entry per
    net (renamed by ``names``; nets missing from it are left out)."""
    return plot_table(record_curves(snap.history), names)


def metrics_csv(snap: JobSnapshot) -> str:
    """Every recorded metric as CSV: one row per step, one column per curve (``<net>/<metric>``, ``lr``, ...)."""
    found = sorted(record_curves(snap.history), key=lambda c: c.label)
    rows: dict[int, dict[str, float]] = {}
    for c in found:
        for s, v in zip(c.steps.tolist(), c.values.tolist()):
            rows.setdefault(int(s), {})[c.label] = v
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", *(c.label for c in found)])
    for step in sorted(rows):
        writer.writerow([step, *(f"{rows[step][c.label]:.6g}" if c.label in rows[step] else "" for c in found)])
    return buf.getvalue()


def config_json(job: TrainingJob) -> str:
    """The run's full configuration: net, training and dataset."""
    doc = {"net": net_dict(job), "train": job.train_cfg.to_dict(), "twin": job.twin,
           "dataset": getattr(job.data, "name", None)}
    return json.dumps(doc, indent=2, sort_keys=True)


def checkpoint_bytes(job: TrainingJob, role: str) -> bytes:
    """The trained ``role`` net of ``job`` as a self-describing safetensors file (config in its header); a
    discovered model's file is its state dict, whose names are the original architecture's."""
    net = job.nets[role]
    if job.net_cfg is None:
        from safetensors.torch import save

        from resviz.anymodel import original_state_dict

        return save({k: v.detach().cpu().contiguous().clone() for k, v in original_state_dict(net).items()},
                    metadata={k: str(v) for k, v in {**job.model, "role": role}.items()})
    latest = job.snapshot().latest.get(role)
    metrics = {"role": role, **(latest.as_dict() if latest is not None else {})}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(net, Path(tmp) / f"resviz-{role}", dataset=job.data, metrics=metrics)
        return path.read_bytes()


# -- handing trained nets to the Inspect page -----------------------------------------------------
def collect_trained() -> None:
    """Add this session's ended runs (finished, stopped or diverged) to ``st.session_state["trained_models"]``.

    The newest run's residual net becomes the selected model, so the Inspect page opens on it.
    """
    seen = st.session_state.setdefault("_collected_jobs", set())
    for number, job in enumerate(session_jobs(), start=1):
        if job.active or job.id in seen or not job.nets or job.snapshot().step == 0:
            continue
        seen.add(job.id)
        snap, base = job.snapshot(), run_name(job, number)
        for role, net in sorted(job.nets.items(), key=lambda kv: kv[0] == "residual"):  # residual last: selected
            net.cpu().eval()
            info = {**job.data.info(), "dataset": job.data.name, "net_config": net_dict(job),
                    "train_config": job.train_cfg.to_dict(), "role": role, "job_id": job.id,
                    "final": snap.latest[role].as_dict() if role in snap.latest else {}}
            state.add_trained_model(f"{base} · {role}", state.TrainedModel(net, info))


def _status_line(job_id: str | None) -> None:
    job = registry().find(session_id(), job_id) if job_id is not None else None
    if job is None:
        return
    snap = job.snapshot()
    st.progress(min(1.0, snap.progress), text=f"Training {net_name(job)}: step {snap.step}/"
                f"{snap.total_steps or '?'} ({snap.status})")
    if not job.active:
        st.rerun()  # the run ended while the user was elsewhere: hand its nets to the pages now


def sync_session() -> None:
    """Hand ended runs to the Inspect page and show a self-refreshing progress line for the active run.

    The fragment is placed whether a run is active or not (empty and without a timer when none is), so
    its block keeps its place in the sidebar: a refresh that was already on its way when the run ended
    then lands in that block. Were the block to vanish, the caption after it would take its place, and
    such a late refresh would crash the browser's page ("'setIn' cannot be called on an ElementNode").
    """
    collect_trained()
    job = active_job()
    st.fragment(_status_line, run_every=2.0 if job is not None else None)(job.id if job is not None else None)
