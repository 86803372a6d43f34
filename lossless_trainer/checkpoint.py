"""Checkpoint files: atomic writes, safe loads, finding the newest valid one, pruning.

Files only: what goes into a checkpoint is `Trainer.state_dict`'s business, the RNG and
the data position are resume.py's, and gathering a sharded model is distributed.py's.

A checkpoint is one ``torch.save`` file holding only tensors and plain containers, so it
loads with ``torch.load(weights_only=True)``: loading can never run code. Files are named
``step-<step>.pt`` (nine digits) in ``<log_dir>/checkpoints/``.

Assumptions: one process writes a directory at a time (rank 0 under DDP); the file
system honours ``os.replace`` atomically and ``fsync`` durably (local disks and most
network file systems do).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "checkpoint_path",
    "list_checkpoints",
    "load_checkpoint",
    "load_newest_valid",
    "prune_checkpoints",
    "remove_stale_temporaries",
    "save_atomic",
    "set_aside_newer",
]

FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the run. Names the file."""


def checkpoint_path(directory: str, step: int) -> str:
    """Where the checkpoint of `step` lives in `directory`."""
    return os.path.join(directory, f"step-{step:09d}.pt")


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every checkpoint in `directory`, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


def save_atomic(state: dict[str, Any], path: str) -> None:
    """Write `state` to `path` so that a crash at any instant leaves either the old
    file or the complete new one, never a partial file under the final name.

    Writes a temporary file in the same directory, flushes and fsyncs it, renames it
    over `path` with `os.replace`, then fsyncs the directory so the rename is durable.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load one checkpoint safely (``weights_only=True``), onto the CPU.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, holds objects that are
            not tensors or plain containers, or is not a lossless_trainer checkpoint.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {_short(exc)}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} is not a lossless_trainer checkpoint of format "
            f"{FORMAT_VERSION}"
        )
    return state


def load_newest_valid(directory: str) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint in `directory` that loads, with its path.

    A newer file that fails to load (truncated by a crash, corrupt, unsafe) gives a
    warning naming it, and the previous one is tried.

    Returns:
        None if the directory holds no checkpoint at all.

    Raises:
        CheckpointError: checkpoints exist but none of them loads.
    """
    candidates = list_checkpoints(directory)
    failures = []
    for _, path in reversed(candidates):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            failures.append(str(exc))
            warnings.warn(f"{exc}; falling back to the previous checkpoint", stacklevel=2)
    if failures:
        raise CheckpointError(
            f"no valid checkpoint in {directory}: " + "; ".join(failures)
            + f". To start fresh, move {directory} aside or use another log_dir"
        )
    return None


def prune_checkpoints(directory: str, keep_last: int, just_saved: str) -> None:
    """Delete all but the newest `keep_last` checkpoints; never `just_saved`.

    Run after a save completed.
    """
    for _, path in list_checkpoints(directory)[:-keep_last]:
        if os.path.abspath(path) != os.path.abspath(just_saved):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def set_aside_newer(directory: str, step: int) -> list[str]:
    """Rename checkpoints of steps after `step` to ``<name>.superseded``.

    A run resumed from `step` writes a new history from there; newer files (a corrupt
    one that was skipped, or the future of an older checkpoint resumed on purpose) would
    otherwise count as the newest and be resumed from, or keep the new ones from being
    kept. They are renamed, not deleted, so nothing is lost.
    """
    moved = []
    for found_step, path in list_checkpoints(directory):
        if found_step > step:
            os.replace(path, path + ".superseded")
            moved.append(path + ".superseded")
    return moved


def remove_stale_temporaries(directory: str) -> None:
    """Delete temporary files a killed save left behind. Call before writing starts."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(_TMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
