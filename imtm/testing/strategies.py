"""hypothesis strategies for property tests of imtm blocks (Tokens, score matrices, ids, captions).

Shapes and masks are drawn by hypothesis (so failures shrink to small cases);
feature values come from a drawn seed, which keeps tensor generation fast.
Every size argument takes an int or a strategy of ints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from imtm._checks import suggest
from imtm.tokens import Tokens

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "PADDINGS",
    "InputSizes",
    "captions",
    "component_inputs",
    "devices",
    "dtypes",
    "example_inputs",
    "image_ids",
    "masks",
    "score_matrices",
    "tokens",
]

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
    choices = (
        [torch.float32] + ([torch.float64] if float64 else []) + ([torch.bfloat16] if bf16 else [])
    )
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
def masks(
    draw, batch=_BATCH, max_tokens=6, *, contiguous: bool = False, padding: str = "random"
) -> torch.Tensor:
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
    return torch.tensor(
        [_draw_row(draw, n, contiguous, padding) for _ in range(b)], dtype=torch.bool
    ).reshape(b, n)


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


# ---------------------------------------------------------------------- inputs of a whole block
@dataclass(frozen=True)
class InputSizes:
    """The sizes one :func:`component_inputs` draw shares across its values.

    A function given in ``extra=`` receives it and returns a strategy, so a value
    of one's own agrees with the others (same ``Bi``, ``Bt``, ``D``, device ...).

    Attributes:
        bi, bt: images ``Bi`` and captions ``Bt`` (equal when ``paired``).
        n, m: padded widths ``N`` (image tokens) and ``M`` (words).
        d: feature size ``D``; v: vocabulary size ``V``.
        dtype: floating dtype of the features; device: where every tensor lives.
        paired: row ``b`` of the images goes with caption ``b`` (a training batch).
        image_mask, text_mask: the ``(Bi, N)`` and ``(Bt, M)`` masks every image-side and
            caption-side value shares.
        image_ids: ``(Bt,)`` the image id of each caption.
        scale: standard deviation of features, embeddings and logits.
        prefix: leading prefix tokens ([CLS]) of every Tokens value, always real.
    """

    bi: int
    bt: int
    n: int
    m: int
    d: int
    v: int
    dtype: torch.dtype
    device: torch.device
    paired: bool
    image_mask: torch.Tensor
    text_mask: torch.Tensor
    image_ids: torch.Tensor
    scale: float = 1.0
    prefix: int = 0

    @property
    def positives(self) -> torch.Tensor:
        """``(Bi, Bt)`` bool, True where caption ``t`` belongs to image ``i`` (from ``image_ids``)."""
        rows = self.image_ids if self.paired else torch.arange(self.bi, device=self.device)
        return rows[:, None] == self.image_ids[None, :]


#: Vocabulary size of drawn token ids, lexicon logits and labels when ``vocab_size`` is not given.
DEFAULT_VOCAB_SIZE = 16


def _float(generator: torch.Generator, shape, s: InputSizes, low=None, high=None) -> torch.Tensor:
    if low is None:
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * s.scale
    else:
        x = torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low
    return x.to(s.device, s.dtype)


def _ids(generator: torch.Generator, shape, s: InputSizes) -> torch.Tensor:
    return torch.randint(0, s.v, shape, generator=generator).to(s.device)


def _feature_tokens(side: str, unit: bool = False):
    def make(g, s):
        mask = s.image_mask if side == "image" else s.text_mask
        b, n = mask.shape
        feats = torch.randn(b, n, s.d, generator=g, dtype=torch.float64)
        feats = torch.nn.functional.normalize(feats, dim=-1) if unit else feats * s.scale
        return Tokens(feats.to(s.device, s.dtype), mask, num_prefix_tokens=s.prefix)

    return make


def _id_tokens(g, s):
    return Tokens(_ids(g, s.text_mask.shape, s), s.text_mask, num_prefix_tokens=s.prefix)


def _keep_decisions(g, s):
    keep = torch.rand(s.bi, s.bt, s.n, generator=g) < 0.5
    return (keep.to(s.device) & s.image_mask[:, None, :]).to(s.dtype)


def _patch_lexicon(g, s):
    from imtm.components.heads.lexicon import LexiconLogits

    picked = (torch.rand(s.bi, s.n, generator=g) < 0.5).to(s.device) & s.image_mask
    batch_index, token_index = picked.nonzero(as_tuple=True)
    return LexiconLogits(_float(g, (int(batch_index.numel()), s.v), s), batch_index, token_index)


def _masked_patches(g, s):
    return (torch.rand(s.bi, s.n, generator=g) < 0.5).to(s.device) & s.image_mask


def _transport_plan(g, s):
    # Row b couples image b with caption b (a training batch); unpaired, with every word position.
    words = (
        s.text_mask if s.bt == s.bi else torch.ones(s.bi, s.m, dtype=torch.bool, device=s.device)
    )
    valid = s.image_mask[:, :, None] & words[:, None, :]
    plan = torch.rand(s.bi, s.n, s.m, generator=g, dtype=torch.float64).to(s.device) * valid
    return (plan / plan.sum((1, 2), keepdim=True)).to(s.dtype)


def _sparse_mask(g, s):
    w = torch.rand(s.bi, s.bt, generator=g, dtype=torch.float64).to(s.device) * 0.999
    if s.paired:
        w.fill_diagonal_(0.0)
    return w.to(s.dtype)


def _mlm_labels(g, s):
    picked = (torch.rand(s.bt, s.m, generator=g) < 0.3).to(s.device) & s.text_mask
    from imtm.functional.lexicon import IGNORE_INDEX

    return torch.where(
        picked, _ids(g, (s.bt, s.m), s), torch.full_like(picked, IGNORE_INDEX, dtype=torch.long)
    )


def _pair_scores(g, s):
    return _float(g, (s.bi, s.bt), s, -1.0, 1.0)


#: How :func:`component_inputs` makes each name of :data:`imtm.component.VALUE_NAMES`:
#: ``(generator, sizes) -> value``. Names outside it need ``extra=``.
_MAKERS = {
    "images": _feature_tokens("image"),
    "texts": _id_tokens,
    "image_ids": lambda g, s: s.image_ids,
    "positives": lambda g, s: s.positives,
    "image_tokens": _feature_tokens("image"),
    "text_tokens": _feature_tokens("text"),
    "image_embedding": lambda g, s: _float(g, (s.bi, s.d), s),
    "text_embedding": lambda g, s: _float(g, (s.bt, s.d), s),
    "scores": _pair_scores,
    "scores_i2t": _pair_scores,
    "scores_t2i": _pair_scores,
    "keep_decisions": _keep_decisions,
    "patch_scores": lambda g, s: _float(g, (s.bi, s.bt, s.n), s, 0.0, 1.0),
    "aggregated_tokens": lambda g, s: _float(g, (s.bi, s.bt, s.n, s.d), s),
    "fused_tokens": lambda g, s: _float(g, (s.bi, s.bt, s.d), s),
    "patch_lexicon": _patch_lexicon,
    "word_lexicon": lambda g, s: _float(g, (s.bt, s.m, s.v), s),
    "transport_plan": _transport_plan,
    "sparse_mask": _sparse_mask,
    "negatives_i2t": lambda g, s: torch.randint(0, s.bt, (s.bi, s.bt), generator=g).to(s.device),
    "negatives_t2i": lambda g, s: torch.randint(0, s.bi, (s.bi, s.bt), generator=g).to(s.device),
    "visual_phrases": _feature_tokens("image", unit=True),
    "text_phrase": lambda g, s: _float(g, (s.bt, s.d), s),
    "scores_intra": _pair_scores,
    "scores_inter_i2t": _pair_scores,
    "scores_inter_t2i": _pair_scores,
    "masked_patches": _masked_patches,
    "masked_image_tokens": _feature_tokens("image"),
    "word_lexicon_masked": lambda g, s: _float(g, (s.bt, s.m, s.v), s),
    "masked_texts": _id_tokens,
    "masked_text_tokens": _feature_tokens("text"),
    "mlm_labels": _mlm_labels,
    "cross_text_tokens": _feature_tokens("text"),
    "cross_lexicon": lambda g, s: _float(g, (s.bt, s.m, s.v), s),
    "itc_scores": _pair_scores,
    "scores_inter": _pair_scores,
    "token_mask": lambda g, s: s.text_mask[None].expand(s.bi, -1, -1),
    "text_ids": lambda g, s: _ids(g, s.text_mask.shape, s),
}


def _spec_maker(name: str):
    """A maker read from the value's spec (imtm.contract): Tokens, or a float tensor of its shape."""
    from imtm.contract import VALUE_SPECS

    value = VALUE_SPECS.get(name)
    if value is None or value.shape is None:
        return None
    if value.kind == "tokens" and value.batch_axis():
        return _feature_tokens("image" if value.batch_axis() == "Bi" else "text")
    if value.kind != "tensor":
        return None

    def make(g, s):
        axes = {"Bi": s.bi, "Bt": s.bt, "N": s.n, "M": s.m}
        return _float(
            g,
            tuple(axes.get(a, s.d) if isinstance(a, str) or a is None else a for a in value.shape),
            s,
        )

    return make


