"""pytorch-metric-learning (PML) and imtm, both ways.

imtm's convention is a score matrix ``scores[i, t]`` (images are rows, captions columns, higher
is closer) with ``positives[i, t]``; PML's is embeddings with labels, miners that return index
tuples, and losses that measure with a ``distance`` object. Two adapters join them:

- **PML miners -> imtm losses**: :func:`tuple_triplet_loss` is imtm's hinge (VSE++ Eq. 5, the sum
  over negatives, here over the mined ones) on a score matrix, over the triplets
  ``(anchor, positive, negative)`` or pairs ``(anchor1, positive, anchor2, negative)`` a PML
  miner returns. Mine cross-modally (``miner(image_emb, labels, text_emb, labels)``: anchors are
  images, positives and negatives captions, ``direction="i2t"``) or the other way round.
- **PML losses -> imtm scores**: :class:`ScoreMatrixDistance` is a PML distance that reads an imtm
  score matrix, so any PML loss (``TripletMarginLoss``, ``ContrastiveLoss``, ``MultiSimilarityLoss``...)
  trains from the scores of any imtm scorer (fine-grained ones included, which have no embeddings
  for PML to measure); :func:`pml_loss_on_scores` calls a PML loss that way, and :func:`pml_loss`
  builds one (and a miner) by name for a training loop.

PML is optional: ``pip install "imtm[pml]"``; :func:`tuple_triplet_loss` needs only torch.

Example:
    >>> import torch
    >>> scores = torch.tensor([[0.9, 0.2, 0.4], [0.1, 0.8, 0.3]])
    >>> triplets = (torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2, 2]))
    >>> tuple_triplet_loss(scores, triplets, margin=0.2)  # mean of [0.2 - 0.9 + 0.4]+ and [0.2 - 0.8 + 0.3]+
    tensor(0.)
"""

from __future__ import annotations

import torch

from imtm._checks import suggest

__all__ = [  # noqa: F822 - ScoreMatrixDistance is made on first use (__getattr__)
    "DIRECTIONS",
    "ScoreMatrixDistance",
    "labels_from_positives",
    "pairs_to_triplets",
    "pml_loss",
    "pml_loss_on_scores",
    "tuple_triplet_loss",
]

#: Which side the tuples' anchors index: ``"i2t"`` images (rows), ``"t2i"`` captions (columns).
DIRECTIONS = ("i2t", "t2i")
_REDUCTIONS = ("mean", "sum", "none")


def _require_pml():
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "this adapter runs pytorch-metric-learning losses, which is not installed: "
            'pip install "imtm[pml]"'
        ) from err


def _as_index(t, name: str) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dim() != 1 or (t.numel() and (t.dtype.is_floating_point or t.dtype == torch.bool)):
        raise TypeError(
            f"tuple_triplet_loss: {name} must be a 1-D tensor of integer indices, got "
            f"{tuple(t.shape)} {t.dtype}"
        )
    return t.long()


