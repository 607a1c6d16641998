import json

import numpy as np
import pytest
import torch
from raw_images import captions, write_image, write_karpathy
from torch.testing import assert_close

from imtm.components import TimmVisionEncoder
from imtm.data import (
    ImageCaptionDataset,
    ImageFileDataset,
    KarpathyDataset,
    PrecompDataset,
    collate,
)
from imtm.data.extract import dataset_from_format, extract_features
from imtm.data.transforms import image_transform
from imtm.tokens import Tokens

N_IMAGES, SHARD, BATCH = 11, 4, 2  # shards of 4, 4 and 3 images


class CountingEncoder(torch.nn.Module):
    """Pixels (B, 3, 4, 4) -> 16 patch tokens of width 5; counts the images it sees, can stop mid-run."""

    def __init__(self, stop_after_images=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(3, 5, generator=g))
        self.seen = 0
        self.stop_after_images = stop_after_images

    def forward(self, x):
        if self.stop_after_images is not None and self.seen >= self.stop_after_images:
            raise KeyboardInterrupt
        self.seen += len(x)
        return Tokens(x.flatten(2).transpose(1, 2) @ self.w, grid=(4, 4))


def _dataset(tmp_path, n=N_IMAGES, cpi=2):
    paths = [write_image(tmp_path / "imgs" / f"{k}.png", k, size=(6, 5)) for k in range(n)]
    # Captions listed out of image order: the output groups them by image.
    c2i = torch.arange(n * cpi).remainder(n)
    return ImageFileDataset(
        paths,
        captions(n * cpi),
        c2i,
        image_transform({"input_size": (3, 4, 4)}),
        image_ids_external=[100 + k for k in range(n)],
    )


def _expected(ds, enc):
    x = torch.stack([ds.images[k] for k in range(ds.n_images)])
    with torch.no_grad():
        return enc(x).feats


def test_round_trip_into_precomp_dataset(tmp_path):
    ds = _dataset(tmp_path)
    enc = CountingEncoder()
    out = extract_features(
        enc, ds, tmp_path / "out", "test", batch_size=BATCH, shard_size=SHARD, progress=False
    )
    assert enc.seen == N_IMAGES  # one pass over the unique images
    pre = PrecompDataset(out, "test")
    assert (pre.n_images, pre.n_captions, pre.captions_per_image) == (N_IMAGES, 2 * N_IMAGES, 2)
    assert_close(torch.stack(list(pre.images)), _expected(ds, CountingEncoder()))
    for k in range(N_IMAGES):
        assert pre.captions[2 * k : 2 * k + 2] == [ds.captions[k], ds.captions[k + N_IMAGES]]
    assert pre.image_ids_external.tolist() == [100 + k for k in range(N_IMAGES)]
    assert (out / "test_images.txt").read_text().split() == ds.image_paths
    manifest = json.loads((out / "test_extract.json").read_text())
    assert manifest["complete"] and manifest["tokens"] == {
        "num_tokens": 16,
        "dim": 5,
        "grid": [4, 4],
        "num_prefix_tokens": 0,
    }
    assert not (out / "test_shards").exists()  # assembled, shards removed
    assert collate([pre[k] for k in range(3)])["images"].feats.shape == (3, 16, 5)
    again = CountingEncoder()
    extract_features(again, ds, out, "test", batch_size=BATCH, shard_size=SHARD, progress=False)
    assert again.seen == 0  # a finished run is not redone


