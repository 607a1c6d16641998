import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm import Tokens
from imtm.components import (
    ExpansiveLexiconLoss,
    ImageTextMatchingLoss,
    LexiconDistillationLoss,
    MaskedLanguageModelingLoss,
)
from imtm.components.heads import LexiconLogits
from imtm.functional import cosine_cost, transport_plan
from imtm.testing import check_component

SETTINGS = settings(max_examples=20, deadline=None)
V = 9


def batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    images = Tokens(torch.randn(2, 5, 4, generator=g, dtype=dtype), num_prefix_tokens=1)
    texts = Tokens.from_lengths(
        torch.randn(2, 6, 4, generator=g, dtype=dtype), [6, 3], num_prefix_tokens=1
    )
    b_idx, t_idx = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 4, 2, 3])
    lex = LexiconLogits(torch.randn(4, V, generator=g, dtype=dtype), b_idx, t_idx)
    words = torch.randn(2, 6, V, generator=g, dtype=dtype)
    return lex, words, images, texts


def softmax(xs):
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [x / sum(e) for x in e]


def kl(p, q):
    return sum(pi * (math.log(pi) - math.log(max(qi, 1e-8))) for pi, qi in zip(p, q))


def loop_loss(lex, words, images, texts, top_k=3, text_ids=None, rule="plan_cosine_softmax"):
    """Eq. 5-7 for one masked patch at a time (the plan of each pair from transport_plan).

    ``"plan_cosine_softmax"``: the rule of ``ALBEF.get_p2w_loss`` (Lydia-yang/ELA, model/model_pretrain.py):
    softmax over the top 3 of 2e3 * plan * cosine; ``"plan_topk"``: the plan over its top 3, renormalised.
    """
    total = 0.0
    for k, (b, i) in enumerate(zip(lex.batch_index.tolist(), lex.token_index.tolist())):
        patches = [
            n
            for n in range(images.num_tokens)
            if images.mask[b, n] and n >= images.num_prefix_tokens
        ]
        wids = [
            j for j in range(texts.num_tokens) if texts.mask[b, j] and j >= texts.num_prefix_tokens
        ]
        cost = cosine_cost(images.feats[b : b + 1, patches], texts.feats[b : b + 1, wids])
        plan = transport_plan(cost)[0]
        row = plan[patches.index(i)].tolist()
        if rule == "plan_cosine_softmax":
            cos = (1.0 - cost[0, patches.index(i)]).tolist()
            x = [2e3 * row[a] * cos[a] for a in range(len(wids))]
            chosen = sorted((a for a in range(len(wids)) if x[a] != 0.0), key=lambda a: -x[a])[
                :top_k
            ]
            row = dict(zip(chosen, softmax([x[a] for a in chosen])))
        else:
            chosen = sorted(range(len(wids)), key=lambda a: -row[a])[:top_k]
        total_w = sum(row[a] for a in chosen)
        label = [0.0] * V
        for a in chosen:
            dist = (
                softmax(words[b, wids[a]].tolist())
                if text_ids is None
                else [1.0 if v == int(text_ids[b, wids[a]]) else 0.0 for v in range(V)]
            )
            for v in range(V):
                label[v] += row[a] / total_w * dist[v]
        total += kl(softmax(lex.logits[k].tolist()), label)
    return total / len(lex.batch_index)


@pytest.mark.parametrize("rule", ["plan_cosine_softmax", "plan_topk"])
def test_matches_loop_of_eq5_to_7_and_no_gradient_reaches_labels(rule):
    lex, words, images, texts = batch()
    logits = lex.logits.clone().requires_grad_(True)
    words.requires_grad_(True)
    img_feats = images.feats.clone().requires_grad_(True)
    loss = ExpansiveLexiconLoss(label_weights=rule)(
        LexiconLogits(logits, lex.batch_index, lex.token_index),
        words,
        images.with_feats(img_feats),
        texts,
    )
    torch.testing.assert_close(
        loss,
        torch.tensor(loop_loss(lex, words.detach(), images, texts, rule=rule), dtype=torch.float64),
    )
    loss.backward()
    assert logits.grad is not None and words.grad is None and img_feats.grad is None


