"""Tiny blocks and data for engine tests (independent of the library's real blocks)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from imtm import Component, Loss, Tokens
from imtm.data import ImageCaptionDataset, Vocabulary


class ToyImage(Component):
    requires = ("images",)
    provides = ("image_tokens",)

    def __init__(self, in_dim=6, out_dim=8, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim)
        self.drop = nn.Dropout(0.2)

    def forward(self, images: Tokens) -> Tokens:
        return images.with_feats(self.drop(self.proj(images.feats)))


class ToyText(Component):
    requires = ("texts",)
    provides = ("text_tokens",)

    def __init__(self, vocab=None, out_dim=8, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.vocab, self.out_dim = vocab, out_dim
        self.emb = nn.Embedding(len(vocab), out_dim)

    def forward(self, texts) -> Tokens:
        ids = (
            self.vocab.encode_batch(texts, device=self.emb.weight.device)
            if isinstance(texts, list)
            else texts
        )
        return ids.with_feats(self.emb(ids.feats))


class ToyCosine(Component):
    requires = ("image_tokens", "text_tokens")
    provides = ("scores",)

    def __init__(self, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)

    def forward(self, img: Tokens, txt: Tokens) -> torch.Tensor:
        return F.normalize(img.masked_mean(), dim=-1) @ F.normalize(txt.masked_mean(), dim=-1).T


class ToyHinge(Loss):
    requires = ("scores", "positives")
    provides = ("hinge_loss",)

    def __init__(self, margin=0.2, weight=1.0, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.margin, self.weight = margin, weight

    def forward(self, scores, positives):
        pos = scores.diagonal()
        cost = (self.margin + scores - pos[None, :]).clamp_min(0).masked_fill(positives, 0)
        return cost.sum() / scores.shape[0]


def toy_data(n_images=24, cpi=2, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["red", "blue", "green", "circle", "square", "big", "small", "left", "right"]
    images, captions, c2i = [], [], []
    for i in range(n_images):
        n = int(torch.randint(2, 5, (1,), generator=g))
        images.append(torch.randn(n, dim, generator=g))
        for _ in range(cpi):
            k = torch.randint(0, len(words), (3,), generator=g).tolist()
            captions.append("a " + " ".join(words[j] for j in k))
            c2i.append(i)
    vocab = Vocabulary.build(captions)
    return ImageCaptionDataset(images, captions, c2i, vocab=vocab, name="toy")


def toy_components(vocab):
    return [ToyImage(), ToyText(vocab=vocab), ToyCosine(), ToyHinge()]


class Crashing(ImageCaptionDataset):
    """Raises after ``limit`` items, like a process killed mid-epoch."""

    def __init__(self, base, limit):
        super().__init__(base.images, base.captions, base.caption_to_image, vocab=base.vocab)
        self.limit, self.seen = limit, 0

    def __getitem__(self, k):
        self.seen += 1
        if self.seen > self.limit:
            raise RuntimeError("simulated crash")
        return super().__getitem__(k)
