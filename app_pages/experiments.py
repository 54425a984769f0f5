"""Experiments page: reproduce the residual-network papers live, or open a run directory from the CLI.

A study runs in a background thread (:class:`resviz.experiments.runner.StudyJob`, which never touches
streamlit); a fragment polls its progress once a second. Results are drawn from the same plain data
``python -m resviz study`` writes, so the page and the CLI show the same numbers for the same seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import streamlit as st

from app_pages import jobs
from app_pages.charts import show_chart
from resviz.experiments import BUDGETS, STUDIES, stored
from resviz.experiments.common import net_label
from resviz.experiments.runner import StudyJob, study_figures
from resviz.jobs import JobLimitError
from resviz.storage.rundirs import list_runs, load_run

REFRESH_S = 1.0
BUDGET_HELP = {"zoo": "the converged nets shipped in pretrained/ (ResNet and plain 20, 56, 110): nothing is trained, "
                      "but lesions and landscapes of deep nets take minutes on a CPU",
               "small": "small nets, short runs: the budget of docs/experiments.md, which lists each study's CPU time",
               "medium": "bigger nets and longer runs (width 16, 24 px, 1,500 steps): many times the small budget's time"}


def runs_root() -> Path:
    """Where run directories are looked for: ``$RESVIZ_RUNS``, or ``runs/`` in the working directory.

    That is where ``python -m resviz ... --out runs/<name>`` writes when run from the same directory as
    the app (``make run`` runs both from the checkout), and it holds for an installed app too.
    """
    return Path(os.environ.get("RESVIZ_RUNS") or "runs").resolve()


# -- jobs: the app's one registry and session handle (app_pages/jobs.py), shared with training ----------
def current_job() -> StudyJob | None:
    return jobs.registry().get(jobs.session_id(), StudyJob)


def _start(name: str, budget: str, seed: int) -> None:
    try:
        jobs.registry().submit(jobs.session_id(), StudyJob(name, budget, seed, num_threads=1))
    except JobLimitError as e:
        st.warning(str(e))
        return
    st.rerun()


# -- drawing --------------------------------------------------------------------------------------
# The studies' row fields as a reader names them; "%" marks a fraction shown as a percentage. A field not listed
# keeps its name with spaces for underscores, and its numbers get four significant digits.
COLUMNS: dict[str, tuple[str, str | None]] = {
    "residual_train_err": ("ResNet train error", "%"), "plain_train_err": ("plain train error", "%"),
    "residual_test_err": ("ResNet test error", "%"), "plain_test_err": ("plain test error", "%"),
    "paper_residual_test_err": ("paper: ResNet test error", "%"), "paper_plain_test_err": ("paper: plain test error", "%"),
    "residual_final_loss": ("ResNet final train loss", None), "plain_final_loss": ("plain final train loss", None),
    "status": ("nets", None),
    "block": ("deleted block", None), "residual_acc": ("ResNet accuracy", "%"), "plain_acc": ("plain accuracy", "%"),
    "residual": ("ResNet", None), "plain": ("plain", None),
    "mean_branch_std": ("mean std of F(x)", None), "median_branch_std": ("median std of F(x)", None),
    "max_branch_std": ("largest std of F(x)", None), "mean_layer_std": ("mean std, every 3x3 layer", None),
    "mean_branch_scale": ("mean scale γ of F(x)'s norm", None),
    "center_loss": ("loss at the centre", None), "max_loss": ("highest loss on the slice", None),
    "mean_rise_r<=half": ("mean rise within half the span", None), "nonconvexity": ("non-convexity of the 2-D slice", None),
    "hessian_nonconvexity": ("non-convexity, full Hessian (Li et al.)", None),
    "center_lambda_max": ("largest Hessian eigenvalue at the centre", None),
    "residual_lag1": ("ResNet lag-1 correlation", None), "plain_lag1": ("plain lag-1 correlation", None),
    "residual_lag4": ("ResNet lag-4 correlation", None), "plain_lag4": ("plain lag-4 correlation", None),
    "init_var_first": ("variance, first block (init)", None), "init_var_last": ("variance, last block (init)", None),
    "init_growth": ("variance growth (init)", None), "init_mean_sq_last": ("mean square, last block (init)", None),
    "trained_growth": ("variance growth (trained)", None), "final_loss": ("final train loss", None),
    "test_acc": ("test accuracy", "%"), "test_loss": ("test loss", None),
    "deletion": ("deletion ↓", None), "insertion": ("insertion ↑", None), "pointing": ("pointing ↑", "%"),
    "energy": ("mask energy ↑", "%"), "accuracy": ("accuracy", "%"),
}


def _flat(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows' plain values (nested lists and dicts left out), for ``st.dataframe``; nets named as in the checks and
    figures (``residual-20`` -> ``ResNet-20``)."""
    return [{k: net_label(v) if k == "net" and isinstance(v, str) else v for k, v in r.items()
             if not isinstance(v, (list, dict))} for r in rows]


