"""Resuming on another number of processes: the epoch's global sample order, each new
rank's part of a checkpoint, and the RNG of ranks that did not exist before.

A run with N processes and a DataLoader over a map-style data set trains, in each
epoch, on one global order of the samples (DistributedSampler's permutation, or the
data set in order), and every step consumes the next ``N x batch`` samples of it. The
position in the epoch is therefore one number, the samples of that order consumed so
far, whatever N is. A checkpoint keeps the order's description (`describe`); a run on M
processes recomputes the order, splits the samples left after the position into steps
of ``M x batch`` (`remaining_batches`), and so sees every remaining sample of the epoch
once: none twice, none skipped. Later epochs are sampled as usual for M processes.

What carries over to M processes, rank by rank (`rank_part`): rank r < N continues with
rank r's RNG states and hook states; a new rank r >= N gets RNG streams seeded from
``sha256(seed, step, r)`` (`derived_seed`) and rank 0's hook states; the summary window
of old rank j goes to new rank ``j % M``, so nothing logged since the last flush is lost.
The result is deterministic (the same checkpoint resumed on M processes gives the same
run every time) but not bit-identical to the N-process run: the gradients are reduced
over other groups of samples, in another order of additions.

Data that cannot be described this way (an IterableDataset, a custom or random sampler
of one process, data that saves its own position) resumes on another number of
processes only from a checkpoint at the end of an epoch; mid-epoch it is refused.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    Sampler,
    SequentialSampler,
)

__all__ = ["batch_change", "can_relay", "derived_seed", "describe", "position", "rank_part",
           "remaining_batches"]


def describe(data: Any) -> dict[str, Any] | None:
    """The epoch's global order, as a checkpoint keeps it: ``n`` samples, permuted by
    ``randperm(n)`` seeded with ``seed + epoch`` if ``shuffle``; the epoch trains on
    positions ``[0, end)``, each rank's batch of ``batch`` samples, ``replicas`` ranks,
    ``steps`` batches per rank. None for data whose order cannot be recomputed."""
    if not isinstance(data, DataLoader) or isinstance(data.dataset, IterableDataset) \
            or type(data.batch_sampler) is not BatchSampler:
        return None
    sampler, batch = data.sampler, data.batch_size
    n = len(data.dataset)  # type: ignore[arg-type]
    if isinstance(sampler, DistributedSampler):
        replicas, shuffle, seed, epoch = (sampler.num_replicas, sampler.shuffle, sampler.seed,
                                          sampler.epoch)
        per_rank = sampler.num_samples
        end = per_rank * replicas if sampler.drop_last else n
    elif isinstance(sampler, SequentialSampler):
        replicas, shuffle, seed, epoch, per_rank, end = 1, False, 0, 0, n, n
    else:
        return None
    steps = per_rank // batch if data.drop_last else -(-per_rank // batch)
    if data.drop_last:
        end = min(end, steps * batch * replicas)
    return {"n": n, "shuffle": shuffle, "seed": seed, "epoch": epoch, "end": end,
            "start": 0, "at": 0, "replicas": replicas, "batch": batch, "steps": steps,
            "drop_last": bool(data.drop_last)}


def can_relay(data: Any) -> bool:
    """Whether `data` can take an epoch's remaining samples as batches of its own
    (`remaining_batches`): a DataLoader over a map-style data set, batching itself."""
    return isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset) \
        and data.batch_size is not None


def position(order: dict[str, Any], batch_in_epoch: int) -> int:
    """How many samples of the epoch's order were consumed after `batch_in_epoch`
    batches per rank."""
    done = batch_in_epoch - order["at"]
    if done >= order["steps"]:
        return order["end"]
    return min(order["end"], order["start"] + done * order["replicas"] * order["batch"])


def remaining_batches(order: dict[str, Any], start: int, at: int, data: DataLoader,
                      rank: int, world_size: int) -> tuple[list[list[int]], dict[str, Any]]:
    """This rank's batches for the rest of the epoch, from position `start` of `order`,
    on `world_size` ranks with `data`'s batch size; and the description of that layout
    (for a checkpoint taken within it; `at` is the batches per rank consumed before).

    Steps of ``world_size x batch`` samples, rank r taking every world_size-th sample
    of each from the r-th, as DistributedSampler does. A last step too small to give
    every rank a sample is merged into the step before it (some ranks then take one
    sample more); with ``drop_last`` it is dropped. Only if fewer samples remain than
    there are ranks do some ranks repeat one (with a warning), since every rank must run
    the same number of steps.
    """
    n = len(data.dataset)  # type: ignore[arg-type]
    if n != order["n"]:
        raise ValueError(f"the data set has {n} samples, and the checkpoint's epoch was "
                         f"drawn from {order['n']}; resuming its position needs the same data")
    if order["shuffle"]:
        generator = torch.Generator()
        generator.manual_seed(order["seed"] + order["epoch"])
        indices = torch.randperm(n, generator=generator).tolist()
    else:
        indices = list(range(n))
    end, batch = order["end"], data.batch_size or 1
    per_step = world_size * batch
    full, left = divmod(end - start, per_step)
    slices = [(start + s * per_step, start + (s + 1) * per_step) for s in range(full)]
    if left and data.drop_last:
        end = start + full * per_step
    elif left >= world_size or (left and not slices):
        slices.append((start + full * per_step, end))
    elif left:
        slices[-1] = (slices[-1][0], end)
    mine = []
    for first, last in slices:
        part = indices[first:last]
        if len(part) < world_size:
            warnings.warn(
                f"only {len(part)} sample(s) of the epoch remain for {world_size} processes: "
                "the processes without one repeat one, so every process runs the step",
                stacklevel=6)
            part = [part[i % len(part)] for i in range(world_size)]
        mine.append(part[rank::world_size])
    layout = {**order, "end": end, "start": start, "at": at, "replicas": world_size,
              "batch": batch, "steps": len(slices), "drop_last": bool(data.drop_last)}
    return mine, layout


class ListBatches(Sampler[list[int]]):
    """A batch sampler that yields the given index lists, once per iteration."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


