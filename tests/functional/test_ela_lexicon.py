import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.functional import (
    expansive_soft_labels,
    lexicon_kl_loss,
    mask_words,
    sample_hard_negatives,
)
from imtm.functional.lexicon import IGNORE_INDEX

SETTINGS = settings(max_examples=20, deadline=None)


def problem(b=2, n=4, m=5, v=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    plan = torch.rand(b, n, m, generator=g, dtype=torch.float64)
    cost = torch.rand(b, n, m, generator=g, dtype=torch.float64) * 1.5
    probs = torch.softmax(torch.randn(b, m, v, generator=g, dtype=torch.float64), -1)
    mask = torch.rand(b, m, generator=g) < 0.7
    mask[:, 0] = True
    return plan, cost, probs, mask


RULES = ["plan_cosine_softmax", "one_minus_plan", "plan_topk", "one_minus_cost"]


def loop_labels(plan, cost, probs, mask, weights="plan_topk", top_k=3, scale=2e3):
    """Eq. 6 for one patch at a time in plain Python, each rule written out as its source states it."""
    b, n, m = plan.shape
    v = probs.shape[-1]
    out = torch.zeros(b, n, v, dtype=torch.float64)
    for k in range(b):
        words = [j for j in range(m) if mask[k, j]]
        for i in range(n):
            if weights == "plan_topk":
                chosen = sorted(words, key=lambda j: -float(plan[k, i, j]))[:top_k]
                w = {j: float(plan[k, i, j]) for j in chosen}
            elif weights == "plan_cosine_softmax":
                # Lydia-yang/ELA, model/model_pretrain.py: T * sim (optimal_transport_dist), then in
                # get_p2w_loss: * 2e3, zeros -> -inf, top-3, softmax over the kept entries.
                x = {j: scale * float(plan[k, i, j]) * (1.0 - float(cost[k, i, j])) for j in words}
                finite = {j: xj for j, xj in x.items() if xj != 0.0}
                chosen = sorted(finite, key=lambda j: -finite[j])[:top_k]
                if chosen:
                    top = max(finite[j] for j in chosen)
                    w = {j: math.exp(finite[j] - top) for j in chosen}
                else:
                    w = {j: 0.0 for j in sorted(words, key=lambda j: -x[j])[:top_k]}
            elif weights == "one_minus_plan":
                w = {j: 1.0 - float(plan[k, i, j]) for j in words}
            else:
                w = {j: max(0.0, 1.0 - float(cost[k, i, j])) for j in words}
            total = sum(w.values())
            if total == 0:
                w = {j: 1.0 for j in w}
                total = len(w)
            for j, wj in w.items():
                for t in range(v):
                    out[k, i, t] += wj / total * float(probs[k, j, t])
    return out


@pytest.mark.parametrize("weights", RULES)
@pytest.mark.parametrize("top_k", [1, 3, 9])
def test_soft_labels_match_loop_and_are_distributions(weights, top_k):
    plan, cost, probs, mask = problem()
    plan = (
        plan / 20
    )  # plan entries of the size a transport plan has, so the scaled softmax is not one-hot
    got = expansive_soft_labels(plan, probs, mask, cost=cost, label_weights=weights, top_k=top_k)
    torch.testing.assert_close(got, loop_labels(plan, cost, probs, mask, weights, top_k))
    assert bool((got >= 0).all())
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 4, dtype=torch.float64))
    # The packed form (selected patches only) gives the same rows.
    b_idx, t_idx = torch.tensor([1, 0, 1]), torch.tensor([3, 0, 0])
    packed = expansive_soft_labels(
        plan[b_idx, t_idx],
        probs,
        mask,
        batch_index=b_idx,
        cost=cost[b_idx, t_idx],
        label_weights=weights,
        top_k=top_k,
    )
    torch.testing.assert_close(packed, got[b_idx, t_idx])


