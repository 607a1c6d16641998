"""The training loop behind ``Matcher.fit``: stages, AdamW, warm-up + cosine, checkpoints, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import math
import os
import platform
import random
import signal
import sys
import threading
import time
import uuid
import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from imtm._version import __version__
from imtm.component import Component
from imtm.data.collate import collate
from imtm.data.seeding import (
    SeededItems,
    item_seed,
    restored,
    seeded_item,
    set_fit_epoch_key,
)
from imtm.engine import distributed
from imtm.engine.blocks import concat, move, run_blocks, take
from imtm.engine.checkpoint import (
    CheckpointError,
    RunLock,
    complete_checkpoints,
    read_checkpoint,
    recover_run,
    resolve_checkpoint,
    write_checkpoint,
)
from imtm.engine.epochs import start_epoch
from imtm.engine.graph import IMAGE, TEXT
from imtm.engine.optim import (
    init_from_record,
    init_state,
    is_init_record,
    make_scheduler,
    optimizer_spec,
    schedule_spec,
    state_digest,
)
from imtm.engine.order import EpochSampler
from imtm.engine.sampling import refresh_sampler
from imtm.engine.seeding import seed_everything
from imtm.engine.serialization import encode_value
from imtm.tokens import NonFiniteValueError, Tokens

__all__ = ["Trainer", "EpochSampler", "SeededStream", "check_batch", "NonFiniteError"]

#: How a DataLoader iterated as given (a stream, a DataLoader subclass) is read: recorded in
#: checkpoints; a checkpoint of another way is refused (its batches could not be replayed).
STREAM_SEEDING = "seeded-batches/1"

log = logging.getLogger("imtm")

#: Parameters that do not change what a run computes: a resumed run may differ in these.
_RUN_ONLY_PARAMS = {
    "verbose",
    "loggers",
    "checkpoint_dir",
    "checkpoint_every",
    "num_workers",
    "device",
    "eval_batch_size",
    "image_block",
    "text_block",
    "protocol",
    "compile",
}


def check_batch(batch: Any) -> dict:
    """Validate a collated training batch at the boundary; return it as a dict."""
    if not isinstance(batch, dict):
        raise TypeError(
            f"a training batch must be a dict with 'images', 'texts', 'image_ids', got {type(batch).__name__}; "
            "use imtm.data.collate as the DataLoader's collate_fn"
        )
    missing = [k for k in ("images", "texts", "image_ids") if k not in batch]
    if missing:
        raise ValueError(f"a training batch lacks {missing}; it has {sorted(batch)}")
    texts, images, ids = batch["texts"], batch["images"], batch["image_ids"]
    n_t = len(texts)
    n_i = len(images)
    if n_t == 0:
        raise ValueError("a training batch holds no captions")
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dim() != 1
        or ids.dtype not in (torch.int64, torch.int32)
    ):
        raise TypeError(
            f"image_ids must be a 1-D integer tensor, got {getattr(ids, 'shape', type(ids).__name__)}"
        )
    if ids.numel() != n_t:
        raise ValueError(f"image_ids has {ids.numel()} entries but the batch holds {n_t} captions")
    if n_i != n_t:
        raise ValueError(
            f"a training batch must hold one image row per caption (row b of images goes with caption b); "
            f"got {n_i} images and {n_t} captions"
        )
    if isinstance(texts, Tokens) and bool((texts.lengths == 0).any()):
        raise ValueError("a training batch holds a caption of length 0")
    return batch


class NonFiniteError(FloatingPointError):
    """A NaN or inf in a training step, traced to the block that produced it.

    Raised by ``Matcher.fit`` under ``on_nonfinite="raise"``, and under ``"skip"`` when
    as many steps in a row as one epoch holds were all skipped (the run would train nothing).

    Attributes:
        kind: ``"loss"`` (the loss, or a value computed on the way to it, holds NaN/inf),
            ``"gradient"`` (the loss is finite, a gradient is not) or ``"rank"`` (under
            torchrun, only another rank's step was non-finite).
        block: the block the NaN/inf is traced to: the first block of the step (in plan
            order) whose output holds NaN/inf at a real position; the loss block itself when
            every intermediate value is finite; for gradients, the first block whose
            parameters hold NaN/inf gradients. ``None`` when no single block is to blame
            (a gradient norm that overflowed while every gradient is finite, another rank).
        value: the name of ``block``'s output that holds NaN/inf (``None`` for a loss block's
            own value and for gradients).
        blocks: every block involved: the loss blocks whose value is NaN/inf, or every block
            whose parameters hold NaN/inf gradients.
        step: index of the step in the run (0-based, counted over every stage and epoch).
        stage: index of the stage (0-based). epoch: epoch of that stage (1-based, as in
            ``history_``). batch: index of the batch in the epoch (0-based).
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        block: str | None,
        value: str | None,
        blocks: tuple = (),
        step: int = -1,
        stage: int = 0,
        epoch: int = 0,
        batch: int = -1,
    ):
        super().__init__(message)
        self.kind, self.block, self.value, self.blocks = kind, block, value, tuple(blocks)
        self.step, self.stage, self.epoch, self.batch = step, stage, epoch, batch


def _nonfinite(value: Any) -> bool:
    """True when a step value holds NaN or inf where it counts (Tokens: at real positions only)."""
    if isinstance(value, Tokens):
        feats = value.feats
        return feats.is_floating_point() and not bool(torch.isfinite(feats[value.mask]).all())
    if isinstance(value, torch.Tensor):
        return (value.is_floating_point() or value.is_complex()) and not bool(
            torch.isfinite(value).all()
        )
    if isinstance(value, (list, tuple)):
        return any(_nonfinite(v) for v in value if not isinstance(v, (str, bytes)))
    if isinstance(value, dict):
        return any(_nonfinite(v) for v in value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_nonfinite(getattr(value, f.name)) for f in dataclasses.fields(value))
    return False


#: What torch's gradient clipping adds to the norm before dividing by it (clip_grad_norm_).
_CLIP_EPS = 1e-6


