"""Reliability and security: hostile checkpoints, NaN/Inf during inspection, damaged run folders, double clicks,
divergence, sessions that drop and come back, reproducible runs.

The real-browser side of the same issue (closed tabs, many users at once) is in tests/e2e/test_load.py.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from apphelpers import TINY, app, ok, poll
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from resviz import NetConfig, TrainConfig, build_net, plots
from resviz.analysis.inspection import Lesion, compare, inspect_image, removal_effects
from resviz.jobs import JobRegistry, TrainingJob, live_workers
from resviz.storage.checkpoints import CheckpointError, load_checkpoint, load_checkpoint_bytes, save_checkpoint
from resviz.storage.rundirs import MetricsLog, load_run, write_json
from resviz.train.records import curves

ROOT = Path(__file__).resolve().parents[1]
# Mangled pickles make torch's weights-only unpickler warn about their protocol byte before it refuses them.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")

# -- fuzzing the checkpoint loader -----------------------------------------------------------------
# Every upload goes through load_checkpoint_bytes: weights bytes, an optional JSON sidecar and a file
# name. Whatever they hold, the only exception allowed out is CheckpointError (a user-facing message).
FUZZ_CFG = NetConfig(depth=8, width=4, input_size=16, num_classes=3)
NAMES = ("up.safetensors", "up.pt", "up.pth", "up.bin", "up", "UP.PT")
SETTINGS = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _seed_files() -> tuple[bytes, bytes, bytes]:
    torch.manual_seed(0)
    net = build_net(FUZZ_CFG).eval()
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_checkpoint(net, Path(tmp) / "seed", dataset={"name": "shapes", "classes": ["a", "b", "c"]})
        sidecar = weights.with_suffix(".json").read_bytes()
        blob = weights.read_bytes()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    return blob, sidecar, buf.getvalue()


WEIGHTS, SIDECAR, PT = _seed_files()
_N = int.from_bytes(WEIGHTS[:8], "little")
HEADER, PAYLOAD = json.loads(WEIGHTS[8 : 8 + _N]), WEIGHTS[8 + _N :]
META = json.loads(SIDECAR)

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 2, 3, 8, 14, 16, 64, 10**6, 2**31, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["basic", "bottleneck", "pre", "imagenet", "cifar", "F32", "I64", "none", ""]),
)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                                  max_size=4), max_leaves=12)


@st.composite
def flipped(draw, base: bytes) -> bytes:
    """Random byte changes (half of them in the first 160 bytes: the header), maybe a cut or an insert."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 8))):
        hi = min(len(data) - 1, 160) if draw(st.booleans()) else len(data) - 1
        data[draw(st.integers(0, hi))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def _mutate_dict(draw, d: dict, depth: int = 0) -> dict:
    """A copy of ``d`` with one entry replaced, deleted, added, or (for nested dicts) mutated inside."""
    d = dict(d)
    keys = list(d)
    action = draw(st.sampled_from(["replace", "delete", "add", "nested"] if keys else ["add"]))
    key = draw(st.sampled_from(keys)) if keys else None
    if action == "replace":
        d[key] = draw(json_value)
    elif action == "delete":
        del d[key]
    elif action == "add":
        d[draw(st.text(max_size=10))] = draw(json_value)
    elif isinstance(d[key], dict) and depth < 3:
        d[key] = _mutate_dict(draw, d[key], depth + 1)
    else:
        d[key] = draw(json_value)
    return d


@st.composite
def mutated_header(draw) -> bytes:
    """A safetensors file whose JSON header was changed structurally, re-encoded with a consistent length."""
    header = HEADER
    for _ in range(draw(st.integers(1, 3))):
        header = _mutate_dict(draw, header)
    if draw(st.booleans()):  # and the embedded ResViz metadata
        meta = json.loads(HEADER["__metadata__"]["resviz"])
        meta = _mutate_dict(draw, meta)
        header = {**header, "__metadata__": {"resviz": json.dumps(meta)}}
    text = json.dumps(header).encode()
    payload = PAYLOAD[: draw(st.integers(0, len(PAYLOAD)))] if draw(st.booleans()) else PAYLOAD
    length = len(text) if draw(st.integers(0, 4)) else draw(st.integers(0, 2**64 - 1))
    return length.to_bytes(8, "little") + text + payload


@st.composite
def mutated_sidecar(draw) -> bytes:
    """The JSON sidecar with its net config (or any other part) changed; sha256 kept or dropped."""
    meta = dict(META)
    if draw(st.booleans()):
        meta["net"] = _mutate_dict(draw, meta["net"])
    else:
        meta = _mutate_dict(draw, meta)
    if draw(st.booleans()):
        meta.pop("sha256", None)
    return json.dumps(meta, allow_nan=True).encode()


def _load(data: bytes, sidecar: bytes | None, name: str) -> None:
    try:
        net, meta = load_checkpoint_bytes(data, sidecar, filename=name)
    except CheckpointError as e:
        assert str(e)
        return
    assert isinstance(meta, dict) and not net.training  # loaded: a rebuilt net, in eval mode


# 10,000 inputs in all, split by kind (about 40 s on a 2-core machine).
@settings(SETTINGS, max_examples=3000)
@given(st.binary(max_size=2048), st.one_of(st.none(), st.binary(max_size=256)), st.sampled_from(NAMES))
def test_fuzz_random_bytes(data, sidecar, name):
    _load(data, sidecar, name)


@settings(SETTINGS, max_examples=3500)
@given(st.one_of(flipped(WEIGHTS), flipped(PT), mutated_header()), st.sampled_from(NAMES))
def test_fuzz_damaged_weights(data, name):
    _load(data, None, name)


@settings(SETTINGS, max_examples=2500)
@given(st.one_of(mutated_sidecar(), mutated_sidecar(), mutated_sidecar(), flipped(SIDECAR)), st.sampled_from(["safetensors", "pt"]))
def test_fuzz_damaged_sidecars(sidecar, kind):
    _load(WEIGHTS if kind == "safetensors" else PT, sidecar, f"up.{kind}")


@settings(SETTINGS, max_examples=1000)
@given(st.integers(0, len(WEIGHTS)), st.integers(0, len(SIDECAR)), st.booleans())
def test_fuzz_truncated_files_on_disk(cut_weights, cut_sidecar, with_sidecar):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ck.safetensors"
        path.write_bytes(WEIGHTS[:cut_weights])
        if with_sidecar:
            path.with_suffix(".json").write_bytes(SIDECAR[:cut_sidecar])
        try:
            load_checkpoint(path)
        except CheckpointError as e:
            assert str(e)


def test_config_that_does_not_fit_its_weights_allocates_nothing() -> None:
    """A sidecar claiming a 2,048-channel net next to tiny weights is refused before any weight is allocated."""
    import resource

    meta = {**META, "net": {**META["net"], "width": 2048}}
    meta.pop("sha256")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint_bytes(WEIGHTS, json.dumps(meta).encode())
    assert time.perf_counter() - t0 < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300_000  # the real net would need ~2.5 GB
    for net, match in (({**META["net"], "block": None}, "invalid"), ({**META["net"], "width": 4.5}, "cannot be built"),
                       ({**META["net"], "depth": 6 * 2000 + 2}, "too large"), ({**META["net"], "input_size": 2**20}, "too large")):
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint_bytes(WEIGHTS, json.dumps({"net": net}).encode())


# -- NaN and Inf during inspection --------------------------------------------------------------------
INSPECT_CFG = NetConfig(depth=8, width=4, input_size=16, num_classes=5)
CLASSES = ["a", "b", "c", "d", "e"]


def _inspect_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_net(INSPECT_CFG).eval()


def _strict(fig) -> dict:
    """The figure as JSON, refusing NaN/Infinity tokens (what the browser's JSON.parse would refuse)."""
    return json.loads(fig.to_json(), parse_constant=lambda token: pytest.fail(f"{token} in a figure"))


def _figures(r, net, x) -> list:
    return [plots.topk_bars(CLASSES, r.probs), plots.topk_bars(CLASSES, r.probs, r.probs),
            plots.magnitude_bars(r.f_norm, r.s_norm), plots.feature_grid(r.maps.sum), plots.feature_grid(r.maps.f),
            plots.lesion_figure([str(i) for i in range(len(net.blocks))], {"p": removal_effects(net, x)})]


def _pixel(value: float) -> torch.Tensor:
    x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))
    x[1, 5, 7] = value
    return x


