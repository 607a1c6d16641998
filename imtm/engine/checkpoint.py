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
      steps.csv, epochs.csv   the step and epoch logs (Matcher(loggers=("csv",)), the default)

A checkpoint folder is written under a temporary name and renamed when complete;
``LATEST`` is replaced only after that, so an interruption at any point leaves the
previous complete checkpoint in place. A folder that already exists (``best/``, a
saved model) is first renamed aside to ``.<name>.old-<pid>``; a writer killed between
the two renames leaves it there, and the next writer of the run folder (or
``fit(resume=True)``) renames it back. Temporaries of a killed writer
(``.<name>.tmp-<pid>``, ``.<name>.old-<pid>``, ``.LATEST.<random>``) are removed by
the next writer once their process is gone; they are never read as checkpoints.
See ``docs/robustness.md`` for what survives a kill at each point.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from imtm._io import process_gone, read_json, read_regular, regular_file_size
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

__all__ = [
    "write_checkpoint",
    "read_checkpoint",
    "latest_checkpoint",
    "resolve_checkpoint",
    "complete_checkpoints",
    "recover_run",
    "CheckpointError",
    "verify_manifest",
    "RunLock",
    "RunFolderBusy",
]

#: Files in every checkpoint folder (besides MANIFEST.json), and the pair a resumable one adds.
REQUIRED_FILES = ("config.json", "model.safetensors", "record.json")
TRAIN_STATE_FILES = ("optimizer.safetensors", "state.json")

# The temporaries write_checkpoint and atomic_write_bytes create; nothing else is ever removed.
_FOLDER_TEMPORARY = re.compile(r"^\.(?P<name>[^/\\]+)\.(?P<kind>tmp|old)-(?P<pid>[0-9]+)$")
_LATEST_TEMPORARY = re.compile(r"^\.LATEST\.[a-z0-9_]{8}$")  # tempfile.mkstemp's 8-character suffix


#: Largest LATEST / MANIFEST.json read (they hold a name, or six checksums).
MAX_SMALL_FILE = 1 << 20
#: Largest config.json / record.json / state.json read (a long history stays far below).
MAX_STATE_FILE = 1 << 28


class CheckpointError(ConfigError):
    """A checkpoint is missing, incomplete, altered, or from another configuration."""