def test_without_expansion_uses_one_hot_word_ids():
    lex, words, images, texts = batch(1)
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(3))
    loss = ExpansiveLexiconLoss(
        expansion=False, requires=ExpansiveLexiconLoss.requires + ("text_ids",)
    )
    got = loss(lex, words, images, texts, ids)
    torch.testing.assert_close(
        got, torch.tensor(loop_loss(lex, words, images, texts, text_ids=ids), dtype=torch.float64)
    )


def test_one_word_caption_all_patches_masked_and_nothing_masked():
    g = torch.Generator().manual_seed(0)
    images = Tokens(torch.randn(1, 4, 4, generator=g))
    texts = Tokens(torch.randn(1, 1, 4, generator=g))
    words = torch.randn(1, 1, V, generator=g)
    lex = LexiconLogits(
        torch.randn(4, V, generator=g), torch.zeros(4, dtype=torch.long), torch.arange(4)
    )
    loss = ExpansiveLexiconLoss()(lex, words, images, texts)
    want = torch.nn.functional.kl_div(
        torch.log_softmax(words[0, 0], -1).expand(4, V),
        torch.log_softmax(lex.logits, -1),
        log_target=True,
        reduction="batchmean",
    )
    torch.testing.assert_close(
        loss, want
    )  # KL(P || label) with every label the only word's distribution
    none = LexiconLogits(
        torch.zeros(0, V, requires_grad=True),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
    )
    zero = ExpansiveLexiconLoss()(none, words, images, texts)
    assert float(zero.detach()) == 0.0 and zero.requires_grad


@SETTINGS
@given(seed=st.integers(0, 10**6), extra=st.integers(1, 3))
def test_padding_never_changes_the_loss(seed, extra):
    lex, words, images, texts = batch(seed)
    base = ExpansiveLexiconLoss()(lex, words, images, texts)
    g = torch.Generator().manual_seed(seed)
    pad = lambda t: Tokens(
        torch.cat([t.feats, torch.randn(2, extra, 4, generator=g, dtype=t.dtype) * 1e3], 1),
        torch.cat([t.mask, torch.zeros(2, extra, dtype=torch.bool)], 1),
        num_prefix_tokens=t.num_prefix_tokens,
    )
    words_p = torch.cat([words, torch.randn(2, extra, V, generator=g, dtype=words.dtype)], 1)
    torch.testing.assert_close(ExpansiveLexiconLoss()(lex, words_p, pad(images), pad(texts)), base)


def test_distillation_mlm_and_itm_match_loops():
    g = torch.Generator().manual_seed(0)
    student, teacher = (
        torch.randn(2, 4, V, generator=g, dtype=torch.float64),
        torch.randn(2, 4, V, generator=g, dtype=torch.float64),
    )
    labels = torch.tensor([[-100, 3, -100, 5], [1, -100, -100, -100]])
    picked = [(0, 1), (0, 3), (1, 0)]
    want = (
        sum(kl(softmax(student[b, j].tolist()), softmax(teacher[b, j].tolist())) for b, j in picked)
        / 3
    )
    torch.testing.assert_close(
        LexiconDistillationLoss()(student, teacher, labels), torch.tensor(want, dtype=torch.float64)
    )
    want = (
        sum(kl(softmax(teacher[b, j].tolist()), softmax(student[b, j].tolist())) for b, j in picked)
        / 3
    )
    torch.testing.assert_close(
        LexiconDistillationLoss(direction="target_first")(student, teacher, labels),
        torch.tensor(want, dtype=torch.float64),
    )
    want = sum(-math.log(softmax(teacher[b, j].tolist())[int(labels[b, j])]) for b, j in picked) / 3
    torch.testing.assert_close(
        MaskedLanguageModelingLoss()(teacher, labels), torch.tensor(want, dtype=torch.float64)
    )
    assert float(MaskedLanguageModelingLoss()(teacher, torch.full((2, 4), -100))) == 0.0
    logits, y = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.tensor([1, 1, 0, 0, 0])
    want = sum(-math.log(softmax(logits[p].tolist())[int(y[p])]) for p in range(5)) / 5
    torch.testing.assert_close(
        ImageTextMatchingLoss()(logits, y), torch.tensor(want, dtype=torch.float64)
    )


