import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("TQDM_DISABLE", "1")

SHARED_CAPTIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "captions"


@pytest.fixture
def shared_captions():
    if not SHARED_CAPTIONS.is_dir():
        pytest.skip("../shared/data/captions is not present")
    return SHARED_CAPTIONS
