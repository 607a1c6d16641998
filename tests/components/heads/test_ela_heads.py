import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from torch import nn

from imtm import Tokens
from imtm.components import PatchToLexiconHead, WordToLexiconHead
from imtm.components.heads import LexiconLogits
from imtm.testing import check_component

SETTINGS = settings(max_examples=20, deadline=None)
V, DWE, D = 11, 6, 8


def heads(layers=1, dtype=torch.float32):
    torch.manual_seed(0)
    emb = nn.Embedding(V, DWE).to(dtype)
    p2l = PatchToLexiconHead(D, DWE, V, embedding=emb).to(dtype)
    w2l = WordToLexiconHead(D, DWE, V, embedding=emb, layers=layers, heads=2).to(dtype)
    return emb, p2l, w2l


def test_patch_head_matches_eq2_loop_on_masked_patches_only():
    emb, p2l, _ = heads(dtype=torch.float64)
    x = Tokens(torch.randn(2, 4, D, dtype=torch.float64), num_prefix_tokens=1)
    masked = torch.tensor([[True, True, False, True], [False, False, True, False]])
    out = p2l(x, masked)
    assert isinstance(out, LexiconLogits)
    # Prefix token 0 is never a patch, even when flagged.
    assert out.batch_index.tolist() == [0, 0, 1] and out.token_index.tolist() == [1, 3, 2]
    W, b, E = p2l.proj.weight.tolist(), p2l.proj.bias.tolist(), emb.weight.tolist()
    feats = x.feats.tolist()
    for k, (i, n) in enumerate(zip(out.batch_index.tolist(), out.token_index.tolist())):
        h = [sum(W[r][c] * feats[i][n][c] for c in range(D)) + b[r] for r in range(DWE)]
        want = torch.tensor(
            [sum(E[v][r] * h[r] for r in range(DWE)) for v in range(V)], dtype=torch.float64
        )
        torch.testing.assert_close(out.logits[k], want)  # Eq. 2 before the softmax
    # Renamed to read image tokens only: every real non-prefix patch.
    assert PatchToLexiconHead(D, DWE, V, embedding=emb).double()(x).logits.shape == (6, V)


def test_word_head_without_layers_matches_eq4_loop_and_zeroes_padding():
    emb, _, w2l = heads(layers=0, dtype=torch.float64)
    t = Tokens.from_lengths(torch.randn(2, 3, D, dtype=torch.float64), [3, 1])
    out = w2l(t)
    assert out.shape == (2, 3, V)
    want = (t.feats @ w2l.proj.weight.t() + w2l.proj.bias) @ emb.weight.t()
    torch.testing.assert_close(out[t.mask], want[t.mask])
    assert bool((out[~t.mask] == 0).all())


def test_tied_one_parameter_gradients_from_both_heads():
    emb, p2l, w2l = heads()
    ids = {p.data_ptr() for p in list(p2l.parameters()) + list(w2l.parameters())}
    assert emb.weight.data_ptr() not in ids  # not registered: the owner holds the only copy
    assert "embedding.weight" not in p2l.state_dict() and "embedding" not in dict(
        p2l.named_modules()
    )
    x = Tokens(torch.randn(2, 3, D))
    p2l(x, torch.ones(2, 3, dtype=torch.bool)).logits.sum().backward()
    g1 = emb.weight.grad.clone()
    assert bool(g1.abs().sum() > 0)
    w2l(Tokens(torch.randn(2, 4, D))).pow(2).sum().backward()
    assert not torch.equal(emb.weight.grad, g1)  # the word head's gradient added to the same tensor
    emb.weight.data.add_(1.0)  # a change of the embedding is seen by both heads at once
    assert p2l.embedding_weight() is emb.weight and w2l.embedding_weight() is emb.weight


