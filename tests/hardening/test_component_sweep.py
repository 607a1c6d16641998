"""Property sweep over every registered block: random shapes, masks, dtypes and devices.

Each block of :data:`imtm.component.COMPONENT_REGISTRY` is swept through the examples its
class declares (``_examples``, read by :func:`imtm.contract.examples`): small constructor
arguments and what its inputs need (``imtm.testing.component_inputs`` with the example's
``paired``, ``inputs`` and ``vocab_size``), the errors its docstring documents for
valid-looking input, and whether it promises padding invariance. No table here names a block.
For every drawn example (batch sizes, widths, ``padding`` among random,
all-but-one and none, a [CLS] prefix token or none, feature scales from 1e-4 to
1e4, float32 / float64 / bfloat16, every available device, training or eval
mode) the call either passes ``imtm.testing.check_outputs`` (one output per
``provides`` name, documented shapes, finite values), returns its inputs' dtype,
and in training back-propagates finite gradients, or raises exactly the
documented error. A registered block without examples fails
``test_every_registered_block_has_a_case``.

More examples: ``HYPOTHESIS_PROFILE=thorough python -m pytest tests/hardening``.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from imtm import Tokens
from imtm.component import COMPONENT_REGISTRY, Component
from imtm.components import (
    ExpansiveLexiconLoss,
    GumbelSelector,
    PatchScorer,
    PatchSlimming,
    PatchToLexiconHead,
    RedundantFusion,
    SparsePatchWordAlignment,
    TokenAggregation,
)
from imtm.contract import EXAMPLE_DIM, EXAMPLE_VOCAB_SIZE, Example, examples
from imtm.testing import (
    PADDINGS,
    check_component,
    check_outputs,
    component_inputs,
    devices,
    dtypes,
)
from imtm.testing.conformance import _leaves, _map_tensors

D, V = EXAMPLE_DIM, EXAMPLE_VOCAB_SIZE  # feature size and vocabulary of the drawn values
# A tenth of the profile's examples per block: 10 by default, 100 with HYPOTHESIS_PROFILE=thorough.
EXAMPLES = max(1, settings.default.max_examples // 10)
SWEEP = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCALES = st.sampled_from([1e-4, 1.0, 1e4])  # feature scales, numerical extremes included


def is_sweepable(name: str, cls: type) -> bool:
    """The blocks the sweep must cover: concrete blocks of the imtm package.

    Left out, by rule: private bases (a leading underscore, e.g. ``_Pooling``); abstract
    bases that define no ``forward`` of their own (``Loss``, ``LinkedComponent``,
    ``TiedEmbedding``); classes defined outside the ``imtm`` package (a user's or a test's
    blocks, and doctest examples, which are not attributes of their module).
    """
    if cls.__name__.startswith("_") or cls.forward is nn.Module.forward:
        return False
    module = sys.modules.get(cls.__module__)
    return (
        cls.__module__.startswith("imtm.")
        and getattr(module, cls.__name__, None) is cls
        and name == cls.__name__
    )


#: Every block of imtm, by name; what to sweep comes from each class's examples (imtm.contract).
BLOCKS = sorted(name for name, cls in COMPONENT_REGISTRY.items() if is_sweepable(name, cls))

_CACHE: dict[tuple[str, int], Component] = {}


@pytest.fixture(scope="module", autouse=True)
def drop_built_blocks():
    """The example blocks are built once per module (seeded) and copied per drawn example."""
    yield
    _CACHE.clear()


def examples_of(name: str, *, padding: bool = False) -> list[tuple[int, Example]]:
    """The block's declared examples with their index (only those promising padding invariance)."""
    found = list(enumerate(examples(COMPONENT_REGISTRY[name])))
    return [(i, e) for i, e in found if e.padding or not padding]


def built(name: str, index: int) -> Component:
    """A fresh copy of example ``index`` of block ``name`` (built once, with seed 0)."""
    key = (name, index)
    if key not in _CACHE:
        torch.manual_seed(0)
        cls = COMPONENT_REGISTRY[name]
        _CACHE[key] = examples(cls)[index].build(cls)
    return copy.deepcopy(_CACHE[key])


