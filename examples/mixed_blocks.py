"""Blocks of three papers in one model: LAPS patch slimming, CHAN hard assignment coding as its
alignment, and DIAS's dimension-alignment loss, on the pixels view of the built-in benchmark.

    python examples/mixed_blocks.py [--quick]

Nothing here is a preset: the list of blocks is the model. LAPS picks the patches each
caption points at and merges them; CHAN's coding scores the slimmed set (each word keeps
its best-matching token); DIAS aligns what each feature dimension means across the two
modalities, through mean-pooled embeddings that only the loss reads.
"""

import argparse
import math

from imtm import Matcher
from imtm.components import (
    DimensionAlignmentLoss,
    GRUTextEncoder,
    GumbelSelector,
    HardAssignmentCoding,
    MeanEmbedding,
    PatchScorer,
    PatchSlimming,
    RatioLoss,
    TimmVisionEncoder,
    TokenAggregation,
    TripletLoss,
)
from imtm.data import synthetic
from imtm.metrics import format_table


def components(train, dim, image_size, rho=0.5, lam=0.4):
    n_patches = (image_size // 8) ** 2
    n_kept = math.ceil(rho * n_patches)
    return [
        (
            "image",
            TimmVisionEncoder(
                "vit_tiny_patch16_224",
                out_dim=dim,
                img_size=image_size,
                model_kwargs={"depth": 2, "embed_dim": dim, "num_heads": 2, "patch_size": 8},
            ),
        ),
        ("text", GRUTextEncoder(vocab=train.vocab, out_dim=dim, word_dim=dim)),
        (
            "slim",
            PatchSlimming(
                PatchScorer(dim),
                GumbelSelector(ratio=rho),  # LAPS, Eq. 1-7
                TokenAggregation(dim, max(1, int(lam * n_kept))),
                alignment=HardAssignmentCoding(pooling="lse", temperature=0.1),
            ),
        ),  # CHAN
        ("loss", TripletLoss(margin=0.2, hardest=False)),
        ("ratio", RatioLoss(rho=rho)),  # LAPS, Eq. 10
        ("image_pool", MeanEmbedding(side="image")),
        ("text_pool", MeanEmbedding(side="text")),
        ("dim_loss", DimensionAlignmentLoss(weight=10.0)),  # DIAS, Eq. 4-6
    ]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a tiny run for smoke tests")
    args = p.parse_args(argv)
    image_size = 32 if args.quick else 64
    sizes = (
        {"n_train": 60, "n_dev": 10, "n_test": 20}
        if args.quick
        else {"n_train": 300, "n_dev": 20, "n_test": 150}
    )
    train, _, test = synthetic.load(view="pixels", seed=0, image_size=image_size, **sizes)
    m = Matcher(
        components(train, 32 if args.quick else 64, image_size),
        epochs=1 if args.quick else 4,
        batch_size=64,
        lr=1e-3,
        random_state=0,
        verbose=False,
    ).fit(train)
    losses = {k: round(v, 3) for k, v in m.history_[-1].items() if k.startswith("loss/")}
    print(f"last-epoch losses {losses}")
    results = {"LAPS slimming + CHAN coding + DIAS dimension alignment": m.evaluate(test)}
    print(format_table(results))
    return m, results


if __name__ == "__main__":
    main()
