"""lossless_trainer.model: the model contract (check_losses), Model and WithLoss."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import Returns, make_batches
from torch import nn

from lossless_trainer import Model, ModelOutputError, Trainer, WithLoss

# --------------------------------------------------------------------------- the contract


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


# --------------------------------------------------------------------------- Model, WithLoss


def test_default_selectors_read_inputs_targets_tuples():
    net = nn.Linear(16, 4)
    model = WithLoss(net, nn.CrossEntropyLoss())
    x, y = make_batches(1)[0]
    losses = model((x, y))
    assert list(losses) == ["loss"]
    assert torch.equal(losses["loss"], F.cross_entropy(net(x), y))
    model.eval()
    assert torch.equal(model((x, y)), net(x))
    assert torch.equal(model(x), net(x))  # eval on a bare input tensor


def test_keys_callables_and_several_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 1), nn.Linear(2, 1)

        def forward(self, image, meta):
            return (self.a(image) + self.b(meta)).squeeze(-1)

    net = TwoInputs()
    batch = {"image": torch.randn(5, 3), "meta": torch.randn(5, 2), "target": torch.randn(5)}
    model = WithLoss(net, F.mse_loss, inputs=("image", "meta"), targets=lambda b: b["target"],
                     name="mse")
    expected = F.mse_loss(net(batch["image"], batch["meta"]), batch["target"])
    assert torch.equal(model(batch)["mse"], expected)

    def dict_loss(pred, target):
        return {"mse": F.mse_loss(pred, target), "l1": F.l1_loss(pred, target)}

    assert set(WithLoss(net, dict_loss, inputs=("image", "meta"), targets="target")(batch)) == {
        "mse", "l1"}


def test_missing_parts_are_clear_errors():
    model = WithLoss(nn.Linear(3, 1), F.mse_loss)
    with pytest.raises(ModelOutputError, match="could not find the targets in a batch of type "
                                               "Tensor.*targets="):
        model(torch.randn(2, 3))
    keyed = WithLoss(nn.Linear(3, 1), F.mse_loss, inputs="x", targets="y")
    with pytest.raises(ModelOutputError, match="targets='y' not found in a batch of type dict"):
        keyed({"x": torch.randn(2, 3)})


def test_adapter_trains_exactly_like_the_same_model_written_natively(quiet, tmp_path):
    class Native(Model):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(16, 4)

        def forward(self, batch):
            x, y = batch
            return {"loss": F.cross_entropy(self.net(x), y)}

    torch.manual_seed(0)
    native = Native()
    torch.manual_seed(0)
    adapted = WithLoss(nn.Linear(16, 4), nn.CrossEntropyLoss())
    sgd = functools.partial(torch.optim.SGD, lr=0.5)
    Trainer(native, make_batches(10), optimizer=sgd, **quiet).fit()
    Trainer(adapted, make_batches(10), optimizer=sgd, log_dir=str(tmp_path / "b"),
            progress=False).fit()
    assert torch.equal(native.net.weight, adapted.net.weight)
    assert torch.equal(native.net.bias, adapted.net.bias)


def test_predict_uses_eval_mode_without_grad_and_restores_mode():
    model = WithLoss(nn.Sequential(nn.Linear(16, 4), nn.Dropout(0.9)), nn.CrossEntropyLoss())
    x, y = make_batches(1)[0]
    model.train()
    first, second = model.predict((x, y)), model.predict((x, y))
    assert torch.equal(first, second) and not first.requires_grad
    assert model.training
