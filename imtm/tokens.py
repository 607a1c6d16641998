"""Tokens: padded token features plus a validity mask, the one type that flows between blocks.

Shape glossary (used in every docstring of imtm):

- ``B``: batch size (``Bi`` images, ``Bt`` captions)
- ``N``: image tokens (regions or patches), ``M``: words
- ``D``: feature dimension, ``K``: kept / top-k, ``V``: vocabulary size
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

__all__ = [
    "NonFiniteValueError",
    "Tokens",
    "autocast_common_dtype",
    "check_finite",
    "masked_mean_along",
    "l2_normalize",
]


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, dim=dim, eps=eps)``, also for huge finite values.

    The sum of squares of entries around 6e19 overflows float32 to inf, and ``x / inf`` is
    0: a cosine score of exactly 0.0 from finite features. Rows whose largest entry could
    overflow it are first divided by that entry (the direction is the same); every other row
    is ``F.normalize``'s result bit for bit.

    Shape:
        - x: any shape, output: the same.

    Example:
        >>> l2_normalize(torch.tensor([[6e19, 8e19], [3.0, 4.0]]))
        tensor([[0.6000, 0.8000],
                [0.6000, 0.8000]])
    """
    if not x.is_floating_point() or x.numel() == 0:
        return F.normalize(x, dim=dim, eps=eps)
    limit = (
        torch.finfo(x.dtype).max / max(1, x.shape[dim])
    ) ** 0.5 / 2  # squares summed stay finite below it
    big = x.detach().abs().amax(dim, keepdim=True)
    scale = torch.where(
        big > limit, big, torch.ones((), dtype=big.dtype, device=big.device)
    )  # NaN: 1
    return F.normalize(x / scale, dim=dim, eps=eps)


class NonFiniteValueError(ValueError):
    """A block was given NaN or inf values (raised by :func:`check_finite`).

    A ``ValueError``, so code that catches bad input keeps working; its own class lets
    ``Matcher.fit`` tell "a block refused a non-finite input" from other errors and trace
    the value back to the block (or the batch) that produced it.
    """


