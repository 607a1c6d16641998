"""One tiny image-caption dataset written in every raw-image format imtm reads.

The same generated JPEGs and captions, in the same order, as a Karpathy split JSON, SCAN /
VSE-infinity caption files with ``id_mapping.json``, ALBEF JSON files, CSV files, official
COCO ``captions_*.json`` files and a Flickr30K ``results_20130124.token`` file, so a test can
check that every format reads the same split.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
}
SPLITS = {"train": 8, "dev": 3, "test": 4}
CPI = 2


def _image(path: Path, k: int) -> None:
    """A 32 x 32 JPEG: a coloured square on a noisy background (the colour named by the captions)."""
    rng = np.random.default_rng(k)
    pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
    colour = list(COLOURS.values())[k % len(COLOURS)]
    x, y = (k * 7) % 16, (k * 5) % 16
    pixels[y : y + 14, x : x + 14] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def layout(root) -> dict:
    """Write every format under ``root``; return {split: [(file name, [captions])]} and the paths."""
    root = Path(root)
    images = root / "images"
    names = list(COLOURS)
    split_items: dict[str, list] = {}
    k = 0
    for split, n in SPLITS.items():
        items = []
        for _ in range(n):
            colour = names[k % len(names)]
            file = f"{100000 + k}.jpg"
            _image(images / file, k)
            caps = [f"a {colour} square number {k}", f"the {colour} box {k} on a dark ground"][:CPI]
            items.append((file, caps))
            k += 1
        split_items[split] = items
    karpathy_split = {"train": "train", "dev": "val", "test": "test"}
    entries = [
        {
            "filename": f,
            "split": karpathy_split[s],
            "imgid": i,
            "sentences": [{"raw": c, "tokens": c.split()} for c in caps],
        }
        for i, (s, f, caps) in enumerate(
            (s, f, caps) for s, items in split_items.items() for f, caps in items
        )
    ]
    (root / "dataset_flickr30k.json").write_text(
        json.dumps({"images": entries, "dataset": "flickr30k"})
    )

    cf = root / "caption_files"
    cf.mkdir()
    mapping = {}
    for s, items in split_items.items():
        caps = [c for _, cs in items for c in cs]
        ids = [str(int(f[:-4])) for f, cs in items for _ in cs]
        (cf / f"{s}_caps.txt").write_text("\n".join(caps) + "\n")
        (cf / f"{s}_ids.txt").write_text("\n".join(ids) + "\n")
        mapping.update({str(int(f[:-4])): f for f, _ in items})
    (cf / "id_mapping.json").write_text(json.dumps(mapping))

    albef = root / "albef"
    albef.mkdir()
    albef_name = {"train": "f30k_train.json", "dev": "f30k_val.json", "test": "f30k_test.json"}
    for s, items in split_items.items():
        if s == "train":  # ALBEF's training files: one entry per caption
            ann = [{"image": f, "caption": c, "image_id": f[:-4]} for f, cs in items for c in cs]
        else:  # its evaluation files: one entry per image with all its captions
            ann = [{"image": f, "caption": cs} for f, cs in items]
        (albef / albef_name[s]).write_text(json.dumps(ann))

    csv_dir = root / "csv"
    csv_dir.mkdir()
    for s, items in split_items.items():
        with open(csv_dir / f"{s}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["filepath", "caption"])
            w.writerows([f, c] for f, cs in items for c in cs)

    coco = root / "coco"
    coco.mkdir()
    ann_id = 0
    for s, file in (("train", "captions_train2014.json"), ("test", "captions_val2014.json")):
        imgs, anns = [], []
        for f, cs in split_items[s]:
            imgs.append({"id": int(f[:-4]), "file_name": f, "width": 32, "height": 32})
            for c in cs:
                anns.append({"id": ann_id, "image_id": int(f[:-4]), "caption": c})
                ann_id += 1
        # COCO lists annotations in no particular image order: interleave them.
        anns = anns[::2] + anns[1::2]
        (coco / file).write_text(
            json.dumps({"info": {}, "licenses": [], "images": imgs, "annotations": anns})
        )

    token = root / "flickr30k" / "results_20130124.token"
    token.parent.mkdir()
    token.write_text(
        "".join(f"{f}#{j}\t{c}\n" for f, cs in split_items["test"] for j, c in enumerate(cs))
    )
    return {
        "items": split_items,
        "images": images,
        "sources": {
            "karpathy": root / "dataset_flickr30k.json",
            "caption-files": cf,
            "albef": albef,
            "csv": csv_dir,
            "coco": coco,
            "flickr30k-token": token,
        },
    }
