"""Reproduce the residual-network papers live, on built-in data, in a documented CPU budget.

Every study is a module with ``NAME``, ``TITLE``, ``PAPER``, a config dataclass (a seed, a budget and
the study's own knobs, with a preset per budget), ``run(cfg, progress=None) -> dict`` of plain data,
and ``figures(result) -> {name: go.Figure}``. The CLI (``python -m resviz study <name>``) and the app's
Experiments page both call :func:`resviz.experiments.runner.run_study`, so the same seed and budget give
the same numbers in both.

Result format (JSON-able)::

    {"study", "title", "paper", "config", "rows": [one dict per table row, ours beside the paper's],
     "checks": [{"claim", "holds", "detail"}], "source": "where the trained nets came from",
     "shipped": [the checkpoint names of the shipped nets measured; empty when trained here],
     "time_s": seconds, ...study-specific series for the figures}
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from resviz.experiments import degradation, faithfulness, landscape, lesion, responses, shattered, signal
from resviz.experiments.common import BUDGETS, StudyConfig


@dataclass(frozen=True)
class Study:
    """One registered study."""

    name: str
    title: str
    paper: str
    config: type[StudyConfig]
    module: ModuleType

    def make_config(self, budget: str = "small", seed: int = 0, **overrides: Any) -> StudyConfig:
        return self.config.preset(budget, seed, **overrides)


def _study(module: ModuleType, config: type[StudyConfig]) -> Study:
    return Study(module.NAME, module.TITLE, module.PAPER, config, module)


STUDIES: dict[str, Study] = {
    s.name: s
    for s in (
        _study(degradation, degradation.DegradationConfig),
        _study(lesion, lesion.LesionConfig),
        _study(responses, responses.ResponsesConfig),
        _study(signal, signal.SignalConfig),
        _study(landscape, landscape.LandscapeConfig),
        _study(shattered, shattered.ShatteredConfig),
        _study(faithfulness, faithfulness.FaithfulnessConfig),
    )
}


def get_study(name: str) -> Study:
    """The study called ``name`` (ValueError listing the choices otherwise)."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
    return STUDIES[name]


__all__ = ["BUDGETS", "STUDIES", "Study", "StudyConfig", "get_study"]
