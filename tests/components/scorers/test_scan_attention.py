import pytest
import torch

from imtm import Tokens
from imtm.components import ScanAttention
from imtm.functional.scan_attention import scan_t2i_scores
from imtm.testing import check_component


def test_shape_conformance_and_functional_twin():
    torch.manual_seed(0)
    x = {
        "image_tokens": Tokens.from_lengths(torch.randn(3, 5, 8), [5, 2, 4]),
        "text_tokens": Tokens.from_lengths(torch.randn(4, 6, 8), [6, 1, 3, 4]),
    }
    block = ScanAttention()
    assert block(x["image_tokens"], x["text_tokens"]).shape == (3, 4)
    report = check_component(
        block, x, functional=lambda i, t: scan_t2i_scores(i.feats, t.feats, i.mask, t.mask)
    )
    assert {"functional", "padding"} <= set(report.passed)


def test_bad_inputs():
    with pytest.raises(ValueError, match="ScanAttention: smooth must be a finite number > 0"):
        ScanAttention(smooth=-1.0).validate()
    with pytest.raises(ValueError, match="ScanAttention: max_block_elements"):
        ScanAttention(max_block_elements=0).validate()
    with pytest.raises(TypeError, match="expected text tokens as Tokens"):
        ScanAttention()(torch.randn(2, 3, 8), ["a caption"])
