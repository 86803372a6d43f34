"""Label-free contrastive learning (SimCLR-style) where the model makes its own views.

The training batches are images and nothing else. In training mode the model draws two
random augmentations of every image (shift, rotation, scale, noise, a masked patch) with
torch ops on the batch, embeds both, and returns the NT-Xent (InfoNCE) loss: each view
must pick out its partner among all the other views in the batch. It logs how similar
positive pairs are, how often the partner is the top match, and the alignment and
uniformity of the embedding. In eval mode it returns embeddings.

Afterwards the labels come out: a linear probe fitted on 5 labelled digits per class,
and a 5-nearest-neighbour classifier with every label, both on the frozen embeddings,
are compared with the same on the encoder before training and on raw pixels.

    python examples/contrastive.py            # full run, under a minute on a laptop CPU
    python examples/contrastive.py --fast     # a few seconds, what the test suite runs
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from torch import nn
from torch.utils.data import DataLoader

from lossless_trainer import Model, Trainer, is_summary_step, summary_scope, write_summary


def augment(images: torch.Tensor) -> torch.Tensor:
    """A random view of every image in (B, 1, 8, 8): the same ops, different draws.

    A small random affine map (rotation, scale, shift), a 3x3 patch blanked at a random
    place, and pixel noise. All on the batch's device, with the global RNG, so a resumed
    run draws the same views.
    """
    n, device = len(images), images.device
    angle = (torch.rand(n, device=device) - 0.5) * math.radians(30)
    scale = 1.0 + (torch.rand(n, device=device) - 0.5) * 0.2
    shift = (torch.rand(n, 2, device=device) - 0.5) * 0.5  # up to one pixel of eight
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], dim=1),
                         torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")
    # Cutout: blank a 3x3 patch whose corner is anywhere in the 6x6 valid positions.
    corner = torch.randint(0, 6, (n, 2, 1), device=device)
    coords = torch.arange(8, device=device)
    rows = (coords >= corner[:, 0]) & (coords < corner[:, 0] + 3)  # (B, 8)
    cols = (coords >= corner[:, 1]) & (coords < corner[:, 1] + 3)
    views = views * ~(rows[:, :, None] & cols[:, None, :])[:, None]
    return views + 0.1 * torch.randn_like(views)


class Encoder(nn.Module):
    """A small CNN from an 8x8 digit to a 128-d representation."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # 4x4
            nn.Flatten(), nn.Linear(64 * 16, width), nn.ReLU(),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class SimCLR(Model):
    """Training mode: ``{"nt_xent": loss}`` from two views it makes itself.

    Eval mode: the encoder's representation of each image, ``(B, 128)``; the projection
    head only serves the loss. Batches are image tensors ``(B, 1, 8, 8)``, no labels.
    """

    def __init__(self, width: int = 128, projection: int = 64, temperature: float = 0.2
                 ) -> None:
        super().__init__()
        self.encoder = Encoder(width)
        self.projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(),
                                       nn.Linear(width, projection))
        self.temperature = temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        if not self.training:
            return self.encoder(images)
        views = torch.cat([augment(images), augment(images)])  # 2B: first and second views
        z = F.normalize(self.projector(self.encoder(views)), dim=1)
        n = len(images)
        similarity = z @ z.T
        # Each view's positive is the other view of its image; itself is not a candidate.
        partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
        logits = (similarity / self.temperature).fill_diagonal_(-math.inf)
        loss = F.cross_entropy(logits, partner)

        with summary_scope("contrastive"):
            positive = similarity[torch.arange(2 * n, device=z.device), partner]
            write_summary("positive_similarity", positive.mean())
            write_summary("mean_similarity", (similarity.sum() - 2 * n) / (2 * n * (2 * n - 1)))
            write_summary("top1_accuracy", (logits.argmax(dim=1) == partner).float().mean())
            # Wang & Isola (2020): alignment (lower: positives closer), uniformity (lower:
            # embeddings spread over the sphere).
            write_summary("alignment", (z[:n] - z[n:]).pow(2).sum(dim=1).mean())
            distances = torch.pdist(z[:n]).pow(2)
            write_summary("uniformity", distances.mul(-2).exp().mean().log())
            if is_summary_step():
                # Eight originals over their two views, as one (1, 24, 64) image.
                grid = torch.cat([images[:8], views[:8], views[n:n + 8]])
                write_summary("views", grid.reshape(3, 8, 8, 8).permute(0, 2, 1, 3)
                              .reshape(1, 24, 64).clamp(0, 1))
        return {"nt_xent": loss}


