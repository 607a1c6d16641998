"""Optimisers, learning-rate schedules and parameter groups as ``Matcher`` parameters.

``Matcher(optimizer=..., lr_scheduler=..., lr_factors=...)`` (and the same fields of a
:class:`~imtm.Stage`) are read here. Every built-in schedule is a factor of the step,
``lr(step) = lr * factor(step)`` (a ``torch.optim.lr_scheduler.LambdaLR``), so a resumed run
restores it from its step count alone.

Optimisers (``optimizer=``):

- ``"adamw"`` (default), ``"adam"``, ``"sgd"``: :mod:`torch.optim`'s classes;
- a :class:`torch.optim.Optimizer` subclass, e.g. ``torch.optim.RMSprop``;
- ``(name_or_class, {kwargs})`` or ``{"name": name, **kwargs}``: with keyword arguments,
  e.g. ``("sgd", {"momentum": 0.9, "nesterov": True})``. ``lr`` and ``weight_decay`` come
  from the Matcher unless the keyword arguments set them.

Schedules (``lr_scheduler=``), stepped once per optimisation step; the Matcher's
``warmup`` (a fraction of the stage's steps, or a step count) ramps every built-in one up linearly:

- ``"cosine"`` (default): cosine from ``lr`` to 0 over the stage;
- ``"constant"``: ``lr`` throughout;
- ``"x0.9 every epoch"``, ``"x0.1 every 10 epochs"``, or ``{"name": "step", "gamma": 0.9, "every": 1}``:
  step decay, ``lr * gamma ** (epoch // every)`` (DIAS: ``"x0.9 every epoch"``);
- ``"x0.3 at epochs 9,15,20,25"`` or ``{"name": "step", "gamma": 0.3, "milestones": [9, 15, 20, 25]}``:
  ``lr * gamma ** (milestones passed)``, epochs counted from 0 within the stage;
- ``"cosine_restarts"`` or ``{"name": "cosine_restarts", "period": 1, "mult": 1, "min_factor": 0.0}``:
  cosine with warm restarts (SGDR), the first cycle ``period`` epochs long, each next one ``mult`` times longer;
- a callable ``factory(optimizer) -> torch.optim.lr_scheduler.LRScheduler``, e.g.
  ``functools.partial(torch.optim.lr_scheduler.StepLR, step_size=100, gamma=0.5)``, stepped
  once per optimisation step like the built-ins.

Parameter groups (``lr_factors=``): ``{"image": 0.1}`` trains block ``image`` with
``0.1 * lr``; a factor of 0 freezes the block (no gradient, eval mode), as a stage's
``train`` list does. Blocks not named train with ``lr``.

A class or a callable cannot be written to a JSON configuration: :func:`describe` records it
as a string (``"torch.optim.RMSprop"`` is read back; another class or a factory is recorded by
its name only, and a configuration naming it must be given the object again before ``fit``).

Example:
    >>> schedule_factor("x0.9 every epoch", steps_per_epoch=10, total_steps=30, warmup=0)(25)
    0.81
    >>> optimizer_spec(("sgd", {"momentum": 0.9}))
    (<class 'torch.optim.sgd.SGD'>, {'momentum': 0.9})
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "describe",
    "optimizer_spec",
    "schedule_spec",
    "schedule_factor",
    "make_scheduler",
    "check_lr_factors",
    "interpolate_pos_embed",
    "init_state",
    "init_from_record",
    "is_init_record",
    "state_digest",
]

#: The optimisers a name selects (lower case).
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}
#: The built-in schedules a name selects.
SCHEDULES = ("cosine", "constant", "step", "cosine_restarts")

_STEP_TEXT = re.compile(
    r"^\s*x\s*(?P<gamma>[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s+every\s+(?:(?P<every>[0-9]+)\s+)?"
    r"epochs?\s*$"
)
_AT_TEXT = re.compile(
    r"^\s*x\s*(?P<gamma>[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s+at\s+epochs?\s+(?P<at>[0-9]+(?:\s*,\s*[0-9]+)*)\s*$"
)
_SCHEDULE_KEYS = {
    "step": {"gamma", "every", "milestones"},
    "cosine_restarts": {"period", "mult", "min_factor"},
    "cosine": set(),
    "constant": set(),
}


def describe(value: Any) -> Any:
    """``value`` as a configuration can hold it: a class or a callable becomes its dotted name (a string)."""
    if isinstance(value, type) or (
        callable(value) and not isinstance(value, (str, Mapping, tuple, list))
    ):
        func = getattr(value, "func", value)  # functools.partial: the function it wraps
        name = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', type(func).__name__)}"
        if isinstance(value, type) and getattr(torch.optim, value.__name__, None) is value:
            return f"torch.optim.{value.__name__}"
        return name
    if isinstance(value, tuple):
        return tuple(describe(v) for v in value)
    if isinstance(value, list):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    return value


def _optimizer_class(what: Any, where: str) -> type[torch.optim.Optimizer]:
    if isinstance(what, type) and issubclass(what, torch.optim.Optimizer):
        return what
    if isinstance(what, str):
        key = what.lower()
        if key in OPTIMIZERS:
            return OPTIMIZERS[key]
        if what.startswith("torch.optim."):
            cls = getattr(torch.optim, what[len("torch.optim.") :], None)
            if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
                return cls
        from imtm.component import suggest

        raise ValueError(
            f"{where}: unknown optimizer {what!r}; give one of {sorted(OPTIMIZERS)}, 'torch.optim.<Name>', or "
            "a torch.optim.Optimizer subclass (a configuration records other classes by name only: pass the "
            "class again)." + suggest(what, list(OPTIMIZERS))
        )
    raise TypeError(
        f"{where}: optimizer must be a name such as 'adamw', a torch.optim.Optimizer subclass, or "
        f"(name_or_class, {{kwargs}}); got {what!r}"
    )


def optimizer_spec(spec: Any, where: str = "Matcher") -> tuple[type[torch.optim.Optimizer], dict]:
    """``(optimizer class, keyword arguments)`` from an ``optimizer=`` value; raise on a bad one."""
    kwargs: Any = {}
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(
                f"{where}: an optimizer given as a dict needs 'name' (e.g. {{'name': 'sgd', "
                f"'momentum': 0.9}}); got keys {sorted(spec)}"
            )
        what, kwargs = spec.pop("name"), spec
    elif isinstance(spec, (tuple, list)):
        if len(spec) != 2 or not isinstance(spec[1], Mapping):
            raise ValueError(
                f"{where}: an optimizer given as a pair is (name_or_class, {{kwargs}}); got {spec!r}"
            )
        what, kwargs = spec[0], dict(spec[1])
    else:
        what = spec
    cls = _optimizer_class(what, where)
    bad = [k for k in kwargs if not isinstance(k, str) or k == "params"]
    if bad:
        raise ValueError(
            f"{where}: optimizer keyword arguments {bad} are not allowed (parameters come from the "
            "blocks; give the optimizer's own options such as momentum or betas)"
        )
    return cls, dict(kwargs)


def schedule_spec(spec: Any, where: str = "Matcher") -> dict | Callable:
    """The normalised ``lr_scheduler=`` value: ``{"name": ..., options}`` or a factory callable."""
    if callable(spec) and not isinstance(spec, (str, Mapping)):
        return spec
    if isinstance(spec, str):
        match = _STEP_TEXT.match(spec)
        if match:
            return {
                "name": "step",
                "gamma": float(match["gamma"]),
                "every": int(match["every"] or 1),
            }
        match = _AT_TEXT.match(spec)
        if match:
            return schedule_spec(
                {
                    "name": "step",
                    "gamma": float(match["gamma"]),
                    "milestones": [int(x) for x in match["at"].split(",")],
                },
                where,
            )
        if spec not in SCHEDULES:
            from imtm.component import suggest

            raise ValueError(
                f"{where}: unknown lr_scheduler {spec!r}; give one of {list(SCHEDULES)}, a step decay such as "
                "'x0.9 every epoch' or 'x0.1 every 10 epochs', a dict such as {'name': 'step', 'gamma': 0.9}, or "
                "a factory optimizer -> torch scheduler (a configuration records a factory by name only: pass "
                "it again)." + suggest(spec, list(SCHEDULES))
            )
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise TypeError(
            f"{where}: lr_scheduler must be a name, a dict with 'name', or a callable factory; "
            f"got {spec!r}"
        )
    spec = dict(spec)
    name = spec["name"]
    if name not in _SCHEDULE_KEYS:
        return schedule_spec(name, where)  # the unknown-name error
    extra = set(spec) - {"name"} - _SCHEDULE_KEYS[name]
    if extra:
        raise ValueError(
            f"{where}: lr_scheduler {name!r} takes {sorted(_SCHEDULE_KEYS[name]) or 'no options'}, "
            f"got {sorted(extra)}"
        )
    out = {"name": name}
    if name == "step":
        out["gamma"] = spec.get("gamma", 0.1)
        _number(out["gamma"], f"{where}: lr_scheduler 'step' gamma", low=0.0)
        if spec.get("milestones") is not None:
            if "every" in spec:
                raise ValueError(
                    f"{where}: lr_scheduler 'step' takes 'every' or 'milestones', not both"
                )
            ms = spec["milestones"]
            if not isinstance(ms, (list, tuple)) or not ms or list(ms) != sorted(set(ms)):
                raise ValueError(
                    f"{where}: lr_scheduler 'step' milestones must be increasing epochs, got {ms!r}"
                )
            for x in ms:
                _integer(x, f"{where}: lr_scheduler 'step' milestone")
            out["milestones"] = [int(x) for x in ms]
        else:
            out["every"] = spec.get("every", 1)
            _integer(out["every"], f"{where}: lr_scheduler 'step' every (epochs)")
    elif name == "cosine_restarts":
        out.update(
            period=spec.get("period", 1),
            mult=spec.get("mult", 1),
            min_factor=spec.get("min_factor", 0.0),
        )
        _number(
            out["period"],
            f"{where}: lr_scheduler 'cosine_restarts' period (epochs)",
            low=0.0,
            open_low=True,
        )
        _number(out["mult"], f"{where}: lr_scheduler 'cosine_restarts' mult", low=1.0)
        _number(out["min_factor"], f"{where}: lr_scheduler 'cosine_restarts' min_factor", low=0.0)
    return out


def _number(value: Any, what: str, *, low: float, open_low: bool = False) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if open_low else value >= low)
    )
    if not ok:
        raise ValueError(
            f"{what} must be a finite number {'>' if open_low else '>='} {low}, got {value!r}"
        )


def _integer(value: Any, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def schedule_factor(
    spec: Any, *, steps_per_epoch: int, total_steps: int, warmup: float
) -> Callable[[int], float]:
    """``factor(step)`` of a built-in schedule (``lr(step) = lr * factor(step)``), warm-up included.

    Args:
        spec: an ``lr_scheduler=`` value naming a built-in schedule.
        steps_per_epoch: optimisation steps in one epoch. total_steps: in the stage.
        warmup: a fraction of ``total_steps`` (< 1) or a number of steps.
    """
    spec = schedule_spec(spec)
    if callable(spec):
        raise TypeError("schedule_factor: a factory has no factor; use make_scheduler")
    total = max(1, int(total_steps))
    per_epoch = max(1, int(steps_per_epoch))
    warm = int(warmup * total) if warmup < 1 else int(warmup)
    name = spec["name"]

    def after_warmup(step: int) -> float:
        if name == "cosine":
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if name == "constant":
            return 1.0
        if name == "step":
            epoch = step // per_epoch
            if "milestones" in spec:
                return float(spec["gamma"]) ** sum(epoch >= m for m in spec["milestones"])
            return float(spec["gamma"]) ** (epoch // spec["every"])
        # cosine with warm restarts (Loshchilov & Hutter's SGDR), cycles measured in steps
        t, length = float(step - warm), float(spec["period"]) * per_epoch
        while t >= length:
            t -= length
            length *= spec["mult"]
        low = float(spec["min_factor"])
        return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * t / length))

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm * (after_warmup(step) if name == "step" else 1.0)
        return after_warmup(step)

    return factor


def make_scheduler(
    spec: Any,
    optimizer: torch.optim.Optimizer,
    *,
    steps_per_epoch: int,
    total_steps: int,
    warmup: float,
):
    """The scheduler of a stage: a ``LambdaLR`` for the built-in schedules, else what the factory returns."""
    spec = schedule_spec(spec)
    if callable(spec):
        sched = spec(optimizer)
        if not hasattr(sched, "step") or not hasattr(sched, "state_dict"):
            raise TypeError(
                f"lr_scheduler factory {describe(spec)} returned {type(sched).__name__}, not a torch "
                "learning-rate scheduler (with step() and state_dict())"
            )
        return sched
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        schedule_factor(
            spec, steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup=warmup
        ),
    )


def check_lr_factors(lr_factors: Any, names: list[str], where: str = "Matcher") -> dict[str, float]:
    """Validate ``lr_factors`` against the block names; return it as a dict."""
    if lr_factors is None:
        return {}
    if not isinstance(lr_factors, Mapping):
        raise TypeError(
            f"{where}: lr_factors must be a dict block name -> factor (e.g. {{'image': 0.1}}), "
            f"got {type(lr_factors).__name__}"
        )
    from imtm.component import suggest

    for name, f in lr_factors.items():
        if name not in names:
            raise ValueError(
                f"{where}: lr_factors names block {name!r}, but the blocks are {names}."
                + suggest(str(name), names)
            )
        _number(f, f"{where}: lr_factors[{name!r}]", low=0.0)
    return dict(lr_factors)


# ---------------------------------------------------------------------- initialising from another model
def _prefix_tokens(n_src: int, n_dst: int, hint: int | None) -> int | None:
    """How many leading tokens ([CLS], registers) precede a square grid in both position tables."""
    candidates = [hint] if hint is not None else list(range(0, 9))
    for p in candidates:
        a, b = n_src - p, n_dst - p
        if a > 0 and b > 0 and math.isqrt(a) ** 2 == a and math.isqrt(b) ** 2 == b:
            return p
    return None


def interpolate_pos_embed(
    pos: torch.Tensor, n_tokens: int, *, num_prefix_tokens: int | None = None, mode: str = "bicubic"
) -> torch.Tensor:
    """Resample a ViT position table to ``n_tokens`` positions (a square patch grid after prefix tokens).

    The prefix tokens ([CLS], registers) keep their embeddings; the grid part is resized as an
    image (``torch.nn.functional.interpolate``, ``bicubic``, ``align_corners=False``), as when
    a ViT pre-trained at one resolution is fine-tuned at another (ELA: 256 -> 384).

    Shape:
        - pos: ``(1, N, D)`` or ``(N, D)``, ``N = prefix + h * h``
        - output: the same rank, ``n_tokens`` positions

    Raises:
        ValueError: no prefix count makes both tables a square grid.

    Example:
        >>> interpolate_pos_embed(torch.zeros(1, 1 + 4 * 4, 8), 1 + 6 * 6).shape
        torch.Size([1, 37, 8])
    """
    flat = pos.dim() == 2
    table = pos[None] if flat else pos
    if table.dim() != 3 or table.shape[0] != 1:
        raise ValueError(
            f"interpolate_pos_embed: expected a (1, N, D) or (N, D) table, got {tuple(pos.shape)}"
        )
    n_src = table.shape[1]
    p = _prefix_tokens(n_src, n_tokens, num_prefix_tokens)
    if p is None:
        raise ValueError(
            f"interpolate_pos_embed: cannot resize {n_src} positions to {n_tokens}: after "
            f"{num_prefix_tokens if num_prefix_tokens is not None else 'any of 0..8'} prefix tokens "
            "neither is a square patch grid"
        )
    prefix, grid = table[:, :p], table[:, p:]
    a, b = math.isqrt(n_src - p), math.isqrt(n_tokens - p)
    img = grid.reshape(1, a, a, -1).permute(0, 3, 1, 2).float()
    img = torch.nn.functional.interpolate(img, size=(b, b), mode=mode, align_corners=False)
    grid = img.permute(0, 2, 3, 1).reshape(1, b * b, -1).to(pos.dtype)
    out = torch.cat([prefix, grid], dim=1)
    return out[0] if flat else out


def _num_prefix_tokens(block: torch.nn.Module) -> int | None:
    for mod in block.modules():
        n = getattr(mod, "num_prefix_tokens", None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


def init_state(
    blocks: torch.nn.ModuleDict,
    source: dict[str, torch.Tensor],
    names: list[str] | None,
    where: str = "Matcher: init_from",
) -> list[str]:
    """Copy the weights of blocks ``names`` (``None``: every block both hold) from ``source`` into ``blocks``.

    ``source`` is a state dict keyed ``"<block>.<param>"``. A position table whose length
    differs (a ViT at another image size) is resampled by :func:`interpolate_pos_embed`;
    any other difference of keys or shapes is an error naming the block and the tensor.
    Returns the names of the blocks copied.
    """
    have = sorted({k.split(".", 1)[0] for k in source})
    if names is None:
        names = [n for n in blocks if n in have]
        if not names:
            raise ValueError(
                f"{where}: the source model has no block of the same name as this one's "
                f"({list(blocks)}; it has {have}); name the blocks to copy with init_blocks"
            )
    missing = [n for n in names if n not in have]
    if missing:
        raise ValueError(f"{where}: the source model has no block {missing}; its blocks are {have}")
    for name in names:
        own = blocks[name].state_dict()
        theirs = {k[len(name) + 1 :]: v for k, v in source.items() if k.startswith(name + ".")}
        if set(own) != set(theirs):
            diff = sorted(set(own) ^ set(theirs))[:5]
            raise ValueError(
                f"{where}: block {name!r} of the source model has other tensors than this one's "
                f"(differing: {diff}); it is another kind of block"
            )
        new = {}
        for key, value in theirs.items():
            want = own[key].shape
            if value.shape != want:
                leaf = key.rsplit(".", 1)[-1]
                table = (
                    "pos" in leaf
                    and value.dim() in (2, 3)
                    and value.dim() == len(want)
                    and value.shape[-1] == want[-1]
                    and value.shape[:-2] == want[:-2]
                )
                if not table:
                    raise ValueError(
                        f"{where}: {name}.{key} has shape {tuple(value.shape)} in the source model "
                        f"and {tuple(want)} here; only position tables are resized"
                    )
                value = interpolate_pos_embed(
                    value, want[-2], num_prefix_tokens=_num_prefix_tokens(blocks[name])
                )
            new[key] = value.to(own[key].dtype)
        blocks[name].load_state_dict(new)
    return list(names)


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict: every key, dtype, shape and the tensor's bytes, in key order.

    Example:
        >>> state_digest({"w": torch.zeros(2)}) == state_digest({"w": torch.zeros(2)})
        True
    """
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def is_init_record(value: Any) -> bool:
    """Whether ``value`` is what :func:`init_from_record` writes for a source it cannot keep."""
    if not isinstance(value, dict) or len(value) != 1:
        return False
    ((kind, what),) = value.items()
    if kind == "folder":
        return isinstance(what, str)
    return kind == "matcher" and isinstance(what, dict)


