"""imtm.viz: every picture renders to a PNG of the expected pixel size from a tiny matcher."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from imtm import Matcher, presets, viz
from imtm.data import synthetic
from imtm.viz.alignment import word_alignment

VIT = {"model_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 8}}


def png_size(path):
    """(width, height) read from the PNG header; fails unless the file is a non-empty PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    return struct.unpack(">II", data[16:24])


def expected_size(fig, dpi=100):
    w, h = fig.get_size_inches()
    return round(w * dpi), round(h * dpi)


def fit(components, train, epochs=1, **kw):
    return Matcher(
        components,
        epochs=epochs,
        batch_size=16,
        lr=2e-3,
        checkpoint_dir=None,
        verbose=False,
        random_state=0,
        **kw,
    ).fit(train)


@pytest.fixture(scope="module")
def regions():
    return synthetic.load(view="regions", seed=0, n_train=16, n_dev=2, n_test=6, region_dim=16)


@pytest.fixture(scope="module")
def pixels():
    return synthetic.load(view="pixels", seed=0, n_train=8, n_dev=2, n_test=4, image_size=32)


@pytest.fixture(scope="module")
def chan(regions):
    return fit(
        presets.build("chan", regions[0], embed_dim=16, word_dim=8, context_heads=2, hardest=False),
        regions[0],
    )


@pytest.fixture(scope="module")
def laps(pixels):
    return fit(
        presets.laps(
            vocab=pixels[0].vocab,
            text="gru",
            model_name="vit_tiny_patch16_224",
            img_size=32,
            embed_dim=16,
            word_dim=16,
            **VIT,
        ),
        pixels[0],
    )


