"""What the guided tour measures: small, fast computations on shipped nets and stored study results.

Every picture of the tour is a real measurement: the shipped ResNet-32 and its plain twin (same start
weights and batches) and the study zoo's converged ResNet-56 pair on the ``shapes`` test split, nets
built at initialisation, and the results the studies stored in ``docs/results/`` (``python -m
scripts.docgen results`` recomputes them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from resviz.analysis.initstats import init_comparison
from resviz.config import NetConfig
from resviz.nn.merge import merges
from resviz.nn.scoped import Lesion, lesioned
from resviz.train.state import evaluate

RESULTS_DIR = Path(__file__).resolve().parents[2] / "docs" / "results"
TWINS = ("shapes_resnet32", "shapes_plain32")  # the shipped residual net and its plain twin
# the deletion step's pair: the study zoo's converged ResNet-56 and its plain twin, which trains (plain-110 does not)
DELETION_TWINS = ("shapes_resnet56", "shapes_plain56")


def stored_result(name: str, root: Path | None = None) -> dict[str, Any] | None:
    """The stored ``result.json`` of study run ``name`` (e.g. "degradation"), or None when absent."""
    path = (root or RESULTS_DIR) / name / "result.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class LesionCurve:
    """Test accuracy after deleting k residual branches at random (mean over draws), per net."""

    ks: tuple[int, ...]
    accuracy: dict[str, tuple[float, ...]]  # net name -> mean accuracy per k
    images: int
    draws: int


def lesion_curve(nets: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, ks: tuple[int, ...],
                 *, draws: int = 3, seed: int = 0) -> LesionCurve:
    """Accuracy of each net on ``(x, y)`` with k random blocks removed (the same blocks for every net).

    Removing a block of the plain net drops its branch and keeps the (switched-off) shortcut's input
    path, exactly as for the residual net: the twins differ only in their skips.
    """
    n_blocks = {len(merges(net)) for net in nets.values()}
    if len(n_blocks) != 1:
        raise ValueError("the nets must have the same number of blocks")
    (n,) = n_blocks
    rng = np.random.default_rng(seed)
    picks = {k: [sorted(rng.choice(n, size=k, replace=False).tolist()) for _ in range(draws if k else 1)] for k in ks}
    out = {}
    for name, net in nets.items():
        accs = []
        for k in ks:
            scores = []
            for blocks in picks[k]:
                with lesioned(net, Lesion(removed=tuple(blocks))):
                    scores.append(evaluate(net, (x, y), batch_size=256)[1])
            accs.append(float(np.mean(scores)))
        out[name] = tuple(accs)
    return LesionCurve(tuple(ks), out, len(y), draws)


def gradient_norms_at_init(depth: int, *, width: int = 8, input_size: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-block parameter-gradient norms at initialisation of a CIFAR-style ResNet and its plain twin."""
    cfg = NetConfig(depth=depth, width=width, input_size=input_size, num_classes=8)
    res = init_comparison(cfg, batch_size=32, seed=seed)
    return {"residual": res["residual"]["grad_block"], "plain": res["plain"]["grad_block"]}
