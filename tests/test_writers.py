"""lossless_trainer.writers: TensorBoard events and metrics.jsonl, read back; writer lifecycle."""

# What the Trainer writes is checked with TensorBoard's `EventAccumulator`, the running
# `tensorboard` server through its HTTP data API, and the `metrics.jsonl` file, against
# values that a counting model makes exactly computable.

from __future__ import annotations

import functools
import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyClassifier, make_batches, read_metrics, train
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from torch import nn

from lossless_trainer import (
    Hook,
    Model,
    Priority,
    Trainer,
    is_summary_step,
    summary_scope,
    write_summary,
)
from lossless_trainer.summary import SummaryRecord
from lossless_trainer.writers import JSONLinesWriter, check_writers

LOG_EVERY = 5
LR = 0.05
BATCH = 4
LOSS_KEYS = ("mse", "count")
# Tags written from inside the model (see `Encoder` and `Block`).
COUNTER = "encoder/counter"  # a Python int equal to the step
COUNTER_T = "encoder/counter_t"  # a 0-d tensor equal to twice the step
ACT_MEAN = "encoder/act_mean"  # a real activation statistic
NESTED = "encoder/block/counter"  # written two scopes deep, equal to the step
MODEL_TAGS = (COUNTER, COUNTER_T, ACT_MEAN, NESTED)
TRAINER_TAGS = ("loss/mse", "loss/count", "loss/total", "lr", "perf/steps_per_sec",
                "perf/samples_per_sec")
# Non-scalar tags written by `Encoder` when `media` is set.
HIST, IMG_CHW, IMG_HWC, IMG_GRAY, TEXT = ("encoder/hist", "encoder/img_chw", "encoder/img_hwc",
                                          "encoder/img_gray", "encoder/note")
IMAGE_SHAPE = (8, 6)  # height, width of every logged image
SERVER_TIMEOUT = 60.0
# The Trainer options of every run here (given to conftest's `train`, over its defaults).
OPTIONS = {"log_every": LOG_EVERY, "seed": 0, "checkpoint_every": None,
           "optimizer": functools.partial(torch.optim.SGD, lr=LR)}


# --------------------------------------------------------------------------- the model