def _grad_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The total 2-norm of the parameters' gradients, clipping them to ``max_norm`` when given.

    It stays on the device (no synchronisation): the caller checks it together with the loss.
    When it is NaN/inf the gradients are left as they are, not scaled by a NaN factor, so
    that the blocks whose gradients are non-finite can be told from the others.
    """
    utils = torch.nn.utils
    if not hasattr(utils, "get_total_norm"):
        # torch < 2.6 has no get_total_norm / clip_grads_with_norm_, and its clip_grad_norm_ scales
        # the gradients by a NaN factor when the norm is NaN/inf: the same clipping (max_norm over
        # the norm plus 1e-6, at most 1) by hand, by a factor of 1 when the norm is not finite.
        grads = [p.grad.detach() for p in params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g).float().to(grads[0].device) for g in grads])
        )
        if max_norm is not None:
            factor = torch.clamp(max_norm / (norm + _CLIP_EPS), max=1.0)
            factor = torch.where(torch.isfinite(norm), factor, torch.ones_like(factor))
            for g in grads:
                g.mul_(factor.to(g.device))
        return norm
    # torch's own clip_grad_norm_ is exactly these two calls (one fused kernel per device and dtype)
    norm = utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if max_norm is not None:
        utils.clip_grads_with_norm_(
            params, max_norm, torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
        )
    return norm


class Trainer:
    """One ``fit`` call: the training loop. Owns the optimizer, schedule, data order, checkpoints and history.

    ``Matcher.fit`` configures it and takes the fitted state from it when it ends (``history``,
    ``best``, ``seed``, ``skipped``, ``record_``); the blocks it trains are the model's
    ``components_``, built by the ``build`` callable it is given. The loop, in public methods
    (each a step of the one before)::

        run            the run folder's lock around fit_loop
        fit_loop       start (seed, build / init_from / warm start / resume), then every stage
        run_stage      a stage: its optimizer and schedule, then its epochs
        run_epoch      start_epoch (data epoch, K-means re-clustering, blocks' epoch, modes),
                       step per batch (nonfinite guard inside), callbacks, checkpoints
        end_epoch      history row, evaluation, keep_best_epoch, callbacks, the epoch's checkpoint

    Callbacks (:mod:`imtm.engine.callbacks`) see every event and can stop training.

    Args:
        model: what is trained: an object with ``components_`` and ``plan_`` (set by ``build``), the
            training parameters of :class:`~imtm.Matcher` as attributes, and ``evaluate``,
            ``load_state``, ``get_config``, ``config_hash`` (a Matcher).
        train: a dataset or a DataLoader. eval_set: evaluated after every epoch (optional).
        device: where the blocks train. stages: the stages to run (:class:`~imtm.Stage`).
        autocast: a callable returning the context manager for forward passes (mixed precision).
        build: ``build(seed)`` builds fresh blocks into ``model.components_`` / ``model.plan_``.
        callbacks: :class:`~imtm.engine.callbacks.Callback` objects, called in order.
    """

    #: Steps skipped as non-finite in the run, and in a row (``run`` resets them; a resumed run restores them).
    skipped = consecutive_skips = 0
    #: ``(stage, epoch)`` of the last skip warning: one warning per epoch.
    warned_epoch: tuple[int, int] | None = None
    #: The stage under way (``run`` sets it; a Trainer used step by step stays in stage 0).
    stage_idx = 0
    #: Set by a callback to end training (see :mod:`imtm.engine.callbacks`).
    should_stop = False
    #: The last step's total gradient norm (a 0-d tensor; ``None`` before a step or with nothing to train).
    last_grad_norm = None
    #: Whether ``start`` has run (the fitted state exists).
    started = False
    #: fp16 steps whose gradients overflowed (the scaler skipped them); whether the last step was one.
    overflows = 0
    last_overflow = False
    #: Where ``init_from`` initialised the blocks from (``record_["init_from"]``; ``None``: it did not).
    init_record: dict | None = None

    def __init__(
        self,
        model,
        train,
        eval_set=None,
        *,
        device,
        stages,
        autocast=contextlib.nullcontext,
        build=None,
        callbacks=(),
    ):
        self.m = self.model = model
        self.train = train
        self.eval_set = eval_set
        self.device = torch.device(device)
        self.stages = list(stages)
        self.autocast = autocast
        self.build = build
        self.callbacks = list(callbacks)
        self.run_dir = model.checkpoint_dir
        self.accumulate = int(getattr(model, "accumulate", 1) or 1)
        #: fp16 autocast trains with a gradient scaler (bf16 and fp32 need none).
        self.scaler = (
            torch.amp.GradScaler(self.device.type)
            if getattr(model, "precision", "fp32") == "fp16"
            else None
        )
        # Under torchrun: one process per rank, each with batch_size items of every global batch.
        distributed.setup(self.device)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.main = self.rank == 0
        self.ddp = None
        #: How a user's DataLoader is iterated: "rebuilt" (its batches drawn once per epoch from a
        #: seeded generator, its items loaded through SeededItems: exact resume anywhere) or
        #: "as-given" (a DataLoader subclass, an iterable dataset: read through SeededStream, a
        #: mid-epoch resume reads the epoch's consumed batches again and drops them).
        self.loader_mode = None
        self.epoch_batches: list | None = None
        if isinstance(train, IterableDataset):  # a stream: batched as it comes
            train = self.train = DataLoader(train, batch_size=model.batch_size, collate_fn=collate)
        if isinstance(train, DataLoader):
            self.loader_given = True
            self.loader_mode = "rebuilt" if _rebuildable(train) else "as-given"
            sized = [
                s.name or f"stage {i + 1}"
                for i, s in enumerate(self.stages)
                if s.batch_size is not None
            ]
            if sized:
                raise ValueError(
                    f"Matcher.fit: {sized} set batch_size, but train is a DataLoader, which has its "
                    "own batch size; pass the dataset instead"
                )
        elif isinstance(train, Dataset) or (
            hasattr(train, "__getitem__") and hasattr(train, "__len__")
        ):
            self.loader_given = False
            if len(train) == 0:
                raise ValueError("Matcher.fit: the training dataset is empty")
        else:
            raise TypeError(
                f"Matcher.fit: train must be a torch Dataset or DataLoader, got {type(train).__name__}"
            )
        for i, stage in enumerate(
            self.stages
        ):  # every stage's options are checked before any training
            where = "Matcher" if len(self.stages) == 1 else f"Matcher: stage {stage.name or i + 1}"
            optimizer_spec(self.option(stage, "optimizer"), where)
            schedule_spec(self.option(stage, "lr_scheduler"), where)
        self.set_stage(0)
        if eval_set is not None:
            for attr in ("images", "captions", "caption_to_image"):
                if not hasattr(getattr(eval_set, "dataset", eval_set), attr):
                    raise TypeError(
                        f"Matcher.fit: eval_set has no {attr!r}; pass an imtm.data evaluation dataset"
                    )

    def option(self, stage, name: str):
        """The stage's own value of an option, else the Matcher's."""
        own = getattr(stage, name, None)
        return own if own is not None else getattr(self.m, name)

    def set_stage(self, s: int) -> None:
        """Enter stage ``s``: its batch size and number of batches per epoch."""
        self.stage_idx = s
        self.batch_size = self.option(self.stages[s], "batch_size")
        if self.loader_given:
            try:
                n_batches = len(self.train)
            except TypeError:  # an iterable dataset without a length
                n_batches = None
        else:
            n_batches = math.ceil(len(self.train) / (self.batch_size * self.world))
        limit = getattr(self.m, "steps_per_epoch", None)
        if limit is not None:
            n_batches = limit if n_batches is None else min(n_batches, limit)
        if n_batches is None:
            raise ValueError(
                "Matcher.fit: the training data has no length (a stream); set steps_per_epoch to the "
                "number of batches an epoch takes from it"
            )
        if n_batches == 0:
            raise ValueError("Matcher.fit: the training data yields no batch")
        self.n_batches = n_batches

    # ------------------------------------------------------------------ data
    def epoch_key(self, epoch: int) -> int:
        """The epoch's number in the item seeds: unique over the run's stages and epochs."""
        return self.stage_idx * 1_000_003 + epoch

    def loader_generators(self) -> list[torch.Generator]:
        """The generators a user's DataLoader draws its order from (its own, its sampler's), once each."""
        found: dict[int, torch.Generator] = {}
        loader = self.train
        for owner in (
            loader,
            getattr(loader, "sampler", None),
            getattr(loader, "batch_sampler", None),
            getattr(getattr(loader, "batch_sampler", None), "sampler", None),
        ):
            g = getattr(owner, "generator", None)
            if isinstance(g, torch.Generator):
                found.setdefault(id(g), g)
        return list(found.values())

    def draw_epoch_batches(self, epoch: int) -> None:
        """Draw a rebuilt user DataLoader's batches of this epoch (indices only, no item is loaded).

        Its sampler draws from torch's generator seeded by ``(seed, epoch)`` (or from its own
        generator, whose state at the epoch's start the checkpoints keep), in a block that
        leaves the training stream untouched.
        """
        self.generators_epoch = [g.get_state() for g in self.loader_generators()]
        with restored():
            torch.default_generator.manual_seed(item_seed(self.seed, self.epoch_key(epoch), -1))
            self.epoch_batches = [list(b) for b in self.train.batch_sampler]

    def batches(self, epoch: int, start_batch: int):
        m = self.m
        # Every item is loaded with a seed of its own, (seed, epoch, item): random crops and caption
        # augmentation do not depend on the worker, num_workers, or where a run was resumed.
        if self.loader_mode == "as-given":
            # Read under generators seeded by (seed, epoch, batch); a resumed epoch reads again
            # (and drops) the batches its checkpoint had consumed.
            return SeededStream(
                self.train, self.seed, self.epoch_key(epoch), start=start_batch, rank=self.rank
            )
        # A private generator: creating the iterator must not draw from the global RNG,
        # or a run resumed mid-epoch would see different dropout / noise than an uninterrupted one.
        g = torch.Generator().manual_seed(self.seed + epoch)
        if self.loader_mode == "rebuilt":
            loader = self.train
            options = {"in_order": loader.in_order} if hasattr(loader, "in_order") else {}
            return iter(
                DataLoader(
                    SeededItems(loader.dataset, self.seed, self.epoch_key(epoch)),
                    batch_sampler=self.epoch_batches[start_batch:],
                    num_workers=loader.num_workers,
                    collate_fn=loader.collate_fn,
                    pin_memory=loader.pin_memory,
                    timeout=loader.timeout,
                    worker_init_fn=loader.worker_init_fn,
                    multiprocessing_context=loader.multiprocessing_context,
                    generator=g,
                    prefetch_factor=loader.prefetch_factor,
                    pin_memory_device=loader.pin_memory_device,
                    **options,
                )
            )
        data = SeededItems(self.train, self.seed, self.epoch_key(epoch))
        if self.world > 1:
            shard = distributed.ShardedBatchSampler(
                len(self.train),
                self.batch_size,
                seed=self.seed,
                epoch=epoch,
                rank=self.rank,
                world=self.world,
                start_batch=start_batch,
            )
            return iter(
                DataLoader(
                    data,
                    batch_sampler=shard,
                    collate_fn=collate,
                    num_workers=m.num_workers,
                    generator=g,
                )
            )
        sampler = EpochSampler(
            len(self.train), self.seed, epoch, start=start_batch * self.batch_size
        )
        return iter(
            DataLoader(
                data,
                batch_size=self.batch_size,
                sampler=sampler,
                collate_fn=collate,
                num_workers=m.num_workers,
                generator=g,
            )
        )

    # ------------------------------------------------------------------ optimisation
    def lr_factors(self, stage) -> dict[str, float]:
        return dict(self.option(stage, "lr_factors") or {})

    def trainable(self, stage) -> list[str]:
        """The blocks that train in ``stage``: its ``train`` list (or every block), less those with lr factor 0."""
        names = list(self.m.plan_.names) if stage.train is None else list(stage.train)
        factors = self.lr_factors(stage)
        return [n for n in names if factors.get(n, 1.0) != 0]

    def make_optimizer(self, stage):
        """The stage's optimizer (one parameter group per learning-rate factor) and schedule."""
        m = self.m
        names = self.trainable(stage)
        for name, block in m.components_.items():
            block.requires_grad_(name in names)
        cls, kwargs = optimizer_spec(self.option(stage, "optimizer"))
        lr = stage.lr if stage.lr is not None else kwargs.pop("lr", m.lr)
        kwargs.pop("lr", None)
        kwargs.setdefault("weight_decay", m.weight_decay)
        factors = self.lr_factors(stage)
        # Blocks at the full lr form the first group (named "default"), then one group per other block.
        groups = [
            {
                "params": [
                    p
                    for n in names
                    if factors.get(n, 1.0) == 1.0
                    for p in m.components_[n].parameters()
                    if p.requires_grad
                ],
                "name": "default",
            }
        ]
        groups += [
            {
                "params": [p for p in m.components_[n].parameters() if p.requires_grad],
                "name": n,
                "lr": lr * factors[n],
            }
            for n in names
            if factors.get(n, 1.0) != 1.0
        ]
        groups = [g for g in groups if g["params"]]
        if not groups:
            return None, None
        try:
            opt = cls(groups, lr=lr, **kwargs)
        except TypeError as err:
            raise TypeError(
                f"Matcher.fit: {cls.__name__}(..., lr={lr}, {kwargs}) failed: {err}; set the "
                "optimizer's keyword arguments with optimizer=(cls, {...}) (weight_decay comes from "
                "the Matcher unless given there)"
            ) from err
        sched = make_scheduler(
            self.option(stage, "lr_scheduler"),
            opt,
            steps_per_epoch=self.n_batches,
            total_steps=stage.epochs * self.n_batches,
            warmup=m.warmup,
        )
        return opt, sched

    def set_modes(self, stage) -> None:
        names = set(self.trainable(stage))
        for name, block in self.m.components_.items():
            block.train(name in names)

    def active_losses(self, stage) -> list[int]:
        plan = self.m.plan_
        if stage.losses is None:
            return plan.losses()
        return [plan.names.index(n) for n in stage.losses]

    def step(self, batch: dict, stage, opt, sched, loss_idx, run_idx) -> dict[str, float] | None:
        """One optimisation step; ``None`` when it was skipped (``on_nonfinite="skip"``).

        The normal step pays one check: the loss and the gradient norm (which clipping
        computes anyway) are tested for NaN/inf together, with one synchronisation (under
        torchrun, one all-reduce of that flag, so every rank takes the same decision).
        Only when it fails are the step's values searched for the block that produced it.
        """
        m = self.m
        batch = check_batch(batch)
        values = move(dict(batch), self.device)
        inputs = list(values)
        ids = values["image_ids"]
        values["positives"] = ids[:, None] == ids[None, :]
        refused = None
        bad: Any
        self.last_overflow = False
        backward = None
        try:
            if self.accumulate > 1 and opt is not None:
                total, logs, backward = self.cached_losses(values, loss_idx, run_idx)
            elif self.ddp is not None:
                total, logs = self.ddp(values, loss_idx, run_idx)
            else:
                total, logs = self.losses(values, loss_idx, run_idx)
        except NonFiniteValueError as err:
            # A block refused a NaN/inf input (check_finite): an earlier block, or the batch,
            # produced it. The values computed so far are in `values`.
            refused, total, logs = err, None, {}
        if refused is None and not isinstance(total, torch.Tensor):
            raise RuntimeError(
                "Matcher.fit: no loss block is active in this stage; add a loss such as TripletLoss"
            )
        if refused is not None:
            bad = loss_bad = True
        else:
            bad = loss_bad = ~torch.isfinite(total.detach())
            if opt is not None:
                # Backward even when the loss is NaN: under DDP every rank must join the gradient
                # all-reduce, and it costs nothing on the normal path.
                opt.zero_grad(set_to_none=True)
                scaled = self.scaler.scale(total) if self.scaler is not None else total
                if backward is not None:
                    backward(scaled)
                    # The passes of a cached step run outside DDP (no gradient synchronisation in
                    # any of them); the ranks' gradients are averaged once, as DDP would.
                    distributed.average_gradients(
                        [p for g in opt.param_groups for p in g["params"]]
                    )
                else:
                    scaled.backward()
                if self.scaler is not None:
                    self.scaler.unscale_(opt)
                params = [p for g in opt.param_groups for p in g["params"]]
                self.last_grad_norm = _grad_norm(params, m.grad_clip)
                grad_bad = ~torch.isfinite(self.last_grad_norm).to(bad.device)
                if (
                    self.scaler is not None
                    and not distributed.max_over_ranks(bad)
                    and distributed.max_over_ranks(grad_bad)
                ):
                    # fp16 overflow: the scaler skips the optimizer step and lowers its scale; the
                    # schedule does not advance (as for a skipped step). Not an error.
                    self.scaler.step(opt)
                    self.scaler.update()
                    self.overflows += 1
                    self.last_overflow = True
                    opt.zero_grad(set_to_none=True)
                    return {n: float(v.detach()) for n, v in logs.items()}
                bad = bad | grad_bad
        if not distributed.max_over_ranks(bad):
            if opt is not None:
                if self.scaler is not None:
                    self.scaler.step(opt)
                    self.scaler.update()
                else:
                    opt.step()
                sched.step()
            self.consecutive_skips = 0
            return {n: float(v.detach()) for n, v in logs.items()}
        local = "loss" if bool(loss_bad) else "gradient" if bool(bad) else None
        self.nonfinite(values, inputs, logs, refused, local, opt, run_idx)
        return None

    def nonfinite(
        self, values: dict, inputs: list[str], logs: dict, refused, local: str | None, opt, run_idx
    ) -> None:
        """Trace a non-finite step to its source, then raise or skip it (``on_nonfinite``).

        Every rank gets here together (the flag was all-reduced); ``local`` says what was
        non-finite on this rank (``"loss"``, ``"gradient"`` or ``None``). A NaN/inf in the batch
        itself is bad input, refused with a ``ValueError`` under either policy.
        """
        m = self.m
        kind, block, value, blocks, text = self._trace(
            values, inputs, logs, refused, local, run_idx
        )
        # 2: bad input somewhere, 1: a non-finite step somewhere; the same decision on every rank.
        verdict = distributed.max_over_ranks(2 if kind == "input" else 1)
        where = (
            f"step {self.global_step} (stage {self.stage_idx + 1}, epoch {self.epoch + 1}, "
            f"batch {self.batch_idx})" + (f" on rank {self.rank}" if self.world > 1 else "")
        )
        if verdict == 2:
            raise ValueError(
                f"Matcher.fit: {text} at {where}; imtm refuses non-finite input features under either "
                "on_nonfinite policy: fix or filter the data"
                if kind == "input"
                else f"Matcher.fit: another rank's batch holds NaN/inf input features at {where}; see its error"
            ) from refused
        info = dict(
            kind=kind,
            block=block,
            value=value,
            blocks=blocks,
            step=self.global_step,
            stage=self.stage_idx,
            epoch=self.epoch + 1,
            batch=self.batch_idx,
        )
        if m.on_nonfinite == "raise":
            raise NonFiniteError(
                f"Matcher.fit: non-finite {'gradient' if kind == 'gradient' else 'loss'} at "
                f"{where}: {text}; set on_nonfinite='skip' to skip such steps",
                **info,
            ) from refused
        # skip: no optimizer step, no schedule step, no gradient left behind.
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        self.skipped += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.n_batches:
            raise NonFiniteError(
                f"Matcher.fit: the last {self.consecutive_skips} steps (as many as one epoch holds) were all "
                f"skipped as non-finite; the last, {where}: {text}. The run is not training: lower lr, set "
                "grad_clip, check the data, or use on_nonfinite='raise' to stop at the first one",
                **info,
            )
        if self.warned_epoch != (self.stage_idx, self.epoch) and (kind != "rank" or self.main):
            self.warned_epoch = (self.stage_idx, self.epoch)
            warnings.warn(
                f"Matcher.fit: skipped {where}: {text}. Further skips in this epoch are counted without a "
                "warning (history_[...]['skipped_steps'], skipped_steps_)",
                RuntimeWarning,
                stacklevel=2,
            )

    def _trace(
        self, values: dict, inputs: list[str], logs: dict, refused, local: str | None, run_idx
    ):
        """``(kind, block, value, blocks, text)``: where this rank's NaN/inf comes from."""
        plan = self.m.plan_
        if local is None:
            return (
                "rank",
                None,
                None,
                (),
                "this rank's loss and gradients are finite; another rank's step was not (see its warning or error)",
            )

        def label(k: int) -> str:
            return f"block {plan.names[k]!r} ({type(plan.blocks[k]).__name__}, position {k})"

        losses = [n for n, v in logs.items() if _nonfinite(v)]
        if local == "loss":
            for name in inputs:
                if _nonfinite(values.get(name)):
                    return "input", None, name, (), f"the batch's input {name!r} holds NaN/inf"
            for k in run_idx:
                if plan.is_loss(k):
                    continue
                for name in plan.blocks[k].provides:
                    if name in values and _nonfinite(values[name]):
                        then = (
                            f"; loss block(s) {losses} returned NaN/inf"
                            if losses
                            else f"; a later block refused it ({refused})"
                        )
                        return (
                            "loss",
                            plan.names[k],
                            name,
                            tuple(losses),
                            f"{label(k)} produced NaN/inf in its output {name!r}{then}",
                        )
            if losses:
                k = plan.names.index(losses[0])
                return (
                    "loss",
                    losses[0],
                    None,
                    tuple(losses),
                    f"loss block(s) {losses} returned NaN/inf from finite inputs (first: {label(k)})",
                )
            if refused is not None:
                return "loss", None, None, (), f"a block refused a non-finite value ({refused})"
            return (
                "loss",
                None,
                None,
                tuple(logs),
                f"every loss is finite but their weighted sum overflowed "
                f"({ {n: float(v.detach()) for n, v in logs.items()} }); lower the loss weights",
            )
        grads = [
            name
            for name, b in self.m.components_.items()
            if any(p.grad is not None and _nonfinite(p.grad) for p in b.parameters())
        ]
        if grads:
            k = plan.names.index(grads[0])
            return (
                "gradient",
                grads[0],
                None,
                tuple(grads),
                f"the loss is finite but the parameters of block(s) {grads} got NaN/inf gradients "
                f"(first: {label(k)})",
            )
        return (
            "gradient",
            None,
            None,
            (),
            "the loss and every gradient are finite but their total norm overflowed",
        )

    def losses(self, values: dict, loss_idx, run_idx) -> tuple[Any, dict[str, torch.Tensor]]:
        """Run the blocks of one step and the active losses; return (weighted total, each loss by name)."""
        m = self.m
        plan = m.plan_
        with self.autocast():
            blocks = [k for k in run_idx if not plan.is_loss(k)]
            if self.world > 1:
                self.run_gathered(values, blocks, loss_idx)
            else:
                run_blocks(plan, blocks, values)
            total = 0.0
            logs: dict[str, torch.Tensor] = {}
            for k in loss_idx:
                block = plan.blocks[k]
                value = block(*[values[n] for n in block.requires])
                if not isinstance(value, torch.Tensor) or value.dim() != 0:
                    raise TypeError(f"loss block {plan.names[k]!r} must return a scalar tensor")
                logs[plan.names[k]] = value
                total = total + getattr(block, "weight", 1.0) * value.float()
        return total, logs

    def cached_losses(self, values: dict, loss_idx, run_idx):
        """The step's losses over ``accumulate`` micro-batches, as one batch (GradCache).

        The single-modality blocks (encoders, refiners) run on each micro-batch without a
        graph; their outputs that the pairwise blocks and losses read are concatenated into
        leaf tensors, and the pairwise blocks and losses run on the whole batch, so every
        all-pairs score and loss is the one of the large batch. Returns ``(total, logs,
        backward)``: ``backward(total)`` back-propagates the total to the cached values, then
        re-runs each micro-batch's single-modality blocks (with the random state of its first
        pass: the same dropout) and back-propagates their share of the cached gradient. The
        gradients equal those of one large batch; only one micro-batch's encoder activations
        are held at a time. Under torchrun the pairwise blocks read the cached values of every
        rank (:meth:`run_gathered`); :meth:`step` then averages the gradients over the ranks
        once (:func:`~imtm.engine.distributed.average_gradients`).
        """
        plan = self.m.plan_
        blocks = [k for k in run_idx if not plan.is_loss(k)]
        side = [k for k in blocks if plan.block_sides[k] in (frozenset({IMAGE}), frozenset({TEXT}))]
        rest = [k for k in blocks if k not in side]
        if rest and side and max(side) > min(rest):
            raise ValueError(
                f"Matcher: accumulate={self.accumulate} runs the single-modality blocks before the "
                f"pairwise ones, but block {plan.names[max(side)]!r} comes after the pairwise block "
                f"{plan.names[min(rest)]!r}; reorder the blocks or use accumulate=1"
            )
        later = rest + list(loss_idx)
        made = {v for k in side for v in plan.blocks[k].provides}
        boundary = list(
            dict.fromkeys(r for k in later for r in plan.blocks[k].requires if r in made)
        )
        n = len(values["texts"])
        size = -(-n // self.accumulate)
        slices = [slice(a, min(n, a + size)) for a in range(0, n, size)]
        raw = [
            name
            for name in values
            if name != "positives"
            and plan.sides.get(name) in (frozenset({IMAGE}), frozenset({TEXT}))
        ]
        micro = [{name: take(values[name], sl) for name in raw} for sl in slices]
        states, parts = [], {name: [] for name in boundary}
        with torch.no_grad(), self.autocast():
            for mv in micro:
                states.append(_rng_state(self.device))
                out = run_blocks(plan, side, dict(mv))
                for name in boundary:
                    parts[name].append(out[name])
        cache = {name: _leaf(concat(parts[name])) for name in boundary}
        values.update(cache)
        total, logs = self.losses(values, loss_idx, rest)

        def backward(total: torch.Tensor) -> None:
            total.backward()
            after = _rng_state(self.device)
            for sl, mv, state in zip(slices, micro, states):
                _set_rng_state(state, self.device)
                with self.autocast():
                    out = run_blocks(plan, side, dict(mv))
                outs, grads = [], []
                for name in boundary:
                    own, leaf = out[name], cache[name]
                    own_t = own.feats if isinstance(own, Tokens) else own
                    leaf_t = leaf.feats if isinstance(leaf, Tokens) else leaf
                    if (
                        not isinstance(own_t, torch.Tensor)
                        or not own_t.requires_grad
                        or leaf_t.grad is None
                    ):
                        continue
                    g = leaf_t.grad[sl]
                    if isinstance(own, Tokens):
                        g = g[:, : own_t.shape[1]]
                    outs.append(own_t)
                    grads.append(g.to(own_t.dtype))
                if outs:
                    torch.autograd.backward(outs, grads)
            _set_rng_state(after, self.device)

        return total, logs, backward

    def run_gathered(self, values: dict, blocks: list[int], loss_idx: list[int]) -> None:
        """Run ``blocks`` in order, gathering every rank's batch before the first pairwise block (or loss).

        Single-modality blocks run on this rank's rows. From the first block that reads both
        modalities on, every rank holds the values of all ranks' rows in rank order (the
        gradient flowing back to each row's owner, :func:`~imtm.engine.distributed.gather_with_grad`),
        so scorers and losses see every rank's negatives: K ranks with batch b compute the loss of
        one process with the combined batch of K*b.
        """
        plan = self.m.plan_
        for pos, k in enumerate(blocks):
            if len(plan.block_sides[k]) > 1:
                self._gather(values, blocks[pos:] + list(loss_idx))
                run_blocks(plan, blocks[pos:], values)
                return
            run_blocks(plan, [k], values)
        self._gather(values, list(loss_idx))

    def _gather(self, values: dict, later: list[int]) -> None:
        plan = self.m.plan_
        wanted = {r for k in later for r in plan.blocks[k].requires} | {"image_ids"}
        # The same names in the same order on every rank: each gather is a collective call.
        for name in list(values):
            if name in wanted and name != "positives" and len(plan.sides.get(name, ())) == 1:
                values[name] = distributed.gather_value(values[name])
        ids = values["image_ids"]
        values["positives"] = ids[:, None] == ids[None, :]

    def wrap(self, opt, stage):
        """The step under DistributedDataParallel (``None`` in a single process or with nothing to train)."""
        if self.world == 1 or opt is None:
            return None
        if self.accumulate > 1:
            # A cached step (cached_losses) runs its blocks in several passes and averages the
            # gradients itself (distributed.average_gradients); only DDP's start is needed:
            # every rank begins from rank 0's weights.
            distributed.broadcast_module(self.m.components_)
            return None
        from torch.nn.parallel import DistributedDataParallel

        plan = self.m.plan_
        run_idx = set(plan.needed_for([plan.names[k] for k in self.active_losses(stage)]))
        # A stage may train a block that no active loss reads: DDP must then look for unused
        # parameters (an extra pass over the graph every step), and only then.
        unused = any(
            plan.names.index(n) not in run_idx
            and any(p.requires_grad for p in self.m.components_[n].parameters())
            for n in self.trainable(stage)
        )
        # device_ids=None: the blocks already sit on this rank's device, and DDP must not move
        # the batch (Tokens) itself.
        return DistributedDataParallel(
            _StepModule(self.m.components_, self.losses), find_unused_parameters=unused
        )

    # ------------------------------------------------------------------ checkpoints
    def record(self) -> dict:
        m = self.m
        versions = {
            "imtm": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        }
        # Read from the installed distributions' metadata: importing timm or transformers
        # only to record their versions would cost seconds on the first fit.
        for mod, dist in (
            ("timm", "timm"),
            ("transformers", "transformers"),
            ("ot", "pot"),
            ("sklearn", "scikit-learn"),
        ):
            try:
                versions[mod] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:  # optional, only recorded
                pass
        fp = getattr(self.train, "fingerprint", None) or getattr(
            getattr(self.train, "dataset", None), "fingerprint", None
        )
        out = {
            "seed": self.seed,
            "versions": versions,
            "data_fingerprint": fp() if callable(fp) else None,
            "n_train": _length(self.train.dataset if self.loader_given else self.train),
            "evaluation_protocol": m.protocol
            or "all pairs of the evaluation set (retrieval_metrics)",
            "config_hash": m.config_hash(),
            # init_from as a saved folder records it (no absolute path; a Matcher described)
            "params": {
                **self.run_config()["params"],
                "init_from": encode_value(init_from_record(m.init_from, portable=True)),
            },
        }
        if self.init_record is not None:
            out["init_from"] = self.init_record
        return out

    def train_state(self, opt, sched, cpu_rng: dict | None = None) -> dict:
        """Everything a resumed run needs; ``cpu_rng``: the CPU generators' states to store instead of the current ones."""
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _np_state(),
            "python": _py_state(random.getstate()),
        }
        rng.update(cpu_rng or {})
        return {
            "position": {
                "stage": self.stage_idx,
                "epoch": self.epoch,
                "batch": self.batch_idx,
                "global_step": self.global_step,
                "epoch_done": self.epoch_done,
            },
            "epoch_logs": self.epoch_logs,
            "history": self.history,
            "best": self.best,
            "stopped": bool(self.should_stop),
            "callbacks": self.callback_states(),
            "skipped": self.skipped,
            "consecutive_skips": self.consecutive_skips,
            # The sha256 of best/'s weights as this run wrote them: a resume refuses another run's best/.
            "best_sha256": getattr(self, "best_sha256", None),
            "run_id": self.run_id,
            "optimizer": opt.state_dict() if opt is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "overflows": self.overflows,
            "scheduler": sched.state_dict() if sched is not None else None,
            "rng": rng,
            "data": self.data_state(),
            "train_config": self.run_config(),
            # Blocks with a generator of their own (DistanceWeightedMiner(random_state=...)).
            "block_generators": {
                name: states
                for name, mod in self.m.components_.named_modules()
                if isinstance(mod, Component) and (states := mod.generator_states())
            },
        }

    def data_state(self) -> dict:
        """How the data were read: what a resumed run needs to read the same batches with the same draws."""
        state = {"seeding": DATA_SEEDING, "loader": self.loader_mode or "dataset"}
        if self.loader_mode == "as-given":
            state["stream"] = STREAM_SEEDING
        if self.loader_given:
            state["generators"] = [g.get_state() for g in self.loader_generators()]
            state["generators_epoch"] = list(getattr(self, "generators_epoch", state["generators"]))
            state["num_workers"] = self.train.num_workers
        return state

    def check_data_state(self, folder, ts: dict) -> None:
        """Refuse a resume that could not read the same batches with the same random draws (say why)."""
        data = ts.get("data")
        pos = ts["position"]
        mid_epoch = not pos["epoch_done"] and pos["batch"] > 0
        again = "Fit without resume=True to start afresh" + (
            ", or resume from a checkpoint written at an epoch's "
            "end (checkpoint_every=None writes only those)"
            if mid_epoch
            else ""
        )
        if not isinstance(data, dict) or data.get("seeding") != DATA_SEEDING:
            raise CheckpointError(
                f"{folder} was written by an earlier version of imtm, which drew the random numbers of data "
                "loading (caption augmentation, random crops) differently: resuming would not give the model of "
                f"an uninterrupted run. {again}"
            )
        mode = self.loader_mode or "dataset"
        if data.get("loader") != mode:
            raise CheckpointError(
                f"{folder} was trained from a {data.get('loader')!r} source and this fit gets a {mode!r} one "
                "(a dataset, a DataLoader imtm re-creates each epoch, or one it iterates as given); resume with "
                f"the same kind of training data. {again}"
            )
        gens = self.loader_generators() if self.loader_given else []
        if self.loader_given and len(data.get("generators", [])) != len(gens):
            raise CheckpointError(
                f"{folder} was trained with a DataLoader whose sampler drew from {len(data.get('generators', []))} "
                f"generator(s) of its own; this one has {len(gens)}. Resume with a DataLoader built the same way. "
                f"{again}"
            )
        if mode != "as-given":
            return
        loader = self.train
        why = None
        if data.get("stream") != STREAM_SEEDING:
            why = (
                f"it was written by an earlier version of imtm, which read {type(loader).__name__} over "
                f"{type(loader.dataset).__name__} with the training stream's random numbers, so its batches "
                "cannot be replayed"
            )
        elif loader.num_workers and loader.persistent_workers:
            why = (
                "the DataLoader keeps its worker processes from epoch to epoch (persistent_workers=True), so "
                "their random state carries over and a new process cannot re-create it; use "
                "persistent_workers=False"
            )
        elif data.get("num_workers") != loader.num_workers:
            why = (
                f"the DataLoader had num_workers={data.get('num_workers')} and now has {loader.num_workers}; "
                "imtm iterates this DataLoader as given, where what each worker draws depends on their number"
            )
        if why is not None:
            raise CheckpointError(f"{folder} cannot be resumed exactly: {why}. {again}")

    def run_config(self) -> dict:
        cfg = self.m.get_config()
        cfg["params"] = {k: v for k, v in cfg["params"].items() if k not in _RUN_ONLY_PARAMS}
        return cfg

    def checkpoint(self, opt, sched, cpu_rng: dict | None = None) -> None:
        m = self.m
        if m.checkpoint_dir is None:
            return
        state = self.train_state(opt, sched, cpu_rng)
        if self.world > 1:
            # Every rank's random state (a collective), so a resumed run draws what an uninterrupted one would.
            state["rng_ranks"] = distributed.all_gather_objects(state["rng"])
            state["world_size"] = self.world
        if self.main:
            write_checkpoint(
                m.checkpoint_dir,
                f"ckpt-{self.global_step:08d}",
                config=m.get_config(),
                model_state=m.components_.state_dict(),
                record=self.record_,
                train_state=state,
            )
        distributed.barrier()

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False, warm_start: bool = False) -> None:
        """Train; with a ``checkpoint_dir``, hold its lock file (one writer per run folder) the whole time.

        Taking the lock also checks, before any training, that the folder can be written.
        """
        m = self.m
        lock = (
            RunLock(m.checkpoint_dir).acquire()
            if m.checkpoint_dir is not None and self.main
            else None
        )
        try:
            self.fit_loop(resume, warm_start)
        finally:
            if lock is not None:
                lock.release()

    def fit_loop(self, resume: bool = False, warm_start: bool = False) -> None:
        """The whole run: :meth:`start` (build, initialise or resume), every stage's epochs
        (:meth:`run_epoch`), then the best epoch's weights (``keep_best``) and ``on_fit_end``."""
        self.start(resume, warm_start)
        interrupts = _DeferredInterrupt(
            verbose=self.m.verbose and self.main and self.m.checkpoint_dir is not None
        )
        self.interrupts = interrupts
        try:
            self.emit("on_fit_start")
            for s in range(self.stage_idx, len(self.stages)):
                if self.should_stop:
                    break
                self.run_stage(s)
        finally:
            interrupts.close()
            set_fit_epoch_key(None)
        for block in self.m.components_.values():
            block.requires_grad_(True)
        self.m.components_.eval()
        if self.m.keep_best and self.best_state is not None:
            self.m.load_state(self.best_state)
        self.emit("on_fit_end")

    def run_stage(self, s: int) -> None:
        """Train stage ``s`` from where the run stands (its start, or a resumed position)."""
        stage = self.stages[s]
        if s != self.stage_idx:
            self.stage_idx, self.epoch, self.batch_idx, self.epoch_done = s, 0, 0, False
            self.epoch_logs = {}
        self.set_stage(s)
        opt, sched = self.make_optimizer(stage)
        self.opt, self.sched = opt, sched
        self.ddp = self.wrap(opt, stage)
        if self.resume_state is not None:
            self.restore(self.resume_state, opt, sched)
            self.resume_state = None
        self.loss_idx = self.active_losses(stage)
        self.run_idx = self.m.plan_.needed_for([self.m.plan_.names[k] for k in self.loss_idx])
        for e in range(self.epoch, stage.epochs):
            if self.should_stop:
                return
            if self.epoch != e:
                self.epoch, self.batch_idx, self.epoch_done, self.epoch_logs = e, 0, False, {}
            if not self.epoch_done:
                self.run_epoch(stage, e)
        if not self.should_stop:
            self.epoch = stage.epochs

    def start_epoch(self, stage, e: int) -> None:
        """Before an epoch's first step: the data's epoch, sampler re-clustering (DIAS), blocks' epoch, modes."""
        set_fit_epoch_key(item_seed(self.seed, self.epoch_key(e), -2))
        # A batch sampler that follows the model (K-means neighbours) re-clusters here.
        refresh_sampler(self, e)
        # Blocks that change with the epoch (a loss's warm-up) learn it; resumed runs too.
        start_epoch(self.m.components_, e)
        if self.loader_mode == "rebuilt":
            self.draw_epoch_batches(e)
        elif self.loader_mode == "as-given":
            # a stream that reshuffles by epoch (a Hugging Face IterableDataset, a webdataset pipeline)
            hook = getattr(getattr(self.train, "dataset", None), "set_epoch", None)
            if callable(hook):
                hook(self.epoch_key(e))
        self.set_modes(stage)

    def run_epoch(self, stage, e: int) -> None:
        """One epoch: :meth:`train_step` per batch (callbacks after each), then :meth:`end_epoch`."""
        opt, sched, interrupts = self.opt, self.sched, self.interrupts
        self.start_epoch(stage, e)
        self.emit("on_epoch_start", {"stage": self.stage_idx, "epoch": e + 1})
        t0 = time.time()
        it = self.batches(e, self.batch_idx)
        tick = time.perf_counter()
        while self.batch_idx < self.n_batches and not self.should_stop:
            # Ctrl-C is deferred to here, between steps: the checkpoint then holds the state
            # of the last completed step (weights, optimizer, every generator), exactly.
            if interrupts.requested:
                self.interrupted(opt, sched)
            # Loading a batch of a DataLoader iterated as given may draw from the global
            # generators: a Ctrl-C during it saves their state from before the load.
            before = _cpu_rng() if self.loader_mode == "as-given" else None
            try:
                batch = next(it)
            except StopIteration:
                break
            except KeyboardInterrupt:  # raised while loading (not by SIGINT): between steps
                self.interrupted(opt, sched, before)
            except Exception:
                if interrupts.requested:  # a worker stopped by the same Ctrl-C
                    self.interrupted(opt, sched, before)
                raise
            if interrupts.requested:
                self.interrupted(opt, sched, before)
            lrs = self.learning_rates(opt) if self.callbacks else None
            logs = self.step(batch, stage, opt, sched, self.loss_idx, self.run_idx)
            self.batch_idx += 1
            self.global_step += 1
            if logs is not None:
                for n, v in logs.items():
                    s_, c_ = self.epoch_logs.get(n, (0.0, 0))
                    self.epoch_logs[n] = (s_ + v, c_ + 1)
            if self.callbacks:
                now = time.perf_counter()
                self.emit("on_batch_end", self.step_logs(batch, logs, lrs, now - tick))
                tick = now
            if (
                self.m.checkpoint_every
                and self.global_step % self.m.checkpoint_every == 0
                and self.batch_idx < self.n_batches
                and not self.should_stop
            ):
                self.checkpoint(opt, sched)
        self.end_epoch(stage, e, time.time() - t0)

    def end_epoch(self, stage, e: int, seconds: float) -> None:
        """After an epoch: its history row, the evaluation and best-epoch keeping, callbacks, the checkpoint."""
        m = self.m
        self.epoch_done = True
        entry = {
            "stage": self.stage_idx,
            "epoch": e + 1,
            "step": self.global_step,
            "time_s": round(seconds, 3),
            "skipped_steps": self.skipped,
        }
        if self.should_stop and self.batch_idx < self.n_batches:
            entry["stopped"] = True
        for n, (s_, c_) in self.epoch_logs.items():
            entry[f"loss/{n}"] = s_ / max(c_, 1)
        if self.eval_set is not None:
            metrics = m.evaluate(self.eval_set)
            entry["eval"] = metrics
            self.keep_best_epoch(metrics, e)
            self.set_modes(stage)
            self.emit("on_eval", metrics)
        self.history.append(entry)
        if self.main:
            log.info("epoch %s", entry)
        self.emit("on_epoch_end", entry)
        self.checkpoint(self.opt, self.sched)
        if self.interrupts.requested:  # during the evaluation: the epoch's checkpoint is written
            raise KeyboardInterrupt

    def blocks_still_untrained(self) -> list[str]:
        """Blocks with parameters that a later stage trains and no stage so far has trained.

        An epoch after which such a block still holds its initial weights is not a candidate for
        ``keep_best``: in a staged fit (DCPA trains its inter-modal branches only in its second
        stage) the best first-stage epoch would otherwise end the fit with those branches untrained.
        """
        done: set[str] = set()
        for stage in self.stages[: self.stage_idx + 1]:
            done.update(self.trainable(stage))
        later: list[str] = []
        for stage in self.stages[self.stage_idx + 1 :]:
            later.extend(n for n in self.trainable(stage) if n not in done and n not in later)
        blocks = self.m.components_
        return [n for n in later if any(True for _ in blocks[n].parameters())]

    def keep_best_epoch(self, metrics: dict, e: int) -> None:
        """Remember (and write to ``best/``) the weights of the best epoch so far by rSum.

        Only epochs after which every block that the fit trains has trained are candidates
        (:meth:`blocks_still_untrained`).
        """
        if self.blocks_still_untrained():
            return
        if self.best is None or metrics["rsum"] > self.best["rsum"]:
            self.best = {"rsum": metrics["rsum"], "stage": self.stage_idx, "epoch": e + 1}
            self.best_state = {
                k: v.detach().clone() for k, v in self.m.components_.state_dict().items()
            }
            self._save_best()

    # ------------------------------------------------------------------ callbacks
    def emit(self, event: str, *args) -> None:
        """Call ``event`` on every callback, in order."""
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    def learning_rates(self, opt) -> dict[str, float]:
        if opt is None:
            return {}
        return {g.get("name", f"group{i}"): float(g["lr"]) for i, g in enumerate(opt.param_groups)}

    def step_logs(self, batch: dict, logs: dict | None, lrs: dict, seconds: float) -> dict:
        """What ``on_batch_end`` receives (see :mod:`imtm.engine.callbacks`)."""
        samples = len(batch["texts"]) * self.world
        out = {
            "step": self.global_step,
            "stage": self.stage_idx,
            "epoch": self.epoch + 1,
            "batch": self.batch_idx - 1,
        }
        out.update({f"loss/{n}": v for n, v in (logs or {}).items()})
        out.update({f"lr/{n}": v for n, v in lrs.items()})
        norm = self.last_grad_norm
        out.update(
            grad_norm=float(norm) if norm is not None else float("nan"),
            samples=samples,
            samples_per_s=samples / seconds if seconds > 0 else float("nan"),
            time_s=seconds,
            skipped=logs is None or self.last_overflow,
        )
        return out

    def loss_names(self) -> list[str]:
        """Every loss block of the plan (the step log's ``loss/`` columns)."""
        plan = self.m.plan_
        return [plan.names[k] for k in plan.losses()]

    def group_names(self) -> list[str]:
        """Every parameter group name of any stage (the step log's ``lr/`` columns)."""
        names = ["default"]
        for stage in self.stages:
            factors = self.lr_factors(stage)
            names += [
                n
                for n in self.m.plan_.names
                if factors.get(n, 1.0) not in (0, 1.0) and n not in names
            ]
        return names

    def callback_states(self) -> dict:
        return {f"{i}:{type(cb).__name__}": cb.state_dict() for i, cb in enumerate(self.callbacks)}

    # ------------------------------------------------------------------ start and resume
    def start(self, resume: bool = False, warm_start: bool = False) -> None:
        """Seed, build the blocks (afresh, from ``init_from``, or continuing under ``warm_start``),
        then read the checkpoint to resume from, if any."""
        m = self.m
        seed = (
            m.random_state
            if m.random_state is not None
            else int(np.random.SeedSequence().entropy % (2**31))
        )
        self.seed = int(seed)
        # warm start: the fitted weights and history carry over into the blocks built below
        previous = None
        if warm_start and hasattr(m, "components_"):
            previous = (
                {k: v.detach().clone() for k, v in m.components_.state_dict().items()},
                list(getattr(m, "history_", [])),
            )
        seed_everything(self.seed)
        self.build(self.seed)
        if previous is not None:
            try:
                m.load_state(previous[0])
            except CheckpointError as err:
                raise ValueError(
                    f"Matcher.fit(warm_start=True): the fitted weights no longer fit the blocks "
                    f"({err}); fit without warm_start to start afresh"
                ) from err
        elif m.init_from is not None and not resume:
            self.initialise_from(m.init_from, m.init_blocks)
        if self.rank:
            # Identical initial weights on every rank (and DDP broadcasts rank 0's), but each rank
            # its own dropout / noise stream; rank 0 keeps the single-process stream.
            seed_everything(self.seed + 1_000_003 * self.rank)
        self.history, self.best = ([], None) if previous is None else (previous[1], None)
        self.record_ = self.record()
        self.started = True
        self.stage_idx, self.epoch, self.batch_idx, self.global_step = 0, 0, 0, 0
        self.epoch_done, self.skipped, self.epoch_logs = False, 0, {}
        self.consecutive_skips, self.warned_epoch = 0, None
        self.run_id, self.best_sha256 = (
            uuid.uuid4().hex,
            None,
        )  # a resumed run takes its checkpoint's
        self.best_state = None
        self.resume_state = None
        self.should_stop = False
        if resume:
            self.read_resume(resume)

    def read_resume(self, resume) -> None:
        """Read and check the checkpoint to continue from; set the run's position (the rest in :meth:`restore`)."""
        m = self.m
        if m.checkpoint_dir is None:
            raise ValueError("Matcher.fit(resume=True) needs checkpoint_dir")
        if resume is not True and not (
            isinstance(resume, (str, os.PathLike)) and os.fspath(resume)
        ):
            raise TypeError(
                f"Matcher.fit: resume must be True, False or the name or path of a checkpoint "
                f"folder, got {resume!r}"
            )
        if (
            self.main
        ):  # this run is the next writer: undo what a killed one left (folders renamed aside)
            recover_run(m.checkpoint_dir)
        distributed.barrier()
        try:
            folder = resolve_checkpoint(m.checkpoint_dir, resume)
            ckpt = read_checkpoint(folder) if folder is not None else None
        except CheckpointError as e:
            raise CheckpointError(f"{e}. {_resume_advice(m.checkpoint_dir)}") from e
        if folder is None:
            return
        ts = ckpt["train_state"]
        if ts is None:
            raise CheckpointError(f"{folder} holds weights only; it cannot be resumed")
        if ts["train_config"] != self.run_config():
            raise CheckpointError(
                f"{folder} comes from another configuration; resume with the same components and "
                "training parameters, or fit without resume=True to start afresh"
            )
        if ts.get("world_size", 1) != self.world:
            raise CheckpointError(
                f"{folder} was written by a run of {ts.get('world_size', 1)} process(es), this one has "
                f"{self.world}; resume with the same number of processes (the global batch and the data "
                "order depend on it)"
            )
        old = ckpt["record"]
        for key, what in (("data_fingerprint", "fingerprint"), ("n_train", "size")):
            if (
                old.get(key) is not None
                and self.record_.get(key) is not None
                and old[key] != self.record_[key]
            ):
                raise CheckpointError(
                    f"{folder} was trained on other data (dataset {what} {old[key]!r}, this one "
                    f"{self.record_[key]!r}); resume with the same training set, or fit without "
                    "resume=True to start afresh"
                )
        self.check_data_state(folder, ts)
        pos = ts["position"]
        if (
            not pos["epoch_done"]
            and pos["batch"] > 0
            and self.loader_given
            and callable(
                getattr(getattr(self.train, "batch_sampler", None), "update_embeddings", None)
            )
        ):
            raise CheckpointError(
                f"{folder} was written mid-epoch, and the DataLoader's batch sampler re-clusters from the "
                "model at each epoch's start: the clusters of that epoch cannot be re-created from a "
                "later model. Resume from a checkpoint written at an epoch's end (checkpoint_every=None "
                "writes only those), or fit without resume=True to start afresh"
            )
        if "rng_ranks" in ts:
            ts["rng"] = ts["rng_ranks"][self.rank]
        m.load_state(ckpt["model_state"])
        self.resume_state = ts
        if self.loader_given:
            data = ts["data"]
            states = data["generators"] if pos["epoch_done"] else data["generators_epoch"]
            for g, state in zip(self.loader_generators(), states):
                g.set_state(state)
        self.stage_idx, self.epoch, self.batch_idx = pos["stage"], pos["epoch"], pos["batch"]
        self.global_step, self.epoch_done = pos["global_step"], pos["epoch_done"]
        self.history, self.best, self.skipped = ts["history"], ts["best"], ts["skipped"]
        self.consecutive_skips = ts.get("consecutive_skips", 0)
        self.epoch_logs = ts["epoch_logs"]
        self.should_stop = bool(ts.get("stopped", False))
        saved = ts.get("callbacks", {})
        for key, cb in zip(self.callback_states(), self.callbacks):
            if key in saved:
                cb.load_state_dict(saved[key])
        best_path = _best_path(m)
        self.best_sha256, self.run_id = ts.get("best_sha256"), ts.get("run_id")
        if best_path is not None and self.best is not None:
            if best_path.is_dir():
                best = read_checkpoint(best_path, with_train_state=False)
                digest = _weights_digest(best_path)
                theirs = best["record"].get("best")
                # Written by this run after the checkpoint (killed before the next one): the
                # steps replayed from here reach that evaluation again and rewrite it identically.
                later = (
                    best["record"].get("run_id") == self.run_id
                    and isinstance(theirs, dict)
                    and (theirs.get("stage"), theirs.get("epoch"))
                    > (self.best["stage"], self.best["epoch"])
                )
                if not later and (digest != self.best_sha256 or theirs != self.best):
                    raise CheckpointError(
                        f"{best_path} is not the best epoch of the run in {folder}: its weights (sha256 "
                        f"{str(digest)[:12]}, best {best['record'].get('best')}) are not the ones that run "
                        f"saved (sha256 {str(self.best_sha256)[:12]}, best {self.best}); it may come from "
                        "another run. Restore that run's best/, or fit without resume=True to start afresh"
                    )
                self.best_state = None if later else best["model_state"]
            elif m.keep_best:
                # best/ is written before any checkpoint that records it: it was removed since.
                raise CheckpointError(
                    f"{folder} records a best epoch ({self.best}) but {best_path} is missing, so keep_best "
                    f"could not end this run with that epoch's weights. Restore {best_path}, or fit "
                    "without resume=True to start afresh"
                )
        self.seed = ckpt["record"]["seed"]

    def restore(self, ts: dict, opt, sched) -> None:
        """At the resumed stage's start: the optimizer, schedule, generators and blocks' generators."""
        if opt is not None and ts["optimizer"] is not None:
            opt.load_state_dict(ts["optimizer"])
            sched.load_state_dict(ts["scheduler"])
        if self.scaler is not None and ts.get("scaler"):
            self.scaler.load_state_dict(ts["scaler"])
        self.overflows = ts.get("overflows", 0)
        _restore_rng(ts["rng"])
        for name, states in ts.get("block_generators", {}).items():
            self.m.components_.get_submodule(name).load_generator_states(states)

    def initialise_from(self, source, names) -> None:
        """Copy the weights of blocks ``names`` (``None``: every block of the same name) from ``source``.

        ``source``: a fitted Matcher, a saved model or checkpoint folder, or a run folder (its
        ``LATEST`` checkpoint). Position tables of another length are resampled (:func:`init_state`).
        """
        from pathlib import Path

        from imtm.engine.checkpoint import latest_checkpoint

        if is_init_record(source):
            raise ValueError(
                f"Matcher: init_from={source!r} records where a saved model's weights came from; it "
                "cannot be applied again (the weights are not stored with it). Pass the fitted Matcher "
                "or a saved folder's path as init_from, or set init_from=None to train afresh"
            )
        if isinstance(source, (str, os.PathLike)):
            folder = Path(source)
            if (folder / "LATEST").is_file():
                folder = latest_checkpoint(folder)
            state = read_checkpoint(folder, with_train_state=False)["model_state"]
        else:
            blocks = getattr(source, "components_", None)
            if blocks is None:
                raise ValueError(
                    "Matcher: init_from is a Matcher that is not fitted; fit or load it first"
                )
            state = blocks.state_dict()
        with torch.no_grad():
            copied = init_state(self.m.components_, state, None if names is None else list(names))
        # What the record keeps (record_["init_from"]): the source as the configuration describes
        # it, the blocks copied, and the sha256 of the weights copied (before any resampling).
        self.init_record = {
            "source": init_from_record(source, portable=True),
            "blocks": copied,
            "weights_sha256": state_digest(
                {k: v for k, v in state.items() if k.split(".", 1)[0] in copied}
            ),
        }

    def interrupted(self, opt, sched, cpu_rng: dict | None = None) -> None:
        """After a deferred Ctrl-C: save the state of the last completed step, then raise KeyboardInterrupt.

        (Not under torchrun: the other ranks may be gone, and saving needs all of them. Nothing to
        save at an epoch's start: the epoch's checkpoint before it holds that state.)
        """
        if (
            self.m.checkpoint_dir is not None
            and not self.epoch_done
            and self.batch_idx > 0
            and self.world == 1
        ):
            self.checkpoint(opt, sched, cpu_rng)
        raise KeyboardInterrupt

    def _save_best(self) -> None:
        m = self.m
        path = _best_path(m)
        if path is None:
            return
        if self.main:
            write_checkpoint(
                path.parent,
                path.name,
                config=m.get_config(),
                model_state=m.components_.state_dict(),
                record={**self.record_, "best": self.best, "run_id": self.run_id},
                update_latest=False,
            )
            self.best_sha256 = _weights_digest(path)
        distributed.barrier()


