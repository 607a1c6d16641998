"""Errors re-raised inside an ``except`` keep (or deliberately drop) their cause (ruff B904)."""

import json

import pytest

from imtm.cli import main


def test_cli_errors_chain_their_cause(tmp_path):
    # Bad --model-kwargs JSON: fails before any data is read, with the parse error as the cause.
    args = ["extract", "--format", "karpathy", "--annotations", str(tmp_path / "none.json"), "--image-root",
            str(tmp_path), "--split", "test", "--model", "vit_tiny_patch16_224", "--model-kwargs", "{depth: 1}",
            "--out", str(tmp_path / "o"), "--quiet"]
    with pytest.raises(SystemExit, match="--model-kwargs must be a JSON object") as info:
        main(args)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)
    # An unknown preset: the ValueError of compare() is the cause of the command's exit.
    with pytest.raises(SystemExit, match="imtm compare: unknown preset") as info:
        main(["compare", "--presets", "nope", "--quick", "--out", str(tmp_path)])
    assert isinstance(info.value.__cause__, ValueError)
