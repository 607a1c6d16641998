"""The component contract: every block of imtm subclasses :class:`Component`.

A component is an ``nn.Module`` with one role. It declares, as class defaults,

- ``requires``: the names of the values it reads, in the order ``forward`` takes them;
- ``provides``: the names of the values it returns (one name: ``forward`` returns
  the value itself; several: a tuple in that order).

Both can be renamed per instance with the ``requires=`` / ``provides=`` constructor
keywords, so one block type can appear twice in a pipeline (for example a DCPA
triplet loss on ``scores_i2t`` and another on ``scores_t2i``).

Constructor arguments are stored unchanged under their own names, so
``get_params`` / ``set_params`` / :func:`sklearn.base.clone` behave as for any
scikit-learn estimator.

The vocabulary of value names (:data:`VALUE_NAMES`) is documented here, in one
place; method-specific blocks add their own names and say so in their docstrings.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
from numbers import Real
from typing import Any, ClassVar

import torch
import torch.nn as nn

from imtm._checks import suggest
from imtm.contract import VALUE_SPECS, Interval, ValueSpec, check_params, register_value

__all__ = [
    "Component",
    "Loss",
    "VALUE_NAMES",
    "suggest",
    "COMPONENT_REGISTRY",
    "register",
    "load_components",
    "ENTRY_POINT_GROUP",
    "restoring_saved_weights",
    "is_restoring_saved_weights",
]

#: The shared vocabulary of value names that flow between blocks: name -> one line for people.
#: The typed specs (side, kind, shape) are :data:`imtm.contract.VALUE_SPECS`; a block class that
#: declares ``values`` adds its names to both.
VALUE_NAMES: dict[str, str] = {name: value.doc for name, value in VALUE_SPECS.items()}

#: Every Component subclass defined by imtm or by a user, by class name. ``Matcher.load``
#: rebuilds blocks only from this registry: a configuration can never import code by path.
COMPONENT_REGISTRY: dict[str, type] = {}


#: The entry-point group in which an installed package declares its blocks, so that
#: :func:`load_components` (run by ``Matcher.load``) registers them in any process.
ENTRY_POINT_GROUP = "imtm.components"

#: Entry points of :data:`ENTRY_POINT_GROUP` that could not be loaded: name -> reason.
ENTRY_POINT_ERRORS: dict[str, str] = {}
_entry_points_loaded = False


def register(cls: type) -> type:
    """Add a block class to :data:`COMPONENT_REGISTRY`, under its class name; return the class.

    Every :class:`Component` subclass is registered when its class statement runs, so
    ``register`` is needed only to make that explicit (it works as a decorator). A saved
    model names its blocks by class name, and ``Matcher.load`` rebuilds them only from this
    registry: in a fresh process, the module that defines a third-party block must have been
    imported, or be declared in the ``imtm.components`` entry-point group of its package
    (see :func:`load_components`). A second class of the same name is kept under its
    qualified name (``module.Class``) and the first keeps the plain name.

    Raises:
        TypeError: ``cls`` is not a subclass of :class:`Component`.

    Example:
        >>> import imtm
        >>> @imtm.register
        ... class Halve(imtm.Component):
        ...     requires = ("scores",)
        ...     provides = ("scores",)
        ...     def forward(self, scores):
        ...         return scores / 2
        >>> imtm.component.COMPONENT_REGISTRY["Halve"] is Halve
        True
    """
    if not (isinstance(cls, type) and issubclass(cls, Component)):
        raise TypeError(
            f"imtm.register: only subclasses of imtm.Component can be registered as blocks, got {cls!r}"
        )
    name = cls.__name__
    if name in COMPONENT_REGISTRY and COMPONENT_REGISTRY[name] is not cls:
        existing = COMPONENT_REGISTRY[name]
        if (
            f"{existing.__module__}.{existing.__qualname__}"
            != f"{cls.__module__}.{cls.__qualname__}"
        ):
            # A second class of the same name (e.g. a user's): keep both reachable by qualified name.
            COMPONENT_REGISTRY[f"{cls.__module__}.{cls.__qualname__}"] = cls
            return cls
    COMPONENT_REGISTRY[name] = cls
    return cls


def load_components(*, reload: bool = False) -> dict[str, str]:
    """Register every imtm block, and the blocks installed packages declare; return what failed.

    Imports :mod:`imtm.components` (whose modules define, and so register, every built-in
    block), then, once per process (again with ``reload=True``), loads each entry point of
    the ``imtm.components`` group (:data:`ENTRY_POINT_GROUP`). An entry point names a
    block class (``myblock = mypackage.blocks:MyBlock``), which is registered, or a module
    (``mypackage = mypackage.blocks``), whose import registers the blocks it defines. A
    package declares them in its ``pyproject.toml``::

        [project.entry-points."imtm.components"]
        myblock = "mypackage.blocks:MyBlock"

    ``Matcher.load`` (and so every command that loads a model) calls this first. Only
    installed packages are imported, never a module named in a saved file.

    Returns:
        ``{entry point name: reason}`` for the entry points that could not be loaded (an
        import error, or an object that is neither a block class nor a module); the same
        dict is kept in :data:`ENTRY_POINT_ERRORS` and quoted when a block is unknown.
    """
    global _entry_points_loaded
    import importlib
    import types

    importlib.import_module("imtm.components")
    if _entry_points_loaded and not reload:
        return dict(ENTRY_POINT_ERRORS)
    from importlib.metadata import entry_points

    ENTRY_POINT_ERRORS.clear()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken third-party package must not stop other loads
            ENTRY_POINT_ERRORS[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"
            continue
        if isinstance(obj, type) and issubclass(obj, Component):
            register(obj)
        elif not isinstance(obj, types.ModuleType):
            ENTRY_POINT_ERRORS[ep.name] = (
                f"{ep.value} is a {type(obj).__name__}, neither an imtm.Component "
                "subclass nor a module"
            )
    _entry_points_loaded = True
    return dict(ENTRY_POINT_ERRORS)


_RESTORING = contextvars.ContextVar("imtm_restoring_saved_weights", default=False)


@contextlib.contextmanager
def restoring_saved_weights():
    """Within this block, encoders build their architecture only: their weights come from a saved model.

    ``Matcher.load`` rebuilds every block inside it and then loads the saved
    ``model.safetensors`` into them. Blocks that otherwise read pretrained weights
    (:class:`~imtm.components.HFTextEncoder`, :class:`~imtm.components.TimmVisionEncoder`)
    skip that read (and any download), so a saved model loads offline and without the
    files its encoders were first built from. A block of one's own that reads weights
    in ``__init__`` should check :func:`is_restoring_saved_weights` the same way.
    """
    token = _RESTORING.set(True)
    try:
        yield
    finally:
        _RESTORING.reset(token)


def is_restoring_saved_weights() -> bool:
    """Whether blocks are being rebuilt for a saved model (see :func:`restoring_saved_weights`)."""
    return _RESTORING.get()


_VALIDATING: contextvars.ContextVar[frozenset] = contextvars.ContextVar(
    "imtm_validating", default=frozenset()
)


def _checking_constraints(validate):
    """Wrap a class's own ``validate``: declared constraints first, then the hand-written checks.

    Runs :func:`~imtm.contract.check_params` once per call chain (a subclass's ``validate``
    calling ``super().validate()`` does not check twice) and marks the block as checked.
    """

    @functools.wraps(validate)
    def checked(self, *args, **kwargs):
        key = id(self)
        busy = _VALIDATING.get()
        if key in busy:
            return validate(self, *args, **kwargs)
        token = _VALIDATING.set(busy | {key})
        try:
            check_params(self)
            out = validate(self, *args, **kwargs)
        finally:
            _VALIDATING.reset(token)
        self.__dict__["_contract_checked"] = True
        return out

    return checked


_PARAM_NAMES: dict[type, frozenset] = {}


def _param_names(cls: type[Component]) -> frozenset:
    """The constructor arguments of a block class (cached: ``__setattr__`` asks on every store)."""
    names = _PARAM_NAMES.get(cls)
    if names is None:
        names = _PARAM_NAMES[cls] = frozenset(cls._get_param_names())
    return names


class Component(nn.Module):
    """Base class of every imtm block.

    Subclasses set ``requires`` / ``provides`` as class attributes, accept
    ``requires=None, provides=None`` keywords in ``__init__`` (passed on to
    ``super().__init__``), store every other constructor argument under its own
    name, and implement ``forward`` with positional arguments in ``requires`` order.

    Example:
        >>> import torch
        >>> class Double(Component):
        ...     requires = ("image_embedding",)
        ...     provides = ("image_embedding",)
        ...     def __init__(self, factor=2.0, *, requires=None, provides=None):
        ...         super().__init__(requires=requires, provides=provides)
        ...         self.factor = factor
        ...     def forward(self, x):
        ...         return x * self.factor
        >>> Double(factor=3.0).get_params()["factor"]
        3.0
    """

    # Class defaults that an instance may rename (``requires=`` / ``provides=``), so not ClassVars.
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    #: Value names this class introduces beyond :data:`imtm.contract.VALUE_SPECS` (added when the
    #: class is defined).
    values: ClassVar[tuple[ValueSpec, ...]] = ()
    #: What each constructor argument accepts (see :mod:`imtm.contract`), checked by :meth:`validate`.
    _parameter_constraints: ClassVar[dict[str, list]] = {}
    #: Set on an instance once :meth:`validate` passed; a new parameter value clears it.
    _contract_checked: ClassVar[bool] = False
    #: Whether ``Matcher(compile=True)`` compiles this block. False for a block whose cost is one
    #: fused kernel the compiler cannot improve (a packed RNN), or one call into an engine that runs
    #: eagerly in compiled regions (the blocked pairwise scorers): there compiling only adds graph
    #: breaks and guard checks, and the step gets slower.
    compiles: ClassVar[bool] = True
    #: Whether ``Matcher(compile=True)`` compiles this block when the Matcher runs on the CPU. False
    #: for a block measured slower compiled than eager there (ELA's blocks built on
    #: ``nn.TransformerEncoderLayer``, whose Inductor CPU code loses to eager's, and its transport
    #: loss; DCPA's phrase encoders): on other devices they compile.
    compiles_on_cpu: ClassVar[bool] = True

    @classmethod
    def _examples(cls) -> tuple:
        """Small configurations of this block and what their inputs need (none here).

        A block class returns :class:`imtm.contract.Example` s, next to the class: the
        property sweeps, ``imtm.testing.parametrize_with_checks(BlockClass)`` and the
        documentation read them through :func:`imtm.contract.examples`, so a new block needs no
        entry in any table elsewhere.
        """
        return ()

    def __init_subclass__(cls, abstract: bool = False, **kwargs):
        super().__init_subclass__(**kwargs)
        for value in cls.__dict__.get("values", ()):
            register_value(value)
            VALUE_NAMES[value.name] = value.doc
        if "validate" in cls.__dict__:
            setattr(cls, "validate", _checking_constraints(cls.__dict__["validate"]))  # noqa: B010 - a method of cls
        # A base that cannot work as a block on its own (``class Loss(Component, abstract=True)``)
        # stays out of the registry, so no configuration can build it; its subclasses are registered.
        if not abstract:
            register(cls)

    def __init__(self, *, requires=None, provides=None):
        super().__init__()
        # Stored only when renamed, so the class default shows through otherwise.
        if requires is not None:
            self.requires = requires
        if provides is not None:
            self.provides = provides

    def __call__(self, *args, **kwargs):
        # A block used on its own checks its parameters on its first call (and after a parameter
        # changes), never on every call; inside a Matcher, validate() already ran in fit. Code being
        # compiled skips it: torch.compile traces forward, not the checks.
        if not self._contract_checked and not torch.compiler.is_compiling():
            self.validate()
        return super().__call__(*args, **kwargs)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if self.__dict__.get("_contract_checked") and name in _param_names(type(self)):
            self.__dict__["_contract_checked"] = False

    # ``training`` lives in ``_training``: scikit-learn's estimator checks allow an ``__init__`` to set
    # its parameters and private attributes only, and nn.Module.__init__ sets ``training``.
    @property
    def training(self) -> bool:
        return self.__dict__.get("_training", True)

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_training"] = mode

    # ------------------------------------------------------------------ scikit-learn protocol
    @classmethod
    def _get_param_names(cls) -> list[str]:
        init = cls.__init__
        if init is object.__init__ or init is Component.__init__:
            return ["provides", "requires"] if init is Component.__init__ else []
        sig = inspect.signature(init)
        names = []
        for p in sig.parameters.values():
            if p.name == "self" or p.kind == p.VAR_KEYWORD:
                continue
            if p.kind == p.VAR_POSITIONAL:
                raise TypeError(
                    f"{cls.__name__}: components may not take *args in __init__ (scikit-learn rule)"
                )
            names.append(p.name)
        return sorted(names)

    def default_names(self) -> dict[str, tuple[str, ...]]:
        """The ``requires`` / ``provides`` this block has when they are not renamed.

        The class defaults; blocks whose defaults follow an option (``MeanEmbedding(side=...)``)
        override it.
        """
        cls = type(self)
        return {"requires": tuple(cls.requires), "provides": tuple(cls.provides)}

    def _name_param(self, key: str):
        """``requires`` / ``provides`` as a constructor argument: ``None`` unless renamed."""
        value = self.__dict__.get(key)
        if value is None:
            return None
        try:
            if tuple(value) == tuple(self.default_names()[key]):
                return None
        except (TypeError, ValueError):  # not a sequence of names (validate() says so)
            pass
        return value

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor arguments by name (``deep``: also those of nested blocks, as ``name__param``).

        ``requires`` / ``provides`` are ``None`` unless renamed (what the constructor was given),
        as scikit-learn reports an unchanged default.
        """
        out: dict[str, Any] = {}
        for name in self._get_param_names():
            if name in ("requires", "provides"):
                out[name] = self._name_param(name)
                continue
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                for k, v in value.get_params(deep=True).items():
                    out[f"{name}__{k}"] = v
            out[name] = value
        return out

    def set_params(self, **params) -> Component:
        """Set constructor arguments (``name__param`` reaches into nested blocks).

        Changing an argument that shapes parameters (a dimension) only takes effect
        in a rebuilt block: the Matcher rebuilds its fitted blocks from these
        arguments in ``fit``, as scikit-learn does.
        """
        valid = self._get_param_names()
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            head, _, rest = key.partition("__")
            if head not in valid:
                raise ValueError(
                    f"{type(self).__name__}: invalid parameter {head!r}; valid ones are {valid}."
                    + suggest(head, valid)
                )
            if rest:
                nested.setdefault(head, {})[rest] = value
            elif head in ("requires", "provides") and value is None:
                # back to the default names, as a new block built with requires=None has
                setattr(self, head, self.default_names()[head])
            else:
                setattr(self, head, value)
        for head, sub in nested.items():
            getattr(self, head).set_params(**sub)
        return self

    def _follow_option(self, old_value, option: str, defaults, params: dict) -> None:
        """After ``set_params``: names that still hold ``option``'s old defaults take its new ones.

        For blocks whose default ``requires`` / ``provides`` depend on an option
        (``MeanEmbedding(side=...)``, ``DimensionAlignmentLoss(pairs=...)``): a
        ``set_params`` of the option moves the names along, unless they were renamed
        (in this call or before). ``defaults(value)`` gives ``{"requires": ..., "provides": ...}``
        of an option value, or ``None`` for an unknown one.
        """
        new_value = getattr(self, option)
        try:
            same = bool(new_value == old_value)
        except (TypeError, ValueError):  # e.g. arrays; validate() refuses them later
            same = False
        if option not in params or same:
            return
        before, after = defaults(old_value), defaults(new_value)
        if before is None or after is None:
            return
        for key in ("requires", "provides"):
            if (
                key in after
                and key not in params
                and tuple(getattr(self, key)) == tuple(before[key])
            ):
                setattr(self, key, tuple(after[key]))

    def __sklearn_clone__(self):
        from sklearn.base import _clone_parametrized

        copy = _clone_parametrized(self)
        # The clone holds the same parameter values: checked if the original was.
        if self.__dict__.get("_contract_checked"):
            copy.__dict__["_contract_checked"] = True
        return copy

    def __sklearn_tags__(self):
        """scikit-learn's estimator tags: a block needs no ``fit`` and takes no 2-D arrays."""
        from sklearn.utils import InputTags, Tags, TargetTags

        return Tags(
            estimator_type=None,
            target_tags=TargetTags(required=False),
            transformer_tags=None,
            regressor_tags=None,
            classifier_tags=None,
            requires_fit=False,
            input_tags=InputTags(two_d_array=False),
        )

    def __repr__(self) -> str:
        """``ClassName(param=value, ...)`` with every parameter that differs from its default.

        As scikit-learn prints estimators (``print_changed_only``), so a Matcher's repr shows
        each block's settings on one line. :meth:`module_repr` gives PyTorch's tree of layers.

        Example:
            >>> from imtm.components import TripletLoss
            >>> TripletLoss(margin=0.5, requires=("scores_i2t", "scores_t2i", "positives"))
            TripletLoss(margin=0.5, requires=('scores_i2t', 'scores_t2i', 'positives'))
        """
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.changed_params().items())})"

    def changed_params(self) -> dict[str, Any]:
        """The constructor arguments whose values differ from the signature's defaults."""
        defaults = {
            p.name: p.default
            for p in inspect.signature(type(self).__init__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
        out = {}
        for name, value in self.get_params(deep=False).items():
            default = defaults.get(name, inspect.Parameter.empty)
            if default is inspect.Parameter.empty or _differs(value, default):
                out[name] = value
        return out

    def module_repr(self) -> str:
        """PyTorch's repr: the block's layers as a tree (``nn.Module.__repr__``)."""
        return nn.Module.__repr__(self)

    # ------------------------------------------------------------------ helpers
    @property
    def name_hint(self) -> str:
        """The automatic pipeline name (lower-case class name, as ``make_pipeline``)."""
        return type(self).__name__.lower()

    def validate(self):
        """Check the hyper-parameters; return ``self``.

        Every constructor argument is checked against the class's ``_parameter_constraints``
        (:func:`imtm.contract.check_params`, before anything a subclass adds). A subclass
        overrides this method only for what constraints cannot say (a relation between two
        arguments, a nested block); the declared constraints are checked first either way.
        The Matcher calls it on every block in :meth:`imtm.Matcher.validate` (so before
        ``fit`` starts), keeping ``__init__`` a plain store of its arguments. A block used
        alone checks on its first call, and again after a parameter changes; ``forward``
        never validates. A block that builds layers from its arguments (a dimension, a
        head count) calls ``validate()`` in ``__init__`` before building them, since no
        tensor can be built from an invalid size.

        Raises:
            imtm.contract.InvalidParameterError: an argument outside its declared constraints
                (both a ValueError and a TypeError).
        """
        return self

    def link(self, blocks) -> None:
        """Resolve references to other blocks of a pipeline by name (default: none).

        The Matcher calls it on every block with ``{name: block}`` of its pipeline
        after building the fitted blocks (and in ``validate``). A block that must
        share a module with another one (ELA's lexicon heads and the text
        encoder's word embeddings) takes that block's *name* as a constructor
        argument and looks the module up here: a name survives
        :func:`sklearn.base.clone`, ``get_config`` and ``Matcher.load``, where an
        object reference would be copied. The linked module is not registered as a
        submodule, so each parameter belongs to one block only (one optimizer
        entry, one checkpoint entry).
        """

    def generator_states(self) -> dict[str, Any]:
        """States of the block's own random generators, for training checkpoints (default: none).

        A block that draws from a ``torch.Generator`` of its own (rather than torch's
        global one, which ``Matcher.fit`` seeds and checkpoints) returns its states
        here, so that a resumed ``fit`` draws what an uninterrupted one would.
        Values are tensors (``Generator.get_state()``) in a dict keyed by strings.
        """
        return {}

    def load_generator_states(self, states: dict[str, Any]) -> None:
        """Restore what :meth:`generator_states` returned (default: nothing to restore)."""

    # ------------------------------------------------------------------ portable model folders
    def portable_params(self) -> dict[str, Any]:
        """Parameter values a saved model stores instead of the live ones (default: none).

        A saved model folder must not depend on files outside it. A block whose
        parameters name such files (a pretrained model folder, a weights file) returns
        here what ``config.json`` stores instead: :data:`imtm.engine.serialization.ASSETS`
        for "this block's own folder inside the model folder" (which :meth:`write_assets`
        fills, and which the loaded block receives as its path), or another value
        (e.g. a file's base name kept as a record of where the weights first came from).
        The block's weights themselves are in the model's ``model.safetensors``.
        """
        return {}

    def write_assets(self, folder) -> None:
        """Write the files this block needs to be rebuilt into ``folder`` (default: nothing).

        Called by ``Matcher.save`` when :meth:`portable_params` names
        :data:`~imtm.engine.serialization.ASSETS`; ``folder`` (a ``Path``) exists and is
        empty. Write configuration and vocabulary files only (JSON and text, never
        pickles): the weights are saved with every other block's.
        """

    def extra_repr(self) -> str:
        bits = [f"requires={tuple(self.requires)}", f"provides={tuple(self.provides)}"]
        return ", ".join(bits)


# The base class's own validate checks the declared constraints too (subclasses' are wrapped above).
Component.validate = _checking_constraints(Component.validate)  # type: ignore[method-assign]


class LinkedComponent(Component, abstract=True):
    """A block that uses another block of the pipeline, named by one constructor argument.

    The argument (``_target_param``) is either a block name, resolved by
    :meth:`link` when the Matcher builds the pipeline (so it survives ``clone``,
    ``get_config`` and ``load``), or the block itself for standalone use. The
    linked block is stored without ``nn.Module`` registration, so its parameters
    belong to it alone. Subclasses set ``_target_param``, list it and ``"_linked"``
    in ``_borrowed``, call :meth:`_set_target` in ``__init__``, may check the target
    in :meth:`_check_target`, and reach it with :meth:`target`.
    """

    #: Attributes stored without nn.Module registration (a module here is borrowed, not owned).
    _borrowed: tuple[str, ...] = ()
    #: The constructor argument naming the linked block.
    _target_param = ""

    def __setattr__(self, name, value):
        if name in self._borrowed:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)
        if name == self._target_param and "_linked" in self.__dict__:
            # A new target (set_params): forget the old link; a name is resolved again by link().
            self._set_target(value)

    def _set_target(self, ref) -> None:
        # Stored only: validate() checks a block given directly (scikit-learn: __init__ only stores).
        self._linked = None if isinstance(ref, str) else ref

    def validate(self):
        """Check a block given directly (not by name) with :meth:`_check_target`; return ``self``."""
        ref = getattr(self, self._target_param)
        if not isinstance(ref, str):
            self._check_target(ref)
        return self

    def link(self, blocks) -> None:
        ref = getattr(self, self._target_param)
        if not isinstance(ref, str):
            return
        if ref not in blocks:
            raise KeyError(
                f"{type(self).__name__}: {self._target_param}={ref!r} names no block of this pipeline "
                f"(blocks: {sorted(blocks)})"
            )
        self._check_target(blocks[ref], ref)
        self._linked = blocks[ref]

    def _check_target(self, block, name: str | None = None) -> None:
        """Raise a TypeError when ``block`` (named ``name`` in the pipeline) cannot serve."""

    def target(self):
        """The linked block; a RuntimeError before :meth:`link` when it was given by name."""
        if self._linked is None:
            raise RuntimeError(
                f"{type(self).__name__}: {self._target_param}={getattr(self, self._target_param)!r} "
                "is not linked yet; use it in a Matcher or pass the block itself"
            )
        return self._linked


def _differs(value, default) -> bool:
    """Whether a parameter value differs from its default, as scikit-learn's repr decides (NaN equals NaN)."""
    if value is default:
        return False
    if (
        isinstance(value, float)
        and isinstance(default, float)
        and math.isnan(value)
        and math.isnan(default)
    ):
        return False
    return repr(value) != repr(default)


def state_mismatch(own: dict, state: dict, *, limit: int = 4) -> list[str]:
    """What keeps ``state`` from loading strictly into a module whose state dict is ``own``.

    Returns phrases naming up to ``limit`` missing keys, unexpected keys and keys whose
    shapes differ (``[]`` when ``state`` fits), for the caller's error message.
    """
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    bits = []
    if missing:
        bits.append(f"missing {missing[:limit]}")
    if unexpected:
        bits.append(f"unexpected {unexpected[:limit]}")
    if wrong:
        bits.append(
            "shape mismatch "
            + ", ".join(
                f"{k}: saved {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                for k in wrong[:limit]
            )
        )
    return bits


class Loss(Component, abstract=True):
    """Base class of objectives: ``forward`` returns a scalar.

    The Matcher adds every active loss, multiplied by its ``weight``, and logs
    each under its block name. Subclasses accept ``weight=1.0`` and store it.
    """

    weight: float = 1.0
    _parameter_constraints: ClassVar[dict[str, list]] = {
        "weight": [Interval(Real, 0, None, closed="left")]
    }
