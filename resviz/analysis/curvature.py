"""Curvature of a net's loss: the extreme eigenvalues of its Hessian, from Hessian-vector products.

The Hessian of the loss with respect to the weights is never formed: :func:`hessian_vector_product`
differentiates the gradient a second time along a direction (exact, one double backward pass), and
:func:`lanczos_extremes` runs the Lanczos iteration on that product, with full reorthogonalisation,
from a seeded start vector. After ``iters`` products the extreme Ritz values approximate the largest
and the smallest (most negative) eigenvalues; they always lie inside the spectrum, so a short run can
only understate either end. Li et al. (2018) map ``|lambda_min / lambda_max|`` this way over their loss
slices (their Fig. 8, with the weights of every layer and no norm or bias parameters, as here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resviz.nn.scoped import eval_mode


def weight_tensors(net: nn.Module) -> list[nn.Parameter]:
    """The parameters Li et al. take the Hessian over: every tensor of two or more dimensions (conv and linear
    weights), none of the norms' scales and shifts or the biases."""
    return [p for p in net.parameters() if p.ndim > 1]


def hessian_vector_product(net: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           params: Sequence[nn.Parameter]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> H v`` for the mean cross-entropy of ``net`` on ``(x, y)``; ``v`` and ``H v`` are flat vectors over
    ``params``. The net runs as it is (put it in eval mode first, so BatchNorm uses its running statistics)."""

    def product(v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            loss = F.cross_entropy(net(x), y)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            hv = torch.autograd.grad(flat @ v, params, allow_unused=True, materialize_grads=True)
        return torch.cat([h.reshape(-1) for h in hv]).detach()

    return product


def lanczos_extremes(product: Callable[[torch.Tensor], torch.Tensor], n: int, *, iters: int = 16,
                     seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> tuple[float, float]:
    """The smallest and largest Ritz values of a symmetric operator of size ``n`` after ``iters`` Lanczos steps.

    Full reorthogonalisation (twice per step) keeps the basis orthogonal in float32; the run stops early when the
    Krylov space is exhausted. The start vector is drawn from ``seed``, so the same inputs give the same numbers.
    """
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=g, dtype=dtype).to(device)
    basis = [q / q.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    steps = min(iters, n)
    for step in range(steps):
        w = product(basis[-1])
        alphas.append(float(w @ basis[-1]))
        if step == steps - 1:
            break
        q_mat = torch.stack(basis)
        for _ in range(2):
            w = w - q_mat.T @ (q_mat @ w)
        beta = float(w.norm())
        if not np.isfinite(beta) or beta <= 1e-8 * max(1.0, max(abs(a) for a in alphas)):
            break
        betas.append(beta)
        basis.append(w / beta)
    k = len(alphas)
    tri = np.diag(alphas) + np.diag(betas[: k - 1], 1) + np.diag(betas[: k - 1], -1)
    ritz = np.linalg.eigvalsh(tri)
    return float(ritz[0]), float(ritz[-1])


def hessian_extremes(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, iters: int = 16, seed: int = 0,
                     params: Sequence[nn.Parameter] | None = None) -> tuple[float, float]:
    """(lambda_min, lambda_max) of the Hessian of ``net``'s training loss on ``(x, y)``, in eval mode, over
    ``params`` (default: :func:`weight_tensors`). ``iters`` Hessian-vector products, each about a few
    forward passes' work."""
    params = list(weight_tensors(net) if params is None else params)
    n = sum(p.numel() for p in params)
    with eval_mode(net):
        product = hessian_vector_product(net, x, y, params)
        return lanczos_extremes(product, n, iters=iters, seed=seed, dtype=params[0].dtype, device=params[0].device)


def nonconvexity_ratio(lam_min: float, lam_max: float) -> float:
    """Li et al.'s ``|lambda_min / lambda_max|`` where the Hessian has a negative eigenvalue, else 0 (locally
    convex); capped at 1, where negative curvature dominates. NaN where the loss was not finite."""
    if not (np.isfinite(lam_min) and np.isfinite(lam_max)):
        return float("nan")
    if lam_min >= 0:
        return 0.0
    if lam_max <= 0:
        return 1.0
    return float(min(abs(lam_min / lam_max), 1.0))
