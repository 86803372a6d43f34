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
  inside ``fit()`` and are therefore included, amortised over the run. Checkpointing is
  off (``keep_last=0``): the end-of-training save is a one-off cost, not per-step.
* The raw loop is ``loss = sum of model(batch).values(); loss.backward(); opt.step();
  opt.zero_grad(set_to_none=True)``. The sum is a left fold starting from the first loss
  (as the trainer does), not builtin ``sum()``, whose implicit ``0 + loss`` would add a
  tensor op and an autograd node to the raw side only.
* glibc's malloc returns freed heap memory to the OS and re-faults it later, and how often
  depends on which small objects happen to stay alive; on the medium case this alone made
  the trainer look 1-3% *faster* than the raw loop (about 1400 against 1950 minor page
  faults per step). By default the script therefore fixes glibc's trim and mmap
  thresholds with ``mallopt`` at startup (``--default-malloc`` keeps glibc's dynamic
  behaviour), and the table shows minor page faults per step for both paths.
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
import ctypes
import gc
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

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


def raw_loop_bf16(model: nn.Module, optimizer: torch.optim.Optimizer,
                  batches: Sequence[Batch]) -> None:
    """`raw_loop` with the forward (and so the loss) under bf16 autocast."""
    for batch in batches:
        with torch.autocast(batch[0].device.type, dtype=torch.bfloat16):
            losses = iter(model(batch).values())
            loss = next(losses)
            for extra in losses:
                loss = loss + extra
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def raw_loop_accumulate(model: nn.Module, optimizer: torch.optim.Optimizer,
                        batches: Sequence[Batch], every: int = 4) -> None:
    """`raw_loop` accumulating `every` micro-batches per optimizer step."""
    for start in range(0, len(batches), every):
        for batch in batches[start:start + every]:
            losses = iter(model(batch).values())
            loss = next(losses)
            for extra in losses:
                loss = loss + extra
            (loss / every).backward()
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
    Case("tiny", (16, 64, 4), batch_size=64, steps=2000, quick_steps=200, rounds=11,
         target=1.05),
    Case("medium", (784, 1024, 1024, 10), batch_size=256, steps=150, quick_steps=10,
         rounds=7, target=1.02, distinct_batches=16),
    Case("tiny-bf16", (16, 64, 4), batch_size=64, steps=2000, quick_steps=200, rounds=7,
         target=1.05, trainer_kwargs={"precision": "bf16"}, raw=raw_loop_bf16),
    Case("tiny-accum4", (16, 64, 4), batch_size=64, steps=2000, quick_steps=200, rounds=7,
         target=1.05, trainer_kwargs={"grad_accum_steps": 4}, raw=raw_loop_accumulate),
]


class Run(NamedTuple):
    """One timed run."""

    seconds_per_step: float
    faults_per_step: float
    model: MLP


@dataclass
class Result:
    """Timings of one case, in seconds per step, one entry per timed run."""

    case: Case
    steps: int
    trainer: list[float]
    raw: list[float]
    weights_match: bool
    trainer_faults: list[float] = field(default_factory=list)
    raw_faults: list[float] = field(default_factory=list)

    def add(self, trainer: bool, run: Run) -> None:
        """Record one timed run of the trainer (`trainer` true) or of the raw loop."""
        (self.trainer if trainer else self.raw).append(run.seconds_per_step)
        (self.trainer_faults if trainer else self.raw_faults).append(run.faults_per_step)

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
        """Interquartile range / median: the run-to-run noise of one path."""
        if len(values) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return (q3 - q1) / statistics.median(values)


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


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(body: Callable[[], Any], model: MLP, steps: int, device: torch.device) -> Run:
    """Run `body` once on a collected heap and a synchronised device, and time it."""
    gc.collect()
    synchronize(device)
    faults = minor_faults()
    start = time.perf_counter()
    body()
    synchronize(device)
    elapsed = time.perf_counter() - start
    return Run(elapsed / steps, (minor_faults() - faults) / steps, model)


def run_trainer(case: Case, batches: list[Batch], device: torch.device, seed: int,
                log_dir: str) -> Run:
    """Time one `Trainer.fit` pass; the `Trainer` is built before the clock starts."""
    model, optimizer = build(case, device, seed)
    # keep_last=0: no end-of-training checkpoint. It is a one-off cost (about 1 ms for
    # tiny, 70 ms for medium with its AdamW state), not per-step overhead.
    # Times are per batch on both sides; with accumulation a step takes several.
    steps = len(batches) // case.trainer_kwargs.get("grad_accum_steps", 1)
    trainer = Trainer(model, batches, optimizer=optimizer, max_steps=steps,
                      log_dir=log_dir, device=device, progress=False, keep_last=0,
                      **case.trainer_kwargs)
    run = timed(trainer.fit, model, len(batches), device)
    if trainer.state.step != steps:
        raise RuntimeError(f"trainer ran {trainer.state.step} steps, expected {steps}")
    return run


