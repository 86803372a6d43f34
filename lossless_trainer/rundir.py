"""The run directory: refused early when it cannot be used, and owned by one run at a time.

`claim_run_dir` runs first in `fit`, before anything in the directory is read, renamed or
written (the resume, the setting aside of newer checkpoints, the rewrite of
``metrics.jsonl``, the event files). It checks that `log_dir` is, or can be made, a
writable directory, then takes an exclusive lock on ``<log_dir>/.lossless_trainer.lock``.

The lock is a POSIX record lock (``fcntl.lockf``): the kernel drops it when its process
exits, however it exits (a SIGKILL, an out-of-memory kill), so a dead run never leaves a
stale lock; DataLoader workers forked by the run do not inherit it; and it is the lock
network file systems support (NFS through its lock manager, or NFSv4 itself; Lustre
mounted with ``flock``; GPFS). The lock file is never deleted (deleting it would let two
processes lock two different files of that name); it holds the holder's pid, host, start
time and command line, for the error a second run gets.

A POSIX lock belongs to the process and is released when the process closes *any*
descriptor of the file, so this process never opens the lock file twice: a second claim
of a directory this process holds is refused from a registry, without opening it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import threading
import warnings
from typing import Any

from .errors import RunDirectoryError, RunDirectoryInUseError

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunLock", "check_log_dir", "claim_run_dir"]

LOCK_NAME = ".lossless_trainer.lock"

# The run directories this process holds, by the real path of their lock file.
_held: dict[str, RunLock] = {}
_held_guard = threading.Lock()


def check_log_dir(log_dir: str) -> None:
    """Make sure `log_dir` is a writable directory, creating it if missing.

    Raises:
        RunDirectoryError: it is a file, cannot be created, or cannot be written, with
            the reason (read-only file system, permission denied) and the fix.
    """
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise RunDirectoryError(
            f"log_dir {log_dir} is a file, not a directory; pass the directory the run "
            "should write to (it is created if missing)")
    try:
        os.makedirs(log_dir, exist_ok=True)
    except OSError as exc:
        raise RunDirectoryError(
            f"log_dir {log_dir} cannot be created: {_reason(exc)}. Pass a log_dir on a "
            "writable file system") from exc
    if not os.access(log_dir, os.W_OK | os.X_OK):
        raise RunDirectoryError(
            f"log_dir {log_dir} is not writable (permission denied, or a read-only file "
            "system): a run writes its logs and checkpoints there, even one with nothing "
            "left to train. Make it writable, or pass another log_dir")


class RunLock:
    """An exclusive lock on one run directory, held by this process until `release`.

    Use `acquire`; `release` is idempotent.
    """

    def __init__(self, path: str, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, log_dir: str) -> RunLock:
        """Lock `log_dir` for this process.

        Raises:
            RunDirectoryInUseError: another process (or another Trainer in this one)
                holds it; the message names the holder. Nothing was changed.
            RunDirectoryError: the lock file cannot be created.
        """
        path = os.path.join(os.path.realpath(log_dir), LOCK_NAME)
        with _held_guard:
            if path in _held:
                raise RunDirectoryInUseError(
                    f"log_dir {log_dir} is in use by another fit() in this process (pid "
                    f"{os.getpid()}); two runs in one directory would resume from and "
                    "overwrite each other's checkpoints and logs. Let that fit finish, or "
                    "use another log_dir")
            if fcntl is None:
                warnings.warn(f"run directories cannot be locked on {sys.platform}: a "
                              f"second run in {log_dir} would not be detected", stacklevel=3)
                lock = cls(path, None)
                _held[path] = lock
                return lock
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as exc:
                raise RunDirectoryError(
                    f"log_dir {log_dir} cannot be locked: {path} cannot be created "
                    f"({_reason(exc)})") from exc
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    raise RunDirectoryInUseError(
                        f"log_dir {log_dir} is in use by another run: {holder}. Two runs in "
                        "one directory would resume from and overwrite each other's "
                        "checkpoints and logs, so this one stops before reading or "
                        f"changing anything there. Wait for that run to end, stop it, or "
                        f"use another log_dir. (The lock is {path}; it dies with its "
                        "process, so it is never stale on a local disk.)") from None
                # ENOLCK, EOPNOTSUPP, ...: a file system without locks (NFS mounted nolock).
                warnings.warn(
                    f"log_dir {log_dir} cannot be locked ({_reason(exc)}): its file system "
                    "does not support locks, so a second run in this directory would not "
                    "be detected", stacklevel=3)
                lock = cls(path, None)
                _held[path] = lock
                return lock
            _write_holder(fd)
            lock = cls(path, fd)
            _held[path] = lock
            return lock

    def release(self) -> None:
        """Unlock and close; the lock file stays."""
        with _held_guard:
            if _held.get(self.path) is self:
                del _held[self.path]
            fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.lockf(fd, fcntl.LOCK_UN)
            os.close(fd)


@contextlib.contextmanager
def claim_run_dir(log_dir: str, dist: Any):
    """Check `log_dir` and hold its lock for the body (on rank 0 under torchrun, where
    every rank raises if rank 0 cannot take it).

    Raises:
        RunDirectoryError: `log_dir` cannot be used.
        RunDirectoryInUseError: another run holds it.
    """
    held: list[RunLock] = []

    def claim() -> None:
        check_log_dir(log_dir)
        held.append(RunLock.acquire(log_dir))

    dist.on_main(claim)
    try:
        yield
    finally:
        for lock in held:
            lock.release()


def _write_holder(fd: int) -> None:
    """Who holds the lock, for the error of a run that finds it taken."""
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)[:500]}
    data = json.dumps(holder).encode()
    with contextlib.suppress(OSError):  # the lock itself is what matters
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        return (f"pid {holder['pid']} on host {holder['host']}, started {holder['started']} "
                f"({holder['command']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process whose details are not recorded"


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
