"""check_component: the conformance battery every imtm block passes.

Like timm's test over every model and scikit-learn's ``check_estimator``: one
function that exercises the component contract on example inputs, so a new
block (ours or a user's) gets the same checks as every other.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from sklearn.base import clone

from imtm.component import Component, Loss, suggest
from imtm.tokens import Tokens

__all__ = ["CHECKS", "ConformanceReport", "check_component", "check_outputs"]

#: The checks, in the order they run. Any of them can be left out with ``skip=``.
CHECKS = (
    "contract",
    "outputs",
    "finite",
    "inputs_unchanged",
    "deterministic",
    "gradients",
    "dtypes",
    "state_dict",
    "clone",
    "padding",
    "functional",
)

#: Tolerances of the float32-vs-float64 agreement check: float32 rounding, not a bug, sets them.
DTYPE_RTOL, DTYPE_ATOL = 1e-3, 1e-4

#: Value names whose batch axis follows the images (Bi) or the captions (Bt).
_IMAGE_SIDE = ("images", "image_tokens", "image_embedding", "visual_phrases", "masked_image_tokens")
_TEXT_SIDE = ("texts", "text_tokens", "text_embedding", "image_ids", "text_phrase", "masked_texts",
              "masked_text_tokens", "cross_text_tokens")
_PAIR_VALUES = ("positives", "scores", "scores_i2t", "scores_t2i", "scores_intra", "scores_inter_i2t",
                "scores_inter_t2i", "scores_inter", "itc_scores", "sparse_mask", "negatives_i2t", "negatives_t2i")
#: Outputs that are Tokens with one row per image (Bi) or per caption (Bt).
_TOKEN_VALUES = {"image_tokens": "Bi", "visual_phrases": "Bi", "masked_image_tokens": "Bi",
                 "text_tokens": "Bt", "masked_texts": "Bt", "masked_text_tokens": "Bt", "cross_text_tokens": "Bt"}
#: Documented shapes of other vocabulary names (imtm.component.VALUE_NAMES), axis by axis: Bi, Bt,
#: N (the image tokens' width), M (the text tokens' width), an int, or None (any size).
_SHAPES = {
    "image_embedding": ("Bi", None),
    "text_embedding": ("Bt", None),
    "text_phrase": ("Bt", None),
    "keep_decisions": ("Bi", "Bt", "N"),
    "patch_scores": ("Bi", "Bt", "N"),
    "aggregated_tokens": ("Bi", "Bt", None, None),
    "fused_tokens": ("Bi", "Bt", None),
    "word_lexicon": ("Bt", "M", None),
    "masked_patches": ("Bi", None),
    "mlm_labels": ("Bt", None),
    "itm_logits": (None, 2),
    "itm_labels": (None,),
}


@dataclass
class ConformanceReport:
    """What :func:`check_component` ran: the checks that passed and those skipped, with why."""

    block: str
    passed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.block}: {len(self.passed)} checks passed ({', '.join(self.passed)})"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


class _Failure(AssertionError):
    pass


# ---------------------------------------------------------------------- value helpers
def _map_tensors(
    value: Any, fn: Callable[[torch.Tensor], torch.Tensor], floats_only: bool = True
) -> Any:
    """Apply ``fn`` to the tensors inside ``value`` (Tokens, tuples, lists, dicts).

    With ``floats_only`` only floating-point tensors are touched (masks, ids and
    ``positives`` keep their dtype when a block is converted to float64).
    """

    def touch(t: torch.Tensor) -> bool:
        return t.is_floating_point() or not floats_only

    if isinstance(value, torch.Tensor):
        return fn(value) if touch(value) else value
    if isinstance(value, Tokens):
        feats = fn(value.feats) if touch(value.feats) else value.feats
        mask = value.mask if floats_only else fn(value.mask)
        return dataclasses.replace(value, feats=feats, mask=mask)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn, floats_only) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn, floats_only) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn, floats_only) for k, v in value.items()}
    return value


def _leaves(value: Any, path: str, full: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The tensors that define a value, by path.

    Tokens count by their lengths and real tokens only (padding content means
    nothing), unless ``full``, which takes every feature and the mask.
    """
    if isinstance(value, torch.Tensor):
        return [(path, value)]
    if isinstance(value, Tokens):
        if full:
            return [(f"{path}.feats", value.feats), (f"{path}.mask", value.mask)]
        return [
            (f"{path}.lengths", value.lengths),
            (f"{path}.feats[mask]", value.feats[value.mask]),
        ]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = []
        for f in dataclasses.fields(value):
            out += _leaves(getattr(value, f.name), f"{path}.{f.name}", full)
        return out
    if isinstance(value, (tuple, list)):
        out = []
        for k, v in enumerate(value):
            out += _leaves(v, f"{path}[{k}]", full)
        return out
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            out += _leaves(v, f"{path}[{k!r}]", full)
        return out
    return []