def test_authors_rule_scale_zero_entries_and_negative_cosines():
    # Cosines below 0 (cost > 1) stay candidates with a negative product; exact zeros are never picked.
    plan = torch.tensor([[[0.0, 1e-3, 2e-3, 1e-3, 5e-4]]], dtype=torch.float64)
    cost = torch.tensor([[[0.1, 0.5, 0.2, 1.5, 0.9]]], dtype=torch.float64)
    probs = torch.eye(5, dtype=torch.float64).unsqueeze(0)
    got = expansive_soft_labels(plan, probs, cost=cost, top_k=3)
    x = torch.tensor([2e3 * 1e-3 * 0.5, 2e3 * 2e-3 * 0.8, 2e3 * 5e-4 * 0.1], dtype=torch.float64)
    want = torch.zeros(5, dtype=torch.float64)
    want[[1, 2, 4]] = torch.softmax(x, 0)
    torch.testing.assert_close(got[0, 0], want)
    torch.testing.assert_close(
        expansive_soft_labels(plan, probs, cost=cost, scale=1.0)[0, 0, [1, 2, 4]],
        torch.softmax(x / 2e3, 0),
    )


@pytest.mark.parametrize("weights", ["plan_cosine_softmax", "one_minus_plan", "plan_topk"])
def test_rules_that_read_the_plan_change_with_it(weights):
    # Eq. 6's c_ij is the transport output: a random plan must change the labels ("one_minus_cost" reads
    # only the cost and does not change: that is why it is not the printed reading).
    plan, cost, probs, mask = problem()
    other = torch.rand(plan.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    a = expansive_soft_labels(plan / 20, probs, mask, cost=cost, label_weights=weights)
    b = expansive_soft_labels(other / 20, probs, mask, cost=cost, label_weights=weights)
    assert float((a - b).abs().max()) > 1e-4
    same = expansive_soft_labels(other, probs, mask, cost=cost, label_weights="one_minus_cost")
    torch.testing.assert_close(
        same, expansive_soft_labels(plan, probs, mask, cost=cost, label_weights="one_minus_cost")
    )


def _label_mass_on_the_right_word(rule, seed, noise=1.0, b=8, n=24, m=8, d=32):
    from imtm.functional import cosine_cost, transport_plan

    g = torch.Generator().manual_seed(seed)
    words = torch.randn(b, m, d, generator=g, dtype=torch.float64)
    which = torch.randint(0, m, (b, n), generator=g)
    patches = words.gather(1, which.unsqueeze(-1).expand(b, n, d)) + noise * torch.randn(
        b, n, d, generator=g, dtype=torch.float64
    )
    cost = cosine_cost(patches, words)
    labels = expansive_soft_labels(
        transport_plan(cost),
        torch.eye(m, dtype=torch.float64).expand(b, m, m),
        cost=cost,
        label_weights=rule,
    )
    return float(labels.gather(-1, which.unsqueeze(-1)).mean())


def test_label_rules_on_known_alignments():
    """The measurement behind the default: patches are noisy copies of one word each (seeds 0-4)."""
    mass = {
        rule: sum(_label_mass_on_the_right_word(rule, s) for s in range(5)) / 5 for rule in RULES
    }
    assert max(mass, key=mass.get) == "plan_cosine_softmax"
    assert (
        mass["plan_cosine_softmax"] > 0.8 and mass["one_minus_plan"] < 0.13
    )  # 1/8 is the uniform mean


def test_one_word_caption_and_zero_plan_row():
    probs = torch.softmax(torch.randn(1, 1, 6), -1)
    for rule in RULES:
        labels = expansive_soft_labels(
            torch.rand(1, 3, 1) / 10, probs, cost=torch.rand(1, 3, 1), label_weights=rule
        )
        torch.testing.assert_close(labels, probs.expand(1, 3, 6))
    plan = torch.zeros(1, 2, 4)
    probs = torch.softmax(torch.randn(1, 4, 6), -1)
    for (
        rule
    ) in RULES:  # no mass: spread evenly over the picks (the authors' softmax would be NaN here)
        labels = expansive_soft_labels(
            plan, probs, cost=torch.rand(1, 2, 4), top_k=2, label_weights=rule
        )
        assert bool(torch.isfinite(labels).all())
        torch.testing.assert_close(labels.sum(-1), torch.ones(1, 2))


def test_a_row_without_mass_picks_real_words_before_padding():
    # Padding ahead of the only real word, a plan row of zeros and top_k=1: the one pick is the
    # real word, so the labels are its distribution (they used to pick the padding and sum to 0).
    probs = torch.softmax(torch.randn(2, 3, 5, dtype=torch.float64), -1)
    mask = torch.tensor([[False, False, True], [False, True, False]])
    plan = torch.zeros(2, 1, 3, dtype=torch.float64)
    cost = torch.rand(2, 1, 3, dtype=torch.float64)
    for rule in RULES:
        labels = expansive_soft_labels(plan, probs, mask, cost=cost, top_k=1, label_weights=rule)
        torch.testing.assert_close(labels[0, 0], probs[0, 2])
        torch.testing.assert_close(labels[1, 0], probs[1, 1])


@SETTINGS
@given(seed=st.integers(0, 10**6), extra=st.integers(1, 3), weights=st.sampled_from(RULES))
def test_padding_and_word_permutation_never_change_labels(seed, extra, weights):
    plan, cost, probs, mask = problem(seed=seed)
    plan = plan / 20
    base = expansive_soft_labels(plan, probs, mask, cost=cost, label_weights=weights)
    g = torch.Generator().manual_seed(seed)
    pad = lambda x, d: torch.cat(
        [x, torch.rand(*x.shape[:d], extra, *x.shape[d + 1 :], generator=g, dtype=x.dtype) * 10], d
    )
    padded = expansive_soft_labels(
        pad(plan, 2),
        pad(probs, 1),
        torch.cat([mask, torch.zeros(2, extra, dtype=torch.bool)], 1),
        cost=pad(cost, 2),
        label_weights=weights,
    )
    torch.testing.assert_close(padded, base)
    p = torch.randperm(5, generator=g)
    perm = expansive_soft_labels(
        plan[:, :, p], probs[:, p], mask[:, p], cost=cost[:, :, p], label_weights=weights
    )
    torch.testing.assert_close(perm, base)


def test_kl_loss_matches_loop_and_gives_no_gradient_to_the_target():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), -1).requires_grad_(
        True
    )
    loss = lexicon_kl_loss(logits, target)
    want = 0.0
    for i in range(3):
        z = sum(math.exp(float(x)) for x in logits[i].detach())
        p = [math.exp(float(x)) / z for x in logits[i].detach()]
        want += sum(
            pi * (math.log(pi) - math.log(float(t))) for pi, t in zip(p, target[i].detach())
        )
    torch.testing.assert_close(loss, torch.tensor(want / 3, dtype=torch.float64))
    loss.backward()
    assert target.grad is None and logits.grad is not None
    torch.testing.assert_close(lexicon_kl_loss(logits, target, reduction="sum"), loss * 3)
    assert lexicon_kl_loss(logits, target, reduction="none").shape == (3,)
    assert float(lexicon_kl_loss(torch.zeros(0, 5), torch.zeros(0, 5))) == 0.0
    # The other order, KL(label || P), with a zero label entry contributing exactly 0.
    target = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    got = lexicon_kl_loss(logits[:1].detach(), target, direction="target_first")
    p = torch.softmax(logits[:1].detach(), -1)[0].tolist()
    torch.testing.assert_close(
        got,
        torch.tensor(
            sum(0.5 * (math.log(0.5) - math.log(p[j])) for j in range(2)), dtype=torch.float64
        ),
    )


