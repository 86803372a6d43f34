"""Distributed training under torchrun: the process group, device placement, DDP and FSDP
wrapping, and the few collectives the trainer needs.

The same script runs on one process and under ``torchrun --nproc_per_node=N``. With no
torchrun variables in the environment (and no process group initialised by the user),
`Distributed` is inert: every method is a cheap no-op and nothing is imported from
``torch.distributed`` beyond the module itself.

Assumptions made here:

* processes are started by torchrun (or anything that sets ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``), or the user initialised
  ``torch.distributed`` before building the Trainer;
* every rank runs the same script with the same options, and its data yields the same
  number of batches per epoch (a DataLoader over a map-style data set is sharded with
  `DistributedSampler`, which guarantees it);
* the run directory is on a file system every rank can read (checkpoints are written by
  rank 0 and read by all ranks on resume), as on one node or a shared file system.

The trainer talks to the other ranks at flushes (one asynchronous all-gather of the
window's scalar sums, waited for at the next step), at checkpoints, on resume, every few
steps to agree on stopping (an asynchronous all-reduce of two integers on a CPU side
channel, so it never waits on the accelerator), and nowhere else besides the gradient
all-reduce DDP or FSDP does itself.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from .data import rebuild_loader
from .relayout import rank_part

__all__ = ["Distributed", "combine_totals"]

Strategy = Literal["auto", "ddp", "fsdp"]
# A tag's window: (sum of its values, how many, first non-finite step or None).
Totals = dict[str, tuple[float, float, int | None]]

# Stop votes (`Distributed.vote_stop`) are about this far apart, and at most this many
# steps: a signal is agreed within about twice that.
VOTE_INTERVAL_S = 0.1
MAX_VOTE_STEPS = 256
# After an error on this rank, how long a flush's gather in flight is waited for before
# the rank writes its own window alone.
FAILED_GATHER_WAIT_S = 2.0

_CONTROL_GROUP: Any = None  # one CPU (gloo) side channel per process, made on first use
_CHECKPOINT_GROUP: Any = None  # another, for sharded checkpoints (`checkpoint_group`)


def _env_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


class Distributed:
    """This process's place in the run, and the collectives the trainer uses.

    Built by the Trainer with `Distributed.setup`. Hooks may read `enabled`, `rank`,
    `world_size`, `local_rank`, `is_main` (for work only one process should do, like
    writing a file) and `strategy`, and call `any` (see `TrainerView`); the rest is the
    trainer's.

    Attributes:
        enabled: Whether more than one process trains.
        rank: This process's rank (0 when not distributed).
        world_size: How many processes train.
        local_rank: The rank on this node; picks the GPU.
        device: The device this process trains on.
        strategy: ``"ddp"`` or ``"fsdp"`` when distributed, else None.
    """

    def __init__(self, device: torch.device, strategy: str | None = None) -> None:
        self.enabled = strategy is not None
        self.device = device
        self.strategy = strategy
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.enabled else 0
        # After an error on this rank, the others may be blocked elsewhere: no collective
        # may be started any more, or teardown would wait forever instead of exiting.
        self.collectives_ok = self.enabled
        self._stop_flag: torch.Tensor | None = None
        self._stop_work: Any = None
        self._stop_agreed = False
        # The vote's schedule (`vote_stop`): the next vote's step, the steps between
        # votes, and when the last vote started.
        self._next_vote = self._vote_step = self._vote_time = 0
        self._vote_every = 1
        self._layout = _WindowLayout()

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes logs and checkpoints."""
        return self.rank == 0

    @classmethod
    def setup(cls, device: str | torch.device | None, strategy: Strategy) -> Distributed:
        """Join the process group torchrun describes, or stay single-process.

        Args:
            device: The Trainer's `device` option. Under torchrun, ``None`` or ``"cuda"``
                means this rank's GPU, ``cuda:<LOCAL_RANK>``.
            strategy: ``"auto"`` (DDP under torchrun), ``"ddp"`` or ``"fsdp"``. A single
                process ignores it, so the same script runs on a laptop.
        """
        if strategy not in ("auto", "ddp", "fsdp"):
            raise ValueError(f"strategy must be 'auto', 'ddp' or 'fsdp', got {strategy!r}")
        if _env_world_size() <= 1:
            return cls(_resolve_device(device, local_rank=None))
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this build of torch has no torch.distributed")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        resolved = _resolve_device(device, local_rank)
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        if not dist.is_initialized():
            for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
                if var not in os.environ:
                    raise RuntimeError(
                        f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {var} is not set: launch "
                        "with torchrun (torchrun --nproc_per_node=N script.py), which sets "
                        "the rendezvous variables for every process"
                    )
            backend = "nccl" if resolved.type == "cuda" else "gloo"
            device_id = resolved if backend == "nccl" else None
            store = _attempt_store()
            if store is None:
                dist.init_process_group(backend, device_id=device_id)
            else:
                dist.init_process_group(backend, device_id=device_id, store=store,
                                        rank=int(os.environ["RANK"]),
                                        world_size=_env_world_size())
            atexit.register(_destroy_process_group)
        _control_group()  # collective: every rank builds the Trainer at the same point
        return cls(resolved, "ddp" if strategy == "auto" else strategy)

    # -- wrapping -----------------------------------------------------------------------

    def wrap(self, model: nn.Module, find_unused_parameters: bool,
             fsdp_units: Sequence[type[nn.Module]] | Callable[[nn.Module], bool] | None,
             ) -> nn.Module:
        """The module the training step calls: DDP around `model`, or `model` itself
        after FSDP2's `fully_shard` (which shards it in place). Unchanged when not
        distributed."""
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel) and self.enabled:
            raise TypeError(
                "the model is already wrapped in DistributedDataParallel; pass the plain "
                "module: under torchrun the Trainer wraps it (and keeps checkpoint keys "
                "free of the 'module.' prefix)"
            )
        if not self.enabled:
            return model
        if self.strategy == "ddp":
            return DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters)
        from torch.distributed.fsdp import fully_shard

        # FSDP shards what each rank holds; start every rank from rank 0's weights, as DDP
        # does, so a run does not depend on how each process happened to initialise.
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
        if fsdp_units is not None:
            wanted = _is_instance_of(fsdp_units) \
                if isinstance(fsdp_units, (type, Sequence)) else fsdp_units
            units = [m for m in model.modules() if m is not model and wanted(m)]
            for unit in reversed(units):  # innermost first, as fully_shard requires
                fully_shard(unit)
        fully_shard(model)
        return model

    def no_sync(self, train_model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient all-reduce for a micro-batch that is not the last of a step."""
        if self.strategy == "ddp":
            return train_model.no_sync()  # type: ignore[operator]
        if self.strategy == "fsdp":
            return _fsdp_no_sync(train_model)
        return contextlib.nullcontext()

    # -- checkpoints ----------------------------------------------------------------------

    def own_part(self, state: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
        """This rank's view of a checkpoint: the shared state with this rank's own part
        (RNG states, data position, hook states, summary window) on top. For a
        checkpoint of another number of processes, the part `relayout.rank_part` gives
        this rank (`seed` is the Trainer's, for the RNG of ranks that are new).

        Raises:
            ValueError: the checkpoint's per-rank state cannot be carried over to this
                number of processes (data that saves its own position).
        """
        if state.get("world_size", 1) != self.world_size:
            return {**state, **rank_part(state, self.rank, self.world_size, seed)}
        if not self.enabled:
            return state
        return {**state, **state["ranks"][self.rank]}

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """The model's state dict. Under FSDP, full and unsharded, gathered to rank 0's
        CPU (a collective: every rank calls it), so the file does not depend on the
        number of processes and loads into the plain model."""
        if self.strategy != "fsdp":
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_options())

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer
                        ) -> dict[str, Any]:
        """The state dict of `optimizer`, over some or all of `model`'s parameters. Under
        FSDP, full and keyed by parameter name, gathered to rank 0's CPU (a collective);
        one that holds no state yet (before its first step: one of several optimizers
        may not have stepped) gives its hyperparameters only, as torch's gathering
        would lay its state out by stepping it once, changing Adam's step count."""
        if self.strategy != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if not optimizer.state:
            return {"state": {}, "has_state": False, "param_groups": [
                {k: v for k, v in group.items() if k != "params"}
                for group in optimizer.param_groups]}
        return get_optimizer_state_dict(model, optimizer, options=_full_options())

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Load what `model_state` returned. Under FSDP, rank 0 holds the full state (see
        `read_checkpoint`) and sends each rank its shards, tensor by tensor."""
        if self.strategy != "fsdp":
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state, options=_full_options(broadcast=True))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any]) -> None:
        """Load what `optimizer_state` returned (under FSDP, from rank 0's full state)."""
        if self.strategy != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if state.get("has_state", bool(state.get("state"))):
            set_optimizer_state_dict(model, optimizer, state if self.is_main else {},
                                     options=_full_options(broadcast=True))
        else:  # a stateless optimizer (plain SGD), which torch's loader cannot place
            for group, saved in zip(optimizer.param_groups, state["param_groups"]):
                group.update({k: v for k, v in saved.items() if k != "params"})

    def read_checkpoint(self, path: str, preloaded: dict[str, Any] | None,
                        load: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint at `path` for this rank (every rank calls it).

        Without FSDP every rank reads the whole file (rank 0 may pass it `preloaded`).
        Under FSDP only rank 0 holds the full state in memory; the others get its small
        part here (counters, the per-rank RNG and data states) and their shards of the
        model and optimizer from rank 0 in `load_model_state` and `load_optimizer_state`.
        """
        if self.strategy != "fsdp":
            return preloaded if preloaded is not None else load(path)
        full: dict[str, Any] = {} if preloaded is None else {"state": preloaded}

        def small_part() -> dict[str, Any]:
            if "state" not in full:
                full["state"] = load(path)
            small = {k: v for k, v in full["state"].items() if k != "model"}
            for key, value in small.items():  # the Trainer's optimizer, and a custom step's
                if isinstance(value, dict) and value.keys() >= {"state", "param_groups"}:
                    small[key] = {"param_groups": value["param_groups"],
                                  "has_state": bool(value["state"])}
            return small

        small = self.on_main(small_part)
        return full["state"] if self.is_main else {**small, "model": {}}

    # -- data -----------------------------------------------------------------------------

    def shard(self, data: Iterable[Any], seed: int) -> tuple[Iterable[Any], bool]:
        """Give each rank its part of `data`.

        A DataLoader over a map-style data set is rebuilt with a `DistributedSampler`
        (keeping its batch size, shuffling, collate function, workers and pinning).
        Anything else is returned as it is: it must yield this rank's shard itself.

        Returns:
            The data to iterate, and whether it was sharded here.
        """
        if not self.enabled or not isinstance(data, DataLoader) \
                or isinstance(data.dataset, IterableDataset):
            return data, False
        sampler = data.sampler
        if isinstance(sampler, DistributedSampler):
            return data, True
        if data.batch_sampler is not None and type(data.batch_sampler) is not BatchSampler:
            raise ValueError(
                f"the DataLoader uses a custom batch_sampler ({type(data.batch_sampler).__name__})"
                ", which cannot be sharded across ranks automatically; make it yield only "
                f"this rank's batches (rank {self.rank} of {self.world_size}) and the same "
                "number of batches on every rank"
            )
        if isinstance(sampler, RandomSampler):
            if sampler.replacement or sampler._num_samples is not None:  # noqa: SLF001
                raise ValueError(
                    "the DataLoader's RandomSampler draws with replacement or a custom "
                    "num_samples, which DistributedSampler cannot reproduce; pass a sampler "
                    "that shards by rank yourself"
                )
            shuffle = True
        elif isinstance(sampler, SequentialSampler):
            shuffle = False
        else:
            raise ValueError(
                f"the DataLoader uses a custom sampler ({type(sampler).__name__}), which cannot "
                "be sharded across ranks automatically; wrap your sampling so each rank draws "
                "its own part (for example with torch.utils.data.DistributedSampler)"
            )
        # Every rank must draw the same permutation to take disjoint parts of it.
        sharded = DistributedSampler(data.dataset, num_replicas=self.world_size, rank=self.rank,
                                     shuffle=shuffle, seed=seed, drop_last=False)
        return rebuild_loader(data, sampler=sharded), True

    def check_data(self, data: Iterable[Any], sharded: bool) -> None:
        """Before training: every rank must see as many batches, or one would wait for
        the others forever at the end of an epoch."""
        if not self.collectives_ok:
            return
        try:
            length: int | None = len(data)  # type: ignore[arg-type]
        except TypeError:
            length = None
        lengths = self.all_gather(length)
        if len(set(lengths)) > 1:  # every rank sees the same list, so all raise
            raise ValueError(
                f"the data yields a different number of batches per rank ({lengths}); every "
                "rank must run the same number of steps. Shard a map-style data set with a "
                "DataLoader (the Trainer adds a DistributedSampler), or make each rank's "
                "shard the same length"
            )

    def check_first_batch(self, batch: Any, step: int) -> None:
        """Warn if every rank got the very same first batch: the data is probably not
        sharded, and each rank trains on the same samples."""
        fingerprints = self.all_gather(_fingerprint(batch))
        if fingerprints[0] is not None and len(set(fingerprints)) == 1:
            warnings.warn(
                f"every rank got the same batch at step {step}: the data does not seem to be "
                f"sharded, so each of the {self.world_size} ranks trains on the same samples. "
                "An IterableDataset or a plain iterable must yield only this rank's part "
                "(see torch.distributed.get_rank()); a DataLoader over a map-style data set "
                "is sharded automatically", stacklevel=4,
            )

    # -- collectives ----------------------------------------------------------------------

    def all_gather(self, obj: Any, group: Any = None) -> list[Any]:
        """Every rank's `obj`, in rank order (``[obj]`` when not distributed). On the
        CPU side channel, or on `group` (`checkpoint_group`)."""
        if not self.collectives_ok:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=group or _control_group())
        return gathered

    def all_reduce_sum(self, tensor: torch.Tensor, async_op: bool = False) -> Any:
        """Sum `tensor` over the ranks, in place, on the default group (NCCL on GPUs: the
        work runs on the device and waiting for it is a stream wait, not a host sync).
        Returns the work to `wait()` on when `async_op`, else None."""
        if not self.collectives_ok:
            return None
        return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=async_op)

    def gather_to_main(self, obj: Any, group: Any = None) -> list[Any] | None:
        """Every rank's `obj` on rank 0, in rank order; None on the other ranks."""
        if not self.collectives_ok:
            return [obj]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0, group=group or _control_group())
        return gathered

    def broadcast(self, obj: Any, group: Any = None) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.collectives_ok:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=group or _control_group())
        return box[0]

    def checkpoint_group(self) -> Any:
        """The process group sharded checkpoints use (a CPU group of their own, so a
        checkpoint written in the background never interleaves with the trainer's
        collectives); None when not distributed. The first call is a collective."""
        global _CHECKPOINT_GROUP
        if not self.enabled:
            return None
        if _CHECKPOINT_GROUP is None:
            _CHECKPOINT_GROUP = dist.new_group(backend="gloo")
        return _CHECKPOINT_GROUP

    def on_main(self, fn: Callable[[], Any], group: Any = None) -> Any:
        """Run `fn` on rank 0 only and return its result on every rank. If it raises,
        every rank raises (the same type when it can be rebuilt), so none is left
        waiting for the others. On the CPU side channel, or on `group`."""
        if not self.enabled:
            return fn()
        if not self.collectives_ok:
            raise RuntimeError(
                f"rank {self.rank} cannot coordinate with the other ranks any more (it failed "
                "earlier, see above), so this step, which rank 0 does for all, was skipped"
            )
        result: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                result = ("ok", fn())
            except Exception as exc:
                result = ("error", (type(exc), str(exc)))
                self.broadcast(result, group)
                raise
        result = self.broadcast(result, group)
        if result[0] == "error":
            kind, message = result[1]
            try:
                error = kind(f"{message} (raised on rank 0)")
            except Exception:
                error = RuntimeError(f"rank 0 failed: {kind.__name__}: {message}")
            raise error
        return result[1]

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (synchronous)."""
        return bool(self.any_bits(int(flag), 1))

    def any_bits(self, mask: int, bits: int) -> int:
        """For each of the low `bits` bits of `mask`, whether it is set on any rank
        (synchronous, on the CPU side channel: no device sync)."""
        if not self.collectives_ok:
            return mask
        value = torch.tensor([mask >> i & 1 for i in range(bits)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_control_group())
        return sum(1 << i for i, flag in enumerate(value.tolist()) if flag)

    def vote_stop(self, requested: bool, step: int) -> bool:
        """Agree on stopping without making any rank wait, at a cost that does not
        depend on how short a step is: True on every rank at the same step, at most
        ``2 * K - 1`` steps after any rank requested a stop, where K, the steps between
        two votes, is about `VOTE_INTERVAL_S` worth of steps (1 for steps of that long or
        longer, at most `MAX_VOTE_STEPS`).

        A vote is an asynchronous all-reduce (MAX) of ``[requested, ns per step]`` on a
        CPU side channel, started at a vote step and collected at the next one (long
        finished by then). Every rank derives the next K from the same reduced step
        time, so the ranks vote at the same steps. Call it after every step.
        """
        if not self.collectives_ok:
            return requested
        if self._stop_agreed or step < self._next_vote:
            return self._stop_agreed
        if self._stop_work is not None:
            self._stop_work.wait()
            flag, per_step = self._stop_flag.tolist()  # type: ignore[union-attr]
            if flag:
                self._stop_agreed = True
                return True
            if per_step > 0:  # unknown until a vote has measured a step
                self._vote_every = max(1, min(MAX_VOTE_STEPS,
                                              int(VOTE_INTERVAL_S * 1e9) // per_step))
        now = time.perf_counter_ns()
        per_step = (now - self._vote_time) // (step - self._vote_step) \
            if self._vote_time and step > self._vote_step else 0
        self._vote_time, self._vote_step = now, step
        self._stop_flag = torch.tensor([int(requested), per_step], dtype=torch.int64)
        self._stop_work = dist.all_reduce(self._stop_flag, op=dist.ReduceOp.MAX,
                                          group=_control_group(), async_op=True)
        self._next_vote = step + self._vote_every
        return False

    def require_collectives(self) -> None:
        """Refuse a fit on a rank that failed before: the other ranks cannot be trusted
        to be in step with it."""
        if self.enabled and not self.collectives_ok:
            raise RuntimeError("an earlier fit failed on this rank; the other ranks cannot "
                               "be trusted to be in step with it. Restart the job to resume")

    def stop_collectives(self, exc: BaseException | None = None) -> None:
        """This rank failed (`exc`, which gets a note naming the rank) or left the others
        out of step: it starts no collective any more, so teardown cannot wait forever
        for ranks blocked elsewhere; its error surfaces and torchrun stops the job."""
        self.collectives_ok = False
        if self.enabled and exc is not None and hasattr(exc, "add_note"):
            exc.add_note(f"[lossless_trainer] on rank {self.rank} of {self.world_size}")

    def end_votes(self) -> None:
        """Collect the outstanding vote, so the next `fit` starts clean."""
        if self._stop_work is not None and self.collectives_ok:
            self._stop_work.wait()
        self._stop_work = self._stop_flag = None
        self._stop_agreed = False
        self._next_vote = self._vote_step = self._vote_time = 0
        self._vote_every = 1

    def start_reduce_totals(self, totals: Totals, modes: dict[str, str],
                            share: tuple[Any, bool] = (None, False),
                            ) -> Callable[..., Any]:
        """Start combining every rank's window, and gathering each rank's `share` with
        it; returns what waits for the result (see `combine_totals`), which is called
        with ``objects=False`` where not every rank may be (see below).

        One asynchronous all-gather of a float64 tensor per flush, in a layout the
        ranks agreed on (`_WindowLayout`) on the CPU side channel: started at the flush
        and waited for at the next step, it is long done by then, so no rank waits for
        the others. The first flush, and a window the layout does not fit (one with a
        new tag) at the next step, are gathered as objects, which is a wait.

        Args:
            totals: This rank's window.
            modes: This rank's reductions (tags logged with a ``reduce=`` other than
                ``"mean"``).
            share: ``(value, stop)``: a small picklable value, and whether this rank asks
                to stop; they come back by rank as the third result.
        """
        def alone() -> Any:  # after an error: this rank's own window, unreduced
            return (*combine_totals([(totals, modes)], ranks=[self.rank]), [share])

        def as_objects() -> Any:  # every rank's whole window; the layout agreed from them
            gathered = self.all_gather((totals, modes, share))
            self._layout.agree(gathered, modes, share)
            return (*combine_totals([(t, m) for t, m, _ in gathered]),
                    [s for _, _, s in gathered])

        layout = self._layout
        if not self.collectives_ok or not layout.index:  # the first flush: as objects
            done = alone() if not self.collectives_ok else as_objects()
            return lambda objects=True: done
        packed = torch.tensor(layout.pack(totals, modes, share), dtype=torch.float64)
        rows = [torch.empty_like(packed) for _ in range(self.world_size)]
        work = dist.all_gather(rows, packed, group=_control_group(), async_op=True)

        def result(objects: bool = True) -> Any:
            """The result; None if it needs the gather as objects and `objects` is false
            (a collective, which only a point every rank reaches may start)."""
            if not self.collectives_ok:
                # After an error on this rank the gather may never complete: waited for
                # a little (the others' parts travel on their own threads), then not.
                with contextlib.suppress(Exception):
                    work.wait(timeout=datetime.timedelta(seconds=FAILED_GATHER_WAIT_S))
                if not work.is_completed():
                    return alone()
            work.wait()
            per_rank = torch.stack(rows).tolist()
            if not any(row[0] for row in per_rank):
                return (*combine_totals(layout.unpack(per_rank)),
                        [(value, bool(row[1])) for value, row in zip(layout.shares,
                                                                      per_rank)])
            if not self.collectives_ok:  # a window does not fit, and no collective now
                return alone()
            return as_objects() if objects else None

        return result

    def explain(self, error: RuntimeError, step: int, model: nn.Module) -> BaseException:
        """A clear error for DDP's unused-parameter failure; other errors unchanged."""
        text = str(error)
        if "Expected to have finished reduction in the prior iteration" not in text:
            return error
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        unused: list[str] = []
        match = re.search(r"did not receive grad for rank \d+:\s*([\d\s]+)", text)
        if match:
            unused = [names[int(i)] for i in match.group(1).split() if int(i) < len(names)]
        which = f" ({', '.join(unused[:8])}{', ...' if len(unused) > 8 else ''})" if unused else ""
        return RuntimeError(
            f"DistributedDataParallel: some parameters{which} received no gradient in step "
            f"{step - 1} on rank {self.rank}, typically because a loss is not computed on "
            "every step (an optional loss or an unused head). Pass "
            "Trainer(find_unused_parameters=True) to let DDP handle it (it costs a traversal "
            "of the autograd graph per step), or make every parameter take part in the loss"
        )


def combine_totals(per_rank: list[tuple[Totals, dict[str, str]]],
                   ranks: Sequence[int] | None = None,
                   ) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[int, int]]]:
    """Combine the scalar windows of every rank.

    Each rank sends ``({tag: (sum, count, first_bad_step)}, {tag: mode})`` for the tags
    it wrote (a tag may exist on some ranks only). A tag's mode is ``"mean"`` unless the
    rank logged it with another ``reduce=``. Per tag:

    * ``"mean"``: the mean over every value on every rank (sums and counts pooled);
    * ``"sum"``: the sum over ranks of each rank's window mean;
    * ``"max"``: the largest of the ranks' window means;
    * ``"none"``: rank 0's window mean, or the lowest rank that has the tag.

    Args:
        per_rank: Each rank's window and modes, in rank order.
        ranks: The rank of each entry, when `per_rank` is not all of them in order.

    Returns:
        ``{tag: (value, count)}`` with the count pooled over ranks, and
        ``{tag: (first non-finite step, rank)}`` for tags that went NaN or Inf anywhere.
    """
    ranks = list(range(len(per_rank))) if ranks is None else list(ranks)
    values: dict[str, tuple[float, float]] = {}
    nonfinite: dict[str, tuple[int, int]] = {}
    tags: dict[str, None] = {}
    for totals, _ in per_rank:
        tags.update(dict.fromkeys(totals))
    for tag in tags:
        mode = next((modes[tag] for _, modes in per_rank if tag in modes), "mean")
        written = [(rank, totals[tag]) for rank, (totals, _) in zip(ranks, per_rank)
                   if tag in totals]
        bad = [(first, rank) for rank, (_, _, first) in written if first is not None]
        if bad:  # also from a rank that counted nothing (a Mean over 0 items)
            nonfinite[tag] = min(bad)
        present = [(rank, entry) for rank, entry in written if entry[1] > 0]
        if not present:
            continue
        count = sum(c for _, (_, c, _) in present)
        means = [s / c for _, (s, c, _) in present]
        if mode == "mean":
            value = math.fsum(s for _, (s, _, _) in present) / count
        elif mode == "sum":
            value = math.fsum(means)
        elif mode == "max":
            # A NaN on one rank must not disappear behind a larger finite value.
            value = next((m for m in means if math.isnan(m)), max(means))
        else:
            value = means[0]
        values[tag] = (value, count)
    return values, nonfinite


