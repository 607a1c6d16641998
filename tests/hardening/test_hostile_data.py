"""The data readers of imtm.data under malformed files.

A wrong or damaged file must raise ValueError / FileNotFoundError / TypeError (ImageReadError is a
ValueError) with a message that names the file, and the line / entry / key where one applies, never a
bare KeyError, IndexError, UnicodeDecodeError or a silently wrong dataset; a file that is valid after
all (a byte-order mark, quoted separators, an image cut only in its trailer) loads correctly.
"""

import csv
import io
import json
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.testing import assert_close

from imtm import Tokens
from imtm.data import Vocabulary, collate, collate_images, collate_texts
from imtm.data.albef import AlbefJsonDataset
from imtm.data.caption_files import CaptionFileDataset
from imtm.data.csv_captions import CsvDataset
from imtm.data.extracted import ExtractedDataset
from imtm.data.image_files import ImageFileDataset, ImageReadError
from imtm.data.karpathy import KarpathyDataset
from imtm.data.precomp import PrecompDataset

FEW = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
BOM = b"\xef\xbb\xbf"
# Values of the wrong type for a field that must hold a string or a list.
WRONG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=False),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from("ab"), st.integers(0, 3)),
)


def _png(size=(4, 4), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG header that declares ``width x height`` pixels and holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------------------------------- Karpathy JSON
def _karpathy(tmp_path, content, split="test"):
    (tmp_path / "1.jpg").write_bytes(_png())
    path = tmp_path / "k.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return KarpathyDataset(path, tmp_path, split)


GOOD_ENTRY = {
    "filename": "1.jpg",
    "split": "test",
    "sentences": [{"raw": "A dog."}, {"raw": "A brown dog."}],
}


@FEW
@given(key=st.sampled_from(["filename", "split", "sentences", "filepath"]), value=WRONG)
def test_karpathy_field_of_wrong_type_names_entry_and_key(tmp_path, key, value):
    assume(
        not (key == "sentences" and isinstance(value, list))
    )  # a list of non-sentences: tested below
    entry = dict(GOOD_ENTRY, **{key: value})
    with pytest.raises(ValueError, match=rf"'{key}' of images\[1\] of k\.json is .*expected"):
        _karpathy(tmp_path, {"images": [GOOD_ENTRY, entry]})


@FEW
@given(cut=st.integers(0, 200))
def test_karpathy_truncated_file_is_reported_as_invalid_json(tmp_path, cut):
    text = json.dumps({"images": [GOOD_ENTRY]}).encode()
    assume(cut < len(text))
    with pytest.raises(ValueError, match=r"k\.json' is not valid JSON \(line 1"):
        _karpathy(tmp_path, text[:cut])


@pytest.mark.parametrize(
    "content, match",
    [
        (b'{"images": [\xff]}', r"k\.json' is not UTF-8 text \(byte 12"),
        ([GOOD_ENTRY], r"k\.json must be a JSON object with an 'images' list.*got list"),
        ({"annotations": []}, r"k\.json must be a JSON object.*keys \['annotations'\]"),
        ({"images": []}, r"no images of split 'test' in k\.json"),
        ({"images": [7]}, r"images\[0\] of k\.json is int, expected an object"),
        (
            {"images": [{"filename": "1.jpg", "split": "test"}]},
            r"images\[0\] of k\.json has no 'sentences'",
        ),
        (
            {"images": [dict(GOOD_ENTRY, sentences=[])]},
            r"images\[0\] of k\.json \(1\.jpg\) has no sentences",
        ),
        (
            {"images": [dict(GOOD_ENTRY, sentences=[{"raw": "  "}])]},
            r"sentence 0 of images\[0\] of k\.json.*empty caption",
        ),
        (
            {"images": [dict(GOOD_ENTRY, sentences=[{"tokens": [1, 2]}])]},
            r"'tokens' of sentence 0 of images\[0\].*list of words",
        ),
        (
            {"images": [dict(GOOD_ENTRY, filename=" ")]},
            r"'filename' of images\[0\] of k\.json is ' ', expected a file name",
        ),
        (
            {"images": [GOOD_ENTRY, dict(GOOD_ENTRY, sentences=[{"raw": "x"}])]},
            r"images\[1\] of k\.json names the same image file '1\.jpg' as images\[0\]",
        ),
    ],
)
def test_karpathy_malformed_files(tmp_path, content, match):
    with pytest.raises(ValueError, match=match):
        _karpathy(tmp_path, content)


def test_karpathy_byte_order_mark_and_tokens_only_load(tmp_path):
    entry = dict(GOOD_ENTRY, sentences=[{"tokens": ["a", "dog"]}, {"raw": " A cat. "}])
    ds = _karpathy(tmp_path, BOM + json.dumps({"images": [entry]}).encode())
    assert ds.captions == ["a dog", "A cat."] and ds.n_images == 1
    with pytest.raises(FileNotFoundError, match=r"no annotation file .*missing\.json"):
        KarpathyDataset(tmp_path / "missing.json", tmp_path, "test")


# ---------------------------------------------------------------------------------------------- ALBEF JSON
def _albef(tmp_path, content):
    (tmp_path / "1.jpg").write_bytes(_png())
    path = tmp_path / "a.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return AlbefJsonDataset(path, tmp_path)


@FEW
@given(value=WRONG | st.just("  "))
def test_albef_image_of_wrong_type_names_entry(tmp_path, value):
    with pytest.raises(
        ValueError, match=r"'image' of entry 1 of a\.json is .*expected an image file path"
    ):
        _albef(
            tmp_path, [{"image": "1.jpg", "caption": "a dog"}, {"image": value, "caption": "a cat"}]
        )


@pytest.mark.parametrize(
    "content, match",
    [
        (b"[\xff]", r"a\.json' is not UTF-8 text"),
        (b'[{"image": "1.jpg", "caption": "a d', r"a\.json' is not valid JSON"),
        ({"image": "1.jpg", "caption": "x"}, r"a\.json must hold a JSON list.*got dict"),
        ([], r"no entries in \['a\.json'\]"),
        (
            [{"image": "1.jpg"}],
            r"entry 0 of a\.json needs 'image' and 'caption' fields, got \['image'\]",
        ),
        (["1.jpg"], r"entry 0 of a\.json needs 'image' and 'caption' fields, got str"),
        ([{"image": "1.jpg", "caption": 3}], r"entry 0 of a\.json has no caption \(got 3\)"),
        ([{"image": "1.jpg", "caption": []}], r"entry 0 of a\.json has no caption"),
        (
            [{"image": "1.jpg", "caption": ["a", " "]}],
            r"caption 1 of entry 0 of a\.json is an empty caption",
        ),
    ],
)
def test_albef_malformed_files(tmp_path, content, match):
    with pytest.raises(ValueError, match=match):
        _albef(tmp_path, content)


def test_albef_repeated_image_is_one_image(tmp_path):
    ds = _albef(
        tmp_path,
        BOM
        + json.dumps(
            [{"image": "1.jpg", "caption": "a"}, {"image": "1.jpg", "caption": ["b"]}]
        ).encode(),
    )
    assert ds.n_images == 1 and ds.captions == ["a", "b"] and ds.caption_to_image.tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------- CSV
def _csv(tmp_path, content: bytes, name="c.csv"):
    (tmp_path / "1.jpg").write_bytes(_png())
    (tmp_path / name).write_bytes(content)
    return CsvDataset(tmp_path / name)


CAPTION_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=12,
).filter(lambda s: s.strip())


