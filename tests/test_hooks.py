"""lossless_trainer.hooks: hook points, their order and teardown, and the built-in hooks."""

from __future__ import annotations

import os
import re

import pytest
import torch
from conftest import (
    NaNFrom,
    Returns,
    TinyClassifier,
    ValLossClassifier,
    make_batches,
    read_metrics,
    train,
)

from lossless_trainer import Accuracy, Hook, NonFiniteLossError, Trainer, hooks
from lossless_trainer.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint

# --------------------------------------------------------------------------- Hook, HookList


class Recorder(Hook):
    def __init__(self, log, name="rec", priority=50):
        self.log, self.name, self.priority = log, name, priority

    def before_train(self, trainer):
        self.log.append((self.name, "before_train"))

    def before_epoch(self, trainer):
        self.log.append((self.name, "before_epoch", trainer.state.epoch))

    def before_step(self, trainer):
        self.log.append((self.name, "before_step", trainer.state.step))

    def after_backward(self, trainer):
        self.log.append((self.name, "after_backward", trainer.state.step))

    def after_step(self, trainer):
        self.log.append((self.name, "after_step", trainer.state.step))

    def after_epoch(self, trainer):
        self.log.append((self.name, "after_epoch", trainer.state.epoch))

    def after_train(self, trainer):
        self.log.append((self.name, "after_train"))

    def on_exception(self, trainer, exc):
        self.log.append((self.name, "on_exception", type(exc).__name__))


def test_hook_points_run_in_order(quiet):
    log: list = []
    Trainer(TinyClassifier(), make_batches(2), max_epochs=2, callbacks=[Recorder(log)],
            **quiet).fit()
    one_step = [("before_step",), ("after_backward",), ("after_step",)]
    expected = [("before_train",)]
    for epoch in range(2):
        expected.append(("before_epoch", epoch))
        for i in range(2):
            done = 2 * epoch + i
            expected += [(p[0], done + (p[0] == "after_step")) for p in one_step]
        expected.append(("after_epoch", epoch + 1))
    expected.append(("after_train",))
    assert [entry[1:] for entry in log] == expected


def test_hooks_run_by_priority_then_order(quiet):
    log: list = []
    hooks = [Recorder(log, "late", priority=60), Recorder(log, "a"), Recorder(log, "b"),
             Recorder(log, "early", priority=10)]
    Trainer(TinyClassifier(), make_batches(1), callbacks=hooks, **quiet).fit()
    assert [e[0] for e in log if e[1] == "before_train"] == ["early", "a", "b", "late"]


def test_hook_can_request_stop(quiet, batches):
    class StopAt3(Hook):
        def after_step(self, trainer):
            if trainer.state.step == 3:
                trainer.request_stop("enough")

    state = Trainer(TinyClassifier(), batches, max_epochs=5, callbacks=[StopAt3()], **quiet).fit()
    assert (state.step, state.stop_reason) == (3, "enough")


def test_after_backward_sees_gradients_before_the_update(quiet):
    seen = []

    class Check(Hook):
        def after_backward(self, trainer):
            weight = trainer.model.head.weight
            seen.append((weight.grad is not None, weight.detach().clone()))

    model = TinyClassifier()
    start = model.head.weight.detach().clone()
    Trainer(model, make_batches(1), callbacks=[Check()], **quiet).fit()
    assert seen[0][0] and torch.equal(seen[0][1], start)
    assert not torch.equal(model.head.weight, start)


def test_failing_teardown_hook_does_not_stop_the_others(quiet, batches):
    log: list = []

    class Broken(Hook):
        def after_train(self, trainer):
            raise RuntimeError("teardown broke")

    with pytest.raises(RuntimeError, match="teardown broke"):
        Trainer(TinyClassifier(), batches, callbacks=[Broken(), Recorder(log)], **quiet).fit()
    assert log[-1] == ("rec", "after_train")
    # the logging hook's teardown ran too: the last window was flushed and written
    assert read_metrics(quiet["log_dir"])[-1]["step"] == 6


def test_exception_reaches_on_exception_then_after_train(quiet, batches):
    log: list = []

    class Exploding(TinyClassifier):
        def forward(self, batch):
            if len(log) > 8:
                raise KeyError("boom")
            return super().forward(batch)

    with pytest.raises(KeyError, match="boom"):
        Trainer(Exploding(), batches, callbacks=[Recorder(log)], **quiet).fit()
    assert log[-2:] == [("rec", "on_exception", "KeyError"), ("rec", "after_train")]


def test_callbacks_must_be_hooks(quiet, batches):
    with pytest.raises(TypeError, match="callbacks must be Hook instances; got function"):
        Trainer(TinyClassifier(), batches, callbacks=[lambda t: None], **quiet)