def _maker(name: str):
    return _MAKERS.get(name) or _spec_maker(name)


def _pixels(shape, s: InputSizes, seed: int, raw: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if raw:  # uint8 pixels: the encoder scales them
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(s.device)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(s.device, s.dtype)


def _input_kind(kind: str, s: InputSizes) -> st.SearchStrategy:
    """The strategy of an example input kind (:data:`imtm.contract.INPUT_KINDS`)."""
    from imtm.contract import EXAMPLE_IMAGE_SIZE, EXAMPLE_WORDS, INPUT_KINDS

    if kind == "captions":
        return captions(list(EXAMPLE_WORDS), batch=s.bt, max_words=4)
    if kind == "pixels":
        shape = (s.bi, 3, EXAMPLE_IMAGE_SIZE, EXAMPLE_IMAGE_SIZE)
        return st.tuples(_SEEDS, st.booleans()).map(lambda sr: _pixels(shape, s, *sr))
    raise ValueError(
        f"component_inputs: extra names the input kind {kind!r}; the kinds are "
        f"{sorted(INPUT_KINDS)}." + suggest(kind, INPUT_KINDS)
    )


# itm_logits and itm_labels share their number of pairs P, so they are drawn together (see _draw_inputs).
_PAIRED_DRAWS = ("itm_logits", "itm_labels")


def _choice(value, what: str, kind) -> st.SearchStrategy:
    if isinstance(value, st.SearchStrategy):
        return value
    if value is None or isinstance(value, kind):
        return st.just(value)
    raise TypeError(
        f"component_inputs: {what} must be a {kind} or a strategy of them, got {value!r}"
    )


def component_inputs(
    block_or_requires,
    *,
    batch=_BATCH,
    max_tokens=6,
    dim=8,
    dtype=torch.float32,
    padding: str = "random",
    device=None,
    vocab_size: int | None = None,
    paired: bool = True,
    scale=1.0,
    num_prefix_tokens=0,
    extra: Mapping[str, object] | None = None,
) -> st.SearchStrategy[dict]:
    """One consistent dict of example values for a block's ``requires``.

    Every name of the shared vocabulary (:data:`imtm.component.VALUE_NAMES`) has a
    maker; the values of one draw agree with each other: ``Bi`` image rows, ``Bt``
    caption rows, ``N`` image tokens and ``M`` words (one ``(Bi, N)`` and one
    ``(Bt, M)`` mask shared by every image-side and caption-side value), feature
    size ``D``, vocabulary ``V``, and ``positives`` derived from ``image_ids``.
    ``images`` are region features (Tokens ``(Bi, N, D)``) and ``texts`` Tokens of
    token ids ``(Bt, M)``; give ``extra={"images": ...}`` for pixels. Padded
    positions hold random values, so a block that reads its padding shows it.

    Args:
        block_or_requires: a block (its ``requires`` is read) or a sequence of value names.
        batch: rows per side (``Bi = Bt = B`` when ``paired``); an int or a strategy.
        max_tokens: ``N`` and ``M`` are drawn in ``[1, max_tokens]``.
        dim: ``D``; an int or a strategy.
        dtype: floating dtype of every feature, score and logit; a dtype or a strategy
            (e.g. :func:`dtypes`).
        padding: one of :data:`PADDINGS` (see :func:`masks`); ``"all_but_one"`` leaves
            one real token per row.
        device: where the tensors live: ``None`` (cpu), a device, or a strategy
            (e.g. :func:`devices`).
        vocab_size: ``V`` of token ids, lexicon logits and labels
            (default :data:`DEFAULT_VOCAB_SIZE`).
        paired: ``True``: a training batch, row ``b`` of the images goes with caption
            ``b`` (``Bi == Bt``, ``positives[i, t] = ids[i] == ids[t]``, ids repeat);
            ``False``: an evaluation block, ``Bi`` and ``Bt`` drawn apart, caption ``t``
            belongs to image ``image_ids[t]``.
        scale: standard deviation of features, embeddings and logits (scores, probabilities
            and unit-norm phrases keep their range); a float or a strategy, e.g.
            ``st.sampled_from([1e-3, 1.0, 1e3])`` for numerical extremes.
        num_prefix_tokens: leading prefix tokens ([CLS]) of every Tokens value (an int or a
            strategy); they are always real, so with ``padding="all_but_one"`` some rows hold
            the prefix alone or the prefix and one token.
        extra: ``{name: strategy}`` for names outside the vocabulary (or to replace a
            maker); instead of a strategy, a function of the drawn :class:`InputSizes`
            returning one, or an example input kind of :data:`imtm.contract.INPUT_KINDS`
            (``"captions"``, ``"pixels"``), as :attr:`imtm.contract.Example.inputs` gives.

    Returns:
        A strategy of ``{name: value}`` with exactly the names of ``requires``.

    Raises:
        ValueError: a required name is neither in the vocabulary nor in ``extra``,
            or ``padding`` is unknown.

    Example:
        >>> from hypothesis import given, settings
        >>> from imtm.components import GlobalCosine
        >>> from imtm.testing import check_outputs
        >>> block = GlobalCosine()
        >>> @settings(max_examples=5, deadline=None)
        ... @given(values=component_inputs(block, padding="all_but_one", paired=False))
        ... def test_scores(values):
        ...     check_outputs(block, values, block(*[values[n] for n in block.requires]))
        >>> test_scores()
    """
    names = tuple(getattr(block_or_requires, "requires", block_or_requires))
    if isinstance(block_or_requires, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"component_inputs: give a block or a sequence of value names, got {block_or_requires!r}"
        )
    where = (
        type(block_or_requires).__name__
        if hasattr(block_or_requires, "requires")
        else "the given names"
    )
    _check_padding(padding)
    extra = dict(extra or {})
    known = set(_MAKERS) | set(_PAIRED_DRAWS) | set(extra)
    for name in names:
        if name not in known and _spec_maker(name) is None:
            raise ValueError(
                f"component_inputs: no strategy for {name!r} (required by {where}): it is not in "
                f"imtm.component.VALUE_NAMES.{suggest(name, sorted(_MAKERS))} Pass one: "
                f"component_inputs(..., extra={{{name!r}: strategy}}), a strategy or a function of the "
                "drawn InputSizes that returns one"
            )
    if vocab_size is not None and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1
    ):
        raise ValueError(
            f"component_inputs: vocab_size must be a positive int or None, got {vocab_size!r}"
        )
    return _draw_inputs(
        names,
        _size(batch, "batch"),
        _size(max_tokens, "max_tokens"),
        _size(dim, "dim"),
        _choice(dtype, "dtype", torch.dtype),
        padding,
        _choice(device, "device", (torch.device, str)),
        vocab_size or DEFAULT_VOCAB_SIZE,
        bool(paired),
        _choice(scale, "scale", (int, float)),
        _choice(num_prefix_tokens, "num_prefix_tokens", int),
        extra,
    )