def verify_manifest(folder: Path) -> None:
    """Check a checkpoint folder against its ``MANIFEST.json``; raise CheckpointError on any difference.

    The manifest must list every required file (``REQUIRED_FILES``, and both or neither
    of ``TRAIN_STATE_FILES``) with its sha256; the folder must hold exactly the listed
    files and the manifest. A manifest rewritten to match altered files passes: checksums
    detect truncation and accidental change, not a deliberate forgery.
    """
    folder = Path(folder)
    manifest_path = folder / "MANIFEST.json"
    if not os.path.lexists(manifest_path):
        hint = (
            (
                "; it is a training run folder: load one of its checkpoints (LATEST names the newest) or its "
                "best/"
            )
            if (folder / "LATEST").is_file()
            else ""
        )
        raise CheckpointError(f"{folder}: no MANIFEST.json; the checkpoint is incomplete{hint}")
    try:
        # A regular file inside the folder, small: a FIFO, a device or a link elsewhere is refused unread.
        manifest = read_json(
            manifest_path,
            who="checkpoint",
            max_bytes=MAX_SMALL_FILE,
            root=folder,
            error=CheckpointError,
            where=str(manifest_path),
        )
    except CheckpointError as e:
        raise CheckpointError(
            f"{manifest_path}: unreadable manifest ({e}); the file was truncated or altered"
        ) from e
    listed = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        raise CheckpointError(
            f"{manifest_path}: malformed manifest (no 'sha256' table of file checksums)"
        )
    assets = sorted(n for n in listed if _is_asset_file(n))
    unknown = sorted(set(listed) - set(REQUIRED_FILES) - set(TRAIN_STATE_FILES) - set(assets))
    if unknown:
        raise CheckpointError(
            f"{manifest_path} lists {unknown}, which are not checkpoint files; the manifest was altered"
        )
    missing = [f for f in REQUIRED_FILES if f not in listed]
    if (
        len(set(TRAIN_STATE_FILES) & set(listed)) == 1
    ):  # trainer state comes as a pair or not at all
        missing += [f for f in TRAIN_STATE_FILES if f not in listed]
    if missing:
        raise CheckpointError(
            f"{manifest_path} does not list {missing}; the manifest was altered or the checkpoint is incomplete"
        )
    if set(TRAIN_STATE_FILES) & set(listed):
        # A training checkpoint holds exactly its files. A saved model may have others beside them (a
        # hub repository's .gitattributes, a user's notes): they are never read, so they are left alone.
        extra = sorted(
            p.name for p in folder.iterdir() if p.name != "MANIFEST.json" and p.name not in listed
        )
        if extra:
            raise CheckpointError(
                f"{folder} holds {extra}, which MANIFEST.json does not list; imtm writes no such file. "
                "Remove what was added, or use another checkpoint"
            )
    inside = folder.resolve()
    for sub in sorted({n.split("/")[0] for n in assets}):
        # A block's asset folder is read whole (a tokenizer reads what it finds): it holds the listed files only.
        sub_path = folder / sub
        if (
            sub_path.is_symlink()
            or not sub_path.is_dir()
            or not sub_path.resolve().is_relative_to(inside)
        ):
            raise CheckpointError(
                f"{sub_path} is not a folder inside {folder} (a link, or missing); imtm writes "
                "asset folders as plain folders. Use the folder as saved"
            )
        extra = sorted(
            f"{sub}/{p.name}" for p in sub_path.iterdir() if f"{sub}/{p.name}" not in listed
        )
        if extra:
            raise CheckpointError(
                f"{folder} holds {extra}, which MANIFEST.json does not list; imtm writes no such file, and a "
                "block reads its whole folder. Remove what was added"
            )
        for name in (n for n in assets if n.startswith(sub + "/")):
            if (folder / name).is_symlink():
                raise CheckpointError(
                    f"{folder / name} is a symlink; imtm writes no links. Copy the file in place"
                )
    for name, digest in listed.items():
        path = folder / name
        if not os.path.lexists(path):
            raise CheckpointError(
                f"{folder}: {name} is missing; the checkpoint was damaged, use another one"
            )
        regular_file_size(path, who="checkpoint", root=folder, error=CheckpointError)
        if file_sha256(path) != digest:
            raise CheckpointError(
                f"{path}: checksum mismatch; the file was truncated or altered after it was written. "
                "Nothing was loaded: use another checkpoint"
            )


_ASSET_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def _is_asset_file(name: str) -> bool:
    """``<block name>/<file>``: a file a block needs to be rebuilt (e.g. an HFTextEncoder's tokenizer)."""
    parts = name.split("/")
    return len(parts) == 2 and all(_ASSET_PART.match(p) for p in parts) and "\\" not in name


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
    """Write a complete checkpoint folder ``run_dir/name`` atomically and point ``LATEST`` at it.

    First undoes what a killed writer left (:func:`recover_run`): of the whole run folder
    when ``update_latest``, else of ``name`` only (a folder of saved models may have other writers).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recover_run(run_dir, None if update_latest else name)
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


def _process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (leftovers of this very process are stale too)."""
    # One process writes its checkpoints one after another: a leftover of its own is from a failed write.
    return process_gone(pid)


