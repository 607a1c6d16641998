"""ELA's Table 6 ablation on the built-in benchmark, and Figure-3-style lexicon predictions.

Rows (same data, encoders, budget and seed; by default the packaged synthetic-vit and synthetic-bert,
pre-trained on the benchmark's pre-training split and fine-tuned here; ``--backbone scratch``: a tiny
ViT and a tiny BERT trained from scratch):

Every row trains with image-aware masked-LM (MLM) on, so that each row changes one thing only
(the distillation row used to switch MLM on as well).

1. contrastive + matching + masked-LM (ITC + ITM + MLM), the baseline;
2. + patch-to-lexicon, labels without expansion (one-hot words through the transport plan);
3. + expansion (labels from the word-to-lexicon head, two transformer layers; it learns only with
   distillation, as Eq. 11 has no masked-LM term of its own: ``presets.ela(w2l_loss=True)`` adds one);
4. + cross-modal lexicon distillation (with image-aware masked-LM): ELA.

Each row is evaluated twice: ranking by the contrastive similarity alone, and
two-stage (the matching head re-ranking each query's top-k). Then the full model
predicts words for the patches of a few test images (Figure 3 of the paper): the top
words of each quadrant of the patch grid, marking words no caption of that image uses.
Writes docs/results/ela.md (generated, never typed by hand): each cell the mean +- std over
``--seeds``, and the reading of the claim (ELA against the ITC + ITM + MLM baseline) from the numbers.

    OMP_NUM_THREADS=1 python benchmarks/ela_ablation.py --seeds 0,1,2 [--rows 14] [--out docs/results/ela.md]
    python benchmarks/ela_ablation.py --quick        # seconds; a smoke run, its numbers mean nothing
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time

import torch
from _results import claim_reading, markdown_table, seeded_table, write_page

from imtm import Matcher, presets
from imtm.components.encoders.hf_text import write_local_bert
from imtm.data import synthetic
from imtm.functional import global_cosine_scores
from imtm.metrics import retrieval_metrics

ROWS = [
    (
        "ITC + ITM + MLM (baseline)",
        dict(lexicon=False, expansion=False, distillation=False, mlm=True),
    ),
    (
        "+ patch-to-lexicon, no expansion",
        dict(lexicon=True, expansion=False, distillation=False, mlm=True),
    ),
    ("+ expansion", dict(lexicon=True, expansion=True, distillation=False, mlm=True)),
    ("+ distillation (ELA)", dict(lexicon=True, expansion=True, distillation=True, mlm=True)),
]

#: Diagnostic rows (``--rows 5``, ``--rows 6``, ``--rows 7``): what the lexicon rows change besides the
#: lexicon loss: masking the images every objective sees (one view, as before the two-view default),
#: the other KL order.
EXTRA_ROWS = [
    (
        "ITC + ITM + MLM, 30% of the patches masked (one view)",
        dict(lexicon=False, expansion=False, distillation=False, mlm=True),
        {"image__mask_ratio": 0.3},
    ),
    (
        "+ expansion, KL(label || P)",
        dict(
            lexicon=True, expansion=True, distillation=False, mlm=True, kl_direction="target_first"
        ),
        {},
    ),
    (
        "+ distillation (ELA), one masked view for every objective",
        dict(lexicon=True, expansion=True, distillation=True, mlm=True, separate_masked_view=False),
        {},
    ),
]

#: The row whose lexicon predictions are shown (Figure 3).
FULL_ROW = "+ distillation (ELA)"


def itc_metrics(m, test):
    """Rank by the contrastive similarity alone (the first stage), from the cached tokens."""
    iv = m.encode_images(test.images)["image_tokens"]
    tv = m.encode_texts(test.captions)["text_tokens"]
    s = global_cosine_scores(iv.feats, tv.feats, iv.mask, tv.mask)
    return retrieval_metrics(s, test.caption_to_image)


@torch.no_grad()
def lexicon_predictions(m, test, n_images=4, top=5):
    """Top words per quadrant of the patch grid for a few test images (eval mode: nothing masked)."""
    c = m.components_
    enc, head, text = c["image"], c["p2l"], c["text"]
    vocab = text.tokenizer.convert_ids_to_tokens(list(range(text.vocab_size)))
    # Special tokens and punctuation are left out of the display.
    special = {i for i, w in enumerate(vocab) if not w.isalpha()}
    colour_words = {w for ws in synthetic.captions.COLOUR_WORDS.values() for w in ws}
    shape_words = {
        w for forms in synthetic.captions.SHAPE_WORDS.values() for pair in forms for w in pair
    }
    lines, found = [], 0
    for i in range(n_images):
        tokens, _ = enc(test.images[i : i + 1])
        h, w = tokens.grid
        patches = tokens.feats[0, tokens.num_prefix_tokens :].reshape(h, w, -1)
        caps = [
            test.captions[k]
            for k in range(len(test.captions))
            if int(test.caption_to_image[k]) == i
        ]
        used = {t for cap in caps for t in re.findall(r"\w+", cap.lower())}
        lines.append(f"**Test image {i}.** Captions: " + " / ".join(f'"{cap}"' for cap in caps))
        lines.append("")
        lines.append("| region | top words (P^p2l averaged over the region's patches) |")
        lines.append("| --- | --- |")
        for name, rs, cs in (
            ("top-left", slice(0, h // 2), slice(0, w // 2)),
            ("top-right", slice(0, h // 2), slice(w // 2, w)),
            ("bottom-left", slice(h // 2, h), slice(0, w // 2)),
            ("bottom-right", slice(h // 2, h), slice(w // 2, w)),
        ):
            probs = torch.softmax(
                head.logits(patches[rs, cs].reshape(-1, patches.shape[-1])), -1
            ).mean(0)
            probs[list(special)] = 0
            val, idx = probs.topk(top)
            words = []
            for p, k in zip(val.tolist(), idx.tolist()):
                word = vocab[k]
                unseen = word not in used
                if unseen and (word in colour_words or word in shape_words):
                    found += 1
                words.append(f"{'**' if unseen else ''}{word}{'**' if unseen else ''} ({p:.2f})")
            lines.append(f"| {name} | {', '.join(words)} |")
        lines.append("")
    return lines, found


N_DEV = 10
KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def _plain(res):
    return {k: float(res[k]) for k in KEYS}


def backbones(args, seed, captions, folder=None):
    """The image-encoder keywords of ``presets.ela`` and the text model, as every row uses them
    (``--backbone scratch``: a BERT folder written from ``captions``, or ``folder``)."""
    if args.backbone == "synthetic":
        return {"image_model": "synthetic-vit", "model_kwargs": None}, "synthetic-bert"
    image = {
        "image_model": "vit_tiny_patch16_224",
        "model_kwargs": dict(depth=2, embed_dim=args.dim, num_heads=2, patch_size=args.patch_size),
    }
    text_model = folder or write_local_bert(
        tempfile.mkdtemp(),
        captions,
        hidden_size=args.dim,
        num_layers=2,
        num_heads=2,
        seed=seed,
    )
    return image, str(text_model)


def build_row(flags, params, args, seed, image, text_model, test):
    """One row's Matcher, built as every row of the table builds it (``flags`` for ``presets.ela``)."""
    comps = presets.ela(
        text_model=text_model,
        img_size=args.image_size,
        embed_dim=args.dim,
        heads=2,
        cross_layers=1,
        rerank_k=args.rerank_k,
        **image,
        **{"kl_direction": args.kl_direction, **flags},
    )
    if args.backbone == "synthetic":
        comps[0][1].set_params(freeze=True)  # the pre-trained ViT frozen; its projection trains
    m = Matcher(
        comps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        random_state=seed,
        verbose=False,
        image_block=len(test.images),
        text_block=len(test.captions),
    )
    m.set_params(**params)
    return m