@pytest.mark.parametrize(("x", "count"), [
    (torch.full((3, 16, 16), math.nan), 768), (torch.full((3, 16, 16), math.inf), 768), (_pixel(math.nan), 1),
    (_pixel(-math.inf), 1),
])
def test_nonfinite_input_is_reported_and_plots_still_build(x, count) -> None:
    net = _inspect_net()
    r = inspect_image(net, x, classes=CLASSES, channels=4)
    assert r.problem.startswith(f"the input image holds {count} NaN/Inf value")
    for fig in _figures(r, net, x):
        _strict(fig)
    compare(r.probs, r.probs, CLASSES)  # the comparison the page draws does not raise either


@pytest.mark.parametrize(("where", "value"), [("blocks.1.branch.conv1.weight", math.nan),
                                              ("blocks.2.branch.norm1.running_var", math.nan), ("fc.bias", math.inf)])
def test_nonfinite_weights_are_named(where: str, value: float) -> None:
    net = _inspect_net()
    with torch.no_grad():
        net.state_dict()[where].view(-1)[0] = value  # state_dict tensors share the net's storage
    x = _pixel(0.0)
    for lesion in (Lesion(), Lesion(skips=(True, False, True)), Lesion(removed=(0,))):
        r = inspect_image(net, x, classes=CLASSES, lesion=lesion, channels=4)
        assert "weights hold NaN/Inf" in r.problem and where in r.problem, r.problem
        for fig in _figures(r, net, x):
            _strict(fig)


