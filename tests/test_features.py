"""Mixed precision, gradient accumulation, clipping and LR schedules: all through the one
training step."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyClassifier, make_batches, read_metrics
from torch import nn

from lossless_trainer import Hook, Model, Trainer
from lossless_trainer.checkpoint import checkpoint_path, load_checkpoint
from lossless_trainer.schedules import WarmupCosine


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


def test_bf16_autocasts_the_forward_and_its_loss_on_cpu(fresh):
    dtypes: list[torch.dtype] = []

    class Probe(TinyClassifier):
        def forward(self, batch):
            x, y = batch
            logits = self.head(self.body(x))
            dtypes.append(logits.dtype)
            return {"ce": F.cross_entropy(logits, y)}

    torch.manual_seed(0)
    model = Probe()
    before = model.head.weight.detach().clone()
    Trainer(model, make_batches(20, batch=32), precision="bf16", max_epochs=3,
            **fresh()).fit()
    assert set(dtypes) == {torch.bfloat16}
    assert model.head.weight.dtype == torch.float32  # weights stay in full precision
    assert not torch.equal(before, model.head.weight)


def test_fp16_uses_a_grad_scaler_counts_skipped_steps_and_checkpoints_it(fresh):
    class Overflow(TinyClassifier):
        calls = 0

        def forward(self, batch):
            losses = super().forward(batch)
            Overflow.calls += 1
            if Overflow.calls == 2:  # an inf gradient: the scaler must skip this step
                losses["ce"] = losses["ce"] * torch.tensor(float("inf"))
            return losses

    kwargs = fresh()
    trainer = Trainer(Overflow(), make_batches(4), precision="fp16", log_every=4,
                      finite_check="flush", **kwargs)
    with pytest.raises(Exception, match="non-finite loss"):
        trainer.fit()
    assert int(trainer.precision.skipped_steps) == 1
    assert read_metrics(kwargs["log_dir"])[-1]["amp/skipped_steps"] == 1

    kwargs = fresh()
    trainer = Trainer(TinyClassifier(), make_batches(3), precision="fp16", **kwargs)
    trainer.fit()
    state = load_checkpoint(checkpoint_path(kwargs["log_dir"] + "/checkpoints", 3))
    assert state["precision"]["scaler"]["scale"] == trainer.precision.scaler.get_scale()


def test_hooks_see_unscaled_gradients_under_fp16(fresh):
    norms: dict[str, float] = {}

    class Grad(Hook):
        def after_backward(self, trainer):
            norms[trainer.precision.mode] = float(trainer.model.head.weight.grad.norm())

    for precision in ("32", "fp16"):
        torch.manual_seed(0)
        Trainer(TinyClassifier(), make_batches(1), precision=precision, callbacks=[Grad()],
                **fresh()).fit()
    assert norms["fp16"] == pytest.approx(norms["32"], rel=1e-2)  # not 65536 times larger


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


def test_warmup_cosine_shape():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = WarmupCosine(opt, warmup_steps=3, total_steps=13, min_lr_ratio=0.1)
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs[8] == pytest.approx(0.2 + 1.8 * 0.5)  # half way down the cosine
    assert lrs[13:] == pytest.approx([0.2, 0.2])
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        WarmupCosine(opt, 5, 5)


def test_bad_feature_options():
    model, data = TinyClassifier(), make_batches(1)
    with pytest.raises(ValueError, match="precision must be one of 32, bf16, fp16, got 'fp8'"):
        Trainer(model, data, precision="fp8")
    with pytest.raises(ValueError, match="grad_accum_steps must be a positive int"):
        Trainer(model, data, grad_accum_steps=0)
    with pytest.raises(ValueError, match="clip_grad_norm must be a positive number"):
        Trainer(model, data, clip_grad_norm=-1)
    other = torch.optim.SGD(TinyClassifier().parameters(), lr=1)
    with pytest.raises(ValueError, match="schedules a different optimizer"):
        Trainer(model, data, lr_scheduler=torch.optim.lr_scheduler.StepLR(other, 1))