def init_from_record(source: Any, *, portable: bool = False) -> Any:
    """How a configuration records ``init_from`` (JSON, never a pickle), truthfully.

    - ``None`` and a path stay as they are (a path as a string); in the portable form of a
      saved model folder a path becomes ``{"folder": name}``, its base name when absolute
      (a saved model names no path outside itself).
    - A fitted Matcher becomes ``{"matcher": {"config_hash": ..., "n_epochs": ...}}``: what it
      was, not its weights (those are in the model that was initialised from it; the run's
      record keeps the sha256 of the weights copied, ``record_["init_from"]``).
    - Such a record is kept as it is. A Matcher whose ``init_from`` is a record cannot apply it
      again: ``fit`` asks for the Matcher or folder itself.

    Example:
        >>> init_from_record("/runs/pretrain/ckpt-00000012", portable=True)
        {'folder': 'ckpt-00000012'}
    """
    if source is None or is_init_record(source):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not portable:
            return path
        name = os.path.basename(path.rstrip("/\\")) if os.path.isabs(path) else path
        return {"folder": name}
    hash_ = getattr(source, "config_hash", None)
    return {
        "matcher": {
            "config_hash": hash_() if callable(hash_) else None,
            "n_epochs": int(getattr(source, "n_epochs_", 0) or 0),
        }
    }
