"""Training jobs and the registry: control, caps, failures, divergence, history bounds, no stray threads."""

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from resviz import NetConfig, TrainConfig, runtime
from resviz import jobs as jobs_mod
from resviz.experiments.runner import StudyJob
from resviz.jobs import Job, JobLimitError, JobRegistry, Status, TrainingJob
from resviz.train.records import JobSnapshot, Series, curves
from resviz.train.trainer import fit

NET = NetConfig(depth=8, width=8, input_size=16, num_classes=3)


@pytest.fixture(autouse=True)
def _no_stray_workers():
    yield
    left = [t for t in threading.enumerate() if t.name.startswith("resviz-job-")]
    for t in left:
        t.join(10)
    assert not [t for t in left if t.is_alive()], "a job thread outlived its test"


def _data(n_train: int = 64, n_test: int = 32, classes: int = 3) -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n_train + n_test,), generator=g)
    x = torch.randn(n_train + n_test, 3, 16, 16, generator=g)
    x[torch.arange(len(y)), y % 3] += 1.0
    return SimpleNamespace(train=TensorDataset(x[:n_train], y[:n_train]), test=TensorDataset(x[n_train:], y[n_train:]))


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=32, lr=0.05, probe_every=2, device="cpu")
    return TrainConfig(**{**base, **kw})


def _long_job(**kw) -> TrainingJob:
    return TrainingJob(NET, _data(), _cfg(epochs=10_000), num_threads=1, **kw)


