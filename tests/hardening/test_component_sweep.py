"""Property sweep over every registered block: random shapes, masks, dtypes and devices.

Each block of :data:`imtm.component.COMPONENT_REGISTRY` has an entry in ``CASES``: a
small factory, the values it reads (``imtm.testing.component_inputs`` and, for names
outside the shared vocabulary, ``extra`` strategies), the errors its docstring
documents for valid-looking input, and whether it promises padding invariance.
For every drawn example (batch sizes, widths, ``padding`` among random,
all-but-one and none, a [CLS] prefix token or none, feature scales from 1e-4 to
1e4, float32 / float64 / bfloat16, every available device, training or eval
mode) the call either passes ``imtm.testing.check_outputs`` (one output per
``provides`` name, documented shapes, finite values), returns its inputs' dtype,
and in training back-propagates finite gradients, or raises exactly the
documented error. A block registered without an entry fails
``test_every_registered_block_has_a_case``.

More examples: ``HYPOTHESIS_PROFILE=thorough python -m pytest tests/hardening``.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from imtm import Tokens
from imtm.component import COMPONENT_REGISTRY, Component
from imtm.components import (
    CrossModalEncoder,
    DimensionAlignmentLoss,
    DistanceWeightedMiner,
    DPCKNNAggregation,
    ExpansiveLexiconLoss,
    GlobalCosine,
    GRUTextEncoder,
    GumbelSelector,
    HardAssignmentCoding,
    HFTextEncoder,
    ImageTextMatchingHead,
    ImageTextMatchingLoss,
    InfoNCELoss,
    InterModalPhraseAttention,
    LexiconDistillationLoss,
    LocalMatching,
    LSEPooling,
    MaskedImageView,
    MaskedLanguageModelingLoss,
    MatchingReranker,
    MaxPooling,
    MeanEmbedding,
    MeanPooling,
    PatchScorer,
    PatchSlimming,
    PatchToLexiconHead,
    PrecomputedEncoder,
    RatioLoss,
    RedundantFusion,
    Reuse,
    ScanAttention,
    ScoreFusion,
    SelfAttentionContext,
    SoftAssignmentCoding,
    SoftmaxPooling,
    SparseCorrelation,
    SparsePatchWordAlignment,
    SpatialConstraintLoss,
    SumPooling,
    TextualPhraseEncoder,
    TimmVisionEncoder,
    TokenAggregation,
    TopKAggregation,
    TripletLoss,
    VisualPhraseEncoder,
    WordAggregation,
    WordMasking,
    WordSelection,
    WordToLexiconHead,
)
from imtm.components.encoders.hf_text import write_local_bert
from imtm.data import Vocabulary
from imtm.testing import (
    PADDINGS,
    captions,
    check_component,
    check_outputs,
    component_inputs,
    devices,
    dtypes,
)
from imtm.testing.conformance import _leaves, _map_tensors

D, V = 8, 16  # feature size and vocabulary of the drawn values
IMG = 16  # pixel side of drawn images: 2 x 2 patches of 8 pixels
WORDS = ["a", "red", "blue", "circle", "square", "left", "of", "the", "green", "triangle"]
VOCAB = Vocabulary.build([" ".join(WORDS)])
# A tenth of the profile's examples per block: 10 by default, 100 with HYPOTHESIS_PROFILE=thorough.
EXAMPLES = max(1, settings.default.max_examples // 10)
SWEEP = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2**32 - 1)
SCALES = st.sampled_from([1e-4, 1.0, 1e4])  # feature scales, numerical extremes included

_CACHE: dict[str, Component] = {}


def once(key: str, make: Callable[[], Component]) -> Component:
    """Heavy blocks (timm, transformers) are built once per module and copied per example."""
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = make()
    return _CACHE[key]


def vit(**kw):
    return TimmVisionEncoder(
        "vit_tiny_patch16_224",
        img_size=IMG,
        out_dim=D,
        model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 8},
        **kw,
    )


_FOLDERS: dict[str, object] = {}


@pytest.fixture(scope="module", autouse=True)
def local_bert(tmp_path_factory):
    """A tiny random BERT folder for this module's text encoders; the built blocks are dropped after it."""
    _FOLDERS["bert"] = write_local_bert(
        tmp_path_factory.mktemp("bert"), WORDS, hidden_size=16, num_layers=1, num_heads=2
    )
    yield
    _CACHE.clear()
    _FOLDERS.clear()


