"""torchmetrics metrics as evaluators (evaluation.TorchMetric), single process; the
torchrun case is in test_distributed.py."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyClassifier, make_batches

from lossless_trainer import Accuracy, Trainer
from lossless_trainer.evaluation import TorchMetric

torchmetrics = pytest.importorskip("torchmetrics")


def trained(quiet) -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(TinyClassifier(), make_batches(6), max_steps=12, **quiet)
    trainer.fit()
    return trainer


def test_a_metric_passed_as_it_is_equals_the_built_in_accuracy(quiet):
    trainer = trained(quiet)
    ours = trainer.evaluate(make_batches(3, seed=1), [Accuracy()])["accuracy"]
    theirs = trainer.evaluate(make_batches(3, seed=1), [
        torchmetrics.classification.MulticlassAccuracy(num_classes=4, average="micro")])
    assert theirs == {"multiclass_accuracy": pytest.approx(ours)}


def test_per_class_values_and_collections_become_several_scalars(quiet):
    trainer = trained(quiet)
    per_class = torchmetrics.classification.MulticlassRecall(num_classes=4, average=None)
    collection = torchmetrics.MetricCollection({
        "f1": torchmetrics.classification.MulticlassF1Score(num_classes=4),
        "acc": torchmetrics.classification.MulticlassAccuracy(num_classes=4)})
    results = trainer.evaluate(make_batches(3, seed=1),
                               [TorchMetric(per_class, name="recall"),
                                TorchMetric(collection, name="")])
    assert set(results) == {"recall/0", "recall/1", "recall/2", "recall/3", "f1", "acc"}
    assert all(0.0 <= value <= 1.0 for value in results.values())


def test_targets_and_predictions_are_selected_like_the_built_in_evaluators(quiet):
    trainer = trained(quiet)
    data = [{"x": x, "label": y} for x, y in make_batches(3, seed=1)]

    class Keyed(torch.nn.Module):  # eval mode returns a dict; the metric wants its scores
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return {"scores": self.model((batch["x"], batch["label"]))}

    trainer.model = Keyed(trainer.model)
    metric = TorchMetric(torchmetrics.classification.MulticlassAccuracy(num_classes=4),
                         targets="label", predictions="scores", name="acc")
    assert 0.0 <= trainer.evaluate(data, [metric])["acc"] <= 1.0


def test_something_that_is_neither_is_refused(quiet):
    with pytest.raises(TypeError, match="is not an evaluator: it needs reset"):
        Trainer(TinyClassifier(), make_batches(1), evaluators=[object()], **quiet)


def test_a_metric_moves_to_the_device_of_predictions_nested_in_lists_of_dicts():
    moved = []

    class Detections:  # a detection metric: predictions are a list of dicts per image
        def update(self, predictions, targets):
            self.seen = (len(predictions), len(targets))

        def compute(self):
            return {"map": torch.tensor(0.5)}

        def reset(self):
            pass

        def to(self, device):
            moved.append(device)
            return self

    metric = TorchMetric(Detections(), name="det")
    metric.reset()
    batch = ([torch.zeros(3, 4, 4)], [{"boxes": torch.zeros(1, 4), "labels": torch.ones(1)}])
    for _ in range(2):
        metric.process(batch, [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1)}])
    assert moved == [torch.device("cpu")]  # once, to the first tensor's device
    assert metric.metric.seen == (1, 1) and metric.compute() == {"det/map": 0.5}
