"""Blocks that produce NaN/inf on cue, and the 2-process worker of the non-finite tests.

A module of its own: processes spawned by ``run_ranks`` import the worker and the blocks by name.
"""

import torch
import torch.nn.functional as F
from torch import nn
from toy import ToyHinge, ToyText, toy_data

from imtm import Component, Matcher, Tokens
from imtm.engine import distributed

FILLS = {"nan": float("nan"), "inf": float("inf")}


class PoisonedEncoder(Component):
    """Region projection (no dropout: runs are exact) that writes NaN/inf at chosen training steps.

    ``at``: the training calls (0-based) whose output gets ``fill`` at one real position;
    ``padding_always``: ``fill`` in every padding position of every call (harmless by contract).
    """

    requires = ("images",)
    provides = ("image_tokens",)

    def __init__(
        self,
        in_dim=6,
        out_dim=8,
        at=(),
        fill="nan",
        padding_always=False,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.in_dim, self.out_dim, self.at, self.fill, self.padding_always = (
            in_dim,
            out_dim,
            at,
            fill,
            padding_always,
        )
        self.proj = nn.Linear(in_dim, out_dim)
        self.calls = 0

    def forward(self, images: Tokens) -> Tokens:
        feats = self.proj(images.feats)
        if self.training:
            step, self.calls = self.calls, self.calls + 1
            if self.padding_always:
                feats = feats.masked_fill(~images.mask[..., None], FILLS[self.fill])
            if step in self.at:
                feats = feats.clone()
                feats[0, 0, 0] = FILLS[self.fill]  # token 0 of every row is real
        return images.with_feats(feats)


class PoisonedScorer(Component):
    """Cosine of mean-pooled tokens; NaN/inf in the scores at steps ``at`` (on rank ``rank`` only, when
    given); a NaN gradient (and finite scores) at steps ``grad_at``, through ``sqrt`` at 0 of a parameter."""

    requires = ("image_tokens", "text_tokens")
    provides = ("scores",)

    def __init__(self, at=(), fill="nan", grad_at=(), rank=None, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.at, self.fill, self.grad_at, self.rank = at, fill, grad_at, rank
        if grad_at:  # only then: a parameter no loss reads would stop DistributedDataParallel
            self.gate = nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, img: Tokens, txt: Tokens) -> torch.Tensor:
        scores = F.normalize(img.masked_mean(), dim=-1) @ F.normalize(txt.masked_mean(), dim=-1).T
        if self.training:
            step, self.calls = self.calls, self.calls + 1
            if step in self.grad_at:
                # sqrt(gate * 0) = 0 forward; d/dgate = 0 * 1 / (2 sqrt(0)) = NaN backward
                scores = scores + torch.sqrt(self.gate * 0.0)
            if step in self.at and self.rank in (None, distributed.rank()):
                scores = scores.clone()
                scores[0, -1] = FILLS[
                    self.fill
                ]  # a negative pair: an inf positive would be clamped away
        return scores


def components(vocab, scorer):
    return [
        ("image", PoisonedEncoder()),
        ("text", ToyText(vocab=vocab)),
        ("scorer", scorer),
        ("loss", ToyHinge()),
    ]


def fit_with_a_nan_on_one_rank(rank: int, batch_size: int, at: int) -> dict:
    """Under 2 ranks, the scorer's output is NaN on rank 1 only at step ``at``; every rank must skip it."""
    import warnings

    train = toy_data(n_images=12, cpi=2)
    m = Matcher(
        components(train.vocab, PoisonedScorer(at=(at,), rank=1)),
        epochs=1,
        batch_size=batch_size,
        lr=1e-2,
        warmup=0,
        device="cpu",
        random_state=0,
        verbose=False,
        on_nonfinite="skip",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.fit(train)
    return {
        "state": {k: v.clone() for k, v in m.components_.state_dict().items()},
        "skipped": m.skipped_steps_,
        "history": m.history_,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    }