class Block(nn.Module):
    """A sub-sub-module that logs under its own scope, nested in the encoder's."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        with summary_scope("block"):
            write_summary("counter", step)
        return torch.relu(self.linear(x))


class Encoder(nn.Module):
    """A plain nn.Module (not a `Model`) that logs from its forward, with no trainer handle.

    Args:
        media: None for scalars only; "guarded" writes a histogram, three images and a
            text only when `is_summary_step()`; "unguarded" writes them on every step.
    """

    def __init__(self, media: str | None = None) -> None:
        super().__init__()
        self.block = Block()
        self.media = media
        self.calls = 0  # forward calls so far == the trainer's step during training
        self.summary_steps: list[int] = []  # steps at which is_summary_step() was True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        step = self.calls
        with summary_scope("encoder"):
            h = self.block(x, step)
            write_summary("counter", step)
            write_summary("counter_t", torch.tensor(2.0 * step))
            write_summary("act_mean", h.detach().mean())
            if is_summary_step():
                self.summary_steps.append(step)
            if self.media == "unguarded" or (self.media == "guarded" and is_summary_step()):
                write_media(step)
        return h


def write_media(step: int) -> None:
    """A histogram, three images and a text whose content encodes `step`."""
    height, width = IMAGE_SHAPE
    write_summary("hist", torch.arange(10.0) + step)  # 1-d tensor: inferred histogram
    chw = torch.zeros(3, height, width, dtype=torch.uint8)
    chw[0] = step  # red channel carries the step
    write_summary("img_chw", chw)  # inferred image, CHW
    hwc = torch.zeros(height, width, 3, dtype=torch.uint8)
    hwc[..., 1] = step  # green channel carries the step
    write_summary("img_hwc", hwc)  # inferred image, HWC
    gray = torch.full((height, width), step, dtype=torch.uint8)
    write_summary("img_gray", gray, kind="image")  # 2-d needs an explicit kind
    write_summary("note", f"written at step {step}")  # a string: text


class CountingModel(Model):
    """Losses: a real MSE, and "count", a loss whose value is exactly the step."""

    def __init__(self, media: str | None = None) -> None:
        super().__init__()
        self.encoder = Encoder(media)
        self.head = nn.Linear(4, 1)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        pred = self.head(self.encoder(x)).squeeze(-1)
        if not self.training:
            return pred
        anchor = self.head.weight.sum() * 0.0  # gives "count" a path to the parameters
        return {"mse": F.mse_loss(pred, y), "count": anchor + float(self.encoder.calls)}


class NaNMetricModel(CountingModel):
    """Also logs a metric (not a loss) that is NaN at step 3 only."""

    def forward(self, batch):
        losses = super().forward(batch)
        write_summary("metric/ratio", math.nan if self.encoder.calls == 3 else 1.0)
        return losses


# --------------------------------------------------------------------------- helpers


def make_data(n_batches: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, 4, generator=gen), torch.randn(BATCH, generator=gen))
            for _ in range(n_batches)]


def flush_steps(last: int) -> list[int]:
    """Steps flushed by a run of `last` steps: every LOG_EVERY-th, plus a partial window."""
    steps = list(range(LOG_EVERY, last + 1, LOG_EVERY))
    return steps if steps and steps[-1] == last else [*steps, last]


def window_means(last: int) -> list[float]:
    """Mean of the step numbers in each flush window of a run of `last` steps."""
    starts = [1, *(s + 1 for s in flush_steps(last)[:-1])]
    return [(start + end) / 2 for start, end in zip(starts, flush_steps(last))]


def load_events(log_dir: Path) -> event_accumulator.EventAccumulator:
    """Everything TensorBoard reads from the run directory, nothing sampled away."""
    assert list(log_dir.glob("events.out.tfevents.*")), f"no event file in {log_dir}"
    guidance = {kind: 0 for kind in event_accumulator.DEFAULT_SIZE_GUIDANCE}
    acc = event_accumulator.EventAccumulator(os.fspath(log_dir), size_guidance=guidance)
    acc.Reload()
    return acc


def scalar_series(acc: event_accumulator.EventAccumulator, tag: str
                  ) -> tuple[list[int], list[float]]:
    assert tag in acc.Tags()["scalars"], f"{tag!r} not in {sorted(acc.Tags()['scalars'])}"
    events = acc.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]


def decode_png(encoded: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(encoded))
    image.load()
    return image.convert("RGB")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tensorboard_command() -> list[str]:
    script = Path(sys.executable).with_name("tensorboard")
    if script.is_file() and os.access(script, os.X_OK):
        return [os.fspath(script)]
    return [sys.executable, "-m", "tensorboard.main"]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200, f"{url}: HTTP {response.status}"
        return json.loads(response.read().decode("utf-8"))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run22(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trainer, CountingModel]:
    """One scalar-only run of 22 steps (4 full windows and a partial one), shared."""
    log_dir = tmp_path_factory.mktemp("run22")
    trainer, model = train(log_dir, max_steps=22, model=CountingModel, data=make_data(),
                           **OPTIONS)
    return log_dir, trainer, model


# --------------------------------------------------------------------------- scalars


@pytest.mark.parametrize("max_steps", [20, 22])
def test_scalars_from_submodule_reach_tensorboard_at_flush_steps(tmp_path, max_steps):
    trainer, model = train(tmp_path, max_steps=max_steps, model=CountingModel,
                           data=make_data(), **OPTIONS)
    assert trainer.state.step == max_steps
    expected_steps = [5, 10, 15, 20] if max_steps == 20 else [5, 10, 15, 20, 22]
    assert flush_steps(max_steps) == expected_steps
    assert model.encoder.summary_steps == expected_steps

    acc = load_events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    missing = {*MODEL_TAGS, *TRAINER_TAGS} - tags
    assert not missing, f"tags missing from TensorBoard: {sorted(missing)}; found {sorted(tags)}"
    for tag in (*MODEL_TAGS, *TRAINER_TAGS):
        steps, _ = scalar_series(acc, tag)
        assert steps == expected_steps, tag

    means = window_means(max_steps)
    # 20 steps: 1..5 -> 3, 6..10 -> 8, 11..15 -> 13, 16..20 -> 18; 22 steps adds 21..22 -> 21.5
    assert means[:4] == [3.0, 8.0, 13.0, 18.0]
    for tag, scale in ((COUNTER, 1.0), (NESTED, 1.0), (COUNTER_T, 2.0), ("loss/count", 1.0)):
        _, values = scalar_series(acc, tag)
        assert values == pytest.approx([scale * m for m in means], rel=1e-6), tag


def test_final_partial_window_holds_only_its_own_steps(run22):
    log_dir, trainer, _ = run22
    acc = load_events(log_dir)
    steps, values = scalar_series(acc, COUNTER)
    assert steps[-1] == 22
    assert values[-1] == pytest.approx(21.5)  # mean of steps 21 and 22 only
    assert trainer.last_summary is not None and trainer.last_summary.step == 22
    assert trainer.last_summary.scalars[COUNTER] == pytest.approx(21.5)


def test_loss_total_is_sum_of_per_key_means(run22):
    log_dir, _, _ = run22
    acc = load_events(log_dir)
    total_steps, totals = scalar_series(acc, "loss/total")
    per_key = [scalar_series(acc, f"loss/{key}") for key in LOSS_KEYS]
    for steps, values in per_key:
        assert steps == total_steps
        assert all(math.isfinite(v) for v in values)
    _, mse = per_key[0]
    assert all(v > 0 for v in mse)  # a real squared error, not a placeholder
    sums = [sum(values) for values in zip(*(values for _, values in per_key))]
    assert totals == pytest.approx(sums, rel=1e-5)


def test_lr_and_throughput_are_logged(run22):
    log_dir, _, _ = run22
    acc = load_events(log_dir)
    steps, lrs = scalar_series(acc, "lr")
    assert steps == flush_steps(22)
    assert lrs == pytest.approx([LR] * len(steps), rel=1e-6)
    for tag in ("perf/steps_per_sec", "perf/samples_per_sec"):
        steps, rates = scalar_series(acc, tag)
        assert steps == flush_steps(22), tag
        assert all(math.isfinite(r) and r > 0 for r in rates), (tag, rates)
    # Every window except the last holds LOG_EVERY steps of BATCH samples each.
    _, steps_rate = scalar_series(acc, "perf/steps_per_sec")
    _, samples_rate = scalar_series(acc, "perf/samples_per_sec")
    for s, n in zip(steps_rate, samples_rate):
        assert n == pytest.approx(BATCH * s, rel=1e-4)


def test_epoch_bounded_run_flushes_its_last_partial_window(tmp_path):
    # 7 batches, one epoch, log_every=5: no max_steps, so the last window (6, 7) is
    # flushed when training ends rather than by the step-count rule.
    trainer, _ = train(tmp_path, max_steps=None, max_epochs=1, model=CountingModel,
                       data=make_data(7), **OPTIONS)
    assert trainer.state.step == 7
    acc = load_events(tmp_path)
    steps, values = scalar_series(acc, COUNTER)
    assert steps == [5, 7]
    assert values == pytest.approx([3.0, 6.5])
    assert [line["step"] for line in read_metrics(tmp_path)] == [5, 7]


# --------------------------------------------------------------------------- the server


def test_tensorboard_server_serves_model_scalar(run22, tmp_path):
    log_dir, _, _ = run22
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "tensorboard.log"
    command = [*tensorboard_command(), "--logdir", os.fspath(log_dir),
               "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT
        tags: dict = {}
        points: list = []
        run = None
        expected = flush_steps(22)
        # Poll until the server answers, has loaded the run, and serves every point
        # (it loads event files in the background, so early answers may be partial).
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"tensorboard exited with {server.returncode}:\n"
                            f"{log_path.read_text(errors='replace')}")
            try:
                tags = get_json(f"{base}/data/plugin/scalars/tags")  # type: ignore[assignment]
                run = next((r for r, t in tags.items() if NESTED in t), None)
                if run is not None:
                    query = urllib.parse.urlencode({"run": run, "tag": NESTED})
                    points = get_json(f"{base}/data/plugin/scalars/scalars?{query}")  # type: ignore[assignment]
                    if len(points) >= len(expected):
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
            time.sleep(0.25)
        assert run is not None, (f"tag {NESTED!r} never served within {SERVER_TIMEOUT}s; "
                                 f"tags={tags}\n{log_path.read_text(errors='replace')}")
        assert {*MODEL_TAGS, *TRAINER_TAGS} <= set(tags[run])
        assert run == "."  # the run directory itself is the logdir
        assert [p[1] for p in points] == expected
        assert [p[2] for p in points] == pytest.approx(window_means(22), rel=1e-6)

        query = urllib.parse.urlencode({"run": run, "tag": "loss/total"})
        total = get_json(f"{base}/data/plugin/scalars/scalars?{query}")
        assert [p[1] for p in total] == expected  # type: ignore[union-attr]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


# --------------------------------------------------------------------------- media


@pytest.fixture(scope="module", params=["guarded", "unguarded"])
def media_run(request, tmp_path_factory) -> tuple[str, Path, CountingModel]:
    log_dir = tmp_path_factory.mktemp(f"media-{request.param}")
    _, model = train(log_dir, max_steps=22,
                     model=functools.partial(CountingModel, request.param),
                     data=make_data(), **OPTIONS)
    return request.param, log_dir, model


def test_media_appear_only_at_flush_steps(media_run):
    mode, log_dir, model = media_run
    expected = flush_steps(22)
    assert model.encoder.summary_steps == expected
    acc = load_events(log_dir)
    tags = acc.Tags()
    assert tags["histograms"] == [HIST], tags
    assert sorted(tags["images"]) == sorted([IMG_CHW, IMG_HWC, IMG_GRAY]), tags
    assert f"{TEXT}/text_summary" in tags["tensors"], tags
    assert [e.step for e in acc.Histograms(HIST)] == expected, mode
    for tag in (IMG_CHW, IMG_HWC, IMG_GRAY):
        assert [e.step for e in acc.Images(tag)] == expected, (mode, tag)
    assert [e.step for e in acc.Tensors(f"{TEXT}/text_summary")] == expected, mode
    # Media steps coincide with the scalar flushes.
    assert scalar_series(acc, COUNTER)[0] == expected


def test_histogram_holds_the_value_written_at_its_step(media_run):
    mode, log_dir, _ = media_run
    acc = load_events(log_dir)
    for event in acc.Histograms(HIST):
        histo = event.histogram_value
        step = event.step
        assert (histo.min, histo.max, histo.num) == (step, step + 9, 10), (mode, step)
        assert histo.sum == pytest.approx(10 * step + 45), (mode, step)


@pytest.mark.parametrize("tag, channel", [(IMG_CHW, 0), (IMG_HWC, 1), (IMG_GRAY, None)])
def test_image_layouts_decode_correctly(media_run, tag, channel):
    mode, log_dir, _ = media_run
    height, width = IMAGE_SHAPE
    events = load_events(log_dir).Images(tag)
    assert events, (mode, tag)
    for event in events:
        assert (event.height, event.width) == (height, width), (mode, tag)
        image = decode_png(event.encoded_image_string)
        assert image.size == (width, height)  # PIL reports (width, height)
        step = event.step
        want = (step, step, step) if channel is None else tuple(
            step if c == channel else 0 for c in range(3))
        assert {color for _, color in image.getcolors()} == {want}, (mode, tag, step)


def test_text_is_written_at_its_step(media_run):
    mode, log_dir, _ = media_run
    events = load_events(log_dir).Tensors(f"{TEXT}/text_summary")
    assert events
    for event in events:
        text = event.tensor_proto.string_val[0].decode("utf-8")
        assert text == f"written at step {event.step}", mode


def test_media_are_not_in_metrics_jsonl(media_run):
    _, log_dir, _ = media_run
    keys = set().union(*(line.keys() for line in read_metrics(log_dir)))
    assert not keys & {HIST, IMG_CHW, IMG_HWC, IMG_GRAY, TEXT}
    assert COUNTER in keys


def test_media_in_epoch_bounded_run_stay_within_flush_steps(tmp_path):
    # Without max_steps the last step of a sized run is still known, so it is a summary step:
    # media written there are kept, at the same steps as the flushed scalars.
    train(tmp_path, max_steps=None, max_epochs=1,
          model=functools.partial(CountingModel, "unguarded"), data=make_data(7),
          **OPTIONS)
    acc = load_events(tmp_path)
    flushed = scalar_series(acc, COUNTER)[0]
    assert flushed == [5, 7]
    media_steps = {e.step for e in acc.Histograms(HIST)}
    media_steps |= {e.step for tag in (IMG_CHW, IMG_HWC, IMG_GRAY) for e in acc.Images(tag)}
    assert media_steps == set(flushed)


# --------------------------------------------------------------------------- metrics.jsonl


def test_metrics_jsonl_has_one_line_per_flush_with_the_same_tags(run22):
    log_dir, _, _ = run22
    lines = read_metrics(log_dir)
    expected = flush_steps(22)
    assert [line["step"] for line in lines] == expected
    acc = load_events(log_dir)
    tb_tags = set(acc.Tags()["scalars"])
    for line in lines:
        assert isinstance(line["time"], float)
        assert set(line) - {"step", "time"} == tb_tags, line["step"]
    for tag in tb_tags:
        steps, values = scalar_series(acc, tag)
        assert steps == expected
        # TensorBoard stores float32; the JSON line keeps the full float64 mean.
        assert [line[tag] for line in lines] == pytest.approx(values, rel=1e-6), tag
    assert [line[COUNTER] for line in lines] == window_means(22)  # exact in float64


def test_nonfinite_metric_is_nan_in_tensorboard_and_a_string_in_jsonl(tmp_path):
    # A NaN in a metric (not a loss) does not stop training; its window's mean is NaN.
    trainer, _ = train(tmp_path, max_steps=10, model=NaNMetricModel, data=make_data(),
                       **OPTIONS)
    assert trainer.state.step == 10
    steps, values = scalar_series(load_events(tmp_path), "metric/ratio")
    assert steps == [5, 10]
    assert math.isnan(values[0]) and values[1] == 1.0
    lines = read_metrics(tmp_path)
    assert [line["metric/ratio"] for line in lines] == ["nan", 1.0]


# --------------------------------------------------------------------------- the writers' files
# and lifecycle


def test_jsonl_is_truncated_to_the_resumed_step_and_torn_lines_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "a": 1}\n{"step": 10, "a": 2}\n{"step": 15, "a": 3}\n{"st')
    JSONLinesWriter(path, keep_until=10).close()
    assert path.read_text() == '{"step": 5, "a": 1}\n{"step": 10, "a": 2}\n'


def test_nonfinite_histogram_values_do_not_break_the_writers(quiet):
    class Spiky(Model):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 4)

        def forward(self, batch):
            x, y = batch
            logits = self.lin(x)
            spiky = logits.detach().clone()
            spiky[0, 0] = float("inf")
            write_summary("spiky", spiky)
            return {"ce": F.cross_entropy(logits, y)}

    Trainer(Spiky(), make_batches(6), log_every=3, **quiet).fit()
    assert [line["step"] for line in read_metrics(quiet["log_dir"])] == [3, 6]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(quiet["log_dir"], size_guidance={"histograms": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Histograms("spiky")] == [3, 6]
    assert events.Histograms("spiky")[0].histogram_value.num == 31  # 32 values, 1 dropped
    assert "spiky/nonfinite/text_summary" in events.Tags()["tensors"]


def test_writers_are_closed_even_if_teardown_is_interrupted(tmp_path):
    class Abort(Hook):
        def after_train(self, trainer):
            raise KeyboardInterrupt

    trainer = Trainer(TinyClassifier(), make_batches(3), log_dir=str(tmp_path), progress=False,
                      callbacks=[Abort()])
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.writers is None
    assert not any(t.name == "lossless_trainer-writer" and t.is_alive()
                   for t in __import__("threading").enumerate())


class Recording:
    """A writer object that remembers what it was given and how it was treated."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.scalars: list[dict[str, float]] = []
        self.flushes = 0
        self.closed = False

    def write(self, record):
        assert not self.closed, "written after close"
        self.steps.append(record.step)
        self.scalars.append(dict(record.scalars))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


