"""WithLoss: the separated style (net + loss function) as a special case of the contract."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batches
from torch import nn

from lossless_trainer import Model, ModelOutputError, Trainer, WithLoss


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
