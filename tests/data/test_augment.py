import pickle
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from raw_images import write_image

from imtm.data import CaptionAugment, ImageFileDataset, Vocabulary, augment_caption

N_WORDS = 20_000


def test_rates_match_vse_infinity():
    # Every word distinct, so each output word tells what happened to it.
    caption = " ".join(f"w{j}" for j in range(N_WORDS))
    out = augment_caption(caption, ["REPL"], torch.Generator().manual_seed(0)).split()
    masked = out.count("[MASK]") / N_WORDS
    replaced = out.count("REPL") / N_WORDS
    kept = [w for w in out if w.startswith("w")]
    deleted = (N_WORDS - len(out)) / N_WORDS
    # 0.2 selected: 50 % masked, 10 % replaced, 40 % deleted; 5 binomial standard deviations of slack.
    for got, rate in ((masked, 0.1), (replaced, 0.02), (deleted, 0.08), (len(kept) / N_WORDS, 0.8)):
        assert abs(got - rate) < 5 * (rate * (1 - rate) / N_WORDS) ** 0.5, (got, rate)
    assert kept == sorted(kept, key=lambda w: int(w[1:]))  # surviving words keep their order


def _reference(caption, words, u, pick, keep_one, p=0.2, m=0.5, r=0.1):
    """Plain rendering of VSE-infinity's rule from the same uniforms."""
    out = []
    for tok, uj, wj in zip(caption.split(), u, pick):
        if uj < p and uj / p < m:
            out.append("[MASK]")
        elif uj < p and uj / p < m + r:
            out.append(words[wj])
        elif uj >= p:
            out.append(tok)
    return " ".join(out) if out else caption.split()[keep_one]


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**31 - 1), p=st.sampled_from([0.2, 0.7, 1.0]))
def test_matches_the_rule_and_never_empty(n, seed, p):
    caption = " ".join(f"w{j}" for j in range(n))
    words = ["cat", "dog", "mat"]
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64).tolist()
    pick = torch.randint(len(words), (n,), generator=g).tolist()
    keep_one = int(torch.randint(n, (1,), generator=g))
    out = augment_caption(caption, words, torch.Generator().manual_seed(seed), p=p)
    assert out == _reference(caption, words, u, pick, keep_one, p=p)
    assert out.strip()
    every_deleted = augment_caption(
        caption, words, torch.Generator().manual_seed(seed), p=1.0, mask_prob=0.0, replace_prob=0.0
    )
    assert len(every_deleted.split()) == 1 and every_deleted in caption.split()


def test_deterministic_with_a_seed_and_identity_at_p0():
    caps = [f"a dog number {k} runs on the red grass" for k in range(50)]
    a, b, c = (
        CaptionAugment(["cat"], seed=1),
        CaptionAugment(["cat"], seed=1),
        CaptionAugment(["cat"], seed=2),
    )
    out_a, out_b, out_c = [a(x) for x in caps], [b(x) for x in caps], [c(x) for x in caps]
    assert out_a == out_b and out_a != out_c and out_a != caps
    assert [CaptionAugment(["cat"], p=0.0)(x) for x in caps] == caps
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [a(x, generator=g1) for x in caps] == [augment_caption(x, ["cat"], g2) for x in caps]
    back = pickle.loads(
        pickle.dumps(CaptionAugment(["cat"], seed=1))
    )  # generator rebuilt from the seed
    assert [back(x) for x in caps] == out_a


def test_workers_differ_and_a_seeded_loader_repeats(monkeypatch):
    caps = [f"a dog number {k} runs on the red grass again and again" for k in range(8)]
    aug = CaptionAugment(["cat"], seed=3)

    def in_worker(worker_id, worker_seed):
        # What a DataLoader worker sees: its own copy of the dataset and get_worker_info().
        info = SimpleNamespace(id=worker_id, seed=worker_seed)
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)
        copy = pickle.loads(pickle.dumps(aug))
        return [copy(x) for x in caps]

    w0, w1 = in_worker(0, 1234), in_worker(1, 1235)
    assert w0 != w1  # workers draw different streams
    assert in_worker(0, 1234) == w0  # the same loader seed repeats the augmentation
    assert in_worker(0, 99) != w0  # a new epoch (new worker seed) draws anew
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: None)
    fresh = CaptionAugment(["cat"], seed=3)
    assert [aug(x) for x in caps] == [
        fresh(x) for x in caps
    ]  # the main process: the seed's own stream


