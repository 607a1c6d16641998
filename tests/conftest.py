import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("TQDM_DISABLE", "1")

# hypothesis profiles. "repeatable" (the default) draws the same examples on every run, derived from
# each test's name, and sets no deadline, so the suite passes or fails the same way on every
# machine: CI never turns red on a lucky draw or a slow moment of a shared machine.
# HYPOTHESIS_PROFILE=explore draws fresh random examples (hypothesis' own default);
# HYPOTHESIS_PROFILE=thorough draws fresh ones and ten times more of them wherever a test sizes
# its examples from settings.default (the property sweeps do). Run those to look for bugs.
settings.register_profile("repeatable", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

SHARED_CAPTIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "captions"


#: The smallest normal float64: a quarter of it is a subnormal number, or 0 under flush-to-zero.
_SMALLEST_NORMAL = 2.2250738585072014e-308


@pytest.fixture(autouse=True)
def _subnormals_stay_representable():
    """torch 2.4's inductor loads its CPU kernels from a library built with -ffast-math, which turns
    on flush-to-zero for the whole process (torch 2.14 does not): a test that compiled a block would
    change the floats of every later test (hypothesis refuses to draw subnormals then). Restored
    after such a test; imtm itself never changes it."""
    yield
    if _SMALLEST_NORMAL / 4 == 0.0:
        torch.set_flush_denormal(False)


@pytest.fixture
def shared_captions():
    if not SHARED_CAPTIONS.is_dir():
        pytest.skip("../shared/data/captions is not present")
    return SHARED_CAPTIONS


def pytest_collection_modifyitems(config, items):
    # Tests marked gpu need a CUDA device (benchmarks/gpu_suite.py runs them on one); skipped without.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (pytest -m gpu; benchmarks/gpu_suite.py)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