def evaluate_both(m, test):
    """ITC ranking and two-stage (ITM re-ranked) metrics of ``m`` on ``test``, and the seconds taken."""
    t0 = time.perf_counter()
    with torch.no_grad():
        itc = _plain(itc_metrics(m, test))
        rer = _plain(m.evaluate(test))
    return itc, rer, time.perf_counter() - t0


def _losses(m):
    return {k[5:]: round(v, 3) for k, v in m.history_[-1].items() if k.startswith("loss/")}


def selected_rows(args):
    """``(label, flags, params)`` of the rows ``--rows`` picks."""
    rows = [(label, flags, {}) for label, flags in ROWS] + EXTRA_ROWS
    return [row for r, row in enumerate(rows) if str(r + 1) in args.rows]


def load_benchmark(seed, args):
    """The train and test splits of one seed (the dev split is not used)."""
    train, _, test = synthetic.load(
        view="pixels",
        seed=seed,
        n_train=args.n_train,
        n_dev=N_DEV,
        n_test=args.n_test,
        image_size=args.image_size,
    )
    return train, test


def run_seed(seed, args, folder):
    train, test = load_benchmark(seed, args)
    image, text_model = backbones(args, seed, train.captions, folder)
    results, timing, full = {}, [], None
    for label, flags, params in selected_rows(args):
        m = build_row(flags, params, args, seed, image, text_model, test)
        t0 = time.perf_counter()
        m.fit(train)
        fit_s = time.perf_counter() - t0
        itc, rer, eval_s = evaluate_both(m, test)
        itc["fit_s"] = rer["fit_s"] = fit_s
        results[f"{label}, ITC ranking"] = itc
        results[f"{label}, ITC top-{args.rerank_k} re-ranked by ITM"] = rer
        losses = _losses(m)
        timing.append((f"seed {seed}: {label}", f"{fit_s:.0f}", f"{eval_s:.0f}", losses))
        print(
            f"seed {seed} | {label}: ITC rsum {itc['rsum']:.1f}, re-ranked rsum {rer['rsum']:.1f} "
            f"(fit {fit_s:.0f}s, eval {eval_s:.0f}s) {losses}",
            flush=True,
        )
        if label == FULL_ROW:
            full = m
    return results, timing, full, train, test