class _WindowLayout:
    """Where each tag's window sits in the tensor a flush all-gathers, as every rank
    agreed at the last flush that gathered whole windows as objects.

    A rank's row is ``[misfit, stop, then (sum, count, first non-finite step or -1) per
    tag]`` in float64, which holds a Python float, and an integer up to 2**53, exactly.
    The row of a window with a tag outside the layout, or with reductions or a share
    other than those agreed, says so (`misfit`): then every rank also gathers its whole
    window as objects, as at the first flush, and the layout grows by the new tags. Tags
    come and go between windows; one a window does not write is sent as zeros. A layout
    grown well past the windows it serves is rebuilt from the latest one.
    """

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.modes: list[dict[str, str]] = []  # each rank's, as agreed
        self.shares: list[Any] = []  # each rank's share value, as agreed
        self._modes: dict[str, str] | None = None  # this rank's, as agreed
        self._share: Any = None

    def pack(self, totals: Totals, modes: dict[str, str], share: tuple[Any, bool]
             ) -> list[float]:
        """This rank's row."""
        value, stop = share
        index = self.index
        row = [0.0, float(stop)] + [0.0, 0.0, -1.0] * len(index)
        misfit = self._modes is None or modes != self._modes or not (
            value is self._share or value == self._share)
        for tag, (total, count, first_bad) in totals.items():
            at = index.get(tag)
            if at is None:
                misfit = True
                continue
            at = 2 + 3 * at
            row[at], row[at + 1] = total, count
            if first_bad is not None:
                row[at + 2] = first_bad
        row[0] = float(misfit)
        return row

    def unpack(self, rows: list[list[float]]) -> list[tuple[Totals, dict[str, str]]]:
        """Each rank's window and reductions, as `combine_totals` takes them; a tag with
        nothing counted and nothing non-finite is left out, as it adds nothing."""
        per_rank = []
        for row, modes in zip(rows, self.modes):
            totals: Totals = {}
            for tag, at in self.index.items():
                at = 2 + 3 * at
                count, first_bad = row[at + 1], row[at + 2]
                if count != 0 or first_bad >= 0:
                    totals[tag] = (row[at], count, None if first_bad < 0 else int(first_bad))
            per_rank.append((totals, modes))
        return per_rank

    def agree(self, gathered: list[tuple[Totals, dict[str, str], tuple[Any, bool]]],
              modes: dict[str, str], share: tuple[Any, bool]) -> None:
        """Agree on the layout from every rank's whole window (the same on every rank)."""
        window = dict.fromkeys(tag for totals, _, _ in gathered for tag in totals)
        if len(self.index) > 2 * len(window) + 16:  # grown past what windows write
            self.index = {}
        for tag in window:
            self.index.setdefault(tag, len(self.index))
        self.modes = [dict(rank_modes) for _, rank_modes, _ in gathered]
        self.shares = [rank_share[0] for _, _, rank_share in gathered]
        self._modes, self._share = dict(modes), share[0]