class Counter(Hook):
    def __init__(self) -> None:
        self.count = 0

    def after_step(self, trainer):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_hook_state_round_trips_for_two_hooks_of_one_class(tmp_path):
    first, second = Counter(), Counter()
    first.count = 100
    train(tmp_path, max_steps=6, callbacks=[first, second])
    state = load_checkpoint(checkpoint_path(str(tmp_path / "checkpoints"), 6))
    assert state["hooks"]["Counter"] == {"count": 106}
    assert state["hooks"]["Counter#2"] == {"count": 6}
    again = [Counter(), Counter()]
    train(tmp_path, max_steps=8, callbacks=again)
    assert [h.count for h in again] == [108, 8]


# --------------------------------------------------------------------------- LoggingHook


def test_loss_total_is_the_window_mean_of_step_totals_with_optional_losses(quiet):
    """loss/total is derived at flush from per-key sums; an optional key must not skew it."""
    totals: list[float] = []

    def aux_on_odd_steps(model, loss):
        if model.calls % 2:
            return {"ce": loss, "aux": model.lin.weight.pow(2).mean()}
        return {"ce": loss}

    class Record(Hook):
        def after_step(self, trainer):
            totals.append(trainer.total_loss.item())

    Trainer(Returns(aux_on_odd_steps), make_batches(8), log_every=4, callbacks=[Record()],
            **quiet).fit()
    lines = read_metrics(quiet["log_dir"])
    assert [line["step"] for line in lines] == [4, 8]
    for line, window in zip(lines, (totals[:4], totals[4:])):
        assert line["loss/total"] == pytest.approx(sum(window) / 4, rel=1e-6)
        assert "loss/aux" in line


def test_nonfinite_loss_raises_at_flush_naming_keys_and_first_step(quiet):
    with pytest.raises(NonFiniteLossError) as info:
        Trainer(NaNFrom(4), make_batches(12), log_every=5, **quiet).fit()
    assert info.value.first_steps == {"aux": 4}
    message = str(info.value)
    assert "'aux' first at step 4" in message and "flush of step 5" in message
    assert "'ce'" not in message
    # nothing is lost: the window with the NaN was written before raising
    lines = read_metrics(quiet["log_dir"])
    assert lines[-1]["step"] == 5 and lines[-1]["loss/aux"] == "nan"
    assert isinstance(lines[-1]["loss/ce"], float)


def test_inf_loss_is_detected_too(quiet):
    with pytest.raises(NonFiniteLossError, match="'aux' first at step 2"):
        Trainer(NaNFrom(2, value=float("inf")), make_batches(4), log_every=3, **quiet).fit()


# --------------------------------------------------------------------------- EvaluationHook,
# EarlyStopping, BestCheckpoint


def test_periodic_evaluation_lands_in_the_flush_of_its_step(quiet):
    trainer = Trainer(ValLossClassifier(), make_batches(12), eval_data=make_batches(2, seed=9),
                      eval_every=5, evaluators=[Accuracy()], log_every=4, **quiet)
    trainer.fit()
    lines = read_metrics(quiet["log_dir"])
    assert [line["step"] for line in lines] == [4, 5, 8, 10, 12]
    evaluated = [line["step"] for line in lines if "eval/accuracy" in line]
    assert evaluated == [5, 10, 12]  # every 5 steps and at the end
    assert all("eval/val_loss" in line for line in lines if line["step"] in evaluated)
    assert trainer.last_eval.keys() == {"accuracy", "val_loss"}


class Replay:
    """An evaluator that reports preset values, one per evaluation."""

    def __init__(self, values: list[float]) -> None:
        self.values = iter(values)

    def reset(self) -> None:
        pass

    def process(self, batch, predictions) -> None:
        pass

    def compute(self) -> dict[str, float]:
        return {"score": next(self.values)}


def test_early_stopping_after_patience_evaluations_without_improvement(quiet):
    from lossless_trainer import EarlyStopping

    stopper = EarlyStopping("score", mode="min", patience=2, min_delta=0.01)
    trainer = Trainer(ValLossClassifier(), make_batches(20), eval_data=make_batches(1),
                      eval_every=2, evaluators=[Replay([0.5, 0.4, 0.395, 0.46, 0.3, 0.2])],
                      callbacks=[stopper], checkpoint_every=2, **quiet)
    state = trainer.fit()
    # 0.5 and 0.4 improve; 0.395 is within min_delta, 0.46 is worse: stop at the 4th
    assert state.step == 8 and state.stop_reason.startswith("early stopping: score")
    saved = torch.load(quiet["log_dir"] + "/checkpoints/step-000000008.pt", weights_only=True)
    assert saved["hooks"]["EarlyStopping"] == {"best": 0.4, "bad_evaluations": 2}
    with pytest.raises(KeyError, match="'missing' is not among the evaluation results"):
        Trainer(ValLossClassifier(), make_batches(4), eval_data=make_batches(1), eval_every=2,
                callbacks=[EarlyStopping("missing")], log_dir=quiet["log_dir"] + "2",
                progress=False).fit()


