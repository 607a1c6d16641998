"""The ablation scripts' rows: each row changes what its label says and nothing else."""

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(BENCH))
    try:
        yield {
            name: importlib.import_module(name)
            for name in ("ela_ablation", "dcpa_ablation", "laps_ablation")
        }
    finally:
        sys.path.remove(str(BENCH))


def test_ela_table6_keeps_mlm_constant(scripts):
    rows = scripts["ela_ablation"].ROWS
    assert {flags["mlm"] for _, flags in rows} == {True}
    # Consecutive rows switch on one part each: lexicon, then expansion, then distillation.
    switched = [{k for k in a if a[k] != b[k]} for (_, a), (_, b) in zip(rows, rows[1:])]
    assert switched == [{"lexicon"}, {"expansion"}, {"distillation"}]


def test_laps_table4_rows_are_all_there(scripts):
    kws = [kw for _, kind, kw in scripts["laps_ablation"].ROWS if kind == "laps"]
    for want in (
        {"calibration": False},
        {"attentive_only": True},
        {"clustering": True},
        {"alignment": "scan"},
        {"word_selection": True},
        {"word_aggregation": True},
        {"word_selection": True, "word_aggregation": True},
        {"language_context": False},
        {"fusion": False},
    ):
        assert want in kws, want


def test_dcpa_table3_and_table4_rows_are_apart():
    text = (BENCH / "dcpa_ablation.py").read_text()
    assert (
        "global average (Table III, SAEM)" in text
        and "w/o local-agg, global average (Table IV)" in text
    )
    assert "intra_only(train, k=None" in text and 'presets.build("dcpa", train, k=None' in text
