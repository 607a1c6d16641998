"""Two-stage retrieval: a cheap global ranking picks k candidates per query, CHAN's fine-grained
scorer re-ranks them (imtm.retrieval.TwoStageRetriever).

    python examples/two_stage_retrieval.py [--quick]

Trains CHAN on the built-in benchmark, indexes the test images once (stage-1 embeddings
and the tokens the scorer reads, saved to disk and opened memory-mapped), then searches
with every test caption and compares R@1 with full all-pairs scoring.
"""

import argparse
import tempfile

import torch

from imtm import Matcher, presets
from imtm.data import synthetic
from imtm.retrieval import TwoStageRetriever


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="a tiny run for smoke tests")
    p.add_argument("--k", type=int, default=10, help="stage-1 candidates per query")
    args = p.parse_args(argv)
    sizes = (
        {"n_train": 120, "n_dev": 10, "n_test": 40}
        if args.quick
        else {"n_train": 2000, "n_dev": 50, "n_test": 1000}
    )
    train, _, test = synthetic.load(view="regions", seed=0, **sizes)
    dim = 32 if args.quick else 128
    m = Matcher(
        presets.build("chan", train, embed_dim=dim, word_dim=dim),
        epochs=1 if args.quick else 4,
        batch_size=64 if args.quick else 128,
        lr=2e-3,
        random_state=0,
        verbose=False,
    ).fit(train)
    retriever = TwoStageRetriever(m, k=args.k).fit(images=test.images)
    with tempfile.TemporaryDirectory() as tmp:
        retriever.save(tmp)
        retriever = TwoStageRetriever.load(tmp, m)  # the gallery, memory-mapped
        found = retriever.text_to_image(test.captions, top=5)
    truth = torch.as_tensor(test.caption_to_image)
    two_stage_r1 = 100 * (found.indices[:, 0] == truth).float().mean().item()
    in_candidates = 100 * (found.candidates == truth[:, None]).any(1).float().mean().item()
    full = m.similarity(test.images, test.captions)  # (images, captions), every pair
    full_r1 = 100 * (full.argmax(0) == truth).float().mean().item()
    print(
        f"{len(test.captions)} caption queries over {len(test.images)} images, k = {args.k}: "
        f"target among the candidates {in_candidates:.1f}%, two-stage R@1 {two_stage_r1:.1f}, "
        f"full scoring R@1 {full_r1:.1f}"
    )
    return found, two_stage_r1, full_r1


if __name__ == "__main__":
    main()
