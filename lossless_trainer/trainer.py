"""The Trainer: options, the fit loop, and the one training step."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.utils.data import DataLoader, IterableDataset

from .checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    capture_rng,
    list_checkpoints,
    load_checkpoint,
    load_newest_valid,
    remove_stale_temporaries,
    restore_rng,
    save_atomic,
    set_aside_newer,
)
from .data import (
    first_checked,
    is_one_shot,
    iterate_resumed_epoch,
    loader_generators,
    move_to_device,
    start_epoch,
)
from .distributed import Distributed
from .errors import NonFiniteLossError
from .evaluation import Evaluator, run_evaluation
from .hooks import (
    CheckpointHook,
    EvaluationHook,
    Hook,
    HookList,
    LoggingHook,
    ProgressHook,
    logger,
)
from .model import check_losses
from .precision import Precision
from .summary import SummaryRecord, SummarySink
from .writers import BackgroundWriter, JSONLinesWriter, TensorBoardWriter

__all__ = ["TrainState", "Trainer"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


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
        progress: Show a progress bar (plain lines when stdout is not a terminal).
        finite_check: ``"flush"`` (default) checks losses for NaN/Inf on the device and
            raises at the next flush, with no per-step sync. ``"step"`` checks every step
            before the optimizer step (one sync per step), so a non-finite loss never
            updates the weights.
        precision: ``"32"``, ``"bf16"`` or ``"fp16"``. Autocast covers the forward, and
            so the model's own loss computation; fp16 adds a GradScaler.
        grad_accum_steps: Micro-batches per optimizer step; each one's loss is scaled by
            1/N. A "step" everywhere (`max_steps`, `log_every`, checkpoints) is an
            optimizer step. An epoch's leftover micro-batches make one shorter step.
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
        resume: Literal["auto", False] | str | os.PathLike[str] = "auto",
        handle_signals: bool = True,
        strategy: Literal["auto", "ddp", "fsdp"] = "auto",
        find_unused_parameters: bool = False,
        fsdp_units: Sequence[type[nn.Module]] | Callable[[nn.Module], bool] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(data, Iterable):
            raise TypeError(
                f"data must be an iterable of batches (a DataLoader, a list, a generator), "
                f"got {type(data).__name__}"
            )
        _check_positive("max_steps", max_steps, allow_none=True)
        _check_positive("max_epochs", max_epochs, allow_none=True)
        _check_positive("log_every", log_every)
        _check_positive("checkpoint_every", checkpoint_every, allow_none=True)
        _check_positive("grad_accum_steps", grad_accum_steps)
        _check_positive("eval_every", eval_every, allow_none=True)
        if eval_every is not None and eval_data is None:
            raise ValueError("eval_every is set but there is no eval_data to evaluate on")
        for name, clip in (("clip_grad_norm", clip_grad_norm),
                           ("clip_grad_value", clip_grad_value)):
            if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                                     or not clip > 0):
                raise ValueError(f"{name} must be a positive number, got {clip!r}")
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"keep_last must be an int >= 0, got {keep_last!r}")
        if keep_last == 0 and checkpoint_every is not None:
            raise ValueError("checkpoint_every is set but keep_last=0 keeps no checkpoint")
        if resume is not False and not isinstance(resume, (str, os.PathLike)):
            raise ValueError(f"resume must be 'auto', False or a checkpoint path, got {resume!r}")
        if finite_check not in ("flush", "step"):
            raise ValueError(f"finite_check must be 'flush' or 'step', got {finite_check!r}")
        if is_one_shot(data) and max_epochs is not None and max_epochs > 1:
            raise ValueError(
                f"data is a one-shot iterator ({type(data).__name__}) and can only be read "
                f"once, but max_epochs={max_epochs}. Pass a re-iterable (a list, a "
                "DataLoader, or an object whose __iter__ starts a new pass), or use max_steps"
            )

        self.dist = Distributed.setup(device, strategy)
        self.device = self.dist.device
        if self.dist.strategy == "fsdp":
            if isinstance(optimizer, torch.optim.Optimizer):
                raise ValueError(
                    "strategy='fsdp' replaces the model's parameters with sharded ones, so an "
                    "optimizer built beforehand would update the old ones; pass a factory "
                    "instead, e.g. optimizer=functools.partial(torch.optim.AdamW, lr=1e-3)"
                )
            if precision == "fp16":
                raise ValueError("precision='fp16' is not supported with strategy='fsdp' "
                                 "(its loss scaling would differ between shards); use 'bf16'")
        self.model = model.to(self.device)
        if compile:
            if not isinstance(compile, (bool, dict)):
                raise TypeError(f"compile must be a bool or a dict of torch.compile options, "
                                f"got {type(compile).__name__}")
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
        self.optimizer = _build_optimizer(optimizer, self.model)
        self.precision = Precision(precision, self.device)
        self.lr_scheduler = _build_scheduler(lr_scheduler, self.optimizer)
        self.grad_accum_steps = grad_accum_steps
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.eval_data = eval_data
        self.evaluators = list(evaluators)
        self.last_eval: dict[str, float] | None = None  # the latest evaluate() results
        self._clipping = clip_grad_norm is not None or clip_grad_value is not None
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.data, self._data_sharded = self.dist.shard(data, seed if seed is not None else 0)
        self.max_steps = max_steps
        # No limit at all means one epoch; a one-shot iterator then runs until exhausted.
        unlimited = max_epochs is None and max_steps is None and not is_one_shot(data)
        self.max_epochs = 1 if unlimited else max_epochs
        # Every rank must agree on the run directory: rank 0 names a fresh one.
        self.log_dir = os.fspath(log_dir) if log_dir is not None \
            else self.dist.on_main(_fresh_run_dir)
        self.log_every = log_every
        self.seed = seed
        self.finite_check = finite_check
        self.checkpoint_dir = os.path.join(self.log_dir, "checkpoints")
        self.resume = resume if resume is False or resume == "auto" else os.fspath(resume)
        self.handle_signals = handle_signals

        self.state = TrainState()
        self.sink = SummarySink(self.dist.reduce_totals if self.dist.enabled else None)
        # Per-step values hooks may read. `batch` is as the data yielded it.
        self.batch: Any = None
        self.micro_batches: Sequence[Any] = ()
        self.losses: dict[str, torch.Tensor] = {}
        self.micro_losses: list[dict[str, torch.Tensor]] = []
        self.total_loss: torch.Tensor | None = None
        self.last_summary: SummaryRecord | None = None
        # Set during fit: the writers, the checkpoint resumed from, the error fit raises.
        self.writers: BackgroundWriter | None = None
        self.resumed_from: str | None = None
        self.exception: BaseException | None = None

        builtin: list[Hook] = [LoggingHook()]
        if eval_data is not None:
            builtin.append(EvaluationHook(eval_every))
        if keep_last:
            builtin.append(CheckpointHook(checkpoint_every, keep_last))
        if progress and self.dist.is_main:
            builtin.append(ProgressHook())
        self.hooks = HookList([*builtin, *callbacks])
        self._after_backward = self.hooks.bound("after_backward")
        self._stop_request: str | None = None
        self._model_name = type(model).__name__
        self._resume_checked = False
        self._epoch_rng: dict[str, Any] | None = None  # RNG as the current epoch began
        self._pending_rng: dict[str, Any] | None = None  # set by load_state_dict
        self._data_started = False  # whether this process has iterated `data` yet
        self._batches: Iterator[Any] | None = None  # the open epoch's iterator

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps `fit` will run in all, when known (for progress and ETA)."""
        batches = _length(self.data)
        # An epoch's leftover micro-batches make one more, shorter step.
        per_epoch = -(-batches // self.grad_accum_steps) if batches else None
        by_epochs = per_epoch * self.max_epochs if per_epoch and self.max_epochs else None
        if self.max_steps is not None and by_epochs is not None:
            return min(self.max_steps, by_epochs)
        return self.max_steps if self.max_steps is not None else by_epochs

    def request_stop(self, reason: str = "requested") -> None:
        """Ask `fit` to stop after the current step. Hooks call this (early stopping)."""
        self._stop_request = reason

    @property
    def stop_requested(self) -> bool:
        """Whether a hook or a signal asked training to stop after the current step."""
        return self._stop_request is not None

    def make_writers(self, start_step: int | None) -> BackgroundWriter:
        """The writers summaries go to. Extension point: override to add or replace sinks.

        Args:
            start_step: The step training continues from (0 when fresh). Whatever an
                earlier run logged after it is dropped, so no step appears twice. None
                appends and drops nothing (a standalone `evaluate`).
        """
        if not self.dist.is_main:  # rank 0 alone writes; the others' values reach it
            return BackgroundWriter([])
        os.makedirs(self.log_dir, exist_ok=True)
        return BackgroundWriter([
            TensorBoardWriter(self.log_dir,
                              purge_step=None if start_step is None else start_step + 1),
            JSONLinesWriter(os.path.join(self.log_dir, "metrics.jsonl"), keep_until=start_step),
        ])

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
        rng = self._capture_rng()
        try:
            results, summaries = run_evaluation(self.model, data, evaluators, self.device,
                                                self.precision)
        finally:
            self._restore_rng(rng)
        # Every rank evaluated the same data; rank 0's numbers make every rank decide
        # alike (early stopping, best checkpoint) even if results differ in the last bit.
        results, summaries = self.dist.broadcast((results, summaries))
        for key in summaries.keys() & results.keys():
            raise ValueError(f"{key!r} is both an evaluator key and a write_summary tag in "
                             "eval mode; rename one")
        results.update(summaries)
        self.last_eval = results
        scalars = {f"eval/{key}": value for key, value in results.items()}
        if self.writers is not None:  # within fit: into this step's flush
            for tag, value in scalars.items():
                self.sink.put(tag, value)
            self.sink.writing = True
        else:
            writers = self.make_writers(None)
            writers.write(SummaryRecord(step=self.state.step, scalars=scalars))
            writers.close()
        return results

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue as if nothing happened; tensors and plain values.

        Model, optimizer, counters, the RNG states (now, and as the current epoch
        began), the data position, hook states and the pending summary window.

        Under torchrun every rank must call it (it gathers each rank's RNG states, data
        position, hook states and summary window into ``"ranks"`` on rank 0; with FSDP it
        also gathers the full, unsharded model and optimizer state to rank 0). Only rank
        0's result is complete.
        """
        per_rank = {
            "rng": {"epoch_start": self._epoch_rng, "now": self._capture_rng()},
            "data": self.data.state_dict() if _is_stateful(self.data) else None,
            "hooks": self.hooks.state_dict(),
            "summary": self.sink.state_dict(),
        }
        model_state, optimizer_state = self._model_optimizer_state()
        state = {
            "format": FORMAT_VERSION,
            "trainer": {"step": self.state.step, "epoch": self.state.epoch,
                        "batch_in_epoch": self.state.batch_in_epoch},
            "model": model_state,
            "optimizer": optimizer_state,
            "lr_scheduler": None if self.lr_scheduler is None else self.lr_scheduler.state_dict(),
            "precision": self.precision.state_dict(),
            **per_rank,
        }
        if self.dist.enabled:
            state["world_size"] = self.dist.world_size
            state["ranks"] = self.dist.gather_to_main(per_rank)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned. RNG states and the data position are
        applied when the next epoch's iteration starts in `fit`.

        Raises:
            ValueError: the checkpoint was written by a different number of processes.
        """
        saved_world = state.get("world_size", 1)
        if saved_world != self.dist.world_size:
            raise ValueError(
                f"it was written by {saved_world} process(es) and this run has "
                f"{self.dist.world_size}: the per-process RNG states and the position in "
                "the sharded data cannot be carried over exactly. Resume with the same "
                f"number of processes (torchrun --nproc_per_node={saved_world} ...), or "
                "start a new run in another log_dir from its weights: model.load_state_dict("
                "torch.load(path, weights_only=True)['model'])"
            )
        if self.dist.enabled:
            state = {**state, **state["ranks"][self.dist.rank]}
        self._load_model_optimizer_state(state["model"], state["optimizer"])
        if (state["lr_scheduler"] is None) != (self.lr_scheduler is None):
            raise ValueError("the checkpoint and this run disagree on having an lr_scheduler")
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.precision.load_state_dict(state["precision"])
        counters = state["trainer"]
        self.state = TrainState(step=counters["step"], epoch=counters["epoch"],
                                batch_in_epoch=counters["batch_in_epoch"])
        if state["data"] is not None and _is_stateful(self.data):
            self.data.load_state_dict(state["data"])
        self.hooks.load_state_dict(state["hooks"])
        self.sink.load_state_dict(state["summary"])
        self._pending_rng = state["rng"]

    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write `state_dict` to `path` atomically (a crash leaves the old file or the new
        one, never a partial one). Under torchrun every rank calls it; rank 0 writes,
        and no rank returns before the file is complete."""
        state = self.state_dict()
        # Rank 0 writes; the others wait for its result, and raise its error if it fails.
        self.dist.on_main(lambda: save_atomic(state, os.fspath(path)))

    def _model_optimizer_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.dist.strategy != "fsdp":
            return self.model.state_dict(), self.optimizer.state_dict()
        # Full, unsharded tensors gathered to rank 0's CPU: the file does not depend on
        # the number of processes, and loads into the plain model.
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.model, options=options),
                get_optimizer_state_dict(self.model, self.optimizer, options=options))

    def _load_model_optimizer_state(self, model_state: dict[str, Any],
                                    optimizer_state: dict[str, Any]) -> None:
        if self.dist.strategy != "fsdp":
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # Rank 0 holds the full state and sends each rank its shards, tensor by tensor.
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.model, model_state, options=options)
        has_state = optimizer_state.get("has_state", bool(optimizer_state.get("state")))
        if has_state:
            set_optimizer_state_dict(self.model, self.optimizer,
                                     optimizer_state if self.dist.is_main else {},
                                     options=options)
        else:  # a stateless optimizer (plain SGD), which torch's loader cannot place
            for group, saved in zip(self.optimizer.param_groups, optimizer_state["param_groups"]):
                group.update({k: v for k, v in saved.items() if k != "params"})

    def fit(self) -> TrainState:
        """Train until `max_steps` or `max_epochs` (see the class docs) or a stop request.

        With ``resume="auto"`` (the default) a run directory holding checkpoints is
        continued from the newest valid one, bit-identically to an uninterrupted run.

        Returns:
            The final `TrainState`. Its `stop_reason` says why training ended; after a
            SIGTERM or SIGINT it is ``"SIGTERM"`` or ``"SIGINT"``, and a checkpoint of
            the last completed step has been saved.
        """
        dist = self.dist
        if dist.enabled and not dist.collectives_ok:
            raise RuntimeError("an earlier fit failed on this rank; the other ranks cannot be "
                               "trusted to be in step with it. Restart the job to resume")
        if not self._resume_checked:  # the first fit of this Trainer
            if self.seed is not None:
                # Each rank draws its own dropout masks and augmentations; DDP and FSDP
                # start every rank from rank 0's weights whatever the seed.
                seed_everything(self.seed + dist.rank)
            self._resume()
            self._resume_checked = True
            dist.check_data(self.data, self._data_sharded)
        self.exception = None
        self.state.stop_reason = self._stop_request = None
        hooks, state, sink = self.hooks, self.state, self.sink
        before_step, after_step = hooks.bound("before_step"), hooks.bound("after_step")
        # Under torchrun every rank must stop at the same step: stop requests (hooks,
        # signals) are put to a vote, which agrees one step after any rank asked.
        vote = dist.vote_stop if dist.enabled else None
        max_steps = self.max_steps if self.max_steps is not None else sys.maxsize
        max_epochs = self.max_epochs if self.max_epochs is not None else sys.maxsize
        # The last step is a summary step too, so media written there are kept.
        last_step = self.total_steps or max_steps
        self.model.train()
        self.writers = self.make_writers(state.step)
        errors: list[BaseException] = []
        with self.sink.activate(), self._stop_on_signals():
            try:
                hooks.call("before_train", self)
                while state.stop_reason is None:
                    # Between epochs every rank is here at once: agree on a stop asked
                    # for since the last step (in after_epoch, say) before a new epoch.
                    stop = self._stop_request is not None
                    if vote is not None:
                        stop = dist.any(stop)
                    if stop:
                        state.stop_reason = self._stop_request or "stopped on another rank"
                    elif state.step >= max_steps:
                        state.stop_reason = "max_steps"
                    elif state.epoch >= max_epochs:
                        state.stop_reason = "max_epochs"
                    if state.stop_reason is not None:
                        break
                    if self._batches is None:  # else: an epoch left open by a resume or fit
                        if state.batch_in_epoch == 0:
                            hooks.call("before_epoch", self)
                        self._batches = self._epoch_batches()
                    for group in _groups(self._batches, self.grad_accum_steps):
                        step = state.step + 1
                        sink.step = step  # inlined SummarySink.begin_step
                        sink.writing = step % self.log_every == 0 or step == last_step
                        self.batch, self.micro_batches = group[-1], group
                        for hook in before_step:
                            hook(self)
                        self.micro_losses = self.run_step(group)
                        self.losses = self.micro_losses[-1]
                        state.step = step
                        state.batch_in_epoch += len(group)
                        for hook in after_step:
                            hook(self)
                        stop = self._stop_request is not None
                        if vote is not None:
                            stop = vote(stop)
                        if stop or step >= max_steps:
                            state.stop_reason = (self._stop_request or "stopped on another rank"
                                                 ) if stop else "max_steps"
                            break
                    else:
                        self._batches = None
                        self._end_epoch(max_steps)
            except BaseException as exc:
                self.exception = exc
                self.batch = None
                if dist.enabled:
                    # The other ranks may be blocked in a collective this rank will never
                    # join: teardown must not start one, so the error surfaces and
                    # torchrun stops the job.
                    dist.collectives_ok = False
                    if hasattr(exc, "add_note"):
                        exc.add_note(f"[lossless_trainer] on rank {dist.rank} of "
                                     f"{dist.world_size}")
                try:
                    self.hooks.teardown("on_exception", self, exc)
                    self.hooks.teardown("after_train", self)  # failures logged; exc wins
                finally:
                    self._close_writers()
                raise
            self.batch = None
            try:
                dist.end_votes()
                # A hook that failed here on this rank only has left the others out of
                # step: no more collectives from this rank, so it exits and torchrun
                # stops the job, instead of collectives pairing up wrongly.
                errors = self.hooks.teardown("after_train", self,
                                             on_failure=self._stop_collectives)
            finally:
                errors += self._close_writers()
        if errors:
            raise errors[0]
        return self.state

    def _stop_collectives(self) -> None:
        self.dist.collectives_ok = False

    def _close_writers(self) -> list[BaseException]:
        writers, self.writers = self.writers, None
        try:
            if writers is not None:
                writers.close()
        except Exception as exc:
            logger.error("closing the summary writers failed", exc_info=exc)
            return [exc]
        return []

    def _resume(self) -> None:
        """Load the checkpoint `resume` points to, if any. Under torchrun, rank 0 picks
        it and every rank loads that same file."""
        loaded: dict[str, Any] = {}

        def choose() -> str | None:
            remove_stale_temporaries(self.checkpoint_dir)
            if self.resume is False:
                existing = list_checkpoints(self.checkpoint_dir)
                if existing:
                    raise ValueError(
                        f"resume=False but {self.checkpoint_dir} already holds "
                        f"{len(existing)} checkpoint(s) of an earlier run; starting fresh "
                        "there would mix the two runs. Use another log_dir, delete them, or "
                        "resume"
                    )
                return None
            if self.resume == "auto":
                found = load_newest_valid(self.checkpoint_dir)
                if found is None:
                    return None
                loaded["state"] = found[1]
                return found[0]
            return self.resume

        path = self.dist.on_main(choose)
        if path is None:
            return
        if self.dist.strategy == "fsdp":
            state = self._load_on_main(path, loaded)
        else:
            state = loaded["state"] if "state" in loaded else load_checkpoint(path)
        try:
            self.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {path} does not fit this run: {exc}. Was it written by a "
                "different model, optimizer or script?"
            ) from exc
        self.resumed_from = path
        if self.dist.is_main:
            logger.warning("resumed from %s at step %d", path, self.state.step)
            for moved in set_aside_newer(self.checkpoint_dir, self.state.step):
                logger.warning("set aside %s: it is newer than the checkpoint resumed from",
                               moved)

    def _load_on_main(self, path: str, loaded: dict[str, Any]) -> dict[str, Any]:
        """FSDP: only rank 0 reads the full checkpoint into memory; the others get its
        small part (counters, per-rank RNG and data states) here and their shards of
        the model and optimizer from rank 0 in `_load_model_optimizer_state`."""
        def small_part() -> dict[str, Any]:
            if "state" not in loaded:
                loaded["state"] = load_checkpoint(path)
            full = loaded["state"]
            small = {k: v for k, v in full.items() if k not in ("model", "optimizer")}
            small["optimizer"] = {"param_groups": full["optimizer"]["param_groups"],
                                  "has_state": bool(full["optimizer"].get("state"))}
            return small

        small = self.dist.on_main(small_part)
        if self.dist.is_main:
            return loaded["state"]
        return {**small, "model": {}}

    def _epoch_batches(self) -> Iterator[Any]:
        """An iterator over this epoch's batches; after a resume, from where it stopped."""
        pending, self._pending_rng = self._pending_rng, None
        first_in_process, self._data_started = not self._data_started, True
        epoch = self.state.epoch
        if pending is not None:
            skip = self.state.batch_in_epoch
            if skip == 0 or _is_stateful(self.data) or pending["epoch_start"] is None:
                self._restore_rng(pending["now"])  # the data restores its position, or none
            else:
                self._restore_rng(pending["epoch_start"])
                self._epoch_rng = pending["epoch_start"]
                # The rebuilt loader of this epoch does not start `self.data` itself.
                self._data_started = False
                return iterate_resumed_epoch(self.data, skip, epoch,
                                             lambda: self._restore_rng(pending["now"]))
        self._epoch_rng = self._capture_rng()
        batches = start_epoch(self.data, epoch, first_in_process)
        if first_in_process and self.dist.enabled and not self._data_sharded:
            return first_checked(batches, lambda batch: self.dist.check_first_batch(
                batch, self.state.step + 1))
        return batches

    def _capture_rng(self) -> dict[str, Any]:
        """Global RNG states plus those of the DataLoader's own generators."""
        return {"global": capture_rng(),
                "generators": [g.get_state() for g in loader_generators(self.data)]}

    def _restore_rng(self, saved: dict[str, Any]) -> None:
        restore_rng(saved["global"])
        generators = loader_generators(self.data)
        if len(generators) != len(saved["generators"]):
            warnings.warn(
                f"the checkpoint holds {len(saved['generators'])} DataLoader generator "
                f"state(s) but the data now has {len(generators)}; the data order after "
                "the resume will differ", stacklevel=3,
            )
        for generator, state in zip(generators, saved["generators"]):
            generator.set_state(state)

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        received: list[str] = []

        def handler(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if received and signum == signal.SIGINT:
                raise KeyboardInterrupt(f"second signal ({name}): aborting without a checkpoint")
            if received:
                return
            received.append(name)
            print(f"[lossless_trainer] {name} received: stopping after the current step, "
                  "then saving a checkpoint. Press Ctrl-C again to abort.",
                  file=sys.stderr, flush=True)
            self.request_stop(name)

        # A handler installed outside Python reads as None and could not be restored:
        # leave such a signal alone.
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)
                    if signal.getsignal(sig) is not None}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _end_epoch(self, max_steps: int) -> None:
        if self.state.batch_in_epoch == 0:
            if self.state.step > 0 and is_one_shot(self.data):
                if max_steps != sys.maxsize:
                    warnings.warn(
                        f"the data iterator was exhausted after {self.state.step} steps, before "
                        f"max_steps={max_steps}", stacklevel=3,
                    )
                self.state.stop_reason = "data_exhausted"
                return
            raise ValueError(
                f"data yielded no batches in epoch {self.state.epoch}; check that the "
                "dataset is not empty (and, for a DataLoader with drop_last=True, that it "
                "holds at least one full batch)"
            )
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        self.hooks.call("after_epoch", self)

    def run_step(self, batches: Sequence[Any]) -> list[dict[str, torch.Tensor]]:
        """One optimizer step over `grad_accum_steps` micro-batches. No `.item()`, no sync.

        Each micro-batch's total loss is scaled by 1/len(batches), so accumulating N
        batches of size B equals one batch of N*B for mean losses. Extension point:
        hooks see the unscaled gradients in `after_backward`, before clipping and the
        update.

        Returns:
            Each micro-batch's losses, as the model returned them (unscaled).
        """
        step = self.state.step + 1
        count = len(batches)
        per_batch = []
        for i, batch in enumerate(batches, 1):
            if i < count and self._syncs_gradients:
                # Until the last micro-batch, forward and backward skip the gradient sync
                # (DDP/FSDP no_sync); the last one all-reduces the accumulated sum.
                with self._no_sync():
                    losses, total = self._forward_backward(batch, step, count)
            else:
                losses, total = self._forward_backward(batch, step, count)
            per_batch.append(losses)
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
        self.total_loss = total
        return per_batch

    def _forward_backward(self, batch: Any, step: int, count: int,
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One micro-batch of `count`: the model's checked losses and their sum, whose
        gradient (scaled by 1/count) is added to the parameters' ``.grad``."""
        batch = move_to_device(batch, self.device)
        precision = self.precision
        try:
            if precision.dtype is None:
                output = self._train_model(batch)
            else:  # autocast covers the forward, and so the model's own loss computation
                with precision.autocast():
                    output = self._train_model(batch)
        except RuntimeError as exc:  # DDP's unused-parameter error, made clear
            raise self.dist.explain(exc, step, self.model) from exc
        losses = check_losses(output, step, self._model_name)
        values = iter(losses.values())
        total = next(values)
        for loss in values:
            total = total + loss
        if self.finite_check == "step":
            self._check_finite(losses, total)
        precision.backward(total / count if count > 1 else total)
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

    def _check_finite(self, losses: dict[str, torch.Tensor], total: torch.Tensor) -> None:
        finite = bool(torch.isfinite(total))
        if self.dist.enabled:  # every rank stops together, or the others would hang
            if not self.dist.any(not finite):
                return
        elif finite:
            return
        step = self.state.step + 1
        bad = {key: step for key, loss in losses.items() if not bool(torch.isfinite(loss))}
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


def _groups(batches: Iterator[Any], size: int) -> Iterator[Sequence[Any]]:
    """Micro-batch groups of `size` (the last one may be shorter)."""
    if size == 1:
        return zip(batches)  # one-tuples, made in C: no generator frame per step
    return _accumulated(batches, size)


def _accumulated(batches: Iterator[Any], size: int) -> Iterator[list[Any]]:
    group: list[Any] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _build_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> LRScheduler | None:
    if scheduler is None:
        return None
    if not isinstance(scheduler, LRScheduler):
        if not callable(scheduler):
            raise TypeError(
                "lr_scheduler must be a torch.optim.lr_scheduler.LRScheduler or a factory "
                f"taking the optimizer, got {type(scheduler).__name__}"
            )
        scheduler = scheduler(optimizer)
        if not isinstance(scheduler, LRScheduler):
            raise TypeError(f"the lr_scheduler factory returned {type(scheduler).__name__}, "
                            "not an LRScheduler")
    if isinstance(scheduler, ReduceLROnPlateau):
        raise TypeError(
            "ReduceLROnPlateau steps on a metric, not once per optimizer step, so it cannot be "
            "the lr_scheduler; step it from a hook after each evaluation instead: "
            "scheduler.step(trainer.last_eval['val_loss']) (see docs/faq.md)"
        )
    if scheduler.optimizer is not optimizer:
        raise ValueError("lr_scheduler schedules a different optimizer than the Trainer's; "
                         "pass a factory (lambda opt: ...) so it is built on the right one")
    return scheduler


def _length(data: Any) -> int | None:
    """Batches per epoch, when the data knows without being iterated."""
    if isinstance(data, DataLoader) and isinstance(data.dataset, IterableDataset):
        return None  # len() would warn later, or raise for datasets without __len__
    try:
        return len(data)
    except TypeError:
        return None


def _is_stateful(data: Any) -> bool:
    """Data that saves and restores its own position (e.g. torchdata's StatefulDataLoader)."""
    return callable(getattr(data, "state_dict", None)) and callable(
        getattr(data, "load_state_dict", None))


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy (when installed) and torch on every device."""
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # numpy is optional
        pass
    else:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _build_optimizer(optimizer: Any, model: nn.Module) -> torch.optim.Optimizer:
    if optimizer is None:
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if not isinstance(optimizer, torch.optim.Optimizer):
        if not callable(optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer or a factory taking the model's "
                f"parameters, got {type(optimizer).__name__}"
            )
        built = optimizer(model.parameters())
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(
                f"the optimizer factory returned {type(built).__name__}, not a "
                "torch.optim.Optimizer"
            )
        return built
    model_params = {id(p) for p in model.parameters()}
    foreign = sum(id(p) not in model_params
                  for group in optimizer.param_groups for p in group["params"])
    if foreign:
        raise ValueError(
            f"the optimizer holds {foreign} tensor(s) that are not parameters of "
            f"{type(model).__name__}; build it from this model's parameters, or pass a "
            "factory such as functools.partial(torch.optim.SGD, lr=0.1)"
        )
    return optimizer


def _fresh_run_dir(root: str = "runs") -> str:
    """Create and return ``root/<date>-<time>[-n]``; creating it reserves the name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(root, exist_ok=True)
    for suffix in range(10_000):
        path = os.path.join(root, f"{stamp}-{suffix}" if suffix else stamp)
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free run directory name under {root!r} for {stamp}")

