import json

import pytest
import torch
from raw_images import write_karpathy
from torch.testing import assert_close

from imtm.data import KarpathyDataset, collate
from imtm.data.transforms import image_transform


def test_flickr_round_trip(tmp_path):
    path, images, entries = write_karpathy(tmp_path)
    ds = KarpathyDataset(path, images, "test")
    test = [e for e in entries if e["split"] == "test"]
    assert ds.n_images == len(test) and ds.n_captions == 5 * len(test)
    assert ds.captions == [s["raw"] for e in test for s in e["sentences"]]
    assert ds.caption_to_image.tolist() == [k for k in range(len(test)) for _ in range(5)]
    assert ds.image_paths == [str(images / e["filename"]) for e in test]
    assert ds.image_ids_external == [e["imgid"] for e in test]
    assert ds[7]["images"].shape == (3, 10, 12) and ds[7]["image_ids"] == 1
    assert ds.images.sources[0] == f"images[{entries.index(test[0])}] of dataset_flickr30k.json"
    # "dev" is SCAN's name for Karpathy's "val"
    assert (
        KarpathyDataset(path, images, "dev").image_paths
        == KarpathyDataset(path, images, "val").image_paths
    )


def test_coco_filepath_restval_and_captions_per_image(tmp_path):
    path, images, entries = write_karpathy(tmp_path, coco=True)
    train = KarpathyDataset(path, images, "train", image_transform({"input_size": (3, 8, 8)}))
    wanted = [e for e in entries if e["split"] in ("train", "restval")]
    assert train.image_paths == [str(images / e["filepath"] / e["filename"]) for e in wanted]
    assert train.image_ids_external == [e["cocoid"] for e in wanted]
    assert train.n_captions == sum(
        len(e["sentences"]) for e in wanted
    )  # 5, 6 and 7 sentences: all kept
    only = KarpathyDataset(path, images, "train", restval=False)
    assert only.n_images == sum(e["split"] == "train" for e in entries)
    five = KarpathyDataset(path, images, ["train", "test"], captions_per_image=5)
    assert torch.bincount(five.caption_to_image).tolist() == [5] * five.n_images
    batch = collate([train[k] for k in range(4)])
    assert batch["images"].shape == (4, 3, 8, 8)


def test_bad_inputs_name_the_entry(tmp_path):
    path, images, entries = write_karpathy(tmp_path)
    with pytest.raises(
        ValueError, match=r"split must be one of .* got 'tset'.*Did you mean 'test'"
    ):
        KarpathyDataset(path, images, "tset")
    with pytest.raises(ValueError, match="split must name at least one split"):
        KarpathyDataset(path, images, [])
    with pytest.raises(ValueError, match="captions_per_image must be a positive integer"):
        KarpathyDataset(path, images, "test", captions_per_image=0)
    with pytest.raises(
        ValueError, match=r"images\[2\] .* has 5 sentences, fewer than captions_per_image=6"
    ):
        KarpathyDataset(path, images, "val", captions_per_image=6)
    with pytest.raises(FileNotFoundError, match="no annotation file"):
        KarpathyDataset(tmp_path / "none.json", images, "test")

    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"not valid JSON \(line 1"):
        KarpathyDataset(bad, images, "test")
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="must be a JSON object with an 'images' list"):
        KarpathyDataset(bad, images, "test")
    bad.write_text(json.dumps({"images": [entries[0], "x"]}))
    with pytest.raises(ValueError, match=r"images\[1\] of bad.json is str"):
        KarpathyDataset(bad, images, "test")
    bad.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test"}]}))
    with pytest.raises(ValueError, match=r"images\[0\] of bad.json has no 'sentences'"):
        KarpathyDataset(bad, images, "test")
    e = dict(entries[0], split="test", sentences=[{"raw": "ok"}, {"raw": "  "}])
    bad.write_text(json.dumps({"images": [e]}))
    with pytest.raises(
        ValueError, match=r"sentence 1 of images\[0\] of bad.json \(img0.png\) is an empty caption"
    ):
        KarpathyDataset(bad, images, "test")
    bad.write_text(json.dumps({"images": [dict(e, sentences=[])]}))
    with pytest.raises(ValueError, match=r"images\[0\] of bad.json \(img0.png\) has no sentences"):
        KarpathyDataset(bad, images, "test")
    bad.write_text(json.dumps({"images": [dict(e, sentences=[{"tokens": ["a", "dog"]}])]}))
    assert KarpathyDataset(bad, images, "test").captions == ["a dog"]  # tokens when raw is missing


def test_missing_and_corrupt_images_name_file_and_entry(tmp_path):
    path, images, entries = write_karpathy(tmp_path)
    k = next(i for i, e in enumerate(entries) if e["split"] == "test")
    (images / entries[k]["filename"]).unlink()
    ds = KarpathyDataset(path, images, "test")
    with pytest.raises(
        FileNotFoundError,
        match=rf"{entries[k]['filename']}.*images\[{k}\] of dataset_flickr30k.json",
    ):
        ds[0]
    with pytest.raises(FileNotFoundError, match=rf"images\[{k}\]"):
        KarpathyDataset(path, images, "test", check_files=True)
    (images / entries[k]["filename"]).write_bytes(b"\x89PNG broken")
    with pytest.raises(
        ValueError,
        match=rf"{entries[k]['filename']}.*images\[{k}\] of dataset_flickr30k.json.*corrupt",
    ):
        ds[0]
    assert_close(ds[5]["images"], ds.images[1])  # the other image still reads


def test_fit_and_evaluate_a_matcher_on_raw_images(tmp_path):
    from imtm import Matcher
    from imtm.components import GlobalCosine, GRUTextEncoder, TimmVisionEncoder, TripletLoss

    path, images, _ = write_karpathy(tmp_path, per_split=3)
    enc = TimmVisionEncoder(
        "vit_tiny_patch16_224",
        img_size=16,
        out_dim=16,
        model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
    )
    train = KarpathyDataset(
        path, images, "train", image_transform(enc, train=True), build_vocab=True, augment=True
    )
    test = KarpathyDataset(path, images, "test", image_transform(enc), vocab=train.vocab)
    m = Matcher(
        [
            ("image", enc),
            ("text", GRUTextEncoder(vocab=train.vocab, out_dim=16, word_dim=8)),
            ("scorer", GlobalCosine()),
            ("loss", TripletLoss(hardest=False)),
        ],
        epochs=1,
        batch_size=8,
        verbose=False,
        random_state=0,
    )
    res = m.fit(train, eval_set=test).evaluate(test)
    assert 0.0 <= res["rsum"] <= 600.0 and m.similarity(test.images, test.captions).shape == (3, 15)
