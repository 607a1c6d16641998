"""What ``torch.compile`` sees: losses trace as one graph, and new captions never recompile an encoder.

The ``eager`` backend traces with Dynamo (graph breaks and guards are the same as with
Inductor) without generating code, so these checks take seconds on a CPU.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from imtm.components import GRUTextEncoder, TripletLoss
from imtm.components.losses import InfoNCELoss
from imtm.components.losses.matching import MaskedLanguageModelingLoss
from imtm.data import Vocabulary
from imtm.functional.losses import triplet_loss

CAPTIONS = [
    "a red circle left of a blue square",
    "two small green stars",
    "a big yellow cross at the top",
    "one purple diamond",
    "a black plus sign next to a white circle and a red star",
]


def _positives(n: int) -> torch.Tensor:
    ids = torch.arange(n)
    return ids[:, None] == ids[None, :]


@pytest.mark.parametrize(
    "make", [lambda: TripletLoss(), lambda: TripletLoss(hardest=False), lambda: InfoNCELoss()]
)
def test_losses_compile_fullgraph(make):
    torch._dynamo.reset()
    loss = make()
    scores = torch.randn(6, 6, requires_grad=True)
    compiled = torch.compile(loss, fullgraph=True, backend="eager")
    got = compiled(scores, _positives(6))
    torch.testing.assert_close(got, loss(scores, _positives(6)))
    got.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("n_picked", [0, 1, 4])
def test_masked_lm_loss_compiles_fullgraph_whatever_the_number_of_picked_words(n_picked):
    # The number of picked words depends on the draw: selecting them would make a data-dependent
    # size, which fullgraph=True refuses. Compared with the mean of Eq. 11 over the picked words.
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(n_picked)
    logits = torch.randn(3, 5, 11, generator=gen, requires_grad=True)
    labels = torch.full((3, 5), -100)
    where = torch.randperm(15, generator=gen)[:n_picked]
    labels.view(-1)[where] = torch.randint(0, 11, (n_picked,), generator=gen)
    compiled = torch.compile(MaskedLanguageModelingLoss(), fullgraph=True, backend="eager")
    got = compiled(logits, labels)
    terms = [
        -torch.log_softmax(logits[b, j], -1)[labels[b, j]]
        for b in range(3)
        for j in range(5)
        if labels[b, j] != -100
    ]
    want = torch.stack(terms).mean() if terms else torch.tensor(0.0)
    torch.testing.assert_close(got, want)
    got.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_loss_checks_still_run_eagerly():
    # The value checks are skipped only inside a compiled region.
    with pytest.raises(ValueError, match="no True entry"):
        triplet_loss(torch.randn(3, 3), torch.zeros(3, 3, dtype=torch.bool))


def test_gru_encoder_compiles_once_for_any_captions():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    enc = GRUTextEncoder(Vocabulary.build(CAPTIONS), out_dim=8, word_dim=6)
    compiled = torch.compile(enc, backend="eager", dynamic=True)
    graphs = []
    for k in range(4):
        batch = CAPTIONS[k:] + CAPTIONS[:k][: 1 + k % 2]
        got, want = compiled(batch), enc(batch)
        torch.testing.assert_close(got.feats, want.feats)
        assert torch.equal(got.mask, want.mask)
        graphs.append(counters["stats"]["unique_graphs"])
    # Captions (strings) never reach a guard: new batches reuse what the first one traced.
    assert graphs[1:] == [graphs[0]] * 3, graphs
    assert enc.compute(*enc.prepare(CAPTIONS)).feats.shape == enc(CAPTIONS).feats.shape


def test_gru_encoder_prepare_checks_inputs():
    enc = GRUTextEncoder(Vocabulary.build(CAPTIONS), out_dim=8, word_dim=6)
    with pytest.raises(TypeError, match="one string"):
        enc.prepare("a red circle")


def test_matcher_compile_leaves_blocks_that_do_not_gain_eager():
    # The GRU encoder's cost is its packed RNN kernel: compiling it only added graph breaks (vsepp's
    # step was slower compiled), so Matcher(compile=True) compiles the other blocks only.
    from imtm import Matcher, presets
    from imtm.data import synthetic
    from imtm.matcher import _CompiledCall

    train = synthetic.load(view="regions", seed=0, n_train=8, n_dev=2, n_test=2)[0]
    m = Matcher(
        presets.build("vsepp", train, embed_dim=8, word_dim=8),
        epochs=1,
        batch_size=20,
        compile=True,
        verbose=False,
        device="cpu",
    ).fit(train)
    compiled = {
        name: isinstance(b._compiled_call_impl, _CompiledCall) for name, b in m.components_.items()
    }
    assert compiled["text"] is False and not GRUTextEncoder.compiles
    assert compiled["scorer"] is True, compiled
    s = m.similarity(train.images[:3], train.captions[:4])
    assert s.shape == (3, 4) and bool(torch.isfinite(s).all())


def test_matcher_compile_leaves_blocks_slower_compiled_on_the_cpu_eager_there_only(monkeypatch):
    # ELA's transformer-layer blocks and transport loss measured slower compiled than eager on the
    # CPU (benchmarks/README.md, bench_compile.py): there Matcher(compile=True) leaves them eager; on
    # another device (here the Matcher is told it runs on one; nothing is called) they compile.
    from imtm import Matcher
    from imtm.components import (
        CrossModalEncoder,
        ExpansiveLexiconLoss,
        GlobalCosine,
        ImageTextMatchingHead,
        InterModalPhraseAttention,
        TextualPhraseEncoder,
        VisualPhraseEncoder,
        WordToLexiconHead,
    )
    from imtm.matcher import _CompiledCall

    for cls in (
        CrossModalEncoder,
        ImageTextMatchingHead,
        WordToLexiconHead,
        ExpansiveLexiconLoss,
        VisualPhraseEncoder,
        TextualPhraseEncoder,
    ):
        assert cls.compiles and not cls.compiles_on_cpu, cls
    assert GlobalCosine.compiles_on_cpu
    # DCPA's inter-modal attention and the pairwise scorers that are one call into a blocked engine
    # run it eagerly in any compiled region: never compiled (compiled, they only added graph breaks).
    from imtm.components import (
        HardAssignmentCoding,
        LocalMatching,
        ScanAttention,
        SoftAssignmentCoding,
        SparsePatchWordAlignment,
    )

    for cls in (
        InterModalPhraseAttention,
        HardAssignmentCoding,
        SoftAssignmentCoding,
        LocalMatching,
        ScanAttention,
        SparsePatchWordAlignment,
    ):
        assert not cls.compiles, cls
    m = Matcher([], compile=True, device="cpu", verbose=False)
    enc = CrossModalEncoder(8, layers=1, heads=2)
    m.components_ = torch.nn.ModuleDict({"cross": enc, "scorer": GlobalCosine()})

    def compiled():
        return {
            n: isinstance(b._compiled_call_impl, _CompiledCall) for n, b in m.components_.items()
        }

    m._sync_compile()
    assert compiled() == {"cross": False, "scorer": True}
    monkeypatch.setattr(Matcher, "_device", lambda self: torch.device("cuda"))
    m._sync_compile()
    assert compiled() == {"cross": True, "scorer": True}


def test_transformer_layers_run_eagerly_inside_a_compiled_block_on_the_cpu():
    # A user's torch.compile of the cross-modal encoder: the layers are a graph break on the CPU
    # (never traced), the rest of the block is compiled, and the output is eager's.
    from imtm import Tokens
    from imtm.components import CrossModalEncoder

    torch._dynamo.reset()
    torch.manual_seed(0)
    enc = CrossModalEncoder(8, layers=1, heads=2)
    seen = []
    enc.encoder.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(torch.compiler.is_compiling()), with_kwargs=True
    )
    images = Tokens(torch.randn(3, 5, 8))
    texts = Tokens.from_lengths(torch.randn(3, 4, 8), [4, 2, 3])
    want = enc(images, texts).feats
    got = torch.compile(enc, backend="eager")(images, texts).feats
    torch.testing.assert_close(got, want)
    assert seen == [False, False], seen
