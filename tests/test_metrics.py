import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from imtm import metrics
from imtm.metrics import (
    METRIC_KEYS,
    PROTOCOLS,
    RetrievalRanks,
    SimilarityRecord,
    average_similarities,
    coco_1k_5fold,
    coco_5k,
    evaluate_protocol,
    f30k_1k,
    format_table,
    load_similarity,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
    save_similarity,
)


# ---------------------------------------------------------------------------- plain references
def loop_ranks_pessimistic(sims_i2t, sims_t2i, c2i):
    """Per query, per candidate: count non-matching candidates scoring >= the best match."""
    s1, s2 = sims_i2t.tolist(), sims_t2i.tolist()
    c2i = [int(c) for c in c2i]
    n_images, n_captions = len(s1), len(c2i)
    i2t = []
    for i in range(n_images):
        best = max(s1[i][t] for t in range(n_captions) if c2i[t] == i)
        i2t.append(sum(1 for t in range(n_captions) if c2i[t] != i and s1[i][t] >= best))
    t2i = []
    for t in range(n_captions):
        own = s2[c2i[t]][t]
        t2i.append(sum(1 for i in range(n_images) if i != c2i[t] and s2[i][t] >= own))
    return i2t, t2i


def loop_ranks_sorted(sims_i2t, sims_t2i, c2i):
    """The SCAN / VSE++ evaluation loop: sort candidates, take the first hit (distinct scores only)."""
    s1, s2 = np.asarray(sims_i2t), np.asarray(sims_t2i)
    c2i = np.asarray(c2i)
    i2t = []
    for i in range(s1.shape[0]):
        order = np.argsort(-s1[i], kind="stable")
        i2t.append(min(int(np.where(order == t)[0][0]) for t in np.where(c2i == i)[0]))
    t2i = []
    for t in range(s2.shape[1]):
        order = np.argsort(-s2[:, t], kind="stable")
        t2i.append(int(np.where(order == c2i[t])[0][0]))
    return i2t, t2i


def loop_metrics(i2t, t2i):
    out = {}
    for d, r in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{d}_r{k}"] = 100.0 * sum(1 for x in r if x < k) / len(r)
        out[f"{d}_medr"] = math.floor(np.median(r)) + 1
        out[f"{d}_meanr"] = sum(r) / len(r) + 1
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def assert_metrics_equal(got, expected):
    assert set(expected) <= set(got)
    for k in expected:
        assert got[k] == pytest.approx(expected[k], abs=1e-9), k


@st.composite
def retrieval_problem(draw, ties=False):
    """Random sims with 1-4 captions per image, in shuffled caption order."""
    counts = draw(st.lists(st.integers(1, 4), min_size=1, max_size=7))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    c2i = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    c2i = c2i[torch.randperm(c2i.numel(), generator=g)]
    if ties:
        sims = torch.randint(0, 3, (len(counts), c2i.numel()), generator=g).double()
    else:
        sims = torch.randn(len(counts), c2i.numel(), generator=g, dtype=torch.float64)
    return sims, c2i


# ---------------------------------------------------------------------------- shapes and values
def test_output_keys_and_types():
    sims = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
    c2i = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3])
    m = retrieval_metrics(sims, c2i)
    assert tuple(m) == METRIC_KEYS
    assert all(type(v) is float for v in m.values())
    r = retrieval_ranks(sims, c2i)
    assert isinstance(r, RetrievalRanks)
    assert r.i2t.shape == (4,) and r.t2i.shape == (9,)
    assert r.i2t.dtype == torch.long and r.t2i.dtype == torch.long
    # at most every non-matching candidate ranks ahead
    assert bool((r.i2t <= 9 - torch.bincount(c2i)).all()) and bool((r.t2i <= 3).all())
    assert bool((r.i2t >= 0).all()) and bool((r.t2i >= 0).all())


def test_return_ranks_adds_tensor_keys_to_the_same_dict():
    sims = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    c2i = torch.tensor([0, 1, 2, 0, 1, 2])
    plain = retrieval_metrics(sims, c2i)
    with_ranks = retrieval_metrics(sims, c2i, return_ranks=True)
    assert type(with_ranks) is dict
    assert {k: with_ranks[k] for k in METRIC_KEYS} == plain
    r = retrieval_ranks(sims, c2i)
    torch.testing.assert_close(with_ranks["i2t_ranks"], r.i2t)
    torch.testing.assert_close(with_ranks["t2i_ranks"], r.t2i)


