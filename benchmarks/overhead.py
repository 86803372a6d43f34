"""Per-step overhead of `Trainer.fit` against the equivalent hand-written PyTorch loop.

Method:

* One process, one device, a fixed number of intra-op threads (``--threads``, default 1:
  steadier timings on a small machine, and it leaves a core for the trainer's background
  writer thread, as a real run would).
* Each case builds a list of pre-made ``(x, y)`` batches already on the device, so no data
  loading is timed. Both paths train the same `Model` subclass, whose forward computes a
  cross-entropy loss and calls `write_summary` once per step with a 0-d tensor computed
  from the activations. Outside `Trainer.fit`, `write_summary` is a no-op, so the raw loop
  does the same tensor work minus the framework's bookkeeping.
* Every run starts from a fresh model and optimizer (AdamW, lr 1e-3, the trainer's
  default) built after ``torch.manual_seed(seed)``, and runs one pass over the batches.
* Trainer runs use the default logging (``log_every=50``, TensorBoard and JSON-lines
  writers into a temporary directory) with the progress bar off. Only ``fit()`` is timed;
  the `Trainer` is constructed before the clock starts. Writer setup and teardown happen
  inside ``fit()`` and are therefore included, amortised over the run.
* The raw loop is ``loss = sum of model(batch).values(); loss.backward(); opt.step();
  opt.zero_grad(set_to_none=True)``. The sum is a left fold starting from the first loss
  (as the trainer does), not builtin ``sum()``, whose implicit ``0 + loss`` would add a
  tensor op and an autograd node to the raw side only.
* A warm-up pair runs first (untimed) and checks that both paths end with bitwise-equal
  weights, i.e. that they really do the same work. Then trainer and raw runs are
  interleaved for several rounds, alternating which goes first, with `gc.collect()` before
  each run; the report gives medians of seconds per step.

Usage::

    python benchmarks/overhead.py            # full run, about 1-2 minutes on 2 CPU cores
    python benchmarks/overhead.py --quick    # smoke run, a few seconds

The exit status is always 0: this is a benchmark, not a test. New cases (bf16, gradient
accumulation, ...) are new entries in `CASES`; a case can pass extra `Trainer` options
and its own raw loop.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lossless_trainer import Model, Trainer, write_summary

Batch = tuple[torch.Tensor, torch.Tensor]
RawLoop = Callable[[nn.Module, torch.optim.Optimizer, Sequence[Batch]], None]


class MLP(Model):
    """A ReLU MLP classifier that owns its loss and logs one scalar summary per step.

    Args:
        dims: Layer widths, input first, number of classes last.
    """

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(fan_in, fan_out))
        self.net = nn.Sequential(*layers)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor] | torch.Tensor:
        """Losses ``{"ce": ...}`` in training mode, logits in eval mode."""
        x, y = batch
        logits = self.net(x)
        if not self.training:
            return logits
        write_summary("logits/abs_mean", logits.detach().abs().mean())
        return {"ce": F.cross_entropy(logits, y)}


def raw_loop(model: nn.Module, optimizer: torch.optim.Optimizer,
             batches: Sequence[Batch]) -> None:
    """The hand-written equivalent of one `Trainer.fit` pass over `batches`.

    Args:
        model: The model, in training mode.
        optimizer: An optimizer over the model's parameters.
        batches: Batches already on the model's device.
    """
    for batch in batches:
        losses = iter(model(batch).values())
        loss = next(losses)
        for extra in losses:
            loss = loss + extra
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@dataclass(frozen=True)
class Case:
    """One benchmark configuration.

    Attributes:
        name: Short label for the table.
        dims: MLP layer widths, input first.
        batch_size: Rows per batch.
        steps: Optimizer steps per timed run (full mode).
        quick_steps: Steps per timed run with ``--quick``.
        rounds: Timed trainer/raw pairs (full mode).
        target: Pass if median trainer time / median raw time is at most this.
        distinct_batches: Distinct batch tensors; the run cycles through them, which keeps
            memory bounded for the larger cases.
        trainer_kwargs: Extra `Trainer` options for this case.
        raw: The raw loop matching those options.
    """

    name: str
    dims: tuple[int, ...]
    batch_size: int
    steps: int
    quick_steps: int
    rounds: int
    target: float
    distinct_batches: int = 64
    trainer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    raw: RawLoop = raw_loop


CASES: list[Case] = [
    Case("tiny", (16, 64, 4), batch_size=64, steps=2000, quick_steps=200, rounds=9,
         target=1.05),
    Case("medium", (784, 1024, 1024, 10), batch_size=256, steps=150, quick_steps=10,
         rounds=5, target=1.02, distinct_batches=16),
]


@dataclass
class Result:
    """Timings of one case, in seconds per step, one entry per timed run."""

    case: Case
    steps: int
    trainer: list[float]
    raw: list[float]
    weights_match: bool

    @property
    def trainer_median(self) -> float:
        return statistics.median(self.trainer)

    @property
    def raw_median(self) -> float:
        return statistics.median(self.raw)

    @property
    def ratio(self) -> float:
        return self.trainer_median / self.raw_median

    @property
    def paired_ratio(self) -> float:
        """Median over rounds of trainer/raw within the round; robust to slow drift."""
        return statistics.median(t / r for t, r in zip(self.trainer, self.raw))

    @staticmethod
    def spread(values: list[float]) -> float:
        """(max - min) / median: the run-to-run noise of one path."""
        return (max(values) - min(values)) / statistics.median(values)


def make_batches(case: Case, steps: int, device: torch.device, seed: int) -> list[Batch]:
    """`steps` batches on `device`, cycling through `case.distinct_batches` tensors."""
    generator = torch.Generator().manual_seed(seed)
    pool = [
        (torch.randn(case.batch_size, case.dims[0], generator=generator).to(device),
         torch.randint(0, case.dims[-1], (case.batch_size,), generator=generator).to(device))
        for _ in range(min(case.distinct_batches, steps))
    ]
    return [pool[i % len(pool)] for i in range(steps)]


def build(case: Case, device: torch.device, seed: int) -> tuple[MLP, torch.optim.Optimizer]:
    """A fresh model and optimizer, identical for every run with the same seed."""
    torch.manual_seed(seed)
    model = MLP(case.dims).to(device)
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_trainer(case: Case, batches: list[Batch], device: torch.device, seed: int,
                log_dir: str) -> tuple[float, MLP]:
    """Time one `Trainer.fit` pass. Returns (seconds per step, trained model)."""
    model, optimizer = build(case, device, seed)
    trainer = Trainer(model, batches, optimizer=optimizer, max_steps=len(batches),
                      log_dir=log_dir, device=device, progress=False, **case.trainer_kwargs)
    gc.collect()
    synchronize(device)
    start = time.perf_counter()
    state = trainer.fit()
    synchronize(device)
    elapsed = time.perf_counter() - start
    if state.step != len(batches):
        raise RuntimeError(f"trainer ran {state.step} steps, expected {len(batches)}")
    return elapsed / len(batches), model


def run_raw(case: Case, batches: list[Batch], device: torch.device,
            seed: int) -> tuple[float, MLP]:
    """Time one hand-written pass. Returns (seconds per step, trained model)."""
    model, optimizer = build(case, device, seed)
    gc.collect()
    synchronize(device)
    start = time.perf_counter()
    case.raw(model, optimizer, batches)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return elapsed / len(batches), model


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold bitwise-equal parameters."""
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def bench_case(case: Case, device: torch.device, quick: bool, rounds: int | None,
               seed: int, log_root: str) -> Result:
    """Warm up, check equivalence, then time interleaved trainer and raw runs."""
    steps = case.quick_steps if quick else case.steps
    rounds = rounds or (2 if quick else case.rounds)
    batches = make_batches(case, steps, device, seed)
    run_id = iter(range(sys.maxsize))

    def trainer_run() -> tuple[float, MLP]:
        log_dir = os.path.join(log_root, f"{case.name}-{next(run_id)}")
        return run_trainer(case, batches, device, seed, log_dir)

    _, trained = trainer_run()  # warm-up: imports, allocator, writer classes
    _, raw_trained = run_raw(case, batches, device, seed)
    result = Result(case, steps, [], [], same_weights(trained, raw_trained))
    del trained, raw_trained
    for i in range(rounds):
        if i % 2 == 0:
            result.trainer.append(trainer_run()[0])
            result.raw.append(run_raw(case, batches, device, seed)[0])
        else:
            result.raw.append(run_raw(case, batches, device, seed)[0])
            result.trainer.append(trainer_run()[0])
    return result


