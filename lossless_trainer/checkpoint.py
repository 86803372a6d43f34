"""Checkpoint files: atomic writes, safe loads, finding the newest valid one, pruning.

Files only: what goes into a checkpoint is `TrainerBase.state_dict`'s business (the run's
part assembled by checkpointer.py), the RNG and the data position are resume.py's, and
gathering a sharded model is distributed.py's.

A checkpoint is one ``torch.save`` file holding only tensors and plain containers, so it
loads with ``torch.load(weights_only=True)``: loading can never run code. Files are named
``step-<step>.pt`` (nine digits) in ``<log_dir>/checkpoints/``. A sharded checkpoint is a
directory ``step-<step>/`` beside them (its contents are sharded.py's); listing,
pruning and setting aside treat both alike.

Assumptions: one process writes a directory at a time (rank 0 under DDP); the file
system honours ``os.replace`` atomically and ``fsync`` durably (local disks and most
network file systems do).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from .errors import StorageError

__all__ = [
    "BackgroundSaver",
    "CheckpointError",
    "StorageError",
    "checkpoint_path",
    "checkpoint_step",
    "list_checkpoints",
    "load_checkpoint",
    "load_newest_valid",
    "prune_checkpoints",
    "remove",
    "remove_stale_temporaries",
    "save_atomic",
    "set_aside_newer",
    "stage_to_cpu",
    "os_error",
    "state_digest",
    "storage_error",
    "write_atomic",
]

# 2: with a checksum. Files of format 1 (no checksum) still load, unverified.
FORMAT_VERSION = 2
_READABLE = (1, 2)
_NAME = re.compile(r"^step-(\d+)(\.pt)?$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the run. Names the file."""


def checkpoint_path(directory: str, step: int, sharded: bool = False) -> str:
    """Where the checkpoint of `step` lives in `directory`: a file, or for a sharded
    checkpoint a directory."""
    return os.path.join(directory, f"step-{step:09d}{'' if sharded else '.pt'}")


def checkpoint_step(path: str) -> int | None:
    """The step a checkpoint's name says (``step-000000020.pt`` or the sharded
    ``step-000000020``: 20), or None for another name (``best.pt``)."""
    match = _NAME.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every checkpoint in `directory` (files and sharded
    directories, complete or not), oldest first."""
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

    Adds ``state["checksum"]``, the sha256 of its contents (`state_digest`), which
    `load_checkpoint` verifies. Writes a temporary file in the same directory, flushes
    and fsyncs it, renames it over `path` with `os.replace`, then fsyncs the directory
    so the rename is durable.

    Raises:
        StorageError: the file system refused the write (no space, read-only, no
            permission): names `path`, the checkpoints still intact, and what to do.
            The temporary file is removed.
    """
    state = {key: value for key, value in state.items() if key != "checksum"}
    state["checksum"] = state_digest(state)
    try:
        write_atomic(path, lambda f: torch.save(state, f))
    except BaseException as exc:
        cause = os_error(exc)
        if cause is None:
            raise
        raise storage_error(cause, "writing checkpoint", path,
                            os.path.dirname(os.path.abspath(path))) from exc


def write_atomic(path: str, write: Callable[[Any], None]) -> None:
    """Have `write` fill a binary file that then replaces `path` atomically: a temporary
    file in the same directory (named for `remove_stale_temporaries`), flushed and
    fsynced, renamed over `path`, then the directory fsynced. On failure the temporary
    file is removed and the error raised as it is."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".pt", dir=directory)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    _fsync_directory(directory)


def stage_to_cpu(state: Any) -> Any:
    """`state` with every tensor replaced by a CPU copy of its own, so training can go on
    changing the originals while the copy is written. Tensors that share memory (tied
    weights) share their copy too, as ``torch.save`` would store them."""
    copies: dict[tuple[Any, ...], torch.Tensor] = {}

    def copy(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        key = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(),
               tuple(value.shape), value.stride(), value.dtype)
        if key not in copies:
            copies[key] = value.detach().to("cpu", copy=True)
        return copies[key]

    return pytree.tree_map(copy, state)


class BackgroundSaver:
    """Writes checkpoints on a background thread, one at a time: what
    ``Trainer(async_checkpoint=True)`` uses.

    `submit` first waits for the write before it (raising that write's error), then
    writes `state`, whose tensors must be the saver's own (`stage_to_cpu`), with
    `save_atomic`, and calls `then` (pruning) once the file is complete. A process
    killed meanwhile leaves the previous checkpoint as the newest valid one: the new one
    exists only once renamed into place. `wait` blocks until the write is done.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, state: dict[str, Any], path: str,
               then: Callable[[], None] | None = None) -> None:
        def write() -> None:
            save_atomic(state, path)
            if then is not None:
                then()

        self.run(write)

    def run(self, task: Callable[[], None]) -> None:
        """Wait for the task before, then run `task` (a whole save) on the thread."""
        self.wait()

        def work() -> None:
            try:
                task()
            except BaseException as exc:  # raised on the training thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=work, name="lossless_trainer-checkpoint",
                                        daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether a write is under way."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the write under way is complete; raise its error, if it failed."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error