class Opened:
    """A writer made by a factory: records the arguments it was built with."""

    made: list[Opened] = []

    def __init__(self, log_dir, start_step):
        self.log_dir, self.start_step = log_dir, start_step
        self.steps: list[int] = []
        self.closed = False
        Opened.made.append(self)

    def write(self, record):
        self.steps.append(record.step)

    def close(self):
        self.closed = True


def test_a_writer_object_gets_every_record_and_stays_open_across_fit_and_evaluate(quiet):
    writer = Recording()
    trainer = Trainer(TinyClassifier(), make_batches(6), log_every=2, writers=[writer],
                      eval_data=make_batches(2), **quiet)
    trainer.fit()
    # The same records as metrics.jsonl, in the same order; the evaluation at the end
    # goes out with the last step's flush.
    assert writer.steps == [line["step"] for line in read_metrics(quiet["log_dir"])]
    assert writer.steps == [2, 4, 6]
    assert writer.scalars[-1]["loss/total"] == pytest.approx(
        read_metrics(quiet["log_dir"])[-1]["loss/total"], rel=1e-6)
    assert not writer.closed and writer.flushes >= 1
    trainer.evaluate()  # outside fit: a record of its own, to the same open writer
    assert writer.steps == [2, 4, 6, 6] and not writer.closed