@pytest.mark.parametrize("cpi", [1, 5])
def test_perfect_diagonal(cpi):
    n = 12
    c2i = torch.arange(n).repeat_interleave(cpi)
    sims = (torch.arange(n)[:, None] == c2i[None, :]).float()
    m = retrieval_metrics(sims, c2i)
    assert all(m[f"{d}_r{k}"] == 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert m["rsum"] == 600.0
    assert m["i2t_medr"] == m["t2i_medr"] == m["i2t_meanr"] == m["t2i_meanr"] == 1.0


def test_worst_case():
    # Every match scores below every non-match: ranks are n_candidates - matches.
    c2i = torch.tensor([0, 0, 1, 2])
    sims = 1.0 - (torch.arange(3)[:, None] == c2i[None, :]).float()
    r = retrieval_ranks(sims, c2i)
    assert r.i2t.tolist() == [2, 3, 3]
    assert r.t2i.tolist() == [2, 2, 2, 2]


@settings(max_examples=30, deadline=None)
@given(retrieval_problem())
def test_matches_sorting_loop_on_distinct_scores(problem):
    sims, c2i = problem
    got = retrieval_metrics(sims, c2i, return_ranks=True)
    i2t, t2i = loop_ranks_sorted(sims, sims, c2i)
    assert got["i2t_ranks"].tolist() == i2t
    assert got["t2i_ranks"].tolist() == t2i
    assert_metrics_equal(got, loop_metrics(i2t, t2i))


@settings(max_examples=30, deadline=None)
@given(retrieval_problem(ties=True))
def test_matches_pessimistic_loop_with_ties(problem):
    sims, c2i = problem
    got = retrieval_metrics(sims, c2i, return_ranks=True)
    i2t, t2i = loop_ranks_pessimistic(sims, sims, c2i)
    assert got["i2t_ranks"].tolist() == i2t
    assert got["t2i_ranks"].tolist() == t2i
    assert_metrics_equal(got, loop_metrics(i2t, t2i))


@settings(max_examples=25, deadline=None)
@given(retrieval_problem(ties=True), st.integers(0, 1000))
def test_ranks_do_not_depend_on_candidate_order(problem, seed):
    sims, c2i = problem
    g = torch.Generator().manual_seed(seed)
    n_images, n_captions = sims.shape
    pi = torch.randperm(n_images, generator=g)  # new row r is old image pi[r]
    pt = torch.randperm(n_captions, generator=g)
    inv_pi = torch.argsort(pi)
    base = retrieval_ranks(sims, c2i)
    perm = retrieval_ranks(sims[pi][:, pt], inv_pi[c2i[pt]])
    assert_close(perm.i2t, base.i2t[pi])
    assert_close(perm.t2i, base.t2i[pt])


@settings(max_examples=25, deadline=None)
@given(retrieval_problem(ties=True))
def test_bounds(problem):
    sims, c2i = problem
    m = retrieval_metrics(sims, c2i)
    n_images, n_captions = sims.shape
    for d in ("i2t", "t2i"):
        assert 0.0 <= m[f"{d}_r1"] <= m[f"{d}_r5"] <= m[f"{d}_r10"] <= 100.0
        assert 1.0 <= m[f"{d}_medr"] and 1.0 <= m[f"{d}_meanr"]
    assert m["i2t_meanr"] <= n_captions and m["t2i_meanr"] <= n_images
    assert 0.0 <= m["rsum"] <= 600.0


def test_ties_count_against_the_query():
    sims = torch.tensor(
        [
            [0.5, 0.5, 0.2, 0.5],  # image 0: captions 0, 1
            [0.5, 0.1, 0.5, 0.0],  # image 1: caption 2
            [0.9, 0.9, 0.9, 0.9],  # image 2: caption 3
        ]
    )
    c2i = torch.tensor([0, 0, 1, 2])
    r = retrieval_ranks(sims, c2i)
    # image 0: best own 0.5 (its two captions tie with each other: no penalty), caption 3 ties -> 1
    # image 1: own 0.5, caption 0 ties -> 1; image 2: everything ties at 0.9 -> 3
    assert r.i2t.tolist() == [1, 1, 3]
    # caption 0: own 0.5, images 1 (tie) and 2 (0.9) -> 2; caption 1: image 2 -> 1
    # caption 2: own 0.5, image 2 -> 1; caption 3: own 0.9, others 0.5 and 0.0 -> 0
    assert r.t2i.tolist() == [2, 1, 1, 0]


def test_infinite_scores_rank_like_any_other_value():
    sims = torch.tensor([[float("inf"), float("-inf")], [float("inf"), float("-inf")]])
    r = retrieval_ranks(sims, [0, 1])
    assert r.i2t.tolist() == [0, 1]
    assert r.t2i.tolist() == [1, 1]


def test_median_is_numpy_median_floored_plus_one():
    m = metrics_from_ranks(RetrievalRanks(torch.tensor([0, 1, 2, 3]), torch.tensor([5, 0, 9])))
    assert m["i2t_medr"] == math.floor(np.median([0, 1, 2, 3])) + 1 == 2
    assert m["t2i_medr"] == 6.0
    assert m["i2t_meanr"] == 2.5


def test_blocked_path_equals_one_block(monkeypatch):
    g = torch.Generator().manual_seed(0)
    sims = torch.randint(0, 4, (13, 29), generator=g).float()
    c2i = torch.randint(0, 13, (29,), generator=g)
    c2i[:13] = torch.arange(13)
    whole = retrieval_ranks(sims, c2i)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 31)  # one row per block
    blocked = retrieval_ranks(sims, c2i)
    assert_close(blocked.i2t, whole.i2t, rtol=0, atol=0)
    assert_close(blocked.t2i, whole.t2i, rtol=0, atol=0)


