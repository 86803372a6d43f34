"""Recipe: a torchvision detector, trained on its own loss dict (docs/bring-your-model.md)."""

import torch
from torch.utils.data import DataLoader
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

from lossless_trainer import Trainer
from lossless_trainer.adapters import Torchvision

# Any torchvision detector (Faster/Mask R-CNN, RetinaNet, FCOS, SSD, keypoint R-CNN);
# weights=None: nothing is downloaded.
detector = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None,
                                                 num_classes=2)
model = Torchvision(detector)


def sample(i):  # an image with one bright square, and its target
    g = torch.Generator().manual_seed(i)
    x, y = torch.randint(0, 96, (2,), generator=g).tolist()
    image = torch.rand(3, 160, 160, generator=g) * 0.2
    image[:, y:y + 64, x:x + 64] += 0.8
    return image, {"boxes": torch.tensor([[x, y, x + 64, y + 64]], dtype=torch.float32),
                   "labels": torch.tensor([1])}


# Batches are (images, targets): a tuple of CHW tensors and a tuple of target dicts.
loader = DataLoader([sample(i) for i in range(16)], batch_size=4, shuffle=True,
                    collate_fn=lambda batch: tuple(zip(*batch)))
trainer = Trainer(model, loader, max_steps=8, log_every=4, log_dir="runs/torchvision_detection",
                  optimizer=lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9))
trainer.fit()

images = [sample(100)[0], sample(101)[0]]
detections = model.predict(images)  # eval mode: model(images), a list of dicts per image
print(f"losses {sorted(trainer.losses)}; detections for {len(detections)} images: "
      f"{sorted(detections[0])}")
