"""lossless_trainer.summary: write_summary, summary_scope, is_summary_step, the lazy sink."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyClassifier, ValLossClassifier, make_batches, read_metrics
from torch import nn

from lossless_trainer import (
    Accuracy,
    Hook,
    Mean,
    Model,
    Trainer,
    is_summary_step,
    summary,
    summary_scope,
    write_summary,
)
from lossless_trainer.summary import _FOLD_AT, SummarySink


def test_outside_training_write_summary_is_a_no_op():
    write_summary("x", torch.ones(3, requires_grad=True))
    write_summary("y", object())  # not even validated: nothing is listening
    assert not is_summary_step()
    with summary_scope("s"):
        write_summary("z", 1.0)


def test_scopes_nest_and_survive_exceptions():
    sink = SummarySink()
    with sink.activate():
        with summary_scope("det"):
            with summary_scope("/rpn/"):
                write_summary("num_pos", 3)
            try:
                with summary_scope("roi"):
                    raise KeyError("inside")
            except KeyError:
                pass
            write_summary("after", 1)
        write_summary("top", 2)

        @summary_scope("decorated")
        def helper():
            write_summary("v", 4)

        helper()
    assert set(sink.flush().scalars) == {"det/rpn/num_pos", "det/after", "top", "decorated/v"}
    with pytest.raises(ValueError, match="non-empty name"), summary_scope("/"):
        pass


@pytest.mark.parametrize("now", [True, False], ids=["read-now", "kept"])
def test_scalars_are_averaged_over_the_window_and_reset(now):
    sink = SummarySink(read_cpu_now=now)
    with sink.activate():
        for step in range(1, 5):
            sink.begin_step(step, flush=step == 4)
            write_summary("t", torch.tensor(float(step)))
            write_summary("p", step)  # Python numbers are accumulated on the host
            write_summary("mixed", torch.tensor(10.0) if step % 2 else 20)
    record = sink.flush()
    assert record.step == 4
    assert record.scalars == {"t": 2.5, "p": 2.5, "mixed": 15.0}
    assert record.nonfinite == {}
    assert sink.flush().scalars == {}


def test_many_values_fold_into_bounded_memory_and_keep_first_nonfinite_step():
    sink = SummarySink(read_cpu_now=False)  # the device path, on the CPU
    n = 3 * _FOLD_AT + 7
    with sink.activate():
        for step in range(1, n + 1):
            sink.begin_step(step, flush=False)
            value = float("nan") if step in (_FOLD_AT + 3, 2 * _FOLD_AT + 1) else 1.0
            write_summary("x", torch.tensor(value))
            write_summary("ok", torch.tensor(step, dtype=torch.int64))  # ints are averaged too
            assert len(sink._values) < 2 * _FOLD_AT  # both tags' pending values
    record = sink.flush()
    assert math.isnan(record.scalars["x"])
    assert record.nonfinite == {"x": _FOLD_AT + 3}
    assert record.scalars["ok"] == pytest.approx((n + 1) / 2)


def test_stacked_values_keep_order_sums_slots_and_the_first_nonfinite_step():
    """Many scalars per step are stacked into one tensor at the next step's start; the
    sums, counts and first non-finite step are those of the values one by one, and a
    tag missing from a whole window loses its slot, the others keep their order."""
    sink = SummarySink(read_cpu_now=False)  # the device path, on the CPU
    expected: dict[str, list[float]] = {}
    with sink.activate():
        for step in range(1, 7):
            sink.begin_step(step, flush=False)
            for i in range(40):  # past the stacking bound in every step
                value = 0.1 * i + step / 7
                if (i, step) == (13, 4):
                    value = float("inf")
                write_summary(f"t{i}", torch.tensor(value, dtype=torch.float64))
                expected.setdefault(f"t{i}", []).append(value)
            write_summary("number", step)
        assert len(sink._stacked) == 5 and len(sink._values) == 40  # the last step pending
        record = sink.flush()
    for tag, values in expected.items():
        total = 0.0
        for value in values:
            total += value
        assert record.scalars[tag] == total / 6 or tag == "t13", tag
        assert record.counts[tag] == 6
    assert record.nonfinite == {"t13": 4}
    assert list(record.scalars)[:3] == ["t0", "t1", "t2"]
    with sink.activate():
        sink.begin_step(7, flush=True)
        write_summary("t5", torch.tensor(1.0))
        write_summary("fresh", 2.0)
    assert sink.flush().scalars == {"t5": 1.0, "fresh": 2.0}
    assert sink._tags == ["t5", "fresh"] and sink._slot == {"t5": 0, "fresh": 1}


@pytest.mark.parametrize("now", [True, False], ids=["read-now", "kept"])
def test_python_number_nonfinite_is_reported(now):
    sink = SummarySink(read_cpu_now=now)
    with sink.activate():
        sink.begin_step(7, flush=True)
        write_summary("p", float("inf"))
    assert sink.flush().nonfinite == {"p": 7}


@pytest.mark.parametrize("now", [True, False], ids=["read-now", "kept"])
def test_first_nonfinite_step_is_the_earliest_of_numbers_and_tensors(now):
    sink = SummarySink(read_cpu_now=now)
    with sink.activate():
        for step, value in ((1, 1.0), (2, torch.tensor(float("inf"))), (3, float("nan")),
                            (4, torch.tensor(float("nan"))), (5, torch.tensor(2.0))):
            sink.begin_step(step, flush=False)
            write_summary("mixed", value)
            write_summary("fine", torch.tensor(float(step)))
    record = sink.flush()
    assert record.nonfinite == {"mixed": 2} and record.scalars["fine"] == 3.0


def test_kind_inference_and_explicit_kinds():
    sink = SummarySink()
    with sink.activate():
        sink.begin_step(1, flush=True)
        write_summary("scalar_tensor", torch.tensor([2.0]))
        write_summary("bool", True)
        write_summary("hist", torch.randn(10, 5))
        write_summary("chw", torch.rand(3, 8, 8))
        write_summary("hwc", torch.rand(8, 8, 1))
        write_summary("gray", torch.rand(8, 8), kind="image")
        write_summary("batch", torch.rand(2, 3, 8, 8), kind="image")
        write_summary("forced_hist", torch.rand(3, 8, 8), kind="histogram")
        write_summary("note", "hello")
        write_summary("np", __import__("numpy").arange(6.0))
        write_summary("short_hwc", torch.rand(4, 6, 3), dataformats="HWC")
    record = sink.flush()
    assert record.scalars == {"scalar_tensor": 2.0, "bool": 1.0}
    kinds = {tag: (kind, value[1] if kind == "image" else None)
             for kind, tag, value, _ in record.others}
    assert kinds == {
        "hist": ("histogram", None), "chw": ("image", "CHW"), "hwc": ("image", "HWC"),
        "gray": ("image", "HW"), "batch": ("image", "NCHW"),
        "forced_hist": ("histogram", None), "note": ("text", None), "np": ("histogram", None),
        "short_hwc": ("image", "HWC"),
    }
    with sink.activate(), pytest.raises(ValueError, match="dataformats='CHW' does not fit"):
        write_summary("bad", torch.rand(2, 4, 6, 3), dataformats="CHW")


def test_costly_kinds_are_only_kept_on_summary_steps():
    sink = SummarySink()
    with sink.activate():
        sink.begin_step(1, flush=False)
        write_summary("h", torch.randn(5))
        write_summary("t", "text")
        assert not is_summary_step()
        sink.begin_step(2, flush=True)
        assert is_summary_step()
        write_summary("h", torch.ones(5))
    record = sink.flush()
    assert [(kind, tag, step) for kind, tag, _, step in record.others] == [("histogram", "h", 2)]


def test_stored_values_do_not_follow_later_in_place_changes():
    sink = SummarySink()
    weights = torch.zeros(4)
    with sink.activate():
        sink.begin_step(1, flush=True)
        write_summary("w", weights)
        weights += 5
    (_, _, stored, _), = sink.flush().others
    assert torch.equal(stored, torch.zeros(4))


@pytest.mark.parametrize(
    ("value", "kind", "error", "message"),
    [
        (torch.ones(2), "bogus", ValueError, "unknown kind 'bogus'"),
        (torch.ones(2, 2), "scalar", ValueError, r"one-element tensor, got shape \(2, 2\)"),
        ("text", "scalar", TypeError, "needs a number or a one-element tensor, got str"),
        (torch.ones(5, 7), "image", ValueError, r"cannot read shape \(5, 7\)|shape \(5, 7\)"),
        (torch.ones(2, 5, 7), "image", ValueError, r"cannot read shape \(2, 5, 7\) as an image"),
        (torch.ones(0), "histogram", ValueError, "the tensor is empty"),
        (object(), None, TypeError, "cannot log a object"),
    ],
)
def test_bad_summaries_name_the_tag(value, kind, error, message):
    sink = SummarySink()
    with sink.activate(), summary_scope("s"):
        sink.begin_step(1, flush=True)
        if kind == "image" and value.ndim == 2:
            write_summary("img", value, kind=kind)  # 2-d is a valid grayscale image
            return
        with pytest.raises(error, match=message):
            write_summary("img", value, kind=kind)
    with pytest.raises(error, match="'s/img'"), sink.activate(), summary_scope("s"):
        write_summary("img", value, kind=kind)


class Deep(Model):
    """Summaries from a sub-module, a helper function and a thread with a copied context."""

    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.flags: list[bool] = []

    def forward(self, batch):
        x, y = batch
        self.flags.append(is_summary_step())
        return {"ce": _helper_loss(self.inner(x), y)}


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 4)

    def forward(self, x):
        with summary_scope("inner"):
            write_summary("calls", 1.0)
        return self.lin(x)


def _helper_loss(logits, y):
    write_summary("helper/logit_max", logits.detach().max())
    return F.cross_entropy(logits, y)


def test_summaries_from_any_depth_reach_the_run(quiet):
    model = Deep()
    Trainer(model, make_batches(7), log_every=3, **quiet).fit()
    lines = read_metrics(quiet["log_dir"])
    assert [line["step"] for line in lines] == [3, 6, 7]
    assert all(line["inner/calls"] == 1.0 and "helper/logit_max" in line for line in lines)
    assert model.flags == [False, False, True, False, False, True, True]  # last step too


def test_write_summary_from_another_thread_needs_a_copied_context():
    import contextvars

    sink = SummarySink()
    with sink.activate():
        ctx = contextvars.copy_context()
        plain = threading.Thread(target=write_summary, args=("plain", 1.0))
        copied = threading.Thread(target=ctx.run, args=(write_summary, "copied", 1.0))
        for thread in (plain, copied):
            thread.start()
            thread.join()
    assert set(sink.flush().scalars) == {"copied"}


@pytest.mark.parametrize("now", [True, False], ids=["read-now", "kept"])
def test_parameters_and_updated_buffers_are_logged_by_value(now):
    sink = SummarySink(read_cpu_now=now)
    scale = torch.nn.Parameter(torch.tensor(1.0))
    bias = torch.nn.Parameter(torch.tensor([1.0, 5.0]))
    counter = torch.zeros(())
    counter += 1  # now at version 1: treated as state that changes in place
    with sink.activate():
        for step in range(1, 4):
            sink.begin_step(step, flush=False)
            write_summary("scale", scale)
            write_summary("bias0", bias[0])  # a view of a parameter
            write_summary("counter", counter)
            with torch.no_grad():
                scale.mul_(2)
                bias.mul_(2)
            counter += 1
    assert sink.flush().scalars == {"scale": (1 + 2 + 4) / 3, "bias0": (1 + 2 + 4) / 3,
                                    "counter": (1 + 2 + 3) / 3}


@pytest.mark.parametrize("now", [True, False], ids=["read-now", "kept"])
def test_stored_scalars_hold_no_graph_and_inference_tensors_are_accepted(now):
    sink = SummarySink(read_cpu_now=now)
    weight = torch.nn.Parameter(torch.tensor(3.0))
    with sink.activate():
        sink.begin_step(1, flush=False)
        write_summary("grad_path", weight * 2)  # requires grad, not a leaf
        with torch.inference_mode():
            write_summary("inference", torch.tensor(5.0) + 1)  # no version counter
    if now:  # read at once: nothing kept
        assert sink._values == []
    else:
        stored = sink._values[0]
        assert not stored.requires_grad and stored.grad_fn is None
    assert sink.flush().scalars == {"grad_path": 6.0, "inference": 6.0}


def test_numpy_scalars_are_scalars():
    import numpy as np

    sink = SummarySink()
    with sink.activate():
        write_summary("a", np.array(2.0))
        write_summary("b", np.float32(3.0))
        write_summary("c", np.array([4.0]), kind="scalar")
    assert sink.flush().scalars == {"a": 2.0, "b": 3.0, "c": 4.0}


def test_predict_in_a_hook_during_fit_writes_nothing_into_the_training_window(batches, quiet):
    class PredictEveryStep(Hook):
        def after_step(self, trainer):
            trainer.model.predict(batches[0])

    Trainer(ValLossClassifier(), batches, log_every=3, callbacks=[PredictEveryStep()],
            **quiet).fit()
    records = read_metrics(quiet["log_dir"])
    assert records and all("val_loss" not in r and "loss/ce" in r for r in records)


def test_begin_step_decides_and_request_flush_adds_to_it():
    sink = SummarySink()
    with sink.activate():
        sink.begin_step(1, flush=False)
        assert not sink.flush_due and not is_summary_step()
        write_summary("hist", torch.arange(10.0))  # dropped: not a summary step
        sink.request_flush()
        assert sink.flush_due and is_summary_step()
        write_summary("hist", torch.arange(10.0))  # kept from now on
        sink.begin_step(2, flush=False)
        assert not sink.flush_due  # a request lasts for its own step only
    record = sink.flush()
    assert [(kind, tag, step) for kind, tag, _, step in record.others] == [("histogram",
                                                                            "hist", 1)]


def test_flush_due_is_read_only():
    with pytest.raises(AttributeError):
        SummarySink().flush_due = True


def test_an_evaluation_in_a_hook_flushes_its_own_step(quiet):
    """`evaluate` in the middle of a window asks for a flush at that step, so its
    eval/ scalars are written with the step they belong to."""

    class EvaluateAt3(Hook):
        def after_step(self, trainer):
            if trainer.state.step == 3:
                trainer.evaluate(make_batches(1), [Accuracy()])

    Trainer(TinyClassifier(), make_batches(8), log_every=4, callbacks=[EvaluateAt3()],
            **quiet).fit()
    lines = read_metrics(quiet["log_dir"])
    assert [line["step"] for line in lines] == [3, 4, 8]
    assert ["eval/accuracy" in line for line in lines] == [True, False, False]
    assert "loss/ce" in lines[0]  # the window up to step 3 went out with it


class Varied(Model):
    """Writes every kind of CPU scalar: a graph's tensor, a parameter, a buffer updated
    in place, an integer tensor, a Mean of tensors, a number, and an Inf at step 5."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 4)
        self.register_buffer("seen", torch.zeros(()))
        self.calls = 0

    def forward(self, batch):
        x, y = batch
        logits = self.lin(x)
        self.calls += 1
        self.seen += len(x)
        write_summary("logits/max", logits.max())  # requires grad
        write_summary("weight", self.lin.bias[0])
        write_summary("seen", self.seen)
        write_summary("labels", y.sum())  # int64
        write_summary("right", Mean((logits.argmax(-1) == y).sum(), torch.tensor(len(y))))
        write_summary("calls", self.calls)
        write_summary("odd", torch.tensor(math.inf if self.calls == 5 else 1.0))
        return {"ce": F.cross_entropy(logits, y)}


def test_cpu_tensors_read_as_written_log_what_kept_ones_do(monkeypatch, fresh):
    """The sink reads a CPU tensor when it is written; the device path keeps it until
    the flush. Both give the same numbers, counts and first non-finite steps."""
    runs = []
    for now in (True, False):
        monkeypatch.setattr(summary, "READ_CPU_NOW", now)
        options = fresh()
        torch.manual_seed(0)
        trainer = Trainer(Varied(), make_batches(7), log_every=3, **options)
        trainer.fit()
        assert trainer.sink._read_cpu_now is now
        lines = [{k: v for k, v in line.items() if k != "time" and not k.startswith("perf/")}
                 for line in read_metrics(options["log_dir"])]
        runs.append((lines, trainer.last_summary.nonfinite))
    assert runs[0] == runs[1]
    lines, _ = runs[0]
    assert [line["step"] for line in lines] == [3, 6, 7]
    assert lines[1]["odd"] == "inf" and lines[0]["odd"] == 1.0
    assert lines[0]["seen"] == (8 + 16 + 24) / 3  # each step's value, not the last one's