def test_mask_words_proportions_and_specials():
    ids = torch.randint(5, 1000, (200, 50), generator=torch.Generator().manual_seed(0))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False
    out, labels = mask_words(
        ids, maskable, mask_token_id=3, vocab_size=1000, generator=torch.Generator().manual_seed(1)
    )
    picked = labels != IGNORE_INDEX
    assert not bool(picked[:, 0].any())
    torch.testing.assert_close(labels[picked], ids[picked])
    assert bool((out[~picked] == ids[~picked]).all())
    frac = picked.float().mean().item() * 50 / 49
    assert 0.13 < frac < 0.17
    as_mask = (out[picked] == 3).float().mean().item()
    kept = (out[picked] == ids[picked]).float().mean().item()
    assert 0.76 < as_mask < 0.84 and 0.07 < kept < 0.14


def test_hard_negatives_are_never_positives():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 6, generator=g)
    ids = torch.tensor([0, 0, 1, 2, 3, 3])
    pos = ids[:, None] == ids[None, :]
    for _ in range(5):
        nt, ni = sample_hard_negatives(s, pos, generator=g)
        assert not bool(pos[torch.arange(6), nt].any()) and not bool(pos[ni, torch.arange(6)].any())
    nt, ni = sample_hard_negatives(s, pos, sample=False)
    torch.testing.assert_close(nt, s.masked_fill(pos, -1e9).argmax(1))
    only = sample_hard_negatives(torch.randn(2, 2), torch.ones(2, 2, dtype=torch.bool))
    assert only[0].tolist() == [-1, -1]


