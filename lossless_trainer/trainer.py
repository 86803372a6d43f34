"""The Trainer: the standard step on `TrainerBase` (loop.py), and nothing else.

The optimizers (one, a list, or a dict keyed by loss name: optimizers.py) and their
schedulers, precision, accumulation, clipping, exact means (`Mean`),
the finite check and compile. Everything else of the run is `TrainerBase`'s and its
components' (see docs/architecture.md); the pieces the step is made of are
`StepPieces`' (step.py), which a custom step reuses the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from .evaluation import Evaluator
from .hooks import Hook
from .loop import TrainerBase
from .means import Mean, Normaliser, split_losses
from .model import check_finite
from .optimizers import Optimizers
from .options import check_step_options, check_strategy
from .precision import Precision
from .state import TrainState
from .writers import Writer, WriterFactory

__all__ = ["TrainState", "Trainer"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Trainer(TrainerBase):
    """Trains a model that returns its own losses: the standard step, on `TrainerBase`.

    The only assumptions made here: the model, in training mode, maps a batch to a dict of
    scalar losses; one optimizer updates the parameters, or several, each its own part.
    The trainer never splits a batch into inputs and labels, never sees predictions, and
    never applies a loss function.
    Each step (`run_step`) backpropagates every micro-batch's summed losses, then
    unscales, clips and steps. The run around it (the loop, hooks, logging, checkpoints,
    resume, evaluation, torchrun) is `TrainerBase`'s; its options are documented here.

    Args:
        model: An `nn.Module` honouring the contract (see `Model`). Moved to `device`.
        data: Any iterable of batches: a DataLoader, a list, a generator. Each batch is
            moved to the device and passed whole to ``model(batch)``.
        optimizer: An optimizer over the model's parameters, or a factory called with
            ``model.parameters()``. Default: ``torch.optim.AdamW`` with lr 1e-3. Or
            several, each over its own part of the trainable parameters (checked when
            `fit` starts), each given or a factory called with the model: a list steps
            them all; a dict's optimizer ``"d"`` steps only at the steps whose losses
            include ``"d"`` or ``"d/<anything>"`` (see `current_step`). One backward
            either way; see docs/trainer.md.
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
            before clipping is logged as ``grad_norm`` (``grad_norm/<name>``: each of
            several optimizers' parameters are clipped on their own, as is the value).
        clip_grad_value: Clip each gradient element to ``[-x, x]``, after unscaling.
        lr_scheduler: A scheduler over `optimizer`, or a factory called with the
            optimizer. Stepped once per optimizer step; its state is checkpointed. With
            several optimizers: a dict (a list) of them or None by optimizer, or one
            factory called with each; each steps when its optimizer does.
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
        optimizer: torch.optim.Optimizer | OptimizerFactory | Sequence[Any]
        | dict[str, Any] | None = None,
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
        lr_scheduler: LRScheduler | Callable[[torch.optim.Optimizer], LRScheduler]
        | Sequence[Any] | dict[str, Any] | None = None,
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
        check_step_options(optimizer=optimizer, lr_scheduler=lr_scheduler, precision=precision,
                           clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value,
                           finite_check=finite_check, compile=compile)
        super().__init__(
            model, data, max_steps=max_steps, max_epochs=max_epochs, log_dir=log_dir,
            log_every=log_every, seed=seed, device=device, callbacks=callbacks,
            writers=writers, progress=progress, eval_data=eval_data, eval_every=eval_every,
            evaluators=evaluators, checkpoint_every=checkpoint_every, keep_last=keep_last,
            async_checkpoint=async_checkpoint, checkpoint_format=checkpoint_format,
            resume=resume, handle_signals=handle_signals, strategy=strategy,
            find_unused_parameters=find_unused_parameters, fsdp_units=fsdp_units,
            batch_size=batch_size, prefetch=prefetch, grad_accum_steps=grad_accum_steps)
        check_strategy(self.dist.strategy, optimizer, precision)
        if compile:  # in place (the wrapper calls it), so checkpoints keep their keys
            self.model.compile(**(compile if isinstance(compile, dict) else {}))
        self._optimizers = opts = Optimizers(optimizer, lr_scheduler, self.model, self.dist)
        self.optimizer, self.lr_scheduler = opts.optimizer, opts.lr_scheduler
        self.optimizers = opts.named
        self.precision = Precision(precision, self.device)
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value
        self._clipping = clip_grad_norm is not None or clip_grad_value is not None
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.finite_check = finite_check
        # Divides each `Mean` term by the step's count over every micro-batch and rank.
        self._means = Normaliser(self.model, self.dist, self._model_name)

    # -- the step ---------------------------------------------------------------------------

    def run_step(self, batches: Sequence[Any]) -> dict[str, torch.Tensor | Mean]:
        """One optimizer step over `grad_accum_steps` micro-batches. No `.item()`, no sync.

        Each micro-batch's plain losses are scaled by 1/len(batches), so accumulating N
        batches of size B equals one batch of N*B for mean losses; each `Mean` term is
        divided by the step's count of its key (over every micro-batch and rank), so it
        is the global mean. Hooks see the unscaled gradients in `after_backward`, before
        clipping and the update.

        Returns:
            The last micro-batch's losses, as the model returned them; `micro_losses`
            holds every micro-batch's.
        """
        step, count = self.state.step + 1, len(batches)
        means = self._means if self._means.active else None
        if means is not None and means.count_items is not None:
            means.begin(batches, step)  # the counts, and their all-reduce, before any forward
        for batch in self.accumulate(batches):  # all but the last without gradient sync
            self.losses = losses = self.compute_losses(batch)
            self.micro_losses.append(losses)
            self._backward(losses, step, count, means)
        if means is not None and (self.sink.flush_due or self.finite_check == "step"):
            means.check()  # count_items against the forwards' counts: one read per flush
        precision, opts = self.precision, self._optimizers
        stepping = opts.stepping(self.micro_losses, step)  # a dict's: by the losses
        precision.unscale(*stepping)
        self.after_backward()  # the flush in flight lands; hooks see the gradients
        if self._clipping:  # the norms before clipping, logged on the device
            opts.clip(stepping, self._params, self.clip_grad_norm, self.clip_grad_value,
                      self.sink.put_scalar)
        precision.step(*stepping)
        opts.finish(stepping)  # their schedulers step; every gradient is dropped
        return losses

    def _backward(self, losses: dict[str, Any], step: int, count: int,
                  means: Normaliser | None) -> None:
        """Backpropagate one micro-batch of `count`: its plain losses over `count`, each
        `Mean` term over the step's count of its key (`Normaliser.objective`); with
        ``finite_check="step"``, after checking the objective."""
        total, terms = split_losses(losses)
        if terms is None and means is None:  # plain losses only: the step as it always was
            if self.finite_check == "step":
                check_finite(losses, total, step, self.dist)
            self.precision.backward(total / count if count > 1 else total)
            return
        objective = self._means.objective(total, terms, count, step)
        if self.finite_check == "step":
            check_finite(losses, objective, step, self.dist)
        self.precision.backward(objective)

    def fit(self) -> TrainState:
        """`TrainerBase.fit`, once several optimizers are checked to share out the
        trainable parameters (`Optimizers.check_parameters`)."""
        self._optimizers.check_parameters(self.model, self._model_name)
        return super().fit()

    def after_loop(self) -> None:
        """The `Mean` count check of what the last flush did not cover."""
        self._means.check()

    # -- the state a checkpoint holds -------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """`TrainerBase.state_dict`, with the optimizers (and what they were built with)
        and schedulers by name (`Optimizers.state_dict`) and the agreed `Mean` keys.
        Under torchrun every rank calls it; with FSDP the optimizers are gathered too."""
        self._means.check()  # a checkpoint does not carry a miscount past its step
        state = super().state_dict()
        state.update(self._optimizers.state_dict(self.optimizer_state_dict),
                     means=self._means.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned. A checkpoint of other optimizer names or
        classes is refused before anything changes; changed hyperparameters are this
        run's, with a warning, except a changed lr under a scheduler, which is refused
        (`Optimizers.check_state`).

        Raises:
            ValueError: the checkpoint does not fit this run.
        """
        changes = self._optimizers.check_state(state)  # before anything changes
        super().load_state_dict(state)
        self._optimizers.load_state_dict(state, self.load_optimizer_state_dict, changes)
        self._means.load_state_dict(state.get("means", {}))
