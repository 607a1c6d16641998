"""Distributed training and evaluation: 2 gloo processes on the CPU against one process."""

import dist_light_workers as light
import dist_workers as w
import numpy as np
import pytest
import torch
import torch.distributed as dist

from imtm import Matcher
from imtm.engine import distributed
from imtm.engine.checkpoint import CheckpointError
from imtm.engine.training import EpochSampler
from imtm.testing.distributed import run_ranks

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def t(x):
    return torch.as_tensor(x) if isinstance(x, np.ndarray) else x


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    return tmp, run_ranks(w.all_checks, nprocs=2, args=(str(tmp),), timeout=240)


# ---------------------------------------------------------------- gathered losses and gradients
@pytest.mark.parametrize("which, start", [("step_first", 0), ("step_last", 2)])
def test_two_ranks_compute_the_loss_and_gradients_of_the_combined_batch(ranks, which, start):
    _, res = ranks
    train = w.data()
    single = w.one_step_gradients(w.matcher(train, 2 * w.BATCH), train, start)
    shares = [r[which]["n_local"] for r in res]
    assert sum(shares) == single["n_local"]
    if start == 2:
        assert shares == [3, 2]  # the last global batch of 5, split unevenly
    for r in res:
        assert set(r[which]["logs"]) == {"triplet", "nce"}
        for name, value in single["logs"].items():
            torch.testing.assert_close(r[which]["logs"][name], value, rtol=1e-5, atol=1e-6)
        assert set(r[which]["grads"]) == set(single["grads"])
        for name, g in single["grads"].items():
            # encoders (gathered rows), the scorer side and the learned temperature alike
            torch.testing.assert_close(
                t(r[which]["grads"][name]), g, rtol=1e-4, atol=1e-6, msg=name
            )


@pytest.mark.parametrize("which, start", [("acc_step_first", 0), ("acc_step_last", 2)])
def test_accumulation_on_two_ranks_equals_one_process_with_the_combined_batch(ranks, which, start):
    """accumulate=k under torchrun: cached micro-batches on each rank, the gathered batch's loss,
    one gradient average over the ranks; the gradients of one process with one large batch."""
    _, res = ranks
    train = w.data()
    single = w.one_step_gradients(w.matcher(train, 2 * w.BATCH), train, start)
    assert sum(r[which]["n_local"] for r in res) == single["n_local"]
    for r in res:
        assert set(r[which]["logs"]) == set(single["logs"])
        for name, value in single["logs"].items():
            assert r[which]["logs"][name] == pytest.approx(value, rel=1e-6, abs=1e-6)
        assert set(r[which]["grads"]) == set(single["grads"]) and len(single["grads"]) >= 4
        for name, g in single["grads"].items():
            torch.testing.assert_close(
                t(r[which]["grads"][name]), g, rtol=1e-6, atol=1e-6, msg=name
            )
    # the ranks hold one model: the same averaged gradients, bit for bit
    for name in single["grads"]:
        np.testing.assert_array_equal(res[0][which]["grads"][name], res[1][which]["grads"][name])


def test_accumulated_fit_on_two_ranks_equals_one_process_with_the_combined_batch(ranks):
    _, res = ranks
    train = w.data()
    single = w.matcher(train, 2 * w.BATCH, epochs=2).fit(train)
    for r in res:
        for k, v in single.components_.state_dict().items():
            torch.testing.assert_close(t(r["acc_fit_state"][k]), v, rtol=1e-4, atol=1e-5, msg=k)


def test_gathered_gradient_is_not_the_local_one(ranks):
    """Guard against a test that cannot fail: each rank's share alone gives other gradients."""
    _, res = ranks
    train = w.data()
    local = w.one_step_gradients(w.matcher(train, w.BATCH), train, 0)
    g = t(
        res[0]["step_first"]["grads"]["image.proj.weight"]
        if "image.proj.weight" in local["grads"]
        else next(iter(res[0]["step_first"]["grads"].values()))
    )
    name = (
        "image.proj.weight" if "image.proj.weight" in local["grads"] else next(iter(local["grads"]))
    )
    assert not torch.allclose(g, local["grads"][name], atol=1e-6)


def test_two_ranks_fit_like_one_process_with_the_combined_batch(ranks):
    tmp, res = ranks
    train = w.data()
    single = w.matcher(train, 2 * w.BATCH).fit(train, eval_set=train)
    for r in res:
        for k, v in single.components_.state_dict().items():
            torch.testing.assert_close(t(r["fit_state"][k]), v, rtol=1e-4, atol=1e-5, msg=k)
        hist = [{k: v for k, v in h.items() if k != "time_s"} for h in single.history_]
        assert [h["step"] for h in r["fit_history"]] == [h["step"] for h in hist]
        for a, b in zip(r["fit_history"], hist):
            np.testing.assert_allclose(a["loss/triplet"], b["loss/triplet"], rtol=1e-5)
            np.testing.assert_allclose(a["eval"]["rsum"], b["eval"]["rsum"], rtol=1e-6)
    # rank 0 alone wrote the checkpoints, complete and readable by everyone
    assert (tmp / "fit" / "LATEST").exists()


