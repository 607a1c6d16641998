"""scikit-learn's parameter contract over every registered block.

``__init__`` stores its arguments unchanged, so ``clone`` gives equal ``get_params``;
checks live in ``validate()`` (which the Matcher calls on every block before ``fit``),
so a bad value set through ``set_params`` is refused by ``validate()``. Blocks that
build parameters from their arguments also call ``validate()`` before building them.
"""

import math

import pytest
import torch
from sklearn.base import clone
from toy import ToyImage, ToyText, toy_data

import imtm.components
import imtm.matcher
from imtm import Matcher, Tokens
from imtm.component import COMPONENT_REGISTRY, Component
from imtm.components import (
    CrossModalEncoder,
    DistanceWeightedMiner,
    GRUTextEncoder,
    HFTextEncoder,
    ImageTextMatchingHead,
    InfoNCELoss,
    PatchScorer,
    TimmVisionEncoder,
    TripletLoss,
)
from imtm.components.encoders.hf_text import write_local_bert
from imtm.data import Vocabulary

D = 8
WORDS = ["a", "red", "blue", "circle", "square"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    write_local_bert(path, WORDS, hidden_size=16, num_layers=1, num_heads=2)
    return path


def vit(**kw):
    return TimmVisionEncoder("vit_tiny_patch16_224", img_size=32, **kw)


# name -> (build(bert_dir), parameter, bad value). One entry per block of imtm; the bad value
# is one validate() must refuse (None: the block has no checkable parameter).
CASES = {
    "CrossModalEncoder": (lambda b: CrossModalEncoder(D, layers=1, heads=2), "dropout", 1.5),
    "DimensionAlignmentLoss": (
        lambda b: imtm.components.DimensionAlignmentLoss(),
        "temperature",
        0.0,
    ),
    "DistanceWeightedMiner": (lambda b: DistanceWeightedMiner(dim=D), "cutoff", 3.0),
    "ExpansiveLexiconLoss": (lambda b: imtm.components.ExpansiveLexiconLoss(), "beta", -1.0),
    "GRUTextEncoder": (
        lambda b: GRUTextEncoder(Vocabulary.build(["a red circle"]), D, word_dim=4),
        "dropout",
        1.0,
    ),
    "GlobalCosine": (lambda b: imtm.components.GlobalCosine(), None, None),
    "GumbelSelector": (lambda b: imtm.components.GumbelSelector(), "ratio", 1.5),
    "HFTextEncoder": (lambda b: HFTextEncoder(str(b)), "max_length", 1),
    "HardAssignmentCoding": (lambda b: imtm.components.HardAssignmentCoding(), "temperature", -1.0),
    "ImageTextMatchingHead": (lambda b: ImageTextMatchingHead(D), "temperature", 0.0),
    "ImageTextMatchingLoss": (
        lambda b: imtm.components.ImageTextMatchingLoss(),
        "weight",
        math.nan,
    ),
    "InfoNCELoss": (lambda b: InfoNCELoss(learnable=True), "temperature", 5.0),
    "InterModalPhraseAttention": (
        lambda b: imtm.components.InterModalPhraseAttention(dim=D, heads=2),
        "k",
        0,
    ),
    "LSEPooling": (lambda b: imtm.components.LSEPooling(), "temperature", 0.0),
    "LocalMatching": (lambda b: imtm.components.LocalMatching(), "weighting", "linearr"),
    "LexiconDistillationLoss": (
        lambda b: imtm.components.LexiconDistillationLoss(),
        "weight",
        -1.0,
    ),
    "MaskedImageView": (lambda b: imtm.components.MaskedImageView(), "encoder", 3),
    "MaskedLanguageModelingLoss": (
        lambda b: imtm.components.MaskedLanguageModelingLoss(),
        "weight",
        -1.0,
    ),
    "MatchingReranker": (lambda b: imtm.components.MatchingReranker(), "k", 0),
    "MaxPooling": (lambda b: imtm.components.MaxPooling(), "dim", 1.5),
    "MeanEmbedding": (lambda b: imtm.components.MeanEmbedding(), "side", "both"),
    "MeanPooling": (lambda b: imtm.components.MeanPooling(), "dim", "last"),
    "PatchScorer": (lambda b: imtm.components.PatchScorer(D), "beta", 1.5),
    "PatchSlimming": (
        lambda b: imtm.components.PatchSlimming(
            imtm.components.PatchScorer(D),
            imtm.components.GumbelSelector(),
            imtm.components.TokenAggregation(D, 2),
            imtm.components.SparsePatchWordAlignment(),
        ),
        "max_block_elements",
        0,
    ),
    "PatchToLexiconHead": (lambda b: imtm.components.PatchToLexiconHead(D, 4, 10), "vocab_size", 0),
    "PrecomputedEncoder": (lambda b: imtm.components.PrecomputedEncoder(6, D), "dropout", -0.5),
    "RatioLoss": (lambda b: imtm.components.RatioLoss(), "rho", 0.0),
    "RedundantFusion": (lambda b: imtm.components.RedundantFusion(), None, None),
    "Reuse": (
        lambda b: imtm.components.Reuse("text", requires=("a",), provides=("b",)),
        "block",
        3,
    ),
    "ScoreFusion": (lambda b: imtm.components.ScoreFusion(), "weights", {"scores": {"nope": 1.0}}),
    "SelfAttentionContext": (
        lambda b: imtm.components.SelfAttentionContext(D, heads=2),
        "heads",
        3,
    ),
    "SoftAssignmentCoding": (lambda b: imtm.components.SoftAssignmentCoding(), "tau", -1.0),
    "SoftmaxPooling": (lambda b: imtm.components.SoftmaxPooling(), "temperature", math.inf),
    "SparseCorrelation": (lambda b: imtm.components.SparseCorrelation(), "temperature", 0.0),
    "SparsePatchWordAlignment": (
        lambda b: imtm.components.SparsePatchWordAlignment(),
        "max_block_elements",
        0,
    ),
    "SpatialConstraintLoss": (lambda b: imtm.components.SpatialConstraintLoss(), "weight", -1.0),
    "SumPooling": (lambda b: imtm.components.SumPooling(), "dim", None),
    "TextualPhraseEncoder": (lambda b: imtm.components.TextualPhraseEncoder(D), "windows", ()),
    "TimmVisionEncoder": (lambda b: vit(), "mask_ratio", 1.0),
    "TokenAggregation": (lambda b: imtm.components.TokenAggregation(D, 2), "hidden_ratio", 0.0),
    "DPCKNNAggregation": (lambda b: imtm.components.DPCKNNAggregation(2), "k", 0),
    "ScanAttention": (lambda b: imtm.components.ScanAttention(), "smooth", 0.0),
    "WordSelection": (lambda b: imtm.components.WordSelection(D), "ratio", 1.5),
    "WordAggregation": (lambda b: imtm.components.WordAggregation(D, 2), "hidden_ratio", 0.0),
    "TopKAggregation": (lambda b: imtm.components.TopKAggregation(), "k", 0),
    "TripletLoss": (lambda b: TripletLoss(miner=DistanceWeightedMiner(dim=D)), "margin", -0.1),
    "VisualPhraseEncoder": (
        lambda b: imtm.components.VisualPhraseEncoder(D, heads=2),
        "ffn_dim",
        0,
    ),
    "WordMasking": (lambda b: imtm.components.WordMasking(), "prob", 1.5),
    "WordToLexiconHead": (
        lambda b: imtm.components.WordToLexiconHead(D, 4, 10, heads=2),
        "dropout",
        1.0,
    ),
}


#: Base classes, not blocks (registered or not depending on the base's ``abstract`` flag).
BASES = ("Component", "Loss", "LinkedComponent", "TiedEmbedding")


def imtm_blocks():
    """The concrete blocks imtm registers (bases and abstract helpers left out)."""
    return sorted(
        name
        for name, cls in COMPONENT_REGISTRY.items()
        if cls.__module__.startswith("imtm.")
        and "." not in name
        and name not in BASES
        and not name.startswith("_")
    )


def same(a, b) -> bool:
    """Equal parameter values; a block or module compares by type and its own parameters."""
    if isinstance(a, Component) and isinstance(b, Component):
        return type(a) is type(b) and params_equal(
            a.get_params(deep=False), b.get_params(deep=False)
        )
    if isinstance(a, torch.nn.Module) or isinstance(b, torch.nn.Module):
        return type(a) is type(b)
    if isinstance(a, Vocabulary) and isinstance(b, Vocabulary):
        return list(a.itos) == list(b.itos) if hasattr(a, "itos") else len(a) == len(b)
    return type(a) is type(b) and a == b


def params_equal(p, q) -> bool:
    return p.keys() == q.keys() and all(same(p[k], q[k]) for k in p)


def test_every_block_has_a_case():
    assert sorted(CASES) == imtm_blocks()


@pytest.mark.parametrize("name", sorted(CASES))
def test_clone_keeps_params_and_validate_refuses_bad_values(name, bert_dir):
    build, param, bad = CASES[name]
    block = build(bert_dir)
    assert type(block).__name__ == name
    params = block.get_params(deep=False)
    copy = clone(block)
    assert copy is not block and params_equal(copy.get_params(deep=False), params)
    # Nested blocks are copied too, not shared.
    assert all(
        copy.get_params(deep=False)[k] is not v
        for k, v in params.items()
        if isinstance(v, Component)
    )
    assert copy.validate() is copy
    if param is None:
        return
    copy.set_params(**{param: bad})
    with pytest.raises((ValueError, TypeError), match=name):
        copy.validate()
    # The original is untouched by the clone's new value.
    assert params_equal(block.get_params(deep=False), params)


@pytest.mark.parametrize(
    "name",
    [
        "TripletLoss",
        "InfoNCELoss",
        "WordMasking",
        "MatchingReranker",
        "Reuse",
        "MaskedImageView",
        "LexiconDistillationLoss",
        "ExpansiveLexiconLoss",
        "DistanceWeightedMiner",
        "RatioLoss",
        "LSEPooling",
    ],
)
def test_init_of_blocks_without_parameters_only_stores(name):
    # Blocks that build nothing from their arguments accept any value at construction; validate() refuses it.
    build, param, bad = CASES[name]
    if name == "InfoNCELoss":
        block = InfoNCELoss(temperature=-1.0)
    else:
        block = type(build(None))(**{**build(None).get_params(deep=False), param: bad})
    assert (
        block.get_params(deep=False)[param if name != "InfoNCELoss" else "temperature"] is not None
    )
    with pytest.raises((ValueError, TypeError), match=name):
        block.validate()


def test_nested_miner_is_checked_with_the_loss():
    loss = TripletLoss(miner=DistanceWeightedMiner(dim=D)).set_params(
        miner__nonzero_loss_cutoff=0.1
    )
    with pytest.raises(ValueError, match="DistanceWeightedMiner: nonzero_loss_cutoff"):
        loss.validate()


@pytest.mark.parametrize(
    "loss, match",
    [
        (TripletLoss(margin=-1.0), "TripletLoss: margin must be a finite number >= 0"),
        (TripletLoss(reduction="summ"), "Did you mean 'sum'"),
        (InfoNCELoss(temperature=0.0), "InfoNCELoss: temperature must be a finite number > 0"),
        (InfoNCELoss(weight=-2.0), "InfoNCELoss: weight must be a finite number >= 0"),
    ],
)
def test_bad_loss_values_raise_before_training_with_the_block_name(loss, match):
    data = toy_data(n_images=6)
    m = Matcher(
        [
            ToyImage(),
            ToyText(vocab=data.vocab),
            imtm.components.MeanEmbedding(side="image"),
            imtm.components.MeanEmbedding(side="text"),
            imtm.components.GlobalCosine(),
            ("loss", loss),
        ],
        epochs=1,
        batch_size=4,
    )
    with pytest.raises(ValueError, match=rf"Matcher: block 'loss': .*{match}"):
        m.validate()
    with pytest.raises(ValueError, match=rf"Matcher: block 'loss': .*{match}"):
        m.fit(data)
    assert not hasattr(m, "components_") and not hasattr(m, "history_")
    # Used alone, in a user's own loop, the first forward refuses it.
    scores, positives = torch.eye(3), torch.eye(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        loss(scores, positives)


@pytest.mark.parametrize(
    "param, bad, error", [("beta", 5.0, ValueError), ("language_context", "yes", TypeError)]
)
def test_patch_scorer_used_alone_refuses_bad_values_on_forward(param, bad, error):
    scorer = PatchScorer(D).set_params(**{param: bad})
    with pytest.raises(error, match=f"PatchScorer: {param} must be"):
        scorer(Tokens(torch.randn(2, 5, D)), Tokens(torch.randn(3, 4, D)))


def test_an_option_that_sets_default_names_moves_them_in_set_params():
    from imtm.components import DimensionAlignmentLoss, MeanEmbedding

    block = MeanEmbedding().set_params(side="text")
    assert (block.requires, block.provides) == (("text_tokens",), ("text_embedding",))
    assert clone(block).requires == ("text_tokens",)
    renamed = MeanEmbedding(requires=("region_tokens",)).set_params(side="text")
    assert (renamed.requires, renamed.provides) == (("region_tokens",), ("text_embedding",))
    both = MeanEmbedding().set_params(side="text", provides=("caption_vector",))
    assert (both.requires, both.provides) == (("text_tokens",), ("caption_vector",))
    loss = DimensionAlignmentLoss().set_params(pairs="words")
    assert loss.requires == ("image_tokens", "text_tokens")
    assert loss.set_params(pairs="embeddings").requires == ("image_embedding", "text_embedding")


def test_set_params_of_a_linked_blocks_target_drops_the_old_link():
    from imtm.components import MeanEmbedding, Reuse

    first, second = MeanEmbedding(), MeanEmbedding(side="text")
    block = Reuse("first")
    block.link({"first": first, "second": second})
    assert block.target() is first
    block.set_params(block="second")
    with pytest.raises(RuntimeError, match="block='second' is not linked yet"):
        block.target()
    block.link({"first": first, "second": second})
    assert block.target() is second
    assert block.set_params(block=first).target() is first
