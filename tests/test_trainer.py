"""lossless_trainer.trainer: the loop as a whole: a hand-written loop's equal, limits, the step."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import NaNFrom, TinyClassifier, make_batches, read_metrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Hook, Model, NonFiniteLossError, Trainer
from lossless_trainer.checkpoint import checkpoint_path, load_checkpoint
from lossless_trainer.schedules import WarmupCosine


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


def test_training_step_makes_no_per_step_sync(fresh, syncs):
    """Only the flush converts tensors to numbers: one tolist() per flush, nothing per step."""
    calls = syncs
    sgd = functools.partial(torch.optim.SGD, lr=0.1)  # AdamW reads its CPU step counter
    # keep_last=0: the end-of-training checkpoint syncs once (it checks the weights)
    Trainer(TinyClassifier(), make_batches(30), optimizer=sgd, log_every=10, keep_last=0,
            **fresh()).fit()
    assert calls == {"item": 0, "bool": 0, "float": 0, "tolist": 3}

    calls.update(dict.fromkeys(calls, 0))
    Trainer(TinyClassifier(), make_batches(30), optimizer=sgd, log_every=10, keep_last=0,
            finite_check="step", **fresh()).fit()
    assert calls["bool"] == 30  # strict mode: exactly one check per step


def test_strict_mode_stops_before_the_optimizer_steps(quiet):
    model = NaNFrom(3)
    snapshots = []

    class Keep(Hook):
        def after_step(self, trainer):
            snapshots.append([p.detach().clone() for p in trainer.model.parameters()])

    with pytest.raises(NonFiniteLossError, match=r"at step 3: 'aux'.*did not step") as info:
        Trainer(model, make_batches(6), finite_check="step", callbacks=[Keep()], **quiet).fit()
    assert info.value.first_steps == {"aux": 3}
    assert len(snapshots) == 2
    assert all(torch.equal(a, b) for a, b in zip(snapshots[-1], model.parameters()))


# --------------------------------------------------------------------------- accumulation,
# clipping, schedules


class Regressor(Model):
    """Mean squared error, so accumulated micro-batches equal one large batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, batch):
        x, y = batch
        return {"mse": F.mse_loss(self.net(x).squeeze(-1), y)}


def regression_data(n_batches: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n_batches * batch, 8, generator=g)
    y = x.sum(-1)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


