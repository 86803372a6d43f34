"""Hooks: everything the trainer does besides the step hangs here.

A hook observes the trainer at fixed points and may request a stop. It sees the trainer
through `TrainerView` (state.py), the documented list of what a hook may use; the
built-in hooks here use nothing else, and this module does not import the trainer.

Order of the hook points in `fit`::

    before_train
      before_epoch                       (every epoch)
        before_step                      (every step)
          after_backward                 (inside the step, before the optimizer step)
        after_step
      after_epoch                        (only when the data ran out, not on max_steps)
    after_train                          (always, even after an exception)
    on_exception(exc)                    (before after_train, when fit raises)

Hooks run in ascending `priority`, then in the order given; `Priority` (state.py) names
the built-in hooks' places and explains why they are in that order. `after_train` and
`on_exception` run for every hook even if one of them fails.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from .checkpoint import checkpoint_path
from .data import batch_size as infer_batch_size
from .errors import ModelOutputError, NonFiniteLossError
from .means import Mean
from .state import Priority, TrainerView, logger
from .summary import SummaryRecord

__all__ = ["BestCheckpoint", "CheckpointHook", "EarlyStopping", "EvaluationHook", "Hook",
           "HookList", "LoggingHook", "ProgressHook", "builtin_hooks"]

_POINTS = ("before_train", "before_epoch", "before_step", "after_backward", "after_step",
           "after_epoch")


class Hook:
    """Base class for hooks. Override only the points you need.

    Points a hook does not override cost nothing per step: the trainer calls only the
    methods that subclasses define.

    Attributes:
        priority: Lower runs earlier: `Priority.DEFAULT` (50) unless set. The built-in
            hooks run after yours; see `Priority` for their places and the reasons.
        state_key: Name of the hook's state in checkpoints. Default: the class name,
            numbered when several hooks share it. Set it when hooks may be reordered.
    """

    priority: int = Priority.DEFAULT
    state_key: str | None = None

    def before_train(self, trainer: TrainerView) -> None:
        """Called once at the start of `fit`, with summaries active."""

    def before_epoch(self, trainer: TrainerView) -> None:
        """Called before the first batch of every epoch."""

    def before_step(self, trainer: TrainerView) -> None:
        """Called before every step; `trainer.state.step` is the number of steps done."""

    def after_backward(self, trainer: TrainerView) -> None:
        """Called after gradients are computed, before the optimizer uses them."""

    def after_step(self, trainer: TrainerView) -> None:
        """Called after every optimizer step; `trainer.losses` holds this step's losses."""

    def after_epoch(self, trainer: TrainerView) -> None:
        """Called when an epoch's data is exhausted."""

    def after_train(self, trainer: TrainerView) -> None:
        """Called once when `fit` ends, whether it succeeded or raised."""

    def on_exception(self, trainer: TrainerView, exc: BaseException) -> None:
        """Called when `fit` is about to raise `exc`, before `after_train`."""

    def state_dict(self) -> dict[str, Any]:
        """State to save in checkpoints. Plain containers and tensors only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


class HookList:
    """The trainer's hooks, sorted, with the overridden methods bound once per point."""

    def __init__(self, hooks: list[Hook]) -> None:
        for hook in hooks:
            if not isinstance(hook, Hook):
                raise TypeError(
                    f"callbacks must be Hook instances; got {type(hook).__name__}. Subclass "
                    "lossless_trainer.Hook and override the points you need"
                )
        self.hooks = sorted(hooks, key=lambda h: h.priority)
        # A hook may switch a point off per instance by setting it to None.
        self._bound: dict[str, list[Any]] = {
            point: [getattr(h, point) for h in self.hooks
                    if getattr(type(h), point) is not getattr(Hook, point)
                    and getattr(h, point) is not None]
            for point in _POINTS
        }

    def call(self, point: str, trainer: TrainerView) -> None:
        """Call `point` on every hook that overrides it, in order."""
        for method in self._bound[point]:
            method(trainer)

    def bound(self, point: str) -> list[Any]:
        """The bound methods to call at `point`: only those hooks actually override."""
        return self._bound[point]

    def keyed(self) -> dict[str, Hook]:
        """Every hook under a unique, stable name: its `state_key`, or its class name,
        with ``#2``, ``#3``... for the second and later hooks of the same name."""
        keyed: dict[str, Hook] = {}
        for hook in self.hooks:
            base = getattr(hook, "state_key", None) or type(hook).__name__
            key, n = base, 1
            while key in keyed:
                n += 1
                key = f"{base}#{n}"
            keyed[key] = hook
        return keyed

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """The state of every hook that has one, by unique name."""
        return {key: state for key, hook in self.keyed().items() if (state := hook.state_dict())}

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        """Give each hook its saved state; warn about states no hook claims."""
        keyed = self.keyed()
        for key, state in states.items():
            if key in keyed:
                keyed[key].load_state_dict(state)
            else:
                warnings.warn(
                    f"the checkpoint holds state for a hook {key!r} that this run does not "
                    f"have (hooks now: {', '.join(keyed) or 'none'}); it is ignored",
                    stacklevel=3,
                )

    def teardown(self, point: str, *args: Any,
                 on_failure: Any = None) -> list[BaseException]:
        """Call `point` on every hook; a failure is logged and does not stop the rest.

        `on_failure`, if given, is called after the first failure, before the next hook
        runs (the trainer uses it to stop starting collectives under torchrun).
        """
        errors: list[BaseException] = []
        for hook in self.hooks:
            try:
                getattr(hook, point)(*args)
            except Exception as exc:
                logger.error("%s.%s failed", type(hook).__name__, point, exc_info=exc)
                if not errors and on_failure is not None:
                    on_failure()
                errors.append(exc)
        return errors