@pytest.mark.parametrize("k_shards", [0, 1, 2])
def test_resume_after_interruption_neither_duplicates_nor_loses_a_shard(tmp_path, k_shards):
    ds = _dataset(tmp_path)
    reference = extract_features(
        CountingEncoder(),
        ds,
        tmp_path / "ref",
        "test",
        batch_size=BATCH,
        shard_size=SHARD,
        progress=False,
    )
    out = tmp_path / "out"
    # Stop inside shard k (after its first batch): k shards are complete, shard k is half encoded.
    stopper = CountingEncoder(stop_after_images=k_shards * SHARD + BATCH)
    with pytest.raises(KeyboardInterrupt):
        extract_features(
            stopper,
            ds,
            out,
            "test",
            batch_size=BATCH,
            shard_size=SHARD,
            keep_shards=True,
            progress=False,
        )
    shards = sorted(p.name for p in (out / "test_shards").iterdir())
    assert shards == [f"test-{k:05d}-of-00003.npy" for k in range(k_shards)]
    manifest = json.loads((out / "test_extract.json").read_text())
    assert sorted(manifest["shards"]) == shards and not manifest["complete"]
    assert not (out / "test_ims.npy").exists()

    resumed = CountingEncoder()
    extract_features(
        resumed,
        ds,
        out,
        "test",
        batch_size=BATCH,
        shard_size=SHARD,
        keep_shards=True,
        progress=False,
    )
    assert resumed.seen == N_IMAGES - k_shards * SHARD  # only the missing shards are encoded
    assert sorted(p.name for p in (out / "test_shards").iterdir()) == [
        f"test-{k:05d}-of-00003.npy" for k in range(3)
    ]
    assert np.array_equal(np.load(out / "test_ims.npy"), np.load(reference / "test_ims.npy"))
    assert (out / "test_caps.txt").read_text() == (reference / "test_caps.txt").read_text()


