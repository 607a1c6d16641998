"""A random CLIP image tower in OpenAI's / open_clip's key layout (``visual.*``), shared by the tests
of timm's CLIP converter and of open_clip checkpoints holding both towers."""

import torch


def openai_clip_visual_state(width=32, layers=2, patch=8, grid=4, out=16, seed=0):
    """``visual.*`` weights: conv1, class/positional embeddings, ln_pre, transformer.resblocks,
    ln_post, proj (random, scale 0.05; layer-norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    state = {
        "visual.class_embedding": r(width),
        "visual.positional_embedding": r(grid * grid + 1, width),
        "visual.conv1.weight": r(width, 3, patch, patch),
        "visual.ln_pre.weight": 1 + r(width),
        "visual.ln_pre.bias": r(width),
        "visual.ln_post.weight": 1 + r(width),
        "visual.ln_post.bias": r(width),
        "visual.proj": r(width, out),
    }
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        state.update(
            {
                p + "ln_1.weight": 1 + r(width),
                p + "ln_1.bias": r(width),
                p + "ln_2.weight": 1 + r(width),
                p + "ln_2.bias": r(width),
                p + "attn.in_proj_weight": r(3 * width, width),
                p + "attn.in_proj_bias": r(3 * width),
                p + "attn.out_proj.weight": r(width, width),
                p + "attn.out_proj.bias": r(width),
                p + "mlp.c_fc.weight": r(4 * width, width),
                p + "mlp.c_fc.bias": r(4 * width),
                p + "mlp.c_proj.weight": r(width, 4 * width),
                p + "mlp.c_proj.bias": r(width),
            }
        )
    return state
