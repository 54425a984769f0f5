"""The numbers of docs/experiments.md: one function per section, stored results in, markdown out.

Each function returns ``{placeholder: markdown}`` for the ``{{placeholder}}`` marks of
``docs/experiments.template.md``; the prose around them is written by hand and carries no number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from resviz.experiments import responses as responses_study
from resviz.experiments.common import NET_LABELS, net_label
from scripts.docgen.fmt import DASH, checks, fixed, pct, seconds, sig, table

Results = Mapping[str, dict[str, Any]]
METHOD_LABELS = {"integrated_gradients": "integrated gradients", "saliency": "saliency", "gradcam": "Grad-CAM",
                 "occlusion": "occlusion", "random": "random"}


def budget(r: Results, cpu: Mapping[str, float]) -> dict[str, str]:
    """The small budget's data, nets and schedule (from the degradation run's config) and time per study."""
    c = r["degradation"]["config"]
    classes = round(1 / r["lesion"]["chance"])
    w = c["width"]
    rows = [("data", f"`shapes`, {c['input_size']} x {c['input_size']} px, {classes} classes, {c['train_size']:,} training "
                     f"and {c['test_size']:,} test images (seed {c['seed']})"),
            ("nets", f"CIFAR-style ResNets, width {w} (channels {w}/{2 * w}/{4 * w}), basic blocks, shortcut option B, "
                     f"**{c['order']}-activation** blocks; the plain twin is the same net with every skip off and the same "
                     "initial weights"),
            ("training", f"{c['steps']} steps of SGD (Nesterov momentum 0.9, weight decay 5e-4), batch {c['batch_size']}, "
                         f"one-cycle learning rate peaking at {c['lr']:g}; residual net and plain twin in lockstep on the same "
                         "batches")]
    times = [(name, seconds(cpu.get(name)), seconds(r[name]["time_s"]), WHAT_RUNS[name](r[name]))
             for name in WHAT_RUNS]
    slowest = max(WHAT_RUNS, key=lambda n: cpu.get(n, 0.0))
    return {"budget.table": table(["", ""], rows), "budget.steps": str(c["steps"]), "budget.width": str(w),
            "budget.input_size": str(c["input_size"]), "budget.times": table(
                ["study", "CPU time (s)", "wall time of the study (s)", "what runs"], times),
            "budget.slowest": slowest, "budget.total_cpu": seconds(sum(cpu.get(n, 0.0) for n in WHAT_RUNS))}


def _pairs(cfg: dict[str, Any]) -> str:
    return f"ResNet-{cfg['depth']} + plain-{cfg['depth']}"


WHAT_RUNS: dict[str, Callable[[dict[str, Any]], str]] = {
    "degradation": lambda x: f"{len(x['config']['depths'])} depths x 2 nets x {x['config']['steps']} steps",
    "lesion": lambda x: f"trains {_pairs(x['config'])}, then {len(x['rows'])} + {len(x['curves']['k'])}x{x['config']['draws']}"
                        f" + {len(x['curves']['swaps'])}x{x['config']['draws']} test passes per net",
    "responses": lambda x: "trains depths " + " and ".join(str(d) for d in x["config"]["depths"]),
    "signal": lambda x: f"{len(x['rows'])} variants x {x['config']['steps']} steps",
    "landscape": lambda x: f"trains {_pairs(x['config'])}, {x['config']['grid']} x {x['config']['grid']} slice + "
                           f"{x['config']['line_points']}-point line per net"
                           + (f", full-Hessian map on {len(x['curvature_alphas'])} x {len(x['curvature_alphas'])} points "
                              f"({x['config']['curvature_iters']} Lanczos steps each)" if x.get("curvature_alphas") else ""),
    "shattered": lambda x: "initialisation only",
    "faithfulness": lambda x: f"trains {_pairs(x['config'])}, {x['config']['images']} images x "
                              f"{len(x['config']['methods'])} maps per net",
}


def degradation(r: Results) -> dict[str, str]:
    res = r["degradation"]
    rows = [(x["depth"], pct(x["residual_train_err"]), pct(x["plain_train_err"]), pct(x["residual_test_err"]),
             pct(x["plain_test_err"]), pct(x["paper_residual_test_err"], 2),
             DASH if x["paper_plain_test_err"] is None else "≈ " + pct(x["paper_plain_test_err"], 1))
            for x in res["rows"]]
    ours = {x["depth"] for x in res["rows"]}
    extra = [x for x in res["paper_rows"] if x["depth"] not in ours]
    paper = ", ".join(f"ResNet-{x['depth']} {pct(x['residual_test_err'], 2)}" for x in extra)
    plain = ", ".join(f"plain-{x['depth']} ≈ {pct(x['plain_test_err'], 0)}" for x in extra if x["plain_test_err"] is not None)
    deep = res["rows"][-1]
    better = [str(x["depth"]) for x in res["rows"] if x["plain_train_err"] < x["residual_train_err"]]
    ratios = [x["residual_test_err"] / x["paper_residual_test_err"] for x in res["rows"] if x["paper_residual_test_err"]]
    return {"degradation.plain_better": " and ".join(better) or "no depth",
            "degradation.test_ratio": f"{min(ratios):.0f} to {max(ratios):.0f}" if ratios else DASH,
            "degradation.table": table(["depth", "ResNet train err", "plain train err", "ResNet test err", "plain test err",
                                        "paper ResNet (CIFAR-10 test)", "paper plain (CIFAR-10 test, Fig. 6)"], rows),
            "degradation.paper_extra": f"{paper} (Table 6)" + (f"; {plain} (read off Fig. 6)" if plain else ""),
            "degradation.checks": checks(res), "degradation.deepest": str(deep["depth"]),
            "degradation.plain_deep_loss": fixed(deep["plain_final_loss"], 2),
            "degradation.chance_loss": fixed(math.log(round(1 / r["lesion"]["chance"])), 2)}


def lesion(r: Results, key: str = "lesion") -> dict[str, str]:
    res = r[key]
    intact = res["intact"]
    single = [("none (intact)", "", "", pct(intact["residual"]), pct(intact["plain"]))]
    single += [(x["block"], x["stage"], "yes" if x["downsampling"] else "", pct(x["residual_acc"]), pct(x["plain_acc"]))
               for x in res["rows"]]
    c = res["curves"]
    k = table(["k random blocks deleted", *c["k"]], [(NET_LABELS[n], *(pct(v) for v in c["random"][n])) for n in NET_LABELS])
    swaps = table(["swaps", *c["swaps"]], [(NET_LABELS[n], *(pct(v) for v in c["reorder"][n])) for n in NET_LABELS])
    cfg = res["config"]
    return {f"{key}.single": table(["deleted block", "stage", "downsampling", "ResNet acc", "plain acc"], single),
            f"{key}.random": k, f"{key}.swaps": swaps, f"{key}.checks": checks(res),
            f"{key}.eval_size": str(cfg["eval_size"]), f"{key}.draws": str(cfg["draws"]), f"{key}.chance": pct(res["chance"]),
            f"{key}.depth": str(cfg["depth"]), f"{key}.blocks": str(len(res["rows"])),
            f"{key}.intact": f"{pct(intact['residual'])} and {pct(intact['plain'])}", f"{key}.source": res["source"]}


def responses(r: Results) -> dict[str, str]:
    res = r["responses"]
    rows = [(net_label(x["net"]), x["blocks"], sig(x["mean_branch_std"]), sig(x["median_branch_std"]), sig(x["max_branch_std"]),
             sig(x["mean_layer_std"])) for x in res["rows"]]
    return {"responses.table": table(["net", "blocks", "mean std of F(x)", "median", "max", "mean std, all layer responses"],
                                     rows),
            "responses.checks": checks(res), "responses.eval_size": str(res["config"]["eval_size"]),
            "responses.nets": "/".join(str(d) for d in res["config"]["depths"])}


def signal_table(res: Mapping[str, Any]) -> str:
    rows = [(x["variant"], sig(x["init_var_first"]), sig(x["init_var_last"]), sig(x["init_growth"]),
             sig(x["trained_growth"]) if x["trained_growth"] is not None else f"{DASH} ({x['status']})", sig(x["final_loss"]),
             pct(x.get("test_acc")))
            for x in res["rows"]]
    return table(["variant", "variance, first block (init)", "variance, last block (init)", "growth last/first (init)",
                  "growth (trained)", "final train loss", "test accuracy"], rows)


def signal(r: Results) -> dict[str, str]:
    res = r["signal"]
    cfg = res["config"]
    return {"signal.table": signal_table(res),
            "signal.checks": checks(res), "signal.depth": str(cfg["depth"]), "signal.batch": str(cfg["batch"]),
            "signal.steps": str(cfg["steps"]), "signal.variants": str(len(res["rows"])), "signal.lr": f"{cfg['lr']:g}"}


def landscape(r: Results, key: str = "landscape") -> dict[str, str]:
    res = r[key]
    d = res["config"]["depth"]
    hessian = all("hessian_nonconvexity" in x for x in res["rows"])
    def curvature(x: Mapping[str, Any]) -> list[str]:
        sharpness = sig(x["center_lambda_max"]) if "center_lambda_max" in x else DASH  # the map may miss the centre
        return [fixed(x["hessian_nonconvexity"]), sharpness] if hessian else []

    rows = [(f"{NET_LABELS[x['net']]}-{d}", sig(x["center_loss"]), sig(x["mean_rise_r<=half"]), sig(x["max_loss"]),
             fixed(x["nonconvexity"]), *curvature(x)) for x in res["rows"]]
    cfg = res["config"]
    headers = ["net", "loss at centre", "mean rise within r ≤ 0.5", "highest loss on the slice", "non-convexity of the slice",
               *(["non-convexity, full Hessian", "λmax at the centre"] if hessian else [])]
    return {f"{key}.table": table(headers, rows),
            f"{key}.checks": checks(res), f"{key}.depth": str(d), f"{key}.grid": f"{cfg['grid']} x {cfg['grid']}",
            f"{key}.eval_size": str(cfg["eval_size"]), f"{key}.span": f"{cfg['span']:g}", f"{key}.source": res["source"],
            f"{key}.centre": " and ".join(sig(x["center_loss"]) for x in res["rows"]), f"{key}.curvature": curvature_map(res),
            f"{key}.convexity": convexity(res)}


def curvature_map(res: Mapping[str, Any]) -> str:
    """Where and how a landscape result's full-Hessian map was measured."""
    sub, cfg = len(res.get("curvature_alphas", [])), res["config"]
    if not all("hessian_nonconvexity" in x for x in res["rows"]):
        return "not measured in this stored result"
    return (f"{sub} x {sub} points of the slice, {cfg['curvature_iters']} Lanczos steps on {cfg['curvature_size']} "
            "training images each")


