"""Exceptions raised by lossless_trainer. Each message says what, where and how to fix."""

from __future__ import annotations

__all__ = [
    "ModelOutputError",
    "NonFiniteLossError",
    "RunDirectoryError",
    "RunDirectoryInUseError",
    "StorageError",
]


class ModelOutputError(ValueError):
    """The model's training-mode output breaks the contract (a dict of scalar losses)."""


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf.

    Attributes:
        first_steps (dict[str, int]): For every loss key that went non-finite, the first
            step it did.
    """

    def __init__(self, message: str, first_steps: dict[str, int]) -> None:
        super().__init__(message)
        self.first_steps = first_steps


class RunDirectoryError(RuntimeError):
    """The run directory (`log_dir`) cannot be used: a file, missing and not creatable, or
    not writable. Names the directory and the fix."""


class RunDirectoryInUseError(RunDirectoryError):
    """Another run holds the run directory's lock. Names the holder (pid, host, start
    time, command); nothing in the directory was read or changed."""


class StorageError(OSError):
    """Writing a checkpoint or a log file failed in the file system (no space left, a
    read-only file system, permission denied). The message names the file, says which
    checkpoints are intact and how to continue; `errno` and `filename` are the
    underlying error's, so ``except OSError`` and ``exc.errno == errno.ENOSPC`` work."""

    def __init__(self, message: str, errno: int | None, filename: str) -> None:
        super().__init__(errno, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message
