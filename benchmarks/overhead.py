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
* **Interleaved inside one run.** The speed of a shared VM drifts by 10-30% within
  seconds, so two runs timed one after the other, even alternating, differ by more than
  the overhead being measured. Each round is therefore one `Trainer.fit` whose data is an
  `Interleaved` iterable: before handing the Trainer each chunk of ``--chunk`` batches
  (default per case, 50 for tiny), it runs equal copies of the same batches through the
  hand-written loop on a twin model (same seed, same initial weights, its own
  optimizer), and times both sides. A trainer chunk is timed from the end of the raw
  chunk before it to the moment the Trainer asks for the next batch, so it contains
  everything the Trainer does per step (checks, hooks, summaries, flushes, writer
  hand-overs). Trainer and raw chunks of the same batches are a few milliseconds apart,
  so drift affects both alike. The raw chunks run with summaries off, exactly as
  outside `fit`.
* The ratio of a round is the Trainer's total chunk time over the raw loop's, over the
  chunks after the first (warm-up); the reported ratio is the median over rounds. The
  per-step times are medians over rounds too.
* **Checked.** At the end of every round, the Trainer's model and the twin must hold
  bitwise-equal weights: both really did the same work on the same batches.
* **What a call to fit() costs once** (creating and closing the writers, the resume
  check, the last flush) is not per-step overhead, so it is measured apart: short
  `fit()` calls against the same few raw steps, minus the per-step overhead. It is
  printed as ``fit() ms``: a few milliseconds, once per call.
* Trainer runs use the default logging (``log_every=50``, TensorBoard and JSON-lines
  writers into a temporary directory) with the progress bar off, and checkpointing off
  (``keep_last=0``): the end-of-training save is a one-off cost, not per-step.
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

Usage::

    python benchmarks/overhead.py            # full run, about 8 minutes on 2 CPU cores
    python benchmarks/overhead.py --cases tiny medium   # a few of them
    python benchmarks/overhead.py --quick    # smoke run, a few seconds
    torchrun --standalone --nproc_per_node=2 benchmarks/overhead.py   # the DDP cases

The exit status is always 0: this is a benchmark, not a test. New cases (bf16, gradient
accumulation, ...) are new entries in `CASES`; a case can pass extra `Trainer` options,
its own model, batches and raw loop.

The ``gpt2`` cases train a Hugging Face ``GPT2LMHeadModel`` (built from a config, 0.1 M
parameters, padded batches of 8 sequences of 8 to 64 tokens) through
`adapters.HuggingFace`, against a hand-written loop on the bare model:
``model(**batch).loss.backward()`` for ``gpt2`` (``token_mean=None``), and for
``gpt2-accum4`` the loop Hugging Face's own Trainer runs for an exact token mean under
accumulation: count the step's label tokens first, then backpropagate each micro-batch's
loss as a sum (``num_items_in_batch``) over that count. They run when transformers is
installed.

``tiny-ddp`` runs under torchrun only (2 processes, gloo on CPU): the Trainer, which
wraps the model in DistributedDataParallel itself, against a hand-written loop over a
DDP model, interleaved in the same job; it measures what the Trainer's collectives (the
stop agreement, the flushes' gather) add to each step.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import importlib.util
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from lossless_trainer import Mean, Model, Trainer, is_summary_step, summary_scope, write_summary
from lossless_trainer.summary import summaries_off

Batch = Any  # (x, y) for the MLP cases, a dict of keyword tensors for the gpt2 ones
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


class MeanMLP(MLP):
    """`MLP` whose loss is an exact mean over a varying number of rows: rows of class 0
    count as padding, so each batch's loss is ``Mean(summed cross-entropy of the other
    rows, their number)``, and `count_items` gives that number before the forward."""

    def forward(self, batch: Batch) -> dict[str, Any] | torch.Tensor:
        x, y = batch
        logits = self.net(x)
        if not self.training:
            return logits
        write_summary("logits/abs_mean", logits.detach().abs().mean())
        real = y != 0
        nll = F.cross_entropy(logits, y.masked_fill(~real, -100), reduction="sum")
        return {"ce": Mean(nll, real.sum())}

    def count_items(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"ce": (batch[1] != 0).sum()}