@st.composite
def _draw_inputs(
    draw, names, batch, max_tokens, dim, dtype, padding, device, v, paired, scale, prefix, extra
):
    bi = draw(batch)
    bt = bi if paired else draw(batch)
    prefix = draw(prefix)
    width = max(draw(max_tokens), prefix)
    image_mask = draw(masks(bi, st.just(width), padding=padding))
    text_mask = draw(masks(bt, st.just(width), padding=padding))
    image_mask[:, :prefix] = True  # a prefix token ([CLS]) is always real
    text_mask[:, :prefix] = True
    device = torch.device(draw(device) or "cpu")
    if paired:
        ids = draw(st.lists(st.integers(0, bi - 1), min_size=bi, max_size=bi))
    else:
        ids = draw(st.lists(st.integers(0, bi - 1), min_size=bt, max_size=bt))
    sizes = InputSizes(
        bi=bi,
        bt=bt,
        n=int(image_mask.shape[1]),
        m=int(text_mask.shape[1]),
        d=draw(dim),
        v=v,
        dtype=draw(dtype),
        device=device,
        paired=paired,
        image_mask=image_mask.to(device),
        text_mask=text_mask.to(device),
        image_ids=torch.tensor(ids, dtype=torch.long, device=device),
        scale=float(draw(scale)),
        prefix=prefix,
    )
    generator = torch.Generator().manual_seed(draw(_SEEDS))
    values = {}
    if any(n in _PAIRED_DRAWS and n not in extra for n in names):
        p = draw(st.integers(1, 3 * bi))
        values["itm_logits"] = _float(generator, (p, 2), sizes)
        values["itm_labels"] = torch.randint(0, 2, (p,), generator=generator).to(device)
    for name in names:
        if name in extra:
            strategy = extra[name]
            if isinstance(strategy, str):
                strategy = _input_kind(strategy, sizes)
            elif not isinstance(strategy, st.SearchStrategy):
                strategy = strategy(sizes)
            values[name] = draw(strategy)
        elif name not in values:
            values[name] = _maker(name)(generator, sizes)
    return {name: values[name] for name in names}


