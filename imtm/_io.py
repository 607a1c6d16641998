"""Reading files imtm did not write: regular files only, bounded in size, JSON bounded in depth.

Every JSON reader of the package goes through :func:`read_json`, and every small file of a
run or model folder (``LATEST``, manifests, configurations) through :func:`read_regular`:

- only a regular file is opened (``O_NONBLOCK``, so a FIFO never blocks the open, then
  ``fstat``): a FIFO, a device such as ``/dev/zero``, a socket or a folder is refused;
- with ``root``, the file, after following every link, must lie inside ``root``: a link
  out of a run folder is refused before anything is read;
- at most ``max_bytes`` are read; a larger file is refused instead of read into memory;
- JSON nested deeper than ``max_depth`` lists and dicts is refused with a clear error, never
  a ``RecursionError`` (nor one later, in whatever walks the parsed value).

Errors are ``ValueError`` (or the ``error`` class a caller passes, such as
``CheckpointError``) naming the file; a missing file is ``FileNotFoundError``.
This module imports nothing of imtm: every layer may use it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "read_regular",
    "read_json",
    "loads_json",
    "check_depth",
    "regular_file_size",
]

#: Deepest nesting of lists and dicts accepted in a JSON file. Files imtm writes or reads
#: (configurations, checkpoint states, Karpathy / ALBEF annotations) stay below 20.
MAX_JSON_DEPTH = 100
#: Largest JSON file read (COCO's Karpathy ``dataset_coco.json`` is about 150 MB).
MAX_JSON_BYTES = 1 << 30


def _describe_mode(mode: int) -> str:
    for test, what in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def _check_inside(path: Path, root: str | os.PathLike, who: str, error: type) -> None:
    try:
        real, inside = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise error(f"{who}: {str(path)!r} cannot be resolved ({e}); imtm writes no links") from e
    if real != inside and inside not in real.parents:
        raise error(
            f"{who}: {str(path)!r} leads to {str(real)!r}, outside {str(root)!r}; imtm writes no links "
            "out of its folders: copy the file in, or use another folder"
        )


def regular_file_size(
    path: str | os.PathLike,
    *,
    who: str = "imtm",
    root: str | os.PathLike | None = None,
    error: type = ValueError,
) -> int:
    """The size of ``path`` after checking that it is a regular file (inside ``root`` when given)."""
    path = Path(path)
    if root is not None:
        _check_inside(path, root, who, error)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP, EACCES...
        raise error(f"{who}: cannot read {str(path)!r} ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise error(
            f"{who}: {str(path)!r} is {_describe_mode(st.st_mode)}, not a regular file; refused"
        )
    return st.st_size


def read_regular(
    path: str | os.PathLike,
    *,
    max_bytes: int,
    who: str = "imtm",
    root: str | os.PathLike | None = None,
    error: type = ValueError,
) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` bytes.

    Raises:
        FileNotFoundError: no such file.
        error (ValueError by default): a FIFO, a device, a folder, a link out of ``root``, a
            symlink loop, or a file larger than ``max_bytes``; the message names the file.
    """
    path = Path(path)
    if root is not None:
        _check_inside(path, root, who, error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except IsADirectoryError as e:
        raise error(f"{who}: {str(path)!r} is a folder, not a file") from e
    except OSError as e:  # ELOOP (a symlink loop), EACCES, ENXIO (a socket)...
        raise error(f"{who}: cannot open {str(path)!r} ({e.strerror or e})") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(
                f"{who}: {str(path)!r} is {_describe_mode(st.st_mode)}, not a regular file; refused"
            )
        if st.st_size > max_bytes:
            raise error(
                f"{who}: {str(path)!r} holds {st.st_size} bytes, more than the {max_bytes} this file may "
                "have; refused without reading it"
            )
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 24, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:  # it grew while being read
            raise error(f"{who}: {str(path)!r} holds more than {max_bytes} bytes; refused")
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_depth(
    obj: Any, where: str = "JSON value", limit: int = MAX_JSON_DEPTH, error: type = ValueError
) -> None:
    """Raise ``error`` when the lists and dicts of ``obj`` nest deeper than ``limit`` (no recursion)."""
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, dict):
            children = x.values()
        elif isinstance(x, (list, tuple)):
            children = x
        else:
            continue
        if depth > limit:
            raise error(
                f"{where}: its lists and dicts nest deeper than {limit} levels; refused (files imtm "
                "writes or reads are shallow)"
            )
        stack.extend((c, depth + 1) for c in children)


def loads_json(
    data: str | bytes, where: str, *, max_depth: int = MAX_JSON_DEPTH, error: type = ValueError
) -> Any:
    """Parse JSON text; ``error`` naming ``where`` (never RecursionError / JSONDecodeError) on bad input.

    A UTF-8 byte-order mark, as some editors write, is skipped.
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise error(
                f"{where} is not UTF-8 text (byte {e.start}: {e.reason}); JSON files must be UTF-8"
            ) from e
    elif data.startswith("\ufeff"):
        data = data[1:]
    try:
        obj = json.loads(data)
    except RecursionError as e:
        raise error(
            f"{where} is JSON whose lists and dicts nest deeper than {max_depth} levels; refused (files "
            "imtm writes or reads are shallow)"
        ) from e
    except json.JSONDecodeError as e:
        raise error(
            f"{where} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from e
    except ValueError as e:  # e.g. an integer with too many digits
        raise error(f"{where} is not valid JSON ({e})") from e
    check_depth(obj, where, max_depth, error)
    return obj


def read_json(
    path: str | os.PathLike,
    *,
    who: str = "imtm",
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    root: str | os.PathLike | None = None,
    error: type = ValueError,
    where: str | None = None,
) -> Any:
    """Read and parse a JSON file with the checks of :func:`read_regular` and :func:`loads_json`.

    Raises:
        FileNotFoundError: no such file.
        error (ValueError by default): not a regular file, too large, a link out of ``root``,
            not UTF-8, not JSON, or nested deeper than ``max_depth``; the message starts with
            ``who`` and names the file (or is ``where`` followed by what is wrong).
    """
    data = read_regular(path, max_bytes=max_bytes, who=who, root=root, error=error)
    return loads_json(data, where or f"{who}: {str(path)!r}", max_depth=max_depth, error=error)


def check_npy_size(path: str | os.PathLike, who: str = "imtm") -> None:
    """Refuse a ``.npy`` file shorter than its header says, before NumPy allocates the array.

    ``np.load(..., mmap_mode=None)`` allocates the declared shape first: a truncated file (or a
    forged header) declaring terabytes would end in ``MemoryError`` instead of an error naming it.
    Anything that is not a ``.npy`` header is left for ``np.load`` to report.
    """
    import numpy as np

    size = regular_file_size(path, who=who)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format._read_array_header(f, version)
        except (ValueError, OSError, EOFError, TypeError, SyntaxError):
            return
        offset = f.tell()
    if dtype.hasobject:
        return  # refused by np.load(allow_pickle=False)
    need = dtype.itemsize
    for n in shape:
        need *= int(n)
    if offset + need > size:
        raise ValueError(
            f"{who}: {str(path)!r} is truncated: its header declares shape {tuple(shape)} of {dtype} "
            f"({need} bytes of data) but the file holds {size - offset}"
        )


def process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (this very process counts as gone: a leftover of its own
    is from a write that failed). Without a harmless liveness test (not POSIX), ``False``: keep what may be in use.
    """
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process, or not a possible process id
        return True
    except PermissionError:  # another user's running process
        return False
    return False
