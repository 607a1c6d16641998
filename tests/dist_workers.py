"""Functions run by the 2-process gloo tests (spawned processes import them by module name)."""

from pathlib import Path

from toy import Crashing, toy_components, toy_data

from imtm import Matcher
from imtm.components import (
    GRUTextEncoder,
    HardAssignmentCoding,
    InfoNCELoss,
    PrecomputedEncoder,
    TripletLoss,
)

#: Dataset and batch sizes: 21 items in global batches of 2 x 4 = 8 give batches of 8, 8 and 5
#: (the last split 3 + 2 over the ranks), so uneven shares are covered.
N_IMAGES, CPI, BATCH = 7, 3, 4


def components(vocab):
    """No dropout: K ranks and one process then draw no random numbers and must agree."""
    return [
        ("image", PrecomputedEncoder(in_dim=6, out_dim=8)),
        ("text", GRUTextEncoder(vocab=vocab, out_dim=8, word_dim=8)),
        ("coding", HardAssignmentCoding(pooling="lse", temperature=0.1)),
        ("triplet", TripletLoss(margin=0.2)),
        ("nce", InfoNCELoss(temperature=0.1, learnable=True)),
    ]


def data():
    return toy_data(n_images=N_IMAGES, cpi=CPI)


def one_step_gradients(m: Matcher, train, start_batch: int) -> dict:
    """The gradients of one training step on global batch ``start_batch`` (weights left as they are)."""
    m.validate()
    tr = m.trainer(train)
    tr.seed = 0
    m._build(0)
    stage = tr.stages[0]
    opt, sched = tr.make_optimizer(stage)
    for group in opt.param_groups:
        group["lr"] = 0.0
    tr.ddp = tr.wrap(opt, stage)
    tr.set_modes(stage)
    tr.global_step, tr.skipped = 0, 0
    loss_idx = tr.active_losses(stage)
    run_idx = m.plan_.needed_for([m.plan_.names[k] for k in loss_idx])
    batch = next(tr.batches(0, start_batch))
    logs = tr.step(batch, stage, opt, sched, loss_idx, run_idx)
    grads = {n: p.grad.clone() for n, p in m.components_.named_parameters()}
    return {"logs": logs, "grads": grads, "n_local": len(batch["texts"])}


def matcher(train, batch_size, **kw):
    kw.setdefault("epochs", 1)
    return Matcher(
        components(train.vocab),
        batch_size=batch_size,
        lr=1e-2,
        grad_clip=None,
        device="cpu",
        random_state=0,
        verbose=False,
        image_block=3,
        text_block=5,
        **kw,
    )


def toy_matcher(train, run_dir):
    """The toy pipeline has dropout: a resumed run must restore every rank's random state."""
    return Matcher(
        toy_components(train.vocab),
        epochs=1,
        batch_size=3,
        checkpoint_every=2,
        device="cpu",
        random_state=0,
        verbose=False,
        checkpoint_dir=run_dir,
    )


def all_checks(rank: int, tmp: str) -> dict:
    """Everything the 2-process tests compare, in one spawn (starting processes is the slow part)."""
    tmp = Path(tmp)
    train = data()
    out = {"rank": rank}
    out["step_first"] = one_step_gradients(matcher(train, BATCH), train, 0)
    out["step_last"] = one_step_gradients(matcher(train, BATCH), train, 2)

    # Gradient accumulation with cached embeddings under torchrun: one step, then a whole fit.
    out["acc_step_first"] = one_step_gradients(matcher(train, BATCH, accumulate=2), train, 0)
    out["acc_step_last"] = one_step_gradients(matcher(train, BATCH, accumulate=3), train, 2)
    acc = matcher(train, BATCH, accumulate=2, epochs=2).fit(train)
    out["acc_fit_state"] = acc.components_.state_dict()

    m = matcher(train, BATCH, checkpoint_dir=tmp / "fit").fit(train, eval_set=train)
    out["fit_state"] = m.components_.state_dict()
    out["fit_history"] = [{k: v for k, v in h.items() if k != "time_s"} for h in m.history_]
    out["sims"] = m.similarity(train.images, train.captions)
    out["metrics"] = m.evaluate(train)
    m.save(tmp / "final")
    out["tiny_sims"] = m.similarity(train.images[:1], train.captions[:3])  # fewer images than ranks

    from imtm.engine import distributed

    out["gathered_list"] = distributed.gather_value([f"r{rank}"] * (rank + 1))

    out["odd_gather"] = gather_odd_value(rank)
    toy = toy_data(n_images=12, cpi=2)  # 24 items: 4 global batches of 2 x 3 per epoch
    full = toy_matcher(toy, tmp / "a").fit(toy)
    try:
        toy_matcher(toy, tmp / "b").fit(Crashing(toy, 7))
        out["crashed"] = False
    except RuntimeError as err:
        out["crashed"] = "simulated crash" in str(err)
    resumed = toy_matcher(toy, tmp / "b").fit(toy, resume=True)
    out["full"] = full.components_.state_dict()
    out["resumed"] = resumed.components_.state_dict()
    return out


def gather_odd_value(rank: int) -> str:
    from imtm.engine import distributed

    distributed.setup()
    try:
        distributed.gather_value(object())
    except TypeError as err:
        return str(err)
    return "no error"
