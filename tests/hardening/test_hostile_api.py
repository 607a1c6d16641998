"""Hostile input for the public API outside the blocks: metrics, retrieval and the fitted Matcher.

Every case either gives the documented result (checked against a plain loop written here)
or raises the documented error, naming what is wrong. Sized to run in seconds on one thread:
tiny matrices, a few hypothesis examples, one toy pipeline fitted per module.
"""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toy import ToyCosine, ToyHinge, ToyText, toy_data

from imtm import Matcher
from imtm.components import PrecomputedEncoder
from imtm.metrics import (
    METRIC_KEYS,
    RECALL_KS,
    coco_1k_5fold,
    evaluate_protocol,
    retrieval_metrics,
    retrieval_ranks,
)
from imtm.retrieval import FaissIndex, TorchIndex, TwoStageRetriever
from imtm.tokens import NonFiniteValueError

INF = math.inf
FEW = settings(max_examples=25, deadline=None)


# ================================================================== metrics
def loop_ranks(sims: np.ndarray, c2i: list[int]) -> tuple[list[int], list[int]]:
    """The documented rule, one pair at a time: best own caption per image, ties count against the query."""
    n_images, n_captions = sims.shape
    i2t = []
    for i in range(n_images):
        best = max(sims[i, t] for t in range(n_captions) if c2i[t] == i)
        i2t.append(sum(1 for t in range(n_captions) if c2i[t] != i and sims[i, t] >= best))
    t2i = [
        sum(1 for i in range(n_images) if i != c2i[t] and sims[i, t] >= sims[c2i[t], t])
        for t in range(n_captions)
    ]
    return i2t, t2i


@st.composite
def problems(draw):
    """A small similarity matrix with many ties and infinities, 1 to 7 captions per image, shuffled captions."""
    n_images = draw(st.integers(1, 5))
    per_image = draw(st.lists(st.integers(1, 7), min_size=n_images, max_size=n_images))
    c2i = [i for i, c in enumerate(per_image) for _ in range(c)]
    c2i = draw(st.permutations(c2i))
    values = st.sampled_from([-INF, -1.0, 0.0, 0.25, 0.5, 1.0, INF])
    flat = draw(st.lists(values, min_size=n_images * len(c2i), max_size=n_images * len(c2i)))
    sims = np.array(flat, dtype=np.float64).reshape(n_images, len(c2i))
    return sims, list(c2i)


@FEW
@given(problems())
def test_metrics_follow_the_loop_rule_and_stay_in_range(problem):
    sims, c2i = problem
    m = retrieval_metrics(torch.from_numpy(sims), torch.tensor(c2i), return_ranks=True)
    i2t, t2i = loop_ranks(sims, c2i)
    assert m["i2t_ranks"].tolist() == i2t
    assert m["t2i_ranks"].tolist() == t2i
    for d in ("i2t", "t2i"):
        recalls = [m[f"{d}_r{k}"] for k in RECALL_KS]
        assert all(0.0 <= r <= 100.0 for r in recalls)
        assert recalls == sorted(recalls), f"{d} recalls not monotone in K: {recalls}"
        ranks = i2t if d == "i2t" else t2i
        for k, r in zip(RECALL_KS, recalls):
            assert r == pytest.approx(100.0 * sum(x < k for x in ranks) / len(ranks))
    assert m["rsum"] == pytest.approx(
        sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    )
    # NumPy in, tensor in, float32 in: the same metrics.
    assert retrieval_metrics(sims, np.array(c2i)) == {k: m[k] for k in METRIC_KEYS}


@FEW
@given(problems(), st.randoms(use_true_random=False))
def test_metrics_do_not_depend_on_the_order_of_images_or_captions(problem, rnd):
    sims, c2i = problem
    n_images, n_captions = sims.shape
    p = list(range(n_images))
    q = list(range(n_captions))
    rnd.shuffle(p)
    rnd.shuffle(q)
    new_row = {old: new for new, old in enumerate(p)}  # image p[new] moves to row new
    perm_sims = sims[p][:, q]
    perm_c2i = [new_row[c2i[t]] for t in q]
    base = retrieval_metrics(sims, c2i, return_ranks=True)
    moved = retrieval_metrics(perm_sims, perm_c2i, return_ranks=True)
    assert {k: moved[k] for k in METRIC_KEYS} == {k: base[k] for k in METRIC_KEYS}
    assert moved["i2t_ranks"].tolist() == base["i2t_ranks"][p].tolist()
    assert moved["t2i_ranks"].tolist() == base["t2i_ranks"][q].tolist()


