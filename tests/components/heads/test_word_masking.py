"""WordMasking with CLIP tokenizers: start / end of text never picked, no [MASK] refused with what to do."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.components import HFTextEncoder, WordMasking
from imtm.components.encoders.hf_text import write_local_clip
from imtm.functional.lexicon import IGNORE_INDEX

WORDS = ["a red circle left of a blue square", "two green stars above the yellow triangle"]
CAPTIONS = ["a red circle left of a blue square", "two green stars", "yellow"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_local_clip(tmp_path_factory.mktemp("clip"), WORDS, hidden_size=16, num_heads=2)


@pytest.fixture(scope="module")
def clip_enc(clip_dir):
    return HFTextEncoder(clip_dir)


@pytest.fixture(scope="module")
def clip_with_mask(tmp_path_factory, clip_dir):
    """The CLIP text tower given a mask token, as the refusal tells users to do."""
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    model = CLIPTextModel.from_pretrained(clip_dir)
    model.resize_token_embeddings(len(tokenizer))
    folder = tmp_path_factory.mktemp("clip_mask")
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)
    return HFTextEncoder(folder)


def _maskable_loop(ids, mask, tokenizer):
    """Plain loops: a position may be picked when it is real and not start, end or padding."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    out = torch.zeros_like(mask)
    for b in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            out[b, j] = bool(mask[b, j]) and int(ids[b, j]) not in special
    return out


def test_a_clip_tokenizer_without_mask_token_is_refused_with_what_to_do(clip_enc):
    assert clip_enc.tokenizer.mask_token_id is None
    with pytest.raises(ValueError, match="without a mask token") as err:
        WordMasking(tokenizer=clip_enc, prob=0.15).validate()
    for hint in ("text='bert'", "add_special_tokens", "resize_token_embeddings", "prob=0"):
        assert hint in str(err.value)
    # In a pipeline the block is linked by name: the name is in the message.
    with pytest.raises(ValueError, match="the text encoder 'text'"):
        WordMasking("text", prob=0.15).link({"text": clip_enc})


def test_prob_raised_after_linking_is_refused_at_the_forward(clip_enc):
    block = WordMasking(tokenizer=clip_enc, prob=0.0).validate()
    block.set_params(prob=0.5)
    with pytest.raises(ValueError, match="without a mask token"):
        block.train()(CAPTIONS)
    block.set_params(prob=0.0)
    masked, labels, ids = block.train()(CAPTIONS)
    assert bool((labels == IGNORE_INDEX).all())


def test_clip_with_prob_zero_gives_the_clean_ids(clip_enc):
    masked, labels, ids = WordMasking(tokenizer=clip_enc, prob=0.0).train()(CAPTIONS)
    expected = clip_enc.tokenize(CAPTIONS)
    torch.testing.assert_close(ids, expected.feats)
    torch.testing.assert_close(masked.feats, expected.feats)
    assert bool((labels == IGNORE_INDEX).all())


def test_clip_with_a_mask_token_picks_every_word_never_start_end_or_padding(clip_with_mask):
    enc, tok = clip_with_mask, clip_with_mask.tokenizer
    torch.manual_seed(0)
    masked, labels, ids = WordMasking(tokenizer=enc, prob=1.0).train()(CAPTIONS)
    clean = enc.tokenize(CAPTIONS)
    expected = _maskable_loop(clean.feats, clean.mask, tok)
    assert bool(expected.any()) and not bool(expected[:, 0].any())  # start of text is never a word
    torch.testing.assert_close(labels != IGNORE_INDEX, expected)
    torch.testing.assert_close(labels[expected], clean.feats[expected])
    torch.testing.assert_close(masked.feats[~expected], clean.feats[~expected])
    # The corrupted captions run through the encoder (the mask token has an embedding row).
    out = enc(masked)
    assert out.feats.shape[:2] == clean.feats.shape


@settings(max_examples=15, deadline=None)
@given(prob=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_property_picks_lie_among_the_words_and_labels_are_the_clean_ids(
    clip_with_mask, prob, seed
):
    enc, tok = clip_with_mask, clip_with_mask.tokenizer
    torch.manual_seed(seed)
    masked, labels, ids = WordMasking(tokenizer=enc, prob=prob).train()(CAPTIONS)
    maskable = _maskable_loop(ids, masked.mask, tok)
    picked = labels != IGNORE_INDEX
    assert not bool((picked & ~maskable).any())
    torch.testing.assert_close(labels[picked], ids[picked])
    torch.testing.assert_close(masked.feats[~picked], ids[~picked])
    changed = masked.feats != ids
    assert not bool((changed & ~picked).any())
