"""Errors re-raised inside an ``except`` keep (or deliberately drop) their cause (ruff B904)."""

import json

import pytest

from imtm.cli import main


def test_cli_errors_chain_their_cause(tmp_path):
    # Bad --model-kwargs JSON: fails before any data is read, with the parse error as the cause.
    args = [
        "extract",
        "--format",
        "karpathy",
        "--annotations",
        str(tmp_path / "none.json"),
        "--image-root",
        str(tmp_path),
        "--split",
        "test",
        "--model",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        "{depth: 1}",
        "--out",
        str(tmp_path / "o"),
        "--quiet",
        "--debug",
    ]
    with pytest.raises(SystemExit, match="--model-kwargs must be a JSON object") as info:
        main(args)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)
    # An unknown preset is refused while the arguments are read (argparse's usage error, status 2),
    # before anything is trained or written.
    with pytest.raises(SystemExit) as info:
        main(["compare", "--presets", "nope", "--quick", "--out", str(tmp_path / "c"), "--debug"])
    assert info.value.code == 2
    assert not (tmp_path / "c").exists()