class SummaryMLP(MLP):
    """`MLP` that writes summaries as a detector or a multi-task model does: 20 scalars
    per step from three nested scopes (``heads/head<i>/<part>/<stat>``), and a
    histogram of its logits on summary steps. The raw loop calls the same forward, so it
    computes the same values; outside `fit`, `write_summary` does nothing with them."""

    def forward(self, batch: Batch) -> dict[str, torch.Tensor] | torch.Tensor:
        x, y = batch
        logits = self.net(x)
        if not self.training:
            return logits
        detached = logits.detach()
        with summary_scope("heads"):
            for head in range(2):
                with summary_scope(f"head{head}"):
                    for part, values in (("logits", detached), ("probs", detached.softmax(-1))):
                        with summary_scope(part):
                            write_summary("mean", values.mean())
                            write_summary("abs_mean", values.abs().mean())
                            write_summary("std", values.std())
                            write_summary("max", values.max())
                            write_summary("min", values.min())
        if is_summary_step():
            write_summary("logits", detached, kind="histogram")
        return {"ce": F.cross_entropy(logits, y)}


def raw_loop(model: nn.Module, optimizer: torch.optim.Optimizer,
             batches: Sequence[Batch], read_loss: bool = False) -> None:
    """The hand-written equivalent of one `Trainer.fit` pass over `batches`.

    Args:
        model: The model, in training mode.
        optimizer: An optimizer over the model's parameters.
        batches: Batches already on the model's device.
        read_loss: Read the loss with ``.item()`` every step for a running average, as
            the loop is usually written (`raw_loop_idiomatic`): a host sync per step on
            an accelerator.
    """
    running = 0.0
    for batch in batches:
        losses = iter(model(batch).values())
        loss = next(losses)
        for extra in losses:
            loss = loss + extra
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if read_loss:
            running += loss.item()


raw_loop_idiomatic = functools.partial(raw_loop, read_loss=True)


def two_optimizers(model: nn.Module) -> list[torch.optim.Optimizer]:
    """SGD with momentum for the first layer, AdamW for the rest: the ``tiny-2opt`` case's
    optimizers (the Trainer gets them as a list, the raw loop steps both)."""
    first, *rest = [layer for layer in model.modules() if isinstance(layer, nn.Linear)]
    return [torch.optim.SGD(first.parameters(), lr=1e-2, momentum=0.9),
            torch.optim.AdamW([p for layer in rest for p in layer.parameters()], lr=1e-3)]


def raw_loop_two(model: nn.Module, optimizers: list[torch.optim.Optimizer],
                 batches: Sequence[Batch]) -> None:
    """`raw_loop` with several optimizers: one backward, then each steps, then each drops
    its gradients."""
    for batch in batches:
        losses = iter(model(batch).values())
        loss = next(losses)
        for extra in losses:
            loss = loss + extra
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        for optimizer in optimizers:
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