@FEW
@given(
    caps=st.lists(CAPTION_TEXT, min_size=1, max_size=4),
    bom=st.booleans(),
    sep=st.sampled_from([",", "\t"]),
)
def test_csv_any_caption_written_by_a_csv_writer_reads_back(tmp_path, caps, bom, sep):
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter=sep)
    writer.writerow(["filepath", "caption"])
    writer.writerows([["1.jpg", c] for c in caps])
    ds = _csv(
        tmp_path,
        (BOM if bom else b"") + buf.getvalue().encode(),
        "c.tsv" if sep == "\t" else "c.csv",
    )
    assert ds.captions == [c.strip() for c in caps] and ds.n_images == 1


@FEW
@given(n_fields=st.integers(1, 5).filter(lambda n: n != 2), line=st.integers(0, 2))
def test_csv_ragged_row_names_its_line(tmp_path, n_fields, line):
    rows = [["1.jpg", "a dog"]] * 3
    rows[line] = (["1.jpg", "a dog", "x", "y", "z"])[:n_fields]
    text = "filepath,caption\n" + "".join(",".join(r) + "\n" for r in rows)
    with pytest.raises(
        ValueError, match=rf"line {line + 2} of c\.csv has {n_fields} fields but the header has 2"
    ):
        _csv(tmp_path, text.encode())


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", r"c\.csv has no column 'filepath'; its header is \[\]"),
        (b"file,caption\n1.jpg,a\n", r"c\.csv has no column 'filepath'.*Did you mean 'file'"),
        (b"filepath,caption\n", r"c\.csv has a header but no rows"),
        (b"filepath,caption\n1.jpg,a d\xffog\n", r"c\.csv' is not UTF-8 text"),
        (
            b'filepath,caption\n1.jpg,"a dog\n',
            r"c\.csv' is not a valid CSV file.*unexpected end of data",
        ),
        (b"filepath,caption,caption\n1.jpg,a,b\n", r"c\.csv has the column 'caption' twice"),
        (b"filepath,caption\n1.jpg,  \n", r"line 2 of c\.csv has an empty caption"),
        (b"filepath,caption\n ,a dog\n", r"line 2 of c\.csv has an empty 'filepath'"),
    ],
)
def test_csv_malformed_files(tmp_path, content, match):
    with pytest.raises(ValueError, match=match):
        _csv(tmp_path, content)


