"""The options of `TrainerBase` and `Trainer`: checking them before anything is built,
and naming a fresh run directory (the optimizers and schedulers are built in
optimizers.py).

`check_step_options` and `check_options` run first, before the model moves or a file is
written; the builders check what can only be checked once the model is placed. Every
error says which option was wrong, what it got and what would work.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .data import is_one_shot
from .optimizers import check_optimizer_options
from .precision import PRECISIONS

__all__ = ["check_options", "check_step_options", "check_strategy", "epoch_limit",
           "fresh_run_dir", "planned_steps", "step_limit"]


def check_options(model: Any, data: Any, *, max_steps: Any, max_epochs: Any, log_every: Any,
                  checkpoint_every: Any, grad_accum_steps: Any, eval_every: Any,
                  eval_data: Any, keep_last: Any, resume: Any, batch_size: Any = None,
                  async_checkpoint: Any = False, checkpoint_format: Any = "auto",
                  prefetch: Any = "auto") -> None:
    """Raise `TypeError`/`ValueError` for the first of the loop's options (`TrainerBase`)
    that cannot work."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an iterable of batches (a DataLoader, a list, a generator), "
            f"got {type(data).__name__}"
        )
    for name, value in (("max_steps", max_steps), ("max_epochs", max_epochs),
                        ("checkpoint_every", checkpoint_every), ("eval_every", eval_every)):
        _check_positive(name, value, allow_none=True)
    _check_positive("log_every", log_every)
    _check_positive("grad_accum_steps", grad_accum_steps)
    if eval_every is not None and eval_data is None:
        raise ValueError("eval_every is set but there is no eval_data to evaluate on")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"keep_last must be an int >= 0, got {keep_last!r}")
    if keep_last == 0 and checkpoint_every is not None:
        raise ValueError("checkpoint_every is set but keep_last=0 keeps no checkpoint")
    if resume is not False and not isinstance(resume, (str, os.PathLike)):
        raise ValueError(f"resume must be 'auto', False or a checkpoint path, got {resume!r}")
    if batch_size is not None and not callable(batch_size):
        raise TypeError(f"batch_size must be a function batch -> number of samples (or None "
                        f"when unknown), got {type(batch_size).__name__}")
    if not isinstance(async_checkpoint, bool):
        raise TypeError(f"async_checkpoint must be True or False, got {async_checkpoint!r}")
    if checkpoint_format not in ("auto", "full", "sharded"):
        raise ValueError("checkpoint_format must be 'auto', 'full' or 'sharded', got "
                         f"{checkpoint_format!r}")
    if prefetch not in ("auto", True, False) or type(prefetch) not in (str, bool):
        raise ValueError(f"prefetch must be 'auto', True or False, got {prefetch!r}")
    if is_one_shot(data) and max_epochs is not None and max_epochs > 1:
        raise ValueError(
            f"data is a one-shot iterator ({type(data).__name__}) and can only be read "
            f"once, but max_epochs={max_epochs}. Pass a re-iterable (a list, a "
            "DataLoader, or an object whose __iter__ starts a new pass), or use max_steps"
        )


def check_step_options(*, optimizer: Any, lr_scheduler: Any, precision: Any,
                       clip_grad_norm: Any, clip_grad_value: Any, finite_check: Any,
                       compile: Any) -> None:  # noqa: A002
    """Raise `TypeError`/`ValueError` for the first of the standard step's options
    (`Trainer`) that cannot work, before the loop's are checked or anything is built
    (what needs the model is checked when the optimizer and the scheduler are built)."""
    check_optimizer_options(optimizer, lr_scheduler)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    for name, clip in (("clip_grad_norm", clip_grad_norm),
                       ("clip_grad_value", clip_grad_value)):
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                                 or not clip > 0):
            raise ValueError(f"{name} must be a positive number, got {clip!r}")
    if finite_check not in ("flush", "step"):
        raise ValueError(f"finite_check must be 'flush' or 'step', got {finite_check!r}")
    if compile and not isinstance(compile, (bool, dict)):
        raise TypeError(f"compile must be a bool or a dict of torch.compile options, "
                        f"got {type(compile).__name__}")


def check_strategy(strategy: str | None, optimizer: Any, precision: str) -> None:
    """Refuse the options a distributed strategy cannot honour (`strategy` as resolved:
    None when not distributed)."""
    if strategy != "fsdp":
        return
    entries = optimizer.values() if isinstance(optimizer, dict) else \
        optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    if any(isinstance(entry, torch.optim.Optimizer) for entry in entries):
        raise ValueError(
            "strategy='fsdp' replaces the model's parameters with sharded ones, so an "
            "optimizer built beforehand would update the old ones; pass a factory "
            "instead, e.g. optimizer=functools.partial(torch.optim.AdamW, lr=1e-3)"
        )
    if precision == "fp16":
        raise ValueError("precision='fp16' is not supported with strategy='fsdp' "
                         "(its loss scaling would differ between shards); use 'bf16'")


def epoch_limit(max_epochs: int | None, max_steps: int | None, data: Any) -> int | None:
    """The epochs `fit` may run: no limit at all means one epoch, except for a one-shot
    iterator, which then runs until it is exhausted (None: no epoch limit)."""
    if max_epochs is None and max_steps is None and not is_one_shot(data):
        return 1
    return max_epochs


def step_limit(max_steps: int | None) -> int:
    """`max_steps` as a number the loop compares with (no limit: the largest int)."""
    return sys.maxsize if max_steps is None else max_steps


def planned_steps(batches: int | None, grad_accum_steps: int, max_epochs: int | None,
                  max_steps: int | None) -> int | None:
    """Optimizer steps `fit` will run in all, when known: `batches` per epoch (None if
    unknown) in groups of `grad_accum_steps`, for `max_epochs`, capped by `max_steps`."""
    # An epoch's leftover micro-batches make one more, shorter step.
    per_epoch = -(-batches // grad_accum_steps) if batches else None
    by_epochs = per_epoch * max_epochs if per_epoch and max_epochs else None
    if max_steps is not None and by_epochs is not None:
        return min(max_steps, by_epochs)
    return max_steps if max_steps is not None else by_epochs


def fresh_run_dir(root: str = "runs") -> str:
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


def _check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
