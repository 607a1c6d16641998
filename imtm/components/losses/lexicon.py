"""ELA's lexicon losses: expansive lexicon-patch alignment (Eq. 5-7) and cross-modal lexicon distillation (Eq. 8-10)."""

from __future__ import annotations

from numbers import Integral

import torch

from imtm._block_inputs import named_errors
from imtm.component import Loss
from imtm.components.heads.lexicon import LexiconLogits
from imtm.contract import POSITIVE, Example, Interval, Options
from imtm.functional.lexicon import (
    AUTHORS_SCALE,
    DEFAULT_LABEL_WEIGHTS,
    IGNORE_INDEX,
    KL_DIRECTIONS,
    LABEL_WEIGHTS,
    expansive_soft_labels,
    lexicon_kl_loss,
)
from imtm.functional.transport import TRANSPORT_METHODS, cosine_cost, transport_plan
from imtm.tokens import Tokens, check_finite

__all__ = ["ExpansiveLexiconLoss", "LexiconDistillationLoss"]


def _tokens(block, value, what: str) -> Tokens:
    if not isinstance(value, Tokens) or value.feats.dim() != 3:
        raise TypeError(
            f"{type(block).__name__}: expected {what} as Tokens (B, N, D), got "
            f"{type(value).__name__}"
        )
    return value


def _real_non_prefix(tokens: Tokens) -> torch.Tensor:
    mask = tokens.mask.clone()
    mask[:, : tokens.num_prefix_tokens] = False
    return mask


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """The lexicon losses return float32 for bfloat16 logits, as lexicon_kl_loss documents."""
    return torch.promote_types(dtype, torch.float32)