def pairs_to_triplets(pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PML's pair tuple ``(a1, p, a2, n)`` -> triplets: every positive pair with every negative of its anchor.

    As PML's ``convert_to_triplets`` does, without a per-anchor cap: triplet ``(a, p, n)`` for
    every ``k, l`` with ``a1[k] == a2[l] == a``, ``p = p[k]``, ``n = n[l]``.

    Shape:
        - pairs: four ``(P,)``, ``(P,)``, ``(Q,)``, ``(Q,)`` integer tensors
        - output: three ``(T,)`` integer tensors

    Example:
        >>> a, p, n = pairs_to_triplets((torch.tensor([0, 1]), torch.tensor([0, 1]),
        ...                              torch.tensor([0, 0, 1]), torch.tensor([1, 2, 0])))
        >>> a.tolist(), p.tolist(), n.tolist()
        ([0, 0, 1], [0, 0, 1], [1, 2, 0])
    """
    if len(pairs) != 4:
        raise ValueError(
            f"pairs_to_triplets: expected PML's pairs (anchor1, positive, anchor2, negative), "
            f"got {len(pairs)} tensors"
        )
    a1, p, a2, n = (
        _as_index(t, name) for t, name in zip(pairs, ("anchor1", "positive", "anchor2", "negative"))
    )
    if a1.shape != p.shape or a2.shape != n.shape:
        raise ValueError(
            f"pairs_to_triplets: anchor1/positive and anchor2/negative must pair up, got lengths "
            f"{len(a1)}/{len(p)} and {len(a2)}/{len(n)}"
        )
    k, m = torch.nonzero(a1[:, None] == a2[None, :], as_tuple=True)
    return a1[k], p[k], n[m]


def tuple_triplet_loss(
    scores: torch.Tensor,
    indices_tuple,
    *,
    margin: float = 0.2,
    direction: str = "i2t",
    reduction: str = "mean",
) -> torch.Tensor:
    r"""imtm's hinge on a score matrix over the triplets (or pairs) a PML miner returns.

    .. math::

        \ell = [\alpha - s(a, p) + s(a, n)]_+ \qquad \text{(VSE++ Eq. 5, one mined negative)}

    with :math:`s(a, x)` = ``scores[a, x]`` for ``direction="i2t"`` (image anchors, caption
    positives and negatives) and ``scores[x, a]`` for ``"t2i"``.

    Args:
        scores: ``(Bi, Bt)`` similarities, images as rows.
        indices_tuple: PML triplets ``(anchor, positive, negative)`` or pairs
            ``(anchor1, positive, anchor2, negative)`` (turned into triplets by :func:`pairs_to_triplets`).
        margin: :math:`\alpha`, at least 0.
        direction: ``"i2t"`` or ``"t2i"`` (:data:`DIRECTIONS`).
        reduction: ``"mean"`` or ``"sum"`` over the triplets, or ``"none"`` (one loss per triplet).
            No triplets give a zero that keeps the graph (``scores.sum() * 0``).

    Shape:
        - scores: ``(Bi, Bt)``; each index tensor ``(T,)``
        - output: ``()`` (``(T,)`` with ``reduction="none"``)

    References:
        Faghri et al., "VSE++", BMVC 2018, Eq. 5; Musgrave et al., "PyTorch Metric Learning", 2020 (the tuples).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(
            f"tuple_triplet_loss: scores must be a (Bi, Bt) tensor, got "
            f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}"
        )
    if direction not in DIRECTIONS:
        raise ValueError(
            f"tuple_triplet_loss: direction must be one of {list(DIRECTIONS)}, got {direction!r}."
            + suggest(direction, DIRECTIONS)
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"tuple_triplet_loss: reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}."
            + suggest(reduction, _REDUCTIONS)
        )
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
        raise ValueError(f"tuple_triplet_loss: margin must be a number >= 0, got {margin!r}")
    if len(indices_tuple) == 4:
        a, p, n = pairs_to_triplets(indices_tuple)
    elif len(indices_tuple) == 3:
        a, p, n = (
            _as_index(t, name) for t, name in zip(indices_tuple, ("anchor", "positive", "negative"))
        )
        if not a.shape == p.shape == n.shape:
            raise ValueError(
                f"tuple_triplet_loss: anchor, positive and negative must have one length, got "
                f"{len(a)}, {len(p)}, {len(n)}"
            )
    else:
        raise ValueError(
            f"tuple_triplet_loss: expected PML triplets (anchor, positive, negative) or pairs "
            f"(anchor1, positive, anchor2, negative), got {len(indices_tuple)} tensors"
        )
    s = scores if direction == "i2t" else scores.t()
    a, p, n = (t.to(s.device) for t in (a, p, n))
    for t, side, size in (
        (a, "anchor", s.shape[0]),
        (p, "positive", s.shape[1]),
        (n, "negative", s.shape[1]),
    ):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
            raise ValueError(
                f"tuple_triplet_loss: {side} indices must lie in [0, {size}) for direction="
                f"{direction!r} and scores of shape {tuple(scores.shape)}"
            )
    losses = (margin - s[a, p] + s[a, n]).clamp(min=0)
    if reduction == "none":
        return losses
    if losses.numel() == 0:
        return scores.sum() * 0
    return losses.mean() if reduction == "mean" else losses.sum()


