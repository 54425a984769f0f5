"""``python -m resviz``: train headless, run the paper studies, rebuild the shipped checkpoints.

Examples::

    python -m resviz train --depth 20 --width 16 --steps 300 --out runs/r20
    python -m resviz train --config run.json --set train.lr=0.05 --out runs/r20
    torchrun --nproc_per_node=2 -m resviz train --config run.json --out runs/ddp
    python -m resviz study degradation --budget small --seed 0 --out runs/degradation
    python -m resviz study --list
    python -m resviz show runs/degradation
    python -m resviz pretrained
    resviz app --port 8501                 # the Streamlit app on 127.0.0.1 (``resviz`` once installed)

Progress goes to stderr (one updating line on a terminal, a line per 10% otherwise); tables and
JSON go to stdout. Under torchrun only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from resviz import launch, runtime, zoo
from resviz.storage.rundirs import dumps, load_run
from resviz.train import distributed
from resviz.train.records import StepRecord, curves, history_of

PRETRAINED_SCRIPT = zoo.PRETRAINED_DIR / "make_pretrained.py"
TRAIN_FLAGS = {  # flag -> (section, field, type)
    "depth": ("net", "depth", int), "width": ("net", "width", int), "input_size": ("net", "input_size", int),
    "style": ("net", "style", str), "kind": ("block", "kind", str), "order": ("block", "order", str),
    "norm": ("block", "norm", str), "shortcut": ("block", "shortcut", str), "act": ("block", "act", str),
    "epochs": ("train", "epochs", float), "steps": ("train", "max_steps", int), "batch_size": ("train", "batch_size", int),
    "lr": ("train", "lr", float), "optimizer": ("train", "optimizer", str), "schedule": ("train", "schedule", str),
    "seed": ("train", "seed", int), "device": ("train", "device", str), "eval_every": ("train", "eval_every", int),
    "weight_decay": ("train", "weight_decay", float),
}


class TerminalProgress:
    """A single updating progress line on a terminal, or a plain line per ``step`` of progress otherwise."""

    def __init__(self, label: str, stream: TextIO | None = None, *, step: float = 0.1, enabled: bool = True) -> None:
        self.label, self.stream, self.step, self.enabled = label, stream or sys.stderr, step, enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = -1.0

    def __call__(self, fraction: float, message: str = "") -> None:
        if not self.enabled:
            return
        if self.tty:
            bar = "#" * int(fraction * 30)
            self.stream.write(f"\r{self.label} [{bar:<30}] {fraction:4.0%} {message[:60]:<60}")
            if fraction >= 1.0:
                self.stream.write("\n")
        elif fraction - self._last >= self.step - 1e-9 or (fraction >= 1.0 > self._last):
            self._last = fraction
            self.stream.write(f"{self.label} {fraction:4.0%} {message}\n")
        self.stream.flush()


# -- parsing ----------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _assign(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    *path, key = dotted.split(".")
    node = cfg
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {part} is not a section")
    node[key] = value


def train_config_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The run config: the JSON file (if any), then the explicit flags, then every ``--set``."""
    cfg: dict[str, Any] = {}
    if args.config:
        try:
            cfg = json.loads(Path(args.config).read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read config {args.config}: {e}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{args.config} must hold a JSON object")
    for flag, (section, field, _) in TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            _assign(cfg, f"net.block.{field}" if section == "block" else f"{section}.{field}", value)
    for flag, field in (("dataset", "name"), ("train_size", "train_size"), ("test_size", "test_size")):
        if getattr(args, flag) is not None:
            _assign(cfg, f"data.{field}", getattr(args, flag))
    if args.steps is not None and "epochs" not in cfg.get("train", {}):
        cfg["train"]["epochs"] = 1e6  # --steps alone decides the length of the run
    if args.no_twin:
        cfg["twin"] = False
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        _assign(cfg, key.strip(), _parse_value(value))
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m resviz", description="ResViz without the browser.")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 is fastest on a busy 2-core machine)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a net (and its plain twin) into a run directory")
    t.add_argument("--config", help="JSON file {net, train, data, twin}; flags override it")
    for flag, (section, field, typ) in TRAIN_FLAGS.items():
        t.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=typ, help=f"{section}.{field}")
    t.add_argument("--dataset")
    t.add_argument("--train-size", dest="train_size", type=int)
    t.add_argument("--test-size", dest="test_size", type=int)
    t.add_argument("--no-twin", action="store_true", help="train only the net, not its plain twin")
    t.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="e.g. net.block.norm=group (repeatable)")
    t.add_argument("--out", required=True, help="run directory to write")
    s = sub.add_parser("study", help="reproduce a paper's result (see --list)")
    s.add_argument("name", nargs="?")
    s.add_argument("--list", action="store_true", help="list the studies")
    s.add_argument("--budget", default="zoo", choices=("zoo", "small", "medium"),  # resviz.experiments.BUDGETS
                   help="zoo (default): the converged nets in pretrained/; small, medium: train nets in the study's budget")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field (repeatable)")
    s.add_argument("--out", help="run directory to write (result.json, figures)")
    s.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    s.add_argument("--no-figures", action="store_true", help="skip the HTML figures")
    w = sub.add_parser("show", help="summarise a run directory")
    w.add_argument("path")
    r = sub.add_parser("pretrained", help="regenerate pretrained/ (runs pretrained/make_pretrained.py)")
    r.add_argument("args", nargs=argparse.REMAINDER, help="passed on to make_pretrained.py")
    a = sub.add_parser("app", help="start the Streamlit app on 127.0.0.1 (other streamlit flags are passed on)")
    a.add_argument("--port", type=int, default=8501)
    a.add_argument("--print-command", action="store_true", help="print the streamlit command line instead of running it")
    return p