def test_a_factory_is_called_per_opening_with_the_run_directory_and_closed(quiet):
    Opened.made.clear()
    trainer = Trainer(TinyClassifier(), make_batches(4), log_every=2, writers=[Opened],
                      **quiet)
    trainer.fit()
    trainer.evaluate(make_batches(1))
    first, second = Opened.made
    assert (first.log_dir, first.start_step) == (quiet["log_dir"], 0)
    assert first.steps == [2, 4] and first.closed
    assert (second.start_step, second.steps, second.closed) == (None, [4], True)


def test_a_resumed_run_tells_its_factory_where_it_continues(tmp_path):
    Opened.made.clear()
    log_dir = str(tmp_path / "run")
    Trainer(TinyClassifier(), make_batches(4), max_steps=2, log_dir=log_dir,
            progress=False).fit()
    Trainer(TinyClassifier(), make_batches(4), max_steps=4, log_dir=log_dir, log_every=1,
            progress=False, writers=[lambda d, start: Opened(d, start)]).fit()
    (made,) = Opened.made
    assert made.start_step == 2 and made.steps == [3, 4]


def test_writers_are_written_on_rank_0_only(quiet, monkeypatch):
    writer = Recording()
    trainer = Trainer(TinyClassifier(), make_batches(2), writers=[writer], **quiet)
    monkeypatch.setattr(trainer.dist, "rank", 1)  # as rank 1 sees itself
    trainer.make_writers(0).close()
    Opened.made.clear()
    trainer.extra_writers = [Opened]
    trainer.make_writers(0).close()
    assert writer.steps == [] and writer.flushes == 0 and Opened.made == []


