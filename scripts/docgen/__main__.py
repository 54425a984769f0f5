"""Command line of :mod:`scripts.docgen` (see its docstring)."""

from __future__ import annotations

import argparse
import sys

import scripts.docgen
from scripts.docgen import results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.docgen", description=scripts.docgen.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="*", help="'results [KEY ...]' runs the studies again; nothing: write the docs")
    p.add_argument("--no-figures", action="store_true", help="write the markdown only")
    args = p.parse_args(argv)
    if args.what[:1] == ["results"]:
        results.refresh(args.what[1:] or None)
        return 0
    from scripts.docgen import build

    build.write_all(images=not args.no_figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
