"""Summaries written from anywhere in a model, stored lazily, turned into numbers per flush.

`write_summary` finds the active `SummarySink` through a `contextvars.ContextVar`. The
Trainer activates a sink for the duration of `fit`; outside it the variable holds `None`
and `write_summary` returns after one lookup, so the same model runs unchanged in plain
inference code.

Assumptions made here:

* values arrive from the thread (or asyncio task) that runs the training step, or from a
  context copied from it; a thread started without `contextvars.copy_context()` sees no
  sink and its summaries are dropped;
* a scalar is written many times per flush window and read once: it is stored detached on
  its device and averaged when the window is flushed, with one device-to-host transfer
  per device for the whole flush;
* histograms, images and text are costly and only useful at the step that is written, so
  they are recorded on summary steps only (see `is_summary_step`) and the last value of a
  window wins.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from .means import Mean

__all__ = [
    "SummaryRecord",
    "SummarySink",
    "current_step",
    "is_summary_step",
    "summary_scope",
    "write_summary",
]

KINDS = ("scalar", "histogram", "image", "text")
REDUCTIONS = ("mean", "sum", "max", "none")

_SINK: ContextVar[SummarySink | None] = ContextVar("lossless_trainer_sink", default=None)
_PREFIX: ContextVar[str] = ContextVar("lossless_trainer_prefix", default="")

# Pending tensor scalars of one tag are folded into a running sum once this many are
# queued, so memory stays bounded whatever `log_every` is.
_FOLD_AT = 256
# Pending tensor scalars are stacked into one tensor at the start of a step once this
# many are waiting.
_STACK_AT = 32
# Whether a sink reads CPU tensors as they are written (`SummarySink(read_cpu_now=)`).
READ_CPU_NOW = True
_IMAGE_CHANNELS = (1, 3, 4)
_IMAGE_FORMATS = ("HW", "CHW", "HWC", "NCHW", "NHWC")


def write_summary(
    name: str, value: Any, kind: str | None = None, *, dataformats: str | None = None,
    reduce: str = "mean",
) -> None:
    """Log a value to the active training run; do nothing outside one.

    Callable from any depth of the call stack (a sub-module's `forward`, a helper loss
    function). No reference to the trainer is needed.

    Args:
        name: Tag, prefixed by the enclosing `summary_scope`s (``"rpn/num_pos"``).
        value: A Python number or one-element tensor (scalar), a tensor (histogram), a
            CHW/HWC tensor (image), or a string (text).
        kind: ``"scalar"``, ``"histogram"``, ``"image"`` or ``"text"``. When omitted it is
            inferred: numbers and one-element tensors are scalars, strings are text,
            3-d tensors whose first or last dimension is 1, 3 or 4 are images, and any
            other tensor is a histogram. Pass it explicitly to override, for example
            ``kind="image"`` for a 2-d grayscale or 4-d NCHW batch.
        dataformats: Layout of an image, as TensorBoard spells it (``"CHW"``, ``"HWC"``,
            ``"HW"``, ``"NCHW"``, ``"NHWC"``). Inferred when omitted; CHW wins when both
            readings fit, so pass ``"HWC"`` for an HWC image only 1, 3 or 4 pixels high.
        reduce: How a scalar is combined across processes under torchrun, at each flush:
            ``"mean"`` (default: over every value of every rank), ``"sum"`` (the ranks'
            window means added, e.g. a count per step over the whole job), ``"max"``, or
            ``"none"`` (rank 0's own value). Single-process runs ignore it. Histograms,
            images and text are written from rank 0.

    Scalars are averaged over the steps since the last flush. The other kinds are kept
    only on summary steps; guard costly ones with `is_summary_step()`.
    """
    if _is_compiling():  # inside torch.compile's tracing: leave the graph, run eagerly
        _write_summary_eager(name, value, kind, dataformats=dataformats, reduce=reduce)
        return
    sink = _SINK.get()
    if sink is None:
        return
    prefix = _PREFIX.get()
    if kind is None and type(value) is torch.Tensor and value.ndim == 0 and reduce == "mean":
        sink.put_scalar(prefix + name if prefix else name, value)  # the common case, direct
    else:
        sink.put(prefix + name if prefix else name, value, kind, dataformats, reduce)


# Dynamo reads this as True while it traces; in eager code it is a function returning
# False, cheaper than `torch.compiler.is_compiling` (which also asks TorchScript).
_is_compiling = torch.compiler.is_dynamo_compiling
_eager: Any = None


def _write_summary_eager(*args: Any, **kwargs: Any) -> None:
    """`write_summary` excluded from compilation: one graph break per call inside a
    compiled forward, and an eager call at run time. Built on first use, because
    `torch.compiler.disable` imports torch._dynamo (over a second), which a script that
    never compiles should not pay for; one that compiles has imported it already."""
    global _eager
    if _eager is None:
        _eager = torch.compiler.disable(write_summary, recursive=True)
    _eager(*args, **kwargs)


def is_summary_step() -> bool:
    """Whether summaries written now will reach the writers at this step.

    Cheap enough to call every step. Use it to skip building costly summaries
    (histograms, images) between flushes. False outside a training run.
    """
    sink = _SINK.get()
    return sink is not None and sink._flush_due  # noqa: SLF001 - this module's own sink


def current_step() -> int | None:
    """The optimizer step being computed: 1 during the first step of a run, and the
    number the step's summaries are logged at. None outside training (no `fit`
    running, or an evaluation).

    A model reads it to decide what a step trains, by the losses it returns: with
    ``Trainer(optimizer={"d": ..., "g": ...})``, returning ``{"g": ...}`` at every
    (k+1)-th step and ``{"d": ...}`` at the others gives k discriminator updates per
    generator update, and the checkpoint needs no counter of its own (it holds the step).
    """
    sink = _SINK.get()
    return None if sink is None else sink.training_step


@contextmanager
def summaries_off() -> Iterator[None]:
    """Drop every `write_summary` call inside the block, even during a training run (for
    predictions a hook makes mid-run, which belong to no step's window)."""
    token = _SINK.set(None)
    try:
        yield
    finally:
        _SINK.reset(token)


@contextmanager
def summary_scope(name: str) -> Iterator[None]:
    """Prefix the tags of every `write_summary` call inside the block with ``name/``.

    Scopes nest (``rpn/`` inside ``detector/`` gives ``detector/rpn/``), and the prefix is
    restored even when an exception passes through. Also usable as a decorator.
    """
    name = name.strip("/")
    if not name:
        raise ValueError("summary_scope() needs a non-empty name")
    token = _PREFIX.set(f"{_PREFIX.get()}{name}/")
    try:
        yield
    finally:
        _PREFIX.reset(token)


@dataclass
class SummaryRecord:
    """What one flush hands to the writers: plain Python values and CPU tensors.

    Attributes:
        step: The step the window is written at.
        scalars: Mean of each scalar tag over the window.
        counts: How many values each scalar mean is over (to weight means when merging);
            for a tag written as `Mean` values, the sum of their counts.
        nonfinite: For each tag that received a NaN or Inf in the window, the first step
            that did.
        nonfinite_ranks: Under torchrun, the rank where each `nonfinite` tag went bad first.
        shared: What each process passed as ``share=`` to `SummarySink.flush`, by rank
            (one entry when not distributed).
        others: ``(kind, tag, value, step)`` for histograms, images and text. Images carry
            ``(tensor, dataformats)`` as their value.
    """

    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)
    nonfinite_ranks: dict[str, int] = field(default_factory=dict)
    shared: list[Any] = field(default_factory=list)
    others: list[tuple[str, str, Any, int]] = field(default_factory=list)

    @classmethod
    def empty(cls, step: int) -> SummaryRecord:
        """A record of `step` with nothing in it yet (cheaper than the generated
        ``__init__`` with its six default factories: one is made per flush)."""
        record = object.__new__(cls)
        record.__dict__.update(step=step, scalars={}, counts={}, nonfinite={},
                               nonfinite_ranks={}, shared=[], others=[])
        return record

    def copy(self) -> SummaryRecord:
        """A shallow copy with a scalars dict of its own (cheaper than
        `dataclasses.replace`: a writer thread takes one at every flush)."""
        copied = object.__new__(SummaryRecord)
        copied.__dict__.update(self.__dict__)
        copied.scalars = dict(self.scalars)
        return copied