#: The two settings of ``--pretrain``: evaluated after pre-training alone, then after fine-tuning.
STAGES = ("zero-shot", "fine-tuned")


def run_seed_pretrain(seed, args, pre):
    """The paper's setting for one seed: each row pre-trained on ``pre``, evaluated zero-shot on the
    test split, then fine-tuned on the training split (the same Matcher, ``warm_start``) and evaluated
    again. Returns the per-label metrics, the timing rows, the full model's Figure 3 lines (taken
    zero-shot) and the splits."""
    train, test = load_benchmark(seed, args)
    image, text_model = backbones(args, seed, pre.captions)
    results, timing, figure = {}, [], None
    for label, flags, params in selected_rows(args):
        m = build_row(flags, params, args, seed, image, text_model, test)
        for stage, data, epochs in (
            (STAGES[0], pre, args.pretrain_epochs),
            (STAGES[1], train, args.epochs),
        ):
            m.set_params(epochs=epochs)
            t0 = time.perf_counter()
            m.fit(data, warm_start=stage == STAGES[1])
            fit_s = time.perf_counter() - t0
            itc, rer, eval_s = evaluate_both(m, test)
            itc["fit_s"] = rer["fit_s"] = fit_s
            results[f"{label}, {stage}, ITC ranking"] = itc
            results[f"{label}, {stage}, ITC top-{args.rerank_k} re-ranked by ITM"] = rer
            losses = _losses(m)
            what = "pre-training" if stage == STAGES[0] else "fine-tuning"
            timing.append(
                (f"seed {seed}: {label}, {what}", f"{fit_s:.0f}", f"{eval_s:.0f}", losses)
            )
            print(
                f"seed {seed} | {label} | {stage}: ITC rsum {itc['rsum']:.1f}, re-ranked rsum "
                f"{rer['rsum']:.1f} ({what} {fit_s:.0f}s, eval {eval_s:.0f}s) {losses}",
                flush=True,
            )
            if stage == STAGES[0] and label == FULL_ROW:
                figure = lexicon_predictions(m, test)
    return results, timing, figure, train, test


