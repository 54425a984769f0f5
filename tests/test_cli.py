"""The headless CLI: train into a run directory, run a study, show runs, regenerate pretrained/."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resviz import cli
from resviz.experiments.runner import run_study
from resviz.storage.checkpoints import load_checkpoint
from resviz.storage.rundirs import MetricsLog, load_run, read_jsonl, write_json

ROOT = Path(__file__).resolve().parents[1]
SHATTERED = {"depths": [8, 14], "pairs": 1, "points": 8, "max_lag": 3, "width": 4}


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "resviz", "--threads", "1", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _main(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    return cli.main(list(args), out=out), out.getvalue()


def test_train_writes_a_complete_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _run("train", "--depth", "8", "--width", "4", "--input-size", "16", "--train-size", "128", "--test-size", "32",
                "--steps", "3", "--batch-size", "32", "--set", "train.probe_every=0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "status: finished after 3 steps" in proc.stdout and "train" in proc.stderr  # table on stdout, progress on stderr
    run = load_run(out)
    assert run.kind == "train" and run.config["net"]["depth"] == 8 and run.config["data"]["train_size"] == 128
    assert [r["step"] for r in run.metrics] == [1, 2, 3] and not run.notes
    assert {p.name for p in run.checkpoints} == {"residual.safetensors", "plain.safetensors"}
    assert (out / "training_curves.html").is_file() and run.summary["status"] == "finished"
    net, meta = load_checkpoint(out / "plain")
    assert net.cfg.is_plain and meta["metrics"]["role"] == "plain" and meta["dataset"]["name"] == "shapes"


def test_study_json_equals_the_library_result_and_result_json(tmp_path: Path) -> None:
    sets = [a for k, v in SHATTERED.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    proc = _run("study", "shattered", "--budget", "small", "--seed", "3", "--json", "--out", str(tmp_path / "s"), *sets)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    saved = json.loads((tmp_path / "s" / "result.json").read_text())
    library = run_study("shattered", "small", 3, overrides={k: tuple(v) if isinstance(v, list) else v
                                                           for k, v in SHATTERED.items()})
    for r in (printed, saved, library):
        r.pop("time_s")
    assert printed == saved == library
    assert (tmp_path / "s" / "correlation_by_depth.html").is_file()


def test_train_config_precedence_file_then_flags_then_set(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"net": {"depth": 14, "width": 4}, "train": {"lr": 0.3, "seed": 5}, "twin": True}))
    args = cli.build_parser().parse_args(["train", "--config", str(cfg), "--lr", "0.2", "--norm", "group",
                                          "--set", "train.lr=0.01", "--set", "net.block.act=gelu", "--no-twin", "--out", "x"])
    d = cli.train_config_dict(args)
    assert d["net"] == {"depth": 14, "width": 4, "block": {"norm": "group", "act": "gelu"}}
    assert d["train"] == {"lr": 0.01, "seed": 5} and d["twin"] is False
    steps = cli.train_config_dict(cli.build_parser().parse_args(["train", "--steps", "7", "--out", "x"]))
    assert steps["train"] == {"max_steps": 7, "epochs": 1e6}  # --steps alone sets the length


def test_bad_input_gives_a_message_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _main("study", "nonsense")[0] == 2
    assert "unknown study 'nonsense'" in capsys.readouterr().err
    assert _main("study", "shattered", "--set", "pairs")[0] == 2
    assert _main("train", "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o"))[0] == 2
    assert _main("train", "--set", "net.depth=9", "--out", str(tmp_path / "o"))[0] == 2
    assert "6n+2" in capsys.readouterr().err


def test_study_list_and_show(tmp_path: Path) -> None:
    code, text = _main("study", "--list")
    assert code == 0 and all(name in text for name in ("degradation", "lesion", "landscape", "faithfulness"))
    result = run_study("shattered", overrides={**SHATTERED, "depths": (8, 14)}, out=tmp_path / "s", save_figures=False)
    code, text = _main("show", str(tmp_path / "s"))
    assert code == 0 and result["title"] in text and "reproduced" in text.lower()


def test_load_run_keeps_points_before_a_half_written_line(tmp_path: Path) -> None:
    write_json(tmp_path / "config.json", {"kind": "train"})
    with MetricsLog(tmp_path / "metrics.jsonl") as log:
        log.write({"step": 1, "loss": 2.0})
        log.write({"step": 2, "loss": float("nan")})  # stored as null: strict JSON
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')  # a writer killed mid-line
    run = load_run(tmp_path)
    assert [r["step"] for r in run.metrics] == [1, 2] and run.metrics[1]["loss"] is None
    assert len(run.notes) == 1 and "incomplete" in run.notes[0]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n[1]\n{"step": 4}\n')
    records, notes = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 4] and len(notes) == 2
    with pytest.raises(FileNotFoundError):
        load_run(tmp_path / "absent")


def test_pretrained_runs_make_pretrained_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "make_pretrained.py"
    script.write_text("import pathlib\ndef main(argv=None):\n"
                      f"    pathlib.Path({str(tmp_path / 'called')!r}).write_text(repr(argv))\n    return 0\n")
    monkeypatch.setattr(cli, "PRETRAINED_SCRIPT", script)
    assert _main("pretrained", "--quick")[0] == 0
    assert (tmp_path / "called").read_text() == "['--quick']"
    monkeypatch.setattr(cli, "PRETRAINED_SCRIPT", tmp_path / "absent.py")
    assert _main("pretrained")[0] == 2


def test_progress_line_on_a_pipe_prints_every_tenth() -> None:
    stream = io.StringIO()
    bar = cli.TerminalProgress("x", stream)
    for i in range(101):
        bar(i / 100, f"step {i}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("x 100%")


# A metrics.jsonl line as every earlier version wrote it: a NaN stored as null, no "diverged" key, and a
# test loss left out at an evaluation whose loss was not finite.
OLD_LINES = [
    {"step": 1, "total_steps": 2, "epoch": 0.5, "lr": 0.1, "images_per_s": 900.0, "time_s": 0.2, "status": "running",
     "nets": {"residual": {"loss": 2.0, "acc": 0.25, "grad_norm": 1.5, "param_norm": 30.0},
              "plain": {"loss": None, "acc": 0.5, "grad_norm": 1.0, "param_norm": 29.0}}},
    {"step": 2, "total_steps": 2, "epoch": 1.0, "lr": 0.05, "images_per_s": 950.0, "time_s": 0.4, "status": "finished",
     "nets": {"residual": {"loss": 1.5, "acc": 0.5, "grad_norm": 1.2, "param_norm": 30.5, "test_loss": 1.4, "test_acc": 0.6},
              "plain": {"loss": 1.9, "acc": 0.5, "grad_norm": 1.1, "param_norm": 29.5, "test_acc": 0.4}}},
]


def test_old_metrics_lines_read_as_step_records_and_show_lists_their_curves(tmp_path: Path) -> None:
    from resviz.train.records import Status, StepRecord

    write_json(tmp_path / "config.json", {"kind": "train"})
    with MetricsLog(tmp_path / "metrics.jsonl") as log:
        for line in OLD_LINES:
            log.write(line)
    recs = [StepRecord.from_json(r) for r in load_run(tmp_path).metrics]
    assert [r.step for r in recs] == [1, 2] and recs[1].status is Status.FINISHED and recs[1].evaluated
    assert recs[0].nets["plain"].loss != recs[0].nets["plain"].loss  # null -> NaN
    assert recs[1].nets["plain"].test_loss is None and recs[1].nets["residual"].test_acc == 0.6
    assert StepRecord.from_json(recs[1].to_json()) == recs[1]  # what is written now reads back the same
    code, text = _main("show", str(tmp_path))
    assert code == 0 and "residual/test_acc: 1 points, last 0.6 at step 2" in text and "lr: 2 points" in text


def test_study_on_the_zoo_is_the_default_and_gives_the_stored_numbers() -> None:
    from resviz.experiments import stored

    saved = stored.load_stored("degradation")
    assert saved is not None, "pretrained/studies/degradation.json is missing"
    proc = _run("study", "degradation", "--json", "--no-figures")  # no --budget: the zoo
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["config"]["budget"] == "zoo" and result["rows"] == saved["rows"] and result["checks"] == saved["checks"]