def raw_loop_mean_accumulate(model: nn.Module, optimizer: torch.optim.Optimizer,
                             batches: Sequence[Batch], every: int = 4) -> None:
    """The careful hand-written loop for `MeanMLP` under accumulation: count the step's
    real rows first, then backpropagate each micro-batch's summed loss times one over
    that count (the reciprocal taken in float64, as the Trainer does)."""
    for start in range(0, len(batches), every):
        group = batches[start:start + every]
        count: Any = 0
        for batch in group:
            count = count + model.count_items(batch)["ce"]
        scale = (1.0 / count.double()).float()
        for batch in group:
            mean = model(batch)["ce"]
            (mean.total * scale).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def gpt2(dims: Sequence[int], token_mean: str | None = None) -> nn.Module:
    """A tiny ``GPT2LMHeadModel`` through `adapters.HuggingFace`: vocabulary dims[0], width
    dims[1], dims[2] layers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lossless_trainer.adapters import HuggingFace

    vocab, width, layers = dims
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=width, n_layer=layers,
                        n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        loss_type="ForCausalLM")
    return HuggingFace(GPT2LMHeadModel(config), token_mean=token_mean)


def gpt2_tokens(dims: Sequence[int]) -> nn.Module:
    return gpt2(dims, token_mean="shifted")


def lm_batch(case: Case, generator: torch.Generator) -> Batch:
    """A causal-LM batch: sequences of 8 to 64 tokens padded to 64, labels -100 there."""
    ids = torch.randint(0, case.dims[0], (case.batch_size, 64), generator=generator)
    lengths = torch.randint(8, 65, (case.batch_size, 1), generator=generator)
    mask = (torch.arange(64) < lengths).long()
    return {"input_ids": ids, "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100)}


def raw_loop_hf(model: nn.Module, optimizer: torch.optim.Optimizer,
                batches: Sequence[Batch], read_loss: bool = False) -> None:
    """The hand-written loop on the bare Hugging Face model: its own loss (read with
    ``.item()`` every step with `read_loss`: `raw_loop_hf_idiomatic`)."""
    net = model.model
    running = 0.0
    for batch in batches:
        loss = net(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if read_loss:
            running += loss.item()


raw_loop_hf_idiomatic = functools.partial(raw_loop_hf, read_loss=True)


def raw_loop_hf_tokens(model: nn.Module, optimizer: torch.optim.Optimizer,
                       batches: Sequence[Batch], every: int = 4) -> None:
    """Hugging Face's exact token mean under accumulation, by hand on the bare model:
    the step's label tokens counted first, each micro-batch's loss a sum over its
    tokens (``num_items_in_batch``), scaled by one over the step's count."""
    net = model.model
    for start in range(0, len(batches), every):
        group = batches[start:start + every]
        counts = [batch["labels"][:, 1:].ne(-100).sum() for batch in group]
        scale = 1 / sum(float(n) for n in counts)
        for batch, n in zip(group, counts):
            loss = net(**batch, num_items_in_batch=n.clamp(min=1)).loss * n
            (loss * scale).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def mlp_batch(case: Case, generator: torch.Generator) -> Batch:
    return (torch.randn(case.batch_size, case.dims[0], generator=generator),
            torch.randint(0, case.dims[-1], (case.batch_size,), generator=generator))


@dataclass(frozen=True)
class Case:
    """One benchmark configuration.

    Attributes:
        name: Short label for the table.
        dims: MLP layer widths, input first.
        batch_size: Rows per batch.
        steps: Batches per round (full mode); with accumulation, several make a step.
        quick_steps: Batches per round with ``--quick``.
        rounds: Timed rounds, one `Trainer.fit` each (full mode).
        chunk: Batches per interleaved chunk: the raw loop runs this many, then the
            Trainer does. A multiple of the accumulation.
        target: Pass if the median Trainer/raw ratio is at most this.
        distinct_batches: Distinct batch tensors; the run cycles through them, which keeps
            memory bounded for the larger cases.
        trainer_kwargs: Extra `Trainer` options for this case.
        raw: The raw loop matching those options.
        model: The model class (or a function), built with `dims`.
        batch: Makes one batch of the case from a generator.
        needs: A module the case needs (skipped without it).
        processes: How many processes it runs on: 1, or under torchrun that many (the
            raw loop then wraps its model in DistributedDataParallel, and every rank
            draws its own batches). Only the cases for the current number run.
        idiomatic: The raw loop as usually written (``.item()`` every step), timed
            too with ``--idiomatic`` (the default on CUDA); None: not for this case.
        optimizers: Builds the optimizers from the model, for both sides (default: one
            AdamW with lr 1e-3).
    """

    name: str
    dims: tuple[int, ...]
    batch_size: int
    steps: int
    quick_steps: int
    rounds: int
    chunk: int
    target: float | None
    distinct_batches: int = 64
    trainer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    raw: RawLoop = raw_loop
    model: Callable[[tuple[int, ...]], nn.Module] = MLP
    batch: Callable[[Case, torch.Generator], Batch] = mlp_batch
    needs: str | None = None
    processes: int = 1
    idiomatic: RawLoop | None = None
    optimizers: Callable[[nn.Module], Any] | None = None

    @property
    def accumulation(self) -> int:
        return int(self.trainer_kwargs.get("grad_accum_steps", 1))


