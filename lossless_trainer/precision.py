"""The precision policy: autocast for the forward (and so the model's own loss), and a
GradScaler for fp16. Every training step calls it, the Trainer's and a custom one's;
there is no second, AMP copy of a step, and hooks and clipping see gradients after
unscaling."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

__all__ = ["Precision"]

PRECISIONS = ("32", "bf16", "fp16")
NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it does nothing


class Precision:
    """How the step computes: ``"32"`` (no autocast), ``"bf16"`` or ``"fp16"``.

    Assumptions: the forward runs inside `autocast()`; `backward` is called once per
    micro-batch, then `unscale` once with the optimizers about to step, then `step` with
    them (any number; the fp16 scale is updated once per call). A step that updates
    different parameters in turn (a GAN's discriminator, then its generator) runs that
    sequence once per update.

    Args:
        mode: ``"32"``, ``"bf16"`` or ``"fp16"``.
        device: The training device; autocast uses its type (``cuda``, ``cpu``...).
    """

    def __init__(self, mode: str, device: torch.device) -> None:
        if mode not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {mode!r}")
        self.mode = mode
        self.device = device
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        if self.dtype is not None and not torch.amp.is_autocast_available(device.type):
            raise ValueError(f"precision={mode!r}: autocast is not available on {device.type}")
        # Loss scaling only matters for fp16, whose range is too small for gradients.
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
        self.skipped_steps: torch.Tensor | None = None  # on the device, no sync to count

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the forward runs in."""
        if self.dtype is None:
            return NO_CONTEXT
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss`, scaled for fp16."""
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()

    def unscale(self, *optimizers: torch.optim.Optimizer) -> None:
        """Bring the gradients of `optimizers` back to their true scale, before hooks and
        clipping see them."""
        if self.scaler is not None:
            for optimizer in optimizers:
                self.scaler.unscale_(optimizer)

    def step(self, *optimizers: torch.optim.Optimizer) -> None:
        """Step `optimizers`; with fp16, skip those whose gradients are not finite, update
        the scale once, and count a step whose scale went down as skipped, on the
        device. An optimizer that `unscale` found without any gradient is left alone
        (as its own step would do nothing), where the GradScaler would raise."""
        if self.scaler is None:
            for optimizer in optimizers:
                optimizer.step()
            return
        scaler = self.scaler
        # get_scale() would sync; compare the scale tensor on the device instead.
        before = scaler._scale.clone()  # noqa: SLF001
        stepped = False
        for optimizer in optimizers:
            state = scaler._per_optimizer_states[id(optimizer)]  # noqa: SLF001
            if state["stage"] is OptState.UNSCALED and not state["found_inf_per_device"]:
                continue  # unscaled and found no gradient: nothing to step
            scaler.step(optimizer)
            stepped = True
        if not stepped:  # no gradient at all: no scale to update, nothing skipped
            scaler._per_optimizer_states.clear()  # noqa: SLF001 - as update() would
            return
        scaler.update()
        skipped = (self.scaler._scale < before).to(torch.int64)  # noqa: SLF001
        self.skipped_steps = skipped if self.skipped_steps is None else self.skipped_steps + skipped

    def state_dict(self) -> dict[str, Any]:
        """The GradScaler's state and the skipped-step count (empty unless fp16)."""
        if self.scaler is None:
            return {}
        return {"scaler": self.scaler.state_dict(),
                "skipped_steps": 0 if self.skipped_steps is None else self.skipped_steps.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state["scaler"])
            skipped = state["skipped_steps"]
            # On the training device: a loaded GradScaler has no scale tensor to follow
            # until its first step.
            self.skipped_steps = (skipped.to(self.device)
                                  if isinstance(skipped, torch.Tensor) else None)