def test_conformance():
    lex, words, images, texts = batch(dtype=torch.float32)
    # LexiconLogits is not converted between dtypes by the battery, and word_lexicon would need
    # padding alongside the text tokens: both are covered by the tests above.
    check_component(
        ExpansiveLexiconLoss(),
        {"patch_lexicon": lex, "word_lexicon": words, "image_tokens": images, "text_tokens": texts},
        skip=("dtypes", "padding"),
    )
    labels = torch.tensor([[-100, 3, -100, 5, 1, -100], [1, -100, -100, -100, 2, 2]])
    check_component(
        LexiconDistillationLoss(),
        {"word_lexicon_masked": words, "cross_lexicon": words * 2, "mlm_labels": labels},
    )
    check_component(MaskedLanguageModelingLoss(), {"cross_lexicon": words, "mlm_labels": labels})
    check_component(
        ImageTextMatchingLoss(),
        {"itm_logits": torch.randn(6, 2), "itm_labels": torch.tensor([1, 1, 0, 0, 0, 0])},
    )


def test_bad_inputs():
    lex, words, images, texts = batch()
    loss = ExpansiveLexiconLoss()
    with pytest.raises(TypeError, match="must be the LexiconLogits"):
        loss(lex.logits, words, images, texts)
    with pytest.raises(TypeError, match="expected image tokens as Tokens"):
        loss(lex, words, images.feats, texts)
    with pytest.raises(ValueError, match="must pair with caption b"):
        loss(lex, words, images[0], texts)
    with pytest.raises(ValueError, match="must share their width"):
        loss(lex, words, images.with_feats(torch.randn(2, 5, 3, dtype=torch.float64)), texts)
    with pytest.raises(ValueError, match=r"word_lexicon must have shape \(B, M, V\)"):
        loss(lex, words[:, :3], images, texts)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        loss(lex, words[..., :4], images, texts)
    with pytest.raises(ValueError, match="add 'text_ids' to requires"):
        ExpansiveLexiconLoss(expansion=False)(lex, words, images, texts)
    with pytest.raises(ValueError, match="text_ids must have shape"):
        ExpansiveLexiconLoss(expansion=False)(
            lex, words, images, texts, torch.zeros(2, 2, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="Did you mean 'plan_topk'"):
        ExpansiveLexiconLoss(label_weights="plan_top").validate()
    with pytest.raises(ValueError, match="method must be one of"):
        ExpansiveLexiconLoss(method="exact").validate()
    with pytest.raises(TypeError, match="expansion must be True or False"):
        ExpansiveLexiconLoss(expansion=1).validate()
    with pytest.raises(TypeError, match="weight must be a finite number >= 0, got '1'"):
        ExpansiveLexiconLoss(weight="1").validate()
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        ExpansiveLexiconLoss(top_k=0).validate()
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        ExpansiveLexiconLoss(scale=float("inf")).validate()
    with pytest.raises(ValueError, match="direction must be one of"):
        ExpansiveLexiconLoss(direction="forward").validate()
    with pytest.raises(ValueError, match="direction must be one of"):
        LexiconDistillationLoss(direction="forward").validate()
    with pytest.raises(ValueError, match="must both be"):
        LexiconDistillationLoss()(words, words[:, :2], torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="mlm_labels must have shape"):
        LexiconDistillationLoss()(words, words, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="expected cross_lexicon"):
        MaskedLanguageModelingLoss()(words, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="expected itm_logits"):
        ImageTextMatchingLoss()(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="itm_labels must be long"):
        ImageTextMatchingLoss()(torch.zeros(3, 2), torch.zeros(3))
