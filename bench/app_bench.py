"""The app rows of the benchmark: the real app under a real browser, the live charts' payload, and
the time to accuracy of the Train page's default run.

The Train page's defaults, dataset loading, evaluation interval and charts are imported from the app
itself (``app_pages.state``, ``app_pages.jobs``, ``app_pages.train``), so the headless runs
and the simulated payload are exactly what a user's browser session gets.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from timing import Row, load_results

from app_pages import jobs, state
from app_pages import train as train_page
from resviz.jobs import TrainingJob
from resviz.train.records import History, JobSnapshot, Series, Status

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
# The saved bench output the README's table is drawn from (``bench.py --json``): its accuracy row is the
# seeded default run's recorded final accuracy, which a new run must reach again.
SAVED = ROOT / "bench" / "results" / "cpu.json"
ACCURACY_ROW = "final test accuracy, residual vs plain twin"
TTA_LIMIT_S = 20.0  # the default demo: ResNet >= 90% test accuracy, plain twin >= 40 points behind, in <= 20 s
TTA_ACCURACY, TTA_GAP = 0.90, 0.40
PAYLOAD_LIMIT_KB = 300.0
STALL_S = 60.0  # a live page whose text does not change for this long has stalled
PROGRESS = re.compile(r"step (\d+)/(\d+) · epoch [\d.]+ · (\d+) images/s")


def default_probe_every() -> int:
    return state.DEFAULT_TRAIN.probe_every


# -- the default run, headless ----------------------------------------------------------------------
def default_job() -> tuple[TrainingJob, float]:
    """The job the Train page's Start button submits with the defaults, and the seconds to load its data."""
    t0 = time.perf_counter()
    bundle = jobs.load_bundle(state.DEFAULT_DATASET, state.DEFAULT_NET.input_size, state.DEFAULT_TRAIN_SIZE,
                              state.DEFAULT_TRAIN.seed)
    load_s = time.perf_counter() - t0
    net_cfg = state.with_dataset_shape(state.DEFAULT_NET, bundle.num_classes, bundle.channels)
    cfg = replace(state.DEFAULT_TRAIN, eval_every=train_page.eval_every(len(bundle.train), state.DEFAULT_TRAIN))
    return TrainingJob(net_cfg, bundle, cfg, twin=True, num_threads=jobs.WORKER_THREADS), load_s


def run_headless() -> dict[str, Any]:
    """Run the default job in this process (worker thread, as in the app) and sample it once a second."""
    job, load_s = default_job()
    t0 = time.perf_counter()
    job.start()
    samples = []
    while not job.join(timeout=1.0):  # one reading a second, like the page's refresh
        snap = job.snapshot()
        if snap.step > 0 and snap.status == Status.RUNNING:
            samples.append((snap.step, snap.images_per_s))
    wall = time.perf_counter() - t0
    snap = job.snapshot()
    acc = {n: snap.latest[n].test_acc if n in snap.latest else None for n in snap.names}
    return {"wall_s": wall, "load_s": load_s, "status": str(snap.status), "steps": snap.step,
            "ips": _steady(samples, snap.total_steps),
            "acc": {n: float("nan") if a is None else a for n, a in acc.items()}}


def _steady(samples: list[tuple[int, float]], total: int) -> float:
    """Median images/s reading once the run is past its first 10% (the EMA has settled)."""
    late = [ips for step, ips in samples if step >= 0.1 * total] or [ips for _, ips in samples]
    return statistics.median(late) if late else float("nan")