def test_overflow_is_reported_and_clean_passes_report_nothing() -> None:
    net, x = _inspect_net(), _pixel(0.0)
    for lesion in (Lesion(), Lesion(skips=(False, False, False)), Lesion(removed=(0, 1, 2))):  # zeros, not NaN
        assert inspect_image(net, x, classes=CLASSES, lesion=lesion, channels=4).problem == ""
    with torch.no_grad():
        for blk in net.blocks:
            blk.branch.conv1.weight.mul_(1e30)
    r = inspect_image(net, x, classes=CLASSES, channels=4)
    assert "overflow" in r.problem, r.problem


# -- the app under streamlit.testing: Inspect with non-finite numbers ------------------------------------
@pytest.fixture
def _app_env(monkeypatch: pytest.MonkeyPatch):
    """The app's modules importable; each test gets its own job registry, and every job it started stops."""
    monkeypatch.syspath_prepend(str(ROOT))
    from app_pages import jobs

    jobs.registry.clear()
    yield jobs
    jobs.registry.clear()


def _chart_specs(at) -> list[dict]:
    return [json.loads(c.proto.spec, parse_constant=lambda t: pytest.fail(f"{t} sent to the browser"))
            for c in at.get("plotly_chart")]


def _inspect_trained(net, info: dict):
    from app_pages.state import TRAINED, TrainedModel

    at = app(TINY, "inspect")
    at.session_state[TRAINED] = {"run 1": TrainedModel(net, info)}
    at.radio(key="i_source").set_value("trained")
    at.radio(key="i_image_source").set_value("Built-in picture")
    at.run()
    assert not at.exception, at.exception
    return at


INFO = {"dataset": "shapes", "classes": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3, "channels": 3, "input_size": 16,
        "role": "residual"}


def test_inspect_page_reports_nan_weights_and_still_draws(_app_env) -> None:
    net = _inspect_net()
    with torch.no_grad():
        net.blocks[1].branch.conv1.weight[0, 0, 0, 0] = math.nan
    at = _inspect_trained(net, INFO)
    assert [e.value for e in at.error] == [
        "Not every number here is finite: the net's weights hold NaN/Inf values (blocks.1.branch.conv1.weight), "
        "so its outputs are meaningless."]
    assert len(_chart_specs(at)) >= 3  # top-k (empty, with its "no data" note), feature maps, magnitudes


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_inspect_page_reports_an_input_made_infinite_by_a_tiny_std(_app_env) -> None:
    at = _inspect_trained(_inspect_net(), {**INFO, "std": [1e-40] * 3})  # metadata of a damaged checkpoint: x / std = inf
    assert any("the input image holds" in e.value for e in at.error), [e.value for e in at.error]
    _chart_specs(at)


def test_inspect_page_shows_no_error_for_a_clean_net(_app_env) -> None:
    at = _inspect_trained(_inspect_net(), INFO)
    assert not at.error and len(_chart_specs(at)) >= 3


