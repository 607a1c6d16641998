"""imtm: image-text matching components for PyTorch.

Shape glossary, used in every docstring:

- ``B``: batch size (``Bi`` images, ``Bt`` captions)
- ``N``: image tokens (regions or patches); ``M``: words
- ``D``: feature dimension; ``K``: kept / top-k; ``V``: vocabulary size

Score matrices are always ``scores[i, t]``: images are rows, captions columns.
Masks are bool, True where a token is real.
"""

from imtm._version import __version__
from imtm.component import VALUE_NAMES, Component, Loss, register
from imtm.tokens import Tokens

__all__ = [
    "Tokens",
    "Component",
    "Loss",
    "VALUE_NAMES",
    "Matcher",
    "Stage",
    "register",
    "__version__",
]


def __getattr__(name):
    # The Matcher imports every component; load it lazily so that importing one
    # functional from imtm stays light.
    if name in ("Matcher", "Stage", "NotFittedError"):
        from imtm import matcher

        return getattr(matcher, name)
    if name == "presets":
        import importlib

        return importlib.import_module("imtm.presets")
    raise AttributeError(f"module 'imtm' has no attribute {name!r}")
