"""Every entry point loads a saved model in a fresh process (issue 16, item 1).

``Matcher.load`` registers every imtm block itself (and the blocks that installed
packages declare in the ``imtm.components`` entry-point group), so a model trained by
``imtm train`` in one process is evaluated, drawn and loaded by the Python API in others
that imported nothing else first. Third-party blocks are reached only through a
registration (an import, ``imtm.register`` or the entry-point group), never by a path
named in a file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import imtm
from imtm.component import COMPONENT_REGISTRY

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["a", "dog", "cat", "runs", "sits", "on", "the", "red", "grass", "mat"]


def run(args, cwd, *, env_extra=None, check=True, timeout=240):
    """Run a fresh Python process with this checkout's imtm first on the path."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT)] + list(env_extra or [])),
        TQDM_DISABLE="1",
    )
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check:
        assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def write_precomp(root: Path, *, n_images=(12, 4, 4), regions=6, dim=8, cpi=5, seed=0) -> Path:
    """A tiny folder in the SCAN precomputed layout (train, dev, test)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "dev", "test"), n_images):
        np.save(
            root / f"{split}_ims.npy", rng.standard_normal((n, regions, dim)).astype(np.float32)
        )
        caps = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))) for _ in range(n * cpi)]
        (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``imtm train --preset chan`` on a tiny precomputed folder, in its own process."""
    base = tmp_path_factory.mktemp("journey")
    data = write_precomp(base / "data")
    out = base / "run"
    run(
        [
            "-m",
            "imtm",
            "train",
            "--preset",
            "chan",
            "--data",
            str(data),
            "--epochs",
            "1",
            "--embed-dim",
            "8",
            "--word-dim",
            "8",
            "--batch-size",
            "32",
            "--out",
            str(out),
            "--quiet",
        ],
        cwd=base,
    )
    assert (out / "final" / "config.json").is_file()
    return base, data, out / "final"


def test_imtm_evaluate_loads_a_model_trained_by_imtm_train_in_another_process(trained):
    base, data, model = trained
    proc = run(
        [
            "-m",
            "imtm",
            "evaluate",
            "--model",
            str(model),
            "--data",
            str(data),
            "--split",
            "test",
            "--quiet",
        ],
        cwd=base,
    )
    assert "rSum" in proc.stdout and "| final |" in proc.stdout, proc.stdout


def test_imtm_viz_loads_a_saved_model_in_a_fresh_process(trained):
    pytest.importorskip("matplotlib")
    base, data, model = trained
    png = base / "recall.png"
    run(
        [
            "-m",
            "imtm",
            "viz",
            "recall",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(png),
        ],
        cwd=base,
    )
    assert png.stat().st_size > 0


def test_the_python_api_loads_a_saved_model_having_imported_only_matcher(trained):
    base, data, model = trained
    code = textwrap.dedent(f"""
        import sys
        from imtm.matcher import Matcher
        assert "imtm.components.encoders.precomputed" not in sys.modules
        m = Matcher.load({str(model)!r}, device="cpu")
        import numpy, torch
        images = torch.from_numpy(numpy.load({str(data / "test_ims.npy")!r}))
        first = next(iter(m.components_.values()))
        print(type(first).__name__, m.similarity(images, ["a red dog", "the cat"]).shape)
    """)
    proc = run(["-c", code], cwd=base)
    assert "PrecomputedEncoder torch.Size([4, 2])" in proc.stdout, proc.stdout


# ---------------------------------------------------------------- third-party blocks
BLOCKS = '''
import torch
from imtm import Component


class ThirdPartyScale(Component):
    """A third-party block: multiplies the scores by a learned scalar."""

    requires = ("scores",)
    provides = ("scores",)

    def __init__(self, init=1.0, *, requires=None, provides=None):
        super().__init__(requires=requires, provides=provides)
        self.init = init
        self.scale = torch.nn.Parameter(torch.tensor(float(init)))

    def forward(self, x):
        return x * self.scale
'''