def _column(key: str) -> tuple[str, str | None]:
    return COLUMNS.get(key, (key.replace("_", " "), None))


def column_config(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Readable headers for a study's table, fractions as percentages, other numbers to four significant digits."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        label, kind = _column(key)
        values = [r[key] for r in rows if r.get(key) is not None]
        if kind == "%":
            out[key] = st.column_config.NumberColumn(label, format="percent")
        elif values and all(isinstance(v, float) for v in values):
            out[key] = st.column_config.NumberColumn(label, format="%.4g")
        else:
            out[key] = st.column_config.Column(label)
    return out


FIRST = ("net", "variant", "method", "experiment", "depth", "block", "stage", "downsampling", "blocks")  # what a row is
LAST = ("paper_residual_test_err", "paper_plain_test_err", "status")  # beside the paper's own table; the nets' names


def column_order(rows: list[dict[str, Any]]) -> list[str]:
    """What a row is first, then the measurements in :data:`COLUMNS`' order, then any other field, then :data:`LAST`."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rank: dict[str, int] = {}
    for k in (*FIRST, *COLUMNS):
        rank.setdefault(k, len(rank))
    return sorted(keys, key=lambda k: (k in LAST, rank.get(k, len(rank)), keys.index(k)))


def _finding(row: dict[str, str | None]) -> str:
    """One of the paper's findings in words: what it is about in bold, then each net's finding by name."""
    said = {k: v for k, v in row.items() if v and v.strip() not in ("-", "")}
    order = column_order([said])
    parts = [f"**{said[k]}**" for k in order if k in FIRST]
    parts += [said[k] if k == "finding" else f"{_column(k)[0]}: {said[k]}" for k in order if k not in FIRST]
    return " — ".join(parts)


def _table(where: Any, rows: list[dict[str, Any]], key: str) -> None:
    flat = _flat(rows)
    if flat and all(isinstance(v, str) or v is None for r in flat for v in r.values()):  # findings in words: a list
        where.markdown("\n".join(f"- {_finding(r)}" for r in flat))
        return
    where.dataframe(flat, hide_index=True, key=key, column_config=column_config(flat), column_order=column_order(flat))


def shown_figures(result: dict[str, Any], figures: dict[str, Any] | None = None, *, three_d: bool = False) -> dict[str, Any]:
    """The figures the page shows for a result (``figures``: already built by the study): loss slices as one
    contour map, or as the 3-D surfaces when ``three_d``."""
    figs = study_figures(result) if figures is None else figures
    if "contours" not in figs:
        return figs
    if three_d:
        return {name: fig for name, fig in figs.items() if name != "contours"}
    return {name: fig for name, fig in figs.items() if not any(t.type == "surface" for t in fig.data)}


def show_result(result: dict[str, Any], key: str, figures: dict[str, Any] | None = None) -> None:
    """Checks, our table beside the paper's, and every figure of a study result (``figures``: already built)."""
    st.caption(f"{result['paper']} · nets: {result.get('source', '')} · {result.get('time_s', 0):.0f} s")
    for c in result.get("checks", []):
        box = st.success if c["holds"] else st.warning
        box(f"**{'Reproduced' if c['holds'] else 'Not reproduced'}:** {c['claim']}. {c['detail']}")
    ours, paper = st.columns([3, 2])
    ours.markdown("**Ours** (built-in `shapes` data)")
    _table(ours, result["rows"], f"{key}_rows")
    paper.markdown("**The paper**")
    _table(paper, result.get("paper_rows", []), f"{key}_paper")
    figures = study_figures(result) if figures is None else figures
    three_d = False
    if "contours" in figures:  # a browser without a GPU takes seconds to draw a 3-D surface: contours first
        three_d = st.toggle("Show the slices as 3-D surfaces", key=f"{key}_3d",
                            help="The same loss slices as rotatable 3-D surfaces (slow to draw without a GPU).")
    for name, fig in shown_figures(result, figures, three_d=three_d).items():
        show_chart(fig, f"{key}_{name}")
    st.download_button("Download result.json", json.dumps(result, indent=2, sort_keys=True), file_name=f"{result['study']}.json",
                       mime="application/json", key=f"{key}_download")


def _live(job_id: str, was_running: bool) -> None:
    job = current_job()
    if job is None or job.id != job_id:
        return
    snap = job.snapshot()
    if snap["status"] in ("pending", "running"):
        st.progress(min(1.0, snap["progress"]), text=f"{STUDIES[snap['name']].title}: {snap['message'] or 'starting'}")
    elif was_running:
        st.rerun()  # the whole page redraws with the result


def _job_panel(job: StudyJob | None) -> None:
    """Stop button, live progress, then the outcome; each in a block that keeps its place in every state.

    The live fragment is placed whether the study runs or not (without a timer once it has ended): a
    refresh already on its way when the study ended then lands in the fragment's own block instead of
    on an element of the result, which would crash the browser's page.
    """
    if job is None:
        return
    snap = job.snapshot()
    running = snap["status"] in ("pending", "running")
    controls = st.container()
    st.fragment(_live, run_every=REFRESH_S if running else None)(job.id, running)
    body = st.container()
    if running:
        if controls.button("Stop", key="x_stop", icon=":material/stop:"):
            job.stop()
    elif snap["status"] == "failed":
        body.error(f"The study failed: {snap['error']}")
    elif snap["status"] == "stopped":
        body.warning("The study was stopped.")
    elif snap["result"] is not None:
        with body:
            st.subheader(f"{STUDIES[snap['name']].title} ({snap['budget']} budget, seed {snap['seed']})")
            show_result(snap["result"], key=f"x_{snap['id']}")


def _open_run() -> None:
    root = runs_root()
    found = list_runs(root)
    with st.expander(f"Open a run directory (from `python -m resviz`, under {root})", expanded=False):
        if not found:
            st.caption(f"No runs under {root} yet. Try `python -m resviz study degradation --out {root}/degradation`.")
            return
        path = st.selectbox("Run", found, format_func=lambda p: p.name, key="x_run")
        run = load_run(path)
        for note in run.notes:
            st.caption(note)
        if run.result is not None and run.result.get("study") in STUDIES:
            show_result(run.result, key=f"x_run_{path.name}")
        else:
            st.json(run.summary or run.config)
            st.caption(f"{len(run.metrics)} metrics lines, checkpoints: {', '.join(p.name for p in run.checkpoints) or 'none'}")


def _stored_mtime(name: str) -> float:
    try:
        return (stored.stored_dir() / f"{name}.json").stat().st_mtime
    except OSError:
        return 0.0


@st.cache_resource(show_spinner=False, max_entries=16)
def _stored(name: str, mtime: float) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """A study's stored zoo result and its figures, read and built once per file version and server."""
    result = stored.load_stored(name)
    return result, (study_figures(result) if result is not None else {})


def _show_stored(name: str) -> None:
    """The study's result on the converged zoo, stored beside the checkpoints: on screen at once."""
    result, figures = _stored(name, _stored_mtime(name))
    if result is None:
        st.info(f"No stored result on the converged zoo for this study yet. `python pretrained/make_pretrained.py "
                f"--studies {name}` computes it (after the zoo's nets); or run the study below.")
        return
    st.subheader("On the converged zoo")
    st.caption(f"Stored result of `{stored.command(name)}` (which recomputes it; "
               f"`python pretrained/make_pretrained.py --studies {name}` stores it again).")
    show_result(result, key=f"x_zoo_{name}", figures=figures)


def render() -> None:
    st.title("Experiments: reproduce the papers")
    st.caption("Each study re-runs a published experiment on the built-in `shapes` data and shows our numbers next to "
               "the paper's: first on the converged nets shipped in `pretrained/` (stored, on screen at once), and "
               "again with any seed and budget you like. The same runs are available headless: "
               "`python -m resviz study <name> --budget zoo --seed 0`.")
    job = current_job()
    busy = job is not None and job.active
    name = st.selectbox("Study", list(STUDIES), format_func=lambda n: STUDIES[n].title, key="x_study", disabled=busy)
    st.caption(f"{STUDIES[name].paper}.")
    with st.expander("What this study does"):
        st.markdown((STUDIES[name].module.__doc__ or "").strip())
    mine = job is not None and job.name == name
    if not mine:
        _show_stored(name)
    st.subheader("Run it again" if not mine else "Your run")
    c2, c3, c4 = st.columns([3, 1, 1], vertical_alignment="bottom")
    budget = c2.radio("Budget", BUDGETS, index=BUDGETS.index("small"), key="x_budget", horizontal=True, disabled=busy,
                      help="; ".join(f"{k}: {v}" for k, v in BUDGET_HELP.items()))
    seed = int(c3.number_input("Seed", 0, 2**31 - 1, 0, key="x_seed", disabled=busy))
    if c4.button("Run", type="primary", key="x_run_button", disabled=busy, icon=":material/play_arrow:"):
        _start(name, budget, seed)
    st.caption(f"Budget: {BUDGET_HELP[budget]}.")
    _job_panel(job)
    _open_run()
