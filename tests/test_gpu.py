"""On a CUDA device the scorers give the CPU's scores, and a bf16 training step runs.

Marked ``gpu``: skipped without CUDA (see ``conftest.py``); ``benchmarks/gpu_suite.py`` runs them.
"""

import pytest
import torch

from imtm import Matcher, Tokens, presets
from imtm.components import HardAssignmentCoding, SparsePatchWordAlignment
from imtm.data import synthetic
from imtm.functional.blocking import blocked_pair_scores

pytestmark = pytest.mark.gpu


def _problem(seed=0, n_images=12, n_captions=20, n=36, m=12, d=64):
    g = torch.Generator().manual_seed(seed)
    images = Tokens(torch.randn(n_images, n, d, generator=g))
    lengths = torch.randint(3, m + 1, (n_captions,), generator=g).tolist()
    texts = Tokens.from_lengths(torch.randn(n_captions, m, d, generator=g), lengths)
    return images, texts


@pytest.mark.parametrize(
    "scorer",
    [HardAssignmentCoding(), HardAssignmentCoding(codebook="textual"), SparsePatchWordAlignment()],
)
def test_scorers_match_the_cpu(scorer):
    images, texts = _problem()
    want = scorer(images, texts)
    got = scorer(images.to("cuda"), texts.to("cuda"))
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_blocked_pair_scores_do_not_depend_on_the_block_size_on_cuda():
    images, texts = _problem(1)
    v, t = images.to("cuda"), texts.to("cuda")
    reduce = lambda s, vm, tm: s.amax(1).mean(-1)  # noqa: E731
    whole = blocked_pair_scores(v.feats, t.feats, reduce=reduce)
    small = blocked_pair_scores(v.feats, t.feats, reduce=reduce, max_block_elements=36 * 12 * 3)
    torch.testing.assert_close(small, whole)


def test_bf16_training_step_on_cuda():
    train, _, _ = synthetic.load(view="regions", seed=0, n_train=16, n_dev=2, n_test=2)
    m = Matcher(
        presets.build("chan", train, embed_dim=32, word_dim=32),
        epochs=1,
        batch_size=16,
        device="cuda",
        precision="bf16",
        verbose=False,
        keep_best=False,
    ).fit(train)
    assert all(p.device.type == "cuda" for p in m.components_.parameters())
    losses = [v for k, v in m.history_[-1].items() if "loss" in k and isinstance(v, float)]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    scores = m.similarity(train.images[:4], train.captions[:8])
    assert scores.shape == (4, 8) and torch.isfinite(torch.as_tensor(scores)).all()
