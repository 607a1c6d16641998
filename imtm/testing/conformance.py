"""The conformance battery every imtm block passes.

Like timm's test over every model and scikit-learn's ``check_estimator``: public
``check_*`` functions, one per part of the component contract, each runnable on its
own; :func:`check_component` runs them all and reports every failure at once, and
:func:`parametrize_with_checks` makes each check of each block its own pytest test.
What a provided value must look like comes from the value specs of :mod:`imtm.contract`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from sklearn.base import clone

from imtm._checks import suggest
from imtm.component import Component, Loss
from imtm.contract import VALUE_SPECS
from imtm.tokens import Tokens

__all__ = [
    "CHECKS",
    "ConformanceReport",
    "check_component",
    "check_outputs",
    "check_contract",
    "check_finite",
    "check_inputs_unchanged",
    "check_deterministic",
    "check_gradients",
    "check_dtypes",
    "check_state_dict",
    "check_clone",
    "check_padding",
    "check_functional",
    "block_classes",
    "example_cases",
    "parametrize_with_checks",
]

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


def _names(side: str) -> tuple[str, ...]:
    """Vocabulary names whose first axis follows the images (``"Bi"``) or the captions (``"Bt"``)."""
    return tuple(n for n, v in VALUE_SPECS.items() if v.batch_axis() == side)


def _is_pair_matrix(name: str) -> bool:
    value = VALUE_SPECS.get(name)
    return value is not None and value.kind == "tensor" and value.shape == ("Bi", "Bt")


@dataclass
class ConformanceReport:
    """What :func:`check_component` ran: the checks that passed and those skipped, with why."""

    block: str
    passed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.block}: {len(self.passed)} checks passed ({', '.join(self.passed)})"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"  FAILED {name}: {why}" for name, why in self.failed.items()]
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
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # A value of its own kind (ELA's LexiconLogits): its tensor fields.
        return dataclasses.replace(
            value,
            **{
                f.name: _map_tensors(getattr(value, f.name), fn, floats_only)
                for f in dataclasses.fields(value)
                if f.init
            },
        )
    return value


def _linked_to(block: Any, dtype: torch.dtype) -> None:
    """The blocks ``block`` links to (and theirs) to ``dtype``; ``block.to`` leaves them."""
    for _, linked in _borrowed_modules(block):
        linked.to(dtype)
        _linked_to(linked, dtype)


def _load_linked(fresh: Any, block: Any) -> None:
    """A linked block's weights are its partner's: ``fresh``'s partners load ``block``'s (and theirs)."""
    for attr, linked in _borrowed_modules(block):
        partner = fresh.__dict__.get(attr)
        if isinstance(partner, torch.nn.Module):
            partner.load_state_dict(linked.state_dict())
            _load_linked(partner, linked)


def _borrowed_modules(block: Any) -> list[tuple[str, torch.nn.Module]]:
    """The modules a linked block uses without owning them (its ``_borrowed`` attributes)."""
    found = ((a, block.__dict__.get(a)) for a in getattr(block, "_borrowed", ()))
    return [(a, m) for a, m in found if isinstance(m, torch.nn.Module)]


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
    def __init__(
        self,
        block,
        inputs,
        functional,
        rtol,
        atol,
        extra_padding,
        padding_scale,
        seed,
        caller="check_component",
    ):
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
        def first(names):
            sizes = (_batch_size(self.inputs[n]) for n in names if n in self.inputs)
            return next((b for b in sizes if b is not None), None)

        bi, bt = first(_names("Bi")), first(_names("Bt"))
        for n, v in self.inputs.items():
            if _is_pair_matrix(n) and isinstance(v, torch.Tensor) and v.dim() == 2:
                bi = bi if bi is not None else int(v.shape[0])
                bt = bt if bt is not None else int(v.shape[1])
        return bi, bt

    def eval_copy(self, dtype: torch.dtype | None = None):
        block = copy.deepcopy(self.block)
        if dtype is not None:
            block = block.to(dtype)
            _linked_to(block, dtype)
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
        self.require_inputs()
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

    def require_inputs(self) -> None:
        missing = [n for n in self.block.requires if n not in self.inputs]
        if missing:
            raise ValueError(
                f"{self.caller}({self.name}): inputs lacks {missing}; give an example value for every name "
                f"in requires={tuple(self.block.requires)}"
            )

    @functools.cached_property
    def eval_out(self) -> tuple:
        with torch.no_grad():
            return self.outputs(self.eval_copy())

    def check_outputs(self) -> None:
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
            value_spec = VALUE_SPECS.get(name)
            kind = value_spec.kind if value_spec is not None else "any"
            axes = value_spec.shape if value_spec is not None else None
            if kind == "tokens":
                if not isinstance(value, Tokens):
                    self.fail("outputs", f"{name!r} must be Tokens, got {type(value).__name__}")
                want = sizes.get(value_spec.batch_axis()) if value_spec.batch_axis() else None
                if want is not None and value.batch_size != want:
                    self.fail(
                        "outputs", f"{name!r} has batch size {value.batch_size}, expected {want}"
                    )
            elif _is_pair_matrix(name):
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
            elif kind == "tensor" and axes is not None:
                want = tuple(sizes.get(a) if isinstance(a, str) else a for a in axes)
                if (
                    not isinstance(value, torch.Tensor)
                    or value.dim() != len(axes)
                    or any(w is not None and w != n for w, n in zip(want, value.shape))
                ):
                    got = (
                        tuple(value.shape)
                        if isinstance(value, torch.Tensor)
                        else type(value).__name__
                    )
                    doc = ", ".join(
                        a if isinstance(a, str) else ("*" if a is None else str(a)) for a in axes
                    )
                    self.fail(
                        "outputs", f"{name!r} must be a ({doc}) tensor with {sizes}, got {got}"
                    )
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
        snapshot = {
            k: _map_tensors(v, torch.clone, floats_only=False) for k, v in self.inputs.items()
        }
        with torch.no_grad():
            self.outputs(self.eval_copy(), check="inputs_unchanged")
        for k, before in snapshot.items():
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
            _load_linked(fresh, self.block)
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


#: Options of the battery, with their defaults; every ``check_*`` function takes them all.
_DEFAULTS: dict[str, Any] = {
    "functional": None,
    "dtypes": (torch.float32, torch.float64),
    "rtol": 1e-5,
    "atol": 1e-6,
    "extra_padding": 3,
    "padding_scale": 1e3,
    "seed": 0,
}


def _battery(block, inputs, caller: str, options: Mapping[str, Any]) -> _Battery:
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(
            f"{caller}: unknown option(s) {unknown}; the options are {sorted(_DEFAULTS)}."
            + suggest(unknown[0], _DEFAULTS)
        )
    if not isinstance(inputs, Mapping):
        raise TypeError(
            f"{caller}: inputs must map value names to example values, got {type(inputs).__name__}"
        )
    o = {**_DEFAULTS, **options}
    return _Battery(
        block,
        inputs,
        o["functional"],
        o["rtol"],
        o["atol"],
        o["extra_padding"],
        o["padding_scale"],
        o["seed"],
        caller=caller,
    )


def _run(battery: _Battery, name: str, dtypes) -> str | None:
    """Run one check; return why it was skipped (``None``: it ran). Raises ``_Failure`` on failure."""
    if name == "contract":
        return battery.check_contract()
    battery.check_contract()
    if name == "dtypes":
        return battery.check_dtypes(dtypes)
    return getattr(battery, f"check_{name}")()


def _public_check(name: str, summary: str):
    def check(block: Component, inputs: Mapping[str, Any], **options) -> str | None:
        battery = _battery(block, inputs, f"check_{name}", options)
        try:
            return _run(battery, name, options.get("dtypes", _DEFAULTS["dtypes"]))
        except _Failure as err:
            raise AssertionError(str(err)) from None

    check.__name__ = check.__qualname__ = f"check_{name}"
    check.__doc__ = f"""The ``{name}`` check of :func:`check_component` alone: {summary}

    Args:
        block: the component to check (left as it was: the check works on copies).
        inputs: an example value for every name in ``block.requires``.
        **options: the options of :func:`check_component` (``functional``, ``dtypes``, ``rtol``,
            ``atol``, ``extra_padding``, ``padding_scale``, ``seed``).

    Returns:
        ``None`` when the check ran and passed, or why it does not apply to this block.

    Raises:
        AssertionError: the check failed; the message names the block and the check.
        ValueError: ``inputs`` lacks a required name.
    """
    return check


check_contract = _public_check(
    "contract", "a Component, ``requires`` / ``provides`` tuples of names, ``get_params`` works."
)
check_finite = _public_check("finite", "no NaN or inf in the outputs (real tokens only).")
check_inputs_unchanged = _public_check(
    "inputs_unchanged", "forward does not modify its inputs in place."
)
check_deterministic = _public_check("deterministic", "two calls in eval mode agree bit for bit.")
check_gradients = _public_check(
    "gradients", "finite gradients reach every trainable parameter and the floating-point inputs."
)
check_dtypes = _public_check(
    "dtypes", "outputs in each of ``dtypes``; float32 agrees with float64."
)
check_state_dict = _public_check(
    "state_dict", "a clone loaded with the block's state_dict gives the same outputs."
)
check_clone = _public_check("clone", "``clone``, ``get_params`` and ``set_params`` round trips.")
check_padding = _public_check("padding", "padded positions filled with garbage change no output.")
check_functional = _public_check("functional", "the module agrees with its functional twin.")


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
    """Run the conformance battery on one block; raise one ``AssertionError`` naming every failure.

    The checks (see :data:`CHECKS`; each is also a public function, ``check_<name>``,
    that runs alone), each on a copy of ``block`` so the caller's block is left as it was.
    ``contract`` runs first and stops the battery when it fails (the others would
    only repeat it); every other check runs whatever the others found:

    - ``contract``: a :class:`~imtm.Component`, ``requires`` / ``provides`` tuples of
      names, ``get_params`` works, ``inputs`` has every required name;
    - ``outputs``: one value per name in ``provides``; names of the vocabulary have the
      kind and shape their :class:`~imtm.contract.ValueSpec` gives (``image_tokens``:
      Tokens with ``Bi`` rows, ``scores*``: ``(Bi, Bt)``, ...), a :class:`~imtm.Loss`
      returns a floating-point scalar;
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
        AssertionError: one or more checks failed; the message has one line per failed
            check, each naming the block and the check.
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
    battery = _battery(
        block,
        inputs,
        "check_component",
        {
            "functional": functional,
            "rtol": rtol,
            "atol": atol,
            "extra_padding": extra_padding,
            "padding_scale": padding_scale,
            "seed": seed,
        },
    )
    report = battery.report
    battery.check_contract()  # a broken contract makes every other finding noise: stop here
    report.passed.append("contract")
    for name in CHECKS[1:]:
        if name in skip:
            report.skipped[name] = "asked to skip"
            continue
        try:
            why_not = _run(battery, name, dtypes)
        except _Failure as err:
            report.failed[name] = str(err)
            continue
        except Exception as err:  # noqa: BLE001 - a check that crashes is a failure of that check
            report.failed[name] = (
                f"check_component({battery.name}): {name} check failed: {type(err).__name__}: {err}"
            )
            continue
        if why_not:
            report.skipped[name] = why_not
        else:
            report.passed.append(name)
    if report.failed:
        raise AssertionError("\n".join(report.failed.values()))
    return report


