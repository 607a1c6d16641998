"""``imtm viz KIND``: draw one imtm.viz picture from saved models (``Matcher.save`` folders) to a file.

The output's suffix chooses its format (``.png``, ``.pdf``, ``.svg``). Words are the model's own
(its vocabulary's words or its tokenizer's word pieces), models are labelled by their record
(``LABEL=PATH`` overrides), and kinds that draw one block of a model take ``--block NAME``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

__all__ = ["KINDS", "add_viz_parser", "cmd_viz"]

#: The kinds that draw one block of the model, with the class of that block (``--block NAME`` names it).
BLOCK_KINDS = {
    "laps-kept": "PatchSlimming",
    "laps-groups": "PatchSlimming",
    "ela": "PatchToLexiconHead",
}

#: The pictures ``imtm viz`` draws, with what each shows.
KINDS = {
    "words": "word-to-patch / word-to-region alignment maps (LAPS Fig. 8, CHAN Fig. 5)",
    "laps-kept": "LAPS: kept patches at several ratios (Fig. 4-5)",
    "laps-groups": "LAPS: aggregated patch groups (Fig. 6)",
    "dcpa": "DCPA: top-K regions of the intra and inter branches (Fig. 6)",
    "ela": "ELA: top lexicon words per patch (Fig. 3)",
    "dias-correlation": "DIAS: dimension correlation matrices, one per --model (Eq. 4)",
    "dias-distances": "DIAS: histograms of spatial distances, one curve per --model (Fig. 4)",
    "recall": "recall@K curves, one per --model",
    "retrieved": "top-5 captions (--direction i2t) or images (t2i) of a query, matches marked",
}


def add_viz_parser(sub) -> None:
    """Register ``viz`` on the ``imtm`` command's subparsers."""
    v = sub.add_parser(
        "viz",
        help="draw a picture of saved models (imtm.viz) to a PNG, PDF or SVG; needs imtm[viz]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="kinds:\n" + "\n".join(f"  {k:17s} {t}" for k, t in KINDS.items()),
        epilog="example: imtm viz words --model runs/chan --out words.pdf",
    )
    v.add_argument("kind", choices=sorted(KINDS), help="the picture (see above)")
    v.add_argument(
        "--model",
        action="append",
        required=True,
        help="a Matcher.save folder; repeat for several, optionally as LABEL=PATH",
    )
    v.add_argument(
        "--out",
        required=True,
        help="the file to write; its suffix chooses the format: .png, .pdf or .svg",
    )
    v.add_argument(
        "--block",
        default=None,
        metavar="NAME",
        help="the block to draw, for "
        + ", ".join(f"{k} (a {c})" for k, c in BLOCK_KINDS.items())
        + "; needed when the model has several",
    )
    v.add_argument(
        "--boxes",
        default=None,
        metavar="PATH",
        help="region boxes for region features: a bottom-up-attention .tsv or a .npy (n_images, N, 4); "
        "the synthetic benchmark brings its own",
    )
    v.add_argument(
        "--data", default="synthetic", help="'synthetic' or a folder in the SCAN precomputed layout"
    )
    v.add_argument(
        "--view", default="regions", choices=["regions", "pixels"], help="synthetic view"
    )
    v.add_argument(
        "--image-size",
        type=int,
        default=64,
        help="synthetic pixels: the size the models were trained on",
    )
    v.add_argument("--n-test", type=int, default=100, help="synthetic: test images")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--split", default="test", choices=["train", "dev", "test"])
    v.add_argument(
        "--index", type=int, default=0, help="image index (or caption index for --direction t2i)"
    )
    v.add_argument(
        "--caption",
        type=int,
        default=None,
        help="caption index (default: the image's first caption)",
    )
    v.add_argument("--direction", default="i2t", choices=["i2t", "t2i"])
    v.add_argument("--dpi", type=int, default=100)
    v.set_defaults(func=cmd_viz)


def _models(specs):
    """``{label: Matcher}``: ``LABEL=PATH`` labels, else the title from each model's record."""
    from imtm.matcher import Matcher
    from imtm.viz.figure import model_title

    loaded = []
    for spec in specs:
        label, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        m = Matcher.load(path, device="cpu")
        m.verbose = False
        loaded.append((label or model_title(m, fallback=Path(path).name), path, bool(label), m))
    titles = [t for t, _, _, _ in loaded]
    out = {}
    for title, path, given, m in loaded:
        if (
            not given and titles.count(title) > 1
        ):  # two models of the same description: say which folder
            title = f"{title} ({Path(path).resolve().parent.name}/{Path(path).name})"
        out[title] = m
    return out