@pytest.mark.parametrize(("writers", "message"), [
    (["tb"], r"writers\[0\] is a str"),
    ([Recording(), 3], r"writers\[1\] is a int"),
    (Recording(), "writers must be a list"),
])
def test_malformed_writers_are_refused_before_anything_is_built(quiet, writers, message):
    with pytest.raises(TypeError, match=message):
        Trainer(TinyClassifier(), make_batches(1), writers=writers, **quiet)
    assert not os.path.exists(quiet["log_dir"])


def test_a_writer_without_close_is_refused():
    class NoClose:
        def write(self, record):
            pass

    with pytest.raises(TypeError, match=r"writers\[0\] \(NoClose\) has write\(\) but no close"):
        check_writers([NoClose()])


def test_a_factory_returning_no_writer_fails_fit_and_closes_the_defaults(quiet):
    trainer = Trainer(TinyClassifier(), make_batches(2), writers=[lambda d, s: None],
                      **quiet)
    threads = threading.active_count()
    with pytest.raises(TypeError, match="returned NoneType, which has no write"):
        trainer.fit()
    # The default writers were opened first and closed again: TensorBoard's event
    # thread is gone, and a later fit works.
    assert threading.active_count() == threads
    trainer.extra_writers = []
    trainer.fit()
    assert read_metrics(quiet["log_dir"])[-1]["step"] == 2