# -- commands ---------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace, out: TextIO) -> int:
    from resviz.train.headless import RunSpec, train_to_dir

    spec = RunSpec.from_dict(train_config_dict(args))
    info = distributed.init_distributed(spec.train.device)
    bar = TerminalProgress("train", enabled=info.is_main and not args.quiet)

    def show(rec: StepRecord) -> None:
        nets = " ".join(f"{k} {m.loss:.3f}" for k, m in rec.nets.items())
        bar(rec.step / max(rec.total_steps, 1), f"step {rec.step}/{rec.total_steps} loss {nets}")

    try:
        summary = train_to_dir(spec, args.out, progress=show)
    finally:
        distributed.shutdown()
    if info.is_main:
        out.write(format_summary(summary) + f"\nrun directory: {args.out}\n")
    return 0 if summary["status"] in ("finished", "stopped") else 1


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"status: {summary['status']} after {summary['steps']} steps on {summary['world_size']} process(es)"]
    if summary.get("message"):
        lines.append(summary["message"])
    for name, m in summary.get("final", {}).items():
        parts = [f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, (int, float))]
        lines.append(f"  {name}: {', '.join(parts)}")
    return "\n".join(lines)


def cmd_study(args: argparse.Namespace, out: TextIO) -> int:
    from resviz.experiments import STUDIES
    from resviz.experiments.runner import run_study

    if args.list or not args.name:
        for s in STUDIES.values():
            out.write(f"{s.name:<14} {s.title}\n{'':<14} {s.paper}\n")
        return 0 if args.list else 2
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects field=value, got {item!r}")
        overrides[key.strip()] = _parse_value(value)
    info = distributed.init_distributed()
    bar = TerminalProgress(args.name, enabled=info.is_main and not args.quiet)
    try:
        result = run_study(args.name, args.budget, args.seed, out=args.out, progress=bar, overrides=overrides,
                           save_figures=not args.no_figures)
    finally:
        distributed.shutdown()
    if info.is_main:
        out.write(dumps(result, sort_keys=True) + "\n" if args.json else format_result(result))
    return 0


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return "..."
    return "-" if v is None else str(v)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of dicts as an aligned text table (nested values shown as '...')."""
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [cols] + [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells) + "\n"


def format_result(result: dict[str, Any]) -> str:
    """A study result as text: title, table, and each reproduced (or not) ordering."""
    text = [f"{result['title']}\n{result['paper']}\nsource: {result.get('source', '')}, {result.get('time_s', 0):.0f} s\n"]
    text.append(format_table(result["rows"]))
    for c in result.get("checks", []):
        text.append(f"[{'reproduced' if c['holds'] else 'NOT reproduced'}] {c['claim']}: {c['detail']}\n")
    return "\n".join(text)


def cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    from resviz.train.headless import step_records

    run = load_run(args.path)
    out.write(f"{run.path}: {run.kind} run, {len(run.metrics)} metrics lines, {len(run.checkpoints)} checkpoint(s)\n")
    for note in run.notes:
        out.write(f"note: {note}\n")
    if run.result is not None:
        out.write(format_result(run.result))
    elif run.summary is not None:
        out.write(format_summary(run.summary) + "\n")
    elif run.metrics:
        out.write(f"last step: {dumps(run.metrics[-1], sort_keys=True)}\n")
    if run.kind == "train":
        out.write(format_curves(step_records(run)))
    return 0


def format_curves(records: Sequence[StepRecord]) -> str:
    """One line per recorded curve: its label, how many points, and its last value."""
    lines = [f"  {c.label}: {len(c.steps)} points, last {float(c.values[-1]):.4g} at step {int(c.steps[-1])}"
             for c in curves(history_of(records)) if len(c.steps)]
    return "curves:\n" + "\n".join(lines) + "\n" if lines else ""


def cmd_pretrained(args: argparse.Namespace, out: TextIO) -> int:
    import importlib.util
    import inspect

    script = PRETRAINED_SCRIPT
    if not script.is_file():
        raise ValueError(f"{script} is missing; it ships with the ResViz source tree")
    spec = importlib.util.spec_from_file_location("make_pretrained", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    extra = [a for a in args.args if a != "--"]
    if inspect.signature(module.main).parameters:
        code = module.main(extra)
    else:
        saved, sys.argv = sys.argv, [str(script), *extra]
        try:
            code = module.main()
        finally:
            sys.argv = saved
    return int(code or 0)


def cmd_app(args: argparse.Namespace, out: TextIO) -> int:
    if args.print_command:
        out.write(" ".join(launch.app_command(args.port, args.args)) + "\n")
        return 0
    return launch.run_app(args.port, args.args)


COMMANDS = {"train": cmd_train, "study": cmd_study, "show": cmd_show, "pretrained": cmd_pretrained, "app": cmd_app}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of ``python -m resviz``; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("pretrained", "app"):  # everything unknown goes on to make_pretrained.py or streamlit
        args.args = [*extra, *getattr(args, "args", [])]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # The process-wide settings of a CLI run (the library changes none): threads, allocator, cuDNN.
    runtime.tune(threads=args.threads or None, keep_freed_memory=True, cudnn_benchmark=True)
    try:
        return COMMANDS[args.command](args, out or sys.stdout)
    except (ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
