"""Checkpoints: safetensors weights plus a JSON sidecar; atomic saves, checked loads, no unpickling.

A checkpoint ``<name>`` is two files: ``<name>.safetensors`` (the state dict) and ``<name>.json``::

    {"format": "resviz-checkpoint", "version": 1, "net": {...NetConfig.to_dict()...},
     "dataset": {...} | null, "metrics": {...}, "versions": {"resviz": "0.1.0", "torch": "2.14.1"},
     "created": "2026-01-01T00:00:00+00:00", "weights_file": "<name>.safetensors", "sha256": "..."}

The same JSON (without ``sha256``) is also embedded in the safetensors header under ``"resviz"``, so
a lone ``.safetensors`` upload still rebuilds its net. ``.pt``/``.pth`` files are read only with
``torch.load(..., weights_only=True)``: plain state dicts load, anything that would run code or
unpickle a whole model is refused with :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
import torch
from torch import nn

from resviz.config import NetConfig
from resviz.nn.models import ResNet, build_net

FORMAT, VERSION = "resviz-checkpoint", 1
MAX_CHECKPOINT_BYTES = 1 << 30  # refuse weight files above 1 GiB
MAX_SIDECAR_BYTES = 1 << 20  # and JSON sidecars above 1 MiB
MAX_BLOCKS, MAX_INPUT_SIZE = 1024, 1024  # far above any published ResNet (ResNet-1202: 600 blocks)
_LIST = 8  # names listed per kind of mismatch in an error message


class CheckpointError(ValueError):
    """A checkpoint cannot be saved or loaded; the message says why in user-facing words."""


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(<name>.safetensors, <name>.json)`` for a path given with either suffix or none."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _jsonable(obj: Any) -> Any:
    """Plain JSON values from numpy/torch scalars and arrays; non-finite floats become None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _dataset_info(dataset: Any) -> dict[str, Any] | None:
    if dataset is None or isinstance(dataset, dict):
        return dataset
    if hasattr(dataset, "info"):
        return dataset.info()
    raise TypeError(f"dataset must be a dict, a DatasetBundle or None, got {type(dataset).__name__}")


