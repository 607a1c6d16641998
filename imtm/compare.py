"""A fair comparison harness: train several presets on the same data and budget, one results table.

The papers compare numbers copied from different codebases, trained on different
features with different budgets. :func:`compare` trains every named preset on the
same split of the same data, with the same batch size, learning rate, number of
epochs, embedding width and seed, and writes one table (R@1/5/10 both directions,
rSum, training time, scoring time per 1,000 pairs) as Markdown and CSV, plus a
recall@K plot when matplotlib is importable. ``imtm compare`` is its command line.

Region presets (``vsepp``, ``chan``, ``dcpa``, ``dias``) read precomputed region
features (the synthetic benchmark's ``regions`` view); pixel presets (``laps``,
``ela``, and ``vsepp-vit``, the global baseline on the same backbones) read the
``pixels`` view of the same scenes and captions (the same ``seed`` gives the same
scenes in both views): by default 64 x 64 images in 8 x 8 patches (64 patches, about
29% of them touched by an object), fine-tuning the packaged backbones pre-trained on
the benchmark's pre-training split (``"synthetic-vit"``, ``"synthetic-bert"``, see
:mod:`imtm.weights`), as the papers fine-tune ImageNet ViTs and BERT;
``backbones="scratch"`` trains a small ViT (and BERT) from scratch instead. The
table says which view and encoders each row used.
"""

from __future__ import annotations

import csv
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from numbers import Integral
from pathlib import Path
from typing import Any

from imtm._checks import suggest
from imtm.contract import Interval, check_value

__all__ = [
    "BACKBONES",
    "BASELINES",
    "COMPARE_PRESETS",
    "PIXEL_PRESETS",
    "CompareSettings",
    "baseline_reading",
    "compare",
    "load_splits",
    "make_matcher",
    "markdown_seed_table",
    "markdown_table",
    "mean_rows",
    "plot_recall",
    "write_results",
]

#: Presets :func:`compare` can train, and the view of the synthetic benchmark each reads.
COMPARE_PRESETS: dict[str, str] = {
    "vsepp": "regions",
    "chan": "regions",
    "dcpa": "regions",
    "dias": "regions",
    "laps": "pixels",
    "ela": "pixels",
    "vsepp-vit": "pixels",
}
#: Backbones of the pixel presets: the packaged pre-trained ones, or small ones from scratch.
BACKBONES = ("synthetic", "scratch")
PIXEL_PRESETS = tuple(k for k, v in COMPARE_PRESETS.items() if v == "pixels")

#: Recall columns of the table, in order.
RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


