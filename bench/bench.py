"""ResViz benchmark suite: prints one markdown table; every ratio is measured in this run, against a
baseline timed in the same rounds.

    python bench/bench.py                       # everything: about 3 minutes on an idle 2-core box
    python bench/bench.py --quick               # fewer rounds, one app run: about 1.5 minutes
    python bench/bench.py --sections train,twin # any of: train twin inspect app tta gpu anymodel
    python bench/bench.py --json bench/results/cpu.json   # also save the run as JSON (what `make docs` publishes)

A loaded machine makes every row slower (up to several times); the ratios hold up better than the
absolute numbers, and the header records the load average at the start and the end.

Sections:
  train    ResNet-20 (CIFAR style, width 16), 32x32, batch 128: resviz's Trainer with instruments off,
           with every live instrument at the Train page's interval, and on every step, against a bare
           PyTorch loop in channels-last (A) and in NCHW (B) on the same net and in-memory data.
  twin     the residual net and its plain twin in lockstep against training each alone.
  inspect  one uploaded image through the shipped shapes_resnet32: inspect_image, Grad-CAM,
           Saliency, Integrated Gradients (50 steps) and Occlusion against a bare forward (+ backward).
  app      the real app (`streamlit run app.py`) driven by Chromium through Playwright, Start pressed
           on the Train page: the job's images/s against the same job run headless in this process,
           the websocket data received, the chart JSON of a simulated 10-minute run, peak RSS.
  tta      time to accuracy of the Train page's default run (headless, as the app runs it).
  gpu      ResNet-20 32x32 batch 512 bf16 on CUDA: eager against CUDA-graph capture (skipped without CUDA).
  anymodel torchvision ResNet-50 and ViT-B/16 (random weights, one 224x224 image): discover + residualize,
           the residualized forward against the original's, and every live instrument on against it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timing import Row, best_ratio, interleaved, markdown_table, median_ratio, ms, paired, save_results  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from resviz import NetConfig, TrainConfig, build_net, runtime  # noqa: E402
from resviz.train.trainer import Trainer, build_nets  # noqa: E402

SECTIONS = ("train", "twin", "inspect", "app", "tta", "gpu", "anymodel")
NET = NetConfig(style="cifar", depth=20, width=16, num_classes=10, in_channels=3, input_size=32)
BATCH = 128
APP_PROBE_EVERY = 5  # the Train page's default (app_pages.state.DEFAULT_TRAIN.probe_every); checked in main()


# -- machine ----------------------------------------------------------------------------------------
def machine_info(threads: int) -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [f"CPU: {cpu}, {cores} cores usable; GPU: {gpu}",
            f"torch {torch.__version__}, {threads} intra-op threads for the training and inspection rows; "
            f"Python {platform.python_version()}",
            f"date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}"]


def load_avg() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


# -- training steppers ------------------------------------------------------------------------------
def random_data(n: int, seed: int = 0, device: str = "cpu") -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, NET.input_size, NET.input_size, generator=g)
    y = torch.randint(0, NET.num_classes, (n,), generator=g)
    return TensorDataset(x.to(device), y.to(device))


def batch_cycle(n: int, batch: int, device: str | torch.device) -> Callable[[], torch.Tensor]:
    """The indices of the next batch of one seeded permutation of ``n`` samples, round and round."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
    state = {"i": 0}

    def next_batch() -> torch.Tensor:
        i = state["i"] % (n // batch)
        state["i"] += 1
        return perm[i * batch:(i + 1) * batch]

    return next_batch


def bare_stepper(data: TensorDataset, channels_last: bool, *, batch: int = BATCH, device: str = "cpu",
                 bf16: bool = False) -> Callable[[], None]:
    """Baseline: a bare PyTorch loop on the same net, data in memory, SGD momentum, cross-entropy."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = build_net(NET).to(device, memory_format=fmt).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = data.tensors
    next_batch = batch_cycle(len(y), batch, x.device)

    def step() -> None:
        idx = next_batch()
        xb = x[idx].contiguous(memory_format=fmt)
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = F.cross_entropy(net(xb).float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def trainer_stepper(nets: dict, data: TensorDataset, probe_every: int, *, batch: int = BATCH,
                    device: str = "cpu", graphs: str = "auto", keep: list | None = None) -> tuple[Callable, Callable]:
    """resviz's Trainer as a stepper (no evaluation inside the timed steps); returns (step, close).

    With CUDA graphs the Trainer yields an interval's records together after one sync: time whole
    intervals (a multiple of ``probe_every`` and of ``resviz.train.cuda_graphs.MAX_INTERVAL`` steps)."""
    cfg = TrainConfig(lr=0.05, epochs=10_000.0, batch_size=batch, probe_every=probe_every, eval_every=10**9, device=device)
    trainer = Trainer(nets, SimpleNamespace(train=data, test=data), cfg, graphs=graphs)
    steps = trainer.steps()
    if keep is not None:
        keep.append(trainer)
    return (lambda: next(steps)), steps.close


def warm(steppers: dict[str, Callable], n: int = 2) -> None:
    for step in steppers.values():
        for _ in range(n):
            step()


# -- sections ---------------------------------------------------------------------------------------
def _bare_child(conn: object, threads: int) -> None:
    """Baseline A in a process of its own, with glibc's default malloc settings (as a bare loop runs):
    answers each ``n`` received with the seconds that ``n`` steps took; stops on ``0``."""
    runtime.tune(threads=threads)
    step = bare_stepper(random_data(BATCH * 10), True)
    while n := conn.recv():
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        conn.send(time.perf_counter() - t0)


class ChildStepper:
    """A stepper whose steps run in a spawned process (see ``timing.interleaved``'s ``run_steps``)."""

    def __init__(self, threads: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_bare_child, args=(child, threads), daemon=True)
        self.proc.start()

    def run_steps(self, n: int) -> float:
        self.conn.send(n)
        return self.conn.recv()

    def __call__(self) -> None:
        self.run_steps(1)

    def close(self) -> None:
        self.conn.send(0)
        self.proc.join(30)


def section_train(quick: bool) -> list[Row]:
    data = random_data(BATCH * 10)
    closers = []
    # A: the bare loop in its own process with the C library's default allocator, as a user's loop runs;
    # A' and B in this process, under the allocator setting resviz.runtime.tune makes (a stricter comparison).
    child = ChildStepper(torch.get_num_threads())
    steppers = {"A": child, "A'": bare_stepper(data, True), "B": bare_stepper(data, False)}
    for name, every in (("off", 0), ("live", APP_PROBE_EVERY), ("every", 1)):
        steppers[name], close = trainer_stepper(build_nets(NET, twin=False), data, every)
        closers.append(close)
    warm(steppers)
    # Short rounds (one probe interval each), many of them: on a shared machine the load changes from
    # second to second, and a ratio is only fair between timings taken close together.
    rounds, steps = (6, APP_PROBE_EVERY) if quick else (16, APP_PROBE_EVERY)
    t = interleaved(steppers, rounds, steps)
    for close in (*closers, child.close):
        close()
    rate = {k: _rates(v, BATCH) for k, v in t.items()}
    rows = [Row("1", "bare loop, NCHW (B) vs channels-last (A')", rate["B"], "A': " + rate["A'"],
                best_ratio(t["A'"], t["B"]), median=median_ratio(t["A'"], t["B"])),
            Row("1", "bare loop A' (this process, tuned malloc setting) vs A (own process, defaults)", rate["A'"],
                f"A: {rate['A']}", best_ratio(t["A"], t["A'"]), "(reference)", None, median_ratio(t["A"], t["A'"]))]
    for key, what, target in (("off", "Trainer, instruments off", 1.0),
                              ("live", f"Trainer, all live instruments every {APP_PROBE_EVERY} steps (app default)", 0.9),
                              ("every", "Trainer, all live instruments on every step", None)):
        r = best_ratio(t["A"], t[key])
        rows.append(Row("1", f"{what} vs A", rate[key], f"A: {rate['A']}", r, f">= {target:.2f}x A" if target else "(reference)",
                        r >= target if target else None, median_ratio(t["A"], t[key])))
    r = best_ratio(t["A'"], t["off"])
    rows.append(Row("1", "Trainer, instruments off vs A' (same allocator setting)", rate["off"], "A': " + rate["A'"],
                    r, "(reference)", None, median_ratio(t["A'"], t["off"])))
    r = best_ratio(t["B"], t["live"])
    rows.append(Row("1", "Trainer, live instruments vs B (NCHW)", rate["live"], f"B: {rate['B']}", r, ">= 1.15x B",
                    r >= 1.15, median_ratio(t["B"], t["live"])))
    return rows


def _rates(seconds_per_step: list[float], batch: int) -> str:
    """Median and best-round images/s (the best round is the one the machine's other load disturbed least)."""
    med = sorted(seconds_per_step)[len(seconds_per_step) // 2]
    return f"{batch / med:.0f} img/s (best {batch / min(seconds_per_step):.0f})"


def section_twin(quick: bool) -> list[Row]:
    data = random_data(BATCH * 10)
    nets = build_nets(NET, twin=True)
    alone = build_nets(NET, twin=True)
    closers = []
    steppers = {}
    for name, sub in (("lockstep", nets), ("residual", {"residual": alone["residual"]}), ("plain", {"plain": alone["plain"]})):
        steppers[name], close = trainer_stepper(sub, data, APP_PROBE_EVERY)
        closers.append(close)
    warm(steppers)
    rounds, steps = (5, APP_PROBE_EVERY) if quick else (12, APP_PROBE_EVERY)
    t = interleaved(steppers, rounds, steps)
    for close in closers:
        close()
    sums = [a + b for a, b in zip(t["residual"], t["plain"])]
    r = (min(t["residual"]) + min(t["plain"])) / min(t["lockstep"])
    return [Row("2", "lockstep residual + plain twin (live instruments), per step (best round)", ms(min(t["lockstep"])),
                f"residual alone + plain alone: {ms(min(t['residual']) + min(t['plain']))}", r, ">= 0.95x", r >= 0.95,
                median_ratio(sums, t["lockstep"]))]


def section_inspect(quick: bool) -> list[Row]:
    import io

    from resviz import zoo
    from resviz.analysis.inspection import explain, inspect_image
    from resviz.data.images import load_image, sample_images

    model = next(m for m in zoo.shipped_models() if m.name == "shapes_resnet32")
    net, info = zoo.load_shipped(model)
    buf = io.BytesIO()
    sample_images(64)[next(iter(sample_images(64)))].save(buf, format="PNG")  # an "uploaded" PNG
    x = zoo.prepare_image(load_image(buf.getvalue()), info)[0]
    net.eval()

    def forward() -> None:
        with torch.no_grad():
            net(x[None])

    def forward_backward() -> None:
        xx = x[None].clone().requires_grad_()
        net(xx)[0, 0].backward()

    reps = 10 if quick else 30
    rows = []
    tf, ti, r, med = paired(forward, lambda: inspect_image(net, x, classes=info.classes, block=0, channels=8), reps)
    rows.append(Row("4", "inspect_image: top-k, ‖F‖ and ‖S‖ of all blocks, one block's maps", ms(ti),
                    f"forward: {ms(tf)}", r, "<= 2x forward", r <= 2.0, med))
    tb, tg, r, med = paired(forward_backward, lambda: explain(net, x, "gradcam"), reps)
    rows.append(Row("4", "Grad-CAM (last block)", ms(tg), f"forward+backward: {ms(tb)}", r, "<= 3x fwd+bwd", r <= 3.0, med))
    few = 3 if quick else 5
    for method, what, n in (("saliency", "Saliency", reps), ("integrated_gradients", "Integrated Gradients, 50 steps", few),
                            ("occlusion", "Occlusion, batched windows", few)):
        tf, tm, r, med = paired(forward, lambda m=method: explain(net, x, m), n)
        rows.append(Row("4", what, ms(tm), f"forward: {ms(tf)}", r, "(reported)", None, med))
    return rows


def bare_graph_stepper(data: TensorDataset, *, batch: int) -> Callable[[], None]:
    """Baseline on CUDA: the bare bf16 channels-last loop with its whole step (forward, backward, SGD
    with a constant learning rate) captured once in a CUDA graph and replayed; batches are copied into
    the graph's static input buffers."""
    torch.manual_seed(0)
    net = build_net(NET).to("cuda", memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = data.tensors
    xs = torch.empty((batch, *x.shape[1:]), device="cuda").contiguous(memory_format=torch.channels_last)
    ys = torch.empty(batch, dtype=y.dtype, device="cuda")
    next_batch = batch_cycle(len(y), batch, "cuda")

    def load() -> None:
        idx = next_batch()
        xs.copy_(x[idx])
        ys.copy_(y[idx])

    def body() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = F.cross_entropy(net(xs).float(), ys)
        loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # eager warm-up: handles, autograd threads, momentum buffers
            load()
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        body()

    def step() -> None:
        load()
        graph.replay()

    step.keep = (net, opt, body)  # the graph writes into these tensors: they must outlive it
    return step


def section_gpu(quick: bool) -> list[Row]:
    what = "ResNet-20 32x32, batch 512, bf16, data on the GPU"
    if not torch.cuda.is_available():
        return [Row("6", f"{what}: Trainer with CUDA graphs", "not measured (no GPU in this environment)")]
    batch = 512
    torch.backends.cudnn.benchmark = True  # for every row (the Trainer turns it on for itself on CUDA)
    data = random_data(batch * 16, device="cuda")
    gpu = {"batch": batch, "device": "cuda"}
    closers, trainers = [], []
    steppers = {"eager": bare_stepper(data, True, bf16=True, **gpu), "graph": bare_graph_stepper(data, batch=batch)}
    for name, every, graphs in (("trainer", APP_PROBE_EVERY, "auto"), ("trainer_every", 1, "auto"),
                                ("trainer_off", 0, "auto"), ("trainer_eager", APP_PROBE_EVERY, "off")):
        steppers[name], close = trainer_stepper(build_nets(NET, twin=False), data, every, graphs=graphs, keep=trainers, **gpu)
        closers.append(close)
    warm(steppers, 10)  # warm-up and capture; 10 steps keep the Trainer's rounds on sync boundaries
    for tr in trainers:
        print(f"[bench] gpu: Trainer graphs={tr.graphs!r} probe_every={tr.cfg.probe_every}: ran {tr.graph_mode!r} "
              f"{tr.graph_note}", file=sys.stderr, flush=True)
    rounds, steps = (3, 50) if quick else (7, 100)
    t = interleaved(steppers, rounds, steps, sync=torch.cuda.synchronize)
    for close in closers:
        close()
    rate = {k: _rates(v, batch) for k, v in t.items()}
    best = {k: batch / min(v) for k, v in t.items()}
    rows = [Row("6", f"{what}: bare loop captured in a CUDA graph", rate["graph"], f"eager bare loop: {rate['eager']}",
                best_ratio(t["eager"], t["graph"]), "(reference)", None, median_ratio(t["eager"], t["graph"]))]
    app = f"Trainer, CUDA graphs, live instruments every {APP_PROBE_EVERY} steps (app default)"
    for key, label, target in (("trainer", app, 100_000),
                               ("trainer_every", "Trainer, CUDA graphs, live instruments on every step", None),
                               ("trainer_off", "Trainer, CUDA graphs, instruments off", None),
                               ("trainer_eager", f"Trainer, eager loop, live instruments every {APP_PROBE_EVERY} steps", None)):
        rows.append(Row("6", f"{what}: {label}", rate[key], f"bare graph: {rate['graph']}", best_ratio(t["graph"], t[key]),
                        ">= 100k img/s" if target else "(reference)", best[key] >= target if target else None,
                        median_ratio(t["graph"], t[key])))
    return rows


def section_anymodel(quick: bool) -> list[Row]:
    """Any model: discovery cost, and what the residualized graph and the instruments add to a forward."""
    import torchvision

    from resviz.analysis.probes import LiveProbes
    from resviz.nn.discovery import discover, residualize

    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rows = []
    for name, label, limit in (("resnet50", "ResNet-50", 2.0), ("vit_b_16", "ViT-B/16", 3.0)):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name).eval()
        times = []
        for _ in range(2 if quick else 3):
            t0 = time.perf_counter()
            discover(model, x)
            res = residualize(model, x)
            times.append(time.perf_counter() - t0)
        n = len(res.residual_map)
        rows.append(Row("7", f"{label}: discover + residualize ({n} merges, copy of the model included)", ms(min(times)),
                        "", None, f"<= {limit:.0f} s", min(times) <= limit, data={"seconds": times}))
        rows += _anymodel_forward_rows(label, model, res, x, 6 if quick else 12, LiveProbes)
    return rows


def _anymodel_forward_rows(label: str, model: torch.nn.Module, res: torch.nn.Module, x: torch.Tensor, reps: int,
                           live: type) -> list[Row]:
    def bare() -> None:
        with torch.no_grad():
            model(x)

    def graph() -> None:
        with torch.no_grad():
            res(x)

    def bare_step() -> None:
        model(x).square().mean().backward()

    def probed_step() -> None:
        with live(res) as probes:
            res(x).square().mean().backward()
            probes.record()
            probes.drain()

    tb, tg, r, med = paired(bare, graph, reps)
    rows = [Row("7", f"{label}: residualized forward (no grad)", ms(tg), f"original forward: {ms(tb)}", r, "<= 1.05x",
                r <= 1.05, med)]
    tb, tp, r, med = paired(bare_step, probed_step, reps)
    model.zero_grad(set_to_none=True)
    rows.append(Row("7", f"{label}: residualized forward + backward, every live instrument on (magnitudes, gradient "
                    "split, signal propagation)", ms(tp), f"original forward + backward: {ms(tb)}", r, "<= 1.5x",
                    r <= 1.5, med))
    return rows


# -- main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and one app run instead of two")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads for the training/inspection rows")
    ap.add_argument("--json", metavar="PATH", help="also save the header and rows as JSON (e.g. bench/results/cpu.json)")
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    app_bench = None
    if {"app", "tta"} & set(chosen):
        import app_bench  # needs streamlit and the app; imported only for the sections that run it

        if app_bench.default_probe_every() != APP_PROBE_EVERY:
            raise SystemExit(f"the Train page now probes every {app_bench.default_probe_every()} steps; update APP_PROBE_EVERY")
    # The bench is an entry point: it tunes the process as the app and the CLI do (the Trainer changes no
    # process-wide setting), up front, so the bare loops run under the same allocator settings from their first step.
    tuned = runtime.tune(keep_freed_memory=True, cudnn_benchmark=True).keep_freed_memory
    info, start_load, t0 = machine_info(args.threads), load_avg(), time.perf_counter()
    info.append(f"glibc malloc keeps freed memory for reuse (resviz.runtime, for every row): {'yes' if tuned else 'no'}")
    rows: list[Row] = []
    headless: list[dict] = []
    for name in SECTIONS:
        if name not in chosen:
            continue
        runtime.tune(threads=args.threads)
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        if name in ("train", "twin", "inspect", "gpu", "anymodel"):
            rows += globals()[f"section_{name}"](args.quick)
        elif name == "app":
            rows += app_bench.section_app(args.quick, headless)
        elif name == "tta":
            rows += app_bench.section_tta(args.quick, headless)
    header = {"machine": info, "load_start": start_load, "load_end": load_avg(), "wall_s": round(time.perf_counter() - t0),
              "quick": args.quick, "sections": chosen, "threads": args.threads,
              "command": shlex.join(["python", "bench/bench.py", *(sys.argv[1:] if argv is None else argv)])}
    print("\n".join(f"- {line}" for line in info))
    print(f"- load average (1/5/15 min) at start: {header['load_start']}; at end: {header['load_end']}; "
          f"bench wall time {header['wall_s']} s{' (--quick)' if args.quick else ''}")
    print()
    print(markdown_table(rows))
    if args.json:
        print(f"[bench] saved {save_results(args.json, header, rows)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