CASES: list[Case] = [
    Case("tiny", (16, 64, 4), batch_size=64, steps=2000, quick_steps=200, rounds=21,
         chunk=50, target=1.05, idiomatic=raw_loop_idiomatic),
    Case("medium", (784, 1024, 1024, 10), batch_size=256, steps=100, quick_steps=30,
         rounds=5, chunk=10, target=1.02, distinct_batches=16, idiomatic=raw_loop_idiomatic),
    Case("tiny-log1", (16, 64, 4), batch_size=64, steps=2000, quick_steps=200, rounds=7,
         chunk=50, target=1.10, trainer_kwargs={"log_every": 1}),
    Case("summary-heavy", (16, 64, 4), batch_size=64, steps=2000, quick_steps=200, rounds=7,
         chunk=50, target=1.03, model=SummaryMLP),
    Case("tiny-2opt", (16, 64, 4), batch_size=64, steps=2000, quick_steps=200, rounds=7,
         chunk=50, target=1.05, raw=raw_loop_two, optimizers=two_optimizers),
    Case("tiny-ddp", (16, 64, 4), batch_size=64, steps=2000, quick_steps=200, rounds=7,
         chunk=50, target=1.05, processes=2),
    Case("tiny-bf16", (16, 64, 4), batch_size=64, steps=1000, quick_steps=200, rounds=7,
         chunk=50, target=None, trainer_kwargs={"precision": "bf16"}, raw=raw_loop_bf16),
    Case("tiny-accum4", (16, 64, 4), batch_size=64, steps=2000, quick_steps=200, rounds=7,
         chunk=48, target=None, trainer_kwargs={"grad_accum_steps": 4},
         raw=raw_loop_accumulate),
    Case("tiny-mean-accum4", (16, 64, 4), batch_size=64, steps=2000, quick_steps=200,
         rounds=7, chunk=48, target=None, trainer_kwargs={"grad_accum_steps": 4},
         raw=raw_loop_mean_accumulate, model=MeanMLP),
    Case("gpt2", (256, 64, 2), batch_size=8, steps=400, quick_steps=60, rounds=7, chunk=20,
         target=None, raw=raw_loop_hf, model=gpt2, batch=lm_batch, needs="transformers",
         idiomatic=raw_loop_hf_idiomatic),
    # A small transformer for accelerators: 4 layers of width 256 (3.3 M parameters).
    Case("gpt2-small", (256, 256, 4), batch_size=16, steps=300, quick_steps=60, rounds=5,
         chunk=20, target=None, raw=raw_loop_hf, model=gpt2, batch=lm_batch,
         needs="transformers", idiomatic=raw_loop_hf_idiomatic),
    Case("gpt2-accum4", (256, 64, 2), batch_size=8, steps=400, quick_steps=60, rounds=7,
         chunk=20, target=None, trainer_kwargs={"grad_accum_steps": 4},
         raw=raw_loop_hf_tokens, model=gpt2_tokens, batch=lm_batch, needs="transformers"),
]


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Interleaved:
    """The Trainer's data: the case's batches, with a timed raw-loop chunk before each
    chunk the Trainer gets.

    Before yielding batch ``i`` (for ``i`` a chunk start: 0, then `phase` and every
    `chunk` after it), it runs the chunk's batches through `raw` on the twin
    model, with summaries off, and records how long that took; it also records how long
    the Trainer took over the previous chunk (from the end of the raw chunk before it
    until now). The Trainer's last chunk is never followed by a request, so it is not
    timed; nor is anything before `warmup`.

    Chunks start half a chunk off the multiples of `chunk`, so that the Trainer's
    flushes (every ``log_every`` steps, a multiple of the chunk or a divisor of it) fall
    inside its own chunks: the writer thread's work right after a flush then competes
    with the Trainer's steps, as in a real run, instead of with the raw loop's.

    Args:
        batches: The Trainer's batches, already on the device.
        raw_batches: Equal copies for the raw loop. Were both sides to share the batch
            tensors, the raw chunk would leave them in the cache for the Trainer's chunk
            right after it, which shows on models whose batches are large (medium).
        raw: The hand-written loop.
        twin: The raw loop's model and optimizer, built like the Trainer's.
        chunk: Batches per chunk.
        warmup: Batches at the start that are not timed (imports, allocator, first flush).
        device: Synchronised before each clock reading.
        phase: The second chunk's start (default ``chunk // 2``; a multiple of the
            accumulation); 0 starts chunks at the multiples of `chunk`.
        others: More hand-written loops, timed after `raw` on each chunk: (name, loop,
            its twin, its copies of the batches).
        host_batches: The batches are on the host: the raw loops move each one to
            `device` as they read it, as a hand-written loop does (`OnDevice`).
    """

    def __init__(self, batches: list[Batch], raw_batches: list[Batch], raw: RawLoop,
                 twin: tuple[nn.Module, torch.optim.Optimizer], chunk: int, warmup: int,
                 device: torch.device, phase: int | None = None,
                 others: Sequence[tuple[str, RawLoop, tuple[nn.Module, torch.optim.Optimizer],
                                        list[Batch]]] = (), host_batches: bool = False) -> None:
        self.batches, self.raw_batches, self.raw, self.twin = batches, raw_batches, raw, twin
        self.chunk, self.warmup, self.device = chunk, warmup, device
        self.phase = chunk // 2 if phase is None else phase
        self.others = others
        self.host_batches = host_batches
        # By chunk start: (seconds, minor faults) of each side.
        self.trainer: dict[int, tuple[float, int]] = {}
        self.raw_times: dict[int, tuple[float, int]] = {}
        # The other hand-written loops' seconds, by name and chunk start.
        self.other_times: dict[str, dict[int, float]] = {name: {} for name, *_ in others}

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        clock, chunk = time.perf_counter, self.chunk
        resumed: tuple[float, int] | None = None  # when the Trainer's chunk began
        previous = 0  # where it began
        starts = [0, *range(self.phase, len(self.batches), chunk)] if self.phase \
            else list(range(0, len(self.batches), chunk))
        for start, stop in zip(starts, [*starts[1:], len(self.batches)]):
            synchronize(self.device)
            now, faults = clock(), minor_faults()
            if resumed is not None and previous >= self.warmup:
                self.trainer[previous] = (now - resumed[0], faults - resumed[1])
            with summaries_off():  # as outside fit: write_summary does nothing
                self.raw(*self.twin, self.moved(self.raw_batches[start:stop]))
            synchronize(self.device)
            end, end_faults = clock(), minor_faults()
            if start >= self.warmup:
                self.raw_times[start] = (end - now, end_faults - faults)
            for name, loop, twin, batches in self.others:
                with summaries_off():
                    loop(*twin, self.moved(batches[start:stop]))
                synchronize(self.device)
                if start >= self.warmup:
                    self.other_times[name][start] = clock() - end
                end = clock()
            resumed, previous = (clock(), minor_faults()), start
            # The Trainer's batches come through this generator: one resume per batch
            # more than the raw loop's list iteration, counted against the Trainer.
            yield from self.batches[start:stop]

    def moved(self, batches: list[Batch]) -> Sequence[Batch]:
        """A raw chunk's batches: as they are, or moved as they are read when on the
        host (`host_batches`)."""
        return OnDevice(batches, self.device) if self.host_batches else batches

    def other_totals(self) -> dict[str, float]:
        """Each other loop's seconds over the chunks the Trainer was timed on."""
        return {name: sum(times[i] for i in self.trainer)
                for name, times in self.other_times.items()}

    def pairs(self) -> list[tuple[tuple[float, int], tuple[float, int]]]:
        """(Trainer, raw) timings of every chunk both sides were timed on."""
        # A timed Trainer chunk always follows a timed raw chunk of the same batches.
        return [(self.trainer[i], self.raw_times[i]) for i in sorted(self.trainer)]