def test_word_region_maps_chan(chan, regions, tmp_path):
    test = regions[2]
    picture, boxes = viz.synthetic_picture(test, 0)
    assert picture.shape == (64, 64, 3) and boxes.shape == (test.images[0].shape[0], 4)
    caption = test.captions[0]
    fig = viz.word_alignment_maps(
        chan, test.images[0], caption, picture=picture, boxes=boxes, cols=3, path=tmp_path / "a.png"
    )
    n_words = len(caption.lower().replace(",", " ,").replace(".", " .").split())
    rows = -(-n_words // 3)
    assert png_size(tmp_path / "a.png") == (3 * 200, rows * 200 + 40) == expected_size(fig)
    # Without a picture the boxes alone are drawn; without boxes, the words x regions matrix.
    viz.word_alignment_maps(chan, test.images[0], caption, boxes=boxes, path=tmp_path / "b.png")
    png_size(tmp_path / "b.png")
    fig = viz.word_alignment_maps(chan, test.images[0], caption, path=tmp_path / "m.png")
    assert len(fig.axes[0].get_yticklabels()) == n_words
    with pytest.raises(ValueError, match="expected boxes of shape"):
        viz.word_alignment_maps(chan, test.images[0], caption, boxes=boxes[:1])
    with pytest.raises(TypeError, match="caption must be a string"):
        viz.word_alignment_maps(chan, test.images[0], ["a caption"], boxes=boxes)


def test_word_alignment_is_the_cosine_loop():
    from imtm import Tokens

    img = Tokens.from_lengths(torch.randn(1, 6, 8), [5])
    img = Tokens(img.feats, img.mask, num_prefix_tokens=1)
    txt = Tokens.from_lengths(torch.randn(1, 4, 8), [3])
    got = word_alignment(img, txt)
    want = torch.tensor(
        [
            [
                float(
                    torch.nn.functional.cosine_similarity(txt.feats[0, i], img.feats[0, j], dim=0)
                )
                for j in range(1, 5)
            ]
            for i in range(3)
        ]
    )
    torch.testing.assert_close(got, want)


def test_laps_pictures(laps, pixels, tmp_path):
    test = pixels[2]
    image, caption = test.images[0], test.captions[0]
    fig = viz.kept_patches(laps, image, caption, ratios=(0.25, 0.5), path=tmp_path / "k.png")
    assert png_size(tmp_path / "k.png") == (3 * 220, 220 + 40) == expected_size(fig)
    fig = viz.patch_groups(laps, image, caption, path=tmp_path / "g.png")
    assert png_size(tmp_path / "g.png") == (2 * 260, 260 + 40) == expected_size(fig)
    fig = viz.word_alignment_maps(laps, image, caption, cols=4, path=tmp_path / "w.png")
    assert png_size(tmp_path / "w.png") == expected_size(fig)
    # The kept patches are the top-N_s of the block's own significance.
    slim = laps.components_["laps"]
    from imtm.viz.figure import encode_pair

    img, txt = encode_pair(laps, image, caption)
    a = viz.patch_significance(slim, img, txt)
    assert a.shape == (16,) and bool(((a >= 0) & (a <= 1)).all())
    with pytest.raises(ValueError, match=r"every ratio must be a number in \(0, 1\]"):
        viz.kept_patches(laps, image, caption, ratios=(0.0,))
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
        viz.patch_groups(laps, image, caption, ratio=2.0)
    with pytest.raises(ValueError, match="no block named 'slim'"):
        viz.patch_groups(laps, image, caption, block="slim")


def test_laps_pictures_need_a_patch_grid(chan, regions):
    with pytest.raises(ValueError, match="expected one PatchSlimming block"):
        viz.kept_patches(chan, regions[2].images[0], regions[2].captions[0])


def test_dcpa_topk_regions(regions, tmp_path):
    train, _, test = regions
    m = fit(
        presets.build("dcpa", train, embed_dim=16, word_dim=8, heads=2, k=3, hardest=False),
        train,
        stages=presets.default_stages("dcpa", 2),
    )
    picture, boxes = viz.synthetic_picture(test, 1)
    fig = viz.phrase_topk_regions(
        m, test.images[1], test.captions[5], boxes=boxes, picture=picture, path=tmp_path / "d.png"
    )
    assert png_size(tmp_path / "d.png") == (3 * 260, 260 + 40) == expected_size(fig)
    fig = viz.phrase_topk_regions(
        m, test.images[1], test.captions[5], boxes=boxes, inter_t2i=None, path=tmp_path / "d2.png"
    )
    assert png_size(tmp_path / "d2.png") == (2 * 260, 260 + 40)
    with pytest.raises(ValueError, match="expected boxes of shape"):
        viz.phrase_topk_regions(m, test.images[1], test.captions[5], boxes=boxes[:2])


def test_dias_pictures(regions, tmp_path):
    train, _, test = regions
    comps = presets.build("dias", train, embed_dim=16, word_dim=8, context_heads=2, hardest=False)
    before = fit(comps, train, epochs=0)
    after = fit(comps, train, epochs=1)
    images, captions = test.images, test.captions[::5]
    fig = viz.dimension_correlation_maps(
        {"before": before, "after": after}, images, captions, path=tmp_path / "c.png"
    )
    assert png_size(tmp_path / "c.png") == (600, 300) == expected_size(fig)
    fig = viz.spatial_distance_histograms(
        {"before": before, "after": after}, images, captions, path=tmp_path / "h.png"
    )
    assert png_size(tmp_path / "h.png") == (3 * 260, 260) == expected_size(fig)
    v, t = viz.matched_embeddings(after, images, captions)
    assert v.shape == t.shape == (len(images), 16)
    with pytest.raises(ValueError, match="pair up one to one"):
        viz.matched_embeddings(after, images, captions[:2])
    with pytest.raises(ValueError, match="at least 2 matched pairs"):
        viz.dimension_correlation_maps({"after": after}, images[:1], captions[:1])
    with pytest.raises(ValueError, match="at least 2 matched pairs"):
        viz.spatial_distance_histograms({"after": after}, images[:1], captions[:1])
    with pytest.raises(ValueError, match="at least one matcher"):
        viz.dimension_correlation_maps({}, images, captions)
    with pytest.raises(ValueError, match="gives no Tokens named 'nope'"):
        viz.matched_embeddings(after, images, captions, image_value="nope")


def test_retrieval_pictures(chan, regions, tmp_path):
    test = regions[2]
    fig = viz.recall_curves({"chan": chan}, test, ks=(1, 5, 10), path=tmp_path / "r.png")
    assert png_size(tmp_path / "r.png") == (600, 300) == expected_size(fig)
    fig = viz.retrieved_examples(chan, test, 0, direction="t2i", path=tmp_path / "t.png")
    assert png_size(tmp_path / "t.png") == (5 * 200, 240) == expected_size(fig)
    fig = viz.retrieved_examples(chan, test, 0, direction="i2t", path=tmp_path / "i.png")
    assert png_size(tmp_path / "i.png") == (1000, 240) == expected_size(fig)
    with pytest.raises(ValueError, match="direction must be 'i2t' or 't2i'"):
        viz.retrieved_examples(chan, test, 0, direction="x2y")
    with pytest.raises(ValueError, match=r"query must be an index in \[0, 6\)"):
        viz.retrieved_examples(chan, test, 6)
    with pytest.raises(ValueError, match="top must be a positive int"):
        viz.retrieved_examples(chan, test, 0, top=0)
    with pytest.raises(ValueError, match="ks must be positive ints"):
        viz.recall_curves({"chan": chan}, test, ks=(0,))
    with pytest.raises(TypeError, match="has no 'images'"):
        viz.recall_curves({"chan": chan}, object())


def test_recall_at_k_against_a_loop():
    g = torch.Generator().manual_seed(0)
    sims = torch.randn(4, 8, generator=g)
    c2i = torch.arange(8) // 2
    rec = viz.recall_at_k(sims, c2i, [1, 3])
    for n, k in enumerate([1, 3]):
        hits = [
            any(int(c2i[t]) == i for t in sims[i].argsort(descending=True)[:k]) for i in range(4)
        ]
        assert rec["i2t"][n] == pytest.approx(100 * np.mean(hits))
        hits = [int(c2i[t]) in sims[:, t].argsort(descending=True)[:k].tolist() for t in range(8)]
        assert rec["t2i"][n] == pytest.approx(100 * np.mean(hits))


def test_pictures_inputs():
    assert viz.as_picture(torch.ones(3, 4, 5)).shape == (4, 5, 3)
    assert viz.as_picture(np.full((4, 5, 3), 255, dtype=np.uint8)).max() == 1.0
    with pytest.raises(ValueError, match=r"expected a picture of shape \(3, H, W\)"):
        viz.as_picture(torch.ones(4, 5))
    with pytest.raises(TypeError, match="expected a synthetic split"):
        viz.synthetic_picture(object(), 0)
    with pytest.raises(ValueError, match="not fitted"):
        viz.kept_patches(Matcher([]), torch.ones(3, 8, 8), "a")


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *args, **kw):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    from imtm.viz.figure import new_figure

    with pytest.raises(ImportError, match=r'pip install "imtm\[viz\]"'):
        new_figure(1)


