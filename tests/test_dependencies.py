"""Installed dependency versions stay above the floors that exclude known advisories."""

from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# torch >= 2.10: weights-only unpickler fixes; pillow >= 12.3: decoder fixes; streamlit >= 1.54: server fixes.
FLOORS = {"torch": (2, 10), "pillow": (12, 3), "streamlit": (1, 54), "safetensors": (0, 4)}


def _major_minor(text: str) -> tuple[int, int]:
    parts = text.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


@pytest.mark.parametrize("package, floor", sorted(FLOORS.items()))
def test_installed_version_is_at_least_the_floor(package, floor):
    assert _major_minor(version(package)) >= floor, f"{package} {version(package)} is below {floor}"


def test_requirements_file_pins_the_floors():
    text = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    assert "torch==2.14.1" in text and "torchvision==0.29.1" in text
    assert "pillow>=12.3" in text and "streamlit>=1.54" in text


def test_streamlit_config_is_hardened():
    import tomllib

    with open(ROOT / ".streamlit" / "config.toml", "rb") as f:
        cfg = tomllib.load(f)
    assert cfg["server"]["address"] == "127.0.0.1"
    assert cfg["server"]["headless"] is True
    assert cfg["server"]["enableXsrfProtection"] is True
    assert cfg["browser"]["gatherUsageStats"] is False
    assert 1 <= cfg["server"]["maxUploadSize"] <= 200
    assert cfg["client"]["showErrorDetails"] == "none"
