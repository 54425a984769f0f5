"""Study results on the converged zoo, stored beside its checkpoints: ``pretrained/studies/<study>.json``.

Every study can be run on the zoo's nets (``budget="zoo"``: nothing is trained). Those runs take from a
second (degradation reads the training logs) to minutes (the lesions of ResNet-110, the landscape slices of
ResNet-56), so ``python pretrained/make_pretrained.py --studies`` computes them once, after the nets, and
stores each result here with the command that recomputes it; the Experiments page and the tour open with
them at once. A stored result is exactly what :func:`resviz.experiments.runner.run_study` returns for the
zoo budget and seed 0, so ``python -m resviz study <name> --budget zoo`` gives the same numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from resviz.zoo import pretrained_dir

FOLDER = "studies"
BUDGET = "zoo"


def stored_dir(root: str | os.PathLike | None = None) -> Path:
    return Path(root) / FOLDER if root is not None else pretrained_dir() / FOLDER


def command(name: str) -> str:
    """The command that recomputes study ``name``'s stored result."""
    return f"python -m resviz study {name} --budget {BUDGET} --seed 0"


def load_stored(name: str, root: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """Study ``name``'s stored zoo result, or None when it was not computed (or is unreadable)."""
    path = stored_dir(root) / f"{name}.json"
    try:
        result = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("study") == name else None


def nets_used(result: dict[str, Any]) -> dict[str, str]:
    """The shipped nets a result was measured on (its ``shipped`` list of checkpoint names), each with the sha256
    of its weights in the manifest of the zoo the studies load (:func:`resviz.zoo.pretrained_dir`)."""
    manifest = pretrained_dir() / "manifest.json"
    try:
        entries = json.loads(manifest.read_text("utf-8")).get("checkpoints", [])
    except (OSError, ValueError):
        return {}
    used = set(result.get("shipped") or ())
    return {e["name"]: e["sha256"] for e in entries if e["name"] in used}


def store(result: dict[str, Any], root: str | os.PathLike | None = None) -> Path:
    """Write a zoo result (atomically) where :func:`load_stored` finds it; returns the file.

    The result keeps the sha256 of every shipped net it was measured on (``nets``), so a test can tell a
    stored result from one computed on nets that have since been retrained.
    """
    if result.get("config", {}).get("budget") != BUDGET:
        raise ValueError(f"only results of the {BUDGET!r} budget are stored beside the zoo")
    folder = stored_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result['study']}.json"
    tmp = path.with_suffix(".tmp")
    record = {**result, "command": command(result["study"]), "nets": nets_used(result)}
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path
