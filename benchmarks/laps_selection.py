"""Which patches does LAPS keep? The trained selector's choices against the objects of each scene.

LAPS's premise is that a caption is about a few patches and the rest are redundant, so keeping
the patches the caption is about (and dropping the rest) costs nothing. On the synthetic
benchmark the ground truth is known: the scene generator says which patches each object touches
(:func:`imtm.data.synthetic.patch_coverage`). This script trains LAPS exactly as ``imtm compare``
does (the same settings and blocks, :func:`imtm.compare.build_components`), then, for every test
image and every test caption, reads the patches the trained selector keeps at inference (top
:math:`N_s` of Eq. 4-5, the ``keep_decisions`` of :class:`~imtm.components.PatchSlimming`) and
reports, over the seeds:

- *precision*: the share of kept patches that an object touches, for each caption with its own
  image; a selector that ignores the image keeps objects at the rate they occur (the object
  fraction), one that finds them reaches 1 when there are fewer object patches than it keeps;
- *recall*: the share of the image's object patches kept (a random selector: the keep ratio
  :math:`\\rho`); and the best recall any selector of :math:`N_s` patches could reach;
- *language-awareness*: the same precision when the caption belongs to another image (the
  selector then has no reason to prefer this image's objects), and how much the kept set of one
  image changes from one caption to another (the mean Jaccard overlap of the kept sets of two
  different captions of the same image).

``python benchmarks/laps_selection.py --seeds 0,1,2`` writes ``docs/results/laps_selection.md``;
``--quick`` prints a tiny run and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _results import (
    add_compare_arguments,
    compare_settings,
    markdown_table,
    mean_std,
    page_command,
    write_page,
)

from imtm.compare import build_components, load_splits, make_matcher
from imtm.components import PatchSlimming
from imtm.data import synthetic
from imtm.metrics import retrieval_metrics

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_compare_arguments(p, str(ROOT / "docs" / "results" / "laps_selection.md"))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.n_train, args.n_test = "0", 1, 24, 8
        args.batch_size, args.embed_dim = 16, 16
    return args


def touched_patches(scenes, image_size: int, patch_size: int) -> torch.Tensor:
    """``(n_images, n_patches)`` bool: the patches some object of each scene touches (row-major, as the ViT's)."""
    return torch.from_numpy(
        np.stack(
            [
                (synthetic.patch_coverage(s, image_size, patch_size) > 0).any(axis=0)
                if s.objects
                else np.zeros((image_size // patch_size) ** 2, dtype=bool)
                for s in scenes
            ]
        )
    )


def selection_readings(keep: torch.Tensor, touched: torch.Tensor, owner: torch.Tensor) -> dict:
    """The readings of one trained model from its kept patches.

    Args:
        keep: ``(n_images, n_captions, n_patches)`` bool, the patches kept for each pair.
        touched: ``(n_images, n_patches)`` bool, the patches an object touches.
        owner: ``(n_captions,)`` the image of each caption.
    """
    n_img, n_cap, n = keep.shape
    caps = torch.arange(n_cap)
    own = keep[owner, caps]  # (n_cap, n): each caption with its own image
    obj = touched[owner]  # (n_cap, n)
    kept = own.sum(1).clamp_min(1)
    n_obj = obj.sum(1)
    has_obj = n_obj > 0
    precision = ((own & obj).sum(1) / kept)[has_obj]
    recall = ((own & obj).sum(1) / n_obj.clamp_min(1))[has_obj]
    best_recall = (torch.minimum(kept, n_obj) / n_obj.clamp_min(1))[has_obj]
    # Another image's caption: image (owner + 1) mod n_images.
    other = (owner + 1) % n_img
    foreign = keep[other, caps]
    obj_other = touched[other]
    precision_foreign = ((foreign & obj_other).sum(1) / foreign.sum(1).clamp_min(1))[
        obj_other.any(1)
    ]
    # Two different captions of the same image: the first two captions of each image.
    jaccard = []
    for i in range(n_img):
        mine = (owner == i).nonzero().flatten()
        if len(mine) >= 2:
            a, b = keep[i, mine[0]], keep[i, mine[1]]
            jaccard.append(float((a & b).sum()) / max(1, int((a | b).sum())))
    return {
        "object_fraction": float(touched.float().mean()),
        "kept_fraction": float(own.float().mean()),
        "precision": float(precision.float().mean()),
        "recall": float(recall.float().mean()),
        "best_recall": float(best_recall.float().mean()),
        "precision_foreign": float(precision_foreign.float().mean()),
        "jaccard": float(np.mean(jaccard)) if jaccard else float("nan"),
    }


def run_seed(args, seed: int) -> dict:
    s = compare_settings(args, seed)
    train, _, test = load_splits("synthetic", "pixels", s)
    with tempfile.TemporaryDirectory() as tmp:
        comps, encoders = build_components("laps", train, s, Path(tmp))
    m = make_matcher("laps", comps, s).fit(train)
    iv, tv = m.encode_images(test.images), m.encode_texts(test.captions)
    slim = next(b for b in m.components_.values() if isinstance(b, PatchSlimming))
    with torch.no_grad():
        _, keep = slim(iv["image_tokens"], tv["text_tokens"])
    prefix = iv["image_tokens"].num_prefix_tokens
    keep = keep[..., prefix:] > 0.5
    image_size = int(test.images[0].shape[-1])
    patch = image_size // int(round(keep.shape[-1] ** 0.5))
    touched = touched_patches(test.scenes, image_size, patch)
    owner = torch.as_tensor(test.caption_to_image)
    out = selection_readings(keep, touched, owner)
    out["rsum"] = float(retrieval_metrics(m.similarity(test.images, test.captions), owner)["rsum"])
    out["encoders"] = encoders
    out["n_patches"] = keep.shape[-1]
    return out


#: (row label, key of the readings)
COLUMNS = (
    ("objects touch (share of patches)", "object_fraction"),
    ("kept (share of patches)", "kept_fraction"),
    ("precision: kept patches on an object, own caption", "precision"),
    ("precision, another image's caption", "precision_foreign"),
    ("recall: object patches kept, own caption", "recall"),
    ("best recall of a selector of the same size", "best_recall"),
    ("kept-set overlap of two captions of one image (Jaccard)", "jaccard"),
    ("test rSum", "rsum"),
)


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    t0 = time.perf_counter()
    runs = []
    for seed in seeds:
        runs.append(run_seed(args, seed))
        print(
            f"seed {seed}: " + ", ".join(f"{k} {runs[-1][k]:.3f}" for _, k in COLUMNS), flush=True
        )
    wall = time.perf_counter() - t0
    rows = []
    for label, key in COLUMNS:
        m, sd = mean_std([r[key] for r in runs])
        digits = 1 if key == "rsum" else 3
        rows.append(
            [label, f"{m:.{digits}f} +- {sd:.{digits}f}", *(f"{r[key]:.{digits}f}" for r in runs)]
        )
    table = markdown_table(
        ["reading", "mean +- std", *(f"seed {s}" for s in seeds)], "lr" + "r" * len(seeds), rows
    )
    p, rec, base = (
        mean_std([r[k] for r in runs])[0] for k in ("precision", "recall", "object_fraction")
    )
    foreign = mean_std([r["precision_foreign"] for r in runs])[0]
    reading = (
        f"Read from the table: the kept patches lie on an object {p:.1%} of the time for the caption's own "
        f"image and {foreign:.1%} for another image's caption, where objects touch {base:.1%} of the patches; "
        f"the selector keeps {rec:.1%} of an image's object patches (a selector that ignored the image would "
        f"keep about {mean_std([r['kept_fraction'] for r in runs])[0]:.1%})."
    )
    cmd = page_command("laps_selection.py", argv if argv is not None else sys.argv[1:])
    lines = [
        "# Which patches LAPS keeps (the trained selector against the scenes' objects)",
        "",
        f"Generated by `{cmd.strip()}` (wall time {wall:.0f} s). Each seed trains LAPS as `imtm compare` does "
        f"({runs[0]['encoders']}; {args.epochs} epochs of {args.n_train} training images x 5 captions, batch "
        f"{args.batch_size}, lr {args.lr}, width {args.embed_dim}; the compare's settings otherwise) and reads, on "
        f"its {args.n_test} test images x 5 captions, the patches PatchSlimming keeps at inference (the top "
        f"N_s of Eq. 4-5) for every image-caption pair, against the patches the scene generator says an object "
        f"touches ({runs[0]['n_patches']} patches per image). Each cell: mean +- std over seeds {args.seeds}, then "
        "each seed.",
        "",
        *table,
        "",
        reading,
        "",
    ]
    if args.quick:
        print("\n".join(lines))
        return 0
    write_page(args.out, lines, keep_from="## Reading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
