import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from raw_images import write_image
from torch.testing import assert_close
from torch.utils.data import DataLoader

from imtm.data import ImageFileDataset, ImageFiles, ImageReadError, Vocabulary, collate
from imtm.data.image_files import group_by_image, read_image
from imtm.data.transforms import image_transform


def _dataset(tmp_path, n=3, transform=None, **kw):
    paths = [write_image(tmp_path / f"{k}.png", k) for k in range(n)]
    caps = [f"caption {k} of image {k // 2}" for k in range(2 * n)]
    return ImageFileDataset(paths, caps, torch.arange(2 * n) // 2, transform, **kw), paths


def test_items_read_the_file_of_their_image(tmp_path):
    ds, paths = _dataset(tmp_path)
    assert (len(ds), ds.n_images) == (6, 3)
    item = ds[3]
    expected = (
        torch.from_numpy(np.array(Image.open(paths[1]).convert("RGB"))).permute(2, 0, 1).float()
        / 255
    )
    assert item["image_ids"] == 1 and item["texts"] == "caption 3 of image 1"
    assert_close(item["images"], expected)
    assert_close(ds.images[1], expected)
    assert ds.image_paths == [str(p) for p in paths]


def test_transform_applies_and_batches_collate(tmp_path):
    t = image_transform({"input_size": (3, 16, 16)})
    ds, paths = _dataset(tmp_path, transform=t)
    assert_close(ds[0]["images"], t(Image.open(paths[0]).convert("RGB")))
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["images"].shape == (4, 3, 16, 16)
    assert batch["image_ids"].tolist() == [0, 0, 1, 1]


def test_missing_file_names_file_and_annotation(tmp_path):
    files = ImageFiles([tmp_path / "nope.jpg"], sources=["line 7 of train.csv"], name="toy")
    with pytest.raises(FileNotFoundError, match=r"nope\.jpg.*line 7 of train\.csv"):
        files[0]
    with pytest.raises(
        FileNotFoundError, match=r"1 of 1 image files do not exist: .*nope\.jpg.*line 7"
    ):
        files.check()


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_corrupt_or_truncated_file_names_file(tmp_path, suffix):
    good = write_image(tmp_path / f"good.{suffix}", 0, size=(64, 64))
    data = good.read_bytes()
    (tmp_path / f"trunc.{suffix}").write_bytes(data[: len(data) // 2])
    (tmp_path / f"junk.{suffix}").write_bytes(b"not an image at all")
    for bad in ("trunc", "junk"):
        files = ImageFiles([tmp_path / f"{bad}.{suffix}"], sources=[f"entry 3 of {bad}.json"])
        with pytest.raises(
            ImageReadError, match=rf"{bad}\.{suffix}.*entry 3 of {bad}\.json.*corrupt"
        ):
            files[0]


def test_check_files_raises_at_construction(tmp_path):
    paths = [write_image(tmp_path / "a.png", 0), tmp_path / "gone.png"]
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        ImageFileDataset(paths, ["x", "y"], [0, 1], check_files=True, sources=["row 1", "row 2"])
    ImageFileDataset(paths, ["x", "y"], [0, 1])  # lazy by default


def test_bad_arguments(tmp_path):
    ds, paths = _dataset(tmp_path)
    with pytest.raises(TypeError, match="transform must be a callable"):
        ImageFileDataset(paths, ["x"], [0], transform=3)
    with pytest.raises(TypeError, match="augment must be None, True or a callable"):
        ImageFileDataset(paths, ["x"], [0], augment="yes")
    with pytest.raises(ValueError, match="either vocab= or build_vocab=True"):
        ImageFileDataset(paths, ["x"], [0], vocab=Vocabulary(["x"]), build_vocab=True)
    with pytest.raises(TypeError, match="vocab must be an imtm.data.Vocabulary"):
        ImageFileDataset(paths, ["x"], [0], vocab={"x": 1})
    with pytest.raises(ValueError, match="2 external ids for 3 images"):
        ImageFileDataset(paths, ["x"], [0], image_ids_external=[1, 2])
    with pytest.raises(ValueError, match="1 sources for 3 image paths"):
        ImageFiles(paths, sources=["a"])
    with pytest.raises(IndexError, match="image index 5 out of range for 3"):
        ds.images[5]
    with pytest.raises(TypeError, match="image index must be an integer"):
        ds.images["0"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image(tmp_path / "none.png")


def test_pickles_for_workers_and_fingerprint_reads_no_pixels(tmp_path):
    ds, paths = _dataset(tmp_path, augment=True)
    back = pickle.loads(pickle.dumps(ds))
    assert_close(back.images[2], ds.images[2])
    fp = ds.fingerprint()
    paths[0].unlink()  # the fingerprint hashes paths and captions only
    assert ds.fingerprint() == fp and len(fp) == 16


def test_group_by_image_keeps_first_appearance_order():
    keys, c2i = group_by_image(["b", "a", "b", "c", "a"])
    assert keys == ["b", "a", "c"] and c2i.tolist() == [0, 1, 0, 2, 1]
