"""Number formats and markdown tables for the generated docs (one place, so every page agrees)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DASH = "–"


def pct(v: float | None, digits: int = 1) -> str:
    """A share as a percentage (``0.369`` -> ``36.9%``); None as a dash."""
    return DASH if v is None else f"{v:.{digits}%}"


def sig(v: float | None, digits: int = 3) -> str:
    """``digits`` significant figures, exponents written short (``6980.4`` -> ``6.98e3``); None as a dash."""
    if v is None:
        return DASH
    text = f"{v:.{digits}g}"
    if "e" in text:
        mantissa, exp = text.split("e")
        text = f"{mantissa}e{int(exp)}"
    return text


def fixed(v: float | None, digits: int = 3) -> str:
    """``digits`` decimals; None as a dash."""
    return DASH if v is None else f"{v:.{digits}f}"


def seconds(v: float | None) -> str:
    return DASH if v is None else f"{v:.0f}"


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (cells are written as given; ``|`` is escaped)."""
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(head), "|" + "---|" * len(head), *(line(r) for r in rows)])


def checks(result: dict[str, Any]) -> str:
    """A study's reproduced (or not) orderings as a bullet list, claim and measured detail from the result."""
    return "\n".join(f"- **{'Reproduced' if c['holds'] else 'Not reproduced'}**: {c['claim']}. Measured: {c['detail']}."
                     for c in result.get("checks", []))