class OnDevice(Sequence):
    """`batches` as a hand-written loop moves them: each batch copied to `device` with a
    plain ``.to(device)`` as it is read (nothing is copied if it is there already)."""

    def __init__(self, batches: Sequence[Batch], device: torch.device) -> None:
        self.batches, self.device = batches, device

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return OnDevice(self.batches[index], self.device)
        batch, device = self.batches[index], self.device
        if isinstance(batch, dict):  # as a hand-written loop moves them
            return {key: value.to(device) for key, value in batch.items()}
        return type(batch)(part.to(device) for part in batch)


@dataclass
class Round:
    """One `fit`: totals over its timed chunks, per batch; `others`: the other loops'."""

    trainer: float
    raw: float
    trainer_faults: float
    raw_faults: float
    weights_match: bool
    others: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.trainer / self.raw


@dataclass
class Result:
    """Every round of one case, and the one-off cost of a `fit()` call."""

    case: Case
    batches: int
    rounds: list[Round]
    fixed_seconds: float = 0.0  # measured after the rounds, from their overhead

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(r, attribute) for r in self.rounds)

    @property
    def ratio(self) -> float:
        return self.median("ratio")

    def ratio_to(self, name: str) -> float | None:
        """The median over rounds of Trainer / the other loop `name`, if it was timed."""
        ratios = [r.trainer / r.others[name] for r in self.rounds if r.others.get(name)]
        return statistics.median(ratios) if ratios else None

    @property
    def overhead(self) -> float:
        """Seconds the Trainer adds per batch: the median over rounds of the difference."""
        return statistics.median(r.trainer - r.raw for r in self.rounds)

    @property
    def weights_match(self) -> bool:
        return all(r.weights_match for r in self.rounds)

    def ratio_quartiles(self) -> tuple[float, float]:
        ratios = [r.ratio for r in self.rounds]
        if len(ratios) < 2:
            return ratios[0], ratios[0]
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        return q1, q3