SAVE = """
import sys
from imtm import Matcher
from imtm.components import GlobalCosine, GRUTextEncoder, PrecomputedEncoder, TripletLoss
from imtm.data import PrecompDataset
from thirdparty_blocks import ThirdPartyScale

train = PrecompDataset(sys.argv[1], "train", build_vocab=True)
m = Matcher([PrecomputedEncoder(in_dim=8, out_dim=8), GRUTextEncoder(vocab=train.vocab, word_dim=8, out_dim=8),
             GlobalCosine(), ThirdPartyScale(init=1.5), TripletLoss()],
            epochs=1, batch_size=32, verbose=False, checkpoint_dir=None)
m.fit(train).save(sys.argv[2])
"""

LOAD = """
import sys
from imtm import Matcher
m = Matcher.load(sys.argv[1], device="cpu")
print(type(m.components_["thirdpartyscale"]).__name__, round(float(m.components_["thirdpartyscale"].scale), 3) != 0)
"""


@pytest.fixture(scope="module")
def third_party(tmp_path_factory):
    """A package ``thirdparty_blocks`` with a block, saved in a model by a process that imported it."""
    base = tmp_path_factory.mktemp("thirdparty")
    data = write_precomp(base / "data")
    code = base / "code"
    code.mkdir()
    (code / "thirdparty_blocks.py").write_text(BLOCKS)
    (base / "save.py").write_text(SAVE)
    (base / "load.py").write_text(LOAD)
    run([str(base / "save.py"), str(data), str(base / "model")], cwd=base, env_extra=[str(code)])
    return base, code


def test_a_third_party_block_declared_in_the_entry_point_group_loads_in_a_fresh_process(
    third_party,
):
    base, code = third_party
    site = base / "site"  # an installed distribution: its metadata declares the entry point
    dist = site / "thirdparty_blocks-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-blocks\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[imtm.components]\nscale = thirdparty_blocks:ThirdPartyScale\n"
    )
    proc = run(
        [str(base / "load.py"), str(base / "model")], cwd=base, env_extra=[str(code), str(site)]
    )
    assert "ThirdPartyScale True" in proc.stdout, proc.stdout + proc.stderr


def test_an_undeclared_block_is_refused_and_a_broken_entry_point_named_without_stopping_other_loads(
    third_party, trained
):
    base, code = third_party
    site = base / "broken-site"
    dist = site / "broken_blocks-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-blocks\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[imtm.components]\nbroken = no_such_module_here:Block\n"
    )
    # The block's module is importable but neither imported nor declared: refused, never imported by name.
    proc = run(
        [str(base / "load.py"), str(base / "model")],
        cwd=base,
        env_extra=[str(code), str(site)],
        check=False,
    )
    assert proc.returncode != 0
    assert (
        "unknown block 'ThirdPartyScale'" in proc.stderr
        and "'imtm.components' entry-point group" in proc.stderr
    )
    assert "Entry point 'broken'" in proc.stderr and "no_such_module_here" in proc.stderr, (
        proc.stderr
    )
    # A model of imtm blocks still loads although a third-party entry point is broken.
    model = trained[2]
    out = run(
        [
            "-c",
            f"from imtm import Matcher\nprint(len(Matcher.load({str(model)!r}).components_) > 0)",
        ],
        cwd=base,
        env_extra=[str(site)],
    )
    assert out.stdout.strip() == "True"


def test_imtm_register_is_public_and_refuses_what_is_not_a_block():
    assert imtm.register is imtm.component.register
    with pytest.raises(TypeError, match="only subclasses of imtm.Component"):
        imtm.register(int)
    with pytest.raises(TypeError, match="only subclasses of imtm.Component"):
        imtm.register(lambda x: x)

    @imtm.register
    class RegisteredByDecorator(imtm.Component):
        requires = ("scores",)
        provides = ("scores",)

        def forward(self, scores):
            return scores

    assert COMPONENT_REGISTRY["RegisteredByDecorator"] is RegisteredByDecorator


def test_load_components_reports_nothing_without_third_party_entry_points():
    from imtm.component import load_components

    assert load_components(reload=True) == {}
    assert "PrecomputedEncoder" in COMPONENT_REGISTRY and "MatchingReranker" in COMPONENT_REGISTRY
    assert json.dumps(load_components())  # a plain, printable dict
