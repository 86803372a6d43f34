"""The checkpointer: writing a run's checkpoints, waiting for them, and choosing and
loading the one a run resumes from.

A checkpoint is what `TrainerBase.state_dict` returns (a subclass extends it with
`super()`): in the ``"full"`` format one file, written atomically by rank 0 with a
checksum of its contents (checkpoint.py); in the ``"sharded"`` format one directory,
every rank writing its shards of the model and optimizers with
``torch.distributed.checkpoint`` (sharded.py). Either may be written on a background
thread (``async_checkpoint``). The model's and the optimizers' states are taken in the
format being written (`Checkpointer.model_state`, `Checkpointer.optimizer_state`): under
FSDP, gathered whole for a file, each rank's shards for a directory.

Also here: the rule for a checkpoint written with another optimizer, or other
hyperparameters (`compare_optimizers`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import sharded
from .checkpoint import (
    FORMAT_VERSION,
    BackgroundSaver,
    CheckpointError,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_stale_temporaries,
    save_atomic,
    set_aside_newer,
    stage_to_cpu,
)
from .relayout import batch_change
from .state import TrainState, logger

if TYPE_CHECKING:
    from .distributed import Distributed
    from .hooks import HookList
    from .precision import Precision
    from .resume import DataCursor
    from .summary import SummarySink

__all__ = ["Checkpointer", "apply_optimizer_changes", "check_counters", "compare_optimizers",
           "optimizer_record", "resume_from_checkpoint"]


class Checkpointer:
    """Writes and finds a run's checkpoints, and takes the model's and optimizers' state
    in the format being written or read.

    Who calls what: `TrainerBase.save_checkpoint` calls `save` (after the logbook put
    the logs on disk), `TrainerBase.fit` calls `resume` on its first fit and `finish`
    at its end; `TrainerBase.state_dict` and `load_state_dict` call `run_state` and
    `load_run_state`, and a step that owns optimizers calls `optimizer_state` and
    `load_optimizer_state` for each (`TrainerBase.optimizer_state_dict`).

    Args:
        dist: This process's place in the run.
        checkpoint_dir: Where the run's checkpoints go (``<log_dir>/checkpoints``).
        checkpoint_format: ``"full"``, ``"sharded"``, or ``"auto"``: sharded under FSDP,
            full otherwise.
        async_checkpoint: Write on a background thread (rank 0's for full checkpoints,
            every rank's for sharded ones), one write at a time.
        model: The user's module (not a distributed wrapper), whose keys checkpoints use.
        cursor: The data position and the RNG states.
        hooks: The hooks, whose states checkpoints hold.
        sink: The summary sink, whose pending window checkpoints hold.
    """

    def __init__(self, dist: Distributed, checkpoint_dir: str, checkpoint_format: str,
                 async_checkpoint: bool, model: nn.Module, cursor: DataCursor, hooks: HookList,
                 sink: SummarySink) -> None:
        self.dist = dist
        self.model, self.cursor, self.hooks, self.sink = model, cursor, hooks, sink
        self.directory = checkpoint_dir
        self.format = checkpoint_format if checkpoint_format != "auto" \
            else ("sharded" if dist.strategy == "fsdp" else "full")
        self.saver = BackgroundSaver() if async_checkpoint else None
        # While a sharded save takes the state: the optimizer states it was given (by
        # id), whose tensors DCP writes. None: the full format.
        self._sharding: dict[int, None] | None = None
        self._loading: str | None = None  # the sharded checkpoint being loaded
        self.read_only = False  # a replay of a failure (nonfinite.py): `save` writes nothing

    # -- the run's state ---------------------------------------------------------------------

    def run_state(self, counters: TrainState, grad_accum_steps: int, precision: Precision
                  ) -> dict[str, Any]:
        """What `TrainerBase.state_dict` returns: the counters, the model, the precision
        policy's state, and each rank's own part (the RNG states and data position, the
        hook states, the pending summary window), gathered to rank 0 under torchrun as
        ``"ranks"``; every rank calls it."""
        model = self.model_state(self.model)
        per_rank = {**self.cursor.state_dict(),  # "rng", "data" and "order"
                    "hooks": self.hooks.state_dict(), "summary": self.sink.state_dict()}
        state = {"format": FORMAT_VERSION, "model": model,
                 "trainer": {"step": counters.step, "epoch": counters.epoch,
                             "batch_in_epoch": counters.batch_in_epoch},
                 "precision": precision.state_dict(),
                 # The global batch, to warn when a resume on another number of
                 # processes changes it.
                 "layout": {"world_size": self.dist.world_size,
                            "grad_accum_steps": grad_accum_steps,
                            "batch_size": getattr(self.cursor.data, "batch_size", None)},
                 **per_rank}
        if self.dist.enabled:
            state["world_size"] = self.dist.world_size
            state["ranks"] = self.dist.gather_to_main(per_rank)
        return state

    def load_run_state(self, state: dict[str, Any], seed: int | None, grad_accum_steps: int,
                       precision: Precision) -> TrainState:
        """Restore what `run_state` returned (for a sharded checkpoint, its
        ``trainer.pt``: the tensors come from its directory), taking this rank's part, or
        for a checkpoint of another number of processes what `Distributed.own_part` gives
        it (`seed`: for new ranks' RNG). Returns the counters."""
        self._loading = state.get("sharded")
        other_world = state.get("world_size", 1) != self.dist.world_size
        own = self.dist.own_part(state, seed)
        counters = own["trainer"]
        self.cursor.load_state_dict(own, counters["batch_in_epoch"], other_world)
        self.load_model_state(self.model, own["model"])
        precision.load_state_dict(own.get("precision", {}))
        self.hooks.load_state_dict(own["hooks"])
        self.sink.load_state_dict(own["summary"])
        if other_world and self.dist.is_main and "layout" in own:
            change = batch_change(own["layout"], self.dist.world_size, grad_accum_steps,
                                  getattr(self.cursor.data, "batch_size", None))
            if change is not None:
                warnings.warn(change, stacklevel=5)
        return TrainState(step=counters["step"], epoch=counters["epoch"],
                          batch_in_epoch=counters["batch_in_epoch"])

    # -- the states of the model and the optimizers ---------------------------------------

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """The model's state for the checkpoint being written (a collective under
        torchrun): under FSDP, gathered whole to rank 0 for a file, each rank's shards
        for a sharded directory."""
        if self._sharding is not None:
            return sharded.model_state(model)
        return self.dist.model_state(model)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer
                        ) -> dict[str, Any]:
        """The state of `optimizer` (over some or all of `model`'s parameters) for the
        checkpoint being written, as `model_state`. Keep it at the top level of the
        state dict: a sharded save writes the tensors of what this returned with DCP."""
        if self._sharding is None:
            return self.dist.optimizer_state(model, optimizer)
        state = sharded.optimizer_state(model, optimizer)
        self._sharding[id(state)] = None
        return state

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Load the model's entry of a checkpoint (for a sharded one, with its tensors
        from the directory `begin_load` named)."""
        if self._loading is not None:
            sharded.load_model(self._loading, model, state, self.dist)
        else:
            self.dist.load_model_state(model, state)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any]) -> None:
        """Load an optimizer's entry of a checkpoint, as `load_model_state`.

        Raises:
            CheckpointError: the entry is a sharded checkpoint's, whose tensors are in
                its directory, outside a load of that checkpoint.
        """
        if "prefix" in state and self._loading is None:
            raise CheckpointError(
                "this optimizer entry comes from a sharded checkpoint, whose tensors are in "
                "the checkpoint's directory: load it in load_state_dict while the checkpoint "
                "is resumed (resume=..., load_checkpoint), not on its own")
        if self._loading is not None:
            sharded.load_optimizer(self._loading, model, optimizer, state, self.dist)
        else:
            self.dist.load_optimizer_state(model, optimizer, state)

    # -- writing ----------------------------------------------------------------------------

    def save(self, path: str, state_dict: Callable[[], dict[str, Any]], step: int,
             keep_last: int | None = None) -> None:
        """Write the checkpoint of `state_dict()` to `path` (see
        `TrainerBase.save_checkpoint`); every rank calls it. With `keep_last`, prune the
        directory's older checkpoints once this one is complete. With `read_only` (a
        replay of a failure, which changes nothing of the run), write nothing."""
        if self.read_only:
            logger.warning("not saving %s: a replay writes no checkpoint", path)
            return
        def written() -> None:
            if keep_last is not None:
                prune_checkpoints(os.path.dirname(path), keep_last, just_saved=path)
            logger.info("saved checkpoint %s", path)

        if self.format == "sharded":
            self._save_sharded(path, state_dict, step, written)
            return
        state = state_dict()
        _refuse_shards(state)
        # Rank 0 writes; the others wait for its result, and raise its error if it fails.
        if self.saver is None:
            self.dist.on_main(lambda: (save_atomic(state, path), written()))
        else:  # the write before this one must be complete first (its error, every rank's)
            self.dist.on_main(lambda: self.saver.submit(stage_to_cpu(state), path, written))

    def _save_sharded(self, path: str, state_dict: Callable[[], dict[str, Any]], step: int,
                      written: Callable[[], None]) -> None:
        """`save` for the sharded format: DCP writes the model's and optimizers' tensors
        (every rank its own), rank 0 the rest (``trainer.pt``) and then the completion
        marker."""
        dist, saver = self.dist, self.saver
        if saver is not None:
            saver.wait()  # every rank's thread: the previous save is complete everywhere
        self._sharding = {}
        try:
            state = state_dict()
            optimizers = [key for key, value in state.items() if id(value) in self._sharding]
            if len(optimizers) != len(self._sharding):
                raise ValueError("an optimizer_state_dict() result is not at the top level of "
                                 "state_dict(): keep each under a key of its own there")
        finally:
            self._sharding = None
        tensors, small = sharded.split(state, optimizers)
        _refuse_shards(small)
        dist.on_main(lambda: sharded.prepare(path))
        wait = sharded.start_write(tensors, path, dist, background=saver is not None)

        def complete() -> None:
            wait()
            sharded.finish(path, small, step, dist, then=written)

        if saver is None:
            complete()
        else:
            small = stage_to_cpu(small)
            saver.run(complete)

    def wait(self) -> None:
        """With ``async_checkpoint``, block until the checkpoint being written is on disk
        (every rank; rank 0's error is raised on all)."""
        if self.saver is None:
            return
        if self.format == "sharded":
            self.saver.wait()  # every rank's thread ends with the same outcome
        else:
            self.dist.on_main(self.saver.wait)

    def finish(self, failed: bool) -> list[BaseException]:
        """At the end of a fit, wait for the checkpoint being written (a checkpoint of a
        good step). After a failure, this rank's own write (no collective), its error
        logged; otherwise every rank's, its error returned."""
        if self.saver is None:
            return []
        try:
            if failed:
                self.saver.wait()
            else:
                self.wait()
        except Exception as error:
            if not failed:
                return [error]
            logger.error("the checkpoint being written failed", exc_info=error)
        return []

    # -- resuming ---------------------------------------------------------------------------

    def resume(self, resume: Any, load_state_dict: Callable[[dict[str, Any]], None],
               batches_per_epoch: int | None, set_aside: bool) -> str | None:
        """`resume_from_checkpoint` in this run's checkpoint directory (or at the path
        `resume` gives); returns the checkpoint resumed from, or None."""
        def load(state: dict[str, Any]) -> None:
            self._loading = state.get("sharded")  # whatever the subclass loads first
            load_state_dict(state)

        try:
            return resume_from_checkpoint(resume, self.directory, self.dist, load,
                                          batches_per_epoch, set_aside=set_aside)
        finally:
            self._loading = None


def resume_from_checkpoint(resume: Any, checkpoint_dir: str, dist: Distributed,
                           load_state_dict: Callable[[dict[str, Any]], None],
                           batches_per_epoch: int | None = None,
                           set_aside: bool = True) -> str | None:
    """Find the checkpoint `resume` points to and load it with `load_state_dict`.

    With ``"auto"`` the newest checkpoint that verifies is taken: a file (rank 0 loads
    and verifies it) or a sharded directory (every rank hashes its share of the
    files); one that fails gets a warning, and the one before it is tried. Every rank
    then loads the same checkpoint. Checkpoints newer than the one resumed from are set
    aside (with `set_aside`).

    Args:
        resume: The Trainer's option: ``"auto"``, False or a path.
        checkpoint_dir: The run's checkpoint directory.
        dist: This process's place in the run.
        load_state_dict: Applies a loaded state (`Trainer.load_state_dict`); for a
            sharded checkpoint, ``trainer.pt`` with ``"sharded"`` set to its directory.
        batches_per_epoch: The data's batches per epoch on this rank, when known: a
            checkpoint's position in the epoch must lie within it (when written by as
            many processes).
        set_aside: Rename the checkpoints newer than the one loaded.

    Returns:
        The path resumed from, or None for a fresh start.

    Raises:
        CheckpointError: the checkpoint cannot be read or does not fit this run.
        ValueError: ``resume=False`` in a directory that already holds checkpoints.
    """
    found = _choose(resume, checkpoint_dir, dist)
    if found is None:
        return None
    path, state = found
    same_world = state.get("world_size", 1) == dist.world_size
    check_counters(state, path, batches_per_epoch if same_world else None)
    try:
        load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit this run: {exc}. Was it written by a "
            "different model, optimizer or script?"
        ) from exc
    if dist.is_main:
        logger.warning("resumed from %s at step %d", path, state["trainer"]["step"])
        if set_aside:
            for moved in set_aside_newer(checkpoint_dir, state["trainer"]["step"]):
                logger.warning("set aside %s: it is newer than the checkpoint resumed from",
                               moved)
    return path