def test_bad_inputs():
    plan, cost, probs, mask = problem()
    with pytest.raises(ValueError, match="Did you mean 'plan_topk'"):
        expansive_soft_labels(plan, probs, label_weights="plan_top")
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        expansive_soft_labels(plan, probs, top_k=0)
    with pytest.raises(ValueError, match=r"word_probs must have shape \(B, M, V\)"):
        expansive_soft_labels(plan, probs[0])
    with pytest.raises(ValueError, match="word_mask must be a bool tensor"):
        expansive_soft_labels(plan, probs, mask.long())
    with pytest.raises(ValueError, match="without batch_index, plan must have shape"):
        expansive_soft_labels(plan[0], probs)
    with pytest.raises(ValueError, match="with batch_index, plan must have shape"):
        expansive_soft_labels(plan, probs, batch_index=torch.tensor([0]))
    with pytest.raises(ValueError, match="batch_index must have shape"):
        expansive_soft_labels(plan[0], probs, batch_index=torch.tensor([0]))
    with pytest.raises(ValueError, match="cost must have the plan's shape"):
        expansive_soft_labels(plan, probs, cost=cost[:, :2])
    with pytest.raises(ValueError, match="needs the transport cost"):
        expansive_soft_labels(plan, probs, label_weights="one_minus_cost")
    with pytest.raises(ValueError, match="'plan_cosine_softmax' needs the transport cost"):
        expansive_soft_labels(plan, probs)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        expansive_soft_labels(plan, probs, cost=cost, scale=0.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        lexicon_kl_loss(torch.zeros(1, 2), torch.ones(1, 2) / 2, reduction="avg")
    with pytest.raises(ValueError, match=r"both have shape \(K, V\)"):
        lexicon_kl_loss(torch.zeros(1, 2), torch.ones(1, 3) / 3)
    with pytest.raises(ValueError, match="Did you mean 'target_first'"):
        lexicon_kl_loss(torch.zeros(1, 2), torch.ones(1, 2) / 2, direction="target_frst")
    with pytest.raises(ValueError, match="eps must be a number > 0"):
        lexicon_kl_loss(torch.zeros(1, 2), torch.ones(1, 2) / 2, eps=0)
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="maskable must be a bool tensor"):
        mask_words(ids, ids, mask_token_id=1, vocab_size=5)
    with pytest.raises(ValueError, match="prob must be a number in"):
        mask_words(ids, ids > 0, mask_token_id=1, vocab_size=5, prob=1.5)
    with pytest.raises(ValueError, match="must be at most 1"):
        mask_words(
            ids, ids > 0, mask_token_id=1, vocab_size=5, replace_mask=0.9, replace_random=0.2
        )
    with pytest.raises(ValueError, match="scores must be"):
        sample_hard_negatives(torch.zeros(2, 2), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        sample_hard_negatives(torch.zeros(2, 2), torch.eye(2, dtype=torch.bool), temperature=0)
