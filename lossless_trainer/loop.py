"""TrainerBase: the run of a training loop, without its step.

`Trainer` (trainer.py) is the standard step on top of it; a custom trainer (a GAN's
alternating updates, say) is another: it implements `run_step`, and keeps logging,
checkpoints and exact resume, hooks, evaluation and torchrun. See
docs/custom-trainers.md.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import nn

from .checkpointer import Checkpointer
from .data import length, micro_batch_groups
from .distributed import Distributed
from .evaluation import Evaluator, as_evaluator, evaluate_in_run
from .hooks import Hook, HookList, builtin_hooks
from .logbook import Logbook
from .means import Mean, split_losses
from .nonfinite import nonfinite_hook, replayed
from .options import check_options, epoch_limit, fresh_run_dir, planned_steps
from .precision import Precision
from .prefetch import DevicePrefetch
from .resume import DataCursor, seed_everything
from .rundir import claim_run_dir
from .state import TrainState
from .step import StepPieces
from .stopping import StopControl
from .summary import SummaryRecord
from .writers import BackgroundWriter, Writer, WriterFactory, check_writers, open_writers

__all__ = ["TrainerBase"]


class TrainerBase(StepPieces, ABC):
    """The run of a training loop, without its step.

    The only assumption made here: training runs in a loop, and each step takes
    `grad_accum_steps` batches, on which `run_step` trains. The run around it is this
    class's, each job through a component of its own: the run directory and its lock
    (rundir.py), the loop and the hooks, when to stop (`StopControl`), the
    `write_summary` context and the logging of each step's losses (`Logbook` and the
    logging hook), the data position and the RNG (`DataCursor`), evaluation on
    schedule, checkpoints and resume (`Checkpointer`), and teardown.

    Subclass it and implement `run_step`. A step that owns state (optimizers,
    schedulers, counters) adds it to checkpoints by extending `state_dict` and
    `load_state_dict` with ``super()``. What a step needs: `model` (your module, on
    `device`), `state`, `resumed_from`, and the pieces of `StepPieces`. `Trainer` is the
    standard step; docs/custom-trainers.md writes another.

    Args:
        model: An `nn.Module`, moved to the device; under torchrun wrapped per `strategy`.
        data: Any iterable of batches.

    The other arguments are the loop's options, keyword-only, each as `Trainer` documents
    it (and docs/trainer.md): the step and epoch limits, `log_dir`, `log_every`, `seed`,
    `device`, `callbacks`, `writers`, `progress`, evaluation, checkpoints, `resume`,
    `handle_signals`, `strategy`, `batch_size`, `prefetch`, `grad_accum_steps`.
    """

    # A step's, for hooks (`optimizers`' lr logged as lr/<name>); its state_dict saves them.
    optimizer: Any = None
    lr_scheduler: Any = None
    optimizers: Mapping[str, torch.optim.Optimizer] = MappingProxyType({})

    def __init__(
        self, model: nn.Module, data: Iterable[Any], *, max_steps: int | None = None,
        max_epochs: int | None = None, log_dir: str | os.PathLike[str] | None = None,
        log_every: int = 50, seed: int | None = None, device: str | torch.device | None = None,
        callbacks: Sequence[Hook] = (), writers: Sequence[Writer | WriterFactory] = (),
        progress: bool = True, eval_data: Iterable[Any] | None = None,
        eval_every: int | None = None, evaluators: Sequence[Evaluator] = (),
        checkpoint_every: int | None = None, keep_last: int = 3, async_checkpoint: bool = False,
        checkpoint_format: Literal["auto", "full", "sharded"] = "auto",
        resume: Literal["auto", False] | str | os.PathLike[str] = "auto",
        handle_signals: bool = True, strategy: Literal["auto", "ddp", "fsdp"] = "auto",
        find_unused_parameters: bool = False,
        fsdp_units: Sequence[type[nn.Module]] | Callable[[nn.Module], bool] | None = None,
        batch_size: Callable[[Any], int | None] | None = None,
        prefetch: bool | Literal["auto"] = "auto", grad_accum_steps: int = 1,
    ) -> None:
        check_options(model, data, max_steps=max_steps, max_epochs=max_epochs,
                      log_every=log_every, checkpoint_every=checkpoint_every,
                      grad_accum_steps=grad_accum_steps, eval_every=eval_every,
                      eval_data=eval_data, keep_last=keep_last, resume=resume,
                      batch_size=batch_size, async_checkpoint=async_checkpoint,
                      checkpoint_format=checkpoint_format, prefetch=prefetch)
        self.extra_writers = check_writers(writers)
        self._replay, (log_dir, resume, max_steps, keep_last) = replayed(  # a failed step again
            log_dir, resume, max_steps, keep_last)  # (LOSSLESS_TRAINER_REPLAY): nonfinite.py
        self.dist = dist = Distributed.setup(device, strategy)
        self.device = dist.device
        self.model = model.to(self.device)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        # What a step calls: the DDP wrapper, or the model itself (`self.model` stays yours).
        self._train_model = dist.wrap(self.model, find_unused_parameters, fsdp_units)
        # Looked up once: a missing attribute of an nn.Module costs an exception each time.
        self._wrapped_no_sync = getattr(self._train_model, "no_sync", None)
        self._model_name = type(model).__name__
        self.precision = Precision("32", self.device)  # a step computing otherwise sets its own
        data, self._data_sharded = dist.shard(data, seed if seed is not None else 0)
        self.grad_accum_steps, self.log_every = grad_accum_steps, log_every
        self.max_steps, self.max_epochs = max_steps, epoch_limit(max_epochs, max_steps, data)
        self.cursor = DataCursor(data, (lambda batch: dist.check_first_batch(  # user-sharded
            batch, self.state.step + 1)) if dist.enabled and not self._data_sharded else None,
            dist.rank, dist.world_size)
        self._prefetch = DevicePrefetch(self.device, prefetch)  # CUDA: side-stream copies
        self.state, self.seed, self.handle_signals = TrainState(), seed, handle_signals
        self.resume = resume if resume in (False, None, "auto") else os.fspath(resume)
        self.eval_data, self.evaluators = eval_data, [as_evaluator(e) for e in evaluators]
        self.log_dir = os.fspath(log_dir) if log_dir is not None else dist.on_main(fresh_run_dir)
        self.logbook = Logbook(dist, self.make_writers, lambda: self.stop.request is not None)
        self.sink = self.logbook.sink
        self.stop = StopControl(dist, self.sink)
        self._nonfinite = nonfinite_hook(self._replay, log_dir is None)  # records, replays
        self.hooks = HookList([self._nonfinite, *builtin_hooks(
            evaluate=eval_data is not None, eval_every=eval_every,
            checkpoint_every=checkpoint_every, keep_last=keep_last,
            progress=progress and dist.is_main, batch_size=batch_size), *callbacks])
        self._after_backward = self.hooks.bound("after_backward")
        self.checkpointer = Checkpointer(dist, os.path.join(self.log_dir, "checkpoints"),
                                         checkpoint_format, async_checkpoint, self.model,
                                         self.cursor, self.hooks, self.sink)
        self.checkpoint_dir, self.checkpoint_format, self._saver = (
            self.checkpointer.directory, self.checkpointer.format, self.checkpointer.saver)
        # What hooks read (`TrainerView`): this step's batches, their losses; fit's outcome.
        self.batch: Any = None
        self.micro_batches: Sequence[Any] = ()
        self.losses: Mapping[str, torch.Tensor | Mean] = {}
        self.micro_losses: list[Mapping[str, torch.Tensor | Mean]] = []
        self.last_eval: dict[str, float] | None = None
        self.resumed_from: str | None = None
        self.exception: BaseException | None = None
        self._prepared, self._first_step = False, 1  # seeded and resumed; this fit's first

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> TrainState:
        """Train until `max_steps` or `max_epochs` or a stop request; with ``resume="auto"``
        a run directory holding checkpoints is first continued from the newest valid one,
        bit-identically to an uninterrupted run.

        Returns:
            The final `TrainState`; its `stop_reason` says why training ended (after a
            SIGTERM, ``"SIGTERM"``: every later fit of the process then returns at once).

        Raises:
            RunDirectoryInUseError: another run holds `log_dir`; nothing there changed.
            RunDirectoryError: `log_dir` is a file or cannot be written.
        """
        self.dist.require_collectives()
        if self.stop.terminated(self.state):  # a SIGTERM stopped an earlier fit
            return self.state
        with claim_run_dir(self.log_dir, self.dist):
            if not self._prepared:
                self._seed_and_resume(self.resume, set_aside=self._replay is None)
            return self._loop()

    def _loop(self) -> TrainState:
        """`fit`, with the run directory held."""
        state, hooks, cursor, stop, prefetch = (self.state, self.hooks, self.cursor,
                                                self.stop, self._prefetch)
        stop.begin(state, self.max_steps, self.max_epochs)
        self.exception, self._first_step = None, state.step + 1
        before_step, after_step = hooks.bound("before_step"), hooks.bound("after_step")
        last_step = self.total_steps or stop.step_limit  # flushed too: its media are kept
        self.model.train()
        self.logbook.start(state.step)
        with self.sink.activate(), stop.signals(self.handle_signals):
            try:
                hooks.call("before_train", self)
                while not stop.stopping(state, between_epochs=True):
                    if not cursor.open and state.batch_in_epoch == 0:
                        hooks.call("before_epoch", self)
                    batches = prefetch.batches(cursor.batches(state.epoch, state.batch_in_epoch))
                    for group in micro_batch_groups(batches, self.grad_accum_steps):
                        if prefetch.active:  # the step's stream waits for the copies
                            prefetch.ready(group)
                        step = state.step + 1
                        self.sink.begin_step(step, step % self.log_every == 0 or step == last_step)
                        self.batch, self.micro_batches = group[-1], group
                        for hook in before_step:
                            hook(self)
                        self.micro_losses = []  # the step may keep each micro-batch's
                        self.losses = losses = self.run_step(group)
                        self.micro_losses = self.micro_losses or [losses]
                        state.step, state.batch_in_epoch = step, state.batch_in_epoch + len(group)
                        for hook in after_step:
                            hook(self)
                        if stop.after_step(state):
                            break  # the epoch stays open: a later fit continues it
                    else:
                        if cursor.finish_epoch(state, self.max_steps):
                            hooks.call("after_epoch", self)
                self.logbook.land()  # the last flush's record, and its NaN check
                self.after_loop()
                self.dist.end_votes()
            except BaseException as exc:
                first = self._teardown(exc)
                if first is exc:
                    raise
                raise first from exc  # the first cause; `exc`, its symptom, chained
            error = self._teardown(None)
        if error is not None:
            raise error
        return state

    def _teardown(self, exc: BaseException | None) -> BaseException | None:
        """The end of a fit, ended by `exc` or not: every hook's `on_exception` (if so)
        and `after_train`, the checkpoint being written, the writers. Returns what `fit`
        raises (after `exc`: the first cause, `first_cause`), a non-finite one recorded
        for its replay (nonfinite.py's `settle`)."""
        self.batch, self.exception = None, exc
        errors: list[BaseException] = []
        try:
            if exc is not None:  # the others may wait in a collective this rank never joins
                self.dist.stop_collectives(exc)
                self.hooks.teardown("on_exception", self, exc)
            # A hook failing on this rank only leaves the others out of step: no collective.
            errors = self.hooks.teardown("after_train", self, on_failure=self.dist.stop_collectives)
            errors += self.checkpointer.finish(failed=exc is not None)
        finally:
            errors += self.logbook.close()
        return self._nonfinite.settle(self, exc, errors)

    # -- extension points -------------------------------------------------------------------

    @abstractmethod
    def run_step(self, batches: Sequence[Any]) -> Mapping[str, torch.Tensor | Mean]:
        """Train on one step's micro-batches: one optimizer step, or several.

        Args:
            batches: `grad_accum_steps` batches as the data yielded them (fewer at an
                epoch's end), still on the host unless prefetched: see `accumulate`.

        Returns:
            The losses to log as ``loss/<key>`` (window means, checked for NaN at each
            flush): scalar tensors or `Mean`s, not synced. A step that sets
            `micro_losses` to each micro-batch's losses returns the last of them.
        """

    def after_loop(self) -> None:  # noqa: B027 - an optional extension point
        """Called when the loop ends without an error, every rank at once, before the
        hooks' `after_train`: for checks a step defers to flushes."""

    def make_writers(self, start_step: int | None) -> BackgroundWriter:
        """The writers summaries go to: TensorBoard, ``metrics.jsonl`` and `writers`', on
        rank 0 (an extension point). `start_step`: where training continues, after
        which an earlier run's logs are dropped; None drops nothing."""
        if not self.dist.is_main:
            return BackgroundWriter([])
        return BackgroundWriter(open_writers(self._replay.log_dir if self._replay else self.log_dir,
                                             start_step, self.extra_writers))

    # -- what hooks read (`TrainerView`) ----------------------------------------------------

    @property
    def data(self) -> Iterable[Any]:
        """The training data, as iterated (under torchrun, a DataLoader rebuilt with a
        `DistributedSampler`). Assigning new data takes effect at the next epoch."""
        return self.cursor.data

    @data.setter
    def data(self, data: Iterable[Any]) -> None:
        self.cursor.data = data

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps `fit` will run in all, when known (for progress and ETA)."""
        return planned_steps(length(self.data), self.grad_accum_steps, self.max_epochs,
                             self.max_steps)

    @property
    def total_loss(self) -> torch.Tensor | None:
        """The sum of `losses`, a `Mean` counted as its batch mean (``total / count``): a
        device tensor, not synced, summed when read."""
        total, terms = split_losses(self.losses)
        for term in (terms or {}).values():
            total = term.value if total is None else total + term.value
        return total

    @property
    def writers(self) -> BackgroundWriter | None:
        """The open writers, during a fit."""
        return self.logbook.writers

    @property
    def last_summary(self) -> SummaryRecord | None:
        """The latest flushed `SummaryRecord` (under torchrun, read at the step of its
        flush it waits for the ranks' windows to be combined)."""
        return self.logbook.last_summary

    @property
    def last_published(self) -> SummaryRecord | None:
        """The latest record handed to the writers, without waiting for one in flight."""
        return self.logbook.last_published

    def publish(self, record: SummaryRecord) -> None:
        """Hand a flushed record to the writers and make it `last_summary`."""
        self.logbook.publish(record)

    def publish_later(self, publish: Callable[[bool], None] | None) -> None:
        """A record still being combined across ranks (see `Logbook.publish_later`)."""
        self.logbook.publish_later(publish)

    @property
    def stop_requested(self) -> bool:
        """Whether a hook or a signal asked training to stop after the current step."""
        return self.stop.request is not None

    def request_stop(self, reason: str = "requested") -> None:
        """Ask `fit` to stop after the current step (hooks call it: early stopping)."""
        self.stop.request_stop(reason)

    def evaluate(self, data: Iterable[Any] | None = None,
                 evaluators: Sequence[Evaluator] | None = None) -> dict[str, float]:
        """Evaluate the model on `data` (default: `eval_data`) with `evaluators` (default:
        the trainer's), in eval mode and `torch.inference_mode()`.

        Returns:
            The evaluators' results and the model's `write_summary` scalars (averaged),
            also written as ``eval/<key>`` summaries at the current step. Under torchrun
            every rank must call it, and gets rank 0's results.
        """
        self.last_eval = results = evaluate_in_run(
            self.model, self.eval_data if data is None else data,
            self.evaluators if evaluators is None else list(evaluators), self.device,
            self.precision, self.dist, self.cursor.rng_kept)
        self.logbook.log_evaluation(self.state.step, results)
        return results

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue as if nothing happened: the counters, the model,
        the RNG states, the data position, the hook states, the pending summary window
        and `precision`'s (the fp16 scaler). Extend it with ``super()``. Under torchrun
        every rank calls it; rank 0's is complete (it gathers each rank's part, and
        under FSDP the model)."""
        return self.checkpointer.run_state(self.state, self.grad_accum_steps, self.precision)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned. The RNG states and the data position apply
        when the next epoch's iteration starts in `fit`; a checkpoint of another number
        of processes is taken as docs/checkpoints.md says. Extend it with ``super()``."""
        self.state = self.checkpointer.load_run_state(state, self.seed, self.grad_accum_steps,
                                                      self.precision)

    def save_checkpoint(self, path: str | os.PathLike[str], keep_last: int | None = None
                        ) -> None:
        """Write a checkpoint of `state_dict` to `path` atomically (a directory with
        ``checkpoint_format="sharded"``); every rank calls it. Within `fit` the logs
        flushed so far are put on disk first. `keep_last`: once it is complete, delete
        all but the newest `keep_last` checkpoints of its directory."""
        self.logbook.before_checkpoint()
        self.checkpointer.save(os.fspath(path), self.state_dict, self.state.step, keep_last)

    def wait_for_checkpoint(self) -> None:
        """With ``async_checkpoint``, block until the checkpoint being written is on disk
        (every rank; rank 0's error is raised on all). `fit` does this before it returns."""
        self.checkpointer.wait()

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Load the checkpoint at `path` (a file or a sharded directory, verified) before
        `fit`, which continues from it; every rank calls it. Raises `CheckpointError`
        if it cannot be read, fails verification or does not fit."""
        self._seed_and_resume(os.fspath(path), set_aside=False)

    def _seed_and_resume(self, resume: Any, set_aside: bool) -> None:
        """Resume as `resume` says; the first time, seed before (rank r with ``seed + r``:
        DDP and FSDP start every rank from rank 0's weights) and check the data after."""
        first = not self._prepared
        if first and self.seed is not None:
            seed_everything(self.seed + self.dist.rank)
        self.resumed_from = self.checkpointer.resume(resume, self.load_state_dict,
                                                     length(self.data), set_aside)
        if first:
            self._prepared = True
            self.dist.check_data(self.data, self._data_sharded)