@pytest.mark.parametrize("n_images,n_captions", [(1, 1), (1, 4), (3, 3), (2, 7)])
def test_constant_scores_rank_every_query_behind_every_other_candidate(n_images, n_captions):
    c2i = [min(t, n_images - 1) for t in range(n_captions)]
    r = retrieval_ranks(torch.full((n_images, n_captions), 0.3), c2i)
    own = np.bincount(c2i, minlength=n_images)
    assert r.i2t.tolist() == [n_captions - own[i] for i in range(n_images)]
    assert r.t2i.tolist() == [n_images - 1] * n_captions


def test_one_image_one_caption_is_perfect():
    m = retrieval_metrics(torch.tensor([[-5.0]]), [0])
    assert m["rsum"] == 600.0 and m["i2t_medr"] == 1.0 and m["t2i_meanr"] == 1.0


@FEW
@given(problems(), st.data())
def test_nan_anywhere_is_refused(problem, data):
    sims, c2i = problem
    i = data.draw(st.integers(0, sims.shape[0] - 1))
    t = data.draw(st.integers(0, sims.shape[1] - 1))
    sims = sims.copy()
    sims[i, t] = math.nan
    with pytest.raises(ValueError, match=r"retrieval_metrics: the similarity matrix holds 1 NaN"):
        retrieval_metrics(sims, c2i)
    with pytest.raises(ValueError, match=r"\(sims_t2i\): the similarity matrix holds 1 NaN"):
        retrieval_metrics((np.zeros_like(sims), sims), c2i)


@pytest.mark.parametrize(
    "c2i,error,match",
    [
        ([0, 1, 3], ValueError, r"outside \[0, 3\): min 0, max 3"),
        ([0, -1, 2], ValueError, r"outside \[0, 3\): min -1, max 2"),
        ([0, 1], ValueError, r"must have shape \(3,\).*got shape \(2,\)"),
        ([[0, 1, 2]], ValueError, r"must have shape \(3,\).*got shape \(1, 3\)"),
        ([0.0, 1.0, 2.0], TypeError, "must hold integer image indices, got dtype torch.float"),
        ([True, False, True], TypeError, "must hold integer image indices, got dtype torch.bool"),
        ([0, 0, 2], ValueError, r"1 image\(s\) have no caption \(e.g. image index \[1\]\)"),
        (["0", "1", "2"], TypeError, "must be a sequence of integer image indices, got \\['0'"),
        ([0, None, 2], TypeError, "must be a sequence of integer image indices"),
    ],
)
def test_bad_caption_to_image_is_refused(c2i, error, match):
    with pytest.raises(error, match=match):
        retrieval_metrics(torch.eye(3), c2i)


@pytest.mark.parametrize(
    "sims,error,match",
    [
        (
            torch.zeros(3),
            ValueError,
            r"expected a \(n_images, n_captions\) matrix, got shape \(3,\)",
        ),
        (torch.zeros(3, 0), ValueError, r"must have shape \(0,\)"),
        (torch.zeros(0, 3), ValueError, r"there are no images \(sims has shape \(0, 3\)\)"),
        (torch.zeros(3, 3, dtype=torch.bool), TypeError, "expected real similarity scores"),
        (np.array([["a", "b"]]), TypeError, "expected a numeric array"),
        (
            (torch.eye(3), torch.eye(2)),
            ValueError,
            "sims_i2t and sims_t2i must have the same shape",
        ),
    ],
)
def test_bad_similarity_matrices_are_refused(sims, error, match):
    with pytest.raises(error, match=match):
        retrieval_metrics(sims, [0, 1, 2])


def test_protocols_refuse_bad_names_and_sizes():
    with pytest.raises(ValueError, match="protocol must be one of.*Did you mean 'coco_5k'"):
        evaluate_protocol("coco5k", torch.eye(2), [0, 1])
    with pytest.raises(ValueError, match="expected 5000 images.*got a matrix with 2 rows"):
        coco_1k_5fold(torch.eye(2), [0, 1])
    assert evaluate_protocol("coco_5k", torch.eye(2), [0, 1]) == retrieval_metrics(
        torch.eye(2), [0, 1]
    )


# ================================================================== stage-1 indexes
INDEX_KINDS = ["torch", "faiss"]


def make_index(kind, embeddings, **kw):
    if kind == "faiss":
        pytest.importorskip("faiss")
        return FaissIndex(embeddings)
    return TorchIndex(embeddings, **kw)


