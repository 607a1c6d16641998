"""JSON + safetensors serialisation of configurations and nested state (never pickle).

Configurations name blocks by class name and rebuild them only from
:data:`imtm.component.COMPONENT_REGISTRY`: a configuration can never make imtm
import a module or run code named in a file.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from imtm import _io
from imtm._assets import ASSETS, AssetPath
from imtm._io import MAX_JSON_DEPTH
from imtm.component import (
    COMPONENT_REGISTRY,
    ENTRY_POINT_ERRORS,
    ENTRY_POINT_GROUP,
    Component,
    load_components,
    suggest,
)

__all__ = [
    "encode_value",
    "decode_value",
    "flatten_state",
    "unflatten_state",
    "atomic_write_bytes",
    "atomic_write_json",
    "save_tensors",
    "load_tensors",
    "file_sha256",
    "register_serializable",
    "ConfigError",
    "ASSETS",
    "AssetPath",
    "asset_root",
    "MAX_JSON_DEPTH",
    "check_depth",
    "loads_json",
]


class ConfigError(ValueError):
    """A saved configuration or checkpoint cannot be used (unknown block, other configuration)."""


def check_depth(obj: Any, where: str = "configuration", limit: int = MAX_JSON_DEPTH) -> None:
    """Raise ConfigError when the lists and dicts of ``obj`` nest deeper than ``limit`` (no recursion)."""
    _io.check_depth(obj, where, limit, ConfigError)


def loads_json(text: str | bytes, where: str) -> Any:
    """Parse JSON read from a file, with ConfigError (not RecursionError / JSONDecodeError) on bad input."""
    return _io.loads_json(text, where, error=ConfigError)


# ---------------------------------------------------------------------- files inside a model folder
#: A block's asset folder name (its block name): letters, digits, ``_``, ``-``, ``.``; no leading dot.
_ASSET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


_ASSET_ROOT: contextvars.ContextVar = contextvars.ContextVar("imtm_asset_root", default=None)


@contextlib.contextmanager
def asset_root(folder: str | os.PathLike):
    """Resolve ``{"__asset__": name}`` values decoded within this block to folders of ``folder``."""
    token = _ASSET_ROOT.set(Path(folder))
    try:
        yield
    finally:
        _ASSET_ROOT.reset(token)


def _decode_asset(name: Any) -> AssetPath:
    root = _ASSET_ROOT.get()
    if not isinstance(name, str) or not _ASSET_NAME.match(name):
        raise ConfigError(
            f"malformed __asset__ entry {name!r} in configuration: an asset is a folder name inside "
            "the model folder (letters, digits, '_', '-', '.'; no path)"
        )
    if root is None:
        raise ConfigError(
            f"the configuration names the asset folder {name!r} of a saved model folder; load it with "
            "Matcher.load(folder), which knows the folder"
        )
    folder = root / name
    if (
        folder.is_symlink()
        or not folder.is_dir()
        or not folder.resolve().is_relative_to(root.resolve())
    ):
        raise ConfigError(
            f"{folder}: the asset folder named in config.json is missing (or not a folder inside "
            f"{root}); the model folder is incomplete"
        )
    return AssetPath(os.fspath(folder.resolve()), name)


#: Non-JSON parameter types that know ``to_dict`` / ``from_dict`` (for example a Vocabulary).
SERIALIZABLE: dict[str, type] = {}


def register_serializable(cls: type) -> type:
    """Allow instances of ``cls`` (with ``to_dict`` / ``from_dict``) as saved parameters."""
    SERIALIZABLE[cls.__name__] = cls
    return cls


def _register_builtin() -> None:
    from imtm.data.vocabulary import Vocabulary

    register_serializable(Vocabulary)


_register_builtin()


def encode_value(value: Any, where: str = "parameter") -> Any:
    """Encode a constructor argument as JSON-compatible data (tagged dicts for non-JSON types)."""
    if isinstance(value, AssetPath):
        return {"__asset__": value.asset}
    if value is ASSETS:
        raise TypeError(
            f"cannot save {where}: ASSETS is resolved by Matcher.save (get_config(portable=True))"
        )
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [encode_value(v, where) for v in value]}
    if isinstance(value, list):
        return [encode_value(v, where) for v in value]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"cannot save {where}: dict keys must be strings, got {bad[:3]}")
        return {"__dict__": {k: encode_value(v, f"{where}.{k}") for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).replace("torch.", "")}
    if isinstance(
        value, os.PathLike
    ):  # a folder or file argument (e.g. a local model): saved as its path
        return os.fspath(value)
    if isinstance(value, Component):
        return {"__component__": type(value).__name__, "params": encode_params(value)}
    if hasattr(value, "to_json_dict") and type(value).__name__ in SERIALIZABLE:
        return {"__object__": type(value).__name__, "data": value.to_json_dict()}
    if type(value).__name__ in SERIALIZABLE:
        return {"__object__": type(value).__name__, "data": value.to_dict()}
    raise TypeError(
        f"cannot save {where} of type {type(value).__name__}: parameters must be JSON values, "
        "torch dtypes, imtm components, or types registered with imtm.engine.serialization.register_serializable"
    )


def encode_params(block: Component) -> dict:
    params = block.get_params(deep=False)
    # Unrenamed requires/provides are the class defaults: store nothing, so a
    # later version's defaults apply.
    for key in ("requires", "provides"):
        if key in params and key not in block.__dict__:
            params[key] = None
    return {k: encode_value(v, f"{type(block).__name__}.{k}") for k, v in params.items()}


def build_component(class_name: str, params: dict) -> Component:
    """Instantiate a registered block by class name (never by import path)."""
    if not isinstance(class_name, str) or not isinstance(params, dict):
        raise ConfigError(
            f"a block is a class name and a dict of parameters, got {class_name!r} and "
            f"{type(params).__name__}"
        )
    cls = COMPONENT_REGISTRY.get(class_name)
    if cls is None:
        load_components()  # every imtm block, and those of installed packages' entry points
        cls = COMPONENT_REGISTRY.get(class_name)
    if cls is None:
        broken = "".join(
            f" Entry point {n!r} of the {ENTRY_POINT_GROUP!r} group failed to load: {why}."
            for n, why in sorted(ENTRY_POINT_ERRORS.items())
        )
        raise ConfigError(
            f"unknown block {class_name!r}: it is not a registered imtm component. Import the module that "
            "defines it before loading, or declare the block in the 'imtm.components' entry-point group of "
            "its package (blocks are never imported by path from a file)."
            + broken
            + suggest(class_name, COMPONENT_REGISTRY)
        )
    kwargs = {k: decode_value(v) for k, v in params.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"cannot rebuild {class_name} from the saved parameters: {e}") from e


def decode_value(data: Any) -> Any:
    if isinstance(data, list):
        return [decode_value(v) for v in data]
    if not isinstance(data, dict):
        return data
    tags = ("__tuple__", "__dict__", "__dtype__", "__component__", "__object__", "__asset__")
    tag = next((t for t in tags if t in data), None)
    if tag in ("__tuple__", "__dict__") and not isinstance(
        data[tag], list if tag == "__tuple__" else dict
    ):
        raise ConfigError(f"malformed {tag} value in configuration: {type(data[tag]).__name__}")
    if "__asset__" in data:
        return _decode_asset(data["__asset__"])
    if "__tuple__" in data:
        return tuple(decode_value(v) for v in data["__tuple__"])
    if "__dict__" in data:
        return {k: decode_value(v) for k, v in data["__dict__"].items()}
    if "__dtype__" in data:
        dt = getattr(torch, str(data["__dtype__"]), None)
        if not isinstance(dt, torch.dtype):
            raise ConfigError(f"unknown dtype {data['__dtype__']!r} in configuration")
        return dt
    if "__component__" in data:
        return build_component(data["__component__"], data.get("params", {}))
    if "__object__" in data:
        name = data["__object__"]
        cls = SERIALIZABLE.get(name) if isinstance(name, str) else None
        if cls is None:
            raise ConfigError(
                f"unknown object type {name!r} in configuration (known: {sorted(SERIALIZABLE)})"
            )
        try:
            return cls.from_dict(data["data"])
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise ConfigError(
                f"cannot rebuild {name} from the saved data ({type(e).__name__}: {e})"
            ) from e
    raise ConfigError(f"unrecognised value in configuration: {sorted(data)[:5]}")


# ---------------------------------------------------------------------- nested state
def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tensors, numbers) into tensors and a JSON tree.

    Tensors are replaced by ``{"__tensor__": key}``; integer dict keys are kept
    as ``{"__intkeys__": ...}`` so that optimizer states round-trip exactly.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            key = path or "value"
            tensors[key] = x.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(x, dict):
            if x and all(isinstance(k, int) for k in x):
                return {"__intkeys__": {str(k): walk(v, f"{path}.{k}") for k, v in x.items()}}
            return {"__dict__": {str(k): walk(v, f"{path}.{k}") for k, v in x.items()}}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if hasattr(x, "tolist"):  # numpy scalars / arrays
            return walk(torch.as_tensor(x), path)
        raise TypeError(f"cannot store {type(x).__name__} at {path!r} in a checkpoint")

    tree = walk(obj, prefix)
    return tensors, tree


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__intkeys__" in tree:
        return {int(k): unflatten_state(v, tensors) for k, v in tree["__intkeys__"].items()}
    if "__dict__" in tree:
        return {k: unflatten_state(v, tensors) for k, v in tree["__dict__"].items()}
    if "__tuple__" in tree:
        return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
    raise ConfigError(f"unrecognised entry in checkpoint state: {sorted(tree)[:5]}")


# ---------------------------------------------------------------------- atomic files
def _temporary_beside(path: Path) -> tuple[int, str]:
    """Create ``.<name>.<8 random characters>`` beside ``path``; return its descriptor and name.

    Like ``tempfile.mkstemp`` (exclusive creation, same naming), but with mode 0o666 less
    the umask, as ``open``, ``torch.save`` and safetensors create files: a model written
    under umask 022 can be read by the user's group and others (``mkstemp`` makes 0600).
    """
    chars = "abcdefghijklmnopqrstuvwxyz0123456789_"
    for _ in range(100):
        name = path.parent / f".{path.name}.{''.join(secrets.choice(chars) for _ in range(8))}"
        try:
            fd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
            )
        except FileExistsError:
            continue
        return fd, str(name)
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.

    The file gets mode 0o666 less the process umask (as ``open`` would give it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """Atomic safetensors write (tensors are made contiguous and unshared first); mode 0o666 less the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary_beside(path)  # 0o666 less the umask
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        save_file(clean, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.chmod(tmp, mode)  # safetensors may write through a private temporary of its own (0600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
