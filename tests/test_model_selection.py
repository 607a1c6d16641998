"""scikit-learn model selection over a Matcher, and scikit-learn's estimator checks on the Matcher and every block.

Which of scikit-learn's checks apply: ``sklearn.utils.estimator_checks`` (1.6+) has API checks that
read parameters, tags and reprs (run below on the Matcher and on every registered block) and
checks that fit on random 2-D numeric arrays ``X`` (with a ``y``). The latter cannot apply: a
Matcher fits image-caption datasets and a block has no ``fit``; both are tagged
``input_tags.two_d_array=False``, for which ``check_estimator`` itself skips every check
("Can't test estimator ..."). What those checks verify is tested here by hand on imtm data where it
has a meaning (fit returns self, leaves the parameters alone, adds only trailing-underscore
attributes, is repeatable, refuses scoring before fit).

One API check is not met by blocks that own parameters: ``check_do_not_raise_errors_in_init_or_set_params``
builds every block with each parameter set to ``-1``, ``3.0``, ``"helloworld"``, ``[]``... and expects no
error. A block with weights (``nn.Linear(dim, ...)``) must build them in ``__init__`` for PyTorch's
contract (``parameters()`` for the optimizer, ``state_dict``, ``.to(device)``), and no tensor has
``-1`` rows; these blocks raise a ValueError/TypeError naming the argument, which the test asserts.
Blocks without weights, and the Matcher, pass it.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, KFold, RandomizedSearchCV, cross_validate
from sklearn.utils import estimator_checks as ec

import imtm.components  # noqa: F401  (registers every block)
from imtm import Matcher
from imtm.component import COMPONENT_REGISTRY
from imtm.components import GlobalCosine, GRUTextEncoder, PrecomputedEncoder, TripletLoss
from imtm.contract import examples
from imtm.data import ByImage, ImageCaptionDataset, Vocabulary, synthetic

#: The API checks of scikit-learn that read no numeric data: run on every block and on the Matcher.
API_CHECKS = (
    "check_estimator_cloneable",
    "check_estimator_tags_renamed",
    "check_valid_tag_types",
    "check_estimator_repr",
    "check_no_attributes_set_in_init",
    "check_mixin_order",
    "check_parameters_default_constructible",
    "check_get_params_invariance",
    "check_set_params",
    "check_estimators_unfitted",
    "check_do_not_raise_errors_in_init_or_set_params",
)

VOCAB = Vocabulary.build(["a red circle", "a blue square"])


def _imtm_blocks():
    """Every block class imtm registers (user classes defined in other tests are left out)."""
    return sorted(
        n
        for n, c in COMPONENT_REGISTRY.items()
        if c.__module__.startswith("imtm.") and "." not in n
    )


def _block(name):
    """The block with its defaults; a block with required arguments as the first example its class
    declares next to it (``_examples``, imtm.contract), at tiny sizes."""
    cls = COMPONENT_REGISTRY[name]
    required = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self"
        and p.default is p.empty
        and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return examples(cls)[0].build(cls) if required else cls()


def _run(check, name, obj):
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # check_set_params warns (as it should) when a value is refused
        getattr(ec, check)(name, obj)


def _builds_weights(block) -> bool:
    """Whether the block builds parameters of its own in __init__ (not only holds blocks it was given)."""
    given = {
        id(p)
        for v in block.get_params(deep=False).values()
        if isinstance(v, torch.nn.Module)
        for p in v.parameters()
    }
    return any(id(p) not in given for p in block.parameters())


@pytest.mark.parametrize("name", _imtm_blocks())
def test_estimator_checks_on_every_block(name):
    block = _block(name)
    for check in API_CHECKS:
        if check == "check_do_not_raise_errors_in_init_or_set_params":
            try:
                _run(check, name, block)
            except (ValueError, TypeError) as err:
                # Only a block that builds weights from its arguments in __init__ may refuse nonsense
                # there (see the module docstring), and it says which block and argument.
                assert _builds_weights(block), (
                    f"{name} has no weights to build but refuses in __init__: {err}"
                )
                assert name in str(err)
            continue
        _run(check, name, block)


def test_estimator_checks_on_the_matcher():
    m = Matcher(
        [
            PrecomputedEncoder(in_dim=4, out_dim=8),
            GRUTextEncoder(vocab=VOCAB, out_dim=8),
            GlobalCosine(),
            TripletLoss(),
        ],
        epochs=1,
    )
    for check in API_CHECKS:
        _run(check, "Matcher", m)
    # scikit-learn's own entry point skips what needs 2-D arrays, saying why
    with pytest.warns(Warning, match="Can't test estimator Matcher"):
        ec.check_estimator(m)


def test_reprs_show_every_non_default_parameter():
    assert repr(TripletLoss()) == "TripletLoss()"
    assert (
        repr(TripletLoss(margin=0.5, hardest=False)) == "TripletLoss(hardest=False, margin=0.5)"
    )  # sorted, as scikit-learn
    assert repr(TripletLoss(requires=("scores_i2t", "scores_t2i", "positives"))) == (
        "TripletLoss(requires=('scores_i2t', 'scores_t2i', 'positives'))"
    )
    m = Matcher([("loss", TripletLoss(margin=0.5))], epochs=3, lr=1e-3)
    assert repr(m) == "Matcher(components=[('loss', TripletLoss(margin=0.5))], epochs=3, lr=0.001)"
    # the layers stay available as PyTorch prints them
    assert "(mlp): Sequential" in PrecomputedEncoder(in_dim=4, out_dim=8).module_repr()


def test_set_params_defers_validation_to_fit():
    m = Matcher(
        [
            PrecomputedEncoder(in_dim=4, out_dim=8),
            GRUTextEncoder(vocab=VOCAB, out_dim=8),
            GlobalCosine(),
            ("loss", TripletLoss()),
        ]
    )
    m.set_params(epochs=-3, precision="fp64", loss__margin=-1.0)  # stored, as scikit-learn does
    assert m.epochs == -3 and m.get_params()["loss__margin"] == -1.0
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        m.validate()
    m.set_params(loss__margin=0.2)
    with pytest.raises(ValueError, match="epochs must be an integer >= 0, got -3"):
        m.validate()
    m.set_params(epochs=1)
    with pytest.raises(ValueError, match="precision must be one of"):
        m.validate()
    m.set_params(components="not blocks")  # even components: fit says what is wrong
    assert m.get_params()["components"] == "not blocks"
    with pytest.raises(TypeError, match="components must be a list of blocks"):
        m.validate()
    # names are still checked at once, with a suggestion
    with pytest.raises(ValueError, match="invalid parameter 'epoch'.*Did you mean 'epochs'"):
        Matcher([GlobalCosine()]).set_params(epoch=2)


# ---------------------------------------------------------------------- ByImage


def _loop_subset(c2i, index):
    """Captions (by original position) and their new image ids for images ``index``, by a plain loop."""
    captions, ids = [], []
    for j, i in enumerate(index):
        for k, owner in enumerate(c2i):
            if owner == i:
                captions.append(k)
                ids.append(j)
    return captions, ids


@pytest.mark.parametrize("seed", range(5))
def test_by_image_indexing_matches_a_loop(seed):
    g = np.random.default_rng(seed)
    n_images = int(g.integers(1, 8))
    c2i = g.integers(0, n_images, size=int(g.integers(n_images, 20))).tolist()
    c2i[:n_images] = list(range(n_images))  # every image has a caption
    names = [f"caption {k}" for k in range(len(c2i))]
    ds = ImageCaptionDataset(torch.arange(n_images, dtype=torch.float32)[:, None], names, c2i)
    index = g.integers(
        0, n_images, size=int(g.integers(1, 2 * n_images + 1))
    ).tolist()  # repeats allowed
    sub = ByImage(ds)[np.array(index)]
    want_caps, want_ids = _loop_subset(c2i, index)
    assert sub.captions == [names[k] for k in want_caps]
    assert sub.caption_to_image.tolist() == want_ids
    torch.testing.assert_close(sub.images, torch.tensor(index, dtype=torch.float32)[:, None])
    assert len(sub) == len(index) == sub.shape[0]


def test_by_image_masks_slices_views_and_errors():
    train, _, _ = synthetic.load(view="regions", seed=0, n_train=6, n_dev=2, n_test=2)
    X = ByImage(train)
    mask = np.array([True, False, True, False, False, True])
    sub = X[mask]
    assert len(sub) == 3 and sub.vocab is train.vocab
    torch.testing.assert_close(sub.images[1], train.images[2])  # a view of region lists, not a copy
    assert X[1:3].captions == [
        c for c, i in zip(train.captions, train.caption_to_image.tolist()) if i in (1, 2)
    ]
    assert len(X[(np.array([0, 5]), Ellipsis)]) == 2  # scikit-learn's X[indices, ...]
    with pytest.raises(IndexError, match="out of range"):
        X[[6]]
    with pytest.raises(IndexError, match="one entry per image"):
        X[np.array([True, False])]
    with pytest.raises(IndexError, match="integers, a boolean mask or a slice"):
        X[np.array([0.5])]
    with pytest.raises(IndexError, match="empty selection"):
        X[[]]
    with pytest.raises(TypeError, match="has no 'images'"):
        ByImage([1, 2, 3])


# ---------------------------------------------------------------------- model selection


def _matcher(train):
    return Matcher(
        [
            ("image", PrecomputedEncoder(in_dim=train.region_dim, out_dim=8)),
            ("text", GRUTextEncoder(vocab=train.vocab, out_dim=8)),
            GlobalCosine(),
            ("loss", TripletLoss(hardest=False)),
        ],
        epochs=1,
        batch_size=32,
        verbose=False,
        random_state=0,
    )


@pytest.fixture(scope="module")
def train():
    return synthetic.load(view="regions", seed=0, n_train=12, n_dev=2, n_test=2, region_dim=16)[0]


def test_folds_never_split_an_image(train):
    X = ByImage(train)
    for fit_idx, held_idx in KFold(3, shuffle=True, random_state=0).split(X):
        a, b = X[fit_idx], X[held_idx]
        assert not set(fit_idx) & set(held_idx)
        assert len(a.captions) + len(b.captions) == len(train.captions)
        c2i = train.caption_to_image.tolist()
        for part, idx in ((a, fit_idx), (b, held_idx)):
            # every caption of every image of the part, and nothing else
            assert sorted(part.captions) == sorted(
                c for c, i in zip(train.captions, c2i) if i in set(idx)
            )
            for j, i in enumerate(idx):
                torch.testing.assert_close(part.images[j], train.images[i])


def test_grid_search_over_two_matcher_parameters(train):
    X = ByImage(train)
    search = GridSearchCV(
        _matcher(train), {"lr": [1e-3, 5e-3], "loss__margin": [0.1, 0.3]}, cv=KFold(2)
    )
    search.fit(X)
    res = search.cv_results_
    assert len(res["params"]) == 4
    assert {tuple(sorted(p.items())) for p in res["params"]} == {
        (("loss__margin", m), ("lr", lr)) for m in (0.1, 0.3) for lr in (1e-3, 5e-3)
    }
    scores = np.stack([res["split0_test_score"], res["split1_test_score"]])
    assert np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 600).all()
    np.testing.assert_allclose(res["mean_test_score"], scores.mean(0))
    best = search.best_estimator_
    assert best.get_params()["loss__margin"] == search.best_params_["loss__margin"]
    assert best.lr == search.best_params_["lr"]
    # score is rSum: the sum of the six recalls evaluate() gives
    metrics = best.evaluate(X[:6])
    assert best.score(X[:6]) == pytest.approx(
        sum(metrics[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"))
    )
    assert not hasattr(search.estimator, "components_")  # the search fits clones


def test_randomized_search_and_cross_validate(train):
    X = ByImage(train)
    out = cross_validate(_matcher(train), X, cv=KFold(2), return_train_score=True)
    assert out["test_score"].shape == (2,) and np.isfinite(out["train_score"]).all()
    rs = RandomizedSearchCV(
        _matcher(train),
        {"lr": [1e-3, 3e-3, 1e-2], "loss__margin": [0.05, 0.2]},
        n_iter=2,
        cv=KFold(2),
        random_state=0,
        refit=False,
    ).fit(X)
    assert len(rs.cv_results_["params"]) == 2


def test_fit_behaves_as_scikit_learn_expects(train):
    """What scikit-learn's fitting checks verify on 2-D arrays, on image-caption data."""
    X = ByImage(train)
    m = _matcher(train)
    with pytest.raises(NotFittedError, match="call fit"):
        m.score(X)
    before = {k: v for k, v in m.get_params(deep=False).items()}
    public_before = {k for k in vars(m) if not k.startswith("_")}
    assert m.fit(X) is m  # check_estimators_fit_returns_self
    after = m.get_params(deep=False)
    assert all(after[k] is before[k] for k in before)  # check_estimators_overwrite_params
    added = {k for k in vars(m) if not k.startswith("_")} - public_before
    assert added and all(k.endswith("_") for k in added), added  # check_dont_overwrite_parameters
    s1 = m.similarity(train.images, train.captions)
    s2 = (
        clone(m).fit(X).similarity(train.images, train.captions)
    )  # check_fit_idempotent (same seed)
    torch.testing.assert_close(s1, s2)
