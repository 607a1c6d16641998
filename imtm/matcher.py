"""Matcher: the scikit-learn-style estimator that composes blocks into a model.

Example:
    >>> from imtm import Matcher
    >>> from imtm.components import PrecomputedEncoder, GRUTextEncoder, GlobalCosine, TripletLoss
    >>> from imtm.data import synthetic
    >>> train, dev, test = synthetic.load(view="regions", seed=0, n_train=200, n_dev=50, n_test=50)
    >>> m = Matcher([PrecomputedEncoder(in_dim=train.region_dim, out_dim=64),
    ...              GRUTextEncoder(vocab=train.vocab, out_dim=64), GlobalCosine(), TripletLoss()],
    ...             epochs=1, batch_size=64, checkpoint_dir=None, verbose=False)
    >>> m.fit(train).similarity(test.images, test.captions).shape
    torch.Size([50, 250])
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from imtm.component import Component, load_components, state_mismatch, suggest
from imtm.contract import Interval, Options, Satisfies, check_value
from imtm.data.collate import collate_images, collate_texts
from imtm.engine import distributed
from imtm.engine.checkpoint import CheckpointError, read_checkpoint
from imtm.engine.evaluation import (
    IMAGE,
    TEXT,
    RowRange,
    blocked_scores,
    encode_side,
    side_values_needed,
)
from imtm.engine.graph import PipelineError, Plan, build_plan, name_components
from imtm.engine.optim import check_lr_factors, describe, init_from_record, is_init_record
from imtm.engine.serialization import (
    ASSETS,
    AssetPath,
    ConfigError,
    check_depth,
    decode_value,
    encode_value,
)

__all__ = ["Matcher", "Stage", "NotFittedError", "PipelineError"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _whole(low: int, description: str | None = None) -> Satisfies:
    """A Python ``int`` (never bool) ``>= low``: the value lands in JSON configs as it is."""
    return Satisfies(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low,
        description or f"an integer >= {low}",
        refused=[low - 1, True, 1.5],
    )


#: What the Matcher's scalar parameters accept, in :mod:`imtm.contract`'s vocabulary; ``validate``
#: (and so ``fit``) checks them. Relations between parameters (stages, init_blocks) stay in ``validate``.
MATCHER_CONSTRAINTS: dict[str, list[Any]] = {
    "epochs": [_whole(0)],
    "batch_size": [_whole(1, "a positive integer")],
    "eval_batch_size": [_whole(1, "a positive integer")],
    "image_block": [_whole(1, "a positive integer")],
    "text_block": [_whole(1, "a positive integer")],
    "precision": [Options(PRECISIONS)],
    "compile": ["boolean"],
    "on_nonfinite": [Options({"raise", "skip"})],
    "lr": [Interval(Real, 0, None, closed="neither")],
    "weight_decay": [Interval(Real, 0, None)],
    "warmup": [Interval(Real, 0, None)],
    # 0 would zero every gradient, a negative norm turns the step uphill: clipping is off only with None.
    "grad_clip": [Interval(Real, 0, None, closed="neither"), None],
    "num_workers": [_whole(0)],
    "checkpoint_every": [_whole(1), None],
    "accumulate": [_whole(1)],
    "steps_per_epoch": [_whole(1), None],
    # NumPy takes seeds below 2**32, and the data order mixes the seed into 64-bit generator seeds.
    "random_state": [
        None,
        Satisfies(
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32,
            "an integer in [0, 2**32)",
            refused=[-1, 2**32, True],
        ),
    ],
}


@dataclass(repr=False)
class Stage:
    """One training stage: which blocks train, which losses count, for how many epochs, and how.

    Every field left ``None`` takes the Matcher's value of the same name.

    Args:
        epochs: epochs in this stage.
        train: names of the blocks whose parameters train; ``None`` = every block.
            Every other block is frozen (no gradient, eval mode).
        losses: names of the loss blocks that count; ``None`` = every loss block.
        lr: learning rate of this stage; ``None`` = the Matcher's ``lr``.
        name: a label for logs.
        optimizer: this stage's optimizer (see ``Matcher(optimizer=...)``); a new one starts each stage.
        lr_scheduler: this stage's schedule (see ``Matcher(lr_scheduler=...)``).
        batch_size: captions per batch in this stage (a dataset only: a DataLoader has its own).
        lr_factors: this stage's learning-rate factors by block name (0 freezes a block).

    Example:
        >>> Stage(epochs=2, train=["coding"], name="fine-tune")
        Stage(epochs=2, train=['coding'], name='fine-tune')
        >>> Stage(epochs=5, optimizer="adam", lr_scheduler="cosine_restarts", batch_size=64).batch_size
        64
    """

    epochs: int
    train: list[str] | None = None
    losses: list[str] | None = None
    lr: float | None = None
    name: str | None = None
    optimizer: Any = None
    lr_scheduler: Any = None
    batch_size: int | None = None
    lr_factors: dict[str, float] | None = None

    def __repr__(self) -> str:
        shown = [f"epochs={self.epochs!r}"] + [
            f"{k}={getattr(self, k)!r}"
            for k in self.__dataclass_fields__
            if k != "epochs" and getattr(self, k) is not None
        ]
        return f"Stage({', '.join(shown)})"

    def to_dict(self) -> dict:
        """The fields as JSON data (a class or a factory recorded by name: see :func:`imtm.engine.optim.describe`)."""
        from imtm.engine.optim import describe

        return json.loads(
            json.dumps({k: describe(getattr(self, k)) for k in self.__dataclass_fields__})
        )

    @classmethod
    def from_dict(cls, d: dict) -> Stage:
        return cls(**d)


from imtm.engine.serialization import register_serializable  # noqa: E402

register_serializable(Stage)


class Matcher(BaseEstimator):
    """Compose imtm blocks into an image-text matching model and train / evaluate it.

    Args:
        components: blocks, or ``(name, block)`` pairs, run in order. Unnamed blocks are
            named like ``sklearn.pipeline.make_pipeline`` (lower-case class name, ``-1``,
            ``-2`` for repeats); ``set_params(name__param=...)`` reaches inside a block.
        epochs: training epochs (ignored when ``stages`` is given).
        batch_size: training batch size (captions per batch).
        lr: learning rate. weight_decay: the optimizer's weight decay.
        warmup: linear warm-up, a fraction of each stage's steps (< 1) or a step count.
        grad_clip: maximum gradient norm (``None``: no clipping).
        stages: a list of :class:`Stage` (e.g. DCPA's two stages); ``None`` = one stage of
            ``epochs`` training every block.
        optimizer: ``"adamw"`` (default), ``"adam"``, ``"sgd"``, a ``torch.optim.Optimizer`` subclass,
            or ``(name_or_class, {kwargs})`` such as ``("sgd", {"momentum": 0.9})``
            (:mod:`imtm.engine.optim`).
        lr_scheduler: ``"cosine"`` (warm-up + cosine, default), ``"constant"``, a step decay such as
            ``"x0.9 every epoch"``, ``"cosine_restarts"`` (or a dict with options, e.g.
            ``{"name": "cosine_restarts", "period": 2}``), or a factory ``optimizer -> torch scheduler``;
            stepped once per optimisation step (:mod:`imtm.engine.optim`).
        lr_factors: learning-rate factor by block name, e.g. ``{"image": 0.1}`` trains the block
            ``image`` at a tenth of ``lr``; 0 freezes it. Blocks not named train at ``lr``.
        init_from: start ``fit`` from the weights of another model: a fitted Matcher, a folder
            written by :meth:`save`, a checkpoint folder or a run folder (its newest checkpoint).
            A position table of another length (a ViT at another image size) is resampled
            (:func:`imtm.engine.optim.interpolate_pos_embed`). Ignored by ``fit(resume=...)``
            (the checkpoint holds the weights) and ``fit(warm_start=True)``. A configuration
            records a Matcher as ``{"matcher": {"config_hash": ..., "n_epochs": ...}}`` and, in a
            saved folder, a path by its name, ``{"folder": name}``; such a record is kept by
            ``load``/``clone`` but cannot be applied again (:func:`imtm.engine.optim.init_from_record`).
        init_blocks: the names of the blocks ``init_from`` initialises; ``None``: every block
            of the same name in both models. The other blocks start from their usual initialisation.
        loggers: where each step's losses, learning rates, gradient norm and samples/s go:
            ``"csv"`` (``steps.csv`` and ``epochs.csv`` in ``checkpoint_dir``; nothing without one),
            ``"tensorboard"`` (needs ``tensorboard``), ``"wandb"`` (needs ``wandb``)
            (:mod:`imtm.engine.callbacks`). Other callbacks go to ``fit(callbacks=...)``.
        accumulate: split each batch into this many micro-batches for the single-modality blocks
            (encoders), caching their outputs (GradCache), so the all-pairs scores and losses are
            those of the whole batch and the gradients equal one large batch's, with the encoders'
            activations of one micro-batch in memory at a time. Under torchrun each process
            splits its own batch; the cached embeddings are gathered over the processes.
        steps_per_epoch: batches per epoch for data without a length (an ``IterableDataset``, a
            streaming loader); with a length, it caps the epoch. A stream resumes mid-epoch bit
            for bit when it is deterministic given the seeds imtm sets while reading it
            (``docs/training.md``, "Streams resume mid-epoch").
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast for forward passes.
        compile: run every block's forward through ``torch.compile`` (opt-in), except blocks
            that declare ``compiles = False`` (the GRU text encoder, whose packed RNN the compiler
            cannot improve; the transformers text encoder, whose forward tokenises strings and
            plans its chunks on the host; ELA's ``WordMasking``, which tokenises and draws the
            masked-LM corruption on the host; ``Reuse``, which calls its target block, compiled
            or not, rather than tracing through it; DCPA's ``InterModalPhraseAttention`` and the
            pairwise scorers that are one call into a blocked engine, which runs eagerly in any
            compiled region: ``HardAssignmentCoding``, ``SoftAssignmentCoding``,
            ``LocalMatching``, ``ScanAttention``, ``SparsePatchWordAlignment``), and, on the CPU only, blocks that declare
            ``compiles_on_cpu = False`` (ELA's cross-modal encoder, matching head and
            word-to-lexicon head, whose transformer layers Inductor's CPU code runs slower than
            eager, and its transport loss; DCPA's phrase encoders: each measured slower compiled,
            ``benchmarks/README.md``). A block whose compilation fails (no compiler, an unsupported platform or operation) runs eagerly,
            with a warning; the results agree with eager ones within floating-point tolerance.
        random_state: seed for initialisation, data order, dropout; ``None`` draws one.
        eval_batch_size: batch size for encoding images and captions in evaluation.
        image_block, text_block: the image x caption block that pairwise blocks see
            during ``similarity``; bounds memory, not the result.
        checkpoint_dir: folder for atomic checkpoints (``None``: none are written).
        checkpoint_every: also checkpoint every this many steps (``None``: at epoch ends).
        keep_best: with an ``eval_set``, end ``fit`` with the weights of the best epoch (rSum),
            among the epochs after which every block the fit trains has trained (in a staged
            fit, an epoch before a later stage first trains a block is not a candidate).
        protocol: evaluation protocol name for ``evaluate`` (see :mod:`imtm.metrics`).
        on_nonfinite: what a NaN/inf loss or gradient does. ``"raise"``: stop with
            :class:`~imtm.engine.training.NonFiniteError` (a ``FloatingPointError``) naming the
            step and the block that produced the value (the first block of the step whose output
            holds NaN/inf, else the loss block; for gradients, the block whose parameters got
            them). ``"skip"``: leave the weights, the optimizer state and the learning-rate
            schedule as they were (the schedule advances with the steps taken), count the step
            (``history_[i]['skipped_steps']``, ``skipped_steps_``), warn once per epoch; raise
            ``NonFiniteError`` once as many steps in a row as one epoch holds were all skipped.
            NaN/inf in the batch's own features raises ``ValueError`` under either policy.
            See ``docs/robustness.md``.
        num_workers: DataLoader workers. verbose: progress bars and per-epoch lines.

    Fitted attributes:
        components_: the trained blocks (a ``torch.nn.ModuleDict`` by name).
        history_: one dict per epoch (losses, time, evaluation metrics).
        n_epochs_: epochs trained. best_: best evaluation record or ``None``.
        seed_: the seed actually used. plan_: the analysed pipeline.
        skipped_steps_: steps skipped as non-finite (``on_nonfinite="skip"``), over the whole run.
        overflow_steps_: fp16 steps whose gradients overflowed, skipped by the gradient scaler.
    """

    def __init__(
        self,
        components: Sequence[Any] = (),
        *,
        epochs: int = 10,
        batch_size: int = 128,
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        warmup: float = 0.05,
        grad_clip: float | None = 2.0,
        stages: Sequence[Stage] | None = None,
        optimizer: Any = "adamw",
        lr_scheduler: Any = "cosine",
        lr_factors: dict[str, float] | None = None,
        init_from: Any = None,
        init_blocks: Sequence[str] | None = None,
        loggers: Sequence[str] = ("csv",),
        accumulate: int = 1,
        steps_per_epoch: int | None = None,
        device: str = "auto",
        precision: str = "fp32",
        compile: bool = False,
        random_state: int | None = 0,
        eval_batch_size: int = 256,
        image_block: int = 128,
        text_block: int = 1024,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        keep_best: bool = True,
        protocol: str | None = None,
        on_nonfinite: str = "raise",
        num_workers: int = 0,
        verbose: bool = True,
    ):
        self.components = components
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup = warmup
        self.grad_clip = grad_clip
        self.stages = stages
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lr_factors = lr_factors
        self.init_from = init_from
        self.init_blocks = init_blocks
        self.loggers = loggers
        self.accumulate = accumulate
        self.steps_per_epoch = steps_per_epoch
        self.device = device
        self.precision = precision
        self.compile = compile
        self.random_state = random_state
        self.eval_batch_size = eval_batch_size
        self.image_block = image_block
        self.text_block = text_block
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.keep_best = keep_best
        self.protocol = protocol
        self.on_nonfinite = on_nonfinite
        self.num_workers = num_workers
        self.verbose = verbose

    # ------------------------------------------------------------------ sklearn plumbing
    @property
    def named_components(self) -> list[tuple[str, Component]]:
        """``(name, block)`` pairs of the unfitted blocks."""
        return name_components(self.components)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Parameters by name; ``deep``: also every block (``name``) and its parameters (``name__param``).

        With ``components`` that is not a list of blocks (``fit`` says what is wrong), ``deep``
        gives the Matcher's own parameters only.
        """
        out = super().get_params(deep=False)
        if not deep:
            return out
        try:
            named = self.named_components
        except (TypeError, ValueError):
            return out
        for name, block in named:
            out[name] = block
            for k, v in block.get_params(deep=True).items():
                out[f"{name}__{k}"] = v
        return out

    def set_params(self, **params) -> Matcher:
        """Set parameters (``block__param`` reaches into a named block, ``name=block`` replaces one).

        As in scikit-learn, values are stored, not checked: ``fit`` (through :meth:`validate`) checks
        them, so a grid search can set any combination and hear about a bad one when it fits.
        Only names are checked here (a misspelled parameter or block name is a ``ValueError``
        with a suggestion), and reaching into blocks needs ``components`` to be a list of blocks.
        """
        valid_own = set(self._get_param_names())
        own = {k: v for k, v in params.items() if "__" not in k}
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            if "__" in key:
                head, rest = key.split("__", 1)
                nested.setdefault(head, {})[rest] = value
        block_keys = [k for k in own if k not in valid_own]
        if block_keys:  # names of blocks to replace: checked against the blocks they would replace
            named = dict(name_components(own.get("components", self.components)))
            for key in block_keys:
                if key not in named:
                    raise ValueError(
                        f"Matcher: invalid parameter {key!r}; valid ones are {sorted(valid_own)} "
                        f"and the block names {sorted(named)}."
                        + suggest(key, sorted(valid_own) + sorted(named))
                    )
        for key, value in own.items():
            if key in valid_own:
                setattr(self, key, value)
        for key in block_keys:
            self.components = [
                (n, own[key]) if n == key else (n, b) for n, b in self.named_components
            ]
        if nested:
            named = dict(self.named_components)
            for head, sub in nested.items():
                if head not in named:
                    raise ValueError(
                        f"Matcher: no block named {head!r}; blocks are {sorted(named)}."
                        + suggest(head, named)
                    )
                named[head].set_params(**sub)
        return self

    def __sklearn_tags__(self):
        """scikit-learn's tags: fits image-caption datasets (not 2-D arrays), needs no ``y``."""
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.target_tags.required = False
        return tags

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "components_")

    def _check_fitted(self, method: str) -> None:
        if not hasattr(self, "components_"):
            raise NotFittedError(
                f"This Matcher is not fitted yet; call fit(train) (or Matcher.load(path)) before {method}()."
            )

    # ------------------------------------------------------------------ validation
    def validate(self) -> Plan:
        """Check the parameters and that every block's requirements are met; return the plan.

        Raises:
            PipelineError: a requirement no earlier block provides (naming the block,
                its position, the value and the blocks that could provide it), or no
                block provides ``scores`` (or ``scores_i2t`` and ``scores_t2i``).
            ValueError: an invalid parameter value.
        """
        plan = build_plan(self.named_components)
        for name, block in zip(plan.names, plan.blocks):
            try:
                block.validate()
            except (TypeError, ValueError) as err:
                raise type(err)(f"Matcher: block {name!r}: {err}") from err
        if not plan.score_values:
            raise PipelineError(
                "Matcher: no block provides 'scores' (or both 'scores_i2t' and 'scores_t2i'); "
                "add a scorer such as GlobalCosine or HardAssignmentCoding"
            )
        for name, accepted in MATCHER_CONSTRAINTS.items():
            check_value(getattr(self, name), accepted, name=name, where="Matcher")
        self._validate_device()
        for s in self._stages():
            for field_name in ("train", "losses"):
                for n in getattr(s, field_name) or []:
                    if n not in plan.names:
                        raise ValueError(
                            f"Matcher: stage {s.name or ''!s} names block {n!r} in {field_name}, but the blocks "
                            f"are {plan.names}." + suggest(n, plan.names)
                        )
            for n in s.losses or []:
                if not plan.is_loss(plan.names.index(n)):
                    raise ValueError(
                        f"Matcher: stage lists {n!r} as a loss, but it is not a Loss block"
                    )
            if s.batch_size is not None and (
                not isinstance(s.batch_size, int)
                or isinstance(s.batch_size, bool)
                or s.batch_size < 1
            ):
                raise ValueError(
                    f"Matcher: stage {s.name or ''!s} batch_size must be a positive integer or None, "
                    f"got {s.batch_size!r}"
                )
            if s.lr is not None and not (
                isinstance(s.lr, (int, float))
                and not isinstance(s.lr, bool)
                and math.isfinite(s.lr)
                and s.lr > 0
            ):
                raise ValueError(
                    f"Matcher: stage {s.name or ''!s} lr must be a finite number > 0 or None, got {s.lr!r}"
                )
            check_lr_factors(s.lr_factors, plan.names, where=f"Matcher: stage {s.name or ''!s}")
        check_lr_factors(self.lr_factors, plan.names)
        from imtm.engine.callbacks import LOGGERS

        if isinstance(self.loggers, str) or not all(
            isinstance(x, str) and x in LOGGERS for x in self.loggers or ()
        ):
            raise ValueError(
                f"Matcher: loggers must be a list of names from {sorted(LOGGERS)}, got {self.loggers!r} "
                "(pass Callback objects to fit(callbacks=...))"
            )
        if self.init_blocks is not None:
            if self.init_from is None:
                raise ValueError(
                    "Matcher: init_blocks names blocks to copy, but init_from is None; give the model "
                    "(a fitted Matcher or a saved folder) to copy them from"
                )
            if isinstance(self.init_blocks, str) or not all(
                isinstance(n, str) for n in self.init_blocks
            ):
                raise TypeError(
                    f"Matcher: init_blocks must be a list of block names, got {self.init_blocks!r}"
                )
            for n in self.init_blocks:
                if n not in plan.names:
                    raise ValueError(
                        f"Matcher: init_blocks names block {n!r}, but the blocks are {plan.names}."
                        + suggest(n, plan.names)
                    )
        if (
            self.init_from is not None
            and not isinstance(self.init_from, (str, os.PathLike))
            and not hasattr(self.init_from, "components_")
            and not isinstance(self.init_from, Matcher)
            and not is_init_record(self.init_from)
        ):
            raise TypeError(
                f"Matcher: init_from must be a fitted Matcher or the path of a saved model, checkpoint or "
                f"run folder, got {type(self.init_from).__name__}"
            )
        if self.protocol is not None:
            from imtm.metrics import PROTOCOLS

            if self.protocol not in PROTOCOLS:
                raise ValueError(
                    f"Matcher: protocol must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}."
                    + suggest(self.protocol, PROTOCOLS)
                )
        return plan

    def _validate_device(self) -> None:
        """The device (the numbers are declared in :data:`MATCHER_CONSTRAINTS`)."""
        if not isinstance(self.device, (str, torch.device)):
            raise TypeError(
                f"Matcher: device must be a string such as 'cpu', 'cuda' or 'auto', got {self.device!r}"
            )
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except (RuntimeError, ValueError, TypeError) as e:
                raise ValueError(f"Matcher: invalid device {self.device!r}: {e}") from e
            if dev.type == "meta":
                raise ValueError(
                    "Matcher: device 'meta' holds no data (shapes only) and cannot train or evaluate; "
                    "use 'cpu', 'cuda' or 'auto'"
                )

    def _stages(self) -> list[Stage]:
        if self.stages is None:
            return [Stage(epochs=self.epochs)]
        stages = [Stage(**s) if isinstance(s, dict) else s for s in self.stages]
        if not stages:
            raise ValueError(
                "Matcher: stages is an empty list; give None for one stage of `epochs`"
            )
        return stages

    def _device(self) -> torch.device:
        if self.device == "auto":
            # under torchrun, "cuda" becomes this process's GPU, cuda:LOCAL_RANK
            return distributed.local_device(
                torch.device("cuda" if torch.cuda.is_available() else "cpu")
            )
        try:
            return distributed.local_device(torch.device(self.device))
        except RuntimeError as e:
            raise ValueError(f"Matcher: invalid device {self.device!r}: {e}") from e

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self._device().type, dtype=dtype)

    # ------------------------------------------------------------------ configuration
    def get_config(self, *, portable: bool = False) -> dict:
        """JSON-compatible configuration: parameters, blocks by registered class name.

        Args:
            portable: the form a saved model folder stores: each block's
                :meth:`~imtm.Component.portable_params` replace its live values (an encoder's
                source folder becomes ``{"__asset__": "<block name>"}``, its folder inside the
                model folder; a weights file is kept by its base name only), and
                ``checkpoint_dir`` is left out (``None``). No absolute path remains from imtm's blocks.
        """
        params = super().get_params(deep=False)
        params.pop("components")
        if isinstance(params.get("checkpoint_dir"), os.PathLike):
            params["checkpoint_dir"] = os.fspath(params["checkpoint_dir"])
        # A class or a factory is recorded by name; init_from by a description (init_from_record).
        params["optimizer"] = describe(params.get("optimizer"))
        params["lr_scheduler"] = describe(params.get("lr_scheduler"))
        params["init_from"] = init_from_record(params.get("init_from"), portable=portable)
        if portable:
            params["checkpoint_dir"] = None
        components = []
        for n, b in self.named_components:
            entry = encode_value(b, f"component {n!r}")
            if portable:
                for key, value in b.portable_params().items():
                    entry["params"][key] = (
                        {"__asset__": n} if value is ASSETS else encode_value(value, f"{n}.{key}")
                    )
            components.append({"name": n, "class": type(b).__name__, "block": entry})
        return {
            "format": "imtm.Matcher/1",
            "components": components,
            "params": {k: encode_value(v, f"Matcher.{k}") for k, v in params.items()},
        }

    @classmethod
    def from_config(cls, config: dict) -> Matcher:
        """Rebuild an unfitted Matcher from :meth:`get_config` output (registered blocks only)."""
        if not isinstance(config, dict) or config.get("format") != "imtm.Matcher/1":
            raise ConfigError("not an imtm Matcher configuration (missing format 'imtm.Matcher/1')")
        check_depth(config, "Matcher configuration")
        entries, saved = config.get("components"), config.get("params", {})
        if (
            not isinstance(entries, list)
            or not isinstance(saved, dict)
            or not all(
                isinstance(c, dict) and isinstance(c.get("name"), str) and "block" in c
                for c in entries
            )
        ):
            raise ConfigError(
                "malformed Matcher configuration: expected 'components' as a list of "
                "{'name': str, 'block': ...} and 'params' as a dict"
            )
        comps = []
        for c in entries:
            block = decode_value(c["block"])
            if not isinstance(block, Component):
                raise ConfigError(
                    f"component {c['name']!r} of the configuration is a {type(block).__name__}, "
                    "not a block; blocks are saved as {'__component__': class name, 'params': {...}}"
                )
            comps.append((c["name"], block))
        valid = [p for p in cls._get_param_names() if p != "components"]
        for key in saved:
            if key not in valid:
                raise ConfigError(
                    f"unknown Matcher parameter {key!r} in the configuration." + suggest(key, valid)
                )
        params = {k: decode_value(v) for k, v in saved.items()}
        return cls(components=comps, **params)

    def config_hash(self) -> str:
        """Hash of the model-defining configuration (blocks and their parameters).

        Computed on the portable form (:meth:`get_config` with ``portable=True``), so a model
        and the same model saved, moved and loaded again have the same hash.
        """
        blocks = self.get_config(portable=True)["components"]
        return hashlib.sha256(json.dumps(blocks, sort_keys=True).encode()).hexdigest()[:12]

    # ------------------------------------------------------------------ fitting
    def _build(self, seed: int) -> None:
        """Build fresh fitted blocks from the unfitted ones (as skorch builds ``module_``)."""
        from sklearn.base import clone

        torch.manual_seed(seed)
        named = []
        for name, block in self.named_components:
            named.append((name, clone(block)))
        self.components_ = torch.nn.ModuleDict(dict(named))
        self.plan_ = build_plan(named)
        self.components_.to(self._device())
        self._sync_compile()

    def _sync_compile(self) -> None:
        """Compile (or un-compile) the fitted blocks' forward to match ``self.compile``."""
        on_cpu = self._device().type == "cpu"
        for name, block in self.components_.items():
            compiled = isinstance(block._compiled_call_impl, _CompiledCall)
            wanted = (
                self.compile
                and getattr(block, "compiles", True)
                and (not on_cpu or getattr(block, "compiles_on_cpu", True))
            )
            if wanted and not compiled and not getattr(block, "_imtm_compile_failed", False):
                try:
                    block._compiled_call_impl = _CompiledCall(block, name)
                except Exception as err:  # noqa: BLE001 - torch.compile itself unsupported here
                    _compile_failed(block, name, err)
            elif not wanted and compiled:
                block._compiled_call_impl = None

    def __sklearn_clone__(self) -> Matcher:
        """scikit-learn's ``clone``: an unfitted copy; a Matcher given as ``init_from`` is shared, not cloned
        (it is where the weights come from, and a clone of it would hold none)."""
        source = self.init_from
        if source is None or isinstance(source, (str, os.PathLike)) or is_init_record(source):
            return super().__sklearn_clone__()
        self.init_from = None
        try:
            new = super().__sklearn_clone__()
        finally:
            self.init_from = source
        new.init_from = source
        return new

    def fit(
        self,
        train,
        eval_set=None,
        *,
        resume: bool | str | os.PathLike = False,
        warm_start: bool = False,
        callbacks: Sequence[Any] = (),
    ) -> Matcher:
        """Train on ``train`` (a torch Dataset or DataLoader), evaluating on ``eval_set`` each epoch.

        Args:
            train: a dataset whose items are ``{"images", "texts", "image_ids"}`` (see
                :mod:`imtm.data`), a DataLoader yielding collated batches, or a
                :class:`~imtm.data.ByImage` (what scikit-learn's model selection passes).
            eval_set: optional dataset with ``images``, ``captions``, ``caption_to_image``.
            resume: ``True``: continue from the checkpoint ``checkpoint_dir/LATEST`` names
                (same final weights as an uninterrupted run); starts afresh when there is
                no ``LATEST``. A checkpoint that fails its checksums is refused with a
                ``CheckpointError`` listing the complete ones left; pass one of their
                names (``"ckpt-00000120"``) or a path to continue from it instead.
            warm_start: scikit-learn's meaning: continue from the fitted blocks (a new optimizer and
                schedule; ``history_`` grows, ``n_epochs_`` counts on) instead of building them afresh.
                The blocks' parameters may have changed since (``set_params``) as long as their
                weights still fit. Without fitted blocks it is a fresh fit; with ``resume`` the
                checkpoint decides. ``init_from`` is not applied again.
            callbacks: :class:`~imtm.engine.callbacks.Callback` objects called at every event of the
                loop after the Matcher's own (the progress bar when ``verbose``, then ``loggers``),
                e.g. ``[EarlyStopping("rsum", patience=3)]``. See ``docs/training.md``.

        Under ``torchrun`` (or ``python -m torch.distributed.run``) the same call trains
        with DistributedDataParallel: ``batch_size`` per process, scorers and losses see
        the gathered batch of all processes (K processes with batch b train like one with
        batch K*b), rank 0 logs and writes checkpoints. See ``docs/distributed.md``.

        Returns:
            self
        """
        from imtm.data.by_image import ByImage

        self.validate()
        if isinstance(
            train, ByImage
        ):  # scikit-learn's view of a dataset: train on the captions it holds
            train = train.dataset
        if not isinstance(warm_start, bool):
            raise TypeError(f"Matcher.fit: warm_start must be True or False, got {warm_start!r}")
        trainer = self.trainer(train, eval_set, callbacks=callbacks)
        try:
            trainer.run(resume=resume, warm_start=warm_start)
        finally:
            if trainer.started:  # the fitted state, also when training stopped with an error
                self.seed_, self.history_, self.best_ = trainer.seed, trainer.history, trainer.best
                self.n_epochs_, self.record_, self.skipped_steps_ = (
                    len(trainer.history),
                    trainer.record_,
                    trainer.skipped,
                )
                self.overflow_steps_ = trainer.overflows
        return self

    def trainer(self, train, eval_set=None, *, callbacks: Sequence[Any] = ()):
        """The :class:`~imtm.engine.training.Trainer` that ``fit`` runs, configured from this Matcher.

        Its callbacks are the progress bar (when ``verbose``), the ``loggers``, then ``callbacks``.
        """
        from imtm.engine.callbacks import Callback, ProgressBar, make_logger
        from imtm.engine.training import Trainer

        bad = [c for c in callbacks if not isinstance(c, Callback)]
        if bad or isinstance(callbacks, (str, Callback)):
            raise TypeError(
                f"Matcher.fit: callbacks must be a list of imtm.engine.callbacks.Callback objects, got "
                f"{bad[:3] or callbacks!r}"
            )
        own = ([ProgressBar()] if self.verbose else []) + [
            make_logger(x) for x in self.loggers or ()
        ]
        return Trainer(
            self,
            train,
            eval_set,
            device=self._device(),
            stages=self._stages(),
            autocast=self._autocast,
            build=self._build,
            callbacks=own + list(callbacks),
        )

    # ------------------------------------------------------------------ inference
    def _eval_plan(self) -> tuple[list[int], list[int], list[int]]:
        plan = self.plan_
        needed = plan.needed_for(plan.score_values, exclude_losses=True)
        return plan.split(needed)

    def _prepare_eval(self):
        self._check_fitted("similarity")
        self._sync_compile()
        self.components_.eval()
        img, txt, pair = self._eval_plan()
        keep_i = side_values_needed(self.plan_, pair, IMAGE)
        keep_t = side_values_needed(self.plan_, pair, TEXT)
        return img, txt, pair, keep_i, keep_t

    @staticmethod
    def _items(x, what: str) -> Sequence:
        if isinstance(x, torch.Tensor):
            return x
        if isinstance(x, str):
            raise TypeError(f"Matcher: {what} must be a sequence, got a single string")
        if not hasattr(x, "__len__") or not hasattr(x, "__getitem__"):
            raise TypeError(
                f"Matcher: {what} must be an indexable sequence, got {type(x).__name__}"
            )
        if len(x) == 0:
            raise ValueError(f"Matcher: got no {what}")
        return x

    @torch.no_grad()
    def encode_images(self, images) -> dict[str, Any]:
        """Run the image-side blocks over ``images``; return the values the pairwise blocks read.

        Returns:
            dict value name -> value for all images (e.g. ``{"image_tokens": Tokens (n_images, N, D)}``).
        """
        img, _, _, keep_i, _ = self._prepare_eval()
        return encode_side(
            self.plan_,
            img,
            "images",
            self._items(images, "images"),
            collate_images,
            keep_i,
            batch_size=self.eval_batch_size,
            device=self._device(),
            autocast=self._autocast,
            progress=self.verbose,
            desc="images",
        )

    @torch.no_grad()
    def encode_texts(self, captions) -> dict[str, Any]:
        """Run the caption-side blocks over ``captions``; return the values the pairwise blocks read."""
        _, txt, _, _, keep_t = self._prepare_eval()
        return encode_side(
            self.plan_,
            txt,
            "texts",
            self._items(captions, "captions"),
            collate_texts,
            keep_t,
            batch_size=self.eval_batch_size,
            device=self._device(),
            autocast=self._autocast,
            progress=self.verbose,
            desc="captions",
        )

    @torch.no_grad()
    def similarity(self, images, captions):
        """All-pairs scores, computed in memory-bounded blocks.

        Args:
            images: sequence of image items (pixels ``(3, H, W)`` or regions ``(N, D)``).
            captions: sequence of caption strings (or token-id sequences).

        Returns:
            A float32 CPU tensor, always: ``(n_images, n_captions)`` when the pipeline provides
            ``scores``, and ``(2, n_images, n_captions)`` when it provides direction-specific
            scores, stacked as ``[scores_i2t, scores_t2i]`` (rank captions with the first, images
            with the second; ``s_i2t, s_t2i = m.similarity(...)`` unpacks them, and
            :mod:`imtm.metrics` reads the stack as the pair). Under torchrun every rank must call
            it with the same images and captions: each encodes a share of both and scores its
            share of the images against all captions, and rank 0 returns the gathered tensor
            (the other ranks return ``None``).

        The result does not depend on ``image_block`` / ``text_block`` nor, up to the same
        permutation of its rows and columns, on the order of the inputs.

        Raises:
            NotFittedError: before ``fit`` or ``load``.
            ValueError: no images or no captions, an empty caption, images of different shapes
                (pixels of other sizes, region features of another ``D``), or NaN/inf image features
                (:class:`~imtm.tokens.NonFiniteValueError`, naming the first bad image); a block's own
                shape check (e.g. ``PrecomputedEncoder`` for a wrong feature size).
            TypeError: ``images`` or ``captions`` not an indexable sequence (a single string).
        """
        img, txt, pair, keep_i, keep_t = self._prepare_eval()
        images = self._items(images, "images")
        captions = self._items(captions, "captions")
        device = self._device()
        world = distributed.world_size() if distributed.setup(device) else 1
        sharded = world > 1 and min(len(images), len(captions)) >= world
        own_i, own_t = images, captions
        if sharded:
            own_i = RowRange(
                images, *distributed.shard_range(len(images), rank=distributed.rank(), world=world)
            )
            own_t = RowRange(
                captions,
                *distributed.shard_range(len(captions), rank=distributed.rank(), world=world),
            )
        progress = self.verbose and distributed.is_main()
        iv = encode_side(
            self.plan_,
            img,
            "images",
            own_i,
            collate_images,
            keep_i,
            batch_size=self.eval_batch_size,
            device=device,
            autocast=self._autocast,
            progress=progress,
            desc="images",
        )
        tv = encode_side(
            self.plan_,
            txt,
            "texts",
            own_t,
            collate_texts,
            keep_t,
            batch_size=self.eval_batch_size,
            device=device,
            autocast=self._autocast,
            progress=progress,
            desc="captions",
        )
        if sharded:  # every rank scores its images against all captions
            tv = {k: distributed.gather_value(v) for k, v in tv.items()}
        out = blocked_scores(
            self.plan_,
            pair,
            iv,
            tv,
            len(own_i),
            len(captions),
            image_block=self.image_block,
            text_block=self.text_block,
            autocast=self._autocast,
            progress=progress,
        )
        if sharded:
            out = {k: distributed.gather_rows_to_main(v) for k, v in out.items()}
            if not distributed.is_main():
                return None
        if len(self.plan_.score_values) == 1:
            return out["scores"]
        return torch.stack([out["scores_i2t"], out["scores_t2i"]])

    def evaluate(self, data, protocol: str | None = None) -> dict[str, float]:
        """Retrieval metrics on an evaluation set (``images``, ``captions``, ``caption_to_image``).

        Returns:
            ``{'i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10', 'rsum', ...}``
            (under torchrun: sharded as :meth:`similarity`, the same metrics on every rank)

        Raises:
            TypeError: ``data`` lacks ``images``, ``captions`` or ``caption_to_image``.
            ValueError: an unknown protocol, what :meth:`similarity` raises, and what
                :func:`imtm.metrics.retrieval_metrics` raises (a bad ``caption_to_image``, NaN scores).
        """
        from imtm.metrics import evaluate_protocol, retrieval_metrics

        data = getattr(data, "dataset", data)  # a DataLoader: use its dataset
        for attr in ("images", "captions", "caption_to_image"):
            if not hasattr(data, attr):
                raise TypeError(
                    f"Matcher.evaluate: the evaluation set must have 'images', 'captions' and "
                    f"'caption_to_image' (an imtm.data dataset); {type(data).__name__} has no {attr!r}"
                )
        sims = self.similarity(data.images, data.captions)
        protocol = protocol or self.protocol
        if sims is None:  # a rank other than 0 under torchrun: rank 0 computes, then shares
            return distributed.broadcast_object(None)
        if protocol is None:
            metrics = retrieval_metrics(sims, data.caption_to_image)
        else:
            metrics = evaluate_protocol(protocol, sims, data.caption_to_image)
        return distributed.broadcast_object(metrics)

    def score(self, data, y=None) -> float:
        """rSum on ``data`` (scikit-learn's 'higher is better' scalar).

        ``data`` is what :meth:`evaluate` takes, e.g. a :class:`~imtm.data.ByImage` fold of a
        grid search; ``y`` is ignored (the matches come from ``caption_to_image``).

        Example:
            >>> from sklearn.model_selection import GridSearchCV, KFold
            >>> from imtm import Matcher
            >>> from imtm.components import PrecomputedEncoder, GRUTextEncoder, GlobalCosine, TripletLoss
            >>> from imtm.data import ByImage, synthetic
            >>> train, _, _ = synthetic.load(view="regions", seed=0, n_train=8, n_dev=2, n_test=2)
            >>> m = Matcher([("image", PrecomputedEncoder(in_dim=train.region_dim, out_dim=8)),
            ...              ("text", GRUTextEncoder(vocab=train.vocab, out_dim=8)), GlobalCosine(),
            ...              ("loss", TripletLoss(hardest=False))], epochs=1, batch_size=32, verbose=False)
            >>> search = GridSearchCV(m, {"lr": [3e-3], "loss__margin": [0.1, 0.2]}, cv=KFold(2))
            >>> sorted(search.fit(ByImage(train)).best_params_)
            ['loss__margin', 'lr']
        """
        return float(self.evaluate(data)["rsum"])

    # ------------------------------------------------------------------ persistence
    def save(
        self, path: str | os.PathLike, *, overwrite: bool = False, metrics: dict | None = None
    ) -> Path:
        """Write the fitted model to a self-contained folder (Hugging Face layout, no pickle).

        The folder holds ``config.json`` (no absolute path), ``model.safetensors`` (every
        weight, the encoders' included), ``record.json`` (training record), one folder per
        block that needs files to be rebuilt (an :class:`~imtm.components.HFTextEncoder`'s
        configuration and tokenizer files), a generated ``README.md`` model card and
        ``MANIFEST.json`` (checksums). It can be moved, copied, zipped and loaded offline by
        :meth:`load` / :meth:`from_pretrained`, with no access to the files the encoders were
        first built from. See ``docs/saving.md`` for the layout.

        Args:
            path: the folder. A missing or empty folder, or one holding an earlier saved
                Matcher, is written (an earlier model's files are replaced; other files in it
                are left alone).
            overwrite: also write into a non-empty folder that is not a saved Matcher, beside
                its files. Even then only files an earlier imtm model listed in its own
                ``MANIFEST.json`` are replaced; no other file is ever changed or deleted.
            metrics: evaluation results to record in ``record.json`` and the model card,
                e.g. ``{"test": m.evaluate(test)}``.

        Raises:
            NotFittedError: before ``fit``.
            FileExistsError: ``path`` is a non-empty folder that is not a saved Matcher (pass
                ``overwrite=True``), or holds a file imtm did not write under a name the model
                uses (``config.json``, ...; never replaced), or is a file.

        Under torchrun every rank may call it: rank 0 writes, the others wait until the folder is complete.
        """
        self._check_fitted("save")
        path = Path(path)
        if (
            distributed.is_main()
        ):  # under torchrun rank 0 writes; the others wait until it is complete
            from imtm.engine.model_folder import MODEL_FORMAT, manifest_files, write_folder

            write_folder(
                path,
                lambda tmp: self._write_model_files(tmp, name=path.name, metrics=metrics),
                kind=MODEL_FORMAT,
                owned=manifest_files,
                overwrite=overwrite,
                what="Matcher.save",
            )
        distributed.barrier()
        return path

    def save_pretrained(
        self,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        metrics: dict | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **hub_kwargs,
    ) -> Path:
        """:meth:`save` under the Hugging Face name; optionally :meth:`push_to_hub` the folder too.

        Args:
            path, overwrite, metrics: as :meth:`save`.
            push_to_hub: also upload the folder (needs ``huggingface_hub``) to ``repo_id``
                (default: the folder's name); ``hub_kwargs`` go to :meth:`push_to_hub`.
        """
        out = self.save(path, overwrite=overwrite, metrics=metrics)
        if push_to_hub:
            self._upload_folder(out, repo_id or Path(path).name, **hub_kwargs)
        return out

    def _write_model_files(self, folder: Path, *, name: str, metrics: dict | None) -> list[str]:
        """Write every file of a saved model into the empty ``folder``; return their names, the manifest last."""
        import warnings

        from imtm.engine.model_folder import absolute_paths, model_card, source_record
        from imtm.engine.serialization import (
            atomic_write_bytes,
            atomic_write_json,
            file_sha256,
            save_tensors,
        )

        config = self.get_config(portable=True)
        record = dict(getattr(self, "record_", {}))
        record.update(
            {"n_epochs": getattr(self, "n_epochs_", 0), "history": getattr(self, "history_", [])}
        )
        if metrics is not None:
            record["metrics"] = {
                **record.get("metrics", {}),
                **json.loads(json.dumps(metrics, default=float)),
            }
        sources = {}
        for n, b in self.named_components:
            portable = b.portable_params()
            if portable:
                live = b.get_params(deep=False)
                sources[n] = {
                    k: source_record(live[k])
                    for k in portable
                    if not isinstance(live[k], AssetPath)
                }
                sources[n] = {k: v for k, v in sources[n].items() if v is not None} or record.get(
                    "sources", {}
                ).get(n, {})
        sources = {n: v for n, v in sources.items() if v}
        if sources:
            record["sources"] = sources
        found = absolute_paths(config, "config.json") + absolute_paths(record, "record.json")
        if found:
            warnings.warn(
                "Matcher.save: the saved model names absolute paths, so it depends on files outside its folder: "
                + "; ".join(found[:5])
                + ". A block that needs files should copy them into its own folder "
                "(Component.portable_params / write_assets)",
                UserWarning,
                stacklevel=3,
            )
        files = ["config.json", "model.safetensors", "record.json"]
        for n, b in self.components_.items():
            if any(v is ASSETS for v in b.portable_params().values()):
                sub = folder / n
                sub.mkdir()
                b.write_assets(sub)
                files += sorted(f"{n}/{p.name}" for p in sub.iterdir() if p.is_file())
        atomic_write_json(folder / "config.json", config)
        save_tensors(folder / "model.safetensors", self.components_.state_dict())
        atomic_write_json(folder / "record.json", record)
        checked = list(files)
        files.append("README.md")
        atomic_write_bytes(
            folder / "README.md",
            model_card(config, record, files + ["MANIFEST.json"], name=name).encode("utf-8"),
        )
        # The card is not checksummed (it is never read back, and users edit cards); it is listed as imtm's.
        atomic_write_json(
            folder / "MANIFEST.json",
            {"sha256": {f: file_sha256(folder / f) for f in checked}, "files": files},
        )
        return files + ["MANIFEST.json"]

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | None = None) -> Matcher:
        """Load a folder written by :meth:`save` (or a checkpoint folder); verifies checksums.

        Blocks are rebuilt from registered imtm classes only; no file can make this run code.
        Every imtm block is registered first, and so are the blocks of installed packages'
        ``imtm.components`` entry points (:func:`imtm.component.load_components`), whatever
        the caller imported. Encoders are rebuilt from the files inside the folder and get
        their weights from its ``model.safetensors``: nothing outside the folder is read,
        nothing is downloaded.
        ``checkpoint_dir`` is not restored (it is ``None`` on the loaded Matcher): a folder
        from elsewhere must not choose where a later ``fit`` writes and prunes checkpoints.
        Set it again with ``set_params(checkpoint_dir=...)`` to continue training with checkpoints.
        """
        from imtm.component import restoring_saved_weights
        from imtm.engine.serialization import asset_root

        load_components()  # every imtm block and those of the 'imtm.components' entry points, whoever calls
        ckpt = read_checkpoint(path, with_train_state=False)
        with asset_root(path), restoring_saved_weights():
            m = cls.from_config(ckpt["config"])
            m.checkpoint_dir = None
            if device is not None:
                m.device = device
            m.validate()
            seed = ckpt["record"].get("seed", 0)
            m._build(seed if seed is not None else 0)
        m.load_state(ckpt["model_state"])
        m.record_ = ckpt["record"]
        m.history_ = ckpt["record"].get("history", [])
        m.n_epochs_ = ckpt["record"].get("n_epochs", 0)
        m.seed_ = seed
        return m

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        device: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ) -> Matcher:
        """Load a saved model from a local folder or a Hugging Face hub repository.

        A path to an existing folder is loaded with :meth:`load`. Anything else is taken as a
        hub repository id (``"user/model"``) and fetched with ``huggingface_hub.snapshot_download``
        (optional dependency; its cache and ``HF_HUB_OFFLINE=1`` apply), then loaded the same way:
        checksums verified, registered blocks only, safetensors only.

        Raises:
            FileNotFoundError: not a folder and not a repository id (``"name"`` or ``"owner/name"``).
            ImportError: a repository id without ``huggingface_hub`` installed.
            CheckpointError: the folder fails its checks (see :meth:`load`).
        """
        source = os.fspath(path_or_repo_id)
        if Path(source).is_dir():
            return cls.load(source, device=device)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?", source):
            raise FileNotFoundError(
                f"Matcher.from_pretrained: {source!r} is neither a folder nor a hub repository "
                "id ('owner/name')"
            )
        try:
            from huggingface_hub import snapshot_download
        except ImportError as err:
            raise ImportError(
                f"Matcher.from_pretrained: {source!r} is not a local folder, and loading from the "
                "Hugging Face hub needs the optional package huggingface_hub "
                "(pip install huggingface_hub)"
            ) from err
        folder = snapshot_download(
            repo_id=source,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            library_name="imtm",
        )
        return cls.load(folder, device=device)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload imtm model",
        revision: str | None = None,
        metrics: dict | None = None,
    ) -> Any:
        """Save the model into a temporary folder and upload it to a Hugging Face hub repository.

        Needs the optional ``huggingface_hub`` (and network access and a token with write
        rights). The repository is created when missing. Returns what
        ``HfApi.upload_folder`` returns (the commit information).
        """
        import tempfile

        self._check_fitted("push_to_hub")
        with tempfile.TemporaryDirectory(prefix="imtm-push-") as tmp:
            folder = self.save(Path(tmp) / repo_id.split("/")[-1], metrics=metrics)
            return self._upload_folder(
                folder,
                repo_id,
                private=private,
                token=token,
                commit_message=commit_message,
                revision=revision,
            )

    @staticmethod
    def _upload_folder(
        folder: Path,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload imtm model",
        revision: str | None = None,
    ) -> Any:
        try:
            from huggingface_hub import HfApi
        except ImportError as err:
            raise ImportError(
                "Matcher.push_to_hub needs the optional package huggingface_hub "
                "(pip install huggingface_hub)"
            ) from err
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=os.fspath(folder),
            commit_message=commit_message,
            revision=revision,
        )

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load fitted weights, with a clear error when they belong to another configuration."""
        bits = state_mismatch(self.components_.state_dict(), state)
        if bits:
            raise CheckpointError("the weights come from another configuration: " + "; ".join(bits))
        self.components_.load_state_dict(state)


def _compile_failed(block, name: str, err: BaseException) -> None:
    import warnings

    block._imtm_compile_failed = True
    block._compiled_call_impl = None
    warnings.warn(
        f"Matcher: torch.compile failed for block {name!r} ({type(err).__name__}: {str(err)[:300]}); "
        "it runs eagerly",
        RuntimeWarning,
        stacklevel=3,
    )


class _CompiledCall:
    """A block's ``torch.compile``-d call, falling back to eager (once, with a warning) if compiling fails.

    Set as the module's ``_compiled_call_impl`` (what ``nn.Module.compile`` sets), so
    ``block(...)`` runs it and the state dict is unchanged. Compilation happens at the
    first call; when the compiled call raises, the block is run eagerly: if that raises
    too, the input was at fault and the eager error propagates unchanged; if it works,
    compilation was at fault, and the block stays eager from then on.

    A block whose forward is ``compute(*prepare(*inputs))`` (a host-side ``prepare``:
    tokenisation, input checks; a tensor-only ``compute``), such as the text encoders,
    has only its ``compute`` compiled: ``prepare`` runs eagerly first, so new captions
    (strings) never reach the compiler and never cause a recompilation.
    """

    def __init__(self, block: torch.nn.Module, name: str):
        self.block, self.name = block, name
        self.split = callable(getattr(block, "prepare", None)) and callable(
            getattr(block, "compute", None)
        )
        # torch's automatic dynamic shapes: the first new batch size or token count recompiles once
        # with symbolic sizes, later ones reuse that graph.
        self.compiled = torch.compile(block.compute if self.split else block._call_impl)

    def __call__(self, *args, **kwargs):
        try:
            if self.split:
                return self.compiled(*self.block.prepare(*args, **kwargs))
            return self.compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any compiler failure; an input error re-raises below
            out = self.block._call_impl(*args, **kwargs)
            _compile_failed(self.block, self.name, err)
            return out

    def __deepcopy__(self, memo):
        return None  # a copied block starts eager; the Matcher compiles its own blocks


from imtm.engine.seeding import CUBLAS_WORKSPACE_CONFIG, seed_everything  # noqa: E402,F401

__all__ += ["seed_everything"]
