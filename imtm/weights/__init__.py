"""Backbones pre-trained on the synthetic benchmark's pre-training split, shipped with the package.

They play on the built-in benchmark the role ImageNet ViTs and BERT play in the papers:
pixel presets fine-tune them instead of training from scratch. They are loaded offline by
name, as real pretrained weights are:

- ``TimmVisionEncoder("synthetic-vit")``: a timm ViT (``vit_tiny_patch16_224`` reshaped to 4
  blocks of width 64, 2 heads, 8 x 8 patches, 64 x 64 images: 64 patch tokens plus [CLS]);
- ``HFTextEncoder("synthetic-bert")``: a BERT (2 layers, width 64, 2 heads) whose word-level
  vocabulary covers the synthetic captions' grammar.

``benchmarks/pretrain_synthetic.py`` makes them (seeded; rerunning it reproduces the files):
contrastive image-caption learning (InfoNCE) on the pre-training split
(:func:`imtm.data.synthetic.load_pretraining`, disjoint from the benchmark's splits of seeds
0-2), per-patch colour and shape prediction for the ViT and masked language modelling for
the BERT. ``synthetic_backbones.json`` next to the files records how they were made.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = [
    "PACKAGED_TEXT",
    "PACKAGED_VISION",
    "WEIGHTS_DIR",
    "packaged_text_path",
    "packaged_vision",
    "record",
]

#: The folder of the packaged weights.
WEIGHTS_DIR = Path(__file__).resolve().parent

#: Packaged vision backbones: name -> timm architecture, its ``create_model`` keywords, the
#: image side the weights were trained at, and the safetensors file (a timm state dict).
PACKAGED_VISION: dict[str, dict] = {
    "synthetic-vit": {
        "model_name": "vit_tiny_patch16_224",
        "model_kwargs": {"depth": 4, "embed_dim": 64, "num_heads": 2, "patch_size": 8},
        "img_size": 64,
        "file": "synthetic_vit.safetensors",
    },
}

#: Packaged text backbones: name -> folder (config.json, vocab.txt, tokenizer_config.json,
#: model.safetensors) under :data:`WEIGHTS_DIR`.
PACKAGED_TEXT: dict[str, str] = {"synthetic-bert": "synthetic_bert"}


def packaged_vision(name) -> dict | None:
    """The entry of :data:`PACKAGED_VISION` for ``name`` with ``file`` made a full path, or ``None``.

    Example:
        >>> packaged_vision("synthetic-vit")["model_kwargs"]["patch_size"]
        8
        >>> packaged_vision("vit_base_patch16_224") is None
        True
    """
    if not isinstance(name, str) or name not in PACKAGED_VISION:
        return None
    entry = dict(PACKAGED_VISION[name])
    entry["model_kwargs"] = dict(entry["model_kwargs"])
    entry["file"] = str(WEIGHTS_DIR / entry["file"])
    return entry


def packaged_text_path(name) -> str | None:
    """The folder of the packaged text backbone ``name``, or ``None`` when ``name`` is not one.

    Example:
        >>> Path(packaged_text_path("synthetic-bert")).name
        'synthetic_bert'
    """
    if not isinstance(name, str) or name not in PACKAGED_TEXT:
        return None
    return str(WEIGHTS_DIR / PACKAGED_TEXT[name])


def record() -> dict:
    """How the packaged backbones were made (``synthetic_backbones.json``: command, seed, objective, cost)."""
    return json.loads((WEIGHTS_DIR / "synthetic_backbones.json").read_text(encoding="utf-8"))
