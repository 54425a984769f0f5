"""The package as pip builds it: the wheel declares its dependencies and the ``resviz`` console script and
carries the app and the shipped checkpoints; unpacked elsewhere, it works from any directory."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# What a source distribution of the project holds: everything the wheel is built from.
SOURCES = ("pyproject.toml", "requirements.txt", "README.md", "app.py", "app_pages", "resviz", "pretrained", ".streamlit")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel pip builds offline from a copy of the sources (the checkout stays untouched)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(out)], cwd=out)
    (found,) = out.glob("resviz-*.whl")
    return found


def _dist_info(whl: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in whl.namelist() if n.endswith(f".dist-info/{name}")]
    return whl.read(path).decode()


def test_wheel_declares_the_pins_of_requirements_txt(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        declared = Parser().parsestr(_dist_info(whl, "METADATA")).get_all("Requires-Dist")
    pinned = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]

    def key(text: str) -> tuple[str, object]:
        req = Requirement(text)
        return req.name, req.specifier

    assert sorted(map(key, declared), key=str) == sorted(map(key, pinned), key=str)


def test_wheel_is_named_after_the_library_version(wheel: Path) -> None:
    import resviz

    assert wheel.name.startswith(f"resviz-{resviz.__version__}-")


def test_top_level_api_holds_what_scripts_reach_for() -> None:
    import resviz

    assert all(hasattr(resviz, name) for name in resviz.__all__)
    wanted = {"NetConfig", "TrainConfig", "build_net", "plain_twin", "load_dataset", "Trainer", "fit", "evaluate",
              "save_checkpoint", "load_checkpoint", "inspect_image", "explain", "Lesion"}
    assert wanted <= set(resviz.__all__)


def test_wheel_has_the_resviz_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        entry_points = configparser.ConfigParser()
        entry_points.read_string(_dist_info(whl, "entry_points.txt"))
    assert entry_points["console_scripts"]["resviz"] == "resviz.cli:main"


def test_wheel_carries_the_library_the_app_and_the_checkpoints(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        config = whl.read("resviz/appconfig/config.toml").decode()
        manifest = json.loads(whl.read("resviz/pretrained/manifest.json"))
    library = {p.relative_to(ROOT).as_posix() for p in (ROOT / "resviz").rglob("*.py")}
    assert library <= names, f"modules left out of the wheel: {sorted(library - names)}"
    assert {"app.py", *(f"app_pages/{p.name}" for p in (ROOT / "app_pages").glob("*.py"))} <= names
    assert config == (ROOT / ".streamlit" / "config.toml").read_text()
    shipped = {f"resviz/pretrained/{p.name}" for p in (ROOT / "pretrained").iterdir() if p.suffix in (".json", ".safetensors")}
    studies = {f"resviz/pretrained/studies/{p.name}" for p in (ROOT / "pretrained" / "studies").glob("*.json")}
    assert len(manifest["checkpoints"]) >= 1 and shipped <= names
    assert studies and studies <= names  # the zoo's stored study results: the installed Experiments page opens with them


def test_resviz_app_serves_the_checkout_app_with_its_streamlit_settings() -> None:
    from resviz import launch

    command = launch.app_command(8600, ["--server.address=0.0.0.0"])
    assert command[1:5] == ["-m", "streamlit", "run", str(ROOT / "app.py")]
    flags = launch.config_flags(ROOT / ".streamlit" / "config.toml")
    assert {"--server.address=127.0.0.1", "--server.headless=true", "--runner.postScriptGC=false"} <= set(flags)
    assert command[5:-2] == flags and command[-2:] == ["--server.port=8600", "--server.address=0.0.0.0"]  # last wins


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(port: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.slow
def test_installed_wheel_works_from_any_directory(wheel: Path, tmp_path: Path) -> None:
    """Installed into a folder of its own and used from another: the CLI, the shipped models, the app."""
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
         cwd=elsewhere)
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("RESVIZ_PRETRAINED", None)
    where = _run([sys.executable, "-c", "import resviz, app_pages; from resviz import zoo; "
                  "print(resviz.__file__, app_pages.__file__, zoo.PRETRAINED_DIR, len(zoo.shipped_models()))"],
                 elsewhere, env).split()
    assert all(Path(p).is_relative_to(target) for p in where[:3]) and int(where[3]) >= 1
    assert "degradation" in _run([sys.executable, "-m", "resviz", "study", "--list"], elsewhere, env)
    script = target / "bin" / "resviz"
    command = _run([sys.executable, str(script), "app", "--print-command"], elsewhere, env)
    assert str(target / "app.py") in command and "--server.address=127.0.0.1" in command
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(script), "app", "--port", str(port)], cwd=elsewhere, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _health(port, 90) == "ok"
    finally:
        server.terminate()
        server.wait(30)
    probe = ("from streamlit.testing.v1 import AppTest; at = AppTest.from_file(r'%s', default_timeout=120); at.run(); "
             "assert not at.exception, at.exception; print(at.title[0].value)") % (target / "app.py")
    assert "Why residual networks work" in _run([sys.executable, "-c", probe], elsewhere, env)  # the landing page
