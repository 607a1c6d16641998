import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens


def test_from_lengths_and_mean():
    f = torch.arange(24.0).reshape(2, 4, 3)
    t = Tokens.from_lengths(f, [4, 2])
    assert t.lengths.tolist() == [4, 2]
    torch.testing.assert_close(t.masked_mean()[1], f[1, :2].mean(0))


def test_padding_never_leaks_into_mean_even_when_nan():
    f = torch.randn(2, 3, 4)
    f[1, 2] = float("nan")
    t = Tokens.from_lengths(f, [3, 2])
    assert bool(torch.isfinite(t.masked_mean()).all())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 3), st.data())
def test_pad_cat_and_trim_keep_real_tokens(b, n, extra, data):
    lengths = [data.draw(st.integers(1, n)) for _ in range(b)]
    seqs = [torch.randn(k, 3) for k in lengths]
    t = Tokens.pad_sequence(seqs, pad_to=n + extra)
    assert t.num_tokens == n + extra
    trimmed = t.trim()
    assert trimmed.num_tokens == max(lengths)
    torch.testing.assert_close(trimmed.masked_mean(), torch.stack([s.mean(0) for s in seqs]))
    both = Tokens.cat([t, trimmed])
    torch.testing.assert_close(both.masked_mean()[:b], both.masked_mean()[b:])


def test_normalize_zeroes_padding():
    t = Tokens.from_lengths(torch.randn(2, 3, 4), [1, 3]).normalize()
    assert float(t.feats[0, 1:].abs().sum()) == 0.0
    torch.testing.assert_close(t.feats[1].norm(dim=-1), torch.ones(3))


def test_prefix_tokens_skipped_on_request():
    f = torch.tensor([[[10.0], [1.0], [3.0]]])
    t = Tokens(f, num_prefix_tokens=1)
    assert float(t.masked_mean(skip_prefix=True)) == 2.0


def test_integer_ids_move_without_casting():
    t = Tokens(torch.tensor([[1, 2, 0]]), torch.tensor([[True, True, False]]))
    assert t.to(torch.float64).feats.dtype == torch.long


def test_bad_inputs():
    with pytest.raises(ValueError, match="mask shape"):
        Tokens(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        Tokens(torch.randn(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="lengths must lie in"):
        Tokens.from_lengths(torch.randn(2, 3, 4), [4, 1])
    with pytest.raises(ValueError, match=r"expected token features of shape \(B, N, 8\)"):
        Tokens(torch.randn(2, 3, 4)).check("Block", dim=8)
    with pytest.raises(ValueError, match="rows \\[1\\] have no real token"):
        Tokens.from_lengths(torch.randn(2, 3, 4), [2, 0]).check("Block")
    bad = torch.randn(1, 2, 4)
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        Tokens(bad).check("Block")
