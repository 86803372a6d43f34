"""A run whose loss goes NaN on one rank, under torchrun (gloo on CPU), run by
test_nonfinite.py: first as it fails, then with LOSSLESS_TRAINER_REPLAY=1.

    torchrun --nproc_per_node=2 nonfinite_script.py LOG_DIR

Rank 1's 5th batch holds a feature below -10, which makes the loss ``log`` NaN at step
5 on that rank only (`LogOfFeature`). Checkpoints every 2 steps, a flush every 4.
Each rank writes the error it raised to ``LOG_DIR/../error-r<rank>.txt``. ``STRATEGY``:
the Trainer's strategy (default: auto, DDP).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_nonfinite import LogOfFeature  # noqa: E402

from lossless_trainer import Trainer  # noqa: E402


def main() -> None:
    log_dir = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    g = torch.Generator().manual_seed(rank)
    data = []
    for i in range(1, 9):
        x = torch.randn(8, 4, generator=g)
        if rank == 1 and i == 5:
            x[2, 0] = -50.0
        data.append((x, x.sum(1, keepdim=True)))
    torch.manual_seed(0)
    trainer = Trainer(LogOfFeature(), data, log_dir=str(log_dir), progress=False, seed=1,
                      checkpoint_every=2, log_every=4,
                      strategy=os.environ.get("STRATEGY", "auto"))
    try:
        trainer.fit()
    except Exception as error:
        (log_dir.parent / f"error-r{rank}.txt").write_text(f"{type(error).__name__}: {error}")
        raise


if __name__ == "__main__":
    main()
