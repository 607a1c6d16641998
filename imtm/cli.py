"""The ``imtm`` command: ``imtm demo``, ``imtm train``, ``imtm evaluate``, ``imtm extract``, ``imtm compare``, ``imtm viz``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _data_error(err: Exception) -> SystemExit:
    """A data problem (unknown format, missing file) as one line, without a traceback."""
    return SystemExit(f"imtm: {err}")


def _load_data(args, split: str | None = None, view: str = "regions", sizes: dict | None = None):
    """The datasets of ``--data``/``--format``/``--image-root`` (see :func:`imtm.data.load_dataset`)."""
    from imtm.data import load_dataset

    try:
        return load_dataset(args.data, getattr(args, "format", None), split,
                            image_root=getattr(args, "image_root", None), view=view, seed=args.seed, sizes=sizes,
                            captions_per_image=getattr(args, "captions_per_image", None))
    except (ValueError, FileNotFoundError) as err:
        raise _data_error(err) from err


def _add_data_arguments(parser, *, default: str | None = "synthetic") -> None:
    """``--data``, ``--format``, ``--image-root``, ``--view``, ``--captions-per-image`` (train, evaluate)."""
    from imtm.data.formats import FORMATS

    parser.add_argument("--data", default=default, help="'synthetic', or the file or folder --format reads")
    parser.add_argument("--format", default=None, choices=list(FORMATS), metavar="FORMAT",
                        help="how to read --data (default: synthetic, or precomp for a folder of *_ims.npy): "
                             + "; ".join(f"{k}: {v}" for k, v in FORMATS.items()))
    parser.add_argument("--image-root", default=None, help="folder of the image files (raw-image formats)")
    parser.add_argument("--view", default=None, choices=["regions", "pixels"],
                        help="synthetic view (default: pixels for laps and ela, regions for the others)")
    parser.add_argument("--captions-per-image", type=int, default=None,
                        help="keep the first k captions of each image (karpathy, coco, flickr30k-token)")


def _table(results: dict, title: str | None = None) -> str:
    from imtm.metrics import format_table

    return format_table(results) if title is None else f"{title}\n{format_table(results)}"


def cmd_demo(args) -> int:
    import torch

    from imtm import Matcher, presets

    t0 = time.time()
    sizes = {"n_train": args.n_train, "n_dev": 100, "n_test": 1000}
    if args.quick:
        sizes = {"n_train": 300, "n_dev": 50, "n_test": 100}
    from imtm.data import load_dataset

    train, _, test = load_dataset("synthetic", view="regions", seed=args.seed, sizes=sizes)
    print(f"imtm demo: synthetic benchmark (regions view), {train.n_images} train images, "
          f"{test.n_images} test images x {test.n_captions // test.n_images} captions, "
          f"vocabulary of {len(train.vocab)} words; generated in {time.time() - t0:.1f}s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {}
    for name in args.presets.split(","):
        t1 = time.time()
        # The presets' triplet losses sum over negatives for a first epoch, then take the hardest.
        m = Matcher(presets.build(name, train, embed_dim=args.embed_dim, word_dim=args.word_dim),
                    epochs=args.epochs, stages=presets.default_stages(name, args.epochs), batch_size=args.batch_size,
                    lr=args.lr, random_state=args.seed,
                    verbose=not args.quiet)
        m.fit(train)
        fit_s = time.time() - t1
        res = m.evaluate(test)
        res["train_s"] = round(fit_s, 1)
        results[name] = res
        print(f"{name}: trained {args.epochs} epochs in {fit_s:.1f}s, rSum {res['rsum']:.1f}")
    print()
    print(_table(results, f"R@K on the synthetic test split ({test.n_images} images, {test.n_captions} captions):"))
    print(f"\ntotal wall time {time.time() - t0:.1f}s")
    return 0


def _matcher_from_args(args, train):
    import inspect

    from imtm import Matcher, presets

    if args.preset not in presets.PRESETS:
        raise SystemExit(f"imtm train: --preset must be one of {', '.join(presets.PRESETS)}, got {args.preset!r}")
    params = inspect.signature(presets.PRESETS[args.preset]).parameters
    kw = {"embed_dim": args.embed_dim}
    if args.word_dim and "word_dim" in params:
        kw["word_dim"] = args.word_dim
    if args.preset in presets.PIXEL_PRESETS:
        try:
            model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
        except json.JSONDecodeError as e:
            raise SystemExit(f"imtm train: --model-kwargs must be a JSON object, e.g. '{{\"depth\": 2}}': {e}") from e
        image_key = "model_name" if args.preset == "laps" else "image_model"
        given = {image_key: args.image_model, "img_size": args.img_size, "model_kwargs": model_kwargs,
                 "text_model": args.text_model if args.preset == "ela" else None,
                 "checkpoint_path": args.checkpoint if args.preset == "laps" else None}
        kw.update({k: v for k, v in given.items() if v is not None})
        if args.pretrained:
            kw["pretrained"] = True
        if args.checkpoint and args.preset != "laps":
            raise SystemExit("imtm train: --checkpoint loads LAPS's backbone; ELA takes --pretrained or a "
                             "--image-model of timm's")
    try:
        components = presets.build(args.preset, train, workdir=args.out, **kw)
    except ValueError as err:
        raise _data_error(err) from err
    return Matcher(components, epochs=args.epochs, batch_size=args.batch_size,
                   stages=presets.default_stages(args.preset, args.epochs), lr=args.lr, random_state=args.seed,
                   checkpoint_dir=args.out, device=args.device,
                   precision=args.precision, checkpoint_every=args.checkpoint_every, verbose=not args.quiet)


def cmd_train(args) -> int:
    # Under torchrun every rank runs this: fit trains with DDP, save writes on rank 0, evaluate is
    # sharded over the ranks; only rank 0 prints and writes the metrics.
    from imtm import presets
    from imtm.data.formats import attach_model_transforms
    from imtm.engine import distributed

    view = args.view or ("pixels" if args.preset in presets.PIXEL_PRESETS else "regions")
    train, dev, test = _load_data(args, view=view)
    m = _matcher_from_args(args, train)
    attach_model_transforms(m.components, train, dev, test)
    m.fit(train, eval_set=dev, resume=args.resume)
    out = Path(args.out)
    m.save(out / "final")
    final, split = (test, "test") if test is not None else (dev, "dev")
    res = m.evaluate(final, protocol=args.protocol) if final is not None else None
    if distributed.is_main():
        if res is None:
            print(f"{args.data} holds one split (the training one): nothing to test on; evaluate with "
                  "imtm evaluate --model ... --data <test file>")
        else:
            print(_table({args.preset: res}, f"{split} split ({final.n_images} images):"))
            (out / f"{split}_metrics.json").write_text(json.dumps(res, indent=2))
        print(f"saved to {out / 'final'}")
    return 0


def cmd_evaluate(args) -> int:
    from imtm import Matcher
    from imtm.data.formats import attach_model_transforms, image_encoder

    m = Matcher.load(args.model, device=args.device)
    m.verbose = not args.quiet
    view = args.view or ("pixels" if image_encoder(m.components_) is not None else "regions")
    data = _load_data(args, split=args.split, view=view)
    attach_model_transforms(m.components_, data, train=(False,))
    res = m.evaluate(data, protocol=args.protocol)  # sharded over the ranks under torchrun
    from imtm.engine import distributed

    if distributed.is_main():
        print(_table({Path(args.model).name: res}, f"{args.split} split ({data.n_images} images):"))
    return 0


def cmd_extract(args) -> int:
    """Encode a dataset's images once with a frozen timm encoder; write the precomputed layout."""
    import torch

    from imtm.components import TimmVisionEncoder
    from imtm.data import load_dataset
    from imtm.data.extract import extract_features
    from imtm.data.transforms import image_transform

    try:
        model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
    except json.JSONDecodeError as e:
        raise SystemExit(f"imtm extract: --model-kwargs must be a JSON object, e.g. '{{\"depth\": 2}}': {e}") from e
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise SystemExit(f"imtm extract: --model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    spec = {"model": args.model, "pretrained": args.pretrained, "checkpoint": args.checkpoint,
            "model_kwargs": model_kwargs, "img_size": args.img_size, "keep_cls": not args.no_cls}
    encoder = TimmVisionEncoder(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint,
                                img_size=args.img_size, keep_cls=not args.no_cls, freeze=True,
                                model_kwargs=model_kwargs)
    if args.format in ("synthetic", "precomp"):
        raise SystemExit(f"imtm extract: --format {args.format} holds no image files to encode; give a raw-image "
                         "format (karpathy, caption-files, albef, csv, coco, flickr30k-token)")
    try:
        data = load_dataset(args.annotations, args.format, args.split, image_root=args.image_root,
                            transform=image_transform(encoder, train=False),
                            captions_per_image=args.captions_per_image)
    except (ValueError, FileNotFoundError) as err:
        raise _data_error(err) from err
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    out = extract_features(
        encoder, data, args.out, args.split, batch_size=args.batch_size, shard_size=args.shard_size,
        num_workers=args.num_workers, device=args.device, dtype=args.dtype,
        captions_per_image=args.captions_per_image, encoder_name=json.dumps(spec, sort_keys=True),
        keep_shards=args.keep_shards, overwrite=args.overwrite, progress=not args.quiet,
    )
    manifest = json.loads((out / f"{args.split}_extract.json").read_text())
    tok = manifest["tokens"]
    print(f"imtm extract: {data.n_images} images x {tok['num_tokens']} tokens x {tok['dim']} "
          f"(grid {tok['grid']}, {tok['num_prefix_tokens']} prefix) -> {out / (args.split + '_ims.npy')} "
          f"in {time.time() - t0:.1f}s; read it with imtm.data.PrecompDataset({str(out)!r}, {args.split!r})")
    return 0