def storage_error(cause: OSError, action: str, path: str, checkpoint_dir: str
                  ) -> StorageError:
    """A `StorageError` for `cause` (raised while `action` `path`): what failed, which
    checkpoints in `checkpoint_dir` are intact, and how to continue."""
    reason = cause.strerror or str(cause)
    code = errno.errorcode.get(cause.errno or -1)
    existing = [p for _, p in list_checkpoints(checkpoint_dir)
                if os.path.abspath(p) != os.path.abspath(path)]
    if existing:
        intact = (f"The {len(existing)} earlier checkpoint(s) in {checkpoint_dir} are "
                  f"intact; the newest is {os.path.basename(existing[-1])}, which a rerun "
                  "of the same command resumes from")
    else:
        intact = f"No checkpoint had been written in {checkpoint_dir} yet"
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = ("Free space on that file system (delete other files there, or lower "
               "keep_last), then rerun the same command")
    elif cause.errno == errno.EROFS:
        fix = ("The file system is read-only (it may have been remounted so after disk "
               "errors); make it writable, then rerun the same command")
    elif cause.errno in (errno.EACCES, errno.EPERM):
        fix = "Give this process write permission there, then rerun the same command"
    else:
        fix = "Fix the file system, then rerun the same command"
    return StorageError(f"{action} {path} failed: {reason}"
                        f"{f' ({code})' if code else ''}. {intact}. {fix}.",
                        cause.errno, path)


def os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`, if any: torch.save reports a failed write as a
    RuntimeError (``unexpected pos``) with the OSError as its cause."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


def state_digest(state: Any) -> str:
    """The sha256 of a checkpoint's contents: the bytes of every tensor, with its dtype
    and shape, and the structure and plain values around them, in order.

    A bit flipped anywhere in a tensor's data (which ``torch.load`` does not detect: it
    checks no CRC) or in the values around them changes it. Tensors off the CPU are
    copied there first. The tensors' bytes are hashed in blocks of `_BLOCK` bytes on a
    thread pool (hashlib releases the GIL), and the result is the sha256 of the
    structure and of every block's sha256.
    """
    structure = hashlib.sha256()
    blocks: list[Any] = []  # memoryviews of the tensors' bytes, in order
    keep: list[torch.Tensor] = []  # the CPU copies those views read
    _feed(structure, state, blocks, keep)
    if len(blocks) > 1:
        with concurrent.futures.ThreadPoolExecutor(min(len(blocks), os.cpu_count() or 1)
                                                   ) as pool:
            digests = list(pool.map(lambda block: hashlib.sha256(block).digest(), blocks))
    else:
        digests = [hashlib.sha256(block).digest() for block in blocks]
    for digest in digests:
        structure.update(digest)
    return structure.hexdigest()


_BLOCK = 16 << 20


def _feed(digest: Any, value: Any, blocks: list[Any], keep: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:  # the tensor's memory, read in place
            keep.append(tensor)
            data = memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")
            blocks.extend(data[i:i + _BLOCK] for i in range(0, nbytes, _BLOCK))
    elif isinstance(value, dict):
        digest.update(b"{%d;" % len(value))
        for key, item in value.items():
            _feed(digest, key, blocks, keep)
            _feed(digest, item, blocks, keep)
    elif isinstance(value, (list, tuple)):
        digest.update(b"%s%d;" % (type(value).__name__.encode(), len(value)))
        for item in value:
            _feed(digest, item, blocks, keep)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        digest.update(f"D{type(value).__qualname__};".encode())
        for item in dataclasses.fields(value):
            _feed(digest, getattr(value, item.name), blocks, keep)
    else:  # None, bool, int, float, str, bytes, torch.dtype, torch.device, ...
        digest.update(f"{type(value).__name__}:{value!r};".encode())


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
    if not isinstance(state, dict) or state.get("format") not in _READABLE:
        raise CheckpointError(
            f"checkpoint {path} is not a lossless_trainer checkpoint of format "
            f"{' or '.join(map(str, _READABLE))}"
        )
    expected = state.pop("checksum", None)
    if expected is None and state["format"] >= 2:
        raise CheckpointError(f"checkpoint {path} has no checksum, which every checkpoint "
                              f"of format {state['format']} carries: it is corrupt")
    if expected is not None and state_digest(state) != expected:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its contents do not match the checksum written "
            "with it (a bit changed on disk or in a copy since it was saved)")
    return state


def load_newest_valid(directory: str, load: Callable[[str], dict[str, Any]] = load_checkpoint,
                      ) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint in `directory` that loads with `load`, with its path.

    A newer one that fails to load (truncated by a crash, corrupt, unsafe, a sharded
    one `load` does not read) gives a warning naming it, and the previous one is tried.

    Returns:
        None if the directory holds no checkpoint at all.

    Raises:
        CheckpointError: checkpoints exist but none of them loads.
    """
    candidates = list_checkpoints(directory)
    failures = []
    for _, path in reversed(candidates):
        try:
            return path, load(path)
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
            remove(path)


def remove(path: str) -> None:
    """Delete a checkpoint file, or a sharded checkpoint's directory: first renamed to a
    temporary name, so a kill halfway through deleting leaves no half checkpoint under
    a checkpoint's name."""
    if not os.path.isdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    doomed = os.path.join(os.path.dirname(path), f"{_TMP_PREFIX}{os.path.basename(path)}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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
    """Delete temporary files (and directories) a killed save or prune left behind.
    Call before writing starts."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(_TMP_PREFIX):
            path = os.path.join(directory, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(path)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
