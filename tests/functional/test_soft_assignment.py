import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.functional import hard_assignment_scores, soft_assignment_scores
from imtm.functional.pooling import POOLINGS
from imtm.functional.soft_assignment import attended_cosine
from imtm.testing import tokens

SETTINGS = settings(max_examples=20, deadline=None)
SIDES = {"batch": st.integers(1, 4), "max_tokens": 5, "dim": 4, "dtype": torch.float64}


def unit(a):
    n = math.sqrt(sum(x * x for x in a))
    return [x / n for x in a]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def pool(vals, pooling, temperature):
    if pooling == "max":
        return max(vals)
    if pooling == "mean":
        return sum(vals) / len(vals)
    if pooling == "sum":
        return sum(vals)
    top = max(vals)
    w = [math.exp((v - top) / temperature) for v in vals]
    if pooling == "softmax":
        return sum(wi * v for wi, v in zip(w, vals)) / sum(w)
    return top + temperature * math.log(sum(w))


def loop_scores(
    images: Tokens, texts: Tokens, tau, codebook="visual", pooling="lse", temperature=0.1
):
    """CHAN Eq. 1-4 one pair and one word at a time, building every attended vector t_hat."""
    out = torch.empty(images.batch_size, texts.batch_size, dtype=torch.float64)
    for i in range(images.batch_size):
        regions = [
            unit(images.feats[i, j].tolist()) for j in range(images.num_tokens) if images.mask[i, j]
        ]
        for t in range(texts.batch_size):
            words = [
                unit(texts.feats[t, k].tolist())
                for k in range(texts.num_tokens)
                if texts.mask[t, k]
            ]
            queries, codewords = (words, regions) if codebook == "visual" else (regions, words)
            per_query = []
            for q in queries:
                logits = [dot(q, c) / tau for c in codewords]
                top = max(logits)
                a = [math.exp(x - top) for x in logits]
                a = [x / sum(a) for x in a]  # Eq. 2: softmax over the codewords
                t_hat = [
                    sum(a[j] * codewords[j][d] for j in range(len(codewords)))
                    for d in range(len(q))
                ]
                per_query.append(
                    dot(q, t_hat) / math.sqrt(dot(t_hat, t_hat))
                )  # Eq. 4: cos(t_i, t_hat_i)
            out[i, t] = pool(per_query, pooling, temperature)
    return out


def call(images, texts, **kw):
    return soft_assignment_scores(images.feats, texts.feats, images.mask, texts.mask, **kw)


def test_shape_and_dtype():
    images = Tokens.from_lengths(torch.randn(3, 6, 8), [6, 2, 4])
    texts = Tokens.from_lengths(torch.randn(5, 7, 8), [7, 1, 3, 5, 2])
    s = call(images, texts)
    assert s.shape == (3, 5) and s.dtype == torch.float32


@pytest.mark.parametrize("codebook", ["visual", "textual"])
@pytest.mark.parametrize("pooling", sorted(POOLINGS))
@SETTINGS
@given(images=tokens(**SIDES), texts=tokens(**SIDES), tau=st.sampled_from([0.05, 0.5, 2.0]))
def test_matches_loop_of_equations(codebook, pooling, images, texts, tau):
    got = call(images, texts, tau=tau, codebook=codebook, pooling=pooling)
    torch.testing.assert_close(got, loop_scores(images, texts, tau, codebook, pooling))


@SETTINGS
@given(images=tokens(**SIDES), texts=tokens(**SIDES), data=st.data())
def test_same_numbers_for_every_block_size(images, texts, data):
    full = call(images, texts, max_block_elements=10**9)
    for budget in sorted({1, 5, data.draw(st.integers(1, 500))}):
        torch.testing.assert_close(call(images, texts, max_block_elements=budget), full)


@SETTINGS
@given(images=tokens(**SIDES), texts=tokens(**SIDES), extra=st.integers(1, 3))
def test_padding_garbage_changes_nothing(images, texts, extra):
    def pad(t):
        mask = torch.cat([t.mask, t.mask.new_zeros(t.batch_size, extra)], 1)
        feats = torch.cat([t.feats, torch.randn(t.batch_size, extra, t.dim, dtype=t.dtype)], 1)
        return Tokens(feats.masked_fill(~mask.unsqueeze(-1), float("nan")), mask)

    torch.testing.assert_close(call(pad(images), pad(texts)), call(images, texts))


@SETTINGS
@given(images=tokens(**SIDES), texts=tokens(**SIDES), data=st.data())
def test_permutations_and_bounds(images, texts, data):
    pi = torch.tensor(data.draw(st.permutations(range(images.batch_size))))
    pt = torch.tensor(data.draw(st.permutations(range(texts.batch_size))))
    s = call(images, texts, pooling="mean")
    torch.testing.assert_close(call(images[pi], texts[pt], pooling="mean"), s[pi][:, pt])
    assert bool((s.abs() <= 1 + 1e-12).all())


def test_small_tau_approaches_hard_assignment():
    torch.manual_seed(0)
    images, texts = (
        torch.randn(3, 5, 16, dtype=torch.float64),
        torch.randn(4, 6, 16, dtype=torch.float64),
    )
    soft = soft_assignment_scores(images, texts, tau=1e-4, pooling="mean")
    hard = hard_assignment_scores(images, texts, pooling="mean")
    torch.testing.assert_close(soft, hard)


def test_attended_cosine_never_builds_t_hat_but_equals_it():
    torch.manual_seed(1)
    v = torch.nn.functional.normalize(torch.randn(2, 5, 7, dtype=torch.float64), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(3, 7, dtype=torch.float64), dim=-1)
    sims = torch.einsum("bkd,wd->bkw", v, t)
    got = attended_cosine(sims, None, v @ v.transpose(1, 2), tau=0.3)
    attn = torch.softmax(sims / 0.3, dim=1)
    t_hat = torch.einsum("bkw,bkd->bwd", attn, v)
    torch.testing.assert_close(
        got, torch.nn.functional.cosine_similarity(t.expand_as(t_hat), t_hat, dim=-1)
    )


@pytest.mark.parametrize("codebook", ["visual", "textual"])
def test_gradcheck_float64(codebook):
    torch.manual_seed(2)
    images = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    texts = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    text_mask = torch.tensor([[True, True, False], [True, True, True]])

    def f(v, t):
        return soft_assignment_scores(
            v, t, None, text_mask, tau=0.5, codebook=codebook, max_block_elements=20
        )

    assert torch.autograd.gradcheck(f, (images, texts), fast_mode=True)


def test_bfloat16_compute_is_close_to_float32():
    torch.manual_seed(4)
    v, t = torch.randn(5, 36, 64), torch.randn(6, 10, 64)
    exact = soft_assignment_scores(v, t)
    fast = soft_assignment_scores(v, t, compute_dtype=torch.bfloat16)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, exact, atol=3e-2, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"tau": 0.0},
            ValueError,
            "soft_assignment_scores: tau must be a finite number > 0, got 0.0",
        ),
        ({"pooling": "sums"}, ValueError, "Did you mean 'sum'"),
        ({"codebook": "visuall"}, ValueError, "Did you mean 'visual'"),
        ({"text_mask": torch.zeros(2, 4, dtype=torch.bool)}, ValueError, "have no real token"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        soft_assignment_scores(torch.randn(2, 3, 8), torch.randn(2, 4, 8), **kwargs)
