import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.components import TextualPhraseEncoder
from imtm.testing import check_component, tokens

SETTINGS = settings(max_examples=15, deadline=None)


def loop_phrase(block: TextualPhraseEncoder, words: torch.Tensor) -> torch.Tensor:
    """Eq. 7-9 for one caption's real words ``(M_real, D)``: every window starting at a word, zeros past the end."""
    pooled = []
    for conv, w in zip(block.convs, block.windows):
        phrases = []
        for j in range(words.shape[0]):
            acc = conv.bias.clone()
            for o in range(w):
                if j + o < words.shape[0]:
                    acc = acc + conv.weight[:, :, o] @ words[j + o]
            phrases.append(torch.relu(acc))
        pooled.append(torch.stack(phrases).amax(0))  # the strongest phrase of every filter
    return block.norm(block.proj(torch.cat(pooled)))


def test_shape():
    block = TextualPhraseEncoder(dim=8, channels=5)
    out = block(Tokens.from_lengths(torch.randn(3, 6, 8), [6, 2, 1]))
    assert out.shape == (3, 8)
    assert block(torch.randn(2, 4, 8)).shape == (2, 8)


def test_matches_loop_forward_and_gradient():
    torch.manual_seed(0)
    block = TextualPhraseEncoder(dim=6, windows=(1, 2, 3), channels=4).double()
    feats = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    lengths = [5, 3, 2, 1]  # shorter than a window too
    out = block(Tokens.from_lengths(feats, lengths))
    loop = torch.stack([loop_phrase(block, feats[b, :n]) for b, n in enumerate(lengths)])
    torch.testing.assert_close(out, loop)
    w = torch.randn(4, 6, dtype=torch.float64)
    params = list(block.parameters())
    g1 = torch.autograd.grad((out * w).sum(), [feats, *params])
    g2 = torch.autograd.grad((loop * w).sum(), [feats, *params])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@SETTINGS
@given(
    x=tokens(batch=st.integers(1, 4), max_tokens=6, dim=4, dtype=torch.float64, contiguous=True),
    extra=st.integers(1, 4),
)
def test_padding_never_changes_the_sentence_vector(x, extra):
    torch.manual_seed(0)
    block = TextualPhraseEncoder(dim=4, channels=3).double()
    out = block(x)
    # NaN in the padding and more padded positions at the end: the same vectors.
    garbage = torch.full((x.batch_size, extra, 4), float("nan"), dtype=torch.float64)
    feats = torch.where(x.mask.unsqueeze(-1), x.feats, torch.full_like(x.feats, float("nan")))
    padded = Tokens(
        torch.cat([feats, garbage], 1),
        torch.cat([x.mask, x.mask.new_zeros(x.batch_size, extra)], 1),
    )
    torch.testing.assert_close(block(padded), out)
    # Every caption is scored on its own: permuting the batch permutes the vectors.
    perm = torch.randperm(x.batch_size)
    torch.testing.assert_close(block(Tokens(x.feats[perm], x.mask[perm])), out[perm])


def test_conformance():
    block = TextualPhraseEncoder(dim=8, channels=4)
    report = check_component(
        block, {"text_tokens": Tokens.from_lengths(torch.randn(3, 6, 8), [6, 2, 1])}
    )
    assert "padding" in report.passed


def test_bad_inputs():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        TextualPhraseEncoder(dim=2.5)
    with pytest.raises(ValueError, match="windows must be a non-empty tuple of positive ints"):
        TextualPhraseEncoder(dim=4, windows=(1, 0))
    with pytest.raises(ValueError, match="windows must be a non-empty tuple of positive ints"):
        TextualPhraseEncoder(dim=4, windows=())
    with pytest.raises(ValueError, match="channels must be a positive int or None"):
        TextualPhraseEncoder(dim=4, channels=0)
    block = TextualPhraseEncoder(dim=4)
    with pytest.raises(ValueError, match=r"expected token features of shape \(B, N, 4\)"):
        block(Tokens(torch.randn(2, 3, 5)))
    with pytest.raises(ValueError, match="have no real token"):
        block(Tokens(torch.randn(2, 3, 4), torch.tensor([[True, True, False], [False] * 3])))
    with pytest.raises(TypeError, match="TextualPhraseEncoder: expected text tokens as Tokens"):
        block("a red circle")
