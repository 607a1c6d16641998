"""presets.ela in a Matcher: the tie survives clone, from_config and save/load; masking; two-stage scores."""

import pytest
import torch
from sklearn.base import clone

from imtm import Matcher, presets
from imtm.components import WordMasking
from imtm.components.encoders.hf_text import write_local_bert
from imtm.data import synthetic


@pytest.fixture(scope="module")
def data_and_model(tmp_path_factory):
    train, _, test = synthetic.load(
        view="pixels", seed=0, n_train=8, n_dev=2, n_test=4, image_size=24
    )
    folder = write_local_bert(
        tmp_path_factory.mktemp("bert"),
        train.captions + test.captions,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
    )
    return train, test, str(folder)


def make(folder, **kw):
    comps = presets.ela(
        text_model=folder,
        image_model="vit_tiny_patch16_224",
        img_size=24,
        embed_dim=16,
        model_kwargs=dict(depth=1, embed_dim=16, num_heads=2, patch_size=8),
        heads=2,
        cross_layers=1,
        rerank_k=2,
        **kw,
    )
    return Matcher(
        comps, epochs=1, batch_size=8, checkpoint_dir=None, verbose=False, random_state=0
    )


def assert_tied(m):
    c = m.components_
    emb = c["text"].word_embeddings
    for name in ("p2l", "w2l", "mlm_head"):
        assert c[name]._tied is emb, name
    assert c["itm"]._linked is c["cross"] and c["rerank"]._linked is c["itm"]
    # One parameter, one owner: no parameter appears in two blocks, no checkpoint key twice.
    ptrs = [p.data_ptr() for p in m.components_.parameters()]
    assert len(ptrs) == len(set(ptrs))
    assert not any(
        k.startswith(("p2l.embedding", "w2l.embedding", "mlm_head.embedding"))
        for k in m.components_.state_dict()
    )


def test_fit_tie_save_load_and_two_stage_scores(data_and_model, tmp_path):
    train, test, folder = data_and_model
    m = make(folder)
    before = m.components_ if hasattr(m, "components_") else None
    assert before is None
    m.fit(train)
    assert_tied(m)
    hist = m.history_[-1]
    for loss in ("itc_loss", "itm_loss", "mlm_loss", "ela_loss", "distill_loss"):
        assert f"loss/{loss}" in hist
    assert "loss/w2l_loss" not in hist  # Eq. 11 has no such term: an option, off by default
    i2t, t2i = m.similarity(test.images, test.captions)
    assert i2t.shape == (4, len(test.captions)) and t2i.shape == i2t.shape
    m.save(tmp_path / "ela")
    loaded = Matcher.load(tmp_path / "ela")
    assert_tied(loaded)
    i2t_l, t2i_l = loaded.similarity(test.images, test.captions)
    torch.testing.assert_close(i2t_l, i2t)
    torch.testing.assert_close(t2i_l, t2i)
    again = Matcher.from_config(m.get_config())
    again.set_params(epochs=0).fit(train)
    assert_tied(again)
    assert_tied(clone(m).set_params(epochs=0).fit(train))


def test_word_masking_with_the_text_encoder(data_and_model):
    _, _, folder = data_and_model
    m = make(folder)
    m.validate()
    m._build(0)
    masking, text = m.components_["masking"], m.components_["text"]
    assert masking.target() is text
    caps = ["a red circle and a blue square", "the green star"]
    torch.manual_seed(0)
    masking.train()
    ids, labels, clean = masking(caps * 20)
    tok = text.tokenizer
    picked = labels != -100
    assert bool(picked.any())
    assert not bool(
        torch.isin(
            clean[picked], torch.tensor([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id])
        ).any()
    )
    torch.testing.assert_close(labels[picked], clean[picked])
    masking.eval()
    ids, labels, clean = masking(caps)
    assert bool((labels == -100).all()) and torch.equal(ids.feats, clean)
    # Positions line up with the text encoder's output.
    assert text(caps).num_tokens == clean.shape[1]
    with pytest.raises(TypeError, match="tokenizer must be a block name or a text encoder"):
        WordMasking(tokenizer=torch.nn.Linear(2, 2)).validate()
    with pytest.raises(ValueError, match=r"prob must be a finite number in \[0, 1\]"):
        WordMasking(prob=2).validate()


