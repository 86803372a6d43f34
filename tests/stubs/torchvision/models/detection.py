"""A stand-in for torchvision.models.detection, for tests only (tests/stubs/README.md).

The detector follows torchvision's detection convention and checks its inputs as
torchvision does: images are a list (or tuple) of CHW float tensors of any size; targets
a list of dicts with float ``boxes`` (N, 4) in (x1, y1, x2, y2) and int64 ``labels`` (N,);
training mode needs targets and returns a dict of losses, eval mode returns one dict of
``boxes``, ``labels`` and ``scores`` per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Detector(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.box = nn.Linear(8, 4)
        self.cls = nn.Linear(8, num_classes)

    def forward(self, images, targets=None):
        if self.training and targets is None:
            raise AssertionError("targets should not be none when in training mode")
        for image in images:
            if not (isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3):
                raise ValueError(f"images must be CHW tensors, got {type(image).__name__}")
        if targets is not None:
            for target in targets:
                boxes = target["boxes"]
                torch._assert(isinstance(boxes, torch.Tensor), "Expected target boxes to be "
                              "of type Tensor.")
                torch._assert(boxes.ndim == 2 and boxes.shape[-1] == 4,
                              f"Expected target boxes of shape [N, 4], got {boxes.shape}.")
                torch._assert(target["labels"].dtype == torch.int64, "labels must be int64")
        features = torch.stack([self.backbone(image).mean(dim=(1, 2)) for image in images])
        sizes = torch.tensor([[i.shape[2], i.shape[1]] * 2 for i in images], dtype=torch.float32)
        boxes = self.box(features).sigmoid() * sizes
        scores = self.cls(features)
        if self.training:
            first_box = torch.stack([t["boxes"][0] for t in targets])
            first_label = torch.stack([t["labels"][0] for t in targets])
            return {"loss_classifier": F.cross_entropy(scores, first_label),
                    "loss_box_reg": F.smooth_l1_loss(boxes / sizes, first_box / sizes),
                    "loss_objectness": scores.logsumexp(-1).mean() * 0.0 + 0.1,
                    "loss_rpn_box_reg": boxes.mean() * 0.0 + 0.1}
        return [{"boxes": b[None], "labels": s.argmax()[None], "scores": s.softmax(-1).max()[None]}
                for b, s in zip(boxes, scores)]


def fasterrcnn_mobilenet_v3_large_320_fpn(*, weights=None, weights_backbone=None,
                                          num_classes: int = 91, **kwargs) -> nn.Module:
    if weights is not None or weights_backbone is not None:
        raise RuntimeError("the test stand-in has no weights (and nothing may be downloaded)")
    return _Detector(num_classes)