class SummarySink:
    """Collects summaries between flushes. One sink per training run.

    Who calls what: the run's `Logbook` holds it; `TrainerBase.fit` activates it around
    the loop (so `write_summary` finds it) and calls `begin_step` before every step, which
    is the one place that decides whether the step is flushed; an evaluation may add to
    that decision with `request_flush` (`Logbook.log_evaluation`); the logging hook reads
    `flush_due` after the step and calls `flush`, which ends the window.

    Args:
        reducer: Starts combining the window's scalar sums with those of the other
            processes at each flush (see `lossless_trainer.distributed.combine_totals`)
            and returns what waits for the result. None: this process's values as they
            are.
        stop_requested: With a reducer: whether this process wants training to stop,
            sent with every flush's window; `stop_agreed_at` is then the step after the
            last flush at which any process wanted to (where every process completes
            that flush's record), the same on every process.
        read_cpu_now: Read a CPU tensor's number when it is written. False keeps CPU
            tensors until the flush, as tensors on an accelerator always are. None: the
            module's `READ_CPU_NOW` (True; tests that count host reads turn it off).
    """

    def __init__(self, reducer: Reducer | None = None,
                 stop_requested: Callable[[], bool] | None = None,
                 read_cpu_now: bool | None = None) -> None:
        self.step = 0
        self.training_step: int | None = None  # set by `begin_step`: a training run's sink
        # CPU tensors are read as they are written: the CPU computed them already, so
        # reading costs no sync, and nothing is kept alive until the flush. Off: they are
        # kept like an accelerator's (the device path, which the tests run on the CPU).
        self._read_cpu_now = READ_CPU_NOW if read_cpu_now is None else read_cpu_now
        self._flush_due = False
        self.reducer = reducer
        self._stop_requested = stop_requested
        self.stop_agreed_at: int | None = None
        self._others: dict[str, tuple[str, str, Any, int]] = {}
        self._modes: dict[str, str] = {}  # tags logged with a reduce= other than "mean"
        # Scalar tags, in the order first written, each with a slot: an index into the
        # per-tag lists below. `_plain` holds the tags of plain values (the fast path's
        # table); a `Mean`'s tag is weighted: its value is its totals over its counts.
        self._slot: dict[str, int] = {}
        self._plain: dict[str, int] = {}
        self._tags: list[str] = []
        self._weighted: list[bool] = []
        # Python numbers, per slot: their sum, their count (a Mean's: its counts), the
        # first step one was not finite; and the slots that received any.
        self._py_sum: list[float] = []
        self._py_count: list[float] = []
        self._py_bad: list[int | None] = []
        self._py_touched: set[int] = set()
        self._mean_first: dict[int, int] = {}  # a weighted slot's first step in the window
        # Tensors, in the order written, with the slot of each: values (plain values and
        # Mean totals) and weights (Mean counts). Kept on their devices until the flush.
        self._values: list[torch.Tensor] = []
        # Earlier values, stacked by `begin_step` once `_STACK_AT` were pending: fewer
        # tensors to keep alive and to stack at the flush (`_where` covers them first).
        self._stacked: list[torch.Tensor] = []
        self._stacked_count = 0
        self._where: list[int] = []
        self._weights: list[torch.Tensor] = []
        self._weight_where: list[int] = []
        # Where each step's values begin (a position counting folded values too), and
        # the step: to name the step of a non-finite value.
        self._mark_at: list[int] = [0]
        self._mark_step: list[int] = [0]
        self._fold_at = _FOLD_AT
        self._folded: _Folded | None = None

    @contextmanager
    def activate(self) -> Iterator[SummarySink]:
        """Make this the sink `write_summary` reaches, for the duration of the block
        (`current_step` is None in it until the first `begin_step`, and after it)."""
        token = _SINK.set(self)
        self.training_step = None
        try:
            yield self
        finally:
            self.training_step = None
            _SINK.reset(token)

    @property
    def pending(self) -> bool:
        """Whether anything was written since the last flush."""
        return bool(self._others or self._values or self._stacked or self._weights
                    or self._py_touched or self._folded)

    def begin_step(self, step: int, flush: bool) -> None:
        """Tag what follows with `step`; `flush` says whether this step ends the window
        (histograms, images and text are kept only on such steps)."""
        self.step = self.training_step = step
        self._flush_due = flush
        if len(self._values) >= _STACK_AT:
            self._stack_pending()

    def _stack_pending(self) -> None:
        """Stack the pending values into one tensor (one op for many values, while they
        are still in cache); then fold if the window holds too many."""
        try:
            self._stacked.append(torch.stack(self._values))
        except RuntimeError:  # on several devices: left as they are, for the flush
            return
        self._stacked_count += len(self._values)
        self._values = []
        if self._stacked_count + len(self._weights) >= self._fold_at:
            self._fold()

    def request_flush(self) -> None:
        """Make the current step end its window, whatever `begin_step` decided (an
        evaluation's results go out with the step they were computed at)."""
        self._flush_due = True

    @property
    def flush_due(self) -> bool:
        """Whether the current step ends the window: read after the step to flush."""
        return self._flush_due

    def put_scalar(self, tag: str, value: torch.Tensor) -> None:
        """Fast path for a one-element tensor the caller has already validated.

        A CPU tensor's number is read now (see `read_cpu_now`). Another tensor is kept by
        reference (no copy, no sync) unless it looks like state that will change in place
        (`_kept`): those are cloned so the window keeps the value of this step.
        """
        if value.is_cpu and self._read_cpu_now:
            self._number(tag, value.item())  # computed already: no sync, nothing kept
            return
        slot = self._plain.get(tag)
        if slot is None:
            slot = self._new_slot(tag, weighted=False)
        self._pend(value, slot)
        if len(self._values) >= self._fold_at:
            self._fold()

    def _pend(self, value: torch.Tensor, slot: int) -> None:
        """Keep `value` until the flush; mark where this step's values begin if it is
        the step's first (to name the step of a non-finite value)."""
        if self._mark_step[-1] != self.step:
            position = len(self._values) + self._stacked_count + (
                self._folded.values if self._folded else 0)
            if self._mark_at[-1] != position:
                self._mark_at.append(position)
                self._mark_step.append(self.step)
            else:  # no value since the last mark
                self._mark_step[-1] = self.step
        self._values.append(_kept(value))
        self._where.append(slot)

    def put_mean(self, tag: str, total: torch.Tensor | float, count: Any) -> None:
        """Add a `Mean`: the tag's window value is the sum of its totals over the sum of
        its counts (pooled over ranks the same way under torchrun). Numbers stay on the
        host, tensors on their device; nothing is synced."""
        slot = self._slot.get(tag)
        if slot is None or not self._weighted[slot]:
            slot = self._new_slot(tag, weighted=True)
        now = self._read_cpu_now
        if isinstance(total, torch.Tensor):
            if total.numel() != 1:
                raise ValueError(f"write_summary({tag!r}, Mean(total, count)): total must be "
                                 f"one number, got shape {tuple(total.shape)}")
            if now and total.is_cpu:
                total = total.item()
            else:
                self._pend(total.reshape(()) if total.ndim else total, slot)
        if not isinstance(total, torch.Tensor):
            total = float(total)
            self._py_sum[slot] += total
            self._py_touched.add(slot)
            if self._py_bad[slot] is None and not math.isfinite(total):
                self._py_bad[slot] = self.step
        if isinstance(count, torch.Tensor):
            if now and count.is_cpu:
                count = count.item()
            else:
                self._weights.append(_kept(count.reshape(()) if count.ndim else count))
                self._weight_where.append(slot)
        if not isinstance(count, torch.Tensor):
            self._py_count[slot] += count
            self._py_touched.add(slot)
        self._mean_first.setdefault(slot, self.step)
        if len(self._values) + self._stacked_count + len(self._weights) >= self._fold_at:
            self._fold()

    def put(self, tag: str, value: Any, kind: str | None = None,
            dataformats: str | None = None, reduce: str = "mean") -> None:
        """Store `value` under `tag`, inferring its kind when not given."""
        if reduce != "mean":
            self._set_mode(tag, reduce)
        if type(value) is Mean:
            if kind not in (None, "scalar"):
                raise ValueError(f"write_summary({tag!r}): a Mean is a scalar, not {kind!r}")
            if reduce != "mean":
                raise ValueError(
                    f"write_summary({tag!r}, Mean(...), reduce={reduce!r}): a Mean is pooled "
                    "over ranks (all totals over all counts); log total and count apart to "
                    "combine them another way")
            self.put_mean(tag, value.total, value.count)
            return
        if kind is None:
            if type(value) is torch.Tensor and value.ndim == 0:  # the common cases first
                self.put_scalar(tag, value)
                return
            if type(value) is float or type(value) is int:
                self._number(tag, value)
                return
            kind = "image" if dataformats else _infer_kind(tag, value)
        elif kind not in KINDS:
            raise ValueError(
                f"write_summary({tag!r}): unknown kind {kind!r}; use one of {', '.join(KINDS)}"
            )
        if kind == "scalar":
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(
                        f"write_summary({tag!r}, kind='scalar') needs a one-element tensor, "
                        f"got shape {tuple(value.shape)}; reduce it (.mean()) or log it as "
                        "a histogram"
                    )
                self.put_scalar(tag, value.reshape(()) if value.ndim else value)
            elif isinstance(value, numbers.Real):
                self._number(tag, float(value))
            elif hasattr(value, "__array__"):  # a NumPy array or scalar
                self.put(tag, torch.as_tensor(value), "scalar")
            else:
                raise TypeError(
                    f"write_summary({tag!r}, kind='scalar') needs a number or a one-element "
                    f"tensor, got {type(value).__name__}"
                )
            return
        if not self._flush_due:
            return  # non-scalars are only kept on summary steps
        if kind == "text":
            self._others[tag] = ("text", tag, str(value), self.step)
            return
        tensor = _as_tensor(tag, value, kind)
        if kind == "image":
            formats = _image_formats(tag, tensor, dataformats)
            self._others[tag] = ("image", tag, (tensor.detach().clone(), formats), self.step)
        else:
            self._others[tag] = ("histogram", tag, tensor.detach().clone(), self.step)

    def _new_slot(self, tag: str, weighted: bool) -> int:
        """The slot of `tag`, made (or turned to the other kind: a `Mean`'s, or plain,
        allowed only if nothing of the other kind is pending in this window)."""
        slot = self._slot.get(tag)
        if slot is None:
            slot = self._slot[tag] = len(self._tags)
            self._tags.append(tag)
            self._weighted.append(weighted)
            self._py_sum.append(0.0)
            self._py_count.append(0)
            self._py_bad.append(None)
            self._fold_at = _FOLD_AT * len(self._tags)
        else:  # the kind changes: only between windows
            if (slot in self._py_touched or slot in self._where or slot in self._weight_where
                    or (self._folded is not None and slot in self._folded.slots)):
                _mixed(tag)
            self._weighted[slot] = weighted
        if weighted:
            self._plain.pop(tag, None)
        else:
            self._plain[tag] = slot
        return slot

    def _set_mode(self, tag: str, reduce: str) -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"write_summary({tag!r}): unknown reduce={reduce!r}; use one of "
                             f"{', '.join(REDUCTIONS)}")
        if self._modes.setdefault(tag, reduce) != reduce:
            raise ValueError(f"write_summary({tag!r}): logged with reduce={self._modes[tag]!r} "
                             f"before and reduce={reduce!r} now; one tag needs one reduction")

    def _number(self, tag: str, value: float) -> None:
        slot = self._plain.get(tag)
        if slot is None:
            slot = self._new_slot(tag, weighted=False)
        self._py_sum[slot] += value
        self._py_count[slot] += 1
        self._py_touched.add(slot)
        if self._py_bad[slot] is None and not math.isfinite(value):
            self._py_bad[slot] = self.step

    def flush(self, step: int | None = None, share: Any = None) -> SummaryRecord:
        """End the window: average every scalar, move the rest to the CPU, and reset.

        All pending tensors on one device are stacked and transferred together: one
        device synchronisation per device, whatever the number of tags and steps.

        Args:
            step: The step to write the window at. Default: the current step.
            share: A small picklable value that travels with this process's window to
                the others (in the same gather) and comes back as `SummaryRecord.shared`.
        """
        if (self.reducer is None and self._folded is None and not self._weights
                and len(self._plain) == len(self._tags)):
            record = SummaryRecord.empty(self.step if step is None else step)
            self._flush_plain(record)  # the common case: plain scalars on one process
            return record
        return self.flush_started(step, share)()  # type: ignore[return-value]

    def flush_started(self, step: int | None = None, share: Any = None
                      ) -> Callable[..., SummaryRecord | None]:
        """`flush`, in two halves: end the window now, and return what completes its
        record. With a reducer, the ranks' windows are combined in between, by a
        collective that runs while the caller goes on (the next step), so no rank waits
        for the others at the flush; completing waits for what is left of it. Where not
        every rank completes its record (a hook on one rank reads it), complete it with
        ``objects=False``: None if the ranks must first gather the windows as objects."""
        record = SummaryRecord.empty(self.step if step is None else step)
        if self.reducer is None:
            totals = self._totals()
            record.shared = [share]
            for tag, (total, count, first_bad) in totals.items():
                if first_bad is not None:
                    record.nonfinite[tag] = first_bad
                if count:  # a Mean with nothing counted in the window has no value
                    record.scalars[tag] = total / count
                    record.counts[tag] = count
            self._move_others(record)
            return lambda objects=True: record
        stop = self._stop_requested is not None and self._stop_requested()
        reduced = self.reducer(self._totals(), dict(self._modes), (share, stop))
        self._move_others(record)

        def complete(objects: bool = True) -> SummaryRecord | None:
            result = reduced(objects)
            if result is None:  # a collective is needed first, where every rank is
                return None
            values, nonfinite, shared = result
            record.shared = [item[0] if item is not None else None for item in shared]
            if any(item is not None and item[1] for item in shared):
                self.stop_agreed_at = record.step + 1  # where every rank completes it
            for tag, (value, count) in values.items():
                record.scalars[tag] = value
                record.counts[tag] = count
            for tag, (first_bad, rank) in nonfinite.items():
                record.nonfinite[tag] = first_bad
                record.nonfinite_ranks[tag] = rank
            return record

        return complete

    def _move_others(self, record: SummaryRecord) -> None:
        """Hand the window's histograms, images and text to `record`, on the CPU."""
        if not self._others:
            return
        for kind, tag, value, step in self._others.values():
            if kind == "image":
                value = (value[0].cpu(), value[1])
            elif kind == "histogram":
                value = value.cpu()
            record.others.append((kind, tag, value, step))
        self._others = {}

    def _flush_plain(self, record: SummaryRecord) -> None:
        """`flush` of a window of plain scalars only, not folded, on one process: what
        `_totals` and the division do, in one pass over the slots."""
        sums, counts, bad = self._py_sum, self._py_count, self._py_bad
        where = self._where
        host: list[Any] = []
        if where:
            host = self._pending_host()
            for slot, value in zip(where, host):
                sums[slot] += value
                counts[slot] += 1
        scalars, record_counts, tags = record.scalars, record.counts, self._tags
        absent = False
        for slot, count in enumerate(counts):
            if not count:
                absent = True
                continue
            tag, total = tags[slot], sums[slot]
            if total - total != 0.0 or bad[slot] is not None:  # NaN or Inf: find the first
                first_bad = self._first_bad(slot, total, bad[slot], host)
                if first_bad is not None:
                    record.nonfinite[tag] = first_bad
            scalars[tag] = total / count
            record_counts[tag] = count
        if absent:  # a tag not written in the window loses its slot
            self._reset({slot for slot, count in enumerate(counts) if count})
        else:
            self._reset_kept()
        self._move_others(record)

    def _totals(self) -> dict[str, tuple[float, float, int | None]]:
        """End the window: the sum, count and first non-finite step of every scalar tag
        written in it, in the order tags were first written. The count is the number of
        values, or for a weighted tag (`put_mean`) the sum of its counts.

        Every pending tensor goes to the host in one transfer per device (a few CPU
        values are read one by one, which is cheaper than stacking them). Each tag's
        values are added in the order written, after its Python numbers, so a window
        split by a checkpoint and resumed sums to exactly the same float as an
        uninterrupted one (as long as it is not folded: see `_fold`).
        """
        n = len(self._tags)
        weighted = self._weighted
        sums, counts, bad = self._py_sum, self._py_count, self._py_bad
        present = set(self._py_touched)
        values, where = self._values, self._where
        host: list[Any] = []
        if values or self._stacked:
            host = self._pending_host()
            for slot, value in zip(where, host):
                sums[slot] += value
            tally = Counter(where)
            present.update(tally)
            for slot, number in tally.items():
                if not weighted[slot]:
                    counts[slot] += number
        if self._weights:
            for slot, weight in zip(self._weight_where, _to_host(self._weights, exact=True)):
                counts[slot] += weight
            present.update(self._weight_where)
        folded = self._folded
        if folded is not None:
            present.update(folded.slots)
            folded.add_to(sums, counts, bad, weighted, (self._mark_at, self._mark_step))
        totals: dict[str, tuple[float, float, int | None]] = {}
        for slot in range(n):
            if slot not in present:
                continue
            first_bad = self._first_bad(slot, sums[slot], bad[slot], host)
            if weighted[slot] and not counts[slot] >= 0 and slot in self._mean_first:
                first_bad = _earliest(first_bad, self._mean_first[slot])  # a NaN or negative count
            totals[self._tags[slot]] = (sums[slot], counts[slot], first_bad)
        self._reset(present)
        return totals

    def _first_bad(self, slot: int, total: float, first_bad: int | None,
                   host: list[Any]) -> int | None:
        """The first step `slot` went non-finite: `first_bad` (its numbers'), or if its
        sum is not finite, that of its first non-finite pending value (`host`, the
        pending values read back), whichever is earlier."""
        if math.isfinite(total):
            return first_bad
        at = next((i for i, (s, v) in enumerate(zip(self._where, host))
                   if s == slot and not math.isfinite(v)), None)
        if at is None:
            return first_bad
        offset = self._folded.values if self._folded is not None else 0
        return _earliest(first_bad, _step_of(offset + at, self._mark_at, self._mark_step))

    def _pending_host(self) -> list[Any]:
        """Every pending value (stacked and not) as Python numbers, in order."""
        values = self._values
        if not self._stacked:
            return _to_host(values)
        try:
            return torch.cat([*self._stacked, torch.stack(values)] if values
                             else self._stacked).tolist()
        except RuntimeError:  # the last values are on another device
            host = torch.cat(self._stacked).tolist()
            return host + _to_host(values)

    def _reset(self, present: set[int]) -> None:
        """Empty the window. Tags written in it keep their slots for the next; a tag not
        written in a whole window loses its slot (tags may come and go)."""
        if len(present) < len(self._tags):
            self._compact(present)
        self._reset_kept()

    def _compact(self, present: set[int]) -> None:
        """Keep the slots of `present` only, in their order."""
        kept = [slot for slot in range(len(self._tags)) if slot in present]
        self._tags = [self._tags[slot] for slot in kept]
        self._weighted = [self._weighted[slot] for slot in kept]
        self._slot = {tag: slot for slot, tag in enumerate(self._tags)}
        self._plain = {tag: slot for slot, tag in enumerate(self._tags)
                       if not self._weighted[slot]}
        self._fold_at = _FOLD_AT * max(1, len(self._tags))

    def _reset_kept(self) -> None:
        """Empty the window, every slot kept."""
        n = len(self._tags)
        self._py_sum, self._py_count, self._py_bad = [0.0] * n, [0] * n, [None] * n
        if self._py_touched:
            self._py_touched = set()
        if self._mean_first:
            self._mean_first = {}
        if self._where or self._weights or self._stacked or self._folded is not None:
            self._values, self._where, self._weights, self._weight_where = [], [], [], []
            self._stacked, self._stacked_count = [], 0
            self._mark_at, self._mark_step = [0], [self.step]
            self._folded = None
        # else nothing was kept: the marks are still [0] and the step of any earlier
        # window, which `_pend` moves to its step at the next value kept.

    def _fold(self) -> None:
        """Reduce the pending tensors to per-tag sums on their devices, so memory stays
        bounded whatever `log_every` is. Sums are then float64 additions on the device
        (float32 on MPS), not the host's in-order ones."""
        if self._folded is None:
            self._folded = _Folded()
        values = [value for chunk in self._stacked for value in chunk.unbind()] + self._values
        self._folded.fold(values, self._where, self._weights, self._weight_where)
        self._values, self._where, self._weights, self._weight_where = [], [], [], []
        self._stacked, self._stacked_count = [], 0

    def state_dict(self) -> dict[str, Any]:
        """The pending window, reduced to plain numbers, for a checkpoint.

        Costs one device synchronisation. Histograms, images and text are not kept: they
        only exist on summary steps, which are flushed before a checkpoint is taken.
        The window itself stays pending.
        """
        weighted = {tag: self._weighted[slot] for tag, slot in self._slot.items()}
        modes = dict(self._modes)
        totals = self._totals()
        state = {"scalars": {tag: {"sum": total, "count": count,
                                   "first_bad": -1 if first_bad is None else first_bad}
                             for tag, (total, count, first_bad) in totals.items()},
                 "weighted": [tag for tag in totals if weighted[tag]],
                 "modes": modes}
        self._restore(state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a pending window saved by `state_dict`."""
        self._slot, self._plain, self._tags, self._weighted = {}, {}, [], []
        self._reset(set())
        self._restore(state)

    def _restore(self, state: dict[str, Any]) -> None:
        self._modes = dict(state.get("modes", {}))
        weighted = set(state.get("weighted", ()))
        for tag, saved in state["scalars"].items():
            slot = self._new_slot(tag, weighted=tag in weighted)
            self._py_sum[slot] = saved["sum"]
            self._py_count[slot] = saved["count"]
            self._py_bad[slot] = None if saved["first_bad"] < 0 else saved["first_bad"]
            self._py_touched.add(slot)


class _Folded:
    """Pending tensors reduced on their devices (`SummarySink._fold`): per slot, the sum
    of its values and of its weights, the position of its first non-finite value, and
    how many values it had."""

    def __init__(self) -> None:
        self.sums: dict[torch.device, torch.Tensor] = {}
        self.first_bad: dict[torch.device, torch.Tensor] = {}
        self.weights: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.counts: Counter[int] = Counter()
        self.slots: set[int] = set()
        self.values = 0  # how many values were folded: positions continue from here

    def fold(self, values: list[torch.Tensor], where: list[int],
             weights: list[torch.Tensor], weight_where: list[int]) -> None:
        size = max([*where, *weight_where], default=-1) + 1
        for device, positions in _positions_by(values, lambda v: v.device).items():
            dtype = torch.float32 if device.type == "mps" else torch.float64
            chunk = torch.stack([values[i] for i in positions]).to(dtype)
            index = torch.tensor([where[i] for i in positions], device=device)
            sums = torch.zeros(size, dtype=dtype, device=device).index_add_(0, index, chunk)
            at = torch.tensor(positions, dtype=dtype, device=device) + self.values
            bad = torch.where(torch.isfinite(chunk), math.inf, at)
            first = torch.full((size,), math.inf, dtype=dtype, device=device).scatter_reduce_(
                0, index, bad, "amin")
            self.sums[device] = _padded(self.sums.get(device), sums, torch.add)
            self.first_bad[device] = _padded(self.first_bad.get(device), first, torch.minimum)
        for (device, dtype), positions in _positions_by(
                weights, lambda w: (w.device, w.dtype)).items():
            index = torch.tensor([weight_where[i] for i in positions], device=device)
            total = torch.zeros(size, dtype=dtype, device=device).index_add_(
                0, index, torch.stack([weights[i] for i in positions]))
            key = (device, dtype)
            self.weights[key] = _padded(self.weights.get(key), total, torch.add)
        self.counts.update(where)
        self.slots.update(where, weight_where)
        self.values += len(values)

    def add_to(self, sums: list[float], counts: list[float], bad: list[int | None],
               weighted: list[bool], steps: tuple[list[int], list[int]]) -> None:
        """Add the folded sums, counts and first non-finite steps to the host's lists."""
        for total in self.sums.values():
            for slot, value in enumerate(total.tolist()):
                sums[slot] += value
        for total in self.weights.values():
            for slot, value in enumerate(total.tolist()):
                counts[slot] += value
        for slot, number in self.counts.items():
            if not weighted[slot]:
                counts[slot] += number
        for first in self.first_bad.values():
            for slot, position in enumerate(first.tolist()):
                if position != math.inf:
                    bad[slot] = _earliest(bad[slot], _step_of(int(position), *steps))


def _padded(old: torch.Tensor | None, new: torch.Tensor, combine: Callable[..., torch.Tensor]
            ) -> torch.Tensor:
    """`combine(old, new)` of two per-slot tensors, the shorter padded with `new`'s
    neutral values (its slots past the other's length)."""
    if old is None:
        return new
    if len(old) < len(new):
        old = torch.cat([old, new[len(old):] if combine is torch.minimum
                         else torch.zeros_like(new[len(old):])])
    elif len(new) < len(old):
        new = torch.cat([new, old[len(new):] if combine is torch.minimum
                         else torch.zeros_like(old[len(new):])])
    return combine(old, new)


def _positions_by(values: list[torch.Tensor], key: Callable[[torch.Tensor], Any]
                  ) -> dict[Any, list[int]]:
    """The positions of `values`, grouped by `key` (their device; device and dtype)."""
    groups: dict[Any, list[int]] = {}
    for i, value in enumerate(values):
        groups.setdefault(key(value), []).append(i)
    return groups


def _to_host(values: list[torch.Tensor], exact: bool = False) -> list[Any]:
    """Python numbers of one-element tensors, in order, with one transfer per device.

    A few CPU tensors are read one by one (cheaper than a stack). With `exact`, tensors
    of different dtypes are not stacked together, so integer counts stay integers."""
    if len(values) <= 8 and all(value.is_cpu for value in values):
        return [value.tolist() for value in values]  # a 0-d tensor's tolist: its number
    if not exact or len({value.dtype for value in values}) == 1:
        try:
            return torch.stack(values).tolist()
        except RuntimeError:  # on several devices
            pass
    host: list[Any] = [None] * len(values)
    groups = _positions_by(values, (lambda v: (v.device, v.dtype)) if exact
                           else (lambda v: v.device))
    for positions in groups.values():
        for i, number in zip(positions, torch.stack([values[i] for i in positions]).tolist()):
            host[i] = number
    return host


def _step_of(position: int, mark_at: list[int], mark_step: list[int]) -> int:
    """The step of the value at `position` (counting folded values)."""
    return mark_step[bisect.bisect_right(mark_at, position) - 1]


def _earliest(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


# Starts combining a window's scalar totals across processes, ({tag: (sum, count,
# first_bad)}, {tag: mode}, share), and returns what waits for the result, called with
# objects=False where a collective may not start (then None if one is needed):
# ({tag: (value, count)}, {tag: (first_bad, rank)}, [share by rank]).
Reducer = Callable[[dict[str, tuple[float, float, "int | None"]], dict[str, str], Any],
                   Callable[..., "tuple[dict[str, tuple[float, float]], "
                                 "dict[str, tuple[int, int]], list[Any]] | None"]]


def _kept(value: torch.Tensor) -> torch.Tensor:
    """`value` as a window keeps it: by reference (no copy, no sync) unless it looks like
    state that will change in place (a parameter or a view of one, or a tensor already
    modified in place, such as an updated buffer), which is cloned so the window keeps
    this step's value."""
    if value.requires_grad:  # drop the graph; a leaf is a parameter: copy its value
        if value.is_leaf or value._base is not None:  # a parameter, or a view (bias[0])
            return value.detach().clone()
        return value.data  # `.detach()` without the round trip through the dispatcher
    try:
        modified = value._version
    except RuntimeError:  # an inference tensor: it has no version counter
        return value
    return value.clone() if modified else value


def _mixed(tag: str) -> None:
    raise ValueError(
        f"write_summary({tag!r}): a Mean and a plain value in the same window; a tag is "
        "either a mean over items (always a Mean) or a mean over steps (always plain)")


def _infer_kind(tag: str, value: Any) -> str:
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return "scalar"
        if value.ndim == 3 and (value.shape[0] in _IMAGE_CHANNELS
                                or value.shape[-1] in _IMAGE_CHANNELS):
            return "image"
        return "histogram"
    if isinstance(value, numbers.Real):
        return "scalar"
    if isinstance(value, str):
        return "text"
    if hasattr(value, "__array__"):
        return _infer_kind(tag, torch.as_tensor(value))
    raise TypeError(
        f"write_summary({tag!r}): cannot log a {type(value).__name__}; pass a number, a "
        "tensor or a string"
    )


def _as_tensor(tag: str, value: Any, kind: str) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if tensor.numel() == 0:
        raise ValueError(f"write_summary({tag!r}, kind={kind!r}): the tensor is empty")
    return tensor


def _image_formats(tag: str, image: torch.Tensor, given: str | None) -> str:
    """The `dataformats` TensorBoard needs for `image`: checked if given, else inferred."""
    if given is not None:
        if given not in _IMAGE_FORMATS or len(given) != image.ndim:
            raise ValueError(
                f"write_summary({tag!r}): dataformats={given!r} does not fit an image of shape "
                f"{tuple(image.shape)}; use one of {', '.join(_IMAGE_FORMATS)}"
            )
        return given
    if image.ndim == 2:
        return "HW"
    if image.ndim == 3:
        if image.shape[0] in _IMAGE_CHANNELS:
            return "CHW"
        if image.shape[-1] in _IMAGE_CHANNELS:
            return "HWC"
    if image.ndim == 4:
        if image.shape[1] in _IMAGE_CHANNELS:
            return "NCHW"
        if image.shape[-1] in _IMAGE_CHANNELS:
            return "NHWC"
    raise ValueError(
        f"write_summary({tag!r}, kind='image'): cannot read shape {tuple(image.shape)} as an "
        "image; expected HW, CHW or HWC (or NCHW/NHWC for a batch) with 1, 3 or 4 channels"
    )
