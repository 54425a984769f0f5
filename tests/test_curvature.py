"""Hessian curvature: Hessian-vector products against the explicit Hessian, Lanczos against eigvalsh."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resviz.analysis.curvature import hessian_extremes, hessian_vector_product, lanczos_extremes, nonconvexity_ratio, weight_tensors
from resviz.experiments import landscape


def _tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    net.train()
    net(x)  # running statistics that differ from a fresh norm's
    return net.eval(), x, y


def _explicit_hessian(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    params = weight_tensors(net)
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    others = {k: v for k, v in net.named_parameters() if v.ndim <= 1}
    names = [k for k, v in net.named_parameters() if v.ndim > 1]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = [c.view(s) for c, s in zip(torch.split(flat, sizes), shapes, strict=True)]
        out = torch.func.functional_call(net, {**others, **dict(zip(names, parts, strict=True))}, (x,))
        return F.cross_entropy(out, y)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.autograd.functional.hessian(loss, flat).numpy()


def test_hessian_vector_product_matches_the_explicit_hessian() -> None:
    net, x, y = _tiny()
    h = _explicit_hessian(net, x, y)
    assert h.shape == (35, 35) and np.allclose(h, h.T, atol=1e-10)
    v = torch.randn(35, dtype=torch.float64)
    hv = hessian_vector_product(net, x, y, weight_tensors(net))(v)
    assert np.allclose(hv.numpy(), h @ v.numpy(), atol=1e-10)
    assert all(p.grad is None for p in net.parameters())  # nothing accumulates into .grad


def test_hessian_extremes_are_the_explicit_hessians_eigenvalues() -> None:
    net, x, y = _tiny()
    eig = np.linalg.eigvalsh(_explicit_hessian(net, x, y))
    assert eig[0] < 0 < eig[-1]  # a tanh net's loss is not convex in its weights: both ends are tested
    lo, hi = hessian_extremes(net, x, y, iters=35)
    assert lo == pytest.approx(eig[0], rel=1e-6, abs=1e-9) and hi == pytest.approx(eig[-1], rel=1e-6)
    short = hessian_extremes(net, x, y, iters=8)  # fewer steps: inside the spectrum, never beyond it
    assert eig[0] - 1e-9 <= short[0] <= short[1] <= eig[-1] + 1e-9
    assert short == hessian_extremes(net, x, y, iters=8)  # a seeded start: the same numbers again
    assert not any(m.training for m in net.modules())  # the net is back in its own (eval) mode


def test_hessian_extremes_keep_the_nets_mode() -> None:
    net, x, y = _tiny()
    net.train()
    hessian_extremes(net, x, y, iters=3)
    assert all(m.training for m in net.modules())


def test_lanczos_on_a_known_spectrum() -> None:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    spectrum = np.concatenate([[-2.5], np.linspace(-0.1, 3.0, 58), [40.0]])
    a = torch.tensor(q @ np.diag(spectrum) @ q.T)
    lo, hi = lanczos_extremes(lambda v: a @ v, 60, iters=60, dtype=torch.float64)
    assert lo == pytest.approx(-2.5, rel=1e-8) and hi == pytest.approx(40.0, rel=1e-8)
    lo, hi = lanczos_extremes(lambda v: a @ v, 60, iters=12, dtype=torch.float64)
    assert hi == pytest.approx(40.0, rel=1e-3) and -2.5 <= lo < 0  # the isolated ends come out first
    diag = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))  # the Krylov space ends after 3 steps
    assert lanczos_extremes(lambda v: diag @ v, 3, iters=10, dtype=torch.float64) == pytest.approx((1.0, 3.0))
    with pytest.raises(ValueError, match="iters"):
        lanczos_extremes(lambda v: v, 3, iters=0)


def test_nonconvexity_ratio() -> None:
    assert nonconvexity_ratio(0.5, 10.0) == 0.0  # convex
    assert nonconvexity_ratio(-1.0, 10.0) == pytest.approx(0.1)
    assert nonconvexity_ratio(-30.0, 10.0) == 1.0 and nonconvexity_ratio(-1.0, -0.5) == 1.0  # capped
    assert np.isnan(nonconvexity_ratio(float("nan"), 1.0))


def test_curvature_sub_grid() -> None:
    assert landscape.curvature_indices(13, 5) == [0, 3, 6, 9, 12]
    assert landscape.curvature_indices(7, 3) == [0, 3, 6]
    assert landscape.curvature_indices(5, 9) == [0, 1, 2, 3, 4]
    assert landscape.curvature_indices(13, 0) == []


def test_landscape_effect_judged_on_the_full_hessian_when_measured() -> None:
    bowl = [[x * x + y * y for x in range(-2, 3)] for y in range(-2, 3)]
    rows = [{"nonconvexity": 0.1, "hessian_nonconvexity": 0.3}, {"nonconvexity": 0.5, "hessian_nonconvexity": 0.2}]
    check = landscape.effect_checks(rows, bowl)[0]
    assert not check["holds"] and "full Hessian" in check["claim"] and "0.67x" in check["detail"]
    rows = [{"nonconvexity": 0.1}, {"nonconvexity": 0.5}]  # no curvature map: the slice's own curvature, named so
    check = landscape.effect_checks(rows, bowl)[0]
    assert check["holds"] and "2-D slice" in check["claim"]
    assert len(landscape.effect_checks(rows, bowl)) == 2  # no map, no sharpness check
    rows = [{"nonconvexity": 0.1, "hessian_nonconvexity": 0.1, "center_lambda_max": 2.0},
            {"nonconvexity": 0.5, "hessian_nonconvexity": 0.4, "center_lambda_max": 600.0}]
    checks = landscape.effect_checks(rows, bowl)
    assert [c["holds"] for c in checks] == [True, True, True] and "sharper" in checks[2]["claim"]
    rows[1]["center_lambda_max"] = 1.0
    assert landscape.effect_checks(rows, bowl)[2]["holds"] is False


def test_sharpness_is_read_only_where_the_map_holds_the_trained_weights() -> None:
    z = [[1.0, 0.5, 1.0], [0.5, 0.1, 0.5], [1.0, 0.5, 1.0]]
    curvature = {"ratio": [[0.0, 0.2], [0.4, 0.6]], "lambda_max": [[5.0, 6.0], [7.0, 8.0]]}
    coords = np.linspace(-1, 1, 3)
    row = landscape._row("residual", z, coords, 1.0, curvature, None)  # an even map: no point at the slice's centre
    assert row["hessian_nonconvexity"] == pytest.approx(0.3) and "center_lambda_max" not in row
    assert landscape._row("residual", z, coords, 1.0, curvature, 1)["center_lambda_max"] == 8.0
