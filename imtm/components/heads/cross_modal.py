"""ELA's cross-modal encoder and image-text matching head (ALBEF-style objectives of Eq. 8-11)."""

from __future__ import annotations

from numbers import Integral, Real

import torch
from torch import nn

from imtm.component import Component, LinkedComponent
from imtm.components.heads._layers import transformer_layers
from imtm.contract import EXAMPLE_DIM, POSITIVE, Example, Interval, block_or_name
from imtm.functional.lexicon import sample_hard_negatives
from imtm.tokens import Tokens

__all__ = ["CrossModalEncoder", "ImageTextMatchingHead"]


def _check_tokens(block, value, what: str, dim: int) -> Tokens:
    name = type(block).__name__
    if not isinstance(value, Tokens):
        raise TypeError(f"{name}: expected {what} as Tokens, got {type(value).__name__}")
    if value.feats.dim() != 3 or value.dim != dim:
        raise ValueError(
            f"{name}: expected {what} of shape (B, N, {dim}), got {tuple(value.feats.shape)}"
        )
    return value


class CrossModalEncoder(Component):
    r"""Transformer layers over the concatenated patch and word states of each image-caption pair.

    .. math::

        [\,\cdot\,; \tilde U] = \mathrm{TransformerLayers}\big([V + e_{img};\ U + e_{txt}]\big)
        \qquad \text{(ELA, Eq. 8)}

    with learned modality embeddings :math:`e`. Returns the word part :math:`\tilde U`,
    image-aware word states that the masked-LM head (a
    :class:`~imtm.components.WordToLexiconHead` with ``layers=0``) turns into
    :math:`P^{mlm}` (Eq. 9) and whose [CLS] feeds the matching head. As a pipeline
    block, row ``b`` of the image tokens pairs with caption ``b`` (a training batch);
    :meth:`encode_pairs` runs any list of pairs. Padding takes no part.

    On the CPU the transformer layers are never compiled (a user's ``torch.compile`` of the block
    runs them eagerly, and ``Matcher(compile=True)`` leaves the block eager there:
    ``compiles_on_cpu = False``): Inductor's CPU code for them measured slower than eager's
    (:func:`~imtm.components.heads._layers.transformer_layers`).

    Args:
        dim: ``D`` of both modalities. layers: transformer layers. heads: attention heads.
        dropout: dropout of the layers.

    Shape:
        - image_tokens: Tokens ``(B, N, D)``; text_tokens: Tokens ``(B, M, D)``
        - output: Tokens ``(B, M, D)`` (the text's mask and prefix tokens)

    References:
        Yang et al., "Pre-training Cross-Modal Retrieval by Expansive Lexicon-Patch
        Alignment", LREC-COLING 2024, Eq. 8; Li et al., "Align before Fuse", NeurIPS 2021.

    Example:
        >>> enc = CrossModalEncoder(dim=16, layers=1, heads=2)
        >>> enc(Tokens(torch.randn(2, 5, 16)), Tokens.from_lengths(torch.randn(2, 4, 16), [4, 2])).feats.shape
        torch.Size([2, 4, 16])
    """

    requires = ("image_tokens", "text_tokens")
    provides = ("cross_text_tokens",)
    compiles_on_cpu = False

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (Example({"dim": EXAMPLE_DIM, "layers": 1, "heads": 2}, paired=True, padding=True),)

    def __init__(
        self,
        dim: int,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim
        self.layers = layers
        self.heads = heads
        self.dropout = dropout
        # The layers are built from these arguments below, so they are checked first.
        self.validate()
        self.modality = nn.Parameter(torch.zeros(2, dim))
        nn.init.normal_(self.modality, std=0.02)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True),
            layers,
            enable_nested_tensor=False,
        )

    _parameter_constraints = {
        "dim": [Interval(Integral, 1, None, closed="left")],
        "layers": [Interval(Integral, 1, None, closed="left")],
        "heads": [Interval(Integral, 1, None, closed="left")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
    }

    def validate(self) -> CrossModalEncoder:
        """Check the declared constraints and that ``heads`` divides ``dim``; return ``self``."""
        if self.dim % self.heads:
            raise ValueError(
                f"{type(self).__name__}: dim={self.dim} is not divisible by heads={self.heads}"
            )
        return self

    def encode_pairs(
        self, images: Tokens, texts: Tokens, image_index=None, text_index=None
    ) -> Tokens:
        """Word states of the pairs ``(images[image_index[p]], texts[text_index[p]])`` (default: row by row)."""
        iv, im = images.feats, images.mask
        tv, tm = texts.feats, texts.mask
        if image_index is not None:
            iv, im = iv.index_select(0, image_index), im.index_select(0, image_index)
        if text_index is not None:
            tv, tm = tv.index_select(0, text_index), tm.index_select(0, text_index)
        zero = torch.zeros((), dtype=iv.dtype, device=iv.device)
        x = torch.cat(
            [
                torch.where(im.unsqueeze(-1), iv, zero) + self.modality[0].to(iv.dtype),
                torch.where(tm.unsqueeze(-1), tv, zero) + self.modality[1].to(iv.dtype),
            ],
            dim=1,
        )
        mask = torch.cat([im, tm], dim=1)
        out = transformer_layers(self.encoder, x, ~mask)[:, iv.shape[1] :]
        out = torch.where(
            tm.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device)
        )
        return Tokens(out, tm, num_prefix_tokens=texts.num_prefix_tokens)

    def forward(self, image_tokens, text_tokens) -> Tokens:
        images = _check_tokens(self, image_tokens, "image tokens", self.dim)
        texts = _check_tokens(self, text_tokens, "text tokens", self.dim)
        if images.batch_size != texts.batch_size:
            raise ValueError(
                f"{type(self).__name__}: row b of the image tokens pairs with caption b; got "
                f"{images.batch_size} images and {texts.batch_size} captions"
            )
        return self.encode_pairs(images, texts)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, layers={self.layers}, heads={self.heads}, " + super().extra_repr()