class SeededStream:
    """A DataLoader iterated as given, each batch read under generators seeded by ``(seed, epoch, batch)``.

    What a stream (an ``IterableDataset``, a webdataset or Hugging Face streaming pipeline, a
    DataLoader subclass) draws while its batches are read (torch's CPU generator, NumPy's,
    Python's ``random``, and through them the seeds of its worker processes) comes from
    seeds fixed by the run's seed, the epoch and the batch's index, and the training
    stream (dropout, noise) is left untouched. Resuming an epoch at batch ``start`` reads
    its first ``start`` batches again and drops them (loading, not training), so the
    batches that follow, and every random draw, are an uninterrupted run's, provided the
    source is deterministic given those seeds and its ``set_epoch`` (see
    ``docs/training.md``, "Streams").

    Args:
        loader: the DataLoader. seed: the run's seed. epoch: the epoch's key (unique over stages).
        start: batches to read and drop first.
        rank: the process's rank under torchrun: each rank reads its own stream with seeds of
            its own (rank 0 those of a single process), as its training stream is its own.

    Raises:
        ValueError: the stream ends before ``start`` batches (it yields other data than when the
            checkpoint was written).
    """

    def __init__(self, loader, seed: int, epoch: int, *, start: int = 0, rank: int = 0):
        seed = int(seed) if rank == 0 else item_seed(int(seed), -5, int(rank))
        self.seed, self.epoch, self.index = seed, int(epoch), 0
        # Creating the iterator draws (the workers' base seed, a shuffling sampler's order).
        with seeded_item(item_seed(self.seed, self.epoch, -3)):
            self.it = iter(loader)
        for _ in range(start):
            try:
                next(self)
            except StopIteration:
                raise ValueError(
                    f"Matcher.fit: the training stream ended after {self.index} batches while skipping "
                    f"the {start} its checkpoint had consumed in this epoch; a resumed stream must yield "
                    "the same batches as the interrupted run (see docs/training.md, Streams)"
                ) from None

    def __iter__(self):
        return self

    def __next__(self):
        with seeded_item(item_seed(self.seed, self.epoch, -4 - self.index)):
            batch = next(self.it)
        self.index += 1
        return batch


