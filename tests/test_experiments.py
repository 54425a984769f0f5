"""The paper studies: each reproduces its ordering on a small configuration; results are plain, repeatable data.

The trained studies share one tiny training budget, so the twins the degradation test trains are
reused (from the in-process cache) by the responses and faithfulness tests (the lesion test trains longer).
"""

from __future__ import annotations

import json
import math
from dataclasses import fields

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from resviz.experiments import STUDIES, common, get_study, twins
from resviz.experiments.runner import StudyJob, run_study
from resviz.train.records import Status

# Small enough for CI on 2 cores, big enough that the orderings show: 16 px shapes, width 8.
TRAIN = {"width": 8, "input_size": 16, "train_size": 1500, "test_size": 300, "steps": 150, "batch_size": 64, "lr": 0.1}
SMALL = {
    "degradation": {**TRAIN, "depths": (8, 32), "train_eval": 500},
    # The lesion twins train twice as long: after 150 steps the plain-32 twin can still sit at chance (it did on an
    # AMD EPYC, not on the machines before it), and a net at chance has no accuracy for a deletion to cost.
    "lesion": {**TRAIN, "steps": 300, "depth": 32, "eval_size": 300, "draws": 2, "max_swaps": 2, "source": "train"},
    "responses": {**TRAIN, "depths": (8, 32), "eval_size": 200},
    # The landscape trains at the study's own small budget: after TRAIN's 150 steps the plain-32 twin has
    # barely left its initialisation, and whether its slice then climbs above the residual net's depends
    # on the CPU's rounding (it did on one machine and not on another).
    "landscape": {"grid": 7, "line_points": 7, "eval_size": 128, "curvature_grid": 3, "curvature_iters": 4},
    "faithfulness": {**TRAIN, "depth": 32, "images": 10, "source": "train"},
    "signal": {**TRAIN, "depth": 14, "steps": 20, "batch": 64},
    "shattered": {"depths": (8, 56), "width": 8, "pairs": 1, "points": 16, "max_lag": 3},
}
SEED = 0
_results: dict[str, dict] = {}


def result(name: str) -> dict:
    """The study's result on its small configuration (computed once per test session)."""
    if name not in _results:
        _results[name] = run_study(name, "small", SEED, overrides=SMALL[name])
    return _results[name]


def holds(res: dict) -> dict[str, bool]:
    return {c["claim"]: c["holds"] for c in res["checks"]}


def _plain(obj: object) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, (str, bool, int)) or (isinstance(obj, float) and math.isfinite(obj))


# -- the orderings -------------------------------------------------------------------------------
@pytest.mark.slow
def test_degradation_deeper_plain_trains_worse_residual_does_not() -> None:
    res = result("degradation")
    rows = {r["depth"]: r for r in res["rows"]}
    assert rows[32]["plain_train_err"] > rows[8]["plain_train_err"]
    assert rows[32]["residual_train_err"] < rows[32]["plain_train_err"]
    assert all(holds(res).values()), res["checks"]
    assert rows[32]["paper_residual_test_err"] == pytest.approx(0.0751) and rows[8]["paper_residual_test_err"] is None


@pytest.mark.slow
def test_lesion_residual_degrades_gracefully_plain_collapses() -> None:
    res = result("lesion")
    assert len(res["rows"]) == 15 and res["intact"]["residual"] > res["chance"]
    checks = holds(res)
    # Veit et al.'s ordering: a deleted or swapped block costs the residual net less than the plain net. (How
    # gently the residual net degrades needs a better-trained net than this budget gives; see docs/experiments.md.)
    assert checks["after deleting one non-downsampling block the residual net keeps more of its accuracy than the plain net"]
    assert checks["swapping two blocks hurts the residual net less than the plain net"]
    inner = [r for r in res["rows"] if not r["downsampling"]]
    assert sum(r["residual_acc"] for r in inner) > sum(r["plain_acc"] for r in inner)


@pytest.mark.slow
def test_responses_residual_branches_respond_more_weakly() -> None:
    res = result("responses")
    by = {r["net"]: r for r in res["rows"]}
    assert by["residual-32"]["blocks"] == 15 and len(res["branch"]["plain-32"]) == 15 and len(res["layers"]["plain-32"]) == 30
    assert all(holds(res).values()), res["checks"]


