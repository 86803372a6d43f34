"""Sharded checkpoints: one directory per checkpoint, written by every rank in parallel
with ``torch.distributed.checkpoint`` (DCP), and readable on any number of processes.

A sharded checkpoint ``checkpoints/step-<step>/`` holds:

* DCP's files (``__<rank>_<n>.distcp`` and ``.metadata``): the model's and optimizer's
  tensors, each rank writing its own shards (under FSDP) or its share of the replicated
  tensors (DCP spreads those over the ranks). Only tensors go there: DCP loads anything
  else with a full unpickler, which could run code.
* ``trainer.pt``: everything else, as a full checkpoint holds it (counters, every rank's
  RNG states and data position, hook states, summary window, the optimizer's parameter
  groups), written by rank 0 with `save_atomic`.
* ``complete.json``, written last by rank 0 once every rank's files are on disk: the
  sha256 of every file. Without it the directory is incomplete (a save was interrupted)
  and is never resumed from; with it, a file that does not match its hash makes the
  checkpoint corrupt. Every rank hashes its share of the files, on save and on load.

Loading reshards: each rank reads the parts of the tensors its model and optimizer hold
now, whatever the number of processes that wrote them.

Assumptions: every rank sees the same directory (one node, or a shared file system);
the process group is the trainer's (`Distributed`), or none for one process.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    checkpoint_step,
    load_checkpoint,
    remove,
    save_atomic,
    write_atomic,
)

if TYPE_CHECKING:
    from .distributed import Distributed

__all__ = [
    "MARKER",
    "SMALL",
    "finish",
    "is_sharded",
    "load_model",
    "load_optimizer",
    "model_state",
    "optimizer_state",
    "prepare",
    "read_full",
    "read_small",
    "split",
    "start_write",
    "verify",
]

MARKER = "complete.json"
SMALL = "trainer.pt"
_KIND = "lossless_trainer sharded checkpoint"
_VERSION = 1
# Keys of the tensors DCP stores: "model/<fqn>" and "optim/<fqn>/<state key>". Slashes,
# because parameter names are full of dots.
_MODEL, _OPTIM = "model/", "optim/"


def _dcp() -> Any:
    """``torch.distributed.checkpoint``, without its warning that one process saves or
    loads alone (which it says on every call, and which is what is meant here)."""
    import torch.distributed.checkpoint as dcp

    warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable "
                            "or uninitialized, assuming the intent is to")
    return dcp


def is_sharded(path: str) -> bool:
    """Whether `path` is a sharded checkpoint (a directory), not a checkpoint file."""
    return os.path.isdir(path)


# -- the model's and optimizer's state ---------------------------------------------------


def model_state(model: nn.Module) -> dict[str, Any]:
    """The model's state dict as DCP saves it: each rank's own shards under FSDP
    (DTensors), full tensors otherwise."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The state dict of `optimizer` (over some or all of `model`'s parameters) as DCP
    saves it: keyed by parameter name, each rank's own shards under FSDP. A collective
    under torchrun (every rank calls it).

    An optimizer that holds no state yet (before its first step, or a stateless one)
    gives only its hyperparameters: DCP would lay its state out by stepping it once
    with zero gradients, which changes a stateful optimizer (Adam's step count)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if optimizer.state:
        return get_optimizer_state_dict(model, optimizer)
    groups = [{k: v for k, v in group.items() if k != "params"}
              for group in optimizer.param_groups]
    return {"state": {}, "param_groups": groups}


def _prefix(key: str) -> str:
    """Where DCP keeps the tensors of the optimizer state under `key` of a checkpoint
    (the Trainer's ``"optimizer"``: `_OPTIM`, as it always was)."""
    return _OPTIM if key == "optimizer" else f"optim:{key}/"


def split(state: dict[str, Any], optimizers: Iterable[str] = ("optimizer",)
          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tensors DCP writes, flat: ``state["model"]``'s under `_MODEL`, and those of
    the optimizer states under the keys `optimizers` under their `_prefix`; and the
    rest of `state`, which goes to ``trainer.pt``, with the model's and each
    optimizer's non-tensor entries in their places (an optimizer's: its
    ``"param_groups"``, its ``"state"`` without tensors, and its ``"prefix"``)."""
    tensors: dict[str, Any] = {}
    model_rest = {}
    for key, value in state["model"].items():
        if isinstance(value, torch.Tensor):
            tensors[_MODEL + key] = value
        else:
            model_rest[key] = value
    rest = {**state, "model": model_rest}
    for key in optimizers:
        if "/" in key:  # one key's prefix must not start another's
            raise ValueError(f"an optimizer state's key in state_dict() has a '/': {key!r}")
        prefix, state_rest = _prefix(key), {}
        for name, entries in state[key].get("state", {}).items():
            for entry, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{prefix}{name}/{entry}"] = value
                else:
                    state_rest.setdefault(name, {})[entry] = value
        rest[key] = {"param_groups": state[key].get("param_groups", []), "state": state_rest,
                     "prefix": prefix}
    return tensors, rest


def _optimizer_entries(tensors: dict[str, Any], rest: dict[str, Any], prefix: str
                       ) -> dict[str, dict[str, Any]]:
    state = {name: dict(entries) for name, entries in rest["state"].items()}
    for key, value in tensors.items():
        if key.startswith(prefix):
            name, _, entry = key[len(prefix):].rpartition("/")
            state.setdefault(name, {})[entry] = value
    return state


def load_model(path: str, model: nn.Module, rest: dict[str, Any], dist: Distributed) -> None:
    """Load the model's tensors of the sharded checkpoint `path` into `model`, resharded
    to how it is laid out now; `rest` is the model's entry of ``trainer.pt``. A
    collective under torchrun.

    Raises:
        CheckpointError: the checkpoint's model has other parameters than `model`.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    saved = _metadata(path)
    targets = {_MODEL + key: value for key, value in get_model_state_dict(model).items()
               if isinstance(value, torch.Tensor)}
    saved_model = {k for k in saved if k.startswith(_MODEL)}
    if set(targets) != saved_model:
        missing = sorted(k[len(_MODEL):] for k in set(targets) - saved_model)
        unexpected = sorted(k[len(_MODEL):] for k in saved_model - set(targets))
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: missing keys {missing[:8]}, "
            f"unexpected keys {unexpected[:8]}. Was it written by a different model?")
    _dcp().load(targets, checkpoint_id=path, process_group=dist.checkpoint_group(),
                no_dist=not dist.enabled)
    set_model_state_dict(model, {**rest, **{key[len(_MODEL):]: value
                                            for key, value in targets.items()}})


