"""Train page: train the designed net next to its plain twin and watch both, live.

Every refresh of an active run ships the live charts to the browser, so each series is thinned to at
most ``LIVE_POINTS`` points, which bounds the chart JSON of a refresh however long the run (the job
history keeps at most 500 points per series); ``python bench/bench.py --sections app`` measures it.
The chart builders below call no Streamlit function: the bench and the tests use exactly them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app_pages import jobs, state
from app_pages.charts import show_chart
from app_pages.help_text import HELP
from resviz import TrainConfig, anymodel, plots
from resviz.data.datasets import DATASETS, DatasetBundle, DatasetUnavailable, available_datasets
from resviz.jobs import ACTIVE, JobLimitError, TrainingJob
from resviz.train.records import JobSnapshot, Points

BATCH_SIZES = (16, 32, 64, 128, 256)
TRAIN_SIZES = (500, 1000, 2000, 3000, 5000, 10000)
LR_RANGE, EPOCH_RANGE, SEED_RANGE = (1e-5, 2.0), (0.1, 50.0), (0, 2**31 - 1)  # the number boxes' limits
REFRESH_S = 1.0  # live charts refresh once a second while a run is active
FOLDER = "imagefolder"
STATUS_BOX = {"finished": st.success, "stopped": st.warning, "diverged": st.error, "failed": st.error}


# -- settings -----------------------------------------------------------------------------------
def _dataset_widget() -> tuple[str, str]:
    """Dataset choice: built-ins, torchvision datasets whose files exist, or a folder by path."""
    avail = available_datasets()
    options = [k for k, ok in avail.items() if ok is True] + [FOLDER]
    state.widget_default("t_dataset", st.session_state[state.DATASET])
    state.widget_default("t_folder", st.session_state[state.DATA_FOLDER])
    if st.session_state["t_dataset"] not in options:
        st.session_state["t_dataset"] = state.DEFAULT_DATASET
    name = st.selectbox("Dataset", options, key="t_dataset", help=HELP["dataset"],
                        format_func=lambda k: "your image folder" if k == FOLDER else k)
    st.caption(DATASETS.get(name, ""))
    missing = {k: why for k, why in avail.items() if why is not True and k != FOLDER}
    if missing:
        with st.popover("Why are some datasets missing?"):
            for k, why in missing.items():
                st.markdown(f"**{k}**: {why}")
    folder = st.text_input("Image folder", key="t_folder", help=HELP["folder"]) if name == FOLDER else ""
    return name, folder


def _clamp_seeded(key: str, label: str, lo: float, hi: float) -> None:
    """Bring a linked value into its number box's range, and say so.

    Streamlit replaces an out-of-range value by the box's minimum without a word, so a link asking for
    200 epochs would silently train for 0.1.
    """
    value = st.session_state[key]
    if not lo <= value <= hi:
        st.session_state[key] = type(value)(min(max(value, lo), hi))
        st.warning(f"The link's {label} {value:g} is outside what this page allows ({lo:g} to {hi:g}); "
                   f"{st.session_state[key]:g} is used instead.")


def _settings() -> tuple[TrainConfig, bool, int]:
    """Optimisation widgets; returns the training config, whether to train the plain twin, train size."""
    cfg = state.train_config()
    auto, found = state.devices()
    for key, value in {"t_opt": cfg.optimizer, "t_lr": cfg.lr, "t_epochs": cfg.epochs, "t_bs": cfg.batch_size,
                       "t_seed": cfg.seed, "t_device": cfg.device if cfg.device in ["auto", *found] else "auto",
                       "t_twin": st.session_state[state.TWIN], "t_n": st.session_state[state.TRAIN_SIZE]}.items():
        state.widget_default(key, value)
    for key, label, (lo, hi) in (("t_lr", "learning rate", LR_RANGE), ("t_epochs", "epochs", EPOCH_RANGE),
                                 ("t_seed", "seed", SEED_RANGE)):
        _clamp_seeded(key, label, lo, hi)
    c1, c2, c3 = st.columns(3)
    opt = c1.selectbox("Optimizer", ("sgd", "adamw"), key="t_opt", help=HELP["optimizer"])
    lr = c2.number_input("Learning rate", *LR_RANGE, step=0.01, format="%.4f", key="t_lr", help=HELP["lr"])
    epochs = c3.number_input("Epochs", *EPOCH_RANGE, step=0.5, key="t_epochs", help=HELP["epochs"])
    ss = st.session_state
    bs = c1.select_slider("Batch size", state.options_with(BATCH_SIZES, ss["t_bs"]), key="t_bs", help=HELP["batch_size"])
    n = c2.select_slider("Training images", state.options_with(TRAIN_SIZES, ss["t_n"]), key="t_n", help=HELP["train_size"])
    seed = c3.number_input("Seed", *SEED_RANGE, key="t_seed", help=HELP["seed"])
    device = c1.selectbox("Device", ["auto", *found], key="t_device", help=HELP["device"],
                          format_func=lambda d: f"auto ({auto})" if d == "auto" else d)
    twin = c2.toggle("Train the plain twin alongside", key="t_twin", help=HELP["twin"])
    new = replace(cfg, optimizer=opt, lr=float(lr), epochs=float(epochs), batch_size=int(bs), seed=int(seed), device=device)
    return new, twin, int(n)


# -- live charts: pure functions (no Streamlit calls), also used by the bench and the tests ------------
LIVE_POINTS = 240  # points per series in the live charts; a chart is a few hundred pixels wide


def eval_every(n_train: int, cfg: TrainConfig) -> int:
    """About 20 test evaluations per run, so the test curves fill in while the run goes on."""
    steps = cfg.epochs * max(1, n_train // min(cfg.batch_size, n_train))
    return max(5, round(steps / 20))


def _thinned(readings: Points, points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``points`` rows of a probe's readings (first and last kept): one refresh stays small."""
    thinned = readings.thinned(points)
    return thinned.steps, thinned.values