def _wait(pred, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def _step(job: TrainingJob) -> int:
    return job.snapshot().step


def test_job_runs_to_completion_with_bounded_finite_history():
    job = TrainingJob(NET, _data(), _cfg(epochs=3), history_points=4).start()
    assert job.join(60) and job.status == "finished" and job.error == ""
    snap = job.snapshot()
    assert isinstance(snap, JobSnapshot) and snap.status is Status.FINISHED
    assert snap.progress == 1.0 and snap.step == snap.total_steps == 6 and snap.eta_s is None
    assert snap.names == ("residual", "plain") and set(job.nets) == {"residual", "plain"}
    loss = snap.history.nets["residual"]["loss"]
    steps, values = loss.steps, loss.values
    assert len(steps) == 4 and steps[-1] == 6 and values.dtype == np.float32 and np.isfinite(values).all()
    assert snap.history.nets["plain"]["test_acc"].steps.tolist() == [2, 4, 6]  # once per epoch of 2 steps
    assert snap.latest["plain"].test_acc == snap.history.nets["plain"]["test_acc"].values[-1].item()
    grad = snap.history.probe("residual", "grad_block")
    assert grad.steps.tolist() == [2, 4, 6] and grad.values.shape == (3, NET.num_blocks)
    assert len(snap.param_names["residual"]) > 0 and snap.net_cfg == NET.to_dict()
    assert not job.nets["residual"].blocks[0]._forward_hooks  # instruments detached
    assert snap.engine == ""  # CPU: nothing to say about CUDA graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_jobs_say_how_their_steps_run():
    job = TrainingJob(NET, _data(), _cfg(epochs=3, device="cuda")).start()
    assert job.join(120) and job.status == "finished", job.error
    assert job.snapshot().engine == "CUDA graphs"
    job = TrainingJob(NET, _data(), _cfg(epochs=3, device="cuda", optimizer="adamw")).start()
    assert job.join(120) and job.snapshot().engine.startswith("eager loop (") and "adamw" in job.snapshot().engine


def test_start_pause_resume_stop():
    job = _long_job()
    assert job.status == "pending" and job.snapshot().step == 0
    job.start()
    job.start()  # a second start does nothing
    _wait(lambda: _step(job) >= 2)
    job.pause()
    assert job.status == "paused"
    time.sleep(0.3)  # the step in flight when pausing may still land
    frozen = _step(job)
    time.sleep(0.5)
    assert _step(job) == frozen and job.alive
    job.resume()
    assert job.status == "running"
    _wait(lambda: _step(job) > frozen + 1)
    snap = job.snapshot()
    assert 0 < snap.progress < 1 and snap.eta_s > 0 and snap.images_per_s > 0
    job.stop(wait=True)
    job.stop(wait=True)  # idempotent
    assert job.status == "stopped" and not job.alive


def test_stop_while_paused_and_before_start():
    job = _long_job().start()
    _wait(lambda: _step(job) >= 1)
    job.pause()
    job.stop()
    assert job.join(10) and job.status == "stopped"
    never = _long_job()
    never.stop()
    assert never.status == "stopped" and never.start().status == "stopped" and not never.alive


def test_worker_exception_marks_failed_with_reason(monkeypatch):
    class Exploding:
        def __init__(self, nets, data, cfg, **kw):
            self.nets, self.total_steps, self.param_names = nets, 10, {}

        def steps(self):
            yield from ()
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(jobs_mod, "Trainer", Exploding)
    job = TrainingJob(NET, _data(), _cfg()).start()
    assert job.join(10) and job.status == "failed"
    assert job.error.startswith("out of memory") and "smaller batch" in job.error


def test_error_inside_training_marks_failed():
    job = TrainingJob(NET, _data(classes=7), _cfg()).start()  # labels beyond the net's 3 outputs
    assert job.join(30) and job.status == "failed" and "out of bounds" in job.error


def test_divergence_keeps_last_good_weights_and_clean_history():
    cfg = _cfg(lr=1e6, schedule="constant", epochs=50, probe_every=1)
    # one thread, like the reference run below: at this lr another thread count's rounding ends elsewhere
    job = TrainingJob(NET, _data(), cfg, num_threads=1).start()
    assert job.join(60) and job.status == "diverged" and "diverged at step" in job.error
    snap = job.snapshot()
    bad_step = snap.step
    assert 1 < bad_step < snap.total_steps
    for c in curves(snap.history):
        assert np.isfinite(c.values).all() and c.steps.max() < bad_step, c.label
    assert snap.latest["residual"].loss == snap.history.nets["residual"]["loss"].values[-1].item()  # last good values
    for name, readings in snap.history.probes.items():
        for key, p in readings.items():
            structural = name == "plain" and key in ("ratio", "cosine")  # NaN by design: a plain block has no shortcut
            assert p.steps.max() < bad_step and (structural or np.isfinite(p.values).all()), (name, key)
    # the same run stopped one step earlier (constant lr, same seed) has exactly the restored weights
    ref = fit(NET, _data(), TrainConfig(**{**cfg.to_dict(), "max_steps": bad_step - 1}))
    for name, net in job.nets.items():
        want = ref.nets[name].state_dict()
        for k, v in net.state_dict().items():
            assert torch.isfinite(v.float()).all() and torch.equal(v, want[k]), (name, k)


def test_double_submit_returns_the_active_job():
    reg = JobRegistry(cap=2)
    first = reg.submit("s1", _long_job())
    second = reg.submit("s1", _long_job())
    assert second is first and reg.active_count() == 1 and reg.jobs_for("s1") == [first]
    assert reg.get("s1") is first and reg.find("s1", first.id) is first
    reg.shutdown()
    assert not first.alive and reg.jobs_for("s1") == []


def test_cap_holds_under_concurrent_submits():
    reg = JobRegistry(cap=2)
    barrier = threading.Barrier(6)
    results: list = []

    def submit(i: int) -> None:
        job = _long_job()
        barrier.wait()
        try:
            results.append(reg.submit(f"s{i}", job))
        except JobLimitError as e:
            results.append(e)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [r for r in results if isinstance(r, TrainingJob)]
    refused = [r for r in results if isinstance(r, JobLimitError)]
    assert len(started) == 2 and len(refused) == 4 and reg.active_count() == 2
    assert "already going" in str(refused[0])
    sessions = [sid for sid in (f"s{i}" for i in range(6)) if reg.jobs_for(sid)]
    for sid in sessions:
        reg.stop_session(sid)
    assert reg.active_count() == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("resviz-job-")]
    reg.submit("s9", _long_job()).stop(wait=True)  # capacity is free again