def _choose(resume: Any, checkpoint_dir: str, dist: Distributed
            ) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint to resume from, verified, and its state for this rank (for a
    sharded one, its ``trainer.pt``). Every rank calls it and gets the same path."""
    def listing() -> list[tuple[bool, str]]:
        remove_stale_temporaries(checkpoint_dir)
        if resume is None:  # a replay from the start: the checkpoints there are later
            return []
        if resume is False:
            existing = list_checkpoints(checkpoint_dir)
            if existing:
                raise ValueError(
                    f"resume=False but {checkpoint_dir} already holds {len(existing)} "
                    "checkpoint(s) of an earlier run; starting fresh there would mix the "
                    "two runs. Use another log_dir, delete them, or resume"
                )
            return []
        paths = [p for _, p in list_checkpoints(checkpoint_dir)] if resume == "auto" \
            else [resume]
        return [(sharded.is_sharded(p), p) for p in reversed(paths)]

    preloaded: dict[str, Any] = {}

    def load_file(path: str) -> str | None:  # rank 0
        try:
            preloaded["state"] = load_checkpoint(path)
        except CheckpointError as exc:
            return str(exc)
        return None

    failures = []
    for directory, path in dist.on_main(listing):
        problem = sharded.verify(path, dist) if directory \
            else dist.on_main(lambda: load_file(path))  # noqa: B023 - called at once
        if problem is None:
            if directory:
                return path, sharded.read_small(path)
            return path, dist.read_checkpoint(path, preloaded.get("state"), load_checkpoint)
        if resume != "auto":
            raise CheckpointError(problem)
        failures.append(problem)
        if dist.is_main:
            warnings.warn(f"{problem}; falling back to the previous checkpoint", stacklevel=4)
    if failures:
        raise CheckpointError(
            f"no valid checkpoint in {checkpoint_dir}: " + "; ".join(failures)
            + f". To start fresh, move {checkpoint_dir} aside or use another log_dir")
    return None


def check_counters(state: dict[str, Any], path: str, batches_per_epoch: int | None) -> None:
    """Refuse a checkpoint whose counters cannot be true: negative, a step that is not
    the one its file name says, or a position past the end of the epoch.

    Raises:
        CheckpointError: naming the field, its value and the file.
    """
    counters = state.get("trainer")
    if not isinstance(counters, dict):
        raise CheckpointError(f"checkpoint {path} has no trainer counters")
    for field in ("step", "epoch", "batch_in_epoch"):
        value = counters.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(
                f"checkpoint {path} is inconsistent: trainer.{field} is {value!r}, not a "
                "count (an int >= 0); the file was not written by this library as it is")
    named = checkpoint_step(path)
    if named is not None and named != counters["step"]:
        raise CheckpointError(
            f"checkpoint {path} is inconsistent: trainer.step is {counters['step']}, but the "
            f"file is named for step {named}; it was renamed or its contents replaced. "
            "Resume from the file of its own step, or pass another one with resume=")
    if batches_per_epoch is not None and counters["batch_in_epoch"] > batches_per_epoch:
        raise CheckpointError(
            f"checkpoint {path} does not fit this run's data: trainer.batch_in_epoch is "
            f"{counters['batch_in_epoch']}, past the end of an epoch of {batches_per_epoch} "
            "batches; was the data (its size, batch size or number of processes) changed?")


def optimizer_record(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's class and, per parameter group, the hyperparameters it was built
    with, as a checkpoint keeps them (`compare_optimizers` reads them back).

    Taken when the Trainer builds the optimizer, before an lr scheduler changes ``lr``
    (or, for a scheduler built earlier, from its ``initial_lr``). Implementation flags
    (`IMPLEMENTATION_FLAGS`) and values that are not plain are left out.
    """
    groups = []
    for group in optimizer.param_groups:
        values = {key: value for key, value in group.items()
                  if key not in ("params", "initial_lr", *IMPLEMENTATION_FLAGS)
                  and _plain(value)}
        if "initial_lr" in group:
            values["lr"] = group["initial_lr"]
        groups.append(values)
    kind = type(optimizer)
    return {"class": f"{kind.__module__}.{kind.__qualname__}", "groups": groups}


