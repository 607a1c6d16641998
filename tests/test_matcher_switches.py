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


def test_bf16_autocast_gives_the_same_retrieval(fitted, pixel_data):
    _, _, test = pixel_data
    fitted.set_params(precision="fp32")
    s32 = fitted.similarity(test.images, test.captions)
    fitted.set_params(precision="bf16")
    try:
        s16 = fitted.similarity(test.images, test.captions)
    finally:
        fitted.set_params(precision="fp32")
    # bf16 keeps 8 bits of mantissa: cosines agree to about 1e-2.
    torch.testing.assert_close(s16, s32, rtol=0, atol=5e-2)
    m32 = retrieval_metrics(s32, test.caption_to_image)
    m16 = retrieval_metrics(s16, test.caption_to_image)
    # A recall moves by one query at most per near-tie; 16 images x 80 captions.
    assert abs(m16["rsum"] - m32["rsum"]) <= 30.0


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
