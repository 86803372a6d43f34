"""Batches: moving them to the device, sizing them, picking parts of them, grouping them
into micro-batches, and the DataLoader utilities the trainer needs (rebuilding a loader
with another sampler, its generators, its epoch).

Resuming in the middle of an epoch is resume.py's job; this module knows nothing of
checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from .errors import ModelOutputError

__all__ = [
    "Selector",
    "batch_size",
    "is_one_shot",
    "length",
    "loader_generators",
    "micro_batch_groups",
    "move_to_device",
    "rebuild_loader",
    "select",
    "set_epoch",
]


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Return `batch` with every tensor in it on `device`.

    Recurses into mappings, lists, tuples, named tuples and dataclass instances, and
    rebuilds them with the same type. Anything else (strings, numbers, custom objects) is
    returned as it is. Tensors already on `device` are not copied, and a container whose
    contents did not move is returned itself; copies from pinned memory to an
    accelerator are asynchronous. The input is never modified.
    """
    kind = type(batch)
    if kind is tuple or kind is list:  # checked by exact type first: cheaper than isinstance
        for item in batch:  # fast path: (inputs, targets) already on the device
            if type(item) is not torch.Tensor or item.device != device:
                break
        else:
            return batch
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, (list, tuple)):
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
    """How many samples `batch` holds, for throughput; None when it cannot be told.

    The leading dimension of the first tensor found in `batch`, except for torchvision's
    detection convention, ``(images, targets)`` as two lists of equal length, the second
    of dicts: there it is the number of images (the first tensor would be one image, and
    its leading dimension its channels). For other layouts pass ``Trainer(batch_size=)``.
    """
    kind = type(batch)
    if (kind is tuple or kind is list) and batch:
        first = batch[0]
        if type(first) is torch.Tensor:
            try:  # the common (inputs, targets), on the trainer's every step
                return first.shape[0]
            except IndexError:  # a 0-d tensor
                return None
        if (type(first) is list and len(batch) > 1 and type(batch[1]) is list
                and len(batch[1]) == len(first) and first
                and all(isinstance(target, Mapping) for target in batch[1])):
            return len(first)  # (images, targets), torchvision's detection batches
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


def loader_generators(data: Any) -> list[torch.Generator]:
    """The explicit `torch.Generator`s a DataLoader draws its order from, if any."""
    if not isinstance(data, DataLoader):
        return []
    found: list[torch.Generator] = []
    batch_sampler = data.batch_sampler
    for owner in (data, data.sampler, getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def rebuild_loader(loader: DataLoader, **overrides: Any) -> DataLoader:
    """A new DataLoader like `loader` (dataset, collate, workers, pinning, generator...)
    with some arguments replaced, for example its `batch_sampler` or `sampler`.

    DataLoader forbids changing its sampler after construction, so resuming mid-epoch
    and distributing a loader both go through here.
    """
    kwargs: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if hasattr(loader, "in_order"):
        kwargs["in_order"] = loader.in_order
    if "batch_sampler" not in overrides:
        kwargs.update(batch_size=loader.batch_size, drop_last=loader.drop_last,
                      sampler=loader.sampler)
    kwargs.update(overrides)
    return DataLoader(loader.dataset, **kwargs)


def set_epoch(data: Any, epoch: int) -> None:
    """Tell a DataLoader's epoch-aware sampler (a `DistributedSampler`) which epoch
    starts, so it shuffles differently each epoch and identically on every rank."""
    if not isinstance(data, DataLoader):
        return
    for owner in (data.sampler, getattr(data.batch_sampler, "sampler", None)):
        if callable(getattr(owner, "set_epoch", None)):
            owner.set_epoch(epoch)  # type: ignore[union-attr]
            return


def length(data: Any) -> int | None:
    """Batches per epoch, when the data knows without being iterated."""
    if isinstance(data, DataLoader) and isinstance(data.dataset, IterableDataset):
        return None  # len() would warn later, or raise for datasets without __len__
    try:
        return len(data)
    except TypeError:
        return None


def micro_batch_groups(batches: Iterator[Any], size: int) -> Iterator[Sequence[Any]]:
    """The micro-batches of each optimizer step: groups of `size` (the last one of an
    epoch may be shorter)."""
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


# Where a part of a batch (or of predictions) is: an index or key, a callable, or a
# tuple of those for several parts.
Selector = Hashable | Callable[[Any], Any] | tuple[Any, ...]


def select(batch: Any, selector: Any, default_index: int, role: str,
           who: str = "WithLoss") -> Any:
    """The part of `batch` that `selector` names; with None, ``batch[default_index]`` of
    a tuple or list (or a tensor batch itself, for the inputs).

    Args:
        batch: A batch, or a model's predictions.
        selector: An index or key, a callable ``batch -> part``, a tuple of those (a
            tuple of parts), or None for the default.
        default_index: The position the default takes from a tuple or list.
        role: What is being selected, for errors (``"inputs"``, ``"targets"``...).
        who: Who selects, for errors (``"WithLoss"``, ``"Accuracy"``...).

    Raises:
        ModelOutputError: the part is not there, naming where it was looked for.
    """
    if selector is None:
        if isinstance(batch, (tuple, list)) and len(batch) > default_index:
            return batch[default_index]
        if isinstance(batch, torch.Tensor) and role == "inputs":
            return batch
        raise ModelOutputError(
            f"{who} could not find the {role} in a batch of type {type(batch).__name__}: "
            f"the default expects (inputs, targets) tuples. Pass {role}=<key, index or "
            "callable> to say where they are"
        )
    if isinstance(selector, tuple):
        return tuple(select(batch, part, default_index, role, who) for part in selector)
    if callable(selector):
        return selector(batch)
    try:
        return batch[selector]
    except (KeyError, IndexError, TypeError) as exc:
        raise ModelOutputError(
            f"{who}: {role}={selector!r} not found in a batch of type "
            f"{type(batch).__name__} ({exc!r})"
        ) from exc