def shattered(r: Results) -> dict[str, str]:
    res = r["shattered"]
    rows = [(x["depth"], fixed(x["residual_lag1"]), fixed(x["plain_lag1"]), fixed(x["residual_lag4"]), fixed(x["plain_lag4"]))
            for x in res["rows"]]
    cfg = res["config"]
    return {"shattered.table": table(["depth", "ResNet lag-1", "plain lag-1", "ResNet lag-4", "plain lag-4"], rows),
            "shattered.checks": checks(res), "shattered.points": str(cfg["points"]), "shattered.pairs": str(cfg["pairs"]),
            "shattered.span": {0.25: "a quarter"}.get(cfg["span"], f"{cfg['span']:g}")}


def faithfulness(r: Results) -> dict[str, str]:
    res = r["faithfulness"]
    d = res["config"]["depth"]
    rows = [(f"{NET_LABELS[x['net']]}-{d}", METHOD_LABELS.get(x["method"], x["method"]), fixed(x["deletion"]),
             fixed(x["insertion"]), pct(x["pointing"]), pct(x["energy"])) for x in res["rows"]]
    acc = {x["net"]: x["accuracy"] for x in res["rows"]}
    cfg = res["config"]
    paper = "; ".join(f"{METHOD_LABELS.get(x['method'], x['method'])} {fixed(x['deletion'])} / {fixed(x['insertion'])}"
                      for x in res["paper_rows"])
    return {"faithfulness.table": table(["net", "method", "deletion ↓", "insertion ↑", "pointing ↑", "mask energy ↑"], rows),
            "faithfulness.checks": checks(res), "faithfulness.images": str(cfg["images"]),
            "faithfulness.steps": str(cfg["curve_steps"]), "faithfulness.tolerance": str(cfg["tolerance"]),
            "faithfulness.accuracy": f"the ResNet classifies {pct(acc['residual'])} correctly, the plain net {pct(acc['plain'])}",
            "faithfulness.paper": paper}


