"""Writers: where flushed summaries go (TensorBoard, JSON lines, yours), off the step path.

A writer receives `SummaryRecord`s, which hold plain floats and CPU tensors, so writing
never touches the device. File writers run on one background thread (`BackgroundWriter`)
so a slow disk or protobuf serialisation does not stall the training step. An error in
that thread is not swallowed: it is raised on the training thread at the next write or at
close.
"""

from __future__ import annotations

import array
import contextlib
import functools
import itertools
import json
import math
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from .checkpoint import os_error, storage_error
from .errors import StorageError
from .summary import SummaryRecord

__all__ = [
    "BackgroundWriter",
    "JSONLinesWriter",
    "TensorBoardWriter",
    "Writer",
    "WriterFactory",
    "check_writers",
    "open_writer",
    "open_writers",
]


class Writer(Protocol):
    """Anything with `write(record)` and `close()` can receive summaries.

    A writer may also define `flush()`; it is called after each batch of records.
    """

    def write(self, record: SummaryRecord) -> None:
        """Write one flushed window. Called in step order, never twice for one record."""
        ...

    def close(self) -> None:
        """Write out anything buffered and release files; called once, at the end."""
        ...


# Builds a writer when the trainer opens its writers: called with the run directory and
# the step training continues from (as for `Trainer.make_writers`).
WriterFactory = Callable[[str, "int | None"], Writer]


def check_writers(writers: Sequence[Any]) -> list[Writer | WriterFactory]:
    """The `writers=` option, checked: each a writer (it has ``write``) or a factory."""
    if isinstance(writers, (str, bytes)) or not isinstance(writers, Sequence):
        raise TypeError(f"writers must be a list of writers or writer factories, got "
                        f"{type(writers).__name__}")
    for i, writer in enumerate(writers):
        if not (_is_writer(writer) or callable(writer)):
            raise TypeError(
                f"writers[{i}] is a {type(writer).__name__}: pass an object with write(record) "
                "and close() (and optionally flush()), or a factory called as "
                "factory(log_dir, start_step) that returns one"
            )
        if _is_writer(writer) and not callable(getattr(writer, "close", None)):
            raise TypeError(f"writers[{i}] ({type(writer).__name__}) has write() but no close()")
    return list(writers)


def open_writers(log_dir: str, start_step: int | None,
                 extra: Sequence[Writer | WriterFactory] = ()) -> list[Writer]:
    """The default writers of a run directory (TensorBoard and ``metrics.jsonl``), then
    `extra` (see `open_writer`). If one fails to open, those already open are closed.

    Args:
        log_dir: The run directory (created if missing).
        start_step: The step training continues from; what was logged after it is
            dropped. None appends and drops nothing.
        extra: The `writers=` option of the Trainer.
    """
    opened: list[Writer] = []
    try:
        os.makedirs(log_dir, exist_ok=True)
        # metrics.jsonl first: on a resume its rewrite is the first write of the run.
        opened.append(JSONLinesWriter(os.path.join(log_dir, "metrics.jsonl"),
                                      keep_until=start_step))
        opened.append(TensorBoardWriter(
            log_dir, purge_step=None if start_step is None else start_step + 1))
        for spec in extra:
            opened.append(open_writer(spec, log_dir, start_step))
    except BaseException as exc:
        for writer in opened:  # release the files of those already open
            with contextlib.suppress(Exception):
                writer.close()
        cause = os_error(exc)
        if cause is None or isinstance(exc, StorageError):
            raise
        raise storage_error(cause, "opening the logs in", log_dir,
                            os.path.join(log_dir, "checkpoints")) from exc
    return opened


def open_writer(spec: Writer | WriterFactory, log_dir: str, start_step: int | None) -> Writer:
    """The writer `spec` stands for while the trainer's writers are open.

    A factory is called and its writer closed with the others. A writer passed as an
    object was opened by its owner, who closes it: the trainer only flushes it, so it
    keeps receiving records over several `fit` and `evaluate` calls.
    """
    if _is_writer(spec):
        return _Borrowed(spec)  # type: ignore[arg-type]
    writer = spec(log_dir, start_step)  # type: ignore[operator]
    if not _is_writer(writer):
        raise TypeError(f"the writer factory {spec!r} returned {type(writer).__name__}, "
                        "which has no write(record)")
    return writer


def _is_writer(obj: Any) -> bool:
    # A class is a factory even though it has a `write` function.
    return not isinstance(obj, type) and callable(getattr(obj, "write", None))


