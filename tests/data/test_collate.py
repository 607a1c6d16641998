import pytest
import torch

from imtm import Tokens
from imtm.data import (
    ImageCaptionDataset,
    Vocabulary,
    collate,
    collate_images,
    collate_texts,
    tokenize,
)


def test_collate_regions_pads_and_masks():
    b = collate(
        [
            {"images": torch.randn(3, 4), "texts": "a cat", "image_ids": 0},
            {"images": torch.randn(5, 4), "texts": "a dog", "image_ids": 1},
        ]
    )
    assert isinstance(b["images"], Tokens) and b["images"].lengths.tolist() == [3, 5]
    assert b["texts"] == ["a cat", "a dog"] and b["image_ids"].tolist() == [0, 1]


def test_collate_pixels_stacks():
    assert collate_images([torch.zeros(3, 8, 8)] * 2).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="different sizes"):
        collate_images([torch.zeros(3, 8, 8), torch.zeros(3, 4, 4)])
    with pytest.raises(ValueError, match=r"\(3, H, W\) pixels or \(N, D\)"):
        collate_images([torch.zeros(4)])


def test_collate_texts_ids_and_errors():
    t = collate_texts([[1, 2, 3], [4]])
    assert t.lengths.tolist() == [3, 1]
    with pytest.raises(ValueError, match="caption 1 has length 0"):
        collate_texts([[1], []])
    with pytest.raises(ValueError, match="caption 0 is empty"):
        collate_texts(["  ", "a"])
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_vocabulary_round_trip(tmp_path):
    v = Vocabulary.build(["a red circle", "a blue square ."], min_count=1)
    assert v["a"] == 2 and v["zebra"] == v.unk_index
    v.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json") == v
    with pytest.raises(ValueError, match="has no words"):
        v.encode(" ... ".replace(".", ""))
    assert tokenize("Two RED disks.") == ["two", "red", "disks", "."]


def test_vocabulary_on_real_captions(shared_captions):
    caps = (shared_captions / "f30k" / "test_caps.txt").read_text().splitlines()
    v = Vocabulary.build(caps[:2000], min_count=2)
    ids = v.encode_batch(caps[2000:2100])
    assert ids.batch_size == 100 and bool((ids.lengths > 0).all())
    assert int((ids.feats == v.unk_index).sum()) < int(ids.lengths.sum()) // 5


def test_dataset_protocol_and_errors():
    ds = ImageCaptionDataset(torch.zeros(2, 3, 4), ["a", "b", "c"], [0, 1, 1])
    item = ds[1]
    assert item["texts"] == "b" and item["image_ids"] == 1 and item["images"] is not None
    assert len(ds.fingerprint()) == 16
    with pytest.raises(ValueError, match="one entry per caption"):
        ImageCaptionDataset(torch.zeros(2, 3, 4), ["a", "b"], [0])
    with pytest.raises(ValueError, match="outside"):
        ImageCaptionDataset(torch.zeros(2, 3, 4), ["a", "b"], [0, 2])
    with pytest.raises(ValueError, match="no captions"):
        ImageCaptionDataset(torch.zeros(2, 3, 4), [], [])