def test_resume_after_a_kill_mid_write_and_before_the_manifest(tmp_path):
    ds = _dataset(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        extract_features(
            CountingEncoder(stop_after_images=2 * SHARD),
            ds,
            out,
            "test",
            batch_size=BATCH,
            shard_size=SHARD,
            progress=False,
        )
    # A kill can leave a half-written temporary file, and a renamed shard the manifest does not list yet.
    (out / "test_shards" / ".test-00002-of-00003.npy.tmp4242").write_bytes(b"\x93NUMPY half")
    manifest = json.loads((out / "test_extract.json").read_text())
    del manifest["shards"]["test-00001-of-00003.npy"]
    (out / "test_extract.json").write_text(json.dumps(manifest))
    resumed = CountingEncoder()
    extract_features(resumed, ds, out, "test", batch_size=BATCH, shard_size=SHARD, progress=False)
    assert resumed.seen == N_IMAGES - 2 * SHARD  # the unlisted but complete shard is kept
    assert_close(torch.from_numpy(np.load(out / "test_ims.npy")), _expected(ds, CountingEncoder()))
    assert not (out / "test_shards").exists()


def test_a_different_run_in_the_folder_is_refused(tmp_path):
    ds = _dataset(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        extract_features(
            CountingEncoder(stop_after_images=SHARD),
            ds,
            out,
            "test",
            batch_size=BATCH,
            shard_size=SHARD,
            progress=False,
        )
    with pytest.raises(
        ValueError, match=r"belongs to a different run \(shard_size: 4 there, 5 now.*overwrite=True"
    ):
        extract_features(CountingEncoder(), ds, out, "test", shard_size=5, progress=False)
    with pytest.raises(ValueError, match=r"encoder: 'CountingEncoder' there, 'vit' now"):
        extract_features(
            CountingEncoder(), ds, out, "test", shard_size=SHARD, encoder_name="vit", progress=False
        )
    fresh = CountingEncoder()
    extract_features(fresh, ds, out, "test", shard_size=5, overwrite=True, progress=False)
    assert fresh.seen == N_IMAGES and PrecompDataset(out, "test").n_images == N_IMAGES
    (out / "other_shards").mkdir()
    (out / "other_shards" / "x.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="holds files but other_extract.json is missing"):
        extract_features(CountingEncoder(), ds, out, "other", progress=False)


def test_captions_per_image_and_float16(tmp_path):
    paths = [write_image(tmp_path / f"{k}.png", k) for k in range(3)]
    ds = ImageFileDataset(
        paths, captions(7), [0, 0, 1, 1, 1, 2, 2], image_transform({"input_size": (3, 4, 4)})
    )
    with pytest.raises(ValueError, match="between 2 and 3 captions; .* pass captions_per_image=k"):
        extract_features(CountingEncoder(), ds, tmp_path / "o", "test", progress=False)
    with pytest.raises(ValueError, match="image 0 has 2 captions, fewer than captions_per_image=3"):
        extract_features(
            CountingEncoder(), ds, tmp_path / "o", "test", captions_per_image=3, progress=False
        )
    out = extract_features(
        CountingEncoder(),
        ds,
        tmp_path / "o",
        "test",
        captions_per_image=2,
        dtype="float16",
        progress=False,
    )
    pre = PrecompDataset(out, "test")
    assert pre.captions == [ds.captions[j] for j in (0, 1, 2, 3, 5, 6)]
    assert np.load(out / "test_ims.npy").dtype == np.float16
    assert_close(torch.stack(list(pre.images)), _expected(ds, CountingEncoder()).half().float())
    assert pre.image_ids_external.tolist() == [0, 1, 2]  # no dataset ids: the image indices


def test_bad_encoder_outputs_and_arguments(tmp_path):
    ds = ImageCaptionDataset(torch.rand(4, 3, 4, 4), ["a", "b", "c", "d"], [0, 1, 2, 3])
    padded = lambda x: Tokens.from_lengths(torch.ones(len(x), 3, 2), torch.full((len(x),), 2))
    with pytest.raises(ValueError, match="returned padded tokens"):
        extract_features(padded, ds, tmp_path / "a", "test", progress=False)
    calls = iter(range(10))
    growing = lambda x: torch.ones(len(x), 2 + next(calls), 3)
    with pytest.raises(
        ValueError, match=r"images 2..3 gave tokens of shape \(3, 3\), earlier images \(2, 3\)"
    ):
        extract_features(growing, ds, tmp_path / "b", "test", batch_size=2, progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        extract_features(
            lambda x: torch.full((len(x), 2), float("nan")),
            ds,
            tmp_path / "c",
            "test",
            progress=False,
        )
    with pytest.raises(ValueError, match=r"must return \(B, N, D\) tokens or \(B, D\) vectors"):
        extract_features(lambda x: torch.ones(2, 3), ds, tmp_path / "d", "test", progress=False)
    with pytest.raises(TypeError, match="must return Tokens or a tensor"):
        extract_features(lambda x: "x", ds, tmp_path / "e", "test", progress=False)
    with pytest.raises(TypeError, match="list has no 'images'"):
        extract_features(padded, [1, 2], tmp_path / "f", "test")
    with pytest.raises(ValueError, match="shard_size must be a positive integer"):
        extract_features(padded, ds, tmp_path / "f", "test", shard_size=0)
    with pytest.raises(ValueError, match="num_workers must be a non-negative integer"):
        extract_features(padded, ds, tmp_path / "f", "test", num_workers=-1)
    with pytest.raises(ValueError, match=r"dtype must be one of \['float16', 'float32'\]"):
        extract_features(padded, ds, tmp_path / "f", "test", dtype="bfloat16")
    with pytest.raises(ValueError, match="split must be a plain file-name prefix"):
        extract_features(padded, ds, tmp_path / "f", "a/b")
    holey = ImageCaptionDataset(torch.rand(3, 3, 4, 4), ["a", "b"], [0, 2])
    with pytest.raises(ValueError, match="image 1 has no caption"):
        extract_features(padded, holey, tmp_path / "f", "test")
    # (B, D) vectors are stored as one token per image
    out = extract_features(lambda x: x.mean((2, 3)), ds, tmp_path / "g", "test", progress=False)
    assert PrecompDataset(out, "test").images.shape == (4, 1, 3)


def test_timm_encoder_on_a_karpathy_split(tmp_path):
    path, images, entries = write_karpathy(tmp_path)
    enc = TimmVisionEncoder(
        "vit_tiny_patch16_224",
        img_size=16,
        freeze=True,
        model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
    )
    data = dataset_from_format("karpathy", path, "train", images, image_transform(enc))
    assert isinstance(data, KarpathyDataset)
    out = extract_features(
        enc, data, tmp_path / "feats", "train", batch_size=3, shard_size=2, progress=False
    )
    pre = PrecompDataset(out, "train")
    assert pre.images.shape == (data.n_images, 5, 32) and pre.captions == data.captions
    with torch.no_grad():
        expected, _ = enc.eval()(torch.stack(list(data.images)))
    assert_close(torch.stack(list(pre.images)), expected.feats)
    tokens = json.loads((out / "train_extract.json").read_text())["tokens"]
    assert tokens["grid"] == [2, 2] and tokens["num_prefix_tokens"] == 1
    assert pre.image_ids_external.tolist() == [
        e["imgid"] for e in entries if e["split"] in ("train", "restval")
    ]
    with pytest.raises(ValueError, match=r"format must be one of .*Did you mean 'csv'"):
        dataset_from_format("cvs", path, "train")
    with pytest.raises(ValueError, match="needs --image-root"):
        dataset_from_format("karpathy", path, "train")


def test_extracted_dataset_keeps_the_grid_through_collate_and_blocks(tmp_path):
    from imtm.components import PrecomputedEncoder
    from imtm.data import ExtractedDataset

    ds = _dataset(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        extract_features(
            CountingEncoder(stop_after_images=SHARD),
            ds,
            out,
            "test",
            batch_size=BATCH,
            shard_size=SHARD,
            progress=False,
        )
    with pytest.raises(
        ValueError, match=r"did not finish \(1 shards of 11 images written\); run the same"
    ):
        ExtractedDataset(out, "test")
    extract_features(
        CountingEncoder(), ds, out, "test", batch_size=BATCH, shard_size=SHARD, progress=False
    )
    ext, pre = ExtractedDataset(out, "test"), PrecompDataset(out, "test")
    assert ext.token_layout["grid"] == [4, 4] and ext.images.shape == (N_IMAGES, 16, 5)
    batch = collate([ext[k] for k in range(5)])
    assert batch["images"].grid == (4, 4) and batch["images"].num_prefix_tokens == 0
    assert_close(batch["images"].feats, collate([pre[k] for k in range(5)])["images"].feats)
    assert PrecomputedEncoder(in_dim=5, out_dim=3)(batch["images"]).grid == (4, 4)
    assert ext.captions == pre.captions and len(ext.fingerprint()) == 16
    with pytest.raises(FileNotFoundError, match="no other_extract.json"):
        ExtractedDataset(out, "other")


CHILD = """
import sys, time, torch
from imtm.data import ImageCaptionDataset, extract_features
from imtm.tokens import Tokens

def encoder(x):
    if encoder.calls == 2:  # after shard 0 (two batches of two): hang until killed
        time.sleep(600)
    encoder.calls += 1
    return Tokens(x.flatten(2).transpose(1, 2) * 2.0)

encoder.calls = 0
g = torch.Generator().manual_seed(0)
ds = ImageCaptionDataset(torch.rand(10, 3, 4, 4, generator=g), [f"c{k}" for k in range(10)], list(range(10)))
extract_features(encoder, ds, sys.argv[1], "test", batch_size=2, shard_size=4, progress=False)
"""


@pytest.mark.slow
def test_resume_after_sigkill_between_shards(tmp_path):
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out)])
    try:
        manifest = out / "test_extract.json"
        deadline = time.time() + 120
        while time.time() < deadline and child.poll() is None:
            if manifest.is_file() and json.loads(manifest.read_text())["shards"]:
                break
            time.sleep(0.2)
        assert child.poll() is None, "the child process ended before it could be killed"
        child.kill()  # SIGKILL: no cleanup runs
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    assert sorted(json.loads(manifest.read_text())["shards"]) == ["test-00000-of-00003.npy"]
    g = torch.Generator().manual_seed(0)
    ds = ImageCaptionDataset(
        torch.rand(10, 3, 4, 4, generator=g), [f"c{k}" for k in range(10)], list(range(10))
    )
    seen = []

    def encoder(x):
        seen.append(len(x))
        return Tokens(x.flatten(2).transpose(1, 2) * 2.0)

    extract_features(encoder, ds, out, "test", batch_size=2, shard_size=4, progress=False)
    assert sum(seen) == 6  # shards 1 and 2 only
    assert_close(
        torch.from_numpy(np.load(out / "test_ims.npy")), ds.images.flatten(2).transpose(1, 2) * 2.0
    )


def test_a_kill_before_the_first_manifest_update_redoes_that_shard(tmp_path):
    ds = _dataset(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        extract_features(
            CountingEncoder(stop_after_images=SHARD),
            ds,
            out,
            "test",
            batch_size=BATCH,
            shard_size=SHARD,
            progress=False,
        )
    manifest = json.loads((out / "test_extract.json").read_text())
    manifest["shards"], manifest["tokens"] = (
        {},
        None,
    )  # as if killed between the rename and the manifest write
    (out / "test_extract.json").write_text(json.dumps(manifest))
    resumed = CountingEncoder()
    extract_features(resumed, ds, out, "test", batch_size=BATCH, shard_size=SHARD, progress=False)
    assert resumed.seen == N_IMAGES
    assert json.loads((out / "test_extract.json").read_text())["tokens"]["grid"] == [4, 4]
    assert_close(torch.from_numpy(np.load(out / "test_ims.npy")), _expected(ds, CountingEncoder()))
