"""TwoStageRetriever: equals full scoring at k = gallery, exact re-scoring, saved / memory-mapped galleries."""

import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import NotFittedError
from toy import toy_data

from imtm import Component, Matcher, Tokens
from imtm.components import GRUTextEncoder, HardAssignmentCoding, PrecomputedEncoder, TripletLoss
from imtm.retrieval import TwoStageRetriever
from imtm.retrieval.cache import CachedValue


def fitted(data, extra=(), scorer=None, **kw):
    blocks = [
        ("image", PrecomputedEncoder(in_dim=6, out_dim=8)),
        ("text", GRUTextEncoder(vocab=data.vocab, out_dim=8, word_dim=8)),
        *extra,
        ("coding", scorer or HardAssignmentCoding(pooling="lse", temperature=0.1)),
        ("loss", TripletLoss()),
    ]
    # epochs=0: random weights are all these tests need; the retriever must reproduce *this* model
    return Matcher(
        blocks,
        epochs=0,
        verbose=False,
        device="cpu",
        random_state=1,
        image_block=4,
        text_block=6,
        **kw,
    ).fit(data)


@pytest.fixture(scope="module")
def data():
    return toy_data(n_images=12, cpi=2)


@pytest.fixture(scope="module")
def model(data):
    return fitted(data)


@pytest.fixture(scope="module")
def full(model, data):
    return model.similarity(data.images, data.captions)


def first_stage(model, data):
    """Stage 1 written plainly: masked means of the scorer's tokens, cosine, per query."""
    iv, tv = model.encode_images(data.images), model.encode_texts(data.captions)
    ie = torch.stack(
        [
            iv["image_tokens"].feats[i][iv["image_tokens"].mask[i]].mean(0)
            for i in range(len(data.images))
        ]
    )
    te = torch.stack(
        [
            tv["text_tokens"].feats[t][tv["text_tokens"].mask[t]].mean(0)
            for t in range(len(data.captions))
        ]
    )
    return F.normalize(ie, dim=-1), F.normalize(te, dim=-1)


# ---------------------------------------------------------------- equals full scoring
@pytest.mark.parametrize("query_block", [1, 3, 100])
def test_k_equal_to_the_gallery_is_full_scoring(model, data, full, query_block):
    n_i, n_c = full.shape
    r = TwoStageRetriever(model, k=n_i, query_block=query_block).fit(images=data.images)
    res = r.text_to_image(data.captions, top=n_i)
    same_ranking(res, full.T)
    r = TwoStageRetriever(model, k=n_c, query_block=query_block).fit(captions=data.captions)
    same_ranking(r.image_to_text(data.images, top=n_c), full)