class _StepModule(torch.nn.Module):
    """One training step as a module, so that DistributedDataParallel sees the whole forward pass."""

    def __init__(self, components: torch.nn.ModuleDict, step_fn):
        super().__init__()
        self.components = components
        self.step_fn = step_fn  # a bound method: a plain attribute, not a submodule

    def forward(self, values, loss_idx, run_idx):
        return self.step_fn(values, loss_idx, run_idx)


def _length(data) -> int | None:
    try:
        return len(data)
    except TypeError:  # a stream
        return None


def _leaf(value: Any) -> Any:
    """A cached value as a leaf that collects its gradient (Tokens: their features)."""
    if isinstance(value, Tokens):
        feats = value.feats.detach()
        return value.with_feats(feats.requires_grad_(feats.is_floating_point()))
    if isinstance(value, torch.Tensor):
        t = value.detach()
        return t.requires_grad_(t.is_floating_point())
    return value


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _resume_advice(run_dir) -> str:
    """What to do when the checkpoint to resume from is refused: the complete ones left, newest first."""
    ok = [p.name for p in complete_checkpoints(run_dir)]
    if ok:
        return (
            f"Nothing was loaded. Complete checkpoints in {run_dir}, newest first: {', '.join(ok)}; continue "
            f"from one with fit(..., resume={ok[0]!r}), or fit without resume=True to start afresh"
        )
    return (
        f"Nothing was loaded, and {run_dir} holds no other complete checkpoint: fit without resume=True "
        "to start afresh"
    )