# -- run folders that were cut off ----------------------------------------------------------------------
def test_experiments_page_opens_run_folders_cut_off_mid_write(_app_env, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "a-train-run"
    write_json(run / "config.json", {"kind": "train", "net": INSPECT_CFG.to_dict()})
    with MetricsLog(run / "metrics.jsonl") as log:
        log.write({"step": 1, "loss": 2.1})
        log.write({"step": 2, "loss": 1.9})
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 1.')  # the writer was killed here
    study = tmp_path / "b-study"
    study.mkdir()
    (study / "result.json").write_text('{"study": "degradation", "rows": [{"depth": 8, "pla')
    monkeypatch.setenv("RESVIZ_RUNS", str(tmp_path))
    at = ok(app(TINY, "experiments"))
    for folder, expect in ((run, ["2 metrics lines", "last line is incomplete"]), (study, ["result.json could not be read"])):
        at.selectbox(key="x_run").set_value(folder)
        ok(at.run())
        captions = " | ".join(c.value for c in at.caption)
        assert all(e in captions for e in expect), captions
    assert load_run(run).metrics == [{"step": 1, "loss": 2.1}, {"step": 2, "loss": 1.9}]


# -- the Train page: double clicks, divergence, links with values out of range ---------------------------
TRAIN = "train"
RUN = {**TINY, "bs": "32", "nt": "500"}
LONG = {**TINY, "bs": "16", "nt": "1000", "ep": "50"}  # 3,100 steps: minutes, unless stopped


def _status(at) -> str:
    texts = [p.proto.text for p in at.get("progress") if "·" in p.proto.text]
    return texts[0].rsplit("· ", 1)[-1] if texts else ""


def test_start_and_stop_clicked_again_make_one_job_and_stop_it_cleanly(_app_env) -> None:
    """A click that arrives again before the page has redrawn finds the job already there (the browser
    version, a real double click, is in tests/e2e/test_load.py)."""
    app_jobs = _app_env
    at = ok(app(LONG, TRAIN))
    at.button(key="t_start").click().run()
    ok(at)
    sid = at.session_state["session_id"]
    jobs = app_jobs.registry().jobs_for(sid)
    assert len(jobs) == 1 and at.button(key="t_start").disabled
    again = TrainingJob(jobs[0].net_cfg, jobs[0].data, jobs[0].train_cfg)  # what the second click's _start submits
    assert app_jobs.registry().submit(sid, again) is jobs[0] and not again.alive
    poll(at, lambda a: _status(a) == "running")
    at.button(key="t_stop").click().run()
    if not at.button(key="t_stop").disabled:  # the worker had not finished its step when the page redrew
        at.button(key="t_stop").click().run()
    poll(at, lambda a: any("stopped" in w.value for w in a.warning))
    assert app_jobs.registry().jobs_for(sid) == jobs and jobs[0].status == "stopped"
    assert jobs[0].join(10) and not jobs[0].alive and app_jobs.registry().active_count() == 0
    assert not at.button(key="t_start").disabled


def test_diverging_learning_rate_is_marked_with_a_message_and_no_nan_reaches_the_charts(_app_env) -> None:
    # Linear blocks (identity activation) at lr 2 with a constant schedule blow up after a few dozen steps.
    at = ok(app({**RUN, "ep": "5", "a": "identity", "lr": "2", "sch": "constant"}, TRAIN))
    at.button(key="t_start").click().run()
    poll(at, lambda a: _status(a) in ("diverged", "finished"))
    assert _status(at) == "diverged"
    assert [e.value for e in at.error if "diverged" in e.value][0].endswith("try a lower learning rate.")
    curves = next(s for s in _chart_specs(at) if "Training curves" in json.dumps(s["layout"].get("title")))
    for trace in curves["data"]:
        assert None not in trace.get("y", []), trace["name"]  # plotly writes NaN as null
    assert all(len(t["y"]) > 1 for t in curves["data"] if t["name"].endswith("train"))
    name, model = next(iter(at.session_state["trained_models"].items()))  # the last good weights are inspectable
    assert all(torch.isfinite(p).all() for p in model.net.parameters()), name


def test_link_values_beyond_the_boxes_are_clamped_with_a_warning(_app_env) -> None:
    # Before: Streamlit replaced them by the boxes' minimum without a word (200 epochs became 0.1).
    at = app({**RUN, "ep": "200", "lr": "1e6"}, TRAIN)
    assert not at.exception and not at.error
    assert at.number_input(key="t_epochs").value == 50.0 and at.number_input(key="t_lr").value == 2.0
    warnings = " ".join(w.value for w in at.warning)
    assert "epochs 200" in warnings and "learning rate 1e+06" in warnings
    assert at.query_params["ep"] == "50" and at.query_params["lr"] == "2"


# -- sessions that drop and come back ---------------------------------------------------------------------
SMALL = NetConfig(depth=8, width=4, input_size=16, num_classes=3)


def _toy_data() -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (96,), generator=g)
    x = torch.randn(96, 3, 16, 16, generator=g)
    x[torch.arange(96), y] += 1.0
    return SimpleNamespace(train=TensorDataset(x[:64], y[:64]), test=TensorDataset(x[64:], y[64:]))