def encoder_sentence(args):
    """What the rows' encoders are, for the page."""
    if args.backbone == "synthetic":
        return (
            "the packaged synthetic-vit (4 blocks, width 64, 8 x 8-pixel patches; frozen, its projection trains) "
            "and synthetic-bert (2 layers, width 64; fine-tuned), pre-trained on the benchmark's pre-training split "
            "(imtm.weights)"
        )
    return f"a tiny ViT (2 layers, width {args.dim}) and a tiny BERT (2 layers) from scratch"


def recipe_sentence(args, epochs):
    """The training recipe every row shares, for the page (``epochs``: how long it trains)."""
    return (
        "when a lexicon loss is on, a second pass of the same ViT with 30% of the patches "
        "masked feeds the patch-to-lexicon head, while ITC, ITM and the transport cost see whole images, as "
        "evaluation does; a 1-layer cross-modal encoder, a 2-layer word-to-lexicon head, image-aware masked-LM in "
        "every row, Eq. 6 weights by the authors' rule (ALBEF.get_p2w_loss in model/model_pretrain.py of "
        f"Lydia-yang/ELA), batch {args.batch_size}, {epochs}, AdamW lr {args.lr}; lexicon KL direction "
        f"{args.kl_direction!r}"
    )


def command_line(args):
    """The command that regenerates the page."""
    cmd = (
        f"OMP_NUM_THREADS=1 python benchmarks/ela_ablation.py --epochs {args.epochs} --n-train {args.n_train} "
        f"--n-test {args.n_test} --image-size {args.image_size} --backbone {args.backbone} --seeds {args.seeds} "
        f"--rows {args.rows} --kl-direction {args.kl_direction}"
    )
    if args.pretrain:
        cmd += f" --pretrain {args.pretrain} --pretrain-epochs {args.pretrain_epochs}"
    if args.out != (PRETRAIN_PAGE if args.pretrain else PAGE):
        cmd += f" --out {args.out}"  # another page (a diagnostic): rerunning must not overwrite the default
    return cmd


def figure_lines(pred, found, when=""):
    """The Figure 3 section of a page (``when``: which state of the model, if not the last)."""
    return [
        f"## Lexicon predictions of the full model (Figure 3; the last seed{', ' + when if when else ''})",
        "",
        (
            "Top words of the patch-to-lexicon head for each quadrant of the patch grid. **Bold**: a word that "
            "no caption of the image uses. Special tokens and punctuation are left out."
        ),
        "",
        *pred,
        (
            f"Colour or shape words among these top words that no caption of the image uses: {found} "
            "(counted automatically)."
        ),
        "",
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--backbone", default="synthetic", choices=["synthetic", "scratch"])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rerank-k", type=int, default=8)
    p.add_argument("--patch-size", type=int, default=8, help="scratch ViT only")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", default="14", help="rows to train: 1-4 the ablation, 5-7 diagnostics")
    p.add_argument(
        "--kl-direction",
        default="prediction_first",
        choices=["prediction_first", "target_first"],
        help="order of the lexicon KL divergences of rows 2-4 and 7 (row 6 always target_first)",
    )
    p.add_argument(
        "--pretrain",
        type=int,
        default=0,
        metavar="N",
        help="the paper's setting: pre-train each row on N scenes of the pre-training split, evaluate "
        "zero-shot, then fine-tune on the training split and evaluate again (writes "
        f"{PRETRAIN_PAGE}); 0: fine-tune only (writes {PAGE})",
    )
    p.add_argument("--pretrain-epochs", type=int, default=1, help="epochs over the N scenes")
    p.add_argument(
        "--quick", action="store_true", help="a tiny smoke run (seconds); its numbers mean nothing"
    )
    p.add_argument(
        "--out", default=None, help=f"the page ({PAGE}, or {PRETRAIN_PAGE} with --pretrain)"
    )
    args = p.parse_args(argv)
    if args.pretrain < 0 or args.pretrain_epochs < 1:
        p.error(
            f"--pretrain must be 0 (off) or a number of scenes and --pretrain-epochs at least 1, "
            f"got {args.pretrain} and {args.pretrain_epochs}"
        )
    if args.quick:
        args.epochs, args.n_train, args.n_test, args.seeds, args.batch_size, args.dim = (
            1,
            16,
            8,
            "0",
            16,
            32,
        )
        args.pretrain, args.pretrain_epochs = min(args.pretrain, 16), 1
    if args.out is None:
        args.out = PRETRAIN_PAGE if args.pretrain else PAGE
    return args


