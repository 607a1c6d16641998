"""ELA (expansive lexicon-patch alignment) on the pixels view of the built-in benchmark.

    python examples/ela_synthetic.py [--quick]

A small ViT and a small BERT, both trained from scratch (no download: the BERT is written
locally with the synthetic captions' vocabulary; give ``presets.ela`` a hub name or
``"minilm"`` for real weights), trained with contrastive, matching, masked-LM, lexicon
and distillation objectives; the matching head re-ranks each query's top-k.
"""

import argparse
import tempfile

from imtm import Matcher, presets
from imtm.components.encoders.hf_text import write_local_bert
from imtm.data import synthetic
from imtm.metrics import format_table


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a tiny run for smoke tests")
    args = p.parse_args(argv)
    sizes = (
        {"n_train": 40, "n_dev": 5, "n_test": 20}
        if args.quick
        else {"n_train": 1500, "n_dev": 10, "n_test": 300}
    )
    train, _, test = synthetic.load(view="pixels", seed=0, image_size=32, **sizes)
    dim = 32 if args.quick else 64
    with tempfile.TemporaryDirectory() as tmp:
        text_model = write_local_bert(
            tmp, train.captions, hidden_size=dim, num_layers=2, num_heads=2, seed=0
        )
        components = presets.ela(
            text_model=str(text_model),
            image_model="vit_tiny_patch16_224",
            img_size=32,
            embed_dim=dim,
            heads=2,
            cross_layers=1,
            w2l_layers=1,
            rerank_k=8,
            model_kwargs={"depth": 2, "embed_dim": dim, "num_heads": 2, "patch_size": 8},
        )
        m = Matcher(
            components,
            epochs=1 if args.quick else 2,
            batch_size=32 if args.quick else 64,
            lr=1e-3,
            random_state=0,
            verbose=False,
            image_block=len(test.images),
            text_block=len(test.captions),
        )
        m.fit(train)
    losses = {k: round(v, 3) for k, v in m.history_[-1].items() if k.startswith("loss/")}
    print(f"last-epoch losses {losses}")
    results = {"ELA (ITC top-8 re-ranked by ITM)": m.evaluate(test)}
    print(format_table(results))
    return m, results


if __name__ == "__main__":
    main()
