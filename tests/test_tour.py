"""The guided tour: the landing page, one real picture per step, each step at its own URL."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from apphelpers import ROOT, app, navigation, ok

from resviz import zoo
from resviz.experiments import stored
from resviz.experiments.tour import DELETION_TWINS, TWINS, gradient_norms_at_init, lesion_curve, stored_result


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))


def test_the_tour_is_the_landing_page() -> None:
    at = ok(app())
    assert navigation(at)[0] == ("", "Why residual networks work")
    assert at.title[0].value == "Why residual networks work"
    assert at.subheader[0].value.startswith("1.")  # step 1 until another is picked


@pytest.mark.parametrize("step", range(1, 7))
def test_every_step_shows_its_picture(step: int) -> None:
    at = ok(app({"step": str(step)}))
    assert at.subheader[0].value.startswith(f"{step}.")
    charts = at.get("plotly_chart")
    assert len(charts) == (0 if step == 6 else 1), f"step {step} shows one picture"
    if step == 6:
        links = " ".join(m.value for m in at.markdown)
        assert all(f"]({p}" in links for p in ("design", "train", "inspect"))


def test_deep_links_and_next_button_move_through_the_steps() -> None:
    at = ok(app({"step": "3"}))
    assert at.subheader[0].value.startswith("3.")
    next(b for b in at.button if b.label == "Next").click().run()
    assert at.subheader[0].value.startswith("4.") and at.query_params["step"] in ("4", ["4"])
    bad = ok(app({"step": "99"}))
    assert bad.subheader[0].value.startswith("6.")


def test_a_design_link_from_before_the_tour_still_opens_design() -> None:
    at = ok(app({"d": "8", "w": "4", "r": "16"}))
    assert at.title[0].value == "Design a residual network"


def test_steps_render_in_about_two_seconds_once_warm() -> None:
    app()  # the first run loads the shipped nets and the test images once per server
    for step in range(1, 7):
        t0 = time.perf_counter()
        ok(app({"step": str(step)}))
        assert time.perf_counter() - t0 < 10, f"step {step}"  # a generous bound: the bench reports the real time


@pytest.mark.parametrize(("twins", "kept"), [(TWINS, 0.5), (DELETION_TWINS, 0.95)])
def test_deleting_blocks_hurts_the_plain_twin_far_more(twins: tuple[str, str], kept: float) -> None:
    by_name = {m.name: m for m in zoo.shipped_models()}
    nets = {n: zoo.load_shipped(by_name[n])[0] for n in twins}
    info = zoo.load_shipped(by_name[twins[0]])[1]
    x, y = zoo.dataset_samples(info, 200).tensors
    curve = lesion_curve(nets, x[:200], y[:200], (0, 1, 3), draws=2)
    res, plain = curve.accuracy[twins[0]], curve.accuracy[twins[1]]
    # one deletion: the ResNet keeps most of its accuracy (the converged zoo net nearly all of it)
    assert res[0] > 0.9 and res[1] > kept
    assert plain[1] < 0.25 and plain[1] < plain[0] - 0.15  # the plain twin falls to about chance (1/8)
    with torch.no_grad():
        assert all(not n.training for n in nets.values())  # lesioned() restored the modes (eval, as loaded)


def test_gradients_at_init_explode_in_the_deep_plain_net() -> None:
    spread = {}
    for depth in (20, 56):
        g = gradient_norms_at_init(depth)
        assert g["residual"].shape == g["plain"].shape == ((depth - 2) // 2,)
        spread[depth] = {n: float(v[0] / v[-1]) for n, v in g.items()}  # first block's gradient over the last's
    assert np.isfinite(spread[56]["plain"]) and spread[56]["plain"] > 10 * spread[56]["residual"]
    assert spread[56]["plain"] / spread[20]["plain"] > spread[56]["residual"] / spread[20]["residual"]


def test_stored_results_the_tour_draws() -> None:
    for name in ("degradation", "landscape-shipped"):
        result = stored_result(name)
        assert result is not None and result["checks"], name
    assert stored_result("no-such-study") is None


def test_the_deletion_step_uses_the_converged_zoo_pair_and_says_what_one_deletion_costs() -> None:
    at = ok(app({"step": "4"}))
    caption = " ".join(c.value for c in at.caption)
    assert "ResNet-56" in caption and "plain-56" in caption and "One block deleted: ResNet-56 " in caption
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert [t["name"] for t in spec["data"]] == ["ResNet-56", "plain-56"]


def test_the_landscape_step_gives_both_convexity_measures_and_says_which_way_ours_go() -> None:
    at = ok(app({"step": "5"}))
    caption = " ".join(c.value for c in at.caption)
    rows = {r["net"]: r for r in stored.load_stored("landscape")["rows"]}  # the zoo's, which the step draws
    res, plain = rows["residual"], rows["plain"]
    assert f"non-convexity of the slice {res['nonconvexity']:.2f} vs {plain['nonconvexity']:.2f}" in caption
    assert f"of the full Hessian (Li et al.'s measure) {res['hessian_nonconvexity']:.2f}" in caption
    less_convex = "this ResNet's slice is the less convex one, unlike the paper's" in caption
    assert less_convex == (res["hessian_nonconvexity"] >= plain["hessian_nonconvexity"])
    assert ("its minimum is the flatter one" in caption) == (less_convex and res["center_lambda_max"] < plain["center_lambda_max"])