def bert() -> HFTextEncoder:
    return HFTextEncoder(_FOLDERS["bert"], out_dim=D)


def cross():
    return CrossModalEncoder(D, layers=1, heads=2)


def random_tensor(shape, s, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(s.device, s.dtype)


def raw_pixels(shape, s, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(s.device)


def pixels(s):
    """Normalised float pixels in the drawn dtype, or raw uint8 pixels (the encoder scales them)."""
    make = st.sampled_from([random_tensor, raw_pixels])
    return st.tuples(make, SEEDS).map(lambda ms: ms[0]((s.bi, 3, IMG, IMG), s, ms[1]))


def strings(s):
    return captions(WORDS, batch=s.bt, max_words=4)


POOLING_EXTRA = {
    # token_scores: one score per word of every pair; token_mask: the caption's words, broadcast over images.
    "token_scores": lambda s: SEEDS.map(lambda seed: random_tensor((s.bi, s.bt, s.m), s, seed)),
    "token_mask": lambda s: st.just(s.text_mask[None]),
}


def small_batch(values):
    """The DIAS blocks standardise over the other pairs of the batch: their Shape says ``B >= 2``.

    With ``pairs="words"`` the pairs are the real words of the batch, each with its best region.
    """
    texts = values.get("text_tokens")
    b = int(texts.mask.sum()) if texts is not None else len(values["image_embedding"])
    return (ValueError, "at least 2") if b < 2 else None


def no_patch(values):
    """The LAPS blocks select among patches: image tokens holding prefix tokens only leave none."""
    images = values["image_tokens"]
    return (
        (ValueError, "no patch is left to select")
        if images.num_tokens <= images.num_prefix_tokens
        else None
    )


def at_least_float32(dtype):
    """The ELA lexicon losses return float32 for bfloat16 logits, as lexicon_kl_loss documents."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class Case:
    """How to sweep one block."""

    build: Callable[[], Component] | tuple[Callable[[], Component], ...]  # one factory, or variants
    paired: bool = False  # row b of the images goes with caption b (a training batch)
    extra: dict = field(default_factory=dict)
    # The error the docstring documents for these values, as (type, message regex), or None.
    error: Callable[[dict], tuple[type, str] | None] = lambda values: None
    padding: bool = False  # promises that padded positions never change the output
    # Why a NaN in a real token of its Tokens inputs may leave every output finite (None: it may not).
    nan_unused: str | None = None
    # The dtype of its floating outputs given inputs of a dtype, where it is not that dtype.
    out_dtype: Callable[[torch.dtype], torch.dtype] = lambda dtype: dtype
    vocab_size: int = V


def variants(*factories):
    """Several configurations of one block: each example draws one."""
    return factories


def laps(**kw):
    agg = kw.pop("aggregation", "learned")
    agg = TokenAggregation(D, 2) if agg == "learned" else agg
    return PatchSlimming(
        PatchScorer(D),
        GumbelSelector(0.5),
        agg,
        kw.pop("alignment", SparsePatchWordAlignment()),
        **kw,
    )


CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- encoders
    "PrecomputedEncoder": Case(
        variants(
            lambda: PrecomputedEncoder(in_dim=D, out_dim=6),
            lambda: PrecomputedEncoder(
                in_dim=D,
                out_dim=6,
                num_layers=2,
                hidden_dim=5,
                residual=True,
                activation="gelu",
                normalize=True,
                dropout=0.1,
            ),
        ),
        padding=True,
    ),
    "GRUTextEncoder": Case(
        variants(
            lambda: GRUTextEncoder(VOCAB, out_dim=6, word_dim=5),
            lambda: GRUTextEncoder(
                VOCAB,
                out_dim=6,
                word_dim=5,
                num_layers=2,
                bidirectional=False,
                dropout=0.2,
                normalize=True,
            ),
        ),
        vocab_size=len(VOCAB),
        padding=True,
    ),
    "HFTextEncoder": Case(lambda: once("bert", bert), extra={"texts": strings}),
    "TimmVisionEncoder": Case(
        variants(
            lambda: once("vit", lambda: vit(mask_ratio=0.5)),
            lambda: once("vit-patches", lambda: vit(keep_cls=False)),
        ),
        extra={"images": pixels},
    ),
    "MaskedImageView": Case(
        lambda: MaskedImageView(once("vit2", lambda: vit(mask_ratio=0.5, mask_in_forward=False))),
        extra={"images": pixels},
    ),
    # ---------------------------------------------------------------- refiners and embeddings
    "SelfAttentionContext": Case(lambda: SelfAttentionContext(D, heads=2), padding=True),
    "VisualPhraseEncoder": Case(lambda: VisualPhraseEncoder(D, heads=2), padding=True),
    "TextualPhraseEncoder": Case(
        variants(
            lambda: TextualPhraseEncoder(D),
            lambda: TextualPhraseEncoder(D, windows=(2, 5), channels=3),
        ),
        padding=True,
    ),
    "WordSelection": Case(
        variants(
            lambda: WordSelection(D, ratio=0.6), lambda: WordSelection(D, ratio=1.0, beta=0.0)
        ),
        padding=True,
    ),
    "WordAggregation": Case(
        variants(lambda: WordAggregation(D, num_out=2), lambda: WordAggregation(D, num_out=5)),
        padding=True,
    ),
    "MeanEmbedding": Case(
        variants(lambda: MeanEmbedding(side="text"), lambda: MeanEmbedding(skip_prefix=True)),
        padding=True,
    ),
    # ---------------------------------------------------------------- scorers
    "GlobalCosine": Case(GlobalCosine, padding=True),
    "HardAssignmentCoding": Case(
        variants(
            lambda: HardAssignmentCoding(pooling="lse", max_block_elements=40),
            lambda: HardAssignmentCoding(codebook="textual", pooling="max"),
            lambda: HardAssignmentCoding(pooling="mean"),
            lambda: HardAssignmentCoding(codebook="textual", pooling="sum"),
            lambda: HardAssignmentCoding(pooling="softmax", temperature=0.01),
        ),
        padding=True,
    ),
    "SoftAssignmentCoding": Case(
        variants(
            lambda: SoftAssignmentCoding(codebook="textual", pooling="softmax"),
            lambda: SoftAssignmentCoding(tau=0.01, pooling="lse", max_block_elements=40),
            lambda: SoftAssignmentCoding(pooling="max"),
        ),
        padding=True,
    ),
    "LocalMatching": Case(
        variants(
            lambda: LocalMatching(max_block_elements=40),
            lambda: LocalMatching(weighting="softmax", tau=0.05),
        ),
        padding=True,
    ),
    "SparsePatchWordAlignment": Case(
        variants(
            lambda: SparsePatchWordAlignment(max_block_elements=30),
            lambda: SparsePatchWordAlignment(direction="patch_to_word"),
            lambda: SparsePatchWordAlignment(direction="word_to_patch"),
        ),
        padding=True,
    ),
    "TopKAggregation": Case(
        variants(
            lambda: TopKAggregation(k=2),
            lambda: TopKAggregation(k=None),
            lambda: TopKAggregation(k=None, average="cosines"),
        ),
        padding=True,
    ),
    "InterModalPhraseAttention": Case(
        variants(
            lambda: InterModalPhraseAttention("t2i", dim=D, heads=2, k=2),
            lambda: InterModalPhraseAttention("i2t", dim=D, heads=2, k=None, max_block_elements=50),
            lambda: InterModalPhraseAttention("i2t", dim=D, heads=2, k=3, feed_forward=False),
            lambda: InterModalPhraseAttention(
                "t2i", dim=D, heads=2, k=None, average="cosines", ffn_dim=5
            ),
        ),
        padding=True,
    ),
    "ScanAttention": Case(
        variants(ScanAttention, lambda: ScanAttention(smooth=4.0, max_block_elements=30)),
        padding=True,
    ),
    "ScoreFusion": Case(ScoreFusion),
    "PatchScorer": Case(lambda: PatchScorer(D), padding=True, error=no_patch),
    "GumbelSelector": Case(
        lambda: GumbelSelector(0.5),
        error=no_patch,
        nan_unused="reads the image tokens' mask and prefix count, not their features",
    ),
    "TokenAggregation": Case(lambda: TokenAggregation(D, 2), error=no_patch),
    "RedundantFusion": Case(RedundantFusion, error=no_patch),
    "PatchSlimming": Case(
        variants(
            laps,
            lambda: laps(fusion=False, max_block_elements=60),
            lambda: laps(alignment=HardAssignmentCoding(pooling="mean")),
            lambda: laps(aggregation=None),
            lambda: laps(aggregation=DPCKNNAggregation(2, k=2)),
            lambda: laps(alignment=ScanAttention()),
        ),
        error=no_patch,
    ),
    "DPCKNNAggregation": Case(
        variants(lambda: DPCKNNAggregation(2), lambda: DPCKNNAggregation(3, k=1)), error=no_patch
    ),
    "MatchingReranker": Case(
        lambda: MatchingReranker(head=ImageTextMatchingHead(D, encoder=cross()), k=2), padding=True
    ),
    "MaxPooling": Case(MaxPooling, extra=POOLING_EXTRA),
    "MeanPooling": Case(MeanPooling, extra=POOLING_EXTRA),
    "SumPooling": Case(SumPooling, extra=POOLING_EXTRA),
    "SoftmaxPooling": Case(lambda: SoftmaxPooling(temperature=0.1), extra=POOLING_EXTRA),
    "LSEPooling": Case(lambda: LSEPooling(temperature=0.01), extra=POOLING_EXTRA),
    # ---------------------------------------------------------------- heads
    "CrossModalEncoder": Case(cross, paired=True, padding=True),
    "ImageTextMatchingHead": Case(
        lambda: ImageTextMatchingHead(D, encoder=cross()), paired=True, padding=True
    ),
    "PatchToLexiconHead": Case(
        lambda: PatchToLexiconHead(D, 4, V, embedding=nn.Embedding(V, 4)),
        nan_unused="computes the masked patches only, never the others",
    ),
    "WordToLexiconHead": Case(
        variants(
            lambda: WordToLexiconHead(D, 4, V, embedding=nn.Embedding(V, 4), layers=1, heads=2),
            lambda: WordToLexiconHead(D, 4, V, embedding=nn.Embedding(V, 4), layers=0),
        )
    ),
    "WordMasking": Case(
        lambda: WordMasking(tokenizer=once("bert", bert), prob=0.5), extra={"texts": strings}
    ),
    "Reuse": Case(
        lambda: Reuse(
            GlobalCosine(), requires=("image_tokens", "text_tokens"), provides=("scores",)
        ),
        padding=True,
    ),
    "DistanceWeightedMiner": Case(lambda: DistanceWeightedMiner(dim=D, random_state=0)),
    "SparseCorrelation": Case(
        variants(
            SparseCorrelation,
            lambda: SparseCorrelation(
                kind="intra", distance="euclidean", learnable=False, beta=0.5
            ),
        ),
        paired=True,
        error=small_batch,
    ),
    # ---------------------------------------------------------------- losses
    "TripletLoss": Case(
        variants(
            TripletLoss,
            lambda: TripletLoss(hardest=False, reduction="mean"),
            lambda: TripletLoss(miner=DistanceWeightedMiner(dim=D, random_state=0)),
            lambda: TripletLoss(requires=("scores_i2t", "scores_t2i", "positives")),
        )
    ),
    "InfoNCELoss": Case(
        variants(InfoNCELoss, lambda: InfoNCELoss(temperature=0.1, learnable=True))
    ),
    "RatioLoss": Case(
        RatioLoss, nan_unused="reads the image tokens' mask and prefix count, not their features"
    ),
    "DimensionAlignmentLoss": Case(
        variants(
            DimensionAlignmentLoss, lambda: DimensionAlignmentLoss(reduction="mean", pairs="words")
        ),
        paired=True,
        error=small_batch,
    ),
    "SpatialConstraintLoss": Case(
        variants(
            SpatialConstraintLoss,
            lambda: SpatialConstraintLoss(kind="intra", sparse=False, distance="euclidean"),
            lambda: SpatialConstraintLoss(learn_beta=False, beta=1.0, reduction="mean"),
        ),
        paired=True,
        error=small_batch,
    ),
    "ExpansiveLexiconLoss": Case(
        variants(
            ExpansiveLexiconLoss,
            lambda: ExpansiveLexiconLoss(
                label_weights="one_minus_cost", method="sinkhorn", direction="target_first"
            ),
            lambda: ExpansiveLexiconLoss(method="emd", top_k=1),
        ),
        paired=True,
        out_dtype=at_least_float32,
    ),
    "LexiconDistillationLoss": Case(
        variants(
            LexiconDistillationLoss, lambda: LexiconDistillationLoss(direction="target_first")
        ),
        out_dtype=at_least_float32,
    ),
    "MaskedLanguageModelingLoss": Case(MaskedLanguageModelingLoss),
    "ImageTextMatchingLoss": Case(ImageTextMatchingLoss),
}


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


def test_every_registered_block_has_a_case():
    registered = {name for name, cls in COMPONENT_REGISTRY.items() if is_sweepable(name, cls)}
    missing = sorted(registered - set(CASES))
    assert not missing, f"blocks without an entry in CASES (add a factory for each): {missing}"
    stale = sorted(set(CASES) - registered)
    assert not stale, f"CASES names blocks that are not registered: {stale}"


def factories(case: Case) -> tuple:
    return case.build if isinstance(case.build, tuple) else (case.build,)


def move(block: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Block and the blocks it borrows (linked partners, tied embeddings) to ``device`` and ``dtype``."""
    block.to(device=device, dtype=dtype)
    for attr in getattr(block, "_borrowed", ()):
        linked = block.__dict__.get(attr)
        if isinstance(linked, nn.Module):
            move(linked, device, dtype)


def call(block: Component, values: dict):
    return block(*[values[n] for n in block.requires])


@pytest.mark.parametrize("name", sorted(CASES))
@SWEEP
@given(data=st.data())
def test_block_returns_the_documented_outputs_or_the_documented_error(name, data):
    case = CASES[name]
    padding = data.draw(st.sampled_from(PADDINGS), label="padding")
    dtype = data.draw(dtypes(), label="dtype")
    device = data.draw(devices(), label="device")
    training = data.draw(st.booleans(), label="training")
    block = copy.deepcopy(data.draw(st.sampled_from(factories(case)), label="factory")()).train(
        training
    )
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
            vocab_size=case.vocab_size,
            paired=case.paired,
            scale=SCALES,
            num_prefix_tokens=st.integers(0, 1),
            extra=case.extra,
        ),
        label="values",
    )
    expected = case.error(values)
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
    want = case.out_dtype(dtype)
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


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.padding))
@settings(
    max_examples=max(1, EXAMPLES // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(data=st.data())
def test_padding_never_changes_the_output(name, data):
    """Appending padded positions full of large garbage to any Tokens input leaves every output as it was."""
    case = CASES[name]
    block = copy.deepcopy(data.draw(st.sampled_from(factories(case)), label="factory")())
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
            vocab_size=case.vocab_size,
            paired=case.paired,
            num_prefix_tokens=st.integers(0, 1),
            extra=case.extra,
        ),
        label="values",
    )
    assume(case.error(values) is None)
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
    return bool((set(COMPONENT_REGISTRY[name].requires) & FEATURE_TOKENS) - set(CASES[name].extra))


