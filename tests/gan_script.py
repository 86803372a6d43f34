"""The GAN example (examples/gan.py, in its --fast mode), run by test_custom_trainer.py
as a real process, alone or under torchrun.

    python gan_script.py LOG_DIR OUT_FILE [FORMAT]

``KILL_AT=<step>``: SIGKILL this process (rank 1 under torchrun) in the middle of that
step, after the discriminator's backward, the first time only (a marker file in
LOG_DIR remembers it). When `fit` returns, rank 0 saves the model's and both
optimizers' states and what the run resumed from to OUT_FILE. FORMAT is the checkpoint
format (default: auto).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import gan  # noqa: E402

from lossless_trainer import Hook  # noqa: E402


class KillAt(Hook):
    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def after_backward(self, trainer) -> None:
        if (trainer.state.step + 1 == self.step and trainer.dist.rank == trainer.dist.world_size - 1
                and not self.marker.exists()):
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    log_dir, out = Path(sys.argv[1]), sys.argv[2]
    kill_at = int(os.environ.get("KILL_AT", "0"))
    callbacks = [KillAt(kill_at, log_dir.parent / f"{log_dir.name}.killed")] if kill_at else []
    trainer = gan.main(["--fast", "--log-dir", str(log_dir)], callbacks=callbacks,
                       progress=False, checkpoint_format=(sys.argv[3:] or ["auto"])[0])
    if trainer.dist.is_main:
        torch.save({"model": trainer.model.state_dict(),
                    "opt_d": trainer.optimizers["d"].state_dict(),
                    "opt_g": trainer.optimizers["g"].state_dict(),
                    "resumed_from": trainer.resumed_from, "step": trainer.state.step}, out)


if __name__ == "__main__":
    main()
