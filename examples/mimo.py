"""Multi-input, multi-output: an image and metadata in, a class and a number out.

Each example is a digit image (8x8) with metadata: two numeric features (a noisy ink
measurement, which is informative, and pure noise) and a "scanner" category. The model
predicts the digit and a regression target that depends on both the image and the
scanner. Only 60% of the training examples have the regression target; the others carry
NaN there.

Batches are dicts, ``{"image", "meta": {"numeric", "category"}, "label", "target"}``,
passed whole to the model, which decides what is input and what is target. It weights
its two losses with learned uncertainties (Kendall, Gal & Cipolla, 2018), parameters that
are part of the model, so the optimizer and the checkpoints include them with no extra
wiring. It logs each output's metrics under its own scope. Eval mode returns a dict of
predictions, which the ready evaluators read by key.

    python examples/mimo.py            # full run, under a minute on a laptop CPU
    python examples/mimo.py --fast     # a few seconds, what the test suite runs
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lossless_trainer import (
    Accuracy,
    MeanSquaredError,
    Model,
    Trainer,
    summary_scope,
    write_summary,
)

NUM_SCANNERS = 4
# The target is  offset[scanner] + gain[scanner] * standardised ink: the image says how
# much ink there is, the category says how this scanner reports it.
OFFSETS = (-1.5, -0.5, 0.5, 1.5)
GAINS = (0.5, 1.0, 1.5, 2.0)


class DigitsWithMetadata(Dataset):
    """Digits plus generated metadata and a regression target. Items are nested dicts."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int,
                 missing_target: float = 0.0) -> None:
        rng = np.random.default_rng(seed)
        n = len(images)
        ink = images.reshape(n, -1).mean(axis=1)
        ink = (ink - 0.305) / 0.034  # standardised: the mean and std over the digits set
        category = rng.integers(0, NUM_SCANNERS, n)
        target = np.asarray(OFFSETS)[category] + np.asarray(GAINS)[category] * ink
        target[rng.random(n) < missing_target] = np.nan  # unlabelled for this output
        numeric = np.stack([ink + rng.normal(0, 0.5, n), rng.normal(0, 1, n)], axis=1)
        self.image = torch.tensor(images, dtype=torch.float32)[:, None]
        self.numeric = torch.tensor(numeric, dtype=torch.float32)
        self.category = torch.tensor(category)
        self.label = torch.tensor(labels)
        self.target = torch.tensor(target, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image[i],
                "meta": {"numeric": self.numeric[i], "category": self.category[i]},
                "label": self.label[i], "target": self.target[i]}


class MultiTaskNet(Model):
    """Training mode: ``{"classification", "regression"}``, uncertainty-weighted.

    Eval mode: ``{"label": (B,), "probabilities": (B, 10), "target": (B,)}``; when the
    batch has targets it also logs the validation errors with `write_summary`.
    """

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.image_encoder = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),  # 4x4
            nn.Flatten(), nn.Linear(32 * 16, width), nn.ReLU(),
        )
        self.category = nn.Embedding(NUM_SCANNERS, 8)
        self.meta_encoder = nn.Sequential(nn.Linear(2 + 8, 32), nn.ReLU())
        self.trunk = nn.Sequential(nn.Linear(width + 32, width), nn.ReLU())
        self.classifier = nn.Linear(width, 10)
        self.regressor = nn.Linear(width, 1)
        # log(sigma^2) per task: the loss weights are learned with the rest of the model.
        self.log_variance = nn.Parameter(torch.zeros(2))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        meta = batch["meta"]
        meta_features = self.meta_encoder(
            torch.cat([meta["numeric"], self.category(meta["category"])], dim=1))
        hidden = self.trunk(torch.cat([self.image_encoder(batch["image"]), meta_features], 1))
        logits, value = self.classifier(hidden), self.regressor(hidden).squeeze(1)
        if not self.training:
            if "target" in batch:  # a validation error, without a second eval mode
                write_summary("target_mae", (value - batch["target"]).abs().nanmean())
            return {"label": logits.argmax(dim=1), "probabilities": logits.softmax(dim=1),
                    "target": value}

        cross_entropy = F.cross_entropy(logits, batch["label"])
        # Only some examples have a target: a mask, without a host sync on its count.
        known = ~torch.isnan(batch["target"])
        error = torch.where(known, value - batch["target"].nan_to_num(), 0.0)
        mse = error.pow(2).sum() / known.sum().clamp(min=1)
        log_var_cls, log_var_reg = self.log_variance
        losses = {"classification": torch.exp(-log_var_cls) * cross_entropy + log_var_cls,
                  "regression": 0.5 * torch.exp(-log_var_reg) * mse + 0.5 * log_var_reg}

        with summary_scope("classification"):
            write_summary("cross_entropy", cross_entropy)
            write_summary("accuracy", (logits.argmax(dim=1) == batch["label"]).float().mean())
            write_summary("weight", torch.exp(-log_var_cls))
        with summary_scope("regression"):
            write_summary("mse", mse)
            write_summary("mae", error.abs().sum() / known.sum().clamp(min=1))
            write_summary("weight", 0.5 * torch.exp(-log_var_reg))
            write_summary("labelled_fraction", known.float().mean())
        return losses


def load_data(seed: int = 0) -> tuple[DigitsWithMetadata, DigitsWithMetadata]:
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images / 16.0, digits.target, test_size=0.25, random_state=seed,
        stratify=digits.target)
    return (DigitsWithMetadata(x_train, y_train, seed=seed, missing_target=0.4),
            DigitsWithMetadata(x_test, y_test, seed=seed + 1))


def main(fast: bool = False, log_dir: str | None = None, progress: bool = True
         ) -> dict[str, float]:
    """Train, evaluate both outputs on held-out data, print the figures and return them."""
    train_set, test_set = load_data()
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=256)
    torch.manual_seed(0)  # the initial weights; Trainer(seed=...) seeds when fit starts
    model = MultiTaskNet()
    epochs = 12 if fast else 60
    trainer = Trainer(
        model, loader, max_epochs=epochs, log_every=10, seed=0, log_dir=log_dir,
        progress=progress, eval_data=test_loader, eval_every=len(loader) * 4,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=epochs * len(loader)),
        # Eval mode returns a dict: each evaluator picks its prediction and target by key.
        evaluators=[Accuracy(predictions="label", targets="label"),
                    MeanSquaredError(predictions="target", targets="target")],
    )
    trainer.fit()  # evaluates every 4 epochs and once more at the end

    results = trainer.last_eval
    baseline = test_set.target.var().item()  # the MSE of always predicting the mean
    print(f"held-out accuracy: {results['accuracy']:.3f} on {len(test_set)} digits")
    print(f"held-out regression MSE: {results['mse']:.3f}  MAE: {results['target_mae']:.3f}  "
          f"(predicting the mean: MSE {baseline:.3f})")
    print(f"TensorBoard logs: {trainer.log_dir}")
    print(f"view them with:   tensorboard --logdir {trainer.log_dir}")
    return {"accuracy": results["accuracy"], "mse": results["mse"],
            "mae": results["target_mae"], "baseline_mse": baseline}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer epochs, for tests")
    parser.add_argument("--log-dir", default=None, help="run directory (default: runs/<time>)")
    args = parser.parse_args()
    # The model is tiny: its ops are too small to share across cores, and on a busy
    # machine a second thread waiting for a core makes each op many times slower.
    torch.set_num_threads(1)
    main(fast=args.fast, log_dir=args.log_dir)