class ExpansiveLexiconLoss(Loss):
    r"""ELA's expansive lexicon-patch alignment loss on the masked patches.

    For each training pair (image ``b`` with caption ``b``):

    1. the transport plan between the image's patches and the caption's words, from
       the cosine distance of their states (Eq. 5, :func:`imtm.functional.transport_plan`;
       prefix tokens such as [CLS] and padding take no part);
    2. soft labels of the masked patches: a plan-weighted mean of the words'
       word-to-lexicon distributions (Eq. 6, :func:`imtm.functional.expansive_soft_labels`);
       they include the words the text side *expands* to (synonyms, related words);
    3. :math:`\sum_{i\ \text{masked}} \mathrm{KL}(P^{p2l}_i \,\|\, \hat y_i)`, with no gradient
       into the labels or the plan (Eq. 7, :func:`imtm.functional.lexicon_kl_loss`).

    .. math::

        \mathcal L_{ELA} = \frac1K \sum_{i \in \text{masked}} \mathrm{KL}\Big(P^{p2l}_i \,\Big\|\,
        \sum_j w_{ij} P^{w2l}_j\Big) \qquad \text{(Eq. 5-7)}

    ``expansion=False`` replaces :math:`P^{w2l}_j` by the one-hot of word ``j``'s own
    token id (the "patch-to-lexicon without expansion" row of the paper's Table 6);
    it needs the ids as a fifth input, ``requires=(..., "text_ids")`` (a ``(B, M)``
    long tensor or Tokens of ids aligned with the text tokens, as
    :class:`~imtm.components.WordMasking` provides them).

    Works on any pipeline whose image and text tokens share their width, e.g. added
    to a CHAN matcher with a :class:`~imtm.components.PatchToLexiconHead` and a
    :class:`~imtm.components.WordToLexiconHead`.

    Args:
        label_weights: the weights of Eq. 6 (see :func:`~imtm.functional.expansive_soft_labels`):
            ``"plan_cosine_softmax"`` (default, the authors' released rule: softmax over the top-3
            words of ``2e3 * T * cos``, ``ALBEF.get_p2w_loss`` in ``model/model_pretrain.py`` of
            Lydia-yang/ELA), ``"one_minus_plan"`` (Eq. 6 as printed, ``1 - c_ij`` with ``c`` the
            plan of Eq. 5), ``"one_minus_cost"`` (``1 - C_ij``, ``C`` the cosine cost) or
            ``"plan_topk"`` (the plan renormalised over its top-k words).
        top_k: words per patch of ``"plan_cosine_softmax"`` and ``"plan_topk"`` (the authors: 3).
        scale: factor of ``T * cos`` before the softmax of ``"plan_cosine_softmax"`` (the authors: 2e3).
        method, n_iter, beta: the transport solver (see :func:`~imtm.functional.transport_plan`).
        expansion: use the word-to-lexicon distributions (True) or one-hot words (False).
        direction: ``"prediction_first"`` (Eq. 7 as printed) or ``"target_first"`` (the order of
            ``torch.nn.functional.kl_div``; bounded gradients), see :func:`~imtm.functional.lexicon_kl_loss`.
        weight: factor of this loss in the Matcher's total.

    Shape:
        - patch_lexicon: :class:`LexiconLogits` ``(K, V)`` for ``K`` masked patches
        - word_lexicon: ``(B, M, V)`` logits
        - image_tokens: Tokens ``(B, N, D)``; text_tokens: Tokens ``(B, M, D)`` (row ``b`` pairs them)
        - output: ``()``

    References:
        Yang et al., "Pre-training Cross-Modal Retrieval by Expansive Lexicon-Patch
        Alignment", LREC-COLING 2024, Eq. 5-7.

    Example:
        >>> from imtm.components import PatchToLexiconHead
        >>> emb = torch.nn.Embedding(30, 8)
        >>> head = PatchToLexiconHead(dim=8, embed_dim=8, vocab_size=30, embedding=emb)
        >>> img, txt = Tokens(torch.randn(2, 5, 8)), Tokens(torch.randn(2, 4, 8))
        >>> masked = torch.rand(2, 5) < 0.5
        >>> loss = ExpansiveLexiconLoss()(head(img, masked), torch.randn(2, 4, 30), img, txt)
        >>> bool(loss >= 0)
        True
    """

    requires = ("patch_lexicon", "word_lexicon", "image_tokens", "text_tokens")
    provides = ("expansive_lexicon_loss",)
    #: Measured slower compiled than eager on the CPU (5.82 against 4.75 ms a step at ELA's
    #: benchmark sizes, ``bench_compile.py --per-block``); it compiles elsewhere, and with
    #: ``fullgraph=True`` wherever it is compiled.
    compiles_on_cpu = False

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        other = {
            "label_weights": "one_minus_cost",
            "method": "sinkhorn",
            "direction": "target_first",
        }
        # Measured on the battery's example inputs: IPOT's 50 proximal iterations drift in float32
        # (loss 0.761 against 0.677 in float64), where sinkhorn or 5 iterations agree.
        ipot = {"dtypes": "IPOT's 50 iterations drift in float32 (0.761 vs 0.677 in float64)"}
        return (
            Example({}, paired=True, out_dtype=_at_least_float32, skip=ipot),
            Example(other, paired=True, out_dtype=_at_least_float32),
            Example({"method": "emd", "top_k": 1}, paired=True, out_dtype=_at_least_float32),
        )

    def __init__(
        self,
        label_weights: str = DEFAULT_LABEL_WEIGHTS,
        top_k: int = 3,
        method: str = "ipot",
        n_iter: int = 50,
        beta: float = 0.5,
        expansion: bool = True,
        direction: str = "prediction_first",
        weight: float = 1.0,
        scale: float = AUTHORS_SCALE,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.direction = direction
        self.label_weights = label_weights
        self.top_k = top_k
        self.method = method
        self.n_iter = n_iter
        self.beta = beta
        self.expansion = expansion
        self.weight = weight
        self.scale = scale

    _parameter_constraints = {
        "label_weights": [Options(LABEL_WEIGHTS)],
        "method": [Options(TRANSPORT_METHODS)],
        "direction": [Options(KL_DIRECTIONS)],
        "expansion": ["boolean"],
        "top_k": [Interval(Integral, 1, None, closed="left")],
        "n_iter": [Interval(Integral, 1, None, closed="left")],
        "beta": [POSITIVE],
        "scale": [POSITIVE],
    }

    def forward(
        self, patch_lexicon, word_lexicon, image_tokens, text_tokens, text_ids=None
    ) -> torch.Tensor:
        name = type(self).__name__
        if not self.expansion:
            if text_ids is None:
                raise ValueError(
                    f"{name}: expansion=False labels patches with their words' own ids; add "
                    "'text_ids' to requires (WordMasking provides it)"
                )
            text_ids = text_ids.feats if isinstance(text_ids, Tokens) else text_ids
            if text_ids.shape != word_lexicon.shape[:2]:
                raise ValueError(
                    f"{name}: text_ids must have shape {tuple(word_lexicon.shape[:2])}, "
                    f"got {tuple(text_ids.shape)}"
                )
        if not isinstance(patch_lexicon, LexiconLogits):
            raise TypeError(
                f"{name}: patch_lexicon must be the LexiconLogits of a PatchToLexiconHead, got "
                f"{type(patch_lexicon).__name__}"
            )
        images = _tokens(self, image_tokens, "image tokens")
        texts = _tokens(self, text_tokens, "text tokens")
        if images.batch_size != texts.batch_size:
            raise ValueError(
                f"{name}: row b of the image tokens must pair with caption b; got {images.batch_size} "
                f"images and {texts.batch_size} captions"
            )
        if images.dim != texts.dim:
            raise ValueError(
                f"{name}: the transport cost compares patch and word states, which must share their "
                f"width; got D = {images.dim} (images) and {texts.dim} (texts); project one side"
            )
        # The plan and the labels are computed without gradient: a NaN token would vanish into them silently.
        for tokens, what in ((images, "image tokens"), (texts, "text tokens")):
            check_finite(tokens.feats[tokens.mask], f"{name}: {what}")
        if word_lexicon.dim() != 3 or word_lexicon.shape[:2] != texts.feats.shape[:2]:
            raise ValueError(
                f"{name}: word_lexicon must have shape (B, M, V) = ({texts.batch_size}, "
                f"{texts.num_tokens}, V), got {tuple(word_lexicon.shape)}"
            )
        logits = patch_lexicon.logits
        if logits.shape[-1] != word_lexicon.shape[-1]:
            raise ValueError(
                f"{name}: vocabulary mismatch: patch_lexicon has V = {logits.shape[-1]}, word_lexicon "
                f"{word_lexicon.shape[-1]}; tie both heads to the same word embeddings"
            )
        if logits.shape[0] == 0:  # nothing masked (evaluation, mask_ratio=0): nothing to align
            # In the dtype lexicon_kl_loss returns (at least float32), whether or not a patch is masked.
            return (logits.sum() * 0.0).to(torch.promote_types(logits.dtype, torch.float32))
        patch_mask = _real_non_prefix(images)
        word_mask = _real_non_prefix(texts)
        with torch.no_grad(), named_errors(self):
            # float32 at least: under bf16 / fp16 autocast the plan would lose its small entries.
            dtype = torch.promote_types(images.feats.dtype, torch.float32)
            cost = cosine_cost(images.feats.detach().to(dtype), texts.feats.detach().to(dtype))
            plan = transport_plan(
                cost, patch_mask, word_mask, method=self.method, n_iter=self.n_iter, beta=self.beta
            )
            b_idx, t_idx = patch_lexicon.batch_index, patch_lexicon.token_index
            if self.expansion:
                word_probs = torch.softmax(word_lexicon.detach().to(dtype), dim=-1)
            else:
                ids = text_ids.clamp(
                    0, word_lexicon.shape[-1] - 1
                )  # padding ids carry no weight anyway
                word_probs = torch.nn.functional.one_hot(ids, word_lexicon.shape[-1]).to(dtype)
            labels = expansive_soft_labels(
                plan[b_idx, t_idx],
                word_probs,
                word_mask,
                batch_index=b_idx,
                cost=cost[b_idx, t_idx],
                label_weights=self.label_weights,
                top_k=self.top_k,
                scale=self.scale,
            )
        return lexicon_kl_loss(logits, labels.to(logits.dtype), direction=self.direction)

    def extra_repr(self) -> str:
        return (
            f"label_weights={self.label_weights!r}, top_k={self.top_k}, expansion={self.expansion}, "
            + super().extra_repr()
        )


class LexiconDistillationLoss(Loss):
    r"""Cross-modal lexicon distillation: image-aware word distributions teach the word-to-lexicon head.

    .. math::

        \mathcal L_{dis} = \frac{1}{|\mathcal M|} \sum_{j \in \mathcal M}
        \mathrm{KL}\big(P^{w2l}_j \,\|\, P^{mlm}_j\big) \qquad \text{(ELA, Eq. 8-10)}

    over the masked words :math:`\mathcal M` (positions where ``mlm_labels`` is not
    ``-100``), with :math:`P^{mlm}` from the cross-modal encoder's masked-LM head
    (the teacher, no gradient) and :math:`P^{w2l}` from the word-to-lexicon head on
    the same masked caption. The KL direction follows Eq. 7 (prediction first).

    Args:
        direction: the order of the KL divergence, as :class:`ExpansiveLexiconLoss`.
        weight: factor of this loss in the Matcher's total.

    Shape:
        - word_lexicon: ``(B, L, V)`` student logits
        - cross_lexicon: ``(B, L, V)`` teacher logits
        - mlm_labels: ``(B, L)`` long (``-100``: not a masked word)
        - output: ``()``

    References:
        Yang et al., "Pre-training Cross-Modal Retrieval by Expansive Lexicon-Patch
        Alignment", LREC-COLING 2024, Eq. 8-10.

    Example:
        >>> labels = torch.tensor([[-100, 4, -100]])
        >>> x = torch.randn(1, 3, 10)
        >>> float(LexiconDistillationLoss()(x, x, labels).abs()) < 1e-6  # a student equal to its teacher
        True
    """

    requires = ("word_lexicon_masked", "cross_lexicon", "mlm_labels")
    provides = ("lexicon_distillation_loss",)

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (
            Example({}, out_dtype=_at_least_float32),
            Example({"direction": "target_first"}, out_dtype=_at_least_float32),
        )

    def __init__(
        self,
        direction: str = "prediction_first",
        weight: float = 1.0,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.direction = direction
        self.weight = weight

    _parameter_constraints = {"direction": [Options(KL_DIRECTIONS)]}

    def forward(self, word_lexicon, cross_lexicon, mlm_labels) -> torch.Tensor:
        name = type(self).__name__
        if word_lexicon.dim() != 3 or word_lexicon.shape != cross_lexicon.shape:
            raise ValueError(
                f"{name}: word_lexicon and cross_lexicon must both be (B, L, V), got "
                f"{tuple(word_lexicon.shape)} and {tuple(cross_lexicon.shape)}"
            )
        if mlm_labels.shape != word_lexicon.shape[:2]:
            raise ValueError(
                f"{name}: mlm_labels must have shape {tuple(word_lexicon.shape[:2])}, "
                f"got {tuple(mlm_labels.shape)}"
            )
        picked = mlm_labels != IGNORE_INDEX
        teacher = torch.softmax(cross_lexicon[picked].detach().float(), dim=-1)
        return lexicon_kl_loss(
            word_lexicon[picked], teacher.to(word_lexicon.dtype), direction=self.direction
        )