def autocast_common_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype | None:
    """The dtype two tensors of different floating dtypes meet in under autocast; ``None`` otherwise.

    Under autocast, blocks of one model legitimately return different dtypes (a GRU's output
    stays float32 while a linear layer's is bfloat16), so a block that combines two of them
    promotes both to their common dtype (the products inside still run in the autocast dtype).
    Outside autocast a dtype mismatch is a mistake the caller should see, so this returns
    ``None`` there, and for equal dtypes.

    Example:
        >>> a, b = torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)
        >>> autocast_common_dtype(a, b) is None
        True
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_common_dtype(a, b)
        torch.float32
    """
    if a.dtype == b.dtype or not (a.is_floating_point() and b.is_floating_point()):
        return None
    if not torch.is_autocast_enabled(a.device.type):
        return None
    return torch.promote_types(a.dtype, b.dtype)


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteValueError` (a ``ValueError``) naming ``what`` when ``x`` holds NaN or inf.

    Used at the boundary of blocks (encoders, losses). It synchronises with the
    device, so blocks call it once per input, not inside inner loops. Inside a
    ``torch.compile``-d region it checks nothing (a value-dependent branch would
    break the graph); ``Matcher.fit`` still tests every step's loss and gradient
    for NaN/inf, outside the compiled blocks.
    """
    if torch.compiler.is_compiling():
        return
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteValueError(
            f"{what} holds {n_bad} NaN or inf value(s); check the input features"
        )


def masked_mean_along(
    x: torch.Tensor, mask: torch.Tensor | None = None, *, dim: int = 1, empty: float = 0.0
) -> torch.Tensor:
    r"""Mean of ``x`` along ``dim`` over the positions where ``mask`` is True.

    The one implementation behind :meth:`Tokens.masked_mean`,
    :func:`imtm.functional.masked_mean` and :func:`imtm.functional.mean_pool`. Masked
    positions never enter the result, whatever they hold (NaN and inf included); real
    positions are counted in ``x``'s dtype, and the result keeps ``x``'s dtype. Unchecked:
    the wrappers check their inputs.

    Args:
        x: the values.
        mask: bool, True where a position counts; broadcastable to ``x`` (aligned on the
            trailing axes, as in broadcasting); ``None``: every position counts.
        dim: the axis to average.
        empty: the result of a set without any real position (``0.0``: a zero mean).

    Shape:
        - x: ``(*, N, *)`` with ``N`` at ``dim``
        - mask: broadcastable to ``x``
        - output: ``x``'s shape without ``dim``

    Example:
        >>> masked_mean_along(torch.tensor([[1.0, 3.0, float("nan")]]), torch.tensor([[True, True, False]]))
        tensor([2.])
    """
    if mask is None:
        return x.mean(dim)
    d = dim % x.dim()
    m = mask.reshape((1,) * (x.dim() - mask.dim()) + tuple(mask.shape))
    # where() rather than a product with the mask: 0 * NaN in padding would be NaN.
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(d)
    # A mask constant along dim (size 1 there) counts every position of x along it. Counted in
    # x's dtype, the arithmetic Tokens.masked_mean always had: an integer count cast afterwards
    # compiles (torch.compile) to scores that break exact ties (duplicate captions) unlike eager.
    count = m.to(x.dtype).sum(d) * (x.shape[d] if m.shape[d] == 1 else 1)
    mean = total / count.clamp_min(1)
    if empty == 0.0:
        return mean  # an empty set sums to 0, so 0 / 1 is already the answer
    return torch.where(count > 0, mean, torch.full((), empty, dtype=mean.dtype, device=mean.device))


@dataclass(frozen=True)
class Tokens:
    """Padded token features and a boolean mask (True = real token).

    Args:
        feats: ``(B, N, D)`` token features, or ``(B, N)`` integer token ids
            (raw captions as they come out of a tokenizer).
        mask: ``(B, N)`` bool, True where a token is real. ``None`` means every
            token is real.
        grid: optional ``(h, w)`` patch grid of the non-prefix tokens (ViT/Swin).
        num_prefix_tokens: how many leading tokens are prefix tokens such as
            [CLS] (never hard-coded as ``x[:, 1:]`` anywhere in imtm).

    Shape:
        - feats: ``(B, N, D)`` or ``(B, N)``
        - mask: ``(B, N)``

    Example:
        >>> t = Tokens.from_lengths(torch.randn(2, 4, 8), torch.tensor([4, 2]))
        >>> t.mask.sum(1).tolist()
        [4, 2]
        >>> t.masked_mean().shape
        torch.Size([2, 8])
    """

    feats: torch.Tensor
    # None on construction means every token is real; __post_init__ stores that mask, so a Tokens
    # always holds a tensor here.
    mask: torch.Tensor = None  # type: ignore[assignment]
    grid: tuple[int, int] | None = None
    num_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.feats, torch.Tensor):
            raise TypeError(
                f"Tokens: feats must be a torch.Tensor, got {type(self.feats).__name__}"
            )
        if self.feats.dim() not in (2, 3):
            raise ValueError(
                f"Tokens: feats must have shape (B, N, D) or (B, N), got {tuple(self.feats.shape)}"
            )
        mask = self.mask
        if mask is None:
            mask = torch.ones(self.feats.shape[:2], dtype=torch.bool, device=self.feats.device)
            object.__setattr__(self, "mask", mask)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                "Tokens: mask must be a bool tensor (True = real token), got "
                f"{getattr(mask, 'dtype', type(mask).__name__)}"
            )
        if tuple(mask.shape) != tuple(self.feats.shape[:2]):
            raise ValueError(
                f"Tokens: mask shape {tuple(mask.shape)} does not match feats "
                f"(B, N) = {tuple(self.feats.shape[:2])}"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_lengths(
        cls, feats: torch.Tensor, lengths: torch.Tensor | Sequence[int], **kw
    ) -> Tokens:
        """Build Tokens whose first ``lengths[b]`` tokens of row ``b`` are real."""
        lengths = torch.as_tensor(lengths, device=feats.device)
        if lengths.dim() != 1 or lengths.numel() != feats.shape[0]:
            raise ValueError(
                f"Tokens.from_lengths: expected {feats.shape[0]} lengths, got shape {tuple(lengths.shape)}"
            )
        if bool((lengths < 0).any()) or bool((lengths > feats.shape[1]).any()):
            raise ValueError(
                f"Tokens.from_lengths: lengths must lie in [0, {feats.shape[1]}], got {lengths.tolist()}"
            )
        mask = torch.arange(feats.shape[1], device=feats.device)[None, :] < lengths[:, None]
        return cls(feats, mask, **kw)

    @classmethod
    def pad_sequence(cls, seqs: Sequence[torch.Tensor], pad_to: int | None = None, **kw) -> Tokens:
        """Pad a list of ``(N_b, D)`` (or ``(N_b,)`` id) tensors into Tokens."""
        if len(seqs) == 0:
            raise ValueError("Tokens.pad_sequence: got an empty list")
        n = max(int(s.shape[0]) for s in seqs)
        if pad_to is not None:
            if pad_to < n:
                raise ValueError(
                    f"Tokens.pad_sequence: pad_to={pad_to} is less than the longest ({n})"
                )
            n = pad_to
        first = seqs[0]
        out = first.new_zeros((len(seqs), n, *first.shape[1:]))
        mask = torch.zeros(len(seqs), n, dtype=torch.bool, device=first.device)
        for b, s in enumerate(seqs):
            out[b, : s.shape[0]] = s
            mask[b, : s.shape[0]] = True
        return cls(out, mask, **kw)

    @classmethod
    def cat(cls, parts: Sequence[Tokens]) -> Tokens:
        """Concatenate along the batch axis, padding the token axis to the longest."""
        if len(parts) == 0:
            raise ValueError("Tokens.cat: got an empty list")
        n = max(p.num_tokens for p in parts)
        feats, masks = [], []
        for p in parts:
            extra = n - p.num_tokens
            f, m = p.feats, p.mask
            if extra:
                f = torch.cat([f, f.new_zeros((f.shape[0], extra, *f.shape[2:]))], dim=1)
                m = torch.cat([m, m.new_zeros((m.shape[0], extra))], dim=1)
            feats.append(f)
            masks.append(m)
        p0 = parts[0]
        return cls(
            torch.cat(feats), torch.cat(masks), grid=p0.grid, num_prefix_tokens=p0.num_prefix_tokens
        )

    # ------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int:
        return int(self.feats.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.feats.shape[1])

    @property
    def dim(self) -> int:
        return int(self.feats.shape[2]) if self.feats.dim() == 3 else 0

    @property
    def lengths(self) -> torch.Tensor:
        """``(B,)`` number of real tokens per row."""
        return self.mask.sum(1)

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    def __len__(self) -> int:
        return self.batch_size

    # ------------------------------------------------------------------ transforms
    def __getitem__(self, index) -> Tokens:
        """Select rows of the batch (an int keeps the batch axis)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return replace(self, feats=self.feats[index], mask=self.mask[index])

    def with_feats(self, feats: torch.Tensor) -> Tokens:
        """Same mask and metadata, new features ``(B, N, D')``."""
        return replace(self, feats=feats)

    def to(self, *args, **kwargs) -> Tokens:
        """Move to a device / dtype. The mask keeps its bool dtype; integer ids keep theirs."""
        if self.feats.is_floating_point():
            feats = self.feats.to(*args, **kwargs)
        else:
            device = next(
                (a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device")
            )
            feats = self.feats.to(device) if device is not None else self.feats
        return replace(self, feats=feats, mask=self.mask.to(feats.device))

    def trim(self) -> Tokens:
        """Drop trailing columns that are padding in every row."""
        if self.num_tokens == 0:
            return self
        last = self.mask.any(0).nonzero()
        n = int(last.max()) + 1 if last.numel() else 0
        return replace(self, feats=self.feats[:, :n], mask=self.mask[:, :n])

    def zero_padding(self) -> Tokens:
        """Features with padded positions set to exactly zero (whatever they held, NaN included)."""
        # where() rather than multiply: NaN * 0 is NaN, and padding may hold anything.
        return self.with_feats(
            torch.where(self.mask.unsqueeze(-1), self.feats, self.feats.new_zeros(()))
        )

    def normalize(self, eps: float = 1e-8) -> Tokens:
        """L2-normalise every token; padded tokens become zero vectors (whatever they held)."""
        f = l2_normalize(self.feats, dim=-1, eps=eps)
        return self.with_feats(torch.where(self.mask.unsqueeze(-1), f, f.new_zeros(())))

    def masked_mean(self, skip_prefix: bool = False) -> torch.Tensor:
        """``(B, D)`` mean over real tokens (optionally not counting prefix tokens).

        Rows without any real token give a zero vector.
        """
        mask = self.mask
        if skip_prefix and self.num_prefix_tokens:
            mask = mask.clone()
            mask[:, : self.num_prefix_tokens] = False
        return masked_mean_along(self.feats, mask.unsqueeze(-1), dim=1)

    def check(self, what: str, dim: int | None = None) -> Tokens:
        """Validate for a block: feature dim, no empty row, finite real features.

        Inside a ``torch.compile``-d region only the shapes are checked (the value checks
        synchronise with the device and would break the graph).
        """
        if self.feats.dim() != 3:
            raise ValueError(
                f"{what}: expected token features of shape (B, N, D), got {tuple(self.feats.shape)}"
            )
        if dim is not None and self.dim != dim:
            raise ValueError(
                f"{what}: expected token features of shape (B, N, {dim}), got {tuple(self.feats.shape)}"
            )
        if torch.compiler.is_compiling():
            return self
        empty = ~self.mask.any(1)
        if bool(empty.any()):
            rows = empty.nonzero().flatten().tolist()[:5]
            raise ValueError(f"{what}: rows {rows} have no real token (every position is padding)")
        real = self.feats[self.mask]
        check_finite(real, what)
        return self