def same_ranking(res, fine):
    """The full ranking by ``fine`` (queries x gallery); tied items (repeated toy captions) in any order."""
    expected = fine.sort(dim=1, descending=True)
    torch.testing.assert_close(res.scores, expected.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fine.gather(1, res.indices), res.scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(res.indices.sort(1).values, expected.indices.sort(1).values)
    untied = (expected.values[:, :1] - expected.values[:, 1:2]).abs().flatten() > 1e-4
    assert torch.equal(res.indices[untied, 0], expected.indices[untied, 0])


def test_candidates_are_the_global_top_k_and_are_rescored_exactly(model, data, full):
    k = 4
    r = TwoStageRetriever(model, k=k, query_block=2).fit(images=data.images, captions=data.captions)
    ie, te = first_stage(model, data)
    for direction, queries, gallery, fine in (("t2i", te, ie, full.T), ("i2t", ie, te, full)):
        res = (
            r.text_to_image(data.captions, top=3)
            if direction == "t2i"
            else r.image_to_text(data.images, top=3)
        )
        for q in range(queries.shape[0]):  # a plain loop over queries
            cos = torch.tensor([float(queries[q] @ gallery[g]) for g in range(gallery.shape[0])])
            assert set(res.candidates[q].tolist()) == set(cos.topk(k).indices.tolist())
            fine_q = {int(g): float(fine[q, g]) for g in res.candidates[q]}
            best = sorted(fine_q.values(), reverse=True)[:3]
            assert set(res.indices[q].tolist()) <= set(fine_q)
            torch.testing.assert_close(res.scores[q], torch.tensor(best), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(
                res.scores[q],
                torch.tensor([fine_q[int(g)] for g in res.indices[q]]),
                rtol=1e-5,
                atol=1e-6,
            )


def test_a_block_embedding_drives_stage_one(data):
    class Embed(Component):
        requires = ("image_tokens",)
        provides = ("image_embedding",)

        def __init__(self, *, requires=None, provides=None):
            super().__init__(requires=requires, provides=provides)

        def forward(self, tokens):
            return -tokens.masked_mean()  # the opposite of the fallback: stage 1 must follow it

    class EmbedText(Embed):
        requires = ("text_tokens",)
        provides = ("text_embedding",)

        def forward(self, tokens):
            return tokens.masked_mean()

    m = fitted(data, extra=[("emb_i", Embed()), ("emb_t", EmbedText())])
    r = TwoStageRetriever(m, k=3).fit(images=data.images)
    res = r.text_to_image(data.captions, top=1)
    ie, te = first_stage(m, data)
    expected = (te @ (-ie).T).topk(3, dim=1).indices
    assert torch.equal(res.candidates.sort(1).values, expected.sort(1).values)


# ---------------------------------------------------------------- properties of the encoded path
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), pad=st.integers(1, 4))
def test_padding_and_gallery_order_do_not_change_results(model, seed, pad):
    g = torch.Generator().manual_seed(seed)
    n, q, d = 9, 4, 8
    lens = torch.randint(1, 5, (n,), generator=g)
    images = Tokens.from_lengths(torch.randn(n, 4, d, generator=g), lens)
    texts = Tokens.from_lengths(
        torch.randn(q, 3, d, generator=g), torch.randint(1, 4, (q,), generator=g)
    )
    base = (
        TwoStageRetriever(model, k=5)
        .fit(images={"image_tokens": images})
        .text_to_image({"text_tokens": texts}, top=3)
    )
    # extra padding columns full of garbage
    padded = Tokens(
        torch.cat([images.feats, 1e6 * torch.randn(n, pad, d, generator=g)], 1),
        torch.cat([images.mask, torch.zeros(n, pad, dtype=torch.bool)], 1),
    )
    res = (
        TwoStageRetriever(model, k=5)
        .fit(images={"image_tokens": padded})
        .text_to_image({"text_tokens": texts}, top=3)
    )
    assert torch.equal(res.indices, base.indices)
    torch.testing.assert_close(res.scores, base.scores)
    # a permuted gallery returns the same items under their new positions
    perm = torch.randperm(n, generator=g)
    res = (
        TwoStageRetriever(model, k=5)
        .fit(images={"image_tokens": images[perm]})
        .text_to_image({"text_tokens": texts}, top=3)
    )
    assert torch.equal(perm[res.indices], base.indices)
    torch.testing.assert_close(res.scores, base.scores)


# ---------------------------------------------------------------- saved and memory-mapped galleries
@pytest.mark.parametrize("index", ["torch", "faiss"])
def test_saved_and_memory_mapped_galleries_give_identical_results(model, data, tmp_path, index):
    if index == "faiss":
        pytest.importorskip("faiss")
    r = TwoStageRetriever(model, k=5, index=index).fit(images=data.images, captions=data.captions)
    a_t2i, a_i2t = r.text_to_image(data.captions, top=4), r.image_to_text(data.images, top=4)
    r.save(tmp_path / "gallery")
    r.save(tmp_path / "gallery")  # overwriting a saved gallery is atomic too
    for mmap in (True, False):
        s = TwoStageRetriever.load(tmp_path / "gallery", model, mmap=mmap)
        if mmap:
            assert isinstance(
                s.galleries_["image"].values["image_tokens"].feats, __import__("numpy").memmap
            )
        b_t2i, b_i2t = s.text_to_image(data.captions, top=4), s.image_to_text(data.images, top=4)
        for a, b in ((a_t2i, b_t2i), (a_i2t, b_i2t)):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.candidates, b.candidates)
            torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)


def test_faiss_and_torch_indexes_rank_alike(model, data):
    pytest.importorskip("faiss")
    a = (
        TwoStageRetriever(model, k=6, index="torch")
        .fit(images=data.images)
        .text_to_image(data.captions, top=6)
    )
    b = (
        TwoStageRetriever(model, k=6, index="faiss")
        .fit(images=data.images)
        .text_to_image(data.captions, top=6)
    )
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.scores, b.scores)


# ---------------------------------------------------------------- bad inputs
def test_k_larger_than_the_gallery_is_refused(model, data):
    with pytest.raises(
        ValueError, match="k=13 is larger than the gallery of 12 images; use k <= 12"
    ):
        TwoStageRetriever(model, k=13).fit(images=data.images)
    r = TwoStageRetriever(model, k=5).fit(images=data.images)
    r.k = 13
    with pytest.raises(ValueError, match="larger than the gallery"):
        r.text_to_image(data.captions, top=2)


