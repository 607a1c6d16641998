"""Numeric parameters, batch dtypes, huge features, leftover temporaries and forged run files.

- Every numeric ``Matcher`` parameter is checked in ``validate()`` (``grad_clip=-1`` trained
  uphill, ``0`` zeroed every gradient, ``nan`` wrote NaN into the weights).
- A batch takes the common dtype of its images, whatever their order (a float16 first image
  used to truncate the float32 ones, and a finite 70,000 became inf).
- Finite features around 6e19 are normalised safely (they used to give scores of exactly 0.0).
- ``extract_features`` removes the temporaries of killed writers when it starts.
- A forged ``record.json`` seed, a forged ``state.json``, block names that cannot name a module and a
  truncated ``.npy`` read without memory-mapping raise the documented error naming the file and entry.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from toy import ToyCosine, ToyHinge, ToyImage, ToyText, toy_components, toy_data

from imtm import Matcher
from imtm.data import collate_images
from imtm.engine.checkpoint import CheckpointError, latest_checkpoint
from imtm.engine.serialization import file_sha256
from imtm.tokens import Tokens, l2_normalize


@pytest.fixture(scope="module")
def data():
    return toy_data(n_images=12)


def matcher(data, **kw):
    kw = {"epochs": 1, "batch_size": 6, "verbose": False, "device": "cpu", **kw}
    return Matcher(toy_components(data.vocab), **kw)


# ---------------------------------------------------------------- item 5: numeric parameters
@pytest.mark.parametrize(
    "param, value, match",
    [
        ("grad_clip", -1.0, r"grad_clip must be a finite number > 0 or None, got -1\.0"),
        ("grad_clip", 0, r"grad_clip must be a finite number > 0 or None, got 0"),
        ("grad_clip", float("nan"), r"grad_clip must be .* got nan"),
        ("grad_clip", float("inf"), r"grad_clip must be .* got inf"),
        ("grad_clip", True, r"grad_clip must be .* got True"),
        ("warmup", float("nan"), r"warmup must be a finite number >= 0, got nan"),
        ("warmup", -0.1, r"warmup must be a finite number >= 0"),
        ("lr", float("inf"), r"lr must be a finite number > 0, got inf"),
        ("lr", float("nan"), r"lr must be a finite number > 0, got nan"),
        ("weight_decay", float("nan"), r"weight_decay must be a finite number >= 0"),
        ("weight_decay", -1e-4, r"weight_decay must be a finite number >= 0"),
        (
            "random_state",
            2**64,
            r"random_state must be None or an integer in \[0, 2\*\*32\), got 18446744073709551616",
        ),
        ("random_state", -1, r"random_state must be None or an integer"),
        ("random_state", 1.5, r"random_state must be None or an integer"),
        ("device", "meta", r"device 'meta' holds no data"),
        ("device", "gpu7", r"invalid device 'gpu7'"),
        ("num_workers", -1, r"num_workers must be an integer >= 0"),
        ("checkpoint_every", 0, r"checkpoint_every must be an integer >= 1 or None"),
    ],
)
def test_numeric_parameters_are_validated_before_training(data, param, value, match):
    m = matcher(data, **{param: value})
    with pytest.raises(ValueError, match=match):
        m.validate()
    with pytest.raises(ValueError, match=match):
        m.fit(data)
    assert not hasattr(m, "components_")  # refused before anything was built or trained


def test_valid_numeric_parameters_pass(data):
    for kw in (
        {"grad_clip": None},
        {"grad_clip": 0.5},
        {"warmup": 0},
        {"warmup": 3},
        {"random_state": None},
        {"random_state": 2**32 - 1},
        {"checkpoint_every": 2},
        {"device": "cpu"},
        {"weight_decay": 0},
    ):
        matcher(data, **kw).validate()


@pytest.mark.parametrize(
    "name, match",
    [
        ("a.b", "it contains '.'"),
        ("training", "it is an attribute of torch.nn.Module"),
        ("forward", "it is an attribute of torch.nn.Module"),
    ],
)
def test_block_names_that_cannot_name_a_module_are_a_value_error(data, name, match):
    blocks = [(name, ToyImage()), ToyText(vocab=data.vocab), ToyCosine(), ToyHinge()]
    with pytest.raises(
        ValueError, match=rf"component name '{name}' \(component 0\) cannot name a block: {match}"
    ):
        Matcher(blocks, verbose=False).fit(data)


# ---------------------------------------------------------------- item 8: batch dtypes
def test_a_batch_takes_the_common_dtype_whatever_the_order():
    a = torch.full((2, 3), 1 / 3, dtype=torch.float16)
    b = torch.full((3, 3), 1 / 3 + 1e-6)  # not representable in float16
    c = torch.full((1, 3), 70000.0)  # finite in float32, inf in float16
    for items in ([a, b, c], [b, c, a], [c, a, b]):
        out = collate_images(items)
        assert out.feats.dtype == torch.float32
        assert bool(torch.isfinite(out.feats[out.mask]).all())
    fwd, back = collate_images([a, b]), collate_images([b, a])
    torch.testing.assert_close(fwd.feats[1, :3], b, rtol=0, atol=0)
    torch.testing.assert_close(fwd.feats[1], back.feats[0], rtol=0, atol=0)
    torch.testing.assert_close(fwd.feats[0, :2], a.float(), rtol=0, atol=0)
    pixels = collate_images(
        [torch.zeros(3, 2, 2, dtype=torch.float16), torch.full((3, 2, 2), 70000.0)]
    )
    assert pixels.dtype == torch.float32 and bool(torch.isfinite(pixels).all())
    same = collate_images([torch.zeros(3, 2, 2, dtype=torch.uint8)] * 2)
    assert same.dtype == torch.uint8  # one dtype: kept as it is


def test_a_large_finite_float32_image_after_a_float16_one_is_not_called_nonfinite(data):
    from imtm.components import PrecomputedEncoder

    blocks = [
        PrecomputedEncoder(in_dim=6, out_dim=8),
        ToyText(vocab=data.vocab),
        ToyCosine(),
        ToyHinge(),
    ]
    m = Matcher(blocks, epochs=1, batch_size=6, verbose=False, device="cpu").fit(data)
    images = [torch.rand(2, 6).half(), torch.full((3, 6), 70000.0)]
    scores = m.similarity(images, data.captions[:2])
    assert bool(torch.isfinite(scores).all())


# ---------------------------------------------------------------- item 15: huge finite features
def _reference(x: torch.Tensor) -> torch.Tensor:
    """The direction of each row, computed row by row in float64 (a plain loop)."""
    rows = []
    for row in x.double():
        n = row.abs().max()
        row = row / n if n > 0 else row
        rows.append(row / max(float(row.norm()), 1e-12))
    return torch.stack(rows)


@settings(max_examples=40, deadline=None)
@given(exp=st.integers(-8, 37), seed=st.integers(0, 2**16), d=st.integers(1, 64))
def test_l2_normalize_matches_float64_at_any_scale(exp, seed, d):
    # Norms far above eps (1e-12), where F.normalize's floor does not apply; signs mixed.
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(3, d, generator=g) < 0.5, -1.0, 1.0)
    x = sign * (torch.rand(3, d, generator=g) + 0.1) * float(f"1e{exp}")
    torch.testing.assert_close(l2_normalize(x), _reference(x).float(), rtol=1e-5, atol=1e-6)


def test_huge_finite_features_score_as_their_direction():
    from imtm.functional.similarity import cosine_similarity_matrix

    x = torch.tensor([[6e19, 8e19, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(l2_normalize(x)[:2], torch.tensor([[0.6, 0.8, 0.0]] * 2))
    assert torch.equal(l2_normalize(x)[2], torch.zeros(3))  # zero stays zero
    s = cosine_similarity_matrix(x[:2], x[:2])
    torch.testing.assert_close(s, torch.ones(2, 2))
    # Ordinary rows are F.normalize's result bit for bit.
    y = torch.randn(5, 7)
    assert torch.equal(l2_normalize(y), F.normalize(y, dim=-1))
    t = Tokens(torch.tensor([[[6e19, 8e19], [1.0, 0.0]]]), torch.tensor([[True, False]]))
    torch.testing.assert_close(t.normalize().feats, torch.tensor([[[0.6, 0.8], [0.0, 0.0]]]))


# ---------------------------------------------------------------- item 10: extraction temporaries
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_extract_features_removes_temporaries_of_dead_writers(tmp_path):
    import os

    from imtm.data import ImageCaptionDataset
    from imtm.data.extract import extract_features

    out = tmp_path / "out"
    out.mkdir()
    dead, alive = _dead_pid(), os.getppid()
    stale = [
        f".test_ims.npy.tmp{dead}",
        f".test_caps.txt.tmp{dead}",
        f".test_extract.json.tmp{dead}",
    ]
    kept = [
        f".test_ims.npy.tmp{alive}",
        f".train_ims.npy.tmp{dead}" + "x",
        "notes.txt",
        f".test_ims.npy.old{dead}",
    ]
    for name in stale + kept:
        (out / name).write_bytes(b"\x93NUMPY" + b"\0" * 1000)
    data = ImageCaptionDataset(torch.rand(2, 3, 2, 2), ["a", "b"], [0, 1])
    extract_features(lambda x: x.flatten(2).transpose(1, 2), data, out, "test", progress=False)
    left = {p.name for p in out.iterdir()}
    assert not left & set(stale), left
    assert set(kept) <= left  # a running writer's, another name, not imtm's: never touched


# ---------------------------------------------------------------- item 12: forged files, documented errors
@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    m = matcher(data, epochs=2, checkpoint_dir=str(root / "run"))
    m.fit(data)
    m.save(root / "model")
    return root


def _rewrite(folder, name, edit):
    path = folder / name
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    manifest["sha256"][name] = file_sha256(path)
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("seed", ["x", 2**70, -1, 1.5, True])
def test_a_forged_record_seed_is_a_checkpoint_error_naming_it(run, tmp_path, seed):
    import shutil

    model = shutil.copytree(run / "model", tmp_path / "model")
    _rewrite(model, "record.json", lambda r: r.update(seed=seed))
    with pytest.raises(
        CheckpointError, match=r"record\.json: entry 'seed' is .*expected an integer"
    ):
        Matcher.load(model)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s["__dict__"].pop("position"), r"entry 'position' is missing"),
        (
            lambda s: s["__dict__"]["position"]["__dict__"].pop("batch"),
            r"entry 'position\.batch' is None",
        ),
        (lambda s: s["__dict__"]["rng"]["__dict__"].pop("torch"), r"entry 'rng\.torch' is missing"),
        (
            lambda s: s["__dict__"]["rng"]["__dict__"].update(torch={"__tensor__": "nowhere"}),
            r"names tensor 'nowhere' that optimizer\.safetensors does not hold",
        ),
    ],
)
def test_a_forged_state_json_is_a_checkpoint_error_naming_the_entry(
    run, data, tmp_path, edit, match
):
    import shutil

    folder = shutil.copytree(run / "run", tmp_path / "run")
    _rewrite(latest_checkpoint(folder), "state.json", edit)
    with pytest.raises(CheckpointError, match=r"state\.json.*" + match):
        matcher(data, epochs=2, checkpoint_dir=str(folder)).fit(data, resume=True)


def test_a_truncated_npy_read_without_mmap_names_the_file(tmp_path):
    import io

    from imtm.data.precomp import PrecompImages
    from imtm.retrieval.index import TorchIndex

    path = tmp_path / "embedding.npy"
    # A header that declares 10**13 rows over 48 bytes of data: np.load(mmap_mode=None) would allocate them.
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (10**13, 3)}
    )
    path.write_bytes(buf.getvalue() + np.ones((4, 3), np.float32).tobytes())
    with pytest.raises(
        ValueError,
        match=r"embedding\.npy.*truncated: its header declares shape \(10000000000000, 3\)",
    ):
        TorchIndex.load(tmp_path, mmap=False)
    with pytest.raises(ValueError, match=r"embedding\.npy.*truncated"):
        PrecompImages(path, mmap=False)
    np.save(path, np.ones((4, 3), np.float32))
    path.write_bytes(path.read_bytes()[:-7])  # a plain truncation
    with pytest.raises(ValueError, match=r"truncated: its header declares shape \(4, 3\)"):
        PrecompImages(path, mmap=False)


def test_vocabulary_load_of_a_folder_is_a_value_error(tmp_path):
    from imtm.data import Vocabulary

    with pytest.raises(ValueError, match=r"Vocabulary\.load: .* is a folder"):
        Vocabulary.load(tmp_path)