def test_save_checkpoint_puts_what_was_flushed_on_disk_first(quiet):
    writer = Recording()
    seen: list[list[int]] = []

    class SaveAt4(Hook):
        priority = Priority.CHECKPOINT + 1  # after this step's flush

        def after_step(self, trainer):
            if trainer.state.step == 4:
                trainer.save_checkpoint(os.path.join(trainer.checkpoint_dir, "mine.pt"))
                seen.append(list(writer.steps))

    Trainer(TinyClassifier(), make_batches(8), log_every=2, writers=[writer],
            callbacks=[SaveAt4()], **quiet).fit()
    # Without the flush in save_checkpoint the records would still sit in the buffer
    # (handed to the writer thread at most once a second).
    assert seen == [[2, 4]]


# Scalars protobuf writes in every form: zero, negative zero, NaN, infinities, a value
# past float32's range, a denormal, and tags of 127+ bytes (a two-byte length) and UTF-8.
_AWKWARD = {"loss/total": 0.25, "lr": 1e-3, "zero": 0.0, "minus_zero": -0.0,
            "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": 1e40,
            "tiny": 1e-42, "x" * 130: 1.5, "größe/µ": -2.0, "int": 3}


def _record_with_everything() -> SummaryRecord:
    generator = torch.Generator().manual_seed(0)
    # A histogram on bucket edges (0, ±1e-12, a value 1.1 ** k), in float64.
    edges = torch.tensor([0.0, 0.0, 1e-12, -1e-12, 1e-12 * 1.1 ** 40, 7.0, -3.5],
                         dtype=torch.float64)
    return SummaryRecord(step=7, scalars=dict(_AWKWARD), others=[
        ("histogram", "weights", torch.randn(50, generator=generator), 7),
        ("histogram", "edges", edges, 7),
        ("histogram", "ints", torch.arange(-5, 20), 7),
        ("image", "grid", (torch.rand(3, 8, 8, generator=generator), "CHW"), 7),
        ("image", "batch", (torch.rand(2, 1, 4, 4, generator=generator), "NCHW"), 7),
        ("text", "note", "hello", 7)])


