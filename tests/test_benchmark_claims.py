"""The seeded claim tables of benchmarks/_results.py, and the ablation scripts' --quick modes."""

import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ROOT = BENCH.parent


def _bench_module(name):
    """Import ``benchmarks/<name>.py`` (the folder on ``sys.path`` while the fixture lives)."""
    import importlib

    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def _run_quick(tmp_path, script, *args):
    """``benchmarks/<script> --quick *args`` in a fresh process, from ``tmp_path``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def results():
    yield from _bench_module("_results")


def _runs(values):
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
    return [{**{k: v / 6 for k in keys}, "rsum": v, "fit_s": 10 * v} for v in values]


def test_seeded_table_cells_are_mean_and_sample_std(results):
    per = {"a": _runs([100.0, 110.0, 120.0]), "b": _runs([50.0])}
    lines = results.seeded_table(per, extra=(("fit (s)", "fit_s", ".0f"),))
    assert lines[0].startswith("| model | i2t R@1") and lines[0].endswith("| fit (s) | seeds |")
    row_a = [c.strip() for c in lines[2].strip("|").split("|")]
    # A plain computation of the rSum cell: mean and sample standard deviation.
    m = sum([100.0, 110.0, 120.0]) / 3
    sd = (sum((x - m) ** 2 for x in [100.0, 110.0, 120.0]) / 2) ** 0.5
    assert row_a[7] == f"{m:.1f} +- {sd:.1f}" == "110.0 +- 10.0"
    assert row_a[8] == "1100 +- 100" and row_a[9] == "3"
    assert lines[3].split("|")[8].strip() == "50.0 +- 0.0"
    assert results.mean_std([1.0, 2.0, 4.0]) == pytest.approx(
        (statistics.fmean([1, 2, 4]), statistics.stdev([1, 2, 4]))
    )


@pytest.mark.parametrize(
    "a, b, verdict",
    [
        ([10.0, 12.0, 11.0], [9.0, 10.0, 10.5], "the claim reproduces here"),
        ([8.0, 9.0, 7.0], [9.0, 10.0, 10.5], "the claim does not reproduce here"),
        (
            [10.0, 9.0, 11.0],
            [9.0, 10.0, 10.5],
            "the claim is not settled (mixed across seeds) here",
        ),
    ],
)
def test_claim_reading_is_read_off_the_paired_seeds(results, a, b, verdict):
    text = results.claim_reading(
        {"m": _runs(a), "base": _runs(b)}, "m", "base", "M beats the base:"
    )
    assert text.endswith(verdict + ".")
    diffs = [x - y for x, y in zip(a, b)]
    assert f"paired difference {statistics.fmean(diffs):+.1f}" in text
    assert f"higher on {sum(d > 0 for d in diffs)} of 3 seeds" in text


def test_claim_reading_needs_its_rows(results):
    with pytest.raises(KeyError):
        results.claim_reading({"m": _runs([1.0])}, "m", "missing", "x")


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, needle",
    [
        ("laps_ablation.py", "Slimming keeps accuracy (LAPS vs all patches):"),
        ("chan_ablation.py", "Hard assignment coding beats soft (cross-attention) coding:"),
        ("dias_ablation.py", "The DIAS losses improve the local matching model:"),
        ("dcpa_ablation.py", "Decoupling helps (decoupled vs coupled):"),
    ],
)
def test_ablation_scripts_quick_mode_prints_a_seeded_page(script, needle, tmp_path):
    out = tmp_path / "page.md"
    proc = _run_quick(tmp_path, script, "--out", str(out))
    assert needle in proc.stdout and "| model | i2t R@1" in proc.stdout and "+- " in proc.stdout
    assert not out.exists()  # --quick prints; it never overwrites a results page


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, rows",
    [
        ("chan_margin.py", ("| margin 0.2, summed negatives |", "| margin 0.005 (the authors'")),
        (
            "dias_readings.py",
            ("| LocalMatching, linear weights", "mask 'printed' (the preset's default"),
        ),
    ],
)
def test_reading_scripts_quick_mode_prints_their_table(script, rows, tmp_path):
    out = tmp_path / "page.md"
    proc = _run_quick(tmp_path, script, "--out", str(out))
    assert all(row in proc.stdout for row in rows) and "| rSum per seed |" in proc.stdout
    assert not out.exists() and not (tmp_path / "docs").exists()  # --quick never writes a page


@pytest.fixture
def ela_ablation():
    yield from _bench_module("ela_ablation")


def test_ela_pretrain_arguments(ela_ablation):
    args = ela_ablation.parse_args(["--quick", "--pretrain", "500"])
    assert (args.pretrain, args.pretrain_epochs, args.out) == (16, 1, ela_ablation.PRETRAIN_PAGE)
    assert ela_ablation.parse_args([]).out == ela_ablation.PAGE  # no --pretrain: the Table 6 page
    for bad in (["--pretrain", "-1"], ["--pretrain", "10", "--pretrain-epochs", "0"]):
        with pytest.raises(SystemExit):
            ela_ablation.parse_args(bad)


@pytest.mark.slow
def test_ela_pretrain_fine_tunes_the_pretrained_model(ela_ablation, monkeypatch):
    # Each row trains on the pre-training split afresh, then continues (warm start) on the
    # training split: the history of the fine-tuned model holds both runs' epochs.
    calls = []
    fit = ela_ablation.Matcher.fit

    def recording_fit(self, data, *a, **kw):
        out = fit(self, data, *a, **kw)
        calls.append((data.split, kw.get("warm_start", False), len(self.history_)))
        return out

    monkeypatch.setattr(ela_ablation.Matcher, "fit", recording_fit)
    args = ela_ablation.parse_args(["--quick", "--pretrain", "8"])
    pre = ela_ablation.synthetic.load_pretraining(
        args.pretrain,
        image_size=args.image_size,
        exclude_seeds=(0,),
        benchmark_sizes={"n_train": args.n_train, "n_dev": 10, "n_test": args.n_test},
    )
    results, _, figure, train, _ = ela_ablation.run_seed_pretrain(0, args, pre)
    assert calls == [("pretrain", False, 1), ("train", True, 2)] * 2
    assert {s.signature() for s in pre.scenes}.isdisjoint(s.signature() for s in train.scenes)
    for label in ("ITC + ITM + MLM (baseline)", "+ distillation (ELA)"):
        for stage in ela_ablation.STAGES:
            assert 0 <= results[f"{label}, {stage}, ITC ranking"]["rsum"] <= 600
    assert figure is not None and figure[0][0].startswith("**Test image 0.**")


@pytest.mark.slow
def test_ela_pretrain_quick_mode_prints_both_settings(tmp_path):
    out = tmp_path / "page.md"
    proc = _run_quick(tmp_path, "ela_ablation.py", "--pretrain", "8")
    for stage in ("zero-shot", "fine-tuned"):
        for label in ("ITC + ITM + MLM (baseline)", "+ distillation (ELA)"):
            assert f"| {label}, {stage}, ITC ranking | " in proc.stdout
        assert (
            f"Lexicon alignment beats the ITC + ITM baseline ({stage}, ITC ranking):" in proc.stdout
        )
    assert "minutes of wall time" in proc.stdout and "--pretrain 8" in proc.stdout
    assert not out.exists() and not (tmp_path / "docs").exists()  # --quick never writes a page


@pytest.fixture
def laps_selection():
    yield from _bench_module("laps_selection")


def test_laps_selection_readings_match_a_loop(laps_selection):
    import torch

    gen = torch.Generator().manual_seed(0)
    n_img, n_cap, n = 3, 7, 9
    keep = torch.rand(n_img, n_cap, n, generator=gen) < 0.5
    touched = torch.rand(n_img, n, generator=gen) < 0.3
    touched[2] = False  # an image without objects counts in no precision or recall
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    got = laps_selection.selection_readings(keep, touched, owner)
    prec, rec, best, foreign = [], [], [], []
    for c in range(n_cap):
        i, o = int(owner[c]), (int(owner[c]) + 1) % n_img
        k, t = keep[i, c].tolist(), touched[i].tolist()
        if any(t):
            both = sum(a and b for a, b in zip(k, t))
            prec.append(both / max(1, sum(k)))
            rec.append(both / sum(t))
            best.append(min(sum(k), sum(t)) / sum(t))
        kf, tf = keep[o, c].tolist(), touched[o].tolist()
        if any(tf):
            foreign.append(sum(a and b for a, b in zip(kf, tf)) / max(1, sum(kf)))
    jac = []
    for i in range(n_img):
        mine = [c for c in range(n_cap) if int(owner[c]) == i]
        a, b = keep[i, mine[0]].tolist(), keep[i, mine[1]].tolist()
        jac.append(sum(x and y for x, y in zip(a, b)) / max(1, sum(x or y for x, y in zip(a, b))))
    want = {
        "precision": statistics.fmean(prec),
        "recall": statistics.fmean(rec),
        "best_recall": statistics.fmean(best),
        "precision_foreign": statistics.fmean(foreign),
        "jaccard": statistics.fmean(jac),
        "object_fraction": float(touched.float().mean()),
    }
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
def test_laps_selection_quick_mode_prints_its_table(tmp_path):
    proc = _run_quick(tmp_path, "laps_selection.py", "--out", str(tmp_path / "page.md"))
    assert "| precision: kept patches on an object, own caption |" in proc.stdout
    assert "Read from the table: the kept patches lie on an object" in proc.stdout
    assert not (tmp_path / "page.md").exists()


@pytest.fixture
def dcpa_budget():
    yield from _bench_module("dcpa_budget")


def test_dcpa_budget_readings_are_the_fusion_of_one_model(dcpa_budget, tmp_path):
    """The three readings come from one set of weights: fused = 0.6 intra + 0.4 inter, per direction."""
    import torch

    from imtm.compare import CompareSettings

    s = CompareSettings(
        epochs=2, n_train=12, n_dev=2, n_test=4, batch_size=6, embed_dim=16, word_dim=16
    )
    train, _, test = dcpa_budget.load_splits("synthetic", "regions", s)
    comps, _ = dcpa_budget.build_components("dcpa", train, s, tmp_path)
    m = dcpa_budget.make_matcher("dcpa", comps, s, test).fit(train)
    trained = m.components_["fusion"].weights
    got = dcpa_budget.dcpa_readings(m, test)
    fused, intra, inter = (got[k] for k in dcpa_budget.READINGS)
    assert fused.shape == intra.shape == inter.shape == (2, 4, 20)
    torch.testing.assert_close(intra[0], intra[1])  # the intra-modal score is one matrix
    assert not torch.allclose(inter[0], inter[1])  # each direction has its own branch
    torch.testing.assert_close(fused, 0.6 * intra + 0.4 * inter, rtol=1e-5, atol=1e-6)
    assert m.components_["fusion"].weights is trained


@pytest.mark.slow
def test_dcpa_budget_quick_mode_prints_its_table(tmp_path):
    proc = _run_quick(tmp_path, "dcpa_budget.py", "--out", str(tmp_path / "page.md"))
    for reading in (
        "fused (0.6 intra + 0.4 inter)",
        "intra-modal score alone",
        "inter-modal branches alone",
    ):
        assert proc.stdout.count(f"| DCPA, {reading} |") == 3  # three budgets at 2 epochs
    assert proc.stdout.count("| VSE++ (global baseline, same budget) |") == 3
    assert "split 1 + 1" not in proc.stdout  # at 2 epochs the 3 + 1 row would repeat the default
    assert "## Read from the table" in proc.stdout
    assert not (tmp_path / "page.md").exists()
