import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close
from torch.utils.data import DataLoader

from imtm.data import ImageCaptionDataset, PrecompDataset, Vocabulary, collate
from imtm.data.precomp import PrecompImages

WORDS = ["a", "dog", "cat", "runs", "sits", "on", "the", "red", "grass", "mat"]


def _captions(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7)))) + f" {k}" for k in range(n)]


def write_split(
    root,
    split="test",
    *,
    n_images=4,
    regions=36,
    dim=16,
    cpi=5,
    ids=None,
    per_caption_rows=False,
    dtype=np.float32,
    seed=0,
):
    """Write a split in the SCAN layout; returns (feature array as saved, captions, ids or None)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n_images, regions, dim)).astype(dtype)
    saved = np.repeat(feats, cpi, axis=0) if per_caption_rows else feats
    np.save(root / f"{split}_ims.npy", saved)
    caps = _captions(n_images * cpi, seed)
    (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    id_values = None
    if ids is not None:
        per_image = rng.choice(1_000_000, size=n_images, replace=False)
        id_values = per_image if ids == "image" else np.repeat(per_image, cpi)
        (root / f"{split}_ids.txt").write_text("\n".join(str(i) for i in id_values) + "\n")
    return feats, caps, id_values


# ---------------------------------------------------------------------------- items and layout
def test_items_match_the_files(tmp_path):
    feats, caps, _ = write_split(tmp_path)
    ds = PrecompDataset(tmp_path, "test")
    assert isinstance(ds, ImageCaptionDataset)
    assert len(ds) == 20 and ds.n_images == 4 and ds.n_captions == 20
    assert ds.captions_per_image == 5
    assert ds.image_ids_external is None
    assert ds.caption_to_image.tolist() == [k // 5 for k in range(20)]
    assert ds.images.shape == (4, 36, 16)
    for k in (0, 4, 5, 19):
        item = ds[k]
        assert item["images"].shape == (36, 16) and item["images"].dtype == torch.float32
        assert_close(item["images"], torch.from_numpy(feats[k // 5]))
        assert item["texts"] == caps[k]
        assert item["image_ids"] == k // 5
    assert ds.name == f"{tmp_path.name}/test"
    assert "n_images=4" in repr(ds) and "regions=36" in repr(ds)


def test_memory_map_and_row_copies(tmp_path):
    feats, _, _ = write_split(tmp_path, dtype=np.float64)
    ds = PrecompDataset(tmp_path, "test")
    assert isinstance(ds.images._rows, np.memmap)
    item = ds.images[2]
    assert item.dtype == torch.float32
    assert_close(item, torch.from_numpy(feats[2]).float())
    item.zero_()  # a private copy: writable, and the file view is untouched
    assert_close(ds.images[2], torch.from_numpy(feats[2]).float())
    assert_close(ds.images[-1], ds.images[3])
    in_memory = PrecompDataset(tmp_path, "test", mmap=False)
    assert not isinstance(in_memory.images._rows, np.memmap)
    assert_close(in_memory[7]["images"], ds[7]["images"])


def test_pickling_sends_the_path_not_the_data(tmp_path):
    write_split(tmp_path, n_images=4, regions=36, dim=256)
    ds = PrecompDataset(tmp_path, "test")
    blob = pickle.dumps(ds)
    assert len(blob) < 4 * 36 * 256 * 4 // 4  # far smaller than the features
    back = pickle.loads(blob)
    assert_close(back[13]["images"], ds[13]["images"])
    assert back.captions == ds.captions
    in_memory = PrecompDataset(tmp_path, "test", mmap=False)
    assert_close(pickle.loads(pickle.dumps(in_memory))[13]["images"], ds[13]["images"])


def test_collates_into_full_region_tokens(tmp_path):
    write_split(tmp_path)
    ds = PrecompDataset(tmp_path, "test")
    batch = next(iter(DataLoader(ds, batch_size=6, collate_fn=collate)))
    assert batch["images"].feats.shape == (6, 36, 16)
    assert bool(batch["images"].mask.all())
    assert batch["image_ids"].tolist() == [0, 0, 0, 0, 0, 1]
    assert len(batch["texts"]) == 6


@settings(max_examples=20, deadline=None)
@given(
    n_images=st.integers(1, 6),
    cpi=st.integers(1, 5),
    regions=st.integers(1, 5),
    dim=st.integers(1, 6),
    per_caption_rows=st.booleans(),
    ids=st.sampled_from([None, "image", "caption"]),
)
def test_every_caption_sees_its_image_row(n_images, cpi, regions, dim, per_caption_rows, ids):
    with tempfile.TemporaryDirectory() as d:
        feats, caps, id_values = write_split(
            d,
            n_images=n_images,
            cpi=cpi,
            regions=regions,
            dim=dim,
            ids=ids,
            per_caption_rows=per_caption_rows,
        )
        ds = PrecompDataset(d, "test", captions_per_image=cpi)
        assert ds.n_images == n_images and ds.captions_per_image == cpi
        assert ds.images.shape == (n_images, regions, dim)
        for k in range(len(ds)):
            item = ds[k]
            assert item["image_ids"] == k // cpi
            assert item["texts"] == caps[k]
            assert_close(item["images"], torch.from_numpy(feats[k // cpi]))
        # caption_to_image is sorted and every image has exactly cpi captions
        assert torch.bincount(ds.caption_to_image).tolist() == [cpi] * n_images
        if ids is not None:
            assert ds.image_ids_external.tolist() == [
                int(v) for v in id_values[:: 1 if ids == "image" else cpi]
            ]


# ---------------------------------------------------------------------------- ids
def test_ids_one_per_image(tmp_path):
    _, _, ids = write_split(tmp_path, ids="image")
    ds = PrecompDataset(tmp_path, "test")
    assert ds.image_ids_external.tolist() == ids.tolist()
    assert ds.image_ids_external.dtype == torch.long
    assert ds.caption_to_image.tolist() == [k // 5 for k in range(20)]  # indices stay 0-based


def test_ids_one_per_caption(tmp_path):
    _, _, ids = write_split(tmp_path, ids="caption")
    ds = PrecompDataset(tmp_path, "test")
    assert ds.image_ids_external.tolist() == ids[::5].tolist()
    assert ds.image_ids_external[ds.caption_to_image].tolist() == ids.tolist()


def test_ids_that_split_an_image_are_rejected(tmp_path):
    write_split(tmp_path, ids="caption")
    lines = (tmp_path / "test_ids.txt").read_text().splitlines()
    lines[7] = "123456789"
    (tmp_path / "test_ids.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        ValueError,
        match=r"line 8 of test_ids.txt has id 123456789 but the other captions of image 1 \(lines 6-10\)",
    ):
        PrecompDataset(tmp_path, "test")


def test_ids_of_the_wrong_length_or_type(tmp_path):
    write_split(tmp_path)
    (tmp_path / "test_ids.txt").write_text("1\n2\n3\n")
    with pytest.raises(
        ValueError,
        match=r"test_ids.txt has 3 lines; expected one per image \(4\) or one per caption \(20\)",
    ):
        PrecompDataset(tmp_path, "test")
    (tmp_path / "test_ids.txt").write_text("1\n2\nthree\n4\n")
    with pytest.raises(
        ValueError, match=r"line 3 of .*test_ids.txt' is 'three', expected an integer id"
    ):
        PrecompDataset(tmp_path, "test")


# ---------------------------------------------------------------------------- one row per caption (im_div)
def test_rows_per_caption_with_explicit_captions_per_image(tmp_path):
    feats, _, _ = write_split(tmp_path, per_caption_rows=True)
    assert np.load(tmp_path / "test_ims.npy").shape[0] == 20
    ds = PrecompDataset(tmp_path, "test", captions_per_image=5)
    assert ds.n_images == 4 and ds.images.n_rows == 20 and ds.images.step == 5
    for k in (0, 6, 19):
        assert_close(ds[k]["images"], torch.from_numpy(feats[k // 5]))
    # Without the option or ids, every row is taken as its own image.
    alone = PrecompDataset(tmp_path, "test")
    assert alone.n_images == 20 and alone.captions_per_image == 1


def test_rows_per_caption_detected_from_per_caption_ids(tmp_path):
    feats, _, ids = write_split(tmp_path, per_caption_rows=True, ids="caption")
    ds = PrecompDataset(tmp_path, "test")
    assert ds.captions_per_image == 5 and ds.n_images == 4
    assert ds.image_ids_external.tolist() == ids[::5].tolist()
    assert_close(ds[12]["images"], torch.from_numpy(feats[2]))


# ---------------------------------------------------------------------------- vocabulary
def test_vocabulary_options(tmp_path):
    _, caps, _ = write_split(tmp_path)
    assert PrecompDataset(tmp_path, "test").vocab is None
    built = PrecompDataset(tmp_path, "test", build_vocab=True)
    assert built.vocab == Vocabulary.build(caps)
    given_vocab = Vocabulary(["dog"])
    assert PrecompDataset(tmp_path, "test", vocab=given_vocab).vocab is given_vocab
    with pytest.raises(ValueError, match="either vocab= or build_vocab=True, not both"):
        PrecompDataset(tmp_path, "test", vocab=given_vocab, build_vocab=True)
    with pytest.raises(TypeError, match="vocab must be an imtm.data.Vocabulary or None, got dict"):
        PrecompDataset(tmp_path, "test", vocab={"dog": 2})


# ---------------------------------------------------------------------------- bad files
def test_caption_count_must_divide(tmp_path):
    write_split(tmp_path)
    with open(tmp_path / "test_caps.txt", "a") as f:
        f.write("one caption too many\n")
    with pytest.raises(
        ValueError,
        match=r"21 captions in test_caps.txt is not a multiple of the 4 images in test_ims.npy",
    ):
        PrecompDataset(tmp_path, "test")
    with pytest.raises(ValueError, match=r"captions_per_image=5 does not fit 21 captions"):
        PrecompDataset(tmp_path, "test", captions_per_image=5)


def test_empty_caption_names_its_line(tmp_path):
    write_split(tmp_path)
    lines = (tmp_path / "test_caps.txt").read_text().splitlines()
    lines[6] = "   "
    (tmp_path / "test_caps.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 7 of .*test_caps.txt' is an empty caption"):
        PrecompDataset(tmp_path, "test")
    (tmp_path / "test_caps.txt").write_text("")
    with pytest.raises(ValueError, match="holds no captions"):
        PrecompDataset(tmp_path, "test")


def test_crlf_and_missing_final_newline(tmp_path):
    _, caps, _ = write_split(tmp_path)
    (tmp_path / "test_caps.txt").write_text("\r\n".join(caps))
    ds = PrecompDataset(tmp_path, "test")
    assert ds.captions == caps


def test_missing_files_list_what_was_expected(tmp_path):
    write_split(tmp_path, split="dev")
    with pytest.raises(
        FileNotFoundError,
        match=r"missing \['test_ims.npy', 'test_caps.txt'\].*expected test_ims.npy \(features, \(n_images, R, D\)\) and test_caps.txt.*Splits found there: \['dev'\]",
    ):
        PrecompDataset(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match=r"Did you mean 'dev'"):
        PrecompDataset(tmp_path, "dve")
    (tmp_path / "dev_ims.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['dev_ims.npy'\]"):
        PrecompDataset(tmp_path, "dev")
    with pytest.raises(FileNotFoundError, match="no directory"):
        PrecompDataset(tmp_path / "nowhere", "dev")


def test_bad_feature_files(tmp_path):
    write_split(tmp_path)
    np.save(tmp_path / "test_ims.npy", np.zeros((4, 2, 3, 4), dtype=np.float32))
    with pytest.raises(
        ValueError, match=r"must hold features of shape \(n_images, R, D\).*got \(4, 2, 3, 4\)"
    ):
        PrecompDataset(tmp_path, "test")
    np.save(tmp_path / "test_ims.npy", np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain numeric .npy array"):
        PrecompDataset(tmp_path, "test")
    np.save(tmp_path / "test_ims.npy", np.zeros((4, 3, 2), dtype=np.complex64))
    with pytest.raises(ValueError, match="expected floating-point features"):
        PrecompDataset(tmp_path, "test")
    bad = np.zeros((4, 3, 2), dtype=np.float32)
    bad[2, 1, 0] = np.nan
    np.save(tmp_path / "test_ims.npy", bad)
    ds = PrecompDataset(tmp_path, "test")
    with pytest.raises(ValueError, match=r"image 2 \(row 2 of .*\) holds NaN or inf"):
        ds[11]
    with pytest.raises(
        ValueError, match="captions_per_image must be a positive integer or None, got 0"
    ):
        PrecompDataset(tmp_path, "test", captions_per_image=0)


def test_global_features_and_index_errors(tmp_path):
    write_split(tmp_path)
    np.save(tmp_path / "test_ims.npy", np.ones((4, 8), dtype=np.float32))
    ds = PrecompDataset(tmp_path, "test")
    assert ds.images.shape == (4, 1, 8)
    assert ds[0]["images"].shape == (1, 8)
    with pytest.raises(IndexError, match="image index 4 out of range for 4 images"):
        ds.images[4]
    with pytest.raises(TypeError, match="index must be an integer, got str"):
        ds.images["0"]
    assert_close(ds.images[np.int64(1)], ds.images[torch.tensor(1)])
    with pytest.raises(ValueError, match="step must be a positive integer"):
        PrecompImages(tmp_path / "test_ims.npy", step=0)


# ---------------------------------------------------------------------------- real caption files
def _shared_captions() -> Path | None:
    here = Path(__file__).resolve()
    repo = here.parents[2]
    for root in (repo.parent / "shared", repo / "shared"):
        d = root / "data" / "captions"
        if d.is_dir():
            return d
    return None


@pytest.mark.parametrize(
    "dataset, split, n_images",
    [
        ("f30k", "test", 1000),
        ("f30k", "dev", 1014),
        ("coco", "testall", 5000),
        ("coco", "dev", 1000),
    ],
)
def test_real_caption_files(tmp_path, dataset, split, n_images):
    shared = _shared_captions()
    if shared is None or not (shared / dataset / f"{split}_caps.txt").is_file():
        pytest.skip("the shared caption files (../shared/data/captions) are not present")
    src = shared / dataset
    # Link, never copy, the caption files next to generated features.
    for suffix in ("caps", "ids"):
        (tmp_path / f"{split}_{suffix}.txt").symlink_to(src / f"{split}_{suffix}.txt")
    feats = np.random.default_rng(0).standard_normal((n_images, 3, 4)).astype(np.float32)
    np.save(tmp_path / f"{split}_ims.npy", feats)

    ds = PrecompDataset(tmp_path, split)
    assert ds.n_images == n_images and ds.n_captions == 5 * n_images
    assert ds.captions_per_image == 5
    assert torch.bincount(ds.caption_to_image).tolist() == [5] * n_images
    lines = (src / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()
    assert ds.captions[0] == lines[0].strip() and ds.captions[-1] == lines[-1].strip()
    ids = [int(x) for x in (src / f"{split}_ids.txt").read_text().split()]
    # The ids file has one line per caption; each image's five captions share its id.
    assert ds.image_ids_external.shape == (n_images,)
    assert ds.image_ids_external[ds.caption_to_image].tolist() == ids
    k = 5 * (n_images // 2) + 3
    assert_close(ds[k]["images"], torch.from_numpy(feats[n_images // 2]))
