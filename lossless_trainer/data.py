"""Batches: moving them to the device, sizing them, and iterating epochs resumably."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

__all__ = [
    "batch_size",
    "is_one_shot",
    "iterate_resumed_epoch",
    "loader_generators",
    "move_to_device",
    "rebuild_loader",
    "start_epoch",
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
    """Leading dimension of the first tensor found in `batch`, or None if there is none."""
    kind = type(batch)
    if (kind is tuple or kind is list) and batch and type(batch[0]) is torch.Tensor:
        try:  # the common (inputs, targets), on the trainer's every step
            return batch[0].shape[0]
        except IndexError:  # a 0-d tensor
            return None
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


class _SkipBatches(Sampler[list[int]]):
    """Yields a batch sampler's index lists after dropping the first `skip`.

    Only indices are skipped: no sample is loaded for the dropped batches. Once they are
    dropped (the sampler has drawn its order for the epoch), `on_skipped` runs.
    """

    def __init__(self, batch_sampler: Iterable[list[int]], skip: int,
                 on_skipped: Callable[[], None]) -> None:
        self.batch_sampler = batch_sampler
        self.skip = skip
        self.on_skipped = on_skipped

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        batches = iter(self.batch_sampler)
        for _ in range(self.skip):
            next(batches, None)
        self.on_skipped()
        yield from batches


def start_epoch(data: Iterable[Any], epoch: int, first_in_process: bool) -> Iterator[Any]:
    """``iter(data)`` for `epoch`, drawing from the RNG exactly as an uninterrupted run would.

    A DataLoader with persistent workers draws its workers' base seed only when its
    first epoch starts; later epochs reuse the workers. A resumed run starting at a
    later epoch would draw it again and shift the RNG stream, so that draw goes to a
    throwaway generator. (The workers' own seeds then differ from the original run's;
    see docs/checkpoints.md.)
    """
    set_epoch(data, epoch)
    if not (first_in_process and epoch > 0 and _persistent(data)):
        return iter(data)
    return _iter_with_throwaway_base_seed(data)  # type: ignore[arg-type]


def set_epoch(data: Any, epoch: int) -> None:
    """Tell a DataLoader's epoch-aware sampler (a `DistributedSampler`) which epoch
    starts, so it shuffles differently each epoch and identically on every rank."""
    if not isinstance(data, DataLoader):
        return
    for owner in (data.sampler, getattr(data.batch_sampler, "sampler", None)):
        if callable(getattr(owner, "set_epoch", None)):
            owner.set_epoch(epoch)  # type: ignore[union-attr]
            return


def first_checked(batches: Iterator[Any], check: Callable[[Any], None]) -> Iterator[Any]:
    """`batches`, with `check` called on the first one before it is yielded (or on None
    when there is none)."""
    first = next(batches, _NOTHING)
    check(None if first is _NOTHING else first)
    if first is not _NOTHING:
        yield first
        yield from batches


_NOTHING = object()


def _persistent(data: Any) -> bool:
    return isinstance(data, DataLoader) and data.persistent_workers and data.num_workers > 0


def _iter_with_throwaway_base_seed(loader: DataLoader) -> Iterator[Any]:
    saved = loader.generator
    loader.generator = torch.Generator()
    try:
        return iter(loader)
    finally:
        loader.generator = saved


def iterate_resumed_epoch(data: Iterable[Any], skip: int, epoch: int,
                          on_skipped: Callable[[], None]) -> Iterator[Any]:
    """Iterate one epoch of `data` from its `skip`-th batch, as if the first `skip`
    batches had just been consumed.

    Call it with the RNG state the interrupted epoch started with. `on_skipped` runs once
    the skipped part is behind, just before the first batch is fetched; it is where the
    caller restores the RNG state of the moment the checkpoint was taken.

    A map-style DataLoader skips at the batch-sampler level: the epoch's order is drawn
    exactly as before and the skipped samples are never loaded. Any other iterable is
    iterated and the skipped batches discarded, so they are read again.

    Raises:
        ValueError: the data ran out before `skip` batches.
    """
    set_epoch(data, epoch)
    if isinstance(data, DataLoader) and data.batch_sampler is not None \
            and not isinstance(data.dataset, IterableDataset):
        # A one-epoch loader: its workers need not persist. It draws a worker base seed
        # when it starts, as the original did unless its workers persisted from an
        # earlier epoch; then a throwaway generator takes that draw.
        reused_workers = _persistent(data) and epoch > 0
        return iter(rebuild_loader(
            data, batch_sampler=_SkipBatches(data.batch_sampler, skip, on_skipped),
            persistent_workers=False,
            generator=torch.Generator() if reused_workers else data.generator))
    batches = start_epoch(data, epoch, first_in_process=True)
    for done in range(skip):
        try:
            next(batches)
        except StopIteration:
            raise ValueError(
                f"resuming needs to skip the {skip} batches of this epoch that were already "
                f"trained on, but the data ran out after {done}; it must yield the same "
                "batches as in the interrupted run"
            ) from None
    on_skipped()
    return batches