def labels_from_positives(positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class labels of the rows and columns whose equality is ``positives``; a ValueError when none exist.

    Rows with the same positives (an image repeated in a batch) share a label; a column takes the
    label of its positive rows.

    Shape:
        - positives: ``(Bi, Bt)`` bool, every column with at least one positive
        - output: ``(Bi,)`` and ``(Bt,)`` long

    Example:
        >>> pos = torch.tensor([[True, True, False], [False, False, True]])
        >>> r, c = labels_from_positives(pos)
        >>> bool(r[0] != r[1]), bool(c[0] == c[1] == r[0]), torch.equal(r[:, None] == c[None, :], pos)
        (True, True, True)
    """
    if (
        not isinstance(positives, torch.Tensor)
        or positives.dim() != 2
        or positives.dtype != torch.bool
    ):
        raise TypeError("labels_from_positives: positives must be a (Bi, Bt) bool tensor")
    if not bool(positives.any(0).all()):
        raise ValueError(
            "labels_from_positives: a caption has no positive image; pass labels instead"
        )
    _, rows = torch.unique(positives, dim=0, return_inverse=True)
    cols = rows[positives.int().argmax(0)]
    if not torch.equal(rows[:, None] == cols[None, :], positives):
        raise ValueError(
            "labels_from_positives: these positives are not 'same label' (a caption matches images "
            "whose positives differ); pass image_labels and caption_labels"
        )
    return rows, cols


_DISTANCE: type | None = (
    None  # ScoreMatrixDistance, defined on first use (it subclasses PML's BaseDistance)
)


def _distance_class() -> type:
    global _DISTANCE
    if _DISTANCE is not None:
        return _DISTANCE
    _require_pml()
    from pytorch_metric_learning.distances import BaseDistance

    class ScoreMatrixDistance(BaseDistance):
        """A PML distance that reads an imtm score matrix (a similarity: ``is_inverted=True``).

        The "embeddings" a PML loss gets are row and column numbers (``(B, 1)`` float tensors,
        :func:`pml_loss_on_scores` makes them); the distance looks the pairs up in
        ``self.scores``, so gradients flow into the scorer that made them.
        """

        def __init__(self, scores=None, **kwargs):
            kwargs.setdefault("normalize_embeddings", False)
            kwargs.setdefault("is_inverted", True)
            super().__init__(**kwargs)
            self.scores = scores

        def compute_mat(self, query_emb, ref_emb):
            return self.scores[query_emb[:, 0].long()][:, ref_emb[:, 0].long()]

        def pairwise_distance(self, query_emb, ref_emb):
            return self.scores[query_emb[:, 0].long(), ref_emb[:, 0].long()]

    ScoreMatrixDistance.__module__ = __name__
    _DISTANCE = ScoreMatrixDistance
    return _DISTANCE


def __getattr__(name):
    if name == "ScoreMatrixDistance":  # needs pytorch-metric-learning: defined when first asked for
        return _distance_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pml_loss_on_scores(
    loss,
    scores: torch.Tensor,
    positives: torch.Tensor | None = None,
    *,
    image_labels=None,
    caption_labels=None,
    direction: str = "i2t",
    miner=None,
) -> torch.Tensor:
    """Run a PML loss on an imtm score matrix.

    The loss must measure with a :class:`ScoreMatrixDistance` (``TripletMarginLoss(distance=ScoreMatrixDistance())``);
    its ``scores`` are set for this call. Image anchors against caption references (``"i2t"``) or the
    other way round (``"t2i"``, on ``scores.t()``).

    Args:
        loss: a PML loss built with ``distance=ScoreMatrixDistance()``.
        scores: ``(Bi, Bt)`` similarities, images as rows.
        positives: ``(Bi, Bt)`` bool; labels follow from it (:func:`labels_from_positives`) unless given.
        image_labels, caption_labels: ``(Bi,)`` and ``(Bt,)`` class labels (e.g. image ids).
        direction: ``"i2t"`` or ``"t2i"``.
        miner: an optional PML miner with the same distance; its tuples go to the loss.

    Returns:
        the loss, a scalar.
    """
    Distance = _distance_class()
    if direction not in DIRECTIONS:
        raise ValueError(
            f"pml_loss_on_scores: direction must be one of {list(DIRECTIONS)}, got {direction!r}"
        )
    if image_labels is None or caption_labels is None:
        if positives is None:
            raise ValueError(
                "pml_loss_on_scores: give positives, or image_labels and caption_labels"
            )
        image_labels, caption_labels = labels_from_positives(positives.to(torch.bool))
    s = scores if direction == "i2t" else scores.t()
    q_labels, r_labels = (
        (image_labels, caption_labels) if direction == "i2t" else (caption_labels, image_labels)
    )
    parts = [loss] + ([miner] if miner is not None else [])
    for part in parts:
        if not isinstance(getattr(part, "distance", None), Distance):
            raise TypeError(
                f"pml_loss_on_scores: {type(part).__name__} must measure with ScoreMatrixDistance(); "
                f"build it as {type(part).__name__}(distance=ScoreMatrixDistance())"
            )
        part.distance.scores = s
    q = torch.arange(s.shape[0], device=s.device, dtype=s.dtype)[:, None]
    r = torch.arange(s.shape[1], device=s.device, dtype=s.dtype)[:, None]
    # Two label tensors, never one object twice: PML takes ``ref_labels is labels`` for a comparison of a set
    # with itself and drops the diagonal's positives (get_matches_and_diffs), but image b and caption b match.
    q_labels = torch.as_tensor(q_labels, device=s.device).clone()
    r_labels = torch.as_tensor(r_labels, device=s.device).clone()
    tuples = None if miner is None else miner(q, q_labels, r, r_labels)
    return loss(q, q_labels, tuples, r, r_labels)


def _pml_class(module: str, name, what: str):
    """The class ``name`` of ``pytorch_metric_learning.<module>`` (looked up there only: no path is imported)."""
    import importlib

    _require_pml()
    mod = importlib.import_module(f"pytorch_metric_learning.{module}")
    options = sorted(
        n
        for n in getattr(mod, "__dict__", {})
        if n[:1].isupper() and isinstance(getattr(mod, n), type)
    )
    if not isinstance(name, str) or name not in options:
        raise ValueError(
            f"MetricLearningLoss: {what} must name a class of pytorch_metric_learning.{module}, got "
            f"{name!r}." + suggest(str(name), options)
        )
    return getattr(mod, name)


def _pml_class(module: str, name, what: str):
    """The class ``name`` of ``pytorch_metric_learning.<module>`` (looked up there only: no path is imported)."""
    import importlib

    _require_pml()
    mod = importlib.import_module(f"pytorch_metric_learning.{module}")
    options = sorted(n for n in vars(mod) if n[:1].isupper() and isinstance(getattr(mod, n), type))
    if not isinstance(name, str) or name not in options:
        raise ValueError(
            f"pml_loss: {what} must name a class of pytorch_metric_learning.{module}, got {name!r}."
            + suggest(str(name), options)
        )
    return getattr(mod, name)


def pml_loss(
    loss: str = "TripletMarginLoss",
    loss_params: dict | None = None,
    miner: str | None = None,
    miner_params: dict | None = None,
    direction: str = "both",
):
    """A function ``(scores, positives) -> loss`` running a PML loss (and miner), named, on imtm scores.

    Args:
        loss: a class name in ``pytorch_metric_learning.losses`` (``"TripletMarginLoss"``,
            ``"ContrastiveLoss"``, ``"MultiSimilarityLoss"``...); built with
            ``distance=ScoreMatrixDistance()`` and ``loss_params``.
        miner: ``None`` or a class name in ``pytorch_metric_learning.miners``, built the same way.
        direction: ``"i2t"``, ``"t2i"`` or ``"both"`` (the mean of the two).

    Returns:
        ``fn(scores, positives)``: the loss of a ``(Bi, Bt)`` score matrix, a scalar.

    Example:
        >>> fn = pml_loss("TripletMarginLoss", {"margin": 0.1}, miner="TripletMarginMiner")  # doctest: +SKIP
        >>> fn(scores, positives).backward()  # doctest: +SKIP
    """
    if direction not in (*DIRECTIONS, "both"):
        raise ValueError(f"pml_loss: direction must be 'i2t', 't2i' or 'both', got {direction!r}")
    for name, value in (("loss_params", loss_params), ("miner_params", miner_params)):
        if value is not None and not isinstance(value, dict):
            raise TypeError(
                f"pml_loss: {name} must be a dict of keyword arguments or None, got {type(value).__name__}"
            )
    distance = _distance_class()
    built = _pml_class("losses", loss, "loss")(distance=distance(), **(loss_params or {}))
    mined = (
        None
        if miner is None
        else _pml_class("miners", miner, "miner")(distance=distance(), **(miner_params or {}))
    )
    dirs = DIRECTIONS if direction == "both" else (direction,)

    def fn(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        rows, cols = labels_from_positives(positives)
        out = [
            pml_loss_on_scores(
                built, scores, image_labels=rows, caption_labels=cols, direction=d, miner=mined
            )
            for d in dirs
        ]
        return sum(out) / len(out)

    return fn