STUDY_LABELS = {"degradation": "1. Degradation", "lesion": "2. Lesion", "responses": "3. Layer responses",
                "signal": "4. Signal propagation", "landscape": "5. Loss landscape", "shattered": "6. Shattered gradients",
                "faithfulness": "7. Attribution faithfulness"}


def ended(entry: Mapping[str, Any]) -> str:
    """How a zoo net's training ended, when it did not finish (``training diverged at step 3 (lr 0.0102)``)."""
    return str(entry.get("message", "")).split(":")[0] or str(entry.get("status", "finished"))


def zoo(r: Results, manifest: Mapping[str, Any]) -> dict[str, str]:
    """The converged zoo: its nets (from the manifest) and every study's checks on it, effect sizes first."""
    nets = [e for e in manifest.get("checkpoints", []) if e.get("fingerprint")]
    order = {"shapes": 0, "fashion-mnist": 1}
    nets.sort(key=lambda e: (order.get(e["dataset"]["name"], 2), e["config"]["depth"], e["kind"] != "residual"))
    rows = [(f"`{e['name']}`", e["dataset"]["name"], e["config"]["depth"], pct(e["test_acc"]),
             pct(e["log"]["train_error"][-1]) if e["log"]["train_error"] else f"{DASH} ({ended(e)})",
             f"{e['train']['epochs']:g} x {e['dataset']['train_size']:,}",
             f"{e['train_time_s'] / 60:.0f} min, {e['trained_on']}") for e in nets]
    effects = []
    for name, label in STUDY_LABELS.items():
        res = r[f"{name}-zoo"]
        claims = {c["claim"] for c in res.get("effects", [])}
        for c in sorted(res["checks"], key=lambda c: c["claim"] not in claims):
            effects.append((label, "effect size" if c["claim"] in claims else "ordering", c["claim"], c["detail"],
                            "yes" if c["holds"] else "**no**"))
    held = sum(row[-1] == "yes" for row in effects)
    land = r["landscape-zoo"]["config"]
    by_name = {e["name"]: e for e in nets}
    deep = max((e for e in nets if e["dataset"]["name"] == "shapes"), key=lambda e: e["config"]["depth"])
    plain_deep = by_name.get(deep["twin"]) or deep
    return {"zoo.nets": table(["net", "data", "depth", "test accuracy", "final training error", "epochs x images",
                               "training"], rows),
            "zoo.checks": table(["study", "kind", "claim (the paper's number in brackets)", "ours", "holds"], effects),
            "zoo.held": f"{held} of {len(effects)}",
            "zoo.landscape": f"{land['grid']} x {land['grid']} points on {land['eval_size']} training images, and their "
                             "full-Hessian map on " + curvature_map(r["landscape-zoo"]),
            "zoo.recipe": f"{deep['train']['epochs']:g} epochs of {deep['dataset']['train_size']:,} images "
                          f"({deep['steps']:,} steps of batch {deep['train']['batch_size']})",
            "zoo.plain_deep": f"{pct(plain_deep['test_acc'])} test accuracy (plain-{plain_deep['config']['depth']})",
            "zoo.chance": pct(1 / plain_deep["config"]["num_classes"]),
            "zoo.decay": f"{deep['train']['weight_decay']:.0e}".replace("e-0", "e-"),
            "zoo.responses": _zoo_responses(r["responses-zoo"], deep),
            "zoo.convexity": convexity(r["landscape-zoo"]),
            "zoo.signal": _zoo_signal(r["signal-zoo"], manifest),
            "zoo.signal_table": signal_table(r["signal-zoo"]),
            "zoo.sources": "; ".join(f"{STUDY_LABELS[n].split('. ')[1]}: {r[f'{n}-zoo']['source']}" for n in STUDY_LABELS)}


