"""Testing helpers for imtm blocks: the conformance battery and hypothesis strategies.

- :func:`check_component`: one battery every block passes (shapes, gradients,
  dtypes, determinism, state_dict and clone round trips, padding invariance,
  agreement with the functional twin), reporting every failure; each of its checks
  is also a public function (:func:`check_gradients`, :func:`check_padding`, ...).
- :func:`parametrize_with_checks`: the battery as pytest parameters, one test id per
  check of each block; given a block class, on the examples the class declares
  (:func:`example_cases`).
- :func:`check_outputs`: the contract of one call (one output per ``provides``
  name, documented shapes, finite values), for property tests.
- :func:`component_inputs`: one consistent dict of random values for a block's
  ``requires`` (shared ``Bi``, ``Bt``, ``N``, ``M``, ``D``; masks, dtypes, devices);
  :func:`example_inputs`: one fixed such dict, as a block's declared
  :class:`~imtm.contract.Example` asks.
- :func:`tokens`, :func:`masks`, :func:`score_matrices`, :func:`image_ids`,
  :func:`captions`, :func:`dtypes`, :func:`devices`: hypothesis strategies for property tests of your own blocks. hypothesis is a
  test extra (``pip install imtm[test]``); they load on first use, so
  ``import imtm.testing`` works without it.

Property-test a block against the contract, every shape, padding, dtype and device:

    >>> from hypothesis import given, settings
    >>> from imtm.testing import check_outputs, component_inputs, devices, dtypes
    >>> from imtm.components import HardAssignmentCoding
    >>> block = HardAssignmentCoding()
    >>> @settings(max_examples=10, deadline=None)
    ... @given(values=component_inputs(block, dtype=dtypes(bf16=False), device=devices(), paired=False))
    ... def test_contract(values):
    ...     check_outputs(block, values, block.to(values["image_tokens"].device)(
    ...         *[values[n] for n in block.requires]))
    >>> test_contract()

Example:
    >>> import torch
    >>> from imtm.testing import check_component
    >>> from imtm.components import GlobalCosine
    >>> from imtm import Tokens
    >>> check_component(GlobalCosine(), {"image_tokens": Tokens(torch.randn(2, 3, 4)),
    ...                                  "text_tokens": Tokens(torch.randn(3, 5, 4))}).skipped
    {'functional': 'no functional twin given'}
"""

from imtm.testing import conformance as _conformance
from imtm.testing.conformance import (
    CHECKS,
    ConformanceReport,
    block_classes,
    check_clone,
    check_component,
    check_contract,
    check_deterministic,
    check_dtypes,
    check_finite,
    check_functional,
    check_gradients,
    check_inputs_unchanged,
    check_outputs,
    check_padding,
    check_state_dict,
    example_cases,
    parametrize_with_checks,
)

#: The names of imtm.testing.strategies (the same list as its __all__), loaded on first use:
#: importing them needs hypothesis, and check_component must not.
_STRATEGIES = (
    "DEFAULT_VOCAB_SIZE",
    "PADDINGS",
    "InputSizes",
    "captions",
    "component_inputs",
    "devices",
    "dtypes",
    "example_inputs",
    "image_ids",
    "masks",
    "score_matrices",
    "tokens",
)

__all__ = [*_conformance.__all__, *_STRATEGIES]


def __getattr__(name):
    if name in _STRATEGIES:
        try:
            from imtm.testing import strategies
        except ModuleNotFoundError as err:
            if err.name != "hypothesis":
                raise
            raise ImportError(
                f"imtm.testing.{name} is a hypothesis strategy and needs hypothesis: pip install 'imtm[test]'"
            ) from err
        return getattr(strategies, name)
    raise AttributeError(f"module 'imtm.testing' has no attribute {name!r}")
