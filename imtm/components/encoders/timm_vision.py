r"""TimmVisionEncoder: a timm ViT, Swin, EVA or CNN over pixels -> grid tokens (and [CLS]), with patch masking for ELA.

timm is imported when an encoder is built, not when imtm is imported.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import torch
from einops import rearrange, repeat
from torch import nn

from imtm.component import Component, is_restoring_saved_weights, state_mismatch, suggest
from imtm.contract import (
    EXAMPLE_DIM,
    EXAMPLE_IMAGE_SIZE,
    POSITIVE_INT,
    Example,
    Interval,
    Satisfies,
)
from imtm.functional.masking import random_patch_mask
from imtm.tokens import Tokens, check_finite
from imtm.weights import packaged_vision

__all__ = [
    "FAMILIES",
    "SOURCE_PREFIXES",
    "TimmVisionEncoder",
    "WeightsUnavailableError",
    "load_state_file",
    "tiny_vit_params",
]

#: ``model_kwargs`` keys that the encoder sets itself (through its own arguments).
_RESERVED_KWARGS = ("pretrained", "num_classes", "img_size", "checkpoint_path")
#: Standard deviation of the mask token's initialisation (BEiT's truncated normal).
MASK_TOKEN_INIT_STD = 0.02
#: uint8 pixels are divided by this before the model's mean / std normalisation.
UINT8_SCALE = 255.0
#: Model-name prefixes that timm resolves outside its registry: a Hugging Face hub repository
#: (``hf-hub:timm/vit_base_patch16_224.augreg_in21k``; ``hf_hub:`` is timm's older spelling) and a
#: local folder holding timm's ``config.json`` and weights (``local-dir:/path``, timm >= 1.0.16).
SOURCE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


class WeightsUnavailableError(OSError):
    """Pretrained weights were asked for but cannot be had (offline and not cached, or no file)."""


# ---------------------------------------------------------------------- weights from a file
def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch file (``weights_only=True``, no pickle code).

    A checkpoint that wraps its weights (``{"state_dict": ...}``, ``{"model": ...}``)
    is unwrapped, and a ``module.`` prefix (DistributedDataParallel) is stripped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no tensors by name.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint_path {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # a pickle with code, a corrupt file: say which file
            raise ValueError(
                f"cannot read {str(path)!r} as a torch state dict with weights_only=True ({err}); "
                "save the weights with torch.save(model.state_dict(), path) or as .safetensors"
            ) from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if (
        not isinstance(state, Mapping)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise ValueError(
            f"{str(path)!r} holds no state dict (a mapping of parameter names to tensors)"
        )
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _load_into(model: nn.Module, path, owner: str, unused: tuple[str, ...] = ()) -> None:
    """Load a checkpoint into a timm model, strictly, after timm's own conversion for its family.

    Checkpoint entries under the prefixes ``unused`` (modules the encoder removed, such as a
    CNN's classifier head) are left out when the model no longer has them.
    """
    state = load_state_file(path)
    # timm's per-family converter (e.g. ViT: resample the position embedding to img_size,
    # convert original JAX / DeiT layouts); it is what timm applies to its own weights.
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    classifier = (
        model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    )
    if isinstance(classifier, str):
        # The encoder has no classifier (num_classes=0): the checkpoint's head is not for it.
        state = {k: v for k, v in state.items() if k in own or not k.startswith(classifier + ".")}
    state = {
        k: v
        for k, v in state.items()
        if k in own or not k.startswith(tuple(p + "." for p in unused))
    }
    bits = state_mismatch(own, state)
    if bits:
        raise ValueError(
            f"{owner}: checkpoint_path {str(path)!r} does not fit this model ({'; '.join(bits)}); "
            "check model_name, img_size and model_kwargs against the checkpoint"
        )
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------- the two families
def _vit_features(
    model: nn.Module, pixels: torch.Tensor, patch_mask, mask_token
) -> tuple[torch.Tensor, tuple[int, int]]:
    """ViT: ``(B, P + h*w, C)`` tokens ([CLS]/registers first) and the patch grid ``(h, w)``.

    With ``patch_mask`` the masked patch embeddings are replaced by the mask token
    *before* the position embedding is added (BEiT's placement), so a masked patch
    still knows where it is.
    """
    grid = tuple(model.patch_embed.dynamic_feat_size(pixels.shape[-2:]))
    if patch_mask is None:
        return model.forward_features(pixels), grid
    x = model.patch_embed(pixels)  # (B, h*w, C), or (B, h, w, C) with dynamic_img_size
    shape = x.shape
    flat = x.reshape(shape[0], -1, shape[-1])
    flat = torch.where(patch_mask.unsqueeze(-1), mask_token.to(flat.dtype), flat)
    x = flat.reshape(shape)
    # The rest of timm's VisionTransformer.forward_features, unchanged.
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    x = model.blocks(x)
    return model.norm(x), grid


def _patch_mask_hook(patch_mask, mask_token):
    """A forward hook on ``patch_embed`` replacing the masked patch embeddings by the mask token.

    The model's own ``forward_features`` then runs unchanged (position embedding, rotary
    embedding, blocks), so the mask token enters where BEiT puts it: after the patch
    embedding, before any position information.
    """

    def hook(module, args, out):
        shape = out.shape
        flat = out.reshape(shape[0], -1, shape[-1])
        flat = torch.where(patch_mask.unsqueeze(-1), mask_token.to(flat.dtype), flat)
        return flat.reshape(shape)

    return hook


def _eva_features(
    model: nn.Module, pixels: torch.Tensor, patch_mask, mask_token
) -> tuple[torch.Tensor, tuple[int, int]]:
    """EVA / EVA-02: ``(B, P + h*w, C)`` tokens ([CLS] first) and the patch grid ``(h, w)``.

    EVA adds a rotary position embedding inside its blocks; masking replaces the patch
    embeddings through a hook on ``patch_embed`` and lets timm's ``forward_features`` run as it is.
    """
    grid = tuple(model.patch_embed.dynamic_feat_size(pixels.shape[-2:]))
    if patch_mask is None:
        return model.forward_features(pixels), grid
    handle = model.patch_embed.register_forward_hook(_patch_mask_hook(patch_mask, mask_token))
    try:
        return model.forward_features(pixels), grid
    finally:
        handle.remove()


def _cnn_features(
    model: nn.Module, pixels: torch.Tensor, patch_mask, mask_token
) -> tuple[torch.Tensor, tuple[int, int]]:
    """CNN (ResNet, ConvNeXt, EfficientNet, ...): the last feature map ``(B, C, h, w)`` as ``(B, h*w, C)`` grid tokens.

    The grid features of VSE-infinity (Chen et al., CVPR 2021): every cell of the last
    stage's map is one token, row-major as ViT's patches; there is no prefix token.
    """
    if patch_mask is not None:  # refused in __init__ (mask_ratio > 0 needs a patch embedding)
        raise AssertionError("CNN backbones take no patch mask")
    x = model.forward_features(pixels)
    if x.dim() != 4:
        raise ValueError(
            f"TimmVisionEncoder: {type(model).__name__}.forward_features gave a tensor of shape "
            f"{tuple(x.shape)}, not a (B, C, h, w) feature map; this model cannot give grid tokens"
        )
    h, w = x.shape[-2:]
    return rearrange(x, "b c h w -> b (h w) c"), (int(h), int(w))


class _ForwardFeatures(nn.Module):
    """``forward`` = the wrapped model's ``forward_features`` (so ``functional_call`` can run it on meta tensors)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def _cnn_grid(model: nn.Module, pixels: torch.Tensor) -> tuple[int, int]:
    """The feature-map size for ``pixels``' height and width, computed on meta tensors (no arithmetic, no FLOPs).

    Strides round differently across CNNs (ResNet's padded convolutions round up,
    ConvNeXt's patchify stem rounds down), so the shapes are propagated through the model itself.
    """
    from torch.func import functional_call

    wrapper = _ForwardFeatures(model)
    state = {
        k: torch.empty_like(v, device="meta")
        for k, v in [*wrapper.named_parameters(), *wrapper.named_buffers()]
    }
    channels = int(pixels.shape[1]) or _in_chans(model)
    probe = torch.empty(1, channels, int(pixels.shape[-2]), int(pixels.shape[-1]), device="meta")
    out = functional_call(wrapper, state, (probe,))
    if out.dim() != 4:
        raise ValueError(
            f"TimmVisionEncoder: {type(model).__name__}.forward_features gives a tensor of shape "
            f"{tuple(out.shape)}, not a (B, C, h, w) feature map; this model cannot give grid tokens"
        )
    return int(out.shape[-2]), int(out.shape[-1])


def _in_chans(model: nn.Module) -> int:
    """Input channels of a timm model: its patch embedding's, else its first convolution's."""
    pe = getattr(model, "patch_embed", None)
    if pe is not None and hasattr(pe, "proj"):
        return int(pe.proj.in_channels)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return 3


def _swin_features(
    model: nn.Module, pixels: torch.Tensor, patch_mask, mask_token
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Swin: ``(B, h*w, C)`` tokens of the last stage and its grid ``(h, w)`` (no prefix token).

    The mask is drawn on the last stage's grid (one output token = one
    ``reduction x reduction`` pixel block) and spread over the 4x4-pixel patch
    embeddings under it, as SimMIM masks Swin, so a masked output token saw no
    pixel of its own block.
    """
    if patch_mask is None:
        x = model.forward_features(pixels)
    else:
        x = model.patch_embed(pixels)  # (B, H', W', C) channels-last
        hp, wp = x.shape[1:3]
        h, w = _swin_grid(model, pixels)
        fh, fw = hp // h, wp // w
        # each last-stage token covers an fh x fw block of patch embeddings: spread its mask over them
        m = repeat(patch_mask, "b (h w) -> b (h fh) (w fw)", h=h, w=w, fh=fh, fw=fw)
        x = torch.where(m.unsqueeze(-1), mask_token.to(x.dtype), x)
        x = model.norm(model.layers(x))
    h, w = x.shape[1:3]
    return rearrange(x, "b h w c -> b (h w) c"), (h, w)  # row-major over the grid, as ViT's patches


def _swin_grid(model: nn.Module, pixels: torch.Tensor) -> tuple[int, int]:
    reduction = int(model.feature_info[-1]["reduction"])
    return int(pixels.shape[-2]) // reduction, int(pixels.shape[-1]) // reduction


def _vit_grid(model: nn.Module, pixels: torch.Tensor) -> tuple[int, int]:
    return tuple(model.patch_embed.dynamic_feat_size(pixels.shape[-2:]))


#: Supported timm model families: name -> (token features function, token grid function).
#: ``"cnn"`` is any timm model without a patch embedding whose ``forward_features`` gives a
#: ``(B, C, h, w)`` feature map (ResNet, ResNeXt, ConvNeXt, EfficientNet, RegNet, ...).
FAMILIES = {
    "vit": (_vit_features, _vit_grid),
    "swin": (_swin_features, _swin_grid),
    "eva": (_eva_features, _vit_grid),
    "cnn": (_cnn_features, _cnn_grid),
}
#: The families that can mask patches (ELA): those with a patch embedding.
MASKABLE_FAMILIES = ("vit", "swin", "eva")
_FAMILY_OF_CLASS = {
    "VisionTransformer": "vit",
    "SwinTransformer": "swin",
    "SwinTransformerV2": "swin",
    "Eva": "eva",
}


def _family(model: nn.Module) -> str | None:
    for cls in type(model).__mro__:
        if cls.__name__ in _FAMILY_OF_CLASS and cls.__module__.startswith("timm."):
            return _FAMILY_OF_CLASS[cls.__name__]
    info = getattr(model, "feature_info", None)
    if (
        getattr(model, "patch_embed", None) is None
        and info
        and callable(getattr(model, "forward_features", None))
    ):
        # A convolutional network: its last stage's map has ``num_features`` channels.
        last = info[-1] if isinstance(info, list) else None
        if isinstance(last, Mapping) and int(last.get("num_chs", -1)) == int(
            getattr(model, "num_features", -2)
        ):
            return "cnn"
    return None


def _is_prefixed(model_name) -> bool:
    return isinstance(model_name, str) and model_name.startswith(SOURCE_PREFIXES)


def tiny_vit_params(**more) -> dict[str, Any]:
    """Arguments of a tiny random ViT for examples and tests: one block, 16-d, 8-pixel patches.

    Built for :data:`imtm.contract.EXAMPLE_IMAGE_SIZE` pixels and :data:`imtm.contract.EXAMPLE_DIM`
    outputs; ``more`` adds or replaces arguments.

    Example:
        >>> TimmVisionEncoder(**tiny_vit_params()).grid_size(16, 16)
        (2, 2)
    """
    return {
        "model_name": "vit_tiny_patch16_224",
        "img_size": EXAMPLE_IMAGE_SIZE,
        "out_dim": EXAMPLE_DIM,
        "model_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 8},
        **more,
    }


def _is_image_size(size) -> bool:
    """A positive int, or a (height, width) pair of them."""
    if isinstance(size, (tuple, list)):
        return len(size) == 2 and all(POSITIVE_INT.is_satisfied_by(s) for s in size)
    return POSITIVE_INT.is_satisfied_by(size)


class TimmVisionEncoder(Component):
    r"""Pixels -> grid tokens of a timm ViT, Swin, EVA or CNN (with [CLS] as a prefix token), optionally projected.

    A ViT (LAPS, ELA: ViT-Base/16; CLIP image towers such as
    ``vit_base_patch16_clip_224`` are timm ViTs too) or an EVA / EVA-02 splits
    the image into :math:`h \times w` patches and returns one token per patch
    after the transformer, plus its prefix tokens ([CLS], registers); Swin
    (LAPS: Swin-Base) returns the :math:`h \times w` tokens of its last stage
    and has no prefix token; a CNN (``resnet50``, ``convnext_tiny``, ...)
    returns its last feature map, one token per cell (VSE-infinity's grid
    features), and has no prefix token either. The grid and the prefix count
    are recorded in the Tokens (``grid``, ``num_prefix_tokens``), so later
    blocks never hard-code ``x[:, 1:]``.

    Patch masking (ELA, "a fraction of patch tokens is masked at the image
    encoder's input"): with ``mask_ratio = r > 0``, in training mode, exactly
    :math:`K = \operatorname{round}(r\,N)` random patches of every image
    (:func:`imtm.functional.random_patch_mask`) have their patch embedding
    replaced by one learned mask token before the transformer blocks:

    .. math::

        x_n = \begin{cases} e_{[M]} & n \in \mathcal{M} \\ E\,p_n & \text{otherwise} \end{cases},
        \qquad z = \mathrm{Transformer}(x + e_{pos})

    (ViT: before the position embedding is added, as BEiT; Swin: the mask is
    drawn on the last stage's grid and covers every 4x4 patch under a masked
    output token, as SimMIM.) The paper does not say where the mask token
    enters; this settles it as BEiT and SimMIM do. Masking draws from torch's
    global generator, which the Matcher seeds (``random_state``).

    The encoder always returns two values, ``("image_tokens", "masked_patches")``:
    the second is ``(B, N)`` bool aligned with the image tokens (False at prefix
    tokens; all False in eval mode or with ``mask_ratio == 0``), so the return
    type never depends on a flag and ELA's loss can pick the masked patches.

    Two views (``mask_in_forward=False``): ``forward`` returns the whole image in
    training too (``masked_patches`` all False), and :meth:`forward_masked` gives the
    masked view in a second pass with the same weights
    (:class:`~imtm.components.MaskedImageView` runs it as a pipeline block). The
    contrastive and matching objectives then see whole images, as at evaluation,
    and only the lexicon loss sees the masked ones.

    Weights: a packaged name (``"synthetic-vit"``, :data:`imtm.weights.PACKAGED_VISION`) loads the
    package's own weights offline, with the architecture they were trained in; ``pretrained=True``
    asks timm (Hugging Face hub, or its cache);
    ``checkpoint_path`` loads a local ``.safetensors`` file or a torch state dict
    (``weights_only=True``) strictly, through timm's converter for the family
    (so a 224 checkpoint loads at another ``img_size``; OpenAI / open_clip CLIP
    checkpoints, whose image tower is under ``visual.``, load into timm's
    ``vit_*_clip_*`` models that way). When neither can be had the error says what to pass.

    Args:
        model_name: a timm ViT, Swin, EVA or CNN name, e.g. ``"vit_base_patch16_224"``,
            ``"swin_base_patch4_window7_224"``, ``"eva02_base_patch14_224"``, ``"resnet50"``,
            ``"convnext_tiny"``, ``"vit_base_patch16_clip_224"``; or a hub repository
            ``"hf-hub:org/name"`` (its ``config.json`` is read from the hub or its cache),
            or ``"local-dir:/folder"`` (timm >= 1.0.16).
        pretrained: load timm's pretrained weights (needs the hub or its cache).
        checkpoint_path: a local weights file, used instead of ``pretrained``.
        out_dim: project every token to this size with a linear layer (``None``: keep the model's width).
        keep_cls: keep the ViT prefix tokens ([CLS], registers) as prefix tokens of the output;
            ``False`` returns patch tokens only. Swin has none either way.
        img_size: input resolution (int or ``(H, W)``), passed to timm (``None``: the model's default).
        freeze: the timm model gets no gradient and stays in eval mode (its forward runs
            under ``no_grad``); the ``out_dim`` projection and the mask token, if any, are not
            part of the timm model and still train (the mask token only feeds the frozen model,
            so it gets no gradient either).
        mask_ratio: fraction ``r`` in ``[0, 1)`` of patches masked in training (ELA uses 0.3);
            ViT, Swin and EVA only (a CNN has no patch embedding to mask).
        mask_in_forward: ``True``: ``forward`` masks (one view for every objective); ``False``:
            only :meth:`forward_masked` does (a second, masked view).
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. a tiny
            ``dict(depth=2, embed_dim=64, num_heads=2, patch_size=8)``, ``dynamic_img_size=True``).

    Shape:
        - images: ``(Bi, 3, H, W)`` float pixels already normalised (the transform of
          :meth:`data_config`), or ``uint8`` pixels in ``[0, 255]``, which are scaled to
          ``[0, 1]`` and normalised with the model's mean and std here
        - image_tokens: Tokens ``(Bi, P + h*w, D)`` with ``D = out_dim`` or the model width,
          ``P`` prefix tokens (1 for a ViT / EVA with [CLS] when ``keep_cls``, else 0), every token real
        - masked_patches: ``(Bi, P + h*w)`` bool

    References:
        Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021 (ViT);
        Liu et al., "Swin Transformer", ICCV 2021; Bao et al., "BEiT", ICLR 2022;
        Xie et al., "SimMIM", CVPR 2022; Fang et al., "EVA-02", 2023; He et al., "Deep Residual
        Learning" (ResNet), CVPR 2016; Liu et al., "A ConvNet for the 2020s" (ConvNeXt), CVPR 2022;
        Chen et al., "Learning the Best Pooling Strategy for Visual Semantic Embedding"
        (VSE-infinity, grid features), CVPR 2021; Radford et al., "Learning Transferable Visual Models
        From Natural Language Supervision" (CLIP), ICML 2021; Yang et al., "Pre-training Cross-Modal Retrieval
        by Expansive Lexicon-Patch Alignment" (ELA), LREC-COLING 2024.

    Example:
        >>> enc = TimmVisionEncoder("vit_tiny_patch16_224", img_size=32, out_dim=16,
        ...     model_kwargs=dict(depth=1, embed_dim=32, num_heads=2, patch_size=8))
        >>> tokens, masked = enc(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
        >>> tokens.feats.shape, tokens.grid, tokens.num_prefix_tokens, masked.shape
        (torch.Size([2, 17, 16]), (4, 4), 1, torch.Size([2, 17]))
    """

    requires = ("images",)
    provides = ("image_tokens", "masked_patches")
    _parameter_constraints = {
        "model_name": [str],
        "pretrained": ["boolean"],
        "checkpoint_path": [str, os.PathLike, None],
        "out_dim": [POSITIVE_INT, None],
        "keep_cls": ["boolean"],
        "img_size": [
            Satisfies(_is_image_size, "a positive int or a (height, width) pair of them"),
            None,
        ],
        "freeze": ["boolean"],
        "mask_ratio": [Interval(Real, 0, 1, closed="left")],
        "model_kwargs": [
            Satisfies(
                lambda kwargs: isinstance(kwargs, Mapping),
                "a dict of timm.create_model arguments",
                refused=[[("depth", 2)]],
            ),
            None,
        ],
        "mask_in_forward": ["boolean"],
    }

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (
            Example(tiny_vit_params(mask_ratio=0.5), inputs={"images": "pixels"}),
            Example(tiny_vit_params(keep_cls=False), inputs={"images": "pixels"}),
        )

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        out_dim: int | None = None,
        keep_cls: bool = True,
        img_size: int | tuple[int, int] | None = None,
        freeze: bool = False,
        mask_ratio: float = 0.0,
        model_kwargs: dict | None = None,
        mask_in_forward: bool = True,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.model_name = model_name
        self.pretrained = pretrained
        self.checkpoint_path = checkpoint_path
        self.out_dim = out_dim
        self.keep_cls = keep_cls
        self.img_size = img_size
        self.freeze = freeze
        self.mask_ratio = mask_ratio
        self.model_kwargs = model_kwargs
        self.mask_in_forward = mask_in_forward
        # The model and the projection are built from these arguments below, so they are checked first.
        self.validate()

        import timm

        name = type(self).__name__
        kwargs = dict(model_kwargs or {})
        if img_size is not None:
            kwargs["img_size"] = img_size
        # A packaged backbone (imtm.weights, e.g. "synthetic-vit"): its timm architecture and its
        # weights file, loaded offline as a checkpoint (a checkpoint_path given here wins).
        packaged = packaged_vision(model_name)
        if packaged is not None:
            model_name = packaged["model_name"]
            kwargs = {**packaged["model_kwargs"], "img_size": packaged["img_size"], **kwargs}
            checkpoint_path = packaged["file"] if checkpoint_path is None else checkpoint_path
            pretrained = False

        # Matcher.load rebuilds the architecture only: the weights come from the saved model.safetensors,
        # so neither the hub nor checkpoint_path is needed (a saved model loads offline, anywhere).
        restoring = is_restoring_saved_weights()
        try:
            try:
                model = timm.create_model(
                    model_name, pretrained=pretrained and not restoring, num_classes=0, **kwargs
                )
            except TypeError as err:
                if img_size is None or "img_size" not in str(err):
                    raise
                # CNNs take images of any size and timm's CNN constructors no img_size: the size
                # is then only the resolution data_config() reports.
                kwargs.pop("img_size")
                model = timm.create_model(
                    model_name, pretrained=pretrained and not restoring, num_classes=0, **kwargs
                )
        except OSError as err:  # hub unreachable, offline mode, file not in the cache
            if not pretrained and not _is_prefixed(model_name):
                raise
            if (
                not pretrained
            ):  # hf-hub: names read the model's config.json from the hub even without weights
                raise WeightsUnavailableError(
                    f"{name}: cannot read the configuration of {model_name!r} ({type(err).__name__}: {err}). "
                    "An hf-hub: name reads config.json from the Hugging Face hub (or its cache) even with "
                    "pretrained=False. Either download it once where there is internet "
                    f"(timm.create_model({model_name!r}) caches it), or name the timm architecture itself "
                    "(e.g. 'vit_base_patch16_224') with checkpoint_path='path/to/model.safetensors'"
                ) from err
            raise WeightsUnavailableError(
                f"{name}: cannot get pretrained weights for {model_name!r} ({type(err).__name__}: {err}). "
                "The machine is offline (or HF_HUB_OFFLINE=1) and they are not in the local cache. Either "
                "download them once where there is internet (timm.create_model(name, pretrained=True) "
                "caches them, or save model.state_dict() to a .safetensors file) and pass "
                f"TimmVisionEncoder({model_name!r}, checkpoint_path='path/to/model.safetensors'), "
                "or use pretrained=False for a random initialisation"
            ) from err
        except TypeError as err:  # an argument the model does not take
            raise TypeError(
                f"{name}: timm.create_model({model_name!r}, ...) refused the arguments: {err}"
            ) from err
        family = _family(model)
        if family == "cnn":
            size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224)
            try:  # confirm on meta tensors (no FLOPs) that forward_features gives a (B, C, h, w) map
                _cnn_grid(model, torch.empty(0, 0, int(size[-2]), int(size[-1])))
            except Exception:  # noqa: BLE001 - any failure of the probe means: not a grid-map model
                family = None
        if family is None:
            raise ValueError(
                f"{name}: {model_name!r} builds a timm {type(model).__name__}; supported are ViT "
                f"(VisionTransformer and its variants, CLIP towers included), Swin, EVA "
                f"({sorted(_FAMILY_OF_CLASS)}) and CNNs whose forward_features gives a (B, C, h, w) map"
            )
        if mask_ratio > 0 and family not in MASKABLE_FAMILIES:
            raise ValueError(
                f"{name}: mask_ratio={mask_ratio} masks patch embeddings, which a {type(model).__name__} "
                f"({family}) does not have; use a ViT, Swin or EVA model for patch masking, or mask_ratio=0"
            )
        if family in ("vit", "eva") and not isinstance(
            getattr(model, "patch_drop", None), (nn.Identity, type(None))
        ):
            raise ValueError(
                f"{name}: patch_drop_rate > 0 drops patch tokens at random, so the tokens would not "
                "match the grid and masked_patches; leave patch_drop_rate at 0"
            )
        unused: tuple[str, ...] = ()
        if family == "cnn" and isinstance(getattr(model, "head", None), nn.Module):
            # Grid tokens are read before the classifier head (ConvNeXt's: pooling, norm, fc), which
            # would otherwise hold parameters that no output uses.
            model.head = nn.Identity()
            unused = ("head",)
        if checkpoint_path is not None and not restoring:
            _load_into(model, checkpoint_path, name, unused)
        self.model = model
        self._features, self._grid = FAMILIES[family]
        # Only parameters and private attributes are set in __init__ (scikit-learn's rule); read
        # ``family`` and ``num_prefix_tokens`` through their properties.
        self._family = family
        self._num_prefix_tokens = (
            int(getattr(model, "num_prefix_tokens", 0)) if family in ("vit", "eva") else 0
        )

        cfg = self.data_config()
        self.register_buffer(
            "pixel_mean", torch.tensor(cfg["mean"]).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(cfg["std"]).view(1, -1, 1, 1), persistent=False
        )

        width = int(model.num_features)
        if mask_ratio > 0:
            embed_width = int(model.patch_embed.proj.out_channels)
            self.mask_token = nn.Parameter(torch.zeros(embed_width))
            nn.init.trunc_normal_(self.mask_token, std=MASK_TOKEN_INIT_STD)
        else:
            self.register_parameter("mask_token", None)
        self.register_module("proj", nn.Linear(width, out_dim) if out_dim is not None else None)
        if self.proj is not None:
            nn.init.trunc_normal_(self.proj.weight, std=MASK_TOKEN_INIT_STD)
            nn.init.zeros_(self.proj.bias)
        if freeze:
            self.model.requires_grad_(False)
            if self.mask_token is not None:
                self.mask_token.requires_grad_(False)
            self.model.eval()

    @property
    def family(self) -> str:
        """The backbone family (``"vit"``, ``"swin"``...) that decides how patch tokens are read."""
        return self._family

    @property
    def num_prefix_tokens(self) -> int:
        """Prefix tokens ([CLS], registers) before the patch tokens in this encoder's output."""
        return self._num_prefix_tokens

    # ------------------------------------------------------------------ information
    def portable_params(self) -> dict:
        """A saved model keeps ``checkpoint_path`` by its base name only (a record of where the weights came from).

        The backbone's weights are in the saved ``model.safetensors``; loading never reads the file.
        """
        if self.checkpoint_path is None:
            return {}
        return {"checkpoint_path": os.path.basename(os.fspath(self.checkpoint_path).rstrip("/\\"))}

    def validate(self) -> TimmVisionEncoder:
        """Check the declared constraints, that timm knows ``model_name``, and the arguments'
        relations (``pretrained`` or ``checkpoint_path``; ``model_kwargs`` leaves the encoder's own
        arguments alone); return ``self``."""
        import timm

        name, model_name = type(self).__name__, self.model_name
        if not (
            timm.is_model(model_name) or _is_prefixed(model_name) or packaged_vision(model_name)
        ):
            raise ValueError(
                f"{name}: unknown timm model {model_name!r}; see timm.list_models('vit_*'), "
                "timm.list_models('swin*'), timm.list_models('eva*'), timm.list_models('resnet*'), "
                "name a hub repository as 'hf-hub:org/name', or a packaged backbone "
                "(imtm.weights.PACKAGED_VISION)." + suggest(model_name, timm.list_models())
            )
        if self.pretrained and self.checkpoint_path is not None:
            raise ValueError(
                f"{name}: give pretrained=True (weights from timm / the hub) or checkpoint_path "
                "(a local file), not both"
            )
        reserved = [k for k in _RESERVED_KWARGS if k in (self.model_kwargs or {})]
        if reserved:
            raise ValueError(
                f"{name}: model_kwargs may not set {reserved}; use the encoder's own arguments "
                "(pretrained, checkpoint_path, img_size; the classifier is always removed)"
            )
        return self

    @property
    def dim(self) -> int:
        """``D``, the size of the output tokens."""
        return int(self.out_dim) if self.out_dim is not None else int(self.model.num_features)

    def data_config(self) -> dict:
        """timm's resolved data config for this model: ``input_size``, ``mean``, ``std``, ``interpolation``, ...

        ``input_size`` is the resolution the encoder was built for (``img_size``), not
        the one of the pretrained config. Build matching transforms with
        ``timm.data.create_transform(**enc.data_config())``.
        """
        import timm.data

        cfg = dict(timm.data.resolve_model_data_config(self.model))
        pe = getattr(self.model, "patch_embed", None)
        size = getattr(pe, "img_size", None)
        if (
            size is None and self.img_size is not None
        ):  # a CNN: any size runs; report the one asked for
            size = (
                (self.img_size, self.img_size)
                if isinstance(self.img_size, Integral)
                else tuple(self.img_size)
            )
        if size is not None:
            cfg["input_size"] = (_in_chans(self.model), int(size[0]), int(size[1]))
        return cfg

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The token grid ``(h, w)`` this encoder gives an ``height x width`` image."""
        return self._grid(self.model, torch.empty(0, 0, height, width))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.model.eval()  # a frozen backbone keeps its eval behaviour (dropout off)
        return self

    # ------------------------------------------------------------------ forward
    def _pixels(self, images) -> torch.Tensor:
        name = type(self).__name__
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"{name}: expected pixels as a (B, 3, H, W) tensor, got {type(images).__name__} "
                "(precomputed region features go to PrecomputedEncoder)"
            )
        channels = _in_chans(self.model)
        if images.dim() != 4 or images.shape[1] != channels:
            raise ValueError(
                f"{name}: expected images of shape (B, {channels}, H, W), got {tuple(images.shape)}"
            )
        if images.shape[0] == 0:
            raise ValueError(f"{name}: got an empty batch of images")
        dtype = next(self.model.parameters()).dtype
        pe = getattr(self.model, "patch_embed", None)
        height, width = int(images.shape[-2]), int(images.shape[-1])
        strict = getattr(pe, "img_size", None) is not None and getattr(pe, "strict_img_size", False)
        if strict and (height, width) != tuple(pe.img_size):
            raise ValueError(
                f"{name}: the model was built for {tuple(pe.img_size)} images, got {height}x{width}; "
                f"resize the images, or build the encoder with img_size=({height}, {width}) "
                "(or model_kwargs=dict(dynamic_img_size=True) for a ViT)"
            )
        patch = tuple(getattr(pe, "patch_size", None) or (1, 1))
        if not getattr(pe, "dynamic_img_pad", False) and (height % patch[0] or width % patch[1]):
            raise ValueError(
                f"{name}: image size {height}x{width} is not a multiple of the patch size {patch}"
            )
        if images.dtype == torch.uint8:
            x = images.to(dtype) / UINT8_SCALE
            return (x - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)
        if not images.is_floating_point():
            raise TypeError(
                f"{name}: expected float (normalised) or uint8 pixels, got {images.dtype}"
            )
        check_finite(images, f"{name}: images")
        return images.to(dtype)

    def forward(self, images) -> tuple[Tokens, torch.Tensor]:
        return self._encode(images, masked=self.mask_in_forward)

    def forward_masked(self, images, mask: bool = True) -> tuple[Tokens, torch.Tensor]:
        """The masked view: ``mask_ratio`` of the patches masked in training, whatever ``mask_in_forward`` says.

        Returns what ``forward`` returns; in eval mode, with ``mask_ratio == 0`` or with
        ``mask=False`` nothing is masked.
        """
        return self._encode(images, masked=bool(mask))

    def _encode(self, images, masked: bool) -> tuple[Tokens, torch.Tensor]:
        pixels = self._pixels(images)
        b = pixels.shape[0]
        patch_mask = None
        if masked and self.training and self.mask_ratio > 0:
            h, w = self._grid(self.model, pixels)
            patch_mask = random_patch_mask(b, h * w, self.mask_ratio, device=pixels.device)
        ctx = torch.no_grad() if self.freeze else contextlib.nullcontext()
        with ctx:
            feats, grid = self._features(self.model, pixels, patch_mask, self.mask_token)
        prefix = self.num_prefix_tokens
        if not self.keep_cls and prefix:
            feats = feats[:, prefix:]
            prefix = 0
        masked = torch.zeros(b, prefix + grid[0] * grid[1], dtype=torch.bool, device=pixels.device)
        if patch_mask is not None:
            masked[:, prefix:] = patch_mask
        if self.proj is not None:
            feats = self.proj(feats)
        return Tokens(feats, grid=(int(grid[0]), int(grid[1])), num_prefix_tokens=prefix), masked
