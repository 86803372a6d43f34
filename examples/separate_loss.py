"""A separate loss function as a special case, and where the model-owned loss goes further.

The task: digits where three classes (3, 8 and 9) are rare in the training data, 1 in 10
of their samples kept, but matter as much as the others at test time (the held-out set
is balanced).

(a) The separated style, unchanged: an existing predictions-only network and an existing
    loss function (`nn.CrossEntropyLoss`), joined by the `WithLoss` adapter. Nothing
    else to write; the Trainer takes it like any model.

(b) The same network inside a model that owns its loss: cross-entropy weighted up for
    the rare classes, plus a one-vs-rest logistic loss computed only on the rare
    classes' logits (a subset of the outputs, against one-hot targets, a different form
    from the class indices cross-entropy takes). The model also logs the rare classes'
    training recall. A loss function called as ``loss_fn(logits, labels)`` would need
    the class list, the weights and its own one-hot conversion, and could log nothing.

Both are trained the same way; the script reports held-out accuracy and the recall of
each rare class.

    python examples/separate_loss.py                # full run, about 10 seconds on a laptop CPU
    python examples/separate_loss.py --fast         # a few seconds, what the tests run
    python examples/separate_loss.py --log-dir runs/separate_loss
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Model, Trainer, WithLoss, summary_scope, write_summary

RARE = (3, 8, 9)
KEEP_RARE = 0.1  # share of the rare classes' training samples that is kept


def make_net(width: int = 128) -> nn.Module:
    """An existing predictions-only network: images in, 10 logits out."""
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


class RareClassAware(Model):
    """The network of (a), with a loss that cares about the rare classes.

    Training mode: ``{"ce": class-weighted cross-entropy, "rare_ovr": one-vs-rest
    logistic loss on the rare classes' logits}``. Eval mode: class indices.

    Args:
        net: Maps images to 10 logits.
        class_counts: Training samples per class; the weights are inverse frequencies,
            normalised to a mean of 1.
        rare: The classes the one-vs-rest loss looks at.
    """

    def __init__(self, net: nn.Module, class_counts: torch.Tensor,
                 rare: tuple[int, ...] = RARE) -> None:
        super().__init__()
        self.net = net
        weights = class_counts.sum() / class_counts.float()
        self.register_buffer("class_weights", weights / weights.mean())
        self.register_buffer("rare", torch.tensor(rare))

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]
                ) -> dict[str, torch.Tensor] | torch.Tensor:
        images, labels = batch
        logits = self.net(images)
        if not self.training:
            return logits.argmax(dim=1)
        ce = F.cross_entropy(logits, labels, weight=self.class_weights)
        # Only the rare classes' columns, each a yes/no question against a one-hot target.
        is_rare_class = labels.unsqueeze(1) == self.rare  # (N, len(rare)) one-hot
        rare_ovr = F.binary_cross_entropy_with_logits(logits[:, self.rare],
                                                      is_rare_class.float())
        with summary_scope("rare"):  # training recall of the rare classes, without a sync
            in_rare = is_rare_class.any(dim=1)
            hits = (logits.argmax(dim=1) == labels) & in_rare
            write_summary("train_recall", hits.sum() / in_rare.sum().clamp(min=1))
            write_summary("batch_share", in_rare.float().mean())
        return {"ce": ce, "rare_ovr": rare_ovr}


def load_data(seed: int = 0) -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    """An imbalanced training set (rare classes thinned) and a balanced held-out set."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=seed, stratify=y)
    g = torch.Generator().manual_seed(seed)
    rare = torch.isin(y_train, torch.tensor(RARE))
    keep = ~rare | (torch.rand(len(y_train), generator=g) < KEEP_RARE)
    return TensorDataset(x_train[keep], y_train[keep]), (x_test, y_test)


def held_out_figures(model: Model, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy, and the recall of each rare class, on (x, y)."""
    predictions = model.predict((x, y)).cpu()
    if predictions.ndim == 2:  # WithLoss returns what the network returns: logits
        predictions = predictions.argmax(dim=1)
    figures = {"accuracy": (predictions == y).float().mean().item()}
    for c in RARE:
        figures[f"recall_{c}"] = (predictions[y == c] == c).float().mean().item()
    return figures


def main(fast: bool = False, log_dir: str | None = None, progress: bool = True
         ) -> dict[str, dict[str, float]]:
    """Train (a) and (b); print and return their held-out figures.

    The runs go to ``<log_dir>/with_loss`` and ``<log_dir>/model_owned``.
    """
    train_set, (x_test, y_test) = load_data()
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    counts = torch.bincount(train_set.tensors[1], minlength=10)
    # Not a fixed default: a run directory holding checkpoints would be resumed, not retrained.
    root = log_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + "-separate_loss")

    torch.manual_seed(0)  # both models start from the same weights
    net = make_net()
    models = {
        "with_loss": WithLoss(net, nn.CrossEntropyLoss()),  # (a): batch[0] in, batch[1] target
        "model_owned": RareClassAware(make_net(), counts),  # (b)
    }
    models["model_owned"].net.load_state_dict(net.state_dict())
    results = {}
    for name, model in models.items():
        Trainer(model, loader, max_epochs=15 if fast else 60, log_every=10, seed=0,
                log_dir=os.path.join(root, name), progress=progress).fit()
        results[name] = held_out_figures(model, x_test, y_test)

    print(f"training samples per class: {counts.tolist()} (rare: {', '.join(map(str, RARE))})")
    for name, figures in results.items():
        recalls = ", ".join(f"{c}: {figures[f'recall_{c}']:.2f}" for c in RARE)
        print(f"{name:>12}: held-out accuracy {figures['accuracy']:.3f}, "
              f"rare-class recall {recalls}")
    print(f"TensorBoard logs: {root}")
    print(f"view them with:   tensorboard --logdir {root}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer epochs, for tests")
    parser.add_argument("--log-dir", default=None,
                        help="directory of the runs (default: runs/<time>-separate_loss)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    args = parser.parse_args()
    main(fast=args.fast, log_dir=args.log_dir, progress=not args.no_progress)