# ---------------------------------------------------------------------- fixed example inputs
def example_inputs(block, example=None, *, seed: int = 0, batch: int = 3, tokens: int = 5) -> dict:
    """One fixed dict of example values for a block's ``requires``, as its :class:`~imtm.contract.Example` asks.

    No hypothesis draw: the same makers as :func:`component_inputs` with fixed sizes (``batch``
    images, ``batch + 1`` captions unless the example is ``paired``; rows of ``tokens`` padded
    positions with ``tokens, tokens - 1, ...`` real ones, at least one), features of
    :data:`imtm.contract.EXAMPLE_DIM`, and a generator seeded with ``seed``. The conformance
    battery reads it when given a block class (:func:`imtm.testing.parametrize_with_checks`).

    Args:
        block: the block (its ``requires`` is read).
        example: its :class:`~imtm.contract.Example` (default: an example of defaults).
        seed: seed of every random value.
        batch: images ``Bi``; tokens: padded widths ``N`` and ``M``.

    Example:
        >>> from imtm.components import GlobalCosine
        >>> values = example_inputs(GlobalCosine())
        >>> values["image_tokens"].feats.shape, values["text_tokens"].mask.sum(1).tolist()
        (torch.Size([3, 5, 8]), [5, 4, 3, 2])
    """
    from imtm.contract import EXAMPLE_DIM, EXAMPLE_VOCAB_SIZE, EXAMPLE_WORDS, Example

    example = Example() if example is None else example
    bi = batch
    bt = batch if example.paired else batch + 1

    def lengths(rows: int) -> torch.Tensor:
        real = torch.tensor([max(1, tokens - r) for r in range(rows)])
        return torch.arange(tokens)[None, :] < real[:, None]

    ids = torch.arange(bt) % bi if not example.paired else torch.arange(bi)
    sizes = InputSizes(
        bi=bi,
        bt=bt,
        n=tokens,
        m=tokens,
        d=EXAMPLE_DIM,
        v=example.vocab_size or EXAMPLE_VOCAB_SIZE,
        dtype=torch.float32,
        device=torch.device("cpu"),
        paired=example.paired,
        image_mask=lengths(bi),
        text_mask=lengths(bt),
        image_ids=ids,
    )
    generator = torch.Generator().manual_seed(seed)
    values: dict = {}
    if any(n in _PAIRED_DRAWS for n in block.requires):
        p = 2 * bi
        values["itm_logits"] = _float(generator, (p, 2), sizes)
        values["itm_labels"] = torch.arange(p) % 2
    for name in block.requires:
        kind = example.inputs.get(name)
        if kind == "captions":
            words = list(EXAMPLE_WORDS)
            picks = torch.randint(0, len(words), (bt, 4), generator=generator).tolist()
            values[name] = [
                " ".join(words[i] for i in row[: 1 + r % 4]) for r, row in enumerate(picks)
            ]
        elif kind == "pixels":
            from imtm.contract import EXAMPLE_IMAGE_SIZE

            shape = (bi, 3, EXAMPLE_IMAGE_SIZE, EXAMPLE_IMAGE_SIZE)
            values[name] = torch.randn(shape, generator=generator)
        elif name not in values:
            maker = _maker(name)
            if maker is None:
                raise ValueError(
                    f"example_inputs: no example for {name!r} (required by {type(block).__name__}): "
                    "it is not in the vocabulary and the block's Example names no input kind for it"
                )
            values[name] = maker(generator, sizes)
    return {name: values[name] for name in block.requires}
