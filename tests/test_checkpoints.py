"""Checkpoints: round trips, atomic saves, key/shape checks, refusal of pickled code, damaged files."""

import json
import os
import pickle
import stat

import pytest
import torch

from resviz import NetConfig, build_net
from resviz.storage import checkpoints as ck
from resviz.storage.checkpoints import CheckpointError, load_checkpoint, load_checkpoint_bytes, load_weights, save_checkpoint

CFG = NetConfig(depth=8, width=8, input_size=16, num_classes=4)


def _net(seed: int = 0, cfg: NetConfig = CFG):
    torch.manual_seed(seed)
    return build_net(cfg).eval()


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_rebuilds_same_function(tmp_path):
    net = _net().to(memory_format=torch.channels_last)  # non-contiguous weights must save fine
    net.set_skips([True, False, True])
    path = save_checkpoint(net, tmp_path / "m", dataset={"name": "shapes", "seed": 0}, metrics={"test_acc": 0.5})
    assert path.name == "m.safetensors" and (tmp_path / "m.json").exists()
    back, meta = load_checkpoint(tmp_path / "m.json")
    assert _same(net, back) and back.skips == (True, False, True) and not back.training
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net(x), back(x))  # memory formats differ: equal up to rounding
    assert meta["dataset"]["name"] == "shapes" and meta["metrics"]["test_acc"] == 0.5
    assert meta["sha256"] == ck.file_sha256(path) and meta["versions"]["torch"] == torch.__version__
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o644}  # not mkstemp's private 0600
    os.chmod(path, 0o640)
    save_checkpoint(net, tmp_path / "m")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # an overwrite keeps the file's mode


def test_lone_safetensors_upload_rebuilds_from_embedded_metadata(tmp_path):
    net = _net(1)
    path = save_checkpoint(net, tmp_path / "m.safetensors")
    back, meta = load_checkpoint_bytes(path.read_bytes(), filename="m.safetensors")
    assert _same(net, back) and meta["net"] == CFG.to_dict()
    back2, _ = load_checkpoint_bytes(path.read_bytes(), (tmp_path / "m.json").read_bytes())
    assert _same(net, back2)


def test_sidecar_hash_mismatch_is_refused(tmp_path):
    save_checkpoint(_net(0), tmp_path / "a")
    save_checkpoint(_net(1), tmp_path / "b")
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint_bytes((tmp_path / "a.safetensors").read_bytes(), (tmp_path / "b.json").read_bytes())


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old = _net(0)
    save_checkpoint(old, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_write(fh, data):
        fh.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(ck, "_write_all", broken_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_net(1), tmp_path / "m")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no temp files, both files unchanged
    assert _same(old, load_checkpoint(tmp_path / "m.safetensors")[0])


def test_failure_writing_sidecar_leaves_no_temp_weights(tmp_path, monkeypatch):
    save_checkpoint(_net(0), tmp_path / "m")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = []

    def second_fails(fh, data):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("interrupted")
        fh.write(data)

    monkeypatch.setattr(ck, "_write_all", second_fails)
    with pytest.raises(OSError):
        save_checkpoint(_net(1), tmp_path / "m")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_load_weights_lists_every_mismatch_and_leaves_model_untouched(tmp_path):
    net = _net(0)
    original = {k: v.clone() for k, v in net.state_dict().items()}
    other = _net(1, NetConfig(depth=8, width=8, input_size=16, num_classes=5)).state_dict()
    other.pop("stem.norm.bias")
    other["extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        load_weights(net, other)
    msg = str(err.value)
    assert "1 missing: stem.norm.bias" in msg and "1 unexpected: extra.weight" in msg
    assert "2 shape mismatch: fc.bias (checkpoint (5,), model (4,)), fc.weight (checkpoint (5, 32), model (4, 32))" in msg
    assert all(torch.equal(original[k], v) for k, v in net.state_dict().items())


def test_pt_state_dict_loads_with_sidecar_or_cfg(tmp_path):
    net = _net(2)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="carries no net config"):
        load_checkpoint(tmp_path / "w.pt")
    back, _ = load_checkpoint(tmp_path / "w.pt", cfg=CFG)
    assert _same(net, back)
    torch.save({"epoch": 3, "state_dict": net.state_dict()}, tmp_path / "t.pth")
    assert _same(net, load_checkpoint_bytes((tmp_path / "t.pth").read_bytes(), filename="t.pth", cfg=CFG)[0])


class _Payload:
    def __init__(self, canary: str) -> None:
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_code_running_pickle_is_refused_and_never_runs(tmp_path, zipped):
    canary = tmp_path / "canary"
    bad = tmp_path / "evil.pt"
    if zipped:
        torch.save({"w": torch.zeros(1), "x": _Payload(str(canary))}, bad)
    else:
        bad.write_bytes(pickle.dumps({"x": _Payload(str(canary))}, protocol=2))
    with pytest.raises(CheckpointError, match="refused evil.pt: it pickles Python objects .*system"):
        load_checkpoint(bad, cfg=CFG)
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(_net(), bad)
    assert not canary.exists()


def test_whole_model_pickle_is_refused(tmp_path):
    torch.save(_net(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"refused model.pt.*ResNet.*state_dict\(\)"):
        load_checkpoint(tmp_path / "model.pt", cfg=CFG)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_safetensors_gives_clean_error(tmp_path, damage):
    path = save_checkpoint(_net(), tmp_path / "m")
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage])
    (tmp_path / "m.json").unlink()  # without the sidecar the damage must be caught by the decoder itself
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(path)


def test_damaged_weights_with_sidecar_fail_hash_check(tmp_path):
    path = save_checkpoint(_net(), tmp_path / "m")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


@pytest.mark.parametrize("text", ['{"net": ', "[1, 2]", '{"net": {"depth": 21}}', '{"net": {"colour": 1}}', "[" * 100000])
def test_bad_sidecar_gives_clean_error(tmp_path, text):
    path = save_checkpoint(_net(), tmp_path / "m")
    meta = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "m.json").write_text(text)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert meta["net"]["depth"] == 8


def test_missing_file_and_non_resviz_net(tmp_path):
    with pytest.raises(CheckpointError, match="no weights file"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="only ResViz nets"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "lin")


def test_format_is_detected_by_content_not_by_name(tmp_path):
    import safetensors.torch

    state = _net().state_dict()
    # a safetensors header whose length starts with byte 0x80, like a pickle's first byte
    blob = next(b for k in range(400) if (b := safetensors.torch.save(state, metadata={"pad": "x" * k}))[0] == 0x80)
    back = ck.read_state_dict(blob, "weights.pt")
    assert back.keys() == state.keys()
    torch.save(state, tmp_path / "w.pt")
    assert ck.read_state_dict((tmp_path / "w.pt").read_bytes(), "renamed.safetensors").keys() == state.keys()