def recover_run(run_dir: str | os.PathLike, name: str | None = None) -> list[str]:
    """Undo what a killed writer left in ``run_dir``; return one line per action.

    A folder ``X`` that is missing while a complete ``.X.old-<pid>`` exists (a writer
    killed between renaming the previous ``X`` aside and renaming the new one in) is
    renamed back. Then ``.X.tmp-<pid>`` and ``.X.old-<pid>`` folders and, for a whole
    run folder, ``.LATEST.<random>`` files are removed, once process ``<pid>`` is gone.
    Nothing else is touched. With ``name``, only the leftovers of ``run_dir/name`` are.
    Assumes one writer per run folder on one machine (process ids of other machines mean nothing here).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    done: list[str] = []
    leftovers = []
    for path in sorted(run_dir.iterdir()):
        match = _FOLDER_TEMPORARY.match(path.name)
        if match:
            if (
                (name is None or match["name"] == name)
                and path.is_dir()
                and not path.is_symlink()
                and _process_gone(int(match["pid"]))
            ):
                leftovers.append((path, match["name"], match["kind"]))
        elif (
            name is None
            and _LATEST_TEMPORARY.match(path.name)
            and path.is_file()
            and not path.is_symlink()
        ):
            path.unlink(missing_ok=True)
            done.append(f"removed {path.name}")
    for path, target, kind in leftovers:
        if kind == "old" and not os.path.lexists(run_dir / target):
            try:
                verify_manifest(path)
            except CheckpointError as e:
                done.append(f"kept {path.name}: it cannot replace the missing {target} ({e})")
                continue
            os.replace(path, run_dir / target)
            done.append(f"restored {target} from {path.name}")
            continue
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path.name}")
    return done


def resolve_checkpoint(run_dir: str | os.PathLike, which: bool | str | os.PathLike) -> Path | None:
    """The checkpoint folder that ``fit(resume=which)`` continues from.

    Args:
        run_dir: the run folder (``checkpoint_dir``).
        which: ``True`` for the one ``LATEST`` names (``None`` when the run folder has no
            ``LATEST``, so the run starts afresh), or a checkpoint folder: its name in
            ``run_dir`` (``"ckpt-00000120"``) or a path.
    """
    if which is True:
        return latest_checkpoint(run_dir)
    folder = Path(run_dir) / Path(which)  # an absolute path stays as given
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    return folder


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The resumable checkpoints of a run folder that pass :func:`verify_manifest`, newest first.

    Hidden temporaries are never listed; neither is ``best/`` (weights only, no trainer state).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in sorted(run_dir.iterdir(), reverse=True):  # ckpt-<step> names: newest first
        if path.name.startswith(".") or not path.is_dir() or not (path / "state.json").is_file():
            continue
        try:
            verify_manifest(path)
        except CheckpointError:
            continue
        found.append(path)
    return found


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder (None when there is none)."""
    run_dir = Path(run_dir)
    latest = run_dir / "LATEST"
    if not os.path.lexists(latest):
        return None
    # A regular file inside the run folder (a FIFO would block a read forever); a folder name, so
    # anything longer than 1024 bytes is not one.
    try:
        raw = read_regular(
            latest,
            max_bytes=MAX_SMALL_FILE,
            who="fit(resume=True)",
            root=run_dir,
            error=CheckpointError,
        )[:1025]
    except FileNotFoundError:  # a link to nothing
        raise CheckpointError(f"{latest} is a link to a file that does not exist") from None
    try:
        name = (
            raw.decode("utf-8").strip()
            if len(raw) <= 1024
            else raw[:40].decode("utf-8", "replace") + "..."
        )
    except UnicodeDecodeError:
        name = raw[:40].decode("utf-8", "replace")
    if not name:
        raise CheckpointError(
            f"{latest} is empty; it should hold the name of the newest checkpoint folder in {run_dir}"
        )
    folder = run_dir / name
    # A hidden name is a temporary of a writer, never a checkpoint; a link must not lead out of the run folder.
    if (
        name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or len(raw) > 1024
        or (folder.exists() and folder.resolve().parent != run_dir.resolve())
    ):
        raise CheckpointError(
            f"{latest} names {name!r}, which is not a checkpoint folder of {run_dir}"
        )
    if not folder.is_dir():
        raise CheckpointError(f"{latest} names {folder.name}, which does not exist")
    return folder