def test_finished_jobs_are_kept_per_session_up_to_keep():
    reg = JobRegistry(cap=1, keep=2)
    done = []
    for _ in range(3):
        job = reg.submit("s", TrainingJob(NET, _data(), _cfg(epochs=1)))
        assert job.join(30) and job.status == "finished"
        done.append(job)
    assert reg.jobs_for("s") == done[1:] and reg.get("s") is done[-1]
    reg.stop_session("s", forget=False)
    assert reg.jobs_for("s") == done[1:]


def test_snapshot_is_safe_while_training():
    job = _long_job().start()
    seen = 0
    while seen < 40:
        snap = job.snapshot()
        for c in curves(snap.history):
            assert len(c.steps) == len(c.values)
            c.values[:] = -1  # a copy: scribbling on it must not reach the job
        seen += 1
    _wait(lambda: _step(job) >= 2)
    assert (job.snapshot().history.nets["residual"]["loss"].values > 0).all()
    job.stop(wait=True)


def test_series_thins_old_points_and_keeps_new_ones_dense():
    s = Series(cap=100)
    for i in range(10_000):
        s.append(i, float(i))
    steps, values = s.arrays()
    assert len(steps) <= 100 and steps[0] == 0 and steps[-1] == 9_999
    assert (np.diff(steps) > 0).all() and (steps[-25:] == np.arange(9_975, 10_000)).all()
    assert np.diff(steps)[:10].min() > np.diff(steps)[-10:].max()  # older points are sparser
    v = Series(cap=8, shape=(3,))
    v.append(0, np.ones(3))
    with pytest.raises(ValueError, match="shape"):
        v.append(1, np.ones(4))


def test_worker_sets_its_thread_count(monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, nets, data, cfg, **kw):
            self.nets, self.total_steps, self.param_names, self.status, self.message = nets, 1, {}, "finished", ""

        def steps(self):
            seen.append(torch.get_num_threads())
            yield from ()

    monkeypatch.setattr(jobs_mod, "Trainer", Recorder)
    job = TrainingJob(NET, _data(), _cfg(), num_threads=1).start()
    assert job.join(10) and job.status == "finished" and seen == [1]
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert runtime.default_threads() == 3
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0})
    assert runtime.default_threads() == 1


def test_training_and_study_jobs_share_one_registry_and_its_cap():
    """One registry for every kind: the cap counts training runs and studies together, and a session
    has at most one active job of each kind."""
    assert isinstance(_long_job(), Job) and isinstance(StudyJob("shattered"), Job)
    reg = JobRegistry(cap=2)
    train = reg.submit("s", _long_job())
    study = reg.submit("s", StudyJob("shattered", overrides={"depths": (8, 110)}, num_threads=None))
    assert study is not train and reg.active_count() == 2
    assert reg.submit("s", _long_job()) is train  # the session's active training job, not a second one
    assert reg.get("s", StudyJob) is study and reg.get("s", TrainingJob) is train
    assert reg.jobs_for("s", TrainingJob) == [train] and reg.jobs_for("s") == [train, study]
    with pytest.raises(JobLimitError, match="already going"):
        reg.submit("t", _long_job())  # the study holds the other place
    assert jobs_mod.live_workers() >= 1
    reg.stop_session("s")
    assert train.status is Status.STOPPED and study.status is Status.STOPPED and reg.active_count() == 0


def test_status_is_str_valued():
    assert Status.RUNNING == "running" and f"{Status.DIVERGED}" == "diverged" and Status("paused").active
    assert {s.value for s in Status} == {"pending", "running", "paused", "stopped", "finished", "diverged", "failed"}
    assert not Status.FINISHED.active and not hasattr(jobs_mod, "STATUSES") and not hasattr(jobs_mod, "default_registry")