def load_optimizer(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                   rest: dict[str, Any], dist: Distributed) -> None:
    """Load an optimizer's tensors of the sharded checkpoint `path` into `optimizer`,
    resharded; `rest` is its entry of ``trainer.pt`` (`split`'s, which says where its
    tensors are). A collective under torchrun."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    prefix = rest.get("prefix", _OPTIM)
    saved = _metadata(path)
    if not any(key.startswith(prefix) for key in saved):
        # No optimizer state (before its first step, or plain SGD): its hyperparameters;
        # a fresh optimizer must not be stepped to lay out a state it does not have.
        for group, saved_group in zip(optimizer.param_groups, rest["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        return
    # A fresh optimizer's state is laid out by one step with zero gradients (DCP's way),
    # for every parameter: keep only what the checkpoint has.
    layout = get_optimizer_state_dict(model, optimizer)
    targets = {f"{prefix}{name}/{entry}": value
               for name, entries in layout["state"].items()
               for entry, value in entries.items() if isinstance(value, torch.Tensor)}
    targets = {k: v for k, v in targets.items() if k in saved}
    _dcp().load(targets, checkpoint_id=path, process_group=dist.checkpoint_group(),
                no_dist=not dist.enabled)
    set_optimizer_state_dict(model, optimizer, optim_state_dict={
        "state": _optimizer_entries(targets, rest, prefix),
        "param_groups": rest["param_groups"]})


def _metadata(path: str) -> dict[str, Any]:
    """DCP's description of each stored item, by key."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path).read_metadata().state_dict_metadata


# -- writing -------------------------------------------------------------------------------


def prepare(path: str) -> None:
    """Make `path` an empty directory (rank 0, before a save): an earlier directory of
    the same step (a save interrupted before its marker) is moved aside, then deleted."""
    if os.path.lexists(path):
        remove(path)
    os.makedirs(path)


def start_write(tensors: dict[str, Any], path: str, dist: Distributed,
                background: bool) -> Callable[[], None]:
    """Start writing `tensors` to `path` with DCP on every rank; return the function
    that waits for the write to finish. With `background`, the tensors are first staged
    to CPU memory (the step waits only for that) and written by DCP's thread
    (``dcp.async_save``); otherwise the write is done when this returns."""
    dcp = _dcp()

    group = dist.checkpoint_group()
    if not background:
        dcp.save(tensors, checkpoint_id=path, process_group=group, no_dist=not dist.enabled)
        return lambda: None
    future = dcp.async_save(tensors, checkpoint_id=path, process_group=group,
                            no_dist=not dist.enabled)
    future = getattr(future, "upload_completion", future)
    return future.result


