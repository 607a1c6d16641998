"""hypothesis strategies for property tests of imtm blocks (Tokens, score matrices, ids, captions).

Shapes and masks are drawn by hypothesis (so failures shrink to small cases);
feature values come from a drawn seed, which keeps tensor generation fast.
Every size argument takes an int or a strategy of ints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hypothesis import strategies as st

from imtm.tokens import Tokens

__all__ = ["PADDINGS", "captions", "devices", "dtypes", "image_ids", "masks", "score_matrices", "tokens"]

#: How :func:`masks` and :func:`tokens` pad a row: any non-empty subset of positions is
#: real (``"random"``), exactly one position is real (``"all_but_one"``, the hardest
#: case for a masked reduction), or nothing is padded (``"none"``).
PADDINGS = ("random", "all_but_one", "none")

_SEEDS = st.integers(0, 2**32 - 1)
#: Default sizes: small, so that property tests stay fast.
_BATCH = st.integers(1, 4)
_SIDE = st.integers(1, 5)
_ID_BATCH = st.integers(1, 6)


def _size(value, what: str) -> st.SearchStrategy[int]:
    if isinstance(value, st.SearchStrategy):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int or a strategy of ints, got {value!r}")
    return st.just(value)


def dtypes(*, bf16: bool = True, float64: bool = True) -> st.SearchStrategy[torch.dtype]:
    """Floating dtypes a block should accept: float32, float64 and (optionally) bfloat16.

    Example:
        >>> from hypothesis import given
        >>> @given(dt=dtypes(bf16=False))
        ... def test_dtype(dt):
        ...     assert dt in (torch.float32, torch.float64)
        >>> test_dtype()
    """
    choices = [torch.float32] + ([torch.float64] if float64 else []) + ([torch.bfloat16] if bf16 else [])
    return st.sampled_from(choices)


def devices() -> st.SearchStrategy[torch.device]:
    """The devices available here: ``cpu``, and ``cuda`` when a GPU is present.

    Example:
        >>> from hypothesis import given
        >>> @given(dev=devices())
        ... def test_device(dev):
        ...     assert torch.zeros(1, device=dev).device.type == dev.type
        >>> test_device()
    """
    found = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return st.sampled_from(found)


def _check_padding(padding: str) -> None:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def _draw_row(draw, n: int, contiguous: bool, padding: str) -> list[bool]:
    if padding == "none":
        return [True] * n
    if padding == "all_but_one":
        keep = 0 if contiguous else draw(st.integers(0, n - 1))
        return [k == keep for k in range(n)]
    if contiguous:
        length = draw(st.integers(1, n))
        return [k < length for k in range(n)]
    row = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    if not any(row):
        row[draw(st.integers(0, n - 1))] = True
    return row


@st.composite
def masks(draw, batch=_BATCH, max_tokens=6, *, contiguous: bool = False, padding: str = "random") -> torch.Tensor:
    """A ``(B, N)`` bool mask with at least one real (True) position per row.

    Args:
        batch: rows ``B``.
        max_tokens: the padded width ``N`` is drawn in ``[1, max_tokens]``.
        contiguous: real positions form a prefix of each row.
        padding: one of :data:`PADDINGS`: ``"random"`` (any non-empty subset),
            ``"all_but_one"`` (exactly one real position per row) or ``"none"``.

    Example:
        >>> from hypothesis import given
        >>> @given(m=masks(batch=3, max_tokens=5, padding="all_but_one"))
        ... def test_one_real(m):
        ...     assert m.sum(1).tolist() == [1, 1, 1]
        >>> test_one_real()
    """
    _check_padding(padding)
    b = draw(_size(batch, "batch"))
    n = draw(st.integers(1, draw(_size(max_tokens, "max_tokens"))))
    return torch.tensor([_draw_row(draw, n, contiguous, padding) for _ in range(b)], dtype=torch.bool).reshape(b, n)


@st.composite
def tokens(
    draw,
    batch=_BATCH,
    max_tokens=6,
    dim=8,
    *,
    contiguous: bool = False,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
    padding: str = "random",
) -> Tokens:
    """Tokens with a random mask holding at least one real token per row.

    Args:
        batch: rows ``B``.
        max_tokens: the padded width ``N`` is drawn in ``[1, max_tokens]``.
        dim: feature size ``D`` (ignored with ``vocab_size``).
        contiguous: real tokens form a prefix of each row (as after ``from_lengths``);
            otherwise any non-empty subset of positions is real.
        vocab_size: draw integer word ids in ``[0, vocab_size)`` of shape ``(B, N)`` instead of features.
        dtype: feature dtype.
        scale: standard deviation of the features. Padded positions hold random
            values too, so a block that reads its padding shows it.
        padding: one of :data:`PADDINGS` (see :func:`masks`); ``"all_but_one"``
            leaves a single real token per row.

    Shape:
        - output: Tokens ``(B, N, D)`` (or ``(B, N)`` ids)

    Example:
        >>> from hypothesis import given
        >>> @given(t=tokens(batch=2, max_tokens=4, dim=3))
        ... def test_rows_are_not_empty(t):
        ...     assert bool(t.mask.any(1).all())
        >>> test_rows_are_not_empty()
    """
    mask = draw(masks(batch, max_tokens, contiguous=contiguous, padding=padding))
    b, n = mask.shape
    generator = torch.Generator().manual_seed(draw(_SEEDS))
    if vocab_size is not None:
        feats = torch.randint(0, vocab_size, (b, n), generator=generator)
    else:
        d = draw(_size(dim, "dim"))
        feats = torch.randn(b, n, d, generator=generator, dtype=torch.float64).mul(scale).to(dtype)
    return Tokens(feats, mask)


@st.composite
def score_matrices(draw, bi=_SIDE, bt=_SIDE, *, dtype=torch.float64, low=-1.0, high=1.0):
    """A ``(Bi, Bt)`` score matrix with entries uniform in ``[low, high)``.

    Example:
        >>> from hypothesis import given
        >>> @given(s=score_matrices(bi=2, bt=3))
        ... def test_shape(s):
        ...     assert s.shape == (2, 3)
        >>> test_shape()
    """
    shape = (draw(_size(bi, "bi")), draw(_size(bt, "bt")))
    generator = torch.Generator().manual_seed(draw(_SEEDS))
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low).to(
        dtype
    )


@st.composite
def image_ids(draw, batch=_ID_BATCH, max_images=None):
    """``(B,)`` long image ids of a batch, repeats allowed (several captions of one image).

    ``positives = ids[:, None] == ids[None, :]`` then marks every matching pair.

    Args:
        batch: ``B``.
        max_images: ids are drawn in ``[0, max_images)`` (default: ``B``, so some batches repeat an image).

    Example:
        >>> from hypothesis import given
        >>> @given(ids=image_ids(batch=4, max_images=2))
        ... def test_ids(ids):
        ...     assert ids.shape == (4,) and int(ids.max()) < 2
        >>> test_ids()
    """
    b = draw(_size(batch, "batch"))
    k = b if max_images is None else draw(_size(max_images, "max_images"))
    return torch.tensor(
        draw(st.lists(st.integers(0, k - 1), min_size=b, max_size=b)), dtype=torch.long
    )


@st.composite
def captions(draw, words: Sequence[str], batch=_BATCH, max_words=6):
    """A list of ``B`` non-empty captions made of ``words``.

    Example:
        >>> from hypothesis import given
        >>> @given(c=captions(["a", "red", "circle"], batch=3))
        ... def test_captions(c):
        ...     assert len(c) == 3 and all(c)
        >>> test_captions()
    """
    if isinstance(words, str) or len(words) == 0:
        raise ValueError(f"captions: words must be a non-empty list of words, got {words!r}")
    b = draw(_size(batch, "batch"))
    m = _size(max_words, "max_words")
    return [
        " ".join(draw(st.lists(st.sampled_from(list(words)), min_size=1, max_size=draw(m))))
        for _ in range(b)
    ]
