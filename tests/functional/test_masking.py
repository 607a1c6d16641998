import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.functional import num_masked_patches, random_patch_mask


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(0, 5), n=st.integers(0, 50), ratio=st.floats(0, 0.99), seed=st.integers(0, 100)
)
def test_exact_count_per_row_and_reproducible(b, n, ratio, seed):
    m = random_patch_mask(b, n, ratio, generator=torch.Generator().manual_seed(seed))
    assert m.shape == (b, n) and m.dtype == torch.bool
    assert m.sum(1).tolist() == [round(ratio * n)] * b
    again = random_patch_mask(b, n, ratio, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(m, again)


def test_positions_are_uniform():
    # Every position is masked about ratio of the time over many draws.
    m = random_patch_mask(4000, 10, 0.3, generator=torch.Generator().manual_seed(0))
    freq = m.float().mean(0)
    torch.testing.assert_close(freq, torch.full((10,), 0.3), rtol=0, atol=0.03)


def test_rounding_is_pythons_round():
    assert num_masked_patches(196, 0.3) == round(58.8) == 59
    assert num_masked_patches(10, 0.25) == round(2.5) == 2


def test_bad_ratio():
    with pytest.raises(ValueError, match=r"mask_ratio must be a number in \[0, 1\)"):
        random_patch_mask(2, 4, 1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        random_patch_mask(-1, 4, 0.5)
