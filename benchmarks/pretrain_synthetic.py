"""Pre-train the packaged synthetic backbones (imtm/weights): a small ViT and a small BERT.

They play on the built-in benchmark the role ImageNet ViTs and BERT play in the papers, so
that the pixel presets fine-tune pretrained encoders as the papers do instead of training
from scratch. Loaded offline by name: ``TimmVisionEncoder("synthetic-vit")``,
``HFTextEncoder("synthetic-bert")``.

Data: :func:`imtm.data.synthetic.load_pretraining`: ``--n-images`` scenes of the pixel view
(64 x 64 images, 8 x 8 patches: 64 patch tokens), seed ``imtm.data.synthetic.PRETRAIN_SEED``,
with every scene of the benchmark's train/dev/test splits of seeds 0, 1, 2 (at the sizes of
``imtm compare``) excluded, and 5 captions per image.

Objective (summed with unit weights, AdamW, one caption per image drawn per step):

- image-caption contrastive learning: symmetric InfoNCE (temperature 0.07) between the
  linearly projected mean of the ViT's patch tokens and the projected mean of the BERT's
  real tokens, the other images and captions of the batch as negatives;
- per-patch attribute prediction for the ViT: from every patch token, the colour
  (8 + background) and the shape (6 + background) of the object covering most of the
  patch (at least a quarter of it; :func:`imtm.data.synthetic.patch_objects`), cross-entropy;
- masked language modelling for the BERT: 15% of the word tokens chosen (80% -> [MASK],
  10% a random word, 10% kept), predicted through a dense + GELU + LayerNorm head and the
  tied word embeddings, cross-entropy.

The projections and heads are thrown away; only the ViT's timm state dict and the BERT
folder are written. Everything is seeded (weights, data order, caption choice, masking):
re-running the script with the same arguments on one thread rewrites the same tensors.

    OMP_NUM_THREADS=1 python benchmarks/pretrain_synthetic.py            # the packaged weights
    python benchmarks/pretrain_synthetic.py --quick --out /tmp/w          # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imtm.data import synthetic
from imtm.data.synthetic.captions import COLOUR_WORDS, SHAPE_WORDS
from imtm.weights import PACKAGED_TEXT, PACKAGED_VISION, WEIGHTS_DIR

VIT = PACKAGED_VISION["synthetic-vit"]
BERT = {"hidden_size": 64, "num_layers": 2, "num_heads": 2}
#: Defaults of the packaged run, and of --quick (a smoke run of a few seconds).
FULL = {"n_images": 3000, "epochs": 16, "batch_size": 64, "lr": 1e-3}
QUICK = {"n_images": 48, "epochs": 1, "batch_size": 16, "lr": 1e-3}
TEMPERATURE = 0.07
MLM_PROB = 0.15
MAX_LENGTH = 40
COLOURS = sorted(COLOUR_WORDS)  # class k; background = len(COLOURS)
SHAPES = sorted(SHAPE_WORDS)


def patch_targets(ds, image_size: int, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, g*g)`` colour and shape classes per patch (background = the last class)."""
    objects = torch.from_numpy(synthetic.patch_objects(ds.scenes, image_size, patch_size))
    colour = torch.full_like(objects, len(COLOURS))
    shape = torch.full_like(objects, len(SHAPES))
    for i, s in enumerate(ds.scenes):
        c = torch.tensor([COLOURS.index(o.colour) for o in s.objects] + [len(COLOURS)])
        h = torch.tensor([SHAPES.index(o.shape) for o in s.objects] + [len(SHAPES)])
        colour[i] = c[objects[i]]  # index -1 picks the appended background class
        shape[i] = h[objects[i]]
    return colour, shape