# ---------------------------------------------------------------- sharded evaluation
def test_sharded_similarity_equals_one_process(ranks):
    tmp, res = ranks
    train = w.data()
    m = Matcher.load(tmp / "final")
    full = m.similarity(train.images, train.captions)
    assert res[1]["sims"] is None  # gathered on rank 0 only
    torch.testing.assert_close(t(res[0]["sims"]), full, rtol=1e-5, atol=1e-6)
    expected = m.evaluate(train)
    for r in res:
        assert r["metrics"].keys() == expected.keys()
        for k, v in expected.items():
            np.testing.assert_allclose(r["metrics"][k], v, rtol=1e-6)


def test_fewer_items_than_ranks_are_scored_whole_on_every_rank(ranks):
    tmp, res = ranks
    train = w.data()
    expected = Matcher.load(tmp / "final").similarity(train.images[:1], train.captions[:3])
    for r in res:
        torch.testing.assert_close(t(r["tiny_sims"]), expected, rtol=1e-5, atol=1e-6)


def test_lists_are_gathered_in_rank_order(ranks):
    _, res = ranks
    for r in res:
        assert r["gathered_list"] == ["r0", "r1", "r1"]


# ---------------------------------------------------------------- checkpoints
def test_two_rank_resume_gives_the_same_weights(ranks):
    _, res = ranks
    for r in res:
        assert r["crashed"]
        for k, v in r["full"].items():
            torch.testing.assert_close(t(r["resumed"][k]), t(v), rtol=0, atol=0, msg=k)
    # the two ranks hold the same model (DDP keeps them in step)
    for k in res[0]["full"]:
        torch.testing.assert_close(t(res[0]["full"][k]), t(res[1]["full"][k]), rtol=0, atol=0)


def test_resume_with_another_number_of_processes_is_refused(ranks):
    tmp, _ = ranks
    toy = w.toy_data(n_images=12, cpi=2)
    with pytest.raises(CheckpointError, match="2 process"):
        w.toy_matcher(toy, tmp / "a").fit(toy, resume=True)


# ---------------------------------------------------------------- helpers, one process
def test_single_process_helpers_are_the_identity():
    assert not distributed.setup()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(x) is x
    assert distributed.gather_value([1, 2]) == [1, 2]
    assert distributed.gather_rows_to_main(x) is x
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_objects(5) == [5]
    distributed.barrier()


@pytest.mark.parametrize("n, world", [(10, 3), (2, 2), (7, 4), (0, 2)])
def test_shard_range_covers_everything_once(n, world):
    rows = [list(range(*distributed.shard_range(n, rank=r, world=world))) for r in range(world)]
    assert [i for r in rows for i in r] == list(range(n))
    assert max(map(len, rows)) - min(map(len, rows)) <= 1


@pytest.mark.parametrize(
    "n, b, world, start", [(21, 4, 2, 0), (20, 3, 3, 1), (5, 2, 4, 0), (9, 1, 2, 3)]
)
def test_sharded_batches_rebuild_the_single_process_batches(n, b, world, start):
    per_rank = [
        list(
            distributed.ShardedBatchSampler(
                n, b, seed=3, epoch=1, rank=r, world=world, start_batch=start
            )
        )
        for r in range(world)
    ]
    assert len({len(p) for p in per_rank}) == 1
    assert len(per_rank[0]) == len(
        distributed.ShardedBatchSampler(
            n, b, seed=3, epoch=1, rank=0, world=world, start_batch=start
        )
    )
    order = EpochSampler(n, 3, 1).order()
    glob = b * world
    for t_, shares in enumerate(zip(*per_rank), start=start):
        assert all(shares)  # no rank is ever left without data
        joined = [i for s in shares for i in s]
        expected = order[t_ * glob : (t_ + 1) * glob]
        assert joined[: len(expected)] == expected
        assert (
            joined[len(expected) :] == order[: len(joined) - len(expected)]
        )  # top-up of a tiny last batch


def test_setup_needs_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.setup()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        distributed.env_world_size()


def test_local_device_pins_cuda_to_the_local_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.local_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert distributed.local_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert distributed.local_device(torch.device("cpu")) == torch.device("cpu")


# ---------------------------------------------------------------- the spawning helper
def test_gather_of_an_unknown_value_is_a_clear_error(ranks):
    _, res = ranks
    assert all("cannot gather a batch value of type object" in r["odd_gather"] for r in res)


def test_run_ranks_reports_a_failing_rank():
    with pytest.raises(RuntimeError, match="rank 0 gives up"):
        run_ranks(light.fails, nprocs=1, timeout=120)


def test_run_ranks_times_out_instead_of_hanging():
    with pytest.raises(TimeoutError, match="did not finish"):
        run_ranks(light.sleeps, nprocs=1, timeout=3)