def block_classes() -> list[type]:
    """The concrete block classes of the imtm package, by name (what the battery and docs cover).

    Left out: private and abstract bases (no ``forward`` of their own), and classes defined
    outside the package (a user's blocks, doctest examples).

    Example:
        >>> "GlobalCosine" in [cls.__name__ for cls in block_classes()]
        True
    """
    import sys

    from imtm.component import COMPONENT_REGISTRY, load_components

    load_components()
    found = []
    for name, cls in sorted(COMPONENT_REGISTRY.items()):
        module = sys.modules.get(cls.__module__)
        if (
            cls.__module__.startswith("imtm.")
            and not name.startswith("_")
            and name == cls.__name__
            and getattr(module, name, None) is cls
            and cls.forward is not torch.nn.Module.forward
        ):
            found.append(cls)
    return found


def example_cases(cls: type) -> list[tuple[Component, dict[str, Any], dict[str, Any]]]:
    """``(block, inputs, options)`` for every example a block class declares next to it.

    Each :class:`~imtm.contract.Example` of ``cls._examples()`` is built (with seed 0) and given
    :func:`imtm.testing.example_inputs`; a block whose example does not promise padding
    invariance skips the ``padding`` check. Needs hypothesis (the inputs' makers live with the
    strategies).

    Example:
        >>> from imtm.components import TopKAggregation
        >>> [repr(block) for block, _, _ in example_cases(TopKAggregation)]
        ['TopKAggregation(k=2)', 'TopKAggregation(k=None)', "TopKAggregation(average='cosines', k=None)"]
    """
    from imtm.contract import examples
    from imtm.testing.strategies import example_inputs

    out = []
    for example in examples(cls):
        torch.manual_seed(0)
        block = example.build(cls)
        skip = tuple(example.skip) + (() if example.padding else ("padding",))
        options: dict[str, Any] = {"skip": skip} if skip else {}
        out.append((block, example_inputs(block, example), options))
    return out


