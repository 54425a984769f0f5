"""Studies on a zoo: the zoo budget loads shipped nets (never trains), reads their logs, and checks the papers' effect sizes.

A tiny zoo (ResNet/plain 8 and 14, width 4, 16 px) is built here by ``pretrained/make_pretrained.py`` itself,
so the path the real zoo takes (train per net, manifest with logs, studies on the zoo, stored results) runs
end to end in seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from resviz import BlockConfig, NetConfig, TrainConfig
from resviz.data.datasets import load_dataset
from resviz.experiments import degradation, landscape, lesion, responses, stored
from resviz.experiments.runner import run_study
from resviz.storage.checkpoints import load_checkpoint
from resviz.train.trainer import evaluate

ROOT = Path(__file__).resolve().parents[1]
TINY = {"width": 4, "input_size": 16, "train_size": 512, "test_size": 128}


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(ROOT / "pretrained"))
    import make_pretrained as mp

    out = tmp_path_factory.mktemp("zoo")
    saved = dict(mp.RECIPES)
    try:
        mp.RECIPES.clear()

        def tiny(r: dict, depth: int, block: BlockConfig) -> dict:
            r["dataset"] = {"name": "shapes", "seed": 1, "train_size": TINY["train_size"], "test_size": TINY["test_size"],
                            "input_size": 16}
            r["net"] = NetConfig(depth=depth, width=4, num_classes=8, input_size=16, block=block)
            r["train"] = TrainConfig(epochs=2, batch_size=64, lr=0.1, seed=depth, device="auto", probe_every=0,
                                     eval_every=4, augment=True)
            return r

        for depth in (8, 14):
            mp.RECIPES[f"tiny{depth}"] = tiny(mp._zoo_recipe(depth), depth, BlockConfig())
        for key, (name, block) in mp.SIGNAL_VARIANTS.items():  # the signal study's blocks at depth 8 (post, BN: tiny8's)
            if key != "signal_post_bn":
                mp.RECIPES[f"tiny_{key}"] = tiny(mp._signal_recipe(tiny_name(name), block), 8, BlockConfig(**block))
        threads = ["--threads", str(torch.get_num_threads())]  # as they are: main() sets them for the whole process
        mp.main(["--out", str(out), *threads])
        mp.main(["--out", str(out), *threads])  # resumable: a second run finds every net done and trains nothing
    finally:
        mp.RECIPES.clear()
        mp.RECIPES.update(saved)
    return out


@pytest.fixture
def zoo_env(tiny_zoo: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RESVIZ_PRETRAINED", str(tiny_zoo))
    return tiny_zoo


def tiny_name(name: str) -> str:
    return name.replace("32", "8")


def tiny_signal_nets() -> list[str]:
    """The tiny zoo's signal-propagation nets but the post-BN one (the tiny ResNet-8), in the study's order."""
    sys.path.insert(0, str(ROOT / "pretrained"))
    import make_pretrained as mp

    return [tiny_name(name) for key, (name, _) in mp.SIGNAL_VARIANTS.items() if key != "signal_post_bn"]


def test_make_pretrained_writes_each_net_once_with_its_log(tiny_zoo: Path) -> None:
    import json

    entries = {e["name"]: e for e in json.loads((tiny_zoo / "manifest.json").read_text())["checkpoints"]}
    assert set(entries) == {"shapes_resnet8", "shapes_plain8", "shapes_resnet14", "shapes_plain14", *tiny_signal_nets()}
    for e in entries.values():
        log = e["log"]
        assert len(log["epoch"]) == 4 and log["epoch"][-1] == pytest.approx(2.0)  # 8 steps, an evaluation every 4... and at the end
        # the zoo recipe re-estimates the norms' statistics after training (precise BN): the log's last evaluation is
        # the net with training's statistics, the manifest's accuracy the recalibrated net's (on these 8-step nets
        # they differ; on the converged zoo within half a point, as test_pretrained checks)
        assert e["precise_bn"] and 0 <= log["test_error"][-1] <= 1
        d = e["dataset"]
        test = load_dataset("shapes", seed=d["seed"], train_size=d["train_size"], test_size=d["test_size"],
                            input_size=d["input_size"]).test
        assert evaluate(load_checkpoint(tiny_zoo / e["file"])[0], test, batch_size=500)[1] == pytest.approx(e["test_acc"])


def test_a_net_whose_recipe_takes_divergence_for_a_result_is_shipped_diverged_and_others_are_not(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "pretrained"))
    import make_pretrained as mp

    saved = dict(mp.RECIPES)
    try:
        mp.RECIPES.clear()
        for key, (name, block) in mp.SIGNAL_VARIANTS.items():
            if key in ("signal_pre_nonorm", "signal_post_nonorm"):
                r = mp._signal_recipe(tiny_name(name), block, depth=8)
                r["dataset"] = {"name": "shapes", "seed": 1, "train_size": 256, "test_size": 64, "input_size": 16}
                r["net"] = NetConfig(depth=8, width=4, num_classes=8, input_size=16, block=BlockConfig(**block))
                r["train"] = TrainConfig(epochs=2, batch_size=64, lr=1e4, seed=8, device="auto", probe_every=0,
                                         eval_every=4)  # far too high a learning rate: both diverge at once
                mp.RECIPES[key] = r
        assert mp.RECIPES["signal_pre_nonorm"]["divergence_is_a_result"]
        mp.RECIPES["signal_post_nonorm"]["divergence_is_a_result"] = False  # as for every other recipe
        threads = ["--threads", str(torch.get_num_threads())]
        with pytest.raises(SystemExit, match="not trained: shapes_signal8_post_nonorm"):
            mp.main(["--out", str(tmp_path), *threads])
        (entry,) = json.loads((tmp_path / "manifest.json").read_text())["checkpoints"]
        assert entry["name"] == "shapes_signal8_pre_nonorm" and entry["status"] == "diverged"
        assert "diverged at step" in entry["message"] and "shipped as it stood before that step" in entry["description"]
        net = load_checkpoint(tmp_path / entry["file"])[0]
        assert all(torch.isfinite(p).all() for p in net.parameters())  # the weights from before the failing step
        assert mp.work_left(entry, "signal_pre_nonorm", tmp_path) == "done"  # its recipe's result: not trained again
    finally:
        mp.RECIPES.clear()
        mp.RECIPES.update(saved)


def test_degradation_on_the_zoo_reads_the_logs_and_checks_the_effect_sizes(zoo_env: Path) -> None:
    result = run_study("degradation", "zoo", overrides={**TINY, "depths": (8, 14)}, save_figures=False)
    assert result["source"].startswith("pretrained") and result["test_curves"] and result["curve_x"] == "epoch"
    rows = sorted(result["rows"], key=lambda r: r["depth"])
    effects = {c["claim"]: c["holds"] for c in result["effects"]}
    plain_rises = rows[1]["plain_train_err"] > rows[0]["plain_train_err"]
    assert effects[next(k for k in effects if k.startswith("plain training error grows"))] == plain_rises
    assert all(c in result["checks"] for c in result["effects"])  # the zoo budget checks the effect sizes too
    assert set(degradation.figures(result)) == {"error_by_depth", "training_curves", "test_curves"}


def test_lesion_and_responses_on_the_zoo_use_the_shipped_nets(zoo_env: Path) -> None:
    res = run_study("lesion", "zoo", overrides={**TINY, "depth": 14, "plain_depth": None, "draws": 2, "max_swaps": 2},
                    save_figures=False)
    assert res["source"] == "pretrained: shapes_resnet14, shapes_plain14"
    assert res["shipped"] == ["shapes_resnet14", "shapes_plain14"]  # what the stored result's sha256s are taken of
    inner = [r for r in res["rows"] if not r["downsampling"]]
    mean_cost = np.mean([res["intact"]["residual"] - r["residual_acc"] for r in inner])
    assert res["effects"][0]["holds"] == (mean_cost <= lesion.SINGLE_COST)
    with_ref = run_study("lesion", "zoo", overrides={**TINY, "depth": 14, "plain_depth": 8, "draws": 2, "max_swaps": 2},
                         save_figures=False)
    ref = with_ref["plain_reference"]
    assert ref["depth"] == 8 and len(ref["single"]) == 3 and with_ref["rows"] == res["rows"]  # the twins' rows as before
    assert "plain-8 keeps" in with_ref["effects"][-1]["detail"]
    assert with_ref["shipped"] == ["shapes_resnet14", "shapes_plain14", "shapes_plain8"]  # only the reference's plain net
    assert ref["one_swap"] is None  # one block per stage: nothing to swap, so the swap check keeps the twin
    assert with_ref["checks"][3]["detail"] == res["checks"][3]["detail"]
    resp = run_study("responses", "zoo", overrides={**TINY, "depths": (8, 14)}, save_figures=False)
    by = {r["net"]: r["mean_branch_std"] for r in resp["rows"]}
    chain = [by["residual-14"], by["residual-8"], by["plain-8"]]
    assert resp["shipped"] == [f"shapes_{kind}{d}" for d in (8, 14) for kind in ("resnet", "plain")]
    assert resp["effects"][0]["holds"] == (chain[0] < chain[1] < chain[2])


def test_signal_on_the_zoo_reads_each_variants_shipped_net_and_its_initial_weights(zoo_env: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from resviz.experiments import signal
    from resviz.experiments.common import net_config
    from resviz.train.trainer import build_nets

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the zoo budget must not train")

    monkeypatch.setattr(signal, "train_one", no_training)
    res = run_study("signal", "zoo", overrides={**TINY, "depth": 8}, save_figures=False)
    names = ["shapes_resnet8", *tiny_signal_nets()]
    assert res["source"] == f"pretrained: {', '.join(names)}" and res["shipped"] == names
    assert [r["variant"] for r in res["rows"]] == list(signal.VARIANTS) and {r["status"] for r in res["rows"]} == {"pretrained"}
    entries = {e["name"]: e for e in json.loads((zoo_env / "manifest.json").read_text())["checkpoints"]}
    data = load_dataset("shapes", seed=1, train_size=TINY["train_size"], test_size=TINY["test_size"], input_size=16)
    x = data.test.tensors[0][:128]
    for (label, block), name, row in zip(signal.VARIANTS.items(), names, res["rows"], strict=True):
        e = entries[name]
        shipped = load_checkpoint(zoo_env / e["file"])[0]
        assert res["spp"][label]["trained"] == signal._stats(shipped, x)  # the shipped net's statistics
        init = build_nets(net_config(8, 4, 16, 8, **block), twin=False, seed=e["train"]["seed"])["residual"]
        assert res["spp"][label]["init"] == signal._stats(init, x)  # ... and those of the weights it started from
        assert row["test_acc"] == pytest.approx(e["test_acc"]) and row["final_loss"] == e["log"]["train_loss"][-1]
    with pytest.raises(ValueError, match="no shipped net is the 'pre, BN' variant of ResNet-14"):
        run_study("signal", "zoo", overrides={**TINY, "depth": 14}, save_figures=False)  # only the post-BN net at 14


def test_the_zoo_budget_never_trains(zoo_env: Path) -> None:
    with pytest.raises(ValueError, match="no shipped"):
        run_study("lesion", "zoo", overrides={**TINY, "depth": 20}, save_figures=False)  # no such net in this zoo


def test_landscape_effect_checks() -> None:
    bowl = [[x * x + y * y for x in range(-2, 3)] for y in range(-2, 3)]
    saddle = [[x * x - y * y for x in range(-2, 3)] for y in range(-2, 3)]
    rows = [{"nonconvexity": landscape.nonconvexity(bowl)}, {"nonconvexity": landscape.nonconvexity(saddle)}]
    held = [c["holds"] for c in landscape.effect_checks(rows, bowl)]
    assert held == [True, True]  # a convex bowl with its minimum at the centre vs a saddle
    shifted = [[(x - 1) ** 2 + y * y for x in range(-2, 3)] for y in range(-2, 3)]
    assert landscape.effect_checks(rows, shifted)[1]["holds"] is False


def test_responses_effect_check_orders_the_whole_chain() -> None:
    rows = [{"net": "residual-20", "depth": 20, "mean_branch_std": 0.5}, {"net": "plain-20", "depth": 20, "mean_branch_std": 0.9},
            {"net": "residual-56", "depth": 56, "mean_branch_std": 0.4}, {"net": "plain-56", "depth": 56, "mean_branch_std": 0.1}]
    assert responses.effect_checks(rows)[0]["holds"] is True
    rows[2]["mean_branch_std"] = 0.6
    assert responses.effect_checks(rows)[0]["holds"] is False


def test_stored_results_round_trip_and_only_zoo_results_are_stored(tmp_path: Path, zoo_env: Path) -> None:
    result = run_study("degradation", "zoo", overrides={**TINY, "depths": (8, 14)}, save_figures=False)
    path = stored.store(result, tmp_path)
    assert path == tmp_path / "studies" / "degradation.json"
    back = stored.load_stored("degradation", tmp_path)
    assert back["rows"] == result["rows"] and back["command"] == stored.command("degradation")
    twins = {f"shapes_{kind}{d}" for kind in ("resnet", "plain") for d in (8, 14)}
    manifest = {e["name"]: e["sha256"] for e in json.loads((zoo_env / "manifest.json").read_text())["checkpoints"]}
    assert back["nets"] == {n: manifest[n] for n in twins}  # the twins at depths 8 and 14, with their weights' sha256
    assert stored.load_stored("lesion", tmp_path) is None
    small = {**result, "config": {**result["config"], "budget": "small"}}
    with pytest.raises(ValueError, match="zoo"):
        stored.store(small, tmp_path)


def test_deletion_counts_step_by_one_then_spread_to_all_but_one_block() -> None:
    assert lesion.deletion_counts(9) == [1, 2, 3, 4, 5, 6, 7, 8]
    ks = lesion.deletion_counts(54)
    assert ks[:10] == list(range(1, 11)) and ks[-1] == 53 and ks == sorted(set(ks)) and len(ks) == 16


def test_lesion_swap_check_uses_the_trained_plain_reference() -> None:
    rows = [{"block": i, "stage": 0, "downsampling": i == 0, "residual_acc": 0.9, "plain_acc": 0.125} for i in range(4)]
    intact = {"residual": 0.95, "plain": 0.125}  # the plain twin never left chance
    curves = {"k": [1, 2, 3], "random": {"residual": [0.9, 0.7, 0.5]},
              "reorder": {"residual": [0.9], "plain": [0.125]}}
    reference = {"depth": 20, "intact": 0.97, "single": [0.3, 0.4, 0.2], "downsampling": [False, True, False],
                 "one_swap": 0.5}
    swap = {c["claim"]: c for c in lesion._checks(rows, intact, curves, 8, reference)}[
        "swapping two blocks hurts the residual net less than the plain net"]
    assert swap["holds"] and "(plain-20)" in swap["detail"] and "nothing to lose" not in swap["detail"]
    twin_only = {c["claim"]: c for c in lesion._checks(rows, intact, curves, 8)}[
        "swapping two blocks hurts the residual net less than the plain net"]
    assert not twin_only["holds"] and "nothing to lose" in twin_only["detail"]


def test_branch_scales_are_the_scales_of_the_norm_that_ends_each_branch() -> None:
    import torch

    from resviz.nn.models import build_net

    net = build_net(NetConfig(depth=8, width=4, num_classes=3, input_size=8, block=BlockConfig(order="post")))
    for i, blk in enumerate(net.blocks):
        norm = responses._taps(blk)[-1]
        with torch.no_grad():
            norm.weight.fill_(0.5 + i)
    assert responses.branch_scales(net) == pytest.approx([0.5, 1.5, 2.5])
    pre = build_net(NetConfig(depth=8, width=4, num_classes=3, input_size=8, block=BlockConfig(order="pre")))
    assert all(np.isnan(v) for v in responses.branch_scales(pre))  # F(x) ends in a conv there, not in a norm


def test_degradation_twin_check_takes_a_tie_where_both_nets_fit_but_not_where_plain_degrades() -> None:
    def rows(*errs: tuple[int, float, float]) -> list[dict]:
        return [{"depth": d, "residual_train_err": r, "plain_train_err": p} for d, r, p in errs]

    def twin_check(rs: list[dict]) -> dict:
        return next(c for c in degradation._checks(rs, 20) if c["claim"].startswith("the residual net trains no worse"))

    # the zoo's case: both depth-20 nets fit the training set (a tie), the plain nets degrade deeper
    assert twin_check(rows((20, 0.0005, 0.0005), (56, 0.0007, 0.145), (110, 0.0013, 0.873)))["holds"] is True
    assert twin_check(rows((20, 0.0005, 0.0004), (56, 0.0007, 0.145)))["holds"] is False  # plain-20 better: not a tie
    assert twin_check(rows((20, 0.0005, 0.0005), (56, 0.1, 0.1)))["holds"] is False  # a tie at the deepest: no effect
