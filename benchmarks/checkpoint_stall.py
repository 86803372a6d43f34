"""How long checkpoint saves stall training: blocking saves against ``async_checkpoint``,
for full or sharded checkpoints.

Method: for each case, three kinds of `Trainer.fit` over the same pre-made batches, the
same number of steps: no checkpoints (``keep_last=0``), a blocking checkpoint every
``every`` steps, and the same with ``async_checkpoint=True``. They run in interleaved
rounds (none, blocking, async, none, ...) so the VM's drift affects all alike. Reported,
as medians over rounds: the wall time of a fit, its ratio against the run with no
checkpoints, and the stall per save, (T - T_none) / saves. A run's last save happens
at its end (``fit`` waits for it), so the async figure still contains one whole write:
the last; the stall of the saves before it is what the step no longer waits for.

Cases: the medium MLP of benchmarks/overhead.py, its own class (784-1024-1024-10, 1.9 M parameters,
AdamW: a 23 MB checkpoint, a save every 10 steps) and an MLP of about 100 M parameters
(6 layers of 4096: a 1.2 GB checkpoint with AdamW's moments, a save every 8 steps).

    python benchmarks/checkpoint_stall.py            # about 6 minutes on 2 CPU cores
    python benchmarks/checkpoint_stall.py --quick    # a smoke run
    torchrun --standalone --nproc_per_node=2 benchmarks/checkpoint_stall.py --threads 1
    torchrun --standalone --nproc_per_node=2 benchmarks/checkpoint_stall.py --threads 1 \
        --strategy fsdp --format sharded       # every rank writes its own shards

Under torchrun every rank trains on the same batches (a timing benchmark: the data need
not be sharded) and rank 0 writes the checkpoints and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from overhead import MLP  # the benchmarks' MLP: benchmarks/ is this script's directory

from lossless_trainer import Trainer


@dataclass(frozen=True)
class Case:
    name: str
    dims: tuple[int, ...]
    batch_size: int
    steps: int
    every: int
    rounds: int


CASES = [
    Case("medium", (784, 1024, 1024, 10), batch_size=256, steps=60, every=10, rounds=5),
    Case("100M", (4096,) * 7, batch_size=8, steps=24, every=8, rounds=2),
]


def one_fit(case: Case, mode: str, batches: list, root: str, index: int,
            layout: dict[str, str]) -> float:
    torch.manual_seed(0)
    model = MLP(case.dims)
    options = {"keep_last": 0} if mode == "none" else {
        "checkpoint_every": case.every, "keep_last": 1,
        "async_checkpoint": mode == "async"}
    trainer = Trainer(model, batches, max_steps=case.steps, log_dir=f"{root}/{mode}-{index}",
                      progress=False, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
                      **layout, **options)
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def bench(case: Case, quick: bool, root: str, layout: dict[str, str]
          ) -> dict[str, list[float]]:
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(case.batch_size, case.dims[0], generator=generator),
                torch.randint(0, case.dims[-1], (case.batch_size,), generator=generator))
               for _ in range(4)] * (case.steps // 4 + 1)
    times: dict[str, list[float]] = {"none": [], "blocking": [], "async": []}
    rounds = 1 if quick else case.rounds
    one_fit(case, "blocking", batches, root, -1, layout)  # warm-up: allocator, page cache
    for index in range(rounds):
        for mode in times:
            times[mode].append(one_fit(case, mode, batches, root, index, layout))
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, the medium case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], default=None,
                        help="cases to run (default: all)")
    parser.add_argument("--format", choices=["full", "sharded"], default="full",
                        help="checkpoint_format (sharded: every rank writes its own shards)")
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                        help="under torchrun: how the model is distributed")
    args = parser.parse_args(argv)
    layout = {"checkpoint_format": args.format, "strategy": args.strategy}
    torch.set_num_threads(args.threads)
    cases = [c for c in CASES if args.cases is None or c.name in args.cases]
    cases = cases[:1] if args.quick else cases
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"torch {torch.__version__}, {args.threads} threads, "
              f"{os.environ.get('WORLD_SIZE', '1')} process(es), {args.format} checkpoints, "
              f"{args.strategy}")
        header = (f"{'case':<8} {'mode':<9} {'fit s':>8} {'ratio':>6} {'saves':>5} "
                  f"{'stall/save s':>12}")
        print(header)
        print("-" * len(header))
    for case in cases:
        # Every rank must name the same run directories: under torchrun, by the run's id.
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        with (contextlib.nullcontext(f"lt-ckpt-{run_id}") if run_id else
              tempfile.TemporaryDirectory(prefix="lt-ckpt-", dir=".")) as root:
            times = bench(case, args.quick, root, layout)
        if run_id:  # every rank is done with the directories: rank 0 removes them
            torch.distributed.barrier()
            if rank == 0:
                shutil.rmtree(f"lt-ckpt-{run_id}", ignore_errors=True)
        if rank != 0:
            continue
        none = statistics.median(times["none"])
        saves = case.steps // case.every
        for mode, values in times.items():
            median = statistics.median(values)
            stall = (median - none) / saves if mode != "none" else 0.0
            print(f"{case.name:<8} {mode:<9} {median:>8.2f} {median / none:>6.2f} "
                  f"{saves if mode != 'none' else 0:>5} {stall:>12.3f}", flush=True)
    if rank == 0:
        print("ratio: fit time over the run with no checkpoints (medians over interleaved "
              "rounds); a fit ends with a save that it waits for, in both modes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