def test_ablation_flags_and_errors(data_and_model):
    _, _, folder = data_and_model
    names = [
        n
        for n, _ in make(
            folder, lexicon=False, expansion=False, distillation=False, mlm=False
        ).components
    ]
    assert names == ["image", "text", "itc", "itc_loss", "cross", "itm", "itm_loss", "rerank"]
    names = [n for n, _ in make(folder, expansion=False, distillation=False, mlm=False).components]
    assert "masking" in names and "w2l_loss" not in names and "ela_loss" in names
    make(folder, expansion=False, distillation=False, mlm=False).validate()
    full = dict(make(folder).components)
    assert "w2l_loss" not in full and full["w2l"].layers == 2  # Eq. 4: two transformer layers
    assert full["ela_loss"].label_weights == "plan_cosine_softmax"
    opt = make(folder, w2l_loss=True, distillation=False, mlm=False)
    assert {"w2l_masked", "w2l_loss", "masking", "masked_text"} <= {n for n, _ in opt.components}
    opt.validate()
    plain = [n for n, _ in make(folder, distillation=False, mlm=False).components]
    assert "w2l_masked" not in plain and "masking" not in plain
    with pytest.raises(ValueError, match="needs the matching head"):
        presets.ela(text_model=folder, itm=False, rerank_k=4)
    with pytest.raises(ValueError, match="needs lexicon=True, expansion=True"):
        presets.ela(text_model=folder, expansion=False)


def test_contrastive_and_matching_see_whole_images_in_training(data_and_model):
    """With a lexicon loss, ITC / ITM / the transport cost read whole images (as evaluation does);
    only the patch-to-lexicon head reads the masked view. One masked view for all is the old behaviour."""
    train, _, folder = data_and_model
    m = make(folder, mask_ratio=0.5)
    m.validate()
    m._build(0)
    c = m.components_
    names = [n for n, _ in m.components]
    assert names.index("masked_image") > names.index("image")
    assert c["p2l"].requires == ("masked_image_tokens", "masked_patches")
    assert c["ela_loss"].requires[2:4] == ("image_tokens", "text_tokens")
    images = torch.stack([train[i]["images"] for i in range(4)])
    c.train()
    whole, none = c["image"](images)
    torch.manual_seed(0)
    masked_tokens, masked = c["masked_image"](images)
    assert not none.any() and masked.sum(1).tolist() == [round(0.5 * 9)] * 4
    c.eval()
    torch.testing.assert_close(whole.feats, c["image"](images)[0].feats)
    assert not torch.allclose(masked_tokens.feats, whole.feats)
    # A training step runs both views and every loss.
    m.fit(train)
    assert {"loss/itc_loss", "loss/itm_loss", "loss/ela_loss"} <= set(m.history_[-1])
    # The single-view option: the encoder masks in forward, no second pass.
    one = make(folder, mask_ratio=0.5, separate_masked_view=False)
    assert "masked_image" not in [n for n, _ in one.components]
    one.validate()
    one._build(0)
    one.components_.train()
    assert one.components_["image"](images)[1].sum(1).tolist() == [4] * 4
    # Without a lexicon loss nothing is masked and there is no second view.
    base = make(folder, lexicon=False, expansion=False, distillation=False, mlm=False)
    assert "masked_image" not in [n for n, _ in base.components]


def test_compiled_ela_keeps_word_masking_eager_and_compiles_without_falling_back(
    data_and_model, monkeypatch
):
    # WordMasking tokenises strings and draws the corruption: traced, its draws over a caption-length
    # shape failed (a fake-tensor error) and the block fell back to eager with a warning. The eager
    # backend traces with Dynamo as Inductor does, without generating code.
    import functools
    import warnings

    from imtm.components.encoders.hf_text import HFTextEncoder
    from imtm.matcher import _CompiledCall

    train, test, folder = data_and_model
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    # Whether the text encoder's host-side tokenisation is ever traced (through any block).
    traced, ids = [], HFTextEncoder._ids

    def watched_ids(self, texts):
        traced.append(torch.compiler.is_compiling())
        return ids(self, texts)

    monkeypatch.setattr(HFTextEncoder, "_ids", watched_ids)
    m = make(folder)
    m.set_params(compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.fit(train)
    failed = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert not failed, failed
    compiled = {
        n: isinstance(b._compiled_call_impl, _CompiledCall) for n, b in m.components_.items()
    }
    assert compiled["masking"] is False and not WordMasking.compiles
    # The text encoder tokenises strings: traced, it guarded on the captions and recompiled per batch.
    assert compiled["text"] is False and not type(m.components_["text"]).compiles
    assert compiled["p2l"] is True, compiled
    # Reuse runs its target, compiled or not, and is never compiled itself: compiled, the second
    # text-encoder pass (masked captions) traced the tokenizer through it.
    assert compiled["masked_text"] is False and compiled["w2l_masked"] is False
    # On the CPU the blocks measured slower compiled (transformer layers, the transport loss) stay
    # eager: compiles_on_cpu = False.
    for name in ("cross", "itm", "w2l", "ela_loss"):
        assert compiled[name] is False and not type(m.components_[name]).compiles_on_cpu, name
    assert compiled["itc"] is True and compiled["image"] is True, compiled
    assert traced and not any(traced)