def finish(path: str, small: dict[str, Any], step: int, dist: Distributed,
           then: Callable[[], None] | None = None) -> None:
    """After every rank's DCP files are written: hash them (each rank its share), and
    on rank 0 write ``trainer.pt`` and, last, the completion marker, then call `then`
    (pruning). Every rank calls it (from the thread that wrote, for a background save);
    a failure on any rank is raised on every rank."""
    group = dist.checkpoint_group()
    names = dist.broadcast(sorted(os.listdir(path)) if dist.is_main else None, group)
    try:
        mine: dict[str, str] | str = _hash_files(path, names[dist.rank::dist.world_size])
    except OSError as exc:  # reported by rank 0, so that no rank waits for this one
        mine = f"rank {dist.rank} could not read back {path}: {exc}"
    shares = dist.gather_to_main(mine, group)

    def complete() -> None:
        failed = [share for share in shares or () if isinstance(share, str)]
        if failed:
            raise OSError(failed[0])
        save_atomic(small, os.path.join(path, SMALL))
        hashes = {name: digest for share in shares or () for name, digest in share.items()}
        hashes.update(_hash_files(path, [SMALL]))
        marker = {"kind": _KIND, "version": _VERSION, "step": step,
                  "world_size": dist.world_size, "files": dict(sorted(hashes.items()))}
        write_atomic(os.path.join(path, MARKER),
                     lambda f: f.write(json.dumps(marker, indent=1).encode()))
        if then is not None:
            then()

    dist.on_main(complete, group)


def _hash_files(directory: str, names: list[str]) -> dict[str, str]:
    def digest(name: str) -> str:
        with open(os.path.join(directory, name), "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    if len(names) <= 1:
        return {name: digest(name) for name in names}
    with concurrent.futures.ThreadPoolExecutor(min(len(names), os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(digest, names)))


# -- reading -------------------------------------------------------------------------------


def verify(path: str, dist: Distributed | None = None) -> str | None:
    """What is wrong with the sharded checkpoint `path`, or None if it is complete and
    every file matches its hash. Under torchrun every rank calls it and hashes its share
    of the files; every rank gets the same answer."""
    def read_marker() -> tuple[str | None, list[str]]:
        marker = os.path.join(path, MARKER)
        if not os.path.exists(marker):
            return (f"checkpoint {path} is incomplete: it has no {MARKER}, which is written "
                    "last, so its save was interrupted", [])
        try:
            with open(marker, "rb") as f:
                content = json.loads(f.read())
            files = content["files"]
            if content.get("kind") != _KIND or not isinstance(files, dict):
                raise ValueError("not a lossless_trainer marker")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"checkpoint {path} is corrupt: its {MARKER} cannot be read ({exc})", []
        named = checkpoint_step(path)
        if named is not None and content.get("step") != named:
            return (f"checkpoint {path} is inconsistent: its {MARKER} is of step "
                    f"{content.get('step')}", [])
        return None, sorted(files.items())

    if dist is None or not dist.enabled:
        problem, files = read_marker()
        return problem or _check_hashes(path, files)
    problem, files = dist.broadcast(read_marker() if dist.is_main else None)
    if problem is not None:
        return problem
    found = dist.all_gather(_check_hashes(path, files[dist.rank::dist.world_size]))
    return next((p for p in found if p is not None), None)


def _check_hashes(path: str, files: list[tuple[str, str]]) -> str | None:
    for name, expected in files:
        try:
            actual = _hash_files(path, [name])[name]
        except OSError as exc:
            return f"checkpoint {path} is incomplete: {name} cannot be read ({exc.strerror})"
        if actual != expected:
            return (f"checkpoint {path} is corrupt: {name} does not match the hash written "
                    f"with it in {MARKER} (a bit changed on disk or in a copy)")
    return None


def read_small(path: str) -> dict[str, Any]:
    """``trainer.pt`` of a verified sharded checkpoint: everything but the tensors DCP
    holds, with ``"sharded"`` set to `path` (where `load_model` and `load_optimizer` read)."""
    state = load_checkpoint(os.path.join(path, SMALL))
    state["sharded"] = path
    return state


def read_full(path: str) -> dict[str, Any]:
    """The whole sharded checkpoint in this process, on the CPU, as full tensors:
    ``{"model": state_dict, "optimizer": {"state": {name: {key: tensor}},
    "param_groups": ...}, **trainer.pt}``, and every other optimizer state (a custom
    step's) under its own key the same way. For export and inspection; needs no process
    group. Verify it first (`verify`)."""
    dcp = _dcp()
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    small = load_checkpoint(os.path.join(path, SMALL))
    targets = {key: torch.empty(item.size, dtype=item.properties.dtype)
               for key, item in _metadata(path).items()
               if isinstance(item, TensorStorageMetadata)}
    dcp.load(targets, checkpoint_id=path, no_dist=True)
    full = {**small, "model": {**small["model"], **{
        key[len(_MODEL):]: value for key, value in targets.items() if key.startswith(_MODEL)}}}
    for key, rest in small.items():  # the Trainer's optimizer, and a custom step's
        if isinstance(rest, dict) and (key == "optimizer" or "prefix" in rest):
            full[key] = {"state": _optimizer_entries(targets, rest, rest.get("prefix", _OPTIM)),
                         "param_groups": rest["param_groups"]}
    return full
