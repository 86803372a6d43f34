"""The same script on one process and under torchrun: data-parallel training of a digits
classifier, with nothing in the model or the training code that knows about ranks.

    python examples/distributed.py                                   # one process
    torchrun --nproc_per_node=2 examples/distributed.py              # 2 processes (CPU: gloo)
    torchrun --nproc_per_node=8 examples/distributed.py --strategy fsdp    # 8 GPUs, sharded
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 --rdzv_id=digits examples/distributed.py  # 2 nodes

    python examples/distributed.py --fast                            # what the tests run

Under torchrun the Trainer joins the process group (nccl on GPUs, gloo on CPUs), gives
each rank its own device, wraps the model in DistributedDataParallel (or shards it with
FSDP), shards the DataLoader with a DistributedSampler, averages the logged scalars
across ranks at each flush, and lets rank 0 alone write logs and checkpoints. With a
fixed run directory (`--log-dir runs/digits`), kill it and run the same command again:
it resumes from the last checkpoint. (Without one, every launch starts a fresh
`runs/<time>` directory.)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Accuracy, Model, Trainer, write_summary


class DigitClassifier(Model):
    """Cross-entropy in training, class scores in eval mode. No rank logic anywhere."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Dropout(0.1),
                                  nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, 10)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]):
        images, labels = batch
        logits = self.head(self.body(images))
        if not self.training:
            return logits
        wrong = (logits.argmax(1) != labels).sum().float()
        # Averaged over ranks by default; "sum" adds the ranks' counts: the whole job's
        # misclassified samples per step.
        write_summary("misclassified_per_step", wrong, reduce="sum")
        return {"ce": F.cross_entropy(logits, labels)}


def main(fast: bool = False, log_dir: str | None = None, strategy: str = "auto",
         progress: bool = True) -> float:
    """Train; return held-out accuracy (every rank gets the same number)."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0,
                                                        stratify=y)
    # The batch size is per process: with N processes, each step sees N * 32 samples.
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=32, shuffle=True)
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=256)

    torch.manual_seed(0)
    trainer = Trainer(
        DigitClassifier(), train,
        optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3),
        max_epochs=4 if fast else 15, log_every=10, seed=0, log_dir=log_dir,
        eval_data=test, evaluators=[Accuracy()], checkpoint_every=50,
        strategy=strategy, progress=progress,
    )
    trainer.fit()
    accuracy = trainer.last_eval["accuracy"]
    if trainer.dist.is_main:  # one line per job, not one per process
        print(f"processes: {trainer.dist.world_size}  strategy: {trainer.dist.strategy or 'none'}"
              f"  device: {trainer.device}  steps: {trainer.state.step}")
        print(f"held-out accuracy: {accuracy:.3f} on {len(y_test)} digits")
        print(f"TensorBoard logs: {trainer.log_dir}")
        print(f"view them with:   tensorboard --logdir {trainer.log_dir}")
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer epochs, for tests")
    parser.add_argument("--log-dir", default=None, help="run directory (default: runs/<time>)")
    parser.add_argument("--strategy", default="auto", choices=["auto", "ddp", "fsdp"])
    args = parser.parse_args()
    main(fast=args.fast, log_dir=args.log_dir, strategy=args.strategy)