def convexity(res: Mapping[str, Any]) -> str:
    """How a landscape result's slices compare by Li et al.'s own convexity measure (the full Hessian), by the slice's
    own curvature, and by the sharpness of the two minimisers."""
    rows = {x["net"]: x for x in res["rows"]}
    r, p = rows["residual"], rows["plain"]
    d = res["config"]["depth"]
    if "hessian_nonconvexity" not in r or "hessian_nonconvexity" not in p:
        return "The stored landscape result predates the full-Hessian map."
    maps = {n: np.asarray(res["curvature"][n]["ratio"], dtype=float) for n in ("residual", "plain")}
    k = maps["residual"].shape[0]
    inner = {n: m[1:-1, 1:-1] for n, m in maps.items()}
    ring = {n: (np.nansum(m) - np.nansum(inner[n])) / (m.size - inner[n].size) for n, m in maps.items()}
    ratio = p["hessian_nonconvexity"] / r["hessian_nonconvexity"] if r["hessian_nonconvexity"] > 0 else math.inf
    if ratio >= 3:
        verdict = f"the plain-{d} slice is {ratio:.1f}x less convex, as in their Fig. 8"
    elif ratio > 1:
        verdict = f"the plain-{d} slice is only {ratio:.1f}x less convex"
    else:
        verdict = f"it is the ResNet-{d} slice that is the less convex one"
    where = (f", {fixed(float(np.nanmean(inner['residual'])))} vs {fixed(float(np.nanmean(inner['plain'])))} on its inner "
             f"points and {fixed(float(ring['residual']))} vs {fixed(float(ring['plain']))} on its outer ring" if k > 3 else "")
    slice_order = "the paper's way" if p["nonconvexity"] > r["nonconvexity"] else "the same way"
    text = (f"By Li et al.'s own measure, |λmin/λmax| of the full Hessian, {verdict}: {fixed(r['hessian_nonconvexity'])} "
            f"(ResNet-{d}) vs {fixed(p['hessian_nonconvexity'])} (plain-{d}) on average over the map{where}. The slice's own "
            f"2-D curvature orders them {slice_order} ({fixed(r['nonconvexity'])} vs {fixed(p['nonconvexity'])}) but sees "
            "only the two drawn directions.")
    if "center_lambda_max" not in r or "center_lambda_max" not in p:  # the map missed the slice's centre
        return text
    sharp = p["center_lambda_max"] / r["center_lambda_max"]
    minimiser = (f"the plain net's minimiser is the sharper one, its largest eigenvalue {sharp:,.0f} times the ResNet's, as "
                 "the paper finds without skips" if sharp > 1 else
                 f"the ResNet's minimiser is the sharper one, its largest eigenvalue {1 / sharp:,.1f} times the plain "
                 "net's, unlike the paper's")
    return (text + f" At the trained weights the ResNet's map reads {fixed(float(maps['residual'][k // 2, k // 2]))} "
            f"(plain-{d}: {fixed(float(maps['plain'][k // 2, k // 2]))}), and {minimiser} (λmax: ResNet-{d} "
            f"{sig(r['center_lambda_max'])}, plain-{d} {sig(p['center_lambda_max'])}).")


