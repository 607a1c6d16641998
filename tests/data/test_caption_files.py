import json

import pytest
import torch
from raw_images import captions, write_image
from torch.testing import assert_close

from imtm.data import CaptionFileDataset, collate
from imtm.data.transforms import image_transform


def write_folder(
    root,
    split="test",
    ids=(25, 34, 51),
    cpi=5,
    per_image_ids=False,
    precomp=False,
    image_dir="flickr30k-images",
):
    """A VSE-infinity dataset folder: caption/id files, id_mapping.json, generated images."""
    cap_dir = root / "precomp" if precomp else root
    cap_dir.mkdir(parents=True, exist_ok=True)
    caps = captions(len(ids) * cpi)
    (cap_dir / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    id_lines = list(ids) if per_image_ids else [i for i in ids for _ in range(cpi)]
    (cap_dir / f"{split}_ids.txt").write_text("\n".join(map(str, id_lines)) + "\n")
    mapping = {str(i): f"{i}.jpg" for i in ids}
    (root / "id_mapping.json").write_text(json.dumps(mapping))
    for i in ids:
        write_image(root / image_dir / f"{i}.jpg", i)
    return caps


@pytest.mark.parametrize("precomp", [False, True])
def test_round_trip_vse_infinity_layout(tmp_path, precomp):
    caps = write_folder(tmp_path, precomp=precomp)
    ds = CaptionFileDataset(tmp_path, "test", transform=image_transform({"input_size": (3, 8, 8)}))
    assert (ds.n_images, ds.n_captions) == (3, 15)
    assert ds.captions == caps
    assert ds.caption_to_image.tolist() == [k // 5 for k in range(15)]
    assert ds.image_ids_external == [25, 34, 51]
    assert ds.image_paths == [str(tmp_path / "flickr30k-images" / f"{i}.jpg") for i in (25, 34, 51)]
    assert ds.images.sources[1] == "id 34, line 6 of test_ids.txt"
    batch = collate([ds[k] for k in (0, 5, 14)])
    assert batch["images"].shape == (3, 3, 8, 8) and batch["image_ids"].tolist() == [0, 1, 2]


def test_per_image_ids_need_captions_per_image(tmp_path):
    caps = write_folder(tmp_path, per_image_ids=True, image_dir="images")
    with pytest.raises(
        ValueError,
        match=r"test_caps.txt' has 15 lines but .*test_ids.txt' has 3.*captions_per_image=k",
    ):
        CaptionFileDataset(tmp_path, "test")
    ds = CaptionFileDataset(tmp_path, "test", captions_per_image=5)
    assert ds.captions == caps and ds.caption_to_image.tolist() == [k // 5 for k in range(15)]
    assert ds.images.sources[2] == "id 51, line 3 of test_ids.txt"


def test_mismatched_lengths_name_both_files_and_counts(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "test_ids.txt").write_text("\n".join(["25"] * 14) + "\n")
    with pytest.raises(
        ValueError,
        match=r"test_caps.txt' has 15 lines but '.*test_ids.txt' has 14; the ids file needs "
        r"one line per caption \(15\)",
    ):
        CaptionFileDataset(tmp_path, "test")
    with pytest.raises(
        ValueError,
        match=r"has 15 lines but .* has 14; .* or 3 lines \(one per image, captions_per_image=5\)",
    ):
        CaptionFileDataset(tmp_path, "test", captions_per_image=5)


def test_mapping_forms_and_unordered_ids(tmp_path):
    write_folder(tmp_path, ids=(7, 3), cpi=2)
    (tmp_path / "test_ids.txt").write_text(
        "7\n3\n7\n3\n"
    )  # captions of one image need not be adjacent
    ds = CaptionFileDataset(
        tmp_path, "test", tmp_path / "flickr30k-images", id_mapping={7: "7.jpg", 3: "3.jpg"}
    )
    assert ds.caption_to_image.tolist() == [0, 1, 0, 1] and ds.image_ids_external == [7, 3]
    ds2 = CaptionFileDataset(tmp_path, "test", id_mapping=lambda i: f"{i}.jpg")
    assert ds2.image_paths == ds.image_paths
    ds3 = CaptionFileDataset(tmp_path, "test", id_mapping=tmp_path / "id_mapping.json")
    assert_close(ds3[1]["images"], ds[1]["images"])


def test_bad_inputs_name_file_and_line(tmp_path):
    write_folder(tmp_path)
    with pytest.raises(
        FileNotFoundError,
        match=r"no tset_caps.txt .* Splits found: \['test'\].*Did you mean 'test'",
    ):
        CaptionFileDataset(tmp_path, "tset")
    with pytest.raises(FileNotFoundError, match="no directory"):
        CaptionFileDataset(tmp_path / "nowhere", "test")
    with pytest.raises(ValueError, match="captions_per_image must be a positive integer"):
        CaptionFileDataset(tmp_path, "test", captions_per_image=-1)
    with pytest.raises(
        ValueError, match=r"image id 34 \(line 6 of test_ids.txt\) is not in the id_mapping dict"
    ):
        CaptionFileDataset(tmp_path, "test", id_mapping={"25": "25.jpg", "51": "51.jpg"})
    with pytest.raises(FileNotFoundError, match="image_root .* is not a directory"):
        CaptionFileDataset(tmp_path, "test", tmp_path / "imgs")
    with pytest.raises(FileNotFoundError, match="no id mapping file"):
        CaptionFileDataset(tmp_path, "test", id_mapping=tmp_path / "m.json")

    lines = (tmp_path / "test_ids.txt").read_text().split("\n")
    (tmp_path / "test_ids.txt").write_text("\n".join(lines[:3] + ["x25"] + lines[4:]))
    with pytest.raises(
        ValueError, match=r"line 4 of .*test_ids.txt' is 'x25', expected an integer image id"
    ):
        CaptionFileDataset(tmp_path, "test")
    (tmp_path / "test_ids.txt").write_text("\n".join(lines))
    caps = (tmp_path / "test_caps.txt").read_text().split("\n")
    (tmp_path / "test_caps.txt").write_text("\n".join(caps[:8] + [" "] + caps[9:]))
    with pytest.raises(ValueError, match=r"line 9 of .*test_caps.txt' is an empty caption"):
        CaptionFileDataset(tmp_path, "test")
    (tmp_path / "test_caps.txt").write_text("")
    with pytest.raises(ValueError, match="holds no captions"):
        CaptionFileDataset(tmp_path, "test")
    (tmp_path / "test_caps.txt").write_text("\n".join(caps))

    (tmp_path / "test_ids.txt").unlink()
    with pytest.raises(FileNotFoundError, match="has no ids file"):
        CaptionFileDataset(tmp_path, "test")
    (tmp_path / "test_ids.txt").write_text("\n".join(lines))
    (tmp_path / "id_mapping.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        CaptionFileDataset(tmp_path, "test")
    (tmp_path / "id_mapping.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        CaptionFileDataset(tmp_path, "test")
    (tmp_path / "id_mapping.json").unlink()
    with pytest.raises(FileNotFoundError, match="no id_mapping.json in .* pass id_mapping="):
        CaptionFileDataset(tmp_path, "test")


def test_no_image_folder_lists_the_folders_tried(tmp_path):
    write_folder(tmp_path, image_dir="pictures")
    with pytest.raises(
        FileNotFoundError, match=r"no image folder found \(tried .*images.*flickr30k-images"
    ):
        CaptionFileDataset(tmp_path, "test")
    ds = CaptionFileDataset(tmp_path, "test", tmp_path / "pictures")
    (tmp_path / "pictures" / "34.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"34.jpg.*id 34, line 6 of test_ids.txt"):
        ds[5]


@pytest.mark.parametrize(
    "sub,split,n_images",
    [
        ("f30k", "test", 1000),
        ("f30k", "dev", 1014),
        ("coco", "testall", 5000),
        ("coco", "dev", 1000),
    ],
)
def test_text_side_of_the_real_caption_files(shared_captions, tmp_path, sub, split, n_images):
    folder = shared_captions / sub
    lines = (folder / f"{split}_caps.txt").read_text(encoding="utf-8").split("\n")[:-1]
    ids = [int(x) for x in (folder / f"{split}_ids.txt").read_text().split()]
    # Images generated for the first two ids only; the loader opens files lazily.
    for i in dict.fromkeys(ids[:10]):
        write_image(tmp_path / f"{i}.png", i)
    ds = CaptionFileDataset(
        folder,
        split,
        image_root=tmp_path,
        id_mapping=lambda i: f"{i}.png",
        transform=image_transform({"input_size": (3, 8, 8)}),
    )
    assert ds.n_captions == len(lines) and ds.n_images == n_images
    assert ds.captions == [c.strip() for c in lines]
    assert torch.bincount(ds.caption_to_image).tolist() == [5] * n_images
    assert [ds.image_ids_external[int(j)] for j in ds.caption_to_image[:12]] == ids[:12]
    assert ds[5]["images"].shape == (3, 8, 8) and ds[5]["image_ids"] == 1
    with pytest.raises(
        FileNotFoundError, match=rf"{ds.image_ids_external[2]}.png.*line 11 of {split}_ids.txt"
    ):
        ds[10]
    if sub == "f30k" and split == "test":
        # Consistent ids: per-image ids (every fifth line) with captions_per_image=5 give the same dataset.
        per_image = tmp_path / "per_image"
        per_image.mkdir()
        (per_image / "test_caps.txt").write_text("\n".join(lines) + "\n")
        (per_image / "test_ids.txt").write_text("\n".join(map(str, ids[::5])) + "\n")
        ds5 = CaptionFileDataset(
            per_image,
            "test",
            image_root=tmp_path,
            id_mapping=lambda i: f"{i}.png",
            captions_per_image=5,
        )
        assert ds5.image_ids_external == ds.image_ids_external
        assert torch.equal(ds5.caption_to_image, ds.caption_to_image)
