"""Resuming exactly: the data position and the RNG states, seeding, and turning
SIGTERM/SIGINT into a clean stop. (Which checkpoint to resume from is checkpointer.py's.)

A resumed run must continue bit-identically to one that was never interrupted. That
needs three things, all owned here:

* the RNG states of the moment the checkpoint was taken, and of the moment its epoch
  began (a DataLoader draws its shuffling order and worker seeds from the global RNG
  when an epoch starts);
* the position in the data: the epoch and how many of its batches were consumed;
* a way to start an epoch in its middle without drawing differently: a map-style
  DataLoader skips at the batch-sampler level (no sample of the skipped batches is
  loaded), anything else is iterated and the skipped batches thrown away.

`DataCursor` holds the first two and does the third; `TrainerBase.fit` asks it for the
open epoch's batches and `TrainerBase.state_dict` saves its state.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from .checkpoint import CheckpointError
from .data import is_one_shot, loader_generators, rebuild_loader, set_epoch
from .relayout import ListBatches, can_relay, describe, position, remaining_batches
from .state import TrainState

__all__ = [
    "DataCursor",
    "capture_rng",
    "is_stateful",
    "iterate_resumed_epoch",
    "restore_rng",
    "seed_everything",
    "start_epoch",
    "stop_on_signals",
]


class DataCursor:
    """Where training stands in its data, and the RNG states a resume needs.

    Assumptions: one epoch is open at a time; the caller (the fit loop) counts the
    epoch and the batches consumed in it (`TrainState`) and passes them in; data that
    saves its own position (``state_dict``/``load_state_dict``, e.g. torchdata's
    StatefulDataLoader) is trusted to restore it.

    A checkpoint written by another number of processes (or in an epoch resumed so)
    continues its epoch from the global position in the epoch's sample order instead
    (relayout.py): every remaining sample once, split over this run's processes.

    Args:
        data: The training data.
        check_first_batch: Called with the first batch this process iterates (or None
            if there is none), before it is trained on. Under torchrun, the check that
            the data is really sharded.
        rank: This process's rank.
        world_size: The number of processes.
    """

    def __init__(self, data: Iterable[Any],
                 check_first_batch: Callable[[Any], None] | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        self.data = data
        self._check_first = check_first_batch
        self._rank, self._world_size = rank, world_size
        self._open: Iterator[Any] | None = None  # the open epoch's batches
        self._epoch_rng: dict[str, Any] | None = None  # the RNG as the open epoch began
        self._pending: dict[str, Any] | None = None  # RNG states of a loaded checkpoint
        self._started = False  # whether this process has iterated `data` itself yet
        # A loaded checkpoint's epoch order, when its epoch continues from its global
        # position; and the layout of an epoch continued so (what a checkpoint keeps).
        self._relay: dict[str, Any] | None = None
        self._layout: dict[str, Any] | None = None

    @property
    def open(self) -> bool:
        """Whether an epoch is open: started and not yet exhausted."""
        return self._open is not None

    def batches(self, epoch: int, consumed: int) -> Iterator[Any]:
        """The open epoch's remaining batches; if none is open, open `epoch`.

        Args:
            epoch: The epoch to open (epochs completed so far).
            consumed: Batches of it already trained on: nonzero only right after a
                resume from the middle of an epoch, when they are skipped.
        """
        if self._open is None:
            self._open = self._begin(epoch, consumed)
        return self._open

    def end_epoch(self) -> None:
        """The open epoch's batches ran out."""
        self._open = self._layout = None

    def finish_epoch(self, state: TrainState, max_steps: int | None) -> bool:
        """The open epoch's batches ran out: count it in `state` and return True (the
        loop then calls `after_epoch`); or end a one-shot iterator's run, which has
        nothing left (`stop_reason` ``"data_exhausted"``), and return False.

        Raises:
            ValueError: the epoch yielded no batch at all.
        """
        self.end_epoch()
        if state.batch_in_epoch == 0:
            if state.step > 0 and is_one_shot(self.data):
                if max_steps is not None:
                    warnings.warn(
                        f"the data iterator was exhausted after {state.step} steps, before "
                        f"max_steps={max_steps}", stacklevel=4,
                    )
                state.stop_reason = "data_exhausted"
                return False
            raise ValueError(
                f"data yielded no batches in epoch {state.epoch}; check that the "
                "dataset is not empty (and, for a DataLoader with drop_last=True, that it "
                "holds at least one full batch)"
            )
        state.epoch += 1
        state.batch_in_epoch = 0
        return True

    def _begin(self, epoch: int, consumed: int) -> Iterator[Any]:
        pending, self._pending = self._pending, None
        relay, self._relay = self._relay, None
        first_in_process, self._started = not self._started, True
        if relay is not None:  # the rest of the epoch from its global position
            batches, self._layout = remaining_batches(
                relay, position(relay, consumed), consumed, self.data,  # type: ignore[arg-type]
                self._rank, self._world_size)
            self._restore_now(pending)  # type: ignore[arg-type]
            self._epoch_rng = None
            self._started = False  # the rebuilt loader does not start `data` itself
            return iter(rebuild_loader(self.data, batch_sampler=ListBatches(batches),  # type: ignore[arg-type]
                                       persistent_workers=False))
        if pending is not None:
            if consumed == 0 or is_stateful(self.data) or pending["epoch_start"] is None:
                self._restore_now(pending)  # the data restores its position, or none
            else:
                # Replay the epoch's start, skip what was consumed, then continue with
                # the RNG of the moment the checkpoint was taken.
                self.restore_rng(pending["epoch_start"])
                self._epoch_rng = pending["epoch_start"]
                self._started = False  # the rebuilt loader does not start `data` itself
                return iterate_resumed_epoch(self.data, consumed, epoch,
                                             lambda: self.restore_rng(pending["now"]))
        self._epoch_rng = self.capture_rng()
        batches = start_epoch(self.data, epoch, first_in_process)
        if first_in_process and self._check_first is not None:
            return _first_checked(batches, self._check_first)
        return batches

    def _restore_now(self, pending: dict[str, Any]) -> None:
        """The RNG of the moment the checkpoint was taken; for a rank the checkpoint has
        none for (written by fewer processes), streams seeded from its derived seed."""
        if pending["now"] is not None:
            self.restore_rng(pending["now"])
            return
        seed_everything(pending["seed"])
        for index, generator in enumerate(loader_generators(self.data)):
            generator.manual_seed(pending["seed"] + 1 + index)

    def capture_rng(self) -> dict[str, Any]:
        """The global RNG states plus those of the DataLoader's own generators."""
        return {"global": capture_rng(),
                "generators": [g.get_state() for g in loader_generators(self.data)]}

    def restore_rng(self, saved: dict[str, Any]) -> None:
        """Set the RNGs to what `capture_rng` returned."""
        restore_rng(saved["global"])
        generators = loader_generators(self.data)
        if len(generators) != len(saved["generators"]):
            warnings.warn(
                f"the checkpoint holds {len(saved['generators'])} DataLoader generator "
                f"state(s) but the data now has {len(generators)}; the data order after "
                "the resume will differ", stacklevel=5,  # fit's caller: via batches, _begin
            )
        for generator, state in zip(generators, saved["generators"]):
            generator.set_state(state)

    @contextmanager
    def rng_kept(self) -> Iterator[None]:
        """Undo every RNG draw made inside the block (an evaluation's, say)."""
        saved = self.capture_rng()
        try:
            yield
        finally:
            self.restore_rng(saved)

    def state_dict(self) -> dict[str, Any]:
        """``{"rng": {"epoch_start", "now"}, "data": <the data's own state or None>,
        "order": <the open epoch's order (relayout.describe) or None>}``."""
        return {"rng": {"epoch_start": self._epoch_rng, "now": self.capture_rng()},
                "data": self.data.state_dict() if is_stateful(self.data) else None,
                "order": self._layout if self._layout is not None else describe(self.data)}

    def load_state_dict(self, state: dict[str, Any], batch_in_epoch: int = 0,
                        other_world: bool = False) -> None:
        """Take a saved position. The RNG states are applied when the next epoch's
        batches are asked for, so nothing drawn in between (building the model, a
        hook's `before_train`) shifts them.

        Args:
            state: This rank's part of the checkpoint.
            batch_in_epoch: Batches per rank of its epoch the checkpoint had consumed.
            other_world: Whether the checkpoint was written by another number of
                processes.

        Raises:
            ValueError: a mid-epoch checkpoint of another number of processes, whose
                data's order cannot be recomputed.
        """
        order = state.get("order")
        relay = batch_in_epoch > 0 and (other_world or (order is not None and order["at"] > 0))
        if relay and (order is None or not can_relay(self.data)):
            which = "its data" if order is None else "this run's data"
            raise ValueError(
                f"it was written by another number of processes in the middle of an epoch "
                f"(after {batch_in_epoch} batches per process), and {which} has no global "
                "sample order to continue from (that needs a DataLoader over a map-style "
                "data set with a DistributedSampler, or one process's sequential sampler). "
                "Resume with the number of processes that wrote it, or from a checkpoint "
                "taken at the end of an epoch")
        if state["data"] is not None and is_stateful(self.data):
            self.data.load_state_dict(state["data"])  # type: ignore[attr-defined]
        self._pending = state["rng"]
        self._relay = order if relay else None
        self._open = self._layout = None  # an epoch left open by an earlier fit is not
        # where we resume


