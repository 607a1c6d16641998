"""What the backbones cost: TimmVisionEncoder (ViT-B/16 at 224) and HFTextEncoder (BERT-base) on CPU.

Not part of the test suite. Random initialisation (the speed does not depend on
the weights), autograd off, eval mode, one process, fixed seeds. Every
comparison is measured side by side in this run:

  (a) TimmVisionEncoder("vit_base_patch16_224"): images/s for one batch, against a
      plain per-image loop over the same images (batch 1), and the achieved GFLOP/s
      on the model's matrix-product FLOPs against the roofline, a torch.mm of the
      MLP's shape ((B*197, 768) x (768, 3072)), all three taking turns;
  (b) HFTextEncoder on a BERT-base configuration (12 layers, width 768, the
      bert-base-uncased vocabulary when the packaged MiniLM provides it), built from a
      config without download: captions/s for one batch of real Flickr30K test
      captions (synthetic captions when ../shared/data/captions is absent), run in
      length-sorted chunks (the default), against one batch padded to its longest
      caption and a per-caption loop, and GFLOP/s against the torch.mm roofline;
  (c) CHAN's HardAssignmentCoding over the same batch: the encoded image tokens
      (B x 197 x 768) against the encoded caption tokens, all B x B_t pairs, and the
      same images against 1,000 captions, so the cost of encoding sits next to the
      cost of scoring.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_encoders.py            # B = 8 images, 64 captions
    OMP_NUM_THREADS=1 python benchmarks/bench_encoders.py --quick    # B = 2 images, 8 captions
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from imtm.components import HardAssignmentCoding, HFTextEncoder, TimmVisionEncoder
from imtm.components.encoders.hf_text import CHUNK_TOKENS
from imtm.tokens import Tokens

CAPTIONS = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "captions"
    / "f30k"
    / "test_caps.txt"
)


def side_by_side(fns: dict, repeat: int) -> dict:
    """Median seconds per call of each function, measured in turns (one call of each per round).

    Taking turns, rather than timing one function and then the next, lets every
    method see the same load of a shared machine; one warm-up call each first.
    """
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul(rows: int, inner: int, cols: int):
    """A float32 torch.mm of this shape (the roofline: the best a dense layer of that shape does here)."""
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    return lambda: torch.mm(a, b), 2.0 * rows * inner * cols


def transformer_matmul_flops(tokens: int, width: int, mlp: int, layers: int, seq: int) -> float:
    """FLOPs of a transformer encoder's matrix products for ``tokens`` tokens in sequences of ``seq``.

    Per layer and token: q, k, v and output projections (4 width^2), the MLP
    (2 width mlp) and attention (2 seq width: scores and weighted sum); 2 FLOPs per
    multiply-add. Norms, softmax and GELU are not counted.
    """
    per_token = layers * (4 * width * width + 2 * width * mlp + 2 * seq * width)
    return 2.0 * tokens * per_token


def caption_list(n: int) -> tuple[list[str], str]:
    if CAPTIONS.is_file():
        lines = [c.strip() for c in CAPTIONS.read_text(encoding="utf-8").splitlines() if c.strip()]
        return (lines * (n // len(lines) + 1))[:n], "Flickr30K test"
    from imtm.data import synthetic

    train, _, _ = synthetic.load(view="regions", seed=0, n_train=max(n, 40), n_dev=4, n_test=4)
    return list(train.captions[:n]), "synthetic"


def bert_base_folder(folder: Path, captions: list[str]) -> tuple[Path, str]:
    """A random BERT-base (bert-base-uncased shape) folder, written locally: no download."""
    from transformers import BertConfig, BertModel

    try:
        from imtm.components.encoders.hf_text import minilm_path

        src = Path(minilm_path())
        vocab_src = "bert-base-uncased vocabulary (from the packaged MiniLM)"
        for name in (
            "vocab.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "tokenizer.json",
        ):
            if (src / name).is_file():
                (folder / name).write_bytes((src / name).read_bytes())
        vocab_size = len((folder / "vocab.txt").read_text(encoding="utf-8").splitlines())
    except ImportError:
        from imtm.components.encoders import write_local_bert

        write_local_bert(
            folder, captions, hidden_size=32, num_layers=1, num_heads=1
        )  # vocabulary only
        vocab_src = "the captions' words (imtm[minilm] not installed)"
        vocab_size = len((folder / "vocab.txt").read_text(encoding="utf-8").splitlines())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=vocab_size)).save_pretrained(
        str(folder), safe_serialization=True
    )
    return folder, vocab_src


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny batches, one repeat (a smoke run)")
    ap.add_argument(
        "--images", type=int, default=None, help="image batch size (default 8; quick: 2)"
    )
    ap.add_argument(
        "--captions", type=int, default=None, help="caption batch size (default 64; quick: 8)"
    )
    ap.add_argument(
        "--repeat", type=int, default=None, help="timed repeats (median; default 3; quick: 1)"
    )
    args = ap.parse_args(argv)
    b_img = args.images or (2 if args.quick else 8)
    b_txt = args.captions or (8 if args.quick else 64)
    repeat = args.repeat or (1 if args.quick else 3)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
        f"CPU, float32, autograd off; median of {repeat} rounds (methods take turns) after a warm-up"
    )

    with torch.inference_mode():
        # ------------------------------------------------------------------ (a) vision
        vit = TimmVisionEncoder("vit_base_patch16_224").eval()
        images = torch.randint(0, 256, (b_img, 3, 224, 224), dtype=torch.uint8)
        n_tok = 197
        mm, mm_flops = matmul(b_img * n_tok, 768, 3072)
        t = side_by_side(
            {
                "batched": lambda: vit(images),
                "loop": lambda: [vit(images[k : k + 1]) for k in range(b_img)],
                "roofline": mm,
            },
            repeat,
        )
        sec = t["batched"]
        roof = mm_flops / t["roofline"] / 1e9
        flops = transformer_matmul_flops(b_img * n_tok, 768, 3072, 12, n_tok)
        flops += 2.0 * b_img * 196 * (3 * 16 * 16) * 768  # patch embedding
        tokens, _ = vit(images)
        print(
            f"\n(a) TimmVisionEncoder vit_base_patch16_224 at 224x224, batch size {b_img} (random init)"
        )
        print(f"    batched       : {b_img / sec:8.3f} images/s  ({sec:.3f} s per batch)")
        print(
            f"    per-image loop: {b_img / t['loop']:8.3f} images/s  -> batched is {t['loop'] / sec:.2f}x the loop"
        )
        print(
            f"    {flops / b_img / 1e9:.1f} GFLOP per image (matrix products): {flops / sec / 1e9:.1f} GFLOP/s "
            f"= {flops / sec / 1e9 / roof:.2f} of the torch.mm roofline ({roof:.1f} GFLOP/s, "
            f"({b_img * n_tok}, 768) x (768, 3072))"
        )

        # ------------------------------------------------------------------ (b) text
        captions, source = caption_list(b_txt)
        with tempfile.TemporaryDirectory() as tmp:
            folder, vocab_src = bert_base_folder(Path(tmp), captions)
            bert = HFTextEncoder(folder, max_length=64).eval()
            bert_one = HFTextEncoder(folder, max_length=64, chunk_tokens=1 << 30).eval()
        ids = bert.tokenize(captions)
        lengths = ids.lengths
        longest = int(lengths.max())
        mm, mm_flops = matmul(b_txt * int(lengths.float().mean()), 768, 3072)
        t = side_by_side(
            {
                "chunks": lambda: bert(captions),
                "padded": lambda: bert_one(captions),
                "loop": lambda: [bert([c]) for c in captions],
                "roofline": mm,
            },
            repeat,
        )
        sec_t = t["chunks"]
        roof_t = mm_flops / t["roofline"] / 1e9
        # Useful FLOPs count real tokens only; a padded batch also computes the padding.
        useful = sum(transformer_matmul_flops(int(n), 768, 3072, 12, int(n)) for n in lengths)
        text_tokens = bert(captions)
        print(
            f"\n(b) HFTextEncoder BERT-base config (12 layers, width 768, {vocab_src}), random init, "
            f"batch size {b_txt}: {source} captions, {float(lengths.float().mean()):.1f} word pieces on average "
            f"(longest {longest})"
        )
        print(
            f"    length-sorted chunks of <= {CHUNK_TOKENS['cpu']} tokens (default): {b_txt / sec_t:8.2f} captions/s  "
            f"({sec_t:.3f} s per batch)"
        )
        print(
            f"    one batch padded to {longest}                 : {b_txt / t['padded']:8.2f} captions/s  -> chunks are "
            f"{t['padded'] / sec_t:.2f}x faster"
        )
        print(
            f"    per-caption loop                         : {b_txt / t['loop']:8.2f} captions/s  -> chunks are "
            f"{t['loop'] / sec_t:.2f}x faster"
        )
        print(
            f"    chunks: {useful / sec_t / 1e9:.1f} GFLOP/s on real tokens (padding not counted) "
            f"= {useful / sec_t / 1e9 / roof_t:.2f} of the torch.mm roofline ({roof_t:.1f} GFLOP/s)"
        )

        # ------------------------------------------------------------------ (c) a CHAN scorer on the same batch
        chan = HardAssignmentCoding()
        many = Tokens(
            text_tokens.feats.repeat(1000 // b_txt + 1, 1, 1)[:1000],
            text_tokens.mask.repeat(1000 // b_txt + 1, 1)[:1000],
        )
        t = side_by_side(
            {"batch": lambda: chan(tokens, text_tokens), "many": lambda: chan(tokens, many)}, repeat
        )
        sec_s, sec_many = t["batch"], t["many"]
        print(
            "\n(c) HardAssignmentCoding (CHAN, log-sum-exp pooling) on the encoded batch, D = 768, N = 197"
        )
        print(
            f"    {b_img} images x {b_txt} captions ({b_img * b_txt} pairs): {sec_s * 1e3:.1f} ms"
        )
        print(
            f"    {b_img} images x 1,000 captions: {sec_many * 1e3:.1f} ms = {sec_many / b_img * 1e3:.2f} ms per image"
        )
        print(
            f"    per image: encoding {sec / b_img * 1e3:.1f} ms (ViT-B/16) vs scoring against 1,000 captions "
            f"{sec_many / b_img * 1e3:.2f} ms; per caption: encoding {sec_t / b_txt * 1e3:.2f} ms (BERT-base)"
        )


if __name__ == "__main__":
    main()
