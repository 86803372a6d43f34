"""A GAN on 8x8 digits: a custom trainer alternating two optimizers, docs/custom-trainers.md."""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.functional import softplus  # binary cross-entropy: softplus(-logit) for "real"
from torch.utils.data import DataLoader

from lossless_trainer import TrainerBase, is_summary_step, write_summary


class GAN(nn.Module):
    def __init__(self, latent: int = 16) -> None:
        super().__init__()
        self.latent = latent
        self.g = nn.Sequential(nn.ConvTranspose2d(latent, 64, 4), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.ConvTranspose2d(64, 1, 4, 2, 1), nn.Tanh())  # 1 -> 4 -> 8 px
        self.d = nn.Sequential(nn.Conv2d(1, 64, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(64, 1, 4))

    def forward(self, real: torch.Tensor, part: str) -> dict[str, torch.Tensor]:
        fake = self.g(torch.randn(len(real), self.latent, 1, 1, device=real.device))
        if part == "d":  # the generated batch is a given: no gradient to the generator
            return {"d": softplus(-self.d(real)).mean() + softplus(self.d(fake.detach())).mean()}
        if is_summary_step():  # 16 samples as one 32x32 image
            grid = fake[:16].reshape(4, 4, 8, 8).transpose(1, 2).reshape(1, 32, 32)
            write_summary("samples", (grid + 1) / 2)
        return {"g": softplus(-self.d(fake)).mean()}


class GANTrainer(TrainerBase):
    """The discriminator every step, the generator every `k`-th, each with its Adam."""

    def __init__(self, gan: GAN, data, k: int = 1, lr: float = 2e-4, **options) -> None:
        super().__init__(gan, data, find_unused_parameters=True, **options)  # DDP: one part
        self.k = k
        self.optimizers = {part: torch.optim.Adam(  # by name: lr/d and lr/g are logged
            getattr(gan, part).parameters(), lr, betas=(0.5, 0.999)) for part in ("d", "g")}

    def run_step(self, batches: list) -> dict:
        (real,) = self.accumulate(batches)  # on the device; one micro-batch per step
        losses = {}
        for part in ("d", "g") if (self.state.step + 1) % self.k == 0 else ("d",):
            self.model.zero_grad(set_to_none=True)  # the other part's gradients go too
            losses |= self.compute_losses(real, part)  # through DDP under torchrun
            self.precision.backward(losses[part])
            self.precision.unscale(self.optimizers[part])
            self.after_backward()  # hooks see the gradients
            self.precision.step(self.optimizers[part])  # "g": through the updated discriminator
        return losses

    def state_dict(self) -> dict:  # the optimizers join the checkpoint
        return {**super().state_dict(), **{f"opt_{part}": self.optimizer_state_dict(opt)
                                           for part, opt in self.optimizers.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for part, optimizer in self.optimizers.items():
            self.load_optimizer_state_dict(optimizer, state[f"opt_{part}"])


def main(argv: list[str] | None = None, **options) -> GANTrainer:
    parser = argparse.ArgumentParser(description="A GAN on 8x8 digits, with a custom trainer")
    parser.add_argument("--fast", action="store_true", help="a few steps, to check it runs")
    parser.add_argument("--log-dir", help="the run directory (default: a fresh runs/<date>)")
    args = parser.parse_args(argv)
    digits = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    torch.manual_seed(0)
    steps = 12 if args.fast else 2000
    trainer = GANTrainer(GAN(), DataLoader(digits, batch_size=64, shuffle=True), seed=0, **{
        "max_steps": steps, "log_every": max(steps // 20, 4), "checkpoint_every": steps // 3,
        "log_dir": args.log_dir, **options})
    trainer.fit()
    print(f"TensorBoard logs: tensorboard --logdir {trainer.log_dir}")
    return trainer


if __name__ == "__main__":
    main()
