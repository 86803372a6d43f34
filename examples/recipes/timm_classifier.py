"""Recipe: a timm classifier, with the loss function beside it (docs/bring-your-model.md)."""

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Trainer, WithLoss
from lossless_trainer.evaluation import Accuracy

# Any timm model; pretrained=False: nothing is downloaded.
network = timm.create_model("resnet18", pretrained=False, num_classes=4)
model = WithLoss(network, nn.CrossEntropyLoss())  # batches (images, labels) by default

# Four classes of images: which quadrant is bright.
labels = torch.arange(64) % 4
images = torch.rand(64, 3, 32, 32) * 0.5
for image, label in zip(images, labels.tolist()):
    row, col = divmod(label, 2)
    image[:, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] += 0.5
loader = DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=True)

trainer = Trainer(model, loader, max_steps=20, log_every=10, eval_data=loader, eval_every=20,
                  evaluators=[Accuracy()], log_dir="runs/timm_classifier",
                  optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
trainer.fit()
print(f"accuracy {trainer.last_eval['accuracy']:.3f}")
