"""Global similarity: masked mean pooling of tokens and cosine score matrices (the VSE++ baseline).

Every function takes plain tensors and optional bool masks (True = real token)
and works on the device and dtype of its inputs.
"""

from __future__ import annotations

import torch

from imtm.tokens import autocast_common_dtype, l2_normalize, masked_mean_along

__all__ = ["cosine_similarity_matrix", "global_cosine_scores", "masked_mean"]

#: Floor of a vector norm before division, so an all-zero vector gives a zero score, not NaN.
EPS = 1e-8


def _check_tokens(x: torch.Tensor, mask: torch.Tensor | None, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor of shape (B, N, D), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{what}: expected a tensor of shape (B, N, D), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{what}: expected floating-point features, got {x.dtype}")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"{what}: the mask must be a bool tensor (True = real token), got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}"
        )
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"{what}: mask of shape {tuple(mask.shape)} does not match (B, N) = {tuple(x.shape[:2])}"
        )


def masked_mean(feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Mean of the real tokens of every row.

    .. math::

        \bar v_b = \frac{1}{|\{n : m_{bn}\}|} \sum_{n : m_{bn}} v_{bn}

    Padded positions never enter the result, whatever they hold (NaN included),
    and a row without any real token gives a zero vector.

    Args:
        feats: token features.
        mask: True where a token is real; ``None`` means every token is real.

    Shape:
        - feats: ``(B, N, D)``
        - mask: ``(B, N)``
        - output: ``(B, D)``

    Example:
        >>> x = torch.tensor([[[1.0], [3.0], [100.0]]])
        >>> masked_mean(x, torch.tensor([[True, True, False]]))
        tensor([[2.]])
    """
    _check_tokens(feats, mask, "masked_mean")
    return masked_mean_along(feats, None if mask is None else mask.unsqueeze(-1), dim=1)


def cosine_similarity_matrix(
    images: torch.Tensor, texts: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    r"""Cosine similarity of every image vector with every caption vector.

    .. math::

        s(i, t) = \frac{f_i^\top g_t}{\lVert f_i \rVert \, \lVert g_t \rVert}

    (VSE++, Eq. 4, with the embeddings normalised as in its code). Computed as one
    matrix product of L2-normalised rows; an all-zero vector scores 0 with everything.

    Args:
        images: image embeddings.
        texts: caption embeddings.
        eps: floor of the norms.

    Shape:
        - images: ``(Bi, D)``
        - texts: ``(Bt, D)``
        - output: ``(Bi, Bt)``, values in ``[-1, 1]``

    References:
        Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives", BMVC 2018.

    Example:
        >>> cosine_similarity_matrix(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        tensor([[1., 0.]])
    """
    for x, what in ((images, "images"), (texts, "texts")):
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"cosine_similarity_matrix: {what} must be a tensor (B, D), got {type(x).__name__}"
            )
        if x.dim() != 2:
            raise ValueError(
                f"cosine_similarity_matrix: {what} must have shape (B, D), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"cosine_similarity_matrix: {what} must be floating point, got {x.dtype}"
            )
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"cosine_similarity_matrix: images have dimension {images.shape[1]} but texts have "
            f"{texts.shape[1]}; project both into one space first"
        )
    common = autocast_common_dtype(images, texts)
    if common is not None:  # under autocast: blocks may return different dtypes
        images, texts = images.to(common), texts.to(common)
    if images.dtype != texts.dtype:
        raise TypeError(
            f"cosine_similarity_matrix: images are {images.dtype} but texts are {texts.dtype}"
            " (outside autocast, cast one to the other's dtype)"
        )
    return l2_normalize(images, dim=-1, eps=eps) @ l2_normalize(texts, dim=-1, eps=eps).transpose(
        0, 1
    )


def global_cosine_scores(
    images: torch.Tensor,
    texts: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    *,
    eps: float = EPS,
) -> torch.Tensor:
    r"""Cosine similarity of mean-pooled image tokens and mean-pooled words, for every pair.

    .. math::

        s(i, t) = \cos\Big(\tfrac{1}{|N_i|}\sum_{n \in N_i} v_{in},\;
                           \tfrac{1}{|M_t|}\sum_{m \in M_t} w_{tm}\Big)

    The global-embedding baseline of VSE++ (Eq. 4) with average pooling as the
    aggregator (the "AVG" pooling of VSE-infinity); ``N_i`` / ``M_t`` are the real
    tokens of image ``i`` / caption ``t``.

    Args:
        images: image token features.
        texts: word features.
        image_mask: True where an image token is real (``None``: all real).
        text_mask: True where a word is real (``None``: all real).
        eps: floor of the norms.

    Shape:
        - images: ``(Bi, N, D)``; image_mask: ``(Bi, N)``
        - texts: ``(Bt, M, D)``; text_mask: ``(Bt, M)``
        - output: ``(Bi, Bt)``

    References:
        Faghri et al., "VSE++", BMVC 2018; Chen et al., "Learning the Best Pooling Strategy
        for Visual Semantic Embedding" (VSE-infinity), CVPR 2021.

    Example:
        >>> s = global_cosine_scores(torch.randn(2, 5, 8), torch.randn(3, 4, 8))
        >>> s.shape
        torch.Size([2, 3])
    """
    _check_tokens(images, image_mask, "global_cosine_scores (images)")
    _check_tokens(texts, text_mask, "global_cosine_scores (texts)")
    return cosine_similarity_matrix(
        masked_mean(images, image_mask), masked_mean(texts, text_mask), eps=eps
    )
