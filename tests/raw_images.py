"""Tiny generated image files and annotation files in the formats the raw-image loaders read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ["a", "dog", "cat", "runs", "sits", "on", "the", "red", "grass", "mat", "two", "left", "of"]


def write_image(path, seed: int, size=(12, 10)) -> Path:
    """A random RGB image (PNG or JPEG by the suffix); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7)))) + f" {k}" for k in range(n)]


def write_karpathy(
    root, splits=("train", "val", "test", "restval"), per_split=2, cpi=5, coco=False, seed=0
):
    """A Karpathy split JSON over generated images; returns (json path, image root, entries)."""
    root = Path(root)
    images = root / "images"
    entries = []
    caps = captions(len(splits) * per_split * (cpi + 2), seed)
    c = 0
    for s in splits:
        for _ in range(per_split):
            k = len(entries)
            n_sent = cpi + (k % 3 if coco else 0)  # COCO has images with 6 or 7 sentences
            entry = {
                "filename": f"img{k}." + ("jpg" if k % 2 else "png"),
                "split": s,
                "imgid": k,
                "sentences": [
                    {"raw": caps[c + i], "tokens": caps[c + i].split()} for i in range(n_sent)
                ],
            }
            c += n_sent
            if coco:
                entry["filepath"] = "val2014" if k % 2 else "train2014"
                entry["cocoid"] = 1000 + k
            write_image(images / entry.get("filepath", "") / entry["filename"], seed + k)
            entries.append(entry)
    path = root / ("dataset_coco.json" if coco else "dataset_flickr30k.json")
    path.write_text(json.dumps({"images": entries, "dataset": "coco" if coco else "flickr30k"}))
    return path, images, entries
