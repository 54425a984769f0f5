"""Where the nets to inspect come from: shipped checkpoints, uploads, ImageNet-trained torchvision ResNets.

Each source yields a ResViz :class:`~resviz.nn.models.ResNet` in eval mode plus a :class:`ModelInfo` that
says how to feed it (normalisation, input size, channels) and how to name its outputs. Nothing is ever
downloaded here: torchvision weights are used only when they are already in the torch hub cache, and
:class:`ModelUnavailableError` carries the one-liner that fetches them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from resviz.config import NetConfig
from resviz.data.datasets import DatasetUnavailable, load_dataset
from resviz.data.images import LoadedImage
from resviz.data.preprocess import Normalization, image_to_input
from resviz.nn.models import ResNet, build_net, from_torchvision
from resviz.storage.checkpoints import CheckpointError, checkpoint_paths, load_checkpoint, load_checkpoint_bytes

# arch -> (torchvision builder name, weights enum name, members to look for, best first)
TORCHVISION_ARCHS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "resnet18": ("resnet18", "ResNet18_Weights", ("IMAGENET1K_V1",)),
    "resnet50": ("resnet50", "ResNet50_Weights", ("IMAGENET1K_V2", "IMAGENET1K_V1")),
}


class ModelUnavailableError(ValueError):
    """A model that cannot be loaded; ``str(err)`` tells the user what to do."""


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """How to feed a net and how to name its outputs."""

    name: str  # shown to the user
    source: str  # "pretrained", "trained", "upload" or "torchvision"
    dataset: str  # dataset name, e.g. "shapes", "cifar10", "imagenet"
    classes: tuple[str, ...]  # class names by output index
    norm: Normalization  # per-channel mean and std of the inputs, in [0, 1] units
    channels: int  # 1 (grey) or 3 (RGB)
    input_size: int  # side of the square input
    resize_size: int | None = None  # ImageNet style: resize to this, then center-crop input_size
    accuracy: float | None = None  # test accuracy in [0, 1], when known
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # anything else (configs, metrics)

    @property
    def mean(self) -> tuple[float, ...]:
        return self.norm.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.norm.std


def _accuracy(d: Mapping[str, Any]) -> float | None:
    """Test accuracy from metadata: ``accuracy``/``test_acc``, or inside ``final``/``metrics`` (also per net)."""
    for src in (d, d.get("metrics"), d.get("final")):
        if not isinstance(src, Mapping):
            continue
        for key in ("accuracy", "test_acc"):
            if isinstance(src.get(key), (int, float)):
                return float(src[key])
        nets = src.get("nets")
        role = d.get("role", "residual")
        if isinstance(nets, Mapping) and isinstance(nets.get(role), Mapping) and "test_acc" in nets[role]:
            return float(nets[role]["test_acc"])
    return None


def info_from_dict(d: Mapping[str, Any], *, name: str, source: str) -> ModelInfo:
    """A :class:`ModelInfo` from a plain dict such as a trained model's info or a dataset's ``info()``.

    Needs ``classes``, ``mean``, ``std``, ``channels`` and ``input_size``; ``dataset`` (or ``name``)
    and an accuracy are optional.
    """
    missing = [k for k in ("classes", "mean", "std", "channels", "input_size") if k not in d]
    if missing:
        raise ValueError(f"model metadata lacks {', '.join(missing)}")
    return ModelInfo(
        name=name, source=source, dataset=str(d.get("dataset") or d.get("name") or "unknown"),
        classes=tuple(map(str, d["classes"])), norm=Normalization(d["mean"], d["std"]),
        channels=int(d["channels"]), input_size=int(d["input_size"]),
        accuracy=_accuracy(d), extra=dict(d),
    )


def info_from_meta(meta: Mapping[str, Any], net: ResNet, *, name: str, source: str) -> ModelInfo:
    """A :class:`ModelInfo` from checkpoint metadata; without dataset info, generic names and 0.5/0.5 scaling."""
    ds = meta.get("dataset")
    if isinstance(ds, Mapping) and "classes" in ds:
        return info_from_dict({**ds, "metrics": meta.get("metrics")}, name=name, source=source)
    cfg = net.cfg
    return ModelInfo(
        name=name, source=source, dataset="unknown", classes=tuple(f"class {i}" for i in range(cfg.num_classes)),
        norm=Normalization((0.5,) * cfg.in_channels, (0.5,) * cfg.in_channels), channels=cfg.in_channels,
        input_size=cfg.input_size, accuracy=_accuracy(meta), extra={"note": "no dataset information in the checkpoint"},
    )


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def load_upload(files: Sequence[tuple[str, bytes]]) -> tuple[ResNet, ModelInfo]:
    """A net from uploaded files: one weights file (.safetensors, or .pt/.pth state dict) and an optional .json.

    Raises:
        CheckpointError: with a user-facing message (wrong files, damaged data, mismatched config).
    """
    weights = [(n, b) for n, b in files if n.lower().endswith(WEIGHT_SUFFIXES)]
    sidecars = [(n, b) for n, b in files if n.lower().endswith(".json")]
    others = [n for n, _ in files if not n.lower().endswith((*WEIGHT_SUFFIXES, ".json"))]
    if others:
        raise CheckpointError(f"unsupported file(s) {', '.join(others)}: upload .safetensors (or .pt/.pth) plus its .json")
    if len(weights) != 1 or len(sidecars) > 1:
        raise CheckpointError(f"upload exactly one weights file and at most one .json (got {len(weights)} and {len(sidecars)})")
    (wname, data), side = weights[0], sidecars[0][1] if sidecars else None
    net, meta = load_checkpoint_bytes(data, side, filename=wname)
    return net.eval(), info_from_meta(meta, net, name=wname.rsplit(".", 1)[0], source="upload")


# -- shipped checkpoints ------------------------------------------------------------------------
def _shipped_dir() -> Path:
    """``resviz/pretrained`` inside an installed wheel, else ``pretrained/`` of the source checkout."""
    here = Path(__file__).resolve().parent
    return here / "pretrained" if (here / "pretrained").is_dir() else here.parent / "pretrained"


PRETRAINED_DIR = _shipped_dir()  # override with $RESVIZ_PRETRAINED


@dataclass(frozen=True)
class ShippedModel:
    """One entry of ``pretrained/manifest.json``."""

    name: str
    path: Path  # the checkpoint's .safetensors file
    dataset: str
    accuracy: float | None
    description: str = ""
    kind: str = ""  # "residual" or "plain" (a twin run ships both)
    log: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)  # training log, when recorded
    seed: int | None = None  # the seed it was trained from (its initial weights), when recorded
    status: str = "finished"  # how its training ended: "finished", or "diverged" (shipped as it stood before)
    message: str = ""  # what ended it, when it did not finish


def pretrained_dir() -> Path:
    return Path(os.environ.get("RESVIZ_PRETRAINED") or PRETRAINED_DIR)


def shipped_models(root: str | os.PathLike | None = None) -> list[ShippedModel]:
    """The shipped checkpoints listed in ``<root>/manifest.json`` whose files exist (none if no manifest)."""
    root = Path(root) if root is not None else pretrained_dir()
    try:
        manifest = json.loads((root / "manifest.json").read_text("utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise CheckpointError(f"pretrained/manifest.json is unreadable: {e}") from None
    entries = manifest.get("checkpoints", manifest.get("models", [])) if isinstance(manifest, Mapping) else manifest
    return [m for e in (entries if isinstance(entries, list) else []) if (m := _manifest_entry(root, e)) is not None]


def _manifest_entry(root: Path, e: Any) -> ShippedModel | None:
    """One manifest entry whose weights file exists, else None."""
    if not isinstance(e, Mapping):
        return None
    path = checkpoint_paths(root / str(e.get("file") or f"{e.get('name')}.safetensors"))[0]
    if path.resolve().parent != root.resolve() or not path.is_file():  # only files inside the folder
        return None
    ds = e.get("dataset")
    dataset = str(ds.get("name", "unknown") if isinstance(ds, Mapping) else ds or "unknown")
    train = e.get("train")
    seed = train.get("seed") if isinstance(train, Mapping) else None
    return ShippedModel(name=str(e.get("name") or path.stem), path=path, dataset=dataset, accuracy=_accuracy(e),
                        description=str(e.get("description", "")), kind=str(e.get("kind", "")),
                        log=e.get("log") if isinstance(e.get("log"), Mapping) else None,
                        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
                        status=str(e.get("status", "finished")), message=str(e.get("message", "")))


def first_choice(models: Sequence[ShippedModel], dataset: str | None) -> int:
    """Index of the net to open first: of the residual nets on ``dataset``, the most accurate (to the percentage point;
    the zoo also holds variants that barely trained), then the smallest (quick to inspect); else the first."""
    fits = [i for i, m in enumerate(models) if m.dataset == dataset and m.kind != "plain"]
    return min(fits, key=lambda i: (-round(100 * (models[i].accuracy or 0.0)), models[i].path.stat().st_size,
                                    models[i].name)) if fits else 0


def load_shipped(model: ShippedModel) -> tuple[ResNet, ModelInfo]:
    """Load a shipped checkpoint (safetensors + JSON sidecar, checked) in eval mode."""
    net, meta = load_checkpoint(model.path)
    info = info_from_meta(meta, net, name=model.name, source="pretrained")
    if info.accuracy is None and model.accuracy is not None:
        info = replace(info, accuracy=model.accuracy)
    return net.eval(), info


def untrained(cfg: NetConfig, dataset: str = "shapes", seed: int = 0) -> tuple[ResNet, ModelInfo]:
    """A freshly initialised (untrained) net for ``dataset``: its classes, channels and normalisation."""
    bundle = load_dataset(dataset, input_size=cfg.input_size, train_size=256, test_size=1, download=False)
    cfg = replace(cfg, num_classes=len(bundle.classes), in_channels=bundle.channels)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the process's RNG
        torch.manual_seed(seed)
        net = build_net(cfg).eval()
    info = info_from_dict(bundle.info(), name=f"untrained ResNet-{cfg.depth}", source="untrained")
    return net, replace(info, dataset=dataset)


# -- torchvision -------------------------------------------------------------------------------
def _weights(arch: str, member: str) -> Any:
    import torchvision.models as tvm

    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"unknown torchvision arch {arch!r}; choose one of {', '.join(TORCHVISION_ARCHS)}")
    return getattr(getattr(tvm, TORCHVISION_ARCHS[arch][1]), member)


def weights_file(arch: str, member: str, hub_dir: str | os.PathLike | None = None) -> Path:
    """Where ``torchvision`` keeps (or would keep) the weights file: ``<hub>/checkpoints/<name>.pth``."""
    url = _weights(arch, member).url
    return Path(hub_dir or torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def download_command(arch: str) -> str:
    """The shell one-liner that downloads ``arch``'s best ImageNet weights into the torch hub cache."""
    builder, enum, members = TORCHVISION_ARCHS[arch]
    return f'python -c "from torchvision.models import {builder}, {enum}; {builder}(weights={enum}.{members[0]})"'