def read_checkpoint(folder: str | os.PathLike, *, with_train_state: bool = True) -> dict:
    """Verify and read a checkpoint folder: config, model state, record and (optionally) trainer state."""
    folder = Path(folder)
    if not folder.is_dir():
        aside = (
            sorted(p.name for p in folder.parent.glob(f".{folder.name}.old-*"))
            if folder.name
            else []
        )
        hint = (
            (
                f"; a write killed while replacing it left the previous version in {aside[0]}: writing "
                f"{folder.name} again restores it first, or rename it back by hand"
            )
            if aside
            else ""
        )
        raise CheckpointError(f"{folder}: no such checkpoint folder{hint}")
    _check_links(folder)
    verify_manifest(folder)
    out = {
        "config": _read_json(folder / "config.json", dict),
        "model_state": _read_tensors(folder / "model.safetensors"),
        "record": _read_json(folder / "record.json", dict),
        "train_state": None,
    }
    seed = out["record"].get("seed")
    if seed is not None and not (
        isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32
    ):
        raise CheckpointError(
            f"{folder / 'record.json'}: entry 'seed' is {seed!r}, expected an integer in "
            "[0, 2**32) or null; the file was altered"
        )
    if with_train_state and (folder / "state.json").exists():
        tree = _read_json(folder / "state.json", object)
        try:
            out["train_state"] = unflatten_state(
                tree, _read_tensors(folder / "optimizer.safetensors")
            )
        except KeyError as e:
            raise CheckpointError(
                f"{folder / 'state.json'} names tensor {e} that optimizer.safetensors does not "
                "hold; the files were altered"
            ) from None
        except (TypeError, AttributeError, ValueError) as e:
            raise CheckpointError(
                f"{folder / 'state.json'}: malformed entry ({type(e).__name__}: {e})"
            ) from e
        _check_train_state(out["train_state"], folder / "state.json")
    return out


#: The entries of state.json a resume reads, and their types.
_TRAIN_STATE_ENTRIES = {
    "position": dict,
    "epoch_logs": dict,
    "history": list,
    "skipped": int,
    "train_config": dict,
    "rng": dict,
}
_POSITION_ENTRIES = ("stage", "epoch", "batch", "global_step", "epoch_done")


def _check_train_state(ts: Any, path: Path) -> None:
    """CheckpointError naming the entry (not a KeyError later) when a forged state.json lacks what a resume reads."""
    if not isinstance(ts, dict):
        raise CheckpointError(
            f"{path}: expected an object of trainer state, got {type(ts).__name__}"
        )
    for key, kind in _TRAIN_STATE_ENTRIES.items():
        if not isinstance(ts.get(key), kind):
            raise CheckpointError(
                f"{path}: entry {key!r} is missing or not a {kind.__name__}; the file was altered"
            )
    for key in _POSITION_ENTRIES:
        value = ts["position"].get(key)
        if not isinstance(value, int) or (
            key != "epoch_done" and (isinstance(value, bool) or value < 0)
        ):
            raise CheckpointError(
                f"{path}: entry 'position.{key}' is {value!r}; the file was altered"
            )
    for key in ("torch", "numpy", "python"):
        if key not in ts["rng"]:
            raise CheckpointError(f"{path}: entry 'rng.{key}' is missing; the file was altered")


def _check_links(folder: Path) -> None:
    """Refuse a checkpoint whose entries are symlinks leading out of it, or not regular files.

    A checkpoint only holds its own files: a link elsewhere (another run's weights, a
    device or FIFO that would block a read forever) is not something imtm wrote.
    """
    inside = folder.resolve()
    for entry in folder.iterdir():
        try:
            target = entry.resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop
            raise CheckpointError(
                f"{entry} is a link that cannot be resolved ({e}); imtm writes no links"
            ) from e
        if entry.is_symlink() and not target.is_relative_to(inside):
            raise CheckpointError(
                f"{entry} is a symlink to {target}, outside the checkpoint folder; imtm "
                "writes no links: copy the file into the folder, or use another checkpoint"
            )
        if not entry.is_file() and not entry.is_dir():
            raise CheckpointError(f"{entry} is not a regular file (a device, FIFO or broken link)")


