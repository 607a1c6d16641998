import pytest
import torch

from imtm import Matcher, presets
from imtm.components import (
    DimensionAlignmentLoss,
    DistanceWeightedMiner,
    LocalMatching,
    MeanEmbedding,
    SoftAssignmentCoding,
    SpatialConstraintLoss,
)
from imtm.data import synthetic


@pytest.fixture(scope="module")
def train():
    return synthetic.load(view="regions", seed=0, n_train=24, n_dev=4, n_test=4)[0]


def test_dias_preset_blocks_and_paper_weights(train):
    blocks = dict(presets.build("dias", train, embed_dim=16, word_dim=8))
    # The default scorer and weighting follow benchmarks/dias_readings.py; the mask is Eq. 14 as
    # printed (that measurement does not separate the two readings).
    assert isinstance(blocks["coding"], SoftAssignmentCoding)
    local = dict(presets.build("dias", train, embed_dim=16, word_dim=8, scorer="local"))["coding"]
    assert isinstance(local, LocalMatching) and local.weighting == "softmax"
    with pytest.raises(ValueError, match="scorer must be one of .*Did you mean 'local'"):
        presets.build("dias", train, embed_dim=16, word_dim=8, scorer="locl")
    assert blocks["dim_loss"].correlation == "cosine" and blocks["inter_loss"].rule == "printed"
    assert tuple(blocks["inter_loss"].requires) == (
        "image_embedding",
        "text_embedding",
        "positives",
    )
    assert isinstance(blocks["image_pool"], MeanEmbedding) and tuple(
        blocks["text_pool"].provides
    ) == ("text_embedding",)
    assert (
        isinstance(blocks["dim_loss"], DimensionAlignmentLoss) and blocks["dim_loss"].weight == 10.0
    )
    assert (blocks["inter_loss"].kind, blocks["inter_loss"].weight) == ("inter", 0.05)
    assert (blocks["intra_loss"].kind, blocks["intra_loss"].weight) == ("intra", 0.1)
    assert blocks["loss"].miner is None
    with_miner = dict(presets.build("dias", train, embed_dim=16, word_dim=8, miner=True))
    assert (
        isinstance(with_miner["loss"].miner, DistanceWeightedMiner)
        and with_miner["loss"].miner.dim == 16
    )


def test_dias_losses_ablations():
    names = [n for n, _ in presets.dias_losses(dimension=False, intra=False)]
    assert names == ["image_pool", "text_pool", "inter_loss"]
    assert [n for n, _ in presets.dias_losses(pool=False, inter=False, intra=False)] == ["dim_loss"]
    assert all(
        not b.sparse
        for n, b in presets.dias_losses(sparse=False)
        if isinstance(b, SpatialConstraintLoss)
    )
    # The inter- and intra-modality sparsity ablations, one at a time.
    blocks = dict(presets.dias_losses(inter_sparse=False))
    assert (blocks["inter_loss"].sparse, blocks["intra_loss"].sparse) == (False, True)
    blocks = dict(
        presets.dias_losses(
            intra_sparse=False, mask_rule="intent", correlation="pearson", dim_objective="intuitive"
        )
    )
    assert (blocks["inter_loss"].sparse, blocks["intra_loss"].sparse) == (True, False)
    assert blocks["inter_loss"].rule == "intent" and blocks["dim_loss"].correlation == "pearson"
    assert blocks["dim_loss"].objective == "intuitive"


def test_dias_preset_trains_with_repeated_images_in_a_batch(train):
    # Every image of the toy set has 5 captions: batches hold repeated image rows and the spatial
    # constraints read positives.
    m = Matcher(
        presets.build(
            "dias", train, embed_dim=16, word_dim=8, hardest=False, miner=True, scorer="local"
        ),
        epochs=1,
        batch_size=40,
        lr=1e-3,
        verbose=False,
        device="cpu",
    ).fit(train)
    last = m.history_[-1]
    assert {"loss/loss", "loss/dim_loss", "loss/inter_loss", "loss/intra_loss"} <= set(last)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in last.items() if k.startswith("loss/"))


def test_one_line_on_chan_trains_scores_without_the_losses_and_round_trips(train, tmp_path):
    components = (
        presets.build("chan", train, embed_dim=16, word_dim=8, hardest=False)
        + presets.dias_losses()
    )
    m = Matcher(components, epochs=1, batch_size=40, lr=1e-3, verbose=False, device="cpu")
    plan = m.validate()
    # The pooled embeddings feed only the losses: evaluation never runs them.
    img, txt, pair = m.fit(train)._eval_plan()
    assert not {plan.names.index("image_pool"), plan.names.index("text_pool")} & set(
        img + txt + pair
    )
    assert {"loss/dim_loss", "loss/inter_loss", "loss/intra_loss"} <= set(m.history_[-1])
    assert all(
        torch.isfinite(torch.tensor(v)) for k, v in m.history_[-1].items() if k.startswith("loss/")
    )
    sims = m.similarity(train.images[:3], train.captions[:4])
    assert sims.shape == (3, 4)
    m.save(tmp_path / "model")
    back = Matcher.load(tmp_path / "model")
    torch.testing.assert_close(back.similarity(train.images[:3], train.captions[:4]), sims)
    torch.testing.assert_close(
        back.components_["inter_loss"].learned_beta, m.components_["inter_loss"].learned_beta
    )


@pytest.mark.parametrize("name", ["vsepp", "dias"])
def test_presets_train_and_score_under_bf16_autocast_on_cpu(train, name):
    # Under autocast the GRU's words stay float32 while the projected regions are bfloat16: the
    # blocks that combine them (GlobalCosine, DimensionAlignmentLoss, the spatial constraints)
    # promote both to their common dtype instead of refusing the pair.
    m = Matcher(
        presets.build(name, train, embed_dim=16, word_dim=8),
        epochs=1,
        batch_size=20,
        verbose=False,
        device="cpu",
        precision="bf16",
    ).fit(train)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in m.history_[-1].items() if "loss" in k)
    s = m.similarity(train.images[:4], train.captions[:6])
    assert s.shape == (4, 6) and bool(torch.isfinite(s).all())


def test_mixed_dtypes_are_promoted_under_autocast_only():
    from imtm.components import GlobalCosine
    from imtm.functional import dimension_alignment_loss
    from imtm.tokens import Tokens

    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(3, 4, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    want = GlobalCosine()(Tokens(v), Tokens(t))
    want_loss = dimension_alignment_loss(v.mean(1), t.mean(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = GlobalCosine()(Tokens(v.bfloat16()), Tokens(t))
        got_loss = dimension_alignment_loss(v.mean(1).bfloat16(), t.mean(1))
    # (the products inside run in bfloat16, autocast's dtype, so bfloat16 tolerances)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)
    torch.testing.assert_close(got_loss.float(), want_loss, atol=5e-2, rtol=5e-2)
    with pytest.raises(TypeError, match="cast one to the other's dtype"):
        GlobalCosine()(Tokens(v.bfloat16()), Tokens(t))
    with pytest.raises(TypeError, match="cast one to the other's dtype"):
        dimension_alignment_loss(v.mean(1).bfloat16(), t.mean(1))
