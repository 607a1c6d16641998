"""Run a frozen image encoder once over a dataset and write its tokens in the precomputed layout.

``extract_features(encoder, dataset, out, split)`` encodes every unique image of
``dataset`` (``dataset.images``) and writes, under ``out``:

- ``{split}_shards/{split}-00000-of-000NN.npy``: the tokens of ``shard_size``
  consecutive images each, ``(n, N, D)``, written to a temporary file and renamed
  into place, so a shard file is either complete or absent;
- ``{split}_extract.json``: the manifest: the run's settings, the shards done and
  the token layout (``N``, ``D``, patch ``grid``, ``num_prefix_tokens``);

and once every shard is there, the SCAN precomputed layout that
:class:`imtm.data.PrecompDataset` reads:

- ``{split}_ims.npy``: ``(n_images, N, D)``, the shards concatenated (assembled
  through a memory map, so never in memory whole);
- ``{split}_caps.txt``: the captions grouped by image (image ``k`` owns lines
  ``k * cpi .. (k + 1) * cpi - 1``), ``{split}_ids.txt``: each caption's image id
  (the dataset's own integer ids where it has them, else the image index), and
  ``{split}_images.txt``: the image file of each row.

An interrupted run (Ctrl-C, a killed process) resumes where it stopped when called
again with the same arguments: finished shards are kept, half-written temporary
files are discarded, and the images of the missing shards are encoded once more.
Shards are named by their image range, so none can be duplicated.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from imtm._io import process_gone, read_json
from imtm.tokens import Tokens

__all__ = ["FORMATS", "MANIFEST_VERSION", "dataset_from_format", "extract_features"]

#: Bumped when the output layout changes; a manifest of another version is not resumed.
MANIFEST_VERSION = 1
DTYPES = {"float32": np.float32, "float16": np.float16}


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` through a temporary file in the same folder, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    _atomic_write(path, lambda f: json.dump(obj, f, indent=1), mode="w")


def _caption_layout(data, captions_per_image: int | None) -> tuple[list[int], int]:
    """Caption indices grouped by image (image order, file order within an image), and ``cpi``."""
    c2i = torch.as_tensor(data.caption_to_image, dtype=torch.long)
    n_images = len(data.images)
    counts = torch.bincount(c2i, minlength=n_images)
    if int(counts.min()) == 0:
        k = int(torch.nonzero(counts == 0)[0])
        raise ValueError(
            f"extract_features: image {k} has no caption; every image needs at least one"
        )
    order = torch.sort(c2i, stable=True).indices
    if captions_per_image is None:
        if int(counts.min()) != int(counts.max()):
            raise ValueError(
                f"extract_features: images have between {int(counts.min())} and {int(counts.max())} captions; the "
                "precomputed layout needs the same number per image: pass captions_per_image=k (the first k "
                "captions of each image are kept; 5 for Flickr30K and COCO)"
            )
        return order.tolist(), int(counts[0])
    if int(counts.min()) < captions_per_image:
        k = int(torch.nonzero(counts < captions_per_image)[0])
        raise ValueError(
            f"extract_features: image {k} has {int(counts[k])} captions, fewer than captions_per_image={captions_per_image}"
        )
    starts = torch.cumsum(counts, 0) - counts
    keep = (starts[:, None] + torch.arange(captions_per_image)).flatten()
    return order[keep].tolist(), captions_per_image


def _as_token_array(out, batch: int, provides=None) -> tuple[torch.Tensor, dict]:
    """``(B, N, D)`` features and token metadata from what the encoder returned.

    A block returning several values (``TimmVisionEncoder`` gives ``(image_tokens,
    masked_patches)``) contributes its ``image_tokens``, else its first value.
    """
    if isinstance(out, (tuple, list)):
        names = list(provides) if provides is not None and len(provides) == len(out) else []
        out = out[names.index("image_tokens")] if "image_tokens" in names else out[0]
    meta = {"grid": None, "num_prefix_tokens": 0}
    if isinstance(out, Tokens):
        if out.mask is not None and not bool(out.mask.all()):
            raise ValueError(
                "extract_features: the encoder returned padded tokens (mask not all True); the precomputed "
                "layout stores every token as real, so extract with a fixed input size"
            )
        meta = {
            "grid": list(out.grid) if out.grid is not None else None,
            "num_prefix_tokens": out.num_prefix_tokens,
        }
        out = out.feats
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"extract_features: the encoder must return Tokens or a tensor, got {type(out).__name__}"
        )
    if out.dim() == 2:
        out = out[:, None, :]
    if out.dim() != 3 or out.shape[0] != batch:
        raise ValueError(
            f"extract_features: the encoder must return (B, N, D) tokens or (B, D) vectors for a batch of {batch}, "
            f"got shape {tuple(out.shape)}"
        )
    if not out.is_floating_point() or not bool(torch.isfinite(out).all()):
        raise ValueError("extract_features: the encoder returned non-finite or non-float features")
    return out, meta


class _Items(torch.utils.data.Dataset):
    """``dataset.images`` as a map-style dataset (DataLoader workers read images in parallel)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, k):
        return self.images[k]