def _long_job() -> TrainingJob:
    return TrainingJob(SMALL, _toy_data(), TrainConfig(epochs=10_000, batch_size=32, device="cpu"), num_threads=1)


def _until(pred, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


def test_release_waits_for_the_grace_period_and_a_reclaim_cancels_it() -> None:
    reg = JobRegistry(cap=2)
    reg.release("nobody", grace=60)  # a session that never trained leaves nothing behind (no timer thread)
    assert reg.pending_releases() == []
    job = reg.submit("s", _long_job())
    assert live_workers() == 1
    reg.release("s", grace=0.3)  # the connection dropped
    assert reg.pending_releases() == ["s"]
    assert reg.reclaim("s") and not reg.reclaim("s")  # it came back: the stop is called off
    time.sleep(0.5)
    assert job.active and reg.jobs_for("s") == [job]
    reg.release("s", grace=5.0)
    reg.release("s", grace=0.2)  # a second release replaces the first timer
    t0 = time.monotonic()
    _until(lambda: not job.alive)
    assert 0.15 < time.monotonic() - t0 < 10 and job.status == "stopped"
    assert reg.jobs_for("s") == [] and reg.pending_releases() == [] and live_workers() == 0
    other = reg.submit("t", _long_job())
    reg.release("t", grace=60)
    reg.shutdown()  # stopping the server stops everything at once and leaves no timer behind
    assert not other.alive and reg.pending_releases() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("resviz-release-") and t.is_alive()]


def _disconnect_every_session() -> None:
    """What Streamlit does when a websocket closes: release that session's session-scoped resources."""
    from streamlit.runtime.caching import cache_resource_api

    for session in [k for k in list(cache_resource_api._resource_caches._function_caches) if k is not None]:
        cache_resource_api.clear_session_cache(session)


@pytest.fixture
def _short_session_ttl():
    from streamlit import config

    key = "server.disconnectedSessionTTL"
    old = config.get_option(key)
    config.set_option(key, 3)
    yield 3.0
    config.set_option(key, old)


def test_a_dropped_connection_keeps_the_job_and_a_closed_tab_stops_it(_app_env, _short_session_ttl) -> None:
    app_jobs, ttl = _app_env, _short_session_ttl
    at = ok(app(LONG, TRAIN))
    at.button(key="t_start").click().run()
    sid = at.session_state["session_id"]
    job = app_jobs.registry().jobs_for(sid)[0]
    _disconnect_every_session()  # the websocket drops ...
    assert app_jobs.registry().pending_releases() == [sid] and job.active  # ... the job waits for the session TTL
    ok(at.run())  # ... and the browser reconnects: its next run reclaims the job
    assert app_jobs.registry().pending_releases() == []
    time.sleep(ttl + 0.5)
    assert app_jobs.registry().jobs_for(sid) == [job] and job.active and _status(at) in ("running", "pending")

    _disconnect_every_session()  # the tab is closed: nothing comes back
    t0 = time.monotonic()
    _until(lambda: not job.alive, ttl + 30)
    assert time.monotonic() - t0 > ttl - 0.5
    assert job.status == "stopped" and app_jobs.registry().jobs_for(sid) == [] and app_jobs.registry().active_count() == 0


# -- reproducibility ------------------------------------------------------------------------------------
def test_the_job_runner_reproduces_a_run_from_its_seed() -> None:
    """The app's path (worker thread, both nets, bounded history) gives identical curves for one seed on CPU.

    resviz.train.trainer's own determinism (tests/test_train.py) covers the trainer; this covers the job runner on top.
    """
    def history(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=seed, probe_every=2, device="cpu", augment=True)
        job = TrainingJob(SMALL, _toy_data(), cfg, num_threads=1, history_points=8).start()
        assert job.join(60) and job.status == "finished"
        return {c.label: (c.steps, c.values) for c in curves(job.snapshot().history)}

    a, b, c = history(3), history(3), history(4)
    assert a.keys() == b.keys() and "plain/loss" in a
    for key in a:
        if key == "images_per_s":
            continue
        assert np.array_equal(a[key][0], b[key][0]) and np.array_equal(a[key][1], b[key][1]), key
    assert not np.array_equal(a["residual/loss"][1], c["residual/loss"][1])