def find_torchvision_weights(arch: str, hub_dir: str | os.PathLike | None = None) -> tuple[str, Path] | None:
    """``(member, path)`` of the best cached ImageNet weights of ``arch``, or None if none are cached."""
    for member in TORCHVISION_ARCHS[arch][2]:
        path = weights_file(arch, member, hub_dir)
        if path.is_file():
            return member, path
    return None


def load_torchvision(arch: str, hub_dir: str | os.PathLike | None = None) -> tuple[ResNet, ModelInfo]:
    """An ImageNet-trained torchvision ResNet from the local hub cache, converted to ResViz.

    Raises:
        ModelUnavailableError: the weights are not cached (the message holds the download command) or unreadable.
    """
    import torchvision.models as tvm

    found = find_torchvision_weights(arch, hub_dir)
    if found is None:
        where = weights_file(arch, TORCHVISION_ARCHS[arch][2][0], hub_dir).parent
        raise ModelUnavailableError(
            f"{arch} ImageNet weights are not in the torch hub cache ({where}). While online, run: {download_command(arch)}"
        )
    member, path = found
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        tv = getattr(tvm, TORCHVISION_ARCHS[arch][0])()
        tv.load_state_dict(state)
    except Exception as e:  # any damage to the file means the same thing to the user
        raise ModelUnavailableError(f"the weights file {path} could not be read ({type(e).__name__}); delete it and run: "
                               f"{download_command(arch)}") from e
    weights = _weights(arch, member)
    t = weights.transforms()
    acc = weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    info = ModelInfo(
        name=f"torchvision {arch} ({member})", source="torchvision", dataset="imagenet",
        classes=tuple(weights.meta["categories"]), norm=Normalization(tuple(t.mean), tuple(t.std)), channels=3,
        input_size=int(t.crop_size[0]), resize_size=int(t.resize_size[0]), accuracy=None if acc is None else acc / 100,
    )
    return from_torchvision(tv).eval(), info


