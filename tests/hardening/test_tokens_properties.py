"""Property tests of Tokens, the type every block passes: padding, dtypes, round trips."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.testing import PADDINGS, dtypes, tokens

SETTINGS = settings(max_examples=25, deadline=None)
ANY_TOKENS = st.sampled_from(PADDINGS).flatmap(
    lambda padding: dtypes().flatmap(
        lambda dt: tokens(batch=st.integers(1, 4), max_tokens=5, dim=3, dtype=dt, padding=padding)
    )
)


def poison(t: Tokens, value=float("nan")) -> Tokens:
    """The same Tokens with ``value`` in every padded position."""
    return t.with_feats(t.feats.masked_fill(~t.mask.unsqueeze(-1), value))


@SETTINGS
@given(t=ANY_TOKENS, value=st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30]))
def test_zero_padding_and_normalize_clear_whatever_the_padding_holds(t, value):
    bad = poison(t, value)
    zeroed = bad.zero_padding()
    assert bool((zeroed.feats[~bad.mask] == 0).all())
    assert torch.equal(zeroed.feats[bad.mask], t.feats[t.mask])
    unit = bad.normalize()
    assert bool((unit.feats[~bad.mask] == 0).all())
    real = unit.feats[bad.mask].float()
    norms = real.norm(dim=-1)
    tol = 1e-2 if t.dtype == torch.bfloat16 else 1e-5
    assert bool(((norms - 1).abs() < tol).all() | (norms == 0).all())
    torch.testing.assert_close(unit.feats[bad.mask], t.normalize().feats[t.mask])


@SETTINGS
@given(t=ANY_TOKENS)
def test_masked_mean_matches_a_loop_and_ignores_the_padding(t):
    out = poison(t).masked_mean()
    assert out.shape == (t.batch_size, t.dim) and out.dtype == t.dtype
    for b in range(t.batch_size):
        expect = t.feats[b][t.mask[b]].double().mean(0)
        tol = 2e-2 if t.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out[b].double(), expect, rtol=tol, atol=tol)


@SETTINGS
@given(t=ANY_TOKENS, data=st.data())
def test_row_selection_is_equivariant(t, data):
    perm = torch.tensor(data.draw(st.permutations(range(t.batch_size))), dtype=torch.long)
    torch.testing.assert_close(t[perm].masked_mean(), t.masked_mean()[perm])
    assert torch.equal(t[perm].lengths, t.lengths[perm])


@SETTINGS
@given(
    parts=st.lists(
        tokens(batch=st.integers(1, 3), max_tokens=5, dim=2, contiguous=True),
        min_size=1,
        max_size=3,
    )
)
def test_cat_then_slice_gives_the_parts_back(parts):
    whole = Tokens.cat(parts)
    assert whole.batch_size == sum(p.batch_size for p in parts)
    start = 0
    for p in parts:
        back = whole[start : start + p.batch_size]
        start += p.batch_size
        n = p.num_tokens
        assert torch.equal(back.mask[:, :n], p.mask) and not bool(back.mask[:, n:].any())
        assert torch.equal(back.feats[:, :n][p.mask], p.feats[p.mask])


@SETTINGS
@given(t=tokens(batch=st.integers(1, 4), max_tokens=6, dim=2))
def test_trim_keeps_every_real_token_and_is_idempotent(t):
    trimmed = t.trim()
    assert trimmed.num_tokens <= t.num_tokens and bool(trimmed.mask[:, -1].any())
    assert torch.equal(trimmed.lengths, t.lengths)
    assert torch.equal(trimmed.feats[trimmed.mask], t.feats[t.mask])
    assert trimmed.trim().num_tokens == trimmed.num_tokens


@SETTINGS
@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_from_lengths_and_pad_sequence_agree(lengths):
    seqs = [torch.randn(n, 3) for n in lengths]
    padded = Tokens.pad_sequence(seqs)
    assert padded.lengths.tolist() == lengths
    again = Tokens.from_lengths(padded.feats, lengths)
    assert torch.equal(again.mask, padded.mask)
    for b, s in enumerate(seqs):
        assert torch.equal(padded.feats[b, : len(s)], s)


@SETTINGS
@given(t=ANY_TOKENS, dt=dtypes())
def test_to_changes_features_only(t, dt):
    moved = t.to(dt)
    assert moved.dtype == dt and moved.mask.dtype == torch.bool and torch.equal(moved.mask, t.mask)
    ids = Tokens(torch.randint(0, 9, (2, 3)))
    assert ids.to(dt).feats.dtype == torch.long


def test_check_refuses_empty_rows_and_nan_at_real_tokens_only():
    t = Tokens.from_lengths(torch.randn(2, 3, 4), [3, 1])
    poison(t).check("x")  # NaN in padding is fine
    bad = t.feats.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x holds 1 NaN or inf"):
        Tokens(bad, t.mask).check("x")
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        Tokens.from_lengths(torch.randn(2, 3, 4), [3, 0]).check("x")
    with pytest.raises(ValueError, match=r"shape \(B, N, 5\)"):
        t.check("x", dim=5)