def _split(args):
    names = ("train", "dev", "test")
    if args.data == "synthetic":
        from imtm.data import synthetic

        sizes = {"n_train": 10, "n_dev": 10, "n_test": args.n_test}
        if args.view == "pixels":
            sizes["image_size"] = args.image_size
        return dict(zip(names, synthetic.load(view=args.view, seed=args.seed, **sizes)))[args.split]
    from imtm.data import load_dataset

    try:
        return load_dataset(
            args.data,
            getattr(args, "format", None),
            args.split,
            view=args.view,
            seed=args.seed,
            image_root=getattr(args, "image_root", None),
        )
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"imtm viz: {err}") from err


def cmd_viz(args) -> int:
    from imtm import viz
    from imtm.viz.figure import BlockChoiceError, format_of

    try:
        format_of(args.out)
    except ValueError as err:
        raise SystemExit(
            f"imtm viz: --out {args.out}: the suffix chooses the format; use .png, .pdf or .svg"
        ) from err
    if args.block is not None and args.kind not in BLOCK_KINDS:
        raise SystemExit(
            f"imtm viz {args.kind}: --block is for the kinds {sorted(BLOCK_KINDS)}; leave it out here"
        )
    models = _models(args.model)
    data = _split(args)
    first = next(iter(models.values()))
    n = (
        len(data.images)
        if args.direction == "i2t" or args.kind != "retrieved"
        else len(data.captions)
    )
    if not 0 <= args.index < n:
        raise SystemExit(f"imtm viz: --index must lie in [0, {n}), got {args.index}")
    cpi = len(data.captions) // len(data.images)
    image = data.images[args.index]
    caption = data.captions[args.caption if args.caption is not None else args.index * cpi]
    picture = boxes = None
    if hasattr(data, "scenes"):
        picture, boxes = viz.synthetic_picture(data, args.index)
    if args.boxes is not None:
        all_boxes = viz.read_boxes(args.boxes)
        if args.index >= len(all_boxes):
            raise SystemExit(
                f"imtm viz: --boxes {args.boxes} holds boxes of {len(all_boxes)} images; "
                f"--index {args.index} has none"
            )
        boxes = all_boxes[args.index]
    kw = {"path": args.out, "dpi": args.dpi}
    pairs = (data.images, data.captions[::cpi])
    region = not (isinstance(image, torch.Tensor) and image.dim() == 3)
    try:
        if args.kind == "words":
            viz.word_alignment_maps(
                first, image, caption, picture=picture, boxes=boxes if region else None, **kw
            )
        elif args.kind == "laps-kept":
            viz.kept_patches(first, image, caption, block=args.block, **kw)
        elif args.kind == "laps-groups":
            viz.patch_groups(first, image, caption, block=args.block, **kw)
        elif args.kind == "dcpa":
            if boxes is None:
                raise SystemExit(
                    "imtm viz dcpa: region boxes are needed: --boxes PATH (a bottom-up-attention .tsv "
                    "or a .npy), or --data synthetic, which brings its own"
                )
            viz.phrase_topk_regions(first, image, caption, boxes=boxes, picture=picture, **kw)
        elif args.kind == "ela":
            viz.patch_lexicon_words(first, image, caption, head=args.block, **kw)
        elif args.kind == "dias-correlation":
            viz.dimension_correlation_maps(models, *pairs, **kw)
        elif args.kind == "dias-distances":
            viz.spatial_distance_histograms(models, *pairs, **kw)
        elif args.kind == "recall":
            viz.recall_curves(models, data, **kw)
        else:
            viz.retrieved_examples(first, data, args.index, direction=args.direction, **kw)
    except BlockChoiceError as err:
        raise SystemExit(_block_message(args, err, next(iter(models)))) from err
    print(f"imtm viz {args.kind}: wrote {args.out}")
    return 0


def _block_message(args, err, label: str) -> str:
    """The wrong-kind / ambiguous-block error in the command's words: what is missing and which flag to use."""
    kind = args.kind
    if err.name is not None and kind in BLOCK_KINDS:
        return (
            f"imtm viz {kind}: --block {err.name}: model '{label}' has no block of that name; "
            f"its blocks are {err.blocks}"
            + (f" (its {err.kind} blocks: {err.names})" if err.names else "")
        )
    if err.names and kind in BLOCK_KINDS:
        return (
            f"imtm viz {kind}: model '{label}' has several {err.kind} blocks; choose one with --block NAME "
            f"(one of {err.names})"
        )
    needs = {
        "PatchSlimming": "a LAPS model",
        "PatchToLexiconHead": "an ELA model",
        "TopKAggregation": "a DCPA model",
        "InterModalPhraseAttention": "a DCPA model",
    }.get(err.kind, "a model")
    flag = " (chosen with --block NAME when there are several)" if kind in BLOCK_KINDS else ""
    missing = f"no block named {err.name!r}" if err.name is not None else "none"
    return (
        f"imtm viz {kind}: this picture needs {needs} with a {err.kind} block{flag}; model '{label}' has "
        f"{missing} (its blocks: {err.blocks}). Kinds for any model: recall, retrieved, words"
    )