@pytest.mark.slow
def test_landscape_plain_is_sharper_and_less_convex() -> None:
    res = result("landscape")
    assert len(res["surface"]["plain"]) == 7 and len(res["surface"]["plain"][0]) == 7 and len(res["line"]["residual"]) == 7
    centre = res["surface"]["residual"][3][3]
    assert centre == pytest.approx(res["line"]["residual"][5], rel=1e-4)  # the slice centre is t = 1 on the line
    assert all(holds(res).values()), res["checks"]
    assert res["curvature_alphas"] == [res["alphas"][i] for i in (0, 3, 6)]  # Li et al.'s map: a sub-grid of the slice
    for row in res["rows"]:
        c = res["curvature"][row["net"]]
        assert np.shape(c["ratio"]) == np.shape(c["lambda_min"]) == (3, 3)
        assert np.all(np.asarray(c["lambda_min"]) <= np.asarray(c["lambda_max"]))
        assert row["center_lambda_max"] == c["lambda_max"][1][1] > 0  # the loss curves upwards somewhere at the centre
        assert row["hessian_nonconvexity"] == pytest.approx(np.mean(c["ratio"]))
    assert "curvature" in get_study("landscape").module.figures(res)


@pytest.mark.slow
def test_faithfulness_methods_beat_a_random_map() -> None:
    res = result("faithfulness")
    assert {(r["net"], r["method"]) for r in res["rows"]} == {(n, m) for n in ("residual", "plain") for m in SMALL_METHODS}
    for r in res["rows"]:
        assert 0 <= r["deletion"] <= 1 and 0 <= r["insertion"] <= 1 and 0 <= r["pointing"] <= 1
    rows = {r["method"]: r for r in res["rows"] if r["net"] == "residual"}
    real = [m for m in rows if m != "random"]
    gap = {m: rows[m]["insertion"] - rows[m]["deletion"] for m in rows}
    assert sum(gap[m] for m in real) / len(real) > gap["random"]  # on average the methods rank pixels better than chance
    assert sum(rows[m]["pointing"] for m in real) / len(real) > rows["random"]["pointing"]
    assert rows["occlusion"]["deletion"] < rows["random"]["deletion"]  # occlusion measures exactly what deletion tests


SMALL_METHODS = ("integrated_gradients", "saliency", "gradcam", "occlusion", "random")


def test_signal_propagation_orderings_at_init() -> None:
    res = result("signal")
    assert [r["variant"] for r in res["rows"]] == list(STUDIES["signal"].config().variants)
    init_checks = [c for c in res["checks"] if "trains" not in c["claim"]]
    assert len(init_checks) == 3 and all(c["holds"] for c in init_checks), init_checks
    growth = {r["variant"]: r["init_growth"] for r in res["rows"]}
    assert growth["pre, no norm, SkipInit"] == pytest.approx(1.0, abs=0.5)


def test_shattered_gradients_plain_decorrelates_faster() -> None:
    res = result("shattered")
    assert all(holds(res).values()), res["checks"]
    lags = res["lags"]["56"]
    assert len(lags["residual"]) == 3 and lags["residual"][0] > lags["residual"][2]  # correlation falls with distance


# -- results are plain data, repeatable, and drawable --------------------------------------------
@pytest.mark.parametrize("name", ["shattered", "signal"])
def test_result_is_plain_json_and_figures_build(name: str) -> None:
    res = result(name)
    assert _plain(res) and json.loads(json.dumps(res)) == res
    assert res["study"] == name and res["config"]["seed"] == SEED and res["rows"] and res["checks"]
    assert res["shipped"] == []  # nothing shipped was measured: the small budget trains its nets (or none)
    figs = get_study(name).module.figures(res)
    assert figs and all(isinstance(f, go.Figure) and f.data for f in figs.values())


def test_same_seed_same_numbers_other_seed_differs() -> None:
    cfg = SMALL["shattered"]
    a, b, c = (run_study("shattered", "small", s, overrides=cfg) for s in (5, 5, 6))
    for r in (a, b, c):
        r.pop("time_s")
    assert a == b and a["rows"] != c["rows"]