@pytest.mark.parametrize("name", sorted(n for n in CASES if reads_feature_tokens(n)))
@settings(
    max_examples=max(1, EXAMPLES // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(data=st.data())
def test_a_nan_in_a_real_token_is_refused_or_shows(name, data):
    """NaN in one real token of a Tokens input: a ValueError naming NaN, or a NaN in the outputs; never a
    finite result that silently dropped it."""
    case = CASES[name]
    block = copy.deepcopy(data.draw(st.sampled_from(factories(case)), label="factory")()).eval()
    move(block, torch.device("cpu"), torch.float64)
    values = data.draw(
        component_inputs(
            block,
            batch=st.integers(2, 3),
            max_tokens=4,
            dim=D,
            dtype=torch.float64,
            vocab_size=case.vocab_size,
            paired=case.paired,
            extra=case.extra,
        ),
        label="values",
    )
    keys = float_tokens(values)
    assume(keys and case.error(values) is None)
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
@pytest.mark.parametrize("name", sorted(CASES))
def test_declared_constraints_refuse_what_they_exclude_and_keep_the_factory_values(name):
    """Read from each block's ``_parameter_constraints`` (imtm.contract): no per-block table here."""
    from sklearn.base import clone

    from imtm.contract import (
        InvalidParameterError,
        check_params,
        parameter_constraints,
        refused_values,
    )

    constraints = parameter_constraints(COMPONENT_REGISTRY[name])
    if not constraints:
        pytest.skip(f"{name} declares no parameter constraints")
    block = factories(CASES[name])[0]()
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
