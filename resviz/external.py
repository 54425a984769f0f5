"""Models from outside ResViz: torchvision and timm architectures by name, Python files the operator allows.

A *spec* names a model: ``torchvision:resnet18``, ``timm:vit_tiny_patch16_224`` or
``file:/models/mine.py:build`` (a Python file and a factory in it that returns an ``nn.Module``).
Python files are loaded only from folders the person running the server lists (``RESVIZ_MODEL_DIRS``,
separated by ``os.pathsep``, or the ``allowed`` argument); a browser can pick among them but never
upload code. Weights are used only when already on this machine (torch hub or Hugging Face cache);
otherwise the model gets its random initialisation and :class:`External` says so in ``note``.

Every model is first built on the ``meta`` device to count its parameters, and refused with a clear
message before any memory is allocated when it has more than ``max_params``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_DIRS_ENV = "RESVIZ_MODEL_DIRS"
MAX_PARAMS = 400_000_000  # about 1.6 GB of float32 weights
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SourceError(ValueError):
    """A model that cannot be had; ``str(err)`` says why in the user's words and what to do."""


@dataclass(frozen=True)
class Spec:
    """A parsed model spec (see the module docstring)."""

    source: str  # "torchvision", "timm" or "file"
    name: str  # architecture name, or the factory's name for a file
    path: str = ""  # the Python file, for source "file"

    def __str__(self) -> str:
        return f"file:{self.path}:{self.name}" if self.source == "file" else f"{self.source}:{self.name}"


@dataclass(frozen=True)
class External:
    """A model from outside ResViz and how to feed it."""

    model: nn.Module  # in eval mode
    spec: Spec
    num_params: int
    weights: str  # what the weights are: "random initialisation" or where they came from
    note: str  # one sentence for the user ("" when nothing needs saying)
    input_size: int  # square side the architecture expects
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def parse_spec(text: str) -> Spec:
    """``"torchvision:NAME"``, ``"timm:NAME"`` or ``"file:PATH.py:FACTORY"`` as a :class:`Spec`."""
    source, _, rest = text.strip().partition(":")
    if source in ("torchvision", "timm") and rest:
        return Spec(source, rest)
    if source == "file":
        path, _, factory = rest.rpartition(":")
        if path.endswith(".py") and factory.isidentifier():
            return Spec("file", factory, path)
    raise SourceError(f"cannot read the model spec {text!r}: use torchvision:NAME, timm:NAME or file:PATH.py:FACTORY")


def allowed_dirs(extra: list[str | os.PathLike] | None = None) -> list[Path]:
    """Folders Python model files may be loaded from: ``extra`` plus ``$RESVIZ_MODEL_DIRS`` (resolved)."""
    listed = [*(extra or []), *filter(None, os.environ.get(MODEL_DIRS_ENV, "").split(os.pathsep))]
    return [Path(d).expanduser().resolve() for d in listed]


def model_files(allowed: list[str | os.PathLike] | None = None) -> list[Spec]:
    """Every ``file:`` spec available in the allowed folders: each top-level function of a ``.py`` file
    whose name starts with ``build`` or ``make`` or ends with ``model``, found without importing it."""
    import ast

    specs = []
    for folder in allowed_dirs(allowed):
        for path in sorted(folder.glob("*.py")) if folder.is_dir() else []:
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (OSError, SyntaxError, UnicodeDecodeError):
                continue
            specs += [Spec("file", fn.name, str(path)) for fn in tree.body if isinstance(fn, ast.FunctionDef)
                      and not fn.name.startswith("_") and (fn.name.startswith(("build", "make")) or fn.name.endswith("model"))]
    return specs


