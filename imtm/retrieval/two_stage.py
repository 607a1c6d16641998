"""Two-stage retrieval: rank the whole gallery with global embeddings, re-score the top-K finely.

Fine-grained scorers cost ``O(images x captions x N x M)``: scoring a query against
a million-image gallery token by token is out of reach. The standard way out, used
by every large-scale late-interaction system, is to let a cheap global similarity
pick ``K`` candidates per query and to spend the fine-grained scorer on those only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.exceptions import NotFittedError

from imtm._io import read_json, regular_file_size
from imtm.data.collate import collate_images, collate_texts
from imtm.engine.evaluation import IMAGE, TEXT, encode_side, run_blocks, side_values_needed
from imtm.engine.serialization import atomic_write_bytes
from imtm.retrieval.cache import CachedValue, load_values, save_values
from imtm.retrieval.index import EMBEDDINGS_FILE, FAISS_FILE, INDEXES, resolve_index
from imtm.tokens import Tokens, check_finite

__all__ = ["CALL_COST_PAIRS_CPU", "FORMAT", "QUERY_BLOCK_CUDA", "SearchResult", "TwoStageRetriever"]

FORMAT = "imtm.TwoStageRetriever/1"

#: The fixed cost of one stage-2 call on the CPU, in scored pairs: one call scores a block of
#: ``b`` queries against the union of their candidates (up to ``b * b * k`` pairs for ``b * k``
#: needed), so the default block is the ``b`` that minimises ``(CALL_COST_PAIRS + b*b*k) / b``,
#: ``b = sqrt(CALL_COST_PAIRS / k)``. Measured with bench_two_stage (CHAN scorer, D = 128, one
#: thread): a call of 100 pairs took 7-8 ms where full scoring spends about 7 us per pair.
CALL_COST_PAIRS_CPU = 1000

#: Queries per stage-2 call on CUDA, where each call costs kernel launches and idle arithmetic
#: units are cheap (not measured here: no GPU was available).
QUERY_BLOCK_CUDA = 16

#: Gallery rows averaged at once for a masked-mean stage-1 embedding (bounds its temporary memory).
EMBED_CHUNK = 4096

_EMBEDDING = {IMAGE: "image_embedding", TEXT: "text_embedding"}
_TOKENS = {IMAGE: "image_tokens", TEXT: "text_tokens"}
_RAW = {IMAGE: "images", TEXT: "texts"}
_FOLDER = {IMAGE: "images", TEXT: "captions"}
_NOUN = {IMAGE: "images", TEXT: "captions"}
_OTHER = {IMAGE: TEXT, TEXT: IMAGE}


@dataclass
class SearchResult:
    """What a search returns, best first.

    Attributes:
        indices: ``(Q, top)`` gallery rows ranked by the fine-grained score.
        scores: ``(Q, top)`` their fine-grained scores (float32).
        candidates: ``(Q, K)`` the stage-1 candidates, in stage-1 order.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    candidates: torch.Tensor


@dataclass
class _Gallery:
    index: Any
    values: dict[str, CachedValue]

    def __len__(self) -> int:
        return len(self.index)


def _rows(value: Any, rows: torch.Tensor) -> Any:
    """Rows ``rows`` of one batch value (Tokens trimmed of all-padding columns)."""
    if isinstance(value, Tokens):
        return value[rows.to(value.device)].trim()
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)]
    raise TypeError(
        f"TwoStageRetriever: cannot select rows of a value of type {type(value).__name__}"
    )