def test_numpy_int_and_half_inputs_agree():
    g = torch.Generator().manual_seed(1)
    sims = torch.randint(-5, 5, (5, 10), generator=g)
    c2i = torch.arange(10) % 5
    ref = retrieval_metrics(sims.double(), c2i)
    assert retrieval_metrics(sims, c2i) == ref
    assert retrieval_metrics(sims.numpy(), c2i.numpy()) == ref
    assert retrieval_metrics(sims.half(), c2i.tolist()) == ref
    ro = sims.double().numpy()
    ro.setflags(write=False)
    assert retrieval_metrics(ro, c2i) == ref


# ---------------------------------------------------------------------------- pairs (DCPA)
@settings(max_examples=20, deadline=None)
@given(retrieval_problem(ties=True), st.integers(0, 1000))
def test_pair_ranks_each_direction_with_its_own_matrix(problem, seed):
    a, c2i = problem
    b = torch.randn(a.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = retrieval_metrics((a, b), c2i, return_ranks=True)
    i2t, t2i = loop_ranks_pessimistic(a, b, c2i)
    assert got["i2t_ranks"].tolist() == i2t and got["t2i_ranks"].tolist() == t2i
    only_a, only_b = retrieval_metrics(a, c2i), retrieval_metrics(b, c2i)
    swapped = retrieval_metrics((b, a), c2i)
    for k in ("r1", "r5", "r10", "medr", "meanr"):
        assert got[f"i2t_{k}"] == only_a[f"i2t_{k}"] and got[f"t2i_{k}"] == only_b[f"t2i_{k}"]
        assert (
            swapped[f"i2t_{k}"] == only_b[f"i2t_{k}"] and swapped[f"t2i_{k}"] == only_a[f"t2i_{k}"]
        )
    assert retrieval_metrics([a, a], c2i) == only_a


# ---------------------------------------------------------------------------- protocols
def _fold_problem(n_images, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (n_images,), generator=g)
    c2i = torch.arange(n_images).repeat_interleave(counts)
    c2i = c2i[torch.randperm(c2i.numel(), generator=g)]
    sims = torch.randn(n_images, c2i.numel(), generator=g)
    return sims, c2i


def test_coco_1k_5fold_equals_manual_slices(monkeypatch):
    monkeypatch.setattr(metrics, "_COCO_FOLD_SIZE", 6)
    sims, c2i = _fold_problem(30)
    b = torch.randn(sims.shape, generator=torch.Generator().manual_seed(3))
    for s in (sims, (sims, b)):
        got = coco_1k_5fold(s, c2i)
        folds = []
        for k in range(5):
            lo, hi = 6 * k, 6 * (k + 1)
            caps = [t for t in range(c2i.numel()) if lo <= int(c2i[t]) < hi]
            if isinstance(s, tuple):
                fold_sims = (s[0][lo:hi][:, caps], s[1][lo:hi][:, caps])
            else:
                fold_sims = s[lo:hi][:, caps]
            folds.append(retrieval_metrics(fold_sims, c2i[caps] - lo))
        assert tuple(got) == METRIC_KEYS
        for key in METRIC_KEYS:
            assert got[key] == pytest.approx(sum(f[key] for f in folds) / 5), key


def test_coco_1k_5fold_needs_5000_images():
    assert metrics._COCO_FOLD_SIZE * metrics._COCO_N_FOLDS == 5000
    with pytest.raises(ValueError, match=r"expected 5000 images .* got a matrix with 4999 rows"):
        coco_1k_5fold(torch.zeros(4999, 3), [0, 1, 2])


def test_coco_1k_5fold_real_size_sequential_layout():
    # 5,000 images x 1 caption each in half precision keeps this light.
    n = 5000
    sims = torch.eye(n, dtype=torch.float16)
    sims[0, 0] = 0  # image 0 / caption 0 lose in fold 0 only
    m = coco_1k_5fold(sims, torch.arange(n))
    f0 = retrieval_metrics(sims[:1000, :1000], torch.arange(1000))
    assert m["i2t_r1"] == pytest.approx((f0["i2t_r1"] + 4 * 100.0) / 5)
    assert m["i2t_r1"] == pytest.approx(100.0 - 100.0 / 1000 / 5)


def test_whole_set_protocols_equal_retrieval_metrics():
    sims, c2i = _fold_problem(9)
    ref = retrieval_metrics(sims, c2i)
    assert f30k_1k(sims, c2i) == ref == coco_5k(sims, c2i)
    assert evaluate_protocol("f30k_1k", sims, c2i) == ref
    assert set(PROTOCOLS) == {"f30k_1k", "coco_1k_5fold", "coco_5k"}


def test_unknown_protocol_suggests_a_name():
    with pytest.raises(
        ValueError,
        match=r"protocol must be one of \['coco_1k_5fold', 'coco_5k', 'f30k_1k'\], got 'coco_5K'.*Did you mean 'coco_5k'",
    ):
        evaluate_protocol("coco_5K", torch.eye(2), [0, 1])


# ---------------------------------------------------------------------------- saving and averaging
def test_save_load_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    sims = torch.randn(3, 6, generator=g, dtype=torch.float64)
    c2i = torch.tensor([0, 0, 1, 1, 2, 2])
    path = tmp_path / "model_a.safetensors"
    save_similarity(path, sims, c2i, meta={"model": "chan", "epoch": 3, "split": ["test"]})
    rec = load_similarity(path)
    assert isinstance(rec, SimilarityRecord)
    assert_close(rec.sims, sims, rtol=0, atol=0)
    assert rec.sims.dtype == torch.float64
    assert_close(rec.caption_to_image, c2i)
    assert rec.meta == {"model": "chan", "epoch": 3, "split": ["test"]}
    assert [p.name for p in tmp_path.iterdir()] == ["model_a.safetensors"]  # no temp file left
    # The file is plain safetensors: no pickle, metadata readable by any reader.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["meta"])["model"] == "chan"


def test_save_load_pair_and_numpy(tmp_path):
    a, b = np.random.default_rng(0).random((2, 2, 4), dtype=np.float32)
    path = tmp_path / "dcpa.safetensors"
    save_similarity(path, (a, b), np.array([0, 1, 0, 1]))
    sims, c2i, meta = load_similarity(path)
    assert isinstance(sims, tuple) and len(sims) == 2
    assert_close(sims[0], torch.from_numpy(a))
    assert_close(sims[1], torch.from_numpy(b))
    assert meta == {}
    assert retrieval_metrics(sims, c2i) == retrieval_metrics((a, b), [0, 1, 0, 1])


def test_save_load_errors(tmp_path):
    with pytest.raises(TypeError, match="meta must be JSON-serialisable"):
        save_similarity(tmp_path / "x.safetensors", torch.eye(2), [0, 1], meta={"f": object()})
    with pytest.raises(TypeError, match="meta must be a mapping"):
        save_similarity(tmp_path / "x.safetensors", torch.eye(2), [0, 1], meta=["a"])
    with pytest.raises(ValueError, match="NaN"):
        save_similarity(tmp_path / "x.safetensors", torch.full((2, 2), float("nan")), [0, 1])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="no similarity file"):
        load_similarity(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not one written by save_similarity"):
        load_similarity(tmp_path / "other.safetensors")
    save_file(
        {"sims": torch.eye(2), "caption_to_image": torch.arange(2)},
        str(tmp_path / "v9.safetensors"),
        metadata={"format": "imtm.similarity", "version": "9"},
    )
    with pytest.raises(ValueError, match="format version '9'"):
        load_similarity(tmp_path / "v9.safetensors")


def test_average_similarities():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3, 5, generator=g) for _ in range(3))
    assert_close(average_similarities([a, b]), (a + b) / 2)
    assert_close(average_similarities([a, b], weights=[1.0, 3.0]), 0.25 * a + 0.75 * b)
    assert_close(average_similarities([a.numpy(), b.double()]), (a.double() + b.double()) / 2)
    # Pairs average per direction; a single matrix counts for both directions.
    out = average_similarities([(a, b), c])
    assert isinstance(out, tuple)
    assert_close(out[0], (a + c) / 2)
    assert_close(out[1], (b + c) / 2)
    rec = SimilarityRecord(a, torch.arange(5) % 3, {})
    assert_close(average_similarities([rec, b]), (a + b) / 2)


