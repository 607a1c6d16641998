import pytest
import torch
from sklearn.base import clone

from imtm import Tokens
from imtm.components import (
    CrossModalEncoder,
    GlobalCosine,
    ImageTextMatchingHead,
    MatchingReranker,
    Reuse,
)
from imtm.testing import check_component

D = 8


def encoder_and_head():
    torch.manual_seed(0)
    enc = CrossModalEncoder(D, layers=1, heads=2).eval()
    return enc, ImageTextMatchingHead(D, encoder=enc)


def sides(bi=3, bt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = Tokens(torch.randn(bi, 4, D, generator=g), num_prefix_tokens=1)
    texts = Tokens.from_lengths(
        torch.randn(bt, 5, D, generator=g),
        torch.randint(2, 6, (bt,), generator=g),
        num_prefix_tokens=1,
    )
    return images, texts


def test_cross_encoder_pairs_rows_and_ignores_padding():
    enc, _ = encoder_and_head()
    images, texts = sides()
    out = enc(images, texts)
    assert (
        out.feats.shape == (3, 5, D)
        and torch.equal(out.mask, texts.mask)
        and out.num_prefix_tokens == 1
    )
    idx_i, idx_t = torch.tensor([2, 0]), torch.tensor([1, 1])
    pairs = enc.encode_pairs(images, texts, idx_i, idx_t)
    one = enc(images[2], texts[1])
    torch.testing.assert_close(pairs.feats[0], one.feats[0], atol=1e-5, rtol=1e-5)
    check_component(enc, {"image_tokens": images, "text_tokens": texts}, atol=1e-5, rtol=1e-4)


def test_matching_head_pairs_labels_and_negatives():
    enc, head = encoder_and_head()
    images, texts = sides(4, 4)
    ids = torch.tensor([0, 0, 1, 2])
    pos = ids[:, None] == ids[None, :]
    scores = torch.randn(4, 4)
    head.train()
    logits, labels = head(images, texts, scores, pos)
    assert logits.shape == (12, 2) and labels.tolist() == [1] * 4 + [0] * 8
    head.eval()
    logits_eval, _ = head(images, texts, scores, pos)
    # The first 4 pairs are the positives (b, b); their logits are the classifier on [CLS] of the pair.
    cls = enc.encode_pairs(images, texts, torch.arange(4), torch.arange(4)).feats[:, 0]
    torch.testing.assert_close(logits_eval[:4], head.classifier(cls), atol=1e-5, rtol=1e-5)
    only_pos = head(images[:2], texts[:2], torch.randn(2, 2), torch.ones(2, 2, dtype=torch.bool))
    assert only_pos[1].tolist() == [1, 1]  # no negative to draw: positives only
    # The borrowed encoder is neither converted with the head nor part of its state_dict (its own
    # block owns it, in a Matcher); a clone rebuilds an unfitted one, as scikit-learn's clone does.
    check_component(
        head,
        {"image_tokens": images, "text_tokens": texts, "scores": scores, "positives": pos},
        atol=1e-5,
        rtol=1e-4,
        skip=("dtypes", "state_dict"),
    )
    assert clone(ImageTextMatchingHead(D, encoder="cross"))._linked is None


def loop_rerank(head, images, texts, s, k):
    """ALBEF's two-stage inference, one query at a time."""
    bi, bt = s.shape
    i2t = s - 3.0
    t2i = s - 3.0

    def p_match(i, t):
        logits = head.pair_logits(images, texts, torch.tensor([i]), torch.tensor([t]))
        return float(torch.softmax(logits, -1)[0, 1])

    for i in range(bi):
        for t in s[i].topk(k).indices.tolist():
            i2t[i, t] = p_match(i, t) + float(s[i, t])
    for t in range(bt):
        for i in s[:, t].topk(k).indices.tolist():
            t2i[i, t] = p_match(i, t) + float(s[i, t])
    return i2t, t2i


@torch.no_grad()
def test_reranker_matches_loop_of_two_stage_retrieval():
    _, head = encoder_and_head()
    head.eval()
    images, texts = sides(4, 6)
    s = GlobalCosine()(images, texts)
    rr = MatchingReranker(head=head, k=2, chunk=3)
    got = rr(images, texts, s)
    want = loop_rerank(head, images, texts, s, 2)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    # Candidates rank above every other pair of their query.
    top = s.topk(2, dim=1).indices
    assert bool(
        (got[0].gather(1, top).min(1).values > got[0].scatter(1, top, -9).max(1).values).all()
    )


def test_reuse_runs_the_named_block():
    cos = GlobalCosine()
    r = Reuse("scorer", requires=("a", "b"), provides=("c",))
    with pytest.raises(RuntimeError, match="not linked yet"):
        r(*sides())
    r.link({"scorer": cos})
    images, texts = sides()
    torch.testing.assert_close(r(images, texts), cos(images, texts))
    assert list(r.parameters()) == []


def test_bad_inputs():
    enc, head = encoder_and_head()
    images, texts = sides()
    with pytest.raises(ValueError, match="dim must be a positive int"):
        CrossModalEncoder(0)
    with pytest.raises(ValueError, match="not divisible by heads"):
        CrossModalEncoder(D, heads=3)
    with pytest.raises(ValueError, match=r"dropout must be a finite number in \[0, 1\)"):
        CrossModalEncoder(D, heads=2, dropout=1.0)
    with pytest.raises(TypeError, match="expected image tokens as Tokens"):
        enc(images.feats, texts)
    with pytest.raises(ValueError, match=r"shape \(B, N, 8\)"):
        enc(images.with_feats(torch.randn(3, 4, 5)), texts)
    with pytest.raises(ValueError, match="pairs with caption b"):
        enc(images[:2], texts)
    with pytest.raises(ValueError, match="B paired rows"):
        head(images, texts, torch.zeros(3, 2), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="encoder must be a block name"):
        ImageTextMatchingHead(D, encoder=3)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ImageTextMatchingHead(D, temperature=0)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        ImageTextMatchingHead(0)
    unlinked = ImageTextMatchingHead(D)
    with pytest.raises(RuntimeError, match="not linked yet"):
        unlinked(images, texts, torch.zeros(3, 3), torch.eye(3, dtype=torch.bool))
    with pytest.raises(KeyError, match="names no block"):
        unlinked.link({"x": enc})
    with pytest.raises(TypeError, match="not a CrossModalEncoder"):
        unlinked.link({"cross": GlobalCosine()})
    with pytest.raises(ValueError, match="k must be a positive int"):
        MatchingReranker(k=0).validate()
    with pytest.raises(TypeError, match="head must be a block name"):
        MatchingReranker(head=3).validate()
    rr = MatchingReranker()
    with pytest.raises(RuntimeError, match="not linked yet"):
        rr(images, texts, torch.zeros(3, 3))
    with pytest.raises(KeyError, match="names no block"):
        rr.link({})
    with pytest.raises(TypeError, match="not an ImageTextMatchingHead"):
        rr.link({"itm": enc})
    rr = MatchingReranker(head=head)
    with pytest.raises(TypeError, match="as Tokens"):
        rr(images.feats, texts, torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"itc_scores must have shape \(3, 3\)"):
        rr(images, texts, torch.zeros(3, 2))
    with pytest.raises(TypeError, match="block must be a block name or a Component"):
        Reuse(3).validate()
    with pytest.raises(KeyError, match="names no block"):
        Reuse("x", requires=("a",), provides=("b",)).link({})