def test_a_matcher_without_embeddings_or_tokens_is_refused(data):
    class Vector(Component):
        requires = ("image_tokens",)
        provides = ("image_vector",)

        def __init__(self, *, requires=None, provides=None):
            super().__init__(requires=requires, provides=provides)

        def forward(self, t):
            return t.masked_mean()

    class TextVector(Vector):
        requires = ("text_tokens",)
        provides = ("text_vector",)

    class Dot(Component):
        requires = ("image_vector", "text_vector")
        provides = ("scores",)

        def __init__(self, *, requires=None, provides=None):
            super().__init__(requires=requires, provides=provides)

        def forward(self, a, b):
            return a @ b.T

    m = fitted(data, extra=[("vi", Vector()), ("vt", TextVector())], scorer=Dot())
    with pytest.raises(
        ValueError, match="nothing to rank images with: no block provides 'image_embedding'"
    ):
        TwoStageRetriever(m, k=2).fit(images=data.images)


def test_bad_arguments_and_states(model, data, tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="must be an imtm.Matcher"):
        TwoStageRetriever("model").fit(images=data.images)
    with pytest.raises(NotFittedError, match="not fitted"):
        TwoStageRetriever(Matcher(model.components)).fit(images=data.images)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        TwoStageRetriever(model, k=0).fit(images=data.images)
    with pytest.raises(ValueError, match="query_block must be a positive integer"):
        TwoStageRetriever(model, query_block=2.5).fit(images=data.images)
    with pytest.raises(ValueError, match="index must be one of .*Did you mean 'faiss'"):
        TwoStageRetriever(model, index="fais").fit(images=data.images)
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r"pip install 'imtm\[faiss\]'"):
        TwoStageRetriever(model, k=2, index="faiss").fit(images=data.images)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="give images=..., captions=... or both"):
        TwoStageRetriever(model).fit()
    r = TwoStageRetriever(model, k=3)
    with pytest.raises(NotFittedError, match="nothing is indexed"):
        r.save(tmp_path / "x")
    r.fit(images=data.images)
    with pytest.raises(NotFittedError, match=r"no captions are indexed; call fit\(captions=...\)"):
        r.image_to_text(data.images)
    with pytest.raises(ValueError, match=r"top must be an integer in \[1, k=3\]"):
        r.text_to_image(data.captions, top=4)
    tv = r.encode_texts(data.captions)
    with pytest.raises(ValueError, match=r"encoded queries lack \['text_tokens'\]"):
        r.text_to_image({"text_embedding": torch.randn(2, 8)}, top=1)
    with pytest.raises(TypeError, match="cannot select rows of a value of type list"):
        r.text_to_image({"text_tokens": ["a"], "text_embedding": torch.randn(1, 8)}, top=1)
    with pytest.raises(ValueError, match="text_embedding must have shape"):
        r.text_to_image({**tv, "text_embedding": torch.randn(3)}, top=1)
    with pytest.raises(ValueError, match="dimension 5 but the gallery's have 8"):
        r.text_to_image({**tv, "text_embedding": torch.randn(len(data.captions), 5)}, top=1)
    iv = r.encode_images(data.images)
    with pytest.raises(ValueError, match=r"encoded images lack \['image_tokens'\]"):
        r.fit(images={"image_embedding": torch.randn(12, 8)})
    with pytest.raises(ValueError, match="'image_tokens' holds 12 rows but the gallery has 3"):
        r.fit(images={**iv, "image_embedding": torch.randn(3, 8)})
    with pytest.raises(TypeError, match="cannot cache the value 'x' of type list"):
        CachedValue.from_value([1], "x")


def test_loading_checks_the_folder_and_the_model(model, data, tmp_path):
    TwoStageRetriever(model, k=3).fit(images=data.images).save(tmp_path / "g")
    with pytest.raises(ValueError, match="holds no retriever.json"):
        TwoStageRetriever.load(tmp_path, model)
    m2 = Matcher(model.components, epochs=0, verbose=False, device="cpu", random_state=7).fit(data)
    with pytest.raises(ValueError, match="built with another model"):
        TwoStageRetriever.load(tmp_path / "g", m2)
    meta = tmp_path / "g" / "retriever.json"
    meta.write_text(meta.read_text().replace("imtm.TwoStageRetriever/1", "other/9"))
    with pytest.raises(ValueError, match="has format 'other/9'"):
        TwoStageRetriever.load(tmp_path / "g", model)


def test_stage_one_embeddings_in_chunks_equal_one_pass(model, data, monkeypatch):
    import imtm.retrieval.two_stage as two_stage

    whole = (
        TwoStageRetriever(model, k=5).fit(images=data.images).text_to_image(data.captions, top=3)
    )
    monkeypatch.setattr(two_stage, "EMBED_CHUNK", 5)  # 12 images: chunks of 5, 5 and 2
    chunked = (
        TwoStageRetriever(model, k=5).fit(images=data.images).text_to_image(data.captions, top=3)
    )
    assert torch.equal(whole.candidates, chunked.candidates) and torch.equal(
        whole.indices, chunked.indices
    )
