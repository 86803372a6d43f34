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
        ranks (dict[str, int] | None): Under torchrun, the rank each key went non-finite
            on first, when known.
        replay (str | None): Where the failure is recorded and the command that replays
            it (the end of the message), once `fit` has recorded it.
    """

    def __init__(self, message: str, first_steps: dict[str, int],
                 ranks: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.first_steps = first_steps
        self.ranks = ranks
        self.replay: str | None = None  # how to replay it, once recorded (nonfinite.py)


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


def first_cause(exc: BaseException, later: list[BaseException]) -> BaseException:
    """What a failing fit raises: `exc`, unless the teardown after it found a loss that
    went NaN or Inf before it (among `later`, the teardown's errors: the last flush's
    check). With ``finite_check="flush"`` a NaN loss shows first as NaN weights at a
    checkpoint, or as a model's failure on them: the first cause wins, `exc` noted."""
    cause = next((e for e in later if isinstance(e, NonFiniteLossError)), None)
    named = isinstance(exc, NonFiniteLossError) and exc.first_steps  # names its losses
    if cause is None or named or not isinstance(exc, Exception):
        return exc
    if hasattr(cause, "add_note"):
        cause.add_note("[lossless_trainer] raised instead of the later failure it led "
                       f"to: {type(exc).__name__}: {exc}")
    replay = getattr(exc, "replay", None)  # found NaN weights first: how to replay them
    if replay and not cause.replay:
        extend_message(cause, replay)
        cause.replay = replay
    return cause


def extend_message(exc: BaseException, text: str) -> None:
    """Append `text`, on a line of its own, to the error's message (its first argument)."""
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]}\n{text}", *exc.args[1:])
