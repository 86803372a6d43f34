"""What hooks see: the training state, the view of the trainer they may use, the order
in which hooks run, and the package logger.

This module imports nothing else of the package at run time, so every other module can
use it: hooks are typed against `TrainerView`, never against the `Trainer` class, and
`hooks.py` does not import `trainer.py`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .distributed import Distributed
    from .evaluation import Evaluator
    from .means import Mean
    from .precision import Precision
    from .summary import SummaryRecord, SummarySink

__all__ = ["Priority", "TrainState", "TrainerView", "logger"]

logger = logging.getLogger("lossless_trainer")


@dataclass
class TrainState:
    """Where training stands. Returned by `Trainer.fit`.

    Attributes:
        step: Optimizer steps completed.
        epoch: Epochs completed.
        batch_in_epoch: Batches consumed in the current epoch.
        stop_reason: Why `fit` ended: ``"max_steps"``, ``"max_epochs"``,
            ``"data_exhausted"`` (a one-shot iterator ran out), or the reason given to
            `Trainer.request_stop`. None while running.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    stop_reason: str | None = None


class Priority:
    """The order hooks run in at every point: ascending `Hook.priority`, then as given.

    The built-in hooks depend on this order, and so may yours:

    0. (10) the record of a non-finite failure (no hook method) or, in a replay,
       the check of every step (nonfinite.py): before anything reads the step.
    1. `DEFAULT` (50): your hooks. They run before every built-in hook, so what they
       write with `write_summary` in `after_step` lands in the flush of the same step.
    2. `EVALUATION` (80): evaluates. It comes before the hooks that read
       ``trainer.last_eval`` (early stopping, the best checkpoint) so they see this
       step's results, and before logging so the ``eval/`` scalars are in this step's
       flush (a step that evaluates is always flushed).
    3. `EARLY_STOPPING` (85): reads ``last_eval`` and may request a stop, which takes
       effect after the step.
    4. `LOGGING` (90): stores the step's losses and flushes the window to the writers.
       Everything written during the step must be in by then.
    5. `BEST_CHECKPOINT` (91) and `CHECKPOINT` (92): save after the flush. A checkpoint
       taken at a flushed step holds an empty window, and `save_checkpoint` puts the
       logs on disk up to its step first; a run resumed from it drops what was logged
       after, so no step is written twice. (A periodic checkpoint at a step that is not
       flushed keeps its pending window, which the resumed run continues.)
    6. `PROGRESS` (95): last, so the bar shows the flush of this very step.

    To read this step's flush (``trainer.last_summary``) in `after_step`, use a priority
    above `LOGGING` (under torchrun, at a flush that brings a tag new to the run, such
    as the first evaluation's, it is still the previous flush there: the ranks agree on
    the new tag at the next step); to read this step's evaluation, one between
    `EVALUATION` and `LOGGING`.
    """

    DEFAULT = 50
    EVALUATION = 80
    EARLY_STOPPING = 85
    BEST_CHECKPOINT = 91
    LOGGING = 90
    CHECKPOINT = 92
    PROGRESS = 95