def run_raw(case: Case, batches: list[Batch], device: torch.device, seed: int) -> Run:
    """Time one hand-written pass over `batches`."""
    model, optimizer = build(case, device, seed)
    return timed(lambda: case.raw(model, optimizer, batches), model, len(batches), device)


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

    def trainer_run() -> Run:
        log_dir = os.path.join(log_root, f"{case.name}-{next(run_id)}")
        return run_trainer(case, batches, device, seed, log_dir)

    trained = trainer_run().model  # warm-up: imports, allocator, writer classes
    raw_trained = run_raw(case, batches, device, seed).model
    result = Result(case, steps, [], [], same_weights(trained, raw_trained))
    del trained, raw_trained
    for i in range(rounds):
        for is_trainer in ((True, False) if i % 2 == 0 else (False, True)):
            run = trainer_run() if is_trainer else run_raw(case, batches, device, seed)
            result.add(is_trainer, run._replace(model=None))
    return result


def pin_malloc() -> bool:
    """Stop glibc from returning freed heap memory to the OS between steps.

    Sets fixed trim and mmap thresholds (which also turns off glibc's dynamic threshold),
    so both paths run on a warm heap whatever objects each happens to keep alive.

    Returns:
        Whether the thresholds were set (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 1 << 30)
                    and libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):
        return False


def machine_line(device: torch.device, malloc: str) -> str:
    """Platform, CPU count, versions, threads and allocator mode, for the report header."""
    return (f"machine: {platform.platform()} | {os.cpu_count()} CPUs | "
            f"python {platform.python_version()} | torch {torch.__version__} | "
            f"threads {torch.get_num_threads()} | device {device} | malloc {malloc}")


def print_table(results: list[Result]) -> None:
    """One row per case: medians per step, ratio, overhead, target verdict."""
    header = (f"{'case':<11} {'steps':>5} {'runs':>4} {'trainer us/step':>15} "
              f"{'raw us/step':>11} {'ratio':>6} {'paired':>6} {'overhead us':>11} "
              f"{'IQR T/R':>11} {'faults/step T/R':>15} {'target':>7}  verdict")
    print(header)
    print("-" * len(header))
    for r in results:
        verdict = "PASS" if r.ratio <= r.case.target else "MISS"
        noise = f"{Result.spread(r.trainer):.1%}/{Result.spread(r.raw):.1%}"
        faults = (f"{statistics.median(r.trainer_faults):.0f}/"
                  f"{statistics.median(r.raw_faults):.0f}")
        print(f"{r.case.name:<11} {r.steps:>5} {len(r.trainer):>4} "
              f"{r.trainer_median * 1e6:>15.1f} {r.raw_median * 1e6:>11.1f} "
              f"{r.ratio:>6.3f} {r.paired_ratio:>6.3f} "
              f"{(r.trainer_median - r.raw_median) * 1e6:>11.1f} {noise:>11} {faults:>15} "
              f"{'<=' + format(r.case.target, '.2f'):>7}  {verdict}"
              + ("" if r.weights_match else "  (WARNING: final weights differ)"))
    print("ratio = median trainer / median raw; paired = median of per-round ratios; "
          "IQR = interquartile range/median of the runs; faults = minor page faults")
    for r in results:
        noise = max(Result.spread(r.trainer), Result.spread(r.raw))
        if noise > abs(r.ratio - r.case.target):
            print(f"note: {r.case.name}: run-to-run noise ({noise:.1%}) exceeds the distance "
                  "between ratio and target; treat its verdict with caution")


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
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's dynamic trim/mmap thresholds (see the module docs)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.default_malloc:
        malloc = "default"
    else:
        malloc = "pinned thresholds" if pin_malloc() else "default (mallopt unavailable)"
    device = torch.empty(0, device=args.device).device
    cases = [case for case in CASES if args.cases is None or case.name in args.cases]
    if args.steps is not None:
        cases = [replace(case, steps=args.steps, quick_steps=args.steps) for case in cases]
    print(machine_line(device, malloc), flush=True)
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
