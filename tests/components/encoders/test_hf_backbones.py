"""HFTextEncoder beyond safetensors BERT folders: pytorch_model.bin folders (read with weights_only=True),
sharded checkpoints, and CLIP text towers, all tiny random models written here."""

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.components import HFTextEncoder
from imtm.components.encoders import write_local_bert
from imtm.components.encoders.hf_text import load_transformers_weights, write_local_clip
from imtm.testing import check_component

WORDS = ["a red circle left of a blue square", "two green stars above the yellow triangle"]
CAPTIONS = ["a red circle", "two green stars above a blue square", "yellow"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_local_clip(
        tmp_path_factory.mktemp("clip"), WORDS, hidden_size=32, num_layers=2, num_heads=2
    )


def _bin_folder(tmp_path, sharded=False):
    """A BERT folder as older hub repositories ship it: a pytorch_model.bin with the pre-training
    model's names (``bert.`` prefix, LayerNorm ``gamma`` / ``beta``, a masked-LM head) and no safetensors."""
    folder = write_local_bert(tmp_path / "bert", WORDS, hidden_size=32, num_layers=2, num_heads=2)
    reference = HFTextEncoder(folder).eval()
    state = {}
    for key, value in reference.model.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        )
        state["bert." + key] = value.clone()
    state["cls.predictions.bias"] = torch.zeros(7)  # a head the encoder has no use for
    os.remove(folder / "model.safetensors")
    if sharded:
        keys = sorted(state)
        halves = {
            "pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
            "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :],
        }
        for name, part in halves.items():
            torch.save({k: state[k] for k in part}, folder / name)
        index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder, reference


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_model_bin_folder_loads_exactly_the_saved_weights(tmp_path, sharded):
    folder, reference = _bin_folder(tmp_path, sharded)
    loaded = HFTextEncoder(folder).eval()
    torch.testing.assert_close(loaded(CAPTIONS).feats, reference(CAPTIONS).feats)


def test_pickled_code_in_pytorch_model_bin_is_refused(tmp_path):
    folder, reference = _bin_folder(tmp_path)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "opaque": object()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        HFTextEncoder(folder)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    folder, reference = _bin_folder(tmp_path)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del state["bert.encoder.layer.1.output.dense.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"do not fit.*encoder\.layer\.1\.output\.dense\.weight"):
        HFTextEncoder(folder)
    os.remove(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="has no weights"):
        load_transformers_weights(reference.model, folder)


# ---------------------------------------------------------------------- CLIP text tower
def test_clip_text_tower_tokens_give_clips_text_features(clip_dir):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(clip_dir).eval()
    enc = HFTextEncoder(clip_dir, special_tokens="all").eval()
    tokens = enc(CAPTIONS)
    ids = enc.tokenize(CAPTIONS)
    # CLIP's sentence feature: the end-of-text token's state, projected (transformers' get_text_features).
    eos = ids.mask.sum(1) - 1
    ours = clip.text_projection(tokens.feats[torch.arange(len(CAPTIONS)), eos])
    theirs = clip.get_text_features(input_ids=ids.feats, attention_mask=ids.mask.long())
    theirs = getattr(theirs, "pooler_output", theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert tokens.num_prefix_tokens == 1 and enc.word_embeddings.num_embeddings == enc.vocab_size


@settings(max_examples=6, deadline=None)
@given(
    extra=st.lists(st.sampled_from(["red", "blue", "stars", "the", "two"]), min_size=1, max_size=6)
)
def test_clip_padding_never_changes_a_result(clip_dir, extra):
    enc = CLIP_ENC
    alone = enc([CAPTIONS[0]]).feats[0]
    padded = enc([CAPTIONS[0], " ".join(extra * 3)])
    n = alone.shape[0]
    torch.testing.assert_close(padded.feats[0, :n], alone, rtol=1e-5, atol=1e-5)
    assert not padded.feats[0, n:].any()


CLIP_ENC = None


@pytest.fixture(autouse=True, scope="module")
def _clip_encoder(clip_dir):
    global CLIP_ENC
    CLIP_ENC = HFTextEncoder(clip_dir, special_tokens="none").eval()


def test_clip_from_pytorch_model_bin(clip_dir, tmp_path):
    import shutil

    folder = tmp_path / "clip_bin"
    shutil.copytree(clip_dir, folder)
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    os.remove(folder / "model.safetensors")
    torch.save(
        state, folder / "pytorch_model.bin"
    )  # CLIPModel's names: text_model.*, vision_model.*, ...
    a = HFTextEncoder(folder).eval()(CAPTIONS)
    b = HFTextEncoder(clip_dir).eval()(CAPTIONS)
    torch.testing.assert_close(a.feats, b.feats)


def test_clip_conformance(clip_dir):
    report = check_component(HFTextEncoder(clip_dir, out_dim=8), {"texts": CAPTIONS})
    assert "gradients" in report.passed


def test_clip_runs_in_float64_and_keeps_the_default_dtype(clip_dir):
    # transformers 4.46 builds CLIP's causal mask in the default dtype; float64 must still run.
    enc = HFTextEncoder(clip_dir).eval()
    single = enc(CAPTIONS).feats
    double = enc.double()(CAPTIONS).feats
    assert double.dtype == torch.float64
    assert torch.get_default_dtype() == torch.float32
    torch.testing.assert_close(double.float(), single, rtol=1e-4, atol=1e-5)


def test_the_float64_mask_context_restores_the_default_dtype_after_an_error():
    from imtm.components.encoders.hf_text import _clip_masks_in

    with pytest.raises(RuntimeError, match="inside"):
        with _clip_masks_in(torch.float64):
            assert torch.get_default_dtype() == torch.float64
            raise RuntimeError("inside")
    assert torch.get_default_dtype() == torch.float32
    with _clip_masks_in(torch.float32):
        assert torch.get_default_dtype() == torch.float32


def test_clip_pretokenised_must_start_with_start_of_text(clip_dir):
    enc = CLIP_ENC
    ids = enc.tokenize(CAPTIONS)
    torch.testing.assert_close(enc(ids).feats, enc(CAPTIONS).feats)
    bad = ids.feats.clone()
    bad[:, 0] = 5
    from imtm import Tokens

    with pytest.raises(ValueError, match="must start with"):
        enc(Tokens(bad, ids.mask))
