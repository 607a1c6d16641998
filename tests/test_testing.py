import importlib
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import imtm.testing
from imtm import Component, Loss, Tokens
from imtm.component import VALUE_NAMES
from imtm.components.heads.lexicon import LexiconLogits
from imtm.testing import (
    CHECKS,
    ConformanceReport,
    InputSizes,
    captions,
    check_component,
    check_outputs,
    component_inputs,
    devices,
    dtypes,
    example_inputs,
    image_ids,
    masks,
    parametrize_with_checks,
    score_matrices,
    tokens,
)

SETTINGS = settings(max_examples=20, deadline=None)


# ---------------------------------------------------------------------- a correct block and broken variants
class Project(Component):
    """A correct block: masked linear projection of image tokens."""

    requires = ("image_tokens",)
    provides = ("image_tokens",)

    def __init__(self, dim=4, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.dim = dim
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tokens) -> Tokens:
        feats = torch.where(x.mask.unsqueeze(-1), x.feats, torch.zeros((), dtype=x.feats.dtype))
        return x.with_feats(self.proj(feats))


class ReadsPadding(Project):
    provides = ("image_embedding",)

    def forward(self, x):
        return self.proj(x.feats).mean(1)  # averages padded positions too


class UnusedParameter(Project):
    def __init__(self, dim=4, *, requires=None, provides=None):
        super().__init__(dim, requires=requires, provides=provides)
        self.unused = nn.Linear(dim, dim)


class RenamesItsArgument(Project):
    def __init__(self, size=4, *, requires=None, provides=None):
        super().__init__(size, requires=requires, provides=provides)


class NoisyInEval(Project):
    def forward(self, x):
        return super().forward(x).with_feats(super().forward(x).feats + torch.randn(()))


class AlwaysFloat32(Project):
    def forward(self, x):
        return super().forward(x).with_feats(super().forward(x).feats.float())


class InPlace(Project):
    def forward(self, x):
        x.feats.mul_(2)
        return super().forward(x)


class MakesNaN(Project):
    def forward(self, x):
        return super().forward(x).with_feats(super().forward(x).feats / 0.0 * 0.0)


class RandomBuffer(Project):
    def __init__(self, dim=4, *, requires=None, provides=None):
        super().__init__(dim, requires=requires, provides=provides)
        self.register_buffer("noise", torch.randn(dim), persistent=False)

    def forward(self, x):
        return super().forward(x).with_feats(super().forward(x).feats + self.noise)


class TwoOutputsDeclaredOne(Project):
    def forward(self, x):
        out = super().forward(x)
        return out, out


