"""The package version (one source: ``pyproject.toml`` reads it from here through ``resviz.__version__``)."""

__version__ = "0.1.0"