def derived_seed(seed: int | None, step: int, rank: int) -> int:
    """The seed of a rank that the checkpoint has no RNG state for: the first 8 bytes of
    ``sha256("<seed>:<step>:<rank>")`` (seed 0 when the Trainer has none)."""
    text = f"{0 if seed is None else seed}:{step}:{rank}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def rank_part(state: dict[str, Any], rank: int, world_size: int,
              seed: int | None) -> dict[str, Any]:
    """Rank `rank`'s part (``rng``, ``data``, ``hooks``, ``summary``) of a checkpoint
    written by another number of processes; see the module's docs for the rule.

    Raises:
        ValueError: the data saved its own position (a stateful loader), which cannot be
            split over another number of processes.
    """
    saved = state["ranks"] if "ranks" in state else [
        {key: state[key] for key in ("rng", "data", "order", "hooks", "summary")
         if key in state}]
    if any(part["data"] is not None for part in saved):
        raise ValueError(
            f"it was written by {len(saved)} process(es) with data that saves its own "
            f"position (state_dict/load_state_dict), which cannot be carried over to "
            f"{world_size}. Resume with {len(saved)} process(es)")
    if rank < len(saved):
        part = dict(saved[rank])
    else:
        part = {"rng": {"epoch_start": None, "now": None,
                        "seed": derived_seed(seed, state["trainer"]["step"], rank)},
                "data": None, "order": saved[0].get("order"), "hooks": saved[0]["hooks"]}
    part["summary"] = merge_windows([p["summary"] for j, p in enumerate(saved)
                                     if j % world_size == rank])
    return part


def merge_windows(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """One pending summary window from several ranks' (`SummarySink.state_dict`): sums
    and counts added, the first non-finite step the earliest."""
    scalars: dict[str, dict[str, Any]] = {}
    weighted: dict[str, None] = {}
    modes: dict[str, str] = {}
    for window in windows:
        weighted.update(dict.fromkeys(window.get("weighted", ())))
        modes.update(window.get("modes", {}))
        for tag, entry in window["scalars"].items():
            if tag not in scalars:
                scalars[tag] = dict(entry)
                continue
            merged = scalars[tag]
            merged["sum"] += entry["sum"]
            merged["count"] += entry["count"]
            firsts = [f for f in (merged["first_bad"], entry["first_bad"]) if f >= 0]
            merged["first_bad"] = min(firsts) if firsts else -1
    return {"scalars": scalars, "weighted": list(weighted), "modes": modes}


def batch_change(saved: dict[str, Any], world_size: int, grad_accum_steps: int,
                 batch_size: int | None) -> str | None:
    """The warning for a global batch that changes with the number of processes, naming
    what keeps it; None when it stays the same. `saved` is the checkpoint's
    ``"layout"``."""
    old_world, old_accum = saved["world_size"], saved["grad_accum_steps"]
    old_batch = saved.get("batch_size")
    same_batch = old_batch is None or batch_size is None or old_batch == batch_size
    if old_world * old_accum == world_size * grad_accum_steps and same_batch:
        return None

    def global_batch(world: int, accum: int, batch: int | None) -> str:
        size = f" = {world * accum * batch}" if batch is not None else ""
        return f"{world} process(es) x {accum} micro-batch(es) x {batch or 'B'}{size}"

    keep = ""
    if same_batch and (old_world * old_accum) % world_size == 0:
        keep = (f" To keep it, set grad_accum_steps={old_world * old_accum // world_size}"
                " (or scale the learning rate for the new batch).")
    elif old_batch is not None and (old_world * old_accum * old_batch) % \
            (world_size * grad_accum_steps) == 0:
        keep = (" To keep it, give the DataLoader batch_size="
                f"{old_world * old_accum * old_batch // (world_size * grad_accum_steps)}.")
    return (f"the global batch changes: the checkpoint was trained with "
            f"{global_batch(old_world, old_accum, old_batch)} samples per step, this run "
            f"takes {global_batch(world_size, grad_accum_steps, batch_size)}.{keep}")
