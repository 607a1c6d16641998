"""Hostile files for every reader: deep JSON, FIFOs, devices, links out of the folder, loops, folders.

One JSON reader (:mod:`imtm._io`) serves the package: a 2 kB file nested 1,000 deep raises the
reader's documented error (a ``ValueError``; ``CheckpointError`` for checkpoint folders) naming
the file, never ``RecursionError``. A run folder whose ``LATEST`` or manifest is a FIFO, or a
link to ``/dev/zero``, is refused at once instead of hanging or reading until ``MemoryError``.
"""

import contextlib
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from toy import ToyCosine, ToyHinge, ToyText, toy_components, toy_data

from imtm import Matcher
from imtm._io import loads_json, read_json, read_regular
from imtm.engine.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint

DEEP = b"[" * 1000 + b"]" * 1000  # 2 kB
DEEP_OBJECT = b'{"a": ' * 1000 + b"1" + b"}" * 1000
posix_only = pytest.mark.skipif(
    sys.platform == "win32" or not hasattr(os, "mkfifo"), reason="FIFOs and /dev/zero"
)


@contextlib.contextmanager
def deadline(seconds=10):
    """Fail instead of hanging: a read blocked on a FIFO is interrupted and the test fails."""

    def alarm(*_):
        raise TimeoutError(f"blocked for {seconds} s (a FIFO read?)")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- the reader itself
@pytest.mark.parametrize("raw", [DEEP, DEEP_OBJECT, b"[" * 101 + b"]" * 101])
def test_read_json_refuses_deep_nesting_with_a_value_error(tmp_path, raw):
    path = tmp_path / "deep.json"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=r"reader: '.*deep\.json'.*nest deeper than 100 levels"):
        read_json(path, who="reader")
    if raw.count(b"[") == 101:  # the limit is a parameter
        expected = []
        for _ in range(100):
            expected = [expected]
        assert read_json(path, who="reader", max_depth=101) == expected


def test_read_json_limits_size_and_names_the_file(tmp_path):
    path = tmp_path / "big.json"
    path.write_bytes(b"[" + b"1," * 100 + b"1]")
    with pytest.raises(
        ValueError, match=r"reader: '.*big\.json' holds 203 bytes, more than the 100"
    ):
        read_json(path, who="reader", max_bytes=100)
    assert len(read_json(path, who="reader")) == 101
    with pytest.raises(ValueError, match=r"is not UTF-8 text \(byte 1"):
        loads_json(b"[\xff]", "x")
    assert loads_json(b"\xef\xbb\xbf[1]", "x") == [1]  # a byte-order mark is skipped


@posix_only
@pytest.mark.parametrize("kind", ["fifo", "devzero", "folder", "loop", "outside"])
def test_read_regular_refuses_what_is_not_a_regular_file_inside_the_root(tmp_path, kind):
    root = tmp_path / "root"
    root.mkdir()
    path = root / "f"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "devzero":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    elif kind == "loop":
        path.symlink_to(root / "g")
        (root / "g").symlink_to(path)
    else:
        (tmp_path / "secret").write_text("x")
        path.symlink_to(tmp_path / "secret")
    match = {
        "fifo": "is a FIFO",
        "devzero": "outside|character device",
        "folder": "is a folder",
        "loop": "cannot be (resolved|opened)|cannot open",
        "outside": "outside",
    }[kind]
    with deadline(), pytest.raises(ValueError, match=match):
        read_regular(path, max_bytes=100, root=root)
    if kind in ("fifo", "devzero", "folder"):  # without a root: still not a regular file
        with deadline(), pytest.raises(ValueError, match="not a regular file|is a folder"):
            read_regular(path, max_bytes=100)


# ---------------------------------------------------------------- every JSON reader of the package
def _png(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "1.jpg", "PNG")


def karpathy(tmp_path):
    from imtm.data.karpathy import KarpathyDataset

    _png(tmp_path)
    (tmp_path / "k.json").write_bytes(DEEP)
    KarpathyDataset(tmp_path / "k.json", tmp_path, "test")


def albef(tmp_path):
    from imtm.data.albef import AlbefJsonDataset

    _png(tmp_path)
    (tmp_path / "a.json").write_bytes(DEEP)
    AlbefJsonDataset(tmp_path / "a.json", tmp_path)


def id_mapping(tmp_path):
    from imtm.data.caption_files import CaptionFileDataset

    _png(tmp_path)
    (tmp_path / "test_caps.txt").write_text("a dog\n")
    (tmp_path / "test_ids.txt").write_text("7\n")
    (tmp_path / "id_mapping.json").write_bytes(DEEP_OBJECT)
    CaptionFileDataset(tmp_path, "test", image_root=tmp_path)


def vocabulary(tmp_path):
    from imtm.data import Vocabulary

    (tmp_path / "v.json").write_bytes(DEEP_OBJECT)
    Vocabulary.load(tmp_path / "v.json")


def extracted_manifest(tmp_path):
    from imtm.data.extracted import ExtractedDataset

    np.save(tmp_path / "test_ims.npy", np.ones((2, 5, 3), np.float32))
    (tmp_path / "test_caps.txt").write_text("a\nb\n")
    (tmp_path / "test_extract.json").write_bytes(DEEP)
    ExtractedDataset(tmp_path, "test")


def extraction_resumed(tmp_path):
    from imtm.data import ImageCaptionDataset
    from imtm.data.extract import extract_features

    data = ImageCaptionDataset(torch.rand(2, 3, 2, 2), ["a", "b"], [0, 1])
    encoder = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731
    out = extract_features(encoder, data, tmp_path, "test", progress=False)
    (tmp_path / "test_extract.json").write_bytes(DEEP_OBJECT)
    extract_features(encoder, data, out, "test", progress=False)


