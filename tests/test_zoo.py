"""Model sources for the Inspect page: manifests, uploads, torchvision weights from the hub cache, preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from resviz import NetConfig, build_net, zoo
from resviz.data.datasets import DatasetUnavailable
from resviz.data.images import sample_image
from resviz.data.preprocess import Normalization
from resviz.storage.checkpoints import CheckpointError, save_checkpoint

DS_INFO = {"name": "shapes", "classes": ["a", "b", "c"], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "channels": 3,
           "input_size": 16}


@pytest.fixture
def tiny(tmp_path):
    net = build_net(NetConfig(depth=8, width=4, num_classes=3, input_size=16)).eval()
    path = save_checkpoint(net, tmp_path / "tiny", dataset=DS_INFO, metrics={"test_acc": 0.875})
    return net, path


def test_shipped_manifest(tmp_path, tiny):
    _, path = tiny
    assert zoo.shipped_models(tmp_path) == []  # no manifest: nothing shipped
    manifest = {"checkpoints": [{"name": "Tiny", "file": path.name, "dataset": {"name": "shapes", "seed": 0}, "test_acc": 0.9,
                                 "kind": "residual"},
                                {"name": "gone", "file": "missing.safetensors"},
                                {"name": "outside", "file": "../tiny.safetensors"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (entry,) = zoo.shipped_models(tmp_path)
    assert (entry.name, entry.dataset, entry.accuracy, entry.path, entry.kind) == ("Tiny", "shapes", 0.9, path, "residual")
    net, info = zoo.load_shipped(entry)
    assert not net.training and info.classes == ("a", "b", "c") and info.accuracy == 0.875
    assert info.dataset == "shapes" and info.mean == (0.5, 0.4, 0.3) and info.input_size == 16
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest"):
        zoo.shipped_models(tmp_path)


def test_the_first_net_offered_is_the_most_accurate_residual_net_on_the_data_then_the_smallest(tmp_path):
    def shipped(name: str, acc: float | None, kind: str = "residual", dataset: str = "shapes", size: int = 10):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(b"x" * size)
        return zoo.ShippedModel(name=name, path=path, dataset=dataset, accuracy=acc, kind=kind)

    models = [shipped("digits", 1.0, dataset="digits"), shipped("plain", 1.0, kind="plain", size=1),
              shipped("untrained", 0.125, size=5), shipped("big", 0.998, size=30), shipped("small", 1.0, size=20)]
    assert models[zoo.first_choice(models, "shapes")].name == "small"  # 99.8% and 100% tie to the point: the smaller
    assert models[zoo.first_choice(models[:4], "shapes")].name == "big"  # never the net that barely trained
    assert zoo.first_choice(models, "cifar") == 0  # nothing on that data: the first


def test_upload_round_trip_and_errors(tiny):
    net, path = tiny
    side = path.with_suffix(".json")
    loaded, info = zoo.load_upload([(path.name, path.read_bytes()), (side.name, side.read_bytes())])
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    assert info.source == "upload" and info.name == "tiny" and info.accuracy == 0.875
    alone, info2 = zoo.load_upload([(path.name, path.read_bytes())])  # config embedded in the header
    assert info2.classes == ("a", "b", "c")
    with pytest.raises(CheckpointError, match="exactly one weights file"):
        zoo.load_upload([(side.name, side.read_bytes())])
    with pytest.raises(CheckpointError, match="unsupported"):
        zoo.load_upload([("model.onnx", b"x")])
    with pytest.raises(CheckpointError):
        zoo.load_upload([("junk.safetensors", b"\x00" * 20)])


def test_pt_state_dict_without_dataset_info(tmp_path):
    net = build_net(NetConfig(depth=8, width=4, num_classes=5, input_size=16))
    buf = tmp_path / "w.pt"
    torch.save(net.state_dict(), buf)
    meta = json.dumps({"net": net.cfg.to_dict()}).encode()
    _, info = zoo.load_upload([("w.pt", buf.read_bytes()), ("w.json", meta)])
    assert info.classes == tuple(f"class {i}" for i in range(5)) and info.mean == (0.5,) * 3 and info.dataset == "unknown"


def test_info_from_trained_dict():
    d = {**DS_INFO, "dataset": "shapes", "final": {"nets": {"plain": {"test_acc": 0.4}, "residual": {"test_acc": 0.7}}},
         "role": "plain"}
    info = zoo.info_from_dict(d, name="run", source="trained")
    assert info.accuracy == 0.4 and info.dataset == "shapes"
    with pytest.raises(ValueError, match="lacks mean"):
        zoo.info_from_dict({"classes": [1], "std": [1], "channels": 1, "input_size": 8}, name="x", source="trained")


def test_torchvision_missing_weights_message(tmp_path):
    assert zoo.find_torchvision_weights("resnet50", tmp_path) is None
    with pytest.raises(zoo.ModelUnavailableError) as e:
        zoo.load_torchvision("resnet50", tmp_path)
    assert "resnet50(weights=ResNet50_Weights.IMAGENET1K_V2)" in str(e.value) and str(tmp_path) in str(e.value)


def test_torchvision_from_hub_cache(tmp_path):
    from torchvision.models import resnet18

    tv = resnet18().eval()
    path = zoo.weights_file("resnet18", "IMAGENET1K_V1", tmp_path)
    path.parent.mkdir(parents=True)
    torch.save(tv.state_dict(), path)
    net, info = zoo.load_torchvision("resnet18", tmp_path)
    assert info.classes[0] == "tench" and len(info.classes) == 1000 and info.input_size == 224 and info.resize_size == 256
    assert info.accuracy == pytest.approx(0.69758)
    x = zoo.prepare_image(sample_image("star", 300), info)
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(net(x), tv(x), rtol=1e-4, atol=1e-4)
    path.write_bytes(b"damaged")
    with pytest.raises(zoo.ModelUnavailableError, match="could not be read"):
        zoo.load_torchvision("resnet18", tmp_path)


def test_prepare_image_and_picture_round_trip():
    info = zoo.ModelInfo(name="m", source="t", dataset="shapes", classes=("a",),
                         norm=Normalization((0.5, 0.4, 0.3), (0.2, 0.3, 0.4)), channels=3, input_size=32)
    img = sample_image("circle", 32)
    x = zoo.prepare_image(img, info)
    assert x.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(zoo.as_picture(x, info), np.asarray(img, np.float32) / 255, atol=1e-5)


def test_dataset_samples_follow_the_recorded_recipe():
    from resviz.data.datasets import load_dataset

    ref = load_dataset("shapes", input_size=16, train_size=16, test_size=40, seed=3)
    info = zoo.info_from_dict({**ref.info(), "seed": 3, "test_size": 40}, name="m", source="pretrained")
    xs, ys = zoo.dataset_samples(info).tensors
    assert len(ys) == 40 and torch.equal(ys, ref.test.tensors[1])
    torch.testing.assert_close(xs, ref.test.tensors[0], rtol=1e-4, atol=1e-4)


def test_dataset_samples_match_the_model_normalisation():
    info = zoo.ModelInfo(name="m", source="t", dataset="shapes", classes=("a",) * 8, norm=Normalization((0.5,) * 3, (0.25,) * 3),
                         channels=3, input_size=16)
    xs, ys = zoo.dataset_samples(info, count=12).tensors
    assert xs.shape == (12, 3, 16, 16) and ys.shape == (12,)
    pic = zoo.as_picture(xs[0], info)
    assert pic.min() >= 0 and pic.max() <= 1 and pic.std() > 0.05
    with pytest.raises(DatasetUnavailable):
        zoo.dataset_samples(zoo.ModelInfo(**{**info.__dict__, "dataset": "imagenet"}))
