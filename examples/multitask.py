"""Multi-task digits with missing labels: the model computes only the losses it can.

Three heads share one trunk: the digit (10 classes), its parity (odd or even) and the
image's mean ink (a regression). The training data comes from three sources, as merged
data sets often do, and each labels different things:

* ``curated`` (20%): every label;
* ``crowd`` (50%): parity always, the digit for only half of the samples;
* ``scanner`` (30%): only the ink, measured by the scanner.

Batches are drawn from one source at a time, so a batch may lack a label entirely (no
ink in a ``crowd`` batch) or have it for some samples only (the digit in a ``crowd``
batch). The collate function leaves absent labels out of the batch and adds a presence
mask for the others. The model returns a loss for each label the batch has (a masked
mean) and leaves the others out of its dict; the trainer needs to know nothing about
the label structure. In eval mode it returns predictions for every head.

At the bottom, for comparison, the same model in the separated style: a network that
returns every head's raw output and a loss function that repeats the branching (see
docs/examples/multitask.md).

    python examples/multitask.py                # full run, about 10 seconds on a laptop CPU
    python examples/multitask.py --fast         # a few seconds, what the tests run
    python examples/multitask.py --log-dir runs/multitask
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from lossless_trainer import Accuracy, MeanSquaredError, Model, Trainer, write_summary

# Each label's name and dtype; a batch holds `<name>` and `<name>_mask` for each label
# at least one of its samples has, and neither key otherwise.
LABELS = {"digit": torch.long, "parity": torch.long, "ink": torch.float32}
SOURCES = ("curated", "crowd", "scanner")

Sample = dict[str, Any]
Batch = dict[str, torch.Tensor]


class PartiallyLabelledDigits(Dataset):
    """Digits whose labels are present or None, depending on the source of each sample.

    Args:
        images: ``(N, 64)`` pixel values in [0, 1].
        digits: ``(N,)`` digit classes.
        sources: For each sample, an index into `SOURCES`; None labels every sample fully
            (a held-out set).
        seed: Decides which ``crowd`` samples lack their digit.
    """

    def __init__(self, images: torch.Tensor, digits: torch.Tensor,
                 sources: torch.Tensor | None = None, seed: int = 0) -> None:
        self.images = images
        self.sources = torch.zeros(len(images), dtype=torch.long) if sources is None else sources
        g = torch.Generator().manual_seed(seed)
        digit_known = torch.rand(len(images), generator=g) < 0.5
        self.samples: list[Sample] = []
        for i in range(len(images)):
            source = SOURCES[int(self.sources[i])]
            digit = int(digits[i])
            self.samples.append({
                "digit": digit if source == "curated" or (
                    source == "crowd" and digit_known[i]) else None,
                "parity": digit % 2 if source in ("curated", "crowd") else None,
                "ink": float(images[i].mean()) if source in ("curated", "scanner") else None,
            })

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return {"image": self.images[index], **self.samples[index]}


def collate(samples: list[Sample]) -> Batch:
    """Stack images; for each label some sample has, its values and a presence mask.

    Presence is decided here, on the host, from plain Python values: the model can branch
    on ``"ink" in batch`` without a device synchronisation.
    """
    batch = {"image": torch.stack([s["image"] for s in samples])}
    for name, dtype in LABELS.items():
        present = [s[name] is not None for s in samples]
        if any(present):
            batch[name] = torch.tensor([s[name] if p else 0 for s, p in zip(samples, present)],
                                       dtype=dtype)
            batch[f"{name}_mask"] = torch.tensor(present)
    return batch


class SourceBatchSampler(Sampler[list[int]]):
    """Batches drawn from one source at a time, in a random order of sources and samples.

    Draws from torch's global RNG, which the Trainer seeds and checkpoints.
    """

    def __init__(self, sources: torch.Tensor, batch_size: int) -> None:
        super().__init__()
        self.groups = [torch.nonzero(sources == s).flatten() for s in range(len(SOURCES))]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return sum(-(-len(group) // self.batch_size) for group in self.groups)

    def __iter__(self) -> Iterator[list[int]]:
        batches = []
        for group in self.groups:
            shuffled = group[torch.randperm(len(group))].tolist()
            batches += [shuffled[i:i + self.batch_size]
                        for i in range(0, len(shuffled), self.batch_size)]
        for i in torch.randperm(len(batches)).tolist():
            yield batches[i]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is true, with no device synchronisation.

    The clamp only guards the division: a label key is in the batch only when at least
    one sample has it.
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


class MultiTaskNet(Model):
    """Digit, parity and ink heads on a shared trunk.

    Training mode: a dict with a loss for each label present in the batch, among
    ``digit``, ``parity`` and ``ink``. Eval mode: ``{"digit": class, "parity": 0 or 1,
    "ink": mean ink}`` for every sample.

    Args:
        ink_mean: Mean of the ink labels; the ink head is trained on standardised ink.
        ink_std: Their standard deviation.
        width: Width of the trunk.
    """

    def __init__(self, ink_mean: float, ink_std: float, width: int = 128) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, width), nn.ReLU(),
                                   nn.Linear(width, width), nn.ReLU())
        self.digit_head = nn.Linear(width, 10)
        self.parity_head = nn.Linear(width, 1)
        self.ink_head = nn.Linear(width, 1)
        # Buffers, so the standardisation travels with the weights in checkpoints.
        self.register_buffer("ink_mean", torch.tensor(ink_mean))
        self.register_buffer("ink_std", torch.tensor(ink_std))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        h = self.trunk(batch["image"])
        if not self.training:
            return {
                "digit": self.digit_head(h).argmax(dim=1),
                "parity": (self.parity_head(h).squeeze(1) > 0).long(),
                "ink": self.ink_head(h).squeeze(1) * self.ink_std + self.ink_mean,
            }
        # One branch per label: compute the loss if the batch has the label, else leave
        # the key out (its head is not even evaluated).
        losses = {}
        if "digit" in batch:
            ce = F.cross_entropy(self.digit_head(h), batch["digit"], reduction="none")
            losses["digit"] = masked_mean(ce, batch["digit_mask"])
        if "parity" in batch:
            bce = F.binary_cross_entropy_with_logits(
                self.parity_head(h).squeeze(1), batch["parity"].float(), reduction="none")
            losses["parity"] = masked_mean(bce, batch["parity_mask"])
        if "ink" in batch:
            target = (batch["ink"] - self.ink_mean) / self.ink_std
            se = (self.ink_head(h).squeeze(1) - target).pow(2)
            losses["ink"] = masked_mean(se, batch["ink_mask"])
        for name in LABELS:  # how much of each label the model sees: a host-side number
            write_summary(f"batches_with/{name}", float(name in batch))
        return losses


def load_data(seed: int = 0) -> tuple[PartiallyLabelledDigits, PartiallyLabelledDigits]:
    """Training set with sources assigned at random; held-out set fully labelled."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y)
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(len(x_train), generator=g)
    sources = (u >= 0.2).long() + (u >= 0.7).long()  # 20% curated, 50% crowd, 30% scanner
    return (PartiallyLabelledDigits(x_train, y_train, sources, seed),
            PartiallyLabelledDigits(x_test, y_test))