def _decoded(log_dir: Path) -> list:
    """Every event's step and summary values, decoded, in order (wall times left out)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (name,) = [n for n in os.listdir(log_dir) if n.startswith("events.out.tfevents")]
    return [(event.step, [(v.tag, v.WhichOneof("value"), v.SerializeToString())
                          for v in event.summary.value])
            for event in EventFileLoader(str(log_dir / name)).Load()
            if event.HasField("summary")]


@pytest.mark.parametrize("crc", ["c", "python"])
def test_event_files_hold_what_torch_summarywriter_writes(tmp_path, monkeypatch, crc):
    from torch.utils.tensorboard import SummaryWriter

    from lossless_trainer import writers as writers_module

    if crc == "python":  # without crc32c: TensorBoard's own CRC32C
        for module in ("crc32c", "google_crc32c"):
            monkeypatch.setitem(sys.modules, module, None)
    ours = writers_module.TensorBoardWriter(tmp_path / "ours", purge_step=5)
    assert (ours._crc.__module__ == "lossless_trainer.writers") == (crc == "c")
    record = _record_with_everything()
    ours.write(record)
    ours.write(SummaryRecord(step=0, scalars={"lr": 0.5}))  # step 0 is left out of the bytes
    ours.close()
    theirs = SummaryWriter(str(tmp_path / "theirs"), purge_step=5)

    def scalars(values, step):
        theirs.file_writer.add_summary(summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in values.items()]), step)

    scalars(record.scalars, 7)
    for _, tag, values, _ in record.others[:3]:
        theirs.add_histogram(tag, values, 7)
    theirs.add_image("grid", record.others[3][2][0], 7, dataformats="CHW")
    theirs.add_images("batch", record.others[4][2][0], 7, dataformats="NCHW")
    theirs.add_text("note", "hello", 7)
    scalars({"lr": 0.5}, 0)
    theirs.close()
    assert _decoded(tmp_path / "ours") == _decoded(tmp_path / "theirs")
    # Within an event, the scalars are the very bytes protobuf writes.
    wall_time = 1234.5
    monkeypatch.setattr(writers_module.time, "time", lambda: wall_time)
    for step in (0, 7, 2 ** 40):
        expected = event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in _AWKWARD.items()]))
        assert ours._scalar_event(_AWKWARD, step) == expected.SerializeToString()
    from torch.utils.tensorboard import summary as encode

    for _, tag, values, _ in record.others[:3]:  # and so are the histograms
        assert writers_module._histogram(tag, values.double()) == encode.histogram(
            tag, values, writers_module._tensorflow_bins().tolist()).SerializeToString()
    # The purge step reaches TensorBoard as torch's writer says it.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for side in ("ours", "theirs"):
        (name,) = os.listdir(tmp_path / side)
        starts = [e.step for e in EventFileLoader(str(tmp_path / side / name)).Load()
                  if e.HasField("session_log")]
        assert starts == [5]
