"""The version of imtm, in one place: ``pyproject.toml`` reads it, ``imtm.__version__`` re-exports it."""

__version__ = "0.1.0"
