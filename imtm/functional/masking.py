"""Random patch masking: which patches of each image are hidden behind a mask token (ELA)."""

from __future__ import annotations

from numbers import Real

import torch

__all__ = ["num_masked_patches", "random_patch_mask"]


def num_masked_patches(num_patches: int, mask_ratio: float) -> int:
    """How many of ``num_patches`` patches a ``mask_ratio`` masks: ``round(mask_ratio * num_patches)``.

    Python's ``round`` (half to even), so the count is an exact function of the
    two numbers that another block can recompute.

    Example:
        >>> num_masked_patches(196, 0.5), num_masked_patches(64, 0.3)
        (98, 19)
    """
    return round(mask_ratio * num_patches)


def random_patch_mask(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""Draw, for every image, a uniformly random set of exactly ``K`` patches to mask.

    .. math::

        K = \operatorname{round}(r \cdot N), \qquad
        \mathcal{M}_b \sim \mathrm{Uniform}\{S \subset \{1..N\} : |S| = K\}

    Every image gets the same count ``K`` (the ELA / MAE / BEiT convention: a
    fixed ratio, random positions). The positions are the ``K`` smallest of ``N``
    uniform draws per image, so the sets are independent across images and one
    batched ``argsort`` draws them all.

    Args:
        batch_size: ``B``.
        num_patches: ``N``, the patches per image (prefix tokens such as [CLS] excluded).
        mask_ratio: ``r`` in ``[0, 1)``.
        generator: the random source (``None``: torch's global generator).
        device: where the mask is made.

    Shape:
        - output: ``(B, N)`` bool, True where a patch is masked; ``K`` True per row.

    References:
        Yang et al., "Pre-training Cross-Modal Retrieval by Expansive Lexicon-Patch Alignment"
        (ELA), LREC-COLING 2024 (patch masking at the image encoder's input);
        Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022 (a learned mask token).

    Example:
        >>> m = random_patch_mask(2, 16, 0.25, generator=torch.Generator().manual_seed(0))
        >>> m.shape, m.sum(1).tolist()
        (torch.Size([2, 16]), [4, 4])
    """
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, Real) or not 0 <= mask_ratio < 1:
        raise ValueError(
            f"random_patch_mask: mask_ratio must be a number in [0, 1), got {mask_ratio!r}"
        )
    if batch_size < 0 or num_patches < 0:
        raise ValueError(
            f"random_patch_mask: batch_size and num_patches must be >= 0, got {batch_size} and {num_patches}"
        )
    k = num_masked_patches(num_patches, mask_ratio)
    if generator is not None and device is None:
        device = generator.device
    mask = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=device)
    if k == 0:
        return mask
    noise = torch.rand(batch_size, num_patches, generator=generator, device=device)
    chosen = noise.argsort(dim=1)[:, :k]
    return mask.scatter_(1, chosen, True)