def learning_rates(trainer: TrainerView) -> dict[str, float]:
    """Each optimizer's learning rate by tag: ``lr`` (the single optimizer's) or
    ``lr/<name>`` (each of `trainer.optimizers`), with ``/<group>`` for each parameter
    group (its ``"name"``, else ``group<i>``) of an optimizer that has several."""
    named = trainer.optimizers or (
        {"": trainer.optimizer} if isinstance(trainer.optimizer, torch.optim.Optimizer) else {})
    if not isinstance(named, Mapping):  # a custom trainer's list: "0", "1", ...
        named = {str(i): optimizer for i, optimizer in enumerate(named)}
    lrs = {}
    for name, optimizer in named.items():
        groups = getattr(optimizer, "param_groups", ())  # not an optimizer: nothing
        base = f"lr/{name}" if name else "lr"
        if len(groups) == 1:
            lrs[base] = float(groups[0]["lr"])
        else:
            lrs.update({f"{base}/{group.get('name', f'group{i}')}": float(group["lr"])
                        for i, group in enumerate(groups)})
    return lrs


class LoggingHook(Hook):
    """Feeds the summary sink and flushes it when the step ends a window.

    Per step it stores the step's losses, detached, in the sink (no device sync). The
    sink says whether the step ends the window (`SummarySink.flush_due`: every
    `log_every` steps, the last step, a step that evaluated). At a flush it adds
    throughput and learning rates, hands the record to the writers with
    `trainer.publish` (they write on their background thread), and raises
    `NonFiniteLossError` if a loss went NaN or Inf.
    """

    priority = Priority.LOGGING

    def __init__(self, batch_size: Any = None) -> None:
        # How many samples a batch holds: the Trainer's `batch_size` option, or inferred.
        self._batch_size = batch_size if batch_size is not None else infer_batch_size
        self._tags: dict[str, str] = {}
        self._mean_keys: dict[str, None] = {}  # loss keys the model returns as `Mean`
        self._samples: int | None = 0
        self._window_start = 0.0
        self._window_steps = 0
        self._window_micro = 0  # micro-batches: loss means are over these
        # Under torchrun, the loss keys this rank knows, as sent with each flush; made
        # again only when a key is added.
        self._share: tuple[list[str], list[str]] | None = None
        # A flush whose windows are being combined (trainer, its completion, micro-batch
        # count, learning rates), and a published record whose non-finite check waits
        # for `land`.
        self._landing: tuple[Any, Any, int, dict[str, float]] | None = None
        self._unraised: SummaryRecord | None = None

    def before_train(self, trainer: TrainerView) -> None:
        self._window_start = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        self.land()  # a checkpoint follows the flush of its step: written, and checked
        return {"window_steps": self._window_steps, "window_micro": self._window_micro,
                "samples": -1 if self._samples is None else self._samples,
                "loss_keys": list(self._tags), "mean_keys": list(self._mean_keys)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._window_steps = state["window_steps"]
        self._window_micro = state["window_micro"]
        self._samples = None if state["samples"] < 0 else state["samples"]
        # Loss keys seen so far, so an optional loss missing since the checkpoint still
        # counts in loss/total and in the non-finite check of the window.
        self._tags = {key: f"loss/{key}" for key in state["loss_keys"]}
        self._mean_keys = dict.fromkeys(state.get("mean_keys", ()))
        self._share = None

    def after_step(self, trainer: TrainerView) -> None:
        if self._landing is not None or self._unraised is not None:
            self.land()  # the last flush's windows, combined while this step ran
        sink = trainer.sink
        tags = self._tags
        mean_keys = self._mean_keys
        for losses in trainer.micro_losses:
            for key, loss in losses.items():
                tag = tags.get(key)
                if type(loss) is Mean:  # the window's totals over its counts
                    if key not in mean_keys:
                        if tag is not None:
                            _switched(key, trainer.state.step, "a Mean", "a plain tensor")
                        mean_keys[key] = None
                        self._share = None
                    if tag is None:
                        tag = tags[key] = f"loss/{key}"
                        self._share = None
                    sink.put_mean(tag, loss.total, loss.count)
                    continue
                if tag is None:
                    tag = tags[key] = f"loss/{key}"
                    self._share = None
                elif mean_keys and key in mean_keys:
                    _switched(key, trainer.state.step, "a plain tensor", "a Mean")
                sink.put_scalar(tag, loss)
        self._window_steps += 1
        self._window_micro += len(trainer.micro_losses)
        if self._samples is not None:
            for batch in trainer.micro_batches:
                size = self._batch_size(batch)
                if size is None:  # not inferable: stop counting samples for this run
                    self._samples = None
                    break
                self._samples += size
        if sink.flush_due:
            skipped = trainer.precision.skipped_steps
            if skipped is not None:  # fp16: steps the GradScaler skipped so far
                sink.put_scalar("amp/skipped_steps", skipped)
            self.flush(trainer, wait=False)

    def after_train(self, trainer: TrainerView) -> None:
        self.land()
        # Under torchrun a flush is collective: all ranks flush, or none.
        if trainer.dist.any(bool(self._window_steps) or trainer.sink.pending):
            self.flush(trainer)

    def flush(self, trainer: TrainerView, wait: bool = True) -> None:
        """End the window and publish its record. Under torchrun, unless `wait`, the
        ranks' windows are combined while the next step runs, and the record is
        published at the next `after_step` (or sooner: when `trainer.last_summary` is
        read, or at a checkpoint)."""
        if self._landing is not None:  # the flush before: published first, in order
            self.land()
        sink = trainer.sink
        now = time.perf_counter()  # the next window starts now: its time covers this flush
        elapsed = now - self._window_start
        rates = []  # (tag, value, how ranks combine it): the whole job's throughput
        if elapsed > 0 and self._window_steps:
            rates.append(("perf/steps_per_sec", self._window_steps / elapsed, "max"))
            if self._samples:  # each rank's added
                rates.append(("perf/samples_per_sec", self._samples / elapsed, "sum"))
        # The last completed step: after a failed step, its partial window is still
        # written, at the step before it. The loss keys travel with the window: under
        # torchrun a key may so far exist on another rank only.
        micro_batches = self._window_micro * trainer.dist.world_size
        lrs = learning_rates(trainer)
        self._window_start = now
        self._window_steps = self._window_micro = 0
        self._samples = 0 if self._samples is not None else None
        if not trainer.dist.enabled:
            record = sink.flush(trainer.state.step)
            for tag, value, _ in rates:  # one process: its own numbers, not via the sink
                record.scalars[tag] = value
                record.counts[tag] = 1
            self._publish(trainer, record, micro_batches, lrs)
            _raise_if_nonfinite(record, self._tags)
            return
        for tag, value, reduce in rates:
            sink.put(tag, value, reduce=reduce)
        if self._share is None:
            self._share = (list(self._tags), list(self._mean_keys))
        complete = sink.flush_started(trainer.state.step, share=self._share)
        self._landing = (trainer, complete, micro_batches, lrs)
        trainer.publish_later(self._landed_by_trainer)
        if wait:
            self.land()

    def land(self) -> None:
        """Publish the record of a flush whose windows were still being combined (under
        torchrun), and raise if a loss went NaN or Inf in it. Called where every rank
        is at the same point: the next `after_step`, `after_train`, a checkpoint."""
        if self._landing is not None:
            self._complete(objects=True)
        record, self._unraised = self._unraised, None
        if record is not None:
            _raise_if_nonfinite(record, self._tags)

    def _landed_by_trainer(self, everywhere: bool) -> None:
        if everywhere:
            self.land()
        else:
            self._complete(objects=False)

    def _complete(self, objects: bool) -> None:
        """Complete and publish the record in flight; its non-finite check waits for
        `land`, so that every rank raises at the same step. Without `objects` (a read of
        `last_summary` on one rank), a record that needs the ranks to gather their
        windows as objects waits for `land` too."""
        if self._landing is None:
            return
        trainer, complete, micro_batches, lrs = self._landing  # type: ignore[misc]
        record = complete(objects)
        if record is None:
            return
        self._landing = None
        trainer.publish_later(None)
        known = (len(self._tags), len(self._mean_keys))
        for shared in record.shared:
            keys, mean_keys = shared or ((), ())
            for key in keys:
                self._tags.setdefault(key, f"loss/{key}")
            self._mean_keys.update(dict.fromkeys(mean_keys))
        if (len(self._tags), len(self._mean_keys)) != known:
            self._share = None
        self._publish(trainer, record, micro_batches, lrs)
        self._unraised = record

    def _publish(self, trainer: TrainerView, record: SummaryRecord, micro_batches: int,
                 lrs: dict[str, float]) -> None:
        # loss/total is derived, not stored per step: the window's summed plain losses
        # over its micro-batches (and ranks), exact also when an optional loss is missing
        # from some of them, plus each Mean term's window value (its pooled mean).
        scalars, counts, mean_keys = record.scalars, record.counts, self._mean_keys
        window_sum = mean_sum = 0.0
        found = False
        for key, tag in self._tags.items():
            if tag in counts:
                found = True
                if mean_keys and key in mean_keys:
                    mean_sum += scalars[tag]
                else:
                    window_sum += scalars[tag] * counts[tag]
        if found and micro_batches:
            scalars["loss/total"] = window_sum / micro_batches + mean_sum
        scalars.update(lrs)
        trainer.publish(record)


def _switched(key: str, step: int, now: str, before: str) -> None:
    raise ModelOutputError(
        f"loss {key!r} at step {step} is {now}, and was {before} before; a loss is always a "
        "Mean (a sum over items, divided by the count) or always a plain mean, so that its "
        "window value and its weight in the step stay the same kind")


def _raise_if_nonfinite(record: SummaryRecord, loss_tags: dict[str, str]) -> None:
    if not record.nonfinite:  # every flush of a healthy run: nothing to look up
        return
    bad = {key: record.nonfinite[tag] for key, tag in loss_tags.items()
           if tag in record.nonfinite}
    if bad:
        ranks = {key: record.nonfinite_ranks[tag] for key, tag in loss_tags.items()
                 if tag in record.nonfinite_ranks}
        first = ", ".join(f"{key!r} first at step {step}"
                          + (f" on rank {ranks[key]}" if key in ranks else "")
                          for key, step in bad.items())
        raise NonFiniteLossError(
            f"non-finite loss (NaN or Inf): {first} (detected at the flush of step "
            f"{record.step}). Weights updated after that step are suspect. To stop before "
            "the optimizer steps on a bad loss, use Trainer(finite_check='step')",
            bad, ranks,
        )


class EvaluationHook(Hook):
    """Evaluates every `every` steps and when training ends without an error.

    Runs before the logging hook, so the ``eval/`` summaries go out in the flush of the
    same step (an evaluation step is always a summary step).
    """

    priority = Priority.EVALUATION

    def __init__(self, every: int | None) -> None:
        self.every = every
        self.last_step: int | None = None
        self._final_step: int | None = None

    def before_train(self, trainer: TrainerView) -> None:
        # Evaluating in the last step itself (when it is known) puts the results in that
        # step's flush rather than in a second record at the same step.
        self._final_step = trainer.total_steps

    def after_step(self, trainer: TrainerView) -> None:
        step = trainer.state.step
        if (self.every is not None and step % self.every == 0) or step == self._final_step:
            self._evaluate(trainer)

    def after_train(self, trainer: TrainerView) -> None:
        if trainer.exception is None and self.last_step != trainer.state.step:
            self._evaluate(trainer)

    def _evaluate(self, trainer: TrainerView) -> None:
        trainer.evaluate()
        self.last_step = trainer.state.step

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": -1 if self.last_step is None else self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = None if state["last_step"] < 0 else state["last_step"]


class _Monitor:
    """Tracks the best value of one evaluation result."""

    def __init__(self, monitor: str, mode: str, min_delta: float) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.monitor, self.mode, self.min_delta = monitor, mode, min_delta
        self.best: float | None = None
        self.seen: dict[str, float] | None = None

    def new_result(self, trainer: TrainerView) -> float | None:
        """The monitored value if an evaluation happened since the last call."""
        results = trainer.last_eval
        if results is None or results is self.seen:
            return None
        self.seen = results
        if self.monitor not in results:
            raise KeyError(
                f"{self.monitor!r} is not among the evaluation results "
                f"({', '.join(sorted(results)) or 'none'})"
            )
        return results[self.monitor]

    def improves(self, value: float) -> bool:
        if self.best is None:
            return math.isfinite(value)
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EarlyStopping(Hook):
    """Stops training when an evaluation result stops improving.

    Args:
        monitor: A key of `Trainer.evaluate`'s results, e.g. ``"accuracy"`` or a
            validation loss the model logs in eval mode (``"val_loss"``).
        mode: ``"min"`` or ``"max"``: which direction is better.
        patience: Evaluations without improvement before stopping.
        min_delta: The smallest change that counts as an improvement.
    """

    priority = Priority.EARLY_STOPPING

    def __init__(self, monitor: str, mode: str = "min", patience: int = 3,
                 min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.tracker = _Monitor(monitor, mode, min_delta)
        self.patience = patience
        self.bad_evaluations = 0

    def after_step(self, trainer: TrainerView) -> None:
        value = self.tracker.new_result(trainer)
        if value is None:
            return
        if self.tracker.improves(value):
            self.tracker.best, self.bad_evaluations = value, 0
            return
        self.bad_evaluations += 1
        if self.bad_evaluations >= self.patience:
            trainer.request_stop(
                f"early stopping: {self.tracker.monitor} did not improve on "
                f"{self.tracker.best} for {self.patience} evaluations"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.tracker.best, "bad_evaluations": self.bad_evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.best = state["best"]
        self.bad_evaluations = state["bad_evaluations"]


class BestCheckpoint(Hook):
    """Keeps the checkpoint with the best evaluation result as ``checkpoints/best.pt``
    (a directory ``checkpoints/best`` with ``checkpoint_format="sharded"``).

    The checkpoint (resumable with ``resume=<path>``) is written atomically whenever the
    monitored value improves. It is never pruned, nor picked by ``resume="auto"``.

    Args:
        monitor: A key of `Trainer.evaluate`'s results, as for `EarlyStopping`.
        mode: ``"min"`` or ``"max"``: which direction is better.
        min_delta: The smallest change that counts as an improvement.
        filename: Name of the file in the checkpoint directory. Default: ``best.pt``,
            or ``best`` for sharded checkpoints.
    """

    priority = Priority.BEST_CHECKPOINT

    def __init__(self, monitor: str, mode: str = "min", min_delta: float = 0.0,
                 filename: str | None = None) -> None:
        self.tracker = _Monitor(monitor, mode, min_delta)
        self.filename = filename
        self.best_step: int | None = None

    def after_step(self, trainer: TrainerView) -> None:
        value = self.tracker.new_result(trainer)
        if value is None or not self.tracker.improves(value):
            return
        _refuse_nonfinite_weights(trainer)
        self.tracker.best, self.best_step = value, trainer.state.step
        name = self.filename or ("best" if trainer.checkpoint_format == "sharded"
                                 else "best.pt")
        trainer.save_checkpoint(os.path.join(trainer.checkpoint_dir, name))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.tracker.best,
                "best_step": -1 if self.best_step is None else self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.best = state["best"]
        self.best_step = None if state["best_step"] < 0 else state["best_step"]


class CheckpointHook(Hook):
    """Saves checkpoints every `every` steps and when training ends without an error.

    "Ends" includes a stop requested by a hook or by SIGTERM/SIGINT (preemption). Runs
    after the logging hook, so the summary window is flushed first; `save_checkpoint`
    puts everything flushed so far on disk before saving, so a resumed run drops
    exactly the log entries written after its checkpoint.

    Args:
        every: Steps between checkpoints; None saves only when training ends.
        keep_last: How many checkpoints to keep; older ones are deleted after a new one
            is complete.
    """

    priority = Priority.CHECKPOINT

    def __init__(self, every: int | None, keep_last: int) -> None:
        self.every = every
        self.keep_last = keep_last
        self.last_saved: int | None = None
        if every is None:
            self.after_step = None  # type: ignore[method-assign,assignment]  # nothing per step

    def before_train(self, trainer: TrainerView) -> None:
        self.last_saved = trainer.state.step if trainer.resumed_from else None

    def after_step(self, trainer: TrainerView) -> None:
        if trainer.state.step % self.every == 0:  # type: ignore[operator]
            self.save(trainer)

    def after_train(self, trainer: TrainerView) -> None:
        if trainer.exception is None and self.last_saved != trainer.state.step:
            self.save(trainer)

    def save(self, trainer: TrainerView) -> str:
        """Write a checkpoint of the current step; return its path."""
        _refuse_nonfinite_weights(trainer)
        path = checkpoint_path(trainer.checkpoint_dir, trainer.state.step,
                               sharded=trainer.checkpoint_format == "sharded")
        # Under torchrun every rank calls it, rank 0 writes; it prunes once the file is
        # complete (with async_checkpoint, in the background).
        trainer.save_checkpoint(path, keep_last=self.keep_last)
        self.last_saved = trainer.state.step
        return path


def _refuse_nonfinite_weights(trainer: TrainerView) -> None:
    """Never let NaN weights replace good checkpoints (one sync, per checkpoint only)."""
    named = [(name, p) for name, p in trainer.model.named_parameters() if p.is_floating_point()]
    if not named:
        return
    # FSDP parameters are DTensors: each rank checks its own shard, then all agree.
    local = [p.to_local() if hasattr(p, "to_local") else p for _, p in named]
    finite = torch.stack([p.detach().isfinite().all() for p in local]).tolist()
    bad = [name for (name, _), ok in zip(named, finite) if not ok]
    if trainer.dist.strategy == "fsdp" and trainer.dist.any(bool(bad)) and not bad:
        bad = ["(on another rank's shard)"]
    if bad:
        raise NonFiniteLossError(
            f"parameters became NaN or Inf by step {trainer.state.step} ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); no checkpoint is saved, so the earlier "
            "ones stay usable. A non-finite loss usually came first: use "
            "finite_check='step' to stop at it",
            {},
        )


class ProgressHook(Hook):
    """A tqdm bar on a terminal; plain periodic lines when stdout is not one.

    The bar moves every step; the loss it shows changes at each flush, because reading
    it sooner would synchronise with the device.

    Args:
        interval: Minimum seconds between two plain lines (the last one always prints).
    """

    priority = Priority.PROGRESS

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._bar: Any = None
        self._seen: SummaryRecord | None = None
        self._last_line = 0.0
        self._start = 0.0

    def before_train(self, trainer: TrainerView) -> None:
        self._start = self._last_line = time.perf_counter()
        self._seen = None
        if stdout_is_terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=trainer.total_steps, initial=trainer.state.step,
                             unit="step", dynamic_ncols=True, file=sys.stdout)

    def after_step(self, trainer: TrainerView) -> None:
        if self._bar is not None:
            self._bar.update(1)
        record = trainer.last_published  # not waiting for a record in flight (torchrun)
        if record is not None and record is not self._seen:
            self._seen = record
            self._show(trainer, record, final=False)

    def after_train(self, trainer: TrainerView) -> None:
        record = trainer.last_published  # the logging hook (90) published the last one
        if record is not None:
            self._show(trainer, record, final=True)
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _show(self, trainer: TrainerView, record: SummaryRecord, final: bool) -> None:
        losses = {key: record.scalars[f"loss/{key}"] for key in (*trainer.losses, "total")
                  if f"loss/{key}" in record.scalars}
        if self._bar is not None:
            self._bar.set_postfix_str(format_scalars(losses), refresh=False)
            return
        now = time.perf_counter()
        if not final and now - self._last_line < self.interval:
            return
        self._last_line = now
        total = trainer.total_steps
        step = f"step {record.step}" + (f"/{total}" if total else "")
        rate = record.scalars.get("perf/steps_per_sec")
        extra = f"  {rate:.1f} steps/s" if rate else ""
        if rate and total and not final:
            extra += f"  eta {_clock((total - record.step) / rate)}"
        print(f"[lossless_trainer] {step}  {format_scalars(losses)}{extra}"
              f"  elapsed {_clock(now - self._start)}", flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def format_scalars(scalars: dict[str, float], limit: int = 6) -> str:
    """A compact ``tag=value`` string for the console."""
    parts = [f"{tag}={value:.4g}" for tag, value in list(scalars.items())[:limit]]
    return "  ".join(parts)


def stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def builtin_hooks(*, evaluate: bool, eval_every: int | None, checkpoint_every: int | None,
                  keep_last: int, progress: bool, batch_size: Any = None) -> list[Hook]:
    """The hooks every Trainer has, as its options ask: logging always (counting samples
    with `batch_size`, if given); evaluation with `eval_data`; checkpointing unless
    ``keep_last=0``; the progress display (rank 0)."""
    hooks: list[Hook] = [LoggingHook(batch_size)]
    if evaluate:
        hooks.append(EvaluationHook(eval_every))
    if keep_last:
        hooks.append(CheckpointHook(checkpoint_every, keep_last))
    if progress:
        hooks.append(ProgressHook())
    return hooks