def build_meta(net: ResNet, *, dataset: Any = None, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sidecar content (without ``sha256``) for ``net``; its current skip flags are recorded."""
    from resviz.version import __version__

    cfg = getattr(net, "cfg", None)
    if not isinstance(cfg, NetConfig):
        raise CheckpointError("only ResViz nets (built from a NetConfig) can be saved as checkpoints")
    skips = tuple(getattr(net, "skips", cfg.skip_flags))
    if skips != cfg.skip_flags:
        cfg = NetConfig.from_dict({**cfg.to_dict(), "skips": list(skips)})
    return _jsonable({
        "format": FORMAT, "version": VERSION, "net": cfg.to_dict(), "dataset": _dataset_info(dataset),
        "metrics": metrics or {}, "versions": {"resviz": __version__, "torch": torch.__version__},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    })


def _write_all(fh: BinaryIO, data: bytes) -> None:
    fh.write(data)


def _write_temp(target: Path, data: bytes) -> Path:
    """Write ``data`` to a fsynced temp file next to ``target``; nothing is left behind on failure."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the target's mode, or the usual 0644 when new
        os.chmod(tmp, stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o644)
        with os.fdopen(fd, "wb") as fh:
            _write_all(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(net: ResNet, path: str | os.PathLike, *, dataset: Any = None, metrics: dict[str, Any] | None = None) -> Path:
    """Save ``net`` as ``<name>.safetensors`` + ``<name>.json`` atomically; returns the weights path.

    Both files are written to temp files in the same folder and fsynced before either replaces its
    target, so an interrupted save leaves the previous checkpoint intact (a crash between the two
    renames is caught at load time by the sidecar's sha256).
    """
    weights, sidecar = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    meta = build_meta(net, dataset=dataset, metrics=metrics)
    meta["weights_file"] = weights.name
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    blob = safetensors.torch.save(state, metadata={"resviz": json.dumps(meta, sort_keys=True)})
    meta["sha256"] = hashlib.sha256(blob).hexdigest()
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    tmp_w = _write_temp(weights, blob)
    try:
        tmp_j = _write_temp(sidecar, text.encode("utf-8"))
    except BaseException:
        tmp_w.unlink(missing_ok=True)
        raise
    os.replace(tmp_w, weights)
    os.replace(tmp_j, sidecar)
    _fsync_dir(weights.parent)
    return weights


# -- reading ----------------------------------------------------------------------------------------
def _read_bytes(path: Path, limit: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise CheckpointError(f"{path.name} is {size / 2**20:.0f} MiB; the limit is {limit / 2**20:.0f} MiB")
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path.name}: {e.strerror or e}") from None


def parse_meta(data: bytes | str, name: str = "sidecar") -> dict[str, Any]:
    """Parse and minimally validate a sidecar's JSON text."""
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{name} is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("net"), dict):
        raise CheckpointError(f"{name} is not a ResViz checkpoint sidecar (no 'net' config)")
    return meta


def _safetensors_header_meta(data: bytes) -> dict[str, Any] | None:
    """The ResViz meta embedded in a safetensors header, if any (the header is plain JSON)."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, 100 * 2**20):
        return None
    try:
        text = json.loads(data[8 : 8 + n]).get("__metadata__", {}).get("resviz")
    except (ValueError, AttributeError, RecursionError):
        return None
    return parse_meta(text, "embedded metadata") if text else None


def _load_safetensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # SafetensorError and friends: truncated, corrupted or not safetensors at all
        raise CheckpointError(f"{name} is not a valid safetensors file ({str(e)[:160]})") from None


def _load_torch(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.pt`` bytes via the weights-only unpickler; never falls back to full unpickling."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found or "weights_only" in str(e).lower() or "unsupported" in str(e).lower():
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"refused {name}: it pickles Python objects{what}, not only tensors. Whole-model pickles and "
                "arbitrary objects are never unpickled; save `net.state_dict()` instead, or use .safetensors"
            ) from None
        raise CheckpointError(f"{name} is not a readable PyTorch file ({str(e)[:160]})") from None
    return _extract_state_dict(obj, name)


def _extract_state_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    """The tensor dict itself, or one stored under a usual key (``state_dict``, ``model``)."""
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                return _extract_state_dict(obj[key], name)
    raise CheckpointError(f"{name} holds no state dict of tensors (found {type(obj).__name__})")


def read_state_dict(data: bytes, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Decode weights bytes: safetensors by content, else a weights-only PyTorch file."""
    if len(data) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{name} is larger than {MAX_CHECKPOINT_BYTES // 2**20} MiB")
    if _looks_like_safetensors(data):
        return _load_safetensors(data, name)
    is_torch = name.lower().endswith((".pt", ".pth", ".bin")) or data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"
    return _load_torch(data, name) if is_torch else _load_safetensors(data, name)


def _looks_like_safetensors(data: bytes) -> bool:
    """An 8-byte little-endian header length that fits the data, then a JSON object."""
    return len(data) >= 10 and int.from_bytes(data[:8], "little") <= len(data) - 8 and data[8:9] == b"{"


def check_state_dict(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and wrongly shaped entries."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f", ... {len(items) - _LIST} more" if len(items) > _LIST else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:_LIST])}{more}")
    if problems:
        raise CheckpointError("checkpoint does not match the model; " + "; ".join(problems))


def load_weights(net: nn.Module, source: str | os.PathLike | dict[str, torch.Tensor]) -> nn.Module:
    """Load weights into ``net`` after checking every key and shape; on any error ``net`` is untouched."""
    if isinstance(source, dict):
        state = source
    else:
        p = Path(source)
        state = read_state_dict(_read_bytes(p, MAX_CHECKPOINT_BYTES), p.name)
    check_state_dict(net, state)
    net.load_state_dict(state, strict=True)
    return net


def _config(meta: dict[str, Any]) -> NetConfig:
    """The net config a checkpoint describes; any malformed field (wrong type, null block, ...) is refused."""
    try:
        cfg = NetConfig.from_dict(meta["net"])
    except Exception as e:  # the file is untrusted: whatever its fields make the config raise is its fault
        raise CheckpointError(f"the checkpoint's net config is invalid: {str(e)[:200]}") from None
    if cfg.num_blocks > MAX_BLOCKS or cfg.input_size > MAX_INPUT_SIZE:
        raise CheckpointError(f"the checkpoint's net is too large for this app ({cfg.num_blocks} blocks, "
                              f"{cfg.input_size} px inputs; the limits are {MAX_BLOCKS} and {MAX_INPUT_SIZE})")
    return cfg


def _build(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> ResNet:
    """Build the described net and load ``state``, checking every shape on a storage-free copy first.

    A config cannot make us allocate more than the weights file holds: the shapes are compared on
    the ``meta`` device, where a net with a million-channel stage costs no memory.
    """
    cfg = _config(meta)
    try:
        with torch.device("meta"):
            shapes = build_net(cfg)
    except Exception as e:  # e.g. a float width that validation let through
        raise CheckpointError(f"the checkpoint's net config cannot be built: {str(e)[:200]}") from None
    check_state_dict(shapes, state)
    net = build_net(cfg)
    load_weights(net, state)
    return net.eval()


def load_checkpoint_bytes(
    data: bytes, json_bytes: bytes | None = None, *, filename: str = "upload.safetensors", cfg: NetConfig | None = None,
) -> tuple[ResNet, dict[str, Any]]:
    """Rebuild a net from uploaded bytes (for the app): weights plus an optional sidecar.

    The config comes from ``json_bytes``, else the safetensors' embedded metadata, else ``cfg``.
    A sidecar's sha256, when present, must match ``data``. The net is returned in eval mode.
    """
    meta = None
    if json_bytes is not None:
        if len(json_bytes) > MAX_SIDECAR_BYTES:
            raise CheckpointError("the JSON sidecar is larger than 1 MiB")
        meta = parse_meta(json_bytes, "the JSON sidecar")
        digest = hashlib.sha256(data).hexdigest()
        if meta.get("sha256") not in (None, digest):
            raise CheckpointError(f"{filename} does not match its sidecar (sha256 differs): mismatched or damaged files")
    state = read_state_dict(data, filename)
    if meta is None:
        meta = _safetensors_header_meta(data)
    if meta is None:
        if cfg is None:
            raise CheckpointError(f"{filename} carries no net config: add its .json sidecar or choose the architecture")
        meta = {"net": cfg.to_dict()}
    return _build(meta, state), meta


def load_checkpoint(path: str | os.PathLike, *, cfg: NetConfig | None = None) -> tuple[ResNet, dict[str, Any]]:
    """Rebuild the net saved at ``path`` (``.safetensors``, ``.json`` or ``.pt``/``.pth``); returns ``(net, meta)``."""
    p = Path(path)
    if p.suffix.lower() in (".pt", ".pth", ".bin"):
        weights, sidecar = p, p.with_suffix(".json")
    else:
        weights, sidecar = checkpoint_paths(p)
    if not weights.exists():
        raise CheckpointError(f"no weights file {weights.name} in {weights.parent}")
    data = _read_bytes(weights, MAX_CHECKPOINT_BYTES)
    side = _read_bytes(sidecar, MAX_SIDECAR_BYTES) if sidecar.exists() else None
    return load_checkpoint_bytes(data, side, filename=weights.name, cfg=cfg)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of the checkpoint at ``path`` (no weights are read)."""
    sidecar = checkpoint_paths(path)[1]
    return parse_meta(_read_bytes(sidecar, MAX_SIDECAR_BYTES), sidecar.name)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
