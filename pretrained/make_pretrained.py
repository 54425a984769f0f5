"""Train the checkpoints shipped in ``pretrained/`` (the study zoo), reproducibly from fixed seeds.

Usage::

    python pretrained/make_pretrained.py                     # every net, into pretrained/; resumable
    python pretrained/make_pretrained.py --only shapes20     # one recipe (both nets of a twin pair)
    python pretrained/make_pretrained.py --worker 0/2 &      # two processes share the work
    python pretrained/make_pretrained.py --worker 1/2 &
    python pretrained/make_pretrained.py --list              # what is done, what is left

Each net writes ``<name>.safetensors`` + ``<name>.json`` (see :mod:`resviz.storage.checkpoints`) and its
entry in ``manifest.json``: the files, the net and training configs, the dataset recipe (name, seed,
sizes, input size: enough to regenerate the exact test split), the test accuracy measured on the CPU in
float32 on the saved weights, the full training log (train and test loss and error, several times per epoch), the
training time and device, the sha256 of the weights and the torch version. ``tests/test_pretrained.py``
checks all of it.

Twins (a residual net and its plain twin: same initial weights, same batches, same augmentation, only the
skips differ) are trained as two separate runs from the same seed, which gives the same weights as
training them in lockstep (``tests/test_pretrained.py`` checks that on a short run), so each net is one
unit of work: a finished net is never trained again (resume by running the same command; a net whose
entry, recipe and weights match is skipped), and workers split the nets between them. On a CUDA device
the trainer's fast path runs (``device="auto"``); on a CPU one intra-op thread per worker is fastest.

The recipes:

- ``shapes20``, ``shapes56``, ``shapes110``: the study zoo. ResNet-20/56/110 (CIFAR-style, width 16) and
  their plain twins on ``shapes`` at 16x16, 20,000 training images (crop + flip), 24 epochs at every depth, SGD
  with Nesterov momentum 0.9, weight decay 5e-4 on every parameter, a one-cycle schedule peaking at 0.1, batch 128.
  At the end the norms' running statistics are re-estimated over the training images without augmentation
  (precise BN; a net trained before that step is recalibrated without retraining). The plain nets show the
  degradation problem; the ResNets do not.
- ``signal_post_bn``, ``signal_pre_bn``, ``signal_post_nonorm``, ``signal_pre_nonorm``, ``signal_skipinit``: a
  ResNet-32 in each block of the signal-propagation study (post- and pre-activation, with BN and without any
  norm, and pre-activation without norm under SkipInit), by the zoo's recipe on its data; the SkipInit net peaks at
  a learning rate of 0.05, since at 0.1 it diverged.
- ``fmnist20``: ResNet-20 and its plain twin on Fashion-MNIST (all 60,000 / 10,000 images, 28x28, 5 epochs,
  no augmentation), read from Debian's ``dataset-fashion-mnist`` package or torchvision's layout under the
  data folder.
- ``shapes``: ResNet-32 and plain-32 at 5,000 images (the nets the tour and the Inspect page open with).
- ``digits``: a ResNet-20 on scikit-learn's handwritten digits.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from resviz import BlockConfig, NetConfig, TrainConfig, __version__, runtime  # noqa: E402
from resviz.data.datasets import DatasetBundle, load_dataset  # noqa: E402
from resviz.storage.checkpoints import file_sha256, load_checkpoint, save_checkpoint  # noqa: E402
from resviz.train.records import StepRecord  # noqa: E402
from resviz.train.trainer import build_nets, evaluate, fit, recalibrate_norms, resolve_device  # noqa: E402

HERE = Path(__file__).resolve().parent
MANIFEST = "manifest.json"


def _zoo_recipe(depth: int) -> dict[str, Any]:
    return {
        "dataset": {"name": "shapes", "seed": 1, "train_size": 20000, "test_size": 1000, "input_size": 16},
        "net": NetConfig(depth=depth, width=16, num_classes=8, input_size=16, block=BlockConfig()),
        # 157 steps per epoch, 24 epochs at every depth, weight decay on every parameter as He et al. (the norms'
        # scales too: with it they learn the small residual responses of their Fig. 7; 6 epochs with decay on the
        # conv weights only left every scale within 5% of 1). 16x16 images so that this schedule fits a 2-core CPU
        # (4x fewer pixels than 32x32). A test evaluation every 78 steps (48 in all) draws the degradation curves.
        # Tried instead: weight decay 1e-4 (the rest as here) left the branch scales near 1 and ResNet-110's the
        # largest (std of F(x) ResNet-20/56/110 0.906/0.815/0.945, plain-20 0.902), though ResNet-56's loss slice
        # was then 5.8x more convex than plain-56's (here: 1.6x). By Li et al.'s full-Hessian measure the 1e-4 pair
        # (ResNet-56 99.8%, plain-56 95.3%) kept this zoo's reversal: mean |lambda_min/lambda_max| on a 3x3 map 0.270
        # (ResNet-56) vs 0.180 (plain-56); here, on the same map, 0.242 vs 0.086.
        "train": TrainConfig(epochs=24, batch_size=128, lr=0.1, schedule="onecycle", weight_decay=5e-4, decay_all=True,
                             seed=depth, device="auto", probe_every=0, eval_every=78, augment=True),
        "twin": True,
        # After training, every norm's running statistics are re-estimated over the 20,000 training images without
        # augmentation (precise BN): the moving averages were taken on crops padded with zeros (2 of 16 pixels a side)
        # by earlier weights, and ResNet-110's eval-mode branch outputs came out 7% off the scale its norms set
        # (ResNet-20: 2%), enough to reorder He et al.'s Fig. 7 (std of F(x) ResNet-110 0.397 vs ResNet-56 0.382;
        # after: 0.373 vs 0.376). Test accuracy did not move (plain-110: 12.8% -> 12.7%).
        "precise_bn": True,
        "names": {"residual": f"shapes_resnet{depth}", "plain": f"shapes_plain{depth}"},
        "descriptions": {
            "residual": f"ResNet-{depth} (width 16) on shapes at 16x16, 20,000 images; zoo net, twin of shapes_plain{depth}",
            "plain": f"Plain-{depth}: ResNet-{depth} with every skip off, same init and batches as shapes_resnet{depth}",
        },
    }


# The signal-propagation study's converged nets: a ResNet-32, the study's own depth, in each of that study's five blocks,
# trained by the zoo's recipe (seeded by the depth, as the zoo is) on the zoo's data: only the block differs. At depth
# 20 (9 blocks) the unnormalised net's variance grew only 7.8x more than the BN net's at initialisation (20.5 vs 2.64).
SIGNAL_DEPTH = 32
SIGNAL_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {  # recipe -> (checkpoint name, block settings)
    "signal_post_bn": ("shapes_signal32_post_bn", {"order": "post", "norm": "batch"}),
    "signal_pre_bn": ("shapes_signal32_pre_bn", {"order": "pre", "norm": "batch"}),
    "signal_post_nonorm": ("shapes_signal32_post_nonorm", {"order": "post", "norm": "none"}),
    "signal_pre_nonorm": ("shapes_signal32_pre_nonorm", {"order": "pre", "norm": "none"}),
    "signal_skipinit": ("shapes_signal32_skipinit", {"order": "pre", "norm": "none", "scaling": "learnable", "alpha_init": 0.0}),
}
# The one exception to the shared recipe: at the zoo's peak learning rate of 0.1 a SkipInit ResNet-20 diverged (a
# non-finite gradient at step 624 of 3,744, learning rate 0.07 and rising; at 0.05 it reached 99.0%), so the SkipInit
# net peaks lower; De and Smith (2020) also train their unnormalised SkipInit nets with smaller learning rates than BN's.
SIGNAL_LR = {"signal_skipinit": 0.05}


def _signal_recipe(name: str, block: dict[str, Any], lr: float | None = None, depth: int = SIGNAL_DEPTH) -> dict[str, Any]:
    base = _zoo_recipe(depth)
    what = ", ".join(f"{k} {v}" for k, v in block.items())
    train = base["train"] if lr is None else replace(base["train"], lr=lr)
    recipe = "recipe" if lr is None else f"recipe (peak learning rate {lr:g})"
    return {**base, "net": NetConfig(depth=depth, width=16, num_classes=8, input_size=16, block=BlockConfig(**block)),
            "train": train, "twin": False, "names": {"residual": name},
            # without normalisation a deep net may diverge under the recipe: that is the study's result, so the net is
            # shipped as it stood before the failing step, its entry saying so ("status": "diverged", the message)
            "divergence_is_a_result": block.get("norm") == "none",
            "descriptions": {"residual": f"ResNet-{depth} (width 16) with {what} on shapes at 16x16, the zoo's {recipe} "
                                         "and data; one of the signal-propagation study's five blocks"}}


# name -> recipe. "names" maps the trainer's net names to checkpoint names (a twin recipe gives two).
RECIPES: dict[str, dict[str, Any]] = {
    "shapes20": _zoo_recipe(20),
    "fmnist20": {
        "dataset": {"name": "fashion-mnist", "seed": 0, "train_size": 60000, "test_size": 10000, "input_size": 28},
        "net": NetConfig(depth=20, width=16, num_classes=10, in_channels=1, input_size=28, block=BlockConfig()),
        # no augmentation: in a short schedule crop + flip cost accuracy here (3 epochs with it: ResNet-20 91.0%,
        # plain-20 90.9%); 469 steps per epoch, a test evaluation every 235 steps (all 10,000 test images)
        "train": TrainConfig(epochs=5, batch_size=128, lr=0.1, schedule="onecycle", weight_decay=5e-4,
                             seed=0, device="auto", probe_every=0, eval_every=235),
        "twin": True,
        "names": {"residual": "fmnist_resnet20", "plain": "fmnist_plain20"},
        "descriptions": {
            "residual": "ResNet-20 (width 16) on Fashion-MNIST, all 60,000 training images; twin of fmnist_plain20",
            "plain": "Plain-20: ResNet-20 with every skip off, same init and batches as fmnist_resnet20",
        },
    },
    "shapes56": _zoo_recipe(56),
    "shapes110": _zoo_recipe(110),
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
    **{key: _signal_recipe(name, block, SIGNAL_LR.get(key)) for key, (name, block) in SIGNAL_VARIANTS.items()},
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


def units() -> list[tuple[str, str]]:
    """Every (recipe, net) to train, in the order the work is done: small nets first."""
    return [(key, kind) for key, r in RECIPES.items() for kind in r["names"]]


# TrainConfig fields added after recipes were trained, with their defaults: at the default a field is left out of the
# fingerprint, so adding it leaves the fingerprints (and nets) of the recipes that do not use it as they were
LATER_FIELDS: dict[str, Any] = {"decay_all": False}


def fingerprint(key: str) -> str:
    """A hash of what decides a recipe's weights (data, net, training config, seed)."""
    r = RECIPES[key]
    train = {k: v for k, v in r["train"].to_dict().items() if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
    blob = json.dumps({"dataset": r["dataset"], "net": r["net"].to_dict(), "train": train, "twin": r["twin"]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dataset_recipe(bundle: DatasetBundle, recipe: dict[str, Any]) -> dict[str, Any]:
    """What regenerates the data exactly (name, seed, sizes, input size) plus the bundle's info."""
    sizes = {"train_size": len(bundle.train), "test_size": len(bundle.test)}
    return {**bundle.info(), **recipe, **sizes}


def load_recipe_data(key: str) -> DatasetBundle:
    d = RECIPES[key]["dataset"]
    return load_dataset(d["name"], seed=d["seed"], train_size=d["train_size"], test_size=d["test_size"],
                        input_size=d["input_size"])


def training_log(history: list[StepRecord], name: str) -> dict[str, list[float]]:
    """At each test evaluation: mean train loss and error over the batches since the last one, test loss and error."""
    log: dict[str, list[float]] = {"epoch": [], "train_loss": [], "train_error": [], "test_loss": [], "test_error": []}
    losses: list[float] = []
    errors: list[float] = []
    for rec in history:
        m = rec.nets.get(name)
        if m is None:
            continue
        losses.append(m.loss)
        errors.append(1.0 - m.acc)
        if m.test_acc is not None:
            log["epoch"].append(round(rec.epoch, 4))
            log["train_loss"].append(sum(losses) / len(losses))
            log["train_error"].append(sum(errors) / len(errors))
            log["test_loss"].append(m.test_loss if m.test_loss is not None else float("nan"))
            log["test_error"].append(1.0 - m.test_acc)
            losses, errors = [], []
    return log


def train_unit(key: str, kind: str, out: Path) -> dict[str, Any]:
    """Train one net of a recipe from its seed, save it into ``out`` and return its manifest entry."""
    r = RECIPES[key]
    bundle = load_recipe_data(key)
    info = dataset_recipe(bundle, r["dataset"])
    cfg: TrainConfig = r["train"]
    nets = build_nets(r["net"], twin=r["twin"], seed=cfg.seed)  # both built: the twin shares the initial weights
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    result = fit({kind: nets[kind]}, bundle, cfg)
    seconds = round(time.perf_counter() - t0, 1)
    status = str(result.status)
    if status != "finished" and not (status == "diverged" and r.get("divergence_is_a_result")):
        raise RuntimeError(f"{key}/{kind}: training ended with status {result.status}: {result.message}")
    ckpt_name = r["names"][kind]
    description = r["descriptions"][kind]
    if status != "finished":
        description += f". {result.message.split(':')[0].capitalize()}: shipped as it stood before that step"
    entry = {
        "name": ckpt_name, "recipe": key, "fingerprint": fingerprint(key), "description": description,
        "kind": kind, "sidecar": f"{ckpt_name}.json", "twin": next((n for k, n in r["names"].items() if k != kind), None),
        "train": cfg.to_dict(), "dataset": info, "train_time_s": seconds, "steps": result.history[-1].step if result.history else 0,
        "trained_on": device.type, "threads": torch.get_num_threads(), "log": training_log(result.history, kind),
        **({"status": status, "message": result.message} if status != "finished" else {}),
    }
    return finish_unit(key, result.nets[kind].cpu().eval(), bundle, entry, out)


def finish_unit(key: str, net: torch.nn.Module, bundle: DatasetBundle, entry: dict[str, Any], out: Path) -> dict[str, Any]:
    """Re-estimate the norms' statistics where the recipe asks, save ``net`` and complete its manifest ``entry``."""
    if RECIPES[key].get("precise_bn"):
        recalibrate_norms(net, bundle.train.tensors[0])  # on the CPU: the same statistics whatever trained the net
    path = save_checkpoint(net, out / entry["name"], dataset=entry["dataset"], metrics={"train_time_s": entry["train_time_s"]})
    reloaded = load_checkpoint(path)[0].eval()
    loss, acc = evaluate(reloaded, bundle.test, batch_size=500)  # on the saved weights, float32 on the CPU
    loss = loss if math.isfinite(loss) else None  # a net shipped diverged may overflow: null in the JSON, not NaN
    entry = {**entry, "file": path.name, "config": net.cfg.to_dict(), "test_acc": acc, "test_loss": loss,
             "precise_bn": bool(RECIPES[key].get("precise_bn")), "sha256": file_sha256(path),
             "size_bytes": path.stat().st_size, "torch": torch.__version__, "resviz": __version__}
    shown = "not finite" if loss is None else f"{loss:.3f}"
    print(f"{entry['name']}: test accuracy {acc:.4f} (loss {shown}), {entry['train_time_s']:.0f} s on {entry['trained_on']}",
          flush=True)
    return entry


def recalibrate_unit(key: str, entry: dict[str, Any], out: Path) -> dict[str, Any]:
    """A trained net whose recipe has since asked for precise BN: re-estimate its norms' statistics, no retraining.

    The checkpoint holds the trained weights in float32 and the statistics are reset before they are re-estimated, so
    this gives the same file as training the net again from its seed.
    """
    net = load_checkpoint(out / entry["file"])[0].eval()
    return finish_unit(key, net, load_recipe_data(key), entry, out)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold ``out``'s manifest lock: workers read, merge and write the manifest one at a time."""
    with open(out / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_manifest(out: Path) -> dict[str, dict[str, Any]]:
    path = out / MANIFEST
    entries = json.loads(path.read_text()).get("checkpoints", []) if path.exists() else []
    return {e["name"]: e for e in entries}


def is_trained(entry: dict[str, Any] | None, key: str, out: Path) -> bool:
    """Whether a manifest entry was trained by the current recipe and its weights are on disk unchanged."""
    if entry is None or entry.get("recipe") != key:
        return False
    if RECIPES[key]["train"].device == "auto" and entry.get("fingerprint") != fingerprint(key):
        return False  # the zoo recipes carry fingerprints; older entries are matched by name and sha
    weights = out / entry["file"]
    return weights.is_file() and file_sha256(weights) == entry.get("sha256")


def needs_recalibration(entry: dict[str, Any], key: str) -> bool:
    """A trained net whose norms' statistics the recipe re-estimates, stored before they were."""
    return bool(RECIPES[key].get("precise_bn")) and not entry.get("precise_bn")


def work_left(entry: dict[str, Any] | None, key: str, out: Path) -> str:
    """What a net still needs: ``"train"``, ``"recalibrate"`` (trained, norms' statistics not yet re-estimated) or
    ``"done"`` (the current recipe's net, finished, its weights on disk unchanged)."""
    if not is_trained(entry, key, out):
        return "train"
    return "recalibrate" if needs_recalibration(entry, key) else "done"


def is_done(entry: dict[str, Any] | None, key: str, out: Path) -> bool:
    """Whether a manifest entry stands for the current recipe, finished, with its weights on disk unchanged."""
    return work_left(entry, key, out) == "done"


def write_manifest(out: Path, new: list[dict[str, Any]]) -> Path:
    """Merge ``new`` entries into ``manifest.json`` (under the lock), keeping the other current nets."""
    path = out / MANIFEST
    with _locked(out):
        current = {n for r in RECIPES.values() for n in r["names"].values()}
        merged = {n: e for n, e in read_manifest(out).items() if n in current}
        merged.update({e["name"]: e for e in new})
        manifest = {
            "format": "resviz-pretrained", "version": 2, "command": "python pretrained/make_pretrained.py",
            "generated": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
            "checkpoints": sorted(merged.values(), key=lambda e: e["name"]),
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
    return path


def store_studies(out: Path, names: list[str]) -> None:
    """Run each study on the zoo (``budget="zoo"``, seed 0) and store its result beside the checkpoints."""
    import os

    from resviz.experiments import STUDIES
    from resviz.experiments.runner import run_study
    from resviz.experiments.stored import store

    os.environ["RESVIZ_PRETRAINED"] = str(out.resolve())  # the studies load the zoo from this folder
    for name in names or list(STUDIES):
        t0 = time.perf_counter()
        result = run_study(name, "zoo", 0, save_figures=False)
        path = store(result, out)
        held = sum(c["holds"] for c in result["checks"])
        print(f"{name}: {held}/{len(result['checks'])} checks hold, {time.perf_counter() - t0:.0f} s -> {path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: pretrained/)")
    parser.add_argument("--only", choices=sorted(RECIPES), action="append", help="train only these recipes")
    parser.add_argument("--worker", default="0/1", help="I/N: train every N-th pending net from the I-th (default 0/1)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--force", action="store_true", help="retrain nets that are already done")
    parser.add_argument("--list", action="store_true", help="show which nets are done and stop")
    parser.add_argument("--studies", nargs="*", metavar="STUDY",
                        help="instead of training: run these studies (all when none is named) on the zoo's nets and store "
                             "their results in <out>/studies/, where the app opens them")
    args = parser.parse_args(argv)
    index, count = (int(v) for v in args.worker.split("/"))
    runtime.tune(threads=args.threads, keep_freed_memory=True, cudnn_benchmark=True)  # this script's process settings
    args.out.mkdir(parents=True, exist_ok=True)
    if args.studies is not None:
        store_studies(args.out, args.studies)
        return
    done = read_manifest(args.out)
    todo = [(k, kind) for k, kind in units() if not args.only or k in args.only]
    left = {(k, kind): "train" if args.force else work_left(done.get(RECIPES[k]["names"][kind]), k, args.out)
            for k, kind in todo}
    pending = [unit for unit in todo if left[unit] != "done"]
    if args.list:
        for k, kind in todo:
            name = RECIPES[k]["names"][kind]
            state = {"recalibrate": "trained; norms' statistics to re-estimate", "train": "pending"}.get(
                left[(k, kind)]) or f"done, test accuracy {done[name]['test_acc']:.4f}"
            print(f"{name:20s} {state}")
        return
    t0 = time.perf_counter()
    failed = []
    for k, kind in pending[index::count]:
        name = RECIPES[k]["names"][kind]
        try:
            entry = (recalibrate_unit(k, done[name], args.out) if left[(k, kind)] == "recalibrate"
                     else train_unit(k, kind, args.out))
        except (RuntimeError, ValueError) as err:  # a diverged run, missing data: the other nets still train
            print(f"{name}: {err}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        write_manifest(args.out, [entry])  # written per net: an interruption loses one net at most
    print(f"worker {args.worker}: {len(pending[index::count])} nets in {time.perf_counter() - t0:.0f} s; "
          f"manifest {args.out / MANIFEST}")
    if failed:
        sys.exit(f"not trained: {', '.join(failed)}")


if __name__ == "__main__":
    main()