class VectorLoss(Loss):
    requires = ("scores", "positives")
    provides = ("vector_loss",)

    def __init__(self, weight=1.0, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.weight = weight

    def forward(self, scores, positives):
        return scores.sum(1)


def image_inputs():
    return {"image_tokens": Tokens.from_lengths(torch.randn(3, 5, 4), [5, 2, 1])}


def test_a_correct_block_passes_every_check():
    report = check_component(Project(), image_inputs(), skip=("functional",))
    assert isinstance(report, ConformanceReport)
    assert report.passed == [c for c in CHECKS if c != "functional"]
    assert report.skipped == {"functional": "asked to skip"}
    assert "Project: 10 checks passed" in str(report)


@pytest.mark.parametrize(
    "block, check, match",
    [
        (ReadsPadding(), "padding", "image_embedding differs"),
        (
            UnusedParameter(),
            "gradients",
            r"no gradient reaches the trainable parameters \['unused.weight', 'unused.bias'\]",
        ),
        (RenamesItsArgument(), "contract", "store every constructor argument"),
        (NoisyInEval(), "deterministic", "differs"),
        (AlwaysFloat32(), "dtypes", "came back in torch.float32"),
        (InPlace(), "inputs_unchanged", "modified its input image_tokens.feats in place"),
        (MakesNaN(), "finite", "NaN or inf"),
        (RandomBuffer(), "state_dict", "differs"),
        (TwoOutputsDeclaredOne(), "outputs", "must be Tokens, got tuple"),
    ],
)
def test_broken_blocks_are_caught(block, check, match):
    with pytest.raises(
        AssertionError,
        match=rf"check_component\({type(block).__name__}\): {check} check failed: .*{match}",
    ):
        check_component(block, image_inputs())


def test_functional_twin_disagreement_is_caught():
    block = Project()
    with pytest.raises(AssertionError, match="functional check failed"):
        check_component(block, image_inputs(), functional=lambda x: x)
    check_component(block, image_inputs(), functional=lambda x: block(x))


def test_loss_must_return_a_scalar():
    inputs = {"scores": torch.randn(3, 3), "positives": torch.eye(3, dtype=torch.bool)}
    with pytest.raises(
        AssertionError, match=r"a Loss returns a floating-point scalar; 'vector_loss' is \(3,\)"
    ):
        check_component(VectorLoss(), inputs)


def test_scores_must_be_bi_by_bt():
    class WrongScores(Component):
        requires = ("image_tokens", "text_tokens")
        provides = ("scores",)

        def __init__(self, *, requires=None, provides=None):
            super().__init__(requires=requires, provides=provides)

        def forward(self, images, texts):
            return images.masked_mean() @ texts.masked_mean().t()[:, :1]

    inputs = {
        "image_tokens": Tokens(torch.randn(2, 3, 4)),
        "text_tokens": Tokens(torch.randn(5, 3, 4)),
    }
    with pytest.raises(
        AssertionError, match=r"'scores' must be a \(Bi, Bt\) = \(2, 5\) tensor, got \(2, 1\)"
    ):
        check_component(WrongScores(), inputs)


def test_the_callers_block_is_left_as_it_was():
    block = Project().train()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    check_component(block, image_inputs())
    assert block.training and all(p.grad is None for p in block.parameters())
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"inputs lacks \['image_tokens'\]"):
        check_component(Project(), {"images": torch.randn(2, 3, 4)})
    with pytest.raises(ValueError, match="Did you mean 'padding'"):
        check_component(Project(), image_inputs(), skip=("paddding",))
    with pytest.raises(ValueError, match="contract and outputs always run"):
        check_component(Project(), image_inputs(), skip="outputs")
    with pytest.raises(TypeError, match="inputs must map value names"):
        check_component(Project(), [torch.randn(2, 3, 4)])
    with pytest.raises(AssertionError, match="not an imtm.Component"):
        check_component(nn.Linear(2, 2), {})


# ---------------------------------------------------------------------- strategies
@SETTINGS
@given(t=tokens(batch=st.integers(1, 4), max_tokens=5, dim=3))
def test_tokens_rows_always_hold_a_real_token(t):
    assert t.feats.shape[0] == t.mask.shape[0] and t.dim == 3
    assert bool(t.mask.any(1).all())


@SETTINGS
@given(t=tokens(batch=3, max_tokens=6, contiguous=True, vocab_size=7))
def test_tokens_contiguous_ids(t):
    assert t.feats.dtype == torch.long and int(t.feats.max()) < 7
    lengths = t.mask.sum(1)
    assert torch.equal(t.mask, torch.arange(t.num_tokens)[None, :] < lengths[:, None])


@SETTINGS
@given(
    s=score_matrices(bi=2, bt=st.integers(1, 3), low=0.0, high=0.5),
    ids=image_ids(batch=5, max_images=2),
    c=captions(["a", "red", "circle"], batch=2, max_words=3),
)
def test_other_strategies(s, ids, c):
    assert s.shape[0] == 2 and bool(((s >= 0) & (s < 0.5)).all())
    assert ids.shape == (5,) and int(ids.max()) < 2
    assert len(c) == 2 and all(1 <= len(x.split()) <= 3 for x in c)


@SETTINGS
@given(
    t=tokens(batch=3, max_tokens=5, dim=2, padding="all_but_one"),
    m=masks(batch=2, padding="none"),
    c=masks(batch=2, max_tokens=4, contiguous=True, padding="all_but_one"),
)
def test_paddings(t, m, c):
    assert t.mask.sum(1).tolist() == [1, 1, 1]
    assert bool(m.all())
    assert bool(c[:, 0].all()) and c.sum(1).tolist() == [1, 1]