#: The file that describes a saved retriever (written last: its presence means the folder is complete).
META = "retriever.json"
#: The index file each index kind writes in a gallery folder.
_INDEX_FILES = {"torch": EMBEDDINGS_FILE, "faiss": FAISS_FILE}
#: A cached value's name: a plain identifier (it names files ``<name>.feats.npy``), never a path.
_VALUE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _check_meta(meta: Any, meta_path: Path, owner: str) -> dict:
    """Check every entry of a retriever.json; return its galleries. ValueError naming the entry otherwise."""
    where = f"{owner}.load: {meta_path}"
    if not isinstance(meta, dict):  # a damaged file, not an argument of the wrong type
        raise ValueError(f"{where} holds a {type(meta).__name__}, expected an object")  # noqa: TRY004
    absent = [
        key
        for key in ("format", "k", "index", "query_block", "config_hash", "weights", "galleries")
        if key not in meta
    ]
    if absent:
        raise ValueError(f"{where} lacks {absent}; not a complete saved {owner}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{where} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(meta["index"], str) or meta["index"] not in _INDEX_FILES:
        raise ValueError(
            f"{where}: 'index' is {meta['index']!r}, expected one of {sorted(_INDEX_FILES)}"
        )
    if not _is_int(meta["k"], 1) or not (
        meta["query_block"] is None or _is_int(meta["query_block"], 1)
    ):
        raise ValueError(
            f"{where}: 'k' and 'query_block' must be positive integers (query_block may be null), "
            f"got {meta['k']!r} and {meta['query_block']!r}"
        )
    for key in ("config_hash", "weights"):
        if not isinstance(meta[key], str):
            raise ValueError(  # noqa: TRY004 - a damaged file, not an argument of the wrong type
                f"{where}: {key!r} must be a string, got {type(meta[key]).__name__}"
            )
    galleries = meta["galleries"]
    if not isinstance(galleries, dict) or not galleries:
        raise ValueError(
            f"{where}: 'galleries' must be an object with {' and/or '.join(map(repr, _FOLDER))}, "
            f"got {galleries!r:.80}"
        )
    for side, g in galleries.items():
        if side not in _FOLDER:
            raise ValueError(
                f"{where}: unknown gallery {side!r}; a saved retriever has {sorted(_FOLDER)}"
            )
        if (
            not isinstance(g, dict)
            or not _is_int(g.get("size"))
            or not isinstance(g.get("values"), dict)
        ):
            raise ValueError(
                f"{where}: gallery {side!r} must be an object with an integer 'size' and a 'values' "
                f"object, got {g!r:.80}"
            )
        for name, spec in g["values"].items():
            if not _VALUE_NAME.match(name):
                raise ValueError(
                    f"{where}: gallery {side!r} names the value {name!r}; a value name is a plain "
                    "name (letters, digits, '_'), never a path: the folder was altered"
                )
            grid = spec.get("grid") if isinstance(spec, dict) else None
            if (
                not isinstance(spec, dict)
                or spec.get("kind") not in ("tokens", "tensor")
                or not _is_int(spec.get("num_prefix_tokens", 0))
                or not (
                    grid is None
                    or (
                        isinstance(grid, list)
                        and len(grid) == 2
                        and all(_is_int(x, 1) for x in grid)
                    )
                )
            ):
                raise ValueError(
                    f"{where}: gallery {side!r} value {name!r} must be an object with 'kind' "
                    "('tokens' or 'tensor'), 'grid' (null or two positive integers) and "
                    f"'num_prefix_tokens' (an integer >= 0), got {spec!r:.120}"
                )
    return galleries


def _retriever_files(folder: Path) -> tuple[str | None, list[str]]:
    """``(format, files)`` an earlier saved retriever in ``folder`` says imtm wrote (``(None, [])`` if none)."""
    from imtm.engine.model_folder import owned_files, read_small_json

    meta = read_small_json(folder / META)
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), str):
        return None, []
    names: list[Any] = [META]
    if isinstance(meta.get("files"), list):
        names += meta["files"]
    elif isinstance(
        meta.get("galleries"), dict
    ):  # written before the list existed: its layout says
        for side, g in meta["galleries"].items():
            if side in _FOLDER and isinstance(g, dict) and isinstance(g.get("values"), dict):
                names += [f"{_FOLDER[side]}/{f}" for f in _INDEX_FILES.values()]
                names += [
                    f"{_FOLDER[side]}/{v}.{part}.npy"
                    for v in g["values"]
                    if isinstance(v, str)
                    for part in ("feats", "mask")
                ]
    return meta["format"], owned_files(folder, names)


