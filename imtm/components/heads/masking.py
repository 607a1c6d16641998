"""WordMasking (masked-LM corruption of captions) and Reuse (run another block again on other values)."""

from __future__ import annotations

from numbers import Real

import torch

from imtm.component import Component, LinkedComponent
from imtm.contract import EXAMPLE_DIM, Example, Interval, ValueSpec, block_or_name
from imtm.functional.lexicon import IGNORE_INDEX, mask_words
from imtm.tokens import Tokens

__all__ = ["MaskedImageView", "Reuse", "WordMasking"]


class WordMasking(LinkedComponent):
    r"""Tokenise captions with the text encoder's tokenizer and corrupt them for masked-LM (BERT's 80/10/10).

    In training mode a fraction ``prob`` of the words (never [CLS], [SEP] or padding)
    is picked; 80% of the picks become [MASK], 10% a random id, 10% stay
    (:func:`imtm.functional.mask_words`). In eval mode nothing is picked. It provides
    the corrupted ids (feed them to the text encoder again through :class:`Reuse`),
    the labels (``-100`` where nothing was picked), and the clean ids, aligned with
    the text encoder's output positions.

    A CLIP text tower's tokenizer opens and closes captions with start / end of text
    instead of [CLS] / [SEP] (never picked either) and has no [MASK]: with ``prob > 0``
    such a tokenizer is refused when the block is linked (the error says what to use
    instead); with ``prob = 0`` it gives the clean ids and empty labels.

    Args:
        tokenizer: the text encoder block's name (in a Matcher; it must have
            ``tokenize``, ``tokenizer`` and ``vocab_size``, as
            :class:`~imtm.components.HFTextEncoder`), or such an encoder itself.
        prob: fraction of words picked (BERT, ELA: 0.15).

    Shape:
        - texts: ``list[str]`` of ``Bt`` captions
        - output: ``masked_texts`` Tokens ``(Bt, L)`` of ids, ``mlm_labels (Bt, L)``, ``text_ids (Bt, L)``

    References:
        Devlin et al., "BERT", NAACL 2019; Yang et al., "Pre-training Cross-Modal Retrieval
        by Expansive Lexicon-Patch Alignment", LREC-COLING 2024, Eq. 11.

    Example:
        >>> import tempfile
        >>> from imtm.components import HFTextEncoder
        >>> from imtm.components.encoders.hf_text import write_local_bert
        >>> text = HFTextEncoder(write_local_bert(tempfile.mkdtemp(), ["a red circle"], hidden_size=16))
        >>> masked, labels, ids = WordMasking(tokenizer=text, prob=1.0)(["a red circle"])
        >>> (labels[0] != -100).tolist()  # every word picked, never [CLS] or [SEP]
        [False, True, True, True, False]
    """

    requires = ("texts",)
    provides = ("masked_texts", "mlm_labels", "text_ids")
    values = (
        ValueSpec(
            "text_ids",
            "text",
            "tensor",
            ("Bt", None),
            "ELA: (Bt, L) long, the token ids of the captions before masking (WordMasking)",
        ),
    )
    _borrowed = ("tokenizer", "_linked")
    _target_param = "tokenizer"
    # Tokenising strings and drawing the corruption is host-side work with nothing to fuse, and the
    # draws over a caption-length shape failed to trace (torch.rand under fake tensors): compiling it
    # only cost a failed compilation and a warning, so Matcher(compile=True) keeps it eager.
    compiles = False

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        from imtm.components.encoders.hf_text import HFTextEncoder

        encoder = HFTextEncoder("synthetic-bert", out_dim=EXAMPLE_DIM)
        return (Example({"tokenizer": encoder, "prob": 0.5}, inputs={"texts": "captions"}),)

    def __init__(self, tokenizer="text", prob: float = 0.15, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.tokenizer = tokenizer
        self.prob = prob
        self._set_target(tokenizer)

    _parameter_constraints = {
        "tokenizer": [block_or_name(Component, description="a text encoder such as HFTextEncoder")],
        "prob": [Interval(Real, 0, 1, closed="both")],
    }

    def _check_target(self, block, name=None) -> None:
        for attr in ("tokenize", "tokenizer", "vocab_size"):
            if not hasattr(block, attr):
                raise TypeError(
                    f"{type(self).__name__}: the tokenizer block ({type(block).__name__}) has no "
                    f"{attr!r}; use a text encoder such as HFTextEncoder"
                )
        self._check_mask_token(block, name)

    def _check_mask_token(self, block, name=None) -> None:
        """Refuse to corrupt captions (``prob > 0``) with a tokenizer that has no mask token."""
        prob = self.prob
        if not (isinstance(prob, Real) and prob > 0):
            return  # nothing is masked (a bad prob is reported by the constraint check)
        if getattr(block.tokenizer, "mask_token_id", None) is None:
            where = f"the text encoder {name!r}" if name else "the text encoder"
            raise ValueError(
                f"{type(self).__name__}: {where} ({type(block).__name__}) has a tokenizer without a "
                f"mask token ({type(block.tokenizer).__name__}: mask_token_id is None), so masked-LM "
                f"with prob={self.prob} cannot replace words by [MASK]. A CLIP text tower has none "
                "(and, being causal, is not trained to fill words from both sides): use a BERT-style "
                "encoder (text='bert', a folder with [MASK] in its vocabulary), or give the encoder's "
                "folder a mask token (tokenizer.add_special_tokens({'mask_token': '<mask>'}), "
                "model.resize_token_embeddings(len(tokenizer)), then save_pretrained both), or set "
                "prob=0 (clean ids and labels only)"
            )

    def forward(self, texts):
        encoder = self.target()
        ids = texts if isinstance(texts, Tokens) else encoder.tokenize(texts)
        tok = encoder.tokenizer
        # The ids never picked: BERT's [CLS] / [SEP] or CLIP's start / end of text, and padding.
        special = [
            i
            for i in (
                tok.cls_token_id,
                tok.sep_token_id,
                tok.bos_token_id,
                tok.eos_token_id,
                tok.pad_token_id,
            )
            if i is not None
        ]
        maskable = ids.mask & ~torch.isin(ids.feats, torch.tensor(special, device=ids.feats.device))
        if self.training and self.prob > 0:
            self._check_mask_token(encoder)  # prob may have changed since the block was linked
            masked, labels = mask_words(
                ids.feats,
                maskable,
                mask_token_id=tok.mask_token_id,
                vocab_size=encoder.vocab_size,
                prob=self.prob,
            )
        else:
            masked, labels = ids.feats, torch.full_like(ids.feats, IGNORE_INDEX)
        return Tokens(masked, ids.mask), labels, ids.feats

    def extra_repr(self) -> str:
        ref = self.tokenizer if isinstance(self.tokenizer, str) else "module"
        return f"tokenizer={ref!r}, prob={self.prob}, " + super().extra_repr()


class Reuse(LinkedComponent):
    """Run another block of the pipeline, with its own weights, on other values.

    ELA runs its text encoder twice (clean captions for alignment, masked ones for
    masked-LM) and its word-to-lexicon head twice; ``Reuse(block="text",
    requires=("masked_texts",), provides=("masked_text_tokens",))`` does the second
    run with the same parameters. It owns no parameter.

    Args:
        block: the name of the block to run (or the block itself, standalone).
        requires, provides: the values to read and write (required: no defaults).

    Example:
        >>> from imtm.components import GlobalCosine
        >>> r = Reuse(GlobalCosine(), requires=("a", "b"), provides=("s",))
        >>> r(Tokens(torch.ones(1, 2, 3)), Tokens(torch.ones(2, 2, 3))).shape
        torch.Size([1, 2])
    """

    _borrowed = ("block", "_linked")
    _target_param = "block"
    _parameter_constraints = {"block": [block_or_name(Component, description="a Component")]}
    #: ``Matcher(compile=True)`` leaves the wrapper eager: calling the target runs the target's own
    #: compiled forward where it has one, and a target that stays eager (a text encoder that
    #: tokenises strings) is not traced through the wrapper.
    compiles = False

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        from imtm.components.scorers.global_cosine import GlobalCosine

        names = {"requires": ("image_tokens", "text_tokens"), "provides": ("scores",)}
        return (Example({"block": GlobalCosine(), **names}, padding=True),)

    def __init__(self, block, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.block = block
        self._set_target(block)

    def forward(self, *values):
        return self.target()(*values)

    def extra_repr(self) -> str:
        ref = self.block if isinstance(self.block, str) else type(self.block).__name__
        return f"block={ref!r}, " + super().extra_repr()


class MaskedImageView(LinkedComponent):
    r"""The masked view of the images: the vision encoder run again with its patch masking on.

    ELA's lexicon loss (Eq. 7) is taken on patches masked at the image encoder's
    input. With one pass, the contrastive and matching objectives would see the
    masked images as well, while evaluation shows them whole. With this block the
    encoder (built with ``mask_in_forward=False``) gives the whole images as
    ``image_tokens`` to ITC, ITM and the transport cost, and this second pass, with
    the same weights, gives ``masked_image_tokens`` and ``masked_patches`` to the
    patch-to-lexicon head:

    .. math::

        z^{mask} = \mathrm{ViT}\big(x \odot (1 - m) + e_{[M]}\, m\big), \qquad
        P^{p2l}_i = \mathrm{softmax}\big(W_{we}(W z^{mask}_i + b)\big),\ i \in \mathcal M
        \qquad \text{(ELA, Eq. 2 on the masked view)}

    The paper does not say which view the other objectives see; this is the choice
    of masked-image pre-training that keeps the retrieval objectives on the images
    they are evaluated on. It owns no parameter (the mask token is the encoder's).
    It masks only when both this block and the encoder are in training mode.

    Args:
        encoder: the vision encoder block's name (in a Matcher), or the encoder itself;
            it must have ``forward_masked`` and ``mask_ratio > 0``
            (:class:`~imtm.components.TimmVisionEncoder`).

    Shape:
        - images: ``(Bi, 3, H, W)`` pixels
        - output: ``masked_image_tokens`` Tokens ``(Bi, P + h*w, D)``, ``masked_patches (Bi, P + h*w)`` bool

    References:
        Yang et al., "Pre-training Cross-Modal Retrieval by Expansive Lexicon-Patch
        Alignment", LREC-COLING 2024, Sec. 3 (patch masking); Bao et al., "BEiT", ICLR 2022.

    Example:
        >>> from imtm.components import TimmVisionEncoder
        >>> enc = TimmVisionEncoder("vit_tiny_patch16_224", img_size=32, out_dim=16, mask_ratio=0.25,
        ...     mask_in_forward=False, model_kwargs=dict(depth=1, embed_dim=32, num_heads=2, patch_size=8))
        >>> images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        >>> _, whole = enc.train()(images)
        >>> tokens, masked = MaskedImageView(enc).train()(images)
        >>> int(whole.sum()), masked.sum(1).tolist()
        (0, [4, 4])
    """

    requires = ("images",)
    provides = ("masked_image_tokens", "masked_patches")
    _borrowed = ("encoder", "_linked")
    _target_param = "encoder"
    _parameter_constraints = {"encoder": [block_or_name(Component, description="a vision encoder")]}

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        from imtm.components.encoders.timm_vision import TimmVisionEncoder, tiny_vit_params

        encoder = TimmVisionEncoder(**tiny_vit_params(mask_ratio=0.5, mask_in_forward=False))
        return (Example({"encoder": encoder}, inputs={"images": "pixels"}),)

    def __init__(self, encoder="image", *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.encoder = encoder
        self._set_target(encoder)

    def _check_target(self, block, name=None) -> None:
        where = type(self).__name__
        if not callable(getattr(block, "forward_masked", None)):
            raise TypeError(
                f"{where}: the encoder block ({type(block).__name__}) has no forward_masked; use a "
                "TimmVisionEncoder"
            )
        if not getattr(block, "mask_ratio", 0) > 0:
            raise ValueError(
                f"{where}: the encoder masks nothing (mask_ratio={getattr(block, 'mask_ratio', None)!r}); "
                "build it with mask_ratio > 0 (and mask_in_forward=False for two views)"
            )

    def forward(self, images):
        # This block's own mode decides (the encoder is borrowed, so eval() does not reach it).
        return self.target().forward_masked(images, mask=self.training)

    def extra_repr(self) -> str:
        ref = self.encoder if isinstance(self.encoder, str) else type(self.encoder).__name__
        return f"encoder={ref!r}, " + super().extra_repr()
