"""The Trainer: the wiring, the fit loop, the one training step, evaluation, and the
state that a checkpoint holds.

Everything else has a module of its own with a narrow interface (see
docs/architecture.md): options.py checks the options and builds the optimizer,
resume.py owns the data position and the RNG, hooks.py does everything around the step,
summary.py and writers.py carry summaries to disk, distributed.py talks to the other
ranks, checkpoint.py reads and writes files.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from . import sharded
from .checkpoint import (
    FORMAT_VERSION,
    BackgroundSaver,
    prune_checkpoints,
    save_atomic,
    stage_to_cpu,
)
from .data import is_one_shot, length, micro_batch_groups, move_to_device
from .distributed import Distributed
from .errors import ModelOutputError, NonFiniteLossError
from .evaluation import Evaluator, as_evaluator, merge_results, run_evaluation
from .hooks import Hook, HookList, builtin_hooks
from .means import Mean, Normaliser
from .model import call_failed, check_losses
from .options import (
    build_optimizer,
    build_scheduler,
    check_options,
    check_strategy,
    epoch_limit,
    fresh_run_dir,
    planned_steps,
    step_limit,
)
from .precision import Precision
from .prefetch import DevicePrefetch
from .relayout import batch_change
from .resume import (
    DataCursor,
    compare_optimizers,
    optimizer_record,
    resume_from_checkpoint,
    seed_everything,
    stop_on_signals,
    termination_signal,
)
from .rundir import claim_run_dir
from .state import TrainState, logger
from .summary import SummaryRecord, SummarySink
from .writers import BackgroundWriter, Writer, WriterFactory, check_writers, open_writers

__all__ = ["TrainState", "Trainer"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Trainer:
    """Trains a model that returns its own losses.

    The only assumptions made here: the model, in training mode, maps a batch to a dict of
    scalar losses; training runs in a loop over an iterable of batches; one optimizer
    updates the parameters. The trainer never splits a batch into inputs and labels,
    never sees predictions, and never applies a loss function. Logging, progress and any
    other behaviour hang on hooks (`Hook`), called around `run_step`.

    Args:
        model: An `nn.Module` honouring the contract (see `Model`). Moved to `device`.
        data: Any iterable of batches: a DataLoader, a list, a generator. Each batch is
            moved to the device and passed whole to ``model(batch)``.
        optimizer: An optimizer over the model's parameters, or a factory called with
            ``model.parameters()``. Default: ``torch.optim.AdamW`` with lr 1e-3.
        max_steps: Stop after this many optimizer steps, running as many epochs as it takes.
        max_epochs: Stop after this many passes over `data`. Without either limit, one
            epoch. With both, whichever comes first. A one-shot iterator (a generator)
            allows at most one epoch; without `max_epochs` it is consumed until exhausted.
        log_dir: Run directory for event files and ``metrics.jsonl``. Default: a fresh
            ``runs/<date>-<time>`` under the current directory.
        log_every: Flush summaries every this many steps; each scalar is written once per
            flush as its mean over the window.
        seed: Seeds Python, NumPy and torch (all devices) when `fit` starts: dropout,
            shuffling and sampling in the run. The model's initial weights are drawn
            when you build it, before the Trainer exists: call ``torch.manual_seed``
            first for reproducible weights. Under torchrun, rank r uses ``seed + r``.
        device: Where to train. Default: CUDA if available, else CPU.
        callbacks: Extra `Hook`s.
        writers: More places for summaries, next to TensorBoard and ``metrics.jsonl``
            (a W&B or MLflow writer, say), written from rank 0 only, on the background
            writer thread. Each is a writer (an object with ``write(record)`` and
            ``close()``, optionally ``flush()``), which the trainer flushes but leaves
            open, or a factory ``factory(log_dir, start_step)`` returning one, called on
            rank 0 whenever the writers open (each `fit`, a standalone `evaluate`) and
            closed with them. See `make_writers` for `start_step`.
        progress: Show a progress bar (plain lines when stdout is not a terminal).
        finite_check: ``"flush"`` (default) checks losses for NaN/Inf on the device and
            raises at the next flush, with no per-step sync. ``"step"`` checks every step
            before the optimizer step (one sync per step), so a non-finite loss never
            updates the weights.
        precision: ``"32"``, ``"bf16"`` or ``"fp16"``. Autocast covers the forward, and
            so the model's own loss computation; fp16 adds a GradScaler.
        grad_accum_steps: Micro-batches per optimizer step; each one's plain losses are
            scaled by 1/N, and each `Mean` term by the step's whole count of its key
            (which needs the model's ``count_items(batch)``). A "step" everywhere
            (`max_steps`, `log_every`, checkpoints) is an optimizer step. An epoch's
            leftover micro-batches make one shorter step.
        clip_grad_norm: Clip the gradients' total norm to this, after unscaling. The norm
            before clipping is logged as ``grad_norm``.
        clip_grad_value: Clip each gradient element to ``[-x, x]``, after unscaling.
        lr_scheduler: A scheduler over `optimizer`, or a factory called with the
            optimizer. Stepped once per optimizer step; its state is checkpointed.
        compile: Compile the model with `torch.compile` (in place, via
            `nn.Module.compile`, so checkpoints keep their keys). A dict is passed to it
            as options, e.g. ``{"mode": "max-autotune"}``. `write_summary` inside the
            compiled forward works: each call is a graph break and runs eagerly.
        eval_data: Batches for `evaluate`; with it, `fit` evaluates every `eval_every`
            steps and once more when training ends.
        eval_every: Steps between evaluations during `fit`.
        evaluators: `Evaluator`s (e.g. `Accuracy`, `MeanSquaredError`) that `evaluate`
            runs by default.
        checkpoint_every: Save a checkpoint every this many steps. A checkpoint is always
            saved when training ends without an error (including on SIGTERM/SIGINT).
        keep_last: Checkpoints to keep in ``<log_dir>/checkpoints/``. ``0`` writes none
            (an existing one is still resumed from).
        async_checkpoint: Write checkpoints on a background thread: the step waits only
            while the state is copied to the CPU. A save waits for the one before it,
            and `fit` waits for the last before it returns (after a SIGTERM too). A
            kill during a write leaves the previous checkpoint as the newest valid one.
        checkpoint_format: ``"full"``: one file per checkpoint, written by rank 0 (under
            FSDP the full state is gathered to its CPU first). ``"sharded"``: one
            directory per checkpoint, every rank writing its own shards in parallel with
            ``torch.distributed.checkpoint``, complete once its marker is written last.
            ``"auto"`` (default): sharded under FSDP, full otherwise. Either resumes on
            another number of processes; see docs/checkpoints.md.
        resume: ``"auto"`` continues from the newest valid checkpoint in the run directory
            if there is one, else starts fresh. ``False`` starts fresh (and refuses a run
            directory that already holds checkpoints). A path resumes from that file.
        handle_signals: During `fit`, turn the first SIGTERM or SIGINT into a clean stop:
            the current step finishes, a checkpoint is saved, summaries are flushed, and
            `fit` returns with ``stop_reason`` set to the signal's name. A second SIGINT
            aborts at once. Only in the main thread.
        strategy: Under torchrun: ``"auto"`` or ``"ddp"`` wraps the model in
            DistributedDataParallel; ``"fsdp"`` shards it with FSDP2's ``fully_shard``.
            A single process (no torchrun) ignores it and trains plainly.
        find_unused_parameters: Passed to DistributedDataParallel. Needed when some
            parameters get no gradient on some steps (an optional loss, an unused head).
        fsdp_units: With ``strategy="fsdp"``: sub-modules to shard as units of their own
            (module classes such as a transformer block, or a predicate on modules);
            the root is always sharded. Default: the root only.
        batch_size: ``batch_size(batch)``, the number of samples in a batch, for
            ``perf/samples_per_sec``; returning None stops counting. Default: inferred
            (the leading dimension of the first tensor; the number of images of
            torchvision's ``(images, targets)``); a batch it cannot read logs no
            ``samples_per_sec`` rather than a wrong one.
        prefetch: On CUDA, copy each batch to the device on a side stream as it is
            taken (pinned first unless the loader pins it), so the copy overlaps the
            previous step and the step waits on the device, not the host; batches are
            taken when they would be anyway, so resume stays exact. ``"auto"``
            (default): on CUDA devices; False: copy on the step's stream. Nothing
            changes on CPU. See docs/performance.md.

    Under ``torchrun --nproc_per_node=N`` the same call trains data-parallel: each rank
    uses its own device, a map-style DataLoader is re-created with a
    `DistributedSampler`, scalars are averaged across ranks at each flush, and rank 0
    alone writes logs and checkpoints. See docs/distributed.md.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        *,
        optimizer: torch.optim.Optimizer | OptimizerFactory | None = None,
        max_steps: int | None = None,
        max_epochs: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        log_every: int = 50,
        seed: int | None = None,
        device: str | torch.device | None = None,
        callbacks: Sequence[Hook] = (),
        writers: Sequence[Writer | WriterFactory] = (),
        progress: bool = True,
        finite_check: Literal["flush", "step"] = "flush",
        precision: Literal["32", "bf16", "fp16"] = "32",
        grad_accum_steps: int = 1,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        lr_scheduler: LRScheduler | Callable[[torch.optim.Optimizer], LRScheduler] | None = None,
        compile: bool | dict[str, Any] = False,  # noqa: A002 - the option's natural name
        eval_data: Iterable[Any] | None = None,
        eval_every: int | None = None,
        evaluators: Sequence[Evaluator] = (),
        checkpoint_every: int | None = None,
        keep_last: int = 3,
        async_checkpoint: bool = False,
        checkpoint_format: Literal["auto", "full", "sharded"] = "auto",
        resume: Literal["auto", False] | str | os.PathLike[str] = "auto",
        handle_signals: bool = True,
        strategy: Literal["auto", "ddp", "fsdp"] = "auto",
        find_unused_parameters: bool = False,
        fsdp_units: Sequence[type[nn.Module]] | Callable[[nn.Module], bool] | None = None,
        batch_size: Callable[[Any], int | None] | None = None,
        prefetch: bool | Literal["auto"] = "auto",
    ) -> None:
        check_options(model, data, max_steps=max_steps, max_epochs=max_epochs,
                      log_every=log_every, checkpoint_every=checkpoint_every,
                      grad_accum_steps=grad_accum_steps, eval_every=eval_every,
                      eval_data=eval_data, clip_grad_norm=clip_grad_norm,
                      clip_grad_value=clip_grad_value, keep_last=keep_last, resume=resume,
                      finite_check=finite_check, compile=compile, batch_size=batch_size,
                      async_checkpoint=async_checkpoint,
                      checkpoint_format=checkpoint_format, prefetch=prefetch)
        self.extra_writers = check_writers(writers)
        self.dist = Distributed.setup(device, strategy)
        check_strategy(self.dist.strategy, optimizer, precision)
        self.device = self.dist.device

        # What trains, and how.
        self.model = model.to(self.device)
        if compile:
            self.model.compile(**(compile if isinstance(compile, dict) else {}))
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        # What the step calls: the DDP wrapper, or the model itself. `self.model` stays
        # the user's module, so checkpoints have the same keys with or without torchrun.
        self._train_model = self.dist.wrap(self.model, find_unused_parameters, fsdp_units)
        # Looked up once: a missing attribute of an nn.Module costs an exception each time.
        self._wrapped_no_sync = getattr(self._train_model, "no_sync", None)
        # Whether the backward all-reduces gradients, which accumulation can skip.
        self._syncs_gradients = self.dist.enabled or self._wrapped_no_sync is not None
        self.optimizer = build_optimizer(optimizer, self.model)
        # What it was built with, before a scheduler changes lr: checkpoints keep it, and
        # a resume compares it with the checkpoint's (resume.compare_optimizers).
        self._optimizer_record = optimizer_record(self.optimizer)
        self.precision = Precision(precision, self.device)
        self.lr_scheduler = build_scheduler(lr_scheduler, self.optimizer)
        self.grad_accum_steps = grad_accum_steps
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.finite_check = finite_check
        self._clipping = clip_grad_norm is not None or clip_grad_value is not None
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._model_name = type(model).__name__
        # Divides each `Mean` term by the step's count over every micro-batch and rank.
        self._means = Normaliser(model, self.dist, self._model_name)

        # The data, how long to train, and where training stands in it.
        data, self._data_sharded = self.dist.shard(data, seed if seed is not None else 0)
        self.max_steps = max_steps
        self.max_epochs = epoch_limit(max_epochs, max_steps, data)
        check_first = None
        if self.dist.enabled and not self._data_sharded:  # the user shards: check it
            def check_first(batch: Any) -> None:
                self.dist.check_first_batch(batch, self.state.step + 1)
        self.cursor = DataCursor(data, check_first, self.dist.rank, self.dist.world_size)
        # On CUDA, each batch is copied to the device on a side stream as it is taken.
        self._prefetch = DevicePrefetch(self.device, prefetch)
        self.state = TrainState()
        self.seed = seed
        self.resume = resume if resume is False or resume == "auto" else os.fspath(resume)
        self.handle_signals = handle_signals
        self.eval_data = eval_data
        self.evaluators = [as_evaluator(e) for e in evaluators]  # a Metric: TorchMetric

        # Where the run goes. Every rank must agree on the directory: rank 0 names it.
        self.log_dir = os.fspath(log_dir) if log_dir is not None \
            else self.dist.on_main(fresh_run_dir)
        self.checkpoint_dir = os.path.join(self.log_dir, "checkpoints")
        self.checkpoint_format = checkpoint_format if checkpoint_format != "auto" \
            else ("sharded" if self.dist.strategy == "fsdp" else "full")
        # With async_checkpoint, checkpoints are written on a thread of their own: rank
        # 0's for full ones, every rank's for sharded ones.
        self._saver = BackgroundSaver() if async_checkpoint else None
        self.log_every = log_every
        # Under torchrun a stop request travels with each flush's gather (`_stopping`).
        self.sink = SummarySink(self.dist.start_reduce_totals if self.dist.enabled else None,
                                stop_requested=lambda: self._stop_request is not None)
        self.hooks = HookList([*builtin_hooks(evaluate=eval_data is not None,
                                              eval_every=eval_every,
                                              checkpoint_every=checkpoint_every,
                                              keep_last=keep_last,
                                              progress=progress and self.dist.is_main,
                                              batch_size=batch_size),
                               *callbacks])
        self._after_backward = self.hooks.bound("after_backward")

        # What hooks read (`TrainerView`). This step's values: `batch` as the data
        # yielded it (already on the device when prefetched), its losses, and every
        # micro-batch of the step with theirs.
        self.batch: Any = None
        self.micro_batches: Sequence[Any] = ()
        self.losses: dict[str, torch.Tensor | Mean] = {}
        self.micro_losses: list[dict[str, torch.Tensor | Mean]] = []
        self._last_total: tuple[torch.Tensor | None, dict[str, Any]] | None = None
        self._last_summary: SummaryRecord | None = None
        self._on_read: Callable[[bool], None] | None = None  # publishes a record in flight
        self.last_eval: dict[str, float] | None = None
        # Set by fit: the open writers, the checkpoint resumed from, the error it raises.
        self.writers: BackgroundWriter | None = None
        self.resumed_from: str | None = None
        self.exception: BaseException | None = None
        self._stop_request: str | None = None
        self._signalled = False  # whether the stop request came from a signal
        self._prepared = False  # whether a fit has seeded and resumed
        self._first_step = 1  # the first step of the current fit

    @property
    def data(self) -> Iterable[Any]:
        """The training data, as iterated (under torchrun, a DataLoader rebuilt with a
        `DistributedSampler`). Assigning new data takes effect at the next epoch."""
        return self.cursor.data

    @data.setter
    def data(self, data: Iterable[Any]) -> None:
        self.cursor.data = data

    @property
    def total_loss(self) -> torch.Tensor | None:
        """The sum of the last micro-batch's losses, a `Mean` counted as its batch mean
        (``total / count``): a device tensor, not synced. Summed when read, so a step
        with `Mean` terms pays nothing for it."""
        if self._last_total is None:
            return None
        total, losses = self._last_total
        for loss in losses.values():
            if type(loss) is Mean:
                total = loss.value if total is None else total + loss.value
        return total

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps `fit` will run in all, when known (for progress and ETA)."""
        return planned_steps(length(self.data), self.grad_accum_steps, self.max_epochs,
                             self.max_steps)

    def request_stop(self, reason: str = "requested") -> None:
        """Ask `fit` to stop after the current step. Hooks call this (early stopping)."""
        self._stop_request = reason

    def _on_signal(self, name: str) -> None:
        """A SIGTERM or SIGINT: a stop request that is also voted on between flushes."""
        self._signalled = True
        self.request_stop(name)

    @property
    def stop_requested(self) -> bool:
        """Whether a hook or a signal asked training to stop after the current step."""
        return self._stop_request is not None

    # -- the loop -------------------------------------------------------------------------

    def fit(self) -> TrainState:
        """Train until `max_steps` or `max_epochs` (see the class docs) or a stop request.

        With ``resume="auto"`` (the default) a run directory holding checkpoints is
        continued from the newest valid one, bit-identically to an uninterrupted run.

        Returns:
            The final `TrainState`. Its `stop_reason` says why training ended; after a
            SIGTERM or SIGINT it is ``"SIGTERM"`` or ``"SIGINT"``, and a checkpoint of
            the last completed step has been saved. Once a SIGTERM stopped a fit, every
            later fit in the process returns at once with ``"SIGTERM"``.

        Raises:
            RunDirectoryInUseError: another run holds `log_dir`; nothing there was read
                or changed.
            RunDirectoryError: `log_dir` is a file or cannot be written.
        """
        if self.dist.enabled and not self.dist.collectives_ok:
            raise RuntimeError("an earlier fit failed on this rank; the other ranks cannot be "
                               "trusted to be in step with it. Restart the job to resume")
        if self.dist.any(termination_signal() is not None):
            return self._after_termination()
        with claim_run_dir(self.log_dir, self.dist):
            return self._fit()

    def _after_termination(self) -> TrainState:
        """A SIGTERM stopped an earlier fit of this process (of any rank's, under
        torchrun): the scheduler wants it gone, so this fit trains nothing."""
        self.state.stop_reason = termination_signal() or "SIGTERM"
        logger.warning("a SIGTERM stopped an earlier fit of this process: fit returns at once "
                       "(stop_reason %r); exit the script, or call "
                       "lossless_trainer.resume.clear_termination() to train again",
                       self.state.stop_reason)
        return self.state

    def _fit(self) -> TrainState:
        """`fit`, with the run directory held."""
        self._prepare_fit()
        hooks, state, sink, cursor = self.hooks, self.state, self.sink, self.cursor
        prefetch = self._prefetch
        before_step, after_step = hooks.bound("before_step"), hooks.bound("after_step")
        distributed, step_limit = self.dist.enabled, self._step_limit
        # The last step is a summary step too, so media written there are kept.
        last_step = self.total_steps or step_limit
        self.model.train()
        self.writers = self._open_writers(state.step)
        with sink.activate(), stop_on_signals(self.handle_signals, self._on_signal):
            try:
                hooks.call("before_train", self)
                while not self._stopping(between_epochs=True):
                    if not cursor.open and state.batch_in_epoch == 0:
                        hooks.call("before_epoch", self)
                    batches = prefetch.batches(cursor.batches(state.epoch,
                                                              state.batch_in_epoch))
                    for group in micro_batch_groups(batches, self.grad_accum_steps):
                        if prefetch.active:  # the step's stream waits for the copies
                            prefetch.ready(group)
                        step = state.step + 1
                        sink.begin_step(step, step % self.log_every == 0 or step == last_step)
                        self.batch, self.micro_batches = group[-1], group
                        for hook in before_step:
                            hook(self)
                        self.micro_losses = self.run_step(group)
                        self.losses = self.micro_losses[-1]
                        state.step = step
                        state.batch_in_epoch += len(group)
                        for hook in after_step:
                            hook(self)
                        # One process has nothing to decide before a request or the limit.
                        if (distributed or self._stop_request is not None
                                or step >= step_limit) and self._stopping(between_epochs=False):
                            break  # the epoch stays open: a later fit continues it
                    else:
                        self._end_epoch()
                if self._on_read is not None:  # the last flush's record, and its NaN check
                    self._on_read(True)
                self._means.check()  # what the count check found since the last flush
            except BaseException as exc:
                first = self._fail(exc)
                if first is exc:
                    raise
                raise first from exc  # the first cause; `exc`, its symptom, chained
            errors = self._finish()
        if errors:
            raise errors[0]
        return self.state

    def _prepare_fit(self) -> None:
        """Before the loop: on the first fit, seed and resume; on every fit, start clean."""
        if not self._prepared:
            self._seed_and_resume(self.resume, set_aside=True)
        # Read at every fit: the limits may have been raised since the last one.
        self._step_limit = step_limit(self.max_steps)
        self._epoch_limit = sys.maxsize if self.max_epochs is None else self.max_epochs
        self.exception = None
        self.state.stop_reason = self._stop_request = self.sink.stop_agreed_at = None
        self._signalled = False
        self._first_step = self.state.step + 1  # a failing model call there is explained

    def _stopping(self, between_epochs: bool) -> bool:
        """Whether `fit` ends here; sets `state.stop_reason`. The one place that decides.

        Under torchrun every rank must stop at the same step, and agreeing must not cost
        every step a collective. A request (a hook's, a signal's) travels with the next
        flush's gather, which every rank makes anyway and which runs while the next step
        does: every rank stops at the step after that flush, the same step in every
        run. A signal is also put to an asynchronous vote every few steps (about 100 ms
        of them: `Distributed.vote_stop`), so a SIGTERM is agreed within about 200 ms
        whatever `log_every` is. Between epochs, where every rank is at once, a
        synchronous vote, so a stop asked in `after_epoch` starts no new epoch.
        """
        state = self.state
        if state.stop_reason is None:
            requested = self._stop_request is not None
            if self.dist.enabled:
                if between_epochs:
                    requested = self.dist.any(requested)
                else:
                    voted = self.dist.vote_stop(self._signalled, state.step)
                    requested = voted or self.sink.stop_agreed_at == state.step
            if requested:
                state.stop_reason = self._stop_request or "stopped on another rank"
            elif state.step >= self._step_limit:
                state.stop_reason = "max_steps"
            elif between_epochs and state.epoch >= self._epoch_limit:
                state.stop_reason = "max_epochs"
        return state.stop_reason is not None

    def _end_epoch(self) -> None:
        """The epoch's data ran out: count the epoch, or end a one-shot iterator's run."""
        self.cursor.end_epoch()
        state = self.state
        if state.batch_in_epoch == 0:
            if state.step > 0 and is_one_shot(self.data):
                if self.max_steps is not None:
                    warnings.warn(
                        f"the data iterator was exhausted after {state.step} steps, before "
                        f"max_steps={self.max_steps}", stacklevel=3,
                    )
                state.stop_reason = "data_exhausted"
                return
            raise ValueError(
                f"data yielded no batches in epoch {state.epoch}; check that the "
                "dataset is not empty (and, for a DataLoader with drop_last=True, that it "
                "holds at least one full batch)"
            )
        state.epoch += 1
        state.batch_in_epoch = 0
        self.hooks.call("after_epoch", self)

    def _fail(self, exc: BaseException) -> BaseException:
        """`fit` is raising `exc`: every hook's `on_exception` and `after_train` run (their
        own failures are logged), then the writers close. Returns what `fit` raises: `exc`,
        unless the last flush found a loss that went NaN or Inf before it (with
        ``finite_check="flush"`` a NaN loss shows first as NaN weights at a checkpoint,
        or as a model's failure on them): the first cause wins."""
        self.exception = exc
        self.batch = None
        if self.dist.enabled:
            # The other ranks may be blocked in a collective this rank will never join:
            # teardown must not start one, so the error surfaces and torchrun stops the job.
            self.dist.collectives_ok = False
            if hasattr(exc, "add_note"):
                exc.add_note(f"[lossless_trainer] on rank {self.dist.rank} of "
                             f"{self.dist.world_size}")
        try:
            self.hooks.teardown("on_exception", self, exc)
            errors = self.hooks.teardown("after_train", self)
            if self._saver is not None:  # a checkpoint being written is of a good step
                try:
                    self._saver.wait()  # this rank's: no collective on a failing rank
                except Exception as error:
                    logger.error("the checkpoint being written failed", exc_info=error)
        finally:
            self._close_writers()
        cause = next((e for e in errors if isinstance(e, NonFiniteLossError)), None)
        named = isinstance(exc, NonFiniteLossError) and exc.first_steps  # names its losses
        if cause is None or named or not isinstance(exc, Exception):
            return exc
        if hasattr(cause, "add_note"):
            cause.add_note("[lossless_trainer] raised instead of the later failure it led "
                           f"to: {type(exc).__name__}: {exc}")
        self.exception = cause
        return cause

    def _finish(self) -> list[BaseException]:
        """`fit` ends normally: every hook's `after_train`, then the writers close.
        Returns the failures, of which `fit` raises the first."""
        self.batch = None
        errors: list[BaseException] = []
        try:
            self.dist.end_votes()
            # A hook that failed here on this rank only has left the others out of step:
            # no more collectives from this rank, so it exits and torchrun stops the job,
            # instead of collectives pairing up wrongly.
            errors = self.hooks.teardown("after_train", self, on_failure=self._stop_collectives)
            try:
                self.wait_for_checkpoint()  # the last one, saved just now, is on disk
            except Exception as exc:
                errors.append(exc)
        finally:
            errors += self._close_writers()
        return errors

    def _stop_collectives(self) -> None:
        self.dist.collectives_ok = False

    # -- summaries ------------------------------------------------------------------------

    def make_writers(self, start_step: int | None) -> BackgroundWriter:
        """The writers summaries go to: TensorBoard, ``metrics.jsonl`` and the `writers`
        option's, on rank 0 (the other ranks' values reach it at each flush). Extension
        point: override to replace the defaults.

        Args:
            start_step: The step training continues from (0 when fresh). Whatever an
                earlier run logged after it is dropped, so no step appears twice. None
                appends and drops nothing (a standalone `evaluate`).
        """
        if not self.dist.is_main:
            return BackgroundWriter([])
        return BackgroundWriter(open_writers(self.log_dir, start_step, self.extra_writers))

    def _open_writers(self, start_step: int | None) -> BackgroundWriter:
        """`make_writers`, agreed on by every rank (a `fit`, a standalone `evaluate`).
        Rank 0 alone opens files and your factories' connections: if it fails, every
        rank raises, so none waits in a collective."""
        try:
            writers = self.make_writers(start_step)
        except Exception:
            self.dist.any(True)  # tell the other ranks, then raise here
            raise
        if self.dist.any(False):  # another rank could not open its writers
            writers.close()
            raise RuntimeError("rank 0 could not open the summary writers (its error is "
                               "in its log); every rank stops")
        return writers

    @property
    def last_summary(self) -> SummaryRecord | None:
        """The latest flushed `SummaryRecord`. Under torchrun, read at the step of its
        flush it waits for the ranks' windows to be combined (otherwise done while the
        next step runs)."""
        if self._on_read is not None:
            self._on_read(False)  # this rank alone: no collective
        return self._last_summary

    @property
    def last_published(self) -> SummaryRecord | None:
        """The latest record handed to the writers, without waiting for one in flight
        (for the progress bar: under torchrun a record in flight is published at the
        next step)."""
        return self._last_summary

    def publish(self, record: SummaryRecord) -> None:
        """Hand a flushed record to the writers and make it `last_summary`. The logging
        hook calls it at every flush; a record is written once, in step order."""
        self._last_summary = record
        if self.writers is not None:
            self.writers.write(record)

    def publish_later(self, publish: Callable[[bool], None] | None) -> None:
        """A flush's record is still being combined across ranks: `publish(everywhere)`
        completes and publishes it, where `everywhere` says whether every rank calls it
        at this point (then it may start a collective, and raise for a NaN loss). Called
        when `last_summary` is read, before the optimizer steps again, before a
        checkpoint and at the end of the loop. None: it was published."""
        self._on_read = publish

    def _close_writers(self) -> list[BaseException]:
        writers, self.writers = self.writers, None
        try:
            if writers is not None:
                writers.close()
        except Exception as exc:
            logger.error("closing the summary writers failed", exc_info=exc)
            return [exc]
        return []

    # -- the step -------------------------------------------------------------------------

    def run_step(self, batches: Sequence[Any]) -> list[dict[str, Any]]:
        """One optimizer step over `grad_accum_steps` micro-batches. No `.item()`, no sync.

        Each micro-batch's plain losses are scaled by 1/len(batches), so accumulating N
        batches of size B equals one batch of N*B for mean losses; each `Mean` term is
        divided by the step's count of its key (over every micro-batch and rank), so it
        is the global mean. Extension point: hooks see the unscaled gradients in
        `after_backward`, before clipping and the update.

        Returns:
            Each micro-batch's losses, as the model returned them (unscaled).
        """
        step = self.state.step + 1
        count = len(batches)
        means = self._means if self._means.active else None
        if means is not None and means.count_items is not None:
            means.begin(batches, step)  # the counts, and their all-reduce, before any forward
        per_batch = []
        for i, batch in enumerate(batches, 1):
            if i < count and self._syncs_gradients:
                # Until the last micro-batch, forward and backward skip the gradient sync
                # (DDP/FSDP no_sync); the last one all-reduces the accumulated sum.
                with self._no_sync():
                    losses, total = self._forward_backward(batch, step, count, means)
            else:
                losses, total = self._forward_backward(batch, step, count, means)
            per_batch.append(losses)
        if means is not None and (self.sink.flush_due or self.finite_check == "step"):
            means.check()  # count_items against the forwards' counts: one read per flush
        if self._on_read is not None:  # under torchrun, the last flush's record (and its
            self._on_read(True)        # NaN check) lands before the optimizer steps again
        precision = self.precision
        precision.unscale(self.optimizer)
        for hook in self._after_backward:
            hook(self)
        if self._clipping:
            self._clip()
        precision.step(self.optimizer)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._last_total = (total, per_batch[-1])
        return per_batch

    def _forward_backward(self, batch: Any, step: int, count: int, means: Normaliser | None,
                          ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """One micro-batch of `count`: the model's checked losses and the sum of the plain
        ones; the gradient (plain losses scaled by 1/count, `Mean` terms by the step's
        count) is added to the parameters' ``.grad``."""
        batch = move_to_device(batch, self.device)
        precision = self.precision
        try:
            if precision.dtype is None:
                output = self._train_model(batch)
            else:  # autocast covers the forward, and so the model's own loss computation
                with precision.autocast():
                    output = self._train_model(batch)
        except Exception as exc:
            if isinstance(exc, RuntimeError):  # DDP's unused-parameter error, made clear
                explained = self.dist.explain(exc, step, self.model)
                if explained is not exc:
                    raise explained from exc
            if step == self._first_step and not isinstance(exc, ModelOutputError):
                # The first call failing is most often a calling convention: say how the
                # model was called, and which adapter calls it the way it expects.
                raise ModelOutputError(call_failed(self._model_name, batch, step, exc)) from exc
            raise
        losses = check_losses(output, step, self._model_name)
        total = terms = None
        for key, loss in losses.items():
            if type(loss) is Mean:
                if terms is None:
                    terms = {}
                terms[key] = loss
            else:
                total = loss if total is None else total + loss
        if terms is None and means is None:  # plain losses only: the step as it always was
            if self.finite_check == "step":
                self._check_finite(losses, total)
            precision.backward(total / count if count > 1 else total)
            return losses, total
        objective = self._means.objective(total, terms, count, step)
        if self.finite_check == "step":
            self._check_finite(losses, objective)
        precision.backward(objective)
        return losses, total

    def _no_sync(self) -> contextlib.AbstractContextManager[Any]:
        """DDP's `no_sync` (FSDP's equivalent), for all but the last micro-batch: their
        gradients are all-reduced once, with the last one's. Only called when the
        gradients are synced at all (`_syncs_gradients`)."""
        if self.dist.enabled:
            return self.dist.no_sync(self._train_model)
        return self._wrapped_no_sync()  # a model the user wrapped in DDP themselves

    def _clip(self) -> None:
        """Clip the (unscaled) gradients; log their norm before clipping, on the device."""
        if self.clip_grad_value is None:  # clip_grad_norm_ returns the norm before clipping
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad_norm)
        else:
            grads = [p.grad for p in self._params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                         for g in grads]))
            torch.nn.utils.clip_grad_value_(self._params, self.clip_grad_value)
            if self.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad_norm)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor; the norm is already global
            norm = norm.full_tensor()
        self.sink.put_scalar("grad_norm", norm)

    def _check_finite(self, losses: dict[str, Any], total: torch.Tensor) -> None:
        finite = bool(torch.isfinite(total))
        if self.dist.enabled:  # every rank stops together, or the others would hang
            if not self.dist.any(not finite):
                return
        elif finite:
            return
        step = self.state.step + 1
        bad = {key: step for key, loss in losses.items()
               if not bool(torch.isfinite(loss.total if type(loss) is Mean else loss))}
        where = ", ".join(repr(key) for key in bad) or "the total"
        if self.dist.enabled:
            per_rank = self.dist.all_gather(None if finite else sorted(bad))
            where = "; ".join(f"rank {rank}: {', '.join(map(repr, keys)) or 'the total'}"
                              for rank, keys in enumerate(per_rank) if keys is not None)
        raise NonFiniteLossError(
            f"non-finite loss (NaN or Inf) at step {step}: {where}. The optimizer did not "
            "step; the weights are those of the previous step",
            bad,
        )

    # -- evaluation -----------------------------------------------------------------------

    def evaluate(self, data: Iterable[Any] | None = None,
                 evaluators: Sequence[Evaluator] | None = None) -> dict[str, float]:
        """Evaluate the model: eval mode, `torch.inference_mode()`, then its previous mode.

        Each batch's predictions, ``model(batch)``, go to every evaluator. Scalars the
        model writes with `write_summary` meanwhile (a validation loss, say) are averaged
        over the evaluation.

        Args:
            data: Batches to evaluate on. Default: `eval_data`.
            evaluators: Default: the Trainer's `evaluators`.

        Returns:
            The evaluators' keys and the model's averaged summaries, merged. All are
            also written as ``eval/<key>`` summaries at the current step: within `fit`,
            in that step's flush; outside it, as a record of their own.

        Under torchrun every rank must call it: each evaluates the whole data, and rank
        0's results are returned on all ranks.
        """
        data = self.eval_data if data is None else data
        if data is None:
            raise ValueError("evaluate() needs data: pass it, or eval_data= to the Trainer")
        evaluators = self.evaluators if evaluators is None else list(evaluators)
        # Evaluation must not change training: its RNG draws (a DataLoader's seed, random
        # augmentation) are undone, so a run with evaluation trains exactly as one without.
        with self.cursor.rng_kept():
            results, summaries = run_evaluation(self.model, data, evaluators, self.device,
                                                self.precision)
        # Every rank evaluated the same data; rank 0's numbers make every rank decide
        # alike (early stopping, best checkpoint) even if results differ in the last bit.
        self.last_eval = results = merge_results(*self.dist.broadcast((results, summaries)))
        scalars = {f"eval/{key}": value for key, value in results.items()}
        if self.writers is not None:  # within fit: into this step's flush
            for tag, value in scalars.items():
                self.sink.put(tag, value)
            self.sink.request_flush()
        else:
            writers = self._open_writers(None)
            writers.write(SummaryRecord(step=self.state.step, scalars=scalars))
            writers.close()
        return results

    # -- the state a checkpoint holds -----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue as if nothing happened; tensors and plain values.

        Model, optimizer, counters, the RNG states (now, and as the current epoch
        began), the data position, hook states and the pending summary window.

        Under torchrun every rank must call it (it gathers each rank's RNG states, data
        position, hook states and summary window into ``"ranks"`` on rank 0; with FSDP it
        also gathers the full, unsharded model and optimizer state to rank 0). Only rank
        0's result is complete.
        """
        model_state, optimizer_state = self.dist.model_optimizer_state(self.model,
                                                                       self.optimizer)
        return self._state(model_state, optimizer_state)

    def _state(self, model_state: dict[str, Any], optimizer_state: dict[str, Any]
               ) -> dict[str, Any]:
        """`state_dict` around the given model and optimizer states."""
        per_rank = {**self.cursor.state_dict(),  # "rng", "data" and "order"
                    "hooks": self.hooks.state_dict(),
                    "summary": self.sink.state_dict()}
        state = {
            "format": FORMAT_VERSION,
            "trainer": {"step": self.state.step, "epoch": self.state.epoch,
                        "batch_in_epoch": self.state.batch_in_epoch},
            "model": model_state,
            "optimizer": optimizer_state,
            "optimizer_record": self._optimizer_record,
            "lr_scheduler": None if self.lr_scheduler is None else self.lr_scheduler.state_dict(),
            "precision": self.precision.state_dict(),
            "means": self._means.state_dict(),
            # What the global batch was, to warn when a resume on another number of
            # processes changes it.
            "layout": {"world_size": self.dist.world_size,
                       "grad_accum_steps": self.grad_accum_steps,
                       "batch_size": getattr(self.data, "batch_size", None)},
            **per_rank,
        }
        if self.dist.enabled:
            state["world_size"] = self.dist.world_size
            state["ranks"] = self.dist.gather_to_main(per_rank)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (or, with ``"sharded"`` naming a sharded
        checkpoint's directory, its ``trainer.pt``, and the tensors from the directory).
        RNG states and the data position are applied when the next epoch's iteration
        starts in `fit`.

        A checkpoint written by another number of processes is taken as
        docs/checkpoints.md says: model and optimizer resharded, the epoch continued
        from its global position, each rank's RNG carried over or derived.

        Raises:
            ValueError: the checkpoint does not fit this run (another optimizer, or a
                mid-epoch position that cannot be carried to this number of processes).
        """
        other_world = state.get("world_size", 1) != self.dist.world_size
        state = self.dist.own_part(state, self.seed)
        if (state["lr_scheduler"] is None) != (self.lr_scheduler is None):
            raise ValueError("the checkpoint and this run disagree on having an lr_scheduler")
        changes = compare_optimizers(state.get("optimizer_record"), self._optimizer_record,
                                     self.lr_scheduler is not None)
        counters = state["trainer"]
        self.cursor.load_state_dict(state, counters["batch_in_epoch"], other_world)
        if "sharded" in state:
            sharded.load_into(state["sharded"], self.model, self.optimizer,
                              {"model": state["model"], "optimizer": state["optimizer"]},
                              self.dist)
        else:
            self.dist.load_model_optimizer_state(self.model, self.optimizer, state["model"],
                                                 state["optimizer"])
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self._apply_optimizer_changes(changes)
        self.precision.load_state_dict(state["precision"])
        self._means.load_state_dict(state.get("means", {}))
        self.state = TrainState(step=counters["step"], epoch=counters["epoch"],
                                batch_in_epoch=counters["batch_in_epoch"])
        self.hooks.load_state_dict(state["hooks"])
        self.sink.load_state_dict(state["summary"])
        if other_world and self.dist.is_main and "layout" in state:
            change = batch_change(state["layout"], self.dist.world_size,
                                  self.grad_accum_steps, getattr(self.data, "batch_size", None))
            if change is not None:
                warnings.warn(change, stacklevel=4)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Load the checkpoint at `path` (a file or a sharded directory) before `fit`,
        which then continues from it, as `resume` would: verified first, on any number
        of processes. Under torchrun every rank calls it. Newer checkpoints in the run
        directory are left where they are.

        Raises:
            CheckpointError: it cannot be read, fails verification, or does not fit.
        """
        self._seed_and_resume(os.fspath(path), set_aside=False)

    def _seed_and_resume(self, resume: Any, set_aside: bool) -> None:
        """Resume as `resume` says (`resume_from_checkpoint`); the first time, seed
        before and check the data after."""
        first = not self._prepared
        if first and self.seed is not None:
            # Each rank draws its own dropout masks and augmentations; DDP and FSDP
            # start every rank from rank 0's weights whatever the seed.
            seed_everything(self.seed + self.dist.rank)
        self.resumed_from = resume_from_checkpoint(resume, self.checkpoint_dir, self.dist,
                                                   self.load_state_dict, length(self.data),
                                                   set_aside=set_aside)
        if first:
            self._prepared = True
            self.dist.check_data(self.data, self._data_sharded)

    def _apply_optimizer_changes(self, changes: list[tuple[int, str, Any, Any]]) -> None:
        """This run's hyperparameters win over the checkpoint's (its state, such as
        momentum buffers, is kept); each change is listed in a warning. Implementation
        flags (``foreach``, ``fused``, ...) stay the checkpoint's, as
        ``Optimizer.load_state_dict`` leaves them: its state was laid out for them."""
        groups = self.optimizer.param_groups
        for index, key, _, new in changes:
            groups[index][key] = new
        if changes:
            listed = "; ".join(f"group {index} {key}: {old!r} -> {new!r}"
                               for index, key, old, new in changes)
            warnings.warn(f"this run's optimizer hyperparameters differ from the checkpoint's, "
                          f"and this run's are used: {listed}", stacklevel=3)

    def save_checkpoint(self, path: str | os.PathLike[str], keep_last: int | None = None
                        ) -> None:
        """Write a checkpoint to `path`: with ``checkpoint_format="full"`` the file of
        `state_dict`, atomically (a crash leaves the old file or the new one, never a
        partial one); with ``"sharded"`` a directory every rank writes its shards to,
        complete once its marker is written last. Under torchrun every rank calls it,
        and no rank returns before the checkpoint is complete, or with
        ``async_checkpoint``, before its state is copied to the CPU for the background
        write (`wait_for_checkpoint` waits for it).

        Within `fit`, everything flushed so far is put on disk first, so the logs reach
        exactly the checkpoint's step: a run resumed from it drops what was logged after.

        Args:
            path: The file (or, sharded, the directory) to write.
            keep_last: Once it is complete, delete all but the newest `keep_last`
                checkpoints of its directory (never this one).
        """
        if self._on_read is not None:  # the record of the flush before: on disk too
            self._on_read(True)
        if self.writers is not None:  # rank 0's; a background error is raised on every rank
            self.dist.on_main(self.writers.flush)
        self._means.check()  # a checkpoint does not carry a miscount past its step
        path = os.fspath(path)

        def written() -> None:
            if keep_last is not None:
                prune_checkpoints(os.path.dirname(path), keep_last, just_saved=path)
            logger.info("saved checkpoint %s", path)

        if self.checkpoint_format == "sharded":
            self._save_sharded(path, written)
            return
        state = self.state_dict()
        # Rank 0 writes; the others wait for its result, and raise its error if it fails.
        if self._saver is None:
            self.dist.on_main(lambda: (save_atomic(state, path), written()))
        else:  # the write before this one must be complete first (its error, every rank's)
            self.dist.on_main(lambda: self._saver.submit(stage_to_cpu(state), path, written))

    def _save_sharded(self, path: str, written: Callable[[], None]) -> None:
        """`save_checkpoint` for the sharded format: DCP writes the tensors (every rank
        its own), rank 0 the rest (``trainer.pt``) and then the completion marker."""
        dist, saver = self.dist, self._saver
        if saver is not None:
            saver.wait()  # every rank's thread: the previous save is complete everywhere
        tensors, rest = sharded.split(*sharded.sharded_state(self.model, self.optimizer))
        small = self._state(rest["model"], rest["optimizer"])
        step = self.state.step
        dist.on_main(lambda: sharded.prepare(path))
        wait = sharded.start_write(tensors, path, dist, background=saver is not None)

        def complete() -> None:
            wait()
            sharded.finish(path, small, step, dist, then=written)

        if saver is None:
            complete()
        else:
            small = stage_to_cpu(small)
            saver.run(complete)

    def wait_for_checkpoint(self) -> None:
        """With ``async_checkpoint``, block until the checkpoint being written is on disk
        (every rank; rank 0's error is raised on all). `fit` does this before it returns."""
        if self._saver is None:
            return
        if self.checkpoint_format == "sharded":
            self._saver.wait()  # every rank's thread ends with the same outcome
        else:
            self.dist.on_main(self._saver.wait)