def test_augmentation_is_off_at_evaluation(tmp_path):
    paths = [write_image(tmp_path / "a.png", 0), write_image(tmp_path / "b.png", 1)]
    caps = ["a red dog", "a cat on a mat", "two dogs"]
    off = ImageFileDataset(paths, caps, [0, 1, 1])
    assert [off[k]["texts"] for k in range(3)] == caps
    on = ImageFileDataset(
        paths,
        caps,
        [0, 1, 1],
        augment=CaptionAugment(["x"], p=1.0, mask_prob=1.0, replace_prob=0.0),
    )
    assert [on[k]["texts"] for k in range(3)] == [
        "[MASK] [MASK] [MASK]",
        "[MASK] [MASK] [MASK] [MASK] [MASK]",
        "[MASK] [MASK]",
    ]
    # Matcher.evaluate / similarity read .captions, which the augmentation never touches.
    assert on.captions == caps
    default = ImageFileDataset(paths, caps, [0, 1, 1], augment=True)
    assert isinstance(default.augment, CaptionAugment) and default.augment.words == [
        "a",
        "cat",
        "dog",
        "dogs",
        "mat",
        "on",
        "red",
        "two",
    ]


def test_vocabulary_and_tokenizer_vocabularies(tmp_path):
    vocab = Vocabulary.build(["a red dog .", "a cat on a mat"])
    aug = CaptionAugment.from_vocabulary(vocab, p=1.0, mask_prob=1.0, replace_prob=0.0, seed=0)
    assert vocab.encode(aug("a red dog")) == [vocab.unk_index] * 3
    assert set(aug.words) == {"a", "red", "dog", "cat", "on", "mat"}
    with pytest.raises(ValueError, match="'unk' is a word of this vocabulary"):
        CaptionAugment.from_vocabulary(Vocabulary(["unk", "dog"]))
    with pytest.raises(ValueError, match="has no alphabetic words"):
        CaptionAugment.from_vocabulary(Vocabulary([".", ","]))
    from transformers import BertTokenizer

    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "##s", "."])
    )
    tok = BertTokenizer(str(vocab_file))
    aug = CaptionAugment.from_tokenizer(tok, p=1.0, mask_prob=1.0, replace_prob=0.0)
    assert aug.mask_token == "[MASK]" and aug.words == ["a", "cat", "dog"]
    ids = tok(aug("a dog"))["input_ids"]
    assert ids == [tok.cls_token_id, tok.mask_token_id, tok.mask_token_id, tok.sep_token_id]
    with pytest.raises(ValueError, match="tokenizer vocabulary has no alphabetic words"):
        CaptionAugment.from_tokenizer(type("T", (), {"get_vocab": lambda self: {"##s": 0}})())
    with pytest.raises(ValueError, match="the captions hold no alphabetic words"):
        CaptionAugment.from_captions(["1 2 ."])


def test_bad_arguments():
    with pytest.raises(ValueError, match="words must be a non-empty sequence"):
        CaptionAugment([])
    with pytest.raises(ValueError, match="words must be a non-empty sequence"):
        augment_caption("a dog", "cat")
    with pytest.raises(ValueError, match="mask_token must be one non-empty word"):
        CaptionAugment(["a"], mask_token="[ MASK ]")
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 1.5"):
        CaptionAugment(["a"], p=1.5)
    with pytest.raises(ValueError, match="mask_prob \\+ replace_prob must be at most 1"):
        augment_caption("a dog", ["a"], mask_prob=0.8, replace_prob=0.3)
    with pytest.raises(TypeError, match="seed must be an int or None"):
        CaptionAugment(["a"], seed=1.5)
    with pytest.raises(TypeError, match="expected a caption string"):
        augment_caption(["a", "dog"], ["a"])
    with pytest.raises(ValueError, match="has no words"):
        augment_caption("   ", ["a"])