def weights_fingerprint(matcher) -> str:
    """sha256 of the fitted weights (names, shapes and bytes): an index belongs to one model."""
    h = hashlib.sha256()
    for name, t in sorted(matcher.components_.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class TwoStageRetriever:
    r"""Search a large gallery: global top-K (stage 1), then the fitted Matcher's fine-grained scorer (stage 2).

    Stage 1 embeds every gallery item and every query once, L2-normalises the vectors and
    keeps, per query, the ``k`` gallery items of largest cosine:

    .. math::

        C_K(q) = \operatorname{top-}K_{g}\; \cos(e_q, e_g), \qquad
        e = \begin{cases} \text{image\_embedding / text\_embedding} & \text{when a block provides it} \\
                          \tfrac{1}{|N|}\sum_{n \in N} v_n & \text{else, the masked mean of the scorer's tokens}
            \end{cases}

    Stage 2 runs the Matcher's pairwise blocks (the scorer, e.g. CHAN's hard assignment
    coding) on the candidates only and ranks them by that score, :math:`S(q, g)` for
    :math:`g \in C_K(q)`. With ``k`` equal to the gallery size this is exactly full scoring.
    Queries are processed ``query_block`` at a time, ordered by their best stage-1 candidate
    so that queries sharing candidates (captions of one image) share a block: one call of
    the pairwise blocks scores the block's queries against the union of their candidates,
    with no Python loop over query-candidate pairs.

    The cached gallery (stage-1 index and the token features the scorer reads) can be
    saved and opened memory-mapped, so a gallery larger than RAM is searched by reading
    only the candidates' rows.

    Args:
        matcher: a fitted :class:`imtm.Matcher`.
        k: candidates per query kept by stage 1 (at most the gallery size).
        index: ``"torch"`` (exact blocked top-K in torch; the gallery may be memory-mapped) or
            ``"faiss"`` (faiss ``IndexFlatIP``, also exact; ``pip install 'imtm[faiss]'``).
        query_block: queries re-scored per call of the pairwise blocks; ``None``: on the CPU
            ``round(sqrt(CALL_COST_PAIRS_CPU / k))`` (10 at k = 10, 3 at k = 100), on CUDA
            :data:`QUERY_BLOCK_CUDA`.

    Fitted attributes:
        galleries_: the indexed galleries, by side (``"image"``, ``"text"``).

    Shape:
        - queries: ``Q`` captions (or images), raw or as the dict :meth:`encode_texts` returns
        - output: :class:`SearchResult` with ``(Q, top)`` indices and scores, ``(Q, K)`` candidates

    References:
        Khattab and Zaharia, "ColBERT: Efficient and Effective Passage Search via Contextualized Late
        Interaction over BERT", SIGIR 2020, Sec. 3.6 (end-to-end top-k retrieval: candidate generation by
        an approximate index, re-ranking by the late-interaction score).

    Example:
        >>> from imtm import Matcher
        >>> from imtm.components import PrecomputedEncoder, GRUTextEncoder, HardAssignmentCoding, TripletLoss
        >>> from imtm.data import synthetic
        >>> train, _, test = synthetic.load(view="regions", seed=0, n_train=40, n_dev=4, n_test=20)
        >>> m = Matcher([PrecomputedEncoder(in_dim=train.region_dim, out_dim=16),
        ...              GRUTextEncoder(vocab=train.vocab, out_dim=16, word_dim=16), HardAssignmentCoding(),
        ...              TripletLoss()], epochs=1, batch_size=20, verbose=False).fit(train)
        >>> r = TwoStageRetriever(m, k=5).fit(images=test.images, captions=test.captions)
        >>> r.text_to_image(test.captions[:3], top=2).indices.shape
        torch.Size([3, 2])
    """

    def __init__(self, matcher, k: int = 100, index: str = "torch", query_block: int | None = None):
        self.matcher = matcher
        self.k = k
        self.index = index
        self.query_block = query_block

    # ------------------------------------------------------------------ checks
    def _check(self) -> None:
        from imtm.matcher import Matcher

        name = type(self).__name__
        if not isinstance(self.matcher, Matcher):
            raise TypeError(
                f"{name}: matcher must be an imtm.Matcher, got {type(self.matcher).__name__}"
            )
        if not hasattr(self.matcher, "components_"):
            raise NotFittedError(
                f"{name}: the Matcher is not fitted yet; call matcher.fit(train) (or "
                "Matcher.load(path)) before building an index"
            )
        for what, v in (("k", self.k), ("query_block", self.query_block)):
            if what == "query_block" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {what} must be a positive integer, got {v!r}")
        resolve_index(self.index, name)

    def _side_plan(self, side: str) -> tuple[list[int], list[str], str | None]:
        """Blocks to run on one side, the values the pairwise blocks read, and the embedding's name."""
        m = self.matcher
        plan = m.plan_
        img, txt, pair = m._eval_plan()
        indices = list(img if side == IMAGE else txt)
        keep = side_values_needed(plan, pair, side)
        emb = _EMBEDDING[side]
        if emb in plan.producers and plan.sides.get(emb) == frozenset({side}):
            indices = sorted(set(indices) | set(plan.needed_for([emb], exclude_losses=True)))
            return indices, keep, emb
        return indices, keep, None

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def _encode(self, side: str, items) -> dict[str, Any]:
        m = self.matcher
        m._prepare_eval()
        indices, keep, emb = self._side_plan(side)
        names = keep + ([emb] if emb is not None and emb not in keep else [])
        collate = collate_images if side == IMAGE else collate_texts
        return encode_side(
            m.plan_,
            indices,
            _RAW[side],
            m._items(items, _NOUN[side]),
            collate,
            names,
            batch_size=m.eval_batch_size,
            device=m._device(),
            autocast=m._autocast,
            progress=m.verbose,
            desc=_NOUN[side],
        )

    def encode_images(self, images) -> dict[str, Any]:
        """The image-side values both stages read (the scorer's inputs, the embedding when a block gives one)."""
        self._check()
        return self._encode(IMAGE, images)

    def encode_texts(self, captions) -> dict[str, Any]:
        """The caption-side values both stages read."""
        self._check()
        return self._encode(TEXT, captions)

    def _embed(self, side: str, values: dict[str, Any]) -> torch.Tensor:
        """Stage-1 vectors ``(n, D)``, L2-normalised: the side's embedding, else a masked mean of its tokens."""
        emb = values.get(_EMBEDDING[side])
        if emb is None:
            _, keep, _ = self._side_plan(side)
            names = [_TOKENS[side]] + [n for n in keep if n != _TOKENS[side]]
            tokens = next((values[n] for n in names if isinstance(values.get(n), Tokens)), None)
            if tokens is None:
                raise ValueError(
                    f"{type(self).__name__}: the Matcher gives stage 1 nothing to rank {_NOUN[side]} with: no block "
                    f"provides {_EMBEDDING[side]!r} and its scorer reads no {_NOUN[side][:-1]} Tokens (it reads "
                    f"{keep}); add a block that provides {_EMBEDDING[side]!r} (a (B, D) vector per item)"
                )
            # in chunks of rows: a masked mean allocates two temporaries the size of its input
            emb = torch.cat(
                [
                    tokens[a : a + EMBED_CHUNK].masked_mean()
                    for a in range(0, tokens.batch_size, EMBED_CHUNK)
                ]
            )
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
            raise ValueError(
                f"{type(self).__name__}: {_EMBEDDING[side]} must have shape (B, D), got "
                f"{tuple(getattr(emb, 'shape', ())) or type(emb).__name__}"
            )
        # Refused here, at the boundary: a NaN vector would be ranked anywhere by the index.
        check_finite(
            emb, f"{type(self).__name__}: the stage-1 {_EMBEDDING[side]} of the {_NOUN[side]}"
        )
        return F.normalize(emb.float(), dim=-1)

    # ------------------------------------------------------------------ building
    def fit(self, images=None, captions=None) -> TwoStageRetriever:
        """Index a gallery of images (searched by captions), of captions (searched by images), or both.

        Args:
            images: image items, or the dict :meth:`encode_images` returns.
            captions: caption items, or the dict :meth:`encode_texts` returns.

        Returns:
            self

        Raises:
            ValueError: no gallery given or an empty one, ``k`` larger than a gallery, no way to embed a
                side, or NaN/inf in the items or their embeddings.
        """
        self._check()
        if images is None and captions is None:
            raise ValueError(
                f"{type(self).__name__}.fit: give images=..., captions=... or both to index"
            )
        galleries = {}
        for side, items in ((IMAGE, images), (TEXT, captions)):
            if items is None:
                continue
            values = items if isinstance(items, dict) else self._encode(side, items)
            galleries[side] = self._gallery_from(side, values)
        self.galleries_ = galleries
        return self

    def _gallery_from(self, side: str, values: dict[str, Any]) -> _Gallery:
        name = type(self).__name__
        _, keep, _ = self._side_plan(side)
        missing = [n for n in keep if n not in values]
        if missing:
            raise ValueError(
                f"{name}: the encoded {_NOUN[side]} lack {missing}, which the scorer reads; "
                f"build them with encode_{'images' if side == IMAGE else 'texts'}()"
            )
        emb = self._embed(side, values)
        n = emb.shape[0]
        if self.k > n:
            raise ValueError(
                f"{name}: k={self.k} is larger than the gallery of {n} {_NOUN[side]}; "
                f"use k <= {n} (k = {n} scores the whole gallery)"
            )
        cached = {v: CachedValue.from_value(values[v], v) for v in keep}
        for v, c in cached.items():
            if len(c) != n:
                raise ValueError(
                    f"{name}: {v!r} holds {len(c)} rows but the gallery has {n} {_NOUN[side]}"
                )
        return _Gallery(resolve_index(self.index, name)(emb), cached)

    def _gallery(self, side: str) -> _Gallery:
        galleries = getattr(self, "galleries_", None)
        if galleries is None or side not in galleries:
            raise NotFittedError(
                f"{type(self).__name__}: no {_NOUN[side]} are indexed; call fit({_NOUN[side]}=...) "
                f"before searching them"
            )
        return galleries[side]

    # ------------------------------------------------------------------ search
    def text_to_image(self, captions, top: int = 10) -> SearchResult:
        """Rank the indexed images for every caption (captions raw, or as :meth:`encode_texts` returns).

        Raises:
            NotFittedError: no images are indexed.
            ValueError: ``top`` outside ``[1, k]``, no or empty captions, queries lacking a value the scorer
                reads, or NaN/inf in their stage-1 embeddings.
        """
        return self._search(TEXT, captions, top)

    def image_to_text(self, images, top: int = 10) -> SearchResult:
        """Rank the indexed captions for every image (images raw, or as :meth:`encode_images` returns).

        Raises:
            NotFittedError: no captions are indexed.
            ValueError: ``top`` outside ``[1, k]``, no images, images of different shapes, or NaN/inf image
                features or stage-1 embeddings (:class:`~imtm.tokens.NonFiniteValueError`).
        """
        return self._search(IMAGE, images, top)

    @torch.no_grad()
    def _search(self, query_side: str, queries, top: int) -> SearchResult:
        self._check()
        gallery = self._gallery(_OTHER[query_side])
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= self.k:
            raise ValueError(
                f"{type(self).__name__}: top must be an integer in [1, k={self.k}], got {top!r}"
            )
        if self.k > len(gallery):
            raise ValueError(
                f"{type(self).__name__}: k={self.k} is larger than the gallery of {len(gallery)} "
                f"{_NOUN[_OTHER[query_side]]}; use k <= {len(gallery)}"
            )
        values = queries if isinstance(queries, dict) else self._encode(query_side, queries)
        _, keep_q, _ = self._side_plan(query_side)
        missing = [n for n in keep_q if n not in values]
        if missing:  # checked before stage 1, whose own error would not say what is wrong
            raise ValueError(
                f"{type(self).__name__}: the encoded queries lack {missing}, which the scorer reads; "
                f"build them with encode_{'texts' if query_side == TEXT else 'images'}()"
            )
        _, cand = gallery.index.search(self._embed(query_side, values), self.k)
        scores = self._rescore(query_side, values, gallery, cand)
        order = scores.argsort(dim=1, descending=True, stable=True)[:, :top]
        return SearchResult(
            indices=cand.gather(1, order).cpu(),
            scores=scores.gather(1, order).cpu(),
            candidates=cand.cpu(),
        )

    def _rescore(
        self, query_side: str, values: dict[str, Any], gallery: _Gallery, cand: torch.Tensor
    ) -> torch.Tensor:
        """Fine-grained scores ``(Q, K)`` of every query against its candidates."""
        m = self.matcher
        plan = m.plan_
        _, _, pair = m._eval_plan()
        if "scores" in plan.score_values:
            score_name = "scores"
        else:  # direction-specific scores (DCPA): rank images with scores_t2i, captions with scores_i2t
            score_name = "scores_t2i" if query_side == TEXT else "scores_i2t"
        keep_q = side_values_needed(plan, pair, query_side)
        missing = [n for n in keep_q if n not in values]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: the encoded queries lack {missing}, which the scorer reads"
            )
        device = m._device()
        n_q = cand.shape[0]
        out = torch.empty(cand.shape, dtype=torch.float32, device=cand.device)
        # Queries sharing their best candidate (captions of one image) share a block and its union.
        perm = cand[:, 0].argsort(stable=True)
        qb = self.query_block
        if qb is None:
            qb = (
                QUERY_BLOCK_CUDA
                if device.type == "cuda"
                else max(1, round(math.sqrt(CALL_COST_PAIRS_CPU / self.k)))
            )
        for a in range(0, n_q, qb):
            q = perm[a : a + qb]
            c = cand[q]
            union, pos = torch.unique(c, return_inverse=True)  # (U,), (b, K) positions in the union
            block = {name: v.take(union, device) for name, v in gallery.values.items()}
            block.update({name: _rows(values[name], q) for name in keep_q})
            with m._autocast():
                run_blocks(plan, pair, block)
            s = block[score_name].float()  # (images, captions)
            s = s.T if query_side == TEXT else s  # (b, U): queries as rows
            out[q] = s.gather(1, pos.to(s.device)).to(out.device)
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the indexed galleries to a folder (plain ``.npy`` arrays, faiss's own index file, JSON).

        ``retriever.json`` (written last) records the settings, the model's fingerprints and every
        file written. A new folder, or one holding only an earlier saved retriever, is written under a
        temporary name and renamed when complete.

        Args:
            path: the folder. A missing or empty folder, or one holding an earlier saved retriever, is
                written (the earlier retriever's files are replaced; other files are left alone).
            overwrite: also write into a non-empty folder that is not a saved retriever, beside its
                files. Even then only the files an earlier retriever listed in its ``retriever.json``
                are replaced; no other file is ever changed or deleted.

        Raises:
            NotFittedError: nothing is indexed yet.
            FileExistsError: ``path`` is a non-empty folder that is not a saved retriever (pass
                ``overwrite=True``), holds a file imtm did not write under a name the retriever uses,
                or is a file.
        """
        from imtm.engine.model_folder import write_folder

        galleries = self._gallery_any()

        def stage(tmp: Path) -> list[str]:
            meta = {
                "format": FORMAT,
                "k": self.k,
                "index": self.index,
                "query_block": self.query_block,
                "config_hash": self.matcher.config_hash(),
                "weights": weights_fingerprint(self.matcher),
                "galleries": {},
            }
            for side, g in galleries.items():
                sub = tmp / _FOLDER[side]
                sub.mkdir()
                g.index.save(sub)
                meta["galleries"][side] = {"size": len(g), "values": save_values(sub, g.values)}
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            meta["files"] = files
            atomic_write_bytes(tmp / META, json.dumps(meta, indent=2).encode("utf-8"))
            return [*files, META]

        return write_folder(
            path,
            stage,
            kind=FORMAT,
            owned=_retriever_files,
            overwrite=overwrite,
            what=f"{type(self).__name__}.save",
        )

    def _gallery_any(self) -> dict:
        galleries = getattr(self, "galleries_", None)
        if not galleries:
            raise NotFittedError(
                f"{type(self).__name__}: nothing is indexed yet; call fit(images=..., captions=...)"
            )
        return galleries

    @classmethod
    def load(cls, path: str | os.PathLike, matcher, *, mmap: bool = True) -> TwoStageRetriever:
        """Open a folder written by :meth:`save` for ``matcher`` (the model it was built with).

        Only files inside the folder are opened: every array and index file is named by the
        folder's layout (a value name in ``retriever.json`` is a plain name, never a path), must
        be a regular file, and may not be a link leading out of the folder.

        Args:
            mmap: memory-map the arrays (only the rows a search touches are read), or read them into RAM.

        Raises:
            ValueError: not a saved retriever, built with another model (configuration or weights), or a
                damaged or altered folder (unreadable ``retriever.json``, a malformed entry in it, a value
                name that is a path, a file that is a link out of the folder or not a regular file, a
                truncated or reshaped array, an index whose size differs from the one recorded); the
                message names the file and the entry.
            FileNotFoundError: an array or index file is missing.
        """
        path = Path(path)
        meta_path = path / META
        name = f"{cls.__name__}.load"
        if not os.path.lexists(meta_path):
            raise ValueError(f"{name}: {path} holds no {META}; not a saved {cls.__name__}")
        try:
            meta = read_json(
                meta_path, who=name, max_bytes=1 << 26, root=path, where=f"{name}: {meta_path}"
            )
        except FileNotFoundError:
            raise
        except (
            ValueError
        ) as err:  # not a regular file, too large, not UTF-8, not JSON, nested too deeply
            raise ValueError(f"{err} (damaged?)") from err
        galleries_meta = _check_meta(meta, meta_path, cls.__name__)
        r = cls(matcher, k=meta["k"], index=meta["index"], query_block=meta["query_block"])
        r._check()
        if meta["config_hash"] != matcher.config_hash() or meta["weights"] != weights_fingerprint(
            matcher
        ):
            raise ValueError(
                f"{name}: {path} was built with another model (its configuration or weights differ); "
                "load it with the Matcher that built it, or rebuild the index with fit()"
            )
        galleries = {}
        for side, g in galleries_meta.items():
            sub = path / _FOLDER[side]
            files = [_INDEX_FILES[meta["index"]]] + [
                f"{v}.{part}.npy"
                for v, spec in g["values"].items()
                for part in (("feats", "mask") if spec["kind"] == "tokens" else ("feats",))
            ]
            for f in (
                files
            ):  # each a regular file inside the folder (a link out of it, a FIFO: refused unread)
                if os.path.lexists(sub / f):
                    regular_file_size(sub / f, who=name, root=path)
            index = INDEXES[meta["index"]].load(sub, mmap=mmap)
            if len(index) != g["size"]:
                raise ValueError(
                    f"{name}: the index in {sub} holds {len(index)} rows but "
                    f"{meta_path} records a gallery of {g['size']}"
                )
            galleries[side] = _Gallery(
                index, load_values(sub, g["values"], mmap=mmap, size=g["size"])
            )
        r.galleries_ = galleries
        return r
