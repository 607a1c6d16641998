"""Matcher's opt-in speed switches: bf16 autocast and torch.compile give the same retrieval.

Also runs the timm and transformers encoders end to end through a Matcher on the
synthetic pixel view (fit, blocked similarity, save / load).
"""

import warnings

import pytest
import torch
from toy import ToyImage, toy_components, toy_data

from imtm import Matcher
from imtm.components import GlobalCosine, HFTextEncoder, InfoNCELoss, TimmVisionEncoder
from imtm.components.encoders import write_local_bert
from imtm.data import synthetic
from imtm.metrics import retrieval_metrics


@pytest.fixture(scope="module")
def pixel_data():
    return synthetic.load(view="pixels", seed=0, n_train=48, n_dev=16, n_test=16, image_size=32)


@pytest.fixture(scope="module")
def fitted(pixel_data, tmp_path_factory):
    train, _, _ = pixel_data
    folder = write_local_bert(
        tmp_path_factory.mktemp("bert"), train.captions, hidden_size=32, num_heads=2
    )
    m = Matcher(
        [
            TimmVisionEncoder(
                "vit_tiny_patch16_224",
                img_size=32,
                out_dim=32,
                mask_ratio=0.25,
                model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
            ),
            HFTextEncoder(folder, out_dim=32, max_length=24),
            GlobalCosine(),
            InfoNCELoss(),
        ],
        epochs=1,
        batch_size=16,
        lr=1e-3,
        device="cpu",
        verbose=False,
    )
    return m.fit(train)


def test_encoders_run_end_to_end_and_survive_save_load(fitted, pixel_data, tmp_path):
    _, _, test = pixel_data
    s = fitted.similarity(test.images, test.captions)
    assert s.shape == (16, 80) and torch.isfinite(s).all()
    fitted.save(tmp_path / "run")
    loaded = Matcher.load(tmp_path / "run")
    torch.testing.assert_close(loaded.similarity(test.images, test.captions), s)


#: bf16 keeps 8 significant bits (unit roundoff 2**-8 = 0.0039); the cosines of this model moved by at
#: most 3.2e-3 with timm 1.0.3 / transformers 4.46.3 and 3.0e-3 with timm 1.0.31 / transformers 5.25.
BF16_SCORE_ATOL = 2e-2


def recall_bounds(sims: torch.Tensor, caption_to_image: torch.Tensor, delta: float):
    """The fewest and the most hits any scores within ``delta`` of ``sims`` can give.

    Every positive pair lowered by ``delta`` and every negative raised by it ranks each
    query's positives as low as such scores can; the reverse ranks them as high. A recall
    of scores within ``delta`` of ``sims`` lies between the two (ties at the boundary are
    avoided by widening ``delta`` by one part in 10**4).
    """
    positive = caption_to_image[None, :] == torch.arange(sims.shape[0])[:, None]
    shift = torch.where(positive, -1.0, 1.0) * (delta * 1.0001 + 1e-7)
    return (
        retrieval_metrics(sims + shift, caption_to_image),
        retrieval_metrics(sims - shift, caption_to_image),
    )


def test_recall_bounds_contain_every_perturbation_and_are_tight_without_ties():
    gen = torch.Generator().manual_seed(0)
    c2i = torch.arange(6).repeat_interleave(2)
    s = torch.rand(6, 12, generator=gen)
    low, high = recall_bounds(s, c2i, 0.05)
    for _ in range(20):
        noisy = s + (torch.rand(6, 12, generator=gen) * 2 - 1) * 0.05
        m = retrieval_metrics(noisy, c2i)
        assert all(low[k] <= m[k] <= high[k] for k in ("i2t_r1", "t2i_r1", "rsum"))
    # Scores 10 apart cannot be reordered by 0.05: the bounds are the recalls themselves.
    spread = torch.arange(72, dtype=torch.float32).reshape(6, 12) * 10
    low, high = recall_bounds(spread, c2i, 0.05)
    assert low == high == retrieval_metrics(spread, c2i)