def test_average_similarities_errors():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="non-empty list"):
        average_similarities([])
    with pytest.raises(ValueError, match="non-empty list"):
        average_similarities(a)
    with pytest.raises(
        ValueError, match=r"element 1 has shape \(3, 2\) but element 0 has \(2, 3\)"
    ):
        average_similarities([a, torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="expected 2 weights"):
        average_similarities([a, a], weights=[1.0])
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        average_similarities([a, a], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        average_similarities([a, a], weights=[0.0, 0.0])
    with pytest.raises(ValueError, match=r"element 1.*NaN"):
        average_similarities([a, torch.full((2, 3), float("nan"))])


# ---------------------------------------------------------------------------- table
def test_format_table():
    m = retrieval_metrics(torch.eye(3), [0, 1, 2])
    one = format_table(m)
    lines = one.splitlines()
    assert (
        lines[0] == "| model | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rSum |"
    )
    assert lines[1].startswith("| --- |") and lines[1].count("---:") == 7
    assert lines[2] == "|  | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 600.0 |"
    many = format_table({"a": m, "b": {"i2t_r1": 12.345, "rsum": 1.0}})
    rows = many.splitlines()
    assert len(rows) == 4
    assert rows[3] == "| b | 12.3 | - | - | - | - | - | 1.0 |"
    with_ranks = format_table(retrieval_metrics(torch.eye(3), [0, 1, 2], return_ranks=True))
    assert with_ranks == one


def test_format_table_errors():
    with pytest.raises(ValueError, match="expected a metric dict"):
        format_table({})
    with pytest.raises(ValueError, match="expected a metric dict"):
        format_table([1.0])
    with pytest.raises(ValueError, match="mix of metric values and nested dicts"):
        format_table({"a": {"rsum": 1.0}, "rsum": 2.0})


# ---------------------------------------------------------------------------- bad inputs
def test_nan_is_rejected():
    sims = torch.randn(3, 3)
    sims[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN value\(s\)"):
        retrieval_metrics(sims, [0, 1, 2])
    with pytest.raises(ValueError, match=r"sims_t2i.*NaN"):
        retrieval_metrics((torch.randn(3, 3), sims), [0, 1, 2])


def test_shape_errors_name_both_shapes():
    with pytest.raises(
        ValueError, match=r"shape \(4,\) to match sims of shape \(3, 4\), got shape \(5,\)"
    ):
        retrieval_metrics(torch.randn(3, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"same shape, got \(3, 4\) and \(4, 3\)"):
        retrieval_metrics((torch.randn(3, 4), torch.randn(4, 3)), [0, 1, 2, 0])
    with pytest.raises(
        ValueError, match=r"expected a \(n_images, n_captions\) matrix, got shape \(3, 3, 4\)"
    ):
        retrieval_metrics(torch.randn(3, 3, 4), [0, 1, 2, 0])  # (2, ...) would be a stacked pair
    with pytest.raises(ValueError, match=r"shape \(3,\) to match"):
        retrieval_ranks(torch.randn(3, 3), torch.zeros(3, 1, dtype=torch.long))


def test_image_without_caption_and_bad_indices():
    with pytest.raises(
        ValueError, match=r"1 image\(s\) have no caption \(e.g. image index \[2\]\)"
    ):
        retrieval_metrics(torch.randn(3, 3), [0, 1, 1])
    with pytest.raises(ValueError, match=r"outside \[0, 3\): min 0, max 3"):
        retrieval_metrics(torch.randn(3, 3), [0, 1, 3])
    with pytest.raises(ValueError, match=r"outside \[0, 3\): min -1"):
        retrieval_metrics(torch.randn(3, 3), [-1, 1, 2])
    with pytest.raises(ValueError, match="no captions"):
        retrieval_metrics(torch.randn(3, 0), torch.zeros(0, dtype=torch.long))


def test_type_errors():
    with pytest.raises(TypeError, match="integer image indices, got dtype torch.float32"):
        retrieval_metrics(torch.randn(2, 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="expected real similarity scores, got dtype torch.bool"):
        retrieval_metrics(torch.eye(2, dtype=torch.bool), [0, 1])
    with pytest.raises(TypeError, match="expected a numeric array"):
        retrieval_metrics(np.array([["a", "b"], ["c", "d"]], dtype=object), [0, 1])
    with pytest.raises(
        TypeError, match=r"expected a \(n_images, n_captions\) tensor or array, got str"
    ):
        retrieval_metrics("sims", [0, 1])
