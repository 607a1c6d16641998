"""What a block declares about itself, and the one place that enforces it.

Every block states two things next to its class:

- **value specs**: what the names in ``requires`` / ``provides`` mean. The shared vocabulary
  is :data:`VALUE_SPECS`; each :class:`ValueSpec` gives the side of the batch a value
  follows (``"image"``, ``"text"``, ``"pair"`` or ``"none"``), its kind (``"tokens"``,
  ``"tensor"``, ``"scalar"``, ``"any"``) and its shape in the glossary letters. A block that
  introduces a value of its own lists it in a ``values`` class attribute, which adds it here.
- **parameter constraints**: ``_parameter_constraints = {"name": [constraint, ...]}``, as in
  scikit-learn. A parameter is valid when it satisfies any one of its constraints:
  :class:`Interval`, :class:`Options`, :class:`InstanceOf`, :class:`Satisfies`, the string
  ``"boolean"``, or ``None`` (the value ``None``).
- **examples**: a ``_examples`` classmethod returning :class:`Example` s: small constructor
  arguments (sizes of :data:`EXAMPLE_DIM`, :data:`EXAMPLE_VOCAB_SIZE`,
  :data:`EXAMPLE_IMAGE_SIZE`) and what the block's example inputs need (a training batch,
  captions as strings, pixels, the error documented for some inputs).

:func:`check_params` enforces the constraints (``Component.validate`` calls it, so
``Matcher.validate``, ``fit`` and a block's first call do); the pipeline plan
(:func:`side_of`), the conformance battery (:func:`spec`) and the documentation read the
value specs; the sweeps, ``imtm.testing.parametrize_with_checks`` and the documentation's
block table read the examples through :func:`examples`.

Example:
    >>> from numbers import Real
    >>> import imtm
    >>> class Scale(imtm.Component):
    ...     requires = ("scores",)
    ...     provides = ("scores",)
    ...     _parameter_constraints = {"factor": [Interval(Real, 0, None, closed="neither")]}
    ...     def __init__(self, factor=2.0, *, requires=None, provides=None):
    ...         super().__init__(requires=requires, provides=provides)
    ...         self.factor = factor
    ...     def forward(self, scores):
    ...         return scores * self.factor
    >>> Scale(factor=-1.0).validate()
    Traceback (most recent call last):
    ...
    imtm.contract.InvalidParameterError: Scale: factor must be a finite number > 0, got -1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import torch

from imtm._checks import suggest

__all__ = [
    "InvalidParameterError",
    "Interval",
    "Options",
    "InstanceOf",
    "Satisfies",
    "ValueSpec",
    "VALUE_SPECS",
    "SIDES",
    "KINDS",
    "register_value",
    "POSITIVE",
    "POSITIVE_INT",
    "block_or_name",
    "BLOCK_BUDGET",
    "COMPUTE_DTYPE",
    "spec",
    "side_of",
    "vocabulary_table",
    "parameter_constraints",
    "refused_values",
    "check_params",
    "check_param",
    "check_value",
    "Example",
    "EXAMPLE_DIM",
    "EXAMPLE_VOCAB_SIZE",
    "EXAMPLE_IMAGE_SIZE",
    "EXAMPLE_WORDS",
    "INPUT_KINDS",
    "examples",
    "example_call",
    "blocks_table",
]


class InvalidParameterError(ValueError, TypeError):
    """A constructor argument outside what its block declares (both a ValueError and a TypeError).

    As scikit-learn's ``InvalidParameterError``: code that catches either error type catches it.
    """


# ---------------------------------------------------------------------- constraints
class _Constraint:
    """One accepted set of values; ``describe`` completes "must be ..."."""

    def is_satisfied_by(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"


def _is_number(value: Any, kind: type) -> bool:
    # bool is an int to Python, never a number to a block: True as a margin is a mistake.
    return isinstance(value, kind) and not isinstance(value, bool)


class Interval(_Constraint):
    """Numbers of ``kind`` (``numbers.Integral`` or ``numbers.Real``, or ``int`` / ``float``) in a range.

    Args:
        kind: ``Integral`` / ``int`` (whole numbers) or ``Real`` / ``float`` (any real number).
        left, right: the bounds; ``None`` for no bound on that side.
        closed: which bounds belong to the range: ``"both"``, ``"left"``, ``"right"`` or ``"neither"``.

    A real value must also be finite (NaN and inf are never a hyper-parameter); ``bool`` is
    never a number.

    Example:
        >>> Interval(Real, 0, 1, closed="left").is_satisfied_by(1.0)
        False
        >>> Interval(int, 2, None).describe()
        'an integer >= 2'
    """

    def __init__(
        self, kind: type, left: float | None, right: float | None, *, closed: str = "both"
    ):
        if kind in (int, Integral):
            kind = Integral
        elif kind in (float, Real):
            kind = Real
        else:
            raise TypeError(
                f"Interval: kind must be Integral or Real (or int / float), got {kind!r}"
            )
        if closed not in ("both", "left", "right", "neither"):
            raise ValueError(
                f"Interval: closed must be 'both', 'left', 'right' or 'neither', got {closed!r}"
            )
        self.kind, self.left, self.right, self.closed = kind, left, right, closed

    def is_satisfied_by(self, value: Any) -> bool:
        if not _is_number(value, self.kind):
            return False
        if self.kind is Real and not math.isfinite(value):
            return False
        lo_closed = self.closed in ("both", "left")
        hi_closed = self.closed in ("both", "right")
        if self.left is not None and (value < self.left or (value == self.left and not lo_closed)):
            return False
        return not (
            self.right is not None
            and (value > self.right or (value == self.right and not hi_closed))
        )

    def describe(self) -> str:
        what = "an integer" if self.kind is Integral else "a finite number"
        lo_closed = self.closed in ("both", "left")
        hi_closed = self.closed in ("both", "right")
        if self.kind is Integral and self.left == 1 and lo_closed and self.right is None:
            return "a positive int"
        if self.right is None and self.left is not None:
            return f"{what} {'>=' if lo_closed else '>'} {self.left}"
        if self.left is None and self.right is not None:
            return f"{what} {'<=' if hi_closed else '<'} {self.right}"
        if self.left is None:
            return what
        lo = "[" if lo_closed else "("
        hi = "]" if hi_closed else ")"
        return f"{what} in {lo}{self.left}, {self.right}{hi}"

    def bad_values(self) -> list[Any]:
        """Values just outside the range (and one of the wrong kind), for tests that must be refused."""
        out: list[Any] = [True, "1"]
        step = 1 if self.kind is Integral else 0.5
        if self.left is not None:
            out.append(self.left if self.closed in ("right", "neither") else self.left - step)
        if self.right is not None:
            out.append(self.right if self.closed in ("left", "neither") else self.right + step)
        if self.kind is Real:
            out.append(float("nan"))
        else:
            out.append(1.5)
        return out


class Options(_Constraint):
    """One of a fixed set of values (usually strings); a miss gets a "did you mean" suggestion.

    Example:
        >>> Options({"max", "mean"}).describe()
        "one of ['max', 'mean']"
    """

    def __init__(self, options: Iterable[Any]):
        self.options = frozenset(options)

    def is_satisfied_by(self, value: Any) -> bool:
        try:
            return value in self.options and not isinstance(value, bool)
        except TypeError:  # an unhashable value is no option
            return False

    def describe(self) -> str:
        return f"one of {sorted(self.options, key=str)}"

    def bad_values(self) -> list[Any]:
        return ["not-an-option", 3]


class InstanceOf(_Constraint):
    """An instance of one of ``types`` (``bool`` is refused where ``int`` or ``float`` is asked)."""

    def __init__(self, *types: type):
        self.types = types

    def is_satisfied_by(self, value: Any) -> bool:
        if isinstance(value, bool) and bool not in self.types:
            return False
        return isinstance(value, self.types)

    def describe(self) -> str:
        return " or ".join(
            ("an " if t.__name__[0] in "aeiou" else "a ") + t.__name__ for t in self.types
        )

    def bad_values(self) -> list[Any]:
        if all(issubclass(t, torch.nn.Module) for t in self.types):
            # A module attribute holds only modules (or None): torch refuses anything else on
            # assignment, so the values to refuse are None and another module.
            return [None, torch.nn.Identity()]
        return [object()]


class Satisfies(_Constraint):
    """A value for which ``predicate(value)`` is true; ``description`` completes "must be ...".

    ``refused``: values the predicate refuses, for the tests that try them (default: a bare
    ``object()``; a module attribute needs modules or None, which torch lets through to the check).
    """

    def __init__(
        self,
        predicate: Callable[[Any], bool],
        description: str,
        *,
        refused: Iterable[Any] | None = None,
    ):
        self.predicate, self.description = predicate, description
        self.refused = None if refused is None else list(refused)

    def is_satisfied_by(self, value: Any) -> bool:
        try:
            return bool(self.predicate(value))
        except (TypeError, ValueError):
            return False

    def describe(self) -> str:
        return self.description

    def bad_values(self) -> list[Any]:
        return [object()] if self.refused is None else list(self.refused)


class _Boolean(_Constraint):
    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool too

    def describe(self) -> str:
        return "True or False"

    def bad_values(self) -> list[Any]:
        return [1, "yes"]


class _Anything(_Constraint):
    def is_satisfied_by(self, value: Any) -> bool:
        return True

    def describe(self) -> str:
        return "anything"


class _NoneConstraint(_Constraint):
    def is_satisfied_by(self, value: Any) -> bool:
        return value is None

    def describe(self) -> str:
        return "None"

    def bad_values(self) -> list[Any]:
        return []


#: A finite number > 0 (a temperature, a scale).
POSITIVE = Interval(Real, 0, None, closed="neither")
#: A whole number >= 1 (a size, a count of layers).
POSITIVE_INT = Interval(Integral, 1, None, closed="left")
#: The blocked scorers' memory budget (elements of one block's similarities); ``None``: the default.
BLOCK_BUDGET: list[Any] = [Interval(Integral, 1, None, closed="left"), None]
#: The dtype of the blocked scorers' matrix products; ``None``: the inputs'.
COMPUTE_DTYPE: list[Any] = [
    None,
    Satisfies(
        lambda d: isinstance(d, torch.dtype) and d.is_floating_point,
        "a floating torch.dtype such as torch.bfloat16",
    ),
]


def block_or_name(*types: type, description: str) -> Satisfies:
    """The constraint of a linked block's argument: its name in the pipeline or the block itself.

    Example:
        >>> block_or_name(torch.nn.Linear, description="a linear layer").describe()
        'a block name or a linear layer'
    """
    return Satisfies(
        lambda value: isinstance(value, (str, *types)), f"a block name or {description}"
    )


def _make_constraint(c: Any) -> _Constraint:
    if isinstance(c, _Constraint):
        return c
    if c is None:
        return _NoneConstraint()
    if c == "boolean":
        return _Boolean()
    if isinstance(c, type):
        return InstanceOf(c)
    raise TypeError(
        f"unknown parameter constraint {c!r}: use Interval, Options, InstanceOf, Satisfies, "
        "'boolean', None or a type"
    )


def check_value(value: Any, constraints: Iterable[Any], *, name: str, where: str) -> None:
    """Raise :class:`InvalidParameterError` unless ``value`` satisfies one of ``constraints``.

    The message says what, where and what is allowed, e.g.
    ``"HardAssignmentCoding: pooling must be one of ['lse', 'max', ...], got 'mx'. Did you mean 'max'?"``.
    """
    made = [_make_constraint(c) for c in constraints]
    if any(c.is_satisfied_by(value) for c in made):
        return
    described = [c.describe() for c in made]
    allowed = (
        described[0] if len(described) == 1 else ", ".join(described[:-1]) + " or " + described[-1]
    )
    hint = ""
    for c in made:
        if isinstance(c, Options) and isinstance(value, str):
            hint = suggest(value, sorted(map(str, c.options)))
    raise InvalidParameterError(
        f"{where}: {name} must be {allowed}, got {value!r}{'.' + hint if hint else ''}"
    )


def refused_values(constraints: Iterable[Any]) -> list[Any]:
    """Values that none of ``constraints`` accepts (drawn from each one's edges), for tests to try.

    Example:
        >>> refused_values([Interval(Real, 0, 1, closed="right"), None])
        [True, '1', 0, 1.5, nan]
    """
    made = [_make_constraint(c) for c in constraints]
    candidates = [v for c in made for v in getattr(c, "bad_values", lambda: [])()]
    return [v for v in candidates if not any(c.is_satisfied_by(v) for c in made)]


def parameter_constraints(cls: type) -> dict[str, list[Any]]:
    """The constraints a block class declares, merged along its bases (a subclass's entry wins)."""
    out: dict[str, list[Any]] = {}
    for base in reversed(cls.__mro__):
        declared = base.__dict__.get("_parameter_constraints")
        if declared:
            out.update(declared)
    return out


def check_param(block: Any, name: str, value: Any) -> None:
    """Check one value against what ``block``'s class declares for parameter ``name``.

    For a block that builds layers in ``__init__`` from some of its arguments (a dimension): it
    checks those before building, and leaves the rest to ``validate()``, as scikit-learn would.
    """
    check_value(
        value,
        parameter_constraints(type(block)).get(name, ()) or [_Anything()],
        name=name,
        where=type(block).__name__,
    )


def check_params(block: Any, params: Mapping[str, Any] | None = None) -> None:
    """Check every constructor argument of ``block`` that its class constrains.

    Args:
        block: an object with ``get_params(deep=False)`` (every :class:`imtm.Component`).
        params: the values to check; default: ``block.get_params(deep=False)``.

    Raises:
        InvalidParameterError: naming the block, the parameter, what it accepts and the value.
        TypeError: the class constrains a name that is no constructor argument (a typo in the
            declaration itself).
    """
    constraints = parameter_constraints(type(block))
    if not constraints:
        return
    params = block.get_params(deep=False) if params is None else params
    where = type(block).__name__
    # A name a base class constrains (Loss's weight) may be no argument of a subclass; a name the
    # class itself constrains must be one (a typo in the declaration).
    own = type(block).__dict__.get("_parameter_constraints") or {}
    unknown = sorted(set(own) - set(params))
    if unknown:
        raise TypeError(
            f"{where}._parameter_constraints names {unknown}, which are not constructor arguments "
            f"(those are {sorted(params)})"
        )
    for name, accepted in constraints.items():
        if name not in params or accepted == "no_validation":
            continue
        check_value(params[name], accepted, name=name, where=where)


# ---------------------------------------------------------------------- value specs
#: The sides a value can follow: the images' batch axis, the captions', both (a matrix over
#: every image-caption pair), or none of them (a loss, sampled pairs).
SIDES = ("image", "text", "pair", "none")
#: What a value is: Tokens, a plain tensor, a 0-dim tensor, or anything else (a dataclass, a list).
KINDS = ("tokens", "tensor", "scalar", "any")


@dataclass(frozen=True)
class ValueSpec:
    """What one value name means: the side it follows, its kind and shape, in words.

    Args:
        name: the value name used in ``requires`` / ``provides``.
        side: ``"image"``, ``"text"``, ``"pair"`` or ``"none"`` (see :data:`SIDES`).
        kind: ``"tokens"``, ``"tensor"``, ``"scalar"`` or ``"any"`` (see :data:`KINDS`).
        shape: the axes in glossary letters (``"Bi"``, ``"Bt"``, ``"N"``, ``"M"``), an ``int``, or
            ``None`` for a size of its own; ``None`` for no documented shape. For Tokens, the
            axes of ``feats`` (its first is the batch).
        doc: one line for people.
    """

    name: str
    side: str
    kind: str
    shape: tuple[str | int | None, ...] | None
    doc: str

    def __post_init__(self):
        if self.side not in SIDES:
            raise ValueError(
                f"ValueSpec {self.name!r}: side must be one of {list(SIDES)}, got {self.side!r}"
            )
        if self.kind not in KINDS:
            raise ValueError(
                f"ValueSpec {self.name!r}: kind must be one of {list(KINDS)}, got {self.kind!r}"
            )

    def batch_axis(self) -> str | None:
        """``"Bi"`` / ``"Bt"``: the batch the first axis follows (``None``: none documented)."""
        if self.shape and self.shape[0] in ("Bi", "Bt"):
            return str(self.shape[0])
        return None


def _v(name, side, kind, shape, doc) -> ValueSpec:
    return ValueSpec(name, side, kind, shape, doc)


#: The shared vocabulary of value names that flow between blocks, by name.
VALUE_SPECS: dict[str, ValueSpec] = {
    s.name: s
    for s in (
        _v(
            "images",
            "image",
            "any",
            None,
            "raw image batch: pixels (Bi, 3, H, W) or precomputed region features as Tokens (Bi, N, D)",
        ),
        _v(
            "texts",
            "text",
            "any",
            None,
            "raw caption batch: a list of strings, or Tokens of integer token ids (Bt, M)",
        ),
        _v(
            "image_ids",
            "text",
            "tensor",
            ("Bt",),
            "(Bt,) long: for each caption in the batch, the id of its image",
        ),
        _v(
            "positives",
            "pair",
            "tensor",
            ("Bi", "Bt"),
            "(Bi, Bt) bool: True for matching image-caption pairs (derived from image_ids)",
        ),
        _v(
            "image_tokens",
            "image",
            "tokens",
            ("Bi", "N", None),
            "Tokens (Bi, N, D) after encoding and refining",
        ),
        _v(
            "text_tokens",
            "text",
            "tokens",
            ("Bt", "M", None),
            "Tokens (Bt, M, D) after encoding and refining",
        ),
        _v("image_embedding", "image", "tensor", ("Bi", None), "(Bi, D) global image vectors"),
        _v("text_embedding", "text", "tensor", ("Bt", None), "(Bt, D) global caption vectors"),
        _v(
            "scores",
            "pair",
            "tensor",
            ("Bi", "Bt"),
            "(Bi, Bt) one similarity used for both retrieval directions",
        ),
        _v(
            "scores_i2t",
            "pair",
            "tensor",
            ("Bi", "Bt"),
            "(Bi, Bt) similarity used to rank captions for an image",
        ),
        _v(
            "scores_t2i",
            "pair",
            "tensor",
            ("Bi", "Bt"),
            "(Bi, Bt) similarity used to rank images for a caption",
        ),
        _v(
            "keep_decisions",
            "pair",
            "tensor",
            ("Bi", "Bt", "N"),
            "LAPS: (Bi, Bt, N) 0/1 patch keep decisions",
        ),
        _v(
            "patch_scores",
            "pair",
            "tensor",
            ("Bi", "Bt", "N"),
            "LAPS: (Bi, Bt, N) patch significance in [0, 1] for every image-caption pair",
        ),
        _v(
            "aggregated_tokens",
            "pair",
            "tensor",
            ("Bi", "Bt", None, None),
            "LAPS: (Bi, Bt, Nc, D) kept patches merged into Nc tokens per pair",
        ),
        _v(
            "fused_tokens",
            "pair",
            "tensor",
            ("Bi", "Bt", None),
            "LAPS: (Bi, Bt, D) the dropped patches of each pair fused into one token",
        ),
        _v(
            "patch_lexicon",
            "image",
            "any",
            None,
            "ELA: LexiconLogits, patch-to-lexicon logits (K, V) of the K masked patches and their (image, position)",
        ),
        _v(
            "word_lexicon",
            "text",
            "tensor",
            ("Bt", "M", None),
            "ELA: (Bt, M, V) word-to-lexicon logits",
        ),
        _v(
            "transport_plan",
            "none",
            "tensor",
            None,
            "ELA: (B, N, M) optimal-transport plan between patches and words",
        ),
        _v(
            "sparse_mask",
            "pair",
            "tensor",
            ("Bi", "Bt"),
            "DIAS: (B, B) soft mask of the strongly correlated unmatched pairs (SparseCorrelation)",
        ),
        _v(
            "negatives_i2t",
            "pair",
            "tensor",
            ("Bi", "Bt"),
            "DIAS miner: (Bi, Bt) long, a negative caption of each positive pair (DistanceWeightedMiner)",
        ),
        _v(
            "negatives_t2i",
            "pair",
            "tensor",
            ("Bi", "Bt"),
            "DIAS miner: (Bi, Bt) long, a negative image of each positive pair (DistanceWeightedMiner)",
        ),
        _v(
            "visual_phrases",
            "image",
            "tokens",
            ("Bi", "N", None),
            "DCPA: Tokens (Bi, N, D) unit-norm visual phrases (regions after the phrase encoder)",
        ),
        _v(
            "text_phrase",
            "text",
            "tensor",
            ("Bt", None),
            "DCPA: (Bt, D) phrase-aware sentence vectors c^T (1-D CNN over 1/2/3-grams)",
        ),
        _v(
            "scores_intra",
            "pair",
            "tensor",
            ("Bi", "Bt"),
            "DCPA: (Bi, Bt) intra-modal top-K score S(i^V, c^T)",
        ),
        _v(
            "scores_inter_i2t",
            "pair",
            "tensor",
            ("Bi", "Bt"),
            "DCPA: (Bi, Bt) image-to-text branch score S(i^T, c) (regions query words)",
        ),
        _v(
            "scores_inter_t2i",
            "pair",
            "tensor",
            ("Bi", "Bt"),
            "DCPA: (Bi, Bt) text-to-image branch score S(i, c^V) (words query regions)",
        ),
        _v(
            "masked_patches",
            "image",
            "tensor",
            ("Bi", None),
            "(Bi, N) bool: patch tokens masked at the image encoder's input in training (ELA)",
        ),
        _v(
            "masked_image_tokens",
            "image",
            "tokens",
            ("Bi", None, None),
            "ELA: Tokens (Bi, N, D) of the masked view of the images (MaskedImageView)",
        ),
        _v(
            "word_lexicon_masked",
            "text",
            "tensor",
            ("Bt", None, None),
            "ELA: (Bt, M, V) word-to-lexicon logits of the masked captions",
        ),
        _v(
            "masked_texts",
            "text",
            "tokens",
            ("Bt", None),
            "ELA: Tokens (Bt, L) of token ids after masked-LM word masking",
        ),
        _v(
            "masked_text_tokens",
            "text",
            "tokens",
            ("Bt", None, None),
            "ELA: Tokens (Bt, L, D) of the masked captions after the text encoder",
        ),
        _v(
            "mlm_labels",
            "text",
            "tensor",
            ("Bt", None),
            "ELA: (Bt, L) long, the original id at masked words, -100 elsewhere",
        ),
        _v(
            "cross_text_tokens",
            "text",
            "tokens",
            ("Bt", None, None),
            "ELA: Tokens (Bt, L, D) word states of the cross-modal encoder (row b: image b, caption b)",
        ),
        _v(
            "cross_lexicon",
            "text",
            "tensor",
            ("Bt", None, None),
            "ELA: (Bt, L, V) image-aware word-to-lexicon logits (masked-LM head on the cross-modal encoder)",
        ),
        _v(
            "itc_scores",
            "pair",
            "tensor",
            ("Bi", "Bt"),
            "ELA: (Bi, Bt) contrastive similarity, the first stage of two-stage retrieval",
        ),
        _v(
            "itm_logits",
            "none",
            "tensor",
            (None, 2),
            "ELA: (P, 2) image-text matching logits of sampled pairs (not a match, a match)",
        ),
        _v("itm_labels", "none", "tensor", (None,), "ELA: (P,) long, 1 for matching pairs"),
        _v(
            "scores_inter",
            "pair",
            "tensor",
            ("Bi", "Bt"),
            "DCPA without decoupling: (Bi, Bt) one symmetric inter-modal score (mean of both branches)",
        ),
    )
}
#: The names declared above, before any block registers its own values.
CORE_VALUES: frozenset[str] = frozenset(VALUE_SPECS)


def register_value(value: ValueSpec) -> ValueSpec:
    """Add a value name to :data:`VALUE_SPECS` (a block's ``values`` class attribute does this).

    Raises:
        ValueError: the name is already in the vocabulary with another meaning.
    """
    if not isinstance(value, ValueSpec):
        raise TypeError(f"register_value: expected a ValueSpec, got {type(value).__name__}")
    known = VALUE_SPECS.get(value.name)
    if known is not None and known != value:
        raise ValueError(
            f"value name {value.name!r} is already in the vocabulary as {known}; "
            "choose another name or reuse the same spec"
        )
    VALUE_SPECS[value.name] = value
    return value


def spec(name: str) -> ValueSpec | None:
    """The :class:`ValueSpec` of a value name, or ``None`` for a name outside the vocabulary."""
    return VALUE_SPECS.get(name)


#: The side sets the pipeline plan starts from: which modality a batch value depends on.
_SIDE_SETS = {
    "image": frozenset({"image"}),
    "text": frozenset({"text"}),
    "pair": frozenset({"image", "text"}),
    "none": frozenset(),
}


def vocabulary_table() -> str:
    """The vocabulary as a Markdown table (name, side, kind, shape, meaning), as ``docs/design.md`` shows it.

    Example:
        >>> vocabulary_table().splitlines()[2]
        '| `images` | image | any |  | raw image batch: pixels (Bi, 3, H, W) or precomputed region features as Tokens (Bi, N, D) |'
    """

    def shape(value: ValueSpec) -> str:
        if value.shape is None:
            return ""
        return (
            "("
            + ", ".join("*" if a is None else str(a) for a in value.shape)
            + (",)" if len(value.shape) == 1 else ")")
        )

    # The core vocabulary in its declared order, then the values blocks register, by name: the
    # table does not depend on the order in which block modules happen to be imported.
    core = [v for name, v in VALUE_SPECS.items() if name in CORE_VALUES]
    added = sorted(
        (v for name, v in VALUE_SPECS.items() if name not in CORE_VALUES), key=lambda v: v.name
    )
    rows = ["| name | side | kind | shape | what |", "| --- | --- | --- | --- | --- |"]
    rows += [f"| `{v.name}` | {v.side} | {v.kind} | {shape(v)} | {v.doc} |" for v in core + added]
    return "\n".join(rows)


def side_of(name: str) -> frozenset:
    """The modalities a value depends on: ``{"image"}``, ``{"text"}``, both, or none.

    Example:
        >>> sorted(side_of("positives"))
        ['image', 'text']
    """
    value = VALUE_SPECS.get(name)
    if value is None:
        raise KeyError(
            f"{name!r} is not in the vocabulary of value names." + suggest(name, VALUE_SPECS)
        )
    return _SIDE_SETS[value.side]


# ---------------------------------------------------------------------- examples
#: Feature size ``D`` of example inputs: a block's example arguments use it for its dimension.
EXAMPLE_DIM = 8
#: Vocabulary size ``V`` of example token ids and lexicon logits (a block with a vocabulary of its
#: own says its size in :attr:`Example.vocab_size`).
EXAMPLE_VOCAB_SIZE = 16
#: Side of example images in pixels (an example vision encoder is built for it).
EXAMPLE_IMAGE_SIZE = 16
#: The words of example captions (an example vocabulary or tokenizer covers them).
EXAMPLE_WORDS = ("a", "red", "blue", "circle", "square", "left", "of", "the", "green", "triangle")
#: The kinds of example input :attr:`Example.inputs` may ask for, beyond the vocabulary's makers.
INPUT_KINDS = {
    "captions": "a list of Bt caption strings of EXAMPLE_WORDS",
    "pixels": "(Bi, 3, EXAMPLE_IMAGE_SIZE, EXAMPLE_IMAGE_SIZE) images: float, or uint8 in [0, 255]",
}


@dataclass(frozen=True)
class Example:
    """One small configuration of a block and what its example inputs need.

    A block class lists its examples in a ``_examples`` classmethod, next to the class, so that
    adding a block needs no table elsewhere: the property sweeps of ``tests/hardening``, the
    conformance battery (``imtm.testing.parametrize_with_checks`` given a block class) and the
    documentation's block table read them through :func:`examples`. A classmethod, not a plain
    attribute, so arguments that are blocks or modules are built fresh on each call.

    Args:
        params: constructor arguments, at the sizes of :data:`EXAMPLE_DIM` (features),
            :data:`EXAMPLE_VOCAB_SIZE` and :data:`EXAMPLE_IMAGE_SIZE`.
        paired: the inputs are a training batch: image ``b`` goes with caption ``b``
            (as ``imtm.testing.component_inputs``'s ``paired``).
        inputs: ``{value name: kind}`` for a required value whose example is not the
            vocabulary's default, a kind of :data:`INPUT_KINDS` (``{"texts": "captions"}``).
        vocab_size: ``V`` of example token ids when the block has a vocabulary of its own.
        padding: the block promises that padded positions never change its outputs.
        error: ``inputs -> (exception type, message regex)`` for inputs on which the block's
            docstring documents an error, else ``None`` (``None``: no such inputs).
        nan_unused: why a NaN in a real token of a Tokens input may leave every output finite
            (``None``: it may not).
        out_dtype: ``input dtype -> dtype of the floating outputs``, where it is not the input's.
        skip: ``{check: why}`` for checks of the conformance battery (``imtm.testing.CHECKS``)
            that do not apply to this configuration, with the reason.

    Example:
        >>> Example({"dim": EXAMPLE_DIM, "heads": 2}, padding=True).params
        {'dim': 8, 'heads': 2}
    """

    params: Mapping[str, Any] = field(default_factory=dict)
    paired: bool = False
    inputs: Mapping[str, str] = field(default_factory=dict)
    vocab_size: int | None = None
    padding: bool = False
    error: Callable[[Mapping[str, Any]], tuple[type, str] | None] | None = None
    nan_unused: str | None = None
    out_dtype: Callable[[torch.dtype], torch.dtype] | None = None
    skip: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.params, Mapping):
            raise TypeError(f"Example: params must be a dict, got {type(self.params).__name__}")
        for name, kind in self.inputs.items():
            if kind not in INPUT_KINDS:
                raise ValueError(
                    f"Example: inputs[{name!r}] must be one of {sorted(INPUT_KINDS)}, got {kind!r}."
                    + suggest(kind, INPUT_KINDS)
                )

    @classmethod
    def variants(cls, *params: Mapping[str, Any], **fields: Any) -> tuple[Example, ...]:
        """One example per dict of ``params``, all with the same other ``fields``.

        Example:
            >>> [e.params for e in Example.variants({"k": 2}, {"k": None}, padding=True)]
            [{'k': 2}, {'k': None}]
        """
        return tuple(cls(p, **fields) for p in params)

    def build(self, cls: type) -> Any:
        """``cls(**params)``: the block of this example."""
        return cls(**self.params)

    def expected_error(self, inputs: Mapping[str, Any]) -> tuple[type, str] | None:
        """The documented error for ``inputs`` (``None``: the call must succeed)."""
        return None if self.error is None else self.error(inputs)


def examples(cls: type) -> tuple[Example, ...]:
    """The examples a block class declares (its ``_examples`` classmethod), checked.

    Raises:
        TypeError: the class declares none, or its hook returns something else than
            :class:`Example` s; the message says how to declare them.
    """
    hook = getattr(cls, "_examples", None)
    found = tuple(hook()) if callable(hook) else ()
    if not found:
        raise TypeError(
            f"{cls.__name__} declares no examples: add a classmethod next to the class, "
            "`@classmethod def _examples(cls): return (Example({...}),)` with small constructor "
            "arguments (imtm.contract.Example)"
        )
    bad = [type(e).__name__ for e in found if not isinstance(e, Example)]
    if bad:
        raise TypeError(f"{cls.__name__}._examples() must return Example objects, got {bad}")
    return found


def example_call(cls: type, example: Example) -> str:
    """The constructor call of ``example`` as Python source, e.g. ``"TopKAggregation(k=2)"``.

    Example:
        >>> class Demo:
        ...     pass
        >>> example_call(Demo, Example({"dim": 8, "pooling": "max"}))
        "Demo(dim=8, pooling='max')"
    """
    args = ", ".join(f"{k}={_source(v)}" for k, v in example.params.items())
    return f"{cls.__name__}({args})"


def _source(value: Any) -> str:
    if isinstance(value, torch.nn.Module) and not hasattr(value, "get_params"):
        return repr(value).replace("\n", " ")  # nn.Embedding(16, 4)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_source(v)}" for k, v in value.items()) + "}"
    return " ".join(repr(value).split())


def blocks_table(classes: Iterable[type]) -> str:
    """A Markdown table of blocks: reads, writes, constrained arguments and the first example.

    The documentation's catalogue of blocks (``docs/design.md``) is this table over every block
    imtm registers; ``tests/test_contract.py`` checks that the copy there is current.
    """
    rows = [
        "| block | requires | provides | constrained arguments | example |",
        "| --- | --- | --- | --- | --- |",
    ]
    for cls in sorted(classes, key=lambda c: c.__name__):
        constrained = ", ".join(f"`{n}`" for n in parameter_constraints(cls)) or "(none)"
        call = example_call(cls, examples(cls)[0]).replace("|", "\\|")
        rows.append(
            f"| `{cls.__name__}` | {', '.join(getattr(cls, 'requires', ()))} | "
            f"{', '.join(getattr(cls, 'provides', ()))} | {constrained} | `{call}` |"
        )
    return "\n".join(rows)