# Options that change how an optimizer computes, not what; not compared (a resumed run
# keeps the checkpoint's, as Optimizer.load_state_dict does).
IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))


def compare_optimizers(saved: dict[str, Any] | None, current: dict[str, Any],
                       has_scheduler: bool) -> list[tuple[int, str, Any, Any]]:
    """How this run's optimizer differs from the checkpoint's: ``(group, key, saved
    value, this run's value)`` for every hyperparameter both set differently.

    The rule: a different class, or another number of parameter groups, is refused; a
    changed hyperparameter is the run's (the caller applies it and warns), except a
    changed ``lr`` under an lr scheduler, which is refused, as the schedule restored
    from the checkpoint was built on the old one.

    Raises:
        ValueError: a difference that is refused, saying what differs.
    """
    if saved is None:  # a checkpoint from before optimizer records: nothing to compare
        return []
    if saved["class"] != current["class"]:
        raise ValueError(
            f"it was written with the optimizer {saved['class']}, and this run's is "
            f"{current['class']}; their states do not carry over. Use the same optimizer to "
            "resume, or start a new run (another log_dir) from the model's weights")
    if len(saved["groups"]) != len(current["groups"]):
        raise ValueError(
            f"its optimizer has {len(saved['groups'])} parameter groups, and this run's has "
            f"{len(current['groups'])}")
    changes = []
    for index, (before, now) in enumerate(zip(saved["groups"], current["groups"])):
        for key in [key for key in now if key in before]:  # in the optimizer's own order
            if not _same(before[key], now[key]):
                changes.append((index, key, before[key], now[key]))
    refused = [c for c in changes if c[1] == "lr"] if has_scheduler else []
    if refused:
        group, _, old, new = refused[0]
        raise ValueError(
            f"lr of parameter group {group} is {new} in this run and was {old}, but the "
            "lr_scheduler continues from the checkpoint, whose schedule was built on "
            f"{old}. Resume with lr={old}, or start a new run (another log_dir) from the "
            "model's weights with the new schedule")
    return changes


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu())
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _refuse_shards(state: dict[str, Any]) -> None:
    """Refuse a state holding a shard of a tensor (an FSDP DTensor) where rank 0 writes it
    alone: it would keep rank 0's shard only. (The model's and the optimizers' states
    taken through the checkpointer are gathered, or written by DCP.)"""
    stack: list[tuple[str, Any]] = [("", state)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{path}/{key}", item) for key, item in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{path}/{i}", item) for i, item in enumerate(value))
        elif hasattr(value, "to_local") and hasattr(value, "placements"):
            raise ValueError(
                f"state_dict() holds a sharded tensor at {path}: rank 0 would save its own "
                "shard only. Take an optimizer's state with self.optimizer_state_dict(opt), "
                "and other sharded tensors with get_model_state_dict/full_tensor()")


def apply_optimizer_changes(optimizer: torch.optim.Optimizer,
                            changes: list[tuple[int, str, Any, Any]]) -> None:
    """This run's hyperparameters win over the checkpoint's (its state, such as momentum
    buffers, is kept); each change is listed in a warning. Implementation flags
    (``foreach``, ``fused``, ...) stay the checkpoint's, as ``Optimizer.load_state_dict``
    leaves them: its state was laid out for them."""
    groups = optimizer.param_groups
    for index, key, _, new in changes:
        groups[index][key] = new
    if changes:
        listed = "; ".join(f"group {index} {key}: {old!r} -> {new!r}"
                           for index, key, old, new in changes)
        warnings.warn(f"this run's optimizer hyperparameters differ from the checkpoint's, "
                      f"and this run's are used: {listed}", stacklevel=4)