def draw_example(data, name: str, *, padding: bool = False) -> tuple[Component, Example]:
    index, example = data.draw(st.sampled_from(examples_of(name, padding=padding)), label="example")
    return built(name, index), example


def test_every_registered_block_has_a_case():
    """Every block declares examples next to its class (``_examples``), and they build."""
    missing = []
    for name in BLOCKS:
        try:
            examples(COMPONENT_REGISTRY[name])
        except TypeError as err:
            missing.append(f"{name}: {err}")
    assert not missing, "\n".join(missing)
    assert len(BLOCKS) >= 49, BLOCKS


def move(block: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Block and the blocks it borrows (linked partners, tied embeddings) to ``device`` and ``dtype``."""
    block.to(device=device, dtype=dtype)
    for attr in getattr(block, "_borrowed", ()):
        linked = block.__dict__.get(attr)
        if isinstance(linked, nn.Module):
            move(linked, device, dtype)


def call(block: Component, values: dict):
    return block(*[values[n] for n in block.requires])


@pytest.mark.parametrize("name", BLOCKS)
@SWEEP
@given(data=st.data())
def test_block_returns_the_documented_outputs_or_the_documented_error(name, data):
    padding = data.draw(st.sampled_from(PADDINGS), label="padding")
    dtype = data.draw(dtypes(), label="dtype")
    device = data.draw(devices(), label="device")
    training = data.draw(st.booleans(), label="training")
    block, case = draw_example(data, name)
    block.train(training)
    move(block, device, dtype)
    values = data.draw(
        component_inputs(
            block,
            batch=st.integers(1, 3),
            max_tokens=4,
            dim=D,
            dtype=dtype,
            padding=padding,
            device=device,
            vocab_size=case.vocab_size or V,
            paired=case.paired,
            scale=SCALES,
            num_prefix_tokens=st.integers(0, 1),
            extra=case.inputs,
        ),
        label="values",
    )
    expected = case.expected_error(values)
    if expected is not None:
        kind, match = expected
        with pytest.raises(kind, match=match):
            call(block, values)
        return
    # Training with float32 / float64: the outputs must also back-propagate finite gradients.
    backward = training and dtype != torch.bfloat16
    if backward:
        values = {
            k: _map_tensors(v, lambda t: t.detach().clone().requires_grad_(True))
            for k, v in values.items()
        }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = call(block, values)
    check_outputs(block, values, out)
    want = case.out_dtype(dtype) if case.out_dtype else dtype
    for provided, value in zip(block.provides, out if len(block.provides) > 1 else (out,)):
        for path, t in _leaves(value, provided):
            assert not t.is_floating_point() or t.dtype == want, (
                f"{path} is {t.dtype} for {dtype} inputs"
            )
    if backward:
        check_gradients(block, values, out)


def check_gradients(block: Component, values: dict, out) -> None:
    """A random projection of the outputs back-propagates finite gradients to parameters and inputs."""
    outputs = out if len(block.provides) > 1 else (out,)
    generator = torch.Generator().manual_seed(0)
    total = None
    for name, value in zip(block.provides, outputs):
        for _, t in _leaves(value, name):
            if t.is_floating_point() and t.requires_grad:
                w = torch.randn(t.shape, generator=generator, dtype=torch.float64).to(
                    t.device, t.dtype
                )
                total = (t * w).sum() if total is None else total + (t * w).sum()
    if total is None:
        return
    total.backward()
    grads = [(f"parameter {n!r}", p.grad) for n, p in block.named_parameters()]
    for name, value in values.items():
        grads += [
            (f"input {path}", t.grad)
            for path, t in _leaves(value, name, full=True)
            if t.requires_grad
        ]
    bad = [what for what, g in grads if g is not None and not bool(torch.isfinite(g).all())]
    assert not bad, f"{type(block).__name__}: NaN or inf gradient of {bad}"


PADDING_ONLY = (
    "finite",
    "inputs_unchanged",
    "deterministic",
    "gradients",
    "dtypes",
    "state_dict",
    "clone",
    "functional",
)


@pytest.mark.parametrize("name", [n for n in BLOCKS if examples_of(n, padding=True)])
@settings(
    max_examples=max(1, EXAMPLES // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(data=st.data())
def test_padding_never_changes_the_output(name, data):
    """Appending padded positions full of large garbage to any Tokens input leaves every output as it was."""
    block, case = draw_example(data, name, padding=True)
    move(block, torch.device("cpu"), torch.float64)
    padding = data.draw(st.sampled_from(PADDINGS), label="padding")
    values = data.draw(
        component_inputs(
            block,
            batch=st.integers(1, 3),
            max_tokens=4,
            dim=D,
            dtype=torch.float64,
            padding=padding,
            vocab_size=case.vocab_size or V,
            paired=case.paired,
            num_prefix_tokens=st.integers(0, 1),
            extra=case.inputs,
        ),
        label="values",
    )
    assume(case.expected_error(values) is None)
    report = check_component(block, values, skip=PADDING_ONLY, rtol=1e-7, atol=1e-9)
    assert "padding" in report.passed, report


def float_tokens(values: dict) -> list[str]:
    return sorted(
        k for k, v in values.items() if isinstance(v, Tokens) and v.feats.is_floating_point()
    )


#: Vocabulary names drawn as Tokens of features.
FEATURE_TOKENS = {
    "images",
    "image_tokens",
    "text_tokens",
    "visual_phrases",
    "masked_image_tokens",
    "masked_text_tokens",
    "cross_text_tokens",
}


def reads_feature_tokens(name: str) -> bool:
    """The block's class reads Tokens of features that component_inputs draws (not an extra strategy)."""
    drawn = set(COMPONENT_REGISTRY[name].requires) - set(
        examples(COMPONENT_REGISTRY[name])[0].inputs
    )
    return bool(drawn & FEATURE_TOKENS)


@pytest.mark.parametrize("name", [n for n in BLOCKS if reads_feature_tokens(n)])
@settings(
    max_examples=max(1, EXAMPLES // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(data=st.data())
def test_a_nan_in_a_real_token_is_refused_or_shows(name, data):
    """NaN in one real token of a Tokens input: a ValueError naming NaN, or a NaN in the outputs; never a
    finite result that silently dropped it."""
    block, case = draw_example(data, name)
    block.eval()
    move(block, torch.device("cpu"), torch.float64)
    values = data.draw(
        component_inputs(
            block,
            batch=st.integers(2, 3),
            max_tokens=4,
            dim=D,
            dtype=torch.float64,
            vocab_size=case.vocab_size or V,
            paired=case.paired,
            extra=case.inputs,
        ),
        label="values",
    )
    keys = float_tokens(values)
    assume(keys and case.expected_error(values) is None)
    key = data.draw(st.sampled_from(keys), label="input")
    tokens = values[key]
    real = tokens.mask.nonzero().tolist()
    row, position = real[data.draw(st.integers(0, len(real) - 1), label="token")]
    feats = tokens.feats.clone()
    feats[row, position] = float("nan")
    values[key] = tokens.with_feats(feats)
    try:
        out = call(block, values)
    except ValueError as err:
        assert "NaN" in str(err), err
        return
    outputs = out if len(block.provides) > 1 else (out,)
    finite = all(
        bool(torch.isfinite(t).all())
        for provided, value in zip(block.provides, outputs)
        for _, t in _leaves(value, provided)
        if t.is_floating_point()
    )
    assert not finite or case.nan_unused, (
        f"{name}: a NaN in {key}[{row}, {position}] vanished from every output"
    )


# ---------------------------------------------------------------------- the sweep catches broken blocks
class NaNOnOneToken(Component):
    """Broken on purpose: the mean over real tokens divides by (length - 1)."""

    requires = ("image_tokens",)
    provides = ("image_embedding",)

    def __init__(self, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)

    def forward(self, tokens):
        w = tokens.mask.unsqueeze(-1).to(tokens.feats.dtype)
        return (tokens.feats * w).sum(1) / (w.sum(1) - 1)


def test_a_block_that_fails_on_one_real_token_is_caught():
    block = NaNOnOneToken()

    @settings(max_examples=20, deadline=None, database=None)
    @given(values=component_inputs(block, padding="all_but_one"))
    def sweep(values):
        check_outputs(block, values, call(block, values))

    with pytest.raises(
        AssertionError, match=r"check_outputs\(NaNOnOneToken\): finite check failed"
    ):
        sweep()


# ---------------------------------------------------------------------- regressions found by the sweep
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_pair_that_keeps_or_drops_every_patch_has_finite_gradients(dtype):
    """LAPS: a pair whose decisions keep nothing (TokenAggregation) or drop nothing (RedundantFusion).

    The masked softmax divided by a tiny clamp there: 1 / tiny (~1e38) gradients into the
    decisions, and 0 / tiny**2 = NaN into the aggregation MLP.
    """
    torch.manual_seed(0)
    feats = torch.randn(1, 3, D, dtype=dtype, requires_grad=True)
    decisions = torch.tensor(
        [[[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]], [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]], dtype=dtype
    ).requires_grad_(True)
    aggregation = TokenAggregation(D, 2).to(dtype)
    merged = aggregation(Tokens(feats), decisions[:1])
    fused = RedundantFusion()(Tokens(feats), torch.rand(1, 2, 3, dtype=dtype), decisions[1:])
    torch.testing.assert_close(
        merged[0, 0], torch.zeros(2, D, dtype=dtype)
    )  # nothing kept: zero tokens
    torch.testing.assert_close(
        fused[0, 0], torch.zeros(D, dtype=dtype)
    )  # nothing dropped: a zero token
    ((merged * torch.randn_like(merged)).sum() + (fused * torch.randn_like(fused)).sum()).backward()
    for what, grad in [("features", feats.grad), ("decisions", decisions.grad)] + [
        (n, p.grad) for n, p in aggregation.named_parameters()
    ]:
        assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) < 1e3, what


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize(
    "real", [[True, True, False], [True, False, False]], ids=["one patch", "no patch"]
)
def test_patch_slimming_with_one_or_no_real_patch_has_finite_gradients(training, real):
    """An image whose only real token is [CLS] shifted its aggregation logits by -inf: exp(inf) in
    the (masked) cosines of its empty tokens made every gradient NaN. With one real patch, the
    pair keeps it (the fused token is empty) or drops it (the aggregated tokens are empty)."""
    torch.manual_seed(0)
    block = PatchSlimming(
        PatchScorer(D), GumbelSelector(0.5), TokenAggregation(D, 2), SparsePatchWordAlignment()
    )
    block = block.double().train(training)
    feats = torch.randn(1, 3, D, dtype=torch.float64, requires_grad=True)
    words = torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True)
    images = Tokens(feats, torch.tensor([real]), num_prefix_tokens=1)
    texts = Tokens(words, torch.tensor([[True, False, False], [False, True, True]]))
    scores, decisions = block(images, texts)
    check_outputs(block, {"image_tokens": images, "text_tokens": texts}, (scores, decisions))
    (scores * torch.tensor([[0.3, -1.2]], dtype=torch.float64)).sum().backward()
    for what, grad in [("image features", feats.grad), ("words", words.grad)] + [
        (n, p.grad) for n, p in block.named_parameters() if p.grad is not None
    ]:
        assert bool(torch.isfinite(grad).all()), what


@pytest.mark.parametrize("training", [False, True])
def test_gumbel_selector_refuses_nan_scores_of_real_patches(training):
    """Top-k and Gumbel decisions turned a NaN significance into a plain 0/1 decision, silently."""
    selector = GumbelSelector(0.5).train(training)
    images = Tokens(
        torch.randn(1, 4, D), torch.tensor([[True, True, True, False]]), num_prefix_tokens=1
    )
    scores = torch.rand(1, 2, 4)
    scores[0, 1, 3] = float("nan")  # a padded patch: ignored
    decisions = selector(scores, images)
    assert decisions.shape == (1, 2, 4) and bool(torch.isfinite(decisions).all())
    scores[0, 1, 2] = float("nan")  # a real patch
    with pytest.raises(ValueError, match="GumbelSelector: patch_scores holds 1 NaN or inf value"):
        selector(scores, images)


@pytest.mark.parametrize("side", ["image_tokens", "text_tokens"])
def test_expansive_lexicon_loss_refuses_a_nan_token(side):
    """The transport plan and the soft labels are computed without gradient; a NaN patch or word
    vanished into them and the loss came out finite."""
    torch.manual_seed(0)
    values = {
        "patch_lexicon": None,
        "word_lexicon": torch.randn(2, 3, V),
        "image_tokens": Tokens(torch.randn(2, 4, D)),
        "text_tokens": Tokens(torch.randn(2, 3, D)),
    }
    values["patch_lexicon"] = PatchToLexiconHead(D, 4, V, embedding=nn.Embedding(V, 4))(
        values["image_tokens"],
        torch.tensor([[True, False, True, False], [False, True, False, False]]),
    )
    loss = ExpansiveLexiconLoss()
    check_outputs(loss, values, call(loss, values))
    feats = values[side].feats.clone()
    feats[1, 2] = float("nan")
    values[side] = Tokens(feats)
    with pytest.raises(
        ValueError, match=rf"ExpansiveLexiconLoss: {side.replace('_', ' ')} holds 8 NaN or inf"
    ):
        call(loss, values)


def test_expansive_lexicon_loss_dtype_does_not_depend_on_the_masked_patches():
    """With no masked patch the loss came back in bfloat16, with some in float32 (lexicon_kl_loss's dtype)."""
    images = Tokens(torch.randn(2, 3, D, dtype=torch.bfloat16))
    texts = Tokens(torch.randn(2, 3, D, dtype=torch.bfloat16))
    head = PatchToLexiconHead(D, 4, V, embedding=nn.Embedding(V, 4)).to(torch.bfloat16)
    words = torch.randn(2, 3, V, dtype=torch.bfloat16)
    losses = [
        ExpansiveLexiconLoss()(head(images, torch.full((2, 3), masked)), words, images, texts)
        for masked in (False, True)
    ]
    assert [loss.dtype for loss in losses] == [torch.float32, torch.float32]
    assert float(losses[0].detach()) == 0.0


# ---------------------------------------------------------------------- declared parameter constraints
@pytest.mark.parametrize("name", BLOCKS)
def test_declared_constraints_refuse_what_they_exclude_and_keep_the_factory_values(name):
    """Read from each block's ``_parameter_constraints`` (imtm.contract): no per-block table here.

    Every constructor argument has an entry (a block without arguments declares none)."""
    from sklearn.base import clone

    from imtm.contract import (
        InvalidParameterError,
        check_params,
        parameter_constraints,
        refused_values,
    )

    constraints = parameter_constraints(COMPONENT_REGISTRY[name])
    block = built(name, 0)
    arguments = set(block.get_params(deep=False)) - {"requires", "provides"}
    unconstrained = sorted(arguments - set(constraints))
    assert not unconstrained, f"{name}: no _parameter_constraints entry for {unconstrained}"
    if not arguments:
        assert not constraints, f"{name} constrains {sorted(constraints)} but takes no argument"
        return
    check_params(block)  # the factory's values are valid
    params = block.get_params(deep=False)
    tried = 0
    for param, accepted in constraints.items():
        if param not in params:
            continue
        for bad in refused_values(accepted):
            copy_ = clone(block).set_params(**{param: bad})
            with pytest.raises(InvalidParameterError, match=rf"{name}: {param} must be .*, got "):
                copy_.validate()
            tried += 1
    assert tried, f"{name}: no declared constraint produced a value to refuse"
