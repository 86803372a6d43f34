"""Stop control: when `fit` ends, decided in one place.

A fit ends at its step or epoch limit, at a request (a hook's `request_stop`, a SIGTERM
or SIGINT), or, for a one-shot iterator, when the data runs out. Under torchrun every
rank must end at the same step, and agreeing must not cost every step a collective:
`StopControl` does both. The signal handlers themselves, and the SIGTERM a process
remembers for its later fits, are `resume.py`'s (`stop_on_signals`,
`termination_signal`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .options import step_limit
from .resume import stop_on_signals, termination_signal
from .state import TrainState, logger

if TYPE_CHECKING:
    from .distributed import Distributed
    from .summary import SummarySink

__all__ = ["StopControl"]


class StopControl:
    """Whether the loop goes on: limits, requests, signals, and the ranks' agreement.

    Who calls what: the loop calls `begin` when a fit starts, `stopping` before every
    epoch's batches and `after_step` after every step; hooks call `request_stop` (through
    the trainer); the signal handlers installed by `signals` call `on_signal`.

    Args:
        dist: This process's place in the run.
        sink: The run's summary sink: under torchrun a request travels with each
            flush's window, and ``sink.stop_agreed_at`` is the step every rank stops at.
    """

    def __init__(self, dist: Distributed, sink: SummarySink) -> None:
        self.dist = dist
        self.sink = sink
        self.request: str | None = None
        self._signalled = False  # whether the request came from a signal
        self.step_limit = sys.maxsize
        self.epoch_limit = sys.maxsize

    def begin(self, state: TrainState, max_steps: int | None, max_epochs: int | None) -> None:
        """A fit starts: the limits are read anew (they may have been raised since the
        last fit), and no request of an earlier fit is left."""
        self.step_limit = step_limit(max_steps)
        self.epoch_limit = sys.maxsize if max_epochs is None else max_epochs
        state.stop_reason = self.request = self.sink.stop_agreed_at = None
        self._signalled = False

    def request_stop(self, reason: str = "requested") -> None:
        """Stop after the current step (see `TrainerBase.request_stop`)."""
        self.request = reason

    def on_signal(self, name: str) -> None:
        """A SIGTERM or SIGINT: a request that is also voted on between flushes."""
        self._signalled = True
        self.request_stop(name)

    @contextmanager
    def signals(self, enabled: bool) -> Iterator[None]:
        """Within the block, the first SIGTERM or SIGINT is a stop request."""
        with stop_on_signals(enabled, self.on_signal):
            yield

    def terminated(self, state: TrainState) -> bool:
        """Whether a SIGTERM stopped an earlier fit of this process (of any rank's, under
        torchrun): the scheduler wants it gone, so this fit trains nothing and returns
        at once with that `stop_reason`. A collective under torchrun."""
        if not self.dist.any(termination_signal() is not None):
            return False
        state.stop_reason = termination_signal() or "SIGTERM"
        logger.warning("a SIGTERM stopped an earlier fit of this process: fit returns at once "
                       "(stop_reason %r); exit the script, or call "
                       "lossless_trainer.resume.clear_termination() to train again",
                       state.stop_reason)
        return True

    def after_step(self, state: TrainState) -> bool:
        """Whether fit ends after the step just done (`stopping` within an epoch). One
        process has nothing to decide before a request or the step limit."""
        if self.request is None and state.step < self.step_limit and not self.dist.enabled:
            return False
        return self.stopping(state, between_epochs=False)

    def stopping(self, state: TrainState, between_epochs: bool) -> bool:
        """Whether fit ends here; sets `state.stop_reason`.

        Under torchrun a request (a hook's, a signal's) travels with the next flush's
        gather, which every rank makes anyway and which runs while the next step does:
        every rank stops at the step after that flush, the same step in every run. A
        signal is also put to an asynchronous vote every few steps (about 100 ms of
        them: `Distributed.vote_stop`), so a SIGTERM is agreed within about 200 ms
        whatever `log_every` is. Between epochs, where every rank is at once, a
        synchronous vote, so a stop asked in `after_epoch` starts no new epoch.
        """
        if state.stop_reason is None:
            requested = self.request is not None
            if self.dist.enabled:
                if between_epochs:
                    requested = self.dist.any(requested)
                else:
                    voted = self.dist.vote_stop(self._signalled, state.step)
                    requested = voted or self.sink.stop_agreed_at == state.step
            if requested:
                state.stop_reason = self.request or "stopped on another rank"
            elif state.step >= self.step_limit:
                state.stop_reason = "max_steps"
            elif between_epochs and state.epoch >= self.epoch_limit:
                state.stop_reason = "max_epochs"
        return state.stop_reason is not None
