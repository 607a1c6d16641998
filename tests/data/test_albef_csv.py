import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raw_images import write_image
from torch.testing import assert_close

from imtm.data import AlbefJsonDataset, CsvDataset, collate
from imtm.data.transforms import image_transform


def test_albef_train_and_eval_entries(tmp_path):
    for k in range(3):
        write_image(tmp_path / "flickr30k-images" / f"{k}.jpg", k)
    train = [
        {
            "image": f"flickr30k-images/{k % 2}.jpg",
            "caption": f"caption {k}",
            "image_id": str(100 + k % 2),
        }
        for k in range(4)
    ]
    test = [
        {"image": "flickr30k-images/2.jpg", "caption": ["a", "b", "c"]},
        {"image": "flickr30k-images/0.jpg", "caption": ["d", "e"]},
    ]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    ds = AlbefJsonDataset(
        tmp_path / "train.json", tmp_path, image_transform({"input_size": (3, 8, 8)})
    )
    assert (ds.n_images, ds.n_captions) == (2, 4)
    assert ds.caption_to_image.tolist() == [0, 1, 0, 1] and ds.image_ids_external == ["100", "101"]
    assert ds.images.sources == ["entry 0 of train.json", "entry 1 of train.json"]
    assert collate([ds[k] for k in range(4)])["images"].shape == (4, 3, 8, 8)
    ev = AlbefJsonDataset(tmp_path / "test.json", tmp_path)
    assert ev.captions == ["a", "b", "c", "d", "e"] and ev.caption_to_image.tolist() == [
        0,
        0,
        0,
        1,
        1,
    ]
    assert ev.image_ids_external == ["2.jpg", "0.jpg"]
    both = AlbefJsonDataset([tmp_path / "train.json", tmp_path / "test.json"], tmp_path)
    assert both.n_images == 3 and both.caption_to_image.tolist() == [0, 1, 0, 1, 2, 2, 2, 0, 0]
    # image paths relative to the JSON's folder when no image_root is given
    assert_close(AlbefJsonDataset(tmp_path / "test.json")[0]["images"], ev[0]["images"])


def test_albef_bad_inputs_name_file_and_entry(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="a.json must hold a JSON list of entries"):
        AlbefJsonDataset(p)
    p.write_text(json.dumps([{"image": "x.jpg", "caption": "ok"}, {"image": "y.jpg"}]))
    with pytest.raises(
        ValueError, match=r"entry 1 of a.json needs 'image' and 'caption' fields, got \['image'\]"
    ):
        AlbefJsonDataset(p)
    p.write_text(json.dumps([{"image": "x.jpg", "caption": ["ok", ""]}]))
    with pytest.raises(ValueError, match="caption 1 of entry 0 of a.json is an empty caption"):
        AlbefJsonDataset(p)
    p.write_text(json.dumps([{"image": "x.jpg", "caption": " "}]))
    with pytest.raises(ValueError, match="entry 0 of a.json is an empty caption"):
        AlbefJsonDataset(p)
    p.write_text(json.dumps([{"image": "x.jpg", "caption": []}]))
    with pytest.raises(ValueError, match="entry 0 of a.json has no caption"):
        AlbefJsonDataset(p)
    p.write_text("[]")
    with pytest.raises(ValueError, match=r"no entries in \['a.json'\]"):
        AlbefJsonDataset(p)
    with pytest.raises(ValueError, match="names no annotation file"):
        AlbefJsonDataset([])
    p.write_text(json.dumps([{"image": "x.jpg", "caption": "a cat"}]))
    with pytest.raises(FileNotFoundError, match=r"x.jpg.*entry 0 of a.json"):
        AlbefJsonDataset(p)[0]


def test_csv_round_trip_and_tsv(tmp_path):
    for k in range(2):
        write_image(tmp_path / "imgs" / f"{k}.png", k)
    (tmp_path / "pairs.csv").write_text(
        'filepath,caption\nimgs/1.png,"one, with a comma"\nimgs/0.png,zero\nimgs/1.png,one again\n'
    )
    ds = CsvDataset(tmp_path / "pairs.csv")
    assert ds.captions == ["one, with a comma", "zero", "one again"]
    assert ds.caption_to_image.tolist() == [0, 1, 0] and ds.image_ids_external == [
        "imgs/1.png",
        "imgs/0.png",
    ]
    assert ds.images.sources == ["line 2 of pairs.csv", "line 3 of pairs.csv"]
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\n1.png\tone\n0.png\tzero\n")
    tsv = CsvDataset(tmp_path / "pairs.tsv", tmp_path / "imgs", caption_key="title")
    assert_close(tsv[0]["images"], ds[0]["images"])


def test_csv_bad_inputs_name_file_and_line(tmp_path):
    p = tmp_path / "t.csv"
    with pytest.raises(FileNotFoundError, match="no CSV file"):
        CsvDataset(p)
    p.write_text("filepath,captions\na.png,x\n")
    with pytest.raises(
        ValueError,
        match=r"t.csv has no column 'caption'; its header is \['filepath', 'captions'\].*"
        r"Did you mean 'captions'",
    ):
        CsvDataset(p)
    p.write_text("filepath,caption\na.png,x\na.png,\n")
    with pytest.raises(ValueError, match="line 3 of t.csv has an empty caption"):
        CsvDataset(p)
    p.write_text("filepath,caption\na.png,x\n,y\n")
    with pytest.raises(ValueError, match="line 3 of t.csv has an empty 'filepath'"):
        CsvDataset(p)
    p.write_text("filepath,caption\n")
    with pytest.raises(ValueError, match="has a header but no rows"):
        CsvDataset(p)
    p.write_text("filepath,caption\na.png,x\nb.png,y\n")
    with pytest.raises(FileNotFoundError, match=r"b.png.*line 3 of t.csv"):
        CsvDataset(p, check_files=True)


@settings(max_examples=20, deadline=None)
@given(rows=st.lists(st.integers(0, 4), min_size=1, max_size=12))
def test_rows_group_by_image_in_first_appearance_order(tmp_path_factory, rows):
    d = tmp_path_factory.mktemp("rows")
    lines = ["filepath,caption"] + [
        f"img{i}.png,caption {r} of image {i}" for r, i in enumerate(rows)
    ]
    (d / "t.csv").write_text("\n".join(lines) + "\n")
    entries = [
        {"image": f"img{i}.png", "caption": f"caption {r} of image {i}"} for r, i in enumerate(rows)
    ]
    (d / "t.json").write_text(json.dumps(entries))
    first = list(dict.fromkeys(rows))
    for ds in (CsvDataset(d / "t.csv"), AlbefJsonDataset(d / "t.json")):
        assert ds.captions == [f"caption {r} of image {i}" for r, i in enumerate(rows)]
        assert ds.image_paths == [str(d / f"img{i}.png") for i in first]
        assert [ds.image_paths[int(j)] for j in ds.caption_to_image] == [
            str(d / f"img{i}.png") for i in rows
        ]
