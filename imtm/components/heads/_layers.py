"""Transformer layers that stay eager on the CPU, also inside a compiled block."""

from __future__ import annotations

import torch
from torch import nn


def _run(encoder: nn.TransformerEncoder, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    return encoder(x, src_key_padding_mask=pad)


#: The same call, never traced: inside a compiled block it is a graph break and runs as it is.
_run_eager = torch.compiler.disable(_run)


def transformer_layers(
    encoder: nn.TransformerEncoder, x: torch.Tensor, pad: torch.Tensor
) -> torch.Tensor:
    """``encoder(x, src_key_padding_mask=pad)``; on the CPU never compiled.

    Inductor's CPU code for ``nn.TransformerEncoderLayer`` in training measured slower than eager
    at every width tried (forward and backward of one layer on 48 pairs of 65 patches and up to 23
    words, one thread, ``benchmarks/bench_compile.py --encoder-layer``: eager 13.4 against
    Inductor 20.1 ms at D = 32, 93.7 against 116.4 ms at D = 128, 291.4 against 338.7 ms at
    D = 256; ``benchmarks/README.md``), so under ``torch.compile`` (a user's own, of a block that
    calls this) the layers run eagerly there; elsewhere they compile.

    Shape:
        - x: ``(B, L, D)``, pad: ``(B, L)`` bool, True at padding; output: ``(B, L, D)``
    """
    run = _run_eager if x.device.type == "cpu" else _run
    return run(encoder, x, pad)