def main(fast: bool = False, log_dir: str | None = None, progress: bool = True
         ) -> dict[str, float]:
    """Train, print held-out metrics per head and where the logs are, and return them."""
    train_set, test_set = load_data()
    loader = DataLoader(train_set, batch_sampler=SourceBatchSampler(train_set.sources, 32),
                        collate_fn=collate)
    inks = torch.tensor([s["ink"] for s in train_set.samples if s["ink"] is not None])
    torch.manual_seed(0)  # the weights are drawn here, before fit seeds
    model = MultiTaskNet(float(inks.mean()), float(inks.std()))
    test_loader = DataLoader(test_set, batch_size=256, collate_fn=collate)
    # Held-out metrics per head; the evaluators read targets and predictions by key.
    evaluators = [Accuracy(targets="digit", predictions="digit", name="digit_"),
                  Accuracy(targets="parity", predictions="parity", name="parity_"),
                  MeanSquaredError(targets="ink", predictions="ink", name="ink_mse")]
    trainer = Trainer(model, loader, max_epochs=10 if fast else 40, log_every=10, seed=0,
                      log_dir=log_dir, progress=progress, eval_data=test_loader,
                      evaluators=evaluators)
    trainer.fit()  # evaluates on the held-out set once more when training ends

    results = dict(trainer.last_eval or trainer.evaluate())
    test_ink = torch.tensor([s["ink"] for s in test_set.samples])
    results["ink_baseline_mse"] = float((test_ink - inks.mean()).pow(2).mean())
    results["ink_r2"] = 1.0 - results["ink_mse"] / float(test_ink.var(correction=0))
    n = len(test_set)
    print(f"held-out digit accuracy:  {results['digit_accuracy']:.3f} on {n} digits")
    print(f"held-out parity accuracy: {results['parity_accuracy']:.3f}")
    print(f"held-out ink MSE: {results['ink_mse']:.2e} (predicting the mean: "
          f"{results['ink_baseline_mse']:.2e}, R^2 {results['ink_r2']:.3f})")
    print(f"TensorBoard logs: {trainer.log_dir}")
    print(f"view them with:   tensorboard --logdir {trainer.log_dir}")
    return results


# --- For comparison: the separated style (not used for training) --------------------
# The network must return every head's raw output, since it cannot know which ones the
# loss will use; the loss function repeats the label branching and needs the ink
# standardisation; turning raw outputs into predictions is a third place that knows
# the heads. Wrapped in WithLoss it trains the same, and tests check its losses match.


class SeparatedMultiTaskNet(nn.Module):
    """The same heads, predictions-only: raw outputs of every head."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, width), nn.ReLU(),
                                   nn.Linear(width, width), nn.ReLU())
        self.digit_head = nn.Linear(width, 10)
        self.parity_head = nn.Linear(width, 1)
        self.ink_head = nn.Linear(width, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(images)
        return {"digit": self.digit_head(h), "parity": self.parity_head(h).squeeze(1),
                "ink": self.ink_head(h).squeeze(1)}


def separated_loss(outputs: dict[str, torch.Tensor], batch: Batch, ink_mean: float,
                   ink_std: float) -> dict[str, torch.Tensor]:
    """The loss function of the separated style: the same branching, a second time."""
    losses = {}
    if "digit" in batch:
        ce = F.cross_entropy(outputs["digit"], batch["digit"], reduction="none")
        losses["digit"] = masked_mean(ce, batch["digit_mask"])
    if "parity" in batch:
        bce = F.binary_cross_entropy_with_logits(outputs["parity"], batch["parity"].float(),
                                                 reduction="none")
        losses["parity"] = masked_mean(bce, batch["parity_mask"])
    if "ink" in batch:
        se = (outputs["ink"] - (batch["ink"] - ink_mean) / ink_std).pow(2)
        losses["ink"] = masked_mean(se, batch["ink_mask"])
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer epochs, for tests")
    parser.add_argument("--log-dir", default=None, help="run directory (default: runs/<time>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    args = parser.parse_args()
    main(fast=args.fast, log_dir=args.log_dir, progress=not args.no_progress)
