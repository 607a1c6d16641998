"""Read back what ``imtm extract`` wrote, with the token layout of the backbone.

:class:`imtm.data.PrecompDataset` reads the assembled files as plain region
features: every item is an ``(N, D)`` tensor and a batch is Tokens without a patch
grid. :class:`ExtractedDataset` reads the same files and also the manifest, so
every item is Tokens ``(1, N, D)`` carrying the patch ``grid`` and
``num_prefix_tokens`` ([CLS]) of the encoder that produced them; batches keep them
(``collate`` concatenates Tokens), and so do the blocks that read them
(``PrecomputedEncoder`` returns ``images.with_feats(...)``), which is what
grid-aware blocks such as LAPS's patch selection need.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from imtm.data.extract import read_manifest
from imtm.data.precomp import PrecompDataset, PrecompImages
from imtm.tokens import Tokens

__all__ = ["ExtractedDataset", "TokenImages"]


class TokenImages:
    """Rows of a :class:`~imtm.data.precomp.PrecompImages` as Tokens ``(1, N, D)`` with a grid.

    Args:
        rows: the feature rows.
        grid: the patch grid ``(h, w)`` of the non-prefix tokens, or ``None``.
        num_prefix_tokens: leading prefix tokens ([CLS]) of every row.

    Shape:
        - item: Tokens ``(1, N, D)``, every token real
    """

    def __init__(self, rows: PrecompImages, grid: tuple[int, int] | None, num_prefix_tokens: int):
        self.rows = rows
        self.grid = grid
        self.num_prefix_tokens = num_prefix_tokens

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.rows.shape

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k) -> Tokens:
        return Tokens(self.rows[k][None], grid=self.grid, num_prefix_tokens=self.num_prefix_tokens)

    def __iter__(self):
        for k in range(len(self)):
            yield self[k]


class ExtractedDataset(PrecompDataset):
    """A split written by ``imtm extract`` / :func:`imtm.data.extract_features`, items as Tokens with their grid.

    Args:
        data_path: the output folder of the extraction.
        split: the split name given to the extraction.
        **kwargs: passed to :class:`imtm.data.PrecompDataset` (``mmap``, ``vocab``,
            ``build_vocab``, ``name``).

    Attributes:
        token_layout: the manifest's ``{"num_tokens", "dim", "grid", "num_prefix_tokens"}``.
        rows: the plain feature rows (:class:`~imtm.data.precomp.PrecompImages`).

    Raises:
        FileNotFoundError: no manifest ``{split}_extract.json`` (the folder was not written
            by the extraction; :class:`PrecompDataset` reads it without the layout).
        ValueError: the extraction did not finish (run it again to resume it); the manifest is
            not UTF-8 JSON, or its token layout is malformed or does not fit the feature file.

    Shape:
        - ``self[k]["images"]``: Tokens ``(1, N, D)``

    Example:
        >>> import tempfile, torch
        >>> from imtm.data import ImageCaptionDataset, collate, extract_features
        >>> ds = ImageCaptionDataset(torch.rand(2, 3, 4, 4), ["a", "b"], [0, 1])
        >>> enc = lambda x: Tokens(x.flatten(2).transpose(1, 2), grid=(4, 4))
        >>> out = extract_features(enc, ds, tempfile.mkdtemp(), "test", progress=False)
        >>> batch = collate([ExtractedDataset(out, "test")[k] for k in range(2)])
        >>> batch["images"].feats.shape, batch["images"].grid
        (torch.Size([2, 16, 3]), (4, 4))
    """

    def __init__(self, data_path, split: str, **kwargs):
        manifest_path = Path(data_path) / f"{split}_extract.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"ExtractedDataset: no {manifest_path.name} in {str(data_path)!r}; the folder was not written by "
                "imtm extract (read plain features with PrecompDataset)"
            )
        manifest = read_manifest(
            manifest_path,
            "ExtractedDataset",
            "run the extraction again with overwrite=True (--overwrite)",
        )
        if not isinstance(manifest, dict):
            raise ValueError(
                f"ExtractedDataset: {str(manifest_path)!r} must hold a JSON object, got {type(manifest).__name__}"
            )
        if not manifest.get("complete"):
            done, total = len(manifest.get("shards", {})), manifest.get("n_images")
            raise ValueError(
                f"ExtractedDataset: the extraction in {str(data_path)!r} did not finish ({done} shards of "
                f"{total} images written); run the same imtm extract command again to resume it"
            )
        super().__init__(data_path, split, **kwargs)
        layout = manifest.get("tokens")
        grid, prefix = self._check_layout(layout, self.images.shape, manifest_path)
        self.token_layout = layout
        self.rows = self.images
        self.images = TokenImages(self.rows, grid, prefix)

    @staticmethod
    def _check_layout(layout, shape, manifest_path) -> tuple[tuple[int, int] | None, int]:
        """``(grid, num_prefix_tokens)`` of the manifest, checked against the feature file's ``(n, N, D)``."""

        def is_count(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        where = f"ExtractedDataset: the 'tokens' layout of {str(manifest_path)!r}"
        if not isinstance(layout, dict):
            raise ValueError(
                f"{where} is {layout!r}, expected an object {{num_tokens, dim, grid, num_prefix_tokens}}"
            )
        grid, prefix = layout.get("grid"), layout.get("num_prefix_tokens", 0)
        if grid is not None and not (
            isinstance(grid, list) and len(grid) == 2 and all(is_count(g) for g in grid)
        ):
            raise ValueError(f"{where} has grid {grid!r}, expected [h, w] or null")
        if not is_count(prefix):
            raise ValueError(
                f"{where} has num_prefix_tokens {prefix!r}, expected a non-negative integer"
            )
        n_tokens, dim = shape[1], shape[2]
        expected = {"num_tokens": n_tokens, "dim": dim}
        wrong = {k: layout.get(k) for k, v in expected.items() if layout.get(k) != v}
        if grid is not None and grid[0] * grid[1] + prefix != n_tokens:
            wrong["grid"] = grid
        if wrong:
            raise ValueError(
                f"{where} ({wrong}) does not fit the features of shape (n, {n_tokens}, {dim}) next to it; the "
                "manifest and the feature file come from different runs: run the extraction again"
            )
        return (tuple(grid) if grid is not None else None), prefix

    def fingerprint(self) -> str:
        """A short hash of the captions, the caption-to-image map and a sample of the feature rows."""
        h = hashlib.sha256()
        h.update("\n".join(self.captions).encode())
        h.update(self.caption_to_image.numpy().tobytes())
        for i in sorted({0, self.n_images // 2, self.n_images - 1}):
            h.update(self.rows[i].contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