@SETTINGS
@given(dt=dtypes(), dev=devices())
def test_dtypes_and_devices(dt, dev):
    assert dt in (torch.float32, torch.float64, torch.bfloat16)
    assert dev.type == "cpu" or torch.cuda.is_available()


def test_strategy_arguments_are_checked():
    for strategy, match in [
        (tokens(batch=0), "batch must be a positive int"),
        (captions("abc"), "words must be a non-empty list"),
        (masks(padding="some"), "padding must be one of"),
    ]:

        @given(strategy)
        def draw_one(value):
            pass

        with pytest.raises(ValueError, match=match):
            draw_one()


def test_check_component_imports_without_hypothesis(monkeypatch):
    monkeypatch.delitem(sys.modules, "imtm.testing.strategies")
    monkeypatch.delattr(imtm.testing, "strategies")
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    module = importlib.reload(imtm.testing)
    assert callable(module.check_component)
    with pytest.raises(ImportError, match=r"needs hypothesis: pip install 'imtm\[test\]'"):
        _ = module.tokens
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = module.nope


# ---------------------------------------------------------------------- component_inputs and check_outputs
IMAGE_TOKENS = ("images", "image_tokens", "visual_phrases", "masked_image_tokens")
TEXT_TOKENS = ("text_tokens", "masked_text_tokens", "cross_text_tokens")
PAIRS = (
    "scores",
    "scores_i2t",
    "scores_t2i",
    "scores_intra",
    "scores_inter_i2t",
    "scores_inter_t2i",
    "scores_inter",
    "itc_scores",
    "positives",
    "sparse_mask",
    "negatives_i2t",
    "negatives_t2i",
)


@SETTINGS
@given(
    v=component_inputs(
        list(VALUE_NAMES),
        batch=st.integers(1, 4),
        max_tokens=5,
        dim=3,
        vocab_size=11,
        dtype=dtypes(),
        paired=False,
    )
)
def test_component_inputs_agree_on_every_size(v):
    assert list(v) == list(VALUE_NAMES)
    bi, n = v["image_tokens"].mask.shape
    bt, m = v["text_tokens"].mask.shape
    dtype = v["image_tokens"].dtype
    for name in IMAGE_TOKENS:
        assert v[name].feats.shape == (bi, n, 3) and torch.equal(
            v[name].mask, v["image_tokens"].mask
        )
        assert v[name].dtype == dtype
    for name in TEXT_TOKENS:
        assert v[name].feats.shape == (bt, m, 3) and torch.equal(
            v[name].mask, v["text_tokens"].mask
        )
    for name in ("texts", "masked_texts"):
        assert v[name].feats.shape == (bt, m) and int(v[name].feats.max()) < 11
    for name in PAIRS:
        assert v[name].shape == (bi, bt), name
    assert v["image_embedding"].shape == (bi, 3) and v["text_embedding"].shape == (bt, 3)
    assert v["text_phrase"].shape == (bt, 3)
    assert v["image_ids"].shape == (bt,) and int(v["image_ids"].max()) < bi
    # caption t belongs to image image_ids[t]: positives follow from the ids
    assert torch.equal(v["positives"], torch.arange(bi)[:, None] == v["image_ids"][None, :])
    assert int(v["negatives_i2t"].max()) < bt and int(v["negatives_t2i"].max()) < bi
    assert (
        v["keep_decisions"].shape == (bi, bt, n)
        and not v["keep_decisions"][~v["image_tokens"].mask[:, None].expand(bi, bt, n)].any()
    )
    assert v["patch_scores"].shape == (bi, bt, n) and bool(
        ((v["patch_scores"] >= 0) & (v["patch_scores"] <= 1)).all()
    )
    lexicon = v["patch_lexicon"]
    assert isinstance(lexicon, LexiconLogits) and lexicon.logits.shape[1] == 11
    assert bool(v["image_tokens"].mask[lexicon.batch_index, lexicon.token_index].all())
    assert (
        v["masked_patches"].shape == (bi, n)
        and not (v["masked_patches"] & ~v["image_tokens"].mask).any()
    )
    for name in ("word_lexicon", "word_lexicon_masked", "cross_lexicon"):
        assert v[name].shape == (bt, m, 11) and v[name].dtype == dtype
    labels = v["mlm_labels"]
    assert labels.shape == (bt, m) and bool((labels[~v["text_tokens"].mask] == -100).all())
    assert v["itm_logits"].shape == (v["itm_labels"].shape[0], 2) and set(
        v["itm_labels"].tolist()
    ) <= {0, 1}
    assert v["transport_plan"].shape == (bi, n, m)


