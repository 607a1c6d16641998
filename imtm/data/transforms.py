"""Image transforms that match a backbone's pretrained data config (timm's), for raw-image datasets.

Evaluation: resize the short side to ``size / crop_pct``, center-crop ``size``,
normalise with the backbone's mean and std (timm's evaluation transform, exactly).
Training: a light augmentation on the same config: a random resized crop covering
``scale`` of the image area (0.5 to 1 by default) and a horizontal flip, no colour
jitter, no auto-augment, no random erasing (captions describe colours; VSE-infinity
and ALBEF train with crops and flips only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["image_transform", "resolve_data_config"]

# The keys of a timm data config that image_transform reads.
_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def resolve_data_config(encoder_or_config: Any) -> dict:
    """The timm data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``).

    Args:
        encoder_or_config: one of

            - an object with a ``data_config()`` method (``TimmVisionEncoder``);
            - a timm model (an ``nn.Module`` with ``pretrained_cfg``);
            - a timm model name (its pretrained config; needs no weights, no network);
            - a dict in timm's data-config form (missing keys take timm's defaults);
              ``{"img_size": 384}`` or ``{"input_size": (3, 384, 384)}`` changes the size.

    Example:
        >>> resolve_data_config("vit_base_patch16_224")["input_size"]
        (3, 224, 224)
    """
    from timm.data import resolve_data_config as timm_resolve

    obj = encoder_or_config
    if hasattr(obj, "data_config") and callable(obj.data_config):
        cfg = dict(obj.data_config())
    elif isinstance(obj, dict):
        unknown = set(obj) - set(_CONFIG_KEYS) - {"img_size"}
        if unknown:
            from imtm._checks import suggest

            name = min(unknown)
            raise ValueError(
                f"image_transform: unknown data-config key {name!r}; the keys are {list(_CONFIG_KEYS)} "
                f"(or img_size).{suggest(name, _CONFIG_KEYS + ('img_size',))}"
            )
        cfg = timm_resolve(args=dict(obj))
    elif isinstance(obj, str):
        import timm

        pretrained = timm.models.get_pretrained_cfg(obj)
        if pretrained is None:
            from imtm._checks import suggest

            raise ValueError(
                f"image_transform: {obj!r} is not a timm model name with a pretrained config."
                f"{suggest(obj, timm.list_models())} (pass the encoder or a data-config dict instead)"
            )
        cfg = timm_resolve(pretrained_cfg=pretrained.to_dict())
    elif hasattr(obj, "pretrained_cfg"):
        cfg = timm_resolve(model=obj)
    else:
        raise TypeError(
            "image_transform: expected an encoder with data_config(), a timm model, a timm model name or a "
            f"data-config dict, got {type(obj).__name__}"
        )
    missing = [k for k in ("input_size", "mean", "std") if k not in cfg]
    if missing:
        raise ValueError(f"image_transform: the data config lacks {missing}: {cfg}")
    return {k: cfg[k] for k in _CONFIG_KEYS if k in cfg}


def image_transform(
    encoder_or_config: Any,
    train: bool = False,
    *,
    scale: tuple[float, float] = (0.5, 1.0),
    hflip: float = 0.5,
) -> Callable:
    """A ``PIL.Image -> (3, H, W)`` tensor transform matching a backbone's data config.

    Args:
        encoder_or_config: see :func:`resolve_data_config`.
        train: ``False``: timm's evaluation transform (resize, center crop, normalise);
            ``True``: random resized crop over ``scale`` of the area, horizontal flip,
            normalise.
        scale: area range of the training crop.
        hflip: probability of a horizontal flip in training.

    Returns:
        a torchvision ``Compose`` (picklable, so DataLoader workers can use it). The
        training transform draws from Python's ``random`` (timm's crop) and torch's global
        generator (the flip), both of which a DataLoader seeds in every worker.

    Shape:
        - output: ``(3, H, W)`` with ``(H, W)`` the config's input size

    Example:
        >>> from PIL import Image
        >>> t = image_transform({"input_size": (3, 32, 32)})
        >>> t(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """
    from timm.data import create_transform

    if not isinstance(train, bool):
        raise TypeError(f"image_transform: train must be a bool, got {type(train).__name__}")
    lo, hi = scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"image_transform: scale must satisfy 0 < low <= high <= 1, got {scale!r}")
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"image_transform: hflip must be a probability in [0, 1], got {hflip!r}")
    cfg = resolve_data_config(encoder_or_config)
    if not train:
        return create_transform(**cfg, is_training=False)
    cfg = {k: v for k, v in cfg.items() if k not in ("crop_pct", "crop_mode")}
    return create_transform(
        **cfg,
        is_training=True,
        scale=tuple(scale),
        hflip=hflip,
        color_jitter=None,
        auto_augment=None,
        re_prob=0.0,
    )
