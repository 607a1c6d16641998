"""Stage-1 indexes: exact inner-product top-K over L2-normalised global embeddings.

Two interchangeable back ends, both exact (so they rank alike up to ties):

- :class:`TorchIndex`: blocked matrix products and a running top-K in torch, on
  the queries' device; the gallery may be a memory-mapped NumPy array, read one
  block at a time, so it need not fit in RAM.
- :class:`FaissIndex`: faiss's ``IndexFlatIP`` (``pip install 'imtm[faiss]'``),
  saved with faiss's own format and opened memory-mapped.

Shape glossary: ``Q`` queries, ``n`` gallery items, ``D`` embedding size, ``K`` kept.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imtm._io import check_npy_size
from imtm.tokens import check_finite

__all__ = ["DEFAULT_INDEX_BLOCK_ELEMENTS", "INDEXES", "FaissIndex", "TorchIndex", "resolve_index"]

#: Query x gallery similarities held at once by :class:`TorchIndex` (64 MiB of float32).
DEFAULT_INDEX_BLOCK_ELEMENTS = 1 << 24

EMBEDDINGS_FILE = "embedding.npy"
FAISS_FILE = "index.faiss"


def _check_queries(queries: torch.Tensor, dim: int, where: str) -> torch.Tensor:
    if not isinstance(queries, torch.Tensor) or queries.dim() != 2:
        raise ValueError(
            f"{where}: expected query embeddings of shape (Q, {dim}), got "
            f"{tuple(getattr(queries, 'shape', ())) or type(queries).__name__}"
        )
    if queries.shape[1] != dim:
        raise ValueError(
            f"{where}: query embeddings have dimension {queries.shape[1]} but the gallery's have "
            f"{dim}; both sides must embed into one space"
        )
    if queries.dtype == torch.bool or queries.is_complex():
        raise TypeError(f"{where}: expected real query embeddings, got dtype {queries.dtype}")
    # NaN has no place in a ranking: topk would return it first, or anywhere.
    check_finite(queries, f"{where}: query embeddings")
    return queries


def _check_k(k: Any, n: int, where: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{where}: k must be an integer, got {k!r}")
    if n == 0:
        raise ValueError(f"{where}: the gallery is empty; add embeddings before searching")
    if not 1 <= k <= n:
        raise ValueError(f"{where}: k must be in [1, {n}] (the gallery size), got {k}")
    return int(k)


def load_array(path: Path, mmap: bool, where: str) -> np.ndarray:
    """``np.load`` (never unpickling) of a float ``(n, D)`` array; errors name the file."""
    try:
        check_npy_size(path, where)  # before np.load allocates the declared shape
        x = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{where}: {path} is missing; the saved folder is incomplete"
        ) from err
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(
            f"{where}: {path} is not a readable .npy array (truncated or damaged?): {err}"
        ) from err
    if x.dtype.kind not in "fiub":
        raise ValueError(f"{where}: {path} holds an array of dtype {x.dtype}; expected numbers")
    return x


class TorchIndex:
    """Exact inner-product search by blocked matrix products (the gallery may be memory-mapped).

    Args:
        embeddings: ``(n, D)`` gallery embeddings (a tensor, or a NumPy array such as a memmap).
        max_block_elements: at most this many ``query x gallery`` similarities exist at once.

    Example:
        >>> idx = TorchIndex(torch.eye(4))
        >>> idx.search(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), 2)[1].tolist()[0][0]
        1
    """

    kind = "torch"

    def __init__(self, embeddings: Any, max_block_elements: int = DEFAULT_INDEX_BLOCK_ELEMENTS):
        self.embeddings = embeddings
        self.max_block_elements = max_block_elements

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def _rows(self, a: int, b: int, device: torch.device) -> torch.Tensor:
        block = self.embeddings[a:b]
        if isinstance(block, np.ndarray):
            block = torch.from_numpy(np.ascontiguousarray(block))
        return block.to(device=device, dtype=torch.float32)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` gallery rows of largest inner product with each query.

        Shape:
            - queries: ``(Q, D)``
            - output: scores ``(Q, K)`` float32 and indices ``(Q, K)`` long, best first, on the queries' device

        Raises:
            TypeError: ``k`` not an integer (a bool included), queries not real numbers.
            ValueError: ``k`` outside ``[1, n]``, an empty gallery, queries not ``(Q, D)``, or NaN/inf
                in the queries or in the gallery rows searched
                (:class:`~imtm.tokens.NonFiniteValueError`).
        """
        queries = _check_queries(queries, self.dim, "TorchIndex").float()
        n, q = len(self), queries.shape[0]
        k = _check_k(k, n, "TorchIndex")
        rows = max(k, self.max_block_elements // max(q, 1))
        best_s = queries.new_empty((q, 0))
        best_i = torch.empty((q, 0), dtype=torch.long, device=queries.device)
        for a in range(0, n, rows):
            b = min(n, a + rows)
            rows_ab = self._rows(a, b, queries.device)
            check_finite(rows_ab, f"TorchIndex: gallery embeddings (rows {a}..{b - 1})")
            s = queries @ rows_ab.T
            top_s, top_i = s.topk(min(k, b - a), dim=1)
            best_s = torch.cat([best_s, top_s], 1)
            best_i = torch.cat([best_i, top_i + a], 1)
            if best_s.shape[1] > k:
                best_s, pos = best_s.topk(k, dim=1)
                best_i = best_i.gather(1, pos)
        return best_s, best_i

    def save(self, folder: Path) -> None:
        np.save(folder / EMBEDDINGS_FILE, _numpy(self.embeddings), allow_pickle=False)

    @classmethod
    def load(cls, folder: Path, mmap: bool = True) -> TorchIndex:
        """Open ``folder/embedding.npy`` (memory-mapped by default; never unpickled).

        Raises:
            FileNotFoundError: the file is missing.
            ValueError: the file is truncated, damaged, not numeric or not ``(n, D)``; the message names it.
        """
        path = Path(folder) / EMBEDDINGS_FILE
        x = load_array(path, mmap, "TorchIndex.load")
        if x.ndim != 2:
            raise ValueError(
                f"TorchIndex.load: {path} holds an array of shape {x.shape}; expected (n, D)"
            )
        return cls(x)


def _faiss():
    try:
        import faiss
    except ModuleNotFoundError as err:
        raise ImportError(
            "index='faiss' needs faiss: pip install 'imtm[faiss]' (faiss-cpu), or use index='torch' "
            "(exact top-k in torch, the same ranking)"
        ) from err
    return faiss


class FaissIndex:
    """Exact inner-product search with faiss ``IndexFlatIP`` (opened memory-mapped after :meth:`save`).

    Args:
        embeddings: ``(n, D)`` gallery embeddings, or ``None`` when ``index`` is given.
        index: an existing faiss index (used by :meth:`load`).
    """

    kind = "faiss"

    def __init__(self, embeddings: Any = None, index: Any = None):
        faiss = _faiss()
        if index is None:
            x = np.ascontiguousarray(_numpy(embeddings), dtype=np.float32)
            if x.ndim != 2:
                raise ValueError(
                    f"FaissIndex: expected gallery embeddings of shape (n, D), got {x.shape}"
                )
            check_finite(torch.from_numpy(x), "FaissIndex: gallery embeddings")
            index = faiss.IndexFlatIP(x.shape[1])
            index.add(x)
        self.index = index

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`TorchIndex.search` (the search itself runs on the CPU), with the same errors."""
        queries = _check_queries(queries, self.dim, "FaissIndex")
        k = _check_k(k, len(self), "FaissIndex")
        x = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        scores, idx = self.index.search(x, k)
        return torch.from_numpy(scores).to(queries.device), torch.from_numpy(idx).long().to(
            queries.device
        )

    def save(self, folder: Path) -> None:
        _faiss().write_index(self.index, os.fspath(folder / FAISS_FILE))

    @classmethod
    def load(cls, folder: Path, mmap: bool = True) -> FaissIndex:
        faiss = _faiss()
        flag = getattr(faiss, "IO_FLAG_MMAP_IFC", getattr(faiss, "IO_FLAG_MMAP", 0)) if mmap else 0
        path = Path(folder) / FAISS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"FaissIndex.load: {path} is missing; the saved folder is incomplete"
            )
        try:
            return cls(index=faiss.read_index(os.fspath(path), flag))
        except RuntimeError as err:  # faiss reports a damaged file as a RuntimeError
            raise ValueError(
                f"FaissIndex.load: {path} is not a readable faiss index (truncated or damaged?): "
                f"{err}"
            ) from err


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


#: Index back ends by name.
INDEXES: dict[str, type] = {"torch": TorchIndex, "faiss": FaissIndex}


def resolve_index(name: str, where: str) -> type:
    """The index class called ``name`` (faiss checked for at once), or a ValueError with the choices."""
    from imtm._checks import suggest

    if name not in INDEXES:
        raise ValueError(
            f"{where}: index must be one of {sorted(INDEXES)}, got {name!r}."
            + suggest(name, INDEXES)
        )
    if name == "faiss":
        _faiss()
    return INDEXES[name]