class TrainerView(Protocol):
    """Every member of the trainer (`TrainerBase`: a `Trainer` or a custom trainer) a
    hook may use. The built-in hooks use nothing else.

    Hooks receive the trainer itself (no proxy on the step path), typed as this view:
    what is listed here is public and stable; anything else is the trainer's own.
    Of the values marked "this step", `batch` and `micro_batches` are set before
    `before_step`, the losses after the step's backward (from `after_backward` on
    they are the step's); all are kept until the next step, and `batch` is None once
    `fit` has ended.

    Attributes:
        state: Counters: `step` (optimizer steps done), `epoch`, `batch_in_epoch`, and
            `stop_reason` once `fit` ends.
        model: The model as you passed it, on its device (compiled in place with
            ``compile=True``; a DDP wrapper is kept apart, so this is your module).
        optimizer: The `Trainer`'s optimizer, or its list or dict of them (a custom
            trainer's, or None).
        optimizers: Every optimizer by name: a list's ``"0"``, ``"1"``...; a dict's
            keys; the single optimizer's name is ``""``. Their learning rates are
            logged at each flush as ``lr/<name>`` (the single one's as ``lr``). A
            custom trainer sets it to have its own logged (default: empty; then a
            single `optimizer`'s are).
        lr_scheduler: The scheduler, or its list or dict (as `optimizer`), or None.
        precision: The precision policy: `mode`, and `skipped_steps` (fp16: steps the
            GradScaler skipped so far, a device tensor).
        device: The device this process trains on.
        dist: Where this process runs: `enabled`, `rank`, `world_size`, `local_rank`,
            `is_main`, `strategy`, and `any(flag)` (whether a flag is true on any rank;
            a collective, so every rank must call it).
        data: The training data, as iterated (under torchrun, a DataLoader rebuilt
            with a `DistributedSampler`).
        log_dir: The run directory.
        checkpoint_dir: Where checkpoints go (``<log_dir>/checkpoints``).
        checkpoint_format: ``"full"`` (one file each) or ``"sharded"`` (one directory
            each), as the Trainer resolved its option.
        batch: This step's last micro-batch, as the data yielded it.
        micro_batches: Every micro-batch of this step.
        losses: The losses the model returned for `batch`: device tensors, not synced,
            and `Mean` terms as returned (``.total``, ``.count``).
        micro_losses: The losses of every micro-batch of this step.
        total_loss: The sum of `losses`, a `Mean` counted as its batch mean
            (``total / count``): a device tensor.
        last_summary: The latest flushed `SummaryRecord` (scalars as plain floats).
        last_published: The latest record handed to the writers: `last_summary`,
            except that under torchrun it does not wait for the record of a flush whose
            windows are still being combined (until the next step).
        last_eval: The latest `evaluate` results, or None.
        resumed_from: The checkpoint this run resumed from, or None.
        exception: During `on_exception` and `after_train`, the error `fit` raises.
        sink: The run's summary sink. Hooks write with `write_summary`; the logging
            hook also uses `put_scalar`, `put_mean`, `put`, `flush_due`, `pending` and
            `flush`.
    """

    state: TrainState
    model: nn.Module
    optimizer: Any
    optimizers: Mapping[str, torch.optim.Optimizer]
    lr_scheduler: Any
    precision: Precision
    device: torch.device
    dist: Distributed
    data: Iterable[Any]
    log_dir: str
    checkpoint_dir: str
    checkpoint_format: str
    batch: Any
    micro_batches: Sequence[Any]
    losses: dict[str, torch.Tensor | Mean]
    micro_losses: list[dict[str, torch.Tensor | Mean]]
    total_loss: torch.Tensor | None
    last_summary: SummaryRecord | None
    last_published: SummaryRecord | None
    last_eval: dict[str, float] | None
    resumed_from: str | None
    exception: BaseException | None
    sink: SummarySink

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps `fit` will run in all, when known."""
        ...

    @property
    def stop_requested(self) -> bool:
        """Whether a hook or a signal asked training to stop after the current step."""
        ...

    def request_stop(self, reason: str = "requested") -> None:
        """End `fit` after the current step (under torchrun: every rank, at the step of
        the next flush; at this step's if asked before the logging hook's turn)."""
        ...

    def evaluate(self, data: Iterable[Any] | None = None,
                 evaluators: Sequence[Evaluator] | None = None) -> dict[str, float]:
        """Evaluate the model (see `Trainer.evaluate`); every rank must call it."""
        ...

    def save_checkpoint(self, path: str | os.PathLike[str], keep_last: int | None = None
                        ) -> None:
        """Write a checkpoint atomically (see `Trainer.save_checkpoint`)."""
        ...

    def wait_for_checkpoint(self) -> None:
        """Block until a checkpoint written in the background is on disk."""
        ...

    def publish(self, record: SummaryRecord) -> None:
        """Hand a flushed record to the writers and make it `last_summary`."""
        ...

    def publish_later(self, publish: Callable[[bool], None] | None) -> None:
        """A record still being combined across ranks: `publish(everywhere)` publishes
        it (`everywhere`: every rank calls it at this point)."""
        ...