def test_ela_patch_lexicon(tmp_path):
    from imtm.components.encoders.hf_text import write_local_bert

    train, _, test = synthetic.load(
        view="pixels", seed=0, n_train=8, n_dev=2, n_test=2, image_size=24
    )
    folder = write_local_bert(
        tmp_path / "bert", train.captions + test.captions, hidden_size=16, num_layers=1, num_heads=2
    )
    comps = presets.ela(
        text_model=str(folder),
        image_model="vit_tiny_patch16_224",
        img_size=24,
        embed_dim=16,
        heads=2,
        cross_layers=1,
        rerank_k=2,
        **VIT,
    )
    m = Matcher(
        comps, epochs=1, batch_size=8, checkpoint_dir=None, verbose=False, random_state=0
    ).fit(train)
    # words of a tokenizer model are its own word pieces, found without naming the text block
    from imtm.viz.figure import caption_words, encode_pair

    _, txt = encode_pair(m, test.images[0], test.captions[0])
    pieces = caption_words(m, test.captions[0], txt)
    text = m.components_["text"]
    ids = text.tokenize([test.captions[0]])
    assert set(pieces) <= set(text.tokenizer.convert_ids_to_tokens(ids.feats[0].tolist()))
    assert not any(p.startswith("#") and p[1:].isdigit() for p in pieces)
    fig = viz.patch_lexicon_words(
        m, test.images[0], test.captions[0], top=3, path=tmp_path / "e.png"
    )
    assert png_size(tmp_path / "e.png") == (600, 340) == expected_size(fig)
    with pytest.raises(ValueError, match="top must be a positive int"):
        viz.patch_lexicon_words(m, test.images[0], test.captions[0], top=0)
    with pytest.raises(ValueError, match="has no tokenizer"):
        viz.patch_lexicon_words(m, test.images[0], test.captions[0], text_block="itc")


# ---------------------------------------------------------------------- formats, ax=, colour bars, boxes


