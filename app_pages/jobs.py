"""App-side helpers for training runs: the shared job registry, per-session cleanup, datasets, exports.

The registry lives in ``st.cache_resource`` (one per server process, capped by ``RESVIZ_MAX_JOBS``).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from app_pages import state
from resviz.data.datasets import DatasetBundle, load_dataset
from resviz.jobs import JobRegistry, TrainingJob, live_workers
from resviz.storage.checkpoints import save_checkpoint


@st.cache_resource(show_spinner=False, on_release=lambda reg: reg.shutdown())
def registry() -> JobRegistry:
    """The process-wide job registry (at most ``state.max_jobs()`` runs train at once)."""
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
    """This session's jobs, oldest first."""
    return registry().jobs_for(session_id())


def active_job() -> TrainingJob | None:
    return next((j for j in reversed(session_jobs()) if j.active), None)


@st.cache_resource(max_entries=3, show_spinner="Loading the dataset...")
def load_bundle(name: str, input_size: int, train_size: int | None, seed: int) -> DatasetBundle:
    """A dataset in memory, shared by every session that asks for the same one (read-only use)."""
    test_size = None if train_size is None else max(200, train_size // 5)
    return load_dataset(name, input_size=input_size, train_size=train_size, test_size=test_size, seed=seed, download=False)


# -- labels and exports ---------------------------------------------------------------------------
def run_label(job: TrainingJob, number: int) -> str:
    """A short human name: "#2 ResNet-32 on shapes (finished, 14:02)"."""
    snap_cfg = job.net_cfg
    when = time.strftime("%H:%M", time.localtime(job.created))
    data = getattr(job.data, "name", "data")
    return f"#{number} ResNet-{snap_cfg.depth} on {data} ({job.status}, {when})"


def curves(snap: dict[str, Any], prefix: str = "") -> dict[str, dict[str, np.ndarray]]:
    """The snapshot's history in the shape :func:`resviz.plots.training_curves_figure` takes."""
    out = {}
    for name in snap["names"]:
        h = snap["history"]
        series: dict[str, np.ndarray] = {}
        for key in ("loss", "acc"):
            if f"{name}/{key}" in h:
                series["step"], series[key] = h[f"{name}/{key}"]
            if f"{name}/test_{key}" in h:
                series["test_step"], series[f"test_{key}"] = h[f"{name}/test_{key}"]
        out[f"{prefix}{name}"] = series
    return out


def metrics_csv(snap: dict[str, Any]) -> str:
    """Every recorded metric as CSV: one row per step, one column per ``<net>/<metric>``."""
    keys = sorted(snap["history"])
    rows: dict[int, dict[str, float]] = {}
    for key in keys:
        steps, values = snap["history"][key]
        for s, v in zip(steps.tolist(), values.tolist()):
            rows.setdefault(int(s), {})[key] = v
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", *keys])
    for step in sorted(rows):
        writer.writerow([step, *(f"{rows[step][k]:.6g}" if k in rows[step] else "" for k in keys)])
    return buf.getvalue()


def config_json(job: TrainingJob) -> str:
    """The run's full configuration: net, training and dataset."""
    doc = {"net": job.net_cfg.to_dict(), "train": job.train_cfg.to_dict(), "twin": job.twin,
           "dataset": getattr(job.data, "name", None)}
    return json.dumps(doc, indent=2, sort_keys=True)


def checkpoint_bytes(job: TrainingJob, role: str) -> bytes:
    """The trained ``role`` net of ``job`` as a self-describing safetensors file (config in its header)."""
    net = job.nets[role]
    snap = job.snapshot()
    metrics = {k: v for k, v in snap["latest"].items() if k.startswith(f"{role}/")}
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
        if job.active or job.id in seen or not job.nets or job.snapshot()["step"] == 0:
            continue
        seen.add(job.id)
        snap, base = job.snapshot(), run_label(job, number).split(" (")[0]
        for role, net in sorted(job.nets.items(), key=lambda kv: kv[0] == "residual"):  # residual last: selected
            net.cpu().eval()
            info = {**job.data.info(), "dataset": job.data.name, "net_config": job.net_cfg.to_dict(),
                    "train_config": job.train_cfg.to_dict(), "role": role, "job_id": job.id,
                    "final": {k.split("/", 1)[1]: v for k, v in snap["latest"].items() if k.startswith(f"{role}/")}}
            state.add_trained_model(f"{base} · {role}", state.TrainedModel(net, info))


def _status_line(job_id: str | None) -> None:
    job = registry().find(session_id(), job_id) if job_id is not None else None
    if job is None:
        return
    snap = job.snapshot()
    st.progress(min(1.0, snap["progress"]), text=f"Training ResNet-{job.net_cfg.depth}: step {snap['step']}/"
                f"{snap['total_steps'] or '?'} ({snap['status']})")
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