@SETTINGS
@given(
    v=component_inputs(
        ("image_tokens", "text_tokens", "positives", "image_ids"),
        batch=st.integers(1, 4),
        padding="all_but_one",
    )
)
def test_component_inputs_paired_batches(v):
    images, texts = v["image_tokens"], v["text_tokens"]
    assert images.batch_size == texts.batch_size == v["image_ids"].shape[0]
    assert images.mask.sum(1).eq(1).all() and texts.mask.sum(1).eq(1).all()
    ids = v["image_ids"]
    assert torch.equal(v["positives"], ids[:, None] == ids[None, :]) and bool(
        v["positives"].diagonal().all()
    )


def test_component_inputs_extra_strategies_and_errors():
    seen = []

    def token_scores(sizes):
        seen.append(sizes)
        assert isinstance(sizes, InputSizes)
        return st.just(torch.zeros(sizes.bi, sizes.bt, sizes.m))

    @settings(max_examples=5, deadline=None)
    @given(
        v=component_inputs(
            ("token_scores", "token_mask", "scores"),
            extra={"token_scores": token_scores, "token_mask": st.just("given")},
        )
    )
    def draw(v):
        assert v["token_scores"].shape[:2] == v["scores"].shape and v["token_mask"] == "given"

    draw()
    assert seen

    class NeedsBoxes(Component):
        requires = ("word_boxes",)
        provides = ("scores",)

        def forward(self, boxes):
            return boxes

    with pytest.raises(
        ValueError,
        match=r"no strategy for 'word_boxes' \(required by NeedsBoxes\).*"
        r"extra=\{'word_boxes': strategy\}",
    ):
        component_inputs(NeedsBoxes())
    from imtm.components import MaxPooling

    @settings(max_examples=3, deadline=None)
    @given(
        v=component_inputs(MaxPooling())
    )  # drawn from the value specs the pooling blocks declare
    def pooled(v):
        assert (
            v["token_scores"].shape == v["token_mask"].shape and v["token_mask"].dtype == torch.bool
        )
        check_outputs(MaxPooling(), v, MaxPooling()(v["token_scores"], v["token_mask"]))

    pooled()
    with pytest.raises(ValueError, match="Did you mean 'image_tokens'"):
        component_inputs(["image_token"])
    with pytest.raises(ValueError, match="padding must be one of"):
        component_inputs(["scores"], padding="most")
    with pytest.raises(TypeError, match="give a block or a sequence of value names"):
        component_inputs("scores")


def test_check_outputs_passes_a_correct_block_and_catches_broken_ones():
    values = image_inputs()
    check_outputs(Project(), values, Project()(values["image_tokens"]))
    broken = [
        (ReadsPadding(), torch.zeros(2, 4), r"'image_embedding' must be a \(Bi, \*\) tensor"),
        (MakesNaN(), MakesNaN()(values["image_tokens"]), "finite check failed: image_tokens.feats"),
        (
            TwoOutputsDeclaredOne(),
            TwoOutputsDeclaredOne()(values["image_tokens"]),
            "must be Tokens, got tuple",
        ),
        (Project(), Tokens(torch.zeros(1, 5, 4)), "'image_tokens' has batch size 1, expected 3"),
    ]
    for block, out, match in broken:
        with pytest.raises(
            AssertionError, match=rf"check_outputs\({type(block).__name__}\): .*{match}"
        ):
            check_outputs(block, values, out)
    scores = {"scores": torch.randn(3, 3), "positives": torch.eye(3, dtype=torch.bool)}
    with pytest.raises(
        AssertionError, match=r"a Loss returns a floating-point scalar; 'vector_loss' is \(3,\)"
    ):
        check_outputs(VectorLoss(), scores, VectorLoss()(scores["scores"], scores["positives"]))
    with pytest.raises(ValueError, match=r"inputs lacks \['image_tokens'\]"):
        check_outputs(Project(), {}, None)