def cmd_compare(args) -> int:
    """Train every named preset on the same data and budget; write the table (Markdown, CSV) and a plot."""
    from imtm.compare import CompareSettings, compare, markdown_table

    s = CompareSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, embed_dim=args.embed_dim,
                        word_dim=args.word_dim, n_train=args.n_train, n_test=args.n_test,
                        image_size=args.image_size, seed=args.seed)
    if args.quick:
        s.n_train, s.n_dev, s.n_test, s.embed_dim, s.word_dim, s.batch_size = 40, 5, 20, 16, 16, 16
    try:
        rows = compare(args.presets, data=args.data, settings=s, out=args.out, verbose=not args.quiet)
    except ValueError as e:
        raise SystemExit(f"imtm {e}") from e
    print()
    print(markdown_table(rows))
    print(f"\nwritten to {Path(args.out) / 'compare.md'} and {Path(args.out) / 'compare.csv'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imtm", description="Image-text matching components for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train small models on the built-in synthetic benchmark and print R@K")
    d.add_argument("--presets", default="vsepp,chan", help="comma-separated presets to train (default: vsepp,chan)")
    d.add_argument("--epochs", type=int, default=4)
    d.add_argument("--n-train", type=int, default=2000, help="training images (5 captions each)")
    d.add_argument("--batch-size", type=int, default=128)
    d.add_argument("--lr", type=float, default=2e-3)
    d.add_argument("--embed-dim", type=int, default=128)
    d.add_argument("--word-dim", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a tiny run (seconds), for smoke tests")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    for name, func in (("train", cmd_train), ("evaluate", cmd_evaluate)):
        t = sub.add_parser(name, help=f"{name} a model")
        _add_data_arguments(t)
        t.add_argument("--seed", type=int, default=0)
        t.add_argument("--device", default="auto")
        t.add_argument("--protocol", default=None, help="f30k_1k, coco_1k_5fold or coco_5k")
        t.add_argument("--quiet", action="store_true")
        if name == "train":
            t.add_argument("--preset", default="chan")
            t.add_argument("--epochs", type=int, default=10)
            t.add_argument("--batch-size", type=int, default=128)
            t.add_argument("--lr", type=float, default=2e-4)
            t.add_argument("--embed-dim", type=int, default=1024)
            t.add_argument("--word-dim", type=int, default=None)
            t.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
            t.add_argument("--checkpoint-every", type=int, default=None)
            t.add_argument("--out", default="runs/imtm", help="run folder (checkpoints, final model)")
            t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
            # The pixel presets' backbones (laps, ela).
            t.add_argument("--image-model", default=None, help="laps, ela: the timm ViT / Swin (default: the "
                           "paper's on image files, a small ViT from scratch on synthetic pixels)")
            t.add_argument("--img-size", type=int, default=None, help="laps, ela: input resolution")
            t.add_argument("--model-kwargs", default=None, help="laps, ela: JSON object of timm.create_model "
                           "arguments, e.g. '{\"depth\": 2}'")
            t.add_argument("--pretrained", action="store_true", help="laps, ela: timm's pretrained weights")
            t.add_argument("--checkpoint", default=None, help="laps: local backbone weights (.safetensors)")
            t.add_argument("--text-model", default=None, help="ela: a local BERT folder or 'minilm' (default: a "
                           "small BERT from scratch over the training captions, written into --out)")
        else:
            t.add_argument("--model", required=True, help="folder written by Matcher.save or imtm train")
            t.add_argument("--split", default="test", choices=["train", "dev", "val", "test"])
        t.set_defaults(func=func)

    c = sub.add_parser("compare", help="train several presets on the same data and budget; one results table "
                                       "(Markdown, CSV) and a recall@K plot")
    c.add_argument("--presets", default="chan,laps,dcpa,ela,dias,vsepp",
                   help="comma-separated presets (vsepp, chan, dcpa, dias on regions; laps, ela on pixels)")
    c.add_argument("--data", default="synthetic", help="'synthetic' or a folder in the SCAN precomputed layout "
                                                      "(region presets only)")
    c.add_argument("--epochs", type=int, default=4, help="epochs of every preset (DCPA: both stages together)")
    c.add_argument("--n-train", type=int, default=1000, help="synthetic training images (5 captions each)")
    c.add_argument("--n-test", type=int, default=200, help="synthetic test images (5 captions each)")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--embed-dim", type=int, default=64)
    c.add_argument("--word-dim", type=int, default=64)
    c.add_argument("--image-size", type=int, default=32, help="pixels view: image side")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="runs/compare", help="folder for compare.md, compare.csv, compare_recall.png")
    c.add_argument("--quick", action="store_true", help="a tiny run (seconds), for smoke tests")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compare)

    from imtm.data.formats import FORMATS

    x = sub.add_parser("extract", help="run a frozen timm image encoder once over a dataset and write its tokens "
                                       "in the precomputed layout (resumable)")
    x.add_argument("--format", required=True, choices=list(FORMATS), metavar="FORMAT",
                   help="how to read --data: " + "; ".join(f"{k}: {v}" for k, v in FORMATS.items()
                                                           if k not in ("synthetic", "precomp")))
    x.add_argument("--data", "--annotations", dest="annotations", required=True,
                   help="the annotation file or folder --format reads")
    x.add_argument("--image-root", default=None, help="the image folder (default: per format)")
    x.add_argument("--split", default="test", help="split to read (train, dev, test) and output file prefix")
    x.add_argument("--model", required=True, help="a timm ViT or Swin name, e.g. vit_base_patch16_224")
    x.add_argument("--checkpoint", default=None, help="local weights (.safetensors or a state dict)")
    x.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the hub or its cache)")
    x.add_argument("--model-kwargs", default=None, help="JSON object of extra timm.create_model arguments")
    x.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    x.add_argument("--no-cls", action="store_true", help="drop the [CLS] token (patch tokens only)")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--batch-size", type=int, default=32)
    x.add_argument("--shard-size", type=int, default=256, help="images per shard (at most this many are redone on resume)")
    x.add_argument("--num-workers", type=int, default=0, help="DataLoader workers reading images")
    x.add_argument("--device", default="auto")
    x.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    x.add_argument("--captions-per-image", type=int, default=None, help="keep the first k captions of each image")
    x.add_argument("--keep-shards", action="store_true", help="keep the shard files after assembling")
    x.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out instead of resuming it")
    x.add_argument("--quiet", action="store_true")
    x.set_defaults(func=cmd_extract)

    from imtm.viz.command import add_viz_parser

    add_viz_parser(sub)  # imtm viz KIND: the pictures of imtm.viz
    return p


def main(argv=None) -> int:
    """Run one ``imtm`` command; a folder or configuration that cannot be used exits with status 2.

    A :class:`~imtm.engine.serialization.ConfigError` (an unknown block, an altered or
    incomplete checkpoint, weights of another configuration) is a problem with the files
    given, not a bug: it is printed as one line naming the command, without a traceback.
    """
    from imtm.engine.serialization import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"imtm {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