def load_data(seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
          test_labels: np.ndarray, per_class: int = 5, draws: int = 10) -> dict[str, float]:
    """Held-out accuracy of classifiers fitted on frozen features.

    Args:
        train_features: Features of the training images (no gradient reaches the encoder).
        train_labels: Their labels, used only here, never in training.
        test_features: Features of held-out images.
        test_labels: Their labels.
        per_class: Labelled examples per class for the few-label linear probe; that is
            where a learned representation matters most.
        draws: Random draws of the labelled examples to average over.

    Returns:
        ``few_label_linear``: mean accuracy of a logistic regression on `per_class`
        labels per class; ``knn``: 5-nearest-neighbour (cosine) accuracy with every label.
    """
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    train_scaled, test_scaled = (train_features - mean) / std, (test_features - mean) / std
    rng = np.random.default_rng(0)
    accuracies = []
    for _ in range(draws):
        chosen = np.concatenate([rng.choice(np.flatnonzero(train_labels == c), per_class,
                                            replace=False) for c in np.unique(train_labels)])
        linear = LogisticRegression(max_iter=1000).fit(train_scaled[chosen],
                                                       train_labels[chosen])
        accuracies.append(linear.score(test_scaled, test_labels))
    knn = KNeighborsClassifier(5, metric="cosine").fit(train_features, train_labels)
    return {"few_label_linear": float(np.mean(accuracies)),
            "knn": float(knn.score(test_features, test_labels))}


def embed(model: SimCLR, images: torch.Tensor) -> np.ndarray:
    return model.predict(images).cpu().numpy()


def main(fast: bool = False, log_dir: str | None = None, progress: bool = True
         ) -> dict[str, dict[str, float]]:
    """Train without labels, then probe the frozen embeddings with labels.

    Returns:
        Probe accuracies (see `probe`) for ``simclr``, ``random_init`` (the same
        encoder before training) and ``raw_pixels``.
    """
    x_train, x_test, y_train, y_test = load_data()
    loader = DataLoader(x_train, batch_size=128, shuffle=True, drop_last=True)  # images only
    torch.manual_seed(0)  # the initial weights; Trainer(seed=...) seeds when fit starts
    model = SimCLR()
    random_init = SimCLR()
    random_init.load_state_dict(model.state_dict())  # the same start, never trained
    trainer = Trainer(model, loader, max_epochs=15 if fast else 100, log_every=10, seed=0,
                      log_dir=log_dir, progress=progress)
    trainer.fit()

    results = {
        "simclr": probe(embed(model, x_train), y_train.numpy(), embed(model, x_test),
                        y_test.numpy()),
        "random_init": probe(embed(random_init, x_train), y_train.numpy(),
                             embed(random_init, x_test), y_test.numpy()),
        "raw_pixels": probe(x_train.flatten(1).numpy(), y_train.numpy(),
                            x_test.flatten(1).numpy(), y_test.numpy()),
    }
    print(f"held-out accuracy on {len(y_test)} digits, classifiers fitted on frozen features:")
    for name, scores in results.items():
        print(f"  {name:<12} linear probe, 5 labels/class: {scores['few_label_linear']:.3f}"
              f"   5-NN, all labels: {scores['knn']:.3f}")
    print(f"TensorBoard logs: {trainer.log_dir}")
    print(f"view them with:   tensorboard --logdir {trainer.log_dir}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer epochs, for tests")
    parser.add_argument("--log-dir", default=None, help="run directory (default: runs/<time>)")
    args = parser.parse_args()
    # The model is tiny: its ops are too small to share across cores, and on a busy
    # machine a second thread waiting for a core makes each op many times slower.
    torch.set_num_threads(1)
    main(fast=args.fast, log_dir=args.log_dir)