@SETTINGS
@given(
    v=component_inputs(
        ("image_tokens", "scores", "texts", "positives"), dtype=torch.bfloat16, device="cpu"
    )
)
def test_component_inputs_dtype_and_device(v):
    assert v["image_tokens"].dtype == v["scores"].dtype == torch.bfloat16
    assert v["texts"].feats.dtype == torch.long and v["positives"].dtype == torch.bool
    assert {x.device.type for x in (v["image_tokens"].feats, v["scores"], v["texts"].feats)} == {
        "cpu"
    }


@SETTINGS
@given(
    v=component_inputs(
        ("image_tokens", "texts", "image_embedding", "scores"),
        padding="all_but_one",
        num_prefix_tokens=1,
        scale=1e3,
        max_tokens=3,
    )
)
def test_component_inputs_prefix_tokens_and_scale(v):
    images, texts = v["image_tokens"], v["texts"]
    assert images.num_prefix_tokens == texts.num_prefix_tokens == 1
    assert bool(images.mask[:, 0].all()) and bool(
        texts.mask[:, 0].all()
    )  # a prefix token is always real
    assert bool((images.mask.sum(1) <= 2).all())  # all_but_one: the prefix and at most one more
    assert float(v["image_embedding"].abs().max()) > 10  # features drawn at scale 1e3
    assert float(v["scores"].abs().max()) <= 1  # scores keep their range


def test_lazy_strategy_names_match_the_strategies_module():
    from imtm.testing import strategies

    assert sorted(imtm.testing._STRATEGIES) == sorted(strategies.__all__)


# ---------------------------------------------------------------------- public checks, all failures, pytest ids
def test_every_failure_is_reported_not_only_the_first():
    class NaNAndNoisy(Project):
        def forward(self, x):
            out = super().forward(x).feats
            return x.with_feats(out / 0.0 * 0.0 + torch.randn(()))

    with pytest.raises(AssertionError) as info:
        check_component(NaNAndNoisy(), image_inputs())
    message = str(info.value)
    for check in ("finite", "deterministic", "dtypes"):
        assert f"check_component(NaNAndNoisy): {check} check failed" in message, (check, message)


def test_each_check_runs_alone_and_says_when_it_does_not_apply():
    from imtm.testing import check_functional, check_gradients, check_padding

    assert check_gradients(Project(), image_inputs()) is None
    assert check_functional(Project(), image_inputs()) == "no functional twin given"
    with pytest.raises(
        AssertionError, match=r"check_padding\(ReadsPadding\): padding check failed"
    ):
        check_padding(ReadsPadding(), image_inputs())
    with pytest.raises(
        AssertionError, match=r"check_gradients\(UnusedParameter\): gradients check failed"
    ):
        check_gradients(UnusedParameter(), image_inputs())
    with pytest.raises(TypeError, match="unknown option"):
        check_padding(Project(), image_inputs(), extra_paddings=3)
    with pytest.raises(ValueError, match=r"inputs lacks \['image_tokens'\]"):
        check_gradients(Project(), {})


def test_check_outputs_without_an_output_calls_the_block():
    check_outputs(Project(), image_inputs())
    with pytest.raises(AssertionError, match="must be Tokens, got tuple"):
        check_outputs(TwoOutputsDeclaredOne(), image_inputs())


_CASES = [(Project(), image_inputs()), (ReadsPadding(), image_inputs(), {"skip": ("padding",)})]


@parametrize_with_checks(_CASES)
def test_parametrize_with_checks_runs_each_check(block, check):
    check(block)


