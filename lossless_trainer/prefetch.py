"""Batches copied to the accelerator on a side stream, so the copy overlaps the step before.

Without it, a batch's host-to-device copy runs on the step's own stream: it waits for
the previous step's kernels and the next step's kernels wait for it, and from pageable
(unpinned) memory it even blocks the host until the previous step has finished. With
it, on CUDA:

* each batch is pinned (unless the loader pinned it already) and copied with
  ``non_blocking=True`` on a side stream, as soon as the fit loop takes it from the
  data, which is while the device still runs the previous step's queued kernels;
* before the batch's forward, the step's stream waits on the copy's event: a wait on the
  device, not on the host;
* each copied tensor is recorded on the step's stream, so the caching allocator does not
  reuse its memory while the step still reads it.

Batches are taken from the data exactly when they would be without prefetching (no
batch is read ahead on the host), so the data position, the RNG draws of in-process
loading, stateful loaders, exact resume, gradient accumulation and DDP/FSDP are all as
before. On a CPU device it does nothing.

The stream operations are behind `Streams`; the ordering logic here is tested on CPU
with a stand-in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch.utils import _pytree as pytree

from .data import move_to_device

__all__ = ["DevicePrefetch", "Streams"]


class Streams(Protocol):
    """What prefetching needs from a device's streams."""

    def copy(self, batch: Any) -> tuple[Any, Any]:
        """Start copying `batch` to the device off the step's stream: the moved batch
        (usable once `wait` was called) and a token for `wait`."""

    def wait(self, moved: Any, token: Any) -> None:
        """Make the step's stream wait for the copy `token` stands for, and keep the
        moved tensors' memory until the step's stream is done with them."""


class CudaStreams:
    """`Streams` of one CUDA device: a side stream for copies, events to wait on.

    Args:
        device: The CUDA device batches go to.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def copy(self, batch: Any) -> tuple[Any, Any]:
        batch = pytree.tree_map_only(torch.Tensor, _pinned, batch)
        # The copy must not start before the step's stream is done with what it reads,
        # which for a fresh host batch is nothing: the side stream need not wait.
        with torch.cuda.stream(self.stream):
            moved = move_to_device(batch, self.device)
            event = torch.cuda.Event()
            event.record(self.stream)
        return moved, event

    def wait(self, moved: Any, token: Any) -> None:
        current = torch.cuda.current_stream(self.device)
        current.wait_event(token)
        for tensor in pytree.tree_leaves(moved):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda":
                tensor.record_stream(current)


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in pinned host memory, so its copy to the device is asynchronous."""
    if tensor.device.type != "cpu" or tensor.is_pinned():
        return tensor
    return tensor.pin_memory()


class DevicePrefetch:
    """Starts each batch's copy to the device when the fit loop takes it, and makes the
    step wait for it (on the device) just before the batch's forward.

    Who calls what: the fit loop wraps the open epoch's batches with `batches`, and calls
    `ready` with each step's micro-batches before the step's hooks and forwards.

    Args:
        device: The device batches go to.
        enabled: Whether to prefetch: ``"auto"`` (on CUDA), True or False. Only CUDA
            devices have a side stream; elsewhere it does nothing.
        streams: The streams to use (tests pass a stand-in). Default: the device's.
    """

    def __init__(self, device: torch.device, enabled: bool | str = "auto",
                 streams: Streams | None = None) -> None:
        if enabled not in ("auto", True, False):
            raise ValueError(f"prefetch={enabled!r}: use 'auto', True or False")
        self.device = device
        if streams is None and enabled is not False and device.type == "cuda":
            streams = CudaStreams(device)
        self.streams = streams if enabled is not False else None
        self.active = self.streams is not None  # read by the fit loop at every step
        self._copies: deque[tuple[Any, Any]] = deque()  # (moved batch, token), in order

    def batches(self, batches: Iterator[Any]) -> Iterator[Any]:
        """`batches`, each with its copy started as it is taken."""
        if self.streams is None:
            return batches
        return map(self._start, batches)

    def _start(self, batch: Any) -> Any:
        moved, token = self.streams.copy(batch)  # type: ignore[union-attr]
        self._copies.append((moved, token))
        return moved

    def ready(self, group: list[Any] | tuple[Any, ...]) -> None:
        """Make the step's stream wait for the copies of a step's micro-batches, before
        anything (a hook, the forward) reads them. A batch whose copy this did not start
        passes as it is; copies older than the group's (batches never trained on, from a
        step that failed half way) are dropped."""
        copies = self._copies
        for batch in group:
            if not any(moved is batch for moved, _ in copies):
                continue
            while True:
                moved, token = copies.popleft()
                if moved is batch:
                    self.streams.wait(moved, token)  # type: ignore[union-attr]
                    break

    def reset(self) -> None:
        """Forget copies of batches not trained on (at the end of a fit)."""
        self._copies.clear()
