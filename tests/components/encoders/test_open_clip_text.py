"""open_clip text towers: a tiny checkpoint written here in open_clip's key layout (``CLIP``: top-level
``token_embedding`` / ``positional_embedding`` / ``transformer.resblocks.{i}`` / ``ln_final``;
``CustomTextCLIP``: the same under ``text.``) is converted into the CLIP text model HFTextEncoder
builds, and its tokens equal a plain re-implementation of open_clip's text transformer."""

import json
import math
import shutil

import pytest
import torch
from clip_towers import openai_clip_visual_state
from hypothesis import given, settings
from hypothesis import strategies as st

from imtm.components import HFTextEncoder
from imtm.components.encoders.hf_text import (
    open_clip_text_config,
    open_clip_text_state_dict,
    write_local_clip,
)

WORDS = ["a red circle left of a blue square", "two green stars above the yellow triangle"]
CAPTIONS = ["a red circle left of a blue square", "two green stars", "yellow"]
WIDTH, HEADS, LAYERS, CONTEXT = 16, 2, 2, 77
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "added_tokens.json",
)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A transformers CLIP folder, for its tokenizer files (open_clip's hub folders hold the same)."""
    return write_local_clip(tmp_path_factory.mktemp("clip"), WORDS, hidden_size=WIDTH)


def _vocab_size(clip_dir):
    return len(json.loads((clip_dir / "vocab.json").read_text()))


def open_clip_state(vocab_size, prefix="", seed=0, visual=True):
    """Random weights under open_clip's names (model.py ``CLIP``, transformer.py ``ResidualAttentionBlock``)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    state = {
        f"{prefix}token_embedding.weight": rnd(vocab_size, WIDTH),
        f"{prefix}positional_embedding": rnd(CONTEXT, WIDTH, scale=0.05),
        f"{prefix}ln_final.weight": 1 + rnd(WIDTH, scale=0.1),
        f"{prefix}ln_final.bias": rnd(WIDTH, scale=0.1),
        f"{prefix}text_projection": rnd(WIDTH, 8),  # pooled-feature projection: unused by tokens
    }
    for i in range(LAYERS):
        b = f"{prefix}transformer.resblocks.{i}."
        state.update(
            {
                b + "ln_1.weight": 1 + rnd(WIDTH, scale=0.1),
                b + "ln_1.bias": rnd(WIDTH, scale=0.1),
                b + "attn.in_proj_weight": rnd(3 * WIDTH, WIDTH),
                b + "attn.in_proj_bias": rnd(3 * WIDTH, scale=0.1),
                b + "attn.out_proj.weight": rnd(WIDTH, WIDTH),
                b + "attn.out_proj.bias": rnd(WIDTH, scale=0.1),
                b + "ln_2.weight": 1 + rnd(WIDTH, scale=0.1),
                b + "ln_2.bias": rnd(WIDTH, scale=0.1),
                b + "mlp.c_fc.weight": rnd(4 * WIDTH, WIDTH),
                b + "mlp.c_fc.bias": rnd(4 * WIDTH, scale=0.1),
                b + "mlp.c_proj.weight": rnd(WIDTH, 4 * WIDTH),
                b + "mlp.c_proj.bias": rnd(WIDTH, scale=0.1),
            }
        )
    if visual:  # the other tower and the temperature, which the text encoder leaves out
        state["visual.conv1.weight"] = rnd(WIDTH, 3, 8, 8)
        state["visual.transformer.resblocks.0.attn.in_proj_weight"] = rnd(3 * WIDTH, WIDTH)
        state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return state


def open_clip_tokens(state, ids, prefix="", quick_gelu=False):
    """open_clip's text transformer on ``ids`` (B, L), written out: per-head causal attention, loops over heads."""

    def ln(x, name):
        return torch.nn.functional.layer_norm(
            x, (WIDTH,), state[prefix + name + ".weight"], state[prefix + name + ".bias"], 1e-5
        )

    def act(x):
        return x * torch.sigmoid(1.702 * x) if quick_gelu else torch.nn.functional.gelu(x)

    length = ids.shape[1]
    x = (
        state[prefix + "token_embedding.weight"][ids]
        + state[prefix + "positional_embedding"][:length]
    )
    head = WIDTH // HEADS
    future = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    for i in range(LAYERS):
        b = f"transformer.resblocks.{i}."
        h = ln(x, b + "ln_1")
        qkv = (
            h @ state[prefix + b + "attn.in_proj_weight"].T
            + state[prefix + b + "attn.in_proj_bias"]
        )
        q, k, v = qkv.split(WIDTH, dim=-1)
        heads = []
        for n in range(HEADS):
            cols = slice(n * head, (n + 1) * head)
            logits = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(head)
            logits = logits.masked_fill(future, float("-inf"))
            heads.append(logits.softmax(-1) @ v[..., cols])
        attn = torch.cat(heads, -1)
        x = (
            x
            + attn @ state[prefix + b + "attn.out_proj.weight"].T
            + state[prefix + b + "attn.out_proj.bias"]
        )
        h = ln(x, b + "ln_2")
        h = act(h @ state[prefix + b + "mlp.c_fc.weight"].T + state[prefix + b + "mlp.c_fc.bias"])
        x = (
            x
            + h @ state[prefix + b + "mlp.c_proj.weight"].T
            + state[prefix + b + "mlp.c_proj.bias"]
        )
    return ln(x, "ln_final")


def write_open_clip_folder(
    folder, clip_dir, state, text_cfg=None, quick_gelu=False, weights="safetensors"
):
    """An open_clip hub folder: open_clip_config.json, its weights file, the tokenizer's files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (clip_dir / name).is_file():
            shutil.copy(clip_dir / name, folder / name)
    cfg = {
        "embed_dim": 8,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": WIDTH, "patch_size": 8},
        "text_cfg": {
            "context_length": CONTEXT,
            "vocab_size": state[
                next(k for k in state if k.endswith("token_embedding.weight"))
            ].shape[0],
            "width": WIDTH,
            "heads": HEADS,
            "layers": LAYERS,
            **(text_cfg or {}),
        },
    }
    if any(k.startswith("text.") for k in state):
        cfg["custom_text"] = True
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    )
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in state.items()}, folder / "open_clip_model.safetensors"
        )
    else:
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.mark.parametrize(
    "prefix, quick_gelu, weights",
    [("", False, "safetensors"), ("text.", True, "safetensors"), ("", True, "bin")],
    ids=["CLIP-gelu", "CustomTextCLIP-quickgelu", "CLIP-bin"],
)
def test_the_converted_text_tower_equals_open_clip_written_out(
    clip_dir, tmp_path, prefix, quick_gelu, weights
):
    state = open_clip_state(_vocab_size(clip_dir), prefix=prefix)
    folder = write_open_clip_folder(
        tmp_path / "oc", clip_dir, state, quick_gelu=quick_gelu, weights=weights
    )
    enc = HFTextEncoder(folder, special_tokens="all").eval()
    assert enc.model.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    ids = enc.tokenize(CAPTIONS)
    out = enc(CAPTIONS)
    expected = open_clip_tokens(state, ids.feats, prefix=prefix, quick_gelu=quick_gelu)
    torch.testing.assert_close(out.mask, ids.mask)
    torch.testing.assert_close(out.feats[ids.mask], expected[ids.mask], rtol=1e-4, atol=1e-5)


def test_open_clip_weights_beside_a_transformers_clip_config(clip_dir, tmp_path):
    # A transformers CLIP folder whose weights are open_clip's: the config.json wins, the weights convert.
    folder = tmp_path / "mixed"
    shutil.copytree(clip_dir, folder)
    (folder / "model.safetensors").unlink()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["text_config"]["hidden_size"] == WIDTH
    cfg["text_config"].update(
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, hidden_act="gelu"
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    state = open_clip_state(_vocab_size(clip_dir), seed=3)
    from safetensors.torch import save_file

    save_file(state, folder / "open_clip_model.safetensors")
    enc = HFTextEncoder(folder, special_tokens="all").eval()
    ids = enc.tokenize(CAPTIONS)
    expected = open_clip_tokens(state, ids.feats)
    torch.testing.assert_close(
        enc(CAPTIONS).feats[ids.mask], expected[ids.mask], rtol=1e-4, atol=1e-5
    )


@settings(max_examples=10, deadline=None)
@given(layers=st.integers(1, 3), width=st.sampled_from([4, 8, 12]), seed=st.integers(0, 1000))
def test_property_every_text_weight_lands_once_and_qkv_split_in_order(layers, width, seed):
    g = torch.Generator().manual_seed(seed)
    state = {
        "token_embedding.weight": torch.randn(5, width, generator=g),
        "positional_embedding": torch.randn(7, width, generator=g),
        "ln_final.weight": torch.randn(width, generator=g),
        "ln_final.bias": torch.randn(width, generator=g),
        "visual.proj": torch.randn(width, 3, generator=g),
    }
    for i in range(layers):
        state[f"transformer.resblocks.{i}.attn.in_proj_weight"] = torch.randn(
            3 * width, width, generator=g
        )
        state[f"transformer.resblocks.{i}.attn.in_proj_bias"] = torch.randn(3 * width, generator=g)
        state[f"transformer.resblocks.{i}.mlp.c_fc.weight"] = torch.randn(
            2 * width, width, generator=g
        )
    out = open_clip_text_state_dict(state)
    assert len(out) == 4 + layers * 7  # 3 weights + 3 biases from in_proj, c_fc
    for i in range(layers):
        fused = state[f"transformer.resblocks.{i}.attn.in_proj_weight"]
        base = f"text_model.encoder.layers.{i}.self_attn."
        for n, part in enumerate("qkv"):
            torch.testing.assert_close(
                out[base + f"{part}_proj.weight"], fused[n * width : (n + 1) * width]
            )
        torch.testing.assert_close(
            out[f"text_model.encoder.layers.{i}.mlp.fc1.weight"],
            state[f"transformer.resblocks.{i}.mlp.c_fc.weight"],
        )
    assert not any(k.startswith("visual") for k in out)


def test_unsupported_towers_and_bad_checkpoints_are_refused(clip_dir, tmp_path):
    vocab = _vocab_size(clip_dir)
    layer_scale = open_clip_state(vocab)
    layer_scale["transformer.resblocks.0.ls_1.gamma"] = torch.ones(WIDTH)
    with pytest.raises(ValueError, match="ls_1.gamma"):
        open_clip_text_state_dict(layer_scale)
    with pytest.raises(ValueError, match="no open_clip text tower"):
        open_clip_text_state_dict({"visual.conv1.weight": torch.zeros(1)})
    folder = write_open_clip_folder(
        tmp_path / "hf",
        clip_dir,
        open_clip_state(vocab),
        text_cfg={"hf_model_name": "roberta-base"},
    )
    with pytest.raises(ValueError, match="not a standard CLIP text transformer"):
        HFTextEncoder(folder)
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        open_clip_text_config(tmp_path)
    # A layer missing from the checkpoint: the strict load names it.
    short = open_clip_state(vocab)
    for key in [k for k in short if k.startswith("transformer.resblocks.1.")]:
        del short[key]
    folder = write_open_clip_folder(tmp_path / "short", clip_dir, short)
    with pytest.raises(ValueError, match="do not fit the model"):
        HFTextEncoder(folder)


def test_an_open_clip_text_tower_trains_in_a_preset_and_the_saved_model_reloads(clip_dir, tmp_path):
    from imtm import Matcher, presets
    from imtm.data import synthetic

    train, _, test = synthetic.load(view="regions", seed=0, n_train=6, n_dev=2, n_test=3)
    # The tokenizer's merges cover the synthetic captions' letter pairs too.
    words = WORDS + train.captions + test.captions
    tok_dir = write_local_clip(tmp_path / "tok", words, hidden_size=WIDTH)
    state = open_clip_state(_vocab_size(tok_dir))
    folder = write_open_clip_folder(tmp_path / "oc", tok_dir, state)
    m = Matcher(
        presets.vsepp(
            region_dim=train.region_dim, embed_dim=8, text="clip", text_model=str(folder)
        ),
        epochs=1,
        batch_size=15,
        lr=1e-3,
        checkpoint_dir=None,
        verbose=False,
        random_state=0,
    )
    m.fit(train)
    m.save(tmp_path / "model")
    again = Matcher.load(tmp_path / "model")
    images, captions = test.images[:3], test.captions[:4]
    torch.testing.assert_close(again.similarity(images, captions), m.similarity(images, captions))


def test_clip_initialised_laps_from_one_open_clip_checkpoint_trains_and_reloads(tmp_path):
    """LAPS Table 2's CLIP rows: both towers from one open_clip checkpoint (image through timm's
    converter, text through open_clip_text_state_dict), one training step, save, reload."""
    from imtm import Matcher, presets
    from imtm.data import synthetic

    train, _, test = synthetic.load(
        view="pixels", seed=0, n_train=6, n_dev=2, n_test=3, image_size=32
    )
    tok_dir = write_local_clip(tmp_path / "tok", train.captions + test.captions, hidden_size=WIDTH)
    state = {
        **open_clip_state(_vocab_size(tok_dir), visual=False),
        **openai_clip_visual_state(width=WIDTH, layers=1, out=8, seed=1),
    }
    folder = write_open_clip_folder(tmp_path / "oc", tok_dir, state)
    comps = presets.laps(
        image="vit_base_patch16_clip_224",
        img_size=32,
        model_kwargs={"depth": 1, "embed_dim": WIDTH, "num_heads": HEADS, "patch_size": 8},
        checkpoint_path=str(folder / "open_clip_model.safetensors"),
        embed_dim=8,
        text="clip",
        text_model=str(folder),
    )
    blocks = dict(comps)
    torch.testing.assert_close(
        blocks["image"].model.patch_embed.proj.weight, state["visual.conv1.weight"]
    )
    torch.testing.assert_close(
        blocks["text"].word_embeddings.weight, state["token_embedding.weight"]
    )
    m = Matcher(comps, epochs=1, batch_size=15, checkpoint_dir=None, verbose=False, random_state=0)
    m.fit(train)
    m.save(tmp_path / "model")
    again = Matcher.load(tmp_path / "model")
    images, captions = test.images[:3], test.captions[:4]
    torch.testing.assert_close(again.similarity(images, captions), m.similarity(images, captions))