def probe_version(snap: JobSnapshot, net: str, key: str) -> tuple:
    """What identifies a probe chart's data: the run and the newest probed step (lengths repeat once capped)."""
    readings = snap.history.probe(net, key)
    return snap.id, int(readings.steps[-1]) if readings is not None and len(readings) else -1


SMOOTHING = 0.6  # default smoothing of the per-batch train curves (TensorBoard's default is 0.6 too)


def curves_figure(snap: JobSnapshot, points: int = LIVE_POINTS, smoothing: float = SMOOTHING) -> go.Figure:
    """Train and test loss and accuracy of every net in the run (train curves smoothed, raw faint behind)."""
    history = jobs.curves(replace(snap, history=snap.history.thinned(points)))
    return plots.training_curves_figure(history, smoothing=smoothing)


def flow_figure(snap: JobSnapshot, name: str, points: int = LIVE_POINTS) -> go.Figure | None:
    """Gradient norm per block over training for net ``name`` (None before the first probed step)."""
    readings = snap.history.probe(name, "grad_block")
    if readings is None:
        return None
    steps, values = _thinned(readings, points)
    fig = plots.grad_flow_heatmap(steps, [f"b{i}" for i in range(values.shape[1])], values.T)
    return fig.update_layout(title=f"Gradient flow per block: {name}")


def ratio_figure(snap: JobSnapshot, points: int = LIVE_POINTS) -> go.Figure | None:
    """||F(x)|| / ||S(x)|| per block of the residual net over training (None before the first probed step)."""
    readings = snap.history.probe("residual", "ratio")
    if readings is None:
        return None
    steps, ratios = _thinned(readings, points)
    return plots.ratio_figure(steps, ratios, block_names=[f"b{i}" for i in range(ratios.shape[1])])