# -- images ------------------------------------------------------------------------------------
def prepare_image(img: Image.Image | LoadedImage, info: ModelInfo) -> torch.Tensor:
    """The normalised ``(1, C, H, W)`` input ``info``'s net expects (ImageNet: resize, then center-crop).

    The same resize and normalisation as the datasets' (:mod:`resviz.data.preprocess`).
    """
    if isinstance(img, LoadedImage):
        img = img.image
    return image_to_input(img, _input_norm(info), info.input_size, resize_size=info.resize_size)


def _input_norm(info: ModelInfo) -> Normalization:
    """``info.norm`` for ``info.channels`` channels (a single stored value serves every channel)."""
    n = info.norm
    return n if n.channels == info.channels else Normalization.of(n.mean, n.std, info.channels)


def as_picture(x: torch.Tensor, info: ModelInfo) -> np.ndarray:
    """The input as the net sees it, denormalised to an ``(H, W, 3)`` image in [0, 1]."""
    return _input_norm(info).picture(x)


def dataset_samples(info: ModelInfo, count: int | None = None, *, root: str | os.PathLike | None = None) -> TensorDataset:
    """Test-split images of the model's dataset, normalised the way the model expects.

    With the dataset recipe a checkpoint records (``seed``, ``test_size``), this is exactly the split the
    model was evaluated on, in the same order; otherwise ``count`` (default 200) images of the seed-0
    test split, which never overlaps the training images. Nothing is downloaded.

    Raises:
        DatasetUnavailable: the dataset is unknown (e.g. ImageNet) or its files are missing.
    """
    if info.dataset in ("imagenet", "unknown"):
        raise DatasetUnavailable(f"no test images of {info.dataset!r} are available here; upload a picture instead")
    recorded = info.extra.get("test_size")
    count = int(count or (recorded if isinstance(recorded, int) and recorded > 0 else 200))
    seed = info.extra.get("seed", 0)
    bundle = load_dataset(info.dataset, root=root, input_size=info.input_size, train_size=16, test_size=min(count, 5000),
                          seed=seed if isinstance(seed, int) else 0, download=False)
    if bundle.channels != info.channels:
        raise DatasetUnavailable(f"{info.dataset} has {bundle.channels} channel(s) but the model expects {info.channels}")
    x, y = bundle.test.tensors
    return TensorDataset(_input_norm(info).normalize(bundle.denormalize(x)), y)  # (N, C, H, W) in the model's units