class _Borrowed:
    """A writer the trainer uses but does not own: `close` only flushes it."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    def write(self, record: SummaryRecord) -> None:
        self.writer.write(record)

    def flush(self) -> None:
        flush = getattr(self.writer, "flush", None)
        if flush is not None:
            flush()

    def close(self) -> None:
        self.flush()


class TensorBoardWriter:
    """Writes records as TensorBoard event files.

    All scalars of a flush go into one event. The file is TensorBoard's own format (the
    TFRecord framing of `Event` protocol buffers, as ``torch.utils.tensorboard`` writes
    it), written here directly on the caller's thread (the `BackgroundWriter`'s), with
    the record checksums computed by a C implementation of CRC32C when one is installed
    (the ``crc32c`` or ``google-crc32c`` package: ``pip install
    "lossless_trainer[fast]"``), else by TensorBoard's pure-Python one, which holds the
    GIL against the training thread for about 70 µs per record. Histograms, images and
    text are encoded by ``torch.utils.tensorboard.summary``.

    Args:
        log_dir: Directory for the event files.
        purge_step: When resuming, the first step to be written again; TensorBoard then
            hides events at or after it from earlier runs, so curves are not duplicated.
    """

    def __init__(self, log_dir: str | os.PathLike[str], purge_step: int | None = None) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self.path = os.fspath(log_dir)  # where its event files go, for errors
        os.makedirs(self.path, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_EVENT_FILES)}")
        self._file = open(os.path.join(self.path, name), "wb")  # noqa: SIM115 - close()
        self._crc = masked_crc32c()
        self._heads: dict[str, bytes] = {}  # each scalar tag's encoded bytes
        self._add(self._event(wall_time=time.time(), file_version="brain.Event:2",
                              source_metadata=event_pb2.SourceMetadata(
                                  writer="lossless_trainer")))
        if purge_step is not None:  # TensorBoard drops what earlier files hold from here on
            self._add(self._event(wall_time=time.time(), step=purge_step,
                                  session_log=event_pb2.SessionLog(
                                      status=event_pb2.SessionLog.START)))
        self._file.flush()

    def _add(self, event: Any) -> None:
        self._frame(event.SerializeToString())

    def _frame(self, data: bytes) -> None:
        """Write one serialised `Event` in TFRecord framing."""
        header = struct.pack("<Q", len(data))
        crc = self._crc
        self._file.write(b"".join((header, struct.pack("<I", crc(header)), data,
                                   struct.pack("<I", crc(data)))))

    def _add_summary(self, summary: Any, step: int) -> None:
        self._frame(_event(step, summary.SerializeToString()))

    def write(self, record: SummaryRecord) -> None:
        if record.scalars:
            self._frame(self._scalar_event(record.scalars, record.step))
        if not record.others:
            return
        from torch.utils.tensorboard import summary as encode

        for kind, tag, value, step in record.others:
            if kind == "histogram":
                values = value.flatten().double()
                finite = values[values.isfinite()]
                histogram = _histogram(tag, finite) if finite.numel() else None
                if histogram is not None:  # TensorBoard rejects NaN and Inf in a histogram
                    self._frame(_event(step, histogram))
                if finite.numel() != values.numel():
                    nonfinite = values.numel() - finite.numel()
                    self._add_summary(encode.text(
                        f"{tag}/nonfinite",
                        f"{nonfinite} of {values.numel()} values are NaN or Inf"), step)
            elif kind == "image":
                tensor, formats = value
                self._add_summary(encode.image(tag, tensor, dataformats=formats), step)
            elif kind == "text":
                self._add_summary(encode.text(tag, value), step)

    def _scalar_event(self, scalars: dict[str, float], step: int) -> bytes:
        """The serialised `Event` of a flush's scalars, encoded here: the bytes protobuf
        writes for ``Event(wall_time, step, summary=Summary(value=[Value(tag,
        simple_value)...]))``, with each tag's bytes made once."""
        heads = self._heads
        try:
            summary = b"".join([heads[tag] + _FLOAT(value) for tag, value in scalars.items()])
        except (KeyError, OverflowError, struct.error):  # a new tag; a value past float32
            for tag in scalars:
                if tag not in heads:
                    heads[tag] = _value_head(tag)
            summary = b"".join([heads[tag] + array.array("f", [value]).tobytes()
                                for tag, value in scalars.items()])
        return _event(step, summary)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


_EVENT_FILES = itertools.count()  # numbers the event files of this process