def live_figures(snap: JobSnapshot, points: int = LIVE_POINTS) -> dict[str, go.Figure]:
    """Every chart one refresh of the live view sends, by name (the bench measures their size)."""
    figs = {"curves": curves_figure(snap, points)}
    for name in snap.names:
        fig = flow_figure(snap, name, points)
        if fig is not None:
            figs[f"flow_{name}"] = fig
    ratio = ratio_figure(snap, points)
    if ratio is not None:
        figs["ratio"] = ratio
    return figs


# -- actions ------------------------------------------------------------------------------------
def _job(bundle: DatasetBundle, cfg: TrainConfig, twin: bool, preset: str | None) -> TrainingJob:
    """The Design page's net adapted to the data, or preset ``preset`` and its skips-off twin."""
    if preset is None:
        net_cfg = state.with_dataset_shape(state.net_config(), bundle.num_classes, bundle.channels)
        return TrainingJob(net_cfg, bundle, cfg, twin=twin, num_threads=jobs.WORKER_THREADS)
    p = anymodel.PRESETS[preset]
    nets = anymodel.train_nets(preset, num_classes=bundle.num_classes, channels=bundle.channels, seed=cfg.seed, twin=twin)
    model = {"name": p.label, "preset": preset, "timm": p.timm_name, "input_size": p.input_size,
             **{k: list(v) if isinstance(v, tuple) else v for k, v in p.kwargs}}
    return TrainingJob(None, bundle, cfg, twin=twin, num_threads=jobs.WORKER_THREADS, nets=nets, model=model)


def _start(dataset: str, folder: str, cfg: TrainConfig, twin: bool, train_size: int, preset: str | None = None) -> None:
    """Load the data, adapt the net to it and submit a job; problems become short messages."""
    name = f"folder:{folder}" if dataset == FOLDER else dataset
    if dataset == FOLDER and not folder.strip():
        st.error("Enter the path of a folder of images first.")
        return
    size = state.net_config().input_size if preset is None else anymodel.PRESETS[preset].input_size
    try:
        bundle = jobs.load_bundle(name, size, train_size, cfg.seed)
        cfg = replace(cfg, eval_every=eval_every(len(bundle.train), cfg))
        jobs.registry().submit(jobs.session_id(), _job(bundle, cfg, twin, preset))
    except (DatasetUnavailable, JobLimitError, ValueError) as e:
        st.error(str(e))
        return
    st.session_state["t_view"] = None  # show the new run
    st.rerun()


def _controls(job: TrainingJob | None, start_args: tuple) -> None:
    status = job.status if job is not None else None
    c1, c2, c3, c4 = st.columns(4)
    if c1.button("Start", type="primary", key="t_start", disabled=status in ACTIVE, icon=":material/play_arrow:"):
        _start(*start_args)
    if c2.button("Pause", key="t_pause", disabled=status != "running", icon=":material/pause:"):
        job.pause()
        st.rerun()
    if c3.button("Resume", key="t_resume", disabled=status != "paused", icon=":material/resume:"):
        job.resume()
        st.rerun()
    if c4.button("Stop", key="t_stop", disabled=status not in ACTIVE, icon=":material/stop:"):
        job.stop()
        st.rerun()


# -- live view ----------------------------------------------------------------------------------
def _progress(snap: JobSnapshot) -> None:
    eta = f" · ETA {snap.eta_s:.0f} s" if snap.eta_s is not None else ""
    text = (f"step {snap.step}/{snap.total_steps or '?'} · epoch {snap.epoch:.2f} · "
            f"{snap.images_per_s:.0f} images/s{eta} · {snap.status}"
            + (f" · {snap.engine}" if snap.engine else ""))
    st.progress(min(1.0, snap.progress), text=text)
    if snap.status in STATUS_BOX:
        msg = {"finished": "Training finished.", "stopped": "Training was stopped."}.get(snap.status, "")
        STATUS_BOX[snap.status](f"{msg} {snap.error}".strip() if snap.error else msg or str(snap.status))


