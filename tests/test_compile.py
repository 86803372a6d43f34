"""torch.compile: a compiled model trains, and write_summary inside it still logs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import make_batches
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lossless_trainer import Model, Trainer, summary_scope, write_summary


class Compiled(Model):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, batch):
        x, y = batch
        h = F.relu(self.body(x))
        with summary_scope("body"):
            write_summary("active", (h > 0).float().mean())  # a graph break, run eagerly
        return {"ce": F.cross_entropy(self.head(h), y)}


def test_compiled_model_trains_and_its_summaries_reach_tensorboard(quiet):
    torch.manual_seed(0)
    model = Compiled()
    before = model.head.weight.detach().clone()
    trainer = Trainer(model, make_batches(6), compile=True, log_every=3,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.5), **quiet)
    trainer.fit()
    assert not torch.equal(before, model.head.weight)
    assert list(model.state_dict()) == ["body.weight", "body.bias", "head.weight", "head.bias"]
    events = EventAccumulator(quiet["log_dir"], size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("body/active")] == [3, 6]
    assert [e.step for e in events.Scalars("loss/ce")] == [3, 6]
    assert 0 < events.Scalars("body/active")[0].value <= 1