def test_accumulating_4_batches_of_8_equals_batches_of_32(fresh):
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    torch.manual_seed(0)
    small = Regressor()
    large = Regressor()
    large.load_state_dict(small.state_dict())
    Trainer(small, regression_data(24, 8), optimizer=sgd, grad_accum_steps=4,
            **fresh()).fit()
    state = Trainer(large, regression_data(6, 32), optimizer=sgd, **fresh()).fit()
    assert state.step == 6
    for a, b in zip(small.parameters(), large.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accumulation_counts_optimizer_steps_and_logs_micro_batch_means(fresh):
    seen: list[int] = []

    class Steps(Hook):
        def after_step(self, trainer):
            seen.append(len(trainer.micro_batches))

    kwargs = fresh()
    state = Trainer(Regressor(), regression_data(10, 4), grad_accum_steps=3, log_every=2,
                    callbacks=[Steps()], **kwargs).fit()
    # 10 batches: three steps of 3 and the epoch's leftover as a step of 1
    assert (state.step, state.batch_in_epoch, seen) == (4, 0, [3, 3, 3, 1])
    assert Trainer(Regressor(), regression_data(10, 4), grad_accum_steps=3, max_epochs=2,
                   **fresh()).total_steps == 8
    lines = read_metrics(kwargs["log_dir"])
    assert [line["step"] for line in lines] == [2, 4]
    assert lines[0]["perf/samples_per_sec"] > 0
    assert lines[0]["loss/total"] == pytest.approx(lines[0]["loss/mse"])


def test_samples_per_sec_counts_what_the_batch_size_option_says(fresh):
    def samples_per_step(**options) -> list[float | None]:
        """samples_per_sec over steps_per_sec of each flush: samples per step, exactly."""
        kwargs = fresh()
        Trainer(Regressor(), regression_data(8, 4), log_every=4, **options, **kwargs).fit()
        return [line["perf/samples_per_sec"] / line["perf/steps_per_sec"]
                if "perf/samples_per_sec" in line else None
                for line in read_metrics(kwargs["log_dir"])]

    assert samples_per_step() == pytest.approx([4, 4])  # batches of 4 rows
    assert samples_per_step(batch_size=lambda batch: 10 * len(batch[0])) == pytest.approx(
        [40, 40])
    assert samples_per_step(batch_size=lambda batch: None) == [None, None]  # not logged


def test_accumulation_skips_the_sync_of_a_model_the_user_wrapped(fresh):
    """A model with its own `no_sync` (one wrapped in DDP by hand, say) is asked to skip
    the gradient sync for every micro-batch but the last of each step."""
    log: list[str] = []

    class Wrapped(Regressor):
        @contextlib.contextmanager
        def no_sync(self):
            log.append("enter")
            yield
            log.append("exit")

        def forward(self, batch):
            log.append("forward")
            return super().forward(batch)

    Trainer(Wrapped(), regression_data(7, 4), grad_accum_steps=3, **fresh()).fit()
    one_step = ["enter", "forward", "exit"] * 2 + ["forward"]
    assert log == one_step * 2 + ["forward"]  # the epoch's leftover: a step of one


def test_clipping_by_norm_and_value_and_the_logged_norm(fresh, monkeypatch):
    """The optimizer sees clipped gradients; the logged norm is the one before clipping."""
    norms: list[float] = []
    largest: list[float] = []
    original = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))))
        largest.append(max(float(g.abs().max()) for g in grads))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    sgd = functools.partial(torch.optim.SGD, lr=1.0)
    kwargs = fresh()
    Trainer(TinyClassifier(), make_batches(4), optimizer=sgd, clip_grad_norm=0.01, log_every=4,
            **kwargs).fit()
    assert max(norms) <= 0.01 + 1e-6
    assert read_metrics(kwargs["log_dir"])[-1]["grad_norm"] > 0.01

    kwargs = fresh()
    Trainer(TinyClassifier(), make_batches(4), optimizer=sgd, clip_grad_value=1e-4,
            log_every=4, **kwargs).fit()
    assert max(largest[4:]) <= 1e-4 + 1e-9
    assert read_metrics(kwargs["log_dir"])[-1]["grad_norm"] > 1e-4


def test_lr_schedule_steps_per_optimizer_step_and_is_logged_and_resumed(fresh):
    kwargs = fresh()
    trainer = Trainer(TinyClassifier(), make_batches(12), grad_accum_steps=2, log_every=2,
                      optimizer=functools.partial(torch.optim.SGD, lr=1.0),
                      lr_scheduler=lambda opt: WarmupCosine(opt, warmup_steps=2, total_steps=6),
                      checkpoint_every=3, **kwargs)
    trainer.fit()
    lines = read_metrics(kwargs["log_dir"])
    schedule = WarmupCosine(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 2, 6)
    expected = [schedule.factor(step) for step in (2, 4, 6)]
    assert [line["lr"] for line in lines] == pytest.approx(expected)
    state = load_checkpoint(checkpoint_path(kwargs["log_dir"] + "/checkpoints", 6))
    assert state["lr_scheduler"]["last_epoch"] == 6

    again = Trainer(TinyClassifier(), make_batches(12), grad_accum_steps=2,
                    optimizer=functools.partial(torch.optim.SGD, lr=1.0),
                    lr_scheduler=lambda opt: WarmupCosine(opt, 2, 6), max_steps=6,
                    log_dir=kwargs["log_dir"], progress=False)
    again.fit()  # resumes from the final checkpoint: nothing to do, schedule restored
    assert again.lr_scheduler.last_epoch == 6