@pytest.mark.parametrize("kind", INDEX_KINDS)
@pytest.mark.parametrize(
    "k,error,match",
    [
        (6, ValueError, r"k must be in \[1, 5\] \(the gallery size\), got 6"),
        (0, ValueError, r"k must be in \[1, 5\].*got 0"),
        (-2, ValueError, r"k must be in \[1, 5\].*got -2"),
        (True, TypeError, "k must be an integer, got True"),
        (2.0, TypeError, "k must be an integer, got 2.0"),
    ],
)
def test_index_refuses_bad_k(kind, k, error, match):
    index = make_index(kind, torch.randn(5, 3))
    with pytest.raises(error, match=match):
        index.search(torch.randn(2, 3), k)


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_index_refuses_nan_queries_wrong_dimension_and_bool(kind):
    index = make_index(kind, torch.randn(5, 3))
    q = torch.randn(2, 3)
    q[1, 2] = math.nan
    with pytest.raises(NonFiniteValueError, match="query embeddings holds 1 NaN or inf"):
        index.search(q, 2)
    with pytest.raises(
        ValueError, match="query embeddings have dimension 4 but the gallery's have 3"
    ):
        index.search(torch.randn(2, 4), 2)
    with pytest.raises(TypeError, match="expected real query embeddings, got dtype torch.bool"):
        index.search(torch.ones(2, 3, dtype=torch.bool), 2)


def test_index_refuses_nan_gallery_and_empty_gallery():
    g = torch.randn(6, 3)
    g[4, 0] = math.inf
    with pytest.raises(
        NonFiniteValueError, match=r"gallery embeddings \(rows 3..5\) holds 1 NaN or inf"
    ):
        TorchIndex(g, max_block_elements=6).search(torch.randn(2, 3), 2)
    with pytest.raises(ValueError, match="the gallery is empty"):
        TorchIndex(torch.zeros(0, 3)).search(torch.randn(2, 3), 1)
    pytest.importorskip("faiss")
    with pytest.raises(
        NonFiniteValueError, match="FaissIndex: gallery embeddings holds 1 NaN or inf"
    ):
        FaissIndex(g)


@FEW
@given(st.integers(1, 12), st.integers(1, 4), st.integers(1, 3), st.integers(1, 40), st.data())
def test_blocked_index_search_equals_one_full_top_k(n, dim, n_queries, block, data):
    k = data.draw(st.integers(1, n))
    g = torch.randn(n, dim, generator=torch.Generator().manual_seed(n * 7 + dim))
    q = torch.randn(n_queries, dim, generator=torch.Generator().manual_seed(block))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16]))
    s, i = TorchIndex(g.to(dtype), max_block_elements=block).search(q.double(), k)
    full = q @ g.to(dtype).float().T
    assert s.dtype == torch.float32 and i.shape == (n_queries, k)
    torch.testing.assert_close(s, full.topk(k, dim=1).values)
    torch.testing.assert_close(full.gather(1, i), s)  # the rows returned carry those scores
    assert all(len(set(row)) == k for row in i.tolist())


class _Payload:
    ran = False

    def __reduce__(self):
        return (_flag, ())


def _flag():
    _Payload.ran = True
    return 0


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize(
    "damage,error,match",
    [
        (
            "truncate",
            ValueError,
            r"embedding\.npy is not a readable \.npy array \(truncated or damaged\?\)",
        ),
        ("garbage", ValueError, r"embedding\.npy is not a readable \.npy array"),
        ("pickle", ValueError, r"embedding\.npy is not a readable \.npy array"),
        ("vector", ValueError, r"embedding\.npy holds an array of shape \(4,\); expected \(n, D\)"),
        ("missing", FileNotFoundError, r"embedding\.npy is missing"),
    ],
)
def test_damaged_index_file_is_refused_naming_it(tmp_path, mmap, damage, error, match):
    TorchIndex(torch.randn(5, 3)).save(tmp_path)
    f = tmp_path / "embedding.npy"
    raw = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(raw[: len(raw) - 7])
    elif damage == "garbage":
        f.write_bytes(b"\x00not an array" * 8)
    elif damage == "pickle":
        np.save(f, np.array([_Payload()], dtype=object), allow_pickle=True)
    elif damage == "vector":
        np.save(f, np.zeros(4, dtype=np.float32))
    else:
        f.unlink()
    _Payload.ran = False
    with pytest.raises(error, match=match):
        TorchIndex.load(tmp_path, mmap=mmap)
    assert not _Payload.ran, "loading an index unpickled its file"