@dataclass
class CompareSettings:
    """The budget and sizes every preset of one comparison shares.

    Args:
        epochs: training epochs of every preset (DCPA: both stages together, the first half
            rounded up to stage 1, as ``imtm train`` does).
        batch_size, lr: the Matcher's batch size and AdamW learning rate, the same for all.
        embed_dim: joint embedding width of every preset; also the width of the pixel presets' ViT.
        word_dim: word-embedding width of the GRU text encoders.
        n_train, n_dev, n_test: synthetic split sizes (images; 5 captions each).
        image_size, patch_size, vit_depth: the pixels view; patch size and depth of the ViT
            trained from scratch (``backbones="scratch"``; the packaged ViT has 8 x 8 patches).
        backbones: ``"synthetic"``: the pixel presets start from the packaged pre-trained
            ``"synthetic-vit"`` (and ELA ``"synthetic-bert"``); ``"scratch"``: they train a
            ``vit_depth``-block ViT (and a 2-layer BERT) from scratch, as before.
        freeze_backbone: with ``backbones="synthetic"``, keep the pre-trained ViT frozen (its
            projection and everything after it train). Fine-tuning it at the shared ``lr``
            measured far worse at this budget (rSum 40.2 fine-tuned, 85.4 with the ViT at a
            tenth of ``lr``, 120.0 frozen: the global baseline, 300 training images, 2 epochs,
            100 test images, seed 0): the steps are too few to adapt it without forgetting. With
            the frozen ViT, LAPS and vsepp-vit sum the triplet loss over the negatives in every
            epoch: the switch to the hardest negative after the first epoch measured 39.2 against
            120.0 summed (same setting, frozen ViT).
        cache_backbone: with the ViT frozen, encode the train and test images with it once and
            train on its cached tokens through a :class:`~imtm.components.PrecomputedEncoder` (the
            same architecture: a linear projection of the frozen ViT's tokens). Off by default:
            ``Matcher.fit`` builds every block afresh from its parameters, so the projection starts
            from PrecomputedEncoder's Xavier initialisation instead of the encoder's (truncated
            normal, std 0.02), and that changes the result (``imtm compare --presets vsepp-vit,laps
            --epochs 2 --n-train 300 --n-test 100``, seed 0: vsepp-vit rSum 63.6 cached against
            117.6, laps 33.4 against 60.4) while saving little (67 s against 77 s in all: LAPS's
            pairwise scorer, not the ViT, dominates). Presets that mask patches inside the ViT
            (ELA's masked view) never use cached tokens.
        warmup_epochs: epochs in which every triplet loss sums over the negatives before it takes
            the hardest (``TripletLoss(warmup_epochs=...)``; DCPA keeps its own two per stage,
            :data:`imtm.presets.DCPA_WARMUP_EPOCHS`). 2, not the presets' 1 (VSE-infinity's, over
            epochs of 145,000 images): with the default budget (1,000 training images, 79 steps
            an epoch) CHAN collapsed after one epoch on two seeds of five (rSum 110.7 and 227.1 on
            seeds 2 and 3; the loss settled at the margin times the batch, every score alike), and
            with two it reached 460.6 and 464.7, while the other seeds moved by 2-5 (543.2, 526.3,
            523.3 with one epoch; 540.8, 523.6, 518.2 with two).
        seed: data, initialisation and data order.
    """

    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    embed_dim: int = 64
    word_dim: int = 64
    n_train: int = 1000
    n_dev: int = 20
    n_test: int = 200
    image_size: int = 64
    patch_size: int = 8
    vit_depth: int = 2
    backbones: str = "synthetic"
    freeze_backbone: bool = True
    cache_backbone: bool = False
    warmup_epochs: int = 2
    seed: int = 0


def _vit(s: CompareSettings) -> dict:
    heads = 2 if s.embed_dim % 2 == 0 else 1
    return {
        "depth": s.vit_depth,
        "embed_dim": s.embed_dim,
        "num_heads": heads,
        "patch_size": s.patch_size,
    }


