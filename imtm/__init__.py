"""imtm: image-text matching components for PyTorch.

Shape glossary, used in every docstring:

- ``B``: batch size (``Bi`` images, ``Bt`` captions)
- ``N``: image tokens (regions or patches); ``M``: words
- ``D``: feature dimension; ``K``: kept / top-k; ``V``: vocabulary size

Score matrices are always ``scores[i, t]``: images are rows, captions columns.
Masks are bool, True where a token is real.
"""

from imtm.tokens import Tokens
from imtm.component import Component, Loss, VALUE_NAMES, register

__version__ = "0.1.0"

__all__ = ["Tokens", "Component", "Loss", "VALUE_NAMES", "Matcher", "Stage", "register", "__version__"]


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
