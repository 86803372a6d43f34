"""An activation penalty collected from inside sub-modules, and histograms of activations.

A digits classifier whose hidden layers are pushed towards sparse activations by an L1
penalty on them. The activations live deep inside the network: each hidden block hands
its output to `record_activation`, a small helper that stores it for whoever is
recording (a `contextvars` variable, like `write_summary`, so nothing is threaded through
`nn.Sequential` and nothing is stored on the modules). The model records during its own
forward and returns ``{"ce": ..., "activation_l1": ...}``; the trainer logs both losses.
On summary steps it also logs a histogram of each layer's activations.

The script trains the model twice, with the penalty and without it, into two runs of one
log directory (compare them side by side in TensorBoard), and reports held-out accuracy
and how sparse the hidden activations are on held-out digits.

    python examples/regularized.py                  # full run, about 15 seconds on a laptop CPU
    python examples/regularized.py --fast           # a few seconds, what the tests run
    python examples/regularized.py --penalty 1      # a stronger penalty
    python examples/regularized.py --log-dir runs/regularized
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Model, Trainer, is_summary_step, summary_scope, write_summary

# The recorders open around the current call, innermost last. Empty: recording is off
# and `record_activation` costs one lookup.
_RECORDERS: ContextVar[tuple[dict[str, torch.Tensor], ...]] = ContextVar(
    "activation_recorders", default=())


def record_activation(name: str, activation: torch.Tensor) -> None:
    """Hand `activation` to every enclosing `recording_activations` block, if any.

    Sub-modules call this from their forward; outside a recording block it does nothing.
    """
    for recorded in _RECORDERS.get():
        recorded[name] = activation


@contextmanager
def recording_activations() -> Iterator[dict[str, torch.Tensor]]:
    """Collect the activations recorded inside the block, by name.

    Blocks nest, and each sees everything recorded inside it: the model records for its
    penalty while a caller records the same activations to measure sparsity.
    """
    recorded: dict[str, torch.Tensor] = {}
    token = _RECORDERS.set((*_RECORDERS.get(), recorded))
    try:
        yield recorded
    finally:
        _RECORDERS.reset(token)


class HiddenBlock(nn.Module):
    """Linear + ReLU that reports its output; knows nothing about penalties or trainers."""

    def __init__(self, name: str, d_in: int, d_out: int) -> None:
        super().__init__()
        self.name = name
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.linear(x))
        record_activation(self.name, h)
        return h


class SparseClassifier(Model):
    """MLP classifier with an optional L1 penalty on its hidden activations.

    Training mode: ``{"ce": ..., "activation_l1": penalty * sum over layers of mean |h|}``
    (no ``activation_l1`` key when `penalty` is 0). Eval mode: class indices.

    Args:
        penalty: Weight of the activation penalty.
        width: Width of the two hidden layers.
    """

    def __init__(self, penalty: float = 0.3, width: int = 256) -> None:
        super().__init__()
        self.penalty = penalty
        self.body = nn.Sequential(HiddenBlock("layer1", 64, width),
                                  HiddenBlock("layer2", width, width))
        self.head = nn.Linear(width, 10)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]
                ) -> dict[str, torch.Tensor] | torch.Tensor:
        images, labels = batch
        if not self.training:
            return self.head(self.body(images)).argmax(dim=1)
        with recording_activations() as activations:
            logits = self.head(self.body(images))
        losses = {"ce": F.cross_entropy(logits, labels)}
        if self.penalty:
            l1 = sum(h.abs().mean() for h in activations.values())
            losses["activation_l1"] = self.penalty * l1
        with summary_scope("activations"):
            for name, h in activations.items():
                write_summary(f"{name}/zero_fraction", (h == 0).float().mean())
                if is_summary_step():  # a histogram is costly: only when it is written
                    write_summary(name, h.detach(), kind="histogram")
        return losses


def load_data(seed: int = 0) -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y)
    return TensorDataset(x_train, y_train), (x_test, y_test)


def held_out_figures(model: SparseClassifier, x: torch.Tensor, y: torch.Tensor
                     ) -> dict[str, float]:
    """Accuracy, and the share of hidden activations that are exactly zero, on (x, y)."""
    with recording_activations() as activations:  # sees what the model's blocks record
        predictions = model.predict((x, y)).cpu()
    hidden = torch.cat([h.flatten() for h in activations.values()])
    return {"accuracy": (predictions == y).float().mean().item(),
            "zero_fraction": (hidden == 0).float().mean().item(),
            "mean_activation": hidden.mean().item()}


def train(penalty: float, fast: bool, log_dir: str | None, progress: bool
          ) -> tuple[dict[str, float], str]:
    """Train one model; return its held-out figures and its run directory."""
    train_set, (x_test, y_test) = load_data()
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    torch.manual_seed(0)  # the same initial weights for every penalty
    model = SparseClassifier(penalty)
    trainer = Trainer(model, loader, max_epochs=15 if fast else 60, log_every=10, seed=0,
                      log_dir=log_dir, progress=progress)
    trainer.fit()
    return held_out_figures(model, x_test, y_test), trainer.log_dir


def main(fast: bool = False, log_dir: str | None = None, progress: bool = True,
         penalty: float = 0.3) -> dict[str, dict[str, float]]:
    """Train with the penalty and without; print and return both runs' figures.

    With `log_dir`, the runs go to ``<log_dir>/l1_<penalty>`` and ``<log_dir>/no_penalty``;
    with `penalty` 0, only the second is trained.
    """
    # Not a fixed default: a run directory holding checkpoints would be resumed, not retrained.
    root = log_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + "-regularized")
    runs = {"no_penalty": 0.0} if penalty == 0 else {f"l1_{penalty:g}": penalty,
                                                     "no_penalty": 0.0}
    results = {}
    for name, weight in runs.items():
        results[name], _ = train(weight, fast, os.path.join(root, name), progress)
    for name, figures in results.items():
        print(f"{name:>12}: held-out accuracy {figures['accuracy']:.3f}, "
              f"zero activations {figures['zero_fraction']:.1%}, "
              f"mean activation {figures['mean_activation']:.3f}")
    print(f"TensorBoard logs: {root}")
    print(f"view them with:   tensorboard --logdir {root}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer epochs, for tests")
    parser.add_argument("--log-dir", default=None,
                        help="directory of the runs (default: runs/<time>-regularized)")
    parser.add_argument("--penalty", type=float, default=0.3,
                        help="weight of the L1 activation penalty (0: train without only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    args = parser.parse_args()
    main(fast=args.fast, log_dir=args.log_dir, progress=not args.no_progress,
         penalty=args.penalty)
