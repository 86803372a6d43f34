"""A stand-in for timm, for tests only (tests/stubs/README.md): `create_model` returns a
small CNN that, like timm's classifiers, maps (N, in_chans, H, W) images to (N,
num_classes) logits."""

from __future__ import annotations

from torch import nn


def create_model(name: str, pretrained: bool = False, num_classes: int = 1000,
                 in_chans: int = 3, **kwargs) -> nn.Module:
    if pretrained:
        raise RuntimeError("the test stand-in has no weights (and nothing may be downloaded)")
    return nn.Sequential(nn.Conv2d(in_chans, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
