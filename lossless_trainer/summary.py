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

import math
import numbers
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


class _ScalarWindow:
    """Pending values of one scalar tag since the last flush."""

    __slots__ = ("values", "steps", "offset", "total", "first_bad", "py_sum", "py_count",
                 "py_first_bad", "weights", "weight_total")

    def __init__(self, weighted: bool = False) -> None:
        self.values: list[torch.Tensor] = []
        self.steps: list[int] = []  # step of every tensor value, to name a non-finite one
        self.offset = 0  # values already folded into `total`
        self.total: torch.Tensor | None = None
        self.first_bad: torch.Tensor | None = None  # index into `steps`, inf if none
        self.py_sum = 0.0
        self.py_count: float = 0  # numbers added; in a weighted window, their weights
        self.py_first_bad: int | None = None
        # A weighted window (of `Mean` values) is the sum of totals over the sum of counts:
        # the counts that are tensors, and their folded sum.
        self.weights: list[torch.Tensor] | None = [] if weighted else None
        self.weight_total: torch.Tensor | None = None

    def reset(self) -> None:
        """Empty the window for the next one (kept, not rebuilt, at every flush)."""
        self.values.clear()
        self.steps.clear()
        self.offset = 0
        self.total = self.first_bad = self.weight_total = None
        self.py_sum = 0.0
        self.py_count = 0
        self.py_first_bad = None
        if self.weights is not None:
            self.weights.clear()

    def empty(self) -> bool:
        """Whether nothing was added since the last `reset`."""
        return not self.steps and not self.py_count and not self.py_sum \
            and self.py_first_bad is None and not self.weights and self.weight_total is None

    def add_number(self, value: float, step: int, count: float = 1) -> None:
        """Add a number; `count` is its weight (a `Mean`'s count is added apart: 0)."""
        self.py_sum += value
        self.py_count += count
        if self.py_first_bad is None and not math.isfinite(value):
            self.py_first_bad = step

    def fold(self) -> None:
        """Reduce queued tensors to a sum and a first-non-finite index, on their device."""
        n = len(self.values)
        chunk = torch.stack(self.values).float()
        index = torch.arange(self.offset, self.offset + n, device=chunk.device,
                             dtype=torch.float32)
        first_bad = torch.where(torch.isfinite(chunk), math.inf, index).min()
        total = chunk.sum()
        if self.total is None:
            self.total, self.first_bad = total, first_bad
        else:
            self.total = self.total + total
            self.first_bad = torch.minimum(self.first_bad, first_bad)
        self.offset += n
        self.values.clear()

    def fold_weights(self) -> None:
        """Reduce queued tensor counts to their sum, on their device."""
        assert self.weights is not None
        total = torch.stack(self.weights).sum()
        self.weight_total = total if self.weight_total is None else self.weight_total + total
        self.weights.clear()