def _full_options(broadcast: bool = False) -> Any:
    """Options for torch's state-dict functions under FSDP: full tensors, on rank 0's CPU
    when saving, sent from rank 0 when loading."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if broadcast:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _is_instance_of(classes: Any) -> Callable[[nn.Module], bool]:
    classes = (classes,) if isinstance(classes, type) else tuple(classes)
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"fsdp_units must be nn.Module classes or a predicate, got {cls!r}")
    return lambda module: isinstance(module, classes)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Any:
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def _fingerprint(batch: Any) -> float | None:
    """A number that differs between different batches (almost surely); None if the batch
    holds no tensor."""
    tensors: list[torch.Tensor] = []

    def collect(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    collect(batch)
    if not tensors:
        return None
    with torch.no_grad():
        return float(sum(t.detach().double().sum().cpu() + t.numel() for t in tensors))


def _resolve_device(device: str | torch.device | None, local_rank: int | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and local_rank is not None:
        # One GPU per process; with CUDA_VISIBLE_DEVICES set per process, each sees one.
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    # Normalise "cuda" to "cuda:<current>" so device comparisons on tensors are exact.
    return torch.empty(0, device=device).device


# How long a worker waits to reach torchrun's store before failing (instead of the
# default 30 minutes of a broken rendezvous); LOSSLESS_TRAINER_STORE_TIMEOUT in seconds.
_STORE_TIMEOUT_S = 300


def _attempt_store() -> Any:
    """Under ``torchrun --max-restarts``, the store this attempt's workers build their
    process group on: torchrun's own TCPStore, under a prefix of this attempt.

    torchrun's agent hosts one TCPStore for every attempt of the job (it shares its
    rendezvous store with the workers), and torch 2.13's env:// rendezvous does not
    prefix the workers' keys per attempt (it assumes a new store per attempt). The keys
    of a killed attempt then stay, and a restarted worker can read a dead peer's address
    instead of its successor's: the restart fails to connect, or waits 30 minutes. A
    prefix per attempt (``TORCHELASTIC_RESTART_COUNT``) gives every attempt keys of its
    own. The store timeout bounds how long a rendezvous that cannot complete waits. None when
    torchrun does not share its store (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, where
    rank 0 hosts a new store per attempt) or outside torchelastic.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    timeout = datetime.timedelta(seconds=float(os.environ.get(
        "LOSSLESS_TRAINER_STORE_TIMEOUT", _STORE_TIMEOUT_S)))
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           _env_world_size(), is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"/lossless_trainer/attempt_{attempt}", client)


def _control_group() -> Any:
    global _CONTROL_GROUP
    if _CONTROL_GROUP is None:
        # Flags and small objects travel on the CPU, so reading them never waits on a GPU
        # stream; under gloo this is a second group, so it never interleaves with DDP's.
        _CONTROL_GROUP = dist.new_group(backend="gloo")
    return _CONTROL_GROUP


def _destroy_process_group() -> None:
    global _CONTROL_GROUP, _CHECKPOINT_GROUP
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _CONTROL_GROUP = _CHECKPOINT_GROUP = None