@pytest.mark.parametrize("damage", ["truncate", "missing"])
def test_damaged_faiss_file_is_refused_naming_it(tmp_path, damage):
    pytest.importorskip("faiss")
    FaissIndex(torch.randn(5, 3)).save(tmp_path)
    f = tmp_path / "index.faiss"
    if damage == "missing":
        f.unlink()
        with pytest.raises(FileNotFoundError, match=r"index\.faiss is missing"):
            FaissIndex.load(tmp_path)
        return
    f.write_bytes(f.read_bytes()[:-11])
    with pytest.raises(ValueError, match=r"index\.faiss is not a readable faiss index"):
        FaissIndex.load(tmp_path)


# ================================================================== the fitted Matcher
@pytest.fixture(scope="module")
def toy():
    return toy_data(n_images=10, cpi=2, dim=6, seed=3)


@pytest.fixture(scope="module")
def fitted(toy):
    blocks = [
        PrecomputedEncoder(in_dim=6, out_dim=8),
        ToyText(vocab=toy.vocab),
        ToyCosine(),
        ToyHinge(),
    ]
    return Matcher(blocks, epochs=1, batch_size=5, device="cpu", verbose=False, random_state=0).fit(
        toy
    )


@pytest.fixture(scope="module")
def full(fitted, toy):
    return fitted.similarity(toy.images, toy.captions)


def test_similarity_refuses_empty_lists_and_empty_captions(fitted, toy):
    with pytest.raises(ValueError, match="Matcher: got no images"):
        fitted.similarity([], toy.captions)
    with pytest.raises(ValueError, match="Matcher: got no captions"):
        fitted.similarity(toy.images, [])
    with pytest.raises(ValueError, match="collate_texts: caption 1 is empty"):
        fitted.similarity(toy.images, ["a red circle", "  "])
    with pytest.raises(TypeError, match="captions must be a sequence, got a single string"):
        fitted.similarity(toy.images, "a red circle")


@pytest.mark.parametrize("bad", [math.nan, INF, -INF])
def test_similarity_refuses_non_finite_image_features_naming_the_image(fitted, toy, bad):
    images = [x.clone() for x in toy.images]
    images[7][1, 2] = bad
    with pytest.raises(
        NonFiniteValueError, match=r"encoding images: item 7 holds NaN or inf features"
    ):
        fitted.similarity(images, toy.captions)
    # the same image as a query or a gallery item of a two-stage search
    r = TwoStageRetriever(fitted, k=3)
    with pytest.raises(NonFiniteValueError, match=r"item 7 holds NaN or inf"):
        r.fit(images=images)
    r.fit(captions=toy.captions)
    with pytest.raises(NonFiniteValueError, match=r"item 7 holds NaN or inf"):
        r.image_to_text(images, top=1)


def test_similarity_refuses_a_wrong_feature_dimension(fitted, toy):
    images = list(toy.images)
    images[2] = torch.randn(3, 5)
    with pytest.raises(
        ValueError, match=r"collate_images: image 2 has shape \(3, 5\) but image 0 has \(\d+, 6\)"
    ):
        fitted.similarity(images, toy.captions)
    with pytest.raises(
        ValueError, match=r"PrecomputedEncoder: expected image tokens of shape \(B, N, 6\)"
    ):
        fitted.similarity([torch.randn(3, 5) for _ in range(2)], toy.captions)


@FEW
@given(st.integers(1, 11), st.integers(1, 21))
def test_similarity_does_not_depend_on_block_sizes(fitted, toy, full, image_block, text_block):
    m = fitted.set_params(image_block=image_block, text_block=text_block)
    try:
        torch.testing.assert_close(m.similarity(toy.images, toy.captions), full)
    finally:
        fitted.set_params(image_block=128, text_block=1024)


@FEW
@given(st.permutations(range(10)), st.permutations(range(20)))
def test_similarity_is_equivariant_to_input_order(fitted, toy, full, p, q):
    sims = fitted.similarity([toy.images[i] for i in p], [toy.captions[t] for t in q])
    torch.testing.assert_close(sims, full[list(p)][:, list(q)])


def test_evaluate_score_and_a_save_load_round_trip(fitted, toy, full, tmp_path):
    m = fitted.evaluate(toy)
    assert m == retrieval_metrics(full, toy.caption_to_image)
    assert fitted.score(toy) == m["rsum"]
    loaded = Matcher.load(fitted.save(tmp_path / "model"))
    torch.testing.assert_close(loaded.similarity(toy.images, toy.captions), full, rtol=0, atol=0)
    with pytest.raises(TypeError, match="has no 'caption_to_image'"):
        fitted.evaluate(type("NoMap", (), {"images": toy.images, "captions": toy.captions})())
    with pytest.raises(ValueError, match="protocol must be one of"):
        fitted.evaluate(toy, protocol="f30k")