def test_parametrize_with_checks_gives_one_id_per_check_and_fails_per_check():
    marker = parametrize_with_checks(_CASES)
    ids = [p.id for p in marker.args[1]]
    assert ids[: len(CHECKS)] == [f"Project()-{c}" for c in CHECKS]
    assert "ReadsPadding()-padding" not in ids and "ReadsPadding()-gradients" in ids
    failing = parametrize_with_checks([(ReadsPadding(), image_inputs())])
    results = {}
    for param in failing.args[1]:
        block, check = param.values
        try:
            check(block)
            results[param.id] = "passed"
        except AssertionError:
            results[param.id] = "failed"
    assert results["ReadsPadding()-padding"] == "failed"
    assert results["ReadsPadding()-gradients"] == "passed"
    with pytest.raises(ValueError, match="Did you mean 'padding'"):
        parametrize_with_checks([(Project(), image_inputs(), {"skip": ["paddding"]})])
    with pytest.raises(TypeError, match=r"each case is \(block, inputs\)"):
        parametrize_with_checks([Project()])


# ---------------------------------------------------------------------- examples declared by a class
class Scaled(Component):
    """A block of this file with examples of its own: scores times a factor."""

    requires = ("scores",)
    provides = ("scores",)

    @classmethod
    def _examples(cls):
        from imtm.contract import Example

        return (
            Example({"factor": 2.0}),
            Example({"factor": 0.5}, skip={"gradients": "shown skipped in a test"}),
        )

    def __init__(self, factor=1.0, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.factor = factor

    def forward(self, scores):
        return scores * self.factor


def test_parametrize_with_checks_reads_the_examples_a_class_declares():
    ids = [p.id for p in parametrize_with_checks([Scaled]).args[1]]
    assert "Scaled(factor=2.0)-contract" in ids and "Scaled(factor=0.5)-contract" in ids
    # No Tokens input, no promise of padding invariance: padding is skipped; so is what skip names.
    assert "Scaled(factor=2.0)-padding" not in ids and "Scaled(factor=2.0)-gradients" in ids
    assert "Scaled(factor=0.5)-gradients" not in ids
    for _, inputs, options in imtm.testing.example_cases(Scaled):
        assert set(inputs) == {"scores"} and options["skip"][-1] == "padding"


def test_example_inputs_follow_the_example():
    from imtm.components import GRUTextEncoder, TimmVisionEncoder, TripletLoss
    from imtm.contract import Example, examples

    loss = TripletLoss()
    first, again = (example_inputs(loss, Example(paired=True), seed=3) for _ in range(2))
    torch.testing.assert_close(first["scores"], again["scores"])
    assert first["scores"].shape == (3, 3) and bool(first["positives"].diagonal().all())
    other = example_inputs(loss, Example(), seed=4)
    assert other["scores"].shape == (3, 4) and not torch.equal(
        other["scores"][:, :3], first["scores"]
    )
    gru = examples(GRUTextEncoder)[0]
    texts = example_inputs(gru.build(GRUTextEncoder), Example(inputs={"texts": "captions"}))[
        "texts"
    ]
    assert len(texts) == 4 and all(isinstance(t, str) and t for t in texts)
    vit = examples(TimmVisionEncoder)[0]
    pixels = example_inputs(vit.build(TimmVisionEncoder), vit)["images"]
    assert pixels.shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="example_inputs: no example for 'not_a_value'"):
        example_inputs(type("Block", (), {"requires": ("not_a_value",)})())


def test_examples_are_checked_where_they_are_declared():
    from imtm.contract import Example, examples

    with pytest.raises(
        ValueError, match=r"inputs\['texts'\] must be one of .* Did you mean 'captions'"
    ):
        Example(inputs={"texts": "caption"})
    with pytest.raises(TypeError, match="NoExamples declares no examples: add a classmethod"):
        examples(type("NoExamples", (), {}))

    @settings(max_examples=1, deadline=None, database=None)
    @given(component_inputs(["texts"], extra={"texts": "pixel"}))
    def draw(values):
        pass

    with pytest.raises(ValueError, match=r"the kinds are \['captions', 'pixels'\]"):
        draw()
