"""GRUTextEncoder started from word vectors (GloVe / fastText text files, aligned .npy)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.components import GRUTextEncoder
from imtm.components.encoders.gru_text import read_word_vectors
from imtm.data import Vocabulary

CAPTIONS = ["a man in a t-shirt walks", "two dogs run on the grass", "a cyclist/rider waits"]


def _glove(path, words, dim=4, seed=0, header=False):
    rng = np.random.default_rng(seed)
    table = {w: rng.standard_normal(dim).round(4) for w in words}
    lines = [f"{len(table)} {dim}"] if header else []
    lines += [w + " " + " ".join(str(x) for x in v) for w, v in table.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return table


def _reference(vocab, table, weight_before):
    """The plain loop: CHAN's lookup (the word, else the cleaned word) row by row."""
    expected, hits = weight_before.clone(), 0
    for i, word in enumerate(vocab.itos):
        key = (
            word
            if word in table
            else word.replace("-", "").replace(".", "").replace("'", "").split("/")[0]
        )
        if key in table:
            expected[i] = torch.tensor(table[key], dtype=torch.float32)
            hits += 1
    return expected, hits


@pytest.mark.parametrize("header", [False, True], ids=["glove", "fasttext"])
def test_found_words_get_their_vectors_and_the_rest_keeps_the_random_init(tmp_path, header):
    # SCAN's vocabularies keep tokens such as "t-shirt" whole (imtm's own tokenizer splits them).
    vocab = Vocabulary(["a", "man", "t-shirt", "dogs", "cyclist/rider", "grass", "the"])
    # "tshirt" and "cyclist" are only reachable through CHAN's cleaning; "grass" is missing.
    table = _glove(
        tmp_path / "vec.txt",
        ["a", "man", "tshirt", "dogs", "cyclist", "the", "extra"],
        header=header,
    )
    enc = GRUTextEncoder(
        vocab, out_dim=6, word_dim=4, word_vectors=tmp_path / "vec.txt", unknown_words="zeros"
    )
    expected, hits = _reference(vocab, table, torch.zeros(len(vocab), 4))
    torch.testing.assert_close(enc.embed.weight.detach(), expected)
    assert enc.word_vector_hits == hits == 6
    # CHAN's rule for the others: nn.Embedding's N(0, 1), left as drawn.
    torch.manual_seed(0)
    normal = GRUTextEncoder(
        vocab, out_dim=6, word_dim=4, word_vectors=tmp_path / "vec.txt"
    ).embed.weight.detach()
    found = expected.abs().sum(1) > 0
    torch.testing.assert_close(normal[found], expected[found])
    assert 0.6 < float(normal[~found].std()) < 1.4


@settings(max_examples=6, deadline=None)
@given(init=st.sampled_from(["normal", "uniform", "zeros"]), seed=st.integers(0, 100))
def test_unknown_word_initialisations(tmp_path_factory, init, seed):
    folder = tmp_path_factory.mktemp("vec")
    vocab = Vocabulary.build(CAPTIONS)
    table = _glove(folder / "v.txt", ["man", "dogs"], seed=seed)
    enc = GRUTextEncoder(
        vocab, out_dim=6, word_dim=4, word_vectors=folder / "v.txt", unknown_words=init
    )
    w = enc.embed.weight.detach()
    unknown = torch.tensor([word not in table for word in vocab.itos])
    if init == "zeros":
        assert not w[unknown].any()
    elif init == "uniform":
        assert w[unknown].abs().max() <= 0.1
    for word in table:
        torch.testing.assert_close(
            w[vocab.stoi[word]], torch.tensor(table[word], dtype=torch.float32)
        )


def test_aligned_npy(tmp_path):
    vocab = Vocabulary.build(CAPTIONS)
    array = np.arange(len(vocab) * 4, dtype=np.float32).reshape(len(vocab), 4)
    np.save(tmp_path / "v.npy", array)
    enc = GRUTextEncoder(vocab, out_dim=6, word_dim=4, word_vectors=str(tmp_path / "v.npy"))
    torch.testing.assert_close(enc.embed.weight.detach(), torch.from_numpy(array))
    np.save(tmp_path / "short.npy", array[:-1])
    with pytest.raises(ValueError, match="one per vocabulary word"):
        GRUTextEncoder(vocab, out_dim=6, word_dim=4, word_vectors=str(tmp_path / "short.npy"))


def test_freeze_embeddings_and_training_changes_the_vectors_otherwise(tmp_path):
    vocab = Vocabulary.build(CAPTIONS)
    _glove(tmp_path / "v.txt", ["man", "dogs"])
    for freeze in (True, False):
        enc = GRUTextEncoder(
            vocab, out_dim=6, word_dim=4, word_vectors=tmp_path / "v.txt", freeze_embeddings=freeze
        )
        enc(CAPTIONS).feats.sum().backward()
        assert (enc.embed.weight.grad is None) == freeze


def test_bad_word_vectors(tmp_path):
    vocab = Vocabulary.build(CAPTIONS)
    _glove(tmp_path / "v.txt", ["man"], dim=5)
    with pytest.raises(ValueError, match="5-d vectors, but word_dim=4; set word_dim=5"):
        GRUTextEncoder(vocab, out_dim=6, word_dim=4, word_vectors=tmp_path / "v.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GRUTextEncoder(vocab, out_dim=6, word_dim=4, word_vectors=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="unknown_words must be one of.*Did you mean 'normal'"):
        GRUTextEncoder(
            vocab, out_dim=6, word_dim=4, word_vectors=tmp_path / "v.txt", unknown_words="norml"
        )
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no word vectors"):
        read_word_vectors(tmp_path / "empty.txt")


def test_portable_params_keep_the_base_name_only(tmp_path):
    vocab = Vocabulary.build(CAPTIONS)
    _glove(tmp_path / "glove.txt", ["man"])
    enc = GRUTextEncoder(vocab, out_dim=6, word_dim=4, word_vectors=tmp_path / "glove.txt")
    assert enc.portable_params() == {"word_vectors": "glove.txt"}
