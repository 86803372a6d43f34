"""The fit loop: equivalence to a hand-written loop, limits, defaults, data, hooks."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple

import pytest
import torch
from conftest import TinyClassifier, make_batches, read_metrics
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Hook, Model, Trainer
from lossless_trainer.data import batch_size, move_to_device


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_matches_hand_written_loop_exactly(quiet):
    """Same seed, data, model and optimizer: 30 steps give bit-identical weights."""
    g = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(80, 16, generator=g),
                            torch.randint(0, 4, (80,), generator=g))

    def build():
        torch.manual_seed(0)
        model = TinyClassifier(dropout=0.2)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    # Hand-written reference: 10 batches per epoch, 3 shuffled epochs, dropout on.
    ref_model, ref_opt = build()
    torch.manual_seed(123)
    ref_model.train()
    for _ in range(3):
        for batch in ref_loader(dataset):
            loss = sum(ref_model(batch).values())
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)

    model, opt = build()
    state = Trainer(model, ref_loader(dataset), optimizer=opt, max_steps=30, seed=123,
                    log_every=7, **quiet).fit()

    assert state.step == 30
    for mine, ref in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(mine, ref)
    for mine, ref in zip(opt.state.values(), ref_opt.state.values()):
        assert all(torch.equal(mine[k], ref[k]) for k in ref)


def ref_loader(dataset):
    return DataLoader(dataset, batch_size=8, shuffle=True)


@pytest.mark.parametrize(
    ("max_steps", "max_epochs", "steps", "epochs", "reason"),
    [
        (None, None, 6, 1, "max_epochs"),  # neither: one epoch
        (14, None, 14, 2, "max_steps"),  # max_steps alone: as many epochs as needed
        (None, 3, 18, 3, "max_epochs"),
        (10, 3, 10, 1, "max_steps"),  # both: whichever comes first
        (100, 2, 12, 2, "max_epochs"),
    ],
)
def test_step_and_epoch_limits(quiet, batches, max_steps, max_epochs, steps, epochs, reason):
    state = Trainer(TinyClassifier(), batches, max_steps=max_steps, max_epochs=max_epochs,
                    **quiet).fit()
    assert (state.step, state.epoch, state.stop_reason) == (steps, epochs, reason)


def test_generator_with_several_epochs_is_an_error_before_training(quiet):
    model = TinyClassifier()
    before = _params(model)
    gen = iter(make_batches(4))
    with pytest.raises(ValueError, match="one-shot iterator.*max_epochs=2"):
        Trainer(model, gen, max_epochs=2, **quiet)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(list(gen)) == 4  # nothing was consumed
    assert not os.path.exists(quiet["log_dir"])


def test_generator_is_consumed_until_exhausted(fresh):
    def gen():
        yield from make_batches(7)

    state = Trainer(TinyClassifier(), gen(), **fresh()).fit()
    assert (state.step, state.stop_reason) == (7, "data_exhausted")

    with pytest.warns(UserWarning, match="exhausted after 7 steps, before max_steps=100"):
        state = Trainer(TinyClassifier(), gen(), max_steps=100, **fresh()).fit()
    assert state.step == 7

    state = Trainer(TinyClassifier(), gen(), max_steps=3, **fresh()).fit()
    assert (state.step, state.stop_reason) == (3, "max_steps")


def test_empty_data_is_a_clear_error(quiet):
    with pytest.raises(ValueError, match="no batches in epoch 0"):
        Trainer(TinyClassifier(), [], **quiet).fit()


def test_defaults_adamw_cpu_and_fresh_run_dir(tmp_path, monkeypatch, batches):
    monkeypatch.chdir(tmp_path)
    first = Trainer(TinyClassifier(), batches, progress=False)
    second = Trainer(TinyClassifier(), batches, progress=False)
    assert isinstance(first.optimizer, torch.optim.AdamW)
    assert first.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    first.fit()
    second.fit()
    assert os.path.dirname(first.log_dir) == "runs" and first.log_dir != second.log_dir
    for trainer in (first, second):
        files = os.listdir(trainer.log_dir)
        assert "metrics.jsonl" in files
        assert any(f.startswith("events.out.tfevents") for f in files)


def test_optimizer_factory_and_validation(quiet, batches):
    trainer = Trainer(TinyClassifier(), batches,
                      optimizer=functools.partial(torch.optim.SGD, lr=0.1), **quiet)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.1

    other = TinyClassifier()
    with pytest.raises(ValueError, match="not parameters of TinyClassifier"):
        Trainer(TinyClassifier(), batches, optimizer=torch.optim.SGD(other.parameters(), lr=1),
                **quiet)
    with pytest.raises(TypeError, match="factory returned list"):
        Trainer(TinyClassifier(), batches, optimizer=lambda params: list(params), **quiet)
    with pytest.raises(TypeError, match="optimizer must be"):
        Trainer(TinyClassifier(), batches, optimizer="adam", **quiet)


def test_seed_makes_runs_repeatable(fresh):
    loader = DataLoader(TensorDataset(torch.randn(32, 16), torch.randint(0, 4, (32,))),
                        batch_size=8, shuffle=True)

    def run(seed):
        torch.manual_seed(0)
        model = TinyClassifier(dropout=0.5)
        Trainer(model, loader, seed=seed, max_epochs=2, **fresh()).fit()
        return _params(model)

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


class Pair(NamedTuple):
    x: torch.Tensor
    meta: str


@dataclasses.dataclass
class Sample:
    image: torch.Tensor
    boxes: list
    name: str = "s"


def test_move_to_device_recurses_and_keeps_types():
    meta = torch.device("meta")
    batch = {"a": [torch.ones(2), (torch.zeros(1), 3)], "p": Pair(torch.ones(3), "tag"),
             "s": Sample(torch.ones(1, 2, 2), [torch.ones(4)]), "n": None}
    moved = move_to_device(batch, meta)
    assert moved["a"][0].device == meta and moved["a"][1][0].device == meta
    assert isinstance(moved["a"][1], tuple) and moved["a"][1][1] == 3
    assert isinstance(moved["p"], Pair) and moved["p"].x.device == meta and moved["p"].meta == "tag"
    assert isinstance(moved["s"], Sample) and moved["s"].image.device == meta
    assert moved["s"].boxes[0].device == meta and moved["s"].name == "s"
    assert moved["n"] is None
    assert batch["a"][0].device.type == "cpu"  # the input is not modified
    same = torch.ones(2)
    assert move_to_device(same, torch.device("cpu")) is same  # no copy when already there
    assert batch_size(batch) == 2 and batch_size(Sample(torch.ones(5, 1), [])) == 5
    assert batch_size({"name": "x"}) is None


def test_batches_already_on_the_device_are_passed_as_they_are():
    cpu = torch.device("cpu")
    pair, listed = (torch.ones(2), torch.zeros(2)), [torch.ones(3), torch.zeros(3)]
    named = Pair(torch.ones(2), "tag")
    for batch in (pair, listed, named):
        assert move_to_device(batch, cpu) is batch
    moved = move_to_device(named, torch.device("meta"))
    assert isinstance(moved, Pair) and moved.x.device.type == "meta" and moved.meta == "tag"
    assert batch_size(pair) == 2 and batch_size(listed) == 3
    assert batch_size((torch.tensor(1.0), torch.ones(4))) is None  # a 0-d first tensor
    assert batch_size([{"x": torch.ones(6, 1)}]) == 6 and batch_size(()) is None


def test_batch_reaches_the_model_whole(quiet):
    seen = []

    class DictModel(Model):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def forward(self, batch):
            seen.append((type(batch), sorted(batch), batch["id"]))
            return {"mse": (self.lin(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean()}

    data = [{"x": torch.randn(4, 3), "y": torch.randn(4), "id": f"b{i}"} for i in range(3)]
    Trainer(DictModel(), data, **quiet).fit()
    assert seen == [(dict, ["id", "x", "y"], f"b{i}") for i in range(3)]


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


def test_training_step_makes_no_per_step_sync(fresh, monkeypatch):
    """Only the flush converts tensors to numbers: one tolist() per flush, nothing per step."""
    calls = {"item": 0, "bool": 0, "float": 0, "tolist": 0}
    for name, attr in [("item", "item"), ("bool", "__bool__"), ("float", "__float__"),
                       ("tolist", "tolist")]:
        original = getattr(torch.Tensor, attr)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, attr, counting)

    sgd = functools.partial(torch.optim.SGD, lr=0.1)  # AdamW reads its CPU step counter
    # keep_last=0: the end-of-training checkpoint syncs once (it checks the weights)
    Trainer(TinyClassifier(), make_batches(30), optimizer=sgd, log_every=10, keep_last=0,
            **fresh()).fit()
    assert calls == {"item": 0, "bool": 0, "float": 0, "tolist": 3}

    calls.update(dict.fromkeys(calls, 0))
    Trainer(TinyClassifier(), make_batches(30), optimizer=sgd, log_every=10, keep_last=0,
            finite_check="step", **fresh()).fit()
    assert calls["bool"] == 30  # strict mode: exactly one check per step


def test_loss_total_is_the_window_mean_of_step_totals_with_optional_losses(quiet):
    """loss/total is derived at flush from per-key sums; an optional key must not skew it."""
    totals: list[float] = []

    class Optional(TinyClassifier):
        calls = 0

        def forward(self, batch):
            losses = super().forward(batch)
            Optional.calls += 1
            if Optional.calls % 2:
                losses["aux"] = self.head.weight.pow(2).mean()
            return losses

    class Record(Hook):
        def after_step(self, trainer):
            totals.append(trainer.total_loss.item())

    Trainer(Optional(), make_batches(8), log_every=4, callbacks=[Record()], **quiet).fit()
    lines = read_metrics(quiet["log_dir"])
    assert [line["step"] for line in lines] == [4, 8]
    for line, window in zip(lines, (totals[:4], totals[4:])):
        assert line["loss/total"] == pytest.approx(sum(window) / 4, rel=1e-6)
        assert "loss/aux" in line


def test_dataloader_over_an_iterable_dataset_without_length(quiet):
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield from make_batches(5)

    state = Trainer(TinyClassifier(), DataLoader(Stream(), batch_size=None), max_steps=12,
                    **quiet).fit()
    assert (state.step, state.epoch) == (12, 2)
