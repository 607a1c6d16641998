"""What ``imtm extract`` costs: images/s of one frozen pass over a folder of JPEG images.

Not part of the test suite. Generated images (random smooth colour fields saved as
JPEG at Flickr30K's typical 500x375, so decoding and resizing cost what they cost on
the real files), read through a CsvDataset with the timm evaluation transform of the
model (resize, 224 center crop, normalise). Random initialisation (speed does not
depend on the weights), eval mode, autograd off, one process. Measured side by side
in this run, for a small encoder (ViT-Ti/16) and a ViT-B/16-sized one:

  load     the data loading alone: the same DataLoader as the extraction (same batch
           size and workers), images decoded and transformed, nothing encoded;
  encoder  the encoder alone on the already-loaded batches (the compute ceiling);
  extract  ``extract_features`` end to end: load, encode, write shards atomically,
           assemble ``{split}_ims.npy`` and the caption files;
  loop     a plain per-image loop doing the same work: read and transform one image,
           encode it alone, ``np.save`` it to its own file.

With ``num_workers=0`` loading and encoding run one after the other, so the best
extraction can do is ``1 / (1/load + 1/encoder)`` images/s ("serial bound");
with workers the loading overlaps the encoding.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_extract.py            # 32 images
    OMP_NUM_THREADS=1 python benchmarks/bench_extract.py --quick    # 8 images, smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imtm.components import TimmVisionEncoder
from imtm.data import CsvDataset
from imtm.data.collate import collate_images
from imtm.data.extract import extract_features
from imtm.data.image_files import read_image
from imtm.data.transforms import image_transform

MODELS = ("vit_tiny_patch16_224", "vit_base_patch16_224")
SIZE = (500, 375)  # Flickr30K's most common image size


def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEG images of smooth random colour fields, and a CSV naming them with a caption each."""
    rng = np.random.default_rng(seed)
    rows = ["filepath,caption"]
    for k in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(SIZE, Image.BICUBIC).save(folder / f"{k}.jpg", quality=90)
        rows.append(f"{k}.jpg,image number {k}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def rate(n: int, seconds: float) -> float:
    return n / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 images (a smoke run)")
    ap.add_argument(
        "--images", type=int, default=None, help="number of images (default 32; quick: 8)"
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated timm model names")
    args = ap.parse_args()
    n = args.images or (8 if args.quick else 32)
    bs = min(args.batch_size, n)
    torch.manual_seed(0)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), num_workers={args.num_workers}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "imgs").mkdir()
        csv_path = write_images(tmp / "imgs", n)
        print(
            f"{n} JPEG images {SIZE[0]}x{SIZE[1]}, batch {bs}, timm evaluation transform to 224x224"
        )
        header = (
            f"{'model':<22} {'params':>7} {'load':>8} {'encoder':>8} {'serial':>8} {'extract':>8} {'loop':>8}"
            f" {'extract/serial':>15} {'extract/loop':>13}"
        )
        print("images/s" + " " * (len(header) - 8))
        print(header)
        for name in args.models.split(","):
            enc = TimmVisionEncoder(name, freeze=True).eval()
            params = sum(p.numel() for p in enc.parameters()) / 1e6
            transform = image_transform(enc)
            data = CsvDataset(csv_path, transform=transform)
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(data.images, range(n)),
                batch_size=bs,
                num_workers=args.num_workers,
                collate_fn=collate_images,
            )

            t0 = time.perf_counter()
            batches = [x for x in loader]
            load = rate(n, time.perf_counter() - t0)

            with torch.inference_mode():
                enc(batches[0][:1])  # warm-up
                t0 = time.perf_counter()
                for x in batches:
                    enc(x)
                encode = rate(n, time.perf_counter() - t0)
            del batches

            t0 = time.perf_counter()
            extract_features(
                enc,
                data,
                tmp / f"out-{name}",
                "test",
                batch_size=bs,
                shard_size=max(bs, n // 4),
                num_workers=args.num_workers,
                progress=False,
            )
            extract = rate(n, time.perf_counter() - t0)

            loop_dir = tmp / f"loop-{name}"
            loop_dir.mkdir()
            t0 = time.perf_counter()
            with torch.inference_mode():
                for k in range(n):
                    x = transform(read_image(data.images.paths[k]))[None]
                    tokens, _ = enc(x)
                    np.save(loop_dir / f"{k}.npy", tokens.feats[0].numpy())
            loop = rate(n, time.perf_counter() - t0)

            serial = 1.0 / (1.0 / load + 1.0 / encode)
            print(
                f"{name:<22} {params:>6.1f}M {load:>8.1f} {encode:>8.1f} {serial:>8.1f} {extract:>8.1f} {loop:>8.1f}"
                f" {extract / serial:>15.2f} {extract / loop:>13.2f}"
            )
            out = np.load(tmp / f"out-{name}" / "test_ims.npy", mmap_mode="r")
            print(
                f"{'':<22} tokens per image {tuple(out.shape[1:])}, {out.nbytes / n / 1024:.0f} KiB per image on disk"
            )


if __name__ == "__main__":
    main()
