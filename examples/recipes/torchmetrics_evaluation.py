"""Recipe: torchmetrics metrics as evaluators (docs/bring-your-model.md)."""

import torch
import torch.nn.functional as F
import torchmetrics
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Model, Trainer
from lossless_trainer.evaluation import TorchMetric


class Classifier(Model):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, batch):
        images, labels = batch
        logits = self.net(images)
        if not self.training:
            return {"logits": logits}  # eval mode: the predictions, here a dict
        return {"ce": F.cross_entropy(logits, labels)}


digits = load_digits()  # bundled with scikit-learn: 1,797 8x8 images of digits
x = torch.tensor(digits.data, dtype=torch.float32) / 16
y = torch.tensor(digits.target)
train = DataLoader(TensorDataset(x[:1500], y[:1500]), batch_size=32, shuffle=True)
heldout = DataLoader(TensorDataset(x[1500:], y[1500:]), batch_size=100)

trainer = Trainer(Classifier(), train, max_epochs=3, eval_data=heldout, log_every=20,
                  log_dir="runs/torchmetrics_evaluation", evaluators=[
    # Targets are batch[1] unless targets= says otherwise; predictions= picks the logits.
    TorchMetric(torchmetrics.classification.MulticlassAccuracy(num_classes=10),
                predictions="logits"),
    TorchMetric(torchmetrics.classification.MulticlassF1Score(num_classes=10, average=None),
                predictions="logits", name="f1"),
])
trainer.fit()
print({key: round(value, 3) for key, value in trainer.last_eval.items()})
