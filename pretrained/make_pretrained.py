"""Train the checkpoints shipped in ``pretrained/``, reproducibly from fixed seeds.

Usage::

    python pretrained/make_pretrained.py              # all checkpoints, into pretrained/
    python pretrained/make_pretrained.py --only digits --out /tmp/pre

Each run writes ``<name>.safetensors`` + ``<name>.json`` (see :mod:`resviz.storage.checkpoints`) and
``manifest.json``, which lists per checkpoint: the files, the net and training configs, the dataset
recipe (name, seed, sizes, input size: enough to regenerate the exact test split), the test accuracy
measured on the CPU in float32 after training, the training time, the sha256 of the weights and the
torch version. ``tests/test_pretrained.py`` checks all of it.

Why these runs: a ResNet-32 and its plain twin (same init, same batches, only the skips differ) on
``shapes``, where the plain net clearly falls behind, and a ResNet-20 on ``digits``. On a shared 2-core CPU the whole script takes
a few minutes; one intra-op thread is the default because it is the fastest setting on a busy box.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from resviz import BlockConfig, NetConfig, TrainConfig, __version__, runtime  # noqa: E402
from resviz.data.datasets import load_dataset  # noqa: E402
from resviz.storage.checkpoints import file_sha256, save_checkpoint  # noqa: E402
from resviz.train.trainer import evaluate, fit  # noqa: E402

HERE = Path(__file__).resolve().parent
MANIFEST = "manifest.json"

# name -> recipe. "names" maps the trainer's net names to checkpoint names (a twin run gives two).
RECIPES: dict[str, dict[str, Any]] = {
    "shapes": {
        # Depth 32, not 20: on shapes plain-20 keeps up (97.0% vs ResNet-20's 98.9%, 10 epochs), while at
        # depth 32 the plain twin lags far behind (8 epochs: ResNet-32 96.2%, plain-32 51.9%; seed 0).
        # A mirrored shape keeps its class, so crop + flip augmentation is safe.
        "dataset": {"name": "shapes", "seed": 0, "train_size": 5000, "test_size": 1000, "input_size": 32},
        "net": NetConfig(depth=32, width=16, num_classes=8, input_size=32, block=BlockConfig()),
        "train": TrainConfig(epochs=8, batch_size=128, lr=0.1, schedule="onecycle", weight_decay=5e-4,
                             seed=0, device="cpu", probe_every=0, augment=True),
        "twin": True,
        "names": {"residual": "shapes_resnet32", "plain": "shapes_plain32"},
        "descriptions": {
            "residual": "ResNet-32 (width 16) on shapes, 8 epochs; compare with its plain twin shapes_plain32",
            "plain": "Plain-32: ResNet-32 with every skip connection off, same init and batches as shapes_resnet32",
        },
    },
    "digits": {
        "dataset": {"name": "digits", "seed": 0, "train_size": None, "test_size": None, "input_size": 32},
        "net": NetConfig(depth=20, width=16, num_classes=10, in_channels=1, input_size=32, block=BlockConfig()),
        # no augmentation: a mirrored digit is another symbol
        "train": TrainConfig(epochs=12, batch_size=64, lr=0.1, schedule="onecycle", weight_decay=5e-4,
                             seed=0, device="cpu", probe_every=0),
        "twin": False,
        "names": {"residual": "digits_resnet20"},
        "descriptions": {"residual": "ResNet-20 (width 16) on scikit-learn's handwritten digits, upsampled to 32x32"},
    },
}


def dataset_recipe(bundle: Any, recipe: dict[str, Any]) -> dict[str, Any]:
    """What regenerates the data exactly (name, seed, sizes, input size) plus the bundle's info."""
    sizes = {"train_size": len(bundle.train), "test_size": len(bundle.test)}
    return {**bundle.info(), **recipe, **sizes}


def run_recipe(key: str, out: Path) -> list[dict[str, Any]]:
    """Train one recipe, save its checkpoints into ``out`` and return their manifest entries."""
    r = RECIPES[key]
    d = r["dataset"]
    bundle = load_dataset(d["name"], seed=d["seed"], train_size=d["train_size"], test_size=d["test_size"],
                          input_size=d["input_size"])
    info = dataset_recipe(bundle, d)
    t0 = time.perf_counter()
    result = fit(r["net"], bundle, r["train"], twin=r["twin"])
    seconds = round(time.perf_counter() - t0, 1)
    if result.status != "finished":
        raise RuntimeError(f"{key}: training ended with status {result.status}: {result.message}")
    entries = []
    for net_name, ckpt_name in r["names"].items():
        net = result.nets[net_name].cpu().eval()
        loss, acc = evaluate(net, bundle.test, batch_size=500)  # float32 on the CPU, as the tests do
        metrics = {"test_acc": acc, "test_loss": loss, "train_time_s": seconds, "steps": result.history[-1].step}
        path = save_checkpoint(net, out / ckpt_name, dataset=info, metrics=metrics)
        entries.append({
            "name": ckpt_name, "recipe": key, "description": r["descriptions"][net_name], "kind": net_name,
            "file": path.name, "sidecar": f"{ckpt_name}.json",
            "twin": next((n for k, n in r["names"].items() if k != net_name), None),
            "config": net.cfg.to_dict(), "train": r["train"].to_dict(), "dataset": info,
            "test_acc": acc, "test_loss": loss, "train_time_s": seconds, "sha256": file_sha256(path),
            "size_bytes": path.stat().st_size, "torch": torch.__version__, "resviz": __version__,
        })
        print(f"{ckpt_name}: test accuracy {acc:.4f} (loss {loss:.3f}), {seconds:.0f} s", flush=True)
    return entries


def write_manifest(out: Path, entries: list[dict[str, Any]]) -> Path:
    """Write ``manifest.json``, keeping entries of current recipes that were not rerun."""
    path = out / MANIFEST
    old = json.loads(path.read_text()).get("checkpoints", []) if path.exists() else []
    rerun = {e["recipe"] for e in entries}
    merged = [e for e in old if e.get("recipe") in set(RECIPES) - rerun] + entries
    manifest = {
        "format": "resviz-pretrained", "version": 1, "command": "python pretrained/make_pretrained.py",
        "generated": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
        "checkpoints": sorted(merged, key=lambda e: e["name"]),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: pretrained/)")
    parser.add_argument("--only", choices=sorted(RECIPES), action="append", help="train only these recipes")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    runtime.tune(threads=args.threads, keep_freed_memory=True, cudnn_benchmark=True)  # this script's process settings
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    entries = [e for key in (args.only or list(RECIPES)) for e in run_recipe(key, args.out)]
    print(f"wrote {write_manifest(args.out, entries)} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
