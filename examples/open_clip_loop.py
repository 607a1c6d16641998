"""An open_clip-style training loop with imtm's losses on gathered features.

    python examples/open_clip_loop.py                      # one process
    torchrun --nproc_per_node 2 examples/open_clip_loop.py # DDP: every rank scores the global batch

The loop is the one open_clip users know: a two-tower model returns normalised image and text
features, the features of every rank are gathered (open_clip's ``gather_features`` with
``gather_with_grad=True``), and a loss reads the global batch. Taking imtm's losses into it is
four lines, marked ``# imtm``: gather with :func:`imtm.engine.distributed.gather_with_grad`, build
``scores[i, t]`` (images are rows) and ``positives`` from the image ids (several captions per image
are positives, not negatives), and call any imtm loss: here InfoNCE with a learned temperature
(CLIP's ``logit_scale``) plus VSE++'s hinge.
"""

import torch
import torch.nn.functional as F

from imtm.components import InfoNCELoss, TripletLoss
from imtm.data import synthetic
from imtm.engine import distributed
from imtm.metrics import retrieval_metrics


class TwoTowers(torch.nn.Module):
    """The model: image tower on mean-pooled region features, text tower on a bag of word embeddings."""

    def __init__(self, region_dim: int, vocab_size: int, dim: int = 64):
        super().__init__()
        self.image = torch.nn.Sequential(
            torch.nn.Linear(region_dim, 128), torch.nn.GELU(), torch.nn.Linear(128, dim)
        )
        self.words = torch.nn.EmbeddingBag(vocab_size, 128, mode="mean")
        self.text = torch.nn.Linear(128, dim)

    def encode_image(self, images: list[torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.image(torch.stack([r.mean(0) for r in images])), dim=-1)

    def encode_text(self, word_ids: list[torch.Tensor]) -> torch.Tensor:
        offsets = torch.tensor([0] + [len(w) for w in word_ids[:-1]]).cumsum(0)
        return F.normalize(self.text(self.words(torch.cat(word_ids), offsets)), dim=-1)

    def forward(self, images, word_ids):
        return self.encode_image(images), self.encode_text(word_ids)


def main(steps: int = 300, batch_size: int = 64, seed: int = 0, verbose: bool = True):
    distributed.setup()  # under torchrun: joins the process group; alone: nothing
    torch.manual_seed(seed + distributed.rank())
    train, _, test = synthetic.load(view="regions", seed=seed, n_train=400, n_dev=2, n_test=100)
    model = TwoTowers(train.region_dim, len(train.vocab))
    contrastive, hinge = (
        InfoNCELoss(temperature=0.07, learnable=True),
        TripletLoss(hardest=False, reduction="mean"),
    )
    opt = torch.optim.AdamW([*model.parameters(), *contrastive.parameters()], lr=2e-3)
    g = torch.Generator().manual_seed(seed + distributed.rank())
    for step in range(steps):
        k = torch.randint(0, len(train), (batch_size,), generator=g)  # this rank's captions
        image_ids = train.caption_to_image[k]
        images = [train.images[int(i)] for i in image_ids]
        words = [torch.tensor(train.vocab.encode(train.captions[int(c)])) for c in k]
        image_features, text_features = model(images, words)

        all_image = distributed.gather_with_grad(image_features)  # imtm
        all_text, all_ids = (
            distributed.gather_with_grad(text_features),
            distributed.gather_with_grad(image_ids),
        )
        scores, positives = all_image @ all_text.T, all_ids[:, None] == all_ids[None, :]  # imtm
        loss = contrastive(scores, positives) + hinge(scores, positives)  # imtm

        opt.zero_grad()
        loss.backward()
        opt.step()
        if verbose and distributed.is_main() and step % 100 == 0:
            print(f"step {step}: loss {float(loss.detach()):.3f}")
    model.eval()
    with torch.no_grad():
        v = model.encode_image(list(test.images))
        t = model.encode_text([torch.tensor(test.vocab.encode(c)) for c in test.captions])
    metrics = retrieval_metrics(v @ t.T, test.caption_to_image)
    if verbose and distributed.is_main():
        # chance: R@K is about K / n_images in each direction, so rSum about 2 * (1 + 5 + 10) * 100 / n_images
        print(
            f"test ({test.n_images} images): i2t R@1 {metrics['i2t_r1']:.1f}, t2i R@1 {metrics['t2i_r1']:.1f}, "
            f"rSum {metrics['rsum']:.1f} (chance about {3200 / test.n_images:.0f})"
        )
    return metrics


if __name__ == "__main__":
    main()
