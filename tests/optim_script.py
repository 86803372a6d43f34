"""Several optimizers (#26), as a real process: a dict whose optimizers alternate by the
losses the model returns, alone or under torchrun (gloo on CPU). Run by
test_optimizers.py.

    python optim_script.py MODE OUT_DIR

Modes:
    kill: one process, 12 steps, a checkpoint every 2; with ``KILL_AT=<step>`` it
        SIGKILLs itself in the middle of that step the first time (a marker file
        remembers it). Saves the weights and both optimizers' states to OUT_DIR.
    ddp, fsdp: under torchrun, 2 ranks of 8 samples each, the alternating dict of
        `dist_optimizers` (``find_unused_parameters=True`` under DDP): 2 steps, whose
        checkpoint holds 'b' before its first step; a second Trainer resumes it to step
        12, a third to 15. Rank 0 saves the weights of the last two. ``FORMAT``: the
        checkpoint format (default: sharded).
    mixed: under torchrun with DDP, the ranks return different losses at each step
        (rank 0 'a''s where rank 1 returns 'b''s); each rank saves its weights and its
        optimizers' step counts.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lossless_trainer import Hook, Trainer, current_step


class Pair(nn.Module):
    """Two parts, each trained by its own losses: ``a/fit`` and ``a/small`` at every step
    but each third, ``b`` (which reads a's output, detached) at each third. `step`
    stands in for `current_step()` in a hand-written loop."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 1)
        self.b = nn.Linear(4, 1)
        self.step: int | None = None

    def forward(self, batch):
        x, y = batch
        if not self.training:
            return self.a(x)
        step = current_step() or self.step
        if step % 3 == 0:
            return {"b": F.mse_loss(self.b(x) + self.a(x).detach(), y)}
        return {"a/fit": F.mse_loss(self.a(x), y),
                "a/small": 1e-3 * self.a.weight.square().sum()}


def pair_data(n: int = 16 * 15, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1


def pair_optimizers() -> dict:
    return {"a": lambda m: torch.optim.Adam(m.a.parameters(), lr=0.05),
            "b": lambda m: torch.optim.SGD(m.b.parameters(), lr=0.05, momentum=0.9)}


def dist_optimizers() -> dict:
    """As `pair_optimizers`, with Adam for 'b': a checkpoint that laid out its state by
    stepping it (torch's way for an optimizer without one) would change its step count."""
    return {"a": lambda m: torch.optim.SGD(m.a.parameters(), lr=0.05, momentum=0.9),
            "b": lambda m: torch.optim.Adam(m.b.parameters(), lr=0.05)}


def states(trainer: Trainer) -> dict:
    params = trainer.model.state_dict()
    if trainer.dist.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        params = get_model_state_dict(trainer.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
    return {"params": params, "step": trainer.state.step,
            "resumed_from": trainer.resumed_from}


class KillAt(Hook):
    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def after_backward(self, trainer) -> None:
        if trainer.state.step + 1 == self.step and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


def kill(out: Path) -> None:
    torch.manual_seed(0)
    x, y = pair_data()
    data = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 96, 8)]
    kill_at = int(os.environ.get("KILL_AT", "0"))
    trainer = Trainer(Pair(), data, optimizer=pair_optimizers(), max_steps=12,
                      lr_scheduler={"a": lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5)},
                      checkpoint_every=2, log_every=2, log_dir=str(out / "run"),
                      progress=False, seed=1,
                      callbacks=[KillAt(kill_at, out / "killed")] if kill_at else [])
    trainer.fit()
    torch.save({**states(trainer), "a": trainer.optimizers["a"].state_dict(),
                "b": trainer.optimizers["b"].state_dict()}, out / "result.pt")


def distributed(out: Path, strategy: str) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(*pair_data(16 * 15)), batch_size=8, shuffle=False)
    options = {"optimizer": dist_optimizers(), "strategy": strategy, "progress": False,
               "log_every": 3, "checkpoint_format": os.environ.get("FORMAT", "sharded"),
               "checkpoint_every": 6, "log_dir": str(out / "run"), "clip_grad_norm": 0.5}
    if strategy == "ddp":
        options["find_unused_parameters"] = True
    results = []
    for steps in (2, 12, 15):
        torch.manual_seed(0)
        trainer = Trainer(Pair(), loader, max_steps=steps, **options)
        trainer.fit()
        results.append(states(trainer))  # a collective under FSDP
    if trainer.dist.is_main:
        torch.save({"first": results[1], "resumed": results[2]}, out / f"{strategy}.pt")


class Mixed(Pair):
    """`Pair`, with each rank choosing its losses by its own rank as well as the step."""

    def forward(self, batch):
        x, y = batch
        if not self.training:
            return self.a(x)
        if (current_step() + int(os.environ["RANK"])) % 2 == 0:
            return {"b": F.mse_loss(self.b(x) + self.a(x).detach(), y)}
        return {"a/fit": F.mse_loss(self.a(x), y)}


def mixed(out: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(*pair_data(16 * 15)), batch_size=8)
    trainer = Trainer(Mixed(), loader, optimizer=dist_optimizers(), max_steps=6,
                      find_unused_parameters=True, log_dir=str(out / "run"), progress=False)
    trainer.fit()
    steps = {name: [int(s["step"]) if "step" in s else len(opt.state)
                    for s in opt.state.values()] for name, opt in trainer.optimizers.items()}
    torch.save({"params": trainer.model.state_dict(), "steps": steps},
               out / f"mixed-rank{trainer.dist.rank}.pt")


if __name__ == "__main__":
    mode, target = sys.argv[1], Path(sys.argv[2])
    target.mkdir(parents=True, exist_ok=True)
    if mode == "kill":
        kill(target)
    elif mode == "mixed":
        mixed(target)
    else:
        distributed(target, mode)
