"""Bad input gets an error that names the problem, the loss key and the step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyClassifier, make_batches, read_metrics
from torch import nn

from lossless_trainer import Hook, Model, ModelOutputError, NonFiniteLossError, Trainer


class Returns(Model):
    """Returns `make(self, loss)` from step `from_step` on, a valid {'ce': loss} before."""

    def __init__(self, make, from_step: int = 1) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)
        self.make, self.from_step, self.calls = make, from_step, 0

    def forward(self, batch):
        x, y = batch
        self.calls += 1
        loss = F.cross_entropy(self.lin(x), y)
        return self.make(self, loss) if self.calls >= self.from_step else {"ce": loss}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m, loss: [loss], r"Returns\(batch\) returned list at step 3 in training mode"),
        (lambda m, loss: (loss, loss), r"returned tuple at step 3"),
        (lambda m, loss: {}, r"returned an empty dict at step 3"),
        (lambda m, loss: {"ce": loss.expand(2)}, r"loss 'ce' at step 3 has shape \(2,\)"),
        (lambda m, loss: {"ce": loss, "n": torch.tensor(3)},
         r"loss 'n' at step 3 has dtype torch.int64"),
        (lambda m, loss: {"ce": loss.detach()}, r"loss 'ce' at step 3 does not require grad"),
        (lambda m, loss: {"ce": loss, "const": torch.tensor(1.0)},
         r"loss 'const' at step 3 does not require grad"),
        (lambda m, loss: {"ce": 0.5}, r"loss 'ce' at step 3 is a float, not a tensor"),
        (lambda m, loss: {1: loss}, r"loss key 1 of type int at step 3"),
        (lambda m, loss: {"ce": loss * (1 + 0j)},
         r"loss 'ce' at step 3 has dtype torch.complex64; losses must be floating point"),
    ],
)
def test_bad_training_output_names_problem_key_and_step(quiet, make, message):
    with pytest.raises(ModelOutputError, match=message):
        Trainer(Returns(make, from_step=3), make_batches(5), **quiet).fit()


def test_bare_scalar_tensor_is_accepted_as_loss(quiet):
    trainer = Trainer(Returns(lambda m, loss: loss), make_batches(2), **quiet)
    trainer.fit()
    assert list(trainer.losses) == ["loss"]


class TaggedTensor(torch.Tensor):
    """A tensor subclass, as some libraries return: the exact-type fast path does not apply."""


def test_tensor_subclass_losses_are_accepted(quiet):
    model = Returns(lambda m, loss: {"ce": loss.as_subclass(TaggedTensor)}, from_step=1)
    trainer = Trainer(model, make_batches(3), log_every=1, **quiet)
    trainer.fit()
    assert trainer.state.step == 3 and isinstance(trainer.losses["ce"], TaggedTensor)
    assert trainer.last_summary is not None and "loss/ce" in trainer.last_summary.scalars


def _nan_from(step: int, key: str = "aux", value: float = float("nan")):
    def make(model, loss):
        return {"ce": loss, key: model.lin.weight.sum() * 0 + value}
    return Returns(make, from_step=step)


def test_nonfinite_loss_raises_at_flush_naming_keys_and_first_step(quiet):
    with pytest.raises(NonFiniteLossError) as info:
        Trainer(_nan_from(4), make_batches(12), log_every=5, **quiet).fit()
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
        Trainer(_nan_from(2, value=float("inf")), make_batches(4), log_every=3, **quiet).fit()


def test_strict_mode_stops_before_the_optimizer_steps(quiet):
    model = _nan_from(3)
    snapshots = []

    class Keep(Hook):
        def after_step(self, trainer):
            snapshots.append([p.detach().clone() for p in trainer.model.parameters()])

    with pytest.raises(NonFiniteLossError, match=r"at step 3: 'aux'.*did not step") as info:
        Trainer(model, make_batches(6), finite_check="step", callbacks=[Keep()], **quiet).fit()
    assert info.value.first_steps == {"aux": 3}
    assert len(snapshots) == 2
    assert all(torch.equal(a, b) for a, b in zip(snapshots[-1], model.parameters()))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_steps": 0}, ValueError, "max_steps must be a positive int, got 0"),
        ({"max_epochs": 1.5}, ValueError, "max_epochs must be a positive int, got 1.5"),
        ({"log_every": -1}, ValueError, "log_every must be a positive int"),
        ({"finite_check": "never"}, ValueError, "finite_check must be 'flush' or 'step'"),
    ],
)
def test_bad_options(quiet, kwargs, error, message):
    with pytest.raises(error, match=message):
        Trainer(TinyClassifier(), make_batches(1), **kwargs, **quiet)


def test_bad_model_and_data(quiet):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        Trainer(lambda batch: batch, make_batches(1), **quiet)
    with pytest.raises(TypeError, match="data must be an iterable of batches.*got int"):
        Trainer(TinyClassifier(), 5, **quiet)
    frozen = TinyClassifier().requires_grad_(False)
    with pytest.raises(ValueError, match="TinyClassifier has no trainable parameters"):
        Trainer(frozen, make_batches(1), **quiet)


def test_plain_module_without_base_class_works(quiet):
    """Any nn.Module honouring the contract trains; Model only adds conveniences."""

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 4)

        def forward(self, batch):
            return {"ce": F.cross_entropy(self.lin(batch[0]), batch[1])}

    model = Plain()
    before = model.lin.weight.detach().clone()
    Trainer(model, make_batches(3), **quiet).fit()
    assert not torch.equal(before, model.lin.weight)


def test_reduce_lr_on_plateau_is_refused_with_the_hook_to_use(batches, quiet):
    model = TinyClassifier()
    with pytest.raises(TypeError, match=r"ReduceLROnPlateau steps on a metric.*from a hook"):
        Trainer(model, batches, lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau,
                **quiet)