def _read_json(path: Path, kind: type) -> Any:
    """Parse a checkpoint's JSON file; CheckpointError (not RecursionError) on bad or crafted content."""
    try:
        obj = read_json(
            path,
            who="checkpoint",
            max_bytes=MAX_STATE_FILE,
            root=path.parent,
            error=CheckpointError,
            where=str(path),
        )
    except FileNotFoundError as e:
        raise CheckpointError(
            f"{path}: missing; the checkpoint was damaged, use another one"
        ) from e
    if not isinstance(obj, kind):
        raise CheckpointError(f"{path}: expected a JSON {kind.__name__}, got {type(obj).__name__}")
    return obj


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle, a torch.save file, a damaged header) is refused."""
    try:
        return load_tensors(path)
    except (
        Exception
    ) as e:  # SafetensorError (malformed or huge header), OSError: never a pickle fallback
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); imtm reads weights only as "
            "safetensors and never unpickles (torch.load) a checkpoint file"
        ) from e


#: The lock file of a run folder: one writer at a time.
LOCK_NAME = ".lock"


class RunFolderBusy(CheckpointError):
    """Another process is writing checkpoints to the same run folder (see :class:`RunLock`)."""


class RunLock:
    """An exclusive lock on a run folder: the file ``.lock`` holding the owner's pid and host.

    Taken by ``fit`` before training (so a folder it cannot write is reported at once, not
    after the first epoch) and removed when ``fit`` ends, however it ends. A second writer
    is refused with :class:`RunFolderBusy` naming the owner. A lock left by a process that
    is gone (on this host) is taken over. A lock of another host cannot be checked and is
    refused: remove the file when you know that run has ended.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False

    def _owner(self) -> dict:
        try:
            owner = read_json(
                self.path, who="checkpoint_dir lock", max_bytes=4096, error=CheckpointError
            )
        except (FileNotFoundError, CheckpointError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def acquire(self) -> RunLock:
        import socket

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _unwritable(self.run_dir, e) from e
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(
                    self.path,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                    0o644,
                )
            except FileExistsError:
                owner = self._owner()
                pid, host = owner.get("pid"), owner.get("host")
                gone = (
                    isinstance(pid, int)
                    and not isinstance(pid, bool)
                    and host == me["host"]
                    and pid != os.getpid()
                    and _process_gone(pid)
                )
                if not gone:
                    who = (
                        f"process {pid} on host {host!r}"
                        if pid is not None
                        else "another process (the lock file is unreadable)"
                    )
                    raise RunFolderBusy(
                        f"{self.run_dir} is being written by {who} (lock file {self.path}); two writers on one "
                        "checkpoint_dir would delete each other's checkpoints. Wait for that fit to end, use "
                        "another checkpoint_dir, or, when you know that run has ended, remove the lock file"
                    ) from None
                try:  # its owner is gone: take it over
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            except OSError as e:  # read-only file system, permission denied, not a folder
                raise _unwritable(self.run_dir, e) from e
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunFolderBusy(
            f"{self.run_dir}: could not take the lock file {self.path}; another writer keeps taking it"
        )

    def release(self) -> None:
        if self.held:
            import socket

            if self._owner() == {"pid": os.getpid(), "host": socket.gethostname()}:
                self.path.unlink(missing_ok=True)
            self.held = False


def _unwritable(run_dir: Path, err: OSError) -> PermissionError:
    return PermissionError(
        f"Matcher.fit: checkpoint_dir {str(run_dir)!r} cannot be written ({err.strerror or err}); nothing was "
        "trained. Choose a folder you can write, or checkpoint_dir=None to train without checkpoints"
    )