# ---------------------------------------------------------------------------------------------- caption / id files
def _caption_files(
    tmp_path, caps: bytes, ids: bytes, mapping: bytes = b'{"7": "1.jpg", "8": "1.jpg"}', **kw
):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "1.jpg").write_bytes(_png())
    (tmp_path / "test_caps.txt").write_bytes(caps)
    (tmp_path / "test_ids.txt").write_bytes(ids)
    (tmp_path / "id_mapping.json").write_bytes(mapping)
    return CaptionFileDataset(tmp_path, "test", **kw)


@FEW
@given(n_caps=st.integers(1, 6), n_ids=st.integers(0, 6))
def test_caption_and_id_files_of_different_lengths(tmp_path, n_caps, n_ids):
    assume(n_caps != n_ids)
    caps, ids = b"a dog\n" * n_caps, b"7\n" * n_ids
    with pytest.raises(
        ValueError, match=rf"test_caps\.txt' has {n_caps} lines but .*test_ids\.txt' has {n_ids}"
    ):
        _caption_files(tmp_path, caps, ids)


@FEW
@given(value=WRONG | st.just(""))
def test_id_mapping_value_that_is_not_a_file_name(tmp_path, value):
    mapping = json.dumps({"7": "1.jpg", "8": value}).encode()
    with pytest.raises(
        ValueError,
        match=r"id_mapping\.json' maps image id 8 \(line 2 of test_ids\.txt\) to .*file name",
    ):
        _caption_files(tmp_path, b"a\nb\n", b"7\n8\n", mapping)


@pytest.mark.parametrize(
    "caps, ids, mapping, match",
    [
        (b"a \xff\n", b"7\n", None, r"line 1 of .*test_caps\.txt' is not UTF-8 text"),
        (b"a\nb\n", b"7\n\xff\n", None, r"line 2 of .*test_ids\.txt' is not UTF-8 text"),
        (b"a\n", b"7\n", b'{"7": "\xff"}', r"id_mapping\.json' is not UTF-8 text"),
        (b"a\n", b"7\n", b'{"7": "1.j', r"id_mapping\.json' is not valid JSON"),
        (b"a\n", b"7\n", b'["1.jpg"]', r"id_mapping\.json' must hold a JSON object"),
        (
            b"a\n",
            b"9\n",
            None,
            r"image id 9 \(line 1 of test_ids\.txt\) is not in .*id_mapping\.json",
        ),
        (
            b"a\n",
            b"7.5\n",
            None,
            r"line 1 of .*test_ids\.txt' is '7\.5', expected an integer image id",
        ),
        (b"a\n\nb\n", b"7\n7\n7\n", None, r"line 2 of .*test_caps\.txt' is an empty caption"),
        (b"", b"", None, r"test_caps\.txt' holds no captions"),
    ],
)
def test_caption_files_malformed(tmp_path, caps, ids, mapping, match):
    kw = {} if mapping is None else {"mapping": mapping}
    with pytest.raises(ValueError, match=match):
        _caption_files(tmp_path, caps, ids, **kw)