def extract_features(
    encoder: Callable,
    data,
    out_dir,
    split: str,
    *,
    batch_size: int = 32,
    shard_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    captions_per_image: int | None = None,
    encoder_name: str | None = None,
    keep_shards: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Encode every unique image of ``data`` once; write the tokens as shards, then the precomputed layout.

    Args:
        encoder: a callable ``(B, 3, H, W) -> Tokens (B, N, D)`` (or a ``(B, N, D)`` /
            ``(B, D)`` tensor, or a tuple whose ``image_tokens`` / first value is one), e.g.
            ``TimmVisionEncoder``; run in eval mode without gradients.
        data: an imtm dataset (``images``, ``captions``, ``caption_to_image``) whose images
            come out of its transform at one size (see
            :func:`imtm.data.transforms.image_transform`).
        out_dir: the output folder (created).
        split: the split name used in the file names (``"train"``, ``"test"``, ...).
        batch_size: images per encoder call.
        shard_size: images per shard file; a run interrupted mid-shard re-encodes at most
            this many images.
        num_workers: DataLoader worker processes reading and transforming images.
        device: where the encoder runs (``"auto"``: CUDA when available).
        dtype: ``"float32"`` or ``"float16"`` (half the disk; read back as float32).
        captions_per_image: keep the first ``k`` captions of each image (the layout needs the
            same count per image); ``None``: every image must have the same count.
        encoder_name: recorded in the manifest; a resumed run must give the same.
        keep_shards: keep the shard files after assembling (default: delete them).
        overwrite: discard an earlier run in ``out_dir`` for this split instead of resuming it.
        progress: show a tqdm progress bar over images.

    Returns:
        ``out_dir``; ``PrecompDataset(out_dir, split)`` reads it.

    Raises:
        ValueError: a manifest of a different run in ``out_dir`` (naming the differing
            settings) or a damaged one (not UTF-8 JSON, not an object), unequal captions per image, padded or non-finite encoder outputs,
            token shapes that change between batches.

    Shape:
        - ``{split}_ims.npy``: ``(n_images, N, D)``

    Example:
        >>> import tempfile
        >>> from imtm.data import ImageCaptionDataset, PrecompDataset
        >>> ds = ImageCaptionDataset(torch.rand(3, 3, 8, 8), ["a", "b", "c"], [0, 1, 2])
        >>> enc = lambda x: x.flatten(2).transpose(1, 2)          # (B, 64, 3) "tokens"
        >>> out = extract_features(enc, ds, tempfile.mkdtemp(), "test", shard_size=2, progress=False)
        >>> PrecompDataset(out, "test").images.shape
        (3, 64, 3)
    """
    for attr in ("images", "captions", "caption_to_image"):
        if not hasattr(data, attr):
            raise TypeError(
                f"extract_features: data must be an imtm dataset with images, captions and caption_to_image; "
                f"{type(data).__name__} has no {attr!r}"
            )
    for name, v in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"extract_features: {name} must be a positive integer, got {v!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(
            f"extract_features: num_workers must be a non-negative integer, got {num_workers!r}"
        )
    if dtype not in DTYPES:
        raise ValueError(f"extract_features: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not isinstance(split, str) or not split or os.sep in split or split.startswith("."):
        raise ValueError(
            f"extract_features: split must be a plain file-name prefix such as 'test', got {split!r}"
        )
    caption_order, cpi = _caption_layout(data, captions_per_image)
    n_images = len(data.images)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard_dir = out / f"{split}_shards"
    manifest_path = out / f"{split}_extract.json"
    fp = getattr(data, "fingerprint", None)
    config = {
        "version": MANIFEST_VERSION,
        "split": split,
        "n_images": n_images,
        "shard_size": shard_size,
        "dtype": dtype,
        "captions_per_image": cpi,
        "encoder": encoder_name if encoder_name is not None else type(encoder).__name__,
        "data_fingerprint": fp() if callable(fp) else None,
    }
    _remove_stale_temporaries(out, split)
    manifest = _start_manifest(manifest_path, shard_dir, out, split, config, overwrite)
    if manifest.get("complete") and (out / f"{split}_ims.npy").is_file():
        if not keep_shards and shard_dir.is_dir():
            shutil.rmtree(shard_dir)  # killed after assembling, before removing the shards
        return out

    n_shards = math.ceil(n_images / shard_size)
    shard_dir.mkdir(exist_ok=True)
    for stale in shard_dir.glob(".*.tmp*"):
        stale.unlink()  # a temporary file left by a killed run: its shard was never renamed into place
    ranges = [(k * shard_size, min(n_images, (k + 1) * shard_size)) for k in range(n_shards)]
    names = [f"{split}-{k:05d}-of-{n_shards:05d}.npy" for k in range(n_shards)]
    tokens = manifest.get("tokens")
    done = set()
    for k, (a, b) in enumerate(ranges):
        path = shard_dir / names[k]
        if path.is_file():
            # The token layout reaches the manifest with the first shard; a shard renamed into place
            # before that (a kill in between) is redone, as the layout it would need is unknown.
            if tokens is not None and _shard_ok(path, b - a, tokens, DTYPES[dtype]):
                done.add(k)
            else:
                path.unlink()  # not one this run would write (e.g. edited by hand): redo it
    manifest["shards"] = {names[k]: list(ranges[k]) for k in sorted(done)}
    _write_json(manifest_path, manifest)

    todo = [k for k in range(n_shards) if k not in done]
    if todo:
        tokens = _encode_shards(
            encoder,
            data,
            todo,
            ranges,
            names,
            shard_dir,
            manifest,
            manifest_path,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            np_dtype=DTYPES[dtype],
            progress=progress,
            done_images=sum(ranges[k][1] - ranges[k][0] for k in done),
            n_images=n_images,
        )
    _assemble(out, split, shard_dir, names, n_images, tokens, DTYPES[dtype], data, caption_order)
    manifest["complete"] = True
    manifest["outputs"] = [
        f"{split}_ims.npy",
        f"{split}_caps.txt",
        f"{split}_ids.txt",
        f"{split}_images.txt",
    ]
    if not keep_shards:
        shutil.rmtree(shard_dir)
        manifest["shards"] = {}
    _write_json(manifest_path, manifest)
    return out


def _remove_stale_temporaries(out: Path, split: str) -> list[str]:
    """Remove the temporaries (``.{split}_ims.npy.tmp<pid>``...) of writers that are gone; return their names.

    A run killed while assembling leaves its temporary feature file, as large as the
    features; only these exact names, and only once process ``<pid>`` is gone, are removed.
    """
    pattern = re.compile(
        rf"^\.{re.escape(split)}_(ims\.npy|caps\.txt|ids\.txt|images\.txt|extract\.json)"
        r"\.tmp(?P<pid>[0-9]+)$"
    )
    removed = []
    for path in out.iterdir() if out.is_dir() else []:
        match = pattern.match(path.name)
        if match and path.is_file() and not path.is_symlink() and process_gone(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def read_manifest(path: Path, who: str, remedy: str) -> Any:
    """Parse an extraction manifest; a file that is not UTF-8 JSON is a ValueError ending in ``remedy``."""
    try:
        return read_json(path, who=who, max_bytes=1 << 28)
    except FileNotFoundError:
        raise
    except ValueError as e:  # not a regular file, too large, not UTF-8, not JSON, nested too deeply
        raise ValueError(
            f"{who}: {str(path)!r} is not a valid UTF-8 JSON manifest ({e}); {remedy}"
        ) from e


def _start_manifest(
    path: Path, shard_dir: Path, out: Path, split: str, config: dict, overwrite: bool
) -> dict:
    if path.is_file() and overwrite:
        path.unlink()
        if shard_dir.is_dir():
            shutil.rmtree(shard_dir)
        for suffix in ("_ims.npy", "_caps.txt", "_ids.txt", "_images.txt"):
            (out / f"{split}{suffix}").unlink(missing_ok=True)
    if not path.is_file():
        if shard_dir.is_dir() and any(shard_dir.iterdir()):
            raise ValueError(
                f"extract_features: {str(shard_dir)!r} holds files but {path.name} is missing, so they cannot "
                "be trusted; remove the folder or pass overwrite=True"
            )
        return dict(config, shards={}, tokens=None, complete=False)
    manifest = read_manifest(
        path, "extract_features", "pass overwrite=True (--overwrite) to start afresh"
    )
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards", {}), dict):
        raise ValueError(
            f"extract_features: {str(path)!r} is not an extraction manifest (a JSON object with a 'shards' "
            "object); pass overwrite=True (--overwrite) to start afresh"
        )
    differ = [k for k in config if manifest.get(k) != config[k]]
    if differ:
        detail = ", ".join(f"{k}: {manifest.get(k)!r} there, {config[k]!r} now" for k in differ)
        raise ValueError(
            f"extract_features: {str(path)!r} belongs to a different run ({detail}); use another output "
            "folder or pass overwrite=True (--overwrite) to start afresh"
        )
    return manifest


def _shard_ok(path: Path, rows: int, tokens: dict, np_dtype) -> bool:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return False
    if arr.ndim != 3 or arr.shape[0] != rows or arr.dtype != np_dtype:
        return False
    return list(arr.shape[1:]) == [tokens["num_tokens"], tokens["dim"]]


@torch.inference_mode()
def _encode_shards(
    encoder,
    data,
    todo,
    ranges,
    names,
    shard_dir,
    manifest,
    manifest_path,
    *,
    batch_size,
    num_workers,
    device,
    np_dtype,
    progress,
    done_images,
    n_images,
) -> dict:
    from imtm.data.collate import collate_images

    if isinstance(encoder, torch.nn.Module):
        encoder.eval().to(device)
    # Batches never cross a shard boundary, so a shard is complete as soon as its last batch is encoded.
    batches = [
        list(range(s, min(e, s + batch_size)))
        for k in todo
        for (a, e) in [ranges[k]]
        for s in range(a, e, batch_size)
    ]
    loader = torch.utils.data.DataLoader(
        _Items(data.images),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_images,
    )
    tokens = manifest.get("tokens")
    bar = tqdm(
        total=n_images,
        initial=done_images,
        desc=f"extract {manifest['split']}",
        unit="img",
        disable=not progress,
    )
    todo_iter = iter(todo)
    k = next(todo_iter)
    a, b = ranges[k]
    buf, row = None, a
    try:
        for x in loader:
            if isinstance(x, torch.Tensor):
                x = x.to(device)
            feats, meta = _as_token_array(encoder(x), len(x), getattr(encoder, "provides", None))
            if tokens is None:
                tokens = {"num_tokens": int(feats.shape[1]), "dim": int(feats.shape[2]), **meta}
                manifest["tokens"] = tokens
            elif [int(feats.shape[1]), int(feats.shape[2])] != [
                tokens["num_tokens"],
                tokens["dim"],
            ]:
                raise ValueError(
                    f"extract_features: images {row}..{row + len(x) - 1} gave tokens of shape "
                    f"{tuple(feats.shape[1:])}, earlier images ({tokens['num_tokens']}, {tokens['dim']}); "
                    "use a transform with a fixed output size"
                )
            if buf is None:
                buf = np.empty((b - a, tokens["num_tokens"], tokens["dim"]), dtype=np_dtype)
            buf[row - a : row - a + len(x)] = feats.float().cpu().numpy()
            row += len(x)
            bar.update(len(x))
            if row == b:
                _atomic_write(
                    shard_dir / names[k], lambda f, arr=buf: np.save(f, arr, allow_pickle=False)
                )
                manifest["shards"][names[k]] = [a, b]
                _write_json(manifest_path, manifest)
                k = next(todo_iter, None)
                if k is not None:
                    a, b = ranges[k]
                    buf, row = None, a
    finally:
        bar.close()
    return tokens


def _assemble(
    out, split, shard_dir, names, n_images, tokens, np_dtype, data, caption_order
) -> None:
    """Concatenate the shards into ``{split}_ims.npy`` and write the caption, id and image files."""
    ims = out / f"{split}_ims.npy"
    tmp = ims.with_name(f".{ims.name}.tmp{os.getpid()}")
    arr = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np_dtype, shape=(n_images, tokens["num_tokens"], tokens["dim"])
    )
    row = 0
    for name in names:
        shard = np.load(shard_dir / name, mmap_mode="r", allow_pickle=False)
        arr[row : row + len(shard)] = shard
        row += len(shard)
    if row != n_images:
        raise RuntimeError(f"extract_features: the shards hold {row} images, expected {n_images}")
    arr.flush()
    del arr
    os.replace(tmp, ims)

    c2i = torch.as_tensor(data.caption_to_image, dtype=torch.long).tolist()
    ext = getattr(data, "image_ids_external", None)
    ext = list(ext) if ext is not None else None
    int_ids = ext is not None and all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ext
    )
    ids = [int(ext[c2i[c]]) if int_ids else c2i[c] for c in caption_order]
    caps = [" ".join(str(data.captions[c]).split()) for c in caption_order]  # one line each
    _atomic_write(
        out / f"{split}_caps.txt", lambda f: f.write("".join(c + "\n" for c in caps)), mode="w"
    )
    _atomic_write(
        out / f"{split}_ids.txt", lambda f: f.write("".join(f"{i}\n" for i in ids)), mode="w"
    )
    paths = getattr(data.images, "paths", None)
    files = list(paths) if paths is not None else [str(k) for k in range(n_images)]
    _atomic_write(
        out / f"{split}_images.txt", lambda f: f.write("".join(p + "\n" for p in files)), mode="w"
    )


#: The annotation formats ``imtm extract --format`` reads, with what ``--annotations`` names.
FORMATS = {
    "karpathy": "a Karpathy split JSON (dataset_flickr30k.json, dataset_coco.json)",
    "caption-files": "a SCAN / VSE-infinity dataset folder ({split}_caps.txt, {split}_ids.txt, id_mapping.json)",
    "albef": "an ALBEF / LAVIS annotation JSON",
    "csv": "a CSV with 'filepath' and 'caption' columns",
}


def dataset_from_format(
    fmt: str,
    annotations,
    split: str,
    image_root=None,
    transform=None,
    captions_per_image: int | None = None,
):
    """The imtm dataset reading ``annotations`` in format ``fmt`` (a key of :data:`FORMATS`).

    ``split`` selects the split for ``karpathy`` and ``caption-files``; an ALBEF or CSV file
    is one split already.
    """
    from imtm._checks import suggest

    if fmt == "karpathy":
        from imtm.data.karpathy import KarpathyDataset

        if image_root is None:
            raise ValueError(
                "extract: --format karpathy needs --image-root (the folder of the images)"
            )
        return KarpathyDataset(
            annotations, image_root, split, transform, captions_per_image=captions_per_image
        )
    if fmt == "caption-files":
        from imtm.data.caption_files import CaptionFileDataset

        return CaptionFileDataset(annotations, split, image_root, transform)
    if fmt == "albef":
        from imtm.data.albef import AlbefJsonDataset

        return AlbefJsonDataset(annotations, image_root, transform)
    if fmt == "csv":
        from imtm.data.csv_captions import CsvDataset

        return CsvDataset(annotations, image_root, transform)
    raise ValueError(
        f"extract: format must be one of {sorted(FORMATS)}, got {fmt!r}." + suggest(fmt, FORMATS)
    )