def is_stateful(data: Any) -> bool:
    """Data that saves and restores its own position (e.g. torchdata's StatefulDataLoader)."""
    return callable(getattr(data, "state_dict", None)) and callable(
        getattr(data, "load_state_dict", None))


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


def _persistent(data: Any) -> bool:
    return isinstance(data, DataLoader) and data.persistent_workers and data.num_workers > 0


def _iter_with_throwaway_base_seed(loader: DataLoader) -> Iterator[Any]:
    saved = loader.generator
    loader.generator = torch.Generator()
    try:
        return iter(loader)
    finally:
        loader.generator = saved


_NOTHING = object()


def _first_checked(batches: Iterator[Any], check: Callable[[Any], None]) -> Iterator[Any]:
    """`batches`, with `check` called on the first one before it is yielded (or on None
    when there is none)."""
    first = next(batches, _NOTHING)
    check(None if first is _NOTHING else first)
    if first is not _NOTHING:
        yield first
        yield from batches


# -- the RNG --------------------------------------------------------------------------


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


def capture_rng() -> dict[str, Any]:
    """Every global RNG state, as tensors and plain containers (loadable with
    ``weights_only=True``)."""
    state: dict[str, Any] = {"python": _python_rng_to_plain(random.getstate()),
                             "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")),
                          "pos": int(pos), "has_gauss": int(has_gauss),
                          "gauss": float(gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set every global RNG to a state from `capture_rng`."""
    random.setstate(_python_rng_from_plain(state["python"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        numpy_state = state["numpy"]
        np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype("uint32"),
                             numpy_state["pos"], numpy_state["has_gauss"],
                             numpy_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) != torch.cuda.device_count():
            raise CheckpointError(
                f"the checkpoint holds RNG states for {len(states)} CUDA devices, this "
                f"process sees {torch.cuda.device_count()}"
            )
        torch.cuda.set_rng_state_all(states)


def _python_rng_to_plain(state: tuple[Any, ...]) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss}


def _python_rng_from_plain(state: dict[str, Any]) -> tuple[Any, ...]:
    return (state["version"], tuple(state["internal"].tolist()), state["gauss"])


# -- signals --------------------------------------------------------------------------


# The SIGTERM this process received during a fit, if any: schedulers send it to mean
# "save and leave soon", so every later fit of the process returns at once.
_terminated: str | None = None


def termination_signal() -> str | None:
    """``"SIGTERM"`` once a SIGTERM stopped a `fit` of this process, else None.

    Every later `fit` in the process then returns at once with that ``stop_reason``
    (a SIGINT stops only the fit it interrupts: a notebook's interrupt, then another
    `fit`, continues training).
    """
    return _terminated


def clear_termination() -> None:
    """Forget a received SIGTERM, so that later fits of this process train again."""
    global _terminated
    _terminated = None


@contextmanager
def stop_on_signals(enabled: bool, request_stop: Callable[[str], None]) -> Iterator[None]:
    """Within the block, turn the first SIGTERM or SIGINT into ``request_stop(<name>)``.

    The step under way finishes and `fit` saves a checkpoint on its way out, which is
    what a preempted job needs. A second SIGINT aborts at once. A SIGTERM is also
    remembered for the rest of the process (`termination_signal`). Only the main thread
    can own signal handlers; elsewhere (or with `enabled` false) this does nothing.
    """
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second signal ({name}): aborting without a checkpoint")
        if received:
            return
        received.append(name)
        if signum == signal.SIGTERM:
            global _terminated
            _terminated = name
        print(f"[lossless_trainer] {name} received: stopping after the current step, "
              "then saving a checkpoint. Press Ctrl-C again to abort.",
              file=sys.stderr, flush=True)
        request_stop(name)

    # A handler installed outside Python reads as None and could not be restored:
    # leave such a signal alone.
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(sig) is not None}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
