"""Gradients between the backward and the optimizer step: clipping, and the norm that is
logged. A step calls `clip_gradients` on unscaled gradients (`Precision.unscale` first)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["clip_gradients"]


def clip_gradients(params: Sequence[nn.Parameter], max_norm: float | None = None,
                   max_value: float | None = None) -> torch.Tensor:
    """Clip the gradients of `params`: each element to ``[-max_value, max_value]``, then
    their total norm to `max_norm` (give one or both).

    Returns:
        The total norm before clipping, on the device (no sync), to log: under FSDP the
        norm over every rank's shards.
    """
    if max_norm is None and max_value is None:
        raise ValueError("clip_gradients needs max_norm, max_value or both")
    if max_value is None:  # clip_grad_norm_ returns the norm before clipping
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # type: ignore[arg-type]
    else:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:  # nothing reached these parameters this step
            return torch.zeros((), device=params[0].device if params else None)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                     for g in grads]))
        torch.nn.utils.clip_grad_value_(params, max_value)
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor; the norm is already global
        norm = norm.full_tensor()
    return norm
