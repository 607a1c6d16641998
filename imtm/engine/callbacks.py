"""Callbacks of the training loop: progress bars, step logs (CSV, TensorBoard, W&B), early stopping.

:class:`~imtm.engine.training.Trainer` calls every callback at each event of a ``fit``, in
the order they were given, always in this order::

    on_fit_start
      on_epoch_start                      (each epoch of each stage)
        on_batch_end                      (each optimisation step, skipped ones included)
      on_eval                             (after the epoch, with an eval_set)
      on_epoch_end
    on_fit_end                            (when fit returns normally)

Every hook receives the trainer (its public attributes: ``stage_idx``, ``epoch``,
``batch_idx``, ``global_step``, ``n_batches``, ``history``, ``run_dir``, ``model``) and what
the event carries:

- ``on_batch_end(trainer, logs)``: ``logs`` is a dict: ``step`` (steps done in the run),
  ``stage`` (0-based), ``epoch`` (1-based), ``batch`` (0-based in the epoch), ``loss/<block>``
  for every active loss block, ``lr/<group>`` for every parameter group (``default`` holds the
  blocks at the full learning rate, other groups are named by their block), ``grad_norm``
  (before clipping), ``samples``, ``samples_per_s``, ``time_s`` (this step, data loading
  included) and ``skipped`` (a non-finite step skipped under ``on_nonfinite="skip"``: no losses).
- ``on_epoch_start(trainer, info)``: ``{"stage", "epoch"}``.
- ``on_eval(trainer, metrics)``: what ``Matcher.evaluate`` returned on the eval_set.
- ``on_epoch_end(trainer, entry)``: the epoch's ``history_`` row.

A callback stops training by setting ``trainer.should_stop = True``: set during an epoch,
the epoch ends after the current step (its ``history_`` row says ``"stopped": True``); set in
``on_eval`` or ``on_epoch_end``, no further epoch starts. A callback that keeps state across
a run (:class:`EarlyStopping`) returns it from ``state_dict`` and takes it back in
``load_state_dict``: checkpoints hold it, so a resumed run continues where it was.

Example:
    >>> class Count(Callback):
    ...     def __init__(self):
    ...         self.steps = 0
    ...     def on_batch_end(self, trainer, logs):
    ...         self.steps += 1
    ...         if self.steps == 3:
    ...             trainer.should_stop = True
"""

from __future__ import annotations

import csv
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

__all__ = [
    "Callback",
    "ProgressBar",
    "CSVLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "EarlyStopping",
    "LOGGERS",
    "make_logger",
    "read_log",
]

log = logging.getLogger("imtm")


