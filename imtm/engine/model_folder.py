"""Saved model folders: self-contained, Hugging Face-style, and never written over what imtm did not write.

Layout of a folder written by :meth:`imtm.Matcher.save` / :meth:`~imtm.Matcher.save_pretrained`::

    model/
      config.json          the Matcher's parameters, blocks by registered class name; no absolute path
      model.safetensors    the weights of every block (encoders included), keyed "<block name>.<param>"
      record.json          training record: seed, versions, data fingerprint, history, metrics, sources
      <block name>/        files a block needs to be rebuilt, e.g. an HFTextEncoder's config.json and
                           tokenizer files (tokenizer.json, tokenizer_config.json, vocab.txt, ...)
      README.md            a generated model card (blocks, training record, metrics)
      MANIFEST.json        sha256 of every file imtm reads back, and the list of all files imtm wrote

Writing follows two rules (see ``docs/robustness.md``). A folder that exists and holds
anything but a model of the same kind is refused unless ``overwrite=True``; and even then
only the files an earlier imtm model listed in its own manifest are replaced or removed,
never another file. A fresh folder, or one holding only a previous model, is replaced
atomically (a temporary folder renamed into place); a folder shared with other files gets
the model's files one by one, the manifest last, so an interruption leaves a folder that
loads as "incomplete", never a mix that loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST",
    "MODEL_FORMAT",
    "absolute_paths",
    "manifest_files",
    "model_card",
    "owned_files",
    "read_small_json",
    "safe_relative_name",
    "source_record",
    "write_folder",
]

#: The ``format`` of a Matcher configuration (config.json).
MODEL_FORMAT = "imtm.Matcher/1"
MANIFEST = "MANIFEST.json"
#: The largest manifest or index file read to find out what imtm wrote in a folder.
MAX_OWNED_LIST_BYTES = 16 << 20

_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def safe_relative_name(name: Any, depth: int = 2) -> bool:
    """Whether ``name`` is a relative file name of at most ``depth`` parts, none hidden, ``..`` or empty."""
    if not isinstance(name, str) or "\\" in name or "\x00" in name:
        return False
    parts = name.split("/")
    return 1 <= len(parts) <= depth and all(_PART.match(p) for p in parts)


def read_small_json(path: Path) -> Any:
    """A JSON file imtm wrote, or ``None`` when it is missing, a link, not a regular file, too large or unreadable."""
    from imtm._io import read_json

    if path.is_symlink():
        return None
    try:
        return read_json(path, who="save", max_bytes=MAX_OWNED_LIST_BYTES, root=path.parent)
    except (OSError, ValueError):
        return None


def owned_files(folder: Path, names: Iterable[Any]) -> list[str]:
    """The names that are safe, inside ``folder`` and regular files there (not links): what may be replaced."""
    inside = folder.resolve()
    out = []
    for name in names:
        if not safe_relative_name(name):
            continue
        path = folder / name
        if (
            path.is_symlink()
            or not path.is_file()
            or any((folder / p).is_symlink() for p in _parents(name))
        ):
            continue
        if path.resolve().is_relative_to(inside):
            out.append(name)
    return sorted(set(out))


def _parents(name: str) -> list[str]:
    parts = name.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def manifest_files(folder: str | os.PathLike) -> tuple[str | None, list[str]]:
    """What a model or checkpoint folder's ``MANIFEST.json`` says imtm wrote there.

    Returns:
        ``(kind, files)``: ``kind`` is the ``format`` of the folder's ``config.json`` when the manifest
        lists it (``"imtm.Matcher/1"``), else ``None``; ``files`` the listed files that exist as regular
        files inside the folder, with ``MANIFEST.json`` itself (``[]`` without a readable manifest).
    """
    folder = Path(folder)
    manifest = read_small_json(folder / MANIFEST)
    if not isinstance(manifest, dict):
        return None, []
    listed = manifest.get("sha256")
    names = list(listed) if isinstance(listed, dict) else []
    extra = manifest.get("files")
    names += [n for n in extra if isinstance(n, str)] if isinstance(extra, list) else []
    files = owned_files(folder, names + [MANIFEST])
    kind = None
    if "config.json" in files:
        config = read_small_json(folder / "config.json")
        kind = (
            config.get("format")
            if isinstance(config, dict) and isinstance(config.get("format"), str)
            else None
        )
    return kind, files


def _all_entries(folder: Path) -> tuple[list[str], list[str]]:
    """``(files, folders)`` under ``folder`` as relative names; links (to anything) count as files."""
    files_out, dirs_out = [], []
    for root, dirs, files in os.walk(folder, followlinks=False):
        rel = Path(root).relative_to(folder)
        files_out += [(rel / f).as_posix() for f in files]
        files_out += [(rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
        dirs_out += [(rel / d).as_posix() for d in dirs if not (Path(root) / d).is_symlink()]
    return files_out, dirs_out


def write_folder(
    path: str | os.PathLike,
    stage: Callable[[Path], list[str]],
    *,
    kind: str,
    owned: Callable[[Path], tuple[str | None, list[str]]],
    overwrite: bool,
    what: str,
) -> Path:
    """Write a folder of imtm files at ``path`` without ever touching a file imtm did not write.

    Args:
        path: the folder.
        stage: writes every file into the empty folder it is given; returns their relative
            names, the manifest (the file that makes the folder complete) last.
        kind: what is written (``"imtm.Matcher/1"``); an existing folder of the same kind is replaced.
        owned: ``(kind, files)`` of an existing folder: what its own manifest says imtm wrote.
        overwrite: also write into a non-empty folder that is not of this kind, beside its other files.
        what: a name for messages (``"Matcher.save"``).

    Raises:
        FileExistsError: ``path`` is a file or a link, or a non-empty folder that is not a ``kind`` folder
            (without ``overwrite``), or a folder holding, under a name the new files take, a file imtm did
            not write (even with ``overwrite``).
    """
    from imtm.engine.checkpoint import recover_run

    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(
            f"{what}: {path} exists and is not a folder; nothing was written. Give a folder path"
        )
    path = Path(os.path.abspath(path))  # "." or "runs/x/" name a folder with a name and a parent
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover_run(parent, path.name)  # the leftovers of a killed writer of this very folder
    tmp = parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files = stage(tmp)
        if not path.exists():
            os.replace(tmp, path)
            return path
        entries, folders = _all_entries(path)
        if not entries and not folders:
            os.rmdir(path)
            os.replace(tmp, path)
            return path
        old_kind, old_files = owned(path)
        imtm_folders = {p for f in old_files for p in _parents(f)}
        others = sorted((set(entries) - set(old_files)) | (set(folders) - imtm_folders))
        if old_kind != kind and not overwrite:
            listing = sorted(entries + folders)
            shown = ", ".join(listing[:5]) + (", ..." if len(listing) > 5 else "")
            what_it_is = (
                f"an imtm folder of another kind ({old_kind})"
                if old_kind
                else f"not a saved {kind} folder"
            )
            raise FileExistsError(
                f"{what}: {path} is not empty ({shown}) and is {what_it_is}; nothing was written. Save to a new or "
                "empty folder, or pass overwrite=True to write the files beside the others (only files an "
                "earlier imtm folder of this kind listed as its own are ever replaced; no other file is touched)"
            )
        cwd = Path(os.getcwd())
        if not others and path != cwd and path not in cwd.parents:
            # Only a previous imtm folder (and not the working directory, which must stay): swap it whole.
            old = parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
            return path
        _merge_into(path, tmp, files, old_files, what)
        return path
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _merge_into(path: Path, tmp: Path, files: list[str], old_files: list[str], what: str) -> None:
    """Move the staged ``files`` into ``path``, replacing only ``old_files``; the manifest (last) goes in last."""
    old = set(old_files)
    clash = sorted(
        {f for f in files if os.path.lexists(path / f) and f not in old}
        | {
            p
            for f in files
            for p in _parents(f)
            if os.path.lexists(path / p) and ((path / p).is_symlink() or not (path / p).is_dir())
        }
    )
    if clash:
        raise FileExistsError(
            f"{what}: {path} holds {clash[:5]}, which imtm did not write (no imtm manifest lists them) and which "
            "the model's files would replace; nothing was written. Move them away, or save to another folder"
        )
    commit = files[-1]
    if commit in old:  # first: the folder stops loading as complete until the new manifest is in
        (path / commit).unlink()
    for name in sorted(
        old - set(files) - {commit}
    ):  # the previous model's files the new one does not have
        (path / name).unlink(missing_ok=True)
        for p in reversed(_parents(name)):
            with_contents = (path / p).is_dir() and any((path / p).iterdir())
            if not with_contents and (path / p).is_dir():
                (path / p).rmdir()
    for name in files[:-1]:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, path / name)
    os.replace(tmp / commit, path / commit)


# ---------------------------------------------------------------------- portability checks
def _is_absolute(s: str) -> bool:
    return len(s) > 1 and (s.startswith(("/", "\\\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", s)))


def absolute_paths(obj: Any, where: str = "") -> list[str]:
    """``where: value`` of every string in a JSON tree that is an absolute path (saved objects' data skipped)."""
    found, stack = [], [(obj, where)]
    while stack:
        x, at = stack.pop()
        if isinstance(x, str) and _is_absolute(x):
            found.append(f"{at}: {x}")
        elif isinstance(x, dict):
            if "__object__" in x:  # a vocabulary's words, not paths
                continue
            stack.extend((v, f"{at}.{k}" if at else str(k)) for k, v in x.items())
        elif isinstance(x, list):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(x))
    return sorted(found)