def test_link_by_name_and_errors():
    class Encoder(nn.Module):
        def __init__(self, v):
            super().__init__()
            self.word_embeddings = nn.Embedding(v, DWE)

    head = PatchToLexiconHead(D, DWE, V, embedding="text")
    with pytest.raises(RuntimeError, match="not linked yet"):
        head(Tokens(torch.randn(1, 2, D)))
    enc = Encoder(V)
    head.link({"text": enc})
    assert head.embedding_weight() is enc.word_embeddings.weight
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        PatchToLexiconHead(D, DWE, V, embedding="text").link({"text": Encoder(V + 1)})
    with pytest.raises(KeyError, match="names no block"):
        head.link({"txt": enc})
    with pytest.raises(TypeError, match="no word_embeddings module"):
        head.link({"text": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        WordToLexiconHead(D, DWE, V + 2, embedding=nn.Embedding(V, DWE))
    c = clone(head)
    assert c.embedding == "text" and c._tied is None  # a clone keeps the name and links again


@SETTINGS
@given(seed=st.integers(0, 10**6), extra=st.integers(1, 3))
def test_padding_and_permutation(seed, extra):
    _, p2l, w2l = heads()
    w2l.eval()
    g = torch.Generator().manual_seed(seed)
    t = Tokens.from_lengths(torch.randn(2, 4, D, generator=g), [4, 2])
    base = w2l(t)
    padded = Tokens(
        torch.cat([t.feats, torch.randn(2, extra, D, generator=g) * 100], 1),
        torch.cat([t.mask, torch.zeros(2, extra, dtype=torch.bool)], 1),
    )
    torch.testing.assert_close(w2l(padded)[:, :4], base, atol=1e-5, rtol=1e-5)
    p = torch.randperm(4, generator=g)
    full = Tokens(t.feats)
    torch.testing.assert_close(
        w2l(Tokens(full.feats[:, p]))[:, :], w2l(full)[:, p], atol=1e-5, rtol=1e-5
    )
    masked = torch.rand(2, 4, generator=g) < 0.5
    out = p2l(full, masked)
    out_p = p2l(Tokens(full.feats[:, p]), masked[:, p])
    torch.testing.assert_close(out_p.logits.sum(0), out.logits.sum(0), atol=1e-5, rtol=1e-5)


def test_all_masked_and_none_masked():
    _, p2l, _ = heads()
    x = Tokens(torch.randn(2, 3, D))
    assert p2l(x, torch.ones(2, 3, dtype=torch.bool)).logits.shape == (6, V)
    assert p2l(x, torch.zeros(2, 3, dtype=torch.bool)).logits.shape == (0, V)


def test_conformance():
    _, p2l, w2l = heads()
    x = Tokens.from_lengths(torch.randn(2, 4, D), [4, 3], num_prefix_tokens=1)
    check_component(
        p2l,
        {"image_tokens": x, "masked_patches": torch.tensor([[0, 1, 1, 0], [1, 0, 1, 1]]).bool()},
        skip=("padding",),
    )  # masked_patches is a plain tensor: padding checked above
    check_component(
        w2l,
        {"text_tokens": Tokens.from_lengths(torch.randn(3, 5, D), [5, 2, 1])},
        atol=1e-5,
        rtol=1e-4,
    )


def test_bad_inputs():
    emb, p2l, w2l = heads()
    with pytest.raises(TypeError, match="expected image tokens as Tokens"):
        p2l(torch.randn(2, 3, D))
    with pytest.raises(ValueError, match=r"shape \(B, N, 8\)"):
        p2l(Tokens(torch.randn(2, 3, D + 1)))
    with pytest.raises(ValueError, match="masked_patches must be a bool tensor"):
        p2l(Tokens(torch.randn(2, 3, D)), torch.ones(2, 3))
    with pytest.raises(TypeError, match="expected text tokens as Tokens"):
        w2l(torch.randn(2, 3, D))
    with pytest.raises(ValueError, match=r"shape \(B, M, 8\)"):
        w2l(Tokens(torch.randn(2, 3, D + 1)))
    with pytest.raises(ValueError, match="dim must be a positive int"):
        PatchToLexiconHead(0, DWE, V, embedding=emb)
    with pytest.raises(TypeError, match="embedding must be a block name"):
        PatchToLexiconHead(D, DWE, V, embedding=3)
    with pytest.raises(ValueError, match="layers must be an integer >= 0"):
        WordToLexiconHead(D, DWE, V, embedding=emb, layers=-1)
    with pytest.raises(ValueError, match="not divisible by heads"):
        WordToLexiconHead(D, DWE, V, embedding=emb, heads=3)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        WordToLexiconHead(D, DWE, V, embedding=emb, heads=0)


def test_lexicon_loss_added_to_a_chan_matcher():
    from imtm import Matcher, presets
    from imtm.components import ExpansiveLexiconLoss
    from imtm.data import synthetic

    train, _, test = synthetic.load(view="regions", seed=0, n_train=12, n_dev=2, n_test=3)
    comps = presets.chan(
        vocab=train.vocab, region_dim=train.region_dim, embed_dim=16, word_dim=8, context_heads=2
    )
    v = len(train.vocab)
    comps += [
        ("p2l", PatchToLexiconHead(16, 8, v, embedding="text.embed", requires=("image_tokens",))),
        ("w2l", WordToLexiconHead(16, 8, v, embedding="text.embed", layers=0)),
        ("ela_loss", ExpansiveLexiconLoss()),
    ]
    m = Matcher(comps, epochs=1, batch_size=12, checkpoint_dir=None, verbose=False).fit(train)
    assert m.components_["p2l"].embedding_weight() is m.components_["text"].embed.weight
    assert "loss/ela_loss" in m.history_[-1] and m.similarity(test.images, test.captions).shape == (
        3,
        15,
    )
