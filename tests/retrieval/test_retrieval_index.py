"""Stage-1 indexes: blocked top-k equals a plain sort, within a memory budget; faiss agrees."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.retrieval import FaissIndex, TorchIndex
from imtm.retrieval.index import TorchIndex as _TI


def plain_top_k(gallery, queries, k):
    out_s, out_i = [], []
    for q in queries:  # one query at a time, a full sort
        s = torch.tensor([float(q @ g) for g in gallery])
        order = sorted(range(len(s)), key=lambda j: -float(s[j]))[:k]
        out_i.append(order)
        out_s.append([float(s[j]) for j in order])
    return torch.tensor(out_s), torch.tensor(out_i)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 40),
    q=st.integers(1, 5),
    k=st.integers(1, 40),
    budget=st.integers(1, 200),
    seed=st.integers(0, 10_000),
)
def test_blocked_top_k_equals_a_plain_sort(n, q, k, budget, seed):
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    gallery, queries = torch.randn(n, 6, generator=g), torch.randn(q, 6, generator=g)
    s, i = TorchIndex(gallery, max_block_elements=budget).search(queries, k)
    es, ei = plain_top_k(gallery, queries, k)
    torch.testing.assert_close(s, es, rtol=1e-5, atol=1e-5)
    assert torch.equal(i, ei)
    # the same from a NumPy (memory-mappable) gallery
    _, i2 = TorchIndex(gallery.numpy(), max_block_elements=budget).search(queries, k)
    assert torch.equal(i2, i)


def test_memory_stays_within_the_block_budget(monkeypatch):
    seen = []
    orig = _TI._rows

    def spy(self, a, b, device):
        seen.append(b - a)
        return orig(self, a, b, device)

    monkeypatch.setattr(_TI, "_rows", spy)
    TorchIndex(torch.randn(1000, 4), max_block_elements=400).search(torch.randn(4, 4), 3)
    assert max(seen) * 4 <= 400 and sum(seen) == 1000


def test_query_shape_errors():
    idx = TorchIndex(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"expected query embeddings of shape \(Q, 4\)"):
        idx.search(torch.randn(4), 2)


def test_faiss_matches_torch():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    gallery, queries = torch.randn(300, 16, generator=g), torch.randn(7, 16, generator=g)
    s, i = TorchIndex(gallery).search(queries, 10)
    fs, fi = FaissIndex(gallery).search(queries, 10)
    assert torch.equal(i, fi)
    torch.testing.assert_close(s, fs, rtol=1e-5, atol=1e-5)
    assert isinstance(np.asarray(gallery), np.ndarray)
