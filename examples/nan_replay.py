"""When the loss goes NaN: a poisoned sample in shuffled data, the error, the replay and
the report (docs/nonfinite.md).

A digits classifier standardises each image by its own mean and standard deviation.
One training image in 1,437 is blank (all zeros: a scan that failed), so its standard
deviation is 0 and standardising it divides 0 by 0. Shuffling puts it in some batch of
the first epoch; that step's loss is NaN, and the run fails at the next flush:

    python examples/nan_replay.py                    # fails, and says how to replay
    LOSSLESS_TRAINER_REPLAY=1 python examples/nan_replay.py   # the replay: the report

The replay resumes from the last checkpoint before the bad step, runs to it with a check
at every step, and writes runs/nan-replay/nonfinite/step-<N>/: the step's batch and a
report naming the division, on the line below marked "here".
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Model, Trainer


class Classifier(Model):
    """An MLP on each image standardised by its own statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    # --8<-- [start:forward]
    def forward(self, batch):
        images, labels = batch
        mean, std = images.mean(1, keepdim=True), images.std(1, keepdim=True)
        standardised = (images - mean) / std  # here: 0 / 0 for a blank image
        logits = self.net(standardised)
        if not self.training:
            return logits
        return {"ce": F.cross_entropy(logits, labels)}
    # --8<-- [end:forward]


def poisoned_digits(blank: int = 1000) -> TensorDataset:
    """The training digits, with image `blank` (of 1,437) set to zeros."""
    digits = load_digits()
    x_train, _, y_train, _ = train_test_split(digits.data, digits.target, test_size=0.2,
                                              random_state=0)
    images = torch.tensor(x_train, dtype=torch.float32) / 16.0
    images[blank] = 0.0
    return TensorDataset(images, torch.tensor(y_train))


def main(argv: list[str] | None = None) -> Trainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", default="runs/nan-replay", help="the run directory")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    loader = DataLoader(poisoned_digits(), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    trainer = Trainer(Classifier(), loader, max_epochs=1, log_dir=args.log_dir, seed=0,
                      log_every=10, checkpoint_every=5, progress=False)
    trainer.fit()
    return trainer


if __name__ == "__main__":
    main()