class ImageTextMatchingHead(LinkedComponent):
    r"""Image-text matching: a binary head on the cross-modal encoder's [CLS], with hard negatives.

    For a training batch (row ``b`` of the images pairs with caption ``b``) it scores
    every positive pair, one hard negative caption per image and one hard negative
    image per caption, each drawn with probability :math:`\mathrm{softmax}(s/\tau)` over
    the non-positives of the contrastive scores (ALBEF; ELA Eq. 11); in eval mode the
    hardest negative is taken instead (deterministic).

    .. math::

        p^{itm}(I, T) = \mathrm{softmax}\big(W\, \tilde u_{cls}(I, T) + b\big)

    The cross-modal encoder is another block of the pipeline, named by ``encoder``
    (linked when the Matcher builds, see :meth:`~imtm.Component.link`), or a
    :class:`CrossModalEncoder` passed directly for standalone use; it is not
    registered here (its parameters belong to its own block). Without a prefix token
    the masked mean of the word states stands in for [CLS].

    Args:
        dim: ``D`` of the cross-modal states.
        encoder: name of the :class:`CrossModalEncoder` block, or the module.
        temperature: :math:`\tau` of the negative sampling.

    Shape:
        - image_tokens: Tokens ``(B, N, D)``; text_tokens: Tokens ``(B, M, D)``
        - scores: ``(B, B)``; positives: ``(B, B)`` bool
        - output: ``itm_logits (P, 2)``, ``itm_labels (P,)`` with ``P <= 3B``

    References:
        Li et al., "Align before Fuse" (ALBEF), NeurIPS 2021, Sec. 3.2; Yang et al.,
        "Pre-training Cross-Modal Retrieval by Expansive Lexicon-Patch Alignment",
        LREC-COLING 2024, Eq. 11.

    Example:
        >>> enc = CrossModalEncoder(dim=16, layers=1, heads=2)
        >>> head = ImageTextMatchingHead(dim=16, encoder=enc)
        >>> img, txt = Tokens(torch.randn(3, 5, 16)), Tokens(torch.randn(3, 4, 16), num_prefix_tokens=1)
        >>> logits, labels = head(img, txt, torch.randn(3, 3), torch.eye(3, dtype=torch.bool))
        >>> logits.shape, labels.tolist()
        (torch.Size([9, 2]), [1, 1, 1, 0, 0, 0, 0, 0, 0])
    """

    requires = ("image_tokens", "text_tokens", "scores", "positives")
    provides = ("itm_logits", "itm_labels")
    #: It runs the cross-modal encoder on 3B pairs: eager on the CPU, as the encoder.
    compiles_on_cpu = False
    _borrowed = ("encoder", "_linked")
    _target_param = "encoder"

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        encoder = CrossModalEncoder(EXAMPLE_DIM, layers=1, heads=2)
        return (Example({"dim": EXAMPLE_DIM, "encoder": encoder}, paired=True, padding=True),)

    def __init__(
        self, dim: int, encoder="cross", temperature: float = 0.07, *, requires=None, provides=None
    ):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim
        self.encoder = encoder
        self.temperature = temperature
        self._set_target(encoder)
        # The classifier is built from dim below, so the arguments are checked first.
        self.validate()
        self.classifier = nn.Linear(dim, 2)

    _parameter_constraints = {
        "dim": [Interval(Integral, 1, None, closed="left")],
        "encoder": [block_or_name(CrossModalEncoder, description="a CrossModalEncoder")],
        "temperature": [POSITIVE],
    }

    def validate(self) -> ImageTextMatchingHead:
        """Check the declared constraints and an encoder given directly; return ``self``."""
        return super().validate()

    def _check_target(self, block, name=None) -> None:
        if not isinstance(block, CrossModalEncoder):
            raise TypeError(
                f"{type(self).__name__}: block {name!r} is a {type(block).__name__}, "
                "not a CrossModalEncoder"
            )

    def cross_encoder(self) -> CrossModalEncoder:
        """The linked :class:`CrossModalEncoder`."""
        return self.target()

    def pair_logits(self, images: Tokens, texts: Tokens, image_index, text_index) -> torch.Tensor:
        """``(P, 2)`` matching logits of the pairs ``(image_index[p], text_index[p])``."""
        states = self.cross_encoder().encode_pairs(images, texts, image_index, text_index)
        cls = states.feats[:, 0] if states.num_prefix_tokens else states.masked_mean()
        return self.classifier(cls)

    def forward(self, image_tokens, text_tokens, scores, positives):
        images = _check_tokens(self, image_tokens, "image tokens", self.dim)
        texts = _check_tokens(self, text_tokens, "text tokens", self.dim)
        b = images.batch_size
        if (
            texts.batch_size != b
            or tuple(scores.shape) != (b, b)
            or tuple(positives.shape) != (b, b)
        ):
            raise ValueError(
                f"{type(self).__name__}: expects a training batch of B paired rows: images "
                f"{images.batch_size}, captions {texts.batch_size}, scores {tuple(scores.shape)}, "
                f"positives {tuple(positives.shape)}"
            )
        neg_text, neg_image = sample_hard_negatives(
            scores, positives, temperature=self.temperature, sample=self.training
        )
        rows = torch.arange(b, device=scores.device)
        has_t, has_i = neg_text >= 0, neg_image >= 0
        image_index = torch.cat([rows, rows[has_t], neg_image[has_i]])
        text_index = torch.cat([rows, neg_text[has_t], rows[has_i]])
        labels = torch.cat(
            [
                torch.ones(b, dtype=torch.long, device=rows.device),
                torch.zeros(image_index.shape[0] - b, dtype=torch.long, device=rows.device),
            ]
        )
        return self.pair_logits(images, texts, image_index, text_index), labels

    def extra_repr(self) -> str:
        enc = self.encoder if isinstance(self.encoder, str) else "module"
        return (
            f"dim={self.dim}, encoder={enc!r}, temperature={self.temperature}, "
            + super().extra_repr()
        )