def build_components(name: str, train, s: CompareSettings, workdir: Path) -> tuple[list, str]:
    """The blocks of preset ``name`` at the comparison's sizes, and a description of its encoders."""
    from imtm import presets

    if name in ("vsepp", "chan", "dcpa", "dias"):
        kw: dict[str, Any] = {"embed_dim": s.embed_dim, "word_dim": s.word_dim}
        if name == "dcpa":
            kw["heads"] = 2 if s.embed_dim % 2 == 0 else 1
        else:
            kw["warmup_epochs"] = s.warmup_epochs
        return presets.build(name, train, **kw), f"regions {train.region_dim}-d -> Linear; GRU"
    # The ViT follows the images' side (IMTM_SYNTHETIC may have changed the settings' image_size).
    size = int(train.images[0].shape[-1]) if name in PIXEL_PRESETS else s.image_size
    freeze = s.backbones == "synthetic" and s.freeze_backbone
    if s.backbones == "synthetic":
        vit = {"model_name": "synthetic-vit", "model_kwargs": None}
        vit_label = f"ViT synthetic-vit (pre-trained, {'frozen' if freeze else 'fine-tuned'})"
    else:
        vit = {"model_name": "vit_tiny_patch16_224", "model_kwargs": _vit(s)}
        vit_label = f"ViT ({s.vit_depth} blocks, scratch)"
    # Pixel presets share one text encoder, so that each is measured against the baseline on the same
    # encoders: with the packaged backbones it is synthetic-bert (the papers' BERT role, as in
    # `imtm train`), fine-tuned; from scratch, a GRU (LAPS, vsepp-vit) or a small BERT (ELA).
    if s.backbones == "synthetic":
        text_kw: dict[str, Any] = {"text": "bert", "text_model": "synthetic-bert"}
        text_label = "BERT synthetic-bert (pre-trained, fine-tuned)"
    else:
        text_kw, text_label = {"text": "gru", "vocab": train.vocab}, "GRU"
    if name == "vsepp-vit":
        from imtm.components import GlobalCosine, TimmVisionEncoder, TripletLoss

        comps = [
            (
                "image",
                TimmVisionEncoder(
                    vit["model_name"],
                    out_dim=s.embed_dim,
                    img_size=size,
                    model_kwargs=vit["model_kwargs"],
                    freeze=freeze,
                ),
            ),
            (
                "text",
                presets.text_encoder(
                    **text_kw, embed_dim=s.embed_dim, word_dim=s.word_dim, preset="vsepp-vit"
                ),
            ),
            ("scorer", GlobalCosine()),
            (
                "loss",
                TripletLoss(margin=0.2, hardest=not freeze, warmup_epochs=s.warmup_epochs),
            ),
        ]
        return comps, f"{vit_label}; {text_label}; mean-pooled cosine"
    if name == "laps":
        comps = presets.laps(
            **text_kw,
            warmup_epochs=s.warmup_epochs,
            model_name=vit["model_name"],
            img_size=size,
            embed_dim=s.embed_dim,
            word_dim=s.word_dim,
            model_kwargs=vit["model_kwargs"],
        )
        dict(comps)["image"].set_params(freeze=freeze)
        if freeze:
            dict(comps)["loss"].set_params(hardest=False)
        return comps, f"{vit_label}; {text_label}"
    if name == "ela":
        heads = 2 if s.embed_dim % 2 == 0 else 1
        if s.backbones == "synthetic":
            text_model = text_kw["text_model"]
        else:
            from imtm.components.encoders.hf_text import write_local_bert

            folder = workdir / "ela_text_model"
            if not (folder / "config.json").exists():
                write_local_bert(
                    folder,
                    train.captions,
                    hidden_size=s.embed_dim,
                    num_layers=2,
                    num_heads=heads,
                    seed=s.seed,
                )
            text_model, text_label = str(folder), "BERT (2 layers, scratch)"
        comps = presets.ela(
            text_model=text_model,
            image_model=vit["model_name"],
            img_size=size,
            embed_dim=s.embed_dim,
            model_kwargs=vit["model_kwargs"],
            heads=heads,
            cross_layers=1,
            w2l_layers=1,
            rerank_k=8,
        )
        dict(comps)["image"].set_params(freeze=freeze)
        return comps, f"{vit_label}; {text_label}"
    raise ValueError(
        f"compare: unknown preset {name!r}; choose from {sorted(COMPARE_PRESETS)}."
        + suggest(name, COMPARE_PRESETS)
    )


def cacheable_encoder(comps: list) -> bool:
    """Whether the ``image`` block of ``comps`` is a frozen timm encoder whose outputs can be cached.

    True when it is a :class:`~imtm.components.TimmVisionEncoder` with ``freeze=True`` that masks
    no patch (``mask_ratio == 0``) and no other block reuses it (ELA's masked view runs it again
    on masked patches).
    """
    from imtm.components import TimmVisionEncoder

    blocks = dict(comps)
    enc = blocks.get("image")
    if not isinstance(enc, TimmVisionEncoder) or not enc.freeze or enc.mask_ratio > 0:
        return False
    from imtm.component import LinkedComponent

    return not any(
        isinstance(b, LinkedComponent) and getattr(b, b._target_param, None) in ("image", enc)
        for n, b in comps
        if n != "image"
    )


def encode_frozen(encoder, images, batch_size: int = 256):
    """The frozen backbone's tokens of ``images``, before ``encoder``'s projection, once.

    Args:
        encoder: a frozen :class:`~imtm.components.TimmVisionEncoder`.
        images: pixels ``(n, 3, H, W)`` (or a sequence of ``(3, H, W)`` tensors).
        batch_size: images per forward pass.

    Returns:
        :class:`~imtm.data.TokenImages`: one Tokens ``(1, N, D)`` item per image, with the
        patch grid and the prefix-token count of ``encoder``'s output.

    Shape:
        - images: ``(n, 3, H, W)``
        - output: ``n`` items of Tokens ``(1, N, D)`` (``D``: the backbone's width)
    """
    import torch

    from imtm.data.extracted import TokenImages

    proj, was_training = encoder.proj, encoder.training
    encoder.proj = (
        None  # the backbone's tokens; the projection trains, so it stays out of the cache
    )
    encoder.eval()
    try:
        feats, grid, prefix = [], None, 0
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                x = chunk if isinstance(chunk, torch.Tensor) else torch.stack(list(chunk))
                tokens, _ = encoder(x)
                feats.append(tokens.feats.float())
                grid, prefix = tokens.grid, tokens.num_prefix_tokens
    finally:
        encoder.proj = proj
        encoder.train(was_training)
    return TokenImages(torch.cat(feats), grid, prefix)


