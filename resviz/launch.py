"""``resviz app``: start the Streamlit app that ships with ResViz, on this machine only.

The app is ``app.py`` beside the ``app_pages`` package (in a source checkout and in an installed
wheel alike). Streamlit reads ``.streamlit/config.toml`` only from the working directory, so its
settings are passed as command-line flags instead, and the app behaves the same from any directory.
Nothing here imports streamlit: the app runs in its own ``python -m streamlit`` process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_CONFIG = PACKAGE_DIR / "appconfig" / "config.toml"  # where a wheel carries .streamlit/config.toml


def app_script() -> Path:
    """The app's entry file; raises FileNotFoundError when the app is not installed beside ``resviz``."""
    spec = importlib.util.find_spec("app_pages")
    script = Path(spec.origin).resolve().parent.parent / "app.py" if spec is not None and spec.origin else None
    if script is None or not script.is_file():
        raise FileNotFoundError("the ResViz app (app.py and app_pages/) is not installed; reinstall the resviz package")
    return script


def server_config(script: Path | None = None) -> Path:
    """The app's Streamlit settings: ``.streamlit/config.toml`` of the checkout, else the wheel's copy."""
    beside = (script or app_script()).parent / ".streamlit" / "config.toml"
    return beside if beside.is_file() else SHIPPED_CONFIG


def config_flags(config: Path) -> list[str]:
    """Every setting of a Streamlit ``config.toml`` as ``--section.option=value`` flags."""
    flags = []
    for section, options in tomllib.loads(config.read_text("utf-8")).items():
        for option, value in options.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            flags.append(f"--{section}.{option}={text}")
    return flags


def app_command(port: int = 8501, extra: Sequence[str] = ()) -> list[str]:
    """The ``streamlit run`` command line of the app on 127.0.0.1:``port``; ``extra`` flags come last and win."""
    script = app_script()
    return [sys.executable, "-m", "streamlit", "run", str(script), *config_flags(server_config(script)),
            f"--server.port={port}", *extra]


def run_app(port: int = 8501, extra: Sequence[str] = ()) -> int:
    """Serve the app until it is stopped; returns Streamlit's exit status.

    On POSIX this process becomes Streamlit (``exec``), so a terminal's Ctrl-C or a supervisor's SIGTERM
    reaches the server itself and no orphan is left behind.
    """
    cmd = app_command(port, extra)
    if os.name == "posix":
        os.execv(cmd[0], cmd)
    return subprocess.call(cmd)