def _cases_of(given: Any) -> list[Any]:
    return list(example_cases(given)) if isinstance(given, type) else [given]


def parametrize_with_checks(cases: Iterable[Any], **options):
    """A ``pytest.mark.parametrize`` over every check of every block: one test id per check.

    As scikit-learn's ``parametrize_with_checks``: each case is a block and its example
    inputs, and the decorated test receives ``block`` and ``check``; ``check(block)`` runs
    one check (the battery's options bound). A failing check fails its own test, so a run
    shows every failure of every block.

    Args:
        cases: ``(block, inputs)`` pairs, or ``(block, inputs, options)`` with per-case options
            (``functional``, ``dtypes``, ``rtol``, ``atol``, ..., and ``skip``: checks to leave out),
            or block classes: each stands for the examples it declares next to it
            (:func:`example_cases`).
        **options: options shared by every case (per-case ones win).

    Returns:
        The ``pytest.mark.parametrize("block, check", ...)`` decorator; ids read
        ``<block repr>-<check>``.

    Example:
        >>> from imtm.components import TripletLoss
        >>> marker = parametrize_with_checks(
        ...     [(TripletLoss(), {"scores": torch.randn(3, 3), "positives": torch.eye(3, dtype=torch.bool)})])
        >>> [p.id for p in marker.args[1]][:3]
        ['TripletLoss()-contract', 'TripletLoss()-outputs', 'TripletLoss()-finite']
    """
    import pytest

    params = []
    for case in [c for given in cases for c in _cases_of(given)]:
        if not isinstance(case, tuple) or len(case) not in (2, 3):
            raise TypeError(
                f"parametrize_with_checks: each case is (block, inputs) or (block, inputs, options), "
                f"got {case!r}"
            )
        block, inputs = case[0], case[1]
        own = dict(options, **(case[2] if len(case) == 3 else {}))
        skip = own.pop("skip", ())
        skip = (skip,) if isinstance(skip, str) else tuple(skip)
        for name in skip:
            if name not in CHECKS[2:]:
                raise ValueError(
                    f"parametrize_with_checks: skip must name checks among {list(CHECKS[2:])}, "
                    f"got {name!r}." + suggest(name, CHECKS[2:])
                )
        _battery(block, inputs, "parametrize_with_checks", own)  # options and inputs checked now
        for name in CHECKS:
            if name in skip:
                continue
            check = functools.partial(_CHECKS_BY_NAME[name], inputs=inputs, **own)
            functools.update_wrapper(check, _CHECKS_BY_NAME[name])
            params.append(pytest.param(block, check, id=f"{block!r}-{name}"))
    return pytest.mark.parametrize("block, check", params)


