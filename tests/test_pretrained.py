"""Shipped checkpoints: listed in the manifest, intact, loadable, and as accurate as the manifest says."""

import json
from functools import cache
from pathlib import Path

import pytest

from resviz import NetConfig
from resviz.data.datasets import load_dataset
from resviz.storage.checkpoints import file_sha256, load_checkpoint
from resviz.train.trainer import evaluate

HERE = Path(__file__).resolve().parents[1] / "pretrained"
MANIFEST = json.loads((HERE / "manifest.json").read_text()) if (HERE / "manifest.json").exists() else {"checkpoints": []}
ENTRIES = MANIFEST["checkpoints"]
TOLERANCE = 0.005  # 0.5 percentage points; evaluation is deterministic, so this only absorbs CPU rounding


@cache
def _bundle(name: str, seed: int, train_size: int, test_size: int, input_size: int):
    return load_dataset(name, seed=seed, train_size=train_size, test_size=test_size, input_size=input_size)


def test_manifest_lists_the_promised_checkpoints():
    by_name = {e["name"]: e for e in ENTRIES}
    pairs = [(e, by_name[e["twin"]]) for e in ENTRIES if e["kind"] == "residual" and e.get("twin")]
    assert any(res["dataset"]["name"] == "shapes" for res, _ in pairs)
    assert any(e["dataset"]["name"] == "digits" and e["kind"] == "residual" for e in ENTRIES)
    for res, plain in pairs:
        assert plain["kind"] == "plain" and plain["twin"] == res["name"]
        assert NetConfig.from_dict(plain["config"]) == NetConfig.from_dict(res["config"]).plain_twin()
        assert res["test_acc"] > plain["test_acc"] + 0.05  # the residual net clearly wins
    for e in ENTRIES:
        assert (HERE / e["file"]).stat().st_size < 2 * 2**20, e["name"]
        assert {"name", "seed", "train_size", "test_size", "input_size"} <= set(e["dataset"])
        assert e["train_time_s"] > 0 and e["torch"] and 0 < e["test_acc"] <= 1


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_checkpoint_is_intact_and_reaches_its_accuracy(entry):
    path = HERE / entry["file"]
    assert file_sha256(path) == entry["sha256"]
    net, meta = load_checkpoint(path)
    assert meta["sha256"] == entry["sha256"] and net.cfg == NetConfig.from_dict(entry["config"])
    d = entry["dataset"]
    bundle = _bundle(d["name"], d["seed"], d["train_size"], d["test_size"], d["input_size"])
    assert list(bundle.mean) == pytest.approx(d["mean"], abs=1e-6)  # the same data as at training time
    assert len(bundle.test) == d["test_size"] and bundle.classes == d["classes"]
    _, acc = evaluate(net, bundle.test, batch_size=500)
    assert acc == pytest.approx(entry["test_acc"], abs=TOLERANCE)