def source_record(value: Any) -> Any:
    """How a record keeps where an encoder's weights first came from: a name as given, a path by its base name."""
    if isinstance(value, (str, os.PathLike)):
        s = os.fspath(value)
        return os.path.basename(s.rstrip("/\\")) if _is_absolute(s) else s
    return value


# ---------------------------------------------------------------------- the model card
def _cell(value: Any, limit: int = 80) -> str:
    if isinstance(value, dict) and isinstance(value.get("__asset__"), str):
        value = f"{value['__asset__']}/ (in this folder)"
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _metric_rows(metrics: dict) -> list[str]:
    rows = []
    for split, values in metrics.items():
        if isinstance(values, dict):
            shown = {
                k: v
                for k, v in values.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            if shown:
                rows.append(
                    f"| {_cell(split)} | "
                    + ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items()))
                    + " |"
                )
    return rows


def model_card(config: dict, record: dict, files: list[str], *, name: str) -> str:
    """A README.md model card (Hugging Face front matter) from the configuration and the training record."""
    lines = [
        "---",
        "library_name: imtm",
        "tags:",
        "- imtm",
        "- image-text-matching",
        "- cross-modal-retrieval",
        "---",
        "",
        f"# {name}",
        "",
        (
            "An image-text matching model saved by imtm (`Matcher.save_pretrained`). The folder is "
            "self-contained: every weight (encoders included) is in `model.safetensors`, every tokenizer and "
            "configuration file is here, and nothing outside it is read."
        ),
        "",
        "## Use",
        "",
        "```python",
        "from imtm import Matcher",
        "",
        f'm = Matcher.from_pretrained("{name}")  # a local folder, or a Hugging Face hub repository id',
        "scores = m.similarity(images, captions)  # (n_images, n_captions)",
        "```",
        "",
        "## Blocks",
        "",
        "| name | block | parameters |",
        "| --- | --- | --- |",
    ]
    for c in config.get("components", []):
        block = c.get("block", {}) if isinstance(c, dict) else {}
        params = block.get("params", {}) if isinstance(block, dict) else {}
        shown = ", ".join(
            f"{k}={_cell(v)}"
            for k, v in sorted(params.items())
            if k not in ("requires", "provides") and not (isinstance(v, dict) and "__object__" in v)
        )
        lines.append(
            f"| {_cell(c.get('name', '?'))} | {_cell(c.get('class', block.get('__component__', '?')))} | "
            f"{_cell(shown, 600) if shown else ''} |"
        )
    lines += ["", "## Training record", ""]
    facts = [
        ("epochs trained", record.get("n_epochs")),
        ("seed", record.get("seed")),
        ("training pairs", record.get("n_train")),
        ("data fingerprint", record.get("data_fingerprint")),
        ("evaluation protocol", record.get("evaluation_protocol")),
        ("configuration hash", record.get("config_hash")),
    ]
    lines += [f"- {k}: `{v}`" for k, v in facts if v is not None]
    sources = record.get("sources") or {}
    if sources:
        lines.append(
            "- pretrained weights first came from: "
            + ", ".join(
                f"{b}.{p} = `{v}`"
                for b, params in sorted(sources.items())
                for p, v in sorted(params.items())
            )
        )
    versions = record.get("versions") or {}
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    history = record.get("history") or []
    metrics: dict[str, Any] = {}
    if history and isinstance(history[-1], dict):
        last = {
            k: v
            for k, v in history[-1].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if last:
            metrics[f"last epoch ({len(history)})"] = last
    if isinstance(record.get("best"), dict):
        metrics["best epoch"] = record["best"]
    if isinstance(record.get("metrics"), dict):
        given = record["metrics"]
        nested = all(isinstance(v, dict) for v in given.values())
        metrics.update(given if nested else {"given at save": given})
    rows = _metric_rows(metrics)
    lines += ["", "## Metrics", ""]
    if rows:
        lines += ["| when | values |", "| --- | --- |", *rows]
    else:
        lines.append(
            "No evaluation was recorded (train with an `eval_set`, or pass `metrics=` when saving)."
        )
    lines += ["", "## Files", "", *[f"- `{f}`" for f in files], ""]
    return "\n".join(lines)