def copies(batches: list[Batch]) -> list[Batch]:
    """Equal batches in tensors of their own, cycling like `batches` does."""
    made: dict[int, Batch] = {}
    return [made.setdefault(id(batch), pytree.tree_map(torch.clone, batch))
            for batch in batches]


def make_batches(case: Case, steps: int, device: torch.device, seed: int) -> list[Batch]:
    """`steps` batches on `device`, cycling through `case.distinct_batches` tensors."""
    generator = torch.Generator().manual_seed(seed)
    pool = [pytree.tree_map(lambda t: t.to(device), case.batch(case, generator))
            for _ in range(min(case.distinct_batches, steps))]
    return [pool[i % len(pool)] for i in range(steps)]


def build(case: Case, device: torch.device, seed: int, raw: bool = False
          ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh model and optimizer, identical for every run with the same seed; with
    `raw`, the hand-written loop's (in DDP for a case of several processes)."""
    torch.manual_seed(seed)
    model = case.model(case.dims).to(device)
    if raw and case.processes > 1:  # the hand-written DDP loop; the Trainer wraps its own
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    model.train()
    if case.optimizers is not None:
        return model, case.optimizers(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def make_trainer(case: Case, data: Any, device: torch.device, seed: int,
                 log_dir: str) -> Trainer:
    """The Trainer as a user would run it: default logging, no progress bar, and no
    checkpoints (the end-of-training save is a one-off cost, about 1 ms for tiny and
    70 ms for medium with its AdamW state, not per-step overhead)."""
    model, optimizer = build(case, device, seed)
    return Trainer(model, data, optimizer=optimizer, max_steps=len(data) // case.accumulation,
                   log_dir=log_dir, device=device, progress=False, keep_last=0,
                   **case.trainer_kwargs)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold bitwise-equal parameters."""
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def interleaved_round(case: Case, batches: list[Batch], chunk: int, device: torch.device,
                      seed: int, log_dir: str, idiomatic: bool = False) -> Round:
    """One `fit` over `batches`, interleaved chunk by chunk with the raw loop (and with
    `idiomatic`, with the case's idiomatic loop too)."""
    twin = build(case, device, seed, raw=True)
    others = []
    if idiomatic and case.idiomatic is not None:
        others.append(("idiomatic", case.idiomatic, build(case, device, seed, raw=True),
                       copies(batches)))
    data = Interleaved(batches, copies(batches), case.raw, twin, chunk, warmup=chunk,
                       device=device, phase=chunk // 2 // case.accumulation * case.accumulation,
                       others=others, host_batches=idiomatic)
    trainer = make_trainer(case, data, device, seed, log_dir)
    gc.collect()
    trainer.fit()
    if trainer.state.step != len(batches) // case.accumulation:
        raise RuntimeError(f"trainer ran {trainer.state.step} steps, expected "
                           f"{len(batches) // case.accumulation}")
    pairs = data.pairs()
    if not pairs:
        raise RuntimeError(f"no chunk was timed: {len(batches)} batches are too few for "
                           f"chunks of {chunk}")
    timed = len(pairs) * chunk
    return Round(trainer=sum(t for (t, _), _ in pairs) / timed,
                 raw=sum(r for _, (r, _) in pairs) / timed,
                 trainer_faults=sum(f for (_, f), _ in pairs) / timed,
                 raw_faults=sum(f for _, (_, f) in pairs) / timed,
                 weights_match=same_weights(trainer.model, twin[0]) and all(
                     same_weights(trainer.model, other[0]) for _, _, other, _ in others),
                 others={name: total / timed for name, total in data.other_totals().items()})


def fixed_cost(case: Case, batches: list[Batch], device: torch.device, seed: int,
               log_root: str, per_batch_overhead: float, rounds: int = 5,
               idiomatic: bool = False) -> float:
    """Seconds one `fit()` call costs beyond its steps: whole `fit` calls of two steps,
    each followed by the raw loop on the same batches, minus the steps' own overhead."""
    short = batches[:2 * case.accumulation]
    differences = []
    for i in range(rounds):
        trainer = make_trainer(case, short, device, seed, os.path.join(log_root, f"fixed{i}"))
        model, optimizer = build(case, device, seed)
        gc.collect()
        synchronize(device)
        start = time.perf_counter()
        trainer.fit()
        synchronize(device)
        middle = time.perf_counter()
        case.raw(model, optimizer, OnDevice(short, device) if idiomatic else short)
        synchronize(device)
        differences.append((middle - start) - (time.perf_counter() - middle))
    return statistics.median(differences) - per_batch_overhead * len(short)


def bench_case(case: Case, device: torch.device, quick: bool, rounds: int | None,
               chunk: int | None, seed: int, log_root: str, idiomatic: bool = False
               ) -> Result:
    """A warm-up round, then timed interleaved rounds, then the one-off cost of fit().

    With `idiomatic`, batches stay on the host, as a DataLoader yields them: the Trainer
    moves them itself (prefetching on CUDA), the raw loop with ``.to(device)``, and the
    case's idiomatic loop, timed too, the same way plus its ``.item()`` every step."""
    steps = case.quick_steps if quick else case.steps
    rounds = rounds or (2 if quick else case.rounds)
    chunk = chunk or case.chunk
    if chunk % case.accumulation:
        raise ValueError(f"{case.name}: chunk={chunk} is not a multiple of the "
                         f"accumulation ({case.accumulation})")
    # Under torchrun each rank draws its own batches, as sharded data would give it.
    batches = make_batches(case, steps, torch.device("cpu") if idiomatic else device,
                           seed + int(os.environ.get("RANK", "0")))
    run_dirs = (os.path.join(log_root, f"{case.name}-{i}") for i in range(sys.maxsize))
    interleaved_round(case, batches, chunk, device, seed, next(run_dirs), idiomatic)  # warm-up
    done = [interleaved_round(case, batches, chunk, device, seed, next(run_dirs), idiomatic)
            for _ in range(rounds)]
    result = Result(case, steps, done)
    result.fixed_seconds = fixed_cost(case, batches, device, seed, log_root, result.overhead,
                                      idiomatic=idiomatic)
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
    """One row per case: medians per batch, ratio, overhead, one-off cost, verdict."""
    idiomatic = any(r.ratio_to("idiomatic") is not None for r in results)
    header = (f"{'case':<11} {'batches':>7} {'rounds':>6} {'trainer us':>10} {'raw us':>9} "
              f"{'ratio':>6} {'ratio IQR':>11} {'overhead us':>11} {'fit() ms':>8} "
              f"{'faults T/R':>10} {'target':>7}  verdict"
              + (f" {'idiom us':>9} {'T/idiom':>7}" if idiomatic else ""))
    print(header)
    print("-" * len(header))
    for r in results:
        q1, q3 = r.ratio_quartiles()
        target = r.case.target
        verdict = "-" if target is None else "PASS" if r.ratio <= target else "MISS"
        faults = f"{r.median('trainer_faults'):.0f}/{r.median('raw_faults'):.0f}"
        print(f"{r.case.name:<11} {r.batches:>7} {len(r.rounds):>6} "
              f"{r.median('trainer') * 1e6:>10.1f} {r.median('raw') * 1e6:>9.1f} "
              f"{r.ratio:>6.3f} {q1:>5.3f}-{q3:<5.3f} "
              f"{r.overhead * 1e6:>11.1f} "
              f"{r.fixed_seconds * 1e3:>8.1f} {faults:>10} "
              f"{'' if target is None else '<=' + format(target, '.2f'):>7}  {verdict:<7}"
              + (_idiomatic_columns(r) if idiomatic else "")
              + ("" if r.weights_match else "  (WARNING: final weights differ)"))
    print("Per batch, steady state: medians over rounds (one fit() each, interleaved chunk "
          "by chunk with the raw loop); ratio = median of the rounds' Trainer/raw; "
          "fit() ms = once per fit() call, not per step; faults = minor page faults")
    if any(r.ratio_to("idiomatic") is not None for r in results):
        print("Batches on the host; idiom us = the idiomatic loop (.item() every step, plain "
              ".to(device) copies) per batch; T/idiom = median of the rounds' Trainer/idiomatic")
    for r in results:
        q1, q3 = r.ratio_quartiles()
        if r.case.target is not None and q1 <= r.case.target < q3:
            print(f"note: {r.case.name}: the target lies within the rounds' interquartile "
                  "range; treat its verdict with caution")


def _idiomatic_columns(result: Result) -> str:
    ratio = result.ratio_to("idiomatic")
    if ratio is None:
        return f" {'-':>9} {'-':>7}"
    seconds = statistics.median(r.others["idiomatic"] for r in result.rounds)
    return f" {seconds * 1e6:>9.1f} {ratio:>7.3f}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, 2 rounds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds (one fit each) per case (default: per case)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="batches per interleaved chunk (default: per case)")
    parser.add_argument("--cases", nargs="+", default=None,
                        choices=[case.name for case in CASES], help="cases to run")
    parser.add_argument("--steps", type=int, default=None,
                        help="override batches per round for every case")
    parser.add_argument("--device", default="cpu", help="device to train on (default: cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--idiomatic", action=argparse.BooleanOptionalAction, default=None,
                        help="batches on the host, and also time the idiomatic loop "
                             "(.item() every step); default: on for CUDA devices")
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
    idiomatic = device.type == "cuda" if args.idiomatic is None else args.idiomatic
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:  # under torchrun: the DDP cases, on the group the Trainer joins
        import torch.distributed as dist

        dist.init_process_group("gloo")
        if dist.get_rank() != 0:  # rank 0 prints
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the process's life
    cases = [case for case in CASES if (args.cases is None or case.name in args.cases)
             and case.processes == processes]
    for case in [case for case in cases if case.needs and not importlib.util.find_spec(
            case.needs)]:
        print(f"skipping {case.name}: it needs {case.needs}", flush=True)
        cases.remove(case)
    if args.steps is not None:
        cases = [replace(case, steps=args.steps, quick_steps=args.steps) for case in cases]
    print(machine_line(device, malloc), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="lt-overhead-") as log_root:
        for case in cases:
            started = time.perf_counter()
            results.append(bench_case(case, device, args.quick, args.rounds, args.chunk,
                                      args.seed, log_root, idiomatic))
            print(f"  {case.name}: done in {time.perf_counter() - started:.1f}s", flush=True)
    print()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
