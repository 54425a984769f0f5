"""Shipped checkpoints: listed in the manifest, intact, loadable, and as accurate as the manifest says."""

import json
import sys
from functools import cache
from pathlib import Path

import pytest
import torch

from resviz import BlockConfig, NetConfig, TrainConfig
from resviz.data.datasets import available_datasets, load_dataset
from resviz.experiments.common import ZOO as STUDY_ZOO  # the studies load the zoo with these data settings
from resviz.storage.checkpoints import file_sha256, load_checkpoint
from resviz.train.trainer import build_nets, evaluate, fit

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
        if res["config"]["depth"] >= 32:  # deep enough for the degradation problem: the residual net clearly wins
            assert res["test_acc"] > plain["test_acc"] + 0.05, res["name"]
    for e in ENTRIES:
        assert (HERE / e["file"]).stat().st_size < 8 * 2**20, e["name"]  # ResNet-110 at width 16: 6.9 MB in float32
        assert {"name", "seed", "train_size", "test_size", "input_size"} <= set(e["dataset"])
        assert e["train_time_s"] > 0 and e["torch"] and 0 < e["test_acc"] <= 1


def _needs_data(entry):
    name = entry["dataset"]["name"]
    if name not in ("shapes", "digits") and available_datasets()[name] is not True:
        pytest.skip(f"{name} is not installed here (`apt-get install dataset-fashion-mnist`, or see the README)")


ZOO = {e["name"]: e for e in ENTRIES if e.get("fingerprint")}  # the study zoo's nets (make_pretrained's zoo recipes)


def test_the_study_zoo_is_shipped_converged_with_full_logs():
    for depth in (20, 56, 110):
        res, plain = ZOO[f"shapes_resnet{depth}"], ZOO[f"shapes_plain{depth}"]
        assert res["config"]["depth"] == depth and res["config"]["width"] == 16
        assert res["dataset"]["input_size"] == STUDY_ZOO["input_size"]
        assert res["test_acc"] >= 0.97, (depth, res["test_acc"])  # every zoo ResNet converged
        assert res["train"] == plain["train"] and res["dataset"] == plain["dataset"]  # same recipe, same data
        assert res["precise_bn"] and plain["precise_bn"]  # norms' statistics re-estimated after training
    fmnist = ZOO["fmnist_resnet20"]
    assert fmnist["dataset"]["name"] == "fashion-mnist" and fmnist["dataset"]["train_size"] == 60000
    assert fmnist["test_acc"] >= 0.92 and ZOO["fmnist_plain20"]["twin"] == "fmnist_resnet20"
    for e in ZOO.values():
        log = e["log"]
        n = len(log["epoch"])
        assert e["trained_on"] in ("cpu", "cuda") and e["train_time_s"] > 0
        if e.get("status", "finished") != "finished":  # only where the recipe takes divergence for a result
            assert e["status"] == "diverged" and e["config"]["block"]["norm"] == "none", e["name"]
            assert "diverged at step" in e["message"] and n < 2 * e["train"]["epochs"]
            continue
        assert n >= 2 * e["train"]["epochs"] and all(len(v) == n for v in log.values()), e["name"]  # 2+ per epoch
        assert log["epoch"][-1] == pytest.approx(e["train"]["epochs"], abs=0.01)
        assert 1 - log["test_error"][-1] == pytest.approx(e["test_acc"], abs=TOLERANCE)  # the log ends where the net did
    # the degradation problem, read from the logs: deeper plain nets train worse
    plain_err = [ZOO[f"shapes_plain{d}"]["log"]["train_error"][-1] for d in (20, 56, 110)]
    assert plain_err[0] < plain_err[1] < plain_err[2], plain_err


def test_twins_trained_apart_equal_twins_trained_in_lockstep():
    """make_pretrained trains a pair's nets as separate runs: same seed, same init, same batches and augmentation."""
    sys.path.insert(0, str(HERE))
    import make_pretrained

    net = NetConfig(depth=8, width=4, num_classes=8, input_size=16, block=BlockConfig())
    cfg = TrainConfig(epochs=1, batch_size=32, seed=5, device="cpu", probe_every=0, augment=True, max_steps=4)
    data = load_dataset("shapes", train_size=128, test_size=32, input_size=16, seed=2)
    both = fit(build_nets(net, twin=True, seed=5), data, cfg)
    for kind in ("residual", "plain"):
        alone = fit({kind: build_nets(net, twin=True, seed=5)[kind]}, data, cfg)
        a, b = both.nets[kind].state_dict(), alone.nets[kind].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), kind
        log = make_pretrained.training_log(alone.history, kind)
        assert log["epoch"] == [pytest.approx(alone.history[-1].epoch, abs=1e-3)] and len(log["train_loss"]) == 1


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_checkpoint_is_intact_and_reaches_its_accuracy(entry):
    _needs_data(entry)
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


def test_a_stored_net_is_recalibrated_without_retraining_as_if_trained_with_precise_bn(tmp_path, monkeypatch):
    """A net trained before its recipe asked for precise BN: re-estimating its norms' statistics from the stored
    checkpoint gives the weights and statistics that training again with the step would."""
    sys.path.insert(0, str(HERE))
    import make_pretrained as mp

    recipe = {
        "dataset": {"name": "shapes", "seed": 2, "train_size": 96, "test_size": 32, "input_size": 16},
        "net": NetConfig(depth=8, width=4, num_classes=8, input_size=16, block=BlockConfig()),
        "train": TrainConfig(epochs=1, batch_size=32, seed=5, device="cpu", probe_every=0, augment=True),
        "twin": True, "names": {"residual": "tiny_resnet8", "plain": "tiny_plain8"},
        "descriptions": {"residual": "tiny", "plain": "tiny plain"},
    }
    monkeypatch.setattr(mp, "RECIPES", {"tiny": recipe})
    old = mp.train_unit("tiny", "residual", tmp_path)
    assert not old["precise_bn"] and mp.is_done(old, "tiny", tmp_path)
    mp.write_manifest(tmp_path, [old])
    before = load_checkpoint(tmp_path / old["file"])[0].state_dict()
    monkeypatch.setitem(recipe, "precise_bn", True)
    assert mp.is_trained(old, "tiny", tmp_path) and mp.needs_recalibration(old, "tiny")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # main() sets it
    threads = str(torch.get_num_threads())  # as they are: main() sets them for the process
    mp.main(["--out", str(tmp_path), "--only", "tiny", "--threads", threads])  # recalibrates one net, trains the other
    done = mp.read_manifest(tmp_path)
    new = done["tiny_resnet8"]
    assert new["precise_bn"] and mp.is_done(new, "tiny", tmp_path) and mp.is_done(done["tiny_plain8"], "tiny", tmp_path)
    assert new["log"] == old["log"] and new["train_time_s"] == old["train_time_s"]  # not trained again
    after = load_checkpoint(tmp_path / new["file"])[0].state_dict()
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    fresh = load_checkpoint(fresh_dir / mp.train_unit("tiny", "residual", fresh_dir)["file"])[0].state_dict()
    stats = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert stats and any(not torch.equal(after[k], before[k]) for k in stats)  # the statistics were re-estimated
    for k in after:  # the weights as trained; the statistics as a fresh run with precise BN gives them
        if k in stats or k.endswith("num_batches_tracked"):
            torch.testing.assert_close(after[k], fresh[k], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(after[k], before[k]) and torch.equal(after[k], fresh[k]), k