def open_written(path):
    """Open a written figure in its own format; return its size (PNG pixels, PDF/SVG points)."""
    import re
    import xml.etree.ElementTree as ET

    from PIL import Image

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        with Image.open(path) as im:
            assert im.format == "PNG"
            im.load()  # decodes every pixel: a truncated file fails here
            return im.size
    if suffix == ".pdf":
        data = path.read_bytes()
        assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
        assert re.search(rb"/Type\s*/Page\b", data) and b"startxref" in data and b"/Root" in data
        box = re.search(rb"/MediaBox\s*\[\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*\]", data)
        return round(float(box.group(3))), round(float(box.group(4)))
    root = ET.parse(path).getroot()  # fails unless the SVG is well-formed XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.find(".//{http://www.w3.org/2000/svg}g") is not None
    return tuple(round(float(root.get(k).removesuffix("pt"))) for k in ("width", "height"))


def check_formats(draw, tmp_path, name):
    """``draw(path=...)`` in every format: each file opens in its format at the figure's size."""
    for suffix in (".png", ".pdf", ".svg"):
        fig = draw(path=tmp_path / f"{name}{suffix}")
        w, h = fig.get_size_inches()
        got = open_written(tmp_path / f"{name}{suffix}")
        if suffix == ".png":
            # figsize * dpi pixels; matplotlib before 3.11 truncates it, rounding error included
            # (0.35 in per word * 14 words * 100 dpi = 489.99999999999994 pixels: 489, 490 later).
            assert got[0] in {int(w * 100), round(w * 100)}, (name, suffix, got, w)
            assert got[1] in {int(h * 100), round(h * 100)}, (name, suffix, got, h)
        else:
            assert got == (round(w * 72), round(h * 72)), (name, suffix)
    return fig


def colorbar_labels(fig):
    """The labels of the figure's colour bars (colour-bar axes carry a ``_colorbar``)."""
    return [a.get_ylabel() for a in fig.get_axes() if hasattr(a, "_colorbar")]


def test_every_figure_in_every_format_with_colour_bars(chan, laps, regions, pixels, tmp_path):
    test = regions[2]
    picture, boxes = viz.synthetic_picture(test, 0)
    image, caption = test.images[0], test.captions[0]
    fig = check_formats(
        lambda **kw: viz.word_alignment_maps(
            chan, image, caption, picture=picture, boxes=boxes, **kw
        ),
        tmp_path,
        "words",
    )
    assert colorbar_labels(fig) == ["cosine of word and region"]
    fig = check_formats(
        lambda **kw: viz.word_alignment_maps(chan, image, caption, **kw), tmp_path, "matrix"
    )
    assert colorbar_labels(fig) == [
        "cosine of word and region"
    ]  # no boxes: the words x regions matrix
    ptest = pixels[2]
    fig = check_formats(
        lambda **kw: viz.word_alignment_maps(laps, ptest.images[0], ptest.captions[0], **kw),
        tmp_path,
        "patches",
    )
    assert colorbar_labels(fig) == ["cosine of word and patch"]
    fig = check_formats(
        lambda **kw: viz.kept_patches(laps, ptest.images[0], ptest.captions[0], **kw),
        tmp_path,
        "kept",
    )
    assert colorbar_labels(fig) == ["significance a (Eq. 1)"]
    fig = check_formats(
        lambda **kw: viz.patch_groups(laps, ptest.images[0], ptest.captions[0], **kw),
        tmp_path,
        "groups",
    )
    assert colorbar_labels(fig) == []  # colours name groups, not values
    pairs = (test.images, test.captions[::5])
    fig = check_formats(
        lambda **kw: viz.dimension_correlation_maps({"a": chan, "b": chan}, *pairs, **kw),
        tmp_path,
        "corr",
    )
    assert colorbar_labels(fig) == ["correlation C_kl (Eq. 4)"]
    check_formats(
        lambda **kw: viz.spatial_distance_histograms({"a": chan}, *pairs, **kw), tmp_path, "hist"
    )
    check_formats(lambda **kw: viz.recall_curves({"a": chan}, test, **kw), tmp_path, "recall")
    check_formats(lambda **kw: viz.retrieved_examples(chan, test, 0, **kw), tmp_path, "i2t")
    check_formats(
        lambda **kw: viz.retrieved_examples(chan, test, 0, direction="t2i", **kw), tmp_path, "t2i"
    )
    with pytest.raises(ValueError, match=r"must end in one of \['.pdf', '.png', '.svg'\]"):
        viz.recall_curves({"a": chan}, test, path=tmp_path / "recall.jpeg")
    assert not (tmp_path / "recall.jpeg").exists()