class SummarySink:
    """Collects summaries between flushes. One sink per training run.

    Who calls what: `Trainer.fit` activates the sink around the run (so `write_summary`
    finds it) and calls `begin_step` before every step, which is the one place that
    decides whether the step is flushed; `Trainer.evaluate` may add to that decision
    with `request_flush`; the logging hook reads `flush_due` after the step and calls
    `flush`, which ends the window.

    Args:
        reducer: Combines the window's scalar sums with those of the other processes at
            each flush (see `lossless_trainer.distributed.combine_totals`). None: this
            process's values as they are.
        stop_requested: With a reducer: whether this process wants training to stop,
            sent with every flush's window; `stop_agreed_at` is then the step of the
            last flush at which any process wanted to, the same on every process.
    """

    def __init__(self, reducer: Reducer | None = None,
                 stop_requested: Callable[[], bool] | None = None) -> None:
        self.step = 0
        self._flush_due = False
        self.reducer = reducer
        self._stop_requested = stop_requested
        self.stop_agreed_at: int | None = None
        self._scalars: dict[str, _ScalarWindow] = {}
        self._others: dict[str, tuple[str, str, Any, int]] = {}
        self._modes: dict[str, str] = {}  # tags logged with a reduce= other than "mean"

    @contextmanager
    def activate(self) -> Iterator[SummarySink]:
        """Make this the sink `write_summary` reaches, for the duration of the block."""
        token = _SINK.set(self)
        try:
            yield self
        finally:
            _SINK.reset(token)

    @property
    def pending(self) -> bool:
        """Whether anything was written since the last flush."""
        return bool(self._others) or any(not w.empty() for w in self._scalars.values())

    def begin_step(self, step: int, flush: bool) -> None:
        """Tag what follows with `step`; `flush` says whether this step ends the window
        (histograms, images and text are kept only on such steps)."""
        self.step = step
        self._flush_due = flush

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

        The value is kept by reference (no copy, no sync) unless it looks like state that
        will change in place: a parameter, or a tensor already modified in place (an
        updated buffer). Those are cloned so the window keeps the value of this step.
        """
        window = self._scalars.get(tag)
        if window is None:
            window = self._scalars[tag] = _ScalarWindow()
        elif window.weights is not None:  # a Mean's window: fine if left from before
            window = self._replace(tag, window, weighted=False)
        window.values.append(_kept(value))
        window.steps.append(self.step)
        if len(window.values) >= _FOLD_AT:
            window.fold()

    def put_mean(self, tag: str, total: torch.Tensor | float, count: Any) -> None:
        """Add a `Mean`: the tag's window value is the sum of its totals over the sum of
        its counts (pooled over ranks the same way under torchrun). Numbers stay on the
        host, tensors on their device; nothing is synced."""
        window = self._scalars.get(tag)
        if window is None:
            window = self._scalars[tag] = _ScalarWindow(weighted=True)
        elif window.weights is None:
            window = self._replace(tag, window, weighted=True)
        if isinstance(total, torch.Tensor):
            if total.numel() != 1:
                raise ValueError(f"write_summary({tag!r}, Mean(total, count)): total must be "
                                 f"one number, got shape {tuple(total.shape)}")
            window.values.append(_kept(total.reshape(()) if total.ndim else total))
            window.steps.append(self.step)
            if len(window.values) >= _FOLD_AT:
                window.fold()
        else:
            window.add_number(float(total), self.step, count=0)  # the count comes below
        if isinstance(count, torch.Tensor):
            window.weights.append(_kept(count.reshape(()) if count.ndim else count))  # type: ignore[union-attr]
            if len(window.weights) >= _FOLD_AT:  # type: ignore[arg-type]
                window.fold_weights()
        else:
            window.py_count += count

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

    def _replace(self, tag: str, window: _ScalarWindow, weighted: bool) -> _ScalarWindow:
        """A window of the other kind (a `Mean`'s, or plain) for `tag`: allowed only if
        the one there is empty, kept from an earlier window."""
        if not window.empty():
            _mixed(tag)
        window = self._scalars[tag] = _ScalarWindow(weighted=weighted)
        return window

    def _set_mode(self, tag: str, reduce: str) -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"write_summary({tag!r}): unknown reduce={reduce!r}; use one of "
                             f"{', '.join(REDUCTIONS)}")
        if self._modes.setdefault(tag, reduce) != reduce:
            raise ValueError(f"write_summary({tag!r}): logged with reduce={self._modes[tag]!r} "
                             f"before and reduce={reduce!r} now; one tag needs one reduction")

    def _number(self, tag: str, value: float) -> None:
        window = self._scalars.get(tag)
        if window is None:
            window = self._scalars[tag] = _ScalarWindow()
        elif window.weights is not None:
            window = self._replace(tag, window, weighted=False)
        window.add_number(value, self.step)

    def flush(self, step: int | None = None, share: Any = None) -> SummaryRecord:
        """End the window: average every scalar, move the rest to the CPU, and reset.

        All pending tensors on one device are stacked and transferred together: one
        device synchronisation per device, whatever the number of tags and steps.

        Args:
            step: The step to write the window at. Default: the current step.
            share: A small picklable value that travels with this process's window to
                the others (in the same gather) and comes back as `SummaryRecord.shared`.
        """
        record = SummaryRecord(step=self.step if step is None else step)
        totals = self._totals()
        if self.reducer is None:
            record.shared = [share]
            for tag, (total, count, first_bad) in totals.items():
                if first_bad is not None:
                    record.nonfinite[tag] = first_bad
                if count:  # a Mean with nothing counted in the window has no value
                    record.scalars[tag] = total / count
                    record.counts[tag] = count
        else:
            stop = self._stop_requested is not None and self._stop_requested()
            values, nonfinite, shared = self.reducer(totals, self._modes, (share, stop))
            record.shared = [item[0] if item is not None else None for item in shared]
            if any(item is not None and item[1] for item in shared):
                self.stop_agreed_at = record.step
            for tag, (value, count) in values.items():
                record.scalars[tag] = value
                record.counts[tag] = count
            for tag, (first_bad, rank) in nonfinite.items():
                record.nonfinite[tag] = first_bad
                record.nonfinite_ranks[tag] = rank
        for kind, tag, value, step in self._others.values():
            if kind == "image":
                value = (value[0].cpu(), value[1])
            elif kind == "histogram":
                value = value.cpu()
            record.others.append((kind, tag, value, step))
        # The windows of tags written in this window are kept for the next one; a tag
        # not written in a whole window loses its window (tags may come and go).
        for tag, window in list(self._scalars.items()):
            if window.empty():
                del self._scalars[tag]
            else:
                window.reset()
        self._others = {}
        return record

    def _totals(self) -> dict[str, tuple[float, float, int | None]]:
        """Sum, count and first non-finite step of every pending scalar tag. The count
        is the number of values, or for a weighted tag (`put_mean`) the sum of counts."""
        stacks: dict[torch.device, list[torch.Tensor]] = {}
        # Counts stack by dtype too: int64 token counts stay exact past float32's 2**24.
        weight_stacks: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        plan: list[tuple[str, _ScalarWindow, list[torch.Tensor] | None, int,
                         list[torch.Tensor] | None, int]] = []
        for tag, window in self._scalars.items():
            if window.empty():  # kept from the last window, not written since
                continue
            parts = window.values if window.total is None else [
                *window.values, window.total, window.first_bad]
            stack = start = None
            if parts:
                stack = stacks.setdefault(parts[0].device, [])
                start = len(stack)
                stack.extend(parts)
            weights = window.weights
            weight_stack = weight_start = None
            if weights is not None and window.weight_total is not None:
                weights = [*weights, window.weight_total]
            if weights:
                weight_stack = weight_stacks.setdefault((weights[0].device, weights[0].dtype),
                                                        [])
                weight_start = len(weight_stack)
                weight_stack.extend(weights)
            plan.append((tag, window, stack, start or 0, weight_stack, weight_start or 0))
        host = {id(stack): torch.stack(stack).tolist() for stack in stacks.values()}
        host.update({id(stack): torch.stack(stack).tolist() for stack in weight_stacks.values()})
        totals: dict[str, tuple[float, float, int | None]] = {}
        for tag, window, stack, start, weight_stack, weight_start in plan:
            # Added one by one, in order, so a window split by a checkpoint and resumed
            # sums to exactly the same float as an uninterrupted one (as long as no tag
            # gathers 256 values, where float32 folding changes the rounding).
            total, count = window.py_sum, window.py_count
            bad_steps = [] if window.py_first_bad is None else [window.py_first_bad]
            if stack is not None:
                numbers_ = host[id(stack)]
                end = start + len(window.values)
                values = numbers_[start:end]
                for value in values:
                    total += value
                if not math.isfinite(total):  # a NaN or Inf reaches the sum: find the first
                    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
                    if bad is not None:
                        bad_steps.append(window.steps[window.offset + bad])
                if window.weights is None:
                    count += len(window.values)
                if window.total is not None:
                    folded_sum, folded_bad = numbers_[end:end + 2]
                    total += folded_sum
                    if window.weights is None:
                        count += window.offset
                    if folded_bad != math.inf:
                        bad_steps.append(window.steps[int(folded_bad)])
            if weight_stack is not None:
                for weight in host[id(weight_stack)][weight_start:weight_start + len(
                        window.weights or ()) + (window.weight_total is not None)]:
                    count += weight
            if window.weights is not None and not count >= 0 and window.steps:
                bad_steps.append(window.steps[0])  # a NaN or negative count: flag the window
            totals[tag] = (total, count, min(bad_steps) if bad_steps else None)
        return totals

    def state_dict(self) -> dict[str, Any]:
        """The pending window, reduced to plain numbers, for a checkpoint.

        Costs one device synchronisation. Histograms, images and text are not kept: they
        only exist on summary steps, which are flushed before a checkpoint is taken.
        """
        weighted = [tag for tag, window in self._scalars.items()
                    if window.weights is not None and not window.empty()]
        return {"scalars": {tag: {"sum": total, "count": count,
                                  "first_bad": -1 if first_bad is None else first_bad}
                            for tag, (total, count, first_bad) in self._totals().items()},
                "weighted": weighted,
                "modes": dict(self._modes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a pending window saved by `state_dict`."""
        self._scalars = {}
        self._modes = dict(state.get("modes", {}))
        weighted = set(state.get("weighted", ()))
        for tag, saved in state["scalars"].items():
            window = self._scalars[tag] = _ScalarWindow(weighted=tag in weighted)
            window.py_sum = saved["sum"]
            window.py_count = saved["count"]
            window.py_first_bad = None if saved["first_bad"] < 0 else saved["first_bad"]


# Combines a window's scalar totals across processes: ({tag: (sum, count, first_bad)},
# {tag: mode}, share) -> ({tag: (value, count)}, {tag: (first_bad, rank)}, [share by rank]).
Reducer = Callable[[dict[str, tuple[float, float, "int | None"]], dict[str, str], Any],
                   tuple[dict[str, tuple[float, float]], dict[str, tuple[int, int]], list[Any]]]


def _kept(value: torch.Tensor) -> torch.Tensor:
    """`value` as a window keeps it: by reference (no copy, no sync) unless it looks like
    state that will change in place (a parameter, or a tensor already modified in place,
    such as an updated buffer), which is cloned so the window keeps this step's value."""
    if value.requires_grad:  # drop the graph; a leaf is a parameter: copy its value
        # `.data` is `.detach()` without the round trip through the dispatcher.
        return value.detach().clone() if value.is_leaf else value.data
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
