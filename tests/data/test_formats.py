"""imtm.data.load_dataset: every format by name, the same split read from each, and the new readers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from imtm.data import CocoCaptionsDataset, Flickr30kTokenDataset, load_dataset
from imtm.data.flickr30k_token import parse_token_lines
from imtm.data.formats import FORMATS, SYNTHETIC_ENV, synthetic_sizes
from tests import tiny_formats

RAW = ["karpathy", "caption-files", "albef", "csv", "coco", "flickr30k-token"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_formats.layout(tmp_path_factory.mktemp("formats"))


def _expected(tiny, split):
    items = tiny["items"][split]
    caps = [c for _, cs in items for c in cs]
    c2i = [i for i, (_, cs) in enumerate(items) for _ in cs]
    files = [str(tiny["images"] / f) for f, _ in items]
    return caps, c2i, files


@pytest.mark.parametrize("fmt", RAW)
def test_every_raw_format_reads_the_same_test_split(tiny, fmt):
    ds = load_dataset(tiny["sources"][fmt], fmt, "test", image_root=tiny["images"])
    caps, c2i, files = _expected(tiny, "test")
    assert ds.captions == caps
    assert ds.caption_to_image.tolist() == c2i
    assert [os.path.normpath(p) for p in ds.image_paths] == files
    assert ds[0]["images"].shape == (3, 32, 32)


@pytest.mark.parametrize("fmt", ["karpathy", "caption-files", "albef", "csv"])
def test_formats_with_splits_give_train_dev_test_sharing_the_training_vocabulary(tiny, fmt):
    train, dev, test = load_dataset(tiny["sources"][fmt], fmt, image_root=tiny["images"])
    for ds, split in ((train, "train"), (dev, "dev"), (test, "test")):
        assert ds.captions == _expected(tiny, split)[0]
    assert train.vocab is not None and dev.vocab is train.vocab and test.vocab is train.vocab
    assert train.vocab.encode_batch(["a red square"]) is not None


def test_a_coco_folder_serves_its_val_file_as_dev_and_test(tiny):
    train, dev, test = load_dataset(tiny["sources"]["coco"], "coco", image_root=tiny["images"])
    assert train.captions == _expected(tiny, "train")[0]
    assert dev.captions == test.captions == _expected(tiny, "test")[0]


def test_a_single_file_is_the_training_split_with_no_dev_or_test(tiny):
    train, dev, test = load_dataset(
        tiny["sources"]["flickr30k-token"], "flickr30k-token", image_root=tiny["images"]
    )
    assert train.captions == _expected(tiny, "test")[0] and dev is None and test is None
    assert train.vocab is not None


def test_precomp_and_synthetic_by_name_and_by_default(tmp_path):
    for split, n in (("train", 4), ("dev", 2), ("test", 2)):
        np.save(
            tmp_path / f"{split}_ims.npy",
            np.random.default_rng(0).normal(size=(n, 3, 8)).astype(np.float32),
        )
        (tmp_path / f"{split}_caps.txt").write_text(
            "".join(f"caption {split} {k}\n" for k in range(2 * n))
        )
    train, dev, test = load_dataset(tmp_path, "precomp")
    assert (train.n_images, dev.n_images, test.n_images) == (4, 2, 2) and test.vocab is train.vocab
    assert load_dataset(tmp_path).__class__ is tuple  # a folder is read as precomp
    assert load_dataset(tmp_path, "precomp", "val").captions == dev.captions
    s_train, _, s_test = load_dataset("synthetic", sizes={"n_train": 6, "n_dev": 2, "n_test": 3})
    assert s_train.n_images == 6 and s_test.n_images == 3 and s_train.images[0].dim() == 2
    pixels = load_dataset(
        "synthetic",
        split="test",
        view="pixels",
        sizes={"n_train": 2, "n_dev": 2, "n_test": 3, "image_size": 24},
    )
    assert pixels.images[0].shape == (3, 24, 24)


def test_the_environment_shrinks_the_synthetic_benchmark(monkeypatch):
    monkeypatch.setenv(SYNTHETIC_ENV, "n_train=5, n_test=3")
    assert synthetic_sizes({"n_train": 4000, "n_dev": 2}) == {"n_train": 5, "n_dev": 2, "n_test": 3}
    train, dev, test = load_dataset("synthetic", sizes={"n_train": 4000, "n_dev": 2})
    assert (train.n_images, dev.n_images, test.n_images) == (5, 2, 3)
    monkeypatch.setenv(SYNTHETIC_ENV, "n_trian=5")
    with pytest.raises(ValueError, match="n_trian=5.*Did you mean 'n_train'"):
        synthetic_sizes()
    monkeypatch.setenv(SYNTHETIC_ENV, "n_train=many")
    with pytest.raises(ValueError, match="n_train must be a number"):
        synthetic_sizes()


def test_bad_specs_say_what_to_pass(tiny, tmp_path):
    with pytest.raises(
        ValueError,
        match="--format must be one of: synthetic, precomp, karpathy.*Did you mean 'csv'",
    ):
        load_dataset(tiny["sources"]["csv"], "cvs")
    with pytest.raises(
        ValueError, match="needs --format, one of: synthetic, precomp, karpathy, caption-files"
    ):
        load_dataset(tiny["sources"]["karpathy"])
    with pytest.raises(FileNotFoundError, match="PrecompDataset: missing"):
        load_dataset(tiny["sources"]["albef"])  # a folder without --format: the precomputed layout
    with pytest.raises(ValueError, match="karpathy: pass --image-root"):
        load_dataset(tiny["sources"]["karpathy"], "karpathy")
    with pytest.raises(FileNotFoundError, match="no file or folder"):
        load_dataset(tmp_path / "absent", "csv")
    with pytest.raises(FileNotFoundError, match="no .csv/.tsv split files"):
        load_dataset(tmp_path, "csv")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("synthetic", split="tset")
    with pytest.raises(ValueError, match="pass --data synthetic"):
        load_dataset(tmp_path, "synthetic")
    with pytest.raises(ValueError, match="holds features, not images"):
        load_dataset(tmp_path, "precomp", transform=lambda im: im)
    assert set(FORMATS) == {"synthetic", "precomp", *RAW}


def test_coco_reader_groups_captions_by_image_in_image_order(tmp_path):
    ann = {
        "images": [
            {"id": 7, "file_name": "b.jpg"},
            {"id": 3, "file_name": "a.jpg"},
            {"id": 9, "file_name": "c.jpg"},
        ],
        "annotations": [
            {"id": 1, "image_id": 3, "caption": "a1"},
            {"id": 2, "image_id": 7, "caption": " b1 "},
            {"id": 3, "image_id": 3, "caption": "a2"},
            {"id": 4, "image_id": 7, "caption": "b2"},
        ],
    }
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(ann))
    ds = CocoCaptionsDataset(path, tmp_path / "val2017")
    # A plain loop over the file: images in 'images' order, each with its captions in file order.
    expected = [
        (i["id"], a["caption"].strip())
        for i in ann["images"]
        for a in ann["annotations"]
        if a["image_id"] == i["id"]
    ]
    assert ds.captions == [c for _, c in expected]
    assert ds.image_ids_external == [7, 3]  # image 9 has no caption: left out
    assert ds.caption_to_image.tolist() == [0, 0, 1, 1]
    assert ds.image_paths == [
        str(tmp_path / "val2017" / "b.jpg"),
        str(tmp_path / "val2017" / "a.jpg"),
    ]
    assert CocoCaptionsDataset(path, captions_per_image=1).captions == ["b1", "a1"]
    with pytest.raises(ValueError, match="image id 9 .* has no caption"):
        CocoCaptionsDataset(path, skip_uncaptioned=False)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([1, 2], "must be a COCO caption file"),
        (
            {"images": [{"id": "x", "file_name": "a.jpg"}], "annotations": []},
            r"images\[0\].*has id 'x'",
        ),
        (
            {"images": [{"id": 1, "file_name": ""}], "annotations": []},
            "expected an image file name",
        ),
        (
            {
                "images": [{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}],
                "annotations": [],
            },
            "repeats image id 1",
        ),
        (
            {
                "images": [{"id": 1, "file_name": "a"}],
                "annotations": [{"image_id": 2, "caption": "x"}],
            },
            r"annotations\[0\].*image_id 2",
        ),
        (
            {
                "images": [{"id": 1, "file_name": "a"}],
                "annotations": [{"image_id": 1, "caption": "  "}],
            },
            "empty caption",
        ),
        (
            {"images": [{"id": 1, "file_name": "a"}], "annotations": [{"caption": "x"}]},
            "needs 'image_id' and 'caption'",
        ),
        ({"images": [{"id": 1, "file_name": "a"}], "annotations": []}, "holds no captions"),
    ],
)
def test_coco_reader_names_the_bad_entry(tmp_path, bad, match):
    path = tmp_path / "captions_x.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=match):
        CocoCaptionsDataset(path)


def test_flickr30k_token_reader_against_a_plain_parse(tmp_path):
    lines = [
        "1000092795.jpg#0\tTwo young guys with shaggy hair look at their hands .",
        "10002456.jpg#0\tSeveral men in hard hats .",
        "1000092795.jpg#1\tTwo young , White males are outside .",
        "10002456.jpg#1\tWorkers look down from up above .",
    ]
    path = tmp_path / "results_20130124.token"
    path.write_text("\n".join(lines) + "\n")
    ds = Flickr30kTokenDataset(path, tmp_path / "imgs")
    by_image: dict[str, list[str]] = {}
    for line in lines:
        key, caption = line.split("\t")
        by_image.setdefault(key.split("#")[0], []).append(caption)
    assert ds.captions == [c for cs in by_image.values() for c in cs]
    assert ds.image_ids_external == list(by_image)
    assert ds.caption_to_image.tolist() == [0, 0, 1, 1]
    sub = Flickr30kTokenDataset(
        path, tmp_path / "imgs", images=["10002456.jpg"], captions_per_image=1
    )
    assert sub.captions == ["Several men in hard hats ."]
    with pytest.raises(ValueError, match="not in results_20130124.token"):
        Flickr30kTokenDataset(path, images=["nope.jpg"])
    with pytest.raises(ValueError, match="fewer than captions_per_image=3"):
        Flickr30kTokenDataset(path, captions_per_image=3)


@pytest.mark.parametrize(
    "line, match",
    [
        ("1000092795.jpg#0 no tab here", "expected '<image file>#<caption number><TAB><caption>'"),
        ("1000092795.jpg\tno number", "expected '<image file>#"),
        ("1000092795.jpg#x\tbad number", "expected '<image file>#"),
        ("1000092795.jpg#0\t   ", "is an empty caption"),
    ],
)
def test_flickr30k_token_reader_names_the_bad_line(line, match):
    with pytest.raises(ValueError, match="line 2 of t.*" + match):
        parse_token_lines(["1.jpg#0\tfine .", line], "t")


def test_real_flickr30k_and_coco_captions_in_the_official_formats(shared_captions, tmp_path):
    """The real caption files, rewritten in the two official formats, read back caption for caption."""
    f30k = [
        line.strip()
        for line in (shared_captions / "f30k" / "test_caps.txt").read_text("utf-8").splitlines()
    ]
    ids = (shared_captions / "f30k" / "test_ids.txt").read_text().split()
    token = tmp_path / "results_20130124.token"
    counts: dict[str, int] = {}
    with open(token, "w", encoding="utf-8") as fh:
        for i, cap in zip(ids, f30k):
            fh.write(f"{i}.jpg#{counts.setdefault(i, 0)}\t{cap}\n")
            counts[i] += 1
    ds = Flickr30kTokenDataset(token)
    assert ds.n_images == 1000 and ds.captions == f30k
    assert torch.equal(torch.bincount(ds.caption_to_image), torch.full((1000,), 5))

    coco = [
        line.strip()
        for line in (shared_captions / "coco" / "testall_caps.txt").read_text("utf-8").splitlines()
    ]
    coco_ids = [int(x) for x in (shared_captions / "coco" / "testall_ids.txt").read_text().split()]
    unique = list(dict.fromkeys(coco_ids))
    ann = {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in unique],
        "annotations": [
            {"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(zip(coco_ids, coco))
        ],
    }
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(ann))
    ds = CocoCaptionsDataset(path, captions_per_image=5)
    assert ds.n_images == 5000 and ds.image_ids_external == unique
    # A plain regrouping: each image (first appearance) with its captions in file order.
    grouped = [c for cs in _group(coco_ids, coco).values() for c in cs]
    assert ds.captions == grouped


def _group(ids, captions) -> dict:
    out: dict = {}
    for i, c in zip(ids, captions):
        out.setdefault(i, []).append(c)
    return out
