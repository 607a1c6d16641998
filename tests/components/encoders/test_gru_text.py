import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.components import GRUTextEncoder
from imtm.data import Vocabulary
from imtm.testing import captions, check_component, tokens

SETTINGS = settings(max_examples=20, deadline=None)
WORDS = ["a", "red", "blue", "circle", "square", "left", "of", "the", "green", "triangle"]
VOCAB = Vocabulary.build([" ".join(WORDS)])
CAPTIONS = ["a red circle left of the square", "blue square", "a"]


def alone(enc, ids):
    """One caption on its own, unpadded and unpacked, directions averaged: the reference."""
    out, _ = enc.rnn(enc.embed(ids.unsqueeze(0)))
    out = out[0]
    if enc.bidirectional:
        out = (out[:, : enc.out_dim] + out[:, enc.out_dim :]) / 2
    return out


@pytest.mark.parametrize(
    "kwargs, texts",
    [
        ({}, CAPTIONS),
        ({"num_layers": 2, "dropout": 0.2, "normalize": True}, VOCAB.encode_batch(CAPTIONS)),
        ({"bidirectional": False}, VOCAB.encode_batch(CAPTIONS)),
    ],
)
def test_conformance(kwargs, texts):
    report = check_component(
        GRUTextEncoder(VOCAB, out_dim=6, word_dim=5, **kwargs), {"texts": texts}
    )
    assert "gradients" in report.passed and "dtypes" in report.passed


def test_shape_and_mask():
    out = GRUTextEncoder(VOCAB, out_dim=6, word_dim=5)(CAPTIONS)
    assert out.feats.shape == (3, 7, 6)
    assert out.mask.sum(1).tolist() == [7, 2, 1]
    assert not out.feats[~out.mask].any()


def test_strings_and_word_ids_give_the_same_tokens():
    enc = GRUTextEncoder(VOCAB, out_dim=6, word_dim=5).eval()
    a, b = enc(CAPTIONS), enc(VOCAB.encode_batch(CAPTIONS))
    torch.testing.assert_close(a.feats, b.feats)
    assert torch.equal(a.mask, b.mask)


@SETTINGS
@given(texts=captions(WORDS, batch=st.integers(1, 4), max_words=6), bidirectional=st.booleans())
def test_packed_batch_equals_each_caption_alone(texts, bidirectional):
    enc = GRUTextEncoder(VOCAB, out_dim=4, word_dim=3, bidirectional=bidirectional).double().eval()
    out = enc(texts)
    for k, caption in enumerate(texts):
        ids = torch.tensor(VOCAB.encode(caption))
        torch.testing.assert_close(out.feats[k, : len(ids)], alone(enc, ids))


@SETTINGS
@given(ids=tokens(batch=st.integers(1, 3), max_tokens=6, vocab_size=len(VOCAB), contiguous=False))
def test_any_mask_reads_the_real_words_in_order(ids):
    # Padding holds random ids here; the real words need not form a prefix.
    enc = GRUTextEncoder(VOCAB, out_dim=4, word_dim=3, num_layers=2).double().eval()
    out = enc(ids)
    for b in range(ids.batch_size):
        real = ids.feats[b][ids.mask[b]]
        torch.testing.assert_close(out.feats[b][ids.mask[b]], alone(enc, real))
    assert not out.feats[~out.mask].any()


def test_list_of_strings_lands_on_the_module_device_and_dtype():
    enc = GRUTextEncoder(VOCAB, out_dim=4, word_dim=3).double()
    out = enc(["a red circle"])
    assert out.feats.dtype == torch.float64 and out.feats.device == enc.embed.weight.device


@pytest.mark.parametrize(
    "texts, error, match",
    [
        (
            ["a red circle", ""],
            ValueError,
            "GRUTextEncoder: Vocabulary.encode: caption '' has no words",
        ),
        (["a red circle", "   "], ValueError, "no words"),
        ("a red circle", TypeError, "got one string"),
        ([], ValueError, "got no captions"),
        (["a", 3], TypeError, "caption 1 is int"),
        (Tokens(torch.tensor([[2, 99]])), ValueError, r"word ids must lie in \[0, 12\)"),
        (Tokens(torch.tensor([[2, 3]]), torch.tensor([[False, False]])), ValueError, "empty"),
        (Tokens(torch.randn(1, 2, 4)), TypeError, "integer word ids"),
        (torch.tensor([[2, 3]]), TypeError, "got Tensor"),
    ],
)
def test_bad_inputs(texts, error, match):
    with pytest.raises(error, match=match):
        GRUTextEncoder(VOCAB, out_dim=4, word_dim=3)(texts)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"vocab": {"a": 1}}, TypeError, "vocab must be a non-empty imtm.data.Vocabulary"),
        ({"vocab": "vocab.json"}, TypeError, "got 'vocab.json'"),
        ({"out_dim": 0}, ValueError, "GRUTextEncoder: out_dim must be a positive int, got 0"),
        ({"word_dim": 1.5}, ValueError, "word_dim"),
        ({"bidirectional": 1}, TypeError, "bidirectional must be True or False"),
        ({"dropout": -0.1}, ValueError, "dropout"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"vocab": VOCAB, "out_dim": 4, **kwargs}
    with pytest.raises(error, match=match):
        GRUTextEncoder(**args)