def test_training_is_identical_with_or_without_the_cache() -> None:
    cfg = common.TrainedStudyConfig(train_size=256, test_size=64, steps=4, batch_size=32, width=4)
    net_cfg = common.net_config(8, 4, 16, 8)
    twins.clear_cache()
    first = twins.train_twins(net_cfg, cfg.data(), cfg.schedule(), seed=1)
    cached = twins.train_twins(net_cfg, cfg.data(), cfg.schedule(), seed=1)
    twins.clear_cache()
    fresh = twins.train_twins(net_cfg, cfg.data(), cfg.schedule(), seed=1)
    for other in (cached, fresh):
        assert other.curves == first.curves
        for name in ("residual", "plain"):
            sa, sb = first.nets[name].state_dict(), other.nets[name].state_dict()
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_progress_is_monotone_and_ends_at_one() -> None:
    seen: list[tuple[float, str]] = []
    run_study("shattered", overrides=SMALL["shattered"], progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and all(0 <= f <= 1 for f in fractions)


def test_study_job_runs_in_a_thread_and_matches_run_study() -> None:
    job = StudyJob("shattered", "small", SEED, overrides=SMALL["shattered"], num_threads=None).start()
    assert job.join(120) and job.snapshot()["status"] == "finished" and job.status is Status.FINISHED
    got = job.snapshot()["result"]
    want = dict(result("shattered"))
    got, want = {k: v for k, v in got.items() if k != "time_s"}, {k: v for k, v in want.items() if k != "time_s"}
    assert got == want


def test_study_job_stops_and_reports_failures() -> None:
    job = StudyJob("shattered", "small", SEED, overrides={**SMALL["shattered"], "depths": (8, 110)}, num_threads=None)
    job.stop()  # before the first progress report
    job.start()
    assert job.join(60) and job.snapshot()["status"] == "stopped"
    bad = StudyJob("shattered", "small", SEED, overrides={"depths": (8,)}, num_threads=None).start()
    assert bad.join(60) and bad.snapshot()["status"] == "failed" and "two depths" in bad.snapshot()["error"]
    with pytest.raises(ValueError, match="unknown study"):
        StudyJob("nope")


# -- configs ----------------------------------------------------------------------------------------
def test_registry_and_presets() -> None:
    assert list(STUDIES) == ["degradation", "lesion", "responses", "signal", "landscape", "shattered", "faithfulness"]
    base = common.TrainedStudyConfig(seed=3)
    assert common.TrainedStudyConfig(order="post").order == "post"
    with pytest.raises(ValueError, match="order"):
        common.TrainedStudyConfig(order="sideways")
    for study in STUDIES.values():
        small, medium = study.make_config("small", 3), study.make_config("medium", 3)
        assert small == study.config(seed=3) and small.budget == "small" and medium.budget == "medium"
        assert study.config.from_dict(json.loads(json.dumps(small.to_dict()))) == small
        if isinstance(small, common.TrainedStudyConfig):
            assert all(getattr(small, f.name) == getattr(base, f.name) for f in fields(base))  # one shared budget
            assert all(getattr(medium, k) == v for k, v in common.MEDIUM_TRAINING.items())
    with pytest.raises(ValueError, match="budget"):
        STUDIES["lesion"].make_config("huge")
    with pytest.raises(ValueError, match="unknown"):
        STUDIES["lesion"].config.from_dict({"nope": 1})


def test_reference_twins_source_pretrained_fails_clearly_without_checkpoints(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("RESVIZ_PRETRAINED", str(tmp_path))
    cfg = common.TrainedStudyConfig(train_size=64, test_size=16)
    with pytest.raises(ValueError, match="no shipped residual/plain pair"):
        twins.reference_twins(common.net_config(8, 4, 16, 8), cfg.data(), cfg.schedule(), seed=0, source="pretrained",
                               device="cpu")


def test_nets_are_named_as_people_name_them() -> None:
    assert [common.net_label(n) for n in ("residual-20", "residual", "plain-110", "plain")] == \
        ["ResNet-20", "ResNet", "plain-110", "plain"]