def mask_words(
    ids: torch.Tensor,
    special: torch.Tensor,
    vocab_size: int,
    mask_id: int,
    first_word: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: the inputs and the labels (-100 where nothing is predicted)."""
    chosen = (torch.rand(ids.shape, generator=gen) < MLM_PROB) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=gen)
    random_words = torch.randint(first_word, vocab_size, ids.shape, generator=gen)
    inputs = torch.where(chosen & (r < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_words, inputs)
    return inputs, labels


class Heads(nn.Module):
    """Projections and prediction heads used during pre-training only."""

    def __init__(self, vit_dim: int, text_dim: int, word_embeddings: nn.Embedding):
        super().__init__()
        self.image_proj = nn.Linear(vit_dim, 64)
        self.text_proj = nn.Linear(text_dim, 64)
        self.colour = nn.Linear(vit_dim, len(COLOURS) + 1)
        self.shape = nn.Linear(vit_dim, len(SHAPES) + 1)
        self.mlm_transform = nn.Sequential(
            nn.Linear(text_dim, text_dim), nn.GELU(), nn.LayerNorm(text_dim)
        )
        self.mlm_bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))
        self.word_embeddings = word_embeddings  # tied decoder (shared with the BERT)


def pretrain(
    out: str | Path,
    *,
    seed: int = synthetic.PRETRAIN_SEED,
    n_images: int,
    epochs: int,
    batch_size: int,
    lr: float,
    verbose: bool = True,
) -> dict:
    """Pre-train both backbones and write them into ``out``; return the run's record."""
    import timm
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    from imtm.components.encoders.hf_text import write_local_bert

    t0 = time.perf_counter()
    out = Path(out)
    size, patch = VIT["img_size"], VIT["model_kwargs"]["patch_size"]
    data = synthetic.load_pretraining(n_images, seed, view="pixels", image_size=size)
    colour_t, shape_t = patch_targets(data, size, patch)
    cpi = data.captions_per_image
    torch.manual_seed(seed)
    vit = timm.create_model(VIT["model_name"], num_classes=0, img_size=size, **VIT["model_kwargs"])
    # The BERT's vocabulary: the words of the pre-training captions plus every colour and shape word.
    words = list(data.captions) + [
        w
        for table in (COLOUR_WORDS, SHAPE_WORDS)
        for v in table.values()
        for w in (v if isinstance(v[0], str) else [x for pair in v for x in pair])
    ]
    bert_dir = out / PACKAGED_TEXT["synthetic-bert"]
    write_local_bert(bert_dir, words, max_position_embeddings=128, seed=seed, **BERT)
    tok = AutoTokenizer.from_pretrained(str(bert_dir))
    bert = AutoModel.from_pretrained(str(bert_dir), use_safetensors=True)
    heads = Heads(vit.num_features, bert.config.hidden_size, bert.get_input_embeddings())
    enc = tok(
        list(data.captions),
        padding=True,
        truncation=True,
        max_length=MAX_LENGTH,
        return_tensors="pt",
    )
    ids, att = enc["input_ids"], enc["attention_mask"].bool()
    special = (ids == tok.cls_token_id) | (ids == tok.sep_token_id) | ~att
    params = [p for m in (vit, bert, heads) for p in m.parameters() if p.requires_grad]
    params = list({id(p): p for p in params}.values())  # the tied embedding once
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(n_images / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    history = []
    bert.pooler.requires_grad_(False)  # kept so the folder loads without new weights; never used
    for epoch in range(epochs):
        order = torch.randperm(n_images, generator=gen)
        sums = {"itc": 0.0, "colour": 0.0, "shape": 0.0, "mlm": 0.0, "colour_acc": 0.0, "n": 0}
        for start in range(0, n_images, batch_size):
            idx = order[start : start + batch_size]
            cap = idx * cpi + torch.randint(0, cpi, (len(idx),), generator=gen)
            x = data.images[idx]
            tokens = vit.forward_features(x)[:, vit.num_prefix_tokens :]
            img = F.normalize(heads.image_proj(tokens.mean(1)), dim=-1)
            a = att[cap]
            hid = bert(input_ids=ids[cap], attention_mask=a.long()).last_hidden_state
            txt = (hid * a[..., None]).sum(1) / a.sum(1, keepdim=True)
            txt = F.normalize(heads.text_proj(txt), dim=-1)
            logits = img @ txt.T / TEMPERATURE
            target = torch.arange(len(idx))
            itc = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
            c_logits = heads.colour(tokens)
            colour = F.cross_entropy(c_logits.flatten(0, 1), colour_t[idx].flatten())
            shape = F.cross_entropy(heads.shape(tokens).flatten(0, 1), shape_t[idx].flatten())
            m_in, m_lab = mask_words(
                ids[cap],
                special[cap],
                tok.vocab_size,
                tok.mask_token_id,
                len(tok.all_special_ids),
                gen,
            )
            m_hid = bert(input_ids=m_in, attention_mask=a.long()).last_hidden_state
            m_logits = heads.mlm_transform(m_hid) @ heads.word_embeddings.weight.T + heads.mlm_bias
            mlm = (
                F.cross_entropy(m_logits.flatten(0, 1), m_lab.flatten(), ignore_index=-100)
                if (m_lab != -100).any()
                else m_logits.sum() * 0.0
            )
            loss = itc + colour + shape + mlm
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums["itc"] += itc.item()
            sums["colour"] += colour.item()
            sums["shape"] += shape.item()
            sums["mlm"] += mlm.item()
            sums["colour_acc"] += float((c_logits.argmax(-1) == colour_t[idx]).float().mean())
            sums["n"] += 1
        row = {k: round(v / sums["n"], 4) for k, v in sums.items() if k != "n"}
        history.append({"epoch": epoch + 1, **row})
        if verbose:
            print(
                f"epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()),
                flush=True,
            )
    vit_state = {k: v.detach().contiguous() for k, v in vit.state_dict().items()}
    save_file(vit_state, str(out / VIT["file"]))
    bert.save_pretrained(str(bert_dir), safe_serialization=True)
    record = {
        "command": "python benchmarks/pretrain_synthetic.py " + " ".join(sys.argv[1:]),
        "seed": seed,
        "n_images": n_images,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "steps": steps,
        "image_size": size,
        "patch_size": patch,
        "object_patch_fraction": round(
            synthetic.object_patch_fraction(data.scenes, size, patch), 4
        ),
        "objective": "symmetric InfoNCE (t=0.07) on mean-pooled ViT patches vs mean-pooled BERT tokens + "
        "per-patch colour and shape cross-entropy (ViT) + masked language modelling (BERT, 15%)",
        "excluded_benchmark_seeds": [0, 1, 2],
        "vit": {
            "model_name": VIT["model_name"],
            **VIT["model_kwargs"],
            "parameters": sum(v.numel() for v in vit_state.values()),
        },
        "bert": {
            **BERT,
            "vocab_size": tok.vocab_size,
            "parameters": sum(p.numel() for p in bert.parameters()),
        },
        "wall_s": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
        "history": history,
    }
    (out / "synthetic_backbones.json").write_text(
        json.dumps(record, indent=2) + "\n", encoding="utf-8"
    )
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out",
        default=str(WEIGHTS_DIR),
        help="folder to write (default: the package's imtm/weights)",
    )
    p.add_argument("--seed", type=int, default=synthetic.PRETRAIN_SEED)
    p.add_argument("--quick", action="store_true", help="a tiny run of a few seconds (smoke test)")
    p.add_argument("--n-images", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    kw = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    if args.quick and args.out == str(WEIGHTS_DIR):
        args.out = tempfile.mkdtemp(prefix="imtm_pretrain_")
    rec = pretrain(args.out, seed=args.seed, **kw)
    print(
        f"wrote {args.out} in {rec['wall_s']}s ({rec['steps']} steps); "
        f"object patch fraction {rec['object_patch_fraction']}"
    )


if __name__ == "__main__":
    main()
