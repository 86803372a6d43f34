"""Quickstart: a digits classifier whose model computes its own loss.

Trains an MLP on scikit-learn's bundled 8x8 digits (no download), logs to TensorBoard,
and reports held-out accuracy from eval-mode predictions.

    python examples/quickstart.py            # full run, about 10 seconds on a laptop CPU
    python examples/quickstart.py --fast     # what the test suite runs
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Model, Trainer, is_summary_step, summary_scope, write_summary


class Encoder(nn.Module):
    """A plain sub-module: it logs from inside its own forward, without any trainer handle."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Dropout(0.1),
                                    nn.Linear(width, width), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(x)
        with summary_scope("encoder"):
            write_summary("active_fraction", (h > 0).float().mean())
            if is_summary_step():  # histograms are costly: only build them when written
                write_summary("features", h.detach())
        return h


class DigitClassifier(Model):
    """Training mode: returns {"ce": loss}. Eval mode: returns class predictions."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.encoder = Encoder(width)
        self.head = nn.Linear(width, 10)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]):
        images, labels = batch
        logits = self.head(self.encoder(images))
        if not self.training:
            return logits.argmax(dim=1)
        write_summary("train_accuracy", (logits.argmax(dim=1) == labels).float().mean())
        return {"ce": F.cross_entropy(logits, labels)}


def load_data(seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y)
    return TensorDataset(x_train, y_train), (x_test, y_test)


def main(fast: bool = False, log_dir: str | None = None, progress: bool = True) -> float:
    """Train, print where the logs are, and return held-out accuracy."""
    train_set, (x_test, y_test) = load_data()
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    torch.manual_seed(0)  # the weights are drawn here, before the Trainer's seed applies
    model = DigitClassifier()
    trainer = Trainer(model, loader, max_epochs=10 if fast else 30, log_every=10, seed=0,
                      log_dir=log_dir, progress=progress)
    trainer.fit()

    predictions = model.predict((x_test, y_test)).cpu()  # eval mode: class indices
    accuracy = (predictions == y_test).float().mean().item()
    print(f"held-out accuracy: {accuracy:.3f} on {len(y_test)} digits")
    print(f"TensorBoard logs: {trainer.log_dir}")
    print(f"view them with:   tensorboard --logdir {trainer.log_dir}")
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer epochs, for tests")
    parser.add_argument("--log-dir", default=None, help="run directory (default: runs/<time>)")
    args = parser.parse_args()
    main(fast=args.fast, log_dir=args.log_dir)