@functools.cache
def _tensorflow_bins() -> torch.Tensor:
    """The bucket edges ``SummaryWriter.add_histogram`` uses by default (TensorFlow's):
    from 1e-12 to 1e20 by factors of 1.1, mirrored, and 0."""
    edges, edge = [], 1e-12
    while edge < 1e20:
        edges.append(edge)
        edge *= 1.1
    return torch.tensor([-e for e in reversed(edges)] + [0] + edges, dtype=torch.float64)


def _histogram(tag: str, values: torch.Tensor) -> bytes | None:
    """The serialised ``Summary`` that ``SummaryWriter.add_histogram`` writes for finite
    float64 `values` with the default buckets, or None if none falls inside them.

    Encoded here, the buckets straight from the tensors' bytes: counting takes
    `torch.histogram`, which releases the GIL, and the rest a few calls whatever the
    number of buckets (torch's writer, through NumPy and protobuf's Python lists, holds
    the GIL against the training thread for about a millisecond per histogram).
    """
    edges = _tensorflow_bins()
    counts = torch.histogram(values, bins=edges).hist
    nonzero = counts.nonzero()
    if not nonzero.numel():
        return None
    start, end = int(nonzero[0]), int(nonzero[-1]) + 1
    # TensorBoard reads right bucket limits only: an empty bucket first keeps the left.
    buckets = counts[start - 1:end] if start else torch.cat([counts.new_zeros(1), counts[:end]])
    limits = edges[start:end + 1]
    array_ = values.numpy()  # NumPy's sums, as torch's writer computes them
    fields = [b""] * 7
    # HistogramProto: min = 1, max = 2, num = 3, sum = 4, sum_squares = 5 (doubles, left
    # out when +0.0 as proto3 does), bucket_limit = 6, bucket = 7 (packed doubles).
    for number, value in enumerate((array_.min(), array_.max(), float(len(array_)),
                                    array_.sum(), array_.dot(array_)), 1):
        packed = struct.pack("<d", value)
        if packed != b"\0" * 8:
            fields[number - 1] = bytes((number << 3 | 1,)) + packed
    for number, tensor in ((6, limits), (7, buckets)):
        data = tensor.numpy().astype("<f8", copy=False).tobytes()
        fields[number - 1] = bytes((number << 3 | 2,)) + _varint(len(data)) + data
    histo = b"".join(fields)
    name = tag.encode()
    value = (b"\x0a" + _varint(len(name)) + name  # Summary.Value: tag = 1, histo = 5
             + b"\x2a" + _varint(len(histo)) + histo)
    return b"\x0a" + _varint(len(value)) + value  # Summary.value = 1


def _event(step: int, summary: bytes) -> bytes:
    """The serialised ``Event(wall_time=now, step=step, summary=<summary's bytes>)``."""
    return b"".join((b"\x09", struct.pack("<d", time.time()),
                     b"\x10" + _varint(step) if step else b"",
                     b"\x2a", _varint(len(summary)), summary))


_FLOAT = struct.Struct("<f").pack


def _varint(n: int) -> bytes:
    """`n` (non-negative) as a protobuf varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _value_head(tag: str) -> bytes:
    """A `Summary.Value` with this tag and a float ``simple_value``, as the field
    header of `Summary.value`, up to the value's four bytes."""
    name = tag.encode()
    body = b"\x0a" + _varint(len(name)) + name + b"\x15"  # tag = 1; simple_value = 2
    return b"\x0a" + _varint(len(body) + 4) + body


def masked_crc32c() -> Callable[[bytes], int]:
    """The masked CRC32C of TFRecord framing (what event files carry): from the ``crc32c``
    or ``google-crc32c`` package (C, releases the GIL) when installed, else
    TensorBoard's pure-Python implementation."""
    try:
        from crc32c import crc32c as crc
    except ImportError:
        try:
            from google_crc32c import value as crc
        except ImportError:
            from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
            return masked_crc32c  # type: ignore[no-any-return]

    def masked(data: bytes) -> int:
        x = crc(data)
        return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    return masked