PAGE = "docs/results/ela.md"
PRETRAIN_PAGE = "docs/results/ela_pretraining.md"


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    seeds = [int(k) for k in args.seeds.split(",")]
    lines = (pretrain_page if args.pretrain else finetune_page)(args, seeds, start)
    if args.quick:
        print("\n".join(lines))
        return
    write_page(args.out, lines)


def page_lines(title, intro, per_seed, timing, readings, note=None):
    """A results page: the title, the intro paragraphs, the seeded table, the timing table and the
    reading of each ``(row, against, label)`` of ``readings`` whose two rows were run."""
    lines = [title, ""]
    for block in intro:
        lines += [block, ""]
    lines += [*seeded_table(per_seed, extra=(("fit (s)", "fit_s", ".0f"),)), ""]
    if note:
        lines += [note, ""]
    lines += [
        *markdown_table(
            ["row", "fit (s)", "eval, both rankings (s)", "training losses, last epoch"],
            "lrrl",
            timing,
        ),
        "",
        "## Reading the table (written from the numbers above by the script)",
        "",
    ]
    for row, against, label in readings:
        if row in per_seed and against in per_seed:
            lines += [claim_reading(per_seed, row, against, label), ""]
    return lines


def run_seeds(seeds, run):
    """``run(seed)`` for every seed: the per-seed results by row, the timing rows, the last
    non-None third value (a model or a figure), and the last seed's train and test splits."""
    per_seed: dict[str, list] = {}
    timing, last = [], None
    for seed in seeds:
        res, tim, extra, train, test = run(seed)
        for label, r in res.items():
            per_seed.setdefault(label, []).append(r)
        timing += tim
        last = extra if extra is not None else last
    return per_seed, timing, last, train, test


def claim_readings(args, stages=(None,)):
    """``(ELA row, baseline row, label)`` of the claim for every stage and both rankings."""
    base, ela = ROWS[0][0], FULL_ROW
    readings = []
    for stage in stages:
        for rank in ("ITC ranking", f"ITC top-{args.rerank_k} re-ranked by ITM"):
            key = rank if stage is None else f"{stage}, {rank}"
            readings.append(
                (
                    f"{ela}, {key}",
                    f"{base}, {key}",
                    f"Lexicon alignment beats the ITC + ITM baseline ({key}):",
                )
            )
    return readings


def masking_readings(args):
    """``(baseline, masked baseline, label)`` of diagnostic row 5 for both rankings: what masking the
    patches every objective sees (one view) costs the ITC + ITM baseline."""
    base, masked = ROWS[0][0], EXTRA_ROWS[0][0]
    return [
        (
            f"{base}, {rank}",
            f"{masked}, {rank}",
            f"Whole images train the baseline better than 30%-masked ones, one view ({rank}):",
        )
        for rank in ("ITC ranking", f"ITC top-{args.rerank_k} re-ranked by ITM")
    ]