# ================================================================== two-stage retrieval
@pytest.mark.parametrize("query_block", [None, 1, 4])
def test_two_stage_with_k_the_gallery_size_is_full_scoring(fitted, toy, full, query_block):
    r = TwoStageRetriever(fitted, k=10, query_block=query_block).fit(
        images=toy.images, captions=toy.captions
    )
    res = r.text_to_image(toy.captions, top=10)
    expected = full.T.sort(dim=1, descending=True, stable=True)
    torch.testing.assert_close(res.scores, expected.values)
    torch.testing.assert_close(full.T.gather(1, res.indices), res.scores)
    r = TwoStageRetriever(fitted, k=20, query_block=query_block).fit(captions=toy.captions)
    res = r.image_to_text(toy.images, top=20)
    torch.testing.assert_close(res.scores, full.sort(dim=1, descending=True, stable=True).values)


def test_two_stage_refuses_bad_k_and_nan_precomputed_values(fitted, toy):
    with pytest.raises(ValueError, match="k must be a positive integer, got True"):
        TwoStageRetriever(fitted, k=True).fit(images=toy.images)
    with pytest.raises(ValueError, match="k must be a positive integer, got -1"):
        TwoStageRetriever(fitted, k=-1).fit(images=toy.images)
    with pytest.raises(ValueError, match="k=11 is larger than the gallery of 10 images"):
        TwoStageRetriever(fitted, k=11).fit(images=toy.images)
    with pytest.raises(ValueError, match="Matcher: got no images"):
        TwoStageRetriever(fitted, k=1).fit(images=[])
    r = TwoStageRetriever(fitted, k=2)
    values = r.encode_images(toy.images)
    values["image_tokens"].feats[4, 0, 0] = math.nan
    with pytest.raises(
        NonFiniteValueError, match="stage-1 image_embedding of the images holds 1 NaN"
    ):
        r.fit(images=values)
    r.fit(images=toy.images)
    with pytest.raises(
        ValueError, match=r"the encoded queries lack \['text_tokens'\].*encode_texts\(\)"
    ):
        r.text_to_image(r.encode_images(toy.images[:2]), top=1)


@pytest.mark.parametrize(
    "damage,error,match",
    [
        (
            "truncate",
            ValueError,
            r"images[/\\]image_tokens\.feats\.npy is not a readable \.npy array",
        ),
        (
            "rows",
            ValueError,
            r"images[/\\]image_tokens\.feats\.npy holds shape \(9, .*expected 10 rows",
        ),
        ("mask", ValueError, r"image_tokens\.mask\.npy holds float32 .*expected a bool mask"),
        (
            "index",
            ValueError,
            r"the index in .*images holds 9 rows but .*retriever\.json records a gallery of 10",
        ),
        ("json", ValueError, r"retriever\.json is not valid JSON"),
        ("list", ValueError, r"retriever\.json holds a list, expected an object"),
        ("keys", ValueError, r"retriever\.json lacks \['galleries'\]; not a complete saved"),
        ("missing", FileNotFoundError, r"images[/\\]embedding\.npy is missing"),
    ],
)
def test_damaged_retriever_folder_is_refused_naming_the_file(
    fitted, toy, tmp_path, damage, error, match
):
    path = TwoStageRetriever(fitted, k=2).fit(images=toy.images).save(tmp_path / "r")
    feats = path / "images" / "image_tokens.feats.npy"
    if damage == "truncate":
        feats.write_bytes(feats.read_bytes()[:-9])
    elif damage == "rows":
        np.save(feats, np.load(feats)[:9])
    elif damage == "mask":
        mask = path / "images" / "image_tokens.mask.npy"
        np.save(mask, np.load(mask).astype(np.float32))
    elif damage == "index":
        np.save(path / "images" / "embedding.npy", np.load(path / "images" / "embedding.npy")[:9])
    elif damage == "json":
        (path / "retriever.json").write_text("{broken")
    elif damage == "list":
        (path / "retriever.json").write_text(json.dumps([1]))
    elif damage == "keys":
        meta = json.loads((path / "retriever.json").read_text())
        del meta["galleries"]
        (path / "retriever.json").write_text(json.dumps(meta))
    else:
        (path / "images" / "embedding.npy").unlink()
    with pytest.raises(error, match=match):
        TwoStageRetriever.load(path, fitted)
