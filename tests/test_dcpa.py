"""DCPA end to end: the preset, its two stages, and the two direction-specific score matrices."""

import pytest
import torch

from imtm import Component, Matcher, Stage, Tokens, presets
from imtm.components import ScoreFusion, TripletLoss
from imtm.data import ImageCaptionDataset, synthetic

SMALL = {"embed_dim": 8, "word_dim": 8, "heads": 2, "hardest": False}


@pytest.fixture(scope="module")
def data():
    return synthetic.load(view="regions", seed=0, n_train=12, n_dev=4, n_test=6)


def test_preset_plans(data):
    train = data[0]
    m = Matcher(presets.build("dcpa", train, **SMALL), stages=presets.dcpa_stages(1, 1))
    plan = m.validate()
    assert plan.score_values == ("scores_i2t", "scores_t2i")
    # Stage 1 needs neither branch; evaluation runs both.
    assert "inter_i2t" not in [plan.names[k] for k in plan.needed_for(["intra_loss"])]
    assert {"inter_i2t", "inter_t2i"} <= {plan.names[k] for k in plan.needed_for(plan.score_values)}
    sym = Matcher(
        presets.build("dcpa", train, decoupled=False, **SMALL), stages=presets.dcpa_stages(1, 1)
    )
    assert sym.validate().score_values == ("scores",)
    assert [s.train for s in presets.dcpa_stages()] == [
        ["image", "text", "visual_phrases", "text_phrase"],
        ["inter_i2t", "inter_t2i"],
    ]
    # The CLI's split of its epochs: the first half (rounded up) for stage 1; one stage for other presets.
    assert [(s.name, s.epochs) for s in presets.default_stages("dcpa", 5)] == [
        ("intra", 3),
        ("inter", 2),
    ]
    assert presets.default_stages("chan", 5) is None


def test_stage_two_leaves_stage_one_weights_bit_identical(data):
    train = data[0]

    def fit(stages):
        # A large weight decay: a frozen parameter left in AdamW would visibly shrink.
        m = Matcher(
            presets.build("dcpa", train, **SMALL),
            stages=stages,
            batch_size=16,
            lr=1e-2,
            weight_decay=0.5,
            random_state=0,
            verbose=False,
            checkpoint_dir=None,
        )
        return m.fit(train)

    stage1, stage2 = presets.dcpa_stages(1, 2)
    after_one = fit([stage1]).components_.state_dict()
    after_two = fit([stage1, stage2]).components_.state_dict()
    init = (
        Matcher(
            presets.build("dcpa", train, **SMALL),
            stages=[Stage(epochs=0)],
            random_state=0,
            verbose=False,
        )
        .fit(train)
        .components_.state_dict()
    )
    for key, value in after_two.items():
        block = key.split(".")[0]
        if block in stage1.train:
            assert torch.equal(value, after_one[key]), key  # frozen in stage 2: bit-identical
        elif block in stage2.train:
            assert torch.equal(after_one[key], init[key]), key  # untouched by stage 1
            assert not torch.equal(value, after_one[key]), key  # trained by stage 2


class _OneHotImages(Component):
    """Image i of the toy set is the one-hot region e_i."""

    requires = ("images",)
    provides = ("image_tokens",)

    def forward(self, images):
        return images


