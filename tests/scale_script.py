"""Runs for the checkpoints-at-scale tests (test_scale.py), under real torchrun or as one
plain process:

    python -m torch.distributed.run --standalone --nproc_per_node=N scale_script.py OUT RUN

OUT collects what the test reads; RUN is the run directory. The environment sets the
rest: STRATEGY (ddp or fsdp), FORMAT (full or sharded), ASYNC=1, EPOCHS, KILL_AT
(rank 1 SIGKILLs itself after that step), KILL_MARKER_AT (rank 0 SIGKILLs itself just
before writing the completion marker of that step's sharded checkpoint: every file but
the marker is on disk), TAG (names the outputs).

Every rank records the samples it served, per step, in OUT/served-<TAG>-rank<r>.jsonl.
After the resume (in `before_train`) rank 0 saves the gathered full model and optimizer
state to OUT/loaded-<TAG>.pt, and at the end the final one to OUT/final-<TAG>.pt.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lossless_trainer.sharded as sharded_module
from lossless_trainer import Hook, Model, Trainer

SAMPLES, BATCH = 96, 4


class Recording(Dataset):
    """Regression samples that remember which indices were served since last asked."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(SAMPLES, 8, generator=generator)
        self.y = self.x.sum(1) * 0.3 + 0.1 * torch.randn(SAMPLES, generator=generator)
        self.served: list[int] = []

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int):
        self.served.append(int(index))
        return self.x[index], self.y[index]


class Net(Model):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.1))
        self.head = nn.Linear(16, 1)

    def forward(self, batch):
        x, y = batch
        prediction = self.head(self.body(x)).squeeze(-1)
        return {"mse": F.mse_loss(prediction, y)} if self.training else prediction


def full_state(trainer: Trainer) -> dict:
    """The model's and optimizer's full state, gathered (every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, optimizer = get_state_dict(trainer.model, trainer.optimizer, options=options)
    return {"model": {k: v.detach().clone() for k, v in model.items()},
            "optimizer": optimizer}


class Record(Hook):
    def __init__(self, out: str, tag: str, data: Recording) -> None:
        self.out, self.tag, self.data = out, tag, data
        self.rank = int(os.environ.get("RANK", "0"))

    def before_train(self, trainer):
        state = full_state(trainer)
        if self.rank == 0:
            torch.save({**state, "step": trainer.state.step,
                        "resumed_from": trainer.resumed_from},
                       os.path.join(self.out, f"loaded-{self.tag}.pt"))

    def after_step(self, trainer):
        served, self.data.served = self.data.served, []
        with open(os.path.join(self.out, f"served-{self.tag}-rank{self.rank}.jsonl"),
                  "a") as f:
            f.write(json.dumps({"step": trainer.state.step, "epoch": trainer.state.epoch,
                                "indices": served}) + "\n")
        if self.rank == 1 and trainer.state.step == int(os.environ.get("KILL_AT", "-1")):
            os.kill(os.getpid(), signal.SIGKILL)


def kill_before_marker(step: int) -> None:
    """Rank 0 dies as it is about to write the completion marker of `step`."""
    real = sharded_module.write_atomic

    def write_atomic(path, write):
        if path.endswith(sharded_module.MARKER) and f"step-{step:09d}" in path:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, write)

    sharded_module.write_atomic = write_atomic


def main(out: str, run: str) -> None:
    tag = os.environ.get("TAG", "run")
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and "KILL_MARKER_AT" in os.environ:
        kill_before_marker(int(os.environ["KILL_MARKER_AT"]))
    torch.manual_seed(0)
    data = Recording()
    trainer = Trainer(Net(), DataLoader(data, batch_size=BATCH, shuffle=True), seed=5,
                      optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                      max_epochs=int(os.environ.get("EPOCHS", "2")), log_every=2,
                      checkpoint_every=4, keep_last=10, log_dir=run, progress=False,
                      strategy=os.environ.get("STRATEGY", "fsdp"),
                      checkpoint_format=os.environ.get("FORMAT", "auto"),
                      async_checkpoint=os.environ.get("ASYNC") == "1",
                      callbacks=[Record(out, tag, data)])
    trainer.fit()
    state = full_state(trainer)
    if rank == 0:
        torch.save({**state, "step": trainer.state.step, "format": trainer.checkpoint_format},
                   os.path.join(out, f"final-{tag}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
