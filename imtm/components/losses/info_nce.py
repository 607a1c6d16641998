"""InfoNCELoss: symmetric contrastive (CLIP-style) loss as a pipeline block, optionally learning its temperature."""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn

from imtm.component import Loss
from imtm.components.losses.triplet import check_loss_arguments, scores_and_positives
from imtm.contract import Example, Interval
from imtm.functional.losses import info_nce_loss

__all__ = ["MAX_TEMPERATURE", "MIN_TEMPERATURE", "InfoNCELoss"]

#: Range a learnable temperature is clamped to. The floor plays the role of CLIP's cap of
#: 100 on the logit scale (tau >= 0.01) with room for the sharper temperatures ALBEF-style
#: models use (they clamp to [0.001, 0.5]); the ceiling keeps the loss from flattening out.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1.0


class InfoNCELoss(Loss):
    r"""Symmetric InfoNCE over the batch score matrix, several positives per query allowed.

    .. math::

        \mathcal L = \tfrac12\Big(\operatorname{mean}_i -\log
            \frac{\sum_{t \in P_i} e^{s(i,t)/\tau}}{\sum_t e^{s(i,t)/\tau}}
          + \operatorname{mean}_t -\log
            \frac{\sum_{i \in P_t} e^{s(i,t)/\tau}}{\sum_i e^{s(i,t)/\tau}}\Big)

    (InfoNCE, CPC Eq. 4, in both directions as CLIP; positives share the numerator
    as in MIL-NCE Eq. 1). See :func:`imtm.functional.info_nce_loss`.

    With ``learnable=True`` the temperature is a parameter ``log_temperature``,
    initialised to ``log(temperature)`` and clamped to
    ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` when used; ``temperature`` itself stays
    the stored constructor argument. ``forward`` accepts ``(scores, positives)`` or
    ``(scores_i2t, scores_t2i, positives)``, as :class:`TripletLoss`.

    Args:
        temperature: :math:`\tau > 0` (its initial value when learnable).
        learnable: learn :math:`\log \tau` with the rest of the model.
        weight: factor of this loss in the Matcher's total.

    Shape:
        - scores (or scores_i2t and scores_t2i): ``(Bi, Bt)``
        - positives: ``(Bi, Bt)`` bool
        - output: ``()``

    References:
        van den Oord et al., "Representation Learning with Contrastive Predictive Coding", 2018, Eq. 4;
        Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021;
        Miech et al., "End-to-End Learning of Visual Representations from Uncurated Instructional Videos",
        CVPR 2020, Eq. 1.

    Example:
        >>> loss = InfoNCELoss(temperature=1.0)
        >>> loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.eye(2, dtype=torch.bool))
        tensor(0.3133)
    """

    requires = ("scores", "positives")
    provides = ("info_nce_loss",)

    @classmethod
    def _examples(cls) -> tuple[Example, ...]:
        return (Example({}), Example({"temperature": 0.1, "learnable": True}))

    def __init__(
        self,
        temperature: float = 0.05,
        learnable: bool = False,
        weight: float = 1.0,
        *,
        requires=None,
        provides=None,
    ):
        super().__init__(requires=requires, provides=provides)
        self.temperature = temperature
        self.learnable = learnable
        self.weight = weight
        if learnable is True:
            # The parameter is built here, from the initial temperature, so that value is checked first.
            self.validate()
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self.register_parameter("log_temperature", None)

    _parameter_constraints = {
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "learnable": ["boolean"],
    }

    def validate(self) -> InfoNCELoss:
        """Check the declared constraints, a learnable temperature's range and the arity; return ``self``."""
        name = type(self).__name__
        temperature = self.temperature
        if self.learnable and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"{name}: a learnable temperature must start in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                f"got {temperature!r}"
            )
        check_loss_arguments(self)
        return self

    def current_temperature(self):
        """The temperature in use: the clamped learned value (a 0-d tensor), or ``temperature``."""
        if self.log_temperature is None:
            return self.temperature
        return self.log_temperature.clamp(
            math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
        ).exp()

    def forward(self, *values) -> torch.Tensor:
        scores, positives = scores_and_positives(self, values)
        try:
            return info_nce_loss(scores, positives, temperature=self.current_temperature())
        except (ValueError, TypeError) as err:
            raise type(err)(f"{type(self).__name__}: {err}") from err

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, learnable={self.learnable}, " + super().extra_repr()
        )
