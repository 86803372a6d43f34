"""The pieces of a training step that every step reuses, `Trainer`'s and a custom one's,
so that none re-implements them: micro-batches on the device with the gradient sync
skipped until the last (`StepPieces.accumulate`), the model called through its
distributed wrapper under autocast with its losses checked (`compute_losses`), the
point between the backward and the optimizer step (`after_backward`), and optimizer
states as checkpoints hold them. With `Precision` (backward, unscale and step for any
number of optimizers), `clip_gradients` and `check_finite`, a step keeps bf16, fp16,
accumulation and DDP/FSDP working. docs/custom-trainers.md shows one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .data import move_to_device
from .means import Mean
from .model import call_error, check_losses
from .precision import Precision
from .state import TrainState

if TYPE_CHECKING:
    from .checkpointer import Checkpointer
    from .distributed import Distributed
    from .logbook import Logbook

__all__ = ["StepPieces"]


class StepPieces:
    """What a step reuses, as methods of the trainer (`TrainerBase` mixes this in).

    Assumptions: `TrainerBase` set the attributes annotated here; a step calls these
    from `run_step`, while `fit` runs (or `compute_losses` outside it, for a test).
    """

    model: nn.Module
    device: torch.device
    dist: Distributed
    precision: Precision
    state: TrainState
    logbook: Logbook
    checkpointer: Checkpointer
    _train_model: nn.Module
    _wrapped_no_sync: Any
    _model_name: str
    _first_step: int
    _after_backward: list[Any]

    def accumulate(self, batches: Sequence[Any]) -> Iterable[Any]:
        """Each micro-batch of a step, moved to the device; run its forward and backward
        in the body of a ``for`` loop over this. All but the last run inside DDP's
        (FSDP's) ``no_sync``, so the gradients are all-reduced once, with the last
        backward."""
        if len(batches) == 1:  # nothing to accumulate: no generator (a few µs a step)
            return (move_to_device(batches[0], self.device),)
        return self._accumulated(batches)

    def _accumulated(self, batches: Sequence[Any]) -> Iterator[Any]:
        last = len(batches) - 1
        for i, batch in enumerate(batches):
            batch = move_to_device(batch, self.device)
            if i == last or (not self.dist.enabled and self._wrapped_no_sync is None):
                yield batch
            else:
                with self.dist.no_sync(self._train_model) if self.dist.enabled \
                        else self._wrapped_no_sync():  # a DDP the user built
                    yield batch

    def compute_losses(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor | Mean]:
        """Call the model (under torchrun its DDP or FSDP wrapper, which syncs gradients)
        with `args`, under `precision`'s autocast, and check its losses (`check_losses`):
        an error names the key and the step; a first call that fails says how the model
        was called."""
        step = self.state.step + 1
        try:
            if self.precision.dtype is None:
                output = self._train_model(*args, **kwargs)
            else:  # autocast covers the forward, and so the model's own loss computation
                with self.precision.autocast():
                    output = self._train_model(*args, **kwargs)
        except Exception as exc:
            error = call_error(exc, args[0] if args else kwargs, step, self._first_step,
                               self._model_name, self.dist, self.model)
            if error is exc:
                raise
            raise error from exc
        return check_losses(output, step, self._model_name)

    def after_backward(self) -> None:
        """Call when the step's gradients are complete (and unscaled), before an optimizer
        steps: under torchrun the last flush's record lands here (its NaN check raises
        before the weights change), and the `after_backward` hooks see the gradients."""
        self.logbook.land()
        for hook in self._after_backward:
            hook(self)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` as this run's checkpoints hold it: under FSDP
        gathered whole, or each rank's shards in a sharded checkpoint. Call it in
        `state_dict` (every rank) and put the result at the top level of the state."""
        return self.checkpointer.optimizer_state(self.model, optimizer)

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        """Load what `optimizer_state_dict` returned, in `load_state_dict`."""
        self.checkpointer.load_optimizer_state(self.model, optimizer, state)

