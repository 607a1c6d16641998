"""LAPS (linguistic-aware patch slimming) on the pixels view of the built-in benchmark.

    python examples/laps_synthetic.py [--quick]

A small ViT trained from scratch (the paper fine-tunes a pretrained ViT-Base/16; pass
``pretrained=True`` or ``checkpoint_path=`` to ``presets.laps`` for real weights), a GRU
over the synthetic vocabulary, patch slimming that keeps half of the patches for each
caption and merges them into fewer tokens, the triplet loss and the ratio loss.
"""

import argparse

from imtm import Matcher, presets
from imtm.data import synthetic
from imtm.metrics import format_table


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a tiny run for smoke tests")
    args = p.parse_args(argv)
    sizes = (
        {"n_train": 60, "n_dev": 10, "n_test": 20, "image_size": 32}
        if args.quick
        else {"n_train": 300, "n_dev": 20, "n_test": 150, "image_size": 64}
    )
    train, _, test = synthetic.load(view="pixels", seed=0, **sizes)
    dim = 32 if args.quick else 64
    components = presets.laps(
        vocab=train.vocab,
        text="gru",
        model_name="vit_tiny_patch16_224",
        img_size=sizes["image_size"],
        embed_dim=dim,
        word_dim=dim,
        model_kwargs={"depth": 2, "embed_dim": dim, "num_heads": 2, "patch_size": 8},
    )
    m = Matcher(
        components,
        epochs=1 if args.quick else 4,
        batch_size=64,
        lr=1e-3,
        random_state=0,
        verbose=False,
    ).fit(train)
    results = {"LAPS": m.evaluate(test)}
    losses = {k: round(v, 3) for k, v in m.history_[-1].items() if k.startswith("loss/")}
    print(f"last-epoch losses {losses}")
    print(format_table(results))
    return m, results


if __name__ == "__main__":
    main()