def _latest_metrics(snap: JobSnapshot) -> None:
    """Latest test accuracy of each net; the residual net's shows its lead over the plain twin."""
    acc = {name: snap.latest[name].test_acc if name in snap.latest else None for name in snap.names}
    cols = st.columns(max(1, len(acc)))
    for col, (name, value) in zip(cols, acc.items()):
        other = acc.get("plain") if name == "residual" else None
        delta = f"{(value - other) * 100:+.1f} points vs plain" if value is not None and other is not None else None
        col.metric(f"{name} test accuracy", f"{value:.1%}" if value is not None else "—", delta=delta,
                   help="Accuracy on the held-out split at the last evaluation.")


def _figure(name: str, version: tuple, build: Callable[[], go.Figure]) -> go.Figure:
    """Rebuild a chart only when its data changed (building a figure costs tens of milliseconds)."""
    store = st.session_state.setdefault("_t_figures", {})
    if name not in store or store[name][0] != version:
        store[name] = (version, build())
    return store[name][1]


def _probe_charts(snap: JobSnapshot) -> None:
    names = snap.names
    cols = st.columns(len(names) or 1)
    for col, name in zip(cols, names):
        if snap.history.probe(name, "grad_block") is None:
            col.info("Gradient readings appear after the first probed step.")
            continue
        fig = _figure(f"flow_{name}", probe_version(snap, name, "grad_block"),
                      lambda n=name: flow_figure(snap, n))
        show_chart(fig, f"t_flow_{name}", where=col)
    if snap.history.probe("residual", "ratio") is not None:
        fig = _figure("ratio", probe_version(snap, "residual", "ratio"), lambda: ratio_figure(snap))
        show_chart(fig, "t_ratio")


def _live_view(job_id: str, was_active: bool) -> None:
    """The region that refreshes on its own while a run is active (reads the job's snapshot only)."""
    with state.guard("The live view"):
        job = jobs.registry().find(jobs.session_id(), job_id)
        if job is None:
            st.info("This run is no longer available.")
            return
        snap = job.snapshot()
        # One container per part, so every part keeps its index in the fragment whatever the run's state
        # (a status box appears when it ends): a refresh already on its way when the state changed then
        # still finds a block where it writes into one, never an element (which crashes the page).
        with st.container():
            _progress(snap)
        with st.container():
            _latest_metrics(snap)
        with st.container():
            smoothing = float(st.session_state.get("t_smooth", SMOOTHING))
            fig = _figure("curves", (snap.id, snap.step, smoothing), lambda: curves_figure(snap, smoothing=smoothing))
            show_chart(fig, "t_curves")
        with st.container():
            _probe_charts(snap)
    if was_active and not job.active:
        st.rerun()  # the run just ended: refresh the buttons, the run list and the Inspect hand-over


# -- runs list, comparison, exports -------------------------------------------------------------
def _pick_run(job_list: list[TrainingJob]) -> TrainingJob | None:
    if not job_list:
        return None
    labels = {j.id: jobs.run_label(j, i) for i, j in enumerate(job_list, start=1)}
    current = st.session_state.get("t_view")
    if current not in labels:
        st.session_state["t_view"] = job_list[-1].id
    view = st.selectbox("Show run", list(reversed(labels)), format_func=labels.get, key="t_view")
    return next(j for j in job_list if j.id == view)


def _compare(job_list: list[TrainingJob]) -> None:
    ended = [(i, j) for i, j in enumerate(job_list, start=1) if not j.active]
    if len(ended) < 2:
        return
    with st.expander("Compare runs", icon=":material/compare:"):
        labels = {j.id: jobs.run_label(j, i) for i, j in ended}
        chosen = st.multiselect("Runs", list(labels), format_func=labels.get, key="t_compare",
                                default=list(labels)[-2:])
        history = {}
        for jid in chosen:
            number, job = next((i, j) for i, j in ended if j.id == jid)
            names = {"residual": f"#{number} with skips", "plain": f"#{number} without skips"}
            history.update(jobs.curves(job.snapshot(), names))
        show_chart(plots.training_curves_figure(history), "t_compare_fig")


