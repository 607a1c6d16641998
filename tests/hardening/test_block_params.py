"""scikit-learn's parameter contract over every registered block.

``__init__`` stores its arguments unchanged, so ``clone`` gives equal ``get_params``;
checks live in ``validate()`` (which the Matcher calls on every block before ``fit``),
so a bad value set through ``set_params`` is refused by ``validate()``. Blocks that
build parameters from their arguments also call ``validate()`` before building them.
"""

import pytest
import torch
from sklearn.base import clone
from toy import ToyImage, ToyText, toy_data

import imtm.components
import imtm.matcher
from imtm import Matcher, Tokens
from imtm.component import COMPONENT_REGISTRY, Component
from imtm.components import (
    DistanceWeightedMiner,
    InfoNCELoss,
    PatchScorer,
    TripletLoss,
)
from imtm.contract import examples, parameter_constraints, refused_values
from imtm.data import Vocabulary

D = 8

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


def example_block(name: str) -> Component:
    """The first example the block's class declares next to it (imtm.contract.examples)."""
    cls = COMPONENT_REGISTRY[name]
    return examples(cls)[0].build(cls)


def bad_value(name: str, block: Component):
    """A constrained argument of the block and a value its declared constraints refuse (None: none)."""
    params = block.get_params(deep=False)
    for param, accepted in parameter_constraints(type(block)).items():
        refused = refused_values(accepted) if param in params else []
        if refused:
            return param, refused[-1]
    return None, None


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
    """Every block declares examples next to its class; no table here lists blocks."""
    for name in imtm_blocks():
        assert examples(COMPONENT_REGISTRY[name]), name


@pytest.mark.parametrize("name", imtm_blocks())
def test_clone_keeps_params_and_validate_refuses_bad_values(name):
    block = example_block(name)
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
    param, bad = bad_value(name, block)
    if param is None:
        assert not set(params) - {"requires", "provides"}, f"{name} has arguments but no constraint"
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
    block = example_block(name)
    param, bad = bad_value(name, block)
    block = type(block)(**{**block.get_params(deep=False), param: bad})
    assert block.get_params(deep=False)[param] is bad
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