def _batch_size(value: Any) -> int | None:
    if isinstance(value, Tokens):
        return value.batch_size
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() else None
    if isinstance(value, (list, tuple)):
        return len(value)
    return None


def _crop_to(value: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """``value`` cut to ``shape`` when padding only made some axes longer, else None."""
    if value.dim() != len(shape) or any(a < b for a, b in zip(value.shape, shape)):
        return None
    return value[tuple(slice(0, n) for n in shape)]


# ---------------------------------------------------------------------- the battery
class _Battery:
    def __init__(self, block, inputs, functional, rtol, atol, extra_padding, padding_scale, seed,
                 caller="check_component"):
        self.caller = caller
        self.block = block
        self.name = type(block).__name__
        self.inputs = dict(inputs)
        self.functional = functional
        self.rtol, self.atol = rtol, atol
        self.extra_padding = extra_padding
        self.padding_scale = padding_scale
        self.seed = seed
        self.report = ConformanceReport(self.name)

    # -- helpers
    def fail(self, check: str, message: str) -> None:
        raise _Failure(f"{self.caller}({self.name}): {check} check failed: {message}")

    def args(self, inputs: Mapping[str, Any] | None = None) -> list[Any]:
        inputs = self.inputs if inputs is None else inputs
        return [inputs[n] for n in self.block.requires]

    def outputs(self, block, inputs=None, *, check: str = "outputs") -> tuple:
        out = block(*self.args(inputs))
        return self.as_tuple(out, check)

    def as_tuple(self, out, check: str) -> tuple:
        provides = tuple(self.block.provides)
        if len(provides) == 1:
            return (out,)
        if not isinstance(out, (tuple, list)) or len(out) != len(provides):
            got = (
                f"a {type(out).__name__}"
                if not isinstance(out, (tuple, list))
                else f"{len(out)} values"
            )
            self.fail(
                check, f"provides {provides} ({len(provides)} values) but forward returned {got}"
            )
        return tuple(out)

    def compare(
        self, check: str, expected: tuple, actual: tuple, rtol: float, atol: float, crop=False
    ) -> None:
        for name, e, a in zip(self.block.provides, expected, actual):
            e_leaves, a_leaves = _leaves(e, name), _leaves(a, name)
            if [p for p, _ in e_leaves] != [p for p, _ in a_leaves]:
                self.fail(
                    check,
                    f"output {name!r} changed structure: {[p for p, _ in e_leaves]} vs {[p for p, _ in a_leaves]}",
                )
            for (path, x), (_, y) in zip(e_leaves, a_leaves):
                if crop and x.shape != y.shape:
                    cropped = _crop_to(y, x.shape)
                    if cropped is None:
                        self.fail(
                            check, f"{path} has shape {tuple(y.shape)}, expected {tuple(x.shape)}"
                        )
                    y = cropped
                try:
                    torch.testing.assert_close(
                        y,
                        x.to(y.dtype) if x.dtype != y.dtype else x,
                        rtol=rtol,
                        atol=atol,
                        equal_nan=False,
                    )
                except AssertionError as err:
                    self.fail(check, f"{path} differs: {err}")

    def batch_sizes(self) -> tuple[int | None, int | None]:
        bi = next((_batch_size(self.inputs[n]) for n in _IMAGE_SIDE if n in self.inputs), None)
        bt = next((_batch_size(self.inputs[n]) for n in _TEXT_SIDE if n in self.inputs), None)
        for n in _PAIR_VALUES:
            v = self.inputs.get(n)
            if isinstance(v, torch.Tensor) and v.dim() == 2:
                bi = bi if bi is not None else int(v.shape[0])
                bt = bt if bt is not None else int(v.shape[1])
        return bi, bt

    def eval_copy(self, dtype: torch.dtype | None = None):
        block = copy.deepcopy(self.block)
        if dtype is not None:
            block = block.to(dtype)
        return block.eval()

    # -- checks
    def check_contract(self) -> None:
        block = self.block
        if not isinstance(block, Component):
            self.fail("contract", f"{self.name} is not an imtm.Component subclass")
        for attr in ("requires", "provides"):
            names = getattr(block, attr)
            if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
                self.fail("contract", f"{attr} must be a tuple of value names, got {names!r}")
        if len(block.provides) == 0:
            self.fail("contract", "provides names no value")
        missing = [n for n in block.requires if n not in self.inputs]
        if missing:
            raise ValueError(
                f"check_component({self.name}): inputs lacks {missing}; give an example value for every name "
                f"in requires={tuple(block.requires)}"
            )
        try:
            block.get_params(deep=False)
        except AttributeError as err:
            self.fail(
                "contract",
                f"get_params failed ({err}); store every constructor argument as self.<name>",
            )
        if isinstance(block, Loss) and not isinstance(getattr(block, "weight", None), (int, float)):
            self.fail(
                "contract", f"a Loss needs a numeric weight, got {getattr(block, 'weight', None)!r}"
            )

    def check_outputs(self) -> None:
        self.snapshot = {
            k: _map_tensors(v, torch.clone, floats_only=False) for k, v in self.inputs.items()
        }
        with torch.no_grad():
            self.eval_out = self.outputs(self.eval_copy())
        self.verify_outputs(self.eval_out)

    def widths(self) -> dict[str, int | None]:
        """``N`` and ``M``: the widths of the image and text tokens among the inputs (None: unknown)."""
        out: dict[str, int | None] = {"N": None, "M": None}
        for axis, name in (("N", "image_tokens"), ("M", "text_tokens")):
            value = self.inputs.get(name)
            if isinstance(value, Tokens):
                out[axis] = value.num_tokens
        return out

    def verify_outputs(self, outputs: tuple) -> None:
        """The ``outputs`` check on given outputs: types and documented shapes of each provided name."""
        bi, bt = self.batch_sizes()
        sizes = {"Bi": bi, "Bt": bt, **self.widths()}
        for name, value in zip(self.block.provides, outputs):
            if isinstance(self.block, Loss):
                if not (
                    isinstance(value, torch.Tensor)
                    and value.dim() == 0
                    and value.is_floating_point()
                ):
                    shape = (
                        tuple(value.shape)
                        if isinstance(value, torch.Tensor)
                        else type(value).__name__
                    )
                    self.fail(
                        "outputs", f"a Loss returns a floating-point scalar; {name!r} is {shape}"
                    )
                continue
            if name in _TOKEN_VALUES:
                if not isinstance(value, Tokens):
                    self.fail("outputs", f"{name!r} must be Tokens, got {type(value).__name__}")
                want = sizes[_TOKEN_VALUES[name]]
                if want is not None and value.batch_size != want:
                    self.fail(
                        "outputs", f"{name!r} has batch size {value.batch_size}, expected {want}"
                    )
            elif name in _PAIR_VALUES:
                if not isinstance(value, torch.Tensor) or (
                    bi is not None and bt is not None and tuple(value.shape) != (bi, bt)
                ):
                    got = (
                        tuple(value.shape)
                        if isinstance(value, torch.Tensor)
                        else type(value).__name__
                    )
                    self.fail(
                        "outputs", f"{name!r} must be a (Bi, Bt) = ({bi}, {bt}) tensor, got {got}"
                    )
            elif name in _SHAPES:
                axes = _SHAPES[name]
                want = tuple(sizes.get(a) if isinstance(a, str) else a for a in axes)
                if (
                    not isinstance(value, torch.Tensor)
                    or value.dim() != len(axes)
                    or any(w is not None and w != n for w, n in zip(want, value.shape))
                ):
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    doc = ", ".join(a if isinstance(a, str) else ("*" if a is None else str(a)) for a in axes)
                    self.fail("outputs", f"{name!r} must be a ({doc}) tensor with {sizes}, got {got}")
            elif not _leaves(value, name) and not isinstance(value, (torch.Tensor, Tokens)):
                self.fail("outputs", f"{name!r} is a {type(value).__name__}, holding no tensor")

    def check_finite(self) -> None:
        self.verify_finite(self.eval_out)

    def verify_finite(self, outputs: tuple) -> None:
        """The ``finite`` check on given outputs: no NaN or inf (real tokens of Tokens only)."""
        for name, value in zip(self.block.provides, outputs):
            for path, t in _leaves(value, name):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    self.fail(
                        "finite",
                        f"{path} holds {int((~torch.isfinite(t)).sum())} NaN or inf value(s)",
                    )

    def check_inputs_unchanged(self) -> None:
        for k, before in self.snapshot.items():
            for (path, x), (_, y) in zip(
                _leaves(before, k, full=True), _leaves(self.inputs[k], k, full=True)
            ):
                if x.shape != y.shape or not torch.equal(x, y):
                    self.fail("inputs_unchanged", f"forward modified its input {path} in place")

    def check_gradients(self) -> str | None:
        block = copy.deepcopy(self.block).train()
        leaves: list[tuple[str, torch.Tensor]] = []

        def make_leaf(t: torch.Tensor) -> torch.Tensor:
            leaf = t.detach().clone().requires_grad_(True)
            leaves.append((f"input {len(leaves)}", leaf))
            return leaf

        inputs = {k: _map_tensors(v, make_leaf) for k, v in self.inputs.items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            out = self.outputs(block, inputs, check="gradients")
        generator = torch.Generator().manual_seed(self.seed)
        total = None
        for name, value in zip(self.block.provides, out):
            for _, t in _leaves(value, name):
                if not (t.is_floating_point() and t.requires_grad):
                    continue
                # A random projection rather than a plain sum: the sum of a softmax (or of
                # any normalised output) is constant and would hide a broken gradient.
                w = torch.randn(t.shape, generator=generator, dtype=torch.float64).to(
                    t.device, t.dtype
                )
                term = (t * w).sum() if t.dim() else t
                total = term if total is None else total + term
        if total is None:
            return "no output is differentiable"
        total.backward()
        params = [(n, p) for n, p in block.named_parameters() if p.requires_grad]
        missing = [n for n, p in params if p.grad is None]
        if missing:
            self.fail("gradients", f"no gradient reaches the trainable parameters {missing}")
        for n, p in params:
            if not bool(torch.isfinite(p.grad).all()):
                self.fail("gradients", f"the gradient of parameter {n!r} holds NaN or inf")
        reached = 0
        for what, leaf in leaves:
            if leaf.grad is not None:
                reached += 1
                if not bool(torch.isfinite(leaf.grad).all()):
                    self.fail(
                        "gradients",
                        f"the gradient of {what} (a floating-point input) holds NaN or inf",
                    )
        if not params and reached == 0:
            self.fail(
                "gradients",
                "the output requires grad but no parameter or input received a gradient",
            )
        return None

    def check_dtypes(self, dtypes: Iterable[torch.dtype]) -> None:
        results = {}
        for dtype in dtypes:
            inputs = {
                k: _map_tensors(v, lambda t, d=dtype: t.to(d)) for k, v in self.inputs.items()
            }
            with torch.no_grad():
                try:
                    out = self.outputs(self.eval_copy(dtype), inputs, check="dtypes")
                except Exception as err:  # noqa: BLE001 - any failure here is the finding
                    self.fail("dtypes", f"forward fails in {dtype}: {type(err).__name__}: {err}")
            for name, value in zip(self.block.provides, out):
                for path, t in _leaves(value, name):
                    if t.is_floating_point() and t.dtype != dtype:
                        self.fail(
                            "dtypes",
                            f"with the block and its inputs in {dtype}, {path} came back in {t.dtype}",
                        )
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        self.fail("dtypes", f"{path} holds NaN or inf in {dtype}")
            results[dtype] = out
        if torch.float32 in results and torch.float64 in results:
            self.compare(
                "dtypes", results[torch.float64], results[torch.float32], DTYPE_RTOL, DTYPE_ATOL
            )

    def check_deterministic(self) -> None:
        block = self.eval_copy()
        with torch.no_grad():
            first = self.outputs(block, check="deterministic")
            second = self.outputs(block, check="deterministic")
        self.compare("deterministic", first, second, 0.0, 0.0)

    def check_state_dict(self) -> None:
        try:
            fresh = clone(self.block)
        except Exception as err:  # noqa: BLE001
            self.fail("state_dict", f"sklearn.base.clone failed: {type(err).__name__}: {err}")
        tensors = list(self.block.parameters()) + list(self.block.buffers())
        floats = [t for t in tensors if t.is_floating_point()]
        if tensors:
            fresh = fresh.to(tensors[0].device)
        if floats:
            fresh = fresh.to(floats[0].dtype)
        try:
            fresh.load_state_dict(self.block.state_dict())
        except Exception as err:  # noqa: BLE001
            self.fail("state_dict", f"a clone does not load the block's state_dict: {err}")
        with torch.no_grad():
            expected = self.outputs(self.eval_copy(), check="state_dict")
            actual = self.outputs(fresh.eval(), check="state_dict")
        self.compare("state_dict", expected, actual, 0.0, 0.0)

    def check_clone(self) -> None:
        block = self.block
        params = block.get_params(deep=False)
        for required in ("requires", "provides"):
            if required not in params:
                self.fail(
                    "clone",
                    f"get_params lacks {required!r}; __init__ must take requires=None, provides=None",
                )
        try:
            copy_ = clone(block)
        except Exception as err:  # noqa: BLE001
            self.fail("clone", f"sklearn.base.clone failed: {type(err).__name__}: {err}")
        if type(copy_) is not type(block):
            self.fail("clone", f"clone returned a {type(copy_).__name__}")
        if tuple(copy_.requires) != tuple(block.requires) or tuple(copy_.provides) != tuple(
            block.provides
        ):
            self.fail("clone", "clone lost the renamed requires/provides")

        def storages(m):
            return {p.data_ptr() for p in m.parameters() if p.numel()}

        shared = storages(block) & storages(copy_)
        if shared:
            self.fail("clone", "the clone shares parameter storage with the original")
        again = clone(block).set_params(**params).get_params(deep=False)
        for k, v in params.items():
            if again[k] is not v:
                self.fail(
                    "clone",
                    f"set_params({k}=...) then get_params()[{k!r}] does not give the value back",
                )
        try:
            clone(block).set_params(not_a_parameter_of_this_block=1)
        except ValueError:
            pass
        else:
            self.fail("clone", "set_params accepted an unknown parameter name")
        repr(block)

    def check_padding(self) -> str | None:
        token_inputs = [k for k in self.block.requires if isinstance(self.inputs[k], Tokens)]
        if not token_inputs:
            return "no Tokens input"
        generator = torch.Generator().manual_seed(self.seed)
        block = self.eval_copy()
        with torch.no_grad():
            expected = self.outputs(block, check="padding")
            for key in token_inputs:
                tok = self.inputs[key]
                b = tok.batch_size
                extra_shape = (b, self.extra_padding, *tok.feats.shape[2:])
                if tok.feats.is_floating_point():
                    garbage = (
                        torch.randn(extra_shape, generator=generator, dtype=torch.float64)
                        * self.padding_scale
                    )
                else:
                    high = int(tok.feats[tok.mask].max()) + 1 if bool(tok.mask.any()) else 1
                    garbage = torch.randint(0, max(high, 1), extra_shape, generator=generator)
                garbage = garbage.to(tok.feats.device, tok.feats.dtype)
                padded = Tokens(
                    torch.cat([tok.feats, garbage], dim=1),
                    torch.cat([tok.mask, tok.mask.new_zeros(b, self.extra_padding)], dim=1),
                    grid=tok.grid,
                    num_prefix_tokens=tok.num_prefix_tokens,
                )
                inputs = dict(self.inputs)
                inputs[key] = padded
                actual = self.outputs(block, inputs, check="padding")
                try:
                    self.compare("padding", expected, actual, self.rtol, self.atol, crop=True)
                except _Failure as err:
                    raise _Failure(
                        f"{err} (after appending {self.extra_padding} padded positions of garbage to {key!r})"
                    ) from None
        return None

    def check_functional(self) -> str | None:
        if self.functional is None:
            return "no functional twin given"
        with torch.no_grad():
            expected = self.outputs(self.eval_copy(), check="functional")
            actual = self.as_tuple(self.functional(*self.args()), "functional")
        self.compare("functional", expected, actual, self.rtol, self.atol)
        return None


def check_component(
    block: Component,
    inputs: Mapping[str, Any],
    *,
    functional: Callable[..., Any] | None = None,
    skip: Iterable[str] = (),
    dtypes: Iterable[torch.dtype] = (torch.float32, torch.float64),
    rtol: float = 1e-5,
    atol: float = 1e-6,
    extra_padding: int = 3,
    padding_scale: float = 1e3,
    seed: int = 0,
) -> ConformanceReport:
    """Run the conformance battery on one block; raise ``AssertionError`` at the first failure.

    The checks (see :data:`CHECKS`), each on a copy of ``block`` so the caller's
    block is left as it was:

    - ``contract``: a :class:`~imtm.Component`, ``requires`` / ``provides`` tuples of
      names, ``get_params`` works, ``inputs`` has every required name;
    - ``outputs``: one value per name in ``provides``; known names have their shapes
      (``image_tokens``: Tokens with ``Bi`` rows, ``scores*``: ``(Bi, Bt)``, ...), a
      :class:`~imtm.Loss` returns a floating-point scalar;
    - ``finite``: no NaN or inf in the outputs (real tokens only);
    - ``inputs_unchanged``: forward does not modify its inputs in place;
    - ``deterministic``: two calls in eval mode are equal, bit for bit;
    - ``gradients``: in training mode, a random projection of the outputs (a loss:
      the loss) back-propagates finite gradients to every trainable parameter and
      to the floating-point inputs it reaches;
    - ``dtypes``: block and floating-point inputs converted to each of ``dtypes``
      give outputs of that dtype, and float32 agrees with float64;
    - ``state_dict``: ``sklearn.base.clone(block)`` loaded with the block's
      ``state_dict`` gives the same outputs, bit for bit;
    - ``clone``: ``clone``, ``get_params`` and ``set_params`` round trips; the clone
      shares no parameter storage; an unknown parameter is refused;
    - ``padding``: for each Tokens input, appending padded positions filled with
      large random values (random ids for integer tokens) leaves every output the
      same (Tokens compared on their real tokens, tensors on the original extent);
    - ``functional``: with ``functional=``, the module and its functional twin agree
      (eval mode; the twin takes the same positional values).

    Args:
        block: the component to check.
        inputs: an example value for every name in ``block.requires`` (Tokens,
            tensors, ``list[str]``).
        functional: the functional twin, called with the required values in order.
        skip: names of checks to leave out.
        dtypes: floating-point dtypes the block must work in.
        rtol, atol: tolerances of the padding and functional comparisons.
        extra_padding: how many padded positions the padding check appends.
        padding_scale: scale of the random values put in the padding.
        seed: seed of the garbage, the gradient projection and training-mode randomness.

    Returns:
        A :class:`ConformanceReport` listing the checks that passed and those skipped.

    Raises:
        AssertionError: a check failed; the message names the block and the check.
        ValueError: ``inputs`` lacks a required name, or ``skip`` names an unknown check.

    Example:
        >>> from imtm.components import TripletLoss
        >>> report = check_component(TripletLoss(), {"scores": torch.randn(4, 4),
        ...                                          "positives": torch.eye(4, dtype=torch.bool)})
        >>> "gradients" in report.passed
        True
    """
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    for name in skip:
        if name not in CHECKS[2:]:
            raise ValueError(
                f"skip must name checks among {list(CHECKS[2:])} (contract and outputs always run), "
                f"got {name!r}." + suggest(name, CHECKS[2:])
            )
    if not isinstance(inputs, Mapping):
        raise TypeError(
            f"check_component: inputs must map value names to example values, got {type(inputs).__name__}"
        )
    battery = _Battery(block, inputs, functional, rtol, atol, extra_padding, padding_scale, seed)
    report = battery.report
    # The contract (and the first call, which the later checks compare against) always run.
    battery.check_contract()
    report.passed.append("contract")
    battery.check_outputs()
    report.passed.append("outputs")
    steps: dict[str, Callable[[], str | None]] = {
        "finite": battery.check_finite,
        "inputs_unchanged": battery.check_inputs_unchanged,
        "deterministic": battery.check_deterministic,
        "gradients": battery.check_gradients,
        "dtypes": lambda: battery.check_dtypes(dtypes),
        "state_dict": battery.check_state_dict,
        "clone": battery.check_clone,
        "padding": battery.check_padding,
        "functional": battery.check_functional,
    }
    for name, step in steps.items():
        if name in skip:
            report.skipped[name] = "asked to skip"
            continue
        why_not = step()
        if why_not:
            report.skipped[name] = why_not
        else:
            report.passed.append(name)
    return report


def check_outputs(block: Component, values: Mapping[str, Any], out: Any) -> None:
    """Assert the component contract for one call: ``out = block(*[values[n] for n in block.requires])``.

    The ``outputs`` and ``finite`` checks of :func:`check_component` on an output
    you computed yourself (in a property test, on any device or dtype):

    - one value per name in ``block.provides`` (a tuple when there are several);
    - the documented type and shape of each vocabulary name, with ``Bi``, ``Bt``,
      ``N`` and ``M`` read from ``values``: Tokens with ``Bi`` or ``Bt`` rows
      (``image_tokens``, ``text_tokens``, ...), ``(Bi, Bt)`` score matrices
      (``scores``, ``scores_i2t``, ...), ``(Bi, D)`` / ``(Bt, D)`` embeddings,
      ``(Bi, Bt, N)`` patch decisions, and a 0-dim floating-point loss from a
      :class:`~imtm.Loss`;
    - no NaN or inf in any floating-point output (the real tokens of Tokens).

    Args:
        block: the block that was called.
        values: the inputs it was called with, by name (e.g. from
            :func:`imtm.testing.component_inputs`).
        out: what ``block`` returned.

    Raises:
        AssertionError: the output breaks the contract; the message names the block
            and what is wrong.

    Example:
        >>> from imtm import Tokens
        >>> from imtm.components import GlobalCosine
        >>> values = {"image_tokens": Tokens(torch.randn(2, 3, 4)), "text_tokens": Tokens(torch.randn(5, 2, 4))}
        >>> check_outputs(GlobalCosine(), values, torch.zeros(2, 5))
        >>> check_outputs(GlobalCosine(), values, torch.zeros(5, 2))
        Traceback (most recent call last):
        ...
        AssertionError: check_outputs(GlobalCosine): outputs check failed: 'scores' must be a (Bi, Bt) = (2, 5) tensor, got (5, 2)
    """
    if not isinstance(values, Mapping):
        raise TypeError(f"check_outputs: values must map value names to the inputs, got {type(values).__name__}")
    battery = _Battery(block, values, None, 0.0, 0.0, 0, 0.0, 0, caller="check_outputs")
    try:
        battery.check_contract()
        outputs = battery.as_tuple(out, "outputs")
        battery.verify_outputs(outputs)
        battery.verify_finite(outputs)
    except _Failure as err:
        raise AssertionError(str(err)) from None