class JSONLinesWriter:
    """Appends one JSON object per flush: ``{"step": ..., "time": ..., "<tag>": value}``.

    Non-finite values are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``, so
    every line stays valid JSON.

    Args:
        path: The file; created if missing.
        keep_until: When continuing a run from this step, lines of later steps (written
            by the interrupted run after its checkpoint) and a torn last line are removed
            first, atomically, so the file holds each step once.
    """

    def __init__(self, path: str | os.PathLike[str], keep_until: int | None = None) -> None:
        self.path = os.fspath(path)
        if keep_until is not None and os.path.exists(self.path):
            _truncate_jsonl(self.path, keep_until)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._keys: dict[str, str] = {}  # each tag as the JSON that precedes its value

    def write(self, record: SummaryRecord) -> None:
        if not record.scalars:
            return
        # Built here rather than by json.dumps of a dict: each tag's JSON is made once,
        # and a finite float is written as json.dumps writes it (its repr).
        keys = self._keys
        try:
            body = "".join([keys[tag] + repr(value) if type(value) is float
                            and value - value == 0.0 else keys[tag] + _json_number(value)
                            for tag, value in record.scalars.items()])
        except KeyError:  # a new tag
            for tag in record.scalars:
                if tag not in keys:
                    keys[tag] = f", {json.dumps(tag)}: "
            return self.write(record)
        self._file.write(f'{{"step": {int(record.step)}, "time": {round(time.time(), 3)!r}'
                         f"{body}}}\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _json_number(value: Any) -> str:
    """A scalar as JSON; NaN and the infinities as the strings ``"nan"``, ``"inf"``."""
    return json.dumps(value if math.isfinite(value) else str(value))


def _truncate_jsonl(path: str, keep_until: int) -> None:
    """Rewrite `path` with its lines up to step `keep_until`, atomically: a failure
    (a full disk) leaves the file as it was and no temporary file."""
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash
            if step <= keep_until:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise storage_error(exc, "rewriting", path, _checkpoints_of(path)) from exc


def _checkpoints_of(path: str) -> str:
    """The checkpoint directory of the run whose log file (or directory) is `path`."""
    run_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return os.path.join(run_dir, "checkpoints")


class BackgroundWriter:
    """Runs other writers on one daemon thread, handing records over in batches.

    Records are buffered on the training thread and handed to the writer thread at most
    once per `interval` seconds (and on `flush`/`close`). Each wake-up of a Python thread
    competes with the training loop for the GIL, and a small model flushes dozens of
    times a second, so waking once per record would cost more than the writing itself.
    Records are written in order. `close` drains everything, then closes every writer
    even if one fails.

    A writer's failure is raised on the training thread at the next `write`, `flush`
    or `close`; a file-system failure (a full disk) as a `StorageError` naming the
    writer's file and the run's intact checkpoints.

    Args:
        writers: Writers with `write(record)`, optional `flush()`, and `close()`.
        interval: Most seconds a record waits before it is handed over.
    """

    _STOP = object()

    def __init__(self, writers: list[Writer], interval: float = 1.0) -> None:
        self.writers = writers
        self.interval = interval
        self._buffer: list[SummaryRecord] = []
        self._handed_at = time.monotonic()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._failed: Writer | None = None
        self._thread = threading.Thread(target=self._run, name="lossless_trainer-writer",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if isinstance(item, threading.Event):  # a flush() waiting for the batch before
                item.set()
                continue
            for writer in self.writers:  # one failing writer does not starve the others
                try:
                    for record in item:
                        writer.write(record)
                    flush = getattr(writer, "flush", None)
                    if flush is not None:
                        flush()
                except BaseException as exc:  # surfaced on the training thread
                    if self._error is None:
                        self._error, self._failed = exc, writer

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            cause = os_error(error)
            path = getattr(self._failed, "path", None)
            if cause is not None and path is not None:
                raise storage_error(cause, "writing logs to", path,
                                    _checkpoints_of(path)) from error
            raise RuntimeError(f"writing summaries failed in the background: {error!r}") \
                from error

    def _hand_over(self) -> None:
        if self._buffer:
            self._queue.put(self._buffer)
            self._buffer = []
        self._handed_at = time.monotonic()

    def write(self, record: SummaryRecord) -> None:
        if self._error is not None:
            self._raise_pending()
        # The writer thread reads the record later; hooks may still hold and change it.
        self._buffer.append(record.copy())
        if time.monotonic() - self._handed_at >= self.interval:
            self._hand_over()

    def flush(self) -> None:
        """Block until every record written so far is on disk (as far as the writers go)."""
        self._hand_over()
        if self._thread.is_alive():
            done = threading.Event()
            self._queue.put(done)
            done.wait()
        self._raise_pending()

    def close(self) -> None:
        self._hand_over()
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join()
        errors = []
        for writer in self.writers:
            try:
                writer.close()
            except Exception as exc:
                errors.append(exc)
        self._raise_pending()
        if errors:
            raise errors[0]
