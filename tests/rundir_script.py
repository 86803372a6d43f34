"""A run that test_rundir.py starts as a real subprocess, to hold a run directory.

    python rundir_script.py LOG_DIR [STAGES]

Trains a tiny model for ``STEPS`` steps (default 400), sleeping ``SLEEP`` seconds (default
0.02) in every step, with a checkpoint every 5 steps. It creates ``LOG_DIR/started`` at
its first step. With ``WORKERS=n`` the data comes from a DataLoader with `n` persistent
worker processes (forked). With STAGES (default 1), the script runs that many fits, each
a fresh Trainer on ``LOG_DIR/stage<i>``, then an evaluation, and prints one line per
stage: ``stage <i>: <stop_reason> in <seconds>s``, then ``evaluated``.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Hook, Model, Trainer


class Net(Model):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, batch):
        x, y = batch
        logits = self.fc(x)
        return {"ce": F.cross_entropy(logits, y)} if self.training else logits


class Slow(Hook):
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def before_step(self, trainer) -> None:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
        time.sleep(float(os.environ.get("SLEEP", "0.02")))


def data():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    workers = int(os.environ.get("WORKERS", "0"))
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0)


def main(log_dir: str, stages: int) -> None:
    steps = int(os.environ.get("STEPS", "400"))
    for stage in range(stages):
        stage_dir = log_dir if stages == 1 else os.path.join(log_dir, f"stage{stage}")
        torch.manual_seed(0)
        trainer = Trainer(Net(), data(), max_steps=steps, log_dir=stage_dir, log_every=5,
                          checkpoint_every=5, progress=False, seed=0,
                          callbacks=[Slow(os.path.join(log_dir, "started"))])
        started = time.monotonic()
        state = trainer.fit()
        print(f"stage {stage}: {state.stop_reason} in {time.monotonic() - started:.2f}s",
              flush=True)
    trainer.evaluate(data())
    print("evaluated", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
