"""The Trainer: options, the fit loop, and the one training step."""

from __future__ import annotations

import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .data import is_one_shot, move_to_device
from .errors import NonFiniteLossError
from .hooks import Hook, HookList, LoggingHook, ProgressHook
from .model import check_losses
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
        seed: Seeds Python, NumPy and torch (all devices) when `fit` starts.
        device: Where to train. Default: CUDA if available, else CPU.
        callbacks: Extra `Hook`s.
        progress: Show a progress bar (plain lines when stdout is not a terminal).
        finite_check: ``"flush"`` (default) checks losses for NaN/Inf on the device and
            raises at the next flush, with no per-step sync. ``"step"`` checks every step
            before the optimizer step (one sync per step), so a non-finite loss never
            updates the weights.
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
        if finite_check not in ("flush", "step"):
            raise ValueError(f"finite_check must be 'flush' or 'step', got {finite_check!r}")
        if is_one_shot(data) and max_epochs is not None and max_epochs > 1:
            raise ValueError(
                f"data is a one-shot iterator ({type(data).__name__}) and can only be read "
                f"once, but max_epochs={max_epochs}. Pass a re-iterable (a list, a "
                "DataLoader, or an object whose __iter__ starts a new pass), or use max_steps"
            )

        self.device = _resolve_device(device)
        self.model = model.to(self.device)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        self.optimizer = _build_optimizer(optimizer, self.model)
        self.data = data
        self.max_steps = max_steps
        # No limit at all means one epoch; a one-shot iterator then runs until exhausted.
        unlimited = max_epochs is None and max_steps is None and not is_one_shot(data)
        self.max_epochs = 1 if unlimited else max_epochs
        self.log_dir = os.fspath(log_dir) if log_dir is not None else _fresh_run_dir()
        self.log_every = log_every
        self.seed = seed
        self.finite_check = finite_check

        self.state = TrainState()
        self.sink = SummarySink()
        # Per-step values hooks may read. `batch` is as the data yielded it.
        self.batch: Any = None
        self.losses: dict[str, torch.Tensor] = {}
        self.total_loss: torch.Tensor | None = None
        self.last_summary: SummaryRecord | None = None

        builtin: list[Hook] = [LoggingHook()]
        if progress:
            builtin.append(ProgressHook())
        self.hooks = HookList([*builtin, *callbacks])
        self._after_backward = self.hooks.bound("after_backward")
        self._stop_request: str | None = None
        self._model_name = type(model).__name__

    @property
    def total_steps(self) -> int | None:
        """Steps `fit` will run in all, when known (for progress and ETA)."""
        per_epoch = len(self.data) if hasattr(self.data, "__len__") else None  # type: ignore[arg-type]
        by_epochs = per_epoch * self.max_epochs if per_epoch and self.max_epochs else None
        if self.max_steps is not None and by_epochs is not None:
            return min(self.max_steps, by_epochs)
        return self.max_steps if self.max_steps is not None else by_epochs

    def request_stop(self, reason: str = "requested") -> None:
        """Ask `fit` to stop after the current step. Hooks call this (early stopping)."""
        self._stop_request = reason

    def make_writers(self) -> BackgroundWriter:
        """The writers summaries go to. Extension point: override to add or replace sinks."""
        os.makedirs(self.log_dir, exist_ok=True)
        return BackgroundWriter([
            TensorBoardWriter(self.log_dir),
            JSONLinesWriter(os.path.join(self.log_dir, "metrics.jsonl")),
        ])

    def fit(self) -> TrainState:
        """Train until `max_steps` or `max_epochs` (see the class docs) or a stop request.

        Returns:
            The final `TrainState`; its `stop_reason` says why training ended.
        """
        if self.seed is not None:
            seed_everything(self.seed)
        self.state.stop_reason = self._stop_request = None
        hooks, state, sink = self.hooks, self.state, self.sink
        before_step, after_step = hooks.bound("before_step"), hooks.bound("after_step")
        max_steps = self.max_steps if self.max_steps is not None else sys.maxsize
        max_epochs = self.max_epochs if self.max_epochs is not None else sys.maxsize
        # The last step is a summary step too, so media written there are kept.
        last_step = self.total_steps or max_steps
        self.model.train()
        with self.sink.activate():
            try:
                hooks.call("before_train", self)
                while state.stop_reason is None:
                    if state.step >= max_steps:
                        state.stop_reason = "max_steps"
                        break
                    if state.epoch >= max_epochs:
                        state.stop_reason = "max_epochs"
                        break
                    hooks.call("before_epoch", self)
                    for batch in self.data:
                        step = state.step + 1
                        sink.begin_step(step, step % self.log_every == 0 or step == last_step)
                        self.batch = batch
                        for hook in before_step:
                            hook(self)
                        self.losses = self.run_step(batch)
                        state.step = step
                        state.batch_in_epoch += 1
                        for hook in after_step:
                            hook(self)
                        if self._stop_request is not None or step >= max_steps:
                            state.stop_reason = self._stop_request or "max_steps"
                            break
                    else:
                        self._end_epoch(max_steps)
            except BaseException as exc:
                self.batch = None
                self.hooks.teardown("on_exception", self, exc)
                self.hooks.teardown("after_train", self)  # failures logged; exc wins
                raise
            self.batch = None
            errors = self.hooks.teardown("after_train", self)
        if errors:
            raise errors[0]
        return self.state

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

    def run_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """One optimizer step on one batch. No `.item()`, no device sync.

        Extension point: hooks see gradients in `after_backward`, before the update.
        """
        batch = move_to_device(batch, self.device)
        losses = check_losses(self.model(batch), self.state.step + 1, self._model_name)
        values = iter(losses.values())
        total = next(values)
        for loss in values:
            total = total + loss
        if self.finite_check == "step":
            self._check_finite(losses, total)
        total.backward()
        for hook in self._after_backward:
            hook(self)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.total_loss = total
        return losses

    def _check_finite(self, losses: dict[str, torch.Tensor], total: torch.Tensor) -> None:
        if bool(torch.isfinite(total)):
            return
        step = self.state.step + 1
        bad = {key: step for key, loss in losses.items() if not bool(torch.isfinite(loss))}
        raise NonFiniteLossError(
            f"non-finite loss (NaN or Inf) at step {step}: "
            f"{', '.join(repr(k) for k in bad) or 'the total'}. The optimizer did not step; "
            "the weights are those of the previous step",
            bad,
        )


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


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # Normalise "cuda" to "cuda:<current>" so device comparisons on tensors are exact.
    return torch.empty(0, device=device).device


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