def torchvision_names() -> list[str]:
    """torchvision's classification architectures."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _file_factory(spec: Spec, allowed: list[str | os.PathLike] | None) -> Any:
    path = Path(spec.path).expanduser().resolve()
    dirs = allowed_dirs(allowed)
    if not any(path.is_relative_to(d) for d in dirs):
        where = ", ".join(map(str, dirs)) or f"none (set {MODEL_DIRS_ENV} when starting the server)"
        raise SourceError(f"{path} is not in a folder model files may be loaded from; allowed: {where}")
    if not path.is_file():
        raise SourceError(f"no such model file: {path}")
    mod_name = f"resviz_user_model_{abs(hash(str(path)))}"
    loader = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(loader)
    try:
        sys.modules[mod_name] = module
        loader.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise SourceError(f"{path.name} failed to import: {type(e).__name__}: {str(e)[:300]}") from e
    factory = getattr(module, spec.name, None)
    if not callable(factory):
        raise SourceError(f"{path.name} has no function {spec.name!r}")
    return factory


def _builder(spec: Spec, num_classes: int | None, allowed: list[str | os.PathLike] | None) -> Any:
    """A zero-argument callable that builds the architecture with random weights."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if spec.source == "torchvision":
        import torchvision

        if spec.name not in torchvision.models.list_models(module=torchvision.models):
            raise SourceError(f"torchvision has no classification model {spec.name!r}")
        return lambda: torchvision.models.get_model(spec.name, weights=None, **kwargs)
    if spec.source == "timm":
        import timm

        if not timm.is_model(spec.name):
            raise SourceError(f"timm has no model {spec.name!r}")
        return lambda: timm.create_model(spec.name, pretrained=False, **kwargs)
    factory = _file_factory(spec, allowed)
    takes = "num_classes" in inspect.signature(factory).parameters
    return lambda: factory(**(kwargs if takes else {}))


def count_on_meta(builder: Any) -> int:
    """Parameters of the module ``builder()`` makes, built on the meta device (no memory for weights)."""
    with torch.device("meta"):
        model = builder()
    if not isinstance(model, nn.Module):
        raise SourceError(f"the factory returned a {type(model).__name__}, not a torch nn.Module")
    return sum(p.numel() for p in model.parameters())


def build(spec: Spec | str, *, num_classes: int | None = None, allowed: list[str | os.PathLike] | None = None,
          max_params: int = MAX_PARAMS, cached_weights: bool = True) -> External:
    """Build the model ``spec`` names, in eval mode, with cached pretrained weights when asked and present.

    Raises:
        SourceError: unknown name, a file outside the allowed folders, a failing factory, or a model
            with more than ``max_params`` parameters (checked on the meta device, before building it).
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    builder = _builder(spec, num_classes, allowed)
    try:
        n = count_on_meta(builder)
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"{spec} could not be built: {type(e).__name__}: {str(e)[:300]}") from e
    if n > max_params:
        raise SourceError(f"{spec} has {n / 1e6:,.1f} M parameters, more than this server allows "
                          f"({max_params / 1e6:,.0f} M); pick a smaller model")
    model = builder()
    weights, note = "random initialisation", ""
    if cached_weights and num_classes is None and spec.source != "file":
        found = _cached_weights(spec)
        if found is None:
            note = f"no pretrained weights for {spec.name} are on this machine: it has random weights"
        else:
            weights = _load_cached(model, spec, found)
    return External(model.eval(), spec, n, weights, note, _input_size(spec, model))


def _cached_weights(spec: Spec) -> Any:
    """Where ``spec``'s default pretrained weights already lie on this machine, else None."""
    if spec.source == "torchvision":
        import torchvision

        try:
            w = torchvision.models.get_model_weights(spec.name).DEFAULT
        except (ValueError, AttributeError):
            return None
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
        return (w, path) if path.is_file() else None
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(spec.name)
        hub_id = getattr(cfg, "hf_hub_id", None)
        for fname in ("model.safetensors", "pytorch_model.bin") if hub_id else ():
            path = try_to_load_from_cache(hub_id, fname)
            if isinstance(path, str):
                return Path(path)
    except Exception:  # no cache, no config: random weights with a note
        return None
    return None


def _load_cached(model: nn.Module, spec: Spec, found: Any) -> str:
    if spec.source == "torchvision":
        _, path = found
        state = torch.load(path, map_location="cpu", weights_only=True)
    elif found.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(found))
    else:
        state = torch.load(found, map_location="cpu", weights_only=True)
    load_state_checked(model, state)
    return f"pretrained weights from {found[1] if isinstance(found, tuple) else found}"


def _input_size(spec: Spec, model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    size = getattr(model, "image_size", None)
    return int(size) if isinstance(size, int) else 224


def load_state_checked(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model`` after checking it key by key (names and shapes).

    Raises:
        SourceError: naming the first missing, unexpected or mis-shaped keys.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = [(f"{len(missing)} missing", missing), (f"{len(unexpected)} unexpected", unexpected),
                (f"{len(shapes)} with other shapes", shapes)]
    text = "; ".join(f"{head} (e.g. {', '.join(items[:3])})" for head, items in problems if items)
    if text:
        raise SourceError(f"these weights do not fit {type(model).__name__}: {text}")
    model.load_state_dict(state)