def _exports(job: TrainingJob) -> None:
    c1, c2, c3, c4 = st.columns(4)
    c1.download_button("Config (JSON)", jobs.config_json(job), "resviz-config.json", "application/json",
                       key="t_dl_cfg", on_click="ignore", icon=":material/download:")
    c2.download_button("Metrics (CSV)", lambda: jobs.metrics_csv(job.snapshot()), "resviz-metrics.csv", "text/csv",
                       key="t_dl_csv", on_click="ignore", icon=":material/download:")
    for col, role in zip((c3, c4), ("residual", "plain")):
        if role in job.nets and not job.active:
            col.download_button(f"{role.capitalize()} checkpoint", lambda r=role: jobs.checkpoint_bytes(job, r),
                                f"resviz-{role}.safetensors", "application/octet-stream", key=f"t_dl_{role}",
                                on_click="ignore", icon=":material/download:")


WHAT = {"design": "The Design page's ResNet", "any": "A discovered model (any architecture)"}


def _what_widget() -> str | None:
    """What to train: None for the Design page's net, else the key of a discovered-model preset."""
    what = st.radio("What to train", list(WHAT), format_func=WHAT.get, key="t_what", horizontal=True)
    if what == "design":
        net = state.net_config()
        st.caption(f"Net from the Design page (change it there): ResNet-{net.depth} ({net.style}, {net.block.kind} "
                   f"blocks, {net.block.order} order), width {net.width}, {net.input_size}x{net.input_size} inputs, "
                   f"{sum(net.skip_flags)}/{net.num_blocks} skips on. Classes and input channels follow the dataset.")
        return None
    preset = st.selectbox("Model", list(anymodel.PRESETS), format_func=lambda k: anymodel.PRESETS[k].label,
                          key="t_any_preset")
    p = anymodel.PRESETS[preset]
    st.caption(f"{p.about} Its plain twin starts from the same weights with every discovered skip off; both see the "
               f"same batches. Images are loaded at {p.input_size}x{p.input_size}; classes and channels follow the "
               "dataset. Transformers usually want AdamW with a small learning rate (1e-3).")
    return preset


def render() -> None:
    st.title("Train the residual net and its plain twin")
    job_list = jobs.session_jobs()
    # once this session has a run, the settings fold away so that its result (residual vs plain) is above the fold
    with st.expander("Settings: what to train, data, optimisation", expanded=not job_list, icon=":material/tune:"):
        preset = _what_widget()
        dataset, folder = _dataset_widget()
        cfg, twin, train_size = _settings()
    if job_list:
        twin_text = " beside its plain twin" if twin else ""
        what = anymodel.PRESETS[preset].label if preset else f"ResNet-{state.net_config().depth}"
        st.caption(f"Next run: {what}{twin_text} on {dataset}, {cfg.epochs:g} epochs of "
                   f"batch {cfg.batch_size}, lr {cfg.lr:g} ({cfg.optimizer}); open the settings to change them.")
    state.set_train_config(cfg, dataset, twin=twin, train_size=train_size, folder=folder)
    _controls(jobs.active_job(), (dataset, folder, cfg, twin, train_size, preset))
    job = _pick_run(job_list)
    if job is None:
        st.info("Press Start to train: progress and speed appear here while the run goes.")
        return
    active = job.active
    st.slider("Smoothing of the per-batch curves", 0.0, 0.95, SMOOTHING, 0.05, key="t_smooth",
              help="TensorBoard-style moving average of the training loss and accuracy; the raw curves stay faint behind.")
    st.fragment(_live_view, run_every=REFRESH_S if active else None)(job.id, active)
    _exports(job)
    _compare(job_list)