class _OneHotCaptions(Component):
    """Caption 'c{i}' is the one-hot word e_i."""

    requires = ("texts",)
    provides = ("text_tokens",)

    def __init__(self, n: int = 4, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.n = n

    def forward(self, texts):
        ids = torch.tensor([int(t[1:]) for t in texts])
        return Tokens(torch.nn.functional.one_hot(ids, self.n).float()[:, None, :])


class _OppositeBranches(Component):
    """A perfect image-to-text branch and a perfectly wrong text-to-image branch."""

    requires = ("image_tokens", "text_tokens")
    provides = ("scores_intra", "scores_inter_i2t", "scores_inter_t2i")

    def forward(self, images, texts):
        match = images.feats[:, 0] @ texts.feats[:, 0].t()
        return torch.zeros_like(match), match, -match


def test_each_direction_ranks_with_its_own_matrix():
    n = 4
    images = [torch.nn.functional.one_hot(torch.tensor([i]), n).float() for i in range(n)]
    captions = [f"c{i}" for i in range(n) for _ in range(2)]
    c2i = [i for i in range(n) for _ in range(2)]
    data = ImageCaptionDataset(images, captions, c2i, name="opposite")
    blocks = [
        _OneHotImages(),
        _OneHotCaptions(n),
        _OppositeBranches(),
        ScoreFusion(),
        TripletLoss(requires=("scores_inter_i2t", "scores_inter_t2i", "positives")),
    ]
    m = Matcher(blocks, epochs=0, image_block=3, text_block=5, verbose=False).fit(data)
    s_i2t, s_t2i = m.similarity(images, captions)
    positives = torch.tensor(c2i)[None, :] == torch.arange(n)[:, None]
    torch.testing.assert_close(s_i2t, 0.4 * positives.float())
    torch.testing.assert_close(s_t2i, -0.4 * positives.float())
    res = m.evaluate(data)
    # Captions are ranked with scores_i2t (perfect), images with scores_t2i (own image last).
    assert res["i2t_r1"] == 100.0 and res["t2i_r1"] == 0.0 and res["t2i_meanr"] == n


def test_similarity_blocked_equals_one_block(data):
    train, _, test = data
    m = Matcher(
        presets.build("dcpa", train, **SMALL),
        stages=presets.dcpa_stages(1, 1),
        batch_size=16,
        random_state=0,
        verbose=False,
    ).fit(train)
    m.set_params(image_block=2, text_block=7)
    small = m.similarity(test.images, test.captions)
    m.set_params(image_block=100, text_block=1000)
    whole = m.similarity(test.images, test.captions)
    assert isinstance(whole, torch.Tensor) and whole.shape == (
        2,
        len(test.images),
        len(test.captions),
    )
    for a, b in zip(small, whole):
        torch.testing.assert_close(a, b)
    # The same numbers as a training step's forward pass on the whole split at once.
    blocks = m.components_
    with torch.no_grad():
        from imtm.data.collate import collate_images, collate_texts

        img = blocks["image"](collate_images(list(test.images)))
        txt = blocks["text"](collate_texts(list(test.captions)))
        intra = blocks["intra"](blocks["visual_phrases"](img), blocks["text_phrase"](txt))
        i2t, t2i = blocks["fusion"](
            intra, blocks["inter_i2t"](img, txt), blocks["inter_t2i"](img, txt)
        )
    torch.testing.assert_close(whole[0], i2t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole[1], t2i, rtol=1e-5, atol=1e-6)


def test_save_and_load_round_trip(data, tmp_path):
    train, _, test = data
    m = Matcher(
        presets.build("dcpa", train, decoupled=False, **SMALL),
        stages=presets.dcpa_stages(1, 1),
        batch_size=16,
        random_state=0,
        verbose=False,
    ).fit(train)
    loaded = Matcher.load(m.save(tmp_path / "dcpa"))
    assert loaded.components_["inter_t2i"].provides == ("scores_inter_t2i",)
    assert loaded.components_["fusion"].weights == m.components_["fusion"].weights
    torch.testing.assert_close(
        loaded.similarity(test.images, test.captions), m.similarity(test.images, test.captions)
    )


def test_each_stage_sums_the_negatives_for_dcpas_warm_up(data):
    """Both triplet losses take the hardest negative only from epoch DCPA_WARMUP_EPOCHS of their stage on."""
    from imtm.engine.epochs import start_epoch

    blocks = torch.nn.ModuleDict(
        dict(presets.build("dcpa", data[0], embed_dim=8, word_dim=8, heads=2))
    )
    assert presets.DCPA_WARMUP_EPOCHS == 2 > presets.WARMUP_EPOCHS
    for epoch in range(4):
        start_epoch(blocks, epoch)
        hardest = epoch >= presets.DCPA_WARMUP_EPOCHS
        assert blocks["intra_loss"].hardest_now is hardest
        assert blocks["inter_loss"].hardest_now is hardest
    assert not dict(presets.dcpa(vocab=data[0].vocab, region_dim=8, hardest=False))[
        "intra_loss"
    ].hardest


@pytest.mark.parametrize(
    ("preset", "flags", "expected"),
    [("dcpa", [], 32), ("dcpa", ["--batch-size", "8"], 8), ("laps", [], 32), ("chan", [], 128)],
)
def test_imtm_train_batch_size_default_per_preset(monkeypatch, tmp_path, preset, flags, expected):
    # DCPA's and LAPS's scorers run a network per image-caption pair (O(B^2) per step): imtm train
    # gives them batches of 32 unless --batch-size says otherwise; the other presets keep 128.
    from imtm import Matcher, cli

    seen = {}

    def fit(self, *args, **kwargs):
        seen["batch_size"] = self.batch_size
        raise SystemExit(0)  # built and about to train: nothing more to check

    monkeypatch.setenv("IMTM_SYNTHETIC", "n_train=20,n_dev=5,n_test=5")
    monkeypatch.setattr(Matcher, "fit", fit)
    with pytest.raises(SystemExit):
        cli.main(
            ["train", "--preset", preset, "--data", "synthetic", "--epochs", "2", "--quiet"]
            + ["--embed-dim", "16", "--word-dim", "8", "--out", str(tmp_path / "run"), *flags]
        )
    assert seen["batch_size"] == expected
    assert presets.default_batch_size(preset) == presets.TRAIN_BATCH_SIZES.get(preset, 128)
    assert presets.TRAIN_BATCH_SIZES == {"dcpa": 32, "laps": 32}
