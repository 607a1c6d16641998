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