def finetune_page(args, seeds, start):
    """Table 6 rows fine-tuned from the packaged backbones: the lines of docs/results/ela.md."""
    per_seed, timing, full, train, test = run_seeds(seeds, lambda seed: run_seed(seed, args, None))
    intro = [
        (
            f"Generated by `{command_line(args)}` (synthetic pixel view, {args.image_size} x {args.image_size} images, "
            f"{train.n_images} training images x 5 captions, test {test.n_images} images x 5 captions, per seed). "
            f"Every row: {encoder_sentence(args)}; {recipe_sentence(args, f'{args.epochs} epochs')}. Each cell is the "
            f"mean +- standard deviation over seeds {args.seeds}. Run on 2 CPU "
            "cores shared with other jobs (OMP_NUM_THREADS=1), so the times are indicative only."
        ),
        (
            f"Each row is evaluated by the contrastive similarity alone and by two-stage retrieval (the matching "
            f"head re-ranking each query's top-{args.rerank_k}). Both rows fine-tune the same pre-trained backbones "
            "on the benchmark's training split. The paper's setting (ELA pre-training on a pre-training corpus, then "
            "zero-shot and fine-tuned retrieval) is run by `--pretrain N`: "
            "[ela_pretraining.md](ela_pretraining.md)."
        ),
    ]
    readings = claim_readings(args) + masking_readings(args)
    lines = page_lines(
        f"# ELA on the synthetic benchmark ({len(seeds)} seeds)", intro, per_seed, timing, readings
    )
    if full is not None:
        lines += figure_lines(*lexicon_predictions(full, test))
    return lines


def pretrain_page(args, seeds, start):
    """The paper's setting: the lines of docs/results/ela_pretraining.md."""
    pre = synthetic.load_pretraining(
        args.pretrain,
        view="pixels",
        image_size=args.image_size,
        exclude_seeds=seeds,
        benchmark_sizes={"n_train": args.n_train, "n_dev": N_DEV, "n_test": args.n_test},
    )
    per_seed, timing, figure, train, test = run_seeds(
        seeds, lambda seed: run_seed_pretrain(seed, args, pre)
    )
    wall = time.perf_counter() - start
    print(f"wall time {wall:.0f} s", flush=True)
    intro = [
        (
            f"Generated by `{command_line(args)}` in {wall / 60:.1f} minutes of wall time (all seeds, every "
            "row, both settings, data and evaluation included; 2 CPU cores shared with other jobs, "
            "OMP_NUM_THREADS=1, so the times are indicative only). ELA's setting: each row is first trained "
            f"with its own objectives on {pre.n_images} scenes x 5 captions of the benchmark's pre-training split "
            f"(`imtm.data.synthetic.load_pretraining`: {args.image_size} x {args.image_size} pixel images, every "
            f"scene of the train, dev and test splits of seeds {args.seeds} at these sizes excluded) for "
            f"{args.pretrain_epochs} epoch(s), evaluated **zero-shot** on the test split ({args.n_test} images x 5 "
            f"captions; no training on the benchmark's training split), then the same model is **fine-tuned** on "
            f"the training split ({args.n_train} images x 5 captions, {args.epochs} epochs: the budget of "
            f"[ela.md](ela.md)) and evaluated again."
        ),
        (
            f"Every row: {encoder_sentence(args)}; {recipe_sentence(args, f'{args.pretrain_epochs} + {args.epochs} epochs')}; a new optimizer for fine-tuning. "
            "The packaged backbones were themselves pre-trained on this split (3000 scenes, contrastive, "
            "per-patch attributes and masked-LM; `benchmarks/pretrain_synthetic.py`), so the scenes used here "
            "are not new to the encoders: what is new is the rows' own objectives (ITC + ITM + MLM, and the "
            "lexicon losses) on them. Each cell is the mean +- standard deviation over seeds "
            f"{args.seeds}; a seed fixes the initialisation of the new blocks, the order of the data and the "
            "masking, the same for both rows. Each model is evaluated by the contrastive similarity alone and by "
            f"two-stage retrieval (the matching head re-ranking each query's top-{args.rerank_k})."
        ),
    ]
    readings = claim_readings(args, STAGES)
    lines = page_lines(
        f"# ELA pre-trained on the pre-training split, zero-shot and fine-tuned ({len(seeds)} seeds)",
        intro,
        per_seed,
        timing,
        readings,
        note="fit (s): the training time of that setting (pre-training for zero-shot, fine-tuning for fine-tuned).",
    )
    if figure is not None:
        lines += figure_lines(*figure, "zero-shot, after pre-training")
    return lines


if __name__ == "__main__":
    main()
