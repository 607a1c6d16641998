import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.components import WordAggregation, WordSelection
from imtm.testing import check_component

SETTINGS = settings(max_examples=10, deadline=None)
D = 8


def captions(lengths=(6, 3, 1), m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Tokens.from_lengths(
        torch.randn(len(lengths), m, D, generator=g, dtype=torch.float64), list(lengths)
    )


def loop_selection(sel, texts):
    """Eq. 1-5 on words, one caption and one word at a time (inference: the top ceil(rho M))."""
    kept = []
    for b in range(texts.batch_size):
        t = [texts.feats[b, m] for m in range(texts.num_tokens) if texts.mask[b, m]]
        glo = sum(t) / len(t)
        raw = [float(x @ glo) / D for x in t]
        lo, hi = min(raw), max(raw)
        own = [(r - lo) / (hi - lo) if hi > lo else 0.0 for r in raw]
        a = [
            (1 - sel.beta) * float(torch.sigmoid(sel.mlp(x))) + sel.beta * o for x, o in zip(t, own)
        ]
        n = math.ceil(round(sel.ratio * len(t), 9))
        kept.append(sorted(sorted(range(len(t)), key=lambda k: -a[k])[:n]))
    return kept


def loop_aggregation(agg, texts):
    out = torch.zeros(texts.batch_size, agg.num_out, D, dtype=torch.float64)
    for b in range(texts.batch_size):
        t = [texts.feats[b, m] for m in range(texts.num_tokens) if texts.mask[b, m]]
        logits = [agg.mlp(x) for x in t]
        for j in range(agg.num_out):
            z = sum(math.exp(float(l[j])) for l in logits)
            out[b, j] = sum(math.exp(float(l[j])) / z * x for l, x in zip(logits, t))
    return out


def test_selection_equals_the_loop_and_keeps_the_words_as_they_are():
    torch.manual_seed(0)
    sel = WordSelection(D, ratio=0.5, beta=0.4).double().eval()
    texts = captions()
    with torch.no_grad():
        out = sel(texts)
    for b, kept in enumerate(loop_selection(sel, texts)):
        assert torch.nonzero(out.mask[b]).flatten().tolist() == kept
        torch.testing.assert_close(out.feats[b, kept], texts.feats[b, kept])


def test_aggregation_equals_the_loop():
    torch.manual_seed(1)
    agg = WordAggregation(D, num_out=3).double()
    texts = captions()
    with torch.no_grad():
        out = agg(texts)
    torch.testing.assert_close(out.feats, loop_aggregation(agg, texts))
    assert out.mask.all() and out.feats.shape == (3, 3, D)


@SETTINGS
@given(seed=st.integers(0, 10**6), extra=st.integers(1, 3))
def test_padding_never_changes_a_caption(seed, extra):
    torch.manual_seed(2)
    sel, agg = WordSelection(D, ratio=0.6).double().eval(), WordAggregation(D, num_out=2).double()
    texts = captions(seed=seed)
    pad = Tokens(
        torch.cat([texts.feats, torch.full((3, extra, D), float("nan"), dtype=torch.float64)], 1),
        torch.cat([texts.mask, torch.zeros(3, extra, dtype=torch.bool)], 1),
    )
    with torch.no_grad():
        a, b = sel(texts), sel(pad)
        assert torch.equal(b.mask[:, :6], a.mask) and not b.mask[:, 6:].any()
        torch.testing.assert_close(b.feats[:, :6][a.mask], a.feats[a.mask])
        torch.testing.assert_close(agg(pad).feats, agg(texts).feats)


def test_training_decisions_reach_the_mlp_and_both_chain():
    torch.manual_seed(3)
    sel = WordSelection(D, ratio=0.5, provides=("selected_text_tokens",)).double().train()
    agg = WordAggregation(D, num_out=2, requires=("selected_text_tokens",)).double()
    out = agg(sel(captions()))
    out.feats.sum().backward()
    assert sel.mlp[0].weight.grad is not None and bool(sel.mlp[0].weight.grad.abs().sum() > 0)


def test_conformance():
    texts = Tokens.from_lengths(torch.randn(3, 5, D), [5, 2, 4])
    check_component(WordAggregation(D, num_out=2), {"text_tokens": texts})
    check_component(WordSelection(D, ratio=0.6).eval(), {"text_tokens": texts})


def test_bad_inputs():
    with pytest.raises(ValueError, match="WordSelection: ratio must be a finite number in"):
        WordSelection(D, ratio=0).validate()
    with pytest.raises(ValueError, match="WordSelection: tau must be a finite number > 0"):
        WordSelection(D, tau=0).validate()
    with pytest.raises(ValueError, match="WordAggregation: num_out must be a positive int"):
        WordAggregation(D, num_out=0)
    with pytest.raises(ValueError, match="WordAggregation: hidden_ratio must be"):
        WordAggregation(D, hidden_ratio=-1.0).validate()
    with pytest.raises(TypeError, match="expected text tokens as Tokens"):
        WordSelection(D)(["a caption"])
