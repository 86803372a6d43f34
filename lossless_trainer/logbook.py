"""The logbook: a run's summaries from the sink to the writers.

Summaries go sideways: anything in the run writes into the sink (`write_summary`), the
logging hook flushes it at the end of a window, and the record goes to the writers on
their background thread. Under torchrun a flush's windows are combined across ranks
while the next step runs; the record is then *in flight* until it lands, at one of the
loop's named points (`Logbook.land`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .state import logger
from .summary import SummaryRecord, SummarySink

if TYPE_CHECKING:
    from .distributed import Distributed
    from .writers import BackgroundWriter

__all__ = ["Logbook"]


class Logbook:
    """The sink, the open writers, the latest record, and the record in flight.

    Who calls what: `TrainerBase.fit` opens the writers when it starts (`open`), keeps
    the sink active around the loop, and closes them at the end (`close`). The logging
    hook flushes the sink and hands the record over: `publish` when it is complete,
    `publish_later` with what completes it when the ranks are still combining it. A
    record in flight lands (completed, published, checked for NaN) at the next of these
    points, where every rank is at once:

    * **before the optimizer update** of the next step (`TrainerBase.after_backward`);
    * **before a checkpoint** (`before_checkpoint`, which also puts the writers'
      records on disk, so the logs reach exactly the checkpoint's step);
    * **at the end of the loop**;
    * or, without a collective, when `last_summary` is read.

    Args:
        dist: This process's place in the run.
        make_writers: Opens the writers: ``make_writers(start_step)``
            (`TrainerBase.make_writers`, which a subclass may override).
        stop_requested: Whether this process wants training to stop; under torchrun
            it travels with every flush's window (see `SummarySink`).
    """

    def __init__(self, dist: Distributed, make_writers: Callable[[int | None], BackgroundWriter],
                 stop_requested: Callable[[], bool]) -> None:
        self.dist = dist
        self.make_writers = make_writers
        self.sink = SummarySink(dist.start_reduce_totals if dist.enabled else None,
                                stop_requested=stop_requested)
        self.writers: BackgroundWriter | None = None
        self.last_published: SummaryRecord | None = None
        self._in_flight: Callable[[bool], None] | None = None

    # -- the writers ----------------------------------------------------------------------

    def open(self, start_step: int | None) -> BackgroundWriter:
        """`make_writers`, agreed on by every rank (a `fit`, a standalone `evaluate`).
        Rank 0 alone opens files and your factories' connections: if it fails, every
        rank raises, so none waits in a collective."""
        try:
            writers = self.make_writers(start_step)
        except Exception:
            self.dist.any(True)  # tell the other ranks, then raise here
            raise
        if self.dist.any(False):  # another rank could not open its writers
            writers.close()
            raise RuntimeError("rank 0 could not open the summary writers (its error is "
                               "in its log); every rank stops")
        return writers

    def start(self, start_step: int) -> None:
        """A fit starts: its writers open, continuing from `start_step`."""
        self.writers = self.open(start_step)

    def close(self) -> list[BaseException]:
        """Close the fit's writers (everything handed over is written first). Returns
        the failure, logged, rather than raising it: teardown goes on."""
        writers, self.writers = self.writers, None
        try:
            if writers is not None:
                writers.close()
        except Exception as exc:
            logger.error("closing the summary writers failed", exc_info=exc)
            return [exc]
        return []

    def write_alone(self, record: SummaryRecord) -> None:
        """Outside a fit (a standalone `evaluate`): open the writers, write `record`,
        close them."""
        writers = self.open(None)
        writers.write(record)
        writers.close()

    # -- records --------------------------------------------------------------------------

    def publish(self, record: SummaryRecord) -> None:
        """Hand a flushed record to the writers and make it `last_summary`. The logging
        hook calls it at every flush; a record is written once, in step order."""
        self.last_published = record
        if self.writers is not None:
            self.writers.write(record)

    def publish_later(self, publish: Callable[[bool], None] | None) -> None:
        """A flush's record is still being combined across ranks: `publish(everywhere)`
        completes and publishes it, where `everywhere` says whether every rank calls it
        at this point (then it may start a collective, and raise for a NaN loss). None:
        it was published."""
        self._in_flight = publish

    def land(self) -> None:
        """Land the record in flight, if any: every rank calls this at the same point
        (see the class docs), so it may start a collective and raise for a NaN loss."""
        if self._in_flight is not None:
            self._in_flight(True)

    @property
    def last_summary(self) -> SummaryRecord | None:
        """The latest flushed record. Under torchrun, read at the step of its flush it
        waits for the ranks' windows to be combined (this rank alone: no collective)."""
        if self._in_flight is not None:
            self._in_flight(False)
        return self.last_published

    def before_checkpoint(self) -> None:
        """Before a checkpoint: the record in flight lands, and everything flushed so far
        is put on disk (rank 0's writers; a background error is raised on every rank),
        so a run resumed from the checkpoint drops exactly what was logged after it."""
        self.land()
        if self.writers is not None:
            self.dist.on_main(self.writers.flush)

    def log_evaluation(self, step: int, results: dict[str, float]) -> None:
        """An evaluation's results as ``eval/<key>`` scalars at `step`: within a fit,
        into this step's flush; outside one, as a record of their own."""
        scalars = {f"eval/{key}": value for key, value in results.items()}
        if self.writers is None:
            self.write_alone(SummaryRecord(step=step, scalars=scalars))
            return
        for tag, value in scalars.items():
            self.sink.put(tag, value)
        self.sink.request_flush()
