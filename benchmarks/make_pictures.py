"""Train small models on the built-in synthetic benchmark and draw every imtm.viz picture for the docs.

Writes ``docs/img/*.png`` and ``docs/pictures.md`` (the page lists what each picture shows and how it
was made; nothing on it is typed by hand). One thread, a few minutes on a laptop CPU::

    OMP_NUM_THREADS=1 python benchmarks/make_pictures.py [--epochs 4] [--n-train 1000] [--quick]

``--quick`` trains for one epoch on a few images (a smoke run; pictures of untrained-looking models).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from imtm import Matcher, presets, viz
from imtm.components.encoders.hf_text import write_local_bert
from imtm.data import synthetic
from imtm.metrics import retrieval_metrics
from imtm.viz.command import KINDS

ROOT = Path(__file__).resolve().parents[1]


def fit(components, train, args, **kw):
    kw.setdefault("epochs", args.epochs)
    t0 = time.perf_counter()
    m = Matcher(
        components,
        batch_size=64,
        lr=args.lr,
        random_state=args.seed,
        verbose=False,
        checkpoint_dir=None,
        **kw,
    ).fit(train)
    return m, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dpi", type=int, default=80)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--img", default=str(ROOT / "docs" / "img"))
    p.add_argument("--page", default=str(ROOT / "docs" / "pictures.md"))
    args = p.parse_args()
    if args.quick:
        args.epochs, args.n_train, args.n_test = 1, 64, 20
    torch.set_num_threads(1)
    img_dir = Path(args.img)
    img_dir.mkdir(parents=True, exist_ok=True)
    log: list[tuple[str, str, str]] = []  # (file, title, what it shows)
    notes: list[str] = []

    def save(fig_fn, name, title, text, *a, **kw):
        path = img_dir / f"{name}.png"
        fig_fn(*a, path=path, dpi=args.dpi, **kw)
        log.append((path.name, title, text))
        print(
            f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
            f"({path.stat().st_size // 1024} KB)",
            flush=True,
        )

    # ---------------------------------------------------------------- region models: CHAN, VSE++, DCPA, DIAS
    train, _, test = synthetic.load(
        view="regions", seed=args.seed, n_train=args.n_train, n_dev=10, n_test=args.n_test
    )
    small = {"embed_dim": 64, "word_dim": 64, "hardest": False}
    models, times = {}, {}
    models["vsepp"], times["vsepp"] = fit(presets.build("vsepp", train, **small), train, args)
    models["chan"], times["chan"] = fit(
        presets.build("chan", train, context_heads=2, **small), train, args
    )
    models["dcpa"], times["dcpa"] = fit(
        presets.build("dcpa", train, heads=2, k=3, **small),
        train,
        args,
        stages=presets.default_stages("dcpa", args.epochs),
    )
    dias_comps = presets.build("dias", train, context_heads=2, **small)
    dias_before, _ = fit(dias_comps, train, args, epochs=0)
    models["dias"], times["dias"] = fit(dias_comps, train, args)
    for name, m in models.items():
        r = retrieval_metrics(m.similarity(test.images, test.captions), test.caption_to_image)
        notes.append(
            f"{name}: trained in {times[name]:.0f} s, rSum {r['rsum']:.1f} on the {test.n_images}-image "
            f"test split"
        )
        print(notes[-1], flush=True)

    q = 0
    picture, boxes = viz.synthetic_picture(test, q)
    caption = test.captions[q * test.captions_per_image]
    save(
        viz.word_alignment_maps,
        "chan_word_regions",
        "CHAN: word-to-region alignment (CHAN Fig. 5)",
        "One panel per word: every region box filled by its cosine with the word, the best region (the one "
        "hard assignment keeps, Eq. 5) outlined in red.",
        models["chan"],
        test.images[q],
        caption,
        picture=picture,
        boxes=boxes,
    )
    save(
        viz.phrase_topk_regions,
        "dcpa_topk_regions",
        "DCPA: top-K regions of each branch (DCPA Fig. 6)",
        "The K regions the intra-modal score averages (Eq. 10), the K regions whose decoder outputs best match a "
        "word in the image-to-text branch (Eq. 11-14), and the text-to-image branch's word scores.",
        models["dcpa"],
        test.images[q],
        caption,
        boxes=boxes,
        picture=picture,
    )
    pairs_images = test.images
    pairs_captions = test.captions[:: test.captions_per_image]
    save(
        viz.dimension_correlation_maps,
        "dias_correlation",
        "DIAS: dimension correlation before and after training (Eq. 4)",
        "The correlation of image dimension k with text dimension l over matched pairs, before training and after; "
        "the dimension alignment loss pulls the diagonal to 1.",
        {"before": dias_before, "after": models["dias"]},
        pairs_images,
        pairs_captions,
    )
    save(
        viz.spatial_distance_histograms,
        "dias_distances",
        "DIAS: spatial distances (DIAS Fig. 4)",
        "Cosine distances of matched and unmatched pairs, the inter-modality asymmetry (Eq. 7) and the "
        "intra-modality gap (Eq. 9), before and after training.",
        {"before": dias_before, "after": models["dias"]},
        pairs_images,
        pairs_captions,
    )
    save(
        viz.recall_curves,
        "recall_curves",
        "Retrieval: recall@K curves",
        "Recall@K against K, both directions, of the four region models on the test split.",
        models,
        test,
    )
    save(
        viz.retrieved_examples,
        "retrieved_captions",
        "Retrieval: top-5 captions for an image (CHAN)",
        "Correct captions in green with a tick, others in red.",
        models["chan"],
        test,
        q,
        direction="i2t",
    )
    save(
        viz.retrieved_examples,
        "retrieved_images",
        "Retrieval: top-5 images for a caption (CHAN)",
        "The caption's own image framed in green, the others in red.",
        models["chan"],
        test,
        q * test.captions_per_image,
        direction="t2i",
    )

    # ---------------------------------------------------------------- patch models: LAPS, ELA
    n_pix = max(64, args.n_train // 3)
    ptrain, _, ptest = synthetic.load(
        view="pixels", seed=args.seed, n_train=n_pix, n_dev=4, n_test=8, image_size=64
    )
    vit = {"depth": 1, "embed_dim": 64, "num_heads": 2, "patch_size": 8}
    laps, t_laps = fit(
        presets.laps(
            vocab=ptrain.vocab,
            text="gru",
            model_name="vit_tiny_patch16_224",
            img_size=64,
            embed_dim=64,
            word_dim=64,
            hardest=False,
            model_kwargs=vit,
        ),
        ptrain,
        args,
    )
    notes.append(
        f"laps: trained in {t_laps:.0f} s on {ptrain.n_images} images of 64 x 64 (8 x 8 patches)"
    )
    print(notes[-1], flush=True)
    image, pcaption = ptest.images[0], ptest.captions[0]
    save(
        viz.kept_patches,
        "laps_kept_patches",
        "LAPS: kept patches at several ratios (LAPS Fig. 4-5)",
        "The significance of every patch for the caption (Eq. 1), then the patches kept at rho = 0.25, 0.5, 0.75 "
        "(dropped ones darkened).",
        laps,
        image,
        pcaption,
    )
    save(
        viz.patch_groups,
        "laps_patch_groups",
        "LAPS: aggregated patch groups (LAPS Fig. 6)",
        "Each kept patch coloured by the aggregated token that takes the largest share of it (Eq. 6); grey: "
        "dropped patches, fused into one token (Eq. 7).",
        laps,
        image,
        pcaption,
    )
    save(
        viz.word_alignment_maps,
        "laps_word_patches",
        "LAPS: word-to-patch alignment (LAPS Fig. 8)",
        "One panel per word: the cosine of each patch with the word, the best patch outlined in red.",
        laps,
        image,
        pcaption,
    )

    folder = write_local_bert(
        tempfile.mkdtemp(),
        ptrain.captions,
        hidden_size=64,
        num_layers=1,
        num_heads=2,
        seed=args.seed,
    )
    ela, t_ela = fit(
        presets.ela(
            text_model=str(folder),
            image_model="vit_tiny_patch16_224",
            img_size=64,
            embed_dim=64,
            model_kwargs=vit,
            heads=2,
            cross_layers=1,
            rerank_k=4,
        ),
        ptrain,
        args,
        epochs=max(1, args.epochs // 2),
    )
    notes.append(
        f"ela: trained {max(1, args.epochs // 2)} epochs in {t_ela:.0f} s on the same pixel images"
    )
    print(notes[-1], flush=True)
    save(
        viz.patch_lexicon_words,
        "ela_patch_lexicon",
        "ELA: top lexicon words per patch (ELA Fig. 3)",
        "The three most probable vocabulary words of the most confident patches under the patch-to-lexicon head "
        "(Eq. 2); red: words the caption does not contain.",
        ela,
        image,
        pcaption,
        max_patches=12,
    )

    lines = (
        [
            "# Pictures",
            "",
            "Every figure below is drawn by one call of `imtm.viz` (or `imtm viz ...` on the command line) on models",
            "trained for a few minutes on the built-in synthetic benchmark; they show what the plots look like, not",
            "what the papers' models learn on real data. Generated by `python benchmarks/make_pictures.py "
            f"--epochs {args.epochs} --n-train {args.n_train}`"
            + (" --quick" if args.quick else "")
            + f" (seed {args.seed}); the page itself is written by that script.",
            "",
            'Install the plotting extra first: `pip install "imtm[viz]"`.',
            "",
            "Training runs behind these pictures (one thread, shared machine):",
            "",
        ]
        + [f"- {n}" for n in notes]
        + [""]
    )
    calls = {
        "chan_word_regions": "viz.word_alignment_maps(m, image, caption, picture=picture, boxes=boxes)",
        "dcpa_topk_regions": "viz.phrase_topk_regions(m, image, caption, boxes=boxes, picture=picture)",
        "dias_correlation": "viz.dimension_correlation_maps({'before': m0, 'after': m1}, images, captions)",
        "dias_distances": "viz.spatial_distance_histograms({'before': m0, 'after': m1}, images, captions)",
        "recall_curves": "viz.recall_curves({'vsepp': m1, 'chan': m2, ...}, test)",
        "retrieved_captions": "viz.retrieved_examples(m, test, 0, direction='i2t')",
        "retrieved_images": "viz.retrieved_examples(m, test, 0, direction='t2i')",
        "laps_kept_patches": "viz.kept_patches(m, image, caption, ratios=(0.25, 0.5, 0.75))",
        "laps_patch_groups": "viz.patch_groups(m, image, caption)",
        "laps_word_patches": "viz.word_alignment_maps(m, image, caption)",
        "ela_patch_lexicon": "viz.patch_lexicon_words(m, image, caption)",
    }
    for file, title, text in log:
        lines += [
            f"## {title}",
            "",
            text,
            "",
            f"`{calls[Path(file).stem]}`",
            "",
            f"![{title}](img/{file})",
            "",
        ]
    lines += [
        "For region features (the `regions` view, CHAN, DCPA) the boxes and the drawn picture come from",
        "`viz.synthetic_picture(split, index)`, which renders the same scene as the `pixels` view.",
        "",
        "## From the command line",
        "",
        "`imtm viz KIND --model FOLDER --out PICTURE.png` draws the same pictures from models saved by",
        "`Matcher.save` or `imtm train` (on the synthetic benchmark's test split by default; `--index` picks the",
        "image, `--caption` the caption, `--view pixels --image-size S` for patch models). Kinds: "
        + ", ".join(f"`{k}`" for k in KINDS)
        + ". Several `--model LABEL=FOLDER` give one curve or panel each:",
        "",
        "```bash",
        "imtm train --preset chan --epochs 4 --embed-dim 64 --out runs/chan",
        "imtm viz words --model runs/chan/final --out chan_words.png",
        "imtm viz recall --model chan=runs/chan/final --model vsepp=runs/vsepp/final --out recall.png",
        "imtm viz retrieved --direction t2i --index 0 --model runs/chan/final --out top5.png",
        "```",
        "",
    ]
    Path(args.page).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