def machine_line(device: torch.device) -> str:
    """Platform, CPU count, versions and threads, for the report header."""
    return (f"machine: {platform.platform()} | {os.cpu_count()} CPUs | "
            f"python {platform.python_version()} | torch {torch.__version__} | "
            f"threads {torch.get_num_threads()} | device {device}")


def print_table(results: list[Result]) -> None:
    """One row per case: medians per step, ratio, overhead, target verdict."""
    header = (f"{'case':<8} {'steps':>5} {'runs':>4} {'trainer us/step':>15} "
              f"{'raw us/step':>11} {'ratio':>6} {'paired':>6} {'overhead us':>11} "
              f"{'noise T/R':>11} {'target':>7}  verdict")
    print(header)
    print("-" * len(header))
    for r in results:
        verdict = "PASS" if r.ratio <= r.case.target else "MISS"
        noise = f"{Result.spread(r.trainer):.1%}/{Result.spread(r.raw):.1%}"
        print(f"{r.case.name:<8} {r.steps:>5} {len(r.trainer):>4} "
              f"{r.trainer_median * 1e6:>15.1f} {r.raw_median * 1e6:>11.1f} "
              f"{r.ratio:>6.3f} {r.paired_ratio:>6.3f} "
              f"{(r.trainer_median - r.raw_median) * 1e6:>11.1f} {noise:>11} "
              f"{'<=' + format(r.case.target, '.2f'):>7}  {verdict}"
              + ("" if r.weights_match else "  (WARNING: final weights differ)"))
    print("ratio = median trainer / median raw; paired = median of per-round ratios; "
          "noise = (max-min)/median of the runs")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, 2 rounds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed trainer/raw pairs per case (default: per case)")
    parser.add_argument("--cases", nargs="+", default=None,
                        choices=[case.name for case in CASES], help="cases to run")
    parser.add_argument("--steps", type=int, default=None,
                        help="override steps per run for every case")
    parser.add_argument("--device", default="cpu", help="device to train on (default: cpu)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.empty(0, device=args.device).device
    cases = [case for case in CASES if args.cases is None or case.name in args.cases]
    if args.steps is not None:
        cases = [replace(case, steps=args.steps, quick_steps=args.steps) for case in cases]
    print(machine_line(device), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="lt-overhead-") as log_root:
        for case in cases:
            started = time.perf_counter()
            results.append(bench_case(case, device, args.quick, args.rounds, args.seed,
                                      log_root))
            print(f"  {case.name}: done in {time.perf_counter() - started:.1f}s", flush=True)
    print()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