def similarity(tmp_path):
    from safetensors.torch import save_file

    from imtm.metrics import load_similarity

    save_file(
        {"sims": torch.zeros(1, 1), "caption_to_image": torch.zeros(1, dtype=torch.long)},
        str(tmp_path / "s.safetensors"),
        metadata={"format": "imtm.similarity", "version": "1", "meta": DEEP.decode()},
    )
    load_similarity(tmp_path / "s.safetensors")


READERS = [
    karpathy,
    albef,
    id_mapping,
    vocabulary,
    extracted_manifest,
    extraction_resumed,
    similarity,
]


@pytest.mark.parametrize("reader", READERS, ids=[r.__name__ for r in READERS])
def test_every_data_reader_refuses_deep_json_with_a_value_error(tmp_path, reader):
    with pytest.raises(ValueError, match="nest deeper than 100") as info:
        reader(tmp_path)
    assert not isinstance(info.value, RecursionError)


@pytest.fixture(scope="module")
def data():
    return toy_data(n_images=12)


@pytest.fixture(scope="module")
def fitted_run(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("fitted")
    m = Matcher(
        toy_components(data.vocab),
        epochs=1,
        batch_size=6,
        verbose=False,
        device="cpu",
        checkpoint_dir=str(root / "run"),
    ).fit(data)
    m.save(root / "model")
    return root, m


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_matcher_load_and_resume_refuse_a_deep_manifest(fitted_run, data, tmp_path):
    root, _ = fitted_run
    model = _copy(root / "model", tmp_path / "model")
    (model / "MANIFEST.json").write_bytes(DEEP_OBJECT)
    with pytest.raises(CheckpointError, match=r"MANIFEST\.json.*nest deeper than 100"):
        Matcher.load(model)
    run = _copy(root / "run", tmp_path / "run")
    (latest_checkpoint(run) / "MANIFEST.json").write_bytes(DEEP)
    m = Matcher(
        toy_components(data.vocab),
        epochs=1,
        batch_size=6,
        verbose=False,
        device="cpu",
        checkpoint_dir=str(run),
    )
    with pytest.raises(CheckpointError, match=r"MANIFEST\.json.*nest deeper than 100"):
        m.fit(data, resume=True)


def test_two_stage_retriever_load_refuses_deep_json(tmp_path, data):
    from imtm.components.encoders.precomputed import PrecomputedEncoder
    from imtm.retrieval import TwoStageRetriever

    blocks = [
        PrecomputedEncoder(in_dim=6, out_dim=8),
        ToyText(vocab=data.vocab),
        ToyCosine(),
        ToyHinge(),
    ]
    m = Matcher(blocks, epochs=1, batch_size=6, device="cpu", verbose=False, random_state=0).fit(
        data
    )
    path = TwoStageRetriever(m, k=2).fit(images=data.images).save(tmp_path / "r")
    (path / "retriever.json").write_bytes(DEEP_OBJECT)
    with pytest.raises(ValueError, match=r"retriever\.json .*nest deeper than 100"):
        TwoStageRetriever.load(path, m)


# ---------------------------------------------------------------- hostile run folders (FIFO, /dev/zero, loops)
def _resume(run, data):
    m = Matcher(
        toy_components(data.vocab),
        epochs=1,
        batch_size=6,
        verbose=False,
        device="cpu",
        checkpoint_dir=str(run),
    )
    with deadline():
        m.fit(data, resume=True)


@posix_only
@pytest.mark.parametrize(
    "what, match",
    [
        ("latest-fifo", r"LATEST' is a FIFO, not a regular file"),
        ("latest-devzero", r"LATEST' leads to '/dev/zero', outside"),
        ("latest-folder", r"LATEST' is a folder"),
        ("latest-loop", r"cannot open '.*LATEST' \(Too many levels of symbolic links\)"),
        ("manifest-fifo", r"MANIFEST\.json is not a regular file \(a device, FIFO"),
        (
            "manifest-devzero",
            r"MANIFEST\.json is a symlink to /dev/zero, outside the checkpoint folder",
        ),
        ("state-devzero", r"state\.json.*(/dev/zero|not a regular file)"),
        ("config-folder", r"config\.json.*(folder|not a regular file)"),
    ],
)
def test_resume_refuses_a_hostile_run_folder_at_once(fitted_run, data, tmp_path, what, match):
    root, _ = fitted_run
    run = _copy(root / "run", tmp_path / "run")
    ckpt = latest_checkpoint(run)
    target = {
        "latest": run / "LATEST",
        "manifest": ckpt / "MANIFEST.json",
        "state": ckpt / "state.json",
        "config": ckpt / "config.json",
    }[what.split("-")[0]]
    target.unlink()
    kind = what.split("-")[1]
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "devzero":
        target.symlink_to("/dev/zero")
    elif kind == "folder":
        target.mkdir()
    else:
        target.symlink_to(run / "LOOP")
        (run / "LOOP").symlink_to(target)
    with pytest.raises(CheckpointError, match=match):
        _resume(run, data)


@posix_only
def test_load_refuses_a_symlink_loop_and_a_folder_as_a_checkpoint_file(fitted_run, tmp_path):
    root, _ = fitted_run
    model = _copy(root / "model", tmp_path / "model")
    (model / "record.json").unlink()
    (model / "record.json").symlink_to(model / "loop")
    (model / "loop").symlink_to(model / "record.json")
    with pytest.raises(
        CheckpointError, match=r"(record\.json|loop) is a link that cannot be resolved"
    ):
        Matcher.load(model)
    model = _copy(root / "model", tmp_path / "model2")
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        read_checkpoint(model)
