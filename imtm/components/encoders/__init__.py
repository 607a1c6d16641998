"""Encoders: raw images or captions -> Tokens (precomputed region features, a BiGRU over words)."""

from imtm.components.encoders.gru_text import GRUTextEncoder
from imtm.components.encoders.precomputed import PrecomputedEncoder

__all__ = ["GRUTextEncoder", "PrecomputedEncoder"]