def _best_path(m):
    from pathlib import Path

    return None if m.checkpoint_dir is None else Path(m.checkpoint_dir) / "best"


def _np_state() -> dict:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _py_state(state):
    version, internal, gauss = state
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng.get("cuda"):
        torch.cuda.set_rng_state_all(rng["cuda"])
    n = rng["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    p = rng["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


#: Version of how data loading draws its random numbers (imtm.data.seeding); a checkpoint of another one is refused.
DATA_SEEDING = 1


def _rebuildable(loader: DataLoader) -> bool:
    """Whether imtm can re-create ``loader`` each epoch (a plain DataLoader over a map-style dataset, batched)."""
    return (
        type(loader) is DataLoader
        and not isinstance(loader.dataset, IterableDataset)
        and loader.batch_sampler is not None
    )


def _cpu_rng() -> dict:
    """The CPU generators' states, in the form ``train_state`` stores."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": _np_state(),
        "python": _py_state(random.getstate()),
    }


class _DeferredInterrupt:
    """Turns the first Ctrl-C (SIGINT) of a fit into a request the loop honours between steps.

    Installed only in the main thread and only over Python's default handler (a handler of
    yours is left alone). A second Ctrl-C raises ``KeyboardInterrupt`` at once (nothing more is
    saved: the last checkpoint stays). In a DataLoader worker forked meanwhile, Ctrl-C raises as before.
    """

    def __init__(self, verbose: bool = False):
        self.requested = False
        self.verbose = verbose
        self.pid = os.getpid()
        self.previous = None
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested or os.getpid() != self.pid:
            raise KeyboardInterrupt
        self.requested = True
        if self.verbose:
            sys.stderr.write(
                "\n[imtm] interrupted: finishing the current step, then saving a checkpoint "
                "(Ctrl-C again stops at once, keeping the last checkpoint)\n"
            )

    def close(self) -> None:
        if self.previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def _weights_digest(folder) -> str | None:
    """The sha256 of a checkpoint folder's ``model.safetensors``, as its (already verified) manifest lists it."""
    from pathlib import Path

    from imtm._io import read_json

    manifest = read_json(
        Path(folder) / "MANIFEST.json", who="checkpoint", max_bytes=1 << 20, error=CheckpointError
    )
    return (
        manifest.get("sha256", {}).get("model.safetensors") if isinstance(manifest, dict) else None
    )
