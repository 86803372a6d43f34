"""Batches: moving them to the device, sizing them, and telling re-iterable data apart."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["batch_size", "is_one_shot", "move_to_device"]


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Return `batch` with every tensor in it on `device`.

    Recurses into mappings, lists, tuples, named tuples and dataclass instances, and
    rebuilds them with the same type. Anything else (strings, numbers, custom objects) is
    returned as it is. Tensors already on `device` are not copied, and a container whose
    contents did not move is returned itself; copies from pinned memory to an
    accelerator are asynchronous. The input is never modified.
    """
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, (list, tuple)):
        if all(type(item) is torch.Tensor and item.device == device for item in batch):
            return batch  # the common (inputs, targets) case, already in place
        moved = [move_to_device(item, device) for item in batch]
        if all(new is old for new, old in zip(moved, batch)):
            return batch  # already there: skip rebuilding the container
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
            return type(batch)(*moved)
        return moved if type(batch) is list else type(batch)(moved)
    if isinstance(batch, Mapping):
        moved_items = {key: move_to_device(value, device) for key, value in batch.items()}
        if all(moved_items[key] is value for key, value in batch.items()):
            return batch
        if type(batch) is dict:
            return moved_items
        try:
            return type(batch)(moved_items)
        except TypeError:  # a mapping type whose constructor wants more (defaultdict)
            return moved_items
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: move_to_device(getattr(batch, f.name), device)
                   for f in dataclasses.fields(batch) if f.init}
        if all(value is getattr(batch, name) for name, value in changes.items()):
            return batch
        return dataclasses.replace(batch, **changes)
    return batch


def batch_size(batch: Any) -> int | None:
    """Leading dimension of the first tensor found in `batch`, or None if there is none."""
    while True:
        if isinstance(batch, torch.Tensor):
            return int(batch.shape[0]) if batch.ndim else None
        if isinstance(batch, (list, tuple)) and batch:
            batch = batch[0]
        elif isinstance(batch, Mapping) and batch:
            batch = next(iter(batch.values()))
        elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
            fields = dataclasses.fields(batch)
            if not fields:
                return None
            batch = getattr(batch, fields[0].name)
        else:
            return None


def is_one_shot(data: Iterable[Any]) -> bool:
    """True for iterators and generators, which yield their batches only once.

    Decided from the type alone: calling `iter` on a DataLoader would start workers and
    draw from the global RNG.
    """
    return isinstance(data, Iterator)
