"""Atomic checkpoints: safetensors weights + JSON config + JSON state, with checksums.

Layout of a run folder::

    run/
      LATEST                  name of the newest complete checkpoint (replaced atomically)
      ckpt-000120/            one complete checkpoint
        config.json           the Matcher's parameters (blocks by registered class name)
        model.safetensors     weights of every fitted block, keyed "<block name>.<param>"
        optimizer.safetensors optimizer / scheduler / RNG tensors
        state.json            trainer position, history, RNG and optimizer non-tensor state
        record.json           reproducibility record (seed, versions, data fingerprint, protocol)
        MANIFEST.json         sha256 of every file above (written last)
      best/                   the best weights on the evaluation set, same files

A checkpoint folder is written under a temporary name and renamed when complete;
``LATEST`` is replaced only after that, so an interruption at any point leaves the
previous complete checkpoint in place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from imtm.engine.serialization import (
    ConfigError,
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
    flatten_state,
    load_tensors,
    save_tensors,
    unflatten_state,
)

__all__ = ["write_checkpoint", "read_checkpoint", "latest_checkpoint", "CheckpointError", "verify_manifest"]


class CheckpointError(ConfigError):
    """A checkpoint is missing, incomplete, altered, or from another configuration."""


def verify_manifest(folder: Path) -> None:
    """Check every file against the sha256 in ``MANIFEST.json``; raise CheckpointError on any difference."""
    manifest_path = folder / "MANIFEST.json"
    if not manifest_path.exists():
        raise CheckpointError(f"{folder}: no MANIFEST.json; the checkpoint is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from e
    for name, digest in manifest.get("sha256", {}).items():
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"{folder}: {name} is missing")
        if file_sha256(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch; the file was truncated or altered")


def write_checkpoint(
    run_dir: str | os.PathLike,
    name: str,
    *,
    config: dict,
    model_state: dict[str, torch.Tensor],
    record: dict,
    train_state: Any = None,
    keep_last: int = 2,
    update_latest: bool = True,
) -> Path:
    """Write a complete checkpoint folder ``run_dir/name`` atomically and point ``LATEST`` at it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = ["config.json", "model.safetensors", "record.json"]
    atomic_write_json(tmp / "config.json", config)
    save_tensors(tmp / "model.safetensors", model_state)
    atomic_write_json(tmp / "record.json", record)
    if train_state is not None:
        tensors, tree = flatten_state(train_state)
        save_tensors(tmp / "optimizer.safetensors", tensors)
        atomic_write_json(tmp / "state.json", tree)
        files += ["optimizer.safetensors", "state.json"]
    atomic_write_json(tmp / "MANIFEST.json", {"sha256": {f: file_sha256(tmp / f) for f in files}})
    final = run_dir / name
    if final.exists():
        old = run_dir / f".{name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if update_latest:
        atomic_write_bytes(run_dir / "LATEST", name.encode())
        ckpts = sorted(p for p in run_dir.glob("ckpt-*") if p.is_dir())
        for old in ckpts[:-keep_last] if keep_last > 0 else []:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder (None when there is none)."""
    run_dir = Path(run_dir)
    latest = run_dir / "LATEST"
    if not latest.exists():
        return None
    folder = run_dir / latest.read_text().strip()
    if not folder.is_dir():
        raise CheckpointError(f"{latest} names {folder.name}, which does not exist")
    return folder


def read_checkpoint(folder: str | os.PathLike, *, with_train_state: bool = True) -> dict:
    """Verify and read a checkpoint folder: config, model state, record and (optionally) trainer state."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    verify_manifest(folder)
    out = {
        "config": json.loads((folder / "config.json").read_text()),
        "model_state": load_tensors(folder / "model.safetensors"),
        "record": json.loads((folder / "record.json").read_text()),
        "train_state": None,
    }
    if with_train_state and (folder / "state.json").exists():
        tree = json.loads((folder / "state.json").read_text())
        out["train_state"] = unflatten_state(tree, load_tensors(folder / "optimizer.safetensors"))
    return out
