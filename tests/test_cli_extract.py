import json
import re

import numpy as np
import pytest
import torch
from raw_images import write_karpathy
from torch.testing import assert_close

from imtm.cli import main
from imtm.components import TimmVisionEncoder
from imtm.data import KarpathyDataset, PrecompDataset
from imtm.data.transforms import image_transform

TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8}


def _args(path, images, out, *extra, model_kwargs=None):
    model_kwargs = json.dumps(TINY) if model_kwargs is None else model_kwargs
    return [
        "extract",
        "--format",
        "karpathy",
        "--annotations",
        str(path),
        "--image-root",
        str(images),
        "--split",
        "test",
        "--model",
        "vit_tiny_patch16_224",
        "--img-size",
        "16",
        "--model-kwargs",
        model_kwargs,
        "--out",
        str(out),
        "--shard-size",
        "1",
        "--batch-size",
        "1",
        "--quiet",
        *extra,
    ]


def test_extract_command_writes_what_precomp_dataset_reads(tmp_path, capsys):
    path, images, _ = write_karpathy(tmp_path, per_split=3)
    enc = TimmVisionEncoder("vit_tiny_patch16_224", img_size=16, model_kwargs=TINY)
    weights = tmp_path / "vit.pt"
    torch.save(enc.model.state_dict(), weights)
    out = tmp_path / "feats"
    assert main(_args(path, images, out, "--checkpoint", str(weights), "--keep-shards")) == 0
    printed = capsys.readouterr().out
    assert (
        "3 images x 5 tokens x 32 (grid [2, 2], 1 prefix)" in printed
        and "PrecompDataset(" in printed
    )
    pre = PrecompDataset(out, "test")
    data = KarpathyDataset(path, images, "test", image_transform(enc))
    with torch.no_grad():
        tokens, _ = enc.eval()(torch.stack(list(data.images)))
    assert_close(
        torch.stack(list(pre.images)), tokens.feats
    )  # the checkpoint's weights, not a fresh init
    assert pre.captions == data.captions and len(list((out / "test_shards").iterdir())) == 3
    spec = json.loads(json.loads((out / "test_extract.json").read_text())["encoder"])
    assert spec["model"] == "vit_tiny_patch16_224" and spec["checkpoint"] == str(weights)
    before = np.load(out / "test_ims.npy")
    assert (
        main(_args(path, images, out, "--checkpoint", str(weights))) == 0
    )  # complete: nothing to redo
    assert np.array_equal(np.load(out / "test_ims.npy"), before)


def test_extract_command_errors(tmp_path, capsys):
    path, images, _ = write_karpathy(tmp_path, per_split=1)
    # Usage errors: exit status 2 and a short message on stderr; --debug lets the exception through.
    assert main(_args(path, images, tmp_path / "o", model_kwargs="{depth: 1}")) == 2
    assert "--model-kwargs must be a JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--model-kwargs must be a JSON object, got"):
        main(_args(path, images, tmp_path / "o", "--debug", model_kwargs="[1]"))
    out = tmp_path / "o"
    assert main(_args(path, images, out)) == 0
    assert main(_args(path, images, out, "--no-cls")) == 2
    assert re.search("belongs to a different run .*encoder", capsys.readouterr().err)
    with pytest.raises(ValueError, match="belongs to a different run .*encoder"):
        main(_args(path, images, out, "--no-cls", "--debug"))
    assert main(_args(path, images, out, "--no-cls", "--overwrite")) == 0
    assert PrecompDataset(out, "test").images.shape == (1, 4, 32)
