"""lossless_trainer.precision: bf16 autocast, fp16 and its GradScaler, unscaled gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyClassifier, make_batches, read_metrics

from lossless_trainer import Hook, Trainer
from lossless_trainer.checkpoint import checkpoint_path, load_checkpoint


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