def test_figures_draw_into_the_callers_axes(chan, regions, tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    test = regions[2]
    mine = Figure(figsize=(8, 3), layout="constrained")
    FigureCanvasAgg(mine)
    left, right = mine.add_subplot(1, 2, 1), mine.add_subplot(1, 2, 2)
    left.plot([0, 1], [0, 1])
    # a two-panel picture in the place of one axes: the caller's figure comes back, the other axes stay
    out = viz.recall_curves({"chan": chan}, test, ax=right, path=tmp_path / "mine.svg")
    assert out is mine and left in mine.get_axes() and right not in mine.get_axes()
    assert len(mine.subfigs) == 1 and len(mine.subfigs[0].axes) == 2
    assert open_written(tmp_path / "mine.svg") == (8 * 72, 3 * 72)
    # one Axes per panel, as a list
    mine2 = Figure(figsize=(6, 2))
    FigureCanvasAgg(mine2)
    axes = [mine2.add_subplot(1, 3, k + 1) for k in range(3)]
    assert (
        viz.spatial_distance_histograms({"chan": chan}, test.images, test.captions[::5], ax=axes)
        is mine2
    )
    assert all(a.get_title() for a in axes)
    # a one-panel picture draws in the axes itself
    mine3 = Figure()
    FigureCanvasAgg(mine3)
    ax = mine3.add_subplot()
    assert (
        viz.word_alignment_maps(chan, test.images[0], test.captions[0], ax=ax) is mine3
        and ax.images
    )
    with pytest.raises(TypeError, match="a list of 3 Axes"):
        viz.spatial_distance_histograms(
            {"chan": chan}, test.images, test.captions[::5], ax=axes[:2]
        )
    with pytest.raises(ValueError, match="an axes from a grid"):
        viz.recall_curves({"chan": chan}, test, ax=mine3.add_axes((0.1, 0.1, 0.3, 0.3)))


def test_region_boxes_from_butd_tsv_and_npy(chan, regions, tmp_path):
    import base64

    test = regions[2]
    _, boxes = viz.synthetic_picture(test, 0)
    n = len(boxes)
    b64 = base64.b64encode(np.asarray(boxes, dtype=np.float32).tobytes()).decode()
    feats = base64.b64encode(np.zeros((n, 4), dtype=np.float32).tobytes()).decode()
    tsv = tmp_path / "butd.tsv"
    tsv.write_text(
        f"391895\t64\t64\t{n}\t{b64}\t{feats}\n42\t64\t64\t1\t"
        f"{base64.b64encode(np.array([0, 0, 8, 8], np.float32).tobytes()).decode()}\t{feats}\n"
    )
    ids, read = viz.read_boxes(tsv, with_ids=True)
    assert ids == ["391895", "42"] and read[1].tolist() == [[0.0, 0.0, 8.0, 8.0]]
    np.testing.assert_allclose(read[0], boxes, rtol=0, atol=1e-4)
    np.save(tmp_path / "boxes.npy", np.stack([boxes, boxes]))
    assert len(viz.read_boxes(tmp_path / "boxes.npy")) == 2
    fig = viz.word_alignment_maps(
        chan, test.images[0], test.captions[0], boxes=read[0], path=tmp_path / "b.pdf"
    )
    assert colorbar_labels(fig) and open_written(tmp_path / "b.pdf")
    bad = tmp_path / "bad.tsv"
    bad.write_text(f"1\t64\t64\t3\t{b64}\t{feats}\n")
    with pytest.raises(ValueError, match="num_boxes=3 but the boxes field holds"):
        viz.read_boxes(bad)
    np.save(tmp_path / "obj.npy", np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"expected numbers of shape \(n_images, N, 4\)"):
        viz.read_boxes(tmp_path / "obj.npy")
    with pytest.raises(ValueError, match="expected a bottom-up-attention '.tsv' or a '.npy'"):
        viz.read_boxes(tmp_path / "boxes.json")
