"""PrecomputedEncoder: projects precomputed region features (bottom-up attention, BUTD) into the joint space."""

from __future__ import annotations

from numbers import Real

import torch
from torch import nn

from imtm.component import Component
from imtm.contract import EXAMPLE_DIM, POSITIVE_INT, Example, Interval, Options
from imtm.tokens import Tokens, l2_normalize

__all__ = ["ACTIVATIONS", "PrecomputedEncoder"]

#: Non-linearities of the hidden layers, by name.
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class PrecomputedEncoder(Component):
    r"""Precomputed region features -> image tokens, by a linear map or a small MLP.

    With ``num_layers=1`` every region feature :math:`f_n` is mapped linearly,
    the region encoder of SCAN and CHAN on BUTD features (SCAN, Sec. 3,
    representing images):

    .. math::

        v_n = W f_n + b

    With ``num_layers >= 2`` it goes through an MLP (Linear, activation, dropout,
    ..., Linear); ``residual=True`` adds a linear shortcut, as VSE-infinity's
    precomputed-feature encoder: :math:`v_n = \mathrm{MLP}(f_n) + W f_n + b`.

    Each region is mapped on its own, so the mask is kept and padding never
    changes a real token; padded positions of the output are exactly zero.

    Args:
        in_dim: feature size of the regions (2048 for BUTD).
        out_dim: size of the output tokens.
        hidden_dim: width of the hidden layers when ``num_layers >= 2``
            (``None``: ``out_dim // 2``, VSE-infinity's choice).
        num_layers: number of linear layers (1: a single linear map).
        dropout: dropout on the input features and after each hidden layer (training only).
        normalize: L2-normalise every output token.
        activation: hidden non-linearity, one of :data:`ACTIVATIONS`.
        residual: add a linear shortcut from the input (needs ``num_layers >= 2``).

    Shape:
        - images: Tokens ``(B, N, in_dim)`` or a tensor ``(B, N, in_dim)`` (every region real)
        - output: Tokens ``(B, N, out_dim)`` with the input mask

    References:
        Lee et al., "Stacked Cross Attention for Image-Text Matching" (SCAN), ECCV 2018, Sec. 3;
        Chen et al., "Learning the Best Pooling Strategy for Visual Semantic Embedding", CVPR 2021.

    Example:
        >>> enc = PrecomputedEncoder(in_dim=16, out_dim=8)
        >>> enc(Tokens.from_lengths(torch.randn(2, 5, 16), [5, 3])).feats.shape
        torch.Size([2, 5, 8])
    """

    requires = ("images",)
    provides = ("image_tokens",)
    _parameter_constraints = {
        "in_dim": [POSITIVE_INT],
        "out_dim": [POSITIVE_INT],
        "hidden_dim": [POSITIVE_INT, None],
        "num_layers": [POSITIVE_INT],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "normalize": ["boolean"],
        "activation": [Options(ACTIVATIONS)],
        "residual": ["boolean"],
    }

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        small = {"in_dim": EXAMPLE_DIM, "out_dim": 6}
        mlp = {"num_layers": 2, "hidden_dim": 5, "residual": True, "activation": "gelu"}
        return (
            Example(small, padding=True),
            Example({**small, **mlp, "normalize": True, "dropout": 0.1}, padding=True),
        )

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int | None = None,
        num_layers: int = 1,
        dropout: float = 0.0,
        normalize: bool = False,
        activation: str = "relu",
        residual: bool = False,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.dropout = dropout
        self.normalize = normalize
        self.activation = activation
        self.residual = residual
        # The MLP is built from these arguments below, so they are checked first.
        self.validate()

        hidden = hidden_dim if hidden_dim is not None else max(1, out_dim // 2)
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for k in range(num_layers):
            layers.append(nn.Linear(dims[k], dims[k + 1]))
            if k < num_layers - 1:
                # VSE-infinity puts BatchNorm1d here; batch statistics over a padded batch
                # would depend on the padding, so the MLP has none.
                layers += [ACTIVATIONS[activation](), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*layers)
        # registered even when absent, so no plain attribute is set besides the parameters
        self.register_module("shortcut", nn.Linear(in_dim, out_dim) if residual else None)
        self.input_dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def validate(self) -> PrecomputedEncoder:
        """Check the declared constraints and that ``residual`` has an MLP to bypass; return ``self``."""
        if self.residual and self.num_layers < 2:
            raise ValueError(
                f"{type(self).__name__}: residual=True needs an MLP (num_layers >= 2), got "
                f"num_layers={self.num_layers}"
            )
        return self

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases, as SCAN initialises its region projection."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images) -> Tokens:
        name = type(self).__name__
        if isinstance(images, torch.Tensor):
            if images.dim() != 3:
                raise ValueError(
                    f"{name}: expected image tokens of shape (B, N, {self.in_dim}), got {tuple(images.shape)}"
                )
            images = Tokens(images)
        elif not isinstance(images, Tokens):
            raise TypeError(
                f"{name}: expected region features as Tokens or a (B, N, {self.in_dim}) tensor, "
                f"got {type(images).__name__}"
            )
        feats = images.feats
        if feats.dim() != 3 or feats.shape[-1] != self.in_dim:
            raise ValueError(
                f"{name}: expected image tokens of shape (B, N, {self.in_dim}), got {tuple(feats.shape)}"
            )
        if not feats.is_floating_point():
            raise TypeError(f"{name}: expected floating-point region features, got {feats.dtype}")
        images.check(name)
        mask = images.mask.unsqueeze(-1)
        weight = self.mlp[0].weight
        # Zero the padding first: garbage (even NaN) there must not reach the weight gradients.
        x = torch.where(
            mask, feats.to(weight.dtype), torch.zeros((), dtype=weight.dtype, device=feats.device)
        )
        x = self.input_dropout(x)
        y = self.mlp(x)
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        if self.normalize:
            y = l2_normalize(y, dim=-1)
        y = torch.where(mask, y, torch.zeros((), dtype=y.dtype, device=y.device))
        return images.with_feats(y)
