"""Lesion study (Veit, Wilber, Belongie 2016): residual nets behave like ensembles of shallow paths.

A trained residual net and its plain twin lose one block at a time at test time
(:func:`resviz.nn.scoped.removed`: the block's branch is dropped, ``y = post(S(x))``), then k random
blocks at once, and finally have pairs of same-shape blocks of a stage swapped. The residual net degrades gracefully; the plain net,
a single path through every layer, collapses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
from torch import nn

from resviz.experiments.common import MEDIUM_TRAINING, ZOO, Progress, TrainedStudyConfig, as_progress, check, timer
from resviz.experiments.figures import lines
from resviz.experiments.twins import reference_twins
from resviz.nn.scoped import removed, reordered
from resviz.plots import lesion_figure
from resviz.theme import OFF_COLOR, PLAIN_COLOR
from resviz.train.trainer import evaluate

NAME = "lesion"
TITLE = "Lesion: delete and reorder blocks of a trained net"
PAPER = "Veit, Wilber, Belongie. Residual Networks Behave Like Ensembles of Relatively Shallow Networks. NeurIPS 2016"
PAPER_NOTES = [  # read off Figs. 3-5 (CIFAR-10, ResNet-110 vs a 15-layer VGG); qualitative
    {"experiment": "delete one block", "residual": "error stays near the intact net's (downsampling blocks hurt more)",
     "plain": "error jumps to chance (about 90% on 10 classes)"},
    {"experiment": "delete k random blocks", "residual": "error grows smoothly with k", "plain": "-"},
    {"experiment": "swap blocks (reorder)", "residual": "error grows smoothly with the amount of reordering", "plain": "-"},
]


@dataclass(frozen=True, kw_only=True)
class LesionConfig(TrainedStudyConfig):
    depth: int = 20  # ResNet-20 and plain-20: in the small budget both twins train to a similar accuracy
    eval_size: int = 500  # test images per measurement
    # a trained plain net to lesion beside the residual one when the same-depth plain twin cannot train (Veit et al.
    # compare ResNet-110 with a 15-layer VGG); None: only the twin
    plain_depth: int | None = None
    draws: int = 4  # random block sets (or swap sets) per k
    max_swaps: int = 4

    PRESETS = {"small": {}, "medium": {**MEDIUM_TRAINING, "depth": 32, "eval_size": 1000, "draws": 8, "max_swaps": 6},
               "zoo": {**ZOO, "depth": 110, "plain_depth": 20, "draws": 8, "eval_size": 1000}}  # the whole test split


def _kept(fraction: float) -> str:
    """A share of above-chance accuracy kept, in whole percent; a hair below chance reads 0%, not -0%."""
    return f"{fraction:.0%}" if round(fraction, 2) != 0 else "0%"


def accuracy(net: nn.Module, x: Any, y: Any) -> float:
    return evaluate(net, (x, y), batch_size=500)[1]


def swappable(net: nn.Module) -> list[list[int]]:
    """Per stage, the blocks whose input and output shapes agree (every block but a stage's first)."""
    stages: dict[int, list[int]] = {}
    for i, (blk, stage) in enumerate(zip(net.blocks, net.stage_of, strict=True)):
        if blk.stride == 1 and blk.cin == blk.cout:
            stages.setdefault(stage, []).append(i)
    return [v for v in stages.values() if len(v) >= 2]


def _random_swaps(groups: list[list[int]], n_blocks: int, k: int, rng: np.random.Generator) -> list[int]:
    order = list(range(n_blocks))
    for _ in range(k):
        group = groups[rng.integers(len(groups))]
        a, b = rng.choice(group, size=2, replace=False)
        order[a], order[b] = order[b], order[a]
    return order


def deletion_counts(n_blocks: int) -> list[int]:
    """How many random blocks to delete at once: every k up to 10 (Veit et al. Fig. 5a steps k by one), then eight
    steps spread over the rest (up to all blocks but one)."""
    dense = range(1, min(n_blocks - 1, 10) + 1)
    spread = np.linspace(1, n_blocks - 1, min(n_blocks - 1, 8)).round()
    return sorted({*dense, *(int(k) for k in spread)})


def _lesion_curves(nets: dict[str, nn.Module], x: Any, y: Any, cfg: LesionConfig, progress: Progress) -> dict[str, Any]:
    n = len(nets["residual"].blocks)
    ks = deletion_counts(n)
    groups = swappable(nets["residual"])
    rng = np.random.default_rng(cfg.seed)
    # each draw is one random order of the blocks and deletes its first k: a uniformly random k-set at every k, and
    # the same draws all along the curve (a draw's k+1 set holds its k set), so the mean curve is not noise from k to k
    orders = [rng.permutation(n) for _ in range(cfg.draws)]
    sets = {k: [sorted(order[:k].tolist()) for order in orders] for k in ks}
    swaps = {k: [_random_swaps(groups, n, k, rng) for _ in range(cfg.draws)] for k in range(1, cfg.max_swaps + 1)}
    out: dict[str, Any] = {"k": ks, "swaps": list(swaps), "single": {}, "random": {}, "reorder": {}}
    for j, (name, net) in enumerate(nets.items()):
        part = progress.span(j / len(nets), (j + 1) / len(nets))
        out["single"][name] = []
        for i in range(n):
            with removed(net, [i]):
                out["single"][name].append(accuracy(net, x, y))
            part(0.4 * (i + 1) / n, f"{name}: deleting block {i}")
        out["random"][name] = []
        for k in ks:
            out["random"][name].append(float(np.mean([_acc_removed(net, s, x, y) for s in sets[k]])))
        part(0.7, f"{name}: deleting random blocks")
        out["reorder"][name] = []
        for orders in swaps.values():
            out["reorder"][name].append(float(np.mean([_acc_reordered(net, o, x, y) for o in orders])) if groups else None)
        part(1.0, f"{name}: reordering blocks")
    return out


def _acc_removed(net: nn.Module, blocks: list[int], x: Any, y: Any) -> float:
    with removed(net, blocks):
        return accuracy(net, x, y)


def _acc_reordered(net: nn.Module, order: list[int], x: Any, y: Any) -> float:
    with reordered(net, order):
        return accuracy(net, x, y)


def run(cfg: LesionConfig, progress: Any = None) -> dict[str, Any]:
    """Lesion and reorder a trained residual/plain pair; rows are per deleted block."""
    progress, elapsed = as_progress(progress), timer()
    data = cfg.data()
    net_cfg = cfg.net(cfg.depth, data.num_classes)
    train_part, lesion_part = progress.spans([0.7, 0.3])
    twins = reference_twins(net_cfg, data, cfg.schedule(), seed=cfg.seed, source=cfg.source, device=cfg.device, progress=train_part)
    x, y = data.test.tensors[0][: cfg.eval_size], data.test.tensors[1][: cfg.eval_size]
    intact = {name: accuracy(net, x, y) for name, net in twins.nets.items()}
    curves = _lesion_curves(twins.nets, x, y, cfg, lesion_part)
    res = twins.nets["residual"]
    rows = [{"block": i, "stage": res.stage_of[i], "downsampling": res.blocks[i].stride > 1,
             "residual_acc": curves["single"]["residual"][i], "plain_acc": curves["single"]["plain"][i]}
            for i in range(len(res.blocks))]
    reference = None
    if cfg.plain_depth is not None and cfg.plain_depth != cfg.depth:
        ref_twins = reference_twins(cfg.net(cfg.plain_depth, data.num_classes), data, cfg.schedule(), seed=cfg.seed,
                                    source=cfg.source, device=cfg.device)
        ref = ref_twins.nets["plain"]
        single = []
        for i in range(len(ref.blocks)):
            with removed(ref, [i]):
                single.append(accuracy(ref, x, y))
        groups, rng = swappable(ref), np.random.default_rng(cfg.seed)
        swap = [_acc_reordered(ref, _random_swaps(groups, len(ref.blocks), 1, rng), x, y)
                for _ in range(cfg.draws)] if groups else []
        reference = {"depth": cfg.plain_depth, "intact": accuracy(ref, x, y), "single": single,
                     "downsampling": [blk.stride > 1 for blk in ref.blocks],
                     "one_swap": float(np.mean(swap)) if swap else None, "source": ref_twins.source,
                     "shipped": list(ref_twins.shipped[1:])}  # its plain net only
    progress(1.0, "done")
    checks = _checks(rows, intact, curves, data.num_classes, reference)
    effects = effect_checks(rows, intact, curves, data.num_classes, reference)
    return {"study": NAME, "title": TITLE, "paper": PAPER, "config": cfg.to_dict(), "rows": rows, "intact": intact,
            "chance": 1.0 / data.num_classes, "curves": curves, "checks": checks + effects if cfg.budget == "zoo" else checks,
            "effects": effects, "plain_reference": reference, "paper_rows": PAPER_NOTES,
            "source": twins.source + (f"; plain-{cfg.plain_depth} beside them ({reference['source']})" if reference else ""),
            "shipped": list(twins.shipped) + (reference["shipped"] if reference else []), "time_s": elapsed()}


SINGLE_COST = 0.03  # Veit et al.: deleting one block of ResNet-110 barely changes its error (Fig. 3)
PLAIN_KEPT = 0.30  # ... while the plain net (their VGG-15) drops to chance


def retained(acc: float, intact: float, chance: float) -> float:
    """The share of the intact net's above-chance accuracy that is left (1: unharmed, 0: chance)."""
    return (acc - chance) / (intact - chance) if intact > chance else float("nan")


def _plain_deletions(inner: list[dict], intact: dict[str, float], chance: float, reference: dict[str, Any] | None,
                     twin: str) -> tuple[float, float, str]:
    """The plain side of the deletion checks: the share of its above-chance accuracy the plain net keeps after one
    non-downsampling deletion, its intact accuracy and its name; the ``reference`` net when given, else the twin
    (named ``twin``)."""
    if reference is None:
        kept = float(np.mean([retained(r["plain_acc"], intact["plain"], chance) for r in inner])) if inner else float("nan")
        return kept, intact["plain"], twin
    kept = float(np.mean([retained(a, reference["intact"], chance)
                          for a, down in zip(reference["single"], reference["downsampling"], strict=True) if not down]))
    return kept, reference["intact"], f"plain-{reference['depth']}"


def _checks(rows: list[dict], intact: dict[str, float], curves: dict, classes: int,
            reference: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The orderings. A plain twin that never left chance has nothing to lose; with a ``reference`` (a trained plain
    net of another depth) the plain side of the deletion checks is that net, and the detail says so."""
    chance = 1 / classes
    inner = [r for r in rows if not r["downsampling"]]
    kept = {"residual": float(np.mean([retained(r["residual_acc"], intact["residual"], chance) for r in inner]))}
    kept["plain"], plain_intact, plain_name = _plain_deletions(inner, intact, chance, reference, "plain")
    rand = curves["random"]["residual"]
    steps = np.diff([intact["residual"], *rand])
    one = {k: curves["reorder"][k][0] for k in ("residual", "plain")}
    swap_intact, swap_name = dict(intact), "plain"
    if reference is not None and reference.get("one_swap") is not None:  # the trained plain net, as for deletions
        one["plain"], swap_intact["plain"], swap_name = reference["one_swap"], reference["intact"], plain_name
    swap_kept = {k: retained(one[k], swap_intact[k], chance) if one[k] is not None else float("nan") for k in one}
    at_chance = swap_intact["plain"] - chance < 0.02
    swap_detail = (f"one swap keeps {_kept(swap_kept['residual'])} (residual) vs {_kept(swap_kept['plain'])} ({swap_name})"
                   if one["residual"] is not None else "no stage has two same-shape blocks")
    if at_chance:
        swap_detail += f"; the plain net is at chance ({swap_intact['plain']:.1%}) before any swap, so it has nothing to lose"
    return [
        check("after deleting one non-downsampling block the residual net keeps more of its accuracy than the plain net",
              kept["residual"] > kept["plain"],
              f"above-chance accuracy kept: {_kept(kept['residual'])} (residual) vs {_kept(kept['plain'])} ({plain_name}); "
              f"intact {intact['residual']:.1%} / {plain_intact:.1%}, chance {chance:.1%}"),
        check(f"the plain net collapses to near chance when one block is deleted (keeps at most {PLAIN_KEPT:.0%})",
              kept["plain"] <= PLAIN_KEPT,
              f"{plain_name} keeps {_kept(kept['plain'])} of its above-chance accuracy on average"),
        check("the residual net's accuracy falls step by step as random blocks are deleted (no single deletion costs "
              "more than 60% of its above-chance accuracy)",
              bool(np.all(steps >= -0.6 * (intact["residual"] - chance))) and rand[-1] < intact["residual"],
              "accuracy by k: " + ", ".join(f"{k}: {a:.1%}" for k, a in zip(curves["k"], rand, strict=True))),
        check("swapping two blocks hurts the residual net less than the plain net", swap_kept["residual"] > swap_kept["plain"],
              swap_detail),
    ]


def effect_checks(rows: list[dict], intact: dict[str, float], curves: dict, classes: int,
                  reference: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The paper's effect sizes: how much a deletion costs, not only which net loses more.

    ``reference``: a trained plain net of another depth lesioned the same way (``plain_reference`` of a result);
    the plain net's check is about it when given.
    """
    chance = 1 / classes
    inner = [r for r in rows if not r["downsampling"]]
    down = [r for r in rows if r["downsampling"]]

    def cost(r: dict) -> float:
        return intact["residual"] - r["residual_acc"]

    mean_inner = float(np.mean([cost(r) for r in inner])) if inner else float("nan")
    worst = max(rows, key=cost)
    errors = [1 - intact["residual"], *(1 - a for a in curves["random"]["residual"])]
    rises = np.diff(errors)
    total = errors[-1] - errors[0]
    smooth = bool(np.all(rises >= -0.01)) and total > 0 and float(rises.max()) <= 0.5 * total
    plain_kept, plain_intact, plain_name = _plain_deletions(inner, intact, chance, reference, "plain twin")
    return [
        check(f"deleting one non-downsampling block costs the residual net at most {SINGLE_COST:.0%} of accuracy on "
              "average (Veit et al., ResNet-110 on CIFAR-10: its error barely moves)", mean_inner <= SINGLE_COST,
              f"{mean_inner:.1%} on average over {len(inner)} blocks (worst {max(cost(r) for r in inner):.1%}); "
              f"intact {intact['residual']:.1%}" if inner else "no non-downsampling block"),
        check("the downsampling blocks cost the most to delete", bool(down) and worst["downsampling"]
              and min(cost(r) for r in down) > mean_inner,
              f"costliest: block {worst['block']} ({cost(worst):.1%}{', downsampling' if worst['downsampling'] else ''}); "
              "downsampling blocks: " + ", ".join(f"{r['block']}: {cost(r):.1%}" for r in down)),
        check("the residual net's error grows smoothly with the number of deleted blocks (never falls by more than a "
              "point, no step adds more than half of the total rise)", smooth,
              "error by blocks deleted: " + ", ".join(f"{k}: {e:.1%}" for k, e in zip([0, *curves["k"]], errors, strict=True))),
        check(f"a trained plain net keeps at most {PLAIN_KEPT:.0%} of its above-chance accuracy after one deletion "
              "(Veit et al.: VGG-15 falls to chance)", plain_kept <= PLAIN_KEPT,
              f"{plain_name} keeps {_kept(plain_kept)} on average (intact {plain_intact:.1%}, chance {chance:.1%})"),
    ]


def figures(result: dict[str, Any]) -> dict[str, go.Figure]:
    rows, curves = result["rows"], result["curves"]
    depth = result["config"]["depth"]
    names = {"residual": f"ResNet-{depth}", "plain": f"plain-{depth}"}
    single = _single_figure([r["downsampling"] for r in rows],
                            {names[k]: [r[f"{k}_acc"] for r in rows] for k in names},
                            {names[k]: v for k, v in result["intact"].items()}, result["chance"],
                            f"Deleting one block of ResNet-{depth} and of its plain twin")
    out = {"single_deletion": single}
    ref = result.get("plain_reference")
    if ref:  # the trained plain net the plain-net checks are about, when the twin itself did not train
        out["plain_reference_single"] = _single_figure(
            ref["downsampling"], {f"plain-{ref['depth']}": ref["single"]}, {f"plain-{ref['depth']}": ref["intact"]},
            result["chance"], f"Deleting one block of the trained plain-{ref['depth']} (the plain net the checks use)")
    k = lines(curves["k"], {f"{names[n]} (intact {result['intact'][n]:.0%})": curves["random"][n] for n in names},
              title=f"Deleting k random blocks at once (ResNet-{depth} and its plain twin)", xaxis="blocks deleted",
              yaxis="test accuracy", percent=True)
    k.add_hline(y=result["chance"], line={"dash": "dot", "color": OFF_COLOR}, annotation_text="chance")
    swaps = lines(curves["swaps"], {names[n]: curves["reorder"][n] for n in names},
                  title=f"Swapping random pairs of same-shape blocks (ResNet-{depth} and its plain twin)", xaxis="swaps",
                  yaxis="test accuracy", percent=True)
    swaps.update_xaxes(dtick=1)  # a whole number of swaps
    if ref and ref.get("one_swap") is not None:  # the trained plain net the swap check compares with
        name = f"plain-{ref['depth']}, one swap"
        swaps.add_trace(go.Scatter(x=[1], y=[ref["one_swap"]], mode="markers", name=name,
                                   marker={"color": PLAIN_COLOR, "symbol": "diamond", "size": 11}))
    return {**out, "random_deletions": k, "reordering": swaps}


def _single_figure(downsampling: list[bool], accuracy: dict[str, list[float]], intact: dict[str, float], chance: float,
                   title: str) -> go.Figure:
    labels = [f"{i}{'*' if d else ''}" for i, d in enumerate(downsampling)]
    fig = lesion_figure(labels, accuracy, intact=intact, chance=chance)
    fig.update_layout(title=title, xaxis_title="deleted block (* downsampling)")
    fig.update_xaxes(type="category")  # "3*" is not a number: keep every label a category
    return fig
