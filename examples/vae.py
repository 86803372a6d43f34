"""A variational autoencoder on digits: the KL term comes from inside the forward.

The KL divergence depends on the posterior the encoder produced for this batch (its
mean and log-variance), and the reconstruction on the latent sampled from it. Both are
internal state of one forward pass. Here the model returns
``{"reconstruction": ..., "kl": ...}``, so the trainer logs them as ``loss/reconstruction``
and ``loss/kl`` with no extra code. The KL weight warms up over the first steps, counted
by a buffer (so it is checkpointed with the weights). On summary steps the model logs an
image of held-in inputs above their reconstructions. In eval mode it returns the
reconstruction from the posterior mean, and the latent mean itself.

    python examples/vae.py                # full run, about 10 seconds on a laptop CPU
    python examples/vae.py --fast         # a few seconds, what the tests run
    python examples/vae.py --log-dir runs/vae
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import (
    MeanSquaredError,
    Model,
    Trainer,
    is_summary_step,
    summary_scope,
    write_summary,
)


def image_grid(top: torch.Tensor, bottom: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """Two rows of 8x8 images (inputs above reconstructions) as one 1-channel CHW image.

    Images are separated by a one-pixel gap and enlarged `scale` times, since TensorBoard
    shows an 8x8 image as a dot.
    """
    n = top.shape[0]
    canvas = torch.full((17, 9 * n - 1), 0.5)  # mid-grey gaps between the images
    for i in range(n):
        canvas[:8, 9 * i:9 * i + 8] = top[i].reshape(8, 8)
        canvas[9:, 9 * i:9 * i + 8] = bottom[i].reshape(8, 8)
    big = canvas.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return big.unsqueeze(0).clamp(0, 1)


class VAE(Model):
    """Gaussian encoder, Bernoulli-style decoder over pixel intensities in [0, 1].

    Training mode: ``{"reconstruction": BCE summed over pixels, "kl": beta * KL}``, both
    averaged over the batch, where beta rises linearly from 0 to 1 over `warmup_steps`
    forward passes. Eval mode: ``{"reconstruction": pixels, "latent": posterior mean}``.

    Args:
        latent: Size of the latent code.
        width: Width of the hidden layers.
        warmup_steps: Training forwards over which the KL weight rises to 1; 0 for none.
    """

    def __init__(self, latent: int = 8, width: int = 128, warmup_steps: int = 500) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, width), nn.ReLU(),
                                     nn.Linear(width, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, width), nn.ReLU(), nn.Linear(width, 64))
        self.warmup_steps = warmup_steps
        # Counts training forwards; a buffer, so a resumed run continues the warm-up.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        (images,) = batch
        mu, log_var = self.encoder(images).chunk(2, dim=1)
        if not self.training:
            return {"reconstruction": torch.sigmoid(self.decoder(mu)), "latent": mu}

        # The sampled latent and the posterior (mu, log_var) exist only here: the loss
        # terms that need them are computed here too, not in a separate loss function.
        z = mu + torch.randn_like(mu) * (0.5 * log_var).exp()
        logits = self.decoder(z)
        reconstruction = F.binary_cross_entropy_with_logits(
            logits, images, reduction="none").sum(dim=1).mean()
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(dim=1).mean()
        self.step += 1
        beta = (self.step.float() / max(self.warmup_steps, 1)).clamp(max=1.0)

        with summary_scope("vae"):
            write_summary("beta", beta)
            write_summary("kl_unweighted", kl.detach())  # loss/kl is the weighted term
            write_summary("posterior_std", (0.5 * log_var.detach()).exp().mean())
            if is_summary_step():  # an image is costly: build it only when it is written
                write_summary("inputs_vs_reconstructions",
                              image_grid(images[:8].detach(), torch.sigmoid(logits[:8].detach())),
                              kind="image")
        return {"reconstruction": reconstruction, "kl": beta * kl}


def load_data(seed: int = 0) -> tuple[TensorDataset, torch.Tensor, torch.Tensor]:
    """Training set as 1-tuples of images, held-out images, and the training mean image."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    x_train, x_test = train_test_split(x, test_size=0.2, random_state=seed,
                                       stratify=digits.target)
    return TensorDataset(x_train), x_test, x_train.mean(dim=0)


def main(fast: bool = False, log_dir: str | None = None, progress: bool = True
         ) -> dict[str, float]:
    """Train, print held-out reconstruction error against the mean-image baseline."""
    train_set, x_test, mean_image = load_data()
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    torch.manual_seed(0)  # the weights are drawn here, before fit seeds
    epochs = 20 if fast else 100
    model = VAE(warmup_steps=len(loader) * epochs // 4)
    trainer = Trainer(model, loader, max_epochs=epochs, log_every=20, seed=0, log_dir=log_dir,
                      optimizer=functools.partial(torch.optim.AdamW, lr=3e-3),
                      progress=progress, eval_data=[(x_test,)],
                      evaluators=[MeanSquaredError(targets=0, predictions="reconstruction",
                                                   name="reconstruction_mse")])
    trainer.fit()  # evaluates on the held-out images when training ends

    mse = (trainer.last_eval or trainer.evaluate())["reconstruction_mse"]
    baseline = float((x_test - mean_image).pow(2).mean())
    print(f"held-out reconstruction MSE: {mse:.4f} per pixel "
          f"(mean-image baseline: {baseline:.4f}, {baseline / mse:.1f}x larger)")
    print(f"TensorBoard logs: {trainer.log_dir}")
    print(f"view them with:   tensorboard --logdir {trainer.log_dir}")
    return {"reconstruction_mse": mse, "baseline_mse": baseline}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer epochs, for tests")
    parser.add_argument("--log-dir", default=None, help="run directory (default: runs/<time>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    args = parser.parse_args()
    main(fast=args.fast, log_dir=args.log_dir, progress=not args.no_progress)