def test_caption_files_with_byte_order_marks_load(tmp_path):
    ds = _caption_files(
        tmp_path, BOM + b"a dog\na cat\n", BOM + b"7\n8\n", BOM + b'{"7": "1.jpg", "8": "1.jpg"}'
    )
    assert ds.captions == ["a dog", "a cat"] and ds.image_ids_external == [7, 8]


# ---------------------------------------------------------------------------------------------- precomputed .npy
def _precomp(tmp_path, ims, caps=b"a\nb\n", mmap=True):
    path = tmp_path / "test_ims.npy"
    if isinstance(ims, bytes):
        path.write_bytes(ims)
    else:
        np.save(path, ims, allow_pickle=True)
    (tmp_path / "test_caps.txt").write_bytes(caps)
    return PrecompDataset(tmp_path, "test", mmap=mmap)


class _Opens:
    """Unpickling this calls ``open(path, "w")``: the file appears if the reader ever unpickles."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("mmap", [True, False])
def test_object_npy_is_refused_without_unpickling(tmp_path, mmap):
    sentinel = tmp_path / "unpickled"
    arr = np.empty((2, 1), dtype=object)
    arr[0, 0], arr[1, 0] = _Opens(sentinel), _Opens(sentinel)
    with pytest.raises(ValueError, match=r"test_ims\.npy' is not a plain numeric \.npy array"):
        _precomp(tmp_path, arr, mmap=mmap)
    assert not sentinel.exists()
    # The same bytes under pickle.loads would run the payload: the test can tell.
    pickle.loads(pickle.dumps(_Opens(sentinel))).close()
    assert sentinel.exists()


@FEW
@given(cut=st.integers(0, 10_000), mmap=st.booleans())
def test_truncated_npy_is_refused(tmp_path, cut, mmap):
    buf = io.BytesIO()
    np.save(buf, np.ones((2, 3, 4), np.float32))
    data = buf.getvalue()
    with pytest.raises(ValueError, match=r"test_ims\.npy' is not a plain numeric \.npy array"):
        _precomp(tmp_path, data[: cut % len(data)], mmap=mmap)


@pytest.mark.parametrize(
    "ims, match",
    [
        (
            np.zeros(4, np.float32),
            r"test_ims\.npy' must hold features of shape \(n_images, R, D\).*got \(4,\)",
        ),
        (np.zeros((2, 1, 3, 4), np.float32), r"must hold features of shape.*got \(2, 1, 3, 4\)"),
        (np.zeros((0, 3, 4), np.float32), r"must hold features of shape.*got \(0, 3, 4\)"),
        (np.zeros((2, 3, 4), bool), r"test_ims\.npy' holds dtype bool, expected floating-point"),
        (np.zeros((2, 3), "U3"), r"holds dtype <U3, expected floating-point"),
        (np.zeros((2, 3), [("a", "f4")]), r"holds dtype .*expected floating-point"),
        (
            b"PK\x03\x04" + b"\0" * 64,
            r"test_ims\.npy' is not a plain numeric \.npy array \(BadZipFile",
        ),
        (b"not an array at all" * 4, r"test_ims\.npy' is not a plain numeric \.npy array"),
    ],
)
def test_npy_of_wrong_shape_dtype_or_format(tmp_path, ims, match):
    with pytest.raises(ValueError, match=match):
        _precomp(tmp_path, ims)


def test_precomp_text_files_and_counts(tmp_path):
    feats = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    with pytest.raises(ValueError, match=r"line 2 of .*test_caps\.txt' is not UTF-8 text"):
        _precomp(tmp_path, feats, caps=b"a\n\xfe\n")
    with pytest.raises(
        ValueError, match=r"3 captions in test_caps\.txt is not a multiple of the 2 images"
    ):
        _precomp(tmp_path, feats, caps=b"a\nb\nc\n")
    (tmp_path / "test_ids.txt").write_bytes(b"1\n2\n3\n")
    with pytest.raises(
        ValueError, match=r"test_ids\.txt has 3 lines; expected one per image \(2\)"
    ):
        _precomp(tmp_path, feats)
    (tmp_path / "test_ids.txt").write_bytes(BOM + b"5\n6\n")
    ds = _precomp(tmp_path, feats, caps=BOM + b"a\nb\n")
    assert ds.captions == ["a", "b"] and ds.image_ids_external.tolist() == [5, 6]
    assert_close(ds[1]["images"], torch.from_numpy(feats[1]))
    feats[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"image 1 \(row 1 of .*test_ims\.npy'\) holds NaN or inf"):
        _precomp(tmp_path, feats)[1]


# ---------------------------------------------------------------------------------------------- extracted folders
def _extracted(tmp_path, manifest):
    np.save(tmp_path / "test_ims.npy", np.ones((2, 5, 3), np.float32))
    (tmp_path / "test_caps.txt").write_text("a\nb\n")
    raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    (tmp_path / "test_extract.json").write_bytes(raw)
    return ExtractedDataset(tmp_path, "test")


LAYOUT = {"num_tokens": 5, "dim": 3, "grid": [2, 2], "num_prefix_tokens": 1}


@pytest.mark.parametrize(
    "manifest, match",
    [
        (b'{"complete": tr', r"test_extract\.json' is not a valid UTF-8 JSON manifest"),
        (
            b'{"complete": true, "x": "\xff"}',
            r"test_extract\.json' is not a valid UTF-8 JSON manifest",
        ),
        ([1], r"test_extract\.json' must hold a JSON object, got list"),
        (
            {"complete": False, "shards": {}, "n_images": 2},
            r"did not finish \(0 shards of 2 images",
        ),
        (
            {"complete": True},
            r"'tokens' layout of .*test_extract\.json' is None, expected an object",
        ),
        (
            {"complete": True, "tokens": dict(LAYOUT, grid="2x2")},
            r"has grid '2x2', expected \[h, w\] or null",
        ),
        (
            {"complete": True, "tokens": dict(LAYOUT, num_prefix_tokens=-1)},
            r"has num_prefix_tokens -1",
        ),
        (
            {"complete": True, "tokens": dict(LAYOUT, dim=8)},
            r"\{'dim': 8\}.*does not fit the features of shape \(n, 5, 3\)",
        ),
        (
            {"complete": True, "tokens": dict(LAYOUT, grid=[3, 3])},
            r"\{'grid': \[3, 3\]\}.*does not fit",
        ),
    ],
)
def test_extracted_manifest_malformed(tmp_path, manifest, match):
    with pytest.raises(ValueError, match=match):
        _extracted(tmp_path, manifest)


def test_extracted_manifest_that_fits_loads(tmp_path):
    item = _extracted(tmp_path, {"complete": True, "tokens": LAYOUT})[1]["images"]
    assert isinstance(item, Tokens) and item.grid == (2, 2) and item.num_prefix_tokens == 1
    assert item.feats.shape == (1, 5, 3)


# ---------------------------------------------------------------------------------------------- image files
def _image_dataset(tmp_path, raw: bytes):
    (tmp_path / "x.png").write_bytes(raw)
    (tmp_path / "c.csv").write_text("filepath,caption\nx.png,a dog\n")
    return CsvDataset(tmp_path / "c.csv")


@FEW
@given(cut=st.integers(0, 10_000))
def test_truncated_image_is_reported_or_read_whole(tmp_path, cut):
    raw = _png((6, 5))
    ds = _image_dataset(tmp_path, raw[: cut % len(raw)])
    try:
        pixels = ds[0]["images"]
    except ImageReadError as e:
        assert "x.png" in str(e) and "line 2 of c.csv" in str(e)
    else:
        # Only the trailer was cut: the pixels are all there.
        expected = torch.tensor([200.0, 10.0, 10.0]).div(255).view(3, 1, 1).expand(3, 5, 6)
        assert_close(pixels, expected)


@pytest.mark.parametrize("raw", [b"", b"not an image", _png()[:40]])
def test_empty_or_corrupt_image(tmp_path, raw):
    with pytest.raises(
        ImageReadError, match=r"x\.png' \(named by line 2 of c\.csv.*cannot be read as an image"
    ):
        _image_dataset(tmp_path, raw)[0]


def test_huge_declared_image_size_is_refused_before_decoding(tmp_path, monkeypatch):
    ds = _image_dataset(tmp_path, _png_declaring(100_000, 100_000))
    with pytest.raises(
        ImageReadError, match=r"x\.png' \(named by line 2 of c\.csv.*too large to decode safely"
    ):
        ds[0]
    # The same check on a real image once PIL's limit is lowered below it.
    (tmp_path / "x.png").write_bytes(_png((8, 8)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(ImageReadError, match=r"decompression bomb"):
        ds[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert ds[0]["images"].shape == (3, 8, 8)


def test_missing_image_names_its_annotation(tmp_path):
    ds = ImageFileDataset([tmp_path / "gone.png"], ["a dog"], [0], sources=["entry 4 of a.json"])
    with pytest.raises(FileNotFoundError, match=r"gone\.png' \(named by entry 4 of a\.json"):
        ds[0]


# ---------------------------------------------------------------------------------------------- Vocabulary
JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.sampled_from(["", "a", "b", "<pad>", "<unk>"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["words", "w"]), inner)
    ),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None)
@given(
    d=JSONISH
    | st.fixed_dictionaries(
        {"words": st.lists(st.sampled_from(["a", "b", "c", "", "<unk>", 3]), max_size=4)}
    )
)
def test_vocabulary_from_dict_is_exact_or_refused(d):
    try:
        v = Vocabulary.from_dict(d)
    except ValueError as e:
        assert str(e).startswith("Vocabulary.from_dict: ")
    else:
        # Accepted only when nothing was dropped or merged: the indices are exactly those saved.
        assert v.to_dict()["words"] == d["words"] and v.itos[2:] == d["words"]


def test_vocabulary_load_of_damaged_files(tmp_path):
    path = tmp_path / "v.json"
    Vocabulary(["a", "b"]).save(path)
    assert Vocabulary.load(path)["b"] == 3
    for raw, match in [
        (b"\xff\xfe", r"v\.json' is not a UTF-8 JSON vocabulary"),
        (path.read_bytes()[:-3], r"v\.json' is not a UTF-8 JSON vocabulary"),
        (b'{"words": ["a", "a"]}', r"Vocabulary\.load\('.*v\.json'\): word 1 'a' repeats word 0"),
        (b'["a"]', r"Vocabulary\.load\('.*v\.json'\): expected \{'words'"),
    ]:
        path.write_bytes(raw)
        with pytest.raises(ValueError, match=match):
            Vocabulary.load(path)


# ---------------------------------------------------------------------------------------------- collate
IMAGE_KINDS = {
    "pixels": lambda: torch.rand(3, 2, 2),
    "regions": lambda: torch.rand(2, 4),
    "regions_d5": lambda: torch.rand(3, 5),
    "tokens": lambda: Tokens(torch.rand(1, 2, 4)),
    "text": lambda: "x.png",
    "none": lambda: None,
}
TEXT_KINDS = {
    "str": lambda: "a dog",
    "ids": lambda: [2, 3],
    "float_ids": lambda: [2.5],
    "nested": lambda: [[2]],
}
ID_KINDS = {
    "int": lambda: 1,
    "np": lambda: np.int64(1),
    "tensor": lambda: torch.tensor(1),
    "float": lambda: 1.5,
    "str": lambda: "1",
}


@settings(max_examples=40, deadline=None)
@given(
    images=st.lists(st.sampled_from(sorted(IMAGE_KINDS)), min_size=1, max_size=3),
    texts=st.lists(st.sampled_from(sorted(TEXT_KINDS)), min_size=1, max_size=3),
    ids=st.lists(st.sampled_from(sorted(ID_KINDS)), min_size=1, max_size=3),
)
def test_collate_mixed_batches_are_refused_by_type(images, texts, ids):
    n = min(len(images), len(texts), len(ids))
    batch = [
        {
            "images": IMAGE_KINDS[images[k]](),
            "texts": TEXT_KINDS[texts[k]](),
            "image_ids": ID_KINDS[ids[k]](),
        }
        for k in range(n)
    ]
    images, texts, ids = set(images[:n]), set(texts[:n]), set(ids[:n])
    valid = (
        len(images) == 1
        and images <= {"pixels", "regions", "regions_d5", "tokens"}
        and (texts == {"str"} or texts == {"ids"})
        and ids <= {"int", "np", "tensor"}
    )
    if valid:
        out = collate(batch)
        assert out["image_ids"].tolist() == [1] * n
        assert (
            len(out["texts"]) if isinstance(out["texts"], list) else out["texts"].batch_size
        ) == n
    else:
        with pytest.raises(
            (TypeError, ValueError), match=r"^collate(_images|_texts)?: .*(item|image|caption) \d"
        ):
            collate(batch)


def test_collate_malformed_items():
    with pytest.raises(TypeError, match=r"collate: item 0 is int, expected a dict"):
        collate([1])
    with pytest.raises(ValueError, match=r"collate: item 1 has no \['image_ids'\]"):
        collate(
            [
                {"images": torch.rand(2, 4), "texts": "a", "image_ids": 0},
                {"images": torch.rand(2, 4), "texts": "b"},
            ]
        )
    with pytest.raises(ValueError, match=r"image 1 has shape \(2, 5\) but image 0 has \(2, 4\)"):
        collate_images([torch.rand(2, 4), torch.rand(2, 5)])
    with pytest.raises(TypeError, match=r"image 1 is Tokens, expected a tensor"):
        collate_images([torch.rand(2, 4), Tokens(torch.rand(1, 2, 4))])
    with pytest.raises(TypeError, match=r"caption 1 is str but caption 0 is token ids"):
        collate_texts([[2, 3], "a dog"])
    with pytest.raises(
        TypeError, match=r"caption 0 holds torch\.float32 values, expected integer token ids"
    ):
        collate_texts([[2.7, 3.0]])
    out = collate_texts([np.array([4, 5], np.int32), torch.tensor([6])])
    assert out.feats.tolist() == [[4, 5], [6, 0]] and out.feats.dtype == torch.long


@pytest.mark.parametrize(
    "raw, match",
    [
        (b'{"shards": {', r"test_extract\.json' is not a valid UTF-8 JSON manifest"),
        (b'{"x": "\xff"}', r"test_extract\.json' is not a valid UTF-8 JSON manifest"),
        (b"[1, 2]", r"test_extract\.json' is not an extraction manifest"),
        (b'{"shards": [1]}', r"test_extract\.json' is not an extraction manifest"),
    ],
)
def test_extraction_resumed_over_a_damaged_manifest(tmp_path, raw, match):
    from imtm.data import ImageCaptionDataset
    from imtm.data.extract import extract_features

    data = ImageCaptionDataset(torch.rand(2, 3, 2, 2), ["a", "b"], [0, 1])
    encoder = lambda x: x.flatten(2).transpose(1, 2)  # (B, 4, 3) tokens
    out = extract_features(encoder, data, tmp_path, "test", progress=False)
    (tmp_path / "test_extract.json").write_bytes(raw)
    with pytest.raises(ValueError, match=match):
        extract_features(encoder, data, out, "test", progress=False)
    extract_features(encoder, data, out, "test", progress=False, overwrite=True)
    assert ExtractedDataset(out, "test").n_images == 2