def _zoo_signal(res: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    """Which nets the signal-propagation study read on the zoo, how each was trained and how far it got."""
    if res["config"].get("source") != "pretrained":
        return ("The stored signal-propagation result predates the zoo's nets for it: it trained each variant "
                f"{res['config']['steps']} steps")
    entries = {e["name"]: e for e in manifest.get("checkpoints", [])}
    names = res["shipped"]
    used = [entries.get(n, {}) for n in names]
    lrs = [e.get("train", {}).get("lr") for e in used]
    usual = max(set(lrs), key=lrs.count)  # the shared recipe's peak learning rate
    chance = 1 / used[0]["config"]["num_classes"] if used and "config" in used[0] else None
    accs = []
    for x, name, lr in zip(res["rows"], names, lrs, strict=True):
        acc = x.get("test_acc")
        e = entries.get(name, {})
        if e.get("status", "finished") != "finished":
            note = f" ({ended(e)}; shipped as it stood before that step)"
        else:
            note = " (chance: it did not train)" if chance and acc is not None and acc <= chance + 0.02 else ""
        note += f" (peak learning rate {lr:g})" if lr != usual else ""
        accs.append(f"{x['variant']} `{name}` {pct(acc)}{note}")
    d = res["config"]["depth"]
    return (f"Signal propagation reads a ResNet-{d}, the study's own depth, in each of its {len(names)} blocks, trained "
            f"by the zoo's recipe (peak learning rate {usual:g}) on the same data, only the block differing, and its "
            f"statistics at initialisation from the weights each started from. Test accuracy: {'; '.join(accs)}")


def _zoo_responses(res: Mapping[str, Any], deep: Mapping[str, Any]) -> str:
    """What the std of F(x) is made of on the zoo: the scales of the norms that end the branches."""
    ordered = responses_study.chain(res["rows"])
    if "mean_branch_scale" not in ordered[0]:
        return "the results stored for the layer-response study predate the scale measurement"
    listed = ", ".join(f"{net_label(x['net'])} {x['mean_branch_scale']:.3f}" for x in ordered)
    decay = ("they decay with every other parameter (weight decay on all of them, as He et al.)"
             if deep["train"].get("decay_all") else "weight decay leaves them alone (it acts on conv and linear weights only)")
    text = (f"in eval mode the std of F(x) is about the scale γ of the batch norm that ends the branch. Every scale "
            f"starts at 1 and {decay}; after {deep['steps']:,} steps the zoo's mean scales are {listed}")
    if deep.get("precise_bn"):
        text += (" (after training each norm's running statistics were re-estimated over the un-augmented training "
                 "images, precise BN: the moving averages, taken on zero-padded crops by earlier weights, had "
                 "ResNet-110's branches respond more widely than its scales and broke the chain)")
    if res.get("effects", [{}])[0].get("holds", True):
        return text + ", and He et al.'s ordering holds on them"
    broken = []
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a["mean_branch_std"] < b["mean_branch_std"]:
            continue
        why = f"{net_label(a['net'])} ({a['mean_branch_std']:.3f}) is not below {net_label(b['net'])} ({b['mean_branch_std']:.3f})"
        if a["mean_branch_scale"] < b["mean_branch_scale"]:  # the scales keep the order: the running statistics do not
            wider = [x["mean_branch_std"] / x["mean_branch_scale"] - 1 for x in (a, b)]
            why += (f": its scales are the smaller ones, but on test images its branches respond {wider[0]:.0%} more "
                    f"widely than its norms' running statistics expect ({net_label(b['net'])}: {wider[1]:.0%})")
        broken.append(why)
    return text + f", and He et al.'s chain breaks where {' and '.join(broken)}"


def all_values(r: Results, cpu: Mapping[str, float], manifest: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Every placeholder of the template."""
    out = budget(r, cpu)
    out.update(zoo(r, manifest or {}))
    for fn in (degradation, lesion, responses, signal, landscape, shattered, faithfulness):
        out.update(fn(r))
    out.update(lesion(r, "lesion-shipped"))
    out.update(landscape(r, "landscape-shipped"))
    return out
