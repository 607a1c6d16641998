"""The markers a block uses to say "my own folder inside a saved model folder".

They sit below every layer (a block returns :data:`ASSETS` from ``portable_params`` and receives
an :class:`AssetPath` when loaded), so that blocks need not import the engine that writes and
reads model folders (:mod:`imtm.engine.serialization` re-exports both).
"""

from __future__ import annotations

__all__ = ["ASSETS", "AssetPath"]


class _Assets:
    """The marker :data:`ASSETS` (one instance)."""

    def __repr__(self) -> str:
        return "ASSETS"


#: A value of :meth:`imtm.Component.portable_params`: "this block's own folder inside the saved
#: model folder". ``config.json`` stores it as ``{"__asset__": "<block name>"}``.
ASSETS = _Assets()


class AssetPath(str):
    """The path of a block's asset folder inside a loaded model folder (a ``str``).

    Remembers the relative name (:attr:`asset`) so that saving the loaded model again
    stores ``{"__asset__": name}``, never the absolute path it was loaded from.
    """

    asset: str

    def __new__(cls, path: str, asset: str):
        obj = super().__new__(cls, path)
        obj.asset = asset
        return obj

    def __reduce__(self):
        return (AssetPath, (str(self), self.asset))