class Callback:
    """Base class: every hook does nothing. Override the ones you need (see the module docstring)."""

    def on_fit_start(self, trainer) -> None:
        pass

    def on_epoch_start(self, trainer, info: dict) -> None:
        pass

    def on_batch_end(self, trainer, logs: dict) -> None:
        pass

    def on_eval(self, trainer, metrics: dict) -> None:
        pass

    def on_epoch_end(self, trainer, entry: dict) -> None:
        pass

    def on_fit_end(self, trainer) -> None:
        pass

    def state_dict(self) -> dict:
        """JSON-compatible state a checkpoint keeps (``{}``: none)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _label(trainer) -> str:
    stage = trainer.stages[trainer.stage_idx]
    n = f"epoch {trainer.epoch + 1}/{stage.epochs}"
    return f"{stage.name or f'stage {trainer.stage_idx + 1}'} {n}" if len(trainer.stages) > 1 else n


class ProgressBar(Callback):
    """A tqdm bar per epoch with the running mean of each loss, and one line per epoch (main rank only)."""

    def __init__(self):
        self.bar = None

    def on_epoch_start(self, trainer, info: dict) -> None:
        self.bar = tqdm(
            total=trainer.n_batches,
            initial=trainer.batch_idx,
            desc=_label(trainer),
            disable=not trainer.main,
            leave=False,
        )

    def on_batch_end(self, trainer, logs: dict) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if not logs.get("skipped"):
            self.bar.set_postfix(
                {n: f"{s / max(c, 1):.4f}" for n, (s, c) in trainer.epoch_logs.items()}
            )

    def on_epoch_end(self, trainer, entry: dict) -> None:
        self._close()
        if trainer.main:
            losses = " ".join(f"{k[5:]}={v:.4f}" for k, v in entry.items() if k.startswith("loss/"))
            ev = f" rsum={entry['eval']['rsum']:.2f}" if "eval" in entry else ""
            tqdm.write(f"[imtm] {_label(trainer)}: {losses}{ev} ({entry['time_s']:.1f}s)")

    def on_fit_end(self, trainer) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------- CSV
STEP_LOG = "steps.csv"
EPOCH_LOG = "epochs.csv"


def _is_ours(path: Path) -> bool:
    """Whether ``path`` is absent or a log imtm wrote (its header's first column is ``step`` or ``stage``)."""
    if not path.exists():
        return True
    if not path.is_file() or path.is_symlink():
        return False
    with open(path, encoding="utf-8", newline="") as f:
        head = f.readline()
    return head.split(",")[0].strip() in ("step", "stage")


class CSVLogger(Callback):
    """A row per step in ``steps.csv`` and a row per epoch in ``epochs.csv`` of the run folder.

    Args:
        folder: where the files go; ``None``: the run folder (the Matcher's ``checkpoint_dir``),
            and no files without one.

    The step log's columns are fixed when ``fit`` starts: ``step, stage, epoch, batch``, a
    ``loss/<block>`` per loss block, an ``lr/<group>`` per parameter group of any stage,
    ``grad_norm, samples, samples_per_s, time_s, skipped``. A resumed run first drops the rows
    of steps after its checkpoint (the interrupted run's), so each step has exactly one row.
    A file of that name that imtm did not write is left alone (with a warning, and no log).
    Read the files with :func:`read_log` (or ``pandas.read_csv``).
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = folder
        self.file = None
        self.writer = None

    def on_fit_start(self, trainer) -> None:
        self.file = self.writer = None
        folder = self.folder if self.folder is not None else trainer.run_dir
        if folder is None or not trainer.main:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path, self.epoch_path = folder / STEP_LOG, folder / EPOCH_LOG
        for p in (self.path, self.epoch_path):
            if not _is_ours(p):
                warnings.warn(
                    f"CSVLogger: {p} exists and was not written by imtm; it is left alone and this run "
                    "writes no CSV log there",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return
        self.columns = (
            ["step", "stage", "epoch", "batch"]
            + [f"loss/{n}" for n in trainer.loss_names()]
            + [f"lr/{g}" for g in trainer.group_names()]
            + ["grad_norm", "samples", "samples_per_s", "time_s", "skipped"]
        )
        kept = []
        if (
            trainer.global_step > 0 and self.path.exists()
        ):  # resumed: keep the rows up to the checkpoint's step
            kept = [
                r
                for r in read_log(self.path, numbers=False)
                if int(r["step"]) <= trainer.global_step
            ]
        self.file = open(self.path, "w", encoding="utf-8", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.file.flush()
        self._write_epochs(trainer.history)

    def on_batch_end(self, trainer, logs: dict) -> None:
        if self.writer is not None:
            self.writer.writerow(
                {k: (int(v) if isinstance(v, bool) else v) for k, v in logs.items()}
            )
            self.file.flush()

    def on_epoch_end(self, trainer, entry: dict) -> None:
        if self.writer is not None:
            self._write_epochs(trainer.history)

    def on_fit_end(self, trainer) -> None:
        if self.file is not None:
            self.file.close()
            self.file = self.writer = None

    def _write_epochs(self, history: list[dict]) -> None:
        rows = [_flat(h) for h in history]
        columns: list[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        # Rewritten whole from history_ (a resumed run rewrites it from its checkpoint's history).
        with open(self.epoch_path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns or ["stage"])
            w.writeheader()
            w.writerows(rows)

    def __del__(self):
        if getattr(self, "file", None) is not None:
            self.file.close()


def _flat(entry: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in entry.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_log(path: str | os.PathLike, *, numbers: bool = True) -> list[dict]:
    """The rows of a CSV log (``steps.csv``, ``epochs.csv``, or a run folder: its ``steps.csv``).

    Args:
        numbers: convert numeric cells to ``int`` / ``float`` (empty cells to ``None``).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "steps.csv"
        >>> _ = p.write_text("step,loss/nce,skipped\\n1,0.5,0\\n2,,1\\n")
        >>> read_log(p)
        [{'step': 1, 'loss/nce': 0.5, 'skipped': 0}, {'step': 2, 'loss/nce': None, 'skipped': 1}]
    """
    path = Path(path)
    if path.is_dir():
        path = path / STEP_LOG
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not numbers:
        return rows

    def number(v: str):
        if v == "":
            return None
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    return [{k: number(v) for k, v in r.items()} for r in rows]


# ---------------------------------------------------------------------------- TensorBoard, W&B
def _scalars(logs: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in logs.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and k not in ("step", "stage", "epoch", "batch")
        and math.isfinite(float(v))
    }


class TensorBoardLogger(Callback):
    """Every step's scalars and the evaluation metrics to TensorBoard (``torch.utils.tensorboard``).

    Needs the optional package ``tensorboard``. Args: ``log_dir``: ``None``: ``<run folder>/tensorboard``
    (and nothing without a run folder).
    """

    def __init__(self, log_dir: str | os.PathLike | None = None):
        self.log_dir = log_dir
        self.writer = None

    def on_fit_start(self, trainer) -> None:
        folder = (
            self.log_dir
            if self.log_dir is not None
            else (None if trainer.run_dir is None else Path(trainer.run_dir) / "tensorboard")
        )
        if folder is None or not trainer.main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "TensorBoardLogger needs the optional package tensorboard (pip install tensorboard)"
            ) from err
        # A resumed run drops the events after its checkpoint's step.
        self.writer = SummaryWriter(
            log_dir=os.fspath(folder), purge_step=trainer.global_step or None
        )

    def on_batch_end(self, trainer, logs: dict) -> None:
        if self.writer is not None:
            for k, v in _scalars(logs).items():
                self.writer.add_scalar(k, v, logs["step"])

    def on_eval(self, trainer, metrics: dict) -> None:
        if self.writer is not None:
            for k, v in _scalars(metrics).items():
                self.writer.add_scalar(f"eval/{k}", v, trainer.global_step)
            self.writer.flush()

    def on_fit_end(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbLogger(Callback):
    """Every step's scalars and the evaluation metrics to Weights & Biases.

    Needs the optional package ``wandb``. ``init_kwargs`` go to ``wandb.init`` (``project``,
    ``mode="offline"`` for a run kept on disk, ...); the run's directory defaults to the run folder.
    """

    def __init__(self, **init_kwargs: Any):
        self.init_kwargs = init_kwargs
        self.run = None

    def on_fit_start(self, trainer) -> None:
        if not trainer.main:
            return
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                "WandbLogger needs the optional package wandb (pip install wandb)"
            ) from err
        kwargs = dict(self.init_kwargs)
        if trainer.run_dir is not None:
            kwargs.setdefault("dir", os.fspath(trainer.run_dir))
        kwargs.setdefault("config", trainer.model.get_config()["params"])
        self.run = wandb.init(**kwargs)

    def on_batch_end(self, trainer, logs: dict) -> None:
        if self.run is not None:
            self.run.log(_scalars(logs), step=logs["step"])

    def on_eval(self, trainer, metrics: dict) -> None:
        if self.run is not None:
            self.run.log(
                {f"eval/{k}": v for k, v in _scalars(metrics).items()}, step=trainer.global_step
            )

    def on_fit_end(self, trainer) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


#: What ``Matcher(loggers=...)`` names select.
LOGGERS = {"csv": CSVLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger}


def make_logger(spec: Any) -> Callback:
    """A logger from a ``loggers=`` entry: a name in :data:`LOGGERS` or a :class:`Callback`."""
    if isinstance(spec, Callback):
        return spec
    if isinstance(spec, str) and spec in LOGGERS:
        return LOGGERS[spec]()
    from imtm.component import suggest

    raise ValueError(
        f"Matcher: unknown logger {spec!r}; give names from {sorted(LOGGERS)} or Callback instances."
        + (suggest(spec, list(LOGGERS)) if isinstance(spec, str) else "")
    )


# ---------------------------------------------------------------------------- early stopping
class EarlyStopping(Callback):
    """Stop when an evaluation metric has not improved for ``patience`` evaluations.

    Args:
        monitor: a key of the evaluation metrics (``"rsum"``, ``"t2i_r1"``, ...).
        patience: evaluations without improvement before stopping.
        min_delta: the least change that counts as an improvement.
        mode: ``"max"`` (higher is better, the retrieval metrics) or ``"min"``.

    Its state (best value, evaluations since) is kept in checkpoints, so a resumed run stops
    where the uninterrupted one would. ``Matcher(keep_best=True)`` (the default) then ends the
    fit with the best epoch's weights.
    """

    def __init__(
        self, monitor: str = "rsum", patience: int = 3, min_delta: float = 0.0, mode: str = "max"
    ):
        if mode not in ("max", "min"):
            raise ValueError(f"EarlyStopping: mode must be 'max' or 'min', got {mode!r}")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(
                f"EarlyStopping: patience must be a positive integer, got {patience!r}"
            )
        self.monitor, self.patience, self.min_delta, self.mode = (
            monitor,
            patience,
            float(min_delta),
            mode,
        )
        self.best: float | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    def on_fit_start(self, trainer) -> None:
        if trainer.eval_set is None:
            raise ValueError("EarlyStopping needs an eval_set: fit(train, eval_set, ...)")

    def on_eval(self, trainer, metrics: dict) -> None:
        if self.monitor not in metrics:
            raise KeyError(
                f"EarlyStopping: monitor {self.monitor!r} is not among the evaluation metrics "
                f"{sorted(metrics)}"
            )
        value = float(metrics[self.monitor])
        better = self.best is None or (
            value > self.best + self.min_delta
            if self.mode == "max"
            else value < self.best - self.min_delta
        )
        if better:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            trainer.should_stop = True
            self.stopped_epoch = len(trainer.history) + 1
            log.info(
                "early stopping: %s has not improved for %d evaluations (best %s)",
                self.monitor,
                self.wait,
                self.best,
            )

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait, self.stopped_epoch = (
            state["best"],
            state["wait"],
            state["stopped_epoch"],
        )