def cached_image_block(encoder):
    """A :class:`~imtm.components.PrecomputedEncoder` holding ``encoder``'s projection weights.

    On the tokens of :func:`encode_frozen` it computes what ``encoder`` computes on the pixels.
    ``Matcher.fit`` builds its blocks afresh from their parameters, so a fitted copy starts from
    PrecomputedEncoder's own initialisation, not from these weights.
    """
    import torch

    from imtm.components import PrecomputedEncoder

    proj = encoder.proj
    block = PrecomputedEncoder(in_dim=proj.in_features, out_dim=proj.out_features)
    with torch.no_grad():
        block.mlp[0].weight.copy_(proj.weight)
        block.mlp[0].bias.copy_(proj.bias)
    return block


def _with_images(data, images):
    """``data`` with its images replaced by cached tokens (:class:`~imtm.data.TokenImages`)."""
    from imtm.data import ImageCaptionDataset

    class CachedTokensDataset(ImageCaptionDataset):
        def fingerprint(self) -> str:
            import hashlib

            h = hashlib.sha256(data.fingerprint().encode())
            h.update(images.rows[:: max(1, len(images) // 3)].contiguous().numpy().tobytes())
            return h.hexdigest()[:16]

    return CachedTokensDataset(
        images, data.captions, data.caption_to_image, vocab=data.vocab, name=f"{data.name}-cached"
    )


def load_splits(data: str, view: str, s: CompareSettings, format: str | None = None):
    """The ``(train, dev, test)`` splits :func:`compare` trains and tests on, for one view and seed."""
    from imtm.data import load_dataset

    if data == "synthetic":
        return load_dataset(
            "synthetic",
            view=view,
            seed=s.seed,
            sizes={
                "n_train": s.n_train,
                "n_dev": s.n_dev,
                "n_test": s.n_test,
                "image_size": s.image_size,
            },
        )
    if view == "pixels":
        raise ValueError(
            f"compare: presets {', '.join(PIXEL_PRESETS)} train on pixels; --data {data!r} is a "
            "folder of precomputed region features. Leave them out of --presets or use "
            "--data synthetic."
        )
    return load_dataset(data, format or "precomp", seed=s.seed)


def make_matcher(name: str, comps: list, s: CompareSettings, test=None):
    """The (unfitted) :class:`~imtm.Matcher` :func:`compare` trains for preset ``name``'s blocks ``comps``.

    Every preset gets the settings' epochs (DCPA's split into its two stages), batch size, learning
    rate and seed; with ``test`` given, pairwise blocks score the whole test split in one block.
    """
    from imtm import presets
    from imtm.matcher import Matcher

    blocks = (
        {} if test is None else {"image_block": len(test.images), "text_block": len(test.captions)}
    )
    return Matcher(
        comps,
        epochs=s.epochs,
        stages=presets.default_stages(name, s.epochs),
        batch_size=s.batch_size,
        lr=s.lr,
        random_state=s.seed,
        verbose=False,
        **blocks,
    )


def compare(
    preset_names,
    *,
    data: str = "synthetic",
    settings: CompareSettings | None = None,
    out: str | Path | None = None,
    verbose: bool = True,
    seeds=None,
) -> list[dict]:
    """Train each preset on the same data and budget; evaluate all on the same test split.

    Args:
        preset_names: names from :data:`COMPARE_PRESETS` (a list, or a comma-separated string).
        data: ``"synthetic"`` (the built-in benchmark) or a folder in the SCAN precomputed
            layout (region presets only).
        settings: the shared budget (:class:`CompareSettings`; default sizes when ``None``).
        out: folder for ``compare.md``, ``compare.csv`` and ``compare_recall.png`` (``None``: no files).
        verbose: print one line per preset as it finishes.
        seeds: several seeds (e.g. ``[0, 1, 2]``): the whole comparison runs once per seed (data,
            initialisation and order follow the seed, as ``settings.seed`` does), the rows of every
            seed are returned, and the page gives each number as the mean +- standard deviation
            over the seeds, each preset's rSum per seed, and its difference from the global
            baseline per seed. ``None``: ``settings.seed`` alone.

    Returns:
        One dict per preset (and per seed): ``preset``, ``seed``, ``view``, ``encoders``, the six recalls, ``rsum``,
        ``train_s`` (fit wall time), ``score_ms_per_1k_pairs`` (wall time of
        ``Matcher.similarity`` on the test split, encoding included, per 1,000 image-caption
        pairs), ``n_test_images``, ``n_test_captions``, ``backbone_cached`` (whether the row
        trained on cached frozen-ViT tokens, :attr:`CompareSettings.cache_backbone`) and
        ``cache_s`` (the wall time of encoding them, paid by the first row that needs them).

    Example:
        >>> rows = compare("vsepp", settings=CompareSettings(epochs=1, n_train=40, n_test=20),
        ...                verbose=False)  # doctest: +SKIP
        >>> sorted(rows[0])[:3]  # doctest: +SKIP
        ['encoders', 'i2t_r1', 'i2t_r10']
    """
    import torch

    from imtm.metrics import retrieval_metrics

    s = settings or CompareSettings()
    names = (
        [n.strip() for n in preset_names.split(",")]
        if isinstance(preset_names, str)
        else list(preset_names)
    )
    names = [n for n in names if n]
    if not names:
        raise ValueError("compare: no presets given; e.g. 'chan,vsepp'")
    for n in names:
        if n not in COMPARE_PRESETS:
            raise ValueError(
                f"compare: unknown preset {n!r}; choose from {sorted(COMPARE_PRESETS)}."
                + suggest(n, COMPARE_PRESETS)
            )
    check_value(
        s.warmup_epochs,
        [Interval(Integral, 0, None, closed="left")],
        name="warmup_epochs",
        where="compare",
    )
    if s.epochs < 1:
        raise ValueError(f"compare: epochs must be at least 1, got {s.epochs}")
    if s.backbones not in BACKBONES:
        raise ValueError(
            f"compare: backbones must be one of {list(BACKBONES)}, got {s.backbones!r}."
            + suggest(str(s.backbones), BACKBONES)
        )
    if "dcpa" in names and s.epochs < 2:
        raise ValueError("compare: DCPA trains in two stages and needs epochs >= 2 (one per stage)")
    if seeds is not None:
        seeds = _check_seeds(seeds)
        rows = []
        for seed in seeds:
            if verbose:
                print(f"seed {seed}:", flush=True)
            rows += compare(names, data=data, settings=replace(s, seed=seed), verbose=verbose)
        if out is not None:
            write_results(rows, out, s, data=data, names=names)
        return rows
    splits: dict[str, tuple] = {}
    cache: dict[tuple, tuple] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="imtm_compare_") as tmp:
        for name in names:
            view = COMPARE_PRESETS[name]
            if view not in splits:
                splits[view] = load_splits(data, view, s)
            train, _, test = splits[view]
            comps, encoders = build_components(name, train, s, Path(tmp))
            cache_s, cached = 0.0, False
            if s.cache_backbone and cacheable_encoder(comps):
                enc = dict(comps)["image"]
                key = (view, enc.model_name, enc.img_size)
                t0 = time.perf_counter()
                if key not in cache:
                    cache[key] = (
                        _with_images(train, encode_frozen(enc, train.images)),
                        _with_images(test, encode_frozen(enc, test.images)),
                    )
                cache_s = time.perf_counter() - t0
                train, test = cache[key]
                cached = True
                comps = [(n, cached_image_block(b) if n == "image" else b) for n, b in comps]
            m = make_matcher(name, comps, s, test)
            t0 = time.perf_counter()
            m.fit(train)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():
                sims = m.similarity(test.images, test.captions)
            score_s = time.perf_counter() - t0
            n_pairs = len(test.images) * len(test.captions)
            res = retrieval_metrics(sims, test.caption_to_image)
            row = {
                "preset": name,
                "seed": s.seed,
                "view": view,
                "encoders": encoders,
                **{k: float(res[k]) for k in RECALL_KEYS},
                "rsum": float(res["rsum"]),
                "train_s": train_s,
                "backbone_cached": cached,
                "cache_s": cache_s,
                "score_ms_per_1k_pairs": 1e6 * score_s / n_pairs,
                "n_test_images": len(test.images),
                "n_test_captions": len(test.captions),
            }
            rows.append(row)
            if verbose:
                print(
                    f"{name} ({view}): rSum {row['rsum']:.1f}, trained in {train_s:.1f}s, "
                    f"{row['score_ms_per_1k_pairs']:.2f} ms per 1,000 pairs",
                    flush=True,
                )
    if out is not None:
        write_results(rows, out, s, data=data, names=names)
    return rows


def _epochs_words(n: int) -> str:
    """``"epoch"``, ``"two epochs"``... for the page's sentence on the warm-up."""
    return "epoch" if n == 1 else f"{ {2: 'two', 3: 'three'}.get(n, str(n)) } epochs"


def _check_seeds(seeds) -> list[int]:
    """``seeds`` as a list of distinct ints (a list, or a comma-separated string such as ``"0,1,2"``)."""
    if isinstance(seeds, str):
        try:
            seeds = [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"compare: seeds must be integers separated by commas (e.g. '0,1,2'), got {seeds!r}"
            ) from None
    seeds = list(seeds)
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise ValueError(f"compare: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"compare: seeds must be distinct, got {seeds!r}")
    return seeds


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _by_preset(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of each preset (in the order presets first appear), one per seed."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["preset"], []).append(r)
    return out


def mean_rows(rows: list[dict]) -> list[dict]:
    """One row per preset with every number averaged over its seeds (``rsum_std`` and ``seeds`` added).

    Example:
        >>> rows = [{"preset": "vsepp", "seed": s, "view": "regions", "encoders": "e", "rsum": v}
        ...         for s, v in ((0, 200.0), (1, 210.0))]
        >>> [(r["preset"], r["rsum"], round(r["rsum_std"], 2), r["seeds"]) for r in mean_rows(rows)]
        [('vsepp', 205.0, 7.07, [0, 1])]
    """
    out = []
    for group in _by_preset(rows).values():
        row = dict(group[0])
        for k, v in group[0].items():
            if isinstance(v, float):
                row[k] = statistics.fmean(float(g[k]) for g in group)
        row["rsum_std"] = _mean_std([float(g["rsum"]) for g in group])[1]
        row["seeds"] = [g.get("seed") for g in group]
        out.append(row)
    return out


def markdown_seed_table(rows: list[dict]) -> str:
    """The results over several seeds: each recall and rSum as mean +- std, and rSum per seed."""
    by = _by_preset(rows)
    seeds = [g.get("seed") for g in next(iter(by.values()))] if by else []
    head = (
        "| preset | view | encoders | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 "
        "| rSum | "
        + " | ".join(f"rSum seed {x}" for x in seeds)
        + " | train (s) | scoring (ms / 1k pairs) |"
    )
    lines = [head, "| --- | --- | --- |" + " ---: |" * (9 + len(seeds))]
    for name, group in by.items():
        cells = [name, group[0]["view"], group[0]["encoders"]]
        for k in (*RECALL_KEYS, "rsum"):
            m, sd = _mean_std([float(g[k]) for g in group])
            cells.append(f"{m:.1f} +- {sd:.1f}")
        cells += [f"{float(g['rsum']):.1f}" for g in group]
        cells.append(f"{statistics.fmean(float(g['train_s']) for g in group):.1f}")
        cells.append(f"{statistics.fmean(float(g['score_ms_per_1k_pairs']) for g in group):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """The results as one Markdown table (one row per preset)."""
    head = (
        "| preset | view | encoders | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rSum "
        "| train (s) | scoring (ms / 1k pairs) |"
    )
    lines = [head, "| --- | --- | --- |" + " ---: |" * 9]
    for r in rows:
        cells = [
            r["preset"],
            r["view"],
            r["encoders"],
            *(f"{r[k]:.1f}" for k in RECALL_KEYS),
            f"{r['rsum']:.1f}",
            f"{r['train_s']:.1f}",
            f"{r['score_ms_per_1k_pairs']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The global baseline of each view: the same encoders as that view's presets, mean-pooled cosine.
BASELINES = {"regions": "vsepp", "pixels": "vsepp-vit"}


def baseline_reading(rows: list[dict]) -> list[str]:
    """One line per preset: its rSum against the global baseline of its view (when that baseline ran).

    Example:
        >>> rows = [{"preset": "vsepp", "view": "regions", "rsum": 200.0},
        ...         {"preset": "chan", "view": "regions", "rsum": 250.0}]
        >>> baseline_reading(rows)
        ['- chan: rSum 250.0 against vsepp 200.0 (+50.0): above the global baseline.']
    """
    if len({r.get("seed") for r in rows}) > 1:
        return _baseline_reading_over_seeds(rows)
    by_name = {r["preset"]: r for r in rows}
    lines = []
    for r in rows:
        base = BASELINES.get(r["view"])
        if base is None or r["preset"] == base or base not in by_name:
            continue
        d = r["rsum"] - by_name[base]["rsum"]
        differ = _encoders_differ(r, by_name[base])
        lines.append(
            f"- {r['preset']}: rSum {r['rsum']:.1f} against {base} {by_name[base]['rsum']:.1f} ({d:+.1f}): "
            + ("above" if d > 0 else "not above")
            + f" the global baseline{differ}."
        )
    return lines


def _encoders_differ(row: dict, base: dict) -> str:
    """The reading's note when ``row`` and its baseline ``base`` ran on other image / text encoders ("" if not)."""
    mine, theirs = (
        [part.strip() for part in x.get("encoders", "").split(";")[:2]] for x in (row, base)
    )
    return f" (the encoders differ: {'; '.join(mine)} here)" if mine != theirs else ""


def _baseline_reading_over_seeds(rows: list[dict]) -> list[str]:
    """:func:`baseline_reading` over several seeds: each seed's difference, their mean +- std."""
    by = _by_preset(rows)
    lines = []
    for name, group in by.items():
        base = BASELINES.get(group[0]["view"])
        if base is None or name == base or base not in by:
            continue
        theirs = {g.get("seed"): float(g["rsum"]) for g in by[base]}
        pairs = [(g.get("seed"), float(g["rsum"])) for g in group if g.get("seed") in theirs]
        diffs = [mine - theirs[seed] for seed, mine in pairs]
        if not diffs:
            continue
        (m, sd), (bm, bsd) = _mean_std([v for _, v in pairs]), _mean_std(list(theirs.values()))
        dm, dsd = _mean_std(diffs)
        above = sum(d > 0 for d in diffs)
        differ = _encoders_differ(group[0], by[base][0])
        verdict = (
            "above the global baseline on every seed"
            if above == len(diffs)
            else f"above the global baseline on {above} of {len(diffs)} seeds"
            if above
            else "not above the global baseline on any seed"
        )
        lines.append(
            f"- {name}: rSum {m:.1f} +- {sd:.1f} against {base} {bm:.1f} +- {bsd:.1f}; difference per "
            f"seed {', '.join(f'{d:+.1f}' for d in diffs)} ({dm:+.1f} +- {dsd:.1f}): {verdict}{differ}."
        )
    return lines


def _cache_sentence(rows: list[dict]) -> str:
    """The sentence of the results page that says which rows trained on cached frozen-ViT tokens."""
    cached = [r["preset"] for r in rows if r.get("backbone_cached")]
    if not cached:
        return ""
    seconds = sum(float(r.get("cache_s", 0.0)) for r in rows)
    return (
        f"With --backbone-cache the frozen ViT encoded the train and test images once ({seconds:.1f} s) and "
        f"{', '.join(cached)} trained and scored on those cached tokens through a linear projection "
        "(PrecomputedEncoder, initialised by its own rule, so not the same start as the encoder's "
        "projection), so their training and scoring times leave the frozen ViT's forward pass out; "
        "rows that mask patches inside the ViT (ELA) run it in every step. "
    )


def write_results(
    rows: list[dict],
    out: str | Path,
    settings: CompareSettings,
    *,
    data: str = "synthetic",
    names=None,
) -> dict[str, Path]:
    """Write ``compare.md``, ``compare.csv`` and (with matplotlib) ``compare_recall.png`` into ``out``.

    Returns the paths written, by kind (``"markdown"``, ``"csv"``, ``"plot"``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = settings
    names = names or [r["preset"] for r in rows]
    n_img, n_cap = (rows[0]["n_test_images"], rows[0]["n_test_captions"]) if rows else (0, 0)
    patch = 8 if s.backbones == "synthetic" else s.patch_size
    seeds = list(dict.fromkeys(r.get("seed", s.seed) for r in rows)) or [s.seed]
    several = len(seeds) > 1
    seed_flag = f"--seeds {','.join(map(str, seeds))}" if several else f"--seed {seeds[0]}"
    command = (
        f"imtm compare --presets {','.join(names)} --data {data} --epochs {s.epochs} "
        f"--n-train {s.n_train} --n-test {s.n_test} --batch-size {s.batch_size} --lr {s.lr} "
        f"--embed-dim {s.embed_dim} --image-size {s.image_size} --backbones {s.backbones} "
        f"--warmup-epochs {s.warmup_epochs} {seed_flag}"
    )
    seed_words = (
        f"seeds {', '.join(map(str, seeds))}: each seed draws its own scenes, initialisation and order; "
        "every number is the mean +- standard deviation over the seeds"
        if several
        else f"seed {seeds[0]}"
    )
    text = [
        "# Presets compared on one budget",
        "",
        (
            f"Generated by `{command}` (never typed by hand). Every row: the same training split "
            f"({s.n_train} images x 5 captions of the {data} data, {seed_words}), {s.epochs} epochs, batch "
            f"{s.batch_size}, AdamW at lr {s.lr}, embedding width {s.embed_dim}, triplet losses "
            + (
                f"summed over negatives for the first {_epochs_words(s.warmup_epochs)} and on the hardest "
                "negative after "
                if s.warmup_epochs > 0
                else "on the hardest negative from the first step "
            )
            + f"(DCPA: summed for the first two epochs of each stage), tested on {n_img} images x {n_cap} "
            "captions. Region presets read the regions view; "
            + (
                "pixel presets (LAPS, ELA, and vsepp-vit, the global baseline on their backbones) fine-tune the "
                "packaged backbones pre-trained on the benchmark's pre-training split (synthetic-vit: 4 blocks, width 64, "
                "8x8 patches, kept frozen unless --fine-tune-backbone, and then LAPS and vsepp-vit sum the triplet loss "
                "over the negatives in every epoch; synthetic-bert: 2 layers, width 64, fine-tuned; see imtm.weights) on "
                "the pixels view of the same scenes "
                if s.backbones == "synthetic"
                else "pixel presets (LAPS, ELA, vsepp-vit) train a ViT from scratch on the pixels view of the same scenes "
            )
            + f"({s.image_size}x{s.image_size} pixels, {(s.image_size // patch) ** 2} patches of {patch}x{patch}). "
            + _cache_sentence(rows)
            + "DCPA splits its "
            "epochs between its two stages. Scoring time: `Matcher.similarity` over the whole test split "
            "(encoding included) per 1,000 image-caption pairs, on this machine."
        ),
        "",
        markdown_seed_table(rows) if several else markdown_table(rows),
        "",
    ]
    reading = baseline_reading(rows)
    if reading:
        text += [
            "## Against the global baseline on the same encoders (written from the table)",
            "",
            *reading,
            "",
        ]
    paths = {"markdown": out / "compare.md", "csv": out / "compare.csv"}
    with open(paths["csv"], "w", newline="") as f:
        fields = [
            "preset",
            "seed",
            "view",
            "encoders",
            *RECALL_KEYS,
            "rsum",
            "train_s",
            "score_ms_per_1k_pairs",
            "n_test_images",
            "n_test_captions",
            "backbone_cached",
            "cache_s",
        ]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in r.items()
                    if k in fields
                }
            )
    plot = plot_recall(mean_rows(rows) if several else rows, out / "compare_recall.png")
    if plot is not None:
        paths["plot"] = plot
        what = "mean recall@K over the seeds" if several else "recall@K"
        text += [f"![{what} of every preset](compare_recall.png)", ""]
    paths["markdown"].write_text("\n".join(text))
    return paths


def plot_recall(rows: list[dict], path: str | Path) -> Path | None:
    """Recall@K (K = 1, 5, 10) of every row, both directions side by side, saved as PNG.

    Returns the path, or ``None`` when matplotlib is not installed (``pip install "imtm[viz]"``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ks = [1, 5, 10]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, side, title in zip(axes, ("i2t", "t2i"), ("image -> text", "text -> image")):
        for r in rows:
            ax.plot(
                ks,
                [r[f"{side}_r{k}"] for k in ks],
                marker="o",
                label=f"{r['preset']} ({r['view']})",
            )
        ax.set_xticks(ks)
        ax.set_xlabel("K")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=min(len(rows), 3), fontsize=8, frameon=False
    )
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(rows) / 3) + 0.02, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