def test_best_checkpoint_keeps_the_best_evaluation(quiet):
    from lossless_trainer import BestCheckpoint
    from lossless_trainer.checkpoint import list_checkpoints, load_checkpoint

    best = BestCheckpoint("score", mode="max")
    Trainer(ValLossClassifier(), make_batches(8), eval_data=make_batches(1), eval_every=2,
            evaluators=[Replay([0.1, 0.7, 0.3, 0.2])], callbacks=[best], checkpoint_every=2,
            keep_last=1, **quiet).fit()
    assert best.best_step == 4 and best.tracker.best == 0.7
    directory = quiet["log_dir"] + "/checkpoints"
    assert load_checkpoint(directory + "/best.pt")["trainer"]["step"] == 4
    assert [step for step, _ in list_checkpoints(directory)] == [8]  # best.pt not pruned


def test_a_run_resumed_from_best_checkpoint_logs_every_step_once(tmp_path):
    """best.pt is saved after its step's flush (and with the logs on disk), so a run
    continued from it drops what was logged after it and writes no step twice."""
    from lossless_trainer import BestCheckpoint

    log_dir = str(tmp_path / "run")
    options = {"eval_data": make_batches(1), "eval_every": 2, "log_every": 2,
               "log_dir": log_dir, "progress": False}
    Trainer(ValLossClassifier(), make_batches(8), max_steps=6,
            evaluators=[Replay([0.1, 0.7, 0.3])],
            callbacks=[BestCheckpoint("score", mode="max")], **options).fit()
    best = load_checkpoint(os.path.join(log_dir, "checkpoints", "best.pt"))
    assert best["trainer"]["step"] == 4
    assert best["summary"]["scalars"] == {}  # saved after the flush of step 4
    Trainer(ValLossClassifier(), make_batches(8), max_steps=8, evaluators=[Replay([0.5] * 3)],
            callbacks=[BestCheckpoint("score", mode="max")],
            resume=os.path.join(log_dir, "checkpoints", "best.pt"), **options).fit()
    steps = [line["step"] for line in read_metrics(log_dir)]
    assert steps == [2, 4, 6, 8]


# --------------------------------------------------------------------------- CheckpointHook


def test_nan_weights_are_never_checkpointed(tmp_path):
    class Poison(Hook):
        def after_step(self, trainer):
            if trainer.state.step == 8:
                with torch.no_grad():
                    trainer.model.head.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError) as caught:
        train(tmp_path, callbacks=[Poison()], log_every=50)
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [6]
    # The first NaN loss (at step 9, on the poisoned weights) is what fit raises; the
    # checkpoint's refusal at step 12, its symptom, is in the note and the context.
    assert caught.value.first_steps == {"ce": 9}
    assert re.search(r"parameters became NaN or Inf by step 12 \(.*head.weight.*\); no "
                     "checkpoint is saved", caught.value.__notes__[-1])
    assert isinstance(caught.value.__context__, NonFiniteLossError)


def test_with_flush_checks_a_nan_loss_before_a_due_checkpoint_is_the_error_raised(tmp_path):
    # A NaN loss at step 37, a checkpoint due at 40 and the flush at 50: the checkpoint
    # finds NaN weights first, but the error raised names the loss and its step.
    class NanAt37(Hook):
        def before_step(self, trainer):
            if trainer.state.step + 1 == 37:
                with torch.no_grad():
                    trainer.model.head.bias.add_(float("inf"))

    with pytest.raises(NonFiniteLossError, match=r"'ce' first at step 37") as caught:
        train(tmp_path, max_steps=60, callbacks=[NanAt37()], log_every=50,
              checkpoint_every=10, finite_check="flush")
    assert caught.value.first_steps == {"ce": 37}
    assert "parameters became NaN or Inf by step 40" in caught.value.__notes__[-1]
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [10, 20, 30]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".tmp")]


# --------------------------------------------------------------------------- ProgressHook


def test_plain_lines_when_stdout_is_not_a_terminal(capsys, tmp_path):
    Trainer(TinyClassifier(), make_batches(12), log_every=4, log_dir=str(tmp_path)).fit()
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("[lossless_trainer]")]
    # the first flush prints only after the interval, the last always prints
    assert lines, "no progress line printed"
    assert re.match(r"\[lossless_trainer\] step 12/12  ce=[0-9.e-]+  total=[0-9.e-]+  "
                    r"[0-9.]+ steps/s  elapsed \d\d:\d\d$", lines[-1])


def test_no_output_with_progress_off(capsys, tmp_path):
    Trainer(TinyClassifier(), make_batches(3), log_dir=str(tmp_path), progress=False).fit()
    assert capsys.readouterr().out == ""


def test_tqdm_bar_on_a_terminal(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(hooks, "stdout_is_terminal", lambda: True)
    Trainer(TinyClassifier(), make_batches(10), log_every=5, log_dir=str(tmp_path)).fit()
    out = capsys.readouterr().out
    assert "10/10" in out and "ce=" in out and "step/s" in out
    assert "[lossless_trainer]" not in out