_MISSING: Any = object()


def check_outputs(block: Component, values: Mapping[str, Any], out: Any = _MISSING) -> None:
    """Assert the component contract for one call: ``out = block(*[values[n] for n in block.requires])``.

    The ``outputs`` and ``finite`` checks of :func:`check_component` on an output
    you computed yourself (in a property test, on any device or dtype); without
    ``out``, on the block's own output in eval mode (the ``outputs`` check alone):

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
        out: what ``block`` returned; default: call a copy of it in eval mode.

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
        raise TypeError(
            f"check_outputs: values must map value names to the inputs, got {type(values).__name__}"
        )
    battery = _Battery(block, values, None, 0.0, 0.0, 0, 0.0, 0, caller="check_outputs")
    try:
        battery.check_contract()
        outputs = battery.eval_out if out is _MISSING else battery.as_tuple(out, "outputs")
        battery.verify_outputs(outputs)
        battery.verify_finite(outputs)
    except _Failure as err:
        raise AssertionError(str(err)) from None


_CHECKS_BY_NAME: dict[str, Callable[..., Any]] = {
    "contract": check_contract,
    "outputs": lambda block, inputs, **options: check_outputs(block, inputs),
    "finite": check_finite,
    "inputs_unchanged": check_inputs_unchanged,
    "deterministic": check_deterministic,
    "gradients": check_gradients,
    "dtypes": check_dtypes,
    "state_dict": check_state_dict,
    "clone": check_clone,
    "padding": check_padding,
    "functional": check_functional,
}
