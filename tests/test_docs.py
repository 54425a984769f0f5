"""The committed docs are what ``make docs`` writes from the committed results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.timing import Row, load_results, save_results
from resviz.experiments import stored as stored_results
from scripts.docgen import build, figures, readme, results


def test_experiments_page_is_generated_from_the_stored_results():
    committed = build.EXPERIMENTS.read_text(encoding="utf-8")
    assert committed == build.render_experiments(), "docs/experiments.md is stale: run `make docs`"
    assert "{{" not in committed


def test_readme_performance_table_is_generated_from_the_saved_bench_output():
    assert build.README.read_text(encoding="utf-8") == build.render_readme(), "README.md is stale: run `make docs`"
    header, rows = load_results(readme.BENCH_RESULTS / "cpu.json")
    assert rows and header["machine"]
    assert readme.markdown_table(rows) in build.README.read_text(encoding="utf-8")


def test_every_stored_run_is_there_with_its_cpu_time():
    cpu = results.load_cpu()
    for key, run in results.RUNS.items():
        stored = results.load(key)
        assert stored["study"] == run.study and stored["config"]["seed"] == run.seed
        assert stored["config"]["budget"] == run.budget
        assert all(stored["config"][k] == v for k, v in run.overrides.items())
        if run.budget == "zoo":  # stored by make_pretrained.py --studies with its wall time, not by docgen's refresh
            assert stored["time_s"] > 0 and stored["command"] == f"python -m resviz study {run.study} --budget zoo --seed 0"
            # measured on the nets shipped now: a retrained net makes its studies' stored results stale
            assert stored["nets"] == stored_results.nets_used(stored), f"{key} is stale: run make_pretrained.py --studies"
            assert bool(stored["nets"]) == stored["source"].startswith("pretrained"), key
        else:
            assert cpu[key] > 0


def test_every_figure_shown_exists_and_is_built_from_its_stored_run():
    page = build.render_experiments()
    refs = figures.references(page)
    assert len(refs) >= 17
    built = figures.build(refs, build.stored_results())
    assert sorted(built) == sorted(r.file for r in refs)
    shown = {r.file for r in refs}
    on_disk = {p.name for p in build.IMAGES.glob("*.png")}
    assert shown == on_disk, "docs/img/experiments/ and the page disagree: run `make docs`"
    for name in shown:
        assert (build.IMAGES / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_figure_of_no_stored_run_is_refused():
    with pytest.raises(ValueError, match="no stored run"):
        figures.references("![x](img/experiments/nosuchstudy_curve.png)")
    with pytest.raises(KeyError, match="has no figure"):
        figures.build(figures.references("![x](img/experiments/shattered_nosuchfigure.png)"),
                      {"shattered": results.load("shattered")})


def test_fill_names_every_missing_placeholder():
    assert build.fill("a {{x.y}} b", {"x.y": "1"}) == "a 1 b"
    with pytest.raises(KeyError, match="b.c, d"):
        build.fill("{{d}} {{b.c}}", {})


def test_saved_bench_output_round_trips_and_fills_only_its_own_block(tmp_path):
    rows = [Row("1", "a | b", "10 img/s", "A: 9 img/s", 1.1, ">= 1.00x", True, 1.05),
            Row("5", "accuracy", "50%", ratio=float("nan"), met=False, data={"residual": 0.5, "plain": float("inf")})]
    header = {"machine": ["CPU: test"], "load_start": "0.1", "load_end": "0.2", "wall_s": 3, "quick": True,
              "sections": ["train"], "threads": 2}
    save_results(tmp_path / "cpu.json", header, rows)
    assert json.loads((tmp_path / "cpu.json").read_text())["rows"][1]["ratio"] is None  # strict JSON
    got_header, got = load_results(tmp_path / "cpu.json")
    assert got_header == header and got[0] == rows[0] and got[1].data == {"residual": 0.5, "plain": None}
    text = "x\n<!-- bench:cpu -->\nold\n<!-- /bench:cpu -->\n<!-- bench:gpu -->\nkept\n<!-- /bench:gpu -->\n"
    out = readme.render(text, tmp_path, tmp_path / "no-manifest.json")
    assert "old" not in out and "kept" in out and "a \\| b" in out and "`python bench/bench.py --quick --sections train`" in out
    assert "Targets not met in this run: accuracy." in out
    assert readme.render(out, tmp_path, tmp_path / "no-manifest.json") == out  # idempotent


def test_pretrained_block_lists_every_checkpoint_of_the_manifest(tmp_path):
    manifest = {"checkpoints": [{"name": "a_net", "description": "A net", "test_acc": 0.9123},
                                {"name": "b_net", "description": "B net", "test_acc": 0.5}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    out = readme.render("<!-- pretrained -->\nold\n<!-- /pretrained -->\n", tmp_path, tmp_path / "manifest.json")
    assert "| `a_net` | A net | 91.2% |" in out and "| `b_net` | B net | 50.0% |" in out and "old" not in out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
@pytest.mark.parametrize("inside_a_loop", [False, True])
def test_figures_export_as_png_through_the_system_chromium(tmp_path: Path, inside_a_loop: bool):
    pytest.importorskip("kaleido")
    if inside_a_loop:  # as when a browser driver or a notebook already runs an event loop in this thread
        import asyncio
        import threading

        refs = figures.references("![a](img/experiments/shattered_correlation_by_depth.png)")

        async def inside() -> None:
            figures.write_png(figures.build(refs, {"shattered": results.load("shattered")}), tmp_path / "loop")

        # a thread of its own, so that the test does not depend on whether this thread already runs a loop
        errors: list[BaseException] = []
        worker = threading.Thread(target=lambda: _capture(errors, lambda: asyncio.run(inside())))
        worker.start()
        worker.join()
        assert not errors, errors
        assert (tmp_path / "loop" / "shattered_correlation_by_depth.png").read_bytes()[:4] == b"\x89PNG"
    refs = figures.references("![a](img/experiments/shattered_correlation_by_depth.png)")
    written = figures.write_png(figures.build(refs, {"shattered": results.load("shattered")}), tmp_path)
    png = written[0].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == figures.WIDTH * 1  # PNG width (scale 1)


def _capture(errors: list[BaseException], fn) -> None:
    try:
        fn()
    except BaseException as e:  # handed to the test's thread
        errors.append(e)
