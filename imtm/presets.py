"""Component lists for each paper's model, with the paper's defaults.

Every preset takes the data-dependent pieces as keywords (``vocab`` for the GRU
text encoder, ``region_dim`` for precomputed region features) and returns a list
of ``(name, block)`` pairs ready for :class:`imtm.Matcher`::

    from imtm import Matcher, presets
    m = Matcher(presets.chan(vocab=train.vocab, region_dim=train.region_dim), epochs=30)

:func:`build` reads those pieces from a dataset: ``presets.build("chan", train)``.
"""

from __future__ import annotations

from typing import Any, Callable

from imtm.component import suggest

__all__ = ["vsepp", "chan", "build", "PRESETS"]


def vsepp(*, vocab, region_dim: int, embed_dim: int = 1024, word_dim: int = 300, margin: float = 0.2,
          hardest: bool = True) -> list[tuple[str, Any]]:
    """VSE++ global baseline: region projection + GRU, masked mean pooling, cosine, hardest-negative triplet.

    References:
        Faghri et al., 'VSE++: Improving Visual-Semantic Embeddings with Hard Negatives', BMVC 2018.
    """
    from imtm.components import GlobalCosine, GRUTextEncoder, PrecomputedEncoder, TripletLoss

    return [
        ("image", PrecomputedEncoder(in_dim=region_dim, out_dim=embed_dim)),
        ("text", GRUTextEncoder(vocab=vocab, out_dim=embed_dim, word_dim=word_dim)),
        ("scorer", GlobalCosine()),
        ("loss", TripletLoss(margin=margin, hardest=hardest)),
    ]


def chan(*, vocab, region_dim: int, embed_dim: int = 1024, word_dim: int = 300, codebook: str = "visual",
         pooling: str = "lse", temperature: float = 0.1, margin: float = 0.2, context_heads: int = 8,
         coding: str = "hard", hardest: bool = True) -> list[tuple[str, Any]]:
    """CHAN: precomputed regions + one self-attention context layer, GRU text, hard-assignment coding
    with log-sum-exp pooling, triplet loss with hardest negatives (the paper's defaults).

    Args:
        coding: ``"hard"`` (the paper's model) or ``"soft"`` (cross-attention coding, Table 3).
        hardest: triplet loss with the hardest negative (the paper) or summed over negatives.
            Trained from scratch on small data, the hardest-negative loss can collapse in
            the first epoch (as VSE++ reports); summing is the robust choice there.

    References:
        Pan et al., 'Fine-grained Image-text Matching by Cross-modal Hard Aligning Network', CVPR 2023.
    """
    from imtm.components import (
        GRUTextEncoder,
        HardAssignmentCoding,
        PrecomputedEncoder,
        SelfAttentionContext,
        SoftAssignmentCoding,
        TripletLoss,
    )

    codings = {
        "hard": lambda: HardAssignmentCoding(codebook=codebook, pooling=pooling, temperature=temperature),
        "soft": lambda: SoftAssignmentCoding(pooling=pooling, temperature=temperature),
    }
    if coding not in codings:
        raise ValueError(f"coding must be one of {sorted(codings)}, got {coding!r}." + suggest(coding, codings))
    return [
        ("image", PrecomputedEncoder(in_dim=region_dim, out_dim=embed_dim)),
        ("context", SelfAttentionContext(dim=embed_dim, heads=context_heads)),
        ("text", GRUTextEncoder(vocab=vocab, out_dim=embed_dim, word_dim=word_dim)),
        ("coding", codings[coding]()),
        ("loss", TripletLoss(margin=margin, hardest=hardest)),
    ]


PRESETS: dict[str, Callable[..., list]] = {"vsepp": vsepp, "chan": chan}


def build(name: str, data, **kwargs) -> list[tuple[str, Any]]:
    """The preset ``name`` with ``vocab`` and ``region_dim`` read from a training dataset."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}." + suggest(name, PRESETS))
    if getattr(data, "vocab", None) is None:
        raise ValueError(f"presets.build: {type(data).__name__} has no vocabulary (attribute 'vocab')")
    kwargs.setdefault("vocab", data.vocab)
    if "region_dim" not in kwargs:
        first = data.images[0]
        if first.dim() != 2:
            raise ValueError(f"preset {name!r} needs region features (N, D); the data holds images of shape "
                             f"{tuple(first.shape)}")
        kwargs["region_dim"] = int(first.shape[-1])
    return PRESETS[name](**kwargs)
