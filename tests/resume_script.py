"""A training run that test_resume.py starts, kills and reruns as a real subprocess.

    python resume_script.py LOG_DIR OUT_FILE

60 steps over a shuffling DataLoader of 150 samples in batches of 8 (19 batches per
epoch, so several epochs), a model with dropout, a checkpoint every 10 steps. When it
returns from `fit`, the final parameters, optimizer state and stop reason go to OUT_FILE.

Fault injection, for the test only, through environment variables:

* ``PAUSE_AT=<step>``: in the middle of that step (inside forward) create
  ``LOG_DIR/paused`` and wait up to 60 s, so the test can signal the process there.
  Only the first time: a rerun of the same command does not pause again.
* ``SLOW_SAVE_AT=<step>``: when saving that step's checkpoint, write half of the file,
  create ``LOG_DIR/saving``, and wait up to 60 s (to be SIGKILLed mid-write).
* ``ASYNC=1``: ``Trainer(async_checkpoint=True)``, checkpoints written in the background.
"""

from __future__ import annotations

import io
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lossless_trainer import Hook, Model, Trainer, write_summary

CURRENT_STEP = 0
TRAINER: Trainer | None = None


class Net(Model):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(32, 4)

    def forward(self, batch):
        x, y = batch
        h = self.body(x)
        write_summary("body/mean", h.mean())
        _maybe_pause()
        logits = self.head(h)
        if not self.training:
            return logits.argmax(-1)
        return {"ce": F.cross_entropy(logits, y)}


class TrackStep(Hook):
    priority = 0

    def before_step(self, trainer: Trainer) -> None:
        global CURRENT_STEP
        CURRENT_STEP = trainer.state.step + 1


def _wait_for(marker: str) -> None:
    open(marker, "w").close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (TRAINER and TRAINER.stop_requested):
        time.sleep(0.02)


def _maybe_pause() -> None:
    pause_at = int(os.environ.get("PAUSE_AT", "0"))
    marker = os.path.join(TRAINER.log_dir, "paused")
    if pause_at == CURRENT_STEP and not os.path.exists(marker):
        _wait_for(marker)


def _install_slow_save(log_dir: str) -> None:
    slow_at = int(os.environ.get("SLOW_SAVE_AT", "0"))
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        # The step the state is of: with ASYNC=1 the main thread is further on already.
        step = obj.get("trainer", {}).get("step") if isinstance(obj, dict) else None
        if slow_at != step or not hasattr(f, "write"):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        _wait_for(os.path.join(log_dir, "saving"))
        raise SystemExit("the slow save was not killed")

    if slow_at:
        torch.save = slow_save


def main(log_dir: str, out: str) -> None:
    global TRAINER
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(150, 16, generator=g),
                            torch.randint(0, 4, (150,), generator=g))
    loader = DataLoader(dataset, batch_size=8, shuffle=True)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _install_slow_save(log_dir)
    TRAINER = Trainer(model, loader, optimizer=optimizer, max_steps=60, checkpoint_every=10,
                      log_every=5, seed=7, log_dir=log_dir, progress=False,
                      callbacks=[TrackStep()], async_checkpoint=os.environ.get("ASYNC") == "1")
    state = TRAINER.fit()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": state.step, "stop_reason": state.stop_reason,
                "resumed_from": TRAINER.resumed_from}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