# -- the app under a browser ------------------------------------------------------------------------
class AppServer:
    """`streamlit run app.py` on a free localhost port, in its own process group."""

    def __init__(self, runs_dir: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
               "--server.port", str(self.port), "--server.address", "127.0.0.1"]
        self.log = open(Path(runs_dir) / "streamlit.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "RESVIZ_RUNS": runs_dir}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=5) as r:  # localhost
                    if r.read().strip() == b"ok":
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError("the app did not answer its health check")

    def peak_rss_mb(self) -> float:
        """VmHWM of the server process: the most resident memory it has held."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kb / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def run_in_browser(browser: Any, server: AppServer, timeout_s: float = 600.0) -> dict[str, Any]:
    """Open the Train page, press Start, read the progress line once a second until the run ends."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = ctx.new_page()
        page.set_default_timeout(120_000)
        received = [0]
        lock = threading.Lock()

        def count(payload: bytes | str) -> None:
            with lock:
                received[0] += len(payload)

        page.on("websocket", lambda ws: ws.on("framereceived", count))
        page.goto(f"{server.url}/train")
        start = page.get_by_role("button", name="Start")
        start.wait_for()
        page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')")
        before, t0 = received[0], time.perf_counter()
        _press_start(page, start)
        samples, total, text, finished = [], 0, "", False
        changed, last_text = time.perf_counter(), ""
        while time.perf_counter() - t0 < timeout_s:
            time.sleep(1.0)
            text = page.locator("body").inner_text()
            if text != last_text:
                changed, last_text = time.perf_counter(), text
            elif time.perf_counter() - changed > STALL_S:  # the page stopped changing: say so, do not wait on
                shot = f"/tmp/resviz-bench-stalled-{int(t0)}.png"
                page.screenshot(path=shot, full_page=True)
                print(f"[bench] app: the page did not change for {STALL_S:.0f} s (screenshot {shot}); page text:\n"
                      f"{text[:3000]}", file=sys.stderr, flush=True)
                break
            m = PROGRESS.search(text)
            if m:
                step, total, ips = int(m[1]), int(m[2]), float(m[3])
                samples.append((step, ips))
                finished = step == total
            finished = finished or "Training finished" in text
            if finished or "Training was stopped" in text:
                break
        wall = time.perf_counter() - t0
        if os.environ.get("RESVIZ_BENCH_DEBUG"):
            page.screenshot(path=f"/tmp/resviz-bench-{int(t0)}.png", full_page=True)
            print(text[:3000], file=sys.stderr)
        return {"wall_s": wall, "ips": _steady(samples, total or 1), "ws_bytes": received[0] - before, "finished": finished}
    finally:
        ctx.close()


def _press_start(page: Any, start: Any, tries: int = 3) -> None:
    """Click Start until the run shows up (a click that lands during a rerun can be lost)."""
    stop = page.get_by_role("button", name="Stop")
    for _ in range(tries):
        start.click()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if stop.is_enabled():
                return
            time.sleep(0.5)
    raise RuntimeError("the Train page did not start a run after pressing Start")


def _browser_rows(quick: bool, headless: list[dict]) -> list[Row]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return [Row("3", "live app vs headless", "not measured (playwright is not installed)")]
    if not os.path.exists(CHROMIUM):
        return [Row("3", "live app vs headless", f"not measured (no Chromium at {CHROMIUM}; apt-get install -y chromium)")]
    pairs = 1 if quick else 2
    app_runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        server = AppServer(tmp)
        try:
            server.wait_healthy()
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                for _ in range(pairs):  # interleaved: headless, app, headless, app
                    headless.append(run_headless())
                    app_runs.append(run_in_browser(browser, server))
            finally:
                browser.close()
            rss = server.peak_rss_mb()
        finally:
            server.stop()
    if not all(a["finished"] for a in app_runs):
        return [Row("3", "default run in the app", "**failed**: a run did not finish in the browser within the time limit")]
    mine = headless[-pairs:]
    h_ips, a_ips = max(h["ips"] for h in mine), max(a["ips"] for a in app_runs)
    ratio = a_ips / h_ips  # the least disturbed run of each kind
    med = statistics.median(a["ips"] / h["ips"] for a, h in zip(app_runs, mine))
    kb_s = statistics.median(a["ws_bytes"] / a["wall_s"] / 1e3 for a in app_runs)
    walls = ", ".join(f"{a['wall_s']:.0f}" for a in app_runs), ", ".join(f"{h['wall_s']:.0f}" for h in mine)
    return [
        Row("3", f"default run in the app, Train page open (Chromium, 1 refresh/s), best of {pairs}: images/s",
            f"{a_ips:.0f} img/s (wall {walls[0]} s)", f"headless job: {h_ips:.0f} img/s (wall {walls[1]} s)",
            ratio, ">= 0.85x headless", ratio >= 0.85, med),
        Row("3", "websocket data the browser received while training", f"{kb_s:.0f} KB/s", "", None, "(reported)"),
        Row("3", "app process peak RSS (VmHWM), after the runs", f"{rss:.0f} MB", "", None, "(reported)"),
    ]


# -- chart payload ----------------------------------------------------------------------------------
def simulated_snapshot(steps: int = 6000, blocks: int = 15, seed: int = 0) -> JobSnapshot:
    """A job snapshot as ``TrainingJob.snapshot()`` gives it after ``steps`` steps of a twin run.

    6000 steps is a 10-minute run at 10 steps/s; every series is capped and thinned by
    ``resviz.train.records.Series`` exactly as in a real job (500 points), probes every 5 steps, a test
    evaluation every 300 steps.
    """
    rng = np.random.default_rng(seed)
    names = ("residual", "plain")
    metrics = ("loss", "acc", "grad_norm", "param_norm", "test_loss", "test_acc")
    hist = {n: {m: Series(500) for m in metrics} for n in names}
    lr, ips = Series(500), Series(500)
    keys = ("f_norm", "s_norm", "ratio", "cosine", "mean_sq", "var", "branch_var", "grad_branch", "grad_shortcut",
            "grad_total", "grad_block")
    probes = {n: {k: Series(500, (blocks,)) for k in keys} for n in names}
    for step in range(1, steps + 1):
        for ms in hist.values():
            for m, s in ms.items():
                if not m.startswith("test_") or step % 300 == 0:
                    s.append(step, rng.lognormal(0.0, 1.0))
        lr.append(step, rng.lognormal(0.0, 1.0))
        ips.append(step, rng.lognormal(0.0, 1.0))
        if step % 5 == 0:
            for s in (s for rs in probes.values() for s in rs.values()):
                s.append(step, rng.lognormal(-2.0, 1.5, blocks))
    history = History(nets={n: {m: s.points() for m, s in ms.items()} for n, ms in hist.items()},
                      lr=lr.points(), images_per_s=ips.points(),
                      probes={n: {k: s.points() for k, s in rs.items()} for n, rs in probes.items()})
    return JobSnapshot(id="simulated", status=Status.RUNNING, error="", created=0.0, started=0.0, ended=None,
                       step=steps, total_steps=steps, epoch=0.0, progress=1.0, eta_s=None, images_per_s=0.0,
                       time_s=0.0, names=names, net_cfg={}, train_cfg={}, latest={}, history=history, param_names={})


def refresh_cost(snap: JobSnapshot, points: int) -> tuple[float, float]:
    """(KB of chart JSON, CPU seconds) of one live-view refresh: build the figures as the page does, then
    convert them as ``st.plotly_chart`` does (validate, then ``plotly.io.to_json``)."""
    import plotly.io as pio
    import plotly.tools

    t0 = time.process_time()
    figs = train_page.live_figures(snap, points)
    size = sum(len(pio.to_json(plotly.tools.return_figure_from_figure_or_data(f, validate_figure=True), validate=False))
               for f in figs.values())
    return size / 1e3, time.process_time() - t0


def _payload_rows() -> list[Row]:
    snap = simulated_snapshot()
    kb, cpu = refresh_cost(snap, train_page.LIVE_POINTS)
    kb_all, cpu_all = refresh_cost(snap, 10**9)
    return [Row("3", f"chart JSON per live refresh, 10-minute run ({train_page.LIVE_POINTS} points per series)",
                f"{kb:.0f} KB, {cpu * 1e3:.0f} ms CPU", f"all 500 stored points: {kb_all:.0f} KB, {cpu_all * 1e3:.0f} ms CPU",
                kb / kb_all, f"<= {PAYLOAD_LIMIT_KB:.0f} KB", kb <= PAYLOAD_LIMIT_KB)]


def section_app(quick: bool, headless: list[dict]) -> list[Row]:
    return _browser_rows(quick, headless) + _payload_rows()


# -- time to accuracy -------------------------------------------------------------------------------
def section_tta(quick: bool, headless: list[dict]) -> list[Row]:
    if not headless:
        headless.append(run_headless())
    h = min(headless, key=lambda r: r["wall_s"])  # the least disturbed run; all runs are seeded alike
    acc = h["acc"]
    res, plain = acc.get("residual", float("nan")), acc.get("plain", float("nan"))
    stated = recorded_accuracy()
    floor = TTA_ACCURACY
    reached = res >= floor and res - plain >= TTA_GAP
    ok = reached and h["wall_s"] + h["load_s"] <= TTA_LIMIT_S and h["status"] == "finished"  # loading the data counts
    walls = [round(r["wall_s"], 1) for r in headless]
    load_s = max(r["load_s"] for r in headless)
    recorded = f"recorded: {stated['residual']:.1%} vs {stated['plain']:.1%}" if stated else "no recorded run"
    return [Row("5", f"Train page defaults ({h['steps']} steps, twin, 1 training thread as in the app): wall time",
                f"{h['wall_s']:.1f} s (runs: {', '.join(f'{w:.1f}' for w in walls)} s; loading the data first: {load_s:.1f} s)",
                recorded, None, f"<= {TTA_LIMIT_S:.0f} s", ok,
                data={"wall_s": round(h["wall_s"], 1), "runs_s": walls, "load_s": round(load_s, 2), "steps": h["steps"]}),
            Row("5", ACCURACY_ROW, f"{res:.1%} vs {plain:.1%}", "", None,
                f">= {floor:.0%}, gap >= {TTA_GAP * 100:.0f} points", reached,
                data={"residual": res, "plain": plain})]


def recorded_accuracy(path: Path = SAVED) -> dict[str, float] | None:
    """The default run's final test accuracy in the saved bench output ({"residual", "plain"}; None without one)."""
    if not path.is_file():
        return None
    _, rows = load_results(path)
    row = next((r for r in rows if r.what == ACCURACY_ROW and {"residual", "plain"} <= set(r.data)), None)
    return None if row is None else {k: float(row.data[k]) for k in ("residual", "plain")}