def test_bf16_autocast_gives_the_same_retrieval(fitted, pixel_data):
    """bf16 moves every score by less than its rounding allows, so retrieval changes only at near ties.

    The fixture's model is trained for one epoch from random weights: its scores of one caption
    against the 16 images spread by a few 1e-3, as much as bf16 moves them, so rSum under bf16 can
    differ by tens of points (51.25 with timm 1.0.3 / transformers 4.46.3, whose random weights
    differ; 56.25 with the current versions after 6 epochs). The recalls are checked against the
    exact bounds that the fp32 scores and the measured change allow instead of a fixed margin.
    """
    _, _, test = pixel_data
    fitted.set_params(precision="fp32")
    s32 = fitted.similarity(test.images, test.captions)
    fitted.set_params(precision="bf16")
    try:
        s16 = fitted.similarity(test.images, test.captions)
    finally:
        fitted.set_params(precision="fp32")
    assert s16.dtype == s32.dtype == torch.float32
    torch.testing.assert_close(s16, s32, rtol=0, atol=BF16_SCORE_ATOL)
    delta = float((s16 - s32).abs().max())
    assert delta > 0, "bf16 autocast did not run: the scores are bit-identical"
    c2i = torch.as_tensor(test.caption_to_image)
    low, high = recall_bounds(s32, c2i, delta)
    m16 = retrieval_metrics(s16, c2i)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"):
        assert low[key] <= m16[key] <= high[key], (key, low[key], m16[key], high[key], delta)


def _compile_works() -> bool:
    try:
        f = torch.compile(lambda x: x * 2)
        return bool(torch.equal(f(torch.ones(2)), torch.full((2,), 2.0)))
    except Exception:  # noqa: BLE001 - any failure means: not supported here
        return False


@pytest.mark.slow
def test_compile_gives_the_same_retrieval():
    if not _compile_works():
        pytest.skip("torch.compile does not work on this platform")
    data = toy_data(n_images=12)
    m = Matcher(
        toy_components(data.vocab), epochs=1, batch_size=6, device="cpu", verbose=False
    ).fit(data)
    eager = m.similarity(data.images, data.captions)
    m.set_params(compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to eager here
        compiled = m.similarity(data.images, data.captions)
    assert any(b._compiled_call_impl is not None for b in m.components_.values())
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert retrieval_metrics(compiled, data.caption_to_image) == retrieval_metrics(
        eager, data.caption_to_image
    )
    m.set_params(compile=False)
    m.similarity(data.images[:2], data.captions[:2])
    assert all(b._compiled_call_impl is None for b in m.components_.values())


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    data = toy_data(n_images=6)
    m = Matcher(
        toy_components(data.vocab), epochs=1, batch_size=6, device="cpu", verbose=False
    ).fit(data)
    eager = m.similarity(data.images, data.captions)

    def broken_compile(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no C compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    m.set_params(compile=True)
    with pytest.warns(
        RuntimeWarning, match="torch.compile failed for block .*runs eagerly"
    ) as caught:
        fallback = m.similarity(data.images, data.captions)
    torch.testing.assert_close(fallback, eager)
    named = {
        n
        for n in ("toyimage", "toytext", "toycosine")
        if any(f"block {n!r}" in str(w.message) for w in caught)
    }
    assert named == {
        "toyimage",
        "toytext",
        "toycosine",
    }  # the blocks similarity runs; each warns once
    assert all(m.components_[n]._compiled_call_impl is None for n in named)


def test_an_input_error_is_the_eager_error_and_keeps_the_block_compiled(monkeypatch):
    from imtm.matcher import _CompiledCall

    block = ToyImage()
    monkeypatch.setattr(torch, "compile", lambda fn, *args, **kwargs: fn)  # "compiles" to itself
    block._compiled_call_impl = _CompiledCall(block, "toyimage")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: compilation was not at fault
        with pytest.raises(AttributeError, match="with_feats"):
            block(None)
    assert isinstance(block._compiled_call_impl, _CompiledCall)
    assert not getattr(block, "_imtm_compile_failed", False)


def test_compile_unsupported_at_construction_warns(monkeypatch):
    data = toy_data(n_images=6)

    def unsupported(fn, *args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        m = Matcher(
            toy_components(data.vocab),
            epochs=1,
            batch_size=6,
            device="cpu",
            verbose=False,
            compile=True,
        ).fit(data)
    assert all(b._compiled_call_impl is None for b in m.components_.values())


def test_compile_must_be_a_bool():
    data = toy_data(n_images=6)
    with pytest.raises(TypeError, match="compile must be True or False"):
        Matcher(toy_components(data.vocab), compile="yes").validate()
